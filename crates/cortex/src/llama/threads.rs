//! A context's thread count, set for each step from the step's lease of
//! cores, and the callback that stops a step early: when the process
//! exits, and, for a step that gives nobody a token (a long prompt alone),
//! when a request arrives or another model waits for the cores.
//!
//! llama-cpp-2 (0.1.160) sets a context's threads only when the context
//! is made, and has neither `llama_set_n_threads` nor
//! `llama_set_abort_callback`, nor a way to reach the context's pointer
//! to call them through llama-cpp-sys-2 — except its `Debug` output,
//! which prints that pointer. [`Control::of`] reads it there once per
//! context and accepts it only if llama.cpp, asked through it, names the
//! context's own model (whose pointer `LlamaModel`'s transparent layout
//! gives) and the context's own sizes. Where it cannot, the context keeps
//! the threads it was made with and a warning says so.
//!
//! The model's sliding attention window ([`sliding_window`]) is another
//! fact llama-cpp-2 does not give, read through the same model pointer.

use std::cell::Cell;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_sys_2::{llama_context, llama_model};

use crate::engine::Knock;

/// What may stop a step early, read by llama.cpp between the operations
/// of a step (an atomic load each).
#[derive(Debug)]
pub(super) struct Stops {
    /// Set while a step that may stop early runs.
    armed: AtomicBool,
    /// Raised when a request arrives for this engine.
    knock: OnceLock<Knock>,
    /// Raised when another model waits for cores this one holds.
    nudge: Arc<AtomicBool>,
}

impl Stops {
    /// Stops made of the engine's scheduler `nudge`.
    pub(super) fn new(nudge: Arc<AtomicBool>) -> Self {
        Self {
            armed: AtomicBool::new(false),
            knock: OnceLock::new(),
            nudge,
        }
    }

    /// The engine thread's knock, once it is given.
    pub(super) fn listen(&self, knock: Knock) {
        let _ = self.knock.set(knock);
    }

    /// Whether the next step may stop early.
    pub(super) fn arm(&self, armed: bool) {
        self.armed.store(armed, Ordering::Release);
    }

    /// Whether a step should stop now.
    fn should_stop(&self) -> bool {
        crate::exit::closing()
            || (self.armed.load(Ordering::Acquire)
                && (self.knock.get().is_some_and(Knock::is_raised)
                    || self.nudge.load(Ordering::Acquire)))
    }
}

/// A context's settings that llama-cpp-2 does not reach.
#[derive(Debug)]
pub(super) struct Control {
    context: NonNull<llama_context>,
    /// The threads it computes with now.
    threads: Cell<i32>,
}

impl Control {
    /// The control of `context`, made from `model` with `threads`, its
    /// steps stopped early by `stops` (which must outlive the context);
    /// `None` when its pointer cannot be found and checked.
    pub(super) fn of(
        context: &LlamaContext<'_>,
        model: &LlamaModel,
        threads: i32,
        stops: &Arc<Stops>,
    ) -> Option<Self> {
        let shown = format!("{context:?}");
        let hex = shown
            .strip_prefix("LlamaContext { context: 0x")?
            .strip_suffix(" }")?;
        let address = usize::from_str_radix(hex, 16).ok()?;
        if address % std::mem::align_of::<usize>() != 0 {
            return None;
        }
        let candidate = NonNull::new(address as *mut llama_context)?;
        let model_pointer = model_pointer(model);
        // SAFETY: `candidate` is the pointer the live context prints as
        // its own (the exact shape of llama-cpp-2's `Debug` was checked
        // above); these calls only read its fields.
        let (owner, n_ctx, n_batch, n_ubatch) = unsafe {
            let pointer = candidate.as_ptr().cast_const();
            (
                llama_cpp_sys_2::llama_get_model(pointer),
                llama_cpp_sys_2::llama_n_ctx(pointer),
                llama_cpp_sys_2::llama_n_batch(pointer),
                llama_cpp_sys_2::llama_n_ubatch(pointer),
            )
        };
        let same = owner == model_pointer
            && n_ctx == context.n_ctx()
            && n_batch == context.n_batch()
            && n_ubatch == context.n_ubatch();
        if !same {
            return None;
        }
        let control = Self {
            context: candidate,
            threads: Cell::new(threads),
        };
        // SAFETY: the pointer was checked above; `stop_early` lives as
        // long as the program and only reads atomics of `stops`, which the
        // engine keeps (in an `Arc`) for longer than its contexts.
        unsafe {
            llama_cpp_sys_2::llama_set_abort_callback(
                control.context.as_ptr(),
                Some(stop_early),
                Arc::as_ptr(stops).cast_mut().cast(),
            );
        }
        Some(control)
    }

    /// The threads of the context's next computations.
    pub(super) fn set_threads(&self, threads: usize) {
        let threads = i32::try_from(threads.max(1)).unwrap_or(i32::MAX);
        if self.threads.replace(threads) != threads {
            // SAFETY: the pointer was checked when this was made, and the
            // context outlives its control (both live in the model's cell,
            // and the engine thread is the only one that uses them).
            unsafe {
                llama_cpp_sys_2::llama_set_n_threads(self.context.as_ptr(), threads, threads);
            }
        }
    }
}

/// The llama.cpp pointer of `model`.
fn model_pointer(model: &LlamaModel) -> *const llama_model {
    // SAFETY: `LlamaModel` is `#[repr(transparent)]` over llama-cpp-2's
    // `Ptr`, itself `#[repr(transparent)]` over `NonNull<llama_model>`,
    // so a reference to the model points at the model's pointer.
    unsafe { *(model as *const LlamaModel).cast::<*const llama_model>() }
}

/// How many positions back the sliding-window attention layers of
/// `model` see (Gemma 2 and 3, for instance); 0 when it has none.
pub(super) fn sliding_window(model: &LlamaModel) -> usize {
    // SAFETY: the pointer is the live model's own; the call reads one of
    // its hyperparameters.
    let window = unsafe { llama_cpp_sys_2::llama_model_n_swa(model_pointer(model)) };
    usize::try_from(window).unwrap_or(0)
}

/// llama.cpp's abort callback, asked between the operations of a step.
unsafe extern "C" fn stop_early(stops: *mut c_void) -> bool {
    // SAFETY: llama.cpp passes back the pointer `Control::of` gave it, to
    // `Stops` the engine keeps alive for longer than the context.
    let stops = unsafe { &*stops.cast::<Stops>() };
    stops.should_stop()
}
