//! Speculative decoding on real work, against the same engine without it,
//! in the same run:
//!
//! ```text
//! cargo run --release --example speculative -- <qwen-coder.gguf> [rounds]
//! ```
//!
//! Each round asks, greedily, for (a) an edit of a ~40-line file that
//! returns the whole file, (b) the same edit with the original file as the
//! `prediction`, and (c) free prose; every request once with speculation
//! off and once on, and each round with other names and topics, so that no
//! guess profits from an earlier answer. It checks that both answers are
//! the same, and prints generated tokens per second, guesses kept, and
//! the ratios (medians over the rounds).

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::time::Instant;

use futures::StreamExt;
use rusty_genius::core::protocol::{InferenceEvent, Usage};
use rusty_genius::core::{InferenceConfig, Speculative};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::{Orchestrator, OrchestratorHandle};

const NAMES: [&str; 8] = [
    "Ledger", "Orchard", "Harbor", "Meadow", "Quarry", "Beacon", "Canyon", "Glacier",
];

/// The file the edits are asked of, about `name`.
fn code(name: &str) -> String {
    include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/speculative/store.py"
    ))
    .replace("Ledger", name)
}

/// The text and usage of one greedy answer.
async fn answer(
    genius: &OrchestratorHandle,
    prompt: &str,
    config: InferenceConfig,
) -> Result<(String, Usage, f64), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut stream = genius.infer(prompt, config);
    let mut text = String::new();
    let mut usage = None;
    while let Some(event) = stream.next().await {
        match event? {
            InferenceEvent::Content(piece) => text.push_str(&piece),
            InferenceEvent::Usage(u) => usage = Some(u),
            InferenceEvent::Complete => break,
            _ => {}
        }
    }
    let usage = usage.ok_or("no usage")?;
    Ok((text, usage, started.elapsed().as_secs_f64()))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .ok_or("usage: speculative <qwen-coder.gguf> [rounds]")?;
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let options = LlamaOptions {
        context_size: 4096,
        parallel: 1,
        ..LlamaOptions::from_env()
    };
    let genius = Orchestrator::builder()
        .engine(move || LlamaEngine::new(options.clone()))
        .build()?
        .start();
    genius.load(model).await?;

    // name -> (tokens/s off, tokens/s on, kept, guessed)
    let tasks = ["edit", "edit with prediction", "prose"];
    let mut figures: Vec<(Vec<f64>, Vec<f64>, usize, usize)> =
        tasks.iter().map(|_| Default::default()).collect();
    let mut differ = 0;
    for round in 0..=rounds {
        let name = NAMES[round % NAMES.len()];
        let old = code(name);
        let edit = format!(
            "Rename the method `total` to `sum_amounts` and add a method `count` that returns the number of entries. Answer with the whole file and nothing else.\n\n```python\n{old}```"
        );
        let topics: Vec<&str> = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/speculative/topics.txt"
        ))
        .lines()
        .collect();
        let prose = format!("Write a long story about {}.", topics[round % topics.len()]);
        for (t, task) in tasks.iter().enumerate() {
            let prompt = if t == 2 { &prose } else { &edit };
            let base = InferenceConfig::greedy().with_max_tokens(400);
            let on = match t {
                1 => base.clone().with_prediction(format!("```python\n{old}```")),
                _ => base.clone(),
            };
            let (text_off, usage_off, _) =
                answer(&genius, prompt, base.with_speculative(Speculative::Off)).await?;
            let (text_on, usage_on, _) = answer(&genius, prompt, on).await?;
            if text_on != text_off {
                let same = text_on
                    .bytes()
                    .zip(text_off.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                eprintln!(
                    "round {round}, {task}: the answers part after {same} of {} bytes",
                    text_off.len()
                );
                differ += 1;
            }
            if round == 0 {
                continue; // warm-up
            }
            let figure = &mut figures[t];
            figure.0.push(usage_off.generation_tokens_per_second());
            figure.1.push(usage_on.generation_tokens_per_second());
            figure.2 += usage_on.accepted_draft_tokens;
            figure.3 += usage_on.draft_tokens;
        }
    }
    println!("Qwen greedy, 400 tokens at most, {rounds} rounds; {differ} answers of {} differ with and without speculation", 3 * (rounds + 1));
    for (task, (off, on, kept, guessed)) in tasks.iter().zip(figures) {
        let (off, on) = (median(off), median(on));
        println!(
            "  {task}: {off:.1} tokens/s without, {on:.1} with ({:.2}x); guesses kept {kept} of {guessed}",
            on / off
        );
    }
    Ok(())
}
