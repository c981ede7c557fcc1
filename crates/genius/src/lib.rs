// The README's examples use the llama.cpp engine, so they are the crate's
// documentation (and doctests) only when it is built.
#![cfg_attr(feature = "llama", doc = include_str!("../../../README.md"))]
#![cfg_attr(
    not(feature = "llama"),
    doc = "Local-first LLM orchestration: an `Orchestrator` over two channels, \
           a llama.cpp engine and the `facecrab` model downloader. Built without \
           the `llama` feature, only the `Pinky` stub engine is here; the README \
           (in the documentation of a default build) describes the whole API."
)]

pub use facecrab;
pub use rusty_genius_core as core;
pub use rusty_genius_cortex as cortex;
pub use rusty_genius_stem as stem;

pub use rusty_genius_stem::{CortexStrategy, Orchestrator, OrchestratorHandle, RequestStream};

/// The types most programs need, in one import.
pub mod prelude {
    pub use rusty_genius_core::protocol::{
        AssetEvent, BrainstemInput, BrainstemOutput, EngineStatus, InferenceEvent, ThoughtEvent,
    };
    pub use rusty_genius_core::{ChatMessage, InferenceConfig, PromptFormat};
    pub use rusty_genius_stem::{CortexStrategy, Orchestrator, OrchestratorHandle, RequestStream};
}
