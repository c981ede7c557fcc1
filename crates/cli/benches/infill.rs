//! Code completion as an editor asks for it, against llama-server's
//! `/infill`:
//!
//! ```text
//! LLAMA_SERVER=$(.ci/build-llama-server.sh) \
//!   cargo bench -p rusty-genius-cli --bench infill -- <qwen-coder.gguf> [rounds]
//! ```
//!
//! A 154-line Python file (fixtures/infill/typing) is typed line by line,
//! its last lines already there after the cursor; at every fourth line's
//! end (about 40 times) the editor asks for a completion, with the two
//! other files of the project as `input_extra`, as llama.vscode does
//! (`n_predict` 32, `n_indent` the line's, `t_max_predict_ms` 500, greedy).
//! Each server replays the session in turn, with the model loaded and
//! nothing else running; the latency is the whole completion's, from the
//! client. Reported per server: p50 and p90, the mean of the prompt tokens
//! each request decoded and of those it found cached, and those counts for
//! every request of the last round.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

mod common;

use common::{free_addr, genius_command, post_json, stem, threads, Server};
use serde_json::{json, Value};
use std::process::Command;

const CONTEXT: u32 = 8192;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../../fixtures/infill/typing/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"))
}

/// The requests of one typing session: at the end of every fourth line,
/// the file typed so far as the prefix and its last 4 lines (there from
/// the start) as the suffix.
fn session() -> Vec<Value> {
    let file = fixture("inventory.py");
    let lines: Vec<&str> = file.lines().collect();
    let tail = lines.len() - 4;
    let suffix = format!("\n\n{}\n", lines[tail..].join("\n"));
    let extra = json!([
        {"filename": "models.py", "text": fixture("models.py")},
        {"filename": "storage.py", "text": fixture("storage.py")},
    ]);
    (4..tail)
        .step_by(4)
        .map(|end| {
            let prefix = lines[..end].join("\n");
            let indent = lines[end - 1].len() - lines[end - 1].trim_start().len();
            json!({
                "input_prefix": prefix,
                "input_suffix": suffix,
                "input_extra": extra,
                "prompt": "",
                "n_predict": 32,
                "n_indent": indent,
                "t_max_predict_ms": 500,
                "temperature": 0,
                "top_k": 40,
                "top_p": 0.99,
                "samplers": ["top_k", "top_p", "infill"],
                "cache_prompt": true,
                "stream": false,
            })
        })
        .collect()
}

fn percentile(mut values: Vec<f64>, at: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let index = ((values.len() as f64 - 1.0) * at).round() as usize;
    values.get(index).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(model) = args.first() else {
        return Err("usage: infill <qwen-coder.gguf> [rounds]".into());
    };
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let Ok(binary) = std::env::var("LLAMA_SERVER") else {
        return Err("set LLAMA_SERVER to llama-server's path (.ci/build-llama-server.sh)".into());
    };
    let ours = {
        let addr = free_addr();
        let mut command = genius_command(addr, 1, CONTEXT, &[model]);
        command.arg("--no-kv-snapshots").env("RUST_LOG", "warn");
        Server::start("genius serve", command, addr, stem(model))?
    };
    let peer = {
        let addr = free_addr();
        let mut command = Command::new(&binary);
        command
            .args(["-m", model, "--host", "127.0.0.1"])
            .args(["--port", &addr.port().to_string()])
            .args(["--parallel", "1", "-c", &CONTEXT.to_string()])
            .args(["-t", &threads(), "-tb", &threads(), "--no-webui"]);
        Server::start("llama-server", command, addr, stem(model))?
    };
    let requests = session();
    println!(
        "{}, {} threads: {} completions per session, {rounds} sessions per server",
        stem(model),
        threads(),
        requests.len()
    );
    for server in [&ours, &peer] {
        let mut latencies = Vec::new();
        let (mut decoded, mut cached) = (Vec::new(), Vec::new());
        let mut last_round = Vec::new();
        for round in 0..rounds {
            last_round.clear();
            for request in &requests {
                let (took, reply) = post_json(server.addr, "/infill", request)
                    .map_err(|err| format!("{}: {err}", server.name))?;
                let ms = took.as_secs_f64() * 1e3;
                let timings = &reply["timings"];
                let new = timings["prompt_n"].as_f64().unwrap_or(0.0);
                let kept = timings["cache_n"].as_f64().unwrap_or(0.0);
                latencies.push(ms);
                decoded.push(new);
                cached.push(kept);
                last_round.push((ms, new, kept));
            }
            eprintln!("{}: session {round} done", server.name);
        }
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
        println!(
            "\n{}: p50 {:.0} ms, p90 {:.0} ms; prompt tokens per request: {:.0} decoded, {:.0} cached",
            server.name,
            percentile(latencies.clone(), 0.5),
            percentile(latencies, 0.9),
            mean(&decoded),
            mean(&cached)
        );
        let per: Vec<String> = last_round
            .iter()
            .map(|(ms, new, kept)| format!("{ms:.0}ms {new:.0}/{kept:.0}"))
            .collect();
        println!(
            "  last session (latency, decoded/cached): {}",
            per.join(", ")
        );
    }
    Ok(())
}
