//! The error type shared by the rusty-genius crates, and its form on the
//! wire.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Shorthand for results whose error is [`GeniusError`].
pub type Result<T, E = GeniusError> = std::result::Result<T, E>;

/// A boxed error kept as the [`source`](std::error::Error::source) of a
/// [`GeniusError`], so a caller can downcast it (to `facecrab::FacecrabError`,
/// say) and match on what went wrong.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong between a request and its answer.
///
/// Messages are written for the person reading the log: each says what
/// happened and, where there is one, what to do about it. Errors from other
/// crates are kept as the `source`, never flattened into the message alone.
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
        /// The resolver's own error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A path was given but there is no file there.
    #[error("model file {} does not exist: check the path, or pass a registry name or HuggingFace id instead", path.display())]
    FileNotFound {
        /// The path as given.
        path: PathBuf,
    },

    /// The model would not fit in the memory budget even with every other
    /// model unloaded.
    #[error("model `{name}` needs about {} but the memory budget is {}{}: raise the budget (genius serve --memory-budget) or use a smaller model", bytes(*needed), bytes(*budget), loaded_list(loaded))]
    ModelTooLarge {
        /// The model's name.
        name: String,
        /// Its estimated size in memory, in bytes.
        needed: u64,
        /// The memory budget, in bytes.
        budget: u64,
        /// The models loaded, and their estimated sizes.
        loaded: Vec<(String, u64)>,
    },

    /// There was no room for the model within the residency limits, and
    /// the models that hold it stayed busy for as long as the request
    /// could wait.
    #[error("no room to load model `{name}` (about {}): {why}{}; retry when they are idle, or raise the limits (genius serve --max-models, --memory-budget)", bytes(*needed), loaded_list(loaded))]
    NoRoomForModel {
        /// The model's name.
        name: String,
        /// Its estimated size in memory, in bytes.
        needed: u64,
        /// Which limit is reached, in words.
        why: String,
        /// The models loaded, and their estimated sizes.
        loaded: Vec<(String, u64)>,
    },

    /// As many requests wait already as the Orchestrator queues
    /// (`OrchestratorBuilder::max_queue`): this one was refused before any
    /// work, and may be sent again later.
    #[error("the server is busy: {queued} requests are waiting already, the most it queues (genius serve --max-queue {limit}); retry shortly")]
    QueueFull {
        /// Requests waiting when this one came.
        queued: usize,
        /// The bound.
        limit: usize,
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

    /// Part of a request other than its settings cannot be used as it is:
    /// the prompt, a message, a tool.
    #[error("invalid {what}: {reason}")]
    InvalidRequest {
        /// Which part, e.g. `prompt` or `messages[2].role`.
        what: String,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// A request asks for more than a [`Limits`](crate::Limits) bound
    /// allows; nothing of it ran.
    #[error("the request has {value} {what}, over the limit of {max} (limit `{limit}`): make it smaller, or raise the limit")]
    LimitExceeded {
        /// What was counted, e.g. `tools` or `bytes in the grammar`.
        what: String,
        /// The field of [`Limits`](crate::Limits) that bounds it.
        limit: &'static str,
        /// What the request has.
        value: usize,
        /// The bound.
        max: usize,
    },

    /// Resolving or downloading a model failed for a reason other than
    /// the name (network, checksum, access, offline mode, disk).
    #[error("cannot fetch model `{name}`: {source}")]
    Asset {
        /// The name as the user gave it.
        name: String,
        /// What went wrong, as the asset authority reported it.
        #[source]
        source: BoxError,
    },

    /// The inference engine failed.
    #[error("engine error: {message}")]
    Engine {
        /// What failed.
        message: String,
        /// The engine's own error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A model's offloaded layers need more GPU memory than the residency
    /// policy allows all models together.
    #[error("model `{name}` needs about {} of GPU memory but the GPU budget is {}: offload fewer layers (GENIUS_GPU_LAYERS, --gpu-layers) or use a smaller model", bytes(*needed), bytes(*budget))]
    ModelTooLargeForDevice {
        /// The model.
        name: String,
        /// Its estimated GPU memory, in bytes.
        needed: u64,
        /// The GPU budget, in bytes.
        budget: u64,
    },

    /// The device the engine was told to use is not there (no such
    /// device, or no driver for it).
    #[error("device `{device}` is not available ({available}): name one of those, or leave the device unset (GENIUS_DEVICE, --device) to use whatever GPU is there and the CPU otherwise")]
    DeviceUnavailable {
        /// The device asked for.
        device: String,
        /// The devices this build sees, in words.
        available: String,
    },

    /// The engine thread is gone (it panicked or was shut down).
    #[error("the engine thread has stopped; create a new Orchestrator")]
    EngineGone,

    /// The Orchestrator shut down before this request could be served.
    #[error("the Orchestrator shut down before this request ran")]
    ShutDown,

    /// An I/O operation failed.
    #[error("i/o error{}: {source}", path.as_ref().map(|p| format!(" on {}", p.display())).unwrap_or_default())]
    Io {
        /// The file it was about, when there is one.
        path: Option<PathBuf>,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// `n` bytes for people: `1.4 GB`, `350 MB`.
fn bytes(n: u64) -> String {
    const MB: f64 = 1e6;
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else {
        format!("{:.0} MB", (n / MB).max(1.0))
    }
}

/// `; loaded: a (1.0 GB), b (90 MB)`, or `; nothing is loaded`.
fn loaded_list(loaded: &[(String, u64)]) -> String {
    if loaded.is_empty() {
        return "; nothing else is loaded".to_owned();
    }
    let list: Vec<String> = loaded
        .iter()
        .map(|(name, size)| format!("`{name}` ({})", bytes(*size)))
        .collect();
    format!("; loaded: {}", list.join(", "))
}

impl From<std::io::Error> for GeniusError {
    fn from(source: std::io::Error) -> Self {
        Self::Io { path: None, source }
    }
}

impl GeniusError {
    /// An engine failure described by `message` alone.
    pub fn engine(message: impl Into<String>) -> Self {
        Self::Engine {
            message: message.into(),
            source: None,
        }
    }

    /// An engine failure caused by `source`.
    pub fn engine_from(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Engine {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: Some(path.into()),
            source,
        }
    }

    /// A bad part of a request.
    pub fn invalid_request(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// The broad class of this error, as it travels in an [`ErrorReport`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoModelLoaded => ErrorKind::NoModelLoaded,
            Self::ModelNotFound { .. } | Self::FileNotFound { .. } => ErrorKind::ModelNotFound,
            Self::InvalidModelFile { .. } => ErrorKind::InvalidModel,
            Self::EmptyPrompt
            | Self::InvalidConfig { .. }
            | Self::InvalidRequest { .. }
            | Self::LimitExceeded { .. } => ErrorKind::InvalidRequest,
            Self::PromptTooLong { .. } => ErrorKind::ContextExceeded,
            Self::Asset { .. } => ErrorKind::Asset,
            Self::ModelTooLarge { .. } | Self::ModelTooLargeForDevice { .. } => {
                ErrorKind::ModelTooLarge
            }
            Self::NoRoomForModel { .. } => ErrorKind::NoRoom,
            Self::QueueFull { .. } => ErrorKind::Overloaded,
            Self::Engine { .. }
            | Self::DeviceUnavailable { .. }
            | Self::EngineGone
            | Self::Io { .. } => ErrorKind::Engine,
            Self::ShutDown => ErrorKind::ShutDown,
        }
    }

    /// This error's kind and message, without the error itself (as it
    /// crosses a process boundary). In-process, prefer
    /// [`ErrorReport::from`] an owned error or [`ErrorReport::shared`],
    /// which keep it.
    pub fn report(&self) -> ErrorReport {
        ErrorReport {
            kind: self.kind(),
            message: self.to_string(),
            cause: None,
        }
    }
}

/// The broad class of an error: what a program reacting to it (retry, ask
/// the user, answer HTTP 404 or 400) needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// No model is loaded.
    NoModelLoaded,
    /// The model name or path leads to no file.
    ModelNotFound,
    /// The model file cannot be used.
    InvalidModel,
    /// The request itself is malformed: fix it, do not retry it as is.
    InvalidRequest,
    /// The prompt does not fit the context window.
    ContextExceeded,
    /// Fetching the model failed (network, access, checksum, disk).
    Asset,
    /// The engine failed.
    Engine,
    /// The Orchestrator shut down before the request ran.
    ShutDown,
    /// The model does not fit in the memory budget: retrying will not help.
    ModelTooLarge,
    /// The models holding the memory or places stayed busy: retry later.
    NoRoom,
    /// Too many requests wait already: retry later.
    Overloaded,
}

/// An error as it is sent to the application in
/// [`BrainstemOutput::Error`](crate::protocol::BrainstemOutput::Error) and
/// on a request's stream: its [`ErrorKind`] and its message, and, within
/// the process, the [`GeniusError`] itself ([`error`](Self::error)), so a
/// caller can match on the cause and downcast its source (facecrab's
/// error behind a `ModelNotFound`, say). Only kind and message cross a
/// process boundary (serde). It displays as the message; two reports are
/// equal when kind and message are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReport {
    /// What class of error it is.
    pub kind: ErrorKind,
    /// The full message of the error, with its causes.
    pub message: String,
    /// The error, while the report stays in the process that made it.
    #[serde(skip)]
    cause: Option<Arc<GeniusError>>,
}

impl ErrorReport {
    /// The report of an error shared with other reports (the same load
    /// failure answering every request that waited for it).
    pub fn shared(err: &Arc<GeniusError>) -> Self {
        Self {
            kind: err.kind(),
            message: err.to_string(),
            cause: Some(err.clone()),
        }
    }

    /// The error this report was made from, when it was made in this
    /// process: match on it, or downcast its `source()`.
    pub fn error(&self) -> Option<&GeniusError> {
        self.cause.as_deref()
    }

    /// Whether the message contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        self.message.contains(text)
    }
}

impl PartialEq for ErrorReport {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for ErrorReport {}

impl std::fmt::Display for ErrorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorReport {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|err| err as &(dyn std::error::Error + 'static))
    }
}

impl From<&GeniusError> for ErrorReport {
    fn from(err: &GeniusError) -> Self {
        err.report()
    }
}

impl From<GeniusError> for ErrorReport {
    /// Keeps the error (see [`ErrorReport::error`]).
    fn from(err: GeniusError) -> Self {
        Self::shared(&Arc::new(err))
    }
}

impl From<Arc<GeniusError>> for ErrorReport {
    fn from(err: Arc<GeniusError>) -> Self {
        Self::shared(&err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_error_is_kept_and_can_be_downcast() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let err = GeniusError::Asset {
            name: "org/repo".into(),
            source: Box::new(io),
        };
        let source = std::error::Error::source(&err).expect("a source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("an io error");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(err.kind(), ErrorKind::Asset);
        assert!(err.to_string().contains("reset by peer"), "{err}");
    }

    #[test]
    fn reports_round_trip_through_json_and_display_their_message() {
        let report = GeniusError::PromptTooLong {
            tokens: 10,
            context: 8,
        }
        .report();
        assert_eq!(report.kind, ErrorKind::ContextExceeded);
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains(r#""kind":"context_exceeded""#), "{json}");
        assert_eq!(serde_json::from_str::<ErrorReport>(&json).unwrap(), report);
        assert_eq!(report.to_string(), report.message);
    }
}
