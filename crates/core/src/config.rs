//! Sampling and stopping settings for one inference request.

use serde::{Deserialize, Serialize};

use crate::chat::{ResponseFormat, Tool, ToolChoice};

/// The most alternatives [`InferenceConfig::top_logprobs`] may ask for.
const MAX_TOP_LOGPROBS: u8 = 20;

/// How one `Infer` request samples tokens and when it stops.
///
/// Missing fields take their default when deserialising, so `{}` or
/// `{"temperature": 0}` are complete configurations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InferenceConfig {
    /// Softmax temperature. `0.0` means greedy decoding: always the most
    /// likely token, fully deterministic. Default `0.7`.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// adds up to `top_p`. `1.0` disables it. Default `0.9`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens. `0` disables it. Default `40`.
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` times the most likely one.
    /// `0.0` disables it. Default `0.05`.
    pub min_p: f32,
    /// Penalty applied to tokens already present in the recent context
    /// (the last 64 tokens). `1.0` disables it. Default `1.1`.
    pub repetition_penalty: f32,
    /// Lowers each token's logit by this times the number of times it was
    /// generated so far in this answer (OpenAI's `frequency_penalty`),
    /// -2 to 2; negative values favour repeats. Default `0.0`.
    pub frequency_penalty: f32,
    /// Lowers the logit of every token generated so far in this answer by
    /// this, once (OpenAI's `presence_penalty`), -2 to 2. Default `0.0`.
    pub presence_penalty: f32,
    /// Added to the logits of these token ids (of the model's own
    /// vocabulary) at every step, -100 to 100: -100 all but bans a
    /// token, 100 all but forces it (OpenAI's `logit_bias`). Default:
    /// none.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub logit_bias: std::collections::BTreeMap<u32, f32>,
    /// Upper bound on generated tokens. `None` generates until the model
    /// ends its answer or the context window is full. Default `None`.
    pub max_tokens: Option<usize>,
    /// Seed of the random sampler. With the same seed, prompt, model and
    /// settings the output is reproduced exactly. `None` picks a fresh seed
    /// for every request. Default `None`.
    pub seed: Option<u32>,
    /// Generation ends as soon as the output contains one of these strings;
    /// the stop string itself is not emitted. Default: none.
    pub stop: Vec<String>,
    /// Whether the prompt is wrapped in the model's chat template. Default
    /// [`PromptFormat::Auto`].
    pub prompt_format: PromptFormat,
    /// Report each generated token's log-probability as an
    /// [`InferenceEvent::Logprobs`](crate::protocol::InferenceEvent::Logprobs).
    /// Default `false`.
    pub logprobs: bool,
    /// With `logprobs`, also report this many most likely tokens at each
    /// place (0 to 20). Default 0.
    pub top_logprobs: u8,
    /// Tools the model may call (chat requests). Default: none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// Whether and which tool the model must call. Default
    /// [`ToolChoice::Auto`].
    pub tool_choice: ToolChoice,
    /// Whether an answer that is nothing but JSON calling one of
    /// [`tools`](Self::tools) (`{"name": ..., "arguments": {...}}`, a list
    /// of such objects, or either in a ```` ```json ```` fence), with
    /// arguments valid against the tool's schema, counts as tool calls
    /// when the model leaves out its template's call markup, as small
    /// models often do. Anything else stays content. Such an answer
    /// streams only once it is complete. Default `true`.
    pub json_tool_calls: bool,
    /// The form of the answer: free text, JSON, JSON following a schema,
    /// or a grammar. Default [`ResponseFormat::Text`].
    pub response_format: ResponseFormat,
    /// The model to answer with, by the name it was loaded or is resolved
    /// by (a path, registry name or HuggingFace id). A model that is not
    /// loaded yet is loaded first. `None`: the model of the last
    /// `LoadModel`. Default `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How long the model stays loaded once it is idle, from this request
    /// on, in place of the Orchestrator's `CortexStrategy` (as Ollama's
    /// `keep_alive`): zero unloads it as soon as it is idle,
    /// [`Duration::MAX`](std::time::Duration::MAX) keeps it until it is
    /// evicted or unloaded. Default `None`: the strategy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<std::time::Duration>,
    /// Whether the engine guesses tokens ahead and checks several in one
    /// step (speculative decoding). The answer is the same either way:
    /// only its speed changes. Default [`Speculative::Auto`].
    pub speculative: Speculative,
    /// Text the answer is expected to repeat for the most part, such as
    /// the file an edit request is about (OpenAI's Predicted Outputs). It
    /// is offered as the guess ahead wherever the answer follows it; the
    /// answer is the same with or without it. At most
    /// [`MAX_PREDICTION_BYTES`] bytes. Default `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<String>,
    /// Ends the answer before the first line indented by fewer than this
    /// many spaces (a tab counts as one), so a code completion stops at
    /// the end of its block (llama.cpp's `n_indent`); the answer's first
    /// line is not held to it. `0` turns it off. Default `0`.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_indent: usize,
    /// Ends the answer at its first line break after generating for this
    /// long (llama.cpp's `t_max_predict_ms`), so a code completion comes
    /// back in time. Default `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<std::time::Duration>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The longest [`InferenceConfig::prediction`], in bytes.
pub const MAX_PREDICTION_BYTES: usize = 1 << 20;

/// Speculative decoding for one request: where the tokens guessed ahead
/// come from. Guesses are checked against the model's own choices in one
/// step, so they change how fast an answer comes, never what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speculative {
    /// One token per step.
    Off,
    /// Guesses from the request's own text: the continuation of the last
    /// few tokens where they appeared before in the prompt or the answer
    /// (prompt lookup), and the [`prediction`](InferenceConfig::prediction)
    /// when there is one; and, where the text offers nothing and the
    /// engine has a draft model, that model's guesses. A request whose
    /// guesses from text keep failing stops guessing them, so free prose
    /// runs as without.
    #[default]
    Auto,
    /// Guesses from the request's own text and its prediction only, as
    /// `Auto` does, never from a draft model.
    Ngram,
    /// Guesses from the engine's draft model only (a smaller model of the
    /// same family, loaded beside the model it drafts for). Refused when
    /// the engine has none.
    Draft,
}

/// How a prompt reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// As one user turn in the model's own chat template, followed by the
    /// start of the model's turn, when the model file carries a template
    /// llama.cpp recognises (instruct models do); otherwise exactly as
    /// given. An instruct model then answers the prompt rather than
    /// continuing its text.
    #[default]
    Auto,
    /// Exactly as given: for completion-style prompts, base models, or
    /// prompts already written in the model's chat markup.
    Raw,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            repetition_penalty: 1.1,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: std::collections::BTreeMap::new(),
            max_tokens: None,
            seed: None,
            stop: Vec::new(),
            prompt_format: PromptFormat::Auto,
            logprobs: false,
            top_logprobs: 0,
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            json_tool_calls: true,
            response_format: ResponseFormat::Text,
            model: None,
            keep_alive: None,
            speculative: Speculative::Auto,
            prediction: None,
            min_indent: 0,
            time_limit: None,
        }
    }
}

impl InferenceConfig {
    /// Greedy decoding: temperature `0`, every other filter off. The same
    /// prompt always yields the same text.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            ..Self::default()
        }
    }

    /// Sets [`max_tokens`](Self::max_tokens).
    pub fn with_max_tokens(mut self, max_tokens: usize) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn with_seed(mut self, seed: u32) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Sets [`temperature`](Self::temperature).
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Adds a stop sequence.
    pub fn with_stop(mut self, stop: impl Into<String>) -> Self {
        self.stop.push(stop.into());
        self
    }

    /// Sets [`prompt_format`](Self::prompt_format).
    pub fn with_prompt_format(mut self, format: PromptFormat) -> Self {
        self.prompt_format = format;
        self
    }

    /// Asks for each token's log-probability and the `top` most likely
    /// alternatives (see [`logprobs`](Self::logprobs)).
    pub fn with_logprobs(mut self, top: u8) -> Self {
        self.logprobs = true;
        self.top_logprobs = top;
        self
    }

    /// Offers `tools` to the model (see [`tools`](Self::tools)).
    pub fn with_tools(mut self, tools: Vec<Tool>) -> Self {
        self.tools = tools;
        self
    }

    /// Sets [`tool_choice`](Self::tool_choice).
    pub fn with_tool_choice(mut self, choice: ToolChoice) -> Self {
        self.tool_choice = choice;
        self
    }

    /// Sets [`response_format`](Self::response_format).
    pub fn with_response_format(mut self, format: ResponseFormat) -> Self {
        self.response_format = format;
        self
    }

    /// Sets [`model`](Self::model): the request goes to this model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets [`speculative`](Self::speculative).
    pub fn with_speculative(mut self, speculative: Speculative) -> Self {
        self.speculative = speculative;
        self
    }

    /// Sets [`prediction`](Self::prediction).
    pub fn with_prediction(mut self, prediction: impl Into<String>) -> Self {
        self.prediction = Some(prediction.into());
        self
    }

    /// Sets [`keep_alive`](Self::keep_alive).
    pub fn with_keep_alive(mut self, idle: std::time::Duration) -> Self {
        self.keep_alive = Some(idle);
        self
    }

    /// Checks that every value is in range, naming the first one that is not.
    pub fn validate(&self) -> Result<(), crate::GeniusError> {
        let bad = |field: &'static str, reason: &str| {
            Err(crate::GeniusError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty", "must be a finite number > 0");
        }
        for (field, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(field, "must be a number from -2 to 2");
            }
        }
        if let Some((id, _)) = self
            .logit_bias
            .iter()
            .find(|(_, bias)| !(-100.0..=100.0).contains(*bias))
        {
            return Err(crate::GeniusError::InvalidConfig {
                field: "logit_bias",
                reason: format!("the bias of token {id} must be a number from -100 to 100"),
            });
        }
        if self
            .prediction
            .as_ref()
            .is_some_and(|text| text.len() > MAX_PREDICTION_BYTES)
        {
            return Err(crate::GeniusError::InvalidConfig {
                field: "prediction",
                reason: format!("must be at most {MAX_PREDICTION_BYTES} bytes"),
            });
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens", "must be at least 1 (use None for no limit)");
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop sequences must not be empty");
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return bad("top_logprobs", "must be at most 20");
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return bad("top_logprobs", "needs `logprobs` set to true");
        }
        crate::chat::validate_tools(&self.tools, &self.tool_choice)?;
        if let ResponseFormat::Grammar { grammar } = &self.response_format {
            if grammar.trim().is_empty() {
                return bad("response_format", "the grammar is empty");
            }
        }
        if !self.tools.is_empty()
            && self.tool_choice != ToolChoice::None
            && self.response_format != ResponseFormat::Text
        {
            return bad(
                "response_format",
                "cannot be combined with tools the model may call; set tool_choice to none or drop the tools",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_defaults() {
        let config: InferenceConfig = serde_json::from_str(r#"{"temperature": 0}"#).unwrap();
        assert_eq!(config.temperature, 0.0);
        assert_eq!(config.top_k, InferenceConfig::default().top_k);
        assert_eq!(config.max_tokens, None);
        assert_eq!(config.prompt_format, PromptFormat::Auto);
        let raw: InferenceConfig = serde_json::from_str(r#"{"prompt_format": "raw"}"#).unwrap();
        assert_eq!(raw.prompt_format, PromptFormat::Raw);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let config = InferenceConfig {
            top_p: 0.0,
            ..InferenceConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("top_p"), "{err}");
        assert!(InferenceConfig::default().validate().is_ok());
        assert!(InferenceConfig::greedy().validate().is_ok());
    }
}
