//! Conversations on a real instruct model: how much a conversation's cache
//! saves on the next turn, and what JSON-schema output costs.
//!
//! ```text
//! cargo run --release --example bench_chat -- <instruct model> [rounds]
//! ```
//!
//! 1. Time to first token of a second user turn ÷ that of the first turn,
//!    with a system prompt of about 1,000 tokens (a different one every
//!    round, so the first turn never finds it cached). Goal: ≤ 0.1.
//! 2. Generation speed with a JSON schema ÷ without, same prompt and
//!    length. Goal: ≥ 0.8.
//!
//! Each number is the median of the rounds; both sides of each ratio are
//! measured in the same run.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent, Usage};
use rusty_genius::core::{ChatMessage, InferenceConfig, ResponseFormat};
use rusty_genius::{CortexStrategy, Orchestrator};
use serde_json::json;

struct Session {
    input: mpsc::Sender<BrainstemInput>,
    output: mpsc::Receiver<BrainstemOutput>,
}

/// What one request took.
struct Timed {
    text: String,
    first_token: Duration,
    usage: Usage,
}

impl Session {
    async fn chat(&mut self, messages: Vec<ChatMessage>, config: InferenceConfig) -> Timed {
        let sent = Instant::now();
        self.input
            .send(BrainstemInput::Chat { messages, config })
            .await
            .expect("the Orchestrator takes input");
        let mut first_token = None;
        let mut text = String::new();
        let mut usage = None;
        while let Some(message) = self.output.next().await {
            match message {
                BrainstemOutput::Event(InferenceEvent::Content(piece)) => {
                    first_token.get_or_insert_with(|| sent.elapsed());
                    text.push_str(&piece);
                }
                BrainstemOutput::Event(InferenceEvent::Usage(u)) => usage = Some(u),
                BrainstemOutput::Event(InferenceEvent::Complete) => break,
                BrainstemOutput::Error(report) => panic!("{report}"),
                _ => {}
            }
        }
        Timed {
            text,
            first_token: first_token.unwrap_or_else(|| sent.elapsed()),
            usage: usage.expect("a usage"),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// About 1,000 tokens of instructions, different for each `round`.
fn long_system_prompt(round: usize) -> String {
    let mut text = format!(
        "You are assistant number {round} of the city library's help desk. Follow these rules.\n"
    );
    let topics = [
        "opening hours",
        "borrowing limits",
        "late fees",
        "room bookings",
        "printing",
        "the children's corner",
        "interlibrary loans",
        "lost cards",
        "donations",
        "quiet floors",
    ];
    let mut rule = 1;
    while text.len() < 4800 {
        for topic in topics {
            text.push_str(&format!(
                "Rule {rule}: when a visitor asks about {topic}, answer politely, name the desk that handles {topic}, and keep the answer short.\n"
            ));
            rule += 1;
        }
    }
    text
}

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(model) = args.next() else {
        eprintln!("usage: bench_chat <instruct model> [rounds]");
        std::process::exit(2);
    };
    let rounds: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(5);
    let mut genius = Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .build()?;
    let (input, rx) = mpsc::channel(8);
    let (tx, output) = mpsc::channel(256);
    async_std::task::spawn(async move { genius.run(rx, tx).await });
    let mut session = Session { input, output };
    session
        .input
        .send(BrainstemInput::LoadModel(model.clone()))
        .await?;

    println!("model {model}, {rounds} rounds");
    let answer = InferenceConfig::greedy().with_max_tokens(32);
    let (mut firsts, mut seconds, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let system = ChatMessage::system(long_system_prompt(round));
        let mut messages = vec![system, ChatMessage::user("When do you open on Sundays?")];
        let first = session.chat(messages.clone(), answer.clone()).await;
        messages.push(ChatMessage::assistant(first.text.clone()));
        messages.push(ChatMessage::user("And can I print there?"));
        let second = session.chat(messages, answer.clone()).await;
        let ratio = second.first_token.as_secs_f64() / first.first_token.as_secs_f64();
        println!(
            "round {round}: first turn {:6.0} ms to first token ({} prompt tokens, {} cached), second turn {:5.0} ms ({} prompt tokens, {} cached), ratio {ratio:.3}",
            first.first_token.as_secs_f64() * 1000.0,
            first.usage.prompt_tokens,
            first.usage.cached_tokens,
            second.first_token.as_secs_f64() * 1000.0,
            second.usage.prompt_tokens,
            second.usage.cached_tokens,
        );
        firsts.push(first.first_token.as_secs_f64() * 1000.0);
        seconds.push(second.first_token.as_secs_f64() * 1000.0);
        ratios.push(ratio);
    }
    println!(
        "time to first token: first turn {:.0} ms, second turn {:.0} ms; median ratio second/first {:.3} (goal <= 0.1)",
        median(firsts),
        median(seconds),
        median(ratios.clone())
    );

    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "job": {"type": "string", "enum": ["baker", "pilot", "teacher", "painter"]},
            "hobbies": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "job", "hobbies"],
    });
    let prompt = vec![ChatMessage::user(
        "Describe a fictional person as JSON with name, age, job and hobbies.",
    )];
    let tokens = 96;
    let free = InferenceConfig::greedy().with_max_tokens(tokens);
    let held = free
        .clone()
        .with_response_format(ResponseFormat::json_schema("person", schema));
    let (mut free_speeds, mut held_speeds, mut speed_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so neither always runs warm.
        let (a, b) = if round % 2 == 0 {
            let a = session.chat(prompt.clone(), free.clone()).await;
            let b = session.chat(prompt.clone(), held.clone()).await;
            (a, b)
        } else {
            let b = session.chat(prompt.clone(), held.clone()).await;
            let a = session.chat(prompt.clone(), free.clone()).await;
            (a, b)
        };
        let (fs, hs) = (
            a.usage.generation_tokens_per_second(),
            b.usage.generation_tokens_per_second(),
        );
        println!(
            "round {round}: free {fs:5.1} tok/s ({} tokens), schema {hs:5.1} tok/s ({} tokens), ratio {:.3}",
            a.usage.generated_tokens,
            b.usage.generated_tokens,
            hs / fs
        );
        free_speeds.push(fs);
        held_speeds.push(hs);
        speed_ratios.push(hs / fs);
    }
    println!(
        "generation speed: free {:.1} tok/s, with JSON schema {:.1} tok/s; median ratio schema/free {:.3} (goal >= 0.8)",
        median(free_speeds),
        median(held_speeds),
        median(speed_ratios)
    );
    Ok(())
}
