//! Descriptions of models: where they come from and what they are.

use serde::{Deserialize, Serialize};

/// Where a model file lives on the HuggingFace Hub, and how to verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The name users ask for, e.g. `qwen-2.5-3b-instruct`.
    pub name: String,
    /// The Hub repository, `org/repo`.
    pub repo: String,
    /// The file inside the repository.
    pub filename: String,
    /// The quantisation, e.g. `Q4_K_M`.
    pub quantization: String,
    /// A branch, tag or commit; `main` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Lowercase hex sha256 of the file, checked after download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// What the engine reports about a model it loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name the model was requested by.
    pub name: String,
    /// Size of the context window in tokens.
    pub context_size: usize,
    /// Size of the model's vocabulary.
    pub vocab_size: usize,
}
