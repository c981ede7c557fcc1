//! Anthropic's Messages API (`POST /v1/messages` and
//! `/v1/messages/count_tokens`), for the clients and coding agents built
//! on it: content blocks (text, `tool_use`, `tool_result`), tools and
//! `tool_choice`, `thinking` blocks for thinking models, streaming with its
//! typed events, and errors in its shape. Keys come as `x-api-key` (or a
//! bearer token), checked by the gate like every other route.

use rusty_genius::core::chat::{Tool, ToolCall, ToolChoice};
use rusty_genius::core::protocol::FinishReason;
use rusty_genius::core::{ChatMessage, InferenceConfig, Role};
use serde::{Deserialize, Serialize};

use super::*;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
}

// ---- requests -----------------------------------------------------------

/// A message's content: a string, or blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<Content>,
        #[serde(default)]
        is_error: bool,
    },
    /// A thinking model's earlier reasoning: not sent to it again.
    Thinking {},
    RedactedThinking {},
    Image {},
    Document {},
}

#[derive(Debug, Deserialize)]
struct Message {
    role: Role,
    content: Content,
}

/// `system`: a string or text blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum System {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct AnthropicTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    /// Server tools (web search, code execution) have a `type`.
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicToolChoice {
    Auto {
        #[serde(default)]
        disable_parallel_tool_use: bool,
    },
    Any {
        #[serde(default)]
        disable_parallel_tool_use: bool,
    },
    Tool {
        name: String,
        #[serde(default)]
        disable_parallel_tool_use: bool,
    },
    None,
}

#[derive(Debug, Deserialize)]
struct MessagesBody {
    model: String,
    max_tokens: u32,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<System>,
    #[serde(default)]
    tools: Option<Vec<AnthropicTool>>,
    #[serde(default)]
    tool_choice: Option<AnthropicToolChoice>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    stream: bool,
    /// Thinking models think by themselves; accepted, not needed.
    #[serde(default)]
    thinking: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct CountBody {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<System>,
    #[serde(default)]
    tools: Option<Vec<AnthropicTool>>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(message).param(param)
}

/// The text of text blocks (a tool result's, a system prompt's); other
/// blocks there are refused by `what`.
fn text_of(blocks: Vec<Block>, what: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for block in blocks {
        match block {
            Block::Text { text: part } => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&part);
            }
            _ => {
                return Err(invalid(
                    what,
                    format!("{what} may hold only text blocks here"),
                ))
            }
        }
    }
    Ok(text)
}

/// The conversation, as the library's messages: an assistant's
/// `tool_use` blocks become its tool calls, a user's `tool_result` blocks
/// tool messages answering them (before the user's own text).
fn conversation(
    system: Option<System>,
    messages: Vec<Message>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::new();
    match system {
        Some(System::Text(text)) => out.push(ChatMessage::system(text)),
        Some(System::Blocks(blocks)) => out.push(ChatMessage::system(text_of(blocks, "system")?)),
        None => {}
    }
    let mut names: Vec<(String, String)> = Vec::new();
    for (index, message) in messages.into_iter().enumerate() {
        let at = format!("messages[{index}].content");
        let blocks = match message.content {
            Content::Text(text) => vec![Block::Text { text }],
            Content::Blocks(blocks) => blocks,
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        let mut results = Vec::new();
        for block in blocks {
            match block {
                Block::Text { text: part } => text.push_str(&part),
                Block::ToolUse { id, name, input } if message.role == Role::Assistant => {
                    let input = if input.is_null() { json!({}) } else { input };
                    names.push((id.clone(), name.clone()));
                    calls.push(ToolCall::new(id, name, &input));
                }
                Block::ToolResult {
                    tool_use_id,
                    content,
                    is_error,
                } if message.role == Role::User => {
                    let mut body = match content {
                        None => String::new(),
                        Some(Content::Text(text)) => text,
                        Some(Content::Blocks(blocks)) => text_of(blocks, &at)?,
                    };
                    if is_error {
                        body = format!("Error: {body}");
                    }
                    let name = names
                        .iter()
                        .find(|(id, _)| *id == tool_use_id)
                        .map(|(_, name)| name.clone());
                    results.push(ChatMessage {
                        role: Role::Tool,
                        content: Some(body),
                        tool_calls: Vec::new(),
                        tool_call_id: Some(tool_use_id),
                        name,
                    });
                }
                Block::ToolUse { .. } => {
                    return Err(invalid(&at, "tool_use blocks belong in assistant messages"))
                }
                Block::ToolResult { .. } => {
                    return Err(invalid(&at, "tool_result blocks belong in user messages"))
                }
                Block::Thinking {} | Block::RedactedThinking {} => {}
                Block::Image {} | Block::Document {} => {
                    return Err(invalid(
                        &at,
                        "this server's models read text only: send text blocks",
                    ))
                }
            }
        }
        out.extend(results);
        if !text.is_empty() || !calls.is_empty() {
            out.push(ChatMessage {
                role: message.role,
                content: (!text.is_empty() || calls.is_empty()).then_some(text),
                tool_calls: calls,
                tool_call_id: None,
                name: None,
            });
        }
    }
    Ok(out)
}

fn tools(tools: Option<Vec<AnthropicTool>>) -> Result<Vec<Tool>, ApiError> {
    tools
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, tool)| {
            if let Some(kind) = tool.kind.filter(|kind| kind != "custom") {
                return Err(invalid(
                    &format!("tools[{index}].type"),
                    format!("server tools such as `{kind}` are not available here; send tools with a name and an input_schema"),
                ));
            }
            let schema = tool
                .input_schema
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            let mut made = Tool::function(tool.name, "", schema);
            made.function.description = tool.description;
            Ok(made)
        })
        .collect()
}

/// The library's settings for a Messages request, and whether at most one
/// tool call may be made.
fn config(request: &MessagesBody) -> Result<(InferenceConfig, bool), ApiError> {
    if request.max_tokens == 0 {
        return Err(invalid("max_tokens", "max_tokens must be at least 1"));
    }
    if let Some(temperature) = request.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(invalid(
            "temperature",
            format!("temperature {temperature} is outside 0 to 1"),
        ));
    }
    let mut config = openai::with_temperature(InferenceConfig::default(), request.temperature);
    if let Some(top_p) = request.top_p {
        config.top_p = top_p;
    }
    if let Some(top_k) = request.top_k {
        config.top_k = top_k;
    }
    config.max_tokens = Some(request.max_tokens as usize);
    config.stop = request.stop_sequences.clone().unwrap_or_default();
    let mut one_call = false;
    config.tool_choice = match &request.tool_choice {
        None => ToolChoice::Auto,
        Some(AnthropicToolChoice::Auto {
            disable_parallel_tool_use,
        }) => {
            one_call = *disable_parallel_tool_use;
            ToolChoice::Auto
        }
        Some(AnthropicToolChoice::Any {
            disable_parallel_tool_use,
        }) => {
            one_call = *disable_parallel_tool_use;
            ToolChoice::Required
        }
        Some(AnthropicToolChoice::Tool {
            name,
            disable_parallel_tool_use,
        }) => {
            one_call = *disable_parallel_tool_use;
            ToolChoice::Function(name.clone())
        }
        Some(AnthropicToolChoice::None) => ToolChoice::None,
    };
    Ok((config, one_call))
}

// ---- endpoints ----------------------------------------------------------

async fn messages(
    State(state): State<Arc<AppState>>,
    Json(mut request): Json<MessagesBody>,
) -> Result<Response, ApiError> {
    let model = state.model(&request.model)?;
    let (mut config, one_call) = config(&request)?;
    config = config.with_model(model.name);
    config.tools = tools(request.tools.take())?;
    let _ = (&request.thinking, &request.metadata);
    let single_stop = match request.stop_sequences.as_deref() {
        Some([only]) => Some(only.clone()),
        _ => None,
    };
    let messages = conversation(request.system.take(), std::mem::take(&mut request.messages))?;
    let stream = state.genius.chat(messages, config);
    let reply = Reply {
        id: format!("msg_{}", unique_id()),
        model: request.model,
        blocks: Vec::new(),
        usage: None,
        one_call,
        single_stop,
    };
    if request.stream {
        stream_reply(reply, stream).await
    } else {
        whole_reply(reply, stream).await
    }
}

/// `count_tokens`: the prompt is rendered and decoded (its cache then
/// serves the request that follows), with one token generated and
/// dropped, and its tokens counted.
async fn count_tokens(
    State(state): State<Arc<AppState>>,
    Json(request): Json<CountBody>,
) -> Result<Response, ApiError> {
    let model = state.model(&request.model)?;
    let mut config = InferenceConfig::greedy().with_model(model.name);
    config.max_tokens = Some(1);
    config.tools = tools(request.tools)?;
    let messages = conversation(request.system, request.messages)?;
    let mut stream = state.genius.chat(messages, config);
    while let Some(event) = stream.next().await {
        match event {
            Ok(InferenceEvent::Usage(usage)) => {
                return Ok(axum::Json(TokenCount {
                    input_tokens: usage.prompt_tokens,
                })
                .into_response())
            }
            Ok(_) => {}
            Err(err) => return Err(ApiError::from_report(&err)),
        }
    }
    Err(ApiError::internal())
}

/// A content block of the answer as it grows.
enum Out {
    Thinking(String),
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

impl Out {
    fn json(&self) -> BlockOut<'_> {
        match self {
            Out::Thinking(thinking) => BlockOut::Thinking {
                thinking,
                signature: "",
            },
            Out::Text(text) => BlockOut::Text { text },
            Out::ToolUse { id, name, input } => BlockOut::ToolUse {
                id,
                name,
                input: Input::Given(input),
            },
        }
    }

    /// How the block opens in a stream: empty.
    fn start(&self) -> BlockOut<'_> {
        match self {
            Out::Thinking(_) => BlockOut::Thinking {
                thinking: "",
                signature: "",
            },
            Out::Text(_) => BlockOut::Text { text: "" },
            Out::ToolUse { id, name, .. } => BlockOut::ToolUse {
                id,
                name,
                input: Input::Empty(Empty {}),
            },
        }
    }
}

struct Reply {
    id: String,
    model: String,
    blocks: Vec<Out>,
    usage: Option<Usage>,
    one_call: bool,
    /// The request's stop sequence, when it gave just one (which is then
    /// the one an answer stopped at).
    single_stop: Option<String>,
}

/// A streamed event: its name and data.
type Event = (&'static str, Value);

impl Reply {
    fn stop_reason(&self) -> (&'static str, Option<String>) {
        match self.usage.as_ref().map(|usage| usage.finish_reason) {
            Some(FinishReason::ToolCalls) => ("tool_use", None),
            Some(FinishReason::MaxTokens | FinishReason::ContextFull) => ("max_tokens", None),
            Some(FinishReason::StopSequence) => ("stop_sequence", self.single_stop.clone()),
            _ => ("end_turn", None),
        }
    }

    fn usage_out(&self) -> UsageOut {
        let usage = self.usage.as_ref();
        let prompt = usage.map_or(0, |u| u.prompt_tokens);
        let cached = usage.map_or(0, |u| u.cached_tokens);
        UsageOut {
            input_tokens: prompt - cached,
            cache_read_input_tokens: cached,
            cache_creation_input_tokens: 0,
            output_tokens: usage.map_or(0, |u| u.generated_tokens),
        }
    }

    /// The message: whole, or as a stream opens it (no content, no stop
    /// reason yet).
    fn message(&self, whole: bool) -> MessageOut<'_> {
        let (reason, sequence) = self.stop_reason();
        MessageOut {
            id: &self.id,
            kind: "message",
            role: "assistant",
            model: &self.model,
            content: if whole {
                self.blocks.iter().map(Out::json).collect()
            } else {
                Vec::new()
            },
            stop_reason: whole.then_some(reason),
            stop_sequence: if whole { sequence } else { None },
            usage: self.usage_out(),
        }
    }

    /// Takes in one event; returns the stream events it makes.
    fn take(&mut self, event: InferenceEvent) -> Vec<Event> {
        let mut events = Vec::new();
        match event {
            InferenceEvent::Content(text) => {
                if !matches!(self.blocks.last(), Some(Out::Text(_))) {
                    self.open(Out::Text(String::new()), &mut events);
                }
                if let Some(Out::Text(all)) = self.blocks.last_mut() {
                    all.push_str(&text);
                }
                let index = self.blocks.len() - 1;
                events.push(sse_event(&StreamEvent::ContentBlockDelta {
                    index,
                    delta: DeltaOut::Text { text: &text },
                }));
            }
            InferenceEvent::Thought(ThoughtEvent::Delta(text)) => {
                if !matches!(self.blocks.last(), Some(Out::Thinking(_))) {
                    self.open(Out::Thinking(String::new()), &mut events);
                }
                if let Some(Out::Thinking(all)) = self.blocks.last_mut() {
                    all.push_str(&text);
                }
                let index = self.blocks.len() - 1;
                events.push(sse_event(&StreamEvent::ContentBlockDelta {
                    index,
                    delta: DeltaOut::Thinking { thinking: &text },
                }));
            }
            InferenceEvent::ToolCall {
                id,
                name,
                arguments,
            } => {
                let calls = self
                    .blocks
                    .iter()
                    .filter(|b| matches!(b, Out::ToolUse { .. }))
                    .count();
                if self.one_call && calls > 0 {
                    log::debug!("disable_parallel_tool_use: a further call of `{name}` left out");
                    return events;
                }
                let partial = arguments.to_string();
                self.open(
                    Out::ToolUse {
                        id,
                        name,
                        input: arguments,
                    },
                    &mut events,
                );
                let index = self.blocks.len() - 1;
                events.push(sse_event(&StreamEvent::ContentBlockDelta {
                    index,
                    delta: DeltaOut::InputJson {
                        partial_json: &partial,
                    },
                }));
            }
            InferenceEvent::Usage(usage) => self.usage = Some(usage),
            _ => {}
        }
        events
    }

    /// Closes the open block, if any, and opens `block`.
    fn open(&mut self, block: Out, events: &mut Vec<Event>) {
        self.close(events);
        let index = self.blocks.len();
        events.push(sse_event(&StreamEvent::ContentBlockStart {
            index,
            content_block: block.start(),
        }));
        self.blocks.push(block);
    }

    fn close(&self, events: &mut Vec<Event>) {
        if !self.blocks.is_empty() {
            let index = self.blocks.len() - 1;
            events.push(sse_event(&StreamEvent::ContentBlockStop { index }));
        }
    }

    /// The events that end the stream.
    fn finish(&self) -> Vec<Event> {
        let mut events = Vec::new();
        self.close(&mut events);
        let (reason, sequence) = self.stop_reason();
        events.push(sse_event(&StreamEvent::MessageDelta {
            delta: StopOut {
                stop_reason: reason,
                stop_sequence: sequence,
            },
            usage: self.usage_out(),
        }));
        events.push(sse_event(&StreamEvent::MessageStop));
        events
    }
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
    Ok(axum::Json(reply.message(true)).into_response())
}

fn frame(events: &[Event]) -> String {
    let mut text = String::new();
    for (name, data) in events {
        text.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    text
}

impl chat::Frames for Reply {
    fn frames_for(&mut self, event: InferenceEvent) -> Option<String> {
        let made = self.take(event);
        (!made.is_empty()).then(|| frame(&made))
    }

    fn last_frames(&mut self) -> String {
        frame(&self.finish())
    }

    fn error_frames(&mut self, err: &ErrorReport) -> String {
        let message = ApiError::from_report(err).body().error.message;
        frame(&[sse_event(&StreamEvent::Error {
            error: errors::AnthropicDetail {
                kind: "api_error",
                message,
            },
        })])
    }
}

async fn stream_reply(reply: Reply, mut stream: RequestStream) -> Result<Response, ApiError> {
    let first = chat::first_event(&mut stream).await?;
    let opening = frame(&[sse_event(&StreamEvent::MessageStart {
        message: reply.message(false),
    })]);
    let events = Watched::new(stream, reply.id.clone());
    let rest = chat::answer_frames(reply, first, events);
    let frames = futures::stream::iter([Ok(Bytes::from(opening))]).chain(rest);
    Ok(chat::event_stream(frames))
}

// ---- the replies' shapes ------------------------------------------------

/// `count_tokens`' answer.
#[derive(Debug, Serialize)]
struct TokenCount {
    input_tokens: usize,
}

/// A message as Anthropic's API returns it.
#[derive(Debug, Serialize)]
struct MessageOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<BlockOut<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<String>,
    usage: UsageOut,
}

#[derive(Debug, Serialize)]
struct UsageOut {
    input_tokens: usize,
    cache_read_input_tokens: usize,
    cache_creation_input_tokens: usize,
    output_tokens: usize,
}

/// A content block.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockOut<'a> {
    Thinking {
        thinking: &'a str,
        signature: &'static str,
    },
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Input<'a>,
    },
}

/// A tool call's input: the arguments, or `{}` as a stream opens it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Input<'a> {
    Given(&'a Value),
    Empty(Empty),
}

#[derive(Debug, Serialize)]
struct Empty {}

/// The data of a streamed event; its name is its `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent<'a> {
    MessageStart {
        message: MessageOut<'a>,
    },
    ContentBlockStart {
        index: usize,
        content_block: BlockOut<'a>,
    },
    ContentBlockDelta {
        index: usize,
        delta: DeltaOut<'a>,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: StopOut,
        usage: UsageOut,
    },
    MessageStop,
    Error {
        error: errors::AnthropicDetail,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum DeltaOut<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

#[derive(Debug, Serialize)]
struct StopOut {
    stop_reason: &'static str,
    stop_sequence: Option<String>,
}

/// A streamed event: its name (its data's `type`) and data.
fn sse_event(data: &StreamEvent<'_>) -> Event {
    let value = serde_json::to_value(data).unwrap_or(Value::Null);
    let name = match data {
        StreamEvent::MessageStart { .. } => "message_start",
        StreamEvent::ContentBlockStart { .. } => "content_block_start",
        StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
        StreamEvent::ContentBlockStop { .. } => "content_block_stop",
        StreamEvent::MessageDelta { .. } => "message_delta",
        StreamEvent::MessageStop => "message_stop",
        StreamEvent::Error { .. } => "error",
    };
    (name, value)
}
