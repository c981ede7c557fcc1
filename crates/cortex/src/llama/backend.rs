//! The process-wide llama.cpp backend, and llama.cpp's log lines sent to
//! the `log` facade.

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use rusty_genius_core::GeniusError;

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
            LlamaBackend::init().map_err(|err| format!("cannot initialise llama.cpp: {err}"))
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
