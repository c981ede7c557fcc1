//! facecrab's error type.

use std::path::{Path, PathBuf};

/// Why a model could not be made available. Each message says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FacecrabError {
    /// The name is malformed or unsafe; nothing was written.
    #[error("invalid model name `{name}`: {reason}")]
    InvalidName {
        /// The name as given (control characters escaped).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No registry entry, repository or file of that name.
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
    /// A local path was given, but the file there is not a GGUF model.
    #[error("{} is not a GGUF model file: {reason}", path.display())]
    NotAModel {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The repository has no single GGUF file matching the request.
    #[error("{repo} has {} GGUF file matching {wanted}; pick one with `{repo}:<QUANT>` or `{repo}/<file>`. Available: {}", if available_matches.is_empty() { "no" } else { "more than one" }, if files.is_empty() { "none".to_owned() } else { files.join(", ") })]
    NoSingleFile {
        /// `org/repo`.
        repo: String,
        /// The quantisation asked for.
        wanted: String,
        /// The GGUF files that matched (empty: none did).
        available_matches: Vec<String>,
        /// Every GGUF file in the repository.
        files: Vec<String>,
    },
    /// The Hub refused access (401 or 403).
    #[error("access to {repo} was refused (HTTP {status}): the repository may be private or gated; accept its terms on the Hub and set HF_TOKEN to a token that can read it")]
    Unauthorized {
        /// `org/repo`.
        repo: String,
        /// The HTTP status.
        status: u16,
    },
    /// Offline mode is on and the model is not in the cache.
    #[error("`{name}` is not in the cache at {} and HF_HUB_OFFLINE is set: download it once while online, or unset HF_HUB_OFFLINE", cache.display())]
    NotCached {
        /// The name as given.
        name: String,
        /// The cache that was searched.
        cache: PathBuf,
    },
    /// The network or the server failed.
    #[error("download from {url} failed: {reason}; check the connection (or HF_ENDPOINT) and try again, it resumes where it stopped")]
    Network {
        /// The URL (never holds credentials).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The Hub endpoint is not a usable URL.
    #[error("the Hub endpoint `{url}` is not a valid URL ({reason}); check HF_ENDPOINT")]
    InvalidEndpoint {
        /// The endpoint as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The parts of a split model came from different commits of the
    /// repository, so they may not belong together.
    #[error("{repo}: part {file} is at commit {actual}, but the first part is at {expected}; the repository changed while it was fetched, try again")]
    CommitMismatch {
        /// `org/repo`.
        repo: String,
        /// The part whose commit differs.
        file: String,
        /// The first part's commit.
        expected: String,
        /// The commit the Hub answered for this part.
        actual: String,
    },
    /// The registry pins a sha256 that is not the one the Hub announces
    /// for the file: it changed upstream. Nothing was downloaded.
    #[error("the registry pins {file} to sha256 {pinned}, but the Hub now announces {announced}; nothing was downloaded: update the registry entry's sha256 or pin its revision")]
    PinMismatch {
        /// The file in its repository.
        file: String,
        /// The sha256 in the registry.
        pinned: String,
        /// The sha256 the Hub announced.
        announced: String,
    },
    /// The downloaded bytes are not the expected ones; they were deleted.
    #[error("checksum mismatch for {file}: expected sha256 {expected}, got {actual}; the corrupt download was deleted, try again")]
    ChecksumMismatch {
        /// The file in its repository.
        file: String,
        /// The sha256 the registry or Hub announced.
        expected: String,
        /// The sha256 of what arrived.
        actual: String,
    },
    /// Another thread or process is downloading or linking the file.
    #[error("{file} is being downloaded or linked by another process; try again when it is done")]
    Busy {
        /// The file in its repository.
        file: String,
    },
    /// The user registry file is malformed.
    #[error("registry {source_name} is invalid: {reason}")]
    Registry {
        /// The file (or `<built-in registry>`).
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("i/o error on {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl FacecrabError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
