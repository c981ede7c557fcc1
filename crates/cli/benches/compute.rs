//! How models share the CPU: one `genius serve` holding three models
//! against llama-server (its router, one process per model, for the mixes;
//! a single-model server for prompts and decoding), in one run.
//!
//! ```text
//! LLAMA_SERVER=$(.ci/build-llama-server.sh) \
//!   cargo bench -p rusty-genius-cli --bench compute -- <qwen.gguf> <gemma.gguf> <minilm.gguf> [rounds]
//! ```
//!
//! Every server gets the same threads, 4 parallel requests and 4096 tokens
//! of context per request; prompts differ from their first token in every
//! round, so no cache helps either side. Every server is up for the whole
//! run and each measure of ours alternates with the peer's, round after
//! round, so that the machine's drift falls on both alike. Reported are
//! medians of `rounds` (default 5):
//!
//! - **mix**: 4 greedy Qwen chats (32 tokens) and 1 gemma completion (48
//!   tokens) sent together; wall time, against each model's part alone on
//!   the same server, and against the router.
//! - **embed during chat**: 4 clients embedding 8 requests of 8 sentences
//!   each on MiniLM while 4 Qwen chats generate 64 tokens; each side's
//!   wall time against itself alone plus the other alone.
//! - **prefill**: a fresh prompt of about 1,000 tokens, one request, then
//!   4 at once (Qwen, gemma): prompt tokens per second against
//!   llama-server's.
//! - **decode**: 1 and 4 concurrent greedy 128-token completions (gemma):
//!   generated tokens per second against llama-server's.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_addr, genius_command, median, post_json, stem, threads, Server};
use serde_json::{json, Value};

const PARALLEL: u32 = 4;
const CONTEXT: u32 = 4096;

fn genius(models: &[&str]) -> Result<Server, String> {
    let addr = free_addr();
    let mut command = genius_command(addr, PARALLEL, CONTEXT, models);
    command.arg("--no-kv-snapshots").env("RUST_LOG", "warn");
    let server = Server::start("genius serve", command, addr, String::new())?;
    // Loads run in the background: wait for every model.
    for model in models {
        warm(addr, &stem(model))?;
    }
    Ok(server)
}

/// llama-server's engine settings, the same as ours.
fn peer_args(command: &mut Command, addr: SocketAddr) {
    command
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--parallel", &PARALLEL.to_string()])
        .args(["-c", &(CONTEXT * PARALLEL).to_string()])
        .args(["-t", &threads(), "-tb", &threads()])
        .args(["-b", "512", "-ub", "512", "--no-webui"]);
}

fn single(peer: &str, model: &str) -> Result<Server, String> {
    let addr = free_addr();
    let mut command = Command::new(peer);
    command.args(["-m", model]);
    peer_args(&mut command, addr);
    Server::start("llama-server", command, addr, stem(model))
}

fn router(peer: &str, qwen: &str, gemma: &str, minilm: &str) -> Result<Server, String> {
    let dir = std::env::temp_dir().join(format!("compute-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let presets = dir.join("presets.ini");
    std::fs::write(
        &presets,
        format!(
            "[{}]\nmodel = {qwen}\n\n[{}]\nmodel = {gemma}\n\n[{}]\nmodel = {minilm}\nembeddings = true\n",
            stem(qwen),
            stem(gemma),
            stem(minilm)
        ),
    )
    .map_err(|e| e.to_string())?;
    let addr = free_addr();
    let mut command = Command::new(peer);
    command.arg("--models-preset").arg(&presets);
    peer_args(&mut command, addr);
    let server = Server::start("llama-server router", command, addr, String::new())?;
    for model in [qwen, gemma, minilm] {
        warm(addr, &stem(model))?;
    }
    Ok(server)
}

/// One small request, so that the model is loaded (and warm).
fn warm(addr: SocketAddr, model: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let tried = if model.contains("minilm") {
            post_json(
                addr,
                "/v1/embeddings",
                &json!({"model": model, "input": "warm up"}),
            )
        } else {
            post_json(
                addr,
                "/v1/completions",
                &json!({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}),
            )
        };
        match tried {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() > deadline => return Err(format!("{model}: {err}")),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A pseudo-random text of `items` words and numbers (about 3 tokens
/// each), different for every `seed`.
fn text(seed: u64, items: usize) -> String {
    const WORDS: [&str; 16] = [
        "apple", "river", "stone", "cloud", "engine", "paper", "window", "garden", "silver",
        "market", "yellow", "planet", "quiet", "number", "forest", "bridge",
    ];
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..items)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("{}{}", WORDS[(state % 16) as usize], (state >> 8) % 100)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A greedy chat of `tokens` tokens; the tokens generated.
fn chat(addr: SocketAddr, model: &str, seed: u64, tokens: u32) -> Result<u64, String> {
    let (_, reply) = post_json(
        addr,
        "/v1/chat/completions",
        &json!({
            "model": model,
            // The unique part first, so that no cached prefix (not even
            // the chat template's system turn) spares one measure what
            // another pays.
            "messages": [
                {"role": "system", "content": format!("You tell stories to {}.", text(seed, 2))},
                {"role": "user", "content": "Write a long story about a lighthouse keeper."},
            ],
            "max_tokens": tokens,
            "temperature": 0,
        }),
    )?;
    completion_tokens(&reply)
}

/// A greedy completion of `tokens` tokens from a counting prompt; the
/// tokens generated.
fn count(addr: SocketAddr, model: &str, seed: u64, tokens: u32) -> Result<u64, String> {
    let start = 10 + seed % 500;
    let prompt: Vec<String> = (start..start + 6).map(|n| n.to_string()).collect();
    let (_, reply) = post_json(
        addr,
        "/v1/completions",
        &json!({
            "model": model,
            "prompt": format!("{},", prompt.join(", ")),
            "max_tokens": tokens,
            "temperature": 0,
        }),
    )?;
    completion_tokens(&reply)
}

fn completion_tokens(reply: &Value) -> Result<u64, String> {
    reply["usage"]["completion_tokens"]
        .as_u64()
        .ok_or_else(|| format!("no usage: {reply}"))
}

/// A fresh prompt of about `items × 3` tokens, answered with one token;
/// the prompt's tokens.
fn prefill_request(addr: SocketAddr, model: &str, seed: u64, items: usize) -> Result<u64, String> {
    let (_, reply) = post_json(
        addr,
        "/v1/completions",
        &json!({"model": model, "prompt": text(seed, items), "max_tokens": 1, "temperature": 0}),
    )?;
    reply["usage"]["prompt_tokens"]
        .as_u64()
        .ok_or_else(|| format!("no usage: {reply}"))
}

/// 8 requests of 8 sentences each, one after another.
fn embed_batch(addr: SocketAddr, model: &str, seed: u64) -> Result<(), String> {
    for request in 0..8 {
        let input: Vec<String> = (0..8)
            .map(|n| text(seed * 1000 + request * 10 + n, 8))
            .collect();
        let (_, reply) = post_json(
            addr,
            "/v1/embeddings",
            &json!({"model": model, "input": input}),
        )?;
        if reply["data"].as_array().map_or(0, Vec::len) != 8 {
            return Err(format!("{model}: not 8 vectors: {reply}"));
        }
    }
    Ok(())
}

type Job = Box<dyn FnOnce() -> Result<u64, String> + Send>;

/// Runs `jobs` at once; the wall time of each group (jobs are tagged by
/// group) and the sum of what they returned.
fn together(jobs: Vec<(usize, Job)>) -> Result<(Vec<Duration>, u64), String> {
    let started = Instant::now();
    let groups = jobs.iter().map(|(g, _)| g + 1).max().unwrap_or(0);
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(group, job)| {
            std::thread::spawn(move || {
                let result = job();
                (group, started.elapsed(), result)
            })
        })
        .collect();
    let mut ends = vec![Duration::ZERO; groups];
    let mut total = 0;
    for handle in handles {
        let (group, took, result) = handle.join().map_err(|_| "a client panicked")?;
        total += result?;
        ends[group] = ends[group].max(took);
    }
    Ok((ends, total))
}

/// The clients of a mixed load: `groups[g]` says how many clients group
/// `g` has and what its client `n` does; `parts` picks the groups that run.
fn clients(parts: [bool; 2], groups: [(u64, &dyn Fn(u64) -> Job); 2]) -> Vec<(usize, Job)> {
    groups
        .iter()
        .enumerate()
        .filter(|(group, _)| parts[*group])
        .flat_map(|(group, (count, client))| (0..*count).map(move |n| (group, client(n))))
        .collect()
}

/// The mixed load: group 0 four Qwen chats, group 1 gemma's completion.
fn mix_jobs(
    addr: SocketAddr,
    qwen: &str,
    gemma: &str,
    seed: u64,
    parts: [bool; 2],
) -> Vec<(usize, Job)> {
    let chat_client = |n: u64| -> Job {
        let qwen = qwen.to_owned();
        Box::new(move || chat(addr, &qwen, seed * 10 + n, 32))
    };
    let count_client = |_: u64| -> Job {
        let gemma = gemma.to_owned();
        Box::new(move || count(addr, &gemma, seed, 48))
    };
    clients(parts, [(4, &chat_client), (1, &count_client)])
}

/// Retrieval's load: group 0 four Qwen chats, group 1 four embedding
/// clients.
fn rag_jobs(
    addr: SocketAddr,
    qwen: &str,
    minilm: &str,
    seed: u64,
    parts: [bool; 2],
) -> Vec<(usize, Job)> {
    let chat_client = |n: u64| -> Job {
        let qwen = qwen.to_owned();
        Box::new(move || chat(addr, &qwen, seed * 10 + n, 64))
    };
    let embed_client = |n: u64| -> Job {
        let minilm = minilm.to_owned();
        Box::new(move || embed_batch(addr, &minilm, seed * 10 + n).map(|()| 0))
    };
    clients(parts, [(4, &chat_client), (4, &embed_client)])
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The wall time of a whole load.
fn wall(jobs: Vec<(usize, Job)>) -> Result<f64, String> {
    Ok(secs(
        together(jobs)?.0.into_iter().max().unwrap_or_default(),
    ))
}

/// `clients` requests made by `make` at once; their tokens (what `make`'s
/// requests return) per second.
fn rate(clients: u64, mut make: impl FnMut() -> Job) -> Result<f64, String> {
    let jobs: Vec<(usize, Job)> = (0..clients).map(|_| (0, make())).collect();
    let (ends, tokens) = together(jobs)?;
    Ok(tokens as f64 / secs(ends[0]))
}

/// Lets the last server's threads go idle before the next measure
/// (llama.cpp's threads spin a while after their work).
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// Medians, and the ratio of the first to the second.
fn ratio(ours: Vec<f64>, theirs: Vec<f64>) -> (f64, f64, f64) {
    let (ours, theirs) = (median(ours), median(theirs));
    (ours, theirs, ours / theirs)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(qwen), Some(gemma), Some(minilm)) = (args.first(), args.get(1), args.get(2)) else {
        return Err("usage: compute <qwen.gguf> <gemma.gguf> <minilm.gguf> [rounds]".into());
    };
    let rounds: u64 = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(5);
    let Ok(peer) = std::env::var("LLAMA_SERVER") else {
        return Err("set LLAMA_SERVER to llama-server's path (.ci/build-llama-server.sh)".into());
    };
    let (q, g, m) = (stem(qwen), stem(gemma), stem(minilm));
    println!(
        "{} threads, parallel {PARALLEL}, context {CONTEXT} per request; medians of {rounds} rounds, every measure alternating between the servers",
        threads()
    );
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let mut fresh = || {
        seed += 1;
        seed
    };

    // Every server up at once (idle ones take no CPU), so that each
    // measure of ours sits next to the peer's in time.
    let ours = genius(&[qwen, gemma, minilm]).map_err(|e| format!("genius serve: {e}"))?;
    let singles = [
        single(&peer, qwen).map_err(|e| format!("llama-server: {e}"))?,
        single(&peer, gemma).map_err(|e| format!("llama-server: {e}"))?,
    ];
    // The router last: it chooses ports for its instances as it starts
    // them, after the other servers hold theirs.
    let router = router(&peer, qwen, gemma, minilm).map_err(|e| format!("router: {e}"))?;
    let (theirs, single_addr) = (router.addr, [singles[0].addr, singles[1].addr]);
    let ours_server = ours;
    let ours = ours_server.addr;

    let mut mix = [(); 4].map(|()| Vec::new());
    let mut rag = [(); 6].map(|()| Vec::new());
    let mut prefill = [(); 8].map(|()| Vec::new());
    let mut decode = [(); 4].map(|()| Vec::new());
    // Round 0 warms every server and model up and is not counted.
    for round in 0..=rounds {
        let keep = |values: &mut Vec<f64>, value: f64| {
            if round > 0 {
                values.push(value);
            }
        };
        // The mix of two generating models.
        for (k, (addr, parts)) in [
            (ours, [true, true]),
            (theirs, [true, true]),
            (ours, [true, false]),
            (ours, [false, true]),
        ]
        .into_iter()
        .enumerate()
        {
            settle();
            keep(&mut mix[k], wall(mix_jobs(addr, &q, &g, fresh(), parts))?);
        }
        // Embeddings during chats: each side's own wall time.
        for (k, addr) in [ours, theirs].into_iter().enumerate() {
            settle();
            let (ends, _) = together(rag_jobs(addr, &q, &m, fresh(), [true, true]))?;
            keep(&mut rag[2 * k], secs(ends[0]));
            keep(&mut rag[2 * k + 1], secs(ends[1]));
        }
        settle();
        keep(
            &mut rag[4],
            wall(rag_jobs(ours, &q, &m, fresh(), [true, false]))?,
        );
        settle();
        keep(
            &mut rag[5],
            wall(rag_jobs(ours, &q, &m, fresh(), [false, true]))?,
        );
        // Prompts, one and four at once, and gemma's decoding.
        for (i, name) in [&q, &g].into_iter().enumerate() {
            for (side, addr) in [ours, single_addr[i]].into_iter().enumerate() {
                settle();
                let one = rate(1, || {
                    let (n, s) = (name.clone(), fresh());
                    Box::new(move || prefill_request(addr, &n, s, 340))
                })?;
                keep(&mut prefill[4 * i + side], one);
                settle();
                let four = rate(4, || {
                    let (n, s) = (name.clone(), fresh());
                    Box::new(move || prefill_request(addr, &n, s, 340))
                })?;
                keep(&mut prefill[4 * i + 2 + side], four);
            }
        }
        for (side, addr) in [ours, single_addr[1]].into_iter().enumerate() {
            for (k, clients) in [1, 4].into_iter().enumerate() {
                settle();
                let tokens = rate(clients, || {
                    let (n, s) = (g.clone(), fresh());
                    Box::new(move || count(addr, &n, s, 128))
                })?;
                keep(&mut decode[2 * k + side], tokens);
            }
        }
    }
    drop((ours_server, router, singles));

    let [mixed, router_mixed, qwen_alone, gemma_alone] = mix.map(median);
    println!("\nmix: 4 Qwen chats (32 tokens) + 1 gemma completion (48 tokens), sent together");
    println!(
        "  ours {mixed:.2} s; alone: Qwen {qwen_alone:.2} s + gemma {gemma_alone:.2} s = {:.2} s; router {router_mixed:.2} s",
        qwen_alone + gemma_alone
    );
    println!(
        "  ours ÷ router {:.3} (at most 1 wanted); ours ÷ sum alone {:.3} (at most 1.1 wanted)",
        mixed / router_mixed,
        mixed / (qwen_alone + gemma_alone)
    );
    let [chat_mixed, embed_mixed, router_chat, router_embed, chat_alone, embed_alone] =
        rag.map(median);
    println!("\nembed during chat: 4 Qwen chats (64 tokens) and 4 clients × 8 MiniLM requests of 8 sentences");
    println!("  chats: {chat_mixed:.2} s mixed, {chat_alone:.2} s alone; embeddings: {embed_mixed:.2} s mixed, {embed_alone:.2} s alone; router: chats {router_chat:.2} s, embeddings {router_embed:.2} s");
    println!(
        "  chats ÷ (alone + embeddings alone) {:.3}; embeddings ÷ (alone + chats alone) {:.3} (at most 1.2 wanted)",
        chat_mixed / (chat_alone + embed_alone),
        embed_mixed / (embed_alone + chat_alone)
    );
    println!("\nprefill of a fresh prompt of about 1,000 tokens (prompt tokens/s), ours vs llama-server (at least 1 wanted):");
    let mut prefill = prefill.into_iter();
    for name in [&q, &g] {
        let mut next = || prefill.next().unwrap_or_default();
        let (one_ours, one_theirs) = (next(), next());
        let (four_ours, four_theirs) = (next(), next());
        let one = ratio(one_ours, one_theirs);
        let four = ratio(four_ours, four_theirs);
        println!(
            "  {name}: 1 prompt {:.0} vs {:.0} ({:.3}); 4 at once {:.0} vs {:.0} ({:.3})",
            one.0, one.1, one.2, four.0, four.1, four.2
        );
    }
    let [one_ours, one_theirs, four_ours, four_theirs] = decode;
    let one = ratio(one_ours, one_theirs);
    let four = ratio(four_ours, four_theirs);
    println!(
        "\ndecode, gemma, 128-token completions (generated tokens/s over the requests' wall time), ours vs llama-server (at least 0.98 wanted):\n  1 client {:.1} vs {:.1} ({:.3}); 4 clients {:.1} vs {:.1} ({:.3})",
        one.0, one.1, one.2, four.0, four.1, four.2
    );
    Ok(())
}
