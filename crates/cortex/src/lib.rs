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
mod engine;
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
pub use engine::{
    check_gguf, Ended, Engine, EventSink, Output, Refused, Request, RequestId, Step, MAX_BACKLOG,
};
#[cfg(feature = "llama")]
pub use llama::{llama_backend, LlamaEngine, LlamaOptions};
/// The llama.cpp bindings this crate uses, for code that drives llama.cpp
/// beside the engine (take the backend from [`llama_backend`]).
#[cfg(feature = "llama")]
pub use llama_cpp_2;
pub use pinky::Pinky;
pub use thread::{EngineFactory, EngineReport, EngineThread};

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
/// environment (context, parallel, batch); without it, by file size.
pub fn default_footprint() -> gguf::FootprintFn {
    #[cfg(feature = "llama")]
    {
        let options = LlamaOptions::from_env();
        std::sync::Arc::new(move |path: &std::path::Path| {
            gguf::footprint(
                path,
                u64::from(options.context_size),
                u64::from(options.parallel),
                u64::from(options.batch_size),
            )
        })
    }
    #[cfg(not(feature = "llama"))]
    {
        std::sync::Arc::new(|path: &std::path::Path| gguf::footprint(path, 4096, 4, 512))
    }
}
