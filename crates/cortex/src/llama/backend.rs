//! The process-wide llama.cpp backend, and llama.cpp's log lines sent to
//! the `log` facade.

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::{list_llama_ggml_backend_devices, LlamaBackendDevice, LlamaBackendDeviceType};
use rusty_genius_core::GeniusError;

use super::options::Device;
use super::sampling;

/// The process-wide llama.cpp backend, initialised on first use.
///
/// llama.cpp may be initialised only once per process; code that uses
/// `llama-cpp-2` beside this engine must take the backend from here.
pub fn llama_backend() -> Result<&'static LlamaBackend, GeniusError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // SAFETY: `forward_log` is a plain function that only reads the
            // NUL-terminated string llama.cpp passes it.
            unsafe { llama_cpp_sys_2::llama_log_set(Some(forward_log), std::ptr::null_mut()) };
            let backend =
                LlamaBackend::init().map_err(|err| format!("cannot initialise llama.cpp: {err}"));
            // Engines stop before the statics it just made are destroyed.
            crate::exit::guard_statics();
            backend
        })
        .as_ref()
        .map_err(|err| GeniusError::engine(err.clone()))
}

/// Sends llama.cpp's own log lines to the `log` facade (target `llama.cpp`).
unsafe extern "C" fn forward_log(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a valid NUL-terminated string for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    if level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR {
        sampling::note_error(text);
    }
    let level = match level {
        llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR => log::Level::Error,
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN => log::Level::Warn,
        llama_cpp_sys_2::GGML_LOG_LEVEL_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "llama.cpp", level, "{text}");
}

/// llama.cpp's version, as its ggml library gives it: a snapshot of the
/// KV cache is read only by the llama.cpp that wrote it.
pub(super) fn llama_version() -> String {
    // SAFETY: both return pointers to static NUL-terminated strings.
    let (version, commit) = unsafe {
        (
            CStr::from_ptr(llama_cpp_sys_2::ggml_version()),
            CStr::from_ptr(llama_cpp_sys_2::ggml_commit()),
        )
    };
    format!(
        "ggml {} ({}), llama-cpp-sys-2",
        version.to_string_lossy(),
        commit.to_string_lossy()
    )
}

/// The CPU features llama.cpp's kernels use here.
pub(super) fn system_info() -> String {
    // SAFETY: llama.cpp returns a pointer to a static NUL-terminated
    // string, rewritten only by this same call.
    let info = unsafe { CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    info.to_string_lossy().trim().to_owned()
}

/// The GPU backend compiled in, if any.
pub(super) fn gpu_backend() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "vulkan") {
        "vulkan"
    } else if cfg!(feature = "metal") {
        "metal"
    } else {
        "cpu"
    }
}

/// The devices that can hold offloaded layers (GPUs, integrated GPUs),
/// in llama.cpp's order. Empty in a CPU build, and where a GPU build finds
/// no driver or no device.
pub(super) fn gpu_devices() -> Vec<LlamaBackendDevice> {
    if llama_backend().is_err() {
        return Vec::new();
    }
    list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|device| {
            matches!(
                device.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            )
        })
        .collect()
}

/// The devices a model's offloaded layers go to, as `choice` asks: for
/// [`Device::Auto`] the discrete GPUs, else the integrated ones of the
/// first backend that has any, as llama.cpp picks by default; none for
/// [`Device::Cpu`]. A named device that is not there is an error that
/// lists those that are.
pub(super) fn choose_devices(choice: &Device) -> Result<Vec<LlamaBackendDevice>, GeniusError> {
    let found = gpu_devices();
    match choice {
        Device::Cpu => Ok(Vec::new()),
        Device::Auto => {
            let discrete: Vec<_> = found
                .iter()
                .filter(|d| d.device_type == LlamaBackendDeviceType::Gpu)
                .cloned()
                .collect();
            if !discrete.is_empty() {
                return Ok(discrete);
            }
            let first = found.first().map(|d| d.backend.clone());
            Ok(found
                .into_iter()
                .filter(|d| Some(&d.backend) == first.as_ref())
                .collect())
        }
        Device::Named(names) => names
            .iter()
            .map(|name| {
                found
                    .iter()
                    .find(|d| d.name.eq_ignore_ascii_case(name))
                    .cloned()
                    .ok_or_else(|| GeniusError::DeviceUnavailable {
                        device: name.clone(),
                        available: describe_available(&found),
                    })
            })
            .collect(),
    }
}

/// `this build sees Vulkan0 (llvmpipe …)`, or why it sees none.
fn describe_available(found: &[LlamaBackendDevice]) -> String {
    if found.is_empty() {
        return match gpu_backend() {
            "cpu" => {
                "this build has no GPU backend: build with the `vulkan`, `cuda` or `metal` feature"
                    .to_owned()
            }
            backend => format!(
                "this {backend} build finds no {backend} device: {}",
                missing_driver_hint()
            ),
        };
    }
    let listed: Vec<String> = found.iter().map(describe).collect();
    format!("this build sees {}", listed.join(", "))
}

/// What to check when a GPU build finds no device.
pub(super) fn missing_driver_hint() -> &'static str {
    match gpu_backend() {
        "vulkan" => "is a Vulkan driver installed (`vulkaninfo --summary` lists it)? Mesa's CPU driver, lavapipe, is used only when GGML_VK_VISIBLE_DEVICES names it",
        "cuda" => "is the NVIDIA driver installed and the GPU visible (`nvidia-smi`, CUDA_VISIBLE_DEVICES)?",
        _ => "is the GPU's driver installed?",
    }
}

/// `Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits)`.
pub(super) fn describe(device: &LlamaBackendDevice) -> String {
    if device.description.is_empty() {
        device.name.clone()
    } else {
        format!("{}: {}", device.name, device.description)
    }
}
