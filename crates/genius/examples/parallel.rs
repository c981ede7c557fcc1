//! Three questions at once, each answered on a stream of its own, decoded
//! together in one batch.
//!
//! ```text
//! cargo run --release --example parallel -- [model]
//! ```
//!
//! The model defaults to the registry's Qwen2.5-Coder-0.5B-Instruct.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use futures::StreamExt;
use rusty_genius::core::protocol::InferenceEvent;
use rusty_genius::core::InferenceConfig;
use rusty_genius::{Orchestrator, RequestStream};

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "qwen-2.5-coder-0.5b-instruct".into());
    // A cloneable handle: any task may send requests through it.
    let genius = Orchestrator::new().await?.start();
    genius.load(&model).await?;

    let questions = ["Name a colour.", "Name a fruit.", "Name a planet."];
    let config = InferenceConfig::default().with_max_tokens(32);
    let streams: Vec<RequestStream> = questions
        .iter()
        .map(|question| genius.infer(*question, config.clone()))
        .collect();

    // Each stream carries only its own request's events, ending in
    // `Complete` (or an error). Dropping a stream cancels its request.
    let answers = futures::future::join_all(streams.into_iter().map(|mut stream| async move {
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(InferenceEvent::Content(piece)) => text.push_str(&piece),
                Ok(_) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(text)
    }))
    .await;
    for (question, answer) in questions.iter().zip(answers) {
        println!("{question} {}", answer?.trim());
    }
    Ok(())
}
