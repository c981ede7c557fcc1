//! When the Orchestrator frees the model.

use std::time::Duration;

/// How long a loaded model stays in memory when nothing uses it. Each
/// model counts its own idle time; a request's `keep_alive` overrides this
/// for its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CortexStrategy {
    /// Unload after every inference (unless another `Infer` is already
    /// queued). The next `Infer` loads the model again.
    Immediate,
    /// Unload once the model has been idle this long. The idle time counts
    /// from the end of the last load or inference; a running inference is
    /// never interrupted. The next `Infer` loads the model again.
    HibernateAfter(Duration),
    /// Keep the model loaded until it is evicted to make room for another
    /// (see [`Residency`](crate::Residency)), unloaded, or the
    /// Orchestrator shuts down.
    KeepAlive,
}

impl Default for CortexStrategy {
    /// `HibernateAfter(5 minutes)`.
    fn default() -> Self {
        Self::HibernateAfter(Duration::from_secs(5 * 60))
    }
}
