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
use serde::Deserialize;
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
    Ok(
        axum::Json(json!({"id": id, "object": "response.deleted", "deleted": true}))
            .into_response(),
    )
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
    echo: Map<String, Value>,
    output: Vec<Value>,
    /// The index in `output` of the message being written, if any.
    open_message: Option<usize>,
    usage: Option<Usage>,
    sequence: u64,
    /// At most one function call (`parallel_tool_calls: false`).
    one_call: bool,
}

impl Answer {
    fn new(request: &ResponsesRequest, model: String) -> Self {
        let mut echo = Map::new();
        echo.insert("instructions".into(), json!(request.instructions));
        echo.insert("max_output_tokens".into(), json!(request.max_output_tokens));
        echo.insert("temperature".into(), json!(request.temperature));
        echo.insert("top_p".into(), json!(request.top_p));
        echo.insert(
            "previous_response_id".into(),
            json!(request.previous_response_id),
        );
        echo.insert("tools".into(), json!(request.tools));
        echo.insert(
            "tool_choice".into(),
            request.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        );
        echo.insert(
            "text".into(),
            json!({"format": request
                .text
                .as_ref()
                .and_then(|text| text.format.clone())
                .unwrap_or_else(|| json!({"type": "text"}))}),
        );
        echo.insert(
            "parallel_tool_calls".into(),
            json!(request.parallel_tool_calls.unwrap_or(true)),
        );
        echo.insert("store".into(), json!(request.store));
        echo.insert(
            "metadata".into(),
            request.metadata.clone().unwrap_or_else(|| json!({})),
        );
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
    fn response(&self, status: Option<&str>) -> Value {
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
        let mut response = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": self.output,
            "error": null,
            "incomplete_details": if incomplete && status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "usage": self.usage.as_ref().map(|usage| json!({
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.generated_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.generated_tokens,
            })),
        });
        if let Value::Object(object) = &mut response {
            object.extend(self.echo.clone());
        }
        response
    }

    fn event(&mut self, kind: &str, mut body: Value) -> (String, Value) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        (kind.to_owned(), body)
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
                        let item = json!({
                            "type": "message",
                            "id": format!("msg_{}", unique_id()),
                            "status": "in_progress",
                            "role": "assistant",
                            "content": [],
                        });
                        self.output.push(item.clone());
                        self.open_message = Some(index);
                        events.push(self.event(
                            "response.output_item.added",
                            json!({"output_index": index, "item": item}),
                        ));
                        let item_id = self.output[index]["id"].clone();
                        events.push(self.event(
                            "response.content_part.added",
                            json!({
                                "item_id": item_id,
                                "output_index": index,
                                "content_index": 0,
                                "part": {"type": "output_text", "text": "", "annotations": []},
                            }),
                        ));
                        self.output[index]["content"] = json!([{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]);
                        index
                    }
                };
                let joined = format!(
                    "{}{text}",
                    self.output[index]["content"][0]["text"]
                        .as_str()
                        .unwrap_or("")
                );
                self.output[index]["content"][0]["text"] = json!(joined);
                let item_id = self.output[index]["id"].clone();
                events.push(self.event(
                    "response.output_text.delta",
                    json!({
                        "item_id": item_id,
                        "output_index": index,
                        "content_index": 0,
                        "delta": text,
                        "logprobs": [],
                    }),
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
                    .any(|item| item["type"] == "function_call");
                if self.one_call && called {
                    log::debug!("parallel_tool_calls false: a further call of `{name}` left out");
                    return events;
                }
                events.extend(self.close_message());
                let index = self.output.len();
                let item_id = format!("fc_{}", unique_id());
                let arguments = arguments.to_string();
                let item = json!({
                    "type": "function_call",
                    "id": item_id,
                    "call_id": id,
                    "name": name,
                    "arguments": "",
                    "status": "in_progress",
                });
                self.output.push(item.clone());
                events.push(self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                ));
                events.push(self.event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": arguments}),
                ));
                events.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "arguments": arguments}),
                ));
                self.output[index]["arguments"] = json!(arguments);
                self.output[index]["status"] = json!("completed");
                let done = self.output[index].clone();
                events.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": done}),
                ));
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
        self.output[index]["status"] = json!("completed");
        let item_id = self.output[index]["id"].clone();
        let part = self.output[index]["content"][0].clone();
        let text = part["text"].clone();
        let item = self.output[index].clone();
        vec![
            self.event(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            ),
            self.event(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
            ),
            self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ),
        ]
    }

    /// The conversation's next messages: what this answer said.
    fn said(&self) -> Vec<ChatMessage> {
        let mut said = Vec::new();
        let mut calls = Vec::new();
        for item in &self.output {
            match item["type"].as_str() {
                Some("message") => {
                    let text = item["content"][0]["text"].as_str().unwrap_or("").to_owned();
                    said.push(ChatMessage::assistant(text));
                }
                Some("function_call") => {
                    let arguments: Value =
                        serde_json::from_str(item["arguments"].as_str().unwrap_or("{}"))
                            .unwrap_or_else(|_| json!({}));
                    calls.push(rusty_genius::core::ToolCall::new(
                        item["call_id"].as_str().unwrap_or(""),
                        item["name"].as_str().unwrap_or(""),
                        &arguments,
                    ));
                }
                _ => {}
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
        &answer.event("response.created", json!({"response": created.clone()})),
    ));
    opening.push_str(&frame(
        &answer.event("response.in_progress", json!({"response": created})),
    ));
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
        text.push_str(&frame(
            &self.answer.event(kind, json!({"response": response})),
        ));
        text
    }

    fn error_frames(&mut self, err: &ErrorReport) -> String {
        let error = ApiError::from_report(err).body();
        let body = json!({
            "code": error.error.code,
            "message": error.error.message,
            "param": error.error.param,
        });
        frame(&self.answer.event("error", body))
    }
}
