//! OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE
//! /v1/responses/{id}`.
//!
//! A request's `input` (a string, or items: messages, `function_call`s
//! and their `function_call_output`s) becomes one chat conversation for
//! the library, after the conversation of its `previous_response_id` and
//! under its `instructions`. The answer is a list of output items (a
//! message, function calls), whole or streamed as the API's typed events.
//! Answers are kept in a bounded store, newest last, so that a later
//! request can continue them and a client can read them again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use rusty_genius::core::protocol::{FinishReason, InferenceEvent, Usage};
use rusty_genius::core::ErrorReport;
use rusty_genius::core::{ChatMessage, InferenceConfig};
use rusty_genius::RequestStream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::chat::{answer_frames, event_stream, first_event, Frames};
use super::{unique_id, unix_now, ApiError, AppState, Json, Watched};
use crate::openai::Sampling;

/// The most answers kept for `previous_response_id` and `GET`.
const STORE_ENTRIES: usize = 256;
/// The most bytes they may take together (their JSON).
const STORE_BYTES: usize = 64 * 1024 * 1024;

/// `POST /v1/responses`.
#[derive(Debug, Deserialize)]
pub(super) struct ResponsesRequest {
    model: String,
    #[serde(default)]
    input: Option<Input>,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    text: Option<TextConfig>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    #[serde(default = "yes")]
    store: bool,
    #[serde(default)]
    background: bool,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

fn yes() -> bool {
    true
}

/// `input`: one user message, or items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// `text`: the answer's format.
#[derive(Debug, Deserialize)]
struct TextConfig {
    #[serde(default)]
    format: Option<Value>,
}

/// Kept answers, oldest first.
#[derive(Debug, Default)]
pub(super) struct Store {
    order: VecDeque<String>,
    entries: HashMap<String, Stored>,
    bytes: usize,
}

#[derive(Debug)]
struct Stored {
    /// The response object, as answered.
    response: Value,
    /// The whole conversation: what it was asked (after its instructions)
    /// and what it answered.
    conversation: Vec<ChatMessage>,
    bytes: usize,
}

impl Store {
    fn insert(&mut self, id: String, response: Value, conversation: Vec<ChatMessage>) {
        let bytes = response.to_string().len()
            + serde_json::to_vec(&conversation).map_or(0, |json| json.len());
        if bytes > STORE_BYTES {
            log::warn!("{id} is {bytes} bytes, more than the response store holds; not kept");
            return;
        }
        while self.order.len() >= STORE_ENTRIES || self.bytes + bytes > STORE_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes -= gone.bytes;
            }
        }
        self.bytes += bytes;
        self.order.push_back(id.clone());
        self.entries.insert(
            id,
            Stored {
                response,
                conversation,
                bytes,
            },
        );
    }

    fn remove(&mut self, id: &str) -> bool {
        match self.entries.remove(id) {
            Some(gone) => {
                self.bytes -= gone.bytes;
                self.order.retain(|kept| kept != id);
                true
            }
            None => false,
        }
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no response `{}` is kept on this server (it keeps the last {STORE_ENTRIES}, and none across restarts)",
            id.escape_debug()
        ),
    )
    .code("not_found")
}

fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid(message).param(param)
}

/// `GET /v1/responses/{id}`.
pub(super) async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let store = state.responses.lock().map_err(|_| ApiError::internal())?;
    match store.entries.get(&id) {
        Some(stored) => Ok(axum::Json(stored.response.clone()).into_response()),
        None => Err(not_found(&id)),
    }
}

/// `DELETE /v1/responses/{id}`.
pub(super) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let removed = state
        .responses
        .lock()
        .map_err(|_| ApiError::internal())?
        .remove(&id);
    if !removed {
        return Err(not_found(&id));
    }
    Ok(axum::Json(Deleted {
        id,
        object: "response.deleted",
        deleted: true,
    })
    .into_response())
}

/// `POST /v1/responses`.
pub(super) async fn create(
    State(state): State<Arc<AppState>>,
    Json(request): Json<ResponsesRequest>,
) -> Result<Response, ApiError> {
    if request.background {
        return Err(invalid(
            "background",
            "background responses are not supported: send background false (or leave it out)",
        ));
    }
    let model = state.model(&request.model)?;
    let mut conversation = match &request.previous_response_id {
        Some(previous) => {
            let store = state.responses.lock().map_err(|_| ApiError::internal())?;
            store
                .entries
                .get(previous)
                .map(|stored| stored.conversation.clone())
                .ok_or_else(|| not_found(previous).param("previous_response_id"))?
        }
        None => Vec::new(),
    };
    conversation.extend(input_messages(request.input.as_ref())?);
    if conversation.is_empty() {
        return Err(invalid("input", "there is nothing to answer: send input"));
    }
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(instructions) = request.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(ChatMessage::system(instructions.clone()));
    }
    messages.extend(conversation.iter().cloned());
    let config = config(&request)?.with_model(model.name.clone());
    let answer = Answer::new(&request, model.id);
    let stream = state.genius.chat(messages, config);
    let keep = request.store.then(|| (state.clone(), conversation));
    if request.stream {
        stream_answer(answer, stream, keep).await
    } else {
        whole_answer(answer, stream, keep).await
    }
}

/// The library's settings for a request.
fn config(request: &ResponsesRequest) -> Result<InferenceConfig, ApiError> {
    let sampling = Sampling {
        temperature: request.temperature,
        top_p: request.top_p,
        max_tokens: request.max_output_tokens,
        ..Sampling::default()
    };
    let mut config = sampling.config().map_err(ApiError::from)?;
    for (index, tool) in request.tools.iter().enumerate() {
        config.tools.push(function_tool(tool, index)?);
    }
    if let Some(choice) = &request.tool_choice {
        config.tool_choice = tool_choice(choice)?;
    }
    if let Some(format) = request.text.as_ref().and_then(|text| text.format.as_ref()) {
        config.response_format = response_format(format)?;
    }
    Ok(config)
}

/// A Responses function tool (`{"type": "function", "name", ...}`) as the
/// library's tool.
fn function_tool(tool: &Value, index: usize) -> Result<rusty_genius::core::Tool, ApiError> {
    let param = format!("tools[{index}]");
    let kind = tool
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        return Err(invalid(
            format!("{param}.type"),
            format!("tools of type `{kind}` are not available here: only function tools are"),
        ));
    }
    let mut function = Map::new();
    for key in ["name", "description", "parameters", "strict"] {
        if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
            function.insert(key.to_owned(), value.clone());
        }
    }
    serde_json::from_value(json!({"type": "function", "function": function}))
        .map_err(|err| invalid(param, format!("not a function tool: {err}")))
}

fn tool_choice(choice: &Value) -> Result<rusty_genius::core::ToolChoice, ApiError> {
    let chat_shape = match choice {
        Value::Object(object) => match object.get("type").and_then(Value::as_str) {
            Some("function") => json!({"type": "function", "function": {"name": object.get("name")}}),
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "tool_choice of type `{}` is not available here: use auto, none, required or a function",
                        other.unwrap_or("?")
                    ),
                ))
            }
        },
        other => other.clone(),
    };
    serde_json::from_value(chat_shape).map_err(|err| invalid("tool_choice", err.to_string()))
}

fn response_format(format: &Value) -> Result<rusty_genius::core::ResponseFormat, ApiError> {
    let chat_shape = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "description", "schema", "strict"] {
                if let Some(value) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.to_owned(), value.clone());
                }
            }
            json!({"type": "json_schema", "json_schema": schema})
        }
        Some("text" | "json_object") => format.clone(),
        _ => {
            return Err(invalid(
                "text.format",
                "text.format.type must be text, json_object or json_schema",
            ))
        }
    };
    serde_json::from_value(chat_shape).map_err(|err| invalid("text.format", err.to_string()))
}

/// The messages of `input`.
fn input_messages(input: Option<&Input>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match input {
        None => return Ok(Vec::new()),
        Some(Input::Text(text)) => return Ok(vec![ChatMessage::user(text.clone())]),
        Some(Input::Items(items)) => items,
    };
    let mut messages: Vec<ChatMessage> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let param = format!("input[{index}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let message = match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") => "system",
                    Some(role @ ("user" | "assistant" | "system")) => role,
                    _ => {
                        return Err(invalid(
                            format!("{param}.role"),
                            "a message's role must be user, assistant, system or developer",
                        ))
                    }
                };
                let content = message_text(item.get("content"), &param)?;
                json!({"role": role, "content": content})
            }
            "function_call" => {
                let field = |key: &str| {
                    item.get(key).and_then(Value::as_str).ok_or_else(|| {
                        invalid(format!("{param}.{key}"), format!("a function_call needs {key}"))
                    })
                };
                let call = json!({
                    "id": field("call_id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?},
                });
                // Calls in a row are one assistant turn.
                if let Some(last) = messages.last_mut() {
                    if last.role == rusty_genius::core::Role::Assistant && !last.tool_calls.is_empty() {
                        let call = serde_json::from_value(call)
                            .map_err(|err| invalid(param.clone(), err.to_string()))?;
                        last.tool_calls.push(call);
                        continue;
                    }
                }
                json!({"role": "assistant", "content": null, "tool_calls": [call]})
            }
            "function_call_output" => {
                let call_id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
                    invalid(format!("{param}.call_id"), "a function_call_output needs call_id")
                })?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => message_text(Some(other), &param)?,
                };
                json!({"role": "tool", "tool_call_id": call_id, "content": output})
            }
            "reasoning" => continue,
            other => {
                return Err(invalid(
                    format!("{param}.type"),
                    format!("input items of type `{other}` are not supported: send messages, function_call and function_call_output"),
                ))
            }
        };
        let message: ChatMessage =
            serde_json::from_value(message).map_err(|err| invalid(param, err.to_string()))?;
        messages.push(message);
    }
    Ok(messages)
}

/// A message's content as text: a string, or parts of type `input_text`
/// or `output_text`.
fn message_text(content: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (index, part) in parts.iter().enumerate() {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("input_text" | "output_text" | "text"), Some(piece)) => {
                        text.push_str(piece)
                    }
                    (kind, _) => {
                        return Err(invalid(
                            format!("{param}.content[{index}]"),
                            format!(
                            "content parts of type `{}` are not supported here; send input_text",
                            kind.unwrap_or("?")
                        ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(invalid(
            format!("{param}.content"),
            "content must be a string or a list of input_text parts",
        )),
    }
}

/// One answer as it is built: its output items and the events that
/// announce them.
struct Answer {
    id: String,
    created: u64,
    model: String,
    /// The request's settings, echoed in the response object.
    echo: Echo,
    output: Vec<OutputItem>,
    /// The index in `output` of the message being written, if any.
    open_message: Option<usize>,
    usage: Option<Usage>,
    sequence: u64,
    /// At most one function call (`parallel_tool_calls: false`).
    one_call: bool,
}

impl Answer {
    fn new(request: &ResponsesRequest, model: String) -> Self {
        let echo = Echo {
            instructions: request.instructions.clone(),
            max_output_tokens: request.max_output_tokens,
            // As f64, the width JSON numbers are read at.
            temperature: request.temperature.map(f64::from),
            top_p: request.top_p.map(f64::from),
            previous_response_id: request.previous_response_id.clone(),
            tools: request.tools.clone(),
            tool_choice: request
                .tool_choice
                .clone()
                .unwrap_or_else(|| Value::from("auto")),
            text: TextEcho {
                format: request
                    .text
                    .as_ref()
                    .and_then(|text| text.format.clone())
                    .unwrap_or_else(|| to_value(&TextFormat { kind: "text" })),
            },
            parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
            store: request.store,
            metadata: request
                .metadata
                .clone()
                .unwrap_or_else(|| Value::Object(Map::new())),
        };
        Self {
            id: format!("resp_{}", unique_id()),
            created: unix_now(),
            model,
            echo,
            output: Vec::new(),
            open_message: None,
            usage: None,
            sequence: 0,
            one_call: request.parallel_tool_calls == Some(false),
        }
    }

    /// The response object, `status` as given or as the answer ended.
    fn response(&self, status: Option<&'static str>) -> Value {
        let incomplete = self.usage.as_ref().is_some_and(|usage| {
            matches!(
                usage.finish_reason,
                FinishReason::MaxTokens | FinishReason::ContextFull
            )
        });
        let status = status.unwrap_or(if incomplete {
            "incomplete"
        } else {
            "completed"
        });
        to_value(&ResponseOut {
            id: &self.id,
            object: "response",
            created_at: self.created,
            status,
            model: &self.model,
            output: &self.output,
            error: None,
            incomplete_details: (incomplete && status == "incomplete").then_some(Incomplete {
                reason: "max_output_tokens",
            }),
            usage: self.usage.as_ref().map(|usage| UsageOut {
                input_tokens: usage.prompt_tokens,
                input_tokens_details: CachedTokens {
                    cached_tokens: usage.cached_tokens,
                },
                output_tokens: usage.generated_tokens,
                output_tokens_details: ReasoningTokens {
                    reasoning_tokens: 0,
                },
                total_tokens: usage.prompt_tokens + usage.generated_tokens,
            }),
            echo: &self.echo,
        })
    }

    /// An event of `kind` with `body`, numbered.
    fn event(&mut self, kind: &'static str, body: &impl Serialize) -> (String, Value) {
        let event = EventOut {
            body,
            kind,
            sequence_number: self.sequence,
        };
        self.sequence += 1;
        (kind.to_owned(), to_value(&event))
    }

    /// Takes in one event; returns the API events it makes.
    fn take(&mut self, event: InferenceEvent) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        match event {
            InferenceEvent::Content(text) if !text.is_empty() => {
                let index = match self.open_message {
                    Some(index) => index,
                    None => {
                        let index = self.output.len();
                        let item_id = format!("msg_{}", unique_id());
                        let item = OutputItem::Message {
                            id: item_id.clone(),
                            status: "in_progress",
                            role: "assistant",
                            content: Vec::new(),
                        };
                        events.push(self.event(
                            "response.output_item.added",
                            &ItemEvent {
                                output_index: index,
                                item: &item,
                            },
                        ));
                        self.output.push(item);
                        self.open_message = Some(index);
                        events.push(self.event(
                            "response.content_part.added",
                            &PartEvent {
                                item_id: &item_id,
                                output_index: index,
                                content_index: 0,
                                part: PartOut {
                                    kind: "output_text",
                                    text: "",
                                    annotations: [],
                                },
                            },
                        ));
                        if let Some(OutputItem::Message { content, .. }) =
                            self.output.get_mut(index)
                        {
                            content.push(OutputText::default());
                        }
                        index
                    }
                };
                let mut item_id = String::new();
                if let Some(OutputItem::Message { id, content, .. }) = self.output.get_mut(index) {
                    if let Some(part) = content.first_mut() {
                        part.text.push_str(&text);
                    }
                    item_id.clone_from(id);
                }
                events.push(self.event(
                    "response.output_text.delta",
                    &TextDelta {
                        item_id: &item_id,
                        output_index: index,
                        content_index: 0,
                        delta: &text,
                        logprobs: [],
                    },
                ));
            }
            InferenceEvent::ToolCall {
                id,
                name,
                arguments,
            } => {
                let called = self
                    .output
                    .iter()
                    .any(|item| matches!(item, OutputItem::FunctionCall { .. }));
                if self.one_call && called {
                    log::debug!("parallel_tool_calls false: a further call of `{name}` left out");
                    return events;
                }
                events.extend(self.close_message());
                let index = self.output.len();
                let item_id = format!("fc_{}", unique_id());
                let arguments = arguments.to_string();
                let mut item = OutputItem::FunctionCall {
                    id: item_id.clone(),
                    call_id: id,
                    name,
                    arguments: String::new(),
                    status: "in_progress",
                };
                events.push(self.event(
                    "response.output_item.added",
                    &ItemEvent {
                        output_index: index,
                        item: &item,
                    },
                ));
                events.push(self.event(
                    "response.function_call_arguments.delta",
                    &ArgumentsDelta {
                        item_id: &item_id,
                        output_index: index,
                        delta: &arguments,
                    },
                ));
                events.push(self.event(
                    "response.function_call_arguments.done",
                    &ArgumentsDone {
                        item_id: &item_id,
                        output_index: index,
                        arguments: &arguments,
                    },
                ));
                if let OutputItem::FunctionCall {
                    arguments: given,
                    status,
                    ..
                } = &mut item
                {
                    *given = arguments;
                    *status = "completed";
                }
                events.push(self.event(
                    "response.output_item.done",
                    &ItemEvent {
                        output_index: index,
                        item: &item,
                    },
                ));
                self.output.push(item);
            }
            InferenceEvent::Usage(usage) => self.usage = Some(usage),
            _ => {}
        }
        events
    }

    /// Ends the message being written, if any.
    fn close_message(&mut self) -> Vec<(String, Value)> {
        let Some(index) = self.open_message.take() else {
            return Vec::new();
        };
        let Some(OutputItem::Message {
            id,
            status,
            content,
            ..
        }) = self.output.get_mut(index)
        else {
            return Vec::new();
        };
        *status = "completed";
        let item_id = id.clone();
        let part = content.first().cloned().unwrap_or_default();
        let item = self.output[index].clone();
        vec![
            self.event(
                "response.output_text.done",
                &TextDone {
                    item_id: &item_id,
                    output_index: index,
                    content_index: 0,
                    text: &part.text,
                    logprobs: [],
                },
            ),
            self.event(
                "response.content_part.done",
                &PartDoneEvent {
                    item_id: &item_id,
                    output_index: index,
                    content_index: 0,
                    part: &part,
                },
            ),
            self.event(
                "response.output_item.done",
                &ItemEvent {
                    output_index: index,
                    item: &item,
                },
            ),
        ]
    }

    /// The conversation's next messages: what this answer said.
    fn said(&self) -> Vec<ChatMessage> {
        let mut said = Vec::new();
        let mut calls = Vec::new();
        for item in &self.output {
            match item {
                OutputItem::Message { content, .. } => {
                    let text = content.first().map_or("", |part| part.text.as_str());
                    said.push(ChatMessage::assistant(text.to_owned()));
                }
                OutputItem::FunctionCall {
                    call_id,
                    name,
                    arguments,
                    ..
                } => {
                    let arguments: Value = serde_json::from_str(arguments)
                        .unwrap_or_else(|_| Value::Object(Map::new()));
                    calls.push(rusty_genius::core::ToolCall::new(
                        call_id.as_str(),
                        name.as_str(),
                        &arguments,
                    ));
                }
            }
        }
        if !calls.is_empty() {
            said.push(ChatMessage::assistant_tool_calls(calls));
        }
        said
    }

    /// Keeps the finished answer, when the request asked to.
    fn keep(&self, keep: Option<(Arc<AppState>, Vec<ChatMessage>)>) {
        let Some((state, mut conversation)) = keep else {
            return;
        };
        conversation.extend(self.said());
        let kept = state.responses.lock().map(|mut store| {
            store.insert(self.id.clone(), self.response(None), conversation);
        });
        if kept.is_err() {
            log::error!(
                "the response store's lock is poisoned; {} not kept",
                self.id
            );
        }
    }
}

async fn whole_answer(
    mut answer: Answer,
    mut stream: RequestStream,
    keep: Option<(Arc<AppState>, Vec<ChatMessage>)>,
) -> Result<Response, ApiError> {
    while let Some(event) = stream.next().await {
        match event {
            Ok(InferenceEvent::Complete) => break,
            Ok(event) => {
                answer.take(event);
            }
            Err(err) => return Err(ApiError::from_report(&err)),
        }
    }
    answer.close_message();
    answer.keep(keep);
    Ok(axum::Json(answer.response(None)).into_response())
}

fn frame((kind, body): &(String, Value)) -> String {
    format!("event: {kind}\ndata: {body}\n\n")
}

/// Streams the answer as the API's events; a request the library refuses
/// before its first event gets its HTTP error instead.
async fn stream_answer(
    mut answer: Answer,
    mut stream: RequestStream,
    keep: Option<(Arc<AppState>, Vec<ChatMessage>)>,
) -> Result<Response, ApiError> {
    let first = first_event(&mut stream).await?;
    let mut opening = String::new();
    let created = answer.response(Some("in_progress"));
    opening.push_str(&frame(
        &answer.event("response.created", &ResponseEvent { response: &created }),
    ));
    opening.push_str(&frame(&answer.event(
        "response.in_progress",
        &ResponseEvent { response: &created },
    )));
    let events = Watched::new(stream, answer.id.clone());
    let rest = answer_frames(Streamed { answer, keep }, first, events);
    let frames = futures::stream::once(async move { Ok(Bytes::from(opening)) }).chain(rest);
    Ok(event_stream(frames))
}

/// A streamed answer and, for `store`, what to keep once it is done.
struct Streamed {
    answer: Answer,
    keep: Option<(Arc<AppState>, Vec<ChatMessage>)>,
}

impl Frames for Streamed {
    fn frames_for(&mut self, event: InferenceEvent) -> Option<String> {
        let made = self.answer.take(event);
        (!made.is_empty()).then(|| made.iter().map(frame).collect())
    }

    fn last_frames(&mut self) -> String {
        let mut text: String = self.answer.close_message().iter().map(frame).collect();
        self.answer.keep(self.keep.take());
        let response = self.answer.response(None);
        let kind = if response["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        text.push_str(&frame(&self.answer.event(
            kind,
            &ResponseEvent {
                response: &response,
            },
        )));
        text
    }

    fn error_frames(&mut self, err: &ErrorReport) -> String {
        let error = ApiError::from_report(err).body();
        let body = ErrorEvent {
            code: error.error.code,
            message: error.error.message,
            param: error.error.param,
        };
        frame(&self.answer.event("error", &body))
    }
}

/// `value` as JSON (a reply's types always are).
fn to_value(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

// ---- the replies' shapes ------------------------------------------------

#[derive(Debug, Serialize)]
struct Deleted {
    id: String,
    object: &'static str,
    deleted: bool,
}

/// The request's settings, as the response object repeats them.
#[derive(Debug, Serialize)]
struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    previous_response_id: Option<String>,
    tools: Vec<Value>,
    tool_choice: Value,
    text: TextEcho,
    parallel_tool_calls: bool,
    store: bool,
    metadata: Value,
}

#[derive(Debug, Serialize)]
struct TextEcho {
    format: Value,
}

#[derive(Debug, Serialize)]
struct TextFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// The response object.
#[derive(Debug, Serialize)]
struct ResponseOut<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    model: &'a str,
    output: &'a [OutputItem],
    error: Option<()>,
    incomplete_details: Option<Incomplete>,
    usage: Option<UsageOut>,
    #[serde(flatten)]
    echo: &'a Echo,
}

#[derive(Debug, Serialize)]
struct Incomplete {
    reason: &'static str,
}

#[derive(Debug, Serialize)]
struct UsageOut {
    input_tokens: usize,
    input_tokens_details: CachedTokens,
    output_tokens: usize,
    output_tokens_details: ReasoningTokens,
    total_tokens: usize,
}

#[derive(Debug, Serialize)]
struct CachedTokens {
    cached_tokens: usize,
}

#[derive(Debug, Serialize)]
struct ReasoningTokens {
    reasoning_tokens: usize,
}

/// An output item: a message, or a function call.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutputItem {
    Message {
        id: String,
        status: &'static str,
        role: &'static str,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: &'static str,
    },
}

/// A message's text.
#[derive(Debug, Clone, Serialize)]
struct OutputText {
    #[serde(rename = "type")]
    kind: &'static str,
    text: String,
    annotations: [(); 0],
    logprobs: [(); 0],
}

impl Default for OutputText {
    fn default() -> Self {
        Self {
            kind: "output_text",
            text: String::new(),
            annotations: [],
            logprobs: [],
        }
    }
}

/// A content part as it opens (no log-probabilities yet).
#[derive(Debug, Serialize)]
struct PartOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
}

/// An event: its body, then its type and number.
#[derive(Debug, Serialize)]
struct EventOut<'a, T> {
    #[serde(flatten)]
    body: &'a T,
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
}

#[derive(Debug, Serialize)]
struct ResponseEvent<'a> {
    response: &'a Value,
}

#[derive(Debug, Serialize)]
struct ItemEvent<'a> {
    output_index: usize,
    item: &'a OutputItem,
}

#[derive(Debug, Serialize)]
struct PartEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    part: PartOut<'a>,
}

#[derive(Debug, Serialize)]
struct PartDoneEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    part: &'a OutputText,
}

#[derive(Debug, Serialize)]
struct TextDelta<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    delta: &'a str,
    logprobs: [(); 0],
}

#[derive(Debug, Serialize)]
struct TextDone<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: usize,
    text: &'a str,
    logprobs: [(); 0],
}

#[derive(Debug, Serialize)]
struct ArgumentsDelta<'a> {
    item_id: &'a str,
    output_index: usize,
    delta: &'a str,
}

#[derive(Debug, Serialize)]
struct ArgumentsDone<'a> {
    item_id: &'a str,
    output_index: usize,
    arguments: &'a str,
}

#[derive(Debug, Serialize)]
struct ErrorEvent {
    code: Option<&'static str>,
    message: String,
    param: Option<String>,
}
