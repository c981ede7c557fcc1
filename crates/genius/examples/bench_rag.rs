//! Retrieval-shaped traffic through the library: one Orchestrator holding
//! an embedding model and a chat model, against two Orchestrators holding
//! one each, in one run.
//!
//! ```text
//! cargo run --release -p rusty-genius --example bench_rag -- <chat.gguf> <embed.gguf> [rounds]
//! ```
//!
//! A round embeds one question, then answers it (greedy, 8 tokens). Each
//! setup runs half the rounds in a block, twice, alternating; the first
//! round of a block is not counted. Printed: median latencies, the ratio
//! one ÷ two, and the loads the one Orchestrator did after its first
//! round.

#![allow(clippy::print_stdout)] // printing is its job

use std::time::{Duration, Instant};

use futures::StreamExt;
use rusty_genius::core::protocol::{BrainstemOutput, EngineStatus, InferenceEvent};
use rusty_genius::core::{ChatMessage, Embed, InferenceConfig};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::{CortexStrategy, Orchestrator, OrchestratorHandle};

fn orchestrator() -> Result<OrchestratorHandle, Box<dyn std::error::Error>> {
    let options = LlamaOptions {
        context_size: 2048,
        ..LlamaOptions::from_env()
    };
    Ok(Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .engine(move || LlamaEngine::new(options.clone()))
        .build()?
        .start())
}

/// One embedding on `embedder`, then one chat on `chatter`: their times.
async fn round(
    embedder: &OrchestratorHandle,
    embed_model: &str,
    chatter: &OrchestratorHandle,
    chat_model: &str,
    n: usize,
) -> Result<(Duration, Duration), Box<dyn std::error::Error>> {
    let question = format!("In one word: what colour is a ripe fruit number {n}?");
    let started = Instant::now();
    embedder
        .embeddings(Embed::new([question.clone()]).with_model(embed_model))
        .await?;
    let embedded = started.elapsed();
    let started = Instant::now();
    let config = InferenceConfig::greedy()
        .with_max_tokens(8)
        .with_model(chat_model);
    let mut stream = chatter.chat(vec![ChatMessage::user(question)], config);
    while let Some(event) = stream.next().await {
        if let InferenceEvent::Complete = event? {
            break;
        }
    }
    Ok((embedded, started.elapsed()))
}

fn median(mut values: Vec<Duration>) -> f64 {
    values.sort();
    values
        .get(values.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(chat), Some(embed)) = (args.next(), args.next()) else {
        return Err("usage: bench_rag <chat.gguf> <embed.gguf> [rounds]".into());
    };
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(20);

    let one = orchestrator()?;
    let mut events = one.events();
    one.load(&embed).await?;
    one.load(&chat).await?;
    let (chat_only, embed_only) = (orchestrator()?, orchestrator()?);
    chat_only.load(&chat).await?;
    embed_only.load(&embed).await?;

    let mut times = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let mut loads_before = None;
    for pass in 0..2 {
        for turn in 0..2 {
            let setup = (turn + pass) % 2;
            async_std::task::sleep(Duration::from_millis(500)).await;
            for r in 0..=rounds / 2 {
                let (e, c) = if setup == 0 {
                    round(&one, &embed, &one, &chat, pass * 1000 + r).await?
                } else {
                    round(&embed_only, &embed, &chat_only, &chat, pass * 1000 + r).await?
                };
                if setup == 0 && r == 1 && loads_before.is_none() {
                    loads_before = Some(count_loads(&mut events));
                }
                if r > 0 {
                    times[setup].0.push(e);
                    times[setup].1.push(c);
                }
            }
        }
    }
    let loads = count_loads(&mut events);
    let [(one_e, one_c), (two_e, two_c)] = times;
    let (one_e, one_c, two_e, two_c) = (median(one_e), median(one_c), median(two_e), median(two_c));
    println!("{rounds} rounds (medians)");
    println!("{:<28} {:>9} {:>9}", "setup", "embed ms", "chat ms");
    println!(
        "{:<28} {one_e:>9.1} {one_c:>9.1}",
        "one Orchestrator, 2 models"
    );
    println!("{:<28} {two_e:>9.1} {two_c:>9.1}", "two Orchestrators");
    println!(
        "one ÷ two: embed {:.3}, chat {:.3}; loads after the first round: {loads}",
        one_e / two_e,
        one_c / two_c
    );
    Ok(())
}

/// Loads reported since the last call.
fn count_loads(events: &mut (impl futures::Stream<Item = BrainstemOutput> + Unpin)) -> usize {
    let mut loads = 0;
    while let Some(Some(event)) = futures::FutureExt::now_or_never(events.next()) {
        if let BrainstemOutput::Status(EngineStatus::Loading(_)) = event {
            loads += 1;
        }
    }
    loads
}
