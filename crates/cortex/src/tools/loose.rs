//! Calls written without their family's markup: an answer that is only a
//! JSON call (`{"name": ..., "arguments": {...}}`), a list of them, or
//! such JSON in a ```` ```json ```` fence. Small models often answer this
//! way when their template taught them markup they do not reproduce.
//!
//! The reading is strict, so that honest JSON answers stay content: the
//! whole answer must be the JSON (and its fence); each object must name
//! one of the request's tools, hold nothing but its name, its arguments
//! and an optional `id`/`type`, and its arguments must satisfy the tool's
//! parameter schema. Anything else is content, sent as it was written.
//! While an answer that starts like this is being read it is held back,
//! since it cannot be known to be content until it is complete.

use rusty_genius_core::Tool;
use serde_json::Value;

use super::validate::satisfies;
use super::{json_end, State, ToolCallParser};

/// The tools an answer may call without markup.
#[derive(Debug)]
pub(super) struct LooseCalls {
    /// Each tool's name and parameter schema.
    tools: Vec<(String, Value)>,
    /// Calls already made and answered: an answer repeating them is
    /// content (see [`ToolCallParser::except_answered`]).
    pub(super) answered: Vec<(String, Value)>,
}

impl LooseCalls {
    pub(super) fn new(tools: &[Tool]) -> Option<Self> {
        (!tools.is_empty()).then(|| Self {
            tools: tools
                .iter()
                .map(|tool| (tool.function.name.clone(), tool.function.parameters.clone()))
                .collect(),
            answered: Vec::new(),
        })
    }

    /// The calls `value` makes: one call object or a non-empty list of
    /// them, each valid for its tool.
    fn calls(&self, value: &Value) -> Option<Vec<(String, Value)>> {
        match value {
            Value::Array(items) if !items.is_empty() => {
                items.iter().map(|item| self.call(item)).collect()
            }
            Value::Object(_) => self.call(value).map(|call| vec![call]),
            _ => None,
        }
    }

    /// Whether `call` was already made and answered.
    fn is_answered(&self, call: &(String, Value)) -> bool {
        self.answered.iter().any(|made| made == call)
    }

    fn call(&self, value: &Value) -> Option<(String, Value)> {
        let object = value.as_object()?;
        // OpenAI's own shape, `{"type": "function", "function": {...}}`.
        if let Some(function) = object.get("function") {
            let only = object
                .keys()
                .all(|key| matches!(key.as_str(), "function" | "type" | "id"));
            return only.then(|| self.call(function)).flatten();
        }
        let allowed =
            |key: &str| matches!(key, "name" | "arguments" | "parameters" | "id" | "type");
        if !object.keys().all(|key| allowed(key)) {
            return None;
        }
        let name = object.get("name")?.as_str()?;
        let (_, schema) = self.tools.iter().find(|(tool, _)| tool == name)?;
        let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
            Some(Value::String(text)) => serde_json::from_str(text).ok()?,
            Some(arguments) => arguments.clone(),
            None => Value::Object(Default::default()),
        };
        (arguments.is_object() && satisfies(&arguments, schema))
            .then(|| (name.to_owned(), arguments))
    }
}

/// Whether an answer starting with `text` (trimmed) may be a call without
/// markup.
pub(super) fn may_start(text: &str) -> bool {
    text.starts_with(['{', '[', '`'])
}

/// What the held answer is, so far.
enum Reading {
    /// Not decided yet: more text is needed.
    Undecided,
    /// Content after all.
    Content,
    /// Calls, if nothing but whitespace follows.
    Calls(Vec<(String, Value)>),
    /// The first `.0` bytes restate calls already answered: content, and
    /// the end of the answer (a model that echoes its call after the
    /// result echoes it again and again, to the end of its context).
    Echo(usize),
}

/// Reads the held answer in [`State::Loose`]; returns whether the state
/// changed.
pub(super) fn scan(
    p: &mut ToolCallParser,
    events: &mut Vec<rusty_genius_core::protocol::InferenceEvent>,
    at_end: bool,
) -> bool {
    let Some(loose) = &p.loose else {
        p.state = State::Text;
        return true;
    };
    match read(loose, &p.held, at_end) {
        Reading::Undecided => false,
        Reading::Content => {
            p.loose = None;
            let text = std::mem::take(&mut p.held);
            p.content(text, events);
            p.state = State::Text;
            true
        }
        Reading::Echo(end) => {
            p.loose = None;
            let mut text = std::mem::take(&mut p.held);
            text.truncate(end);
            p.content(text, events);
            p.state = State::Plain;
            p.stop = true;
            true
        }
        Reading::Calls(calls) => {
            p.loose = None;
            p.held.clear();
            for (name, arguments) in calls {
                p.call(name, arguments, events);
            }
            p.state = State::Text;
            true
        }
    }
}

fn read(loose: &LooseCalls, held: &str, at_end: bool) -> Reading {
    let undecided = if at_end {
        Reading::Content
    } else {
        Reading::Undecided
    };
    let text = held.trim_start();
    let (mut body, fenced) = match text.strip_prefix("```") {
        Some(fence) => {
            let Some(newline) = fence.find('\n') else {
                // A fence's info string is short; a long first line is code.
                return if fence.len() > 16 {
                    Reading::Content
                } else {
                    undecided
                };
            };
            let info = fence[..newline].trim();
            if !(info.is_empty() || info.eq_ignore_ascii_case("json")) {
                return Reading::Content;
            }
            (&fence[newline + 1..], true)
        }
        None if "```".starts_with(text) && !text.is_empty() => return undecided,
        None => (text, false),
    };
    let mut calls = Vec::new();
    loop {
        body = body.trim_start();
        if body.is_empty() || (fenced && "```".starts_with(body)) {
            break;
        }
        if fenced {
            if let Some(after) = body.strip_prefix("```") {
                if !after.trim().is_empty() {
                    return Reading::Content;
                }
                break;
            }
        }
        if !body.starts_with(['{', '[']) {
            return Reading::Content;
        }
        let Some(end) = json_end(body) else {
            return undecided;
        };
        let Ok(value) = serde_json::from_str::<Value>(&body[..end]) else {
            return Reading::Content;
        };
        let Some(more) = loose.calls(&value) else {
            return Reading::Content;
        };
        calls.extend(more);
        if calls.iter().all(|call| loose.is_answered(call)) {
            let start = body.as_ptr() as usize - held.as_ptr() as usize;
            return Reading::Echo(start + end);
        }
        body = &body[end..];
    }
    if calls.is_empty() || !at_end {
        return undecided;
    }
    // Echoes of answered calls are not made again; if nothing else is
    // left, the answer was the model restating them.
    calls.retain(|call| !loose.is_answered(call));
    if calls.is_empty() {
        return Reading::Content;
    }
    Reading::Calls(calls)
}
