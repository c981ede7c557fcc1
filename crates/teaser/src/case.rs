//! The fixture format: one JSON file per case (see `fixtures/README.md`).

use serde::Deserialize;

use rusty_genius::core::{ChatMessage, InferenceConfig};

/// One test case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows, for people.
    #[serde(default)]
    pub description: String,
    /// The lifecycle strategy: `"keep_alive"`, `"immediate"` or
    /// `{"hibernate_after_ms": N}`. Default `keep_alive`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Pinky's reply, one token per piece (Pinky cases only).
    #[serde(default)]
    pub script: Option<Vec<String>>,
    /// Pinky's replies to successive requests, each one token per piece
    /// (Pinky cases only; instead of `script`).
    #[serde(default)]
    pub replies: Option<Vec<Vec<String>>>,
    /// How many times Pinky plays its script (default once).
    #[serde(default)]
    pub script_repeat: Option<usize>,
    /// Pinky's delay per token in milliseconds.
    #[serde(default)]
    pub token_delay_ms: u64,
    /// Run facecrab offline.
    #[serde(default)]
    pub offline: bool,
    /// What to send, in order, each with what must come back.
    pub steps: Vec<Step>,
}

/// The `CortexStrategy` of a case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Never unload.
    #[default]
    KeepAlive,
    /// Unload after each inference.
    Immediate,
    /// Unload after this many idle milliseconds.
    HibernateAfterMs(u64),
}

/// One step of a case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Load a model: `"$model"` is the case's model (its folder's, or a
    /// stand-in file for Pinky); `"$not_gguf"` is a text file; anything else
    /// is passed as is.
    #[serde(default)]
    pub load: Option<String>,
    /// Send `Infer` with this prompt.
    #[serde(default)]
    pub infer: Option<String>,
    /// Send `Chat` with these messages (OpenAI's shape).
    #[serde(default)]
    pub chat: Option<Vec<ChatMessage>>,
    /// The `InferenceConfig` of `infer` or `chat` (missing fields take
    /// defaults).
    #[serde(default)]
    pub config: Option<InferenceConfig>,
    /// Send `Stop` after this many `Content` events of this step.
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Just wait this long, collecting what arrives.
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// What this step's outputs must show.
    #[serde(default)]
    pub expect: Expect,
}

/// Expectations on the outputs of one step.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The answer text contains each of these.
    #[serde(default)]
    pub contains: Vec<String>,
    /// The answer text contains none of these.
    #[serde(default)]
    pub not_contains: Vec<String>,
    /// The answer text matches this pattern: `*` stands for any text.
    #[serde(default)]
    pub matches: Option<String>,
    /// The answer text is exactly this.
    #[serde(default)]
    pub equals: Option<String>,
    /// The answer equals (`true`) or differs from (`false`) the previous
    /// step's answer.
    #[serde(default)]
    pub same_as_previous: Option<bool>,
    /// These events appear in this order (others may come between):
    /// `ProcessStart`, `ThoughtStart`, `ThoughtDelta`, `ThoughtStop`,
    /// `Content`, `Usage`, `Complete`, `Error`, `Loading`, `Loaded`,
    /// `Hibernated`, `Unloaded`, `AssetStarted`, `AssetProgress`,
    /// `AssetComplete`, `AssetError`.
    #[serde(default)]
    pub events: Vec<String>,
    /// An `Error` output containing this text.
    #[serde(default)]
    pub error: Option<String>,
    /// Generated token count at least this.
    #[serde(default)]
    pub min_tokens: Option<usize>,
    /// Generated token count at most this.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// The `FinishReason`, e.g. `"MaxTokens"`.
    #[serde(default)]
    pub finish: Option<String>,
    /// Reused prompt tokens at least this.
    #[serde(default)]
    pub min_cached_tokens: Option<usize>,
    /// Exactly these tool calls, in order (ids are not compared).
    #[serde(default)]
    pub tool_calls: Option<Vec<ExpectedCall>>,
    /// The answer is JSON that validates against this JSON schema.
    #[serde(default)]
    pub json_schema: Option<serde_json::Value>,
}

/// A tool call a step expects.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedCall {
    /// The function's name.
    pub name: String,
    /// Its arguments.
    pub arguments: serde_json::Value,
}
