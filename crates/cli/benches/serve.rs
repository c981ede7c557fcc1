//! `genius serve` against llama.cpp's `llama-server`, side by side in one
//! run, through the same OpenAI endpoint and the same client.
//!
//! ```text
//! LLAMA_SERVER=$(.ci/build-llama-server.sh) \
//!   cargo bench -p rusty-genius-cli --bench serve -- <model.gguf> [rounds]
//! ```
//!
//! Both servers get the same model, threads, `--parallel 4`, context per
//! request and batch size. For 1 and 4 concurrent clients, each client
//! streams `POST /v1/completions` (greedy, 128 tokens, a ~110-token prompt
//! made unique per request so that no cache helps either side); rounds
//! alternate between the servers. Reported, as medians over rounds:
//! time to first token (per client), streamed tokens per second per client
//! (after the first token), and total tokens per second; then the ratio
//! ours ÷ theirs (for TTFT theirs ÷ ours, so above 1 is better for us too).

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_addr, median, threads, Server};

const TOKENS: usize = 128;
const CONTEXT: u32 = 1024;
const PARALLEL: u32 = 4;
const PROMPTS: [&str; 4] = [
    "1, 2, 3, 4, 5, 6, 7,",
    "A B C D E F G",
    "100, 99, 98, 97, 96,",
    "2, 4, 6, 8, 10,",
];
const PREAMBLE: &str = "The following lines are a test of counting. Each line continues the \
    sequence that the line begins, one item after another, without stopping, without comments \
    and without repeating any item. The sequences are numbers, letters or steps, written the \
    way a careful student would write them in a notebook. ";

/// One streamed request: time to the first token, then the times of all.
struct Streamed {
    first: Duration,
    last: Duration,
    tokens: usize,
}

fn stream_completion(server: &Server, prompt: &str) -> Result<Streamed, String> {
    let body = serde_json::json!({
        "model": server.model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let started = Instant::now();
    let mut stream = TcpStream::connect(server.addr).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let (mut first, mut last, mut tokens) = (None, Duration::ZERO, 0);
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            if line.starts_with("HTTP/1.1") && !line.contains(" 200 ") {
                return Err(format!("{}: {line}", server.name));
            }
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if chunk["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            let now = started.elapsed();
            first.get_or_insert(now);
            last = now;
            tokens += 1;
        }
    }
    let first = first.ok_or_else(|| format!("{}: no token streamed", server.name))?;
    Ok(Streamed {
        first,
        last,
        tokens,
    })
}

/// One round of `clients` concurrent streams: per-client TTFTs, per-client
/// token rates, and the total rate.
fn round(
    server: &Server,
    clients: usize,
    round: usize,
) -> Result<(Vec<f64>, Vec<f64>, f64), String> {
    let started = Instant::now();
    let results: Vec<Result<Streamed, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                // Unique per phase, round and client: llama-server keeps
                // evicted prompts in RAM (--cache-ram) and would answer a
                // repeated one from there.
                let prompt = format!(
                    "Notebook page {clients}-{round}-{i}-{}. {PREAMBLE}\n{}",
                    server.name,
                    PROMPTS[i % PROMPTS.len()]
                );
                scope.spawn(move || stream_completion(server, &prompt))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut ttft = Vec::new();
    let mut rate = Vec::new();
    let mut total = 0;
    for result in results {
        let streamed = result?;
        ttft.push(streamed.first.as_secs_f64() * 1000.0);
        let span = (streamed.last - streamed.first).as_secs_f64();
        if streamed.tokens > 1 && span > 0.0 {
            rate.push((streamed.tokens - 1) as f64 / span);
        }
        total += streamed.tokens;
    }
    Ok((ttft, rate, total as f64 / wall))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(model) = args.first().cloned() else {
        return Err("usage: serve <model.gguf> [rounds]".into());
    };
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let Ok(peer) = std::env::var("LLAMA_SERVER") else {
        return Err("set LLAMA_SERVER to llama-server's path (.ci/build-llama-server.sh)".into());
    };
    let threads = threads();
    let id = std::path::Path::new(&model)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let ours_addr = free_addr();
    let mut ours = Command::new(env!("CARGO_BIN_EXE_genius"));
    ours.args(["serve", "--addr", &ours_addr.to_string(), "--model", &model])
        .args([
            "--parallel",
            &PARALLEL.to_string(),
            "--ctx-size",
            &CONTEXT.to_string(),
        ])
        .args(["--threads", &threads])
        .env("GENIUS_BATCH_SIZE", "512")
        .env("RUST_LOG", "warn");
    let ours = Server::start("genius serve", ours, ours_addr, id.clone())?;

    let theirs_addr = free_addr();
    let mut theirs = Command::new(peer);
    theirs
        .args([
            "-m",
            &model,
            "--host",
            "127.0.0.1",
            "--port",
            &theirs_addr.port().to_string(),
        ])
        .args(["--parallel", &PARALLEL.to_string()])
        .args(["-c", &(CONTEXT * PARALLEL).to_string()])
        .args([
            "-t",
            &threads,
            "-tb",
            &threads,
            "-b",
            "512",
            "-ub",
            "512",
            "--no-webui",
        ]);
    let theirs = Server::start("llama-server", theirs, theirs_addr, id)?;

    println!(
        "model {model}, {threads} threads, parallel {PARALLEL}, {TOKENS} tokens per request, {rounds} rounds (medians)"
    );
    println!(
        "{:>7}  {:>22}  {:>22}  {:>22}",
        "clients", "TTFT ms ours/peer (×)", "tok/s/client (×)", "total tok/s (×)"
    );
    for clients in [1, 4] {
        // One warm-up round each, not counted.
        round(&ours, clients, 1000)?;
        round(&theirs, clients, 1000)?;
        let (mut a, mut b) = (
            (Vec::new(), Vec::new(), Vec::new()),
            (Vec::new(), Vec::new(), Vec::new()),
        );
        for r in 0..rounds {
            // Alternate who goes first.
            let order: [(&Server, bool); 2] = if r % 2 == 0 {
                [(&ours, true), (&theirs, false)]
            } else {
                [(&theirs, false), (&ours, true)]
            };
            for (server, is_ours) in order {
                let (ttft, rate, total) = round(server, clients, r)?;
                if std::env::var_os("BENCH_DETAIL").is_some() {
                    let mut sorted = ttft.clone();
                    sorted.sort_by(f64::total_cmp);
                    eprintln!("{} clients={clients} ttft={sorted:.0?}", server.name);
                }
                let side = if is_ours { &mut a } else { &mut b };
                side.0.extend(ttft);
                side.1.extend(rate);
                side.2.push(total);
            }
        }
        let (ttft_a, ttft_b) = (median(a.0), median(b.0));
        let (rate_a, rate_b) = (median(a.1), median(b.1));
        let (total_a, total_b) = (median(a.2), median(b.2));
        println!(
            "{clients:>7}  {:>7.1} / {:>6.1} ({:.3})  {:>6.1} / {:>5.1} ({:.3})  {:>6.1} / {:>5.1} ({:.3})",
            ttft_a,
            ttft_b,
            ttft_b / ttft_a,
            rate_a,
            rate_b,
            rate_a / rate_b,
            total_a,
            total_b,
            total_a / total_b
        );
    }
    Ok(())
}
