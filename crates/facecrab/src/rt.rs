//! The async runtime, kept at the edge: everything facecrab needs from
//! async-std goes through here.

use std::future::Future;
use std::time::Duration;

/// Completes after `duration`.
pub(crate) async fn sleep(duration: Duration) {
    async_std::task::sleep(duration).await;
}

/// `future`'s output, or `Err(Elapsed)` if it takes longer than `limit`.
pub(crate) async fn timeout<F: Future>(limit: Duration, future: F) -> Result<F::Output, Elapsed> {
    async_std::future::timeout(limit, future)
        .await
        .map_err(|_| Elapsed)
}

/// A [`timeout`] ran out.
#[derive(Debug)]
pub(crate) struct Elapsed;
