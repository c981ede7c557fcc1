//! Retrieval-shaped traffic, one embedding then one short chat per round,
//! through one `genius serve` holding both models, through two
//! single-model `genius serve`s, and through llama-server's router (one
//! process per model), side by side in one run.
//!
//! ```text
//! LLAMA_SERVER=$(.ci/build-llama-server.sh) \
//!   cargo bench -p rusty-genius-cli --bench rag -- <chat.gguf> <embed.gguf> [rounds]
//! ```
//!
//! Every server gets the same threads, 4 parallel requests and 2048
//! tokens of context per request. A round is `POST /v1/embeddings` (one
//! question) then `POST /v1/chat/completions` (greedy, 8 tokens) with the
//! same question. Each setup runs half the rounds in a block of its own,
//! twice, blocks alternating; the first round of a block is not counted. Reported: median latency of each request kind,
//! model loads after the warm-up (ours, from its log), resident memory,
//! and the ratios.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

mod common;

use std::process::Command;

use common::{free_addr, genius_command, median, post_json, stem, threads, Server};
use serde_json::json;

const PARALLEL: u32 = 4;
const CONTEXT: u32 = 2048;

/// One setup: where embeddings and chats go, and under which names.
struct Setup {
    name: &'static str,
    embed: (usize, String),
    chat: (usize, String),
}

fn genius(name: &'static str, models: &[&str]) -> Result<Server, String> {
    let addr = free_addr();
    let mut command = genius_command(addr, PARALLEL, CONTEXT, models);
    command.env("RUST_LOG", "rusty_genius_stem=info,warn");
    Server::start(name, command, addr, String::new())
}

fn router(peer: &str, chat: &str, embed: &str) -> Result<Server, String> {
    let dir = std::env::temp_dir().join(format!("rag-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let presets = dir.join("presets.ini");
    // The embedding model's instance needs `--embeddings`; both get the
    // same engine settings from the router's own arguments.
    std::fs::write(
        &presets,
        format!("[embed]\nmodel = {embed}\nembeddings = true\n\n[chat]\nmodel = {chat}\n"),
    )
    .map_err(|e| e.to_string())?;
    let addr = free_addr();
    let mut command = Command::new(peer);
    command
        .arg("--models-preset")
        .arg(&presets)
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--parallel", &PARALLEL.to_string()])
        .args(["-c", &(CONTEXT * PARALLEL).to_string()])
        .args(["-t", &threads(), "-tb", &threads()])
        .args(["-b", "512", "-ub", "512", "--no-webui"]);
    Server::start("llama-server router", command, addr, String::new())
}

/// One embedding, then one chat with the same question: their times in ms.
fn rag_round(servers: &[Server], setup: &Setup, round: usize) -> Result<(f64, f64), String> {
    let question = format!("In one word: what colour is a ripe fruit number {round}?");
    let (embed_server, embed_model) = (&servers[setup.embed.0], &setup.embed.1);
    let (embed_took, reply) = post_json(
        embed_server.addr,
        "/v1/embeddings",
        &json!({"model": embed_model, "input": question}),
    )
    .map_err(|e| format!("{}: {e}", setup.name))?;
    if reply["data"][0]["embedding"].as_array().map_or(0, Vec::len) == 0 {
        return Err(format!("{}: no embedding: {reply}", setup.name));
    }
    let (chat_server, chat_model) = (&servers[setup.chat.0], &setup.chat.1);
    let (chat_took, reply) = post_json(
        chat_server.addr,
        "/v1/chat/completions",
        &json!({
            "model": chat_model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 8,
            "temperature": 0,
        }),
    )
    .map_err(|e| format!("{}: {e}", setup.name))?;
    if reply["choices"][0]["message"]["content"].as_str().is_none() {
        return Err(format!("{}: no answer: {reply}", setup.name));
    }
    Ok((
        embed_took.as_secs_f64() * 1000.0,
        chat_took.as_secs_f64() * 1000.0,
    ))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(chat), Some(embed)) = (args.first().cloned(), args.get(1).cloned()) else {
        return Err("usage: rag <chat.gguf> <embed.gguf> [rounds]".into());
    };
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(20);
    let Ok(peer) = std::env::var("LLAMA_SERVER") else {
        return Err("set LLAMA_SERVER to llama-server's path (.ci/build-llama-server.sh)".into());
    };

    let servers = vec![
        genius("one genius serve, both models", &[&chat, &embed])?,
        genius("genius serve, chat only", &[&chat])?,
        genius("genius serve, embed only", &[&embed])?,
        router(&peer, &chat, &embed)?,
    ];
    let setups = [
        Setup {
            name: "one genius serve",
            embed: (0, stem(&embed)),
            chat: (0, stem(&chat)),
        },
        Setup {
            name: "two genius serves",
            embed: (2, stem(&embed)),
            chat: (1, stem(&chat)),
        },
        Setup {
            name: "llama-server router",
            embed: (3, "embed".into()),
            chat: (3, "chat".into()),
        },
    ];
    let mut times = vec![(Vec::new(), Vec::new()); setups.len()];
    let mut loads_after_warmup = None;
    // Each setup runs its rounds in a block of its own, so that no other
    // server's threads are still busy (llama.cpp's threads spin a while
    // after their work); blocks alternate, twice each, and a pause lets
    // the last block's threads go to sleep.
    for pass in 0..2 {
        for turn in 0..setups.len() {
            let index = (turn + pass) % setups.len();
            let setup = &setups[index];
            std::thread::sleep(std::time::Duration::from_millis(500));
            for round in 0..=rounds / 2 {
                if index == 0 && round == 1 && loads_after_warmup.is_none() {
                    loads_after_warmup = Some(servers[0].log_count(" ready, context "));
                }
                let (embed_ms, chat_ms) = rag_round(&servers, setup, pass * 1000 + round)?;
                // The first round of a block warms it up.
                if round > 0 {
                    times[index].0.push(embed_ms);
                    times[index].1.push(chat_ms);
                }
            }
        }
    }
    let loads = servers[0].log_count(" ready, context ") - loads_after_warmup.unwrap_or(0);

    println!(
        "{rounds} rounds, {} threads, parallel {PARALLEL}, context {CONTEXT} per request (medians)",
        threads()
    );
    println!("{:<22} {:>10} {:>10}", "setup", "embed ms", "chat ms");
    let medians: Vec<(f64, f64)> = times
        .into_iter()
        .map(|(embed, chat)| (median(embed), median(chat)))
        .collect();
    for (setup, (embed, chat)) in setups.iter().zip(&medians) {
        println!("{:<22} {embed:>10.1} {chat:>10.1}", setup.name);
    }
    let (ours, singles, router) = (medians[0], medians[1], medians[2]);
    println!(
        "one ÷ two single-model servers: embed {:.3}, chat {:.3} (at most 1.2 wanted)",
        ours.0 / singles.0,
        ours.1 / singles.1
    );
    println!(
        "router ÷ ours (above 1: ours is faster): embed {:.3}, chat {:.3}",
        router.0 / ours.0,
        router.1 / ours.1
    );
    println!("model loads in the one genius serve after the warm-up round: {loads}");
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let (one, two) = (servers[0].rss(), servers[1].rss() + servers[2].rss());
    println!(
        "resident memory: one genius serve {:.0} MB, two single-model ones {:.0} MB ({:.3}), router and its instances {:.0} MB",
        mb(one),
        mb(two),
        one as f64 / two as f64,
        mb(servers[3].rss())
    );
    Ok(())
}
