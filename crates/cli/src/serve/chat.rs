//! `/v1/chat/completions` and `/v1/completions`: one library request per
//! choice (`n`), answered whole or streamed as server-sent events.

use futures::stream::SelectAll;
use rusty_genius::core::InferenceConfig;

use serde::Serialize;

use super::*;

pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Json(request): Json<ChatRequest>,
) -> Result<Response, ApiError> {
    let model = state.model(&request.model)?;
    let choices = choices(&request.sampling, state.settings.max_choices)?;
    let config = request.config()?.with_model(model.name);
    let mut reply = Reply::new(Endpoint::Chat, model.id, unix_now(), choices);
    reply.one_call = request.parallel_tool_calls == Some(false);
    reply.fold_thoughts = request.reasoning_format == openai::ReasoningFormat::None;
    let streams = choice_configs(&config, choices)
        .map(|config| state.genius.chat(request.messages.clone(), config))
        .collect();
    answer(reply, streams, &request.sampling).await
}

pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    Json(request): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompt = request.prompt()?;
    let model = state.model(&request.model)?;
    let choices = choices(&request.sampling, state.settings.max_choices)?;
    let config = request.config()?.with_model(model.name);
    let reply = Reply::new(Endpoint::Completion, model.id, unix_now(), choices);
    let streams = choice_configs(&config, choices)
        .map(|config| state.genius.submit(prompt.clone(), config))
        .collect();
    answer(reply, streams, &request.sampling).await
}

/// How many choices the request asks for (`n`): from one to as many as
/// the engine answers at once, so that they run side by side, sharing
/// their prompt's cache (the engine decodes it once).
fn choices(sampling: &openai::Sampling, most: usize) -> Result<usize, ApiError> {
    let n = sampling.n.unwrap_or(1);
    if n == 0 || n as usize > most {
        return Err(ApiError::invalid(format!(
            "n={n}: this server returns from 1 to {most} choices per request, as many as it answers at once (genius serve --parallel)"
        ))
        .param("n"));
    }
    Ok(n as usize)
}

/// The settings of each of `choices` choices: the same, but for the
/// seed, which is `seed + i` for the choice `i` when the request gave one
/// (each choice otherwise draws a seed of its own).
fn choice_configs(
    config: &InferenceConfig,
    choices: usize,
) -> impl Iterator<Item = InferenceConfig> + '_ {
    (0..choices as u32).map(move |i| {
        let mut config = config.clone();
        config.seed = config.seed.map(|seed| seed.wrapping_add(i));
        config
    })
}

/// The answer to a generating request: whole, or streamed as the request
/// asked.
async fn answer(
    reply: Reply,
    streams: Vec<RequestStream>,
    sampling: &openai::Sampling,
) -> Result<Response, ApiError> {
    if sampling.streams() {
        stream_reply(reply, streams, sampling.include_usage()).await
    } else {
        let events = Watched::many(streams, reply.id.clone());
        whole_reply(reply, events).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// One answer to a request, and how to write it: the envelope all its
/// choices share, and what each has gathered so far.
struct Reply {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    choices: Vec<Choice>,
    /// At most one tool call per choice (`parallel_tool_calls: false`).
    one_call: bool,
    /// Reasoning goes out in `content`, within its `<think>` tags
    /// (`reasoning_format: none`).
    fold_thoughts: bool,
}

/// What one choice has gathered so far.
#[derive(Default)]
struct Choice {
    content: String,
    reasoning: String,
    tool_calls: Vec<ToolCallOut>,
    logprobs: Vec<LogprobOut>,
    /// How many of `logprobs` went out with streamed chunks.
    logprobs_sent: usize,
    usage: Option<Usage>,
    /// Its last chunk (with its finish reason) was streamed.
    finished: bool,
}

impl Choice {
    fn finish_reason(&self) -> &'static str {
        self.usage
            .as_ref()
            .map_or("stop", |usage| openai::finish_reason(usage.finish_reason))
    }

    /// Log-probabilities not yet sent with a streamed chunk.
    fn pending_logprobs(&mut self) -> Option<Vec<LogprobOut>> {
        let sent = self.logprobs_sent;
        (sent < self.logprobs.len()).then(|| {
            self.logprobs_sent = self.logprobs.len();
            self.logprobs[sent..].to_vec()
        })
    }
}

impl Reply {
    fn new(endpoint: Endpoint, model: String, created: u64, choices: usize) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            endpoint,
            id: format!("{prefix}-{}", unique_id()),
            model,
            created,
            choices: (0..choices).map(|_| Choice::default()).collect(),
            one_call: false,
            fold_thoughts: false,
        }
    }

    fn object(&self, streamed: bool) -> &'static str {
        match (self.endpoint, streamed) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// The usage of the whole request: its prompt once (as the engine
    /// decoded it once), the tokens of every choice.
    fn usage(&self) -> Option<Usage> {
        let mut usages = self.choices.iter().filter_map(|c| c.usage.as_ref());
        let mut total = usages.next()?.clone();
        for usage in usages {
            total.cached_tokens = total.cached_tokens.min(usage.cached_tokens);
            total.generated_tokens += usage.generated_tokens;
            total.draft_tokens += usage.draft_tokens;
            total.accepted_draft_tokens += usage.accepted_draft_tokens;
            total.prompt_ms = total.prompt_ms.max(usage.prompt_ms);
            total.generation_ms = total.generation_ms.max(usage.generation_ms);
        }
        Some(total)
    }

    fn whole(&self) -> Value {
        let choices = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, choice)| self.whole_choice(index, choice))
            .collect();
        let usage = self.usage();
        self.envelope(false, choices, usage.as_ref())
    }

    fn whole_choice(&self, index: usize, choice: &Choice) -> Value {
        let reason = choice.finish_reason();
        match self.endpoint {
            Endpoint::Chat => to_value(&WholeChat {
                index,
                message: Message {
                    role: "assistant",
                    content: (!choice.content.is_empty() || choice.tool_calls.is_empty())
                        .then_some(choice.content.as_str()),
                    tool_calls: (!choice.tool_calls.is_empty()).then_some(&choice.tool_calls[..]),
                    reasoning_content: (!choice.reasoning.is_empty())
                        .then_some(choice.reasoning.as_str()),
                },
                logprobs: (!choice.logprobs.is_empty()).then_some(Logprobs {
                    content: &choice.logprobs[..],
                }),
                finish_reason: reason,
            }),
            Endpoint::Completion => to_value(&WholeText {
                index,
                text: &choice.content,
                logprobs: legacy_logprobs(&choice.logprobs),
                finish_reason: reason,
            }),
        }
    }

    /// The object around `choices`, with the request's usage (and
    /// llama-server's timings) when given.
    fn envelope(&self, streamed: bool, choices: Vec<Value>, usage: Option<&Usage>) -> Value {
        to_value(&Envelope {
            id: &self.id,
            object: self.object(streamed),
            created: self.created,
            model: &self.model,
            system_fingerprint: concat!("rusty-genius-", env!("CARGO_PKG_VERSION")),
            choices,
            usage: usage.map(openai::usage),
            timings: usage.map(openai::timings),
        })
    }

    /// A streamed chunk with one change of choice `index`.
    fn chunk(
        &self,
        index: usize,
        delta: Delta<'_>,
        finish_reason: Option<&str>,
        logprobs: Option<Vec<LogprobOut>>,
    ) -> Value {
        let logprobs = logprobs.map(|content| Logprobs { content });
        let choice = match self.endpoint {
            Endpoint::Chat => to_value(&DeltaChoice {
                index,
                delta,
                logprobs,
                finish_reason,
            }),
            Endpoint::Completion => to_value(&TextChunk {
                index,
                text: delta.content.unwrap_or(""),
                logprobs,
                finish_reason,
            }),
        };
        self.envelope(true, vec![choice], None)
    }

    /// The last chunk of choice `index`, with its finish reason.
    fn finish(&mut self, index: usize) -> Value {
        let choice = &mut self.choices[index];
        choice.finished = true;
        let logprobs = choice.pending_logprobs();
        let reason = choice.finish_reason();
        self.chunk(index, Delta::default(), Some(reason), logprobs)
    }

    /// Takes in one event of choice `index`; returns the chunk to stream
    /// for it, if any.
    fn take(&mut self, index: usize, event: InferenceEvent) -> Option<Value> {
        let event = match event {
            InferenceEvent::Thought(thought) if self.fold_thoughts => {
                InferenceEvent::Content(match thought {
                    ThoughtEvent::Start => "<think>".into(),
                    ThoughtEvent::Delta(text) => text,
                    ThoughtEvent::Stop => "</think>".into(),
                })
            }
            event => event,
        };
        let (endpoint, one_call) = (self.endpoint, self.one_call);
        let choice = &mut self.choices[index];
        match event {
            InferenceEvent::Content(text) => {
                choice.content.push_str(&text);
                let logprobs = choice.pending_logprobs();
                let delta = Delta {
                    content: Some(&text),
                    ..Delta::default()
                };
                Some(self.chunk(index, delta, None, logprobs))
            }
            InferenceEvent::Thought(ThoughtEvent::Delta(text)) => {
                choice.reasoning.push_str(&text);
                (endpoint == Endpoint::Chat).then(|| {
                    let delta = Delta {
                        reasoning_content: Some(&text),
                        ..Delta::default()
                    };
                    self.chunk(index, delta, None, None)
                })
            }
            InferenceEvent::ToolCall {
                id,
                name,
                arguments,
            } => {
                if one_call && !choice.tool_calls.is_empty() {
                    log::debug!("parallel_tool_calls false: a further call of `{name}` left out");
                    return None;
                }
                let at = choice.tool_calls.len();
                let call = ToolCallOut {
                    id,
                    kind: "function",
                    function: FunctionOut {
                        name,
                        arguments: arguments.to_string(),
                    },
                    index: None,
                };
                choice.tool_calls.push(call.clone());
                let streamed = ToolCallOut {
                    index: Some(at),
                    ..call
                };
                let delta = Delta {
                    tool_calls: Some(vec![streamed]),
                    ..Delta::default()
                };
                Some(self.chunk(index, delta, None, None))
            }
            InferenceEvent::Logprobs(token) => {
                choice.logprobs.push(LogprobOut::from(&token));
                None
            }
            InferenceEvent::Usage(usage) => {
                choice.usage = Some(usage);
                None
            }
            _ => None,
        }
    }
}

/// Log-probabilities in the completions API's older shape: parallel
/// lists of tokens, their log-probabilities, the likeliest alternatives
/// (token to log-probability) and each token's offset in the text.
fn legacy_logprobs(tokens: &[LogprobOut]) -> Option<LegacyLogprobs<'_>> {
    if tokens.is_empty() {
        return None;
    }
    let mut offset = 0;
    let mut text_offset = Vec::new();
    for token in tokens {
        text_offset.push(offset);
        offset += token.token.len();
    }
    let top_logprobs = tokens
        .iter()
        .map(|token| {
            let mut map = serde_json::Map::new();
            for alternative in &token.top_logprobs {
                map.entry(alternative.token.clone())
                    .or_insert_with(|| Value::from(alternative.logprob));
            }
            map
        })
        .collect();
    Some(LegacyLogprobs {
        tokens: tokens.iter().map(|t| t.token.as_str()).collect(),
        token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
        top_logprobs,
        text_offset,
    })
}

/// `value` as JSON (a reply's types always are).
fn to_value(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

// ---- the replies' shapes ------------------------------------------------

/// A chat completion or a completion, whole or as one streamed chunk.
#[derive(Debug, Serialize)]
struct Envelope<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<openai::UsageOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timings: Option<openai::Timings>,
}

/// A whole chat completion's choice.
#[derive(Debug, Serialize)]
struct WholeChat<'a> {
    index: usize,
    message: Message<'a>,
    logprobs: Option<Logprobs<&'a [LogprobOut]>>,
    finish_reason: &'static str,
}

/// The assistant's message: its text (null when it only calls tools),
/// its tool calls, its reasoning.
#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a [ToolCallOut]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
}

/// A whole completion's choice.
#[derive(Debug, Serialize)]
struct WholeText<'a> {
    index: usize,
    text: &'a str,
    logprobs: Option<LegacyLogprobs<'a>>,
    finish_reason: &'static str,
}

/// A streamed chat chunk's choice.
#[derive(Debug, Serialize)]
struct DeltaChoice<'a> {
    index: usize,
    delta: Delta<'a>,
    logprobs: Option<Logprobs<Vec<LogprobOut>>>,
    finish_reason: Option<&'a str>,
}

/// What a chunk adds to the message: its role (first), text, reasoning or
/// a tool call; nothing in the last chunk.
#[derive(Debug, Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<ToolCallOut>>,
}

/// A streamed completion chunk's choice.
#[derive(Debug, Serialize)]
struct TextChunk<'a> {
    index: usize,
    text: &'a str,
    logprobs: Option<Logprobs<Vec<LogprobOut>>>,
    finish_reason: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct Logprobs<T> {
    content: T,
}

/// A tool call as OpenAI sends it; `index` only in a streamed chunk.
#[derive(Debug, Clone, Serialize)]
struct ToolCallOut {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
struct FunctionOut {
    name: String,
    arguments: String,
}

/// A token's log-probability, with its id and bytes, and the likeliest
/// alternatives (as f64, the width JSON numbers are read at).
#[derive(Debug, Clone, Serialize)]
struct LogprobOut {
    id: u32,
    token: String,
    logprob: f64,
    bytes: Vec<u8>,
    top_logprobs: Vec<TopLogprobOut>,
}

#[derive(Debug, Clone, Serialize)]
struct TopLogprobOut {
    id: u32,
    token: String,
    logprob: f64,
    bytes: Vec<u8>,
}

impl From<&TokenLogprobs> for LogprobOut {
    fn from(token: &TokenLogprobs) -> Self {
        Self {
            id: token.id,
            token: token.token.clone(),
            logprob: f64::from(token.logprob),
            bytes: token.bytes.clone(),
            top_logprobs: token
                .top_logprobs
                .iter()
                .map(|top| TopLogprobOut {
                    id: top.id,
                    token: top.token.clone(),
                    logprob: f64::from(top.logprob),
                    bytes: top.bytes.clone(),
                })
                .collect(),
        }
    }
}

/// The completions API's older log-probabilities.
#[derive(Debug, Serialize)]
struct LegacyLogprobs<'a> {
    tokens: Vec<&'a str>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<serde_json::Map<String, Value>>,
    text_offset: Vec<usize>,
}

async fn whole_reply(mut reply: Reply, mut events: Watched) -> Result<Response, ApiError> {
    while let Some((index, event)) = events.next_of_any().await {
        match event {
            Ok(event) => {
                reply.take(index, event);
            }
            Err(err) => return Err(ApiError::from_report(&err)),
        }
    }
    events.finished();
    Ok(axum::Json(reply.whole()).into_response())
}

/// Streams the answer as server-sent events, once the first event of
/// every choice has come (see [`first_event`]).
async fn stream_reply(
    reply: Reply,
    mut streams: Vec<RequestStream>,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let mut first = Vec::new();
    for (index, stream) in streams.iter_mut().enumerate() {
        if let Some(event) = first_event(stream).await? {
            first.push((index, event));
        }
    }
    let events = Watched::many(streams, reply.id.clone());
    let opening: Vec<Value> = match reply.endpoint {
        Endpoint::Chat => (0..reply.choices.len())
            .map(|index| {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                };
                reply.chunk(index, delta, None, None)
            })
            .collect(),
        Endpoint::Completion => Vec::new(),
    };
    Ok(event_stream(sse(
        reply,
        opening,
        first,
        events,
        include_usage,
    )))
}

/// Waits until the engine has accepted a request that will be streamed
/// (its `ProcessStart`), or gives the HTTP error the library refused it
/// with: awaited before the response starts, so that a refused request
/// gets its error status rather than an error inside a 200 stream, and an
/// accepted one starts its stream at once (while its prompt is read, the
/// stream carries keep-alive comments). An event that came without a
/// `ProcessStart` is handed back.
pub(super) async fn first_event(
    stream: &mut RequestStream,
) -> Result<Option<InferenceEvent>, ApiError> {
    match stream.next().await {
        Some(Ok(InferenceEvent::ProcessStart)) | None => Ok(None),
        Some(Ok(event)) => Ok(Some(event)),
        Some(Err(err)) => Err(ApiError::from_report(&err)),
    }
}

/// Hands `take` every event of a whole (not streamed) answer: `first` (the
/// one `first_event` read, if any), then the rest of `stream`, until
/// `Complete`; an error ends it as the HTTP error.
pub(super) async fn each_event(
    first: Option<InferenceEvent>,
    stream: &mut RequestStream,
    mut take: impl FnMut(InferenceEvent),
) -> Result<(), ApiError> {
    let mut next = first;
    loop {
        let event = match next.take() {
            Some(event) => Ok(event),
            None => match stream.next().await {
                Some(event) => event,
                None => return Ok(()),
            },
        };
        match event {
            Ok(InferenceEvent::Complete) => return Ok(()),
            Ok(event) => take(event),
            Err(err) => return Err(ApiError::from_report(&err)),
        }
    }
}

/// `frames`, with an SSE comment (which every client skips) after each
/// `--sse-keep-alive` without a frame (the server's setting, as the
/// request's context carries it).
fn with_keep_alive(
    frames: impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let every = super::context::current().map_or(Duration::from_secs(10), |c| c.keep_alive);
    futures::stream::unfold(Box::pin(frames), move |mut frames| async move {
        match tokio::time::timeout(every, frames.next()).await {
            Ok(Some(frame)) => Some((frame, frames)),
            Ok(None) => None,
            Err(_) => Some((Ok(Bytes::from_static(b": keep-alive\n\n")), frames)),
        }
    })
}

/// A server-sent event stream of `frames`, with the headers that keep
/// caches and proxies from holding it back.
pub(super) fn event_stream(
    frames: impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(with_keep_alive(frames)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx (and proxies like it) not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn data(value: &Value) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(format!("data: {value}\n\n")))
}

/// The SSE frames of one answer: every choice's chunks as they come,
/// each choice's last chunk when it completes, then the usage (when
/// asked for) and `data: [DONE]`.
fn sse(
    reply: Reply,
    opening: Vec<Value>,
    first: Vec<(usize, InferenceEvent)>,
    events: Watched,
    include_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    enum Phase {
        Running,
        Done,
    }
    let start = futures::stream::iter(opening.iter().map(data).collect::<Vec<_>>());
    let state = (reply, first.into_iter(), events, Phase::Running);
    let rest = futures::stream::unfold(
        state,
        move |(mut reply, mut first, mut events, phase)| async move {
            if let Phase::Done = phase {
                return None;
            }
            loop {
                let event = match first.next() {
                    Some((index, event)) => Some((index, Ok(event))),
                    None => events.next_of_any().await,
                };
                match event {
                    Some((index, Ok(InferenceEvent::Complete))) => {
                        let finish = reply.finish(index);
                        return Some((data(&finish), (reply, first, events, Phase::Running)));
                    }
                    None => {
                        events.finished();
                        let mut frames = String::new();
                        // A choice whose stream ended without completing
                        // still gets its last chunk.
                        for index in 0..reply.choices.len() {
                            if !reply.choices[index].finished {
                                let finish = reply.finish(index);
                                frames.push_str(&format!("data: {finish}\n\n"));
                            }
                        }
                        if include_usage {
                            if let Some(usage) = reply.usage() {
                                let last = reply.envelope(true, Vec::new(), Some(&usage));
                                frames.push_str(&format!("data: {last}\n\n"));
                            }
                        }
                        frames.push_str("data: [DONE]\n\n");
                        return Some((
                            Ok(Bytes::from(frames)),
                            (reply, first, events, Phase::Done),
                        ));
                    }
                    Some((index, Ok(event))) => {
                        let is_token = matches!(event, InferenceEvent::Content(_));
                        if let Some(chunk) = reply.take(index, event) {
                            if is_token {
                                events.sent += 1;
                            }
                            return Some((data(&chunk), (reply, first, events, Phase::Running)));
                        }
                    }
                    Some((_, Err(err))) => {
                        events.finished();
                        let error = ApiError::from_report(&err).body();
                        let frame = to_value(&error);
                        return Some((data(&frame), (reply, first, events, Phase::Done)));
                    }
                }
            }
        },
    );
    start.chain(rest)
}

/// How one streamed answer writes its events in an API's frames (the
/// Responses API's events, Anthropic's, Ollama's NDJSON lines).
pub(super) trait Frames: Send + 'static {
    /// The frames for one event, if it makes any.
    fn frames_for(&mut self, event: InferenceEvent) -> Option<String>;
    /// The last frames, once the answer is complete (or its stream ended).
    fn last_frames(&mut self) -> String;
    /// The frames that report `err`, which ends the stream.
    fn error_frames(&mut self, err: &ErrorReport) -> String;
}

/// The bytes of a streamed answer: `first` (the event that came before the
/// response started, if any), then each event of `events` as `answer`
/// writes it, then its last frames or its error.
pub(super) fn answer_frames(
    answer: impl Frames,
    first: Option<InferenceEvent>,
    events: Watched,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    futures::stream::unfold(
        (answer, first, events, false),
        |(mut answer, mut first, mut events, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let event = match first.take() {
                    Some(event) => Some(Ok(event)),
                    None => events.next().await,
                };
                let (text, ended) = match event {
                    Some(Ok(InferenceEvent::Complete)) | None => {
                        events.finished();
                        (answer.last_frames(), true)
                    }
                    Some(Ok(event)) => {
                        let is_token = matches!(event, InferenceEvent::Content(_));
                        let Some(text) = answer.frames_for(event) else {
                            continue;
                        };
                        if is_token {
                            events.sent += 1;
                        }
                        (text, false)
                    }
                    Some(Err(err)) => {
                        events.finished();
                        (answer.error_frames(&err), true)
                    }
                };
                return Some((Ok(Bytes::from(text)), (answer, None, events, ended)));
            }
        },
    )
}

/// A request's streams (one per choice) while its answer goes to a
/// client. If the client goes away first, each request still running is
/// stopped and what the engine generated is logged, so a cancelled
/// generation can be seen to end.
pub(super) struct Watched {
    streams: SelectAll<Tagged>,
    id: String,
    /// Content events handed to the client.
    pub(super) sent: usize,
}

/// The stream of choice `index`, its events tagged with the index.
struct Tagged {
    index: usize,
    stream: RequestStream,
}

impl Stream for Tagged {
    type Item = (usize, Result<InferenceEvent, ErrorReport>);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let index = self.index;
        std::pin::Pin::new(&mut self.stream)
            .poll_next(cx)
            .map(|event| event.map(|event| (index, event)))
    }
}

impl Watched {
    /// Watches `stream`, the request `id`.
    pub(super) fn new(stream: RequestStream, id: String) -> Self {
        Self::many(vec![stream], id)
    }

    /// Watches the streams of the choices of the request `id`, in order.
    fn many(streams: Vec<RequestStream>, id: String) -> Self {
        let streams = streams
            .into_iter()
            .enumerate()
            .map(|(index, stream)| Tagged { index, stream });
        Self {
            streams: futures::stream::select_all(streams),
            id,
            sent: 0,
        }
    }

    /// The next event of the (only) stream.
    pub(super) async fn next(&mut self) -> Option<Result<InferenceEvent, ErrorReport>> {
        self.next_of_any().await.map(|(_, event)| event)
    }

    /// The next event of any choice, with the choice's index; `None` once
    /// every stream has ended.
    async fn next_of_any(&mut self) -> Option<(usize, Result<InferenceEvent, ErrorReport>)> {
        self.streams.next().await
    }

    /// The streams have ended normally.
    pub(super) fn finished(&mut self) {
        self.streams.clear();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let several = self.streams.len() > 1;
        for Tagged { index, mut stream } in std::mem::take(&mut self.streams) {
            stream.stop();
            let id = if several {
                format!("{} (choice {index})", self.id)
            } else {
                self.id.clone()
            };
            let sent = self.sent;
            // The stopped request still ends with its usage: read it,
            // without holding anything else up.
            tokio::spawn(async move {
                let deadline = tokio::time::sleep(Duration::from_secs(30));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        event = stream.next() => match event {
                            Some(Ok(InferenceEvent::Usage(usage))) => {
                                log::info!(
                                    "{id}: the client went away after {sent} streamed pieces; generation stopped after {} tokens ({} after the last piece sent)",
                                    usage.generated_tokens,
                                    usage.generated_tokens.saturating_sub(sent),
                                );
                                return;
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        },
                        () = &mut deadline => return,
                    }
                }
            });
        }
    }
}
