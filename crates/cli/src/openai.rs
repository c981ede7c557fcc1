//! The OpenAI HTTP API's request and response shapes, and how they map onto
//! the library's types.
//!
//! Requests are read leniently where the API is (unknown fields are
//! ignored, `stop` is a string or a list) and strictly where a wrong value
//! would silently change the answer (a field this server cannot honour,
//! a bad type).

use rusty_genius::core::chat::{ResponseFormat, Tool, ToolChoice};
use rusty_genius::core::protocol::{FinishReason, Usage};
use rusty_genius::core::{ChatMessage, InferenceConfig, Infill, Prompt, PromptFormat};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub(crate) sampling: Sampling,
    #[serde(default)]
    pub(crate) tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub(crate) tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub(crate) response_format: Option<ResponseFormat>,
    #[serde(default)]
    pub(crate) logprobs: Option<bool>,
    #[serde(default)]
    pub(crate) top_logprobs: Option<u8>,
    /// `false`: at most one tool call per answer (the first).
    #[serde(default)]
    pub(crate) parallel_tool_calls: Option<bool>,
    /// Where a thinking model's reasoning goes (llama-server's field).
    #[serde(default)]
    pub(crate) reasoning_format: ReasoningFormat,
}

/// `reasoning_format`: reasoning as `reasoning_content` (`auto`, the
/// default, or `deepseek`, as DeepSeek's API sends it), or left in
/// `content` within its `<think>` tags (`none`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReasoningFormat {
    #[default]
    Auto,
    Deepseek,
    None,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub(crate) model: String,
    pub(crate) prompt: PromptText,
    #[serde(flatten)]
    pub(crate) sampling: Sampling,
    #[serde(default)]
    pub(crate) echo: Option<bool>,
    /// The legacy API's `logprobs`: how many likeliest tokens to list.
    #[serde(default)]
    pub(crate) logprobs: Option<u8>,
    #[serde(default)]
    pub(crate) suffix: Option<String>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub(crate) struct EmbeddingRequest {
    pub(crate) model: String,
    pub(crate) input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32s).
    #[serde(default)]
    pub(crate) encoding_format: Option<String>,
    #[serde(default)]
    pub(crate) dimensions: Option<usize>,
    /// Not in the OpenAI API: the pooling for a generative model.
    #[serde(default)]
    pub(crate) pooling: Option<rusty_genius::core::Pooling>,
    /// Not in the OpenAI API: cut over-long texts instead of refusing them.
    #[serde(default)]
    pub(crate) truncate: bool,
}

/// What to embed: one string, one list of token ids (of the model's own
/// vocabulary), or a list of strings and token lists.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum EmbeddingInput {
    One(String),
    /// Texts and token lists, which may be mixed (first, so that `[]` is
    /// no inputs rather than one empty token list).
    Many(Vec<rusty_genius::core::EmbedInput>),
    Tokens(Vec<u32>),
}

impl EmbeddingRequest {
    /// Whether vectors go out as base64 text.
    pub(crate) fn base64(&self) -> Result<bool, Unsupported> {
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(false),
            Some("base64") => Ok(true),
            Some(other) => Err(Unsupported {
                param: "encoding_format",
                message: format!("encoding_format `{other}`: use float or base64"),
            }),
        }
    }

    pub(crate) fn embed(&self) -> rusty_genius::core::Embed {
        use rusty_genius::core::EmbedInput;
        let inputs: Vec<EmbedInput> = match &self.input {
            EmbeddingInput::One(text) => vec![text.into()],
            EmbeddingInput::Tokens(ids) => vec![ids.clone().into()],
            EmbeddingInput::Many(inputs) => inputs.clone(),
        };
        let mut embed = rusty_genius::core::Embed::new(inputs);
        embed.pooling = self.pooling;
        embed.truncate = self.truncate;
        embed.dimensions = self.dimensions;
        embed
    }
}

/// Standard base64 (with padding) of `vector`'s little-endian bytes.
pub(crate) fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::encode(bytes)
}

/// A completion prompt: one string, or a list holding exactly one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptText {
    One(String),
    Many(Vec<String>),
}

/// The settings both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Sampling {
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) temperature: Option<f32>,
    #[serde(default)]
    pub(crate) top_p: Option<f32>,
    #[serde(default)]
    pub(crate) seed: Option<i64>,
    #[serde(default)]
    pub(crate) stop: Option<Stop>,
    #[serde(default)]
    pub(crate) n: Option<u32>,
    #[serde(default)]
    pub(crate) frequency_penalty: Option<f32>,
    #[serde(default)]
    pub(crate) presence_penalty: Option<f32>,
    /// Token id (as a string, JSON's only key type) to bias.
    #[serde(default)]
    pub(crate) logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// Not in the OpenAI API, as llama-server and Ollama take them.
    #[serde(default)]
    pub(crate) top_k: Option<u32>,
    #[serde(default)]
    pub(crate) min_p: Option<f32>,
    #[serde(default, alias = "repetition_penalty")]
    pub(crate) repeat_penalty: Option<f32>,
    /// Fields of the API this server cannot honour: refused by name.
    #[serde(default)]
    pub(crate) audio: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) modalities: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) prediction: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) web_search_options: Option<serde_json::Value>,
}

/// `config` with a request's `temperature`: 0 means greedy decoding in
/// every API this server speaks (the library's greedy settings replace the
/// others).
pub(crate) fn with_temperature(
    config: InferenceConfig,
    temperature: Option<f32>,
) -> InferenceConfig {
    match temperature {
        Some(0.0) => InferenceConfig::greedy(),
        Some(temperature) => InferenceConfig {
            temperature,
            ..config
        },
        None => config,
    }
}

/// A request's 64-bit seed as the sampler's 32-bit one. Folding keeps
/// distinct small seeds distinct and the same seed the same.
pub(crate) fn fold_seed(seed: i64) -> u32 {
    (seed as u64 ^ (seed as u64 >> 32)) as u32
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A request the API accepts but this server cannot honour as asked: the
/// field and why (answered as a 400 naming the field).
#[derive(Debug)]
pub(crate) struct Unsupported {
    pub(crate) param: &'static str,
    pub(crate) message: String,
}

impl Sampling {
    pub(crate) fn streams(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }

    /// The library's settings for these. Fields left out keep the OpenAI
    /// API's meaning where it has one (no repetition penalty) and the
    /// library's sampling defaults otherwise.
    pub(crate) fn config(&self) -> Result<InferenceConfig, Unsupported> {
        let cannot = |param: &'static str, what: &str| {
            Err(Unsupported {
                param,
                message: format!("{what}; leave {param} out"),
            })
        };
        if self.audio.as_ref().is_some_and(|a| !a.is_null()) {
            return cannot("audio", "this server answers in text, not audio");
        }
        if let Some(other) = self.modalities.iter().flatten().find(|m| *m != "text") {
            return cannot(
                "modalities",
                &format!(
                    "this server answers in text only, not `{}`",
                    other.escape_debug()
                ),
            );
        }
        let prediction = match self.prediction.as_ref().filter(|p| !p.is_null()) {
            Some(prediction) => match prediction_text(prediction) {
                Ok(text) => Some(text),
                Err(why) => {
                    return Err(Unsupported {
                        param: "prediction",
                        message: why.into(),
                    })
                }
            },
            None => None,
        };
        if self
            .web_search_options
            .as_ref()
            .is_some_and(|w| !w.is_null())
        {
            return cannot("web_search_options", "this server does not search the web");
        }
        let mut config = InferenceConfig {
            repetition_penalty: 1.0,
            ..InferenceConfig::default()
        };
        config = with_temperature(config, self.temperature);
        config.prediction = prediction;
        if let Some(top_p) = self.top_p {
            config.top_p = top_p;
        }
        config.max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .map(|n| n as usize);
        config.seed = self.seed.map(fold_seed);
        config.stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(stop)) => vec![stop.clone()],
            Some(Stop::Many(stops)) => stops.clone(),
        };
        config.frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        config.presence_penalty = self.presence_penalty.unwrap_or(0.0);
        if let Some(top_k) = self.top_k {
            config.top_k = top_k;
        }
        if let Some(min_p) = self.min_p {
            config.min_p = min_p;
        }
        if let Some(penalty) = self.repeat_penalty {
            config.repetition_penalty = penalty;
        }
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let id = key.trim().parse::<u32>().map_err(|_| Unsupported {
                param: "logit_bias",
                message: format!(
                    "logit_bias keys are token ids (whole numbers from 0, as strings); `{}` is not one",
                    key.escape_debug()
                ),
            })?;
            config.logit_bias.insert(id, bias);
        }
        Ok(config)
    }
}

impl ChatRequest {
    pub(crate) fn config(&self) -> Result<InferenceConfig, Unsupported> {
        let mut config = self.sampling.config()?;
        config.tools = self.tools.clone().unwrap_or_default();
        if let Some(choice) = &self.tool_choice {
            config.tool_choice = choice.clone();
        }
        if let Some(format) = &self.response_format {
            config.response_format = format.clone();
        }
        if self.logprobs == Some(true) {
            config.logprobs = true;
            config.top_logprobs = self.top_logprobs.unwrap_or(0);
        } else if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(Unsupported {
                param: "top_logprobs",
                message: "top_logprobs needs logprobs set to true".into(),
            });
        }
        Ok(config)
    }
}

impl CompletionRequest {
    /// The prompt: a text to continue, or, with a `suffix`, the middle to
    /// fill in between the prompt and the suffix.
    pub(crate) fn prompt(&self) -> Result<Prompt, Unsupported> {
        let text = self.text()?;
        Ok(match self.suffix.as_deref() {
            Some(suffix) if !suffix.is_empty() => Prompt::Infill(Infill::new(text, suffix)),
            _ => Prompt::Text(text),
        })
    }

    fn text(&self) -> Result<String, Unsupported> {
        if self.echo == Some(true) {
            return Err(Unsupported {
                param: "echo",
                message: "echo is not supported".into(),
            });
        }
        match &self.prompt {
            PromptText::One(text) => Ok(text.clone()),
            PromptText::Many(texts) if texts.len() == 1 => Ok(texts[0].clone()),
            PromptText::Many(texts) => Err(Unsupported {
                param: "prompt",
                message: format!(
                    "{} prompts in one request: send one prompt per request",
                    texts.len()
                ),
            }),
        }
    }

    pub(crate) fn config(&self) -> Result<InferenceConfig, Unsupported> {
        // A completion continues the text exactly as given.
        let mut config = self
            .sampling
            .config()?
            .with_prompt_format(PromptFormat::Raw);
        if let Some(top) = self.logprobs {
            config = config.with_logprobs(top);
        }
        // The API's default for completions is 16 tokens.
        if config.max_tokens.is_none() {
            config.max_tokens = Some(16);
        }
        Ok(config)
    }
}

/// The API's name for why a generation ended.
pub(crate) fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        FinishReason::ToolCalls => "tool_calls",
        _ => "stop",
    }
}

/// The API's `usage` object. The prediction counts are those of every
/// guess ahead (the prediction's and the engine's own): kept, or thrown
/// away.
pub(crate) fn usage(usage: &Usage) -> UsageOut {
    UsageOut {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.generated_tokens,
        total_tokens: usage.prompt_tokens + usage.generated_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: usage.cached_tokens,
        },
        completion_tokens_details: CompletionDetails {
            accepted_prediction_tokens: usage.accepted_draft_tokens,
            rejected_prediction_tokens: usage.draft_tokens - usage.accepted_draft_tokens,
        },
    }
}

/// The API's `usage` object.
#[derive(Debug, Serialize)]
pub(crate) struct UsageOut {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Debug, Serialize)]
struct PromptDetails {
    cached_tokens: usize,
}

#[derive(Debug, Serialize)]
struct CompletionDetails {
    accepted_prediction_tokens: usize,
    rejected_prediction_tokens: usize,
}

/// llama.cpp's server's `timings` object (its web page and tools read
/// it): what the prompt and the answer took, and the guesses ahead.
pub(crate) fn timings(usage: &Usage) -> Timings {
    let rate = |tokens: usize, ms: f64| {
        if ms > 0.0 {
            tokens as f64 * 1000.0 / ms
        } else {
            0.0
        }
    };
    let decoded = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
    Timings {
        cache_n: usage.cached_tokens,
        prompt_n: decoded,
        prompt_ms: usage.prompt_ms,
        prompt_per_second: rate(decoded, usage.prompt_ms),
        predicted_n: usage.generated_tokens,
        predicted_ms: usage.generation_ms,
        predicted_per_second: rate(usage.generated_tokens, usage.generation_ms),
        draft_n: usage.draft_tokens,
        draft_n_accepted: usage.accepted_draft_tokens,
    }
}

/// llama.cpp's server's `timings` object.
#[derive(Debug, Serialize)]
pub(crate) struct Timings {
    cache_n: usize,
    prompt_n: usize,
    prompt_ms: f64,
    prompt_per_second: f64,
    predicted_n: usize,
    predicted_ms: f64,
    predicted_per_second: f64,
    draft_n: usize,
    draft_n_accepted: usize,
}

/// The text of a `prediction` (Predicted Outputs): `{"type": "content",
/// "content": text}`, the content a string or a list of text parts.
fn prediction_text(prediction: &Value) -> Result<String, &'static str> {
    const SHAPE: &str = r#"must be {"type": "content", "content": a string or a list of {"type": "text", "text": a string}}"#;
    let object = prediction.as_object().ok_or(SHAPE)?;
    if object.get("type").and_then(Value::as_str) != Some("content")
        || object.keys().any(|key| key != "type" && key != "content")
    {
        return Err(SHAPE);
    }
    match object.get("content") {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |part| match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(text))) => Ok(text.as_str()),
                    _ => Err(SHAPE),
                },
            )
            .collect(),
        _ => Err(SHAPE),
    }
}

/// What the request's untagged fields must be, in words, by the name
/// serde gives their type (its own message names only the type).
const UNTAGGED: &[(&str, &str)] = &[
    (
        "EmbeddingInput",
        "must be a string, a list of strings, a list of token ids (whole numbers from 0) or a list of such lists",
    ),
    ("PromptText", "must be a string or a list of strings"),
    ("Stop", "must be a string or a list of strings"),
    ("Content", "must be a string, null or a list of text parts"),
];

/// A body that does not parse, in words: which field (`param`, as a
/// JSON path such as `messages[0].content`) and what is wrong with it,
/// without serde's type names or positions.
pub(crate) fn body_error(path: &str, message: &str) -> String {
    let message = match message.rfind(" at line ") {
        Some(at) if message[at..].contains(" column ") => &message[..at],
        _ => message,
    };
    if let Some(name) = message.strip_prefix("data did not match any variant of untagged enum ") {
        let words = UNTAGGED
            .iter()
            .find(|(enum_name, _)| *enum_name == name.trim())
            .map_or("has a value of the wrong type", |(_, words)| words);
        return format!("`{path}` {words}");
    }
    if path.is_empty() || path == "." {
        return message.to_owned();
    }
    format!("`{path}`: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_the_field_in_words() {
        assert_eq!(
            body_error("input", "data did not match any variant of untagged enum EmbeddingInput at line 1 column 30"),
            "`input` must be a string, a list of strings, a list of token ids (whole numbers from 0) or a list of such lists"
        );
        assert_eq!(
            body_error(
                "temperature",
                "invalid type: string \"hot\", expected f32 at line 1 column 9"
            ),
            "`temperature`: invalid type: string \"hot\", expected f32"
        );
        assert_eq!(
            body_error(".", "missing field `model`"),
            "missing field `model`"
        );
    }

    #[test]
    fn base64_matches_the_standard_encoding() {
        // 1.0f32 is 00 00 80 3f; two of them are 8 bytes.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, 1.0]), "AACAPwAAgD8=");
        assert_eq!(base64_f32(&[]), "");
        // Three bytes short of a multiple: 12 bytes make 16 characters.
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]).len(), 16);
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
    /// The request's `X-Request-Id`, to find its log lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request_id: Option<String>,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Serialize)]
pub(crate) struct ErrorDetail {
    pub(crate) message: String,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
}
