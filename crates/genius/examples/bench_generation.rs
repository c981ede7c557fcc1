//! Generation speed through the Orchestrator against a bare llama-cpp-2
//! loop, measured in the same run on the same model and prompts.
//!
//! ```text
//! cargo run --release --example bench_generation -- <model.gguf> [tokens] [rounds]
//! ```
//!
//! Both sides decode greedily with the same context settings. For each
//! round both complete the same prompt (a different prompt every round, so
//! the Orchestrator's prefix cache gives it no edge). Generation speed is
//! measured from the first generated token to the last, as the application
//! sees it; the median round is reported, then the ratio.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius::core::InferenceConfig;
use rusty_genius::cortex::llama_cpp_2::context::params::LlamaContextParams;
use rusty_genius::cortex::llama_cpp_2::llama_batch::LlamaBatch;
use rusty_genius::cortex::llama_cpp_2::model::params::LlamaModelParams;
use rusty_genius::cortex::llama_cpp_2::model::LlamaModel;
use rusty_genius::cortex::llama_cpp_2::sampling::LlamaSampler;
use rusty_genius::cortex::{llama_backend, LlamaEngine, LlamaOptions};
use rusty_genius::{CortexStrategy, Orchestrator};

const PROMPTS: [&str; 7] = [
    "Write a long story about a lighthouse keeper and a lost whale.",
    "Describe, step by step, how bread is baked in a village bakery.",
    "Explain the water cycle to a curious ten year old, in detail.",
    "Tell the history of a small mountain town over three centuries.",
    "Compose a long letter from a sailor to his family back home.",
    "Give a detailed tour of an imaginary museum of clocks.",
    "Narrate a chess game between two old friends, move by move.",
];

/// One measured completion.
struct Run {
    tokens: usize,
    /// From the first generated token to the last.
    generation: Duration,
}

impl Run {
    /// Tokens per second after the first token.
    fn rate(&self) -> f64 {
        (self.tokens.saturating_sub(1)) as f64 / self.generation.as_secs_f64()
    }
}

fn options() -> LlamaOptions {
    LlamaOptions {
        context_size: 2048,
        ..LlamaOptions::from_env()
    }
}

/// The reference: llama-cpp-2 driven directly, the simplest correct loop.
fn bare(model: &LlamaModel, prompt: &str, max_tokens: usize) -> Run {
    let options = options();
    let threads = options.threads as i32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(options.context_size))
        .with_n_batch(options.batch_size)
        .with_n_ubatch(options.batch_size)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_swa_full(true);
    let backend = llama_backend().expect("llama.cpp backend");
    let mut ctx = model.new_context(backend, params).expect("context");
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);
    let mut batch = LlamaBatch::new(options.batch_size as usize, 1);
    for (i, &token) in tokens.iter().enumerate() {
        batch
            .add(token, i as i32, &[0], i + 1 == tokens.len())
            .unwrap();
    }
    ctx.decode(&mut batch).expect("prompt decode");
    let mut sampler = LlamaSampler::greedy();
    let mut position = tokens.len() as i32;
    let mut index = batch.n_tokens() - 1;
    let mut first = None;
    let mut generated = 0;
    let mut piece = Vec::new();
    while generated < max_tokens {
        let token = sampler.sample(&ctx, index);
        if vocab.is_eog(token) {
            break;
        }
        piece.clear();
        vocab.token_to_piece_into(token, &mut piece, false, None);
        std::hint::black_box(&piece);
        generated += 1;
        first.get_or_insert_with(Instant::now);
        batch.clear();
        batch.add(token, position, &[0], true).unwrap();
        ctx.decode(&mut batch).expect("decode");
        position += 1;
        index = 0;
    }
    Run {
        tokens: generated,
        generation: first.map_or(Duration::ZERO, |t| t.elapsed()),
    }
}

struct Client {
    input: mpsc::Sender<BrainstemInput>,
    output: mpsc::Receiver<BrainstemOutput>,
}

impl Client {
    async fn start(path: &Path) -> Client {
        let mut genius = Orchestrator::builder()
            .strategy(CortexStrategy::KeepAlive)
            .engine(|| LlamaEngine::new(options()))
            .build()
            .expect("orchestrator");
        let (mut input, rx) = mpsc::channel(8);
        let (tx, output) = mpsc::channel(64);
        async_std::task::spawn(async move { genius.run(rx, tx).await });
        input
            .send(BrainstemInput::LoadModel(path.display().to_string()))
            .await
            .unwrap();
        Client { input, output }
    }

    async fn run(&mut self, prompt: &str, max_tokens: usize) -> Run {
        let config = InferenceConfig::greedy().with_max_tokens(max_tokens);
        let prompt = prompt.to_owned();
        self.input
            .send(BrainstemInput::Infer { prompt, config })
            .await
            .unwrap();
        let mut first = None;
        let mut last = Instant::now();
        let mut tokens = 0;
        while let Some(message) = self.output.next().await {
            match message {
                BrainstemOutput::Event(InferenceEvent::Content(_)) => {
                    last = Instant::now();
                    first.get_or_insert(last);
                }
                BrainstemOutput::Event(InferenceEvent::Usage(usage)) => {
                    tokens = usage.generated_tokens
                }
                BrainstemOutput::Event(InferenceEvent::Complete) => break,
                BrainstemOutput::Error(message) => panic!("{message}"),
                _ => {}
            }
        }
        Run {
            tokens,
            generation: first.map_or(Duration::ZERO, |t| last - t),
        }
    }
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

#[async_std::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: bench_generation <model.gguf> [tokens=128] [rounds=5]");
        std::process::exit(2);
    };
    let max_tokens: usize = args.next().map_or(128, |n| n.parse().expect("tokens"));
    let rounds: usize = args.next().map_or(5, |n| n.parse().expect("rounds"));
    println!(
        "model {}, {max_tokens} tokens, {rounds} rounds, {} threads",
        path.display(),
        options().threads
    );

    let mut client = Client::start(&path).await;
    let model = LlamaModel::load_from_file(
        llama_backend().unwrap(),
        &path,
        &LlamaModelParams::default(),
    )
    .expect("bare model");
    // Warm both paths once (page cache, thread pools).
    client.run("Hello", 8).await;
    bare(&model, "Hello", 8);

    let (mut ours, mut reference) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let prompt = PROMPTS[round % PROMPTS.len()];
        let a = client.run(prompt, max_tokens).await;
        let b = bare(&model, prompt, max_tokens);
        println!(
            "round {round}: orchestrator {:6.1} tok/s ({} tokens)   bare llama-cpp-2 {:6.1} tok/s ({} tokens)",
            a.rate(),
            a.tokens,
            b.rate(),
            b.tokens
        );
        assert_eq!(
            a.tokens, b.tokens,
            "both sides decode greedily and must agree"
        );
        ours.push(a.rate());
        reference.push(b.rate());
    }
    let (ours, reference) = (median(ours), median(reference));
    println!("median generation speed: orchestrator {ours:.1} tok/s, bare {reference:.1} tok/s");
    println!("ratio orchestrator/bare: {:.3}", ours / reference);
}
