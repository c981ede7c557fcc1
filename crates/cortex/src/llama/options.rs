//! The llama.cpp engine's settings, and the environment variables that
//! give their defaults.

/// Settings of the llama.cpp engine that hold for every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaOptions {
    /// The context window of each request, in tokens (prompt and answer);
    /// capped at what the model was trained for. Every one of the
    /// `parallel` requests gets the whole of it: the KV cache holds
    /// `context_size × parallel` tokens. Default 4096
    /// (`GENIUS_CONTEXT_SIZE`).
    pub context_size: u32,
    /// How many requests are decoded together, each in its own sequence
    /// of one batch. More requests wait for a free place. Default 4
    /// (`GENIUS_PARALLEL`).
    pub parallel: u32,
    /// Threads for generation and prompt processing. Default: the
    /// machine's available parallelism (`GENIUS_THREADS`).
    pub threads: usize,
    /// Tokens decoded per batch while processing a prompt. Default 512
    /// (`GENIUS_BATCH_SIZE`).
    pub batch_size: u32,
    /// Layers to offload to the GPU in GPU builds; `None` keeps llama.cpp's
    /// default (all of them when a GPU backend is compiled in).
    /// `GENIUS_GPU_LAYERS`.
    pub gpu_layers: Option<u32>,
}

impl Default for LlamaOptions {
    fn default() -> Self {
        Self {
            context_size: 4096,
            parallel: 4,
            threads: std::thread::available_parallelism().map_or(4, |n| n.get()),
            batch_size: 512,
            gpu_layers: None,
        }
    }
}

impl LlamaOptions {
    /// The defaults, overridden by the `GENIUS_*` environment variables
    /// named on each field. Unparsable values are ignored with a warning.
    pub fn from_env() -> Self {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            let value = std::env::var(name).ok()?;
            let parsed = value.trim().parse().ok();
            if parsed.is_none() {
                log::warn!("ignoring {name}={value:?}: not a number");
            }
            parsed
        }
        let defaults = Self::default();
        Self {
            context_size: var("GENIUS_CONTEXT_SIZE")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.context_size),
            parallel: var("GENIUS_PARALLEL")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.parallel),
            threads: var("GENIUS_THREADS")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.threads),
            batch_size: var("GENIUS_BATCH_SIZE")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.batch_size),
            gpu_layers: var("GENIUS_GPU_LAYERS").or(defaults.gpu_layers),
        }
    }
}
