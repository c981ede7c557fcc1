//! The engine's own thread: its handle never blocks an async caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use facecrab::testing::TempDir;
use futures::StreamExt;
use rusty_genius_cortex::{Engine, EngineReport, EngineThread, Pinky};

fn slow_loading_thread(
    dir: &TempDir,
) -> (
    EngineThread,
    futures::channel::mpsc::UnboundedReceiver<EngineReport>,
) {
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF").unwrap();
    let pinky = Pinky::new().with_load_delay(Duration::from_millis(1500));
    let (thread, reports) = EngineThread::spawn(Arc::new(move || {
        Ok(Box::new(pinky.clone()) as Box<dyn Engine>)
    }))
    .unwrap();
    thread.load("pinky", model);
    (thread, reports)
}

#[test]
fn dropping_the_handle_returns_at_once_while_the_engine_is_busy() {
    let dir = TempDir::new("engine-drop");
    let (thread, mut reports) = slow_loading_thread(&dir);
    let started = Instant::now();
    drop(thread);
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "drop blocked for {took:?}"
    );
    // The thread still finishes its command and then goes away.
    let report = futures::executor::block_on(reports.next());
    assert!(
        matches!(report, Some(EngineReport::Loaded(Ok(_)))),
        "{report:?}"
    );
    assert!(futures::executor::block_on(reports.next()).is_none());
}

#[test]
fn shutdown_is_a_future_that_ends_when_the_thread_has() {
    let dir = TempDir::new("engine-shutdown");
    let (thread, mut reports) = slow_loading_thread(&dir);
    let started = Instant::now();
    let mut shutdown = Box::pin(thread.shutdown());
    let first_poll = futures::executor::block_on(async { futures::poll!(shutdown.as_mut()) });
    assert!(first_poll.is_pending());
    assert!(started.elapsed() < Duration::from_millis(200));
    futures::executor::block_on(shutdown);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "ended before the load it was busy with"
    );
    let report = futures::executor::block_on(reports.next());
    assert!(
        matches!(report, Some(EngineReport::Loaded(Ok(_)))),
        "{report:?}"
    );
}
