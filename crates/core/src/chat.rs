//! Conversations: messages, tools, tool calls and structured output.
//!
//! Field names and JSON shapes are those of the OpenAI chat API, so that a
//! request body maps onto these types one to one: a `messages` array is a
//! `Vec<ChatMessage>`, and `tools`, `tool_choice` and `response_format` are
//! fields of [`InferenceConfig`](crate::InferenceConfig).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::GeniusError;

/// What the model is asked to answer: one prompt, or a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// A single text, as in `BrainstemInput::Infer`.
    Text(String),
    /// A conversation, as in `BrainstemInput::Chat`.
    Chat(Vec<ChatMessage>),
    /// Texts to embed, as in `BrainstemInput::Embed`: answered with one
    /// [`InferenceEvent::Embeddings`](crate::protocol::InferenceEvent::Embeddings)
    /// rather than generated text.
    Embed(crate::Embed),
    /// The text between a prefix and a suffix (fill-in-the-middle, code
    /// completion), in the model's own layout for it.
    Infill(crate::Infill),
    /// A question about the model's tokens or template, answered with one
    /// [`InferenceEvent::Tokens`](crate::protocol::InferenceEvent::Tokens)
    /// and nothing generated.
    Tokens(TokenQuery),
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<Vec<ChatMessage>> for Prompt {
    fn from(messages: Vec<ChatMessage>) -> Self {
        Self::Chat(messages)
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions for the model (OpenAI's `developer` is read as this).
    System,
    /// The person (or program) talking to the model.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
    /// Any other role: refused when the request is checked, with the name.
    Other(String),
}

impl Role {
    /// The role's name as templates and the OpenAI API spell it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
            Self::Other(name) => name,
        }
    }
}

impl From<&str> for Role {
    fn from(name: &str) -> Self {
        match name {
            "system" | "developer" => Self::System,
            "user" => Self::User,
            "assistant" => Self::Assistant,
            "tool" => Self::Tool,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(Self::from(name.as_str()))
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Its text. `None` for an assistant message that only calls tools.
    /// In JSON also accepted as an array of `{"type": "text", "text": ...}`
    /// parts, which are joined.
    #[serde(
        default,
        deserialize_with = "content_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub content: Option<String>,
    /// The tools an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a `tool` message, the tool's name; otherwise an optional name of
    /// the participant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(content.into()),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message with text.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// An assistant message that calls tools (what the model answered with
    /// [`InferenceEvent::ToolCall`](crate::protocol::InferenceEvent::ToolCall)s).
    pub fn assistant_tool_calls(calls: Vec<ToolCall>) -> Self {
        Self {
            role: Role::Assistant,
            content: None,
            tool_calls: calls,
            tool_call_id: None,
            name: None,
        }
    }

    /// The result of the tool call `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// Accepts `"text"`, `null` or `[{"type": "text", "text": "..."}, ...]`.
fn content_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: Option<String>,
    }
    match Option::<Content>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Content::Text(text)) => Ok(Some(text)),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(piece)) => text.push_str(&piece),
                    (kind, _) => {
                        return Err(D::Error::custom(format!(
                            "content parts of type `{kind}` are not supported; send text"
                        )))
                    }
                }
            }
            Ok(Some(text))
        }
    }
}

/// The kind of a tool or tool call; functions are the only kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolKind {
    /// A function with JSON arguments.
    #[default]
    Function,
}

/// A tool call in an assistant message, as the OpenAI API writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id; the tool result names it in `tool_call_id`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: ToolKind,
    /// Which function, with which arguments.
    pub function: FunctionCall,
}

impl ToolCall {
    /// A call of `name` with `arguments` (a JSON object).
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: &Value) -> Self {
        Self {
            id: id.into(),
            kind: ToolKind::Function,
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.to_string(),
            },
        }
    }
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text (the OpenAI API's convention).
    pub arguments: String,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: ToolKind,
    /// The function.
    pub function: FunctionDefinition,
}

impl Tool {
    /// A function tool taking arguments described by the JSON schema
    /// `parameters` (an object schema).
    pub fn function(
        name: impl Into<String>,
        description: impl Into<String>,
        parameters: Value,
    ) -> Self {
        Self {
            kind: ToolKind::Function,
            function: FunctionDefinition {
                name: name.into(),
                description: Some(description.into()),
                parameters,
                strict: None,
            },
        }
    }
}

/// A function's name, purpose and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    /// Its name: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of type `object` for its arguments.
    #[serde(default = "empty_object_schema")]
    pub parameters: Value,
    /// Accepted for compatibility; arguments are always held to the schema
    /// when the call is required or named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

fn empty_object_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (the default).
    #[default]
    Auto,
    /// The model must not call a tool; the tools are not shown to it.
    None,
    /// The model must call one or more of the tools; its output is held
    /// to the call syntax and the tools' parameter schemas.
    Required,
    /// The model must call this function, with arguments held to its
    /// schema.
    Function(String),
}

impl Serialize for ToolChoice {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => serializer.serialize_str("auto"),
            Self::None => serializer.serialize_str("none"),
            Self::Required => serializer.serialize_str("required"),
            Self::Function(name) => {
                serde_json::json!({"type": "function", "function": {"name": name}})
                    .serialize(serializer)
            }
        }
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match &value {
            Value::String(word) => match word.as_str() {
                "auto" => Ok(Self::Auto),
                "none" => Ok(Self::None),
                "required" => Ok(Self::Required),
                other => Err(D::Error::custom(format!(
                    "unknown tool_choice `{other}`: use auto, none, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                ))),
            },
            Value::Object(_) => value
                .pointer("/function/name")
                .and_then(Value::as_str)
                .map(|name| Self::Function(name.to_owned()))
                .ok_or_else(|| D::Error::custom("tool_choice object needs function.name")),
            _ => Err(D::Error::custom(
                "tool_choice must be a string or a function object",
            )),
        }
    }
}

/// The form the answer must take.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
    /// Text that a llama.cpp GBNF grammar accepts (rule `root`); an
    /// extension of the OpenAI API, as in llama.cpp's server.
    Grammar {
        /// The grammar.
        grammar: String,
    },
}

impl ResponseFormat {
    /// JSON that validates against `schema`.
    pub fn json_schema(name: impl Into<String>, schema: Value) -> Self {
        Self::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: name.into(),
                description: None,
                schema,
                strict: None,
            },
        }
    }
}

/// A named JSON schema, as in OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name.
    pub name: String,
    /// What the answer is, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema.
    #[serde(default = "any_object_schema")]
    pub schema: Value,
    /// Accepted for compatibility; the schema is always enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

fn any_object_schema() -> Value {
    serde_json::json!({"type": "object"})
}

/// Checks a conversation before it reaches a template: every role known,
/// every tool result answering an earlier call, text where text is needed.
pub fn validate_messages(messages: &[ChatMessage]) -> Result<(), GeniusError> {
    if messages.is_empty() {
        return Err(GeniusError::invalid_request(
            "messages",
            "the conversation is empty: send at least one message",
        ));
    }
    let mut calls: Vec<&str> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].{field}");
        match &message.role {
            Role::Other(name) => {
                return Err(GeniusError::invalid_request(
                    at("role"),
                    format!("unknown role `{name}`: use system, user, assistant or tool"),
                ))
            }
            Role::System | Role::User if message.content.is_none() => {
                return Err(GeniusError::invalid_request(
                    at("content"),
                    "a system or user message needs content",
                ))
            }
            Role::Assistant if message.content.is_none() && message.tool_calls.is_empty() => {
                return Err(GeniusError::invalid_request(
                    at("content"),
                    "an assistant message needs content or tool_calls",
                ))
            }
            Role::Tool => {
                let Some(id) = message.tool_call_id.as_deref() else {
                    return Err(GeniusError::invalid_request(
                        at("tool_call_id"),
                        "a tool message must name the call it answers",
                    ));
                };
                if !calls.contains(&id) {
                    return Err(GeniusError::invalid_request(
                        at("tool_call_id"),
                        format!("no earlier assistant message made a tool call with id `{id}`"),
                    ));
                }
                if message.content.is_none() {
                    return Err(GeniusError::invalid_request(
                        at("content"),
                        "a tool message needs the tool's result as content",
                    ));
                }
            }
            _ => {}
        }
        for (j, call) in message.tool_calls.iter().enumerate() {
            if message.role != Role::Assistant {
                return Err(GeniusError::invalid_request(
                    at("tool_calls"),
                    "only assistant messages make tool calls",
                ));
            }
            if serde_json::from_str::<Value>(&call.function.arguments).is_err() {
                return Err(GeniusError::invalid_request(
                    format!("messages[{i}].tool_calls[{j}].function.arguments"),
                    "must be JSON text",
                ));
            }
            calls.push(&call.id);
        }
    }
    Ok(())
}

/// Checks `tools` and `tool_choice` together.
pub(crate) fn validate_tools(tools: &[Tool], choice: &ToolChoice) -> Result<(), GeniusError> {
    for (i, tool) in tools.iter().enumerate() {
        let name = &tool.function.name;
        let good_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !good_name {
            return Err(GeniusError::invalid_request(
                format!("tools[{i}].function.name"),
                format!("`{name}` must be 1 to 64 letters, digits, `_` or `-`"),
            ));
        }
        if tools[..i].iter().any(|other| other.function.name == *name) {
            return Err(GeniusError::invalid_request(
                format!("tools[{i}].function.name"),
                format!("two tools are named `{name}`"),
            ));
        }
        let parameters = &tool.function.parameters;
        let is_object_schema = parameters.as_object().is_some_and(|schema| {
            schema.get("type").is_none_or(|kind| kind == "object")
                && schema.get("properties").is_none_or(Value::is_object)
        });
        if !is_object_schema {
            return Err(GeniusError::invalid_request(
                format!("tools[{i}].function.parameters"),
                "must be a JSON schema of type `object` (arguments are named)",
            ));
        }
    }
    match choice {
        ToolChoice::Required if tools.is_empty() => Err(GeniusError::invalid_request(
            "tool_choice",
            "`required` needs at least one tool in `tools`",
        )),
        ToolChoice::Function(name) if !tools.iter().any(|t| t.function.name == *name) => {
            Err(GeniusError::invalid_request(
                "tool_choice",
                format!("names `{name}`, which is not one of the tools"),
            ))
        }
        _ => Ok(()),
    }
}

// ---- questions about tokens ----------------------------------------------
//
// What llama.cpp's server answers at `/tokenize`, `/detokenize` and
// `/apply-template`; `crate::tokens` names them.

/// A question about a model's tokens or template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenQuery {
    /// The tokens of `content`: texts tokenized, token ids as they are,
    /// in order. `add_special` adds the model's start token (and end
    /// token, where its vocabulary adds one) around the first text, when
    /// the content starts with a text; `parse_special` reads the model's
    /// special tokens written out in a text (`<|im_start|>`) as those
    /// tokens rather than as plain text.
    Tokenize {
        /// Texts and token ids, in order.
        content: Vec<TextOrToken>,
        /// Add the model's start (and end) tokens around a leading text.
        add_special: bool,
        /// Read special tokens written out in a text as those tokens.
        parse_special: bool,
    },
    /// The bytes of these tokens, one after another, special tokens
    /// written out.
    Detokenize {
        /// The token ids.
        tokens: Vec<u32>,
    },
    /// The prompt a conversation renders to in the model's chat template,
    /// with the request's tools, ready for the model's answer.
    Render {
        /// The conversation.
        messages: Vec<ChatMessage>,
    },
}

/// A part of the content to tokenize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TextOrToken {
    /// A text, to tokenize.
    Text(String),
    /// A token id, as it is.
    Token(u32),
}

/// The answer to a [`TokenQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAnswer {
    /// Each token and its piece (the bytes it stands for; a piece may be
    /// part of a character).
    Tokens(Vec<TokenPiece>),
    /// A text: the detokenized bytes (as UTF-8, any invalid sequence
    /// replaced), or the rendered prompt.
    Text(String),
}

/// A token and the bytes it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPiece {
    /// Its id in the model's vocabulary.
    pub id: u32,
    /// Its bytes (special tokens written out).
    pub piece: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openai_request_bodies_map_onto_the_types() {
        let messages: Vec<ChatMessage> = serde_json::from_value(json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}
        ]))
        .unwrap();
        assert_eq!(messages[0].role, Role::System);
        assert_eq!(messages[1].content.as_deref(), Some("Weather in Paris?"));
        assert_eq!(messages[2].tool_calls[0].function.name, "get_weather");
        assert!(validate_messages(&messages).is_ok());
        let back = serde_json::to_value(&messages[2]).unwrap();
        assert_eq!(back["tool_calls"][0]["type"], "function");

        let choice: ToolChoice =
            serde_json::from_value(json!({"type": "function", "function": {"name": "f"}})).unwrap();
        assert_eq!(choice, ToolChoice::Function("f".into()));
        assert_eq!(
            serde_json::from_value::<ToolChoice>(json!("required")).unwrap(),
            ToolChoice::Required
        );
        assert_eq!(
            serde_json::to_value(&choice).unwrap()["function"]["name"],
            "f"
        );

        let format: ResponseFormat = serde_json::from_value(json!({
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": {"type": "object"}, "strict": true}
        }))
        .unwrap();
        assert!(matches!(format, ResponseFormat::JsonSchema { .. }));
    }

    #[test]
    fn bad_conversations_name_the_message_and_field() {
        let unknown = vec![ChatMessage {
            role: Role::from("wizard"),
            ..ChatMessage::user("hi")
        }];
        let err = validate_messages(&unknown).unwrap_err();
        assert!(err.to_string().contains("messages[0].role"), "{err}");
        assert!(err.to_string().contains("wizard"), "{err}");

        let orphan = vec![ChatMessage::user("hi"), ChatMessage::tool("call_9", "42")];
        let err = validate_messages(&orphan).unwrap_err();
        assert!(
            err.to_string().contains("messages[1].tool_call_id"),
            "{err}"
        );
        assert!(validate_messages(&[]).is_err());
    }

    #[test]
    fn tools_need_object_schemas_and_a_choice_among_them() {
        let weather = Tool::function(
            "get_weather",
            "Weather in a city",
            json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        );
        assert!(validate_tools(std::slice::from_ref(&weather), &ToolChoice::Required).is_ok());
        let bad = Tool::function("f", "", json!({"type": "string"}));
        let err = validate_tools(&[bad], &ToolChoice::Auto).unwrap_err();
        assert!(
            err.to_string().contains("tools[0].function.parameters"),
            "{err}"
        );
        let err = validate_tools(&[weather], &ToolChoice::Function("nope".into())).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(validate_tools(&[], &ToolChoice::Required).is_err());
    }
}
