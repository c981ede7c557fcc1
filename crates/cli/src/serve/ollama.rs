//! Ollama's API (`/api/...`) beside the OpenAI one, on the same models,
//! gate and policies: `chat` and `generate` (NDJSON streams, or one
//! object with `stream: false`), `embed` and the older `embeddings`,
//! `tags`, `ps`, `show` and `version`. Errors go out in Ollama's shape,
//! `{"error": "..."}`.

use rusty_genius::core::chat::{ResponseFormat, Tool, ToolCall};
use rusty_genius::core::{ChatMessage, Embed, EmbedInput, InferenceConfig, PromptFormat, Role};
use serde::{Deserialize, Serialize};

use super::*;

/// The Ollama API version this server follows, for clients that check it.
const API_VERSION: &str = "0.12.0";

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/version", get(version))
        .route("/api/pull", post(pull))
        .route("/api/delete", axum::routing::delete(delete))
}

// ---- requests -----------------------------------------------------------

/// `options`: the sampling settings Ollama takes (others are ignored, as
/// Ollama ignores what a runner cannot use).
#[derive(Debug, Default, Deserialize)]
struct Options {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    num_ctx: Option<u64>,
}

/// A message as Ollama sends it: tool calls carry their arguments as an
/// object, and a tool result names its tool.
#[derive(Debug, Deserialize)]
struct Message {
    role: Role,
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<OllamaCall>,
    #[serde(default)]
    tool_name: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct OllamaCall {
    function: OllamaFunction,
}

#[derive(Debug, Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    think: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: Options,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    /// The code after the cursor: the answer is what goes between.
    #[serde(default)]
    suffix: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message)
}

/// `keep_alive`: seconds, a duration such as `"5m"` or `"1h30m"`, `0`
/// (unload when done) or a negative value (keep loaded).
fn keep_alive(value: &Value) -> Result<Duration, ApiError> {
    let bad = || {
        invalid(format!(
            "keep_alive {value} is not a duration: send seconds (300), a duration such as \"5m\" or \"1h30m\", 0 to unload when done, or -1 to keep the model loaded"
        ))
    };
    let seconds = match value {
        Value::Number(number) => number.as_f64().ok_or_else(bad)?,
        Value::String(text) => parse_duration(text).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if seconds < 0.0 {
        return Ok(Duration::MAX);
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Seconds in a Go-style duration (`"90s"`, `"5m"`, `"1h30m"`, `"-1m"`,
/// `"300"`).
fn parse_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Some(seconds);
    }
    let (sign, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, text),
    };
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&at| at > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_end..];
    }
    Some(sign * total)
}

/// `format`: `"json"` or a JSON schema.
fn response_format(format: &Value) -> Result<ResponseFormat, ApiError> {
    match format {
        Value::Null => Ok(ResponseFormat::Text),
        Value::String(kind) if kind == "json" => Ok(ResponseFormat::JsonObject),
        Value::String(kind) if kind.is_empty() => Ok(ResponseFormat::Text),
        Value::Object(_) => Ok(ResponseFormat::json_schema("format", format.clone())),
        other => Err(invalid(format!(
            "format {other} is not \"json\" or a JSON schema object"
        ))),
    }
}

impl Options {
    /// The library's settings: the ones given, over the library's sampling
    /// defaults.
    fn config(&self) -> InferenceConfig {
        let mut config = openai::with_temperature(InferenceConfig::default(), self.temperature);
        if let Some(top_p) = self.top_p {
            config.top_p = top_p;
        }
        if let Some(top_k) = self.top_k {
            config.top_k = top_k;
        }
        if let Some(min_p) = self.min_p {
            config.min_p = min_p;
        }
        if let Some(penalty) = self.repeat_penalty {
            config.repetition_penalty = penalty;
        }
        config.frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        config.presence_penalty = self.presence_penalty.unwrap_or(0.0);
        config.seed = self.seed.map(openai::fold_seed);
        // Ollama's -1 (and -2) mean "until the context is full".
        config.max_tokens = self
            .num_predict
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0);
        config.stop = self.stop.clone().unwrap_or_default();
        if let Some(wanted) = self.num_ctx {
            // The context is the engine's, set when it loads.
            log::debug!("options.num_ctx {wanted}: the context size is set at start (--ctx-size)");
        }
        config
    }
}

/// Ollama's messages as the library's conversation. Tool calls get ids of
/// their own (Ollama has none); a tool result answers the last unanswered
/// call of its tool.
fn conversation(messages: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut open: Vec<(String, String)> = Vec::new();
    for (index, message) in messages.into_iter().enumerate() {
        if message
            .images
            .as_ref()
            .is_some_and(|images| !images.is_empty())
        {
            return Err(invalid(format!(
                "messages[{index}].images: this server's models read text only"
            )));
        }
        let mut converted = ChatMessage {
            role: message.role,
            content: Some(message.content),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        };
        for (at, call) in message.tool_calls.into_iter().enumerate() {
            let id = format!("call_{index}_{at}");
            let arguments = match call.function.arguments {
                Value::Null => json!({}),
                Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                other => other,
            };
            open.push((call.function.name.clone(), id.clone()));
            converted
                .tool_calls
                .push(ToolCall::new(id, call.function.name, &arguments));
        }
        if converted.role == Role::Tool {
            let name = message.tool_name;
            let answered = match &name {
                Some(name) => open.iter().rposition(|(called, _)| called == name),
                None => open.len().checked_sub(1),
            };
            converted.tool_call_id = answered.map(|at| open.remove(at).1);
            converted.name = name;
        }
        out.push(converted);
    }
    Ok(out)
}

// ---- endpoints ----------------------------------------------------------

async fn chat(
    State(state): State<Arc<AppState>>,
    Json(request): Json<ChatBody>,
) -> Result<Response, ApiError> {
    let model = resolve(&state, &request.model)?;
    let mut config = request.options.config().with_model(model.name.clone());
    config.tools = request.tools.unwrap_or_default();
    if let Some(format) = &request.format {
        config.response_format = response_format(format)?;
    }
    if let Some(idle) = &request.keep_alive {
        config.keep_alive = Some(keep_alive(idle)?);
    }
    // `think: false` leaves a thinking model's reasoning out of the answer
    // (the model still reasons: its template decides that).
    let hide_thinking = matches!(request.think, Some(Value::Bool(false)));
    let messages = conversation(request.messages)?;
    if messages.is_empty() {
        // Ollama loads the model for an empty conversation and answers.
        return load_only(&state, &model, "message", request.keep_alive.as_ref()).await;
    }
    let stream = state.genius.chat(messages, config);
    let mut reply = Answer::new(Kind::Chat, model.id);
    reply.hide_thinking = hide_thinking;
    answer(reply, stream, request.stream.unwrap_or(true)).await
}

async fn generate(
    State(state): State<Arc<AppState>>,
    Json(request): Json<GenerateBody>,
) -> Result<Response, ApiError> {
    let model = resolve(&state, &request.model)?;
    if request
        .images
        .as_ref()
        .is_some_and(|images| !images.is_empty())
    {
        return Err(invalid("images: this server's models read text only"));
    }
    let mut config = request.options.config().with_model(model.name.clone());
    if let Some(format) = &request.format {
        config.response_format = response_format(format)?;
    }
    if let Some(idle) = &request.keep_alive {
        config.keep_alive = Some(keep_alive(idle)?);
    }
    let suffix = request.suffix.filter(|suffix| !suffix.is_empty());
    if request.prompt.is_empty() && suffix.is_none() {
        return load_only(&state, &model, "response", request.keep_alive.as_ref()).await;
    }
    let stream = if let Some(suffix) = suffix {
        // Fill in the middle, in the model's own layout for it.
        let infill = rusty_genius::core::Infill::new(request.prompt, suffix);
        state
            .genius
            .infill(infill, config.with_prompt_format(PromptFormat::Raw))
    } else if request.raw {
        let config = config.with_prompt_format(PromptFormat::Raw);
        state.genius.infer(request.prompt, config)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = request.system {
            messages.push(ChatMessage::system(system));
        }
        messages.push(ChatMessage::user(request.prompt));
        state.genius.chat(messages, config)
    };
    let reply = Answer::new(Kind::Generate, model.id);
    answer(reply, stream, request.stream.unwrap_or(true)).await
}

/// The answer to a request with nothing to answer: the model is loaded
/// (or, with `keep_alive: 0`, unloaded), as Ollama does.
async fn load_only(
    state: &AppState,
    model: &Served,
    field: &str,
    keep: Option<&Value>,
) -> Result<Response, ApiError> {
    let unload = match keep {
        Some(value) => keep_alive(value)? == Duration::ZERO,
        None => false,
    };
    let reason = if unload {
        let _ = state.genius.unload(&model.name).await;
        "unload"
    } else {
        state
            .genius
            .load(&model.name)
            .await
            .map_err(|err| ApiError::from_report(&err))?;
        "load"
    };
    let chat = field == "message";
    Ok(axum::Json(LoadOut {
        model: model.id.clone(),
        created_at: now(),
        done: true,
        done_reason: reason,
        message: chat.then_some(EmptyMessage {
            role: "assistant",
            content: "",
        }),
        response: (!chat).then_some(""),
    })
    .into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Generate,
}

/// One answer as it is gathered, and its objects.
struct Answer {
    kind: Kind,
    model: String,
    started: std::time::Instant,
    content: String,
    thinking: String,
    tool_calls: Vec<CallOut>,
    usage: Option<Usage>,
    /// Reasoning is left out (`think: false`).
    hide_thinking: bool,
}

impl Answer {
    fn new(kind: Kind, model: String) -> Self {
        Self {
            kind,
            model,
            started: std::time::Instant::now(),
            content: String::new(),
            thinking: String::new(),
            tool_calls: Vec::new(),
            usage: None,
            hide_thinking: false,
        }
    }

    /// An object carrying `content`, `thinking` and `tool_calls`, and
    /// how the answer ended in the last one.
    fn object(
        &self,
        content: &str,
        thinking: &str,
        tool_calls: &[CallOut],
        ending: Option<Ending>,
    ) -> Value {
        let thinking = (!thinking.is_empty()).then_some(thinking);
        let (message, response, top_thinking) = match self.kind {
            Kind::Chat => (
                Some(MessageOut {
                    role: "assistant",
                    content,
                    thinking,
                    tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                }),
                None,
                None,
            ),
            Kind::Generate => (None, Some(content), thinking),
        };
        let object = ObjectOut {
            model: &self.model,
            created_at: now(),
            done: ending.is_some(),
            message,
            response,
            thinking: top_thinking,
            ending,
        };
        serde_json::to_value(&object).unwrap_or(Value::Null)
    }

    /// The piece to send for one event, if any.
    fn take(&mut self, event: InferenceEvent) -> Option<Value> {
        match event {
            InferenceEvent::Content(text) => {
                self.content.push_str(&text);
                Some(self.object(&text, "", &[], None))
            }
            InferenceEvent::Thought(ThoughtEvent::Delta(_)) if self.hide_thinking => None,
            InferenceEvent::Thought(ThoughtEvent::Delta(text)) => {
                self.thinking.push_str(&text);
                Some(self.object("", &text, &[], None))
            }
            InferenceEvent::ToolCall {
                name, arguments, ..
            } => {
                let call = CallOut {
                    function: FunctionOut { name, arguments },
                };
                self.tool_calls.push(call.clone());
                Some(self.object("", "", &[call], None))
            }
            InferenceEvent::Usage(usage) => {
                self.usage = Some(usage);
                None
            }
            _ => None,
        }
    }

    /// The last object: `done`, why, and Ollama's counts and durations (in
    /// nanoseconds). Whole when the answer was not streamed.
    fn done(&self, whole: bool) -> Value {
        let nanos = |ms: f64| (ms * 1e6) as u64;
        let total = self.started.elapsed().as_nanos() as u64;
        let reason = match self.usage.as_ref().map(|u| u.finish_reason) {
            Some(FinishReason::MaxTokens | FinishReason::ContextFull) => "length",
            _ => "stop",
        };
        let mut ending = Ending {
            done_reason: reason,
            total_duration: total,
            counts: None,
        };
        if let Some(usage) = &self.usage {
            let prompt = nanos(usage.prompt_ms);
            let eval = nanos(usage.generation_ms);
            ending.counts = Some(Counts {
                load_duration: total.saturating_sub(prompt + eval),
                prompt_eval_count: usage.prompt_tokens,
                prompt_eval_duration: prompt,
                eval_count: usage.generated_tokens,
                eval_duration: eval,
            });
        }
        if whole {
            self.object(
                &self.content,
                &self.thinking,
                &self.tool_calls,
                Some(ending),
            )
        } else {
            self.object("", "", &[], Some(ending))
        }
    }
}

/// One object of an answer: a piece of it, or (`done`) its end.
#[derive(Debug, Serialize)]
struct ObjectOut<'a> {
    model: &'a str,
    created_at: String,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<MessageOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    ending: Option<Ending>,
}

#[derive(Debug, Serialize)]
struct MessageOut<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a [CallOut]>,
}

/// A tool call as Ollama sends it: arguments as an object.
#[derive(Debug, Clone, Serialize)]
struct CallOut {
    function: FunctionOut,
}

#[derive(Debug, Clone, Serialize)]
struct FunctionOut {
    name: String,
    arguments: Value,
}

/// Why an answer ended and what it took, in the last object.
#[derive(Debug, Serialize)]
struct Ending {
    done_reason: &'static str,
    total_duration: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    counts: Option<Counts>,
}

/// Ollama's counts and durations (nanoseconds).
#[derive(Debug, Serialize)]
struct Counts {
    load_duration: u64,
    prompt_eval_count: usize,
    prompt_eval_duration: u64,
    eval_count: usize,
    eval_duration: u64,
}

/// An error in the middle of a stream.
#[derive(Debug, Serialize)]
struct StreamError {
    error: String,
}

use rusty_genius::core::protocol::{AssetEvent, FinishReason};

/// Streams the answer as NDJSON, one object per line, or sends it whole.
async fn answer(
    mut reply: Answer,
    mut stream: RequestStream,
    streamed: bool,
) -> Result<Response, ApiError> {
    let first = super::chat::first_event(&mut stream).await?;
    if !streamed {
        super::chat::each_event(first, &mut stream, |event| {
            reply.take(event);
        })
        .await?;
        return Ok(axum::Json(reply.done(true)).into_response());
    }
    let events = Watched::new(stream, format!("ollama-{}", unique_id()));
    Ok(ndjson_response(chat::answer_frames(reply, first, events)))
}

impl chat::Frames for Answer {
    fn frames_for(&mut self, event: InferenceEvent) -> Option<String> {
        self.take(event).map(|object| format!("{object}\n"))
    }

    fn last_frames(&mut self) -> String {
        format!("{}\n", self.done(false))
    }

    fn error_frames(&mut self, err: &ErrorReport) -> String {
        let message = ApiError::from_report(err).body().error.message;
        let error = StreamError { error: message };
        format!("{}\n", serde_json::to_string(&error).unwrap_or_default())
    }
}

/// A response streaming `lines` as NDJSON.
fn ndjson_response(
    lines: impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(lines));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

fn ndjson(value: &Value) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(format!("{value}\n")))
}

/// Now, as Ollama writes times (RFC 3339, UTC).
fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// The name facecrab knows for an Ollama name: without the `:latest` tag
/// Ollama adds (the server's own names have none), and a Hugging Face
/// repository (Ollama's `hf.co/org/repo:QUANT`) as its id
/// (`org/repo:QUANT`).
fn ollama_name(name: &str) -> String {
    let name = name.trim();
    if let Some((_, ours)) = OLLAMA_LIBRARY.iter().find(|(theirs, _)| *theirs == name) {
        return (*ours).to_owned();
    }
    let name = name.strip_suffix(":latest").unwrap_or(name);
    if let Some((_, ours)) = OLLAMA_LIBRARY.iter().find(|(theirs, _)| *theirs == name) {
        return (*ours).to_owned();
    }
    ["hf.co/", "huggingface.co/", "https://huggingface.co/"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name)
        .to_owned()
}

/// Ollama's library names for models of facecrab's registry: the same
/// weights, in the same quantization Ollama's default tag has.
const OLLAMA_LIBRARY: &[(&str, &str)] = &[
    ("gemma3:270m", "gemma-3-270m"),
    ("qwen2.5:0.5b", "qwen-2.5-0.5b-instruct"),
    ("qwen2.5-coder:0.5b", "qwen-2.5-coder-0.5b-instruct"),
    ("qwen2.5:1.5b", "qwen-2.5-1.5b-instruct"),
    ("qwen2.5:3b", "qwen-2.5-3b-instruct"),
    ("nomic-embed-text", "nomic-embed-text-v1.5"),
];

/// The served model that is the registry entry `name`: served under that
/// name, or from its file (by `--model` path, or in the cache).
fn registry_model(state: &AppState, name: &str) -> Option<Served> {
    let spec = state.authority.registry().get(name)?;
    let cached = format!("{}/{}", spec.repo, spec.filename);
    state.served().into_iter().find(|model| {
        model.id == name
            || model.name == name
            || model.id == cached
            || std::path::Path::new(&model.name)
                .file_name()
                .is_some_and(|file| file == spec.filename.as_str())
    })
}

/// The served model an Ollama client names: as the OpenAI API finds it,
/// or a cached file of the repository it names (of its quantization, when
/// the name has one); otherwise Ollama's "not found".
fn resolve(state: &AppState, requested: &str) -> Result<Served, ApiError> {
    let name = ollama_name(requested);
    if let Ok(model) = state.model(&name) {
        return Ok(model);
    }
    if let Some(model) = registry_model(state, &name) {
        return Ok(model);
    }
    let wanted = RepoName::parse(&name);
    let prefix = format!("{}/", wanted.repo);
    let found = state.served().into_iter().find(|model| {
        model
            .id
            .strip_prefix(&prefix)
            .is_some_and(|file| wanted.has_quant(file))
    });
    found.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "model \"{}\" not found: this server serves {}; pull it first (POST /api/pull)",
                requested.escape_debug(),
                served_names(state)
            ),
        )
    })
}

/// A Hub repository as Ollama names one: `org/repo`, or `org/repo:QUANT`
/// for its file of that quantization.
struct RepoName<'a> {
    repo: &'a str,
    /// The quantization, lower case.
    quant: Option<String>,
}

impl<'a> RepoName<'a> {
    fn parse(name: &'a str) -> Self {
        match name.split_once(':') {
            Some((repo, quant)) => Self {
                repo,
                quant: Some(quant.to_ascii_lowercase()),
            },
            None => Self {
                repo: name,
                quant: None,
            },
        }
    }

    /// Whether the repository's `file` is of the quantization named, if
    /// one is.
    fn has_quant(&self, file: &str) -> bool {
        self.quant
            .as_ref()
            .is_none_or(|quant| file.to_ascii_lowercase().contains(quant.as_str()))
    }
}

fn served_names(state: &AppState) -> String {
    let names: Vec<String> = state.served().into_iter().map(|m| m.id).collect();
    if names.is_empty() {
        "no models yet".into()
    } else {
        names.join(", ")
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EmbedText {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct EmbedBody {
    model: String,
    input: EmbedText,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

async fn embed(
    State(state): State<Arc<AppState>>,
    Json(request): Json<EmbedBody>,
) -> Result<Response, ApiError> {
    let model = resolve(&state, &request.model)?;
    let texts = match request.input {
        EmbedText::One(text) => vec![text],
        EmbedText::Many(texts) => texts,
    };
    let started = std::time::Instant::now();
    let mut embed = Embed::new(texts.into_iter().map(EmbedInput::Text)).with_model(model.name);
    // Ollama cuts over-long inputs unless told not to.
    embed.truncate = request.truncate.unwrap_or(true);
    embed.dimensions = request.dimensions;
    if let Some(idle) = &request.keep_alive {
        embed.keep_alive = Some(keep_alive(idle)?);
    }
    let embeddings = state
        .genius
        .embeddings(embed)
        .await
        .map_err(|err| ApiError::from_report(&err))?;
    let tokens: usize = embeddings.tokens.iter().sum();
    Ok(axum::Json(EmbedOut {
        model: model.id,
        embeddings: embeddings.vectors.iter().map(|v| widen(v)).collect(),
        total_duration: started.elapsed().as_nanos() as u64,
        prompt_eval_count: tokens,
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
struct EmbeddingsBody {
    model: String,
    prompt: String,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// The older `/api/embeddings`: one text, one vector (not normalized, as
/// Ollama's is not).
async fn embeddings(
    State(state): State<Arc<AppState>>,
    Json(request): Json<EmbeddingsBody>,
) -> Result<Response, ApiError> {
    let model = resolve(&state, &request.model)?;
    let mut embed = Embed::new([request.prompt])
        .with_model(model.name)
        .without_normalizing()
        .truncating();
    if let Some(idle) = &request.keep_alive {
        embed.keep_alive = Some(keep_alive(idle)?);
    }
    let mut embeddings = state
        .genius
        .embeddings(embed)
        .await
        .map_err(|err| ApiError::from_report(&err))?;
    let vector = embeddings.vectors.pop().unwrap_or_default();
    Ok(axum::Json(EmbeddingOut {
        embedding: widen(&vector),
    })
    .into_response())
}

/// A model as `/api/tags` and `/api/ps` list it.
fn model_entry(model: &Served) -> ModelEntry {
    let path = model
        .path
        .clone()
        .or_else(|| Some(std::path::PathBuf::from(&model.name)).filter(|path| path.is_file()));
    let (size, modified) = path
        .as_ref()
        .and_then(|path| std::fs::metadata(path).ok())
        .map_or((0, None), |meta| {
            let modified = meta
                .modified()
                .ok()
                .and_then(|time| jiff::Timestamp::try_from(time).ok())
                .map(|time| time.to_string());
            (meta.len(), modified)
        });
    let name = if model.id.contains(':') {
        model.id.clone()
    } else {
        format!("{}:latest", model.id)
    };
    let quantization = model
        .id
        .rsplit(['-', '.', '_', ':'])
        .find(|part| {
            part.to_ascii_uppercase().starts_with('Q')
                || part.eq_ignore_ascii_case("f16")
                || part.eq_ignore_ascii_case("f32")
        })
        .map(str::to_ascii_uppercase)
        .unwrap_or_default();
    ModelEntry {
        model: name.clone(),
        name,
        modified_at: modified.unwrap_or_else(now),
        size,
        digest: "",
        details: Details {
            format: "gguf",
            family: "",
            families: None,
            parameter_size: "",
            quantization_level: quantization,
        },
        size_vram: None,
        context_length: None,
        expires_at: None,
    }
}

async fn tags(State(state): State<Arc<AppState>>) -> Response {
    let served = state.served();
    let models: Vec<ModelEntry> = served.iter().map(model_entry).collect();
    axum::Json(ModelsOut { models }).into_response()
}

async fn ps(State(state): State<Arc<AppState>>) -> Response {
    let served = state.served();
    let statuses = state.genius.models().await.unwrap_or_default();
    let models: Vec<ModelEntry> = served
        .iter()
        .filter_map(|model| {
            let status = statuses
                .iter()
                .find(|s| s.name == model.name && s.state == ModelState::Loaded)?;
            let mut entry = model_entry(model);
            entry.size_vram = Some(status.device_bytes);
            entry.size = status.memory_bytes + status.device_bytes;
            entry.context_length = status.info.as_ref().map(|info| info.context_size);
            let left = status
                .keep_alive
                .zip(status.idle_for)
                .map(|(keep, idle)| keep.saturating_sub(idle));
            entry.expires_at = Some(match left {
                Some(left) if left < Duration::from_secs(100 * 365 * 86_400) => {
                    let at = jiff::Timestamp::now()
                        .checked_add(jiff::SignedDuration::try_from(left).unwrap_or_default())
                        .unwrap_or_else(|_| jiff::Timestamp::now());
                    at.to_string()
                }
                _ => "2318-01-01T00:00:00Z".to_owned(),
            });
            Some(entry)
        })
        .collect();
    axum::Json(ModelsOut { models }).into_response()
}

#[derive(Debug, Deserialize)]
struct ShowBody {
    #[serde(alias = "name")]
    model: String,
}

async fn show(
    State(state): State<Arc<AppState>>,
    Json(request): Json<ShowBody>,
) -> Result<Response, ApiError> {
    let model = resolve(&state, &request.model)?;
    let path = model
        .path
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(&model.name));
    let embeds = state.embeds(&path).await;
    let capabilities: &[&str] = if embeds {
        &["embedding"]
    } else {
        &["completion", "tools"]
    };
    let entry = model_entry(&model);
    Ok(axum::Json(ShowOut {
        modelfile: "",
        parameters: "",
        template: "",
        details: entry.details,
        model_info: Empty {},
        capabilities,
        modified_at: entry.modified_at,
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
struct PullBody {
    #[serde(alias = "name")]
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    insecure: Option<bool>,
}

/// `POST /api/pull`: downloads a model into the cache (verified, resuming
/// a partial download), reporting facecrab's progress as Ollama's status
/// lines. A model served from a file (`--model`) needs nothing.
async fn pull(
    State(state): State<Arc<AppState>>,
    Json(request): Json<PullBody>,
) -> Result<Response, ApiError> {
    let _ = request.insecure;
    let name = ollama_name(&request.model);
    if name.is_empty() {
        return Err(invalid("model: name the model to pull"));
    }
    let events = state.authority.ensure_model_stream(&name);
    let label = format!("pulling {name}");
    let statuses = events.flat_map(move |event| {
        let status = |status: &str| PullLine::Status {
            status: status.to_owned(),
        };
        let lines: Vec<PullLine> = match event {
            AssetEvent::Started(_) => vec![status("pulling manifest")],
            AssetEvent::Progress(done, total) => vec![PullLine::Progress {
                status: label.clone(),
                digest: label.clone(),
                total,
                completed: done,
            }],
            AssetEvent::Complete(_) => vec![
                status("verifying sha256 digest"),
                status("writing manifest"),
                status("success"),
            ],
            AssetEvent::Error(message) => vec![PullLine::Error {
                error: errors::without_paths(&message),
            }],
            _ => Vec::new(),
        };
        let lines: Vec<Value> = lines
            .iter()
            .map(|line| serde_json::to_value(line).unwrap_or(Value::Null))
            .collect();
        futures::stream::iter(lines)
    });
    if !request.stream.unwrap_or(true) {
        let mut statuses = std::pin::pin!(statuses);
        while let Some(status) = statuses.next().await {
            if let Some(message) = status["error"].as_str() {
                let status = if message.contains("not found") || message.contains("404") {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::BAD_GATEWAY
                };
                return Err(ApiError::new(status, "invalid_request_error", message));
            }
            if status["status"] == "success" {
                return Ok(axum::Json(status).into_response());
            }
        }
        return Err(ApiError::internal());
    }
    Ok(ndjson_response(statuses.map(|status| ndjson(&status))))
}

/// A cache error, logged; the client learns only that it failed.
fn cache_failed(err: rusty_genius::facecrab::FacecrabError) -> ApiError {
    log::error!("the model cache failed: {err}");
    ApiError::internal()
}

#[derive(Debug, Deserialize)]
struct DeleteBody {
    #[serde(alias = "name")]
    model: String,
}

/// `DELETE /api/delete`: removes a cached model (its files, and blobs no
/// other snapshot uses), unloading it first. Only the cache's files go:
/// a `--model` file of the user's is never deleted.
async fn delete(
    State(state): State<Arc<AppState>>,
    Json(request): Json<DeleteBody>,
) -> Result<Response, ApiError> {
    let name = ollama_name(&request.model);
    let authority = state.authority.clone();
    let cached = tokio::task::spawn_blocking(move || authority.cached_models())
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(cache_failed)?;
    let wanted = RepoName::parse(&name);
    let doomed: Vec<_> = cached
        .into_iter()
        .filter(|m| {
            format!("{}/{}", m.repo, m.file) == name
                || (m.repo == wanted.repo && wanted.has_quant(&m.file))
        })
        .collect();
    if doomed.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "model \"{}\" not found in the cache",
                request.model.escape_debug()
            ),
        ));
    }
    for model in &doomed {
        let id = format!("{}/{}", model.repo, model.file);
        // Unloaded first, so that no request reads a file being removed.
        let _ = state.genius.unload(&id).await;
    }
    let authority = state.authority.clone();
    let freed = tokio::task::spawn_blocking(move || {
        doomed
            .iter()
            .map(|model| authority.remove_model(model))
            .sum::<Result<u64, _>>()
    })
    .await
    .map_err(|_| ApiError::internal())?
    .map_err(cache_failed)?;
    log::info!("deleted {name} from the cache ({freed} bytes)");
    Ok(StatusCode::OK.into_response())
}

async fn version() -> Response {
    axum::Json(VersionOut {
        version: API_VERSION,
    })
    .into_response()
}

/// A vector as f64, the width JSON numbers are read at (as before: the
/// digits clients see do not change).
fn widen(vector: &[f32]) -> Vec<f64> {
    vector.iter().map(|&x| f64::from(x)).collect()
}

/// The answer to a request that only loads or unloads a model.
#[derive(Debug, Serialize)]
struct LoadOut {
    model: String,
    created_at: String,
    done: bool,
    done_reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<EmptyMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'static str>,
}

#[derive(Debug, Serialize)]
struct EmptyMessage {
    role: &'static str,
    content: &'static str,
}

/// `/api/embed`'s answer.
#[derive(Debug, Serialize)]
struct EmbedOut {
    model: String,
    embeddings: Vec<Vec<f64>>,
    total_duration: u64,
    prompt_eval_count: usize,
}

/// `/api/embeddings`' answer.
#[derive(Debug, Serialize)]
struct EmbeddingOut {
    embedding: Vec<f64>,
}

/// `/api/tags` and `/api/ps`.
#[derive(Debug, Serialize)]
struct ModelsOut {
    models: Vec<ModelEntry>,
}

/// A model as `/api/tags` lists it; `/api/ps` adds what it holds.
#[derive(Debug, Serialize)]
struct ModelEntry {
    name: String,
    model: String,
    modified_at: String,
    size: u64,
    digest: &'static str,
    details: Details,
    #[serde(skip_serializing_if = "Option::is_none")]
    size_vram: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct Details {
    format: &'static str,
    family: &'static str,
    families: Option<Vec<String>>,
    parameter_size: &'static str,
    quantization_level: String,
}

/// `/api/show`'s answer.
#[derive(Debug, Serialize)]
struct ShowOut {
    modelfile: &'static str,
    parameters: &'static str,
    template: &'static str,
    details: Details,
    model_info: Empty,
    capabilities: &'static [&'static str],
    modified_at: String,
}

#[derive(Debug, Serialize)]
struct Empty {}

/// A line of `/api/pull`'s progress.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum PullLine {
    Status {
        status: String,
    },
    Progress {
        status: String,
        digest: String,
        total: u64,
        completed: u64,
    },
    Error {
        error: String,
    },
}

/// `/api/version`'s answer.
#[derive(Debug, Serialize)]
struct VersionOut {
    version: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_names_become_facecrab_names() {
        assert_eq!(
            ollama_name("qwen2.5-coder:0.5b"),
            "qwen-2.5-coder-0.5b-instruct"
        );
        assert_eq!(
            ollama_name("nomic-embed-text:latest"),
            "nomic-embed-text-v1.5"
        );
        assert_eq!(ollama_name("hf.co/org/repo:Q4_K_M"), "org/repo:Q4_K_M");
        assert_eq!(ollama_name("my-model:latest"), "my-model");
        assert_eq!(ollama_name("org/repo/file.gguf"), "org/repo/file.gguf");
    }

    #[test]
    fn go_durations_read_as_seconds() {
        assert_eq!(parse_duration("5m"), Some(300.0));
        assert_eq!(parse_duration("1h30m"), Some(5400.0));
        assert_eq!(parse_duration("90s"), Some(90.0));
        assert_eq!(parse_duration("-1m"), Some(-60.0));
        assert_eq!(parse_duration("300"), Some(300.0));
        assert_eq!(parse_duration("1.5h"), Some(5400.0));
        assert_eq!(parse_duration("5 minutes"), None);
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn keep_alive_maps_zero_negative_and_durations() {
        assert_eq!(keep_alive(&json!(0)).unwrap(), Duration::ZERO);
        assert_eq!(keep_alive(&json!(-1)).unwrap(), Duration::MAX);
        assert_eq!(keep_alive(&json!("10m")).unwrap(), Duration::from_secs(600));
        assert!(keep_alive(&json!("soon")).is_err());
        assert!(keep_alive(&json!(true)).is_err());
    }
}
