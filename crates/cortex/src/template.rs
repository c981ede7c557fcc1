//! Chat templates: a model's Jinja template rendered the way HuggingFace
//! transformers renders it.
//!
//! Instruct models carry their prompt format as a Jinja template in the
//! GGUF metadata (`tokenizer.chat_template`), written for transformers:
//! it receives `messages`, `tools`, `add_generation_prompt`, `bos_token` and
//! `eos_token`, may call `raise_exception(...)` and `strftime_now(...)`,
//! uses `tojson` with Python's `json.dumps` spacing, Python string and dict
//! methods, and is compiled with `trim_blocks` and `lstrip_blocks`.
//! [`ChatTemplate`] does all of that with minijinja, so the text matches
//! transformers' byte for byte (tests compare with Python's jinja2).

use std::fmt::Write as _;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use rusty_genius_core::{ChatMessage, GeniusError, Tool};
use serde_json::Value as Json;

use crate::tools::ToolSyntax;

/// The name the template is stored under in its environment.
const NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it is given.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    tool_syntax: Option<ToolSyntax>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("tool_syntax", &self.tool_syntax)
            .finish_non_exhaustive()
    }
}

/// A piece of a rendered conversation: the template's own markup, or text
/// that came from a message (which must never be read as special tokens).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text the template wrote: turn markers, headers, tool listings.
    Markup(String),
    /// A message's content, as written by the user, a tool or the model.
    Text {
        /// The text.
        text: String,
        /// The index of its message.
        message: usize,
    },
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the model's
    /// special tokens as text.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, GeniusError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|err| {
                GeniusError::engine_from("the model's chat template does not compile", err)
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            tool_syntax: ToolSyntax::detect(source),
        })
    }

    /// The tool-call syntax the template teaches the model, if any.
    pub fn tool_syntax(&self) -> Option<ToolSyntax> {
        self.tool_syntax
    }

    /// The conversation as the model reads it, ending with the start of
    /// the assistant's turn when `add_generation_prompt` is set. A template
    /// that raises (say, on an unsupported order of roles) is an
    /// `InvalidRequest` error carrying the template's message.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String, GeniusError> {
        let messages: Vec<Json> = messages.iter().map(message_value).collect();
        self.render_values(&messages, tools, add_generation_prompt)
    }

    /// The rendering cut into markup and message text, so that the caller
    /// can tokenize message text without special tokens. When the template
    /// transforms the text in a way that cannot be traced (beyond trimming),
    /// the whole rendering comes back as one `Markup` part.
    pub fn render_parts(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<Vec<Part>, GeniusError> {
        let real: Vec<Json> = messages.iter().map(message_value).collect();
        let rendered = self.render_values(&real, tools, add_generation_prompt)?;
        let mut marked = real.clone();
        for (index, value) in marked.iter_mut().enumerate() {
            if value.get("content").is_some_and(Json::is_string) {
                value["content"] = Json::String(sentinel(index));
            }
        }
        let Ok(with_sentinels) = self.render_values(&marked, tools, add_generation_prompt) else {
            return Ok(vec![Part::Markup(rendered)]);
        };
        let contents: Vec<Option<&str>> = messages.iter().map(|m| m.content.as_deref()).collect();
        for trimmed in [false, true] {
            let parts = split_at_sentinels(&with_sentinels, &contents, trimmed);
            let joined: String = parts
                .iter()
                .map(|part| match part {
                    Part::Markup(text) | Part::Text { text, .. } => text.as_str(),
                })
                .collect();
            if joined == rendered {
                return Ok(parts);
            }
        }
        log::debug!("the chat template transforms message text; tokenizing it whole");
        Ok(vec![Part::Markup(rendered)])
    }

    fn render_values(
        &self,
        messages: &[Json],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String, GeniusError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|err| GeniusError::engine_from("the model's chat template is missing", err))?;
        let tools = if tools.is_empty() {
            Value::from(())
        } else {
            Value::from_serialize(tools)
        };
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(context).map_err(|err| template_error(&err))
    }
}

/// A message as transformers hands it to a template: a dict with `role`,
/// `content` (`None` when absent), and `tool_calls` (with `arguments` as a
/// parsed object), `tool_call_id` and `name` when present.
pub fn message_value(message: &ChatMessage) -> Json {
    let mut value = serde_json::Map::new();
    value.insert("role".into(), message.role.as_str().into());
    value.insert(
        "content".into(),
        message.content.clone().map_or(Json::Null, Json::String),
    );
    if !message.tool_calls.is_empty() {
        let calls = message
            .tool_calls
            .iter()
            .map(|call| {
                let arguments = serde_json::from_str(&call.function.arguments)
                    .unwrap_or_else(|_| Json::String(call.function.arguments.clone()));
                serde_json::json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments},
                })
            })
            .collect();
        value.insert("tool_calls".into(), Json::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        value.insert("tool_call_id".into(), id.clone().into());
    }
    if let Some(name) = &message.name {
        value.insert("name".into(), name.clone().into());
    }
    Json::Object(value)
}

/// Marks the place of message `index`'s text; private-use characters that
/// no template writes.
fn sentinel(index: usize) -> String {
    format!("\u{E000}{index}\u{E001}")
}

/// Cuts a rendering with sentinels into parts, putting each message's text
/// (trimmed, if `trimmed`) where its sentinel stands.
fn split_at_sentinels(rendered: &str, contents: &[Option<&str>], trimmed: bool) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = rendered;
    while let Some(start) = rest.find('\u{E000}') {
        let after = &rest[start + '\u{E000}'.len_utf8()..];
        let Some(end) = after.find('\u{E001}') else {
            break;
        };
        let Some(Some(text)) = after[..end]
            .parse::<usize>()
            .ok()
            .and_then(|index| contents.get(index).map(|c| c.map(|t| (index, t))))
        else {
            break;
        };
        let (message, text) = text;
        if start > 0 {
            parts.push(Part::Markup(rest[..start].to_owned()));
        }
        let text = if trimmed { text.trim() } else { text };
        if !text.is_empty() {
            parts.push(Part::Text {
                text: text.to_owned(),
                message,
            });
        }
        rest = &after[end + '\u{E001}'.len_utf8()..];
    }
    if !rest.is_empty() {
        parts.push(Part::Markup(rest.to_owned()));
    }
    parts
}

/// A template error as the request's error: `raise_exception` is the
/// template refusing the conversation; anything else is a template that
/// cannot render it.
fn template_error(err: &Error) -> GeniusError {
    if let (ErrorKind::InvalidOperation, Some(message)) = (err.kind(), err.detail()) {
        GeniusError::invalid_request(
            "messages",
            format!("the model's chat template refused them: {message}"),
        )
    } else {
        GeniusError::invalid_request(
            "messages",
            format!("the model's chat template cannot render them: {err}"),
        )
    }
}

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time (UTC) in a `strftime` format
/// (`%d %b %Y` and the other common directives).
fn strftime_now(format: String) -> Result<Value, Error> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Value::from(strftime(&format, seconds)))
}

/// Formats `seconds` since the Unix epoch (UTC) with `format`.
pub(crate) fn strftime(format: &str, seconds: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = seconds / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let weekday = DAYS[(days % 7) as usize];
    let (hour, minute, second) = (seconds % 86_400 / 3600, seconds % 3600 / 60, seconds % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('d') => write!(out, "{day:02}"),
            Some('m') => write!(out, "{month:02}"),
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `tojson` as transformers defines it: Python's `json.dumps` with
/// `ensure_ascii=False`, its `", "` and `": "` separators (`","` between
/// items when indenting), and the `indent`, `separators` and `sort_keys`
/// arguments.
fn tojson(value: &Value, args: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = args.get("indent")?;
    let sort_keys: Option<bool> = args.get("sort_keys")?;
    let separators: Option<Value> = args.get("separators")?;
    let ensure_ascii: Option<bool> = args.get("ensure_ascii")?;
    args.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(value) if value.is_none() => None,
        Some(value) => match value.as_str() {
            Some(text) => Some(text.to_owned()),
            None => Some(" ".repeat(usize::try_from(value)?)),
        },
    };
    let (item, key) = match separators {
        Some(pair) if !pair.is_none() => {
            let item = pair.get_item(&Value::from(0))?;
            let key = pair.get_item(&Value::from(1))?;
            (
                item.as_str().unwrap_or(", ").to_owned(),
                key.as_str().unwrap_or(": ").to_owned(),
            )
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let json: Json = serde_json::to_value(value).map_err(|err| {
        Error::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(err)
    })?;
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from(out))
}

/// How Python's `json.dumps` lays out JSON.
pub(crate) struct PyJson {
    pub(crate) indent: Option<String>,
    pub(crate) item: String,
    pub(crate) key: String,
    pub(crate) sort_keys: bool,
    pub(crate) ensure_ascii: bool,
}

impl PyJson {
    /// `json.dumps(value, ensure_ascii=False)`.
    #[cfg(test)]
    pub(crate) fn compact() -> Self {
        Self {
            indent: None,
            item: ", ".into(),
            key: ": ".into(),
            sort_keys: false,
            ensure_ascii: false,
        }
    }

    pub(crate) fn write(&self, value: &Json, level: usize, out: &mut String) {
        match value {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => {
                    let _ = write!(out, "{i}");
                }
                (_, Some(u), _) => {
                    let _ = write!(out, "{u}");
                }
                (_, _, Some(f)) => out.push_str(&python_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.write_str(s, out),
            Json::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Json::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out);
                    self.write_str(key, out);
                    out.push_str(&self.key);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }

    fn newline(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0C}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read
/// back, positional between 1e-4 and 1e16, else with a signed two-digit
/// exponent.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let text = format!("{f}");
        if text.contains('.') {
            text
        } else {
            format!("{text}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusty_genius_core::ToolCall;
    use serde_json::json;

    const QWEN_LIKE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn json_is_laid_out_as_python_does() {
        let value = json!({"b": [1, 2.5, 1e20, 0.0001, 0.00001, "é\n\"x\""], "a": {}, "c": null, "d": true});
        let mut out = String::new();
        PyJson::compact().write(&value, 0, &mut out);
        assert_eq!(
            out,
            r#"{"b": [1, 2.5, 1e+20, 0.0001, 1e-05, "é\n\"x\""], "a": {}, "c": null, "d": true}"#
        );
        let indented = PyJson {
            indent: Some("    ".into()),
            item: ",".into(),
            key: ": ".into(),
            sort_keys: true,
            ensure_ascii: true,
        };
        let mut out = String::new();
        indented.write(&json!({"z": [1], "a": "é"}), 0, &mut out);
        assert_eq!(
            out,
            "{\n    \"a\": \"\\u00e9\",\n    \"z\": [\n        1\n    ]\n}"
        );
    }

    #[test]
    fn dates_follow_strftime() {
        // 2024-07-26 12:34:56 UTC, a Friday.
        let at = 1_721_997_296;
        assert_eq!(strftime("%d %b %Y", at), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %H:%M:%S %y %m %%", at),
            "Friday July 12:34:56 24 07 %"
        );
    }

    #[test]
    fn parts_keep_message_text_apart_from_markup() {
        let template = ChatTemplate::new(QWEN_LIKE, "", "").unwrap();
        let messages = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi <|im_end|> there"),
        ];
        let parts = template.render_parts(&messages, &[], true).unwrap();
        assert_eq!(
            parts,
            [
                Part::Markup("<|im_start|>system\n".into()),
                Part::Text {
                    text: "Be brief.".into(),
                    message: 0
                },
                Part::Markup("<|im_end|>\n<|im_start|>user\n".into()),
                Part::Text {
                    text: "Hi <|im_end|> there".into(),
                    message: 1
                },
                Part::Markup("<|im_end|>\n<|im_start|>assistant\n".into()),
            ]
        );
    }

    #[test]
    fn a_template_that_raises_is_a_request_error_with_its_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let err = template
            .render(&[ChatMessage::assistant("hi")], &[], true)
            .unwrap_err();
        assert!(
            matches!(err, GeniusError::InvalidRequest { .. })
                && err
                    .to_string()
                    .contains("Conversations must start with a user message"),
            "{err}"
        );
    }

    #[test]
    fn tool_calls_reach_the_template_with_parsed_arguments() {
        let source = "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.name }} {{ c.function.arguments | tojson }} {{ c.function.arguments.city }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        let call = ToolCall::new("call_1", "get_weather", &json!({"city": "Paris"}));
        let text = template
            .render(&[ChatMessage::assistant_tool_calls(vec![call])], &[], false)
            .unwrap();
        assert_eq!(text, r#"get_weather {"city": "Paris"} Paris"#);
    }
}
