//! Embedding speed: 256 short sentences in one request against one
//! request per sentence, and against llama.cpp's `llama-embedding` tool
//! on the same GGUF and threads, in the same run.
//!
//! ```text
//! LLAMA_EMBEDDING=$(.ci/build-llama-server.sh llama-embedding) \
//!   cargo run --release --example bench_embed -- "$(.ci/fetch-model.sh minilm)" [rounds]
//! ```
//!
//! Sentences per second, medians over rounds. Model loading is left out
//! on both sides: ours is loaded once before timing; for llama-embedding,
//! which loads the model in every run, the time of a run with one sentence
//! is subtracted from a run with all 256 (so the rate is of the other 255).

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::process::{Command, Stdio};
use std::time::Instant;

use rusty_genius::core::Embed;
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::Orchestrator;

const SENTENCES: usize = 256;

/// 256 distinct short sentences (6-9 words).
fn sentences() -> Vec<String> {
    let who = [
        "The farmer",
        "A student",
        "My neighbour",
        "The old pilot",
        "Our teacher",
        "A tired nurse",
        "The young chef",
        "A quiet poet",
    ];
    let did = [
        "paints",
        "repairs",
        "sells",
        "studies",
        "describes",
        "photographs",
        "visits",
        "builds",
    ];
    let what = [
        "a red boat",
        "the city bridge",
        "an ancient map",
        "a small garden",
    ];
    let mut out = Vec::new();
    for w in who {
        for d in did {
            for t in what {
                out.push(format!("{w} {d} {t} every morning."));
            }
        }
    }
    out.truncate(SENTENCES);
    out
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Seconds for one llama-embedding run over `prompts`.
fn peer_run(binary: &str, model: &str, prompts: &[String], threads: usize) -> Result<f64, String> {
    let started = Instant::now();
    let status = Command::new(binary)
        .args(["-m", model, "-p", &prompts.join("\n")])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args(["--embd-normalize", "2", "--pooling", "mean", "--no-warmup"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|err| format!("llama-embedding does not start: {err}"))?;
    if !status.success() {
        return Err(format!("llama-embedding failed: {status}"));
    }
    Ok(started.elapsed().as_secs_f64())
}

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .ok_or("usage: bench_embed <embedding-model.gguf> [rounds]")?;
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(3);
    let options = LlamaOptions::from_env();
    let threads = options.threads;
    let texts = sentences();

    let genius = Orchestrator::builder()
        .engine(move || LlamaEngine::new(options.clone()))
        .build()?
        .start();
    genius.load(&model).await?;
    // Warm up (makes the embedding context).
    genius.embeddings(Embed::new(texts[..8].to_vec())).await?;

    let mut batched = Vec::new();
    let mut single = Vec::new();
    let mut peer = Vec::new();
    let binary = std::env::var("LLAMA_EMBEDDING").ok();
    for _ in 0..rounds {
        let started = Instant::now();
        let got = genius.embeddings(Embed::new(texts.clone())).await?;
        assert_eq!(got.vectors.len(), SENTENCES);
        batched.push(SENTENCES as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        for text in &texts {
            genius.embeddings(Embed::new([text.as_str()])).await?;
        }
        single.push(SENTENCES as f64 / started.elapsed().as_secs_f64());

        if let Some(binary) = &binary {
            let all = peer_run(binary, &model, &texts, threads)?;
            let one = peer_run(binary, &model, &texts[..1], threads)?;
            peer.push((SENTENCES - 1) as f64 / (all - one).max(1e-6));
        }
    }
    let (batched, single) = (median(batched), median(single));
    println!("model {model}, {threads} threads, {SENTENCES} sentences, {rounds} rounds (medians)");
    println!("batched (one request):        {batched:8.1} sentences/s");
    println!(
        "one request per sentence:     {single:8.1} sentences/s   batched ÷ this = {:.2}",
        batched / single
    );
    if !peer.is_empty() {
        let peer = median(peer);
        println!(
            "llama-embedding (same GGUF):  {peer:8.1} sentences/s   batched ÷ this = {:.3}",
            batched / peer
        );
    } else {
        println!("(set LLAMA_EMBEDDING to compare with llama.cpp's llama-embedding)");
    }
    Ok(())
}
