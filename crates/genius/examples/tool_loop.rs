//! A conversation with a tool: the model calls `get_weather`, the app runs
//! it and sends the result back, and the model answers with it.
//!
//! ```text
//! cargo run --release --example tool_loop -- [model]
//! ```
//!
//! The model defaults to the registry's Qwen2.5-Coder-0.5B-Instruct.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use futures::{channel::mpsc, sink::SinkExt, StreamExt};
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius::core::{ChatMessage, InferenceConfig, Tool, ToolCall, ToolChoice};
use rusty_genius::Orchestrator;
use serde_json::json;

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "qwen-2.5-coder-0.5b-instruct".into());
    let mut genius = Orchestrator::new().await?;
    let (mut input, rx) = mpsc::channel(100);
    let (tx, mut output) = mpsc::channel(100);
    async_std::task::spawn(async move { genius.run(rx, tx).await });
    input.send(BrainstemInput::LoadModel(model)).await?;

    let weather = Tool::function(
        "get_weather",
        "The current weather in a city",
        json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        }),
    );
    let mut messages = vec![ChatMessage::user("What is the weather in Paris?")];
    // First the model must call a tool; then it may answer in words.
    let mut choice = ToolChoice::Required;
    loop {
        let config = InferenceConfig::greedy()
            .with_tools(vec![weather.clone()])
            .with_tool_choice(choice.clone());
        input
            .send(BrainstemInput::Chat {
                messages: messages.clone(),
                config,
            })
            .await?;
        let mut calls = Vec::new();
        while let Some(message) = output.next().await {
            match message {
                BrainstemOutput::Event(InferenceEvent::Content(text)) => print!("{text}"),
                BrainstemOutput::Event(InferenceEvent::ToolCall {
                    id,
                    name,
                    arguments,
                }) => calls.push(ToolCall::new(id, name, &arguments)),
                BrainstemOutput::Event(InferenceEvent::Complete) => break,
                BrainstemOutput::Error(report) => return Err(report.into()),
                _ => {}
            }
        }
        if calls.is_empty() {
            println!();
            return Ok(());
        }
        // Run each call and send its result back, after the call itself.
        messages.push(ChatMessage::assistant_tool_calls(calls.clone()));
        for call in calls {
            eprintln!("[{}({})]", call.function.name, call.function.arguments);
            let result = get_weather(&call);
            messages.push(ChatMessage::tool(call.id, result));
        }
        choice = ToolChoice::Auto;
    }
}

/// The tool: a real app would ask a weather service.
fn get_weather(call: &ToolCall) -> String {
    let city: serde_json::Value =
        serde_json::from_str(&call.function.arguments).unwrap_or_default();
    match city["city"].as_str() {
        Some(_) => "18 C and sunny".into(),
        None => "error: no city given".into(),
    }
}
