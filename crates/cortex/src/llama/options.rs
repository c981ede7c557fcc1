//! The llama.cpp engine's settings, and the environment variables that
//! give their defaults.

use std::path::PathBuf;

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
    /// The most threads a step of this model computes with. Each step
    /// runs on a lease of the process's cores ([`Cores`](crate::Cores)),
    /// shared with the other models' steps, and uses as many threads as
    /// the lease holds, up to this. Default: one per physical core
    /// ([`default_threads`](crate::default_threads), `GENIUS_THREADS`).
    pub threads: usize,
    /// Tokens decoded per batch while processing a prompt. Default 512
    /// (`GENIUS_BATCH_SIZE`).
    pub batch_size: u32,
    /// Layers to offload to the GPU in GPU builds (`vulkan`, `cuda`,
    /// `metal`): all of them by default, or the first `n`. A build without
    /// a GPU backend, or a machine without a usable device, runs them all
    /// on the CPU. `GENIUS_GPU_LAYERS` (`all` or a number).
    pub gpu_layers: GpuLayers,
    /// Which devices hold the offloaded layers. Default
    /// [`Device::Auto`]. `GENIUS_DEVICE` (`auto`, `cpu`, or device names
    /// such as `Vulkan0`, comma-separated).
    pub device: Device,
    /// Bytes of host memory for slot caches another prompt took the slot
    /// from: a conversation coming back to a recycled slot reads its cache
    /// from here and decodes only what is new. Past this, the least
    /// recently kept go to the snapshots on disk. 0 keeps none in RAM.
    /// Default 2 GiB (`GENIUS_CACHE_RAM_MIB`).
    pub cache_ram: u64,
    /// The folder for KV snapshots: every slot's cache is saved here when
    /// the model leaves memory (hibernation, eviction, a clean shutdown),
    /// and a later request sharing a prefix, in this process or after a
    /// restart, reads it back instead of decoding it. `None` turns them
    /// off. [`Default`] has `None`; [`from_env`](Self::from_env) gives
    /// `$GENIUS_KV_DIR`, else `$GENIUS_HOME/kv`, else `rusty-genius/kv` in
    /// the platform cache folder (`GENIUS_KV_DIR=off` turns them off).
    pub snapshot_dir: Option<PathBuf>,
    /// The most bytes the snapshot folder holds, across models; the least
    /// recently used snapshots are deleted past it. Default 8 GiB
    /// (`GENIUS_KV_DISK_MIB`).
    pub snapshot_budget: u64,
    /// Whether requests may guess tokens ahead and check them in one step
    /// (speculative decoding; see
    /// [`InferenceConfig::speculative`](rusty_genius_core::InferenceConfig::speculative)).
    /// `false` turns it off for every request. Default `true`
    /// (`GENIUS_SPECULATIVE`: `auto` or `off`).
    pub speculative: bool,
    /// A smaller model of the same family that guesses ahead for the
    /// models this engine loads (or only for the one it names), loaded
    /// beside it. A model whose vocabulary it does not share is refused at
    /// load, naming both. Default `None` (`GENIUS_DRAFT_MODEL`:
    /// `[MODEL=]PATH`).
    pub draft_model: Option<DraftChoice>,
}

/// A draft model ([`LlamaOptions::draft_model`]): its file, and the model
/// it drafts for (every model that generates, when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftChoice {
    /// The draft model's GGUF file.
    pub path: PathBuf,
    /// The name of the only model it drafts for.
    pub target: Option<String>,
}

impl DraftChoice {
    /// Whether it drafts for the model called `name`, read from `path`:
    /// the target is that name, the path, or the file's name without
    /// `.gguf`.
    pub fn drafts_for(&self, name: &str, path: &std::path::Path) -> bool {
        self.target.as_deref().is_none_or(|target| {
            target == name
                || std::path::Path::new(target) == path
                || path.file_stem().is_some_and(|stem| stem == target)
        })
    }
}

impl std::str::FromStr for DraftChoice {
    type Err = String;

    /// `PATH`, or `MODEL=PATH` for one model only.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (target, path) = match text.split_once('=') {
            Some((target, path)) if !target.trim().is_empty() => {
                (Some(target.trim().to_owned()), path.trim())
            }
            _ => (None, text),
        };
        if path.is_empty() {
            return Err(format!("`{text}` names no draft model file"));
        }
        Ok(Self {
            path: PathBuf::from(path),
            target,
        })
    }
}

const MIB: u64 = 1 << 20;

impl Default for LlamaOptions {
    fn default() -> Self {
        Self {
            context_size: 4096,
            parallel: 4,
            threads: crate::cores::default_threads(),
            batch_size: 512,
            gpu_layers: GpuLayers::All,
            device: Device::Auto,
            cache_ram: 2048 * MIB,
            snapshot_dir: None,
            snapshot_budget: 8192 * MIB,
            speculative: true,
            draft_model: None,
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
        fn parsed<T: std::str::FromStr<Err = String>>(name: &str) -> Option<T> {
            let value = std::env::var(name).ok()?;
            value
                .parse()
                .map_err(|err| log::warn!("ignoring {name}={value:?}: {err}"))
                .ok()
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
            gpu_layers: parsed("GENIUS_GPU_LAYERS").unwrap_or(defaults.gpu_layers),
            device: parsed("GENIUS_DEVICE").unwrap_or(defaults.device),
            cache_ram: var::<u64>("GENIUS_CACHE_RAM_MIB")
                .map_or(defaults.cache_ram, |mib| mib.saturating_mul(MIB)),
            snapshot_dir: snapshot_dir_from_env(),
            snapshot_budget: var::<u64>("GENIUS_KV_DISK_MIB")
                .map_or(defaults.snapshot_budget, |mib| mib.saturating_mul(MIB)),
            speculative: match std::env::var("GENIUS_SPECULATIVE").ok().as_deref() {
                None | Some("auto") => defaults.speculative,
                Some("off") => false,
                Some(other) => {
                    log::warn!("ignoring GENIUS_SPECULATIVE={other:?}: not `auto` or `off`");
                    defaults.speculative
                }
            },
            draft_model: parsed("GENIUS_DRAFT_MODEL"),
        }
    }
}

/// How many of a model's layers go to the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuLayers {
    /// Every layer, the output layer included.
    #[default]
    All,
    /// The first `n` layers; the rest run on the CPU. 0 offloads none.
    Count(u32),
}

impl std::str::FromStr for GpuLayers {
    type Err = String;

    /// `all` (or `max`, `auto`), or a number of layers.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if ["all", "max", "auto"]
            .iter()
            .any(|word| text.eq_ignore_ascii_case(word))
        {
            return Ok(Self::All);
        }
        // llama.cpp's own -1 means all of them too.
        if text == "-1" {
            return Ok(Self::All);
        }
        text.parse()
            .map(Self::Count)
            .map_err(|_| format!("`{text}` is neither `all` nor a number of layers"))
    }
}

impl std::fmt::Display for GpuLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Count(n) => write!(f, "{n}"),
        }
    }
}

/// Which devices hold a model's offloaded layers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Device {
    /// The GPUs llama.cpp finds (discrete ones first, else integrated);
    /// with none, everything runs on the CPU and a warning says why.
    #[default]
    Auto,
    /// The CPU only, even where a GPU is there.
    Cpu,
    /// These devices, by llama.cpp's names (`Vulkan0`, `CUDA1`); loading
    /// fails with [`GeniusError::DeviceUnavailable`] when one is not there.
    ///
    /// [`GeniusError::DeviceUnavailable`]: rusty_genius_core::GeniusError::DeviceUnavailable
    Named(Vec<String>),
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `auto`, `cpu` (or `none`), or device names separated by commas.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        if text.eq_ignore_ascii_case("cpu") || text.eq_ignore_ascii_case("none") {
            return Ok(Self::Cpu);
        }
        let names: Vec<String> = text
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect();
        if names.is_empty() {
            return Err(format!("`{text}` names no device"));
        }
        Ok(Self::Named(names))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Named(names) => f.write_str(&names.join(",")),
        }
    }
}

/// `$GENIUS_KV_DIR` (`off`, `0`, `false` or `none` for none), else
/// `$GENIUS_HOME/kv`, else the platform cache folder's `rusty-genius/kv`.
fn snapshot_dir_from_env() -> Option<PathBuf> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if let Some(dir) = env("GENIUS_KV_DIR") {
        let off = matches!(
            dir.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "none" | "no"
        );
        return (!off).then(|| PathBuf::from(dir));
    }
    env("GENIUS_HOME")
        .map(|home| PathBuf::from(home).join("kv"))
        .or_else(|| dirs::cache_dir().map(|dir| dir.join("rusty-genius").join("kv")))
}
