//! Llama 3.x: the answer is one JSON call `{"name": ..., "parameters":
//! {...}}` (maybe after `<|python_tag|>`), or several separated by `;`;
//! an answer that starts otherwise is text.

use rusty_genius_core::protocol::InferenceEvent;
use serde_json::{json, Value};

use super::{json_end, parse_call, Family, State, ToolCallParser};

const PYTHON_TAG: &str = "<|python_tag|>";

pub(super) struct Llama3Json;

impl Family for Llama3Json {
    fn teaches(&self, template: &str) -> bool {
        template.contains("<|start_header_id|>")
            && (template.contains(PYTHON_TAG) || template.contains("tool"))
    }

    fn markup_tokens(&self) -> &'static [&'static str] {
        &[PYTHON_TAG]
    }

    fn arguments_key(&self) -> &'static str {
        "parameters"
    }

    fn markup(&self, calls: &[(&str, Value)]) -> String {
        calls
            .iter()
            .map(|(name, arguments)| json!({"name": name, "parameters": arguments}).to_string())
            .collect::<Vec<_>>()
            .join(";")
    }

    fn calls_root(&self) -> String {
        "root ::= tool-call-json\n".to_owned()
    }

    fn scan_text(
        &self,
        p: &mut ToolCallParser,
        _events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        // A call is the whole answer, or follows another after a `;`.
        let start = if p.calls > 0 {
            p.held
                .trim_start_matches(|c: char| c == ';' || c.is_whitespace())
        } else {
            p.held.trim_start()
        };
        if start.is_empty() {
            if at_end {
                p.held.clear();
            }
            return false;
        }
        if let Some(rest) = start.strip_prefix(PYTHON_TAG) {
            p.held = rest.to_owned();
            p.state = State::Call;
            return true;
        }
        if start.starts_with('{') {
            p.held = start.to_owned();
            p.state = State::Call;
            return true;
        }
        if PYTHON_TAG.starts_with(start) && !at_end {
            return false;
        }
        p.state = State::Plain;
        true
    }

    fn scan_call(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        let text = p.held.trim_start();
        let Some(end) = json_end(text) else {
            if at_end {
                // Not a complete object: it was text after all.
                let text = std::mem::take(&mut p.held);
                p.content(text, events);
                p.state = State::Plain;
            }
            return false;
        };
        let object = text[..end].to_owned();
        let rest = text[end..].to_owned();
        match parse_call(&object, &["parameters", "arguments"]) {
            Some((name, arguments)) => {
                p.call(name, arguments, events);
                p.held = rest.trim_start().trim_start_matches(';').to_owned();
                p.state = State::Text;
            }
            None => {
                p.held.clear();
                p.content(object, events);
                p.held = rest;
                p.state = State::Plain;
            }
        }
        true
    }
}
