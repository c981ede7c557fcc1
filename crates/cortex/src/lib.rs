//! Inference engines for rusty-genius.
//!
//! An [`Engine`] loads one model and completes prompts, writing token bytes
//! to an [`Output`], which turns them into protocol events (valid UTF-8,
//! `<think>` tags as thought events, stop sequences applied). Engines block,
//! so they always run on an [`EngineThread`] that owns them: llama.cpp never
//! runs on an async executor, and its KV cache lives across requests.
//!
//! Two engines ship: [`LlamaEngine`] on llama.cpp (feature `llama`, on by
//! default) and [`Pinky`], a deterministic stub for tests that is always
//! compiled.

mod cancel;
mod cores;
#[cfg_attr(not(feature = "llama"), allow(dead_code))]
mod draft;
mod engine;
mod exit;
pub mod gguf;
#[cfg(feature = "llama")]
mod llama;
mod pinky;
#[cfg_attr(not(feature = "llama"), allow(dead_code))]
mod plan;
#[cfg_attr(not(feature = "llama"), allow(dead_code))]
mod schema;
mod suffix;
pub mod template;
pub mod text;
mod thread;
pub mod tools;

pub use cancel::CancelToken;
pub use cores::{default_threads, Cores, Lease, Seat};
pub use engine::{
    check_gguf, Ended, Engine, EventSink, Knock, Output, Refused, Request, RequestId, Step,
    MAX_BACKLOG,
};
#[cfg(feature = "llama")]
pub use llama::{llama_backend, Device, DraftChoice, GpuLayers, LlamaEngine, LlamaOptions};
/// The llama.cpp bindings this crate uses, for code that drives llama.cpp
/// beside the engine (take the backend from [`llama_backend`]).
#[cfg(feature = "llama")]
pub use llama_cpp_2;
pub use pinky::Pinky;
pub use thread::{EngineFactory, EngineReport, EngineThread};

/// The free memory of the GPU devices the default engine offloads to (as
/// the `GENIUS_DEVICE` and `GENIUS_GPU_LAYERS` variables choose), in
/// bytes; `None` when it offloads nothing (a CPU build, no device).
pub fn default_device_memory() -> Option<u64> {
    #[cfg(feature = "llama")]
    {
        LlamaOptions::from_env().device_memory()
    }
    #[cfg(not(feature = "llama"))]
    {
        None
    }
}

/// The engine used when none is chosen: llama.cpp with options from the
/// environment, or Pinky in builds without the `llama` feature.
pub fn default_engine_factory() -> EngineFactory {
    #[cfg(feature = "llama")]
    {
        std::sync::Arc::new(|| {
            Ok(Box::new(LlamaEngine::new(LlamaOptions::from_env())?) as Box<dyn Engine>)
        })
    }
    #[cfg(not(feature = "llama"))]
    {
        std::sync::Arc::new(|| Ok(Box::new(Pinky::new()) as Box<dyn Engine>))
    }
}

/// How the default engine's models are sized before they load: with
/// llama.cpp, from the GGUF header and the engine's options from the
/// environment (context, parallel, batch, offloaded layers); without it,
/// by file size.
pub fn default_footprint() -> gguf::FootprintFn {
    #[cfg(feature = "llama")]
    {
        let options = LlamaOptions::from_env();
        std::sync::Arc::new(move |path: &std::path::Path| options.footprint(path))
    }
    #[cfg(not(feature = "llama"))]
    {
        std::sync::Arc::new(|path: &std::path::Path| gguf::footprint(path, 4096, 4, 512))
    }
}
