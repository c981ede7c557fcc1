//! Speculative decoding against llama-server, on the work it is for:
//!
//! ```text
//! LLAMA_SERVER=$(.ci/build-llama-server.sh) \
//!   cargo bench -p rusty-genius-cli --bench speculative -- <qwen-coder.gguf> [rounds]
//! ```
//!
//! Servers, all on the same model, threads and context, up at once (idle
//! ones take no CPU): `genius serve` as it ships (speculation on),
//! `genius serve --speculative off`, and llama-server plain, with
//! `--spec-default` (ngram-mod), and with `--spec-type` ngram-simple and
//! ngram-map-k. Each round, with new names and topics so that no guesser
//! profits from an earlier answer, every server answers greedily:
//!
//! - **edit**: a ~40-line Python file with one change asked, the whole
//!   file back;
//! - **json**: fields extracted from a paragraph, quoting it;
//! - **prose**: a story;
//! - **4 edits**: four edit requests at once (aggregate);
//! - **prediction** (ours only): the edit with the original file as
//!   OpenAI's `prediction`.
//!
//! Generation speed is each server's own report (`timings.predicted_per_
//! second`; the 4 edits: generated tokens over the wall time of all four),
//! medians over the rounds; guesses kept are `draft_n_accepted` of
//! `draft_n`.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use common::{free_addr, genius_command, median, post_json, stem, threads, Server};
use serde_json::{json, Value};

const CONTEXT: u32 = 4096;
const PARALLEL: u32 = 4;

const NAMES: [&str; 12] = [
    "Ledger", "Orchard", "Harbor", "Meadow", "Quarry", "Beacon", "Canyon", "Glacier", "Lantern",
    "Thicket", "Estuary", "Summit",
];
const CITIES: [&str; 6] = ["Lyon", "Porto", "Bergen", "Graz", "Ghent", "Turku"];

/// The file the edits are asked of, about `name`.
fn code(name: &str) -> String {
    include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/speculative/store.py"
    ))
    .replace("Ledger", name)
}

/// The edits asked for, one per round in turn.
const CHANGES: [&str; 4] = [
    "Rename the method `total` to `sum_amounts`.",
    "Add a method `count` that returns the number of entries.",
    "Make `find` raise KeyError instead of returning None.",
    "Rename the attribute `entries` to `items` everywhere.",
];

fn edit_request(round: usize, offset: usize) -> (String, String) {
    let name = NAMES[(round * 5 + offset) % NAMES.len()];
    let old = code(name);
    let change = CHANGES[(round + offset) % CHANGES.len()];
    (
        format!("{change} Answer with the whole file and nothing else.\n\n```python\n{old}```"),
        format!("```python\n{old}```"),
    )
}

fn json_request(round: usize) -> String {
    let name = NAMES[round % NAMES.len()];
    let city = CITIES[round % CITIES.len()];
    format!(
        "Extract the customer's name, city, and each item ordered with its quantity and the exact words of its description, as JSON.\n\n\
         Order note: {name} Okafor from {city} asked for 3 \"hand-thrown stoneware mugs, glazed in deep teal\", \
         2 \"linen tea towels with a narrow red stripe\", and 1 \"cast iron trivet shaped like an oak leaf\", \
         delivered before the {round}th of next month to the back door of the bakery on Quay Street."
    )
}

fn prose_request(round: usize) -> String {
    let topics: Vec<&str> = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/speculative/topics.txt"
    ))
    .lines()
    .collect();
    format!("Write a long story about {}.", topics[round % topics.len()])
}

/// One greedy chat: its reply.
fn chat(
    addr: SocketAddr,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    prediction: Option<&str>,
) -> Result<Value, String> {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if let Some(prediction) = prediction {
        body["prediction"] = json!({"type": "content", "content": prediction});
    }
    let (_, reply) = post_json(addr, "/v1/chat/completions", &body)?;
    Ok(reply)
}

/// (generated tokens, tokens/s, guesses, kept) of a reply.
fn figures(reply: &Value) -> (f64, f64, f64, f64) {
    let timings = &reply["timings"];
    let number = |key: &str| timings[key].as_f64().unwrap_or(0.0);
    (
        number("predicted_n"),
        number("predicted_per_second"),
        number("draft_n"),
        number("draft_n_accepted"),
    )
}

#[derive(Default)]
struct Tally {
    rates: Vec<f64>,
    guessed: f64,
    kept: f64,
}

impl Tally {
    fn add(&mut self, rate: f64, guessed: f64, kept: f64) {
        self.rates.push(rate);
        self.guessed += guessed;
        self.kept += kept;
    }

    fn rate(&self) -> f64 {
        median(self.rates.clone())
    }

    fn kept(&self) -> String {
        if self.guessed == 0.0 {
            "-".into()
        } else {
            format!("{:.0}%", 100.0 * self.kept / self.guessed)
        }
    }
}

fn peer(binary: &str, model: &str, extra: &[&str]) -> Result<Server, String> {
    let addr = free_addr();
    let mut command = Command::new(binary);
    command
        .args(["-m", model, "--host", "127.0.0.1"])
        .args(["--port", &addr.port().to_string()])
        .args(["--parallel", &PARALLEL.to_string()])
        .args(["-c", &(CONTEXT * PARALLEL).to_string()])
        .args(["-t", &threads(), "-tb", &threads()])
        .args(["-b", "512", "-ub", "512", "--no-webui"])
        .args(extra);
    Server::start("llama-server", command, addr, stem(model))
}

fn ours(model: &str, extra: &[&str]) -> Result<Server, String> {
    let addr = free_addr();
    let mut command = genius_command(addr, PARALLEL, CONTEXT, &[model]);
    command
        .arg("--no-kv-snapshots")
        .args(extra)
        .env("RUST_LOG", "warn");
    Server::start("genius serve", command, addr, stem(model))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(model) = args.first() else {
        return Err("usage: speculative <qwen-coder.gguf> [rounds]".into());
    };
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let Ok(binary) = std::env::var("LLAMA_SERVER") else {
        return Err("set LLAMA_SERVER to llama-server's path (.ci/build-llama-server.sh)".into());
    };
    let name = stem(model);
    let servers: Vec<(&str, Server)> = vec![
        ("ours", ours(model, &[])?),
        (
            "ours, speculation off",
            ours(model, &["--speculative", "off"])?,
        ),
        ("llama-server", peer(&binary, model, &[])?),
        (
            "llama-server --spec-default",
            peer(&binary, model, &["--spec-default"])?,
        ),
        (
            "llama-server ngram-simple",
            peer(&binary, model, &["--spec-type", "ngram-simple"])?,
        ),
        (
            "llama-server ngram-map-k",
            peer(&binary, model, &["--spec-type", "ngram-map-k"])?,
        ),
    ];
    println!(
        "{name}, {} threads, greedy; medians of {rounds} rounds (round 0 warms up), every server in turn",
        threads()
    );
    let tasks = ["edit", "json", "prose", "4 edits"];
    let mut tallies: Vec<Vec<Tally>> = tasks
        .iter()
        .map(|_| servers.iter().map(|_| Tally::default()).collect())
        .collect();
    let mut predicted = Tally::default();
    for round in 0..=rounds {
        let (edit, original) = edit_request(round, 0);
        let json_prompt = json_request(round);
        let prose = prose_request(round);
        for (s, (_, server)) in servers.iter().enumerate() {
            let keep = round > 0;
            for (t, (prompt, max_tokens)) in [(&edit, 600), (&json_prompt, 200), (&prose, 300)]
                .into_iter()
                .enumerate()
            {
                let reply = chat(server.addr, &name, prompt, max_tokens, None)?;
                let (_, rate, guessed, kept) = figures(&reply);
                if keep {
                    tallies[t][s].add(rate, guessed, kept);
                }
            }
            // Four edits at once.
            let started = Instant::now();
            let replies: Vec<Result<Value, String>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (1..=4)
                    .map(|offset| {
                        let (prompt, _) = edit_request(round, offset);
                        let name = name.clone();
                        let addr = server.addr;
                        scope.spawn(move || chat(addr, &name, &prompt, 600, None))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("a client panicked".into())))
                    .collect()
            });
            let wall = started.elapsed().as_secs_f64();
            let (mut tokens, mut guessed, mut kept) = (0.0, 0.0, 0.0);
            for reply in replies {
                let (n, _, g, k) = figures(&reply?);
                tokens += n;
                guessed += g;
                kept += k;
            }
            if keep {
                tallies[3][s].add(tokens / wall, guessed, kept);
            }
            if s == 0 {
                let reply = chat(server.addr, &name, &edit, 600, Some(&original))?;
                let (_, rate, guessed, kept) = figures(&reply);
                if keep {
                    predicted.add(rate, guessed, kept);
                }
            }
        }
        eprintln!("round {round} done");
    }

    for (t, task) in tasks.iter().enumerate() {
        let row = &tallies[t];
        let best_peer = (3..servers.len())
            .max_by(|&a, &b| row[a].rate().total_cmp(&row[b].rate()))
            .unwrap_or(3);
        println!("\n{task} (generated tokens/s; guesses kept):");
        for (s, (label, _)) in servers.iter().enumerate() {
            println!("  {label:<30} {:>6.1}  {}", row[s].rate(), row[s].kept());
        }
        println!(
            "  ours / ours off {:.2}; ours / {} {:.2}; ours / llama-server plain {:.2}",
            row[0].rate() / row[1].rate(),
            servers[best_peer].0,
            row[0].rate() / row[best_peer].rate(),
            row[0].rate() / row[2].rate(),
        );
    }
    println!(
        "\nedit with the original file as `prediction`: {:.1} tokens/s, guesses kept {}; / ours off {:.2}",
        predicted.rate(),
        predicted.kept(),
        predicted.rate() / tallies[0][1].rate()
    );
    drop(servers);
    Ok(())
}
