//! Shows how firmly a model chooses each token of its greedy answer, for
//! writing test expectations that hold on every CPU.
//!
//! ```text
//! cargo run --release -p rusty-genius --features testing --example margins -- <model> "<prompt>" [max tokens] [raw|auto]
//! ```
//!
//! For each generated token it prints the margin, in logits, by which the
//! model preferred it over the runner-up. A small margin (fixtures/README.md
//! says how small) is a near tie that other kernels may break the other way.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use rusty_genius::core::{InferenceConfig, PromptFormat};
use rusty_genius::stem::testing::{TestClient, MIN_MARGIN};
use rusty_genius::Orchestrator;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        eprintln!("usage: margins <model> <prompt> [max tokens] [raw|auto]");
        std::process::exit(2);
    };
    let max_tokens = args.next().map(|n| n.parse()).transpose()?.unwrap_or(16);
    let format = match args.next().as_deref() {
        Some("auto") => PromptFormat::Auto,
        _ => PromptFormat::Raw,
    };
    let mut client = TestClient::start(Orchestrator::new().await?);
    let loaded = client.load(&model).await?;
    if let Some(err) = loaded.error() {
        return Err(err.clone().into());
    }
    let config = InferenceConfig::greedy()
        .with_max_tokens(max_tokens)
        .with_prompt_format(format)
        .with_logprobs(2);
    let reply = client.infer(&prompt, config).await?;
    if let Some(err) = reply.error() {
        return Err(err.clone().into());
    }
    for ((token, margin), logprobs) in reply.margins().into_iter().zip(&reply.logprobs) {
        let runner_up = logprobs
            .top_logprobs
            .get(1)
            .map_or(String::new(), |t| format!("{:?}", t.token));
        let flag = if margin < MIN_MARGIN {
            "  <- near tie"
        } else {
            ""
        };
        println!("{margin:7.3}  {token:?} over {runner_up}{flag}");
    }
    client.shutdown().await?;
    Ok(())
}
