//! facecrab: the asset authority of rusty-genius.
//!
//! Turns what a user calls a model — a local path, a registry name, or a
//! HuggingFace id — into a local file that is ready to load.
//!
//! ```no_run
//! # async fn demo() -> Result<(), facecrab::FacecrabError> {
//! let authority = facecrab::AssetAuthority::new()?;
//! let path = authority.ensure_model("/models/gemma-3-270m-q4_k_m.gguf").await?;
//! println!("ready at {}", path.display());
//! # Ok(()) }
//! ```

mod authority;
mod error;

pub use authority::AssetAuthority;
pub use error::FacecrabError;
