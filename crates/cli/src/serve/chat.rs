//! `/v1/chat/completions` and `/v1/completions`: one library request per
//! HTTP request, answered whole or streamed as server-sent events.

use super::*;

pub(super) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: ChatRequest = state.body(&headers, body).await?;
    let model = state.model(&request.model)?;
    let config = request.config()?.with_model(model.name);
    let mut reply = Reply::new(Endpoint::Chat, model.id, unix_now());
    reply.one_call = request.parallel_tool_calls == Some(false);
    let stream = state.genius.chat(request.messages, config);
    answer(reply, stream, &request.sampling).await
}

pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = state.body(&headers, body).await?;
    let prompt = request.prompt()?;
    let model = state.model(&request.model)?;
    let config = request.config()?.with_model(model.name);
    let reply = Reply::new(Endpoint::Completion, model.id, unix_now());
    let stream = state.genius.infer(prompt, config);
    answer(reply, stream, &request.sampling).await
}

/// The answer to a generating request: whole, or streamed as the request
/// asked.
async fn answer(
    reply: Reply,
    stream: RequestStream,
    sampling: &openai::Sampling,
) -> Result<Response, ApiError> {
    if sampling.streams() {
        stream_reply(reply, stream, sampling.include_usage()).await
    } else {
        whole_reply(reply, stream).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// What one answer has gathered so far, and how to write it.
struct Reply {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    content: String,
    reasoning: String,
    tool_calls: Vec<Value>,
    logprobs: Vec<Value>,
    /// How many of `logprobs` went out with streamed chunks.
    logprobs_sent: usize,
    usage: Option<Usage>,
    /// At most one tool call (`parallel_tool_calls: false`).
    one_call: bool,
}

impl Reply {
    fn new(endpoint: Endpoint, model: String, created: u64) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            endpoint,
            id: format!("{prefix}-{}", request_id()),
            model,
            created,
            content: String::new(),
            reasoning: String::new(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            logprobs_sent: 0,
            usage: None,
            one_call: false,
        }
    }

    fn finish_reason(&self) -> &'static str {
        self.usage
            .as_ref()
            .map_or("stop", |usage| openai::finish_reason(usage.finish_reason))
    }

    fn object(&self, streamed: bool) -> &'static str {
        match (self.endpoint, streamed) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn whole(&self) -> Value {
        let logprobs = if self.logprobs.is_empty() {
            Value::Null
        } else {
            json!({"content": self.logprobs})
        };
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut message = json!({
                    "role": "assistant",
                    "content": if self.content.is_empty() && !self.tool_calls.is_empty() {
                        Value::Null
                    } else {
                        Value::String(self.content.clone())
                    },
                });
                if !self.tool_calls.is_empty() {
                    message["tool_calls"] = Value::Array(self.tool_calls.clone());
                }
                if !self.reasoning.is_empty() {
                    message["reasoning_content"] = Value::String(self.reasoning.clone());
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason()})
            }
            Endpoint::Completion => {
                let logprobs = legacy_logprobs(&self.logprobs);
                json!({"index": 0, "text": self.content, "logprobs": logprobs, "finish_reason": self.finish_reason()})
            }
        };
        let mut whole = self.envelope(false, vec![choice]);
        if let Some(usage) = &self.usage {
            whole["usage"] = openai::usage(usage);
        }
        whole
    }

    fn envelope(&self, streamed: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streamed),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("rusty-genius-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    /// A streamed chunk with one change of the answer.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>, logprobs: Option<Value>) -> Value {
        let logprobs = logprobs.map_or(Value::Null, |content| json!({"content": content}));
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Endpoint::Completion => json!({
                "index": 0,
                "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        self.envelope(true, vec![choice])
    }

    /// Takes in one event; returns the chunk to stream for it, if any.
    fn take(&mut self, event: InferenceEvent) -> Option<Value> {
        match event {
            InferenceEvent::Content(text) => {
                self.content.push_str(&text);
                let logprobs = self.pending_logprobs();
                Some(self.chunk(json!({"content": text}), None, logprobs))
            }
            InferenceEvent::Thought(ThoughtEvent::Delta(text)) => {
                self.reasoning.push_str(&text);
                (self.endpoint == Endpoint::Chat)
                    .then(|| self.chunk(json!({"reasoning_content": text}), None, None))
            }
            InferenceEvent::ToolCall {
                id,
                name,
                arguments,
            } => {
                if self.one_call && !self.tool_calls.is_empty() {
                    log::debug!("parallel_tool_calls false: a further call of `{name}` left out");
                    return None;
                }
                let index = self.tool_calls.len();
                let call = json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments.to_string()},
                });
                self.tool_calls.push(call.clone());
                let mut streamed = call;
                streamed["index"] = json!(index);
                Some(self.chunk(json!({"tool_calls": [streamed]}), None, None))
            }
            InferenceEvent::Logprobs(token) => {
                self.logprobs.push(logprob_json(&token));
                None
            }
            InferenceEvent::Usage(usage) => {
                self.usage = Some(usage);
                None
            }
            _ => None,
        }
    }

    /// Log-probabilities not yet sent with a streamed chunk.
    fn pending_logprobs(&mut self) -> Option<Value> {
        let sent = self.logprobs_sent;
        (sent < self.logprobs.len()).then(|| {
            self.logprobs_sent = self.logprobs.len();
            Value::Array(self.logprobs[sent..].to_vec())
        })
    }
}

/// Log-probabilities in the completions API's older shape: parallel
/// lists of tokens, their log-probabilities, the likeliest alternatives
/// (token to log-probability) and each token's offset in the text.
fn legacy_logprobs(tokens: &[Value]) -> Value {
    if tokens.is_empty() {
        return Value::Null;
    }
    let mut offset = 0;
    let mut offsets = Vec::new();
    for token in tokens {
        offsets.push(offset);
        offset += token["token"].as_str().map_or(0, str::len);
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|token| {
            let mut map = serde_json::Map::new();
            for alternative in token["top_logprobs"].as_array().into_iter().flatten() {
                if let Some(text) = alternative["token"].as_str() {
                    map.entry(text.to_owned())
                        .or_insert_with(|| alternative["logprob"].clone());
                }
            }
            Value::Object(map)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

fn logprob_json(token: &TokenLogprobs) -> Value {
    json!({
        "id": token.id,
        "token": token.token,
        "logprob": token.logprob,
        "bytes": token.bytes,
        "top_logprobs": token.top_logprobs.iter().map(|top| json!({
            "id": top.id,
            "token": top.token,
            "logprob": top.logprob,
            "bytes": top.bytes,
        })).collect::<Vec<_>>(),
    })
}

async fn whole_reply(mut reply: Reply, mut stream: RequestStream) -> Result<Response, ApiError> {
    while let Some(event) = stream.next().await {
        match event {
            Ok(InferenceEvent::Complete) => break,
            Ok(event) => {
                reply.take(event);
            }
            Err(err) => return Err(ApiError::from_report(&err)),
        }
    }
    Ok(axum::Json(reply.whole()).into_response())
}

/// Streams the answer as server-sent events, once its first event has
/// come (see [`first_event`]).
async fn stream_reply(
    reply: Reply,
    mut stream: RequestStream,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let first = first_event(&mut stream).await?;
    let opening = match reply.endpoint {
        Endpoint::Chat => {
            Some(reply.chunk(json!({"role": "assistant", "content": ""}), None, None))
        }
        Endpoint::Completion => None,
    };
    let events = Watched::new(stream, reply.id.clone());
    Ok(event_stream(sse(
        reply,
        opening,
        first,
        events,
        include_usage,
    )))
}

/// The first event of a request that will be streamed (its start is
/// skipped), or the HTTP error the library refused it with. Awaited
/// before the response starts, so that a refused request gets its error
/// status rather than an error inside a 200 stream.
pub(super) async fn first_event(
    stream: &mut RequestStream,
) -> Result<Option<InferenceEvent>, ApiError> {
    loop {
        match stream.next().await {
            Some(Ok(InferenceEvent::ProcessStart)) => continue,
            Some(Ok(event)) => return Ok(Some(event)),
            Some(Err(err)) => return Err(ApiError::from_report(&err)),
            None => return Ok(None),
        }
    }
}

/// A server-sent event stream of `frames`, with the headers that keep
/// caches and proxies from holding it back.
pub(super) fn event_stream(
    frames: impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(frames));
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

/// The SSE frames of one answer, ending in `data: [DONE]`.
fn sse(
    reply: Reply,
    opening: Option<Value>,
    first: Option<InferenceEvent>,
    events: Watched,
    include_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    enum Phase {
        Running,
        Done,
    }
    let start = futures::stream::iter(opening.as_ref().map(data));
    let state = (reply, first, events, Phase::Running);
    let rest = futures::stream::unfold(
        state,
        move |(mut reply, mut first, mut events, phase)| async move {
            if let Phase::Done = phase {
                return None;
            }
            loop {
                let event = match first.take() {
                    Some(event) => Some(Ok(event)),
                    None => events.next().await,
                };
                match event {
                    Some(Ok(InferenceEvent::Complete)) | None => {
                        events.finished();
                        let mut frames = String::new();
                        let logprobs = reply.pending_logprobs();
                        let finish = reply.chunk(json!({}), Some(reply.finish_reason()), logprobs);
                        frames.push_str(&format!("data: {finish}\n\n"));
                        if include_usage {
                            if let Some(usage) = &reply.usage {
                                let mut last = reply.envelope(true, Vec::new());
                                last["usage"] = openai::usage(usage);
                                frames.push_str(&format!("data: {last}\n\n"));
                            }
                        }
                        frames.push_str("data: [DONE]\n\n");
                        return Some((Ok(Bytes::from(frames)), (reply, None, events, Phase::Done)));
                    }
                    Some(Ok(event)) => {
                        let is_token = matches!(event, InferenceEvent::Content(_));
                        if let Some(chunk) = reply.take(event) {
                            if is_token {
                                events.sent += 1;
                            }
                            return Some((data(&chunk), (reply, None, events, Phase::Running)));
                        }
                    }
                    Some(Err(err)) => {
                        events.finished();
                        let error = ApiError::from_report(&err).body();
                        let frame = json!(error);
                        return Some((data(&frame), (reply, None, events, Phase::Done)));
                    }
                }
            }
        },
    );
    start.chain(rest)
}

/// A request's stream while its answer is streamed to a client. If the
/// client goes away first, the request is stopped and what the engine
/// generated is logged, so a cancelled generation can be seen to end.
pub(super) struct Watched {
    stream: Option<RequestStream>,
    id: String,
    /// Content events handed to the client.
    pub(super) sent: usize,
}

impl Watched {
    /// Watches `stream`, the request `id`.
    pub(super) fn new(stream: RequestStream, id: String) -> Self {
        Self {
            stream: Some(stream),
            id,
            sent: 0,
        }
    }

    pub(super) async fn next(&mut self) -> Option<Result<InferenceEvent, ErrorReport>> {
        self.stream.as_mut()?.next().await
    }

    /// The stream has ended normally.
    pub(super) fn finished(&mut self) {
        self.stream = None;
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        stream.stop();
        let id = self.id.clone();
        let sent = self.sent;
        // The stopped request still ends with its usage: read it, without
        // holding anything else up.
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
