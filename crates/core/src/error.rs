//! The error type shared by the rusty-genius crates.

use std::path::PathBuf;

/// Shorthand for results whose error is [`GeniusError`].
pub type Result<T, E = GeniusError> = std::result::Result<T, E>;

/// Everything that can go wrong between a request and its answer.
///
/// Messages are written for the person reading the log: each says what
/// happened and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeniusError {
    /// `Infer` arrived while no model was loaded or known.
    #[error("no model is loaded: send BrainstemInput::LoadModel(<name or path>) before Infer")]
    NoModelLoaded,

    /// A model name could not be resolved to a file.
    #[error("model `{name}` not found: {reason}")]
    ModelNotFound {
        /// The name as the user gave it.
        name: String,
        /// Why resolution failed and what to try instead.
        reason: String,
    },

    /// A path was given but there is no file there.
    #[error("model file {} does not exist: check the path, or pass a registry name or HuggingFace id instead", path.display())]
    FileNotFound {
        /// The path as given.
        path: PathBuf,
    },

    /// The file exists but cannot be used as a model.
    #[error("{} is not a usable GGUF model: {reason}", path.display())]
    InvalidModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The prompt was empty or whitespace only.
    #[error("the prompt is empty: send some text to complete")]
    EmptyPrompt,

    /// The prompt does not leave room for even one generated token.
    #[error("the prompt is {tokens} tokens but the context holds {context}: shorten the prompt or raise the context size")]
    PromptTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// Size of the context window.
        context: usize,
    },

    /// An [`InferenceConfig`](crate::InferenceConfig) field is out of range.
    #[error("invalid inference setting `{field}`: {reason}")]
    InvalidConfig {
        /// The field's name.
        field: &'static str,
        /// The allowed range.
        reason: String,
    },

    /// The inference engine failed.
    #[error("engine error: {0}")]
    Engine(String),

    /// The engine thread is gone (it panicked or was shut down).
    #[error("the engine thread has stopped; create a new Orchestrator")]
    EngineGone,

    /// Resolving or downloading a model failed.
    #[error("asset error: {0}")]
    Asset(String),

    /// An I/O operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
