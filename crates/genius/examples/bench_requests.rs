//! Requests per second through the Orchestrator on the Pinky stub engine:
//! the cost of the machinery around an engine (channels, the event loop,
//! the engine thread), with an engine that costs nothing.
//!
//! ```text
//! cargo run --release -p rusty-genius --example bench_requests -- [requests]
//! ```
//!
//! Sends `requests` (default 20,000) one-token requests back to back
//! through the channel API, each answered before the next is sent, and
//! the same number through the handle, 64 in flight at a time.

#![allow(clippy::print_stdout)] // printing is its job

use std::time::Instant;

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius::core::InferenceConfig;
use rusty_genius::cortex::Pinky;
use rusty_genius::Orchestrator;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("bench-requests-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky")?;
    let model = model.display().to_string();
    let config = InferenceConfig::default().with_max_tokens(1);

    // The channel API: one request at a time, in order.
    let mut genius = Orchestrator::builder().pinky(Pinky::new()).build()?;
    let (mut input, rx) = mpsc::channel(16);
    let (tx, mut output) = mpsc::channel(64);
    let serving = async_std::task::spawn(async move { genius.run(rx, tx).await });
    input.send(BrainstemInput::LoadModel(model.clone())).await?;
    let started = Instant::now();
    for _ in 0..requests {
        input
            .send(BrainstemInput::Infer {
                prompt: "hi".into(),
                config: config.clone(),
            })
            .await?;
        while let Some(message) = output.next().await {
            match message {
                BrainstemOutput::Event(InferenceEvent::Complete) => break,
                BrainstemOutput::Error(err) => return Err(err.into()),
                _ => {}
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "channel API, one at a time: {requests} requests in {took:.2} s, {:.0} requests/s",
        requests as f64 / took
    );
    drop(input);
    drop(output);
    serving.await;

    // The handle: one at a time.
    let genius = Orchestrator::builder().pinky(Pinky::new()).build()?.start();
    genius.load(&model).await?;
    let started = Instant::now();
    for _ in 0..requests {
        let mut stream = genius.infer("hi", config.clone());
        while stream.next().await.is_some() {}
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "handle, one at a time: {requests} requests in {took:.2} s, {:.0} requests/s",
        requests as f64 / took
    );
    drop(genius);

    // The handle: 64 in flight.
    let genius = Orchestrator::builder().pinky(Pinky::new()).build()?.start();
    genius.load(&model).await?;
    let started = Instant::now();
    let mut done = 0;
    while done < requests {
        let batch = (requests - done).min(64);
        let streams = (0..batch).map(|_| {
            let mut stream = genius.infer("hi", config.clone());
            async move { while stream.next().await.is_some() {} }
        });
        futures::future::join_all(streams).await;
        done += batch;
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "handle, 64 in flight: {requests} requests in {took:.2} s, {:.0} requests/s",
        requests as f64 / took
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
