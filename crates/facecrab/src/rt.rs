//! The async runtime, kept at the edge.

use std::future::Future;
use std::time::Duration;

pub(crate) fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    async_std::task::spawn(future);
}

pub(crate) async fn sleep(duration: Duration) {
    async_std::task::sleep(duration).await;
}
