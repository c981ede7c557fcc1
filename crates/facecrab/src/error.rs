//! facecrab's error type.

use std::path::PathBuf;

/// Why a model could not be made available.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FacecrabError {
    /// The name is neither a local file nor something facecrab can resolve.
    #[error("model `{name}` not found: {reason}")]
    NotFound {
        /// The name as given.
        name: String,
        /// What was tried, and what to do instead.
        reason: String,
    },
    /// A local path was given but no file is there.
    #[error("no model file at {}: check the path", path.display())]
    MissingFile {
        /// The path as given.
        path: PathBuf,
    },
    /// The name is malformed or unsafe.
    #[error("invalid model name `{name}`: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
