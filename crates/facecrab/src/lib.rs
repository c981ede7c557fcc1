//! facecrab: the asset authority of rusty-genius, usable on its own.
//!
//! It turns what a person calls a model — a local path, a short registry
//! name, or a HuggingFace id — into a verified local GGUF file:
//!
//! - names are parsed and validated ([`ModelRef`]); nothing can be written
//!   outside the cache;
//! - the cache uses the HuggingFace hub layout, so files are shared with the
//!   HuggingFace tools, and a cached model costs no network request;
//! - downloads stream to `*.incomplete`, resume after a dropped connection or
//!   a restart, are checked against their sha256 while they arrive, and are
//!   renamed into place under a cross-process lock;
//! - a model split over several GGUF files (`-00001-of-00003.gguf`) is
//!   fetched whole, and resolves to its first part, as llama.cpp expects.
//!
//! ```no_run
//! use facecrab::AssetAuthority;
//!
//! # async fn demo() -> Result<(), facecrab::FacecrabError> {
//! let authority = AssetAuthority::new()?;
//! let path = authority.ensure_model("gemma-3-270m").await?;
//! println!("ready at {}", path.display());
//! # Ok(()) }
//! ```

mod authority;
mod cache;
mod download;
mod error;
mod hub;
mod name;
mod registry;
mod rt;
mod split;
#[cfg(feature = "test-hub")]
pub mod testing;

pub use authority::{AssetAuthority, AuthorityBuilder, CachedModel};
pub use error::FacecrabError;
pub use name::{FileChoice, HubRef, ModelRef};
pub use registry::Registry;
