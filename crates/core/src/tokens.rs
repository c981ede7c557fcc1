//! Questions about a model's tokens and chat template, answered by its
//! engine without generating: what llama.cpp's server answers at
//! `/tokenize`, `/detokenize` and `/apply-template`.

pub use crate::chat::{TextOrToken, TokenAnswer, TokenPiece, TokenQuery};
