//! Many requests at once on a real model: gemma-3-270m decoding several
//! sequences in one batch, each request with a stream of its own.
//!
//! The model file is named by `GENIUS_TEST_MODEL` (`.ci/fetch-model.sh`
//! prints its path); without it these tests are skipped with a message,
//! except under CI, where a missing model fails them.

#![cfg(feature = "llama")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use rusty_genius::core::protocol::{FinishReason, InferenceEvent};
use rusty_genius::core::{InferenceConfig, PromptFormat};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions, MAX_BACKLOG};
use rusty_genius::facecrab::testing::GEMMA;
use rusty_genius::stem::testing::{
    read_stream, ready_events, wait_for_usages, RecordingEngine, Usages, MIN_MARGIN,
    SEQUENCE_PROMPTS,
};
use rusty_genius::{Orchestrator, OrchestratorHandle};

const LIMIT: Duration = Duration::from_secs(300);

/// Prompts with long greedy continuations, for the tests that compare no
/// text across batches.
const SEQUENCES: [&str; 4] = [
    SEQUENCE_PROMPTS[0],
    SEQUENCE_PROMPTS[1],
    SEQUENCE_PROMPTS[2],
    SEQUENCE_PROMPTS[3],
];

/// Four of the candidate prompts whose greedy answers of `tokens` tokens
/// are firm on this CPU (every token chosen by at least `MIN_MARGIN`), with
/// those answers, measured alone on `served`. Answers compared across
/// batches differ only by rounding, which a firm choice survives; which
/// prompts are firm depends on the CPU's kernels.
async fn firm_sequences(served: &Served, tokens: usize) -> Vec<(&'static str, String)> {
    let mut firm = Vec::new();
    let mut seen = Vec::new();
    for prompt in SEQUENCE_PROMPTS {
        let streamed = read_stream(served.genius.infer(prompt, greedy(tokens)), LIMIT).await;
        assert_eq!(streamed.reply.usage().generated_tokens, tokens);
        let margin = streamed.reply.smallest_margin().unwrap_or(f32::INFINITY);
        seen.push((prompt, margin));
        if margin >= MIN_MARGIN {
            firm.push((prompt, streamed.reply.text));
            if firm.len() == 4 {
                break;
            }
        }
    }
    #[allow(clippy::print_stderr)] // the measured margins go to the test log
    {
        eprintln!("smallest margins, alone: {seen:?}");
    }
    assert_eq!(
        firm.len(),
        4,
        "fewer than four candidate prompts are firm here: {seen:?}"
    );
    firm
}

/// Real-model tests share two cores: one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

/// gemma in an Orchestrator serving `parallel` requests at once, with
/// what its engine recorded.
struct Served {
    genius: OrchestratorHandle,
    usages: Usages,
    peak: Arc<AtomicUsize>,
}

async fn serve(parallel: u32) -> Option<Served> {
    let model = GEMMA.for_test()?;
    let options = LlamaOptions {
        context_size: 1024,
        parallel,
        ..LlamaOptions::default()
    };
    let usages = Usages::default();
    let peak = Arc::new(AtomicUsize::new(0));
    let (recorded, most) = (usages.clone(), peak.clone());
    let genius = Orchestrator::builder()
        .engine(move || {
            let engine = LlamaEngine::new(options.clone())?;
            Ok(RecordingEngine::new(engine, recorded.clone()).with_peak(most.clone()))
        })
        .build()
        .unwrap()
        .start();
    let info = genius.load(&model.display().to_string()).await.unwrap();
    assert_eq!(
        info.context_size, 1024,
        "each request gets the whole context"
    );
    Some(Served {
        genius,
        usages,
        peak,
    })
}

fn greedy(max_tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy()
        .with_max_tokens(max_tokens)
        .with_prompt_format(PromptFormat::Raw)
        .with_logprobs(2)
}

#[async_std::test]
async fn four_greedy_requests_interleave_and_each_answers_as_it_would_alone() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(alone) = serve(4).await else { return };
    // The comparison below is portable only if no token is a near tie.
    let firm = firm_sequences(&alone, 14).await;
    drop(alone);

    // A fresh engine, so that no slot holds these prompts already.
    let together = serve(4).await.unwrap();
    let streams: Vec<_> = firm
        .iter()
        .map(|(prompt, _)| together.genius.infer(*prompt, greedy(14)))
        .collect();
    let done = join_all(streams.into_iter().map(|stream| read_stream(stream, LIMIT))).await;
    let first_end = done.iter().map(|d| d.ended).min().unwrap();
    for ((prompt, text), streamed) in firm.iter().zip(&done) {
        assert_eq!(&streamed.reply.text, text, "{prompt:?} together vs alone");
        assert_eq!(streamed.reply.usage().cached_tokens, 0);
        assert!(
            streamed.first_content.unwrap() < first_end,
            "{prompt:?} began only after another request had ended"
        );
    }
    assert_eq!(together.peak.load(Ordering::Relaxed), 4);
}

#[async_std::test]
async fn a_short_request_answers_while_a_long_one_generates() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(s) = serve(4).await else { return };
    let mut long = s.genius.infer(SEQUENCES[0], greedy(400));
    // Wait until the long answer is flowing.
    while !matches!(long.next().await, Some(Ok(InferenceEvent::Content(_)))) {}
    let short = s.genius.infer(SEQUENCES[1], greedy(6));
    let short = read_stream(short, LIMIT).await;
    assert_eq!(short.reply.usage().generated_tokens, 6);
    // The long request is still going: the short one did not wait for it.
    long.stop();
    let long = read_stream(long, LIMIT).await;
    let usage = long.reply.usage();
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    assert!(usage.generated_tokens < 400, "{usage:?}");
}

#[async_std::test]
async fn dropping_one_stream_cancels_that_request_within_two_tokens() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(s) = serve(4).await else { return };
    let kept: Vec<_> = SEQUENCES[1..]
        .iter()
        .map(|prompt| s.genius.infer(*prompt, greedy(40)))
        .collect();
    let mut dropped = s.genius.infer(SEQUENCES[0], greedy(40));
    let mut tokens = 0;
    while tokens < 5 {
        if let Some(Ok(InferenceEvent::Logprobs(_))) = dropped.next().await {
            tokens += 1;
        }
    }
    // Tokens already generated but not read yet count as seen too.
    tokens += ready_events(&mut dropped)
        .iter()
        .filter(|event| matches!(event, Ok(InferenceEvent::Logprobs(_))))
        .count();
    drop(dropped);
    let done = join_all(kept.into_iter().map(|stream| read_stream(stream, LIMIT))).await;
    for streamed in &done {
        assert_eq!(streamed.reply.usage().generated_tokens, 40);
    }
    let usages = wait_for_usages(&s.usages, 4, LIMIT).await;
    let cancelled: Vec<_> = usages
        .iter()
        .filter(|u| u.finish_reason == FinishReason::Cancelled)
        .collect();
    assert_eq!(cancelled.len(), 1, "{usages:?}");
    assert!(
        cancelled[0].generated_tokens <= tokens + 2,
        "{} tokens generated after {tokens} were seen",
        cancelled[0].generated_tokens
    );
}

#[async_std::test]
async fn an_unread_stream_pauses_and_the_others_finish() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(s) = serve(4).await else { return };
    // More events than may wait for a reader (a token and its
    // log-probabilities each), so the unread request must pause.
    let mut unread = s.genius.infer(SEQUENCES[0], greedy(200));
    let started = std::time::Instant::now();
    let read: Vec<_> = SEQUENCES[1..]
        .iter()
        .map(|prompt| s.genius.infer(*prompt, greedy(60)))
        .collect();
    let done = join_all(read.into_iter().map(|stream| read_stream(stream, LIMIT))).await;
    for streamed in &done {
        assert_eq!(streamed.reply.usage().generated_tokens, 60);
    }
    // Left unread for 10 s (the whole answer takes about 4 s here), it
    // waits with at most a backlog's worth of events.
    async_std::task::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    let waiting = ready_events(&mut unread).len();
    assert!(
        waiting <= MAX_BACKLOG + 4,
        "{waiting} events piled up for a reader that read nothing"
    );
    // The paused request lost nothing: read now, it finishes.
    let rest = read_stream(unread, LIMIT).await;
    assert_eq!(rest.reply.usage().generated_tokens, 200);
    assert_eq!(rest.reply.usage().finish_reason, FinishReason::MaxTokens);
}

#[async_std::test]
async fn sixteen_requests_on_four_slots_all_complete() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(alone) = serve(4).await else { return };
    let firm = firm_sequences(&alone, 14).await;
    drop(alone);
    // A fresh engine: each prompt's first run here is in a shared batch.
    let s = serve(4).await.unwrap();
    let streams: Vec<_> = (0..16)
        .map(|i| s.genius.infer(firm[i % 4].0, greedy(14)))
        .collect();
    let done = join_all(streams.into_iter().map(|stream| read_stream(stream, LIMIT))).await;
    for streamed in &done {
        assert!(streamed.reply.completed, "{}", streamed.reply.event_list());
        assert_eq!(streamed.reply.usage().generated_tokens, 14);
    }
    // Same prompt, same greedy answer, whichever slot and batch it ran in.
    for (i, streamed) in done.iter().enumerate() {
        assert_eq!(streamed.reply.text, firm[i % 4].1);
    }
    assert_eq!(s.peak.load(Ordering::Relaxed), 4);
}

/// A preamble of some 180 tokens, for prompts that share a long prefix.
const PREAMBLE: &str = "Notes from a workshop on counting. Children learn to count by \
    saying numbers aloud in order, then by tens, then backwards. Teachers write short \
    sequences on the board and ask the class to go on with them: the days of the week, the \
    months of the year, letters of the alphabet, even numbers and odd ones. A sequence is \
    easy to continue when each item follows from the one before it by the same rule, and \
    hard when the rule changes halfway. The workshop collected many such exercises from \
    schools in several countries, and found that the simplest ones were used everywhere: \
    counting up by one, counting by twos and fives and tens, and counting down from a \
    hundred. What follows is one of the exercises, copied from the board exactly as it was \
    written, with the class's answer after it.\n\n";

/// Candidate prompts that share [`PREAMBLE`], with their greedy answers
/// alone, for those firm on this CPU (as [`firm_sequences`] picks them).
async fn firm_with_preamble(
    served: &Served,
    tokens: usize,
    wanted: usize,
) -> Vec<(String, String)> {
    let mut firm = Vec::new();
    let mut seen = Vec::new();
    for sequence in SEQUENCE_PROMPTS {
        let prompt = format!("{PREAMBLE}{sequence}");
        let streamed =
            read_stream(served.genius.infer(prompt.as_str(), greedy(tokens)), LIMIT).await;
        let margin = streamed.reply.smallest_margin().unwrap_or(f32::INFINITY);
        seen.push((sequence, margin));
        if margin >= MIN_MARGIN {
            firm.push((prompt, streamed.reply.text));
            if firm.len() == wanted {
                break;
            }
        }
    }
    #[allow(clippy::print_stderr)] // the measured margins go to the test log
    {
        eprintln!("smallest margins after the preamble, alone: {seen:?}");
    }
    assert_eq!(
        firm.len(),
        wanted,
        "too few candidate prompts are firm here: {seen:?}"
    );
    firm
}

#[async_std::test]
async fn one_prompt_sent_three_times_together_is_decoded_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(alone) = serve(4).await else { return };
    let firm = firm_with_preamble(&alone, 12, 1).await;
    drop(alone);
    let (prompt, text) = &firm[0];

    // A fresh engine, so that no slot holds the prompt already.
    let s = serve(4).await.unwrap();
    let streams: Vec<_> = (0..3)
        .map(|_| s.genius.infer(prompt.as_str(), greedy(12)))
        .collect();
    let done = join_all(streams.into_iter().map(|stream| read_stream(stream, LIMIT))).await;
    let usages: Vec<_> = done.iter().map(|d| d.reply.usage()).collect();
    let prompt_tokens = usages[0].prompt_tokens;
    assert!(prompt_tokens > 150, "{usages:?}");
    let decoded: usize = usages
        .iter()
        .map(|u| u.prompt_tokens - u.cached_tokens)
        .sum();
    assert_eq!(
        decoded, prompt_tokens,
        "the prompt decoded once in all: {usages:?}"
    );
    // Each answers exactly as the prompt alone, from a copy of one cache.
    for streamed in &done {
        assert_eq!(&streamed.reply.text, text);
    }
    assert_eq!(s.peak.load(Ordering::Relaxed), 3);
}

#[async_std::test]
async fn requests_sharing_a_long_prefix_decode_it_once_and_answer_as_alone() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(alone) = serve(4).await else { return };
    let firm = firm_with_preamble(&alone, 12, 3).await;
    drop(alone);

    let s = serve(4).await.unwrap();
    let streams: Vec<_> = firm
        .iter()
        .map(|(prompt, _)| s.genius.infer(prompt.as_str(), greedy(12)))
        .collect();
    let done = join_all(streams.into_iter().map(|stream| read_stream(stream, LIMIT))).await;
    let usages: Vec<_> = done.iter().map(|d| d.reply.usage()).collect();
    // One request decodes the preamble; the others copy it and decode
    // only their own line.
    let copied = usages.iter().filter(|u| u.cached_tokens > 150).count();
    assert_eq!(copied, 2, "{usages:?}");
    for ((prompt, text), streamed) in firm.iter().zip(&done) {
        assert_eq!(&streamed.reply.text, text, "{prompt:?} sharing vs alone");
    }
}
