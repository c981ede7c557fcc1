//! The async runtime, kept at the edge: everything stem needs from
//! async-std goes through here.

use std::time::{Duration, Instant};

/// Completes at `deadline` (at once if it has passed).
pub(crate) async fn sleep_until(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left > Duration::ZERO {
        async_std::task::sleep(left).await;
    }
}
