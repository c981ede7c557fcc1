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

/// Words no request shares with another: each edit's new name has one.
const WORDS: [&str; 40] = [
    "amber", "basil", "cedar", "delta", "ember", "fable", "garnet", "hazel", "indigo", "jasper",
    "kelp", "lilac", "maple", "nectar", "onyx", "pepper", "quill", "russet", "saffron", "tundra",
    "umber", "violet", "willow", "yarrow", "zephyr", "acorn", "birch", "clover", "dune", "fern",
    "grove", "heath", "iris", "juniper", "kestrel", "lichen", "moss", "nettle", "opal", "pine",
];

/// The edits asked for, one per request in turn, each with a new word.
fn change(index: usize) -> String {
    let word = WORDS[index % WORDS.len()];
    match index % 4 {
        0 => format!("Rename the method `total` to `{word}_total`."),
        1 => format!("Add a method `count_{word}` that returns the number of entries."),
        2 => format!(
            "Make `find` raise `{}Missing` (a new exception class) instead of returning None.",
            word[..1].to_uppercase() + &word[1..]
        ),
        _ => format!("Rename the attribute `entries` to `{word}_entries` everywhere."),
    }
}

/// Round `round`'s edit request number `offset` (0 alone, 1 to 4 at
/// once), and the file it is about: no two requests of a run alike.
fn edit_request(round: usize, offset: usize) -> (String, String) {
    let index = round * 5 + offset;
    let name = NAMES[index % NAMES.len()];
    let old = code(name);
    let change = change(index);
    (
        format!("{change} Answer with the whole file and nothing else.\n\n```python\n{old}```"),
        format!("```python\n{old}```"),
    )
}

/// Things ordered, each a quantity and its exact words; every round takes
/// three no other round has.
const ITEMS: [(u32, &str); 18] = [
    (3, "hand-thrown stoneware mugs, glazed in deep teal"),
    (2, "linen tea towels with a narrow red stripe"),
    (1, "cast iron trivet shaped like an oak leaf"),
    (4, "beeswax candles rolled by hand, unscented"),
    (2, "walnut serving boards with a juice groove"),
    (1, "enamel colander in speckled cream"),
    (6, "waxed cotton bread bags, drawstring top"),
    (1, "copper milk pan with a pouring lip"),
    (3, "olive wood spoons of different lengths"),
    (2, "glass storage jars with cork lids, one litre"),
    (5, "hemp dish brushes with replaceable heads"),
    (1, "slate cheese board engraved with a fern"),
    (2, "stoneware pie dishes, fluted edge"),
    (4, "cotton napkins dyed with indigo"),
    (1, "carbon steel wok seasoned for use"),
    (3, "porcelain egg cups painted with hens"),
    (2, "wool pot holders knitted in grey"),
    (1, "bamboo steamer with two tiers"),
];

fn json_request(round: usize) -> String {
    let name = NAMES[round % NAMES.len()];
    let city = CITIES[round % CITIES.len()];
    let items: Vec<String> = (0..3)
        .map(|i| {
            let (count, words) = ITEMS[(round * 3 + i) % ITEMS.len()];
            format!("{count} \"{words}\"")
        })
        .collect();
    format!(
        "Extract the customer's name, city, and each item ordered with its quantity and the exact words of its description, as JSON.\n\n\
         Order note: {name} Okafor from {city} asked for {}, {}, and {}, \
         delivered before the {round}th of next month to the back door of the bakery on Quay Street.",
        items[0], items[1], items[2]
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

/// What one reply's `timings` say.
struct Figures {
    generated: f64,
    rate: f64,
    guessed: f64,
    kept: f64,
    /// Milliseconds to the first token: the prompt's decoding.
    first_ms: f64,
}

fn figures(reply: &Value) -> Figures {
    let timings = &reply["timings"];
    let number = |key: &str| timings[key].as_f64().unwrap_or(0.0);
    Figures {
        generated: number("predicted_n"),
        rate: number("predicted_per_second"),
        guessed: number("draft_n"),
        kept: number("draft_n_accepted"),
        first_ms: number("prompt_ms"),
    }
}

#[derive(Default)]
struct Tally {
    rates: Vec<f64>,
    first_ms: Vec<f64>,
    guessed: f64,
    kept: f64,
}

impl Tally {
    fn add(&mut self, rate: f64, figures: &Figures) {
        self.rates.push(rate);
        self.first_ms.push(figures.first_ms);
        self.guessed += figures.guessed;
        self.kept += figures.kept;
    }

    fn rate(&self) -> f64 {
        median(self.rates.clone())
    }

    fn first_ms(&self) -> f64 {
        median(self.first_ms.clone())
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
    let mut mispredicted = Tally::default();
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
                let figures = figures(&reply);
                if keep {
                    tallies[t][s].add(figures.rate, &figures);
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
            let mut all = Figures {
                generated: 0.0,
                rate: 0.0,
                guessed: 0.0,
                kept: 0.0,
                first_ms: 0.0,
            };
            for reply in replies {
                let one = figures(&reply?);
                all.generated += one.generated;
                all.guessed += one.guessed;
                all.kept += one.kept;
                all.first_ms = all.first_ms.max(one.first_ms);
            }
            if keep {
                tallies[3][s].add(all.generated / wall, &all);
            }
            if s == 0 {
                // The edit with the original file as its prediction, and
                // with a prediction wrong everywhere (another text).
                for (tally, prediction) in [
                    (&mut predicted, original.clone()),
                    (&mut mispredicted, json_prompt.repeat(3)),
                ] {
                    let reply = chat(server.addr, &name, &edit, 600, Some(&prediction))?;
                    let figures = figures(&reply);
                    if keep {
                        tally.add(figures.rate, &figures);
                    }
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
        println!("\n{task} (generated tokens/s; guesses kept; ms to the first token):");
        for (s, (label, _)) in servers.iter().enumerate() {
            println!(
                "  {label:<30} {:>6.1}  {:>4}  {:>5.0}",
                row[s].rate(),
                row[s].kept(),
                row[s].first_ms()
            );
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
        "\nedit with the original file as `prediction`: {:.1} tokens/s, guesses kept {}, {:.0} ms to the first token; / ours off {:.2}",
        predicted.rate(),
        predicted.kept(),
        predicted.first_ms(),
        predicted.rate() / tallies[0][1].rate()
    );
    println!(
        "edit with a prediction wrong everywhere: {:.1} tokens/s, guesses kept {}; / ours without a prediction {:.2}",
        mispredicted.rate(),
        mispredicted.kept(),
        mispredicted.rate() / tallies[0][0].rate()
    );
    drop(servers);
    Ok(())
}
