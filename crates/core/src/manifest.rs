//! Descriptions of models: where they come from and what they are.

use serde::{Deserialize, Serialize};

/// Where a model file lives on the HuggingFace Hub, and how to verify it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The name users ask for, e.g. `qwen-2.5-3b-instruct`.
    pub name: String,
    /// The Hub repository, `org/repo`.
    pub repo: String,
    /// The file inside the repository.
    pub filename: String,
    /// The quantisation, e.g. `Q4_K_M`.
    pub quantization: String,
    /// A branch, tag or commit; `main` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Lowercase hex sha256 of the file, checked after download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// What the engine reports about a model it loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name the model was requested by.
    pub name: String,
    /// Size of the context window in tokens.
    pub context_size: usize,
    /// Size of the model's vocabulary.
    pub vocab_size: usize,
    /// How many requests it decodes together.
    #[serde(default = "one")]
    pub parallel: usize,
    /// Whether it is an embedding model (it declares its own pooling).
    #[serde(default)]
    pub embeds: bool,
    /// Where its layers run: the backend, the devices, how many layers
    /// are offloaded to them.
    #[serde(default)]
    pub placement: Placement,
}

/// Where a loaded model's layers run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The backend the offloaded layers run on (`Vulkan`, `CUDA`,
    /// `Metal`), or `CPU` when none are offloaded.
    pub backend: String,
    /// The devices holding offloaded layers, each as its name and
    /// description (`Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits)`); empty
    /// when everything runs on the CPU.
    pub devices: Vec<String>,
    /// Layers offloaded to the devices. llama.cpp counts the output layer
    /// as one, so a model with 18 blocks has 19 layers to offload.
    pub gpu_layers: u32,
    /// The layers that could be offloaded (blocks and the output layer).
    pub layers: u32,
}

impl Placement {
    /// Everything on the CPU.
    pub fn cpu(layers: u32) -> Self {
        Self {
            backend: "CPU".to_owned(),
            devices: Vec::new(),
            gpu_layers: 0,
            layers,
        }
    }

    /// Whether any layer runs on a device other than the CPU.
    pub fn offloaded(&self) -> bool {
        self.gpu_layers > 0 && !self.devices.is_empty()
    }
}

impl Default for Placement {
    fn default() -> Self {
        Self::cpu(0)
    }
}

impl std::fmt::Display for Placement {
    /// `CPU`, or `Vulkan, 19/19 layers on Vulkan0: llvmpipe (…)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.offloaded() {
            return f.write_str("CPU");
        }
        write!(
            f,
            "{}, {}/{} layers on {}",
            self.backend,
            self.gpu_layers,
            self.layers,
            self.devices.join(" + ")
        )
    }
}

fn one() -> usize {
    1
}

/// Where a model the Orchestrator knows of is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelState {
    /// Its name is being resolved (maybe downloaded).
    Resolving,
    /// Resolved, and waiting for room under the residency limits.
    WaitingForRoom,
    /// Being loaded into memory.
    Loading,
    /// In memory, answering requests.
    Loaded,
    /// Unloaded (idle too long, evicted or unloaded on request); the
    /// next request for it loads it again.
    Unloaded,
}

/// One model the Orchestrator knows of: what
/// `OrchestratorHandle::models` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The name requests use for it.
    pub name: String,
    /// Where it is in its life.
    pub state: ModelState,
    /// Whether requests that name no model go to it.
    pub default: bool,
    /// Its estimated size in host memory, in bytes (weights, KV cache for
    /// `context × parallel` tokens, and working buffers); 0 until its
    /// file is resolved.
    pub memory_bytes: u64,
    /// Its estimated size in GPU memory, in bytes (the weights, KV cache
    /// and working buffers of its offloaded layers); 0 when nothing is
    /// offloaded.
    #[serde(default)]
    pub device_bytes: u64,
    /// Whether it is an embedding model.
    pub embeds: bool,
    /// What the engine reported when it loaded it (context per request,
    /// parallel requests), while it is loaded.
    pub info: Option<ModelInfo>,
    /// Requests it is answering now.
    pub running: usize,
    /// Requests waiting for it (to load, or for a place in its batch).
    pub queued: usize,
    /// How long it has been idle, when it is loaded and nothing runs.
    pub idle_for: Option<std::time::Duration>,
    /// How long it stays loaded once idle; `None`: until evicted.
    pub keep_alive: Option<std::time::Duration>,
}
