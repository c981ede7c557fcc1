#![doc = include_str!("../../../README.md")]

pub use facecrab;
pub use rusty_genius_core as core;
pub use rusty_genius_cortex as cortex;
pub use rusty_genius_stem as stem;

pub use rusty_genius_stem::{CortexStrategy, Orchestrator};

/// The types most programs need, in one import.
pub mod prelude {
    pub use rusty_genius_core::protocol::{
        AssetEvent, BrainstemInput, BrainstemOutput, EngineStatus, InferenceEvent, ThoughtEvent,
    };
    pub use rusty_genius_core::InferenceConfig;
    pub use rusty_genius_stem::{CortexStrategy, Orchestrator};
}
