//! What an Orchestrator measures, read through its handle, on Pinky:
//! requests and how they ended, tokens read, served from the cache and
//! generated, latencies, loads, the engine's stats, and the bound on the
//! queue.

use std::time::Duration;

use facecrab::testing::TempDir;
use futures::StreamExt;
use rusty_genius_core::protocol::InferenceEvent;
use rusty_genius_core::{ErrorKind, GeniusError, InferenceConfig};
use rusty_genius_cortex::Pinky;
use rusty_genius_stem::testing::read_stream;
use rusty_genius_stem::{CortexStrategy, Orchestrator, OrchestratorHandle};

const LIMIT: Duration = Duration::from_secs(20);

/// A started Orchestrator on `pinky`, with at most `max_queue` waiting
/// requests if given, and its stand-in model's name.
async fn serve(pinky: Pinky, max_queue: Option<usize>) -> (OrchestratorHandle, String, TempDir) {
    let dir = TempDir::new("stem-metrics");
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    let mut builder = Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .pinky(pinky);
    if let Some(limit) = max_queue {
        builder = builder.max_queue(limit);
    }
    let genius = builder.build().unwrap().start();
    let name = model.display().to_string();
    genius.load(&name).await.unwrap();
    (genius, name, dir)
}

#[async_std::test]
async fn the_handle_counts_requests_tokens_cache_hits_and_latencies() {
    let pinky = Pinky::new().with_token_delay(Duration::from_millis(2));
    let (genius, model, _dir) = serve(pinky, None).await;
    let prompt = "a prompt long enough that its second reading comes from the cache";
    let first = read_stream(genius.infer(prompt, InferenceConfig::default()), LIMIT).await;
    let again = read_stream(genius.infer(prompt, InferenceConfig::default()), LIMIT).await;
    let (first, again) = (first.reply.usage().clone(), again.reply.usage().clone());
    assert!(again.cached_tokens > 0, "{again:?}");
    // Stopped by its reader after its first token.
    let mut stopped = genius.infer("one two three four", InferenceConfig::default());
    while let Some(event) = stopped.next().await {
        if matches!(event, Ok(InferenceEvent::Content(_))) {
            break;
        }
    }
    drop(stopped);
    // Refused before it runs.
    let bad = read_stream(genius.infer("  ", InferenceConfig::default()), LIMIT).await;
    assert!(bad.reply.error().is_some());

    let deadline = std::time::Instant::now() + LIMIT;
    let metrics = loop {
        let metrics = genius.metrics().await.unwrap();
        let m = metrics.model(&model).unwrap();
        if m.requests() == 4 && m.running == 0 || std::time::Instant::now() > deadline {
            break metrics;
        }
        async_std::task::sleep(Duration::from_millis(20)).await;
    };
    let m = metrics.model(&model).unwrap();
    assert_eq!(m.requests_completed, 2, "{m:?}");
    assert_eq!(m.requests_cancelled, 1, "{m:?}");
    assert_eq!(m.requests_failed, 1, "{m:?}");
    assert!(
        m.prompt_tokens >= (first.prompt_tokens + again.prompt_tokens) as u64,
        "{m:?}"
    );
    assert!(
        m.cached_prompt_tokens >= again.cached_tokens as u64,
        "{m:?}"
    );
    assert!(m.cache_hit_ratio() > 0.0 && m.cache_hit_ratio() < 1.0);
    assert!(
        m.generated_tokens >= (first.generated_tokens + again.generated_tokens) as u64,
        "{m:?}"
    );
    assert_eq!(m.time_to_first_token.count(), 3, "{m:?}");
    assert_eq!(m.request_duration.count(), 4, "{m:?}");
    assert_eq!(m.time_per_output_token.count(), 2, "{m:?}");
    assert_eq!((m.loads, m.evictions, m.hibernations), (1, 0, 0));
    assert!(m.resident);
    assert_eq!((m.running, m.queued), (0, 0));
    assert!(m.engine.steps > 0, "{:?}", m.engine);
    assert!(m.engine.kv_cells_used > 0, "{:?}", m.engine);
    assert_eq!(metrics.rejected_queue_full, 0);
}

#[async_std::test]
async fn past_the_queue_bound_requests_are_refused_at_once_and_the_rest_complete() {
    let pinky = Pinky::new()
        .with_capacity(1)
        .with_token_delay(Duration::from_millis(2));
    let (genius, model, _dir) = serve(pinky, Some(8)).await;
    let streams: Vec<_> = (0..60)
        .map(|i| genius.infer(format!("request {i}"), InferenceConfig::default()))
        .collect();
    let done = futures::future::join_all(streams.into_iter().map(|s| read_stream(s, LIMIT))).await;
    let mut answered = 0;
    let mut refused = 0;
    for streamed in &done {
        match streamed.reply.error() {
            None => {
                assert!(streamed.reply.completed);
                answered += 1;
            }
            Some(err) => {
                assert_eq!(err.kind, ErrorKind::Overloaded, "{err}");
                assert!(
                    matches!(err.error(), Some(GeniusError::QueueFull { limit: 8, .. })),
                    "{err}"
                );
                assert!(err.message.contains("--max-queue 8"), "{err}");
                refused += 1;
            }
        }
    }
    // One may be running and uncounted while eight wait.
    assert!((8..=9).contains(&answered), "{answered} answered");
    assert_eq!(answered + refused, 60);
    let metrics = genius.metrics().await.unwrap();
    assert_eq!(metrics.rejected_queue_full, refused as u64);
    assert_eq!(metrics.max_queue, Some(8));
    assert_eq!(
        metrics.model(&model).unwrap().requests_completed,
        answered as u64
    );
    // Once the queue has room, requests are taken again.
    let later = read_stream(genius.infer("later", InferenceConfig::default()), LIMIT).await;
    assert!(later.reply.completed && later.reply.error().is_none());
}
