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
//!
//! Each family lives in a module of its own, as one [`Family`]: how its
//! template is recognised, how its calls look, the grammar that forces
//! one, and how its markup is found in streamed text. A new family is a
//! new module, a variant of [`ToolSyntax`] and a line in its `family`.

mod hermes;
mod llama3;
mod loose;
mod mistral;
mod validate;

use std::hash::{BuildHasher, Hasher};

use rusty_genius_core::protocol::InferenceEvent;
use rusty_genius_core::{Tool, ToolChoice};
use serde_json::{json, Value};

use crate::suffix::partial_suffix;

/// Calls (name, arguments) a conversation already made and got results
/// for.
pub type AnsweredCalls = Vec<(String, Value)>;

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

/// One family's rules; see the module documentation.
trait Family: Sync {
    /// Whether a chat template's text teaches this markup.
    fn teaches(&self, template: &str) -> bool;

    /// Special tokens of the markup that must reach the parser as text.
    fn markup_tokens(&self) -> &'static [&'static str];

    /// The key a call's arguments go under.
    fn arguments_key(&self) -> &'static str {
        "arguments"
    }

    /// `calls` (name, arguments) as the model writes them.
    fn markup(&self, calls: &[(&str, Value)]) -> String;

    /// A fresh id for a call, in the form the family's templates expect.
    fn new_call_id(&self) -> String {
        format!("call_{}", random_alphanumeric(24))
    }

    /// The GBNF rules above one call's JSON (rule `tool-call-json`) that
    /// make one or more calls in this markup, starting with `root`.
    fn calls_root(&self) -> String;

    /// Outside calls: passes text on, holds back what may start markup,
    /// and enters [`State::Call`] (or [`State::Plain`]) at its start.
    /// Returns whether the state changed.
    fn scan_text(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool;

    /// Inside a call: emits it once complete and goes back to text.
    /// Returns whether the state changed.
    fn scan_call(
        &self,
        p: &mut ToolCallParser,
        events: &mut Vec<InferenceEvent>,
        at_end: bool,
    ) -> bool;
}

/// The families, in the order templates are tried against them.
const DETECTION_ORDER: [ToolSyntax; 3] = [
    ToolSyntax::Hermes,
    ToolSyntax::Mistral,
    ToolSyntax::Llama3Json,
];

impl ToolSyntax {
    fn family(self) -> &'static dyn Family {
        match self {
            Self::Hermes => &hermes::Hermes,
            Self::Llama3Json => &llama3::Llama3Json,
            Self::Mistral => &mistral::Mistral,
        }
    }

    /// The syntax a chat template teaches, found from its text.
    pub fn detect(template: &str) -> Option<Self> {
        DETECTION_ORDER
            .into_iter()
            .find(|syntax| syntax.family().teaches(template))
    }

    /// Special tokens of this markup that must reach the parser as text
    /// (they are normally left out of the output like other control
    /// tokens).
    pub fn markup_tokens(self) -> &'static [&'static str] {
        self.family().markup_tokens()
    }

    /// The markup for `calls` (name, arguments), as the model writes it;
    /// for scripting [`Pinky`](crate::Pinky) and for tests.
    pub fn markup(self, calls: &[(&str, Value)]) -> String {
        self.family().markup(calls)
    }

    /// A fresh id for a call: Mistral's templates want nine letters and
    /// digits, the others take OpenAI's `call_...` form.
    pub fn new_call_id(self) -> String {
        self.family().new_call_id()
    }

    /// The JSON schema of one call the model must make, for `choice`
    /// (`Required`: any of the tools; `Function`: that one), or `None` when
    /// the choice does not force a call.
    pub fn call_schema(self, tools: &[Tool], choice: &ToolChoice) -> Option<Value> {
        let arguments_key = self.family().arguments_key();
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
        format!("{}{renamed}", self.family().calls_root())
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
    /// Inside a call's markup, until it is complete.
    Call,
    /// The answer is text; no more calls are looked for (Llama 3, whose
    /// calls are the whole answer).
    Plain,
    /// The answer starts like a call written without markup; held until
    /// it is known to be one (see [`loose`]).
    Loose,
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
    /// The tools a call without markup may name, until the start of the
    /// answer shows it is not one.
    loose: Option<loose::LooseCalls>,
    /// The answer should end here (it restated answered calls).
    stop: bool,
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
            loose: None,
            stop: false,
        }
    }

    /// Whether the answer should end now: it began by restating calls the
    /// conversation already answered (see [`except_answered`](Self::except_answered)),
    /// which a model stuck this way repeats to the end of its context.
    pub fn wants_stop(&self) -> bool {
        self.stop
    }

    /// Also reads an answer that is nothing but a JSON call of one of
    /// `tools` (bare or in a ```` ```json ```` fence, one call or a list)
    /// as calls, as small models often write them; see [`loose`]. Such an
    /// answer is held back until it is complete.
    pub fn with_calls_without_markup(mut self, tools: &[Tool]) -> Self {
        self.loose = loose::LooseCalls::new(tools);
        self
    }

    /// Does not read these calls (name, arguments) without markup: calls
    /// the conversation already made and got results for, which a model
    /// that echoes them is not making again. An answer that begins by
    /// restating them is content, and ends there ([`wants_stop`](Self::wants_stop)).
    pub fn except_answered(mut self, answered: AnsweredCalls) -> Self {
        if let Some(loose) = &mut self.loose {
            loose.answered = answered;
        }
        self
    }

    /// How many calls were emitted.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Adds answer text; appends `Content` and `ToolCall` events.
    pub fn push(&mut self, text: &str, events: &mut Vec<InferenceEvent>) {
        let family = self.syntax.family();
        self.held.push_str(text);
        loop {
            let progressed = match self.state {
                State::Text if self.loose.is_some() => self.begin_loose(),
                State::Loose => loose::scan(self, events, false),
                State::Text => family.scan_text(self, events, false),
                State::Call => family.scan_call(self, events, false),
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
        let family = self.syntax.family();
        if self.state == State::Loose {
            loose::scan(self, events, true);
        }
        self.loose = None;
        match self.state {
            State::Text | State::Plain | State::Loose => {
                family.scan_text(self, events, true);
                let text = std::mem::take(&mut self.held);
                self.content(text, events);
            }
            State::Call => {
                family.scan_call(self, events, true);
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

    /// At the start of the answer: enters [`State::Loose`] if it may be a
    /// call without markup, or gives that reading up for good. Returns
    /// whether anything changed (not while only whitespace has come).
    fn begin_loose(&mut self) -> bool {
        let start = self.held.trim_start();
        if start.is_empty() {
            return false;
        }
        if loose::may_start(start) {
            self.state = State::Loose;
        } else {
            self.loose = None;
        }
        true
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

    /// Passes text on up to `marker` and enters a call there; holds back
    /// what may be the start of the marker. Returns whether it entered.
    fn enter_at(&mut self, marker: &str, events: &mut Vec<InferenceEvent>, at_end: bool) -> bool {
        if let Some(at) = self.held.find(marker) {
            let before: String = self.held.drain(..at + marker.len()).take(at).collect();
            self.content(before, events);
            self.state = State::Call;
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
        parse_everywhere_with(syntax, &[], text)
    }

    /// As [`parse_everywhere`], also reading calls without markup of
    /// `tools` (when there are any).
    fn parse_everywhere_with(syntax: ToolSyntax, tools: &[Tool], text: &str) -> Seen {
        let mut first: Option<Seen> = None;
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let mut parser = ToolCallParser::new(syntax).with_calls_without_markup(tools);
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

    fn weather_tools() -> Vec<Tool> {
        let city = json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        });
        vec![
            Tool::function("get_weather", "The weather in a city", city.clone()),
            Tool::function("get_time", "The time in a city", city),
        ]
    }

    #[test]
    fn json_answers_naming_a_tool_are_calls() {
        let tools = weather_tools();
        let paris = call("get_weather", json!({"city": "Paris"}));
        for answer in [
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "\n  {\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}\n",
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```",
            "```\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}\n```\n",
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}}",
        ] {
            assert_eq!(
                parse_everywhere_with(ToolSyntax::Hermes, &tools, answer),
                std::slice::from_ref(&paris),
                "{answer}"
            );
        }
        let two = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {\"city\": \"Oslo\"}}]";
        assert_eq!(
            parse_everywhere_with(ToolSyntax::Hermes, &tools, two),
            [paris.clone(), call("get_time", json!({"city": "Oslo"}))]
        );
        // Markup still works, and so do other families.
        let markup = ToolSyntax::Hermes.markup(&[("get_weather", json!({"city": "Paris"}))]);
        assert_eq!(
            parse_everywhere_with(ToolSyntax::Hermes, &tools, &markup),
            std::slice::from_ref(&paris)
        );
        assert_eq!(
            parse_everywhere_with(
                ToolSyntax::Mistral,
                &tools,
                "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
            ),
            [paris]
        );
    }

    #[test]
    fn json_that_is_not_a_valid_call_stays_content() {
        let tools = weather_tools();
        for answer in [
            // Not a tool of this request.
            "{\"name\": \"get_stock\", \"arguments\": {\"ticker\": \"X\"}}",
            // Arguments against the schema.
            "{\"name\": \"get_weather\", \"arguments\": {\"town\": \"Paris\"}}",
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": 7}}",
            // Other keys: a description of the tool, not a call.
            "{\"name\": \"get_weather\", \"description\": \"x\", \"parameters\": {\"city\": \"Paris\"}}",
            // Data that happens to have a name.
            "{\"name\": \"Ada\", \"age\": 36}",
            "[1, 2, 3]",
            "[]",
            // Prose around the JSON.
            "Call it like this: {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}} is how you call it.",
            "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```\nThat is the call.",
            // Code in another language.
            "```python\nprint({\"name\": \"get_weather\"})\n```",
            "`get_weather` takes a city.",
            // Unfinished JSON.
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": ",
        ] {
            assert_eq!(
                parse_everywhere_with(ToolSyntax::Hermes, &tools, answer),
                [text(answer)],
                "{answer}"
            );
        }
        // An echo of a call already answered is the model restating it.
        let echo = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
        let answered = vec![("get_weather".to_owned(), json!({"city": "Paris"}))];
        let mut parser = ToolCallParser::new(ToolSyntax::Hermes)
            .with_calls_without_markup(&tools)
            .except_answered(answered.clone());
        let mut events = Vec::new();
        parser.push(echo, &mut events);
        assert!(parser.wants_stop());
        parser.finish(&mut events);
        // Content up to the end of the first restatement.
        let first = &echo[..echo.find('\n').unwrap()];
        assert_eq!(summarize(events), [text(first)]);
        // A new call beside the echo is made.
        let both = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]";
        let mut parser = ToolCallParser::new(ToolSyntax::Hermes)
            .with_calls_without_markup(&tools)
            .except_answered(answered);
        let mut events = Vec::new();
        parser.push(both, &mut events);
        parser.finish(&mut events);
        assert_eq!(
            summarize(events),
            [call("get_weather", json!({"city": "Oslo"}))]
        );
        // Without tools nothing is read loosely.
        let bare = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}";
        assert_eq!(parse_everywhere(ToolSyntax::Hermes, bare), [text(bare)]);
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
