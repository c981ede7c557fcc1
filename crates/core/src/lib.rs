//! The shared vocabulary of rusty-genius.
//!
//! Every other crate of the workspace speaks in these types: the messages an
//! application exchanges with the Orchestrator ([`protocol`]), conversations,
//! tools and structured output ([`chat`]), the settings of one request
//! ([`InferenceConfig`]), the description of a model ([`manifest`]) and the
//! error type ([`GeniusError`]).
//!
//! This crate performs no I/O and links nothing native, so it can be used to
//! talk to an Orchestrator from any process (all messages are serde types).

pub mod chat;
mod config;
pub mod embed;
mod error;
pub mod infill;
mod limits;
pub mod manifest;
pub mod metrics;
pub mod protocol;
pub mod tokens;

pub use chat::{
    ChatMessage, FunctionCall, FunctionDefinition, JsonSchemaFormat, Prompt, ResponseFormat, Role,
    Tool, ToolCall, ToolChoice, ToolKind,
};
pub use config::{InferenceConfig, PromptFormat, Speculative, MAX_PREDICTION_BYTES};
pub use embed::{Embed, EmbedInput, Embeddings, Pooling};
pub use error::{BoxError, ErrorKind, ErrorReport, GeniusError, Result};
pub use infill::{Infill, InfillFile};
pub use limits::{grammar_depth, Limits};
