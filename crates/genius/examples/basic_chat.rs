//! Streams a model's answer to one prompt.
//!
//! ```text
//! cargo run --release --example basic_chat -- <model name or .gguf path> "<prompt>"
//! ```
//!
//! The answer goes to stdout as it is generated; download progress,
//! reasoning and a usage summary go to stderr.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::io::Write;

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius::core::protocol::{
    AssetEvent, BrainstemInput, BrainstemOutput, InferenceEvent, ThoughtEvent,
};
use rusty_genius::core::InferenceConfig;
use rusty_genius::Orchestrator;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt)) = (args.next(), args.next()) else {
        eprintln!("usage: basic_chat <model name or .gguf path> <prompt> [max tokens]");
        std::process::exit(2);
    };
    let max_tokens = args.next().map(|n| n.parse()).transpose()?.unwrap_or(256);

    let mut genius = Orchestrator::new().await?;
    let (mut input, rx) = mpsc::channel(8);
    let (tx, mut output) = mpsc::channel(64);
    async_std::task::spawn(async move { genius.run(rx, tx).await });

    input.send(BrainstemInput::LoadModel(model)).await?;
    input
        .send(BrainstemInput::Infer {
            prompt,
            config: InferenceConfig::default().with_max_tokens(max_tokens),
        })
        .await?;

    let mut stdout = std::io::stdout();
    while let Some(message) = output.next().await {
        match message {
            BrainstemOutput::Asset(AssetEvent::Progress(done, total)) if total > 0 => {
                eprint!("\rdownloading: {:5.1}%", done as f64 * 100.0 / total as f64);
            }
            BrainstemOutput::Asset(AssetEvent::Complete(path)) => {
                eprintln!("\rmodel ready at {path}")
            }
            BrainstemOutput::Event(InferenceEvent::Thought(ThoughtEvent::Delta(text))) => {
                eprint!("{text}")
            }
            BrainstemOutput::Event(InferenceEvent::Content(text)) => {
                print!("{text}");
                stdout.flush()?;
            }
            BrainstemOutput::Event(InferenceEvent::Usage(usage)) => eprintln!(
                "\n[{} prompt tokens, {} generated at {:.1} tokens/s, {:?}]",
                usage.prompt_tokens,
                usage.generated_tokens,
                usage.generation_tokens_per_second(),
                usage.finish_reason
            ),
            BrainstemOutput::Event(InferenceEvent::Complete) => break,
            BrainstemOutput::Error(message) => {
                eprintln!("error: {message}");
                std::process::exit(1);
            }
            _ => {}
        }
    }
    Ok(())
}
