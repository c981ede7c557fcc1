//! Qwen 2.5 and Hermes: each call is JSON between `<tool_call>` and
//! `</tool_call>`, one per line.

use rusty_genius_core::protocol::InferenceEvent;
use serde_json::{json, Value};

use super::{gbnf_literal, parse_call, Family, State, ToolCallParser};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

pub(super) struct Hermes;

impl Family for Hermes {
    fn teaches(&self, template: &str) -> bool {
        template.contains(OPEN)
    }

    fn markup_tokens(&self) -> &'static [&'static str] {
        &[OPEN, CLOSE]
    }

    fn markup(&self, calls: &[(&str, Value)]) -> String {
        calls
            .iter()
            .map(|(name, arguments)| {
                format!(
                    "{OPEN}\n{}\n{CLOSE}",
                    json!({"name": name, "arguments": arguments})
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn calls_root(&self) -> String {
        format!(
            "root ::= tool-call (\"\\n\" tool-call)*\ntool-call ::= {} \"\\n\" tool-call-json \"\\n\" {}\n",
            gbnf_literal(OPEN),
            gbnf_literal(CLOSE)
        )
    }

    fn scan_text(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        p.enter_at(OPEN, events, at_end)
    }

    fn scan_call(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        let body = match p.held.find(CLOSE) {
            Some(at) => p
                .held
                .drain(..at + CLOSE.len())
                .take(at)
                .collect::<String>(),
            // A call the model ended without its closing tag still counts
            // if its JSON is complete.
            None if at_end => std::mem::take(&mut p.held),
            None => return false,
        };
        match parse_call(body.trim(), &["arguments", "parameters"]) {
            Some((name, arguments)) => p.call(name, arguments, events),
            None => {
                log::warn!("a <tool_call> that is not a JSON call was dropped: {body:?}");
            }
        }
        p.state = State::Text;
        true
    }
}
