//! The quick start of the README and the web page, compiled by `cargo test`.
//!
//! Loads a model by name (downloading it on first use) and streams one answer.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use futures::{channel::mpsc, sink::SinkExt, StreamExt};
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius::Orchestrator;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Default strategy: unload the model after 5 idle minutes.
    let mut genius = Orchestrator::new().await?;
    let (mut input, rx) = mpsc::channel(100);
    let (tx, mut output) = mpsc::channel(100);

    async_std::task::spawn(async move { genius.run(rx, tx).await });

    // A path to a .gguf file, a registry name or a HuggingFace id.
    input
        .send(BrainstemInput::LoadModel("qwen-2.5-3b-instruct".into()))
        .await?;
    input
        .send(BrainstemInput::Infer {
            prompt: "Explain Rust in one sentence.".into(),
            config: Default::default(),
        })
        .await?;

    // Besides inference events the stream carries download progress
    // (`Asset`) and lifecycle changes (`Status`): match on all of them.
    while let Some(message) = output.next().await {
        match message {
            BrainstemOutput::Event(InferenceEvent::Content(text)) => print!("{text}"),
            BrainstemOutput::Event(InferenceEvent::Complete) => break,
            BrainstemOutput::Error(message) => return Err(message.into()),
            _ => {}
        }
    }
    Ok(())
}
