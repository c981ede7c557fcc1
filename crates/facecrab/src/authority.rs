//! The asset authority: from a model name to a local file.

use std::path::{Path, PathBuf};

use futures::channel::mpsc;
use futures::Stream;
use rusty_genius_core::protocol::AssetEvent;

use crate::FacecrabError;

/// Resolves model names to local files, fetching them when needed.
#[derive(Debug, Clone, Default)]
pub struct AssetAuthority {
    _private: (),
}

impl AssetAuthority {
    /// Creates an authority with the default settings.
    pub fn new() -> Result<Self, FacecrabError> {
        Ok(Self::default())
    }

    /// Returns a local path for `name`.
    pub async fn ensure_model(&self, name: &str) -> Result<PathBuf, FacecrabError> {
        validate_name(name)?;
        let path = Path::new(name);
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        if looks_like_path(name) {
            return Err(FacecrabError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        Err(FacecrabError::NotFound {
            name: name.to_owned(),
            reason: "it is not a local file, and registry names and HuggingFace ids cannot be fetched by this build; pass the path of a .gguf file".into(),
        })
    }

    /// Like [`ensure_model`](Self::ensure_model), reported as events: one
    /// `Started`, any number of `Progress`, then `Complete(path)` or `Error`.
    pub fn ensure_model_stream(
        &self,
        name: &str,
    ) -> impl Stream<Item = AssetEvent> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        let authority = self.clone();
        let name = name.to_owned();
        async_std::task::spawn(async move {
            let _ = tx.unbounded_send(AssetEvent::Started(name.clone()));
            let last = match authority.ensure_model(&name).await {
                Ok(path) => AssetEvent::Complete(path.display().to_string()),
                Err(err) => AssetEvent::Error(err.to_string()),
            };
            let _ = tx.unbounded_send(last);
        });
        rx
    }
}

/// Whether `name` is meant as a filesystem path rather than a model id.
fn looks_like_path(name: &str) -> bool {
    let path = Path::new(name);
    path.is_absolute() || name.starts_with("./") || name.starts_with("../") || name.starts_with('~')
}

fn validate_name(name: &str) -> Result<(), FacecrabError> {
    let invalid = |reason: &str| {
        Err(FacecrabError::InvalidName {
            name: name.escape_debug().to_string(),
            reason: reason.to_owned(),
        })
    };
    if name.trim().is_empty() {
        return invalid("the name is empty");
    }
    if name.chars().any(char::is_control) {
        return invalid("it contains control characters");
    }
    Ok(())
}
