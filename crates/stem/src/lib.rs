//! The brainstem of rusty-genius: the [`Orchestrator`].
//!
//! The Orchestrator is an actor. An application sends it
//! [`BrainstemInput`](rusty_genius_core::protocol::BrainstemInput)s over a
//! `futures` channel and reads
//! [`BrainstemOutput`](rusty_genius_core::protocol::BrainstemOutput)s from
//! another. It resolves model names through facecrab, keeps several models
//! loaded at once (each driven on its own engine thread) within its
//! [`Residency`] limits, and frees a model's memory when it sits idle,
//! following its [`CortexStrategy`].

mod brainstem;
mod channel;
mod handle;
mod meter;
mod orchestrator;
mod residency;
mod rt;
mod strategy;
#[cfg(feature = "testing")]
pub mod testing;

pub use handle::{OrchestratorHandle, RequestStream};
pub use orchestrator::{Orchestrator, OrchestratorBuilder};
pub use residency::{available_memory, Residency};
pub use strategy::CortexStrategy;
