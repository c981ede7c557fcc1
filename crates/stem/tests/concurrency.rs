//! Many requests at once through an [`OrchestratorHandle`], on Pinky: a
//! stream per request, batching, cancellation and slow readers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use facecrab::testing::TempDir;
use futures::future::join_all;
use futures::StreamExt;
use rusty_genius_core::protocol::{BrainstemOutput, EngineStatus, FinishReason, InferenceEvent};
use rusty_genius_core::{ErrorKind, InferenceConfig};
use rusty_genius_cortex::{Pinky, MAX_BACKLOG};
use rusty_genius_stem::testing::{read_stream, ready_events, RecordingEngine, Usages};
use rusty_genius_stem::{CortexStrategy, Orchestrator, OrchestratorHandle};

const LIMIT: Duration = Duration::from_secs(20);

/// A started Orchestrator on `pinky` with its stand-in model loaded.
struct Served {
    genius: OrchestratorHandle,
    usages: Usages,
    peak: Arc<AtomicUsize>,
    _dir: TempDir,
}

async fn serve(pinky: Pinky, strategy: CortexStrategy) -> Served {
    let dir = TempDir::new("stem-concurrency");
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    let usages: Usages = Arc::default();
    let peak = Arc::new(AtomicUsize::new(0));
    let (recorded, most) = (usages.clone(), peak.clone());
    let genius = Orchestrator::builder()
        .strategy(strategy)
        .engine(move || {
            Ok(RecordingEngine::new(pinky.clone(), recorded.clone()).with_peak(most.clone()))
        })
        .build()
        .unwrap()
        .start();
    genius.load(&model.display().to_string()).await.unwrap();
    Served {
        genius,
        usages,
        peak,
        _dir: dir,
    }
}

fn words(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i} ")).collect()
}

#[async_std::test]
async fn four_requests_stream_together_each_with_its_own_answer() {
    let pinky = Pinky::new().with_token_delay(Duration::from_millis(10));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let prompts = [
        "one two three four five six",
        "alpha beta gamma delta epsilon zeta",
        "red orange yellow green blue indigo",
        "do re mi fa so la",
    ];
    let streams = prompts.map(|p| s.genius.infer(p, InferenceConfig::default()));
    let done = join_all(streams.map(|stream| read_stream(stream, LIMIT))).await;
    let first_end = done.iter().map(|d| d.ended).min().unwrap();
    for (prompt, streamed) in prompts.iter().zip(&done) {
        assert_eq!(streamed.reply.text, format!("Narf! You said: {prompt}"));
        assert!(streamed.reply.completed);
        // Every answer was under way before any was over.
        assert!(streamed.first_content.unwrap() < first_end);
    }
    assert_eq!(s.peak.load(Ordering::Relaxed), 4);
}

#[async_std::test]
async fn sixteen_requests_on_four_places_all_complete_four_at_a_time() {
    let pinky = Pinky::new()
        .with_capacity(4)
        .with_token_delay(Duration::from_millis(2));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let prompts: Vec<String> = (0..16).map(|i| format!("request number {i}")).collect();
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| s.genius.infer(p.clone(), InferenceConfig::default()))
        .collect();
    let done = join_all(streams.into_iter().map(|st| read_stream(st, LIMIT))).await;
    for (prompt, streamed) in prompts.iter().zip(&done) {
        assert_eq!(streamed.reply.text, format!("Narf! You said: {prompt}"));
        assert_eq!(
            streamed.reply.usage().finish_reason,
            FinishReason::EndOfGeneration
        );
    }
    assert_eq!(
        s.peak.load(Ordering::Relaxed),
        4,
        "never more than 4 at once"
    );
}

#[async_std::test]
async fn dropping_a_stream_cancels_that_request_and_no_other() {
    let pinky = Pinky::new()
        .with_script(words(200))
        .with_token_delay(Duration::from_millis(5));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let config = InferenceConfig::default;
    let keep = [s.genius.infer("a", config()), s.genius.infer("b", config())];
    let mut dropped = s.genius.infer("c", config());
    let mut seen = 0;
    while seen < 10 {
        if let Some(Ok(InferenceEvent::Content(_))) = dropped.next().await {
            seen += 1;
        }
    }
    drop(dropped);
    let kept = join_all(keep.map(|st| read_stream(st, LIMIT))).await;
    for streamed in &kept {
        assert_eq!(streamed.reply.usage().generated_tokens, 200);
        assert_eq!(streamed.reply.text, words(200).concat());
    }
    let usages = s.usages.lock().unwrap().clone();
    let cancelled: Vec<_> = usages
        .iter()
        .filter(|u| u.finish_reason == FinishReason::Cancelled)
        .collect();
    assert_eq!(cancelled.len(), 1, "{usages:?}");
    // The reader kept up, so what it had not read yet is at most a token
    // or two; the engine then stopped within two more.
    assert!(
        cancelled[0].generated_tokens <= seen + 4,
        "{} tokens after {seen} were read",
        cancelled[0].generated_tokens
    );
}

#[async_std::test]
async fn stop_ends_one_request_with_its_usage_and_complete() {
    let pinky = Pinky::new()
        .with_script(words(100))
        .with_token_delay(Duration::from_millis(5));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let other = s.genius.infer("other", InferenceConfig::default());
    let mut stopped = s.genius.infer("stopped", InferenceConfig::default());
    let other = async_std::task::spawn(read_stream(other, LIMIT));
    let mut seen = 0;
    while seen < 10 {
        if let Some(Ok(InferenceEvent::Content(_))) = stopped.next().await {
            seen += 1;
        }
    }
    stopped.stop();
    let stopped = read_stream(stopped, LIMIT).await;
    assert!(stopped.reply.completed);
    let usage = stopped.reply.usage();
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    assert!(usage.generated_tokens <= seen + 4, "{usage:?}");
    let other = other.await;
    assert_eq!(other.reply.usage().generated_tokens, 100);
}

#[async_std::test]
async fn a_stream_that_is_not_read_pauses_its_request_alone() {
    let long = words(MAX_BACKLOG * 2);
    let pinky = Pinky::new()
        .with_replies([long.clone(), words(50), words(50), words(50)])
        .with_token_delay(Duration::from_millis(2));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let mut unread = s.genius.infer("slow reader", InferenceConfig::default());
    let others: Vec<_> = ["b", "c", "d"]
        .iter()
        .map(|p| s.genius.infer(*p, InferenceConfig::default()))
        .collect();
    let started = Instant::now();
    let done = join_all(others.into_iter().map(|st| read_stream(st, LIMIT))).await;
    for streamed in &done {
        assert_eq!(streamed.reply.usage().generated_tokens, 50);
    }
    // Unpaused, the long answer would be over in 2 ms x 512 tokens; give
    // it twice that and more, then see what waits for the reader.
    async_std::task::sleep(Duration::from_millis(1500).saturating_sub(started.elapsed())).await;
    let waiting = ready_events(&mut unread).len();
    assert!(
        waiting <= MAX_BACKLOG + 4,
        "{waiting} events piled up for a reader that read nothing"
    );
    // Read again, it resumes where it paused and loses nothing.
    let rest = read_stream(unread, LIMIT).await;
    assert_eq!(rest.reply.usage().generated_tokens, long.len());
    assert_eq!(
        rest.reply.usage().finish_reason,
        FinishReason::EndOfGeneration
    );
}

#[async_std::test]
async fn a_bad_request_gets_its_error_on_its_own_stream() {
    let pinky = Pinky::new().with_token_delay(Duration::from_millis(2));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let good = s.genius.infer("fine words", InferenceConfig::default());
    let bad = s.genius.infer("   ", InferenceConfig::default());
    let too_long = s
        .genius
        .infer("x".repeat(10_000), InferenceConfig::default());
    let (good, bad, too_long) = futures::join!(
        read_stream(good, LIMIT),
        read_stream(bad, LIMIT),
        read_stream(too_long, LIMIT)
    );
    assert_eq!(good.reply.text, "Narf! You said: fine words");
    assert!(good.reply.errors.is_empty());
    assert_eq!(bad.reply.error().unwrap().kind, ErrorKind::InvalidRequest);
    assert_eq!(
        too_long.reply.error().unwrap().kind,
        ErrorKind::ContextExceeded
    );
    assert!(!bad.reply.completed && !too_long.reply.completed);
}

#[async_std::test]
async fn shutdown_ends_every_running_and_waiting_request_with_an_end() {
    let pinky = Pinky::new()
        .with_capacity(2)
        .with_script(words(1000))
        .with_token_delay(Duration::from_millis(5));
    let s = serve(pinky, CortexStrategy::KeepAlive).await;
    let streams: Vec<_> = (0..5)
        .map(|i| s.genius.infer(format!("r{i}"), InferenceConfig::default()))
        .collect();
    async_std::task::sleep(Duration::from_millis(100)).await;
    let mut events = s.genius.events();
    s.genius.shutdown();
    let late = s.genius.infer("too late", InferenceConfig::default());
    let done = join_all(streams.into_iter().map(|st| read_stream(st, LIMIT))).await;
    for streamed in &done {
        let ended = streamed.reply.completed || !streamed.reply.errors.is_empty();
        assert!(ended, "{}", streamed.reply.event_list());
        if streamed.reply.completed {
            let usage = streamed.reply.usage();
            assert_eq!(usage.finish_reason, FinishReason::Cancelled);
            assert!(usage.generated_tokens < 1000);
        }
    }
    let started = done.iter().filter(|d| d.reply.usage.is_some()).count();
    assert!(started >= 2, "the two running requests end with usage");
    let late = read_stream(late, LIMIT).await;
    assert_eq!(late.reply.error().unwrap().kind, ErrorKind::ShutDown);
    // Once the loop has ended, requests and loads are still answered.
    while events.next().await.is_some() {}
    let later = read_stream(s.genius.infer("later", InferenceConfig::default()), LIMIT).await;
    assert_eq!(later.reply.error().unwrap().kind, ErrorKind::ShutDown);
    let load = s.genius.load("anything").await;
    assert_eq!(load.unwrap_err().kind, ErrorKind::ShutDown);
}

#[async_std::test]
async fn hibernation_waits_until_every_request_is_done() {
    let ttl = Duration::from_millis(100);
    let pinky = Pinky::new()
        .with_replies([words(5), words(80)])
        .with_token_delay(Duration::from_millis(5));
    let s = serve(pinky, CortexStrategy::HibernateAfter(ttl)).await;
    let mut events = s.genius.events();
    let short = s.genius.infer("short", InferenceConfig::default());
    let long = s.genius.infer("long", InferenceConfig::default());
    let (short, long) = futures::join!(read_stream(short, LIMIT), read_stream(long, LIMIT));
    assert_eq!(short.reply.usage().generated_tokens, 5);
    assert_eq!(long.reply.usage().generated_tokens, 80);
    // 80 tokens take 400 ms, four TTLs, after the short one ended; the
    // model hibernates only once both are done.
    let hibernated = async_std::future::timeout(LIMIT, async {
        while let Some(output) = events.next().await {
            if let BrainstemOutput::Status(EngineStatus::Hibernated(_)) = output {
                return Instant::now();
            }
        }
        panic!("events ended")
    })
    .await
    .expect("hibernated in time");
    assert!(hibernated >= long.ended, "hibernated while a request ran");
}
