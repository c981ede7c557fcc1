//! Bounds on what one request may ask of the engine, checked before any
//! work starts.
//!
//! A grammar, a schema or a list of texts to embed costs engine time that
//! every other request waits through, and some shapes (a grammar nested
//! thousands of levels deep) would take the whole process down inside
//! llama.cpp. [`Limits`] names each bound; a request over one is refused
//! with [`GeniusError::LimitExceeded`], which says which limit, the value
//! and the bound.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::{Prompt, ResponseFormat, ToolChoice};
use crate::{GeniusError, InferenceConfig};

/// The most one request may ask for. The defaults are generous for real
/// use (a large tool schema, a 1000-value enum, 2048 texts to embed) and
/// keep the heaviest admitted request from holding the engine for long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Bytes of a GBNF grammar (`ResponseFormat::Grammar`). Default 32 KiB.
    pub grammar_bytes: usize,
    /// How deeply a grammar's parentheses may nest. llama.cpp parses
    /// groups recursively, so this bounds its stack. Default 64.
    pub grammar_depth: usize,
    /// Bytes of every JSON schema a request's answer is held to (the
    /// response format's, and the parameters of the tools it must call),
    /// as compact JSON. llama.cpp's converter takes time that grows faster
    /// than the schema (measured on one machine: 13 KB of optional
    /// properties 5 ms, 27 KB 39 ms, 54 KB 143 ms, 100 KB 875 ms), all of
    /// it on the engine thread. Default 32 KiB.
    pub schema_bytes: usize,
    /// How deeply a schema's JSON objects and arrays may nest (a
    /// property of a property is two levels down). Default 64.
    pub schema_depth: usize,
    /// Values of one `enum` in a schema the answer is held to. Default
    /// 1000.
    pub enum_values: usize,
    /// Tools offered in one request. Default 128.
    pub tools: usize,
    /// Stop sequences of one request. Default 16.
    pub stop_sequences: usize,
    /// Bytes of each stop sequence. Default 256.
    pub stop_bytes: usize,
    /// Texts in one `Embed` request. Default 2048.
    pub embed_inputs: usize,
    /// Tokens of all texts of one `Embed` request together (after any
    /// truncation). Default 300,000.
    pub embed_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            grammar_bytes: 32 * 1024,
            grammar_depth: 64,
            schema_bytes: 32 * 1024,
            schema_depth: 64,
            enum_values: 1000,
            tools: 128,
            stop_sequences: 16,
            stop_bytes: 256,
            embed_inputs: 2048,
            embed_tokens: 300_000,
        }
    }
}

impl Limits {
    /// No bound at all: for trusted callers only (a request can then hold
    /// the engine as long as it likes, or crash it with a deep grammar).
    pub fn unlimited() -> Self {
        Self {
            grammar_bytes: usize::MAX,
            grammar_depth: usize::MAX,
            schema_bytes: usize::MAX,
            schema_depth: usize::MAX,
            enum_values: usize::MAX,
            tools: usize::MAX,
            stop_sequences: usize::MAX,
            stop_bytes: usize::MAX,
            embed_inputs: usize::MAX,
            embed_tokens: usize::MAX,
        }
    }

    /// Checks what a request asks for against these limits, before any
    /// of it runs; the error names the first limit it passes.
    pub fn check(&self, prompt: &Prompt, config: &InferenceConfig) -> Result<(), GeniusError> {
        if let Prompt::Embed(embed) = prompt {
            over(
                "texts to embed",
                "embed_inputs",
                embed.inputs.len(),
                self.embed_inputs,
            )?;
        }
        over(
            "stop sequences",
            "stop_sequences",
            config.stop.len(),
            self.stop_sequences,
        )?;
        if let Some(longest) = config.stop.iter().map(String::len).max() {
            over(
                "bytes in a stop sequence",
                "stop_bytes",
                longest,
                self.stop_bytes,
            )?;
        }
        over("tools", "tools", config.tools.len(), self.tools)?;
        // Only schemas the answer is held to are converted to grammars; the
        // tools a model may call freely are only shown to it (their cost is
        // prompt tokens, which the context bounds).
        let mut schema_bytes = 0;
        for (i, tool) in config.tools.iter().enumerate() {
            let held = match &config.tool_choice {
                ToolChoice::Required => true,
                ToolChoice::Function(name) => tool.function.name == *name,
                ToolChoice::Auto | ToolChoice::None => false,
            };
            if held {
                let what = format!("tools[{i}].function.parameters");
                schema_bytes += self.check_schema(&what, &tool.function.parameters)?;
            }
        }
        match &config.response_format {
            ResponseFormat::JsonSchema { json_schema } => {
                schema_bytes +=
                    self.check_schema("response_format.json_schema.schema", &json_schema.schema)?;
            }
            ResponseFormat::Grammar { grammar } => {
                // Depth first: it is what would crash llama.cpp's parser.
                over(
                    "levels of nested parentheses in the grammar (response_format.grammar)",
                    "grammar_depth",
                    grammar_depth(grammar),
                    self.grammar_depth,
                )?;
                over(
                    "bytes in the grammar (response_format.grammar)",
                    "grammar_bytes",
                    grammar.len(),
                    self.grammar_bytes,
                )?;
            }
            ResponseFormat::Text | ResponseFormat::JsonObject => {}
        }
        over(
            "bytes of JSON schema (response_format and tools together)",
            "schema_bytes",
            schema_bytes,
            self.schema_bytes,
        )
    }

    /// Checks one schema's depth and enums; its size in bytes.
    fn check_schema(&self, what: &str, schema: &Value) -> Result<usize, GeniusError> {
        let shape = Shape::of(schema);
        over(
            &format!("levels of nesting in {what}"),
            "schema_depth",
            shape.depth,
            self.schema_depth,
        )?;
        over(
            &format!("values in one enum of {what}"),
            "enum_values",
            shape.largest_enum,
            self.enum_values,
        )?;
        Ok(shape.bytes)
    }

    /// Checks the tokens of an `Embed` request, once they are counted.
    pub fn check_embed_tokens(&self, tokens: usize) -> Result<(), GeniusError> {
        over(
            "tokens in the texts to embed",
            "embed_tokens",
            tokens,
            self.embed_tokens,
        )
    }
}

fn over(what: &str, limit: &'static str, value: usize, max: usize) -> Result<(), GeniusError> {
    if value > max {
        Err(GeniusError::LimitExceeded {
            what: what.to_owned(),
            limit,
            value,
            max,
        })
    } else {
        Ok(())
    }
}

/// What a JSON value costs to convert: its size as compact JSON, its
/// depth, and its largest `enum`.
struct Shape {
    bytes: usize,
    depth: usize,
    largest_enum: usize,
}

impl Shape {
    fn of(value: &Value) -> Self {
        let mut shape = Shape {
            bytes: 0,
            depth: 0,
            largest_enum: 0,
        };
        // Iterative, so that the walk itself needs no deep stack.
        let mut stack = vec![(value, 1usize)];
        while let Some((value, depth)) = stack.pop() {
            match value {
                Value::Object(map) => {
                    shape.depth = shape.depth.max(depth);
                    shape.bytes += 2 + map.len().saturating_sub(1);
                    for (key, child) in map {
                        shape.bytes += key.len() + 3;
                        if key == "enum" {
                            if let Value::Array(values) = child {
                                shape.largest_enum = shape.largest_enum.max(values.len());
                            }
                        }
                        stack.push((child, depth + 1));
                    }
                }
                Value::Array(items) => {
                    shape.depth = shape.depth.max(depth);
                    shape.bytes += 2 + items.len().saturating_sub(1);
                    stack.extend(items.iter().map(|item| (item, depth + 1)));
                }
                Value::String(text) => shape.bytes += text.len() + 2,
                other => shape.bytes += other.to_string().len(),
            }
        }
        shape
    }
}

/// How deeply the parentheses of a GBNF grammar nest, outside its string
/// literals, character classes and comments.
pub fn grammar_depth(grammar: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut bytes = grammar.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b')' => depth = depth.saturating_sub(1),
            b'"' | b'[' => {
                let close = if byte == b'"' { b'"' } else { b']' };
                while let Some(inner) = bytes.next() {
                    if inner == b'\\' {
                        bytes.next();
                    } else if inner == close {
                        break;
                    }
                }
            }
            b'#' => {
                for inner in bytes.by_ref() {
                    if inner == b'\n' || inner == b'\r' {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Tool;
    use serde_json::json;

    fn grammar(text: &str) -> InferenceConfig {
        InferenceConfig::default().with_response_format(ResponseFormat::Grammar {
            grammar: text.to_owned(),
        })
    }

    #[test]
    fn grammar_depth_counts_groups_but_not_quoted_brackets_or_comments() {
        assert_eq!(grammar_depth(r#"root ::= "a""#), 0);
        assert_eq!(grammar_depth(r#"root ::= ("a" ("b" | "c"))*"#), 2);
        assert_eq!(grammar_depth(r#"root ::= "((((" [(((] "\"(((""#), 0);
        assert_eq!(grammar_depth("# (((((\nroot ::= (\"a\")"), 1);
        assert_eq!(grammar_depth(r#"root ::= [\]((] ("x")"#), 1);
        let nested = format!("root ::= {}\"a\"{}", "(".repeat(5000), ")".repeat(5000));
        assert_eq!(grammar_depth(&nested), 5000);
    }

    #[test]
    fn a_deep_grammar_is_refused_naming_the_limit_and_the_value() {
        let limits = Limits::default();
        let nested = format!("root ::= {}\"a\"{}", "(".repeat(5000), ")".repeat(5000));
        let err = limits
            .check(&Prompt::from("hi"), &grammar(&nested))
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("grammar_depth"), "{message}");
        assert!(message.contains("5000"), "{message}");
        assert!(message.contains("64"), "{message}");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidRequest);
        let shallow = format!("root ::= {}\"a\"{}", "(".repeat(64), ")".repeat(64));
        assert!(limits
            .check(&Prompt::from("hi"), &grammar(&shallow))
            .is_ok());
    }

    #[test]
    fn schemas_are_measured_together_and_enums_one_by_one() {
        let limits = Limits {
            schema_bytes: 200,
            enum_values: 3,
            ..Limits::default()
        };
        let small = json!({"type": "object", "properties": {"a": {"enum": ["x", "y", "z"]}}});
        let config = InferenceConfig::default()
            .with_tools(vec![Tool::function("f", "", small.clone())])
            .with_tool_choice(ToolChoice::Required);
        assert!(limits.check(&Prompt::from("hi"), &config).is_ok());
        assert_eq!(Shape::of(&small).bytes, small.to_string().len());
        let big = json!({"type": "object", "properties": {"a": {"enum": ["w", "x", "y", "z"]}}});
        let err = limits
            .check(
                &Prompt::from("hi"),
                &InferenceConfig::default()
                    .with_tools(vec![Tool::function("f", "", big.clone())])
                    .with_tool_choice(ToolChoice::Required),
            )
            .unwrap_err();
        assert!(err.to_string().contains("enum_values"), "{err}");
        let tools = (0..10)
            .map(|i| Tool::function(format!("f{i}"), "", small.clone()))
            .collect();
        let err = limits
            .check(
                &Prompt::from("hi"),
                &InferenceConfig::default()
                    .with_tools(tools)
                    .with_tool_choice(ToolChoice::Required),
            )
            .unwrap_err();
        assert!(err.to_string().contains("schema_bytes"), "{err}");
        // A tool the model may call freely is only shown to it.
        let free = InferenceConfig::default().with_tools(vec![Tool::function("f", "", big)]);
        assert!(limits.check(&Prompt::from("hi"), &free).is_ok());
    }

    #[test]
    fn schema_depth_is_measured_without_recursion() {
        let mut deep = json!({"type": "string"});
        for _ in 0..1000 {
            deep = json!({"type": "array", "items": deep});
        }
        assert_eq!(Shape::of(&deep).depth, 1001);
    }

    #[test]
    fn embed_requests_are_bounded_in_texts_and_tokens() {
        let limits = Limits {
            embed_inputs: 2,
            ..Limits::default()
        };
        let embed = Prompt::Embed(crate::Embed::new(["a", "b", "c"]));
        let err = limits
            .check(&embed, &InferenceConfig::default())
            .unwrap_err();
        assert!(err.to_string().contains("embed_inputs"), "{err}");
        assert!(Limits::default().check_embed_tokens(300_000).is_ok());
        let err = Limits::default().check_embed_tokens(300_001).unwrap_err();
        assert!(err.to_string().contains("300001"), "{err}");
    }
}
