//! The flag that ends a request early, shared by whoever may cancel it and
//! the request's output, which the engine watches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Ends a request early when [`cancel`](Self::cancel)led.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the request to stop; it ends within one step of the engine.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
