//! Tool calls: the markup each model family writes them in, taken out of
//! the streamed text as whole calls.
//!
//! A model announces a call with markup its chat template taught it:
//! Qwen and Hermes wrap JSON in `<tool_call>...</tool_call>`, Llama 3.x
//! answers with a bare JSON object (maybe after `<|python_tag|>`), Mistral
//! writes `[TOOL_CALLS]` then a JSON list (or `name[ARGS]{...}`). The
//! [`ToolCallParser`] sees the answer as it streams, passes text outside
//! calls on as content, holds back anything that may be the start of
//! markup, and emits each call once it is complete, so no markup ever
//! reaches the content, however the model's tokens split it.

use std::hash::{BuildHasher, Hasher};

use rusty_genius_core::protocol::InferenceEvent;
use rusty_genius_core::{Tool, ToolChoice};
use serde_json::{json, Value};

use crate::suffix::partial_suffix;

/// A family of tool-call markup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolSyntax {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
    /// (Qwen 2.5, Hermes).
    Hermes,
    /// `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`
    /// (Llama 3.x).
    Llama3Json,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or
    /// `[TOOL_CALLS]name[ARGS]{...}` (Mistral).
    Mistral,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

impl ToolSyntax {
    /// The syntax a chat template teaches, found from its text.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains(HERMES_OPEN) {
            Some(Self::Hermes)
        } else if template.contains(MISTRAL_CALLS) {
            Some(Self::Mistral)
        } else if template.contains("<|start_header_id|>")
            && (template.contains(PYTHON_TAG) || template.contains("tool"))
        {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Special tokens of this markup that must reach the parser as text
    /// (they are normally left out of the output like other control
    /// tokens).
    pub fn markup_tokens(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &[HERMES_OPEN, HERMES_CLOSE],
            Self::Llama3Json => &[PYTHON_TAG],
            Self::Mistral => &[MISTRAL_CALLS, MISTRAL_ARGS],
        }
    }

    /// The markup for `calls` (name, arguments), as the model writes it;
    /// for scripting [`Pinky`](crate::Pinky) and for tests.
    pub fn markup(self, calls: &[(&str, Value)]) -> String {
        match self {
            Self::Hermes => calls
                .iter()
                .map(|(name, arguments)| {
                    format!(
                        "{HERMES_OPEN}\n{}\n{HERMES_CLOSE}",
                        json!({"name": name, "arguments": arguments})
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Self::Llama3Json => calls
                .iter()
                .map(|(name, arguments)| json!({"name": name, "parameters": arguments}).to_string())
                .collect::<Vec<_>>()
                .join(";"),
            Self::Mistral => {
                let list: Vec<Value> = calls
                    .iter()
                    .map(|(name, arguments)| json!({"name": name, "arguments": arguments}))
                    .collect();
                format!("{MISTRAL_CALLS}{}", Value::Array(list))
            }
        }
    }

    /// A fresh id for a call: Mistral's templates want nine letters and
    /// digits, the others take OpenAI's `call_...` form.
    pub fn new_call_id(self) -> String {
        match self {
            Self::Mistral => random_alphanumeric(9),
            _ => format!("call_{}", random_alphanumeric(24)),
        }
    }

    /// The JSON schema of one call the model must make, for `choice`
    /// (`Required`: any of the tools; `Function`: that one), or `None` when
    /// the choice does not force a call.
    pub fn call_schema(self, tools: &[Tool], choice: &ToolChoice) -> Option<Value> {
        let arguments_key = match self {
            Self::Llama3Json => "parameters",
            _ => "arguments",
        };
        let one = |tool: &Tool| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": tool.function.name},
                    arguments_key: tool.function.parameters,
                },
                "required": ["name", arguments_key],
                "additionalProperties": false,
            })
        };
        match choice {
            ToolChoice::Required if tools.len() == 1 => Some(one(&tools[0])),
            ToolChoice::Required => {
                Some(json!({"anyOf": tools.iter().map(one).collect::<Vec<_>>()}))
            }
            ToolChoice::Function(name) => tools.iter().find(|t| t.function.name == *name).map(one),
            _ => None,
        }
    }

    /// A GBNF grammar whose sentences are one or more calls in this
    /// markup, given `call_grammar`, a grammar (root rule `root`) of one
    /// call's JSON.
    pub fn calls_grammar(self, call_grammar: &str) -> String {
        let renamed = rename_root(call_grammar, "tool-call-json");
        let root = match self {
            Self::Hermes => format!(
                "root ::= tool-call (\"\\n\" tool-call)*\ntool-call ::= {} \"\\n\" tool-call-json \"\\n\" {}\n",
                gbnf_literal(HERMES_OPEN),
                gbnf_literal(HERMES_CLOSE)
            ),
            Self::Llama3Json => "root ::= tool-call-json\n".to_owned(),
            Self::Mistral => format!(
                "root ::= {} \"[\" tool-call-json (\", \" tool-call-json)* \"]\"\n",
                gbnf_literal(MISTRAL_CALLS)
            ),
        };
        format!("{root}{renamed}")
    }
}

/// Renames rule `root` of a GBNF grammar (its definition and references).
fn rename_root(grammar: &str, name: &str) -> String {
    let mut out = String::with_capacity(grammar.len() + 16);
    for line in grammar.lines() {
        match line.strip_prefix("root ::=") {
            Some(rest) => {
                out.push_str(name);
                out.push_str(" ::=");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `text` as a GBNF string literal.
fn gbnf_literal(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `len` random letters and digits.
fn random_alphanumeric(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = String::with_capacity(len);
    while out.len() < len {
        // A randomly keyed hash of a counter: unique and unpredictable
        // enough for ids, without a random-number crate.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut bits = hasher.finish();
        for _ in 0..10 {
            if out.len() == len {
                break;
            }
            out.push(ALPHABET[(bits % 62) as usize] as char);
            bits /= 62;
        }
    }
    out
}

/// Where the parser is in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Passing text on, watching for the start of a call.
    Text,
    /// Inside `<tool_call>`, until `</tool_call>`.
    HermesCall,
    /// After `[TOOL_CALLS]`: a JSON list, or `name[ARGS]{...}`.
    MistralCalls,
    /// Llama 3: a JSON object that may be a call, until it is complete.
    LlamaJson,
    /// Llama 3: the answer is text; no more calls are looked for.
    Plain,
}

/// Takes tool calls out of streamed answer text.
#[derive(Debug)]
pub struct ToolCallParser {
    syntax: ToolSyntax,
    state: State,
    /// Text not yet passed on: a possible start of markup, or a call.
    held: String,
    /// Whitespace after a call, passed on only if text follows.
    gap: String,
    /// A call was the last thing emitted.
    after_call: bool,
    calls: usize,
}

impl ToolCallParser {
    /// A parser for `syntax`.
    pub fn new(syntax: ToolSyntax) -> Self {
        Self {
            syntax,
            state: State::Text,
            held: String::new(),
            gap: String::new(),
            after_call: false,
            calls: 0,
        }
    }

    /// How many calls were emitted.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Adds answer text; appends `Content` and `ToolCall` events.
    pub fn push(&mut self, text: &str, events: &mut Vec<InferenceEvent>) {
        self.held.push_str(text);
        loop {
            let progressed = match self.state {
                State::Text => self.scan_text(events, false),
                State::HermesCall => self.scan_hermes_call(events, false),
                State::MistralCalls => self.scan_mistral(events, false),
                State::LlamaJson => self.scan_llama_json(events, false),
                State::Plain => {
                    let text = std::mem::take(&mut self.held);
                    self.content(text, events);
                    false
                }
            };
            if !progressed {
                return;
            }
        }
    }

    /// Ends the answer: held text is released, a complete call at the very
    /// end (without its closing tag) is emitted, an unfinished one dropped.
    pub fn finish(&mut self, events: &mut Vec<InferenceEvent>) {
        match self.state {
            State::Text | State::Plain => {
                self.scan_text(events, true);
                let text = std::mem::take(&mut self.held);
                self.content(text, events);
            }
            State::HermesCall => {
                self.scan_hermes_call(events, true);
            }
            State::MistralCalls => {
                self.scan_mistral(events, true);
            }
            State::LlamaJson => {
                self.scan_llama_json(events, true);
            }
        }
        if !self.held.trim().is_empty() {
            log::warn!(
                "the answer ended inside an unfinished tool call; dropped: {:?}",
                self.held
            );
        }
        self.held.clear();
        self.gap.clear();
    }

    /// Passes text on as content; whitespace right after a call waits to
    /// see whether more text follows.
    fn content(&mut self, text: String, events: &mut Vec<InferenceEvent>) {
        if text.is_empty() {
            return;
        }
        if self.after_call {
            self.gap.push_str(&text);
            if self.gap.trim().is_empty() {
                return;
            }
            self.after_call = false;
            let text = std::mem::take(&mut self.gap);
            events.push(InferenceEvent::Content(text.trim_start().to_owned()));
            return;
        }
        events.push(InferenceEvent::Content(text));
    }

    fn call(&mut self, name: String, arguments: Value, events: &mut Vec<InferenceEvent>) {
        self.gap.clear();
        self.after_call = true;
        self.calls += 1;
        events.push(InferenceEvent::ToolCall {
            id: self.syntax.new_call_id(),
            name,
            arguments,
        });
    }

    /// Outside calls: emit text up to a marker, switch state at a marker,
    /// hold back what may be the start of one. Returns whether the state
    /// changed.
    fn scan_text(&mut self, events: &mut Vec<InferenceEvent>, at_end: bool) -> bool {
        match self.syntax {
            ToolSyntax::Hermes => self.enter_at(HERMES_OPEN, State::HermesCall, events, at_end),
            ToolSyntax::Mistral => {
                self.enter_at(MISTRAL_CALLS, State::MistralCalls, events, at_end)
            }
            ToolSyntax::Llama3Json => {
                // A Llama 3 call is the whole answer, or follows another
                // after a `;`.
                let start = if self.calls > 0 {
                    self.held
                        .trim_start_matches(|c: char| c == ';' || c.is_whitespace())
                } else {
                    self.held.trim_start()
                };
                if start.is_empty() {
                    if at_end {
                        self.held.clear();
                    }
                    return false;
                }
                if let Some(rest) = start.strip_prefix(PYTHON_TAG) {
                    self.held = rest.to_owned();
                    self.state = State::LlamaJson;
                    return true;
                }
                if start.starts_with('{') {
                    self.held = start.to_owned();
                    self.state = State::LlamaJson;
                    return true;
                }
                if PYTHON_TAG.starts_with(start) && !at_end {
                    return false;
                }
                self.state = State::Plain;
                true
            }
        }
    }

    fn enter_at(
        &mut self,
        marker: &str,
        next: State,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool {
        if let Some(at) = self.held.find(marker) {
            let before: String = self.held.drain(..at + marker.len()).take(at).collect();
            self.content(before, events);
            self.state = next;
            return true;
        }
        let keep = if at_end {
            0
        } else {
            partial_suffix(&self.held, marker)
        };
        let ready: String = self.held.drain(..self.held.len() - keep).collect();
        self.content(ready, events);
        false
    }

    fn scan_hermes_call(&mut self, events: &mut Vec<InferenceEvent>, at_end: bool) -> bool {
        let body = match self.held.find(HERMES_CLOSE) {
            Some(at) => {
                let body: String = self
                    .held
                    .drain(..at + HERMES_CLOSE.len())
                    .take(at)
                    .collect();
                body
            }
            // A call the model ended without its closing tag still counts
            // if its JSON is complete.
            None if at_end => std::mem::take(&mut self.held),
            None => return false,
        };
        match parse_call(body.trim(), &["arguments", "parameters"]) {
            Some((name, arguments)) => self.call(name, arguments, events),
            None => {
                log::warn!("a <tool_call> that is not a JSON call was dropped: {body:?}");
            }
        }
        self.state = State::Text;
        true
    }

    fn scan_mistral(&mut self, events: &mut Vec<InferenceEvent>, at_end: bool) -> bool {
        let text = self.held.trim_start();
        if text.starts_with('[') {
            let Some(end) = json_end(text) else {
                if at_end {
                    log::warn!("an unfinished [TOOL_CALLS] list was dropped: {text:?}");
                    self.held.clear();
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
                            self.call(name, arguments, events);
                        }
                    }
                }
                Err(err) => log::warn!("a [TOOL_CALLS] list that is not JSON was dropped: {err}"),
            }
            self.held = rest;
            self.state = State::Text;
            return true;
        }
        // `name[ARGS]{...}`
        let Some(args_at) = text.find(MISTRAL_ARGS) else {
            if at_end {
                self.held.clear();
            }
            return false;
        };
        let name = text[..args_at].trim().to_owned();
        let arguments = &text[args_at + MISTRAL_ARGS.len()..];
        let Some(end) = json_end(arguments.trim_start()) else {
            if at_end {
                self.held.clear();
            }
            return false;
        };
        let arguments = arguments.trim_start();
        let parsed = serde_json::from_str::<Value>(&arguments[..end]);
        let rest = arguments[end..].to_owned();
        match parsed {
            Ok(arguments) => self.call(name, arguments, events),
            Err(err) => log::warn!("tool call arguments that are not JSON were dropped: {err}"),
        }
        // Another call may follow with its own [TOOL_CALLS].
        self.held = rest;
        self.state = State::Text;
        true
    }

    fn scan_llama_json(&mut self, events: &mut Vec<InferenceEvent>, at_end: bool) -> bool {
        let text = self.held.trim_start();
        let Some(end) = json_end(text) else {
            if at_end {
                // Not a complete object: it was text after all.
                let text = std::mem::take(&mut self.held);
                self.content(text, events);
                self.state = State::Plain;
            }
            return false;
        };
        let object = text[..end].to_owned();
        let rest = text[end..].to_owned();
        match parse_call(&object, &["parameters", "arguments"]) {
            Some((name, arguments)) => {
                self.call(name, arguments, events);
                // Several calls are separated by `;`.
                self.held = rest.trim_start().trim_start_matches(';').to_owned();
                self.state = State::Text;
            }
            None => {
                self.held.clear();
                self.content(object, events);
                self.held = rest;
                self.state = State::Plain;
            }
        }
        true
    }
}

/// A call's name and arguments from its JSON text.
fn parse_call(text: &str, argument_keys: &[&str]) -> Option<(String, Value)> {
    let value: Value = serde_json::from_str(text).ok()?;
    call_from_value(&value, argument_keys)
}

/// `{"name": ..., "<arguments key>": {...}}`; arguments given as JSON text
/// are parsed.
fn call_from_value(value: &Value, argument_keys: &[&str]) -> Option<(String, Value)> {
    let name = value.get("name")?.as_str()?.to_owned();
    let arguments = argument_keys
        .iter()
        .find_map(|key| value.get(*key))
        .cloned()
        .unwrap_or_else(|| json!({}));
    let arguments = match arguments {
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        other => other,
    };
    Some((name, arguments))
}

/// The length of the JSON value (object or list) at the start of `text`,
/// once it is complete.
fn json_end(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ if depth == 0 && !c.is_whitespace() => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content text, or a call's name and arguments.
    type Seen = Vec<(String, Option<(String, Value)>)>;

    /// Feeds `text` cut at every pair of places and checks the events are
    /// the same each time; returns them.
    fn parse_everywhere(syntax: ToolSyntax, text: &str) -> Seen {
        let mut first: Option<Seen> = None;
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let mut parser = ToolCallParser::new(syntax);
                let mut events = Vec::new();
                for piece in [&text[..a], &text[a..b], &text[b..]] {
                    parser.push(piece, &mut events);
                }
                parser.finish(&mut events);
                let seen = summarize(events);
                match &first {
                    None => first = Some(seen),
                    Some(expected) => assert_eq!(&seen, expected, "cut at {a} and {b}"),
                }
            }
        }
        first.unwrap()
    }

    /// Joins adjacent content; keeps calls as (name, arguments).
    fn summarize(events: Vec<InferenceEvent>) -> Seen {
        let mut out: Seen = Vec::new();
        for event in events {
            match event {
                InferenceEvent::Content(text) => match out.last_mut() {
                    Some((joined, None)) => joined.push_str(&text),
                    _ => out.push((text, None)),
                },
                InferenceEvent::ToolCall {
                    name, arguments, ..
                } => out.push((String::new(), Some((name, arguments)))),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    fn call(name: &str, arguments: Value) -> (String, Option<(String, Value)>) {
        (String::new(), Some((name.to_owned(), arguments)))
    }

    fn text(text: &str) -> (String, Option<(String, Value)>) {
        (text.to_owned(), None)
    }

    #[test]
    fn hermes_calls_come_out_whole_and_text_around_them_stays() {
        let answer = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n</tool_call>";
        assert_eq!(
            parse_everywhere(ToolSyntax::Hermes, answer),
            [
                text("Let me check.\n"),
                call("get_weather", json!({"city": "Paris"})),
                call("get_time", json!({"tz": "CET"})),
            ]
        );
        // Angle brackets that are not markup stay text.
        assert_eq!(
            parse_everywhere(ToolSyntax::Hermes, "a <b> c < tool"),
            [text("a <b> c < tool")]
        );
    }

    #[test]
    fn llama_json_calls_and_plain_answers() {
        assert_eq!(
            parse_everywhere(
                ToolSyntax::Llama3Json,
                "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"
            ),
            [call("get_weather", json!({"city": "Paris"}))]
        );
        assert_eq!(
            parse_everywhere(ToolSyntax::Llama3Json, "The weather is {\"sunny\"}."),
            [text("The weather is {\"sunny\"}.")]
        );
        assert_eq!(
            parse_everywhere(ToolSyntax::Llama3Json, "{\"answer\": 42}"),
            [text("{\"answer\": 42}")]
        );
    }

    #[test]
    fn mistral_lists_and_args_forms() {
        assert_eq!(
            parse_everywhere(
                ToolSyntax::Mistral,
                "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": \"]\"}}, {\"name\": \"b\", \"arguments\": {}}]"
            ),
            [call("a", json!({"x": "]"})), call("b", json!({}))]
        );
        assert_eq!(
            parse_everywhere(
                ToolSyntax::Mistral,
                "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}"
            ),
            [call("get_weather", json!({"city": "Paris"}))]
        );
    }

    #[test]
    fn markup_round_trips_through_the_parser() {
        for syntax in [
            ToolSyntax::Hermes,
            ToolSyntax::Llama3Json,
            ToolSyntax::Mistral,
        ] {
            let calls = [("f", json!({"a": 1})), ("g", json!({"b": [true]}))];
            let markup = syntax.markup(&calls);
            let parsed = parse_everywhere(syntax, &markup);
            assert_eq!(
                parsed,
                [call("f", json!({"a": 1})), call("g", json!({"b": [true]}))],
                "{syntax:?}: {markup}"
            );
        }
    }

    #[test]
    fn ids_have_the_family_form() {
        let id = ToolSyntax::Mistral.new_call_id();
        assert!(
            id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{id}"
        );
        let id = ToolSyntax::Hermes.new_call_id();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert_ne!(ToolSyntax::Hermes.new_call_id(), id);
    }

    #[test]
    fn grammars_wrap_the_call_rule() {
        let grammar = ToolSyntax::Hermes.calls_grammar("root ::= \"{}\"\nspace ::= \" \"?\n");
        assert!(grammar.starts_with("root ::= tool-call"), "{grammar}");
        assert!(grammar.contains("tool-call-json ::= \"{}\""), "{grammar}");
        assert!(grammar.contains("\"<tool_call>\""), "{grammar}");
    }
}
