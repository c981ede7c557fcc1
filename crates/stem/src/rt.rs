//! The async runtime, kept at the edge: everything stem needs from
//! async-std goes through here.

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs `future` in the background.
pub(crate) fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    async_std::task::spawn(future);
}

/// Completes at `deadline` (at once if it has passed).
pub(crate) async fn sleep_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left > Duration::ZERO {
        async_std::task::sleep(left).await;
    }
}

/// Runs `work`, which blocks (file system calls), off the executor's
/// threads.
pub(crate) async fn blocking<T, F>(work: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    async_std::task::spawn_blocking(work).await
}
