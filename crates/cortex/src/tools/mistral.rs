//! Mistral: `[TOOL_CALLS]` then a JSON list of calls, or
//! `[TOOL_CALLS]name[ARGS]{...}` one call at a time; call ids are nine
//! letters and digits.

use rusty_genius_core::protocol::InferenceEvent;
use serde_json::{json, Value};

use super::{
    call_from_value, gbnf_literal, json_end, random_alphanumeric, Family, State, ToolCallParser,
};

const CALLS: &str = "[TOOL_CALLS]";
const ARGS: &str = "[ARGS]";

pub(super) struct Mistral;

impl Family for Mistral {
    fn teaches(&self, template: &str) -> bool {
        template.contains(CALLS)
    }

    fn markup_tokens(&self) -> &'static [&'static str] {
        &[CALLS, ARGS]
    }

    fn markup(&self, calls: &[(&str, Value)]) -> String {
        let list: Vec<Value> = calls
            .iter()
            .map(|(name, arguments)| json!({"name": name, "arguments": arguments}))
            .collect();
        format!("{CALLS}{}", Value::Array(list))
    }

    fn new_call_id(&self) -> String {
        random_alphanumeric(9)
    }

    fn calls_root(&self) -> String {
        format!(
            "root ::= {} \"[\" tool-call-json (\", \" tool-call-json)* \"]\"\n",
            gbnf_literal(CALLS)
        )
    }

    fn scan_text(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        p.enter_at(CALLS, events, at_end)
    }

    fn scan_call(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        let text = p.held.trim_start();
        if text.starts_with('[') {
            let Some(end) = json_end(text) else {
                if at_end {
                    log::warn!("an unfinished [TOOL_CALLS] list was dropped: {text:?}");
                    p.held.clear();
                }
                return false;
            };
            let list = text[..end].to_owned();
            let rest = text[end..].to_owned();
            match serde_json::from_str::<Vec<Value>>(&list) {
                Ok(calls) => {
                    for call in calls {
                        if let Some((name, arguments)) =
                            call_from_value(&call, &["arguments", "parameters"])
                        {
                            p.call(name, arguments, events);
                        }
                    }
                }
                Err(err) => log::warn!("a [TOOL_CALLS] list that is not JSON was dropped: {err}"),
            }
            p.held = rest;
            p.state = State::Text;
            return true;
        }
        // `name[ARGS]{...}`
        let Some(args_at) = text.find(ARGS) else {
            if at_end {
                p.held.clear();
            }
            return false;
        };
        let name = text[..args_at].trim().to_owned();
        let arguments = text[args_at + ARGS.len()..].trim_start();
        let Some(end) = json_end(arguments) else {
            if at_end {
                p.held.clear();
            }
            return false;
        };
        let parsed = serde_json::from_str::<Value>(&arguments[..end]);
        let rest = arguments[end..].to_owned();
        match parsed {
            Ok(arguments) => p.call(name, arguments, events),
            Err(err) => log::warn!("tool call arguments that are not JSON were dropped: {err}"),
        }
        // Another call may follow with its own [TOOL_CALLS].
        p.held = rest;
        p.state = State::Text;
        true
    }
}
