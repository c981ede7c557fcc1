//! How long an ordinary client waits for its first token while another
//! client sends the heaviest requests `genius serve`'s default limits
//! admit, against the same wait on an idle server, in one run.
//!
//! ```text
//! cargo bench -p rusty-genius-cli --bench fairness -- <chat-model.gguf> [tries]
//! ```
//!
//! The heavy requests: a 32 KiB grammar of alternatives that all begin
//! with a character the model rarely writes (so every choice checks the
//! whole vocabulary); a 1000-value enum; a 32 KiB JSON schema of optional
//! properties (the converter's slowest kind); 128 tools the model must call
//! one of; and 2048 texts of 40 random words to embed (mean pooling, about
//! 250,000 tokens). While each runs, a second client sends greedy
//! 8-token chat requests, streamed, one after another; reported is the
//! time to their first token: the median and the worst of `tries`, and the
//! worst against the idle median.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: Child,
    addr: SocketAddr,
    model: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Sends a POST of `body` and returns the open connection.
fn send(addr: SocketAddr, path: &str, body: &Value) -> std::io::Result<TcpStream> {
    let body = body.to_string();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(stream)
}

/// Time to the first streamed content of a greedy 8-token chat request.
fn first_token(server: &Server, n: usize) -> Result<Duration, String> {
    let body = json!({
        "model": server.model,
        "messages": [{"role": "user", "content": format!("Say hello to guest number {n}.")}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": true,
    });
    let started = Instant::now();
    let stream = send(server.addr, "/v1/chat/completions", &body).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut first = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            break;
        }
        if first.is_none() && line.starts_with("data: {") && line.contains("\"content\":\"") {
            let chunk: Value = serde_json::from_str(line.trim_start_matches("data: "))
                .map_err(|e| e.to_string())?;
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|text| !text.is_empty())
            {
                first = Some(started.elapsed());
            }
        }
        if line.starts_with("data: [DONE]") {
            break;
        }
    }
    first.ok_or_else(|| "the chat request streamed no content".to_owned())
}

/// A pseudo-random lowercase word.
fn word(seed: &mut u64, len: usize) -> String {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (b'a' + (*seed % 26) as u8) as char
        })
        .collect()
}

/// The heavy requests, each as (name, path, body).
fn heavy(model: &str) -> Vec<(&'static str, &'static str, Value)> {
    let mut seed = 0x2545_F491_4F6C_DD1D_u64;
    let ask = |format: Value| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": "Answer."}],
            "max_tokens": 64,
            "temperature": 0,
            "response_format": format,
        })
    };
    // Alternatives that all start with U+0292, up to the 32 KiB limit.
    let mut grammar = String::from("root ::= ");
    while grammar.len() < 32 * 1024 - 32 {
        if !grammar.ends_with(' ') {
            grammar.push_str(" | ");
        }
        grammar.push_str(&format!("\"\u{292}{}\"", word(&mut seed, 9)));
    }
    let values: Vec<String> = (0..1000).map(|_| word(&mut seed, 12)).collect();
    let mut properties = serde_json::Map::new();
    while Value::Object(properties.clone()).to_string().len() < 31 * 1024 {
        properties.insert(
            format!("field_{}", word(&mut seed, 8)),
            json!({"type": "string", "description": word(&mut seed, 40)}),
        );
    }
    let tools: Vec<Value> = (0..128)
        .map(|i| {
            json!({"type": "function", "function": {
                "name": format!("tool_{i}"),
                "description": word(&mut seed, 30),
                "parameters": {"type": "object", "properties": {
                    "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}
                }, "required": ["city"]}
            }})
        })
        .collect();
    let texts: Vec<String> = (0..2048)
        .map(|_| {
            (0..40)
                .map(|_| word(&mut seed, 5))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    vec![
        (
            "32 KiB grammar",
            "/v1/chat/completions",
            ask(json!({"type": "grammar", "grammar": grammar})),
        ),
        (
            "1000-value enum",
            "/v1/chat/completions",
            ask(
                json!({"type": "json_schema", "json_schema": {"name": "e", "schema": {
                "type": "object", "properties": {"pick": {"enum": values}}, "required": ["pick"]}}}),
            ),
        ),
        (
            "32 KiB schema of optional properties",
            "/v1/chat/completions",
            ask(
                json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {
                "type": "object", "properties": properties}}}),
            ),
        ),
        ("128 tools, one required", "/v1/chat/completions", {
            let mut body = ask(json!({"type": "text"}));
            body["tools"] = json!(tools);
            body["tool_choice"] = json!("required");
            body
        }),
        (
            "2048 texts to embed",
            "/v1/embeddings",
            json!({"model": model, "input": texts, "pooling": "mean", "truncate": true}),
        ),
    ]
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(model) = args.first().cloned() else {
        return Err("usage: fairness <chat-model.gguf> [tries]".into());
    };
    let tries: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(5);
    let addr = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_genius"))
        .args(["serve", "--addr", &addr.to_string(), "--model", &model])
        .args(["--parallel", "4", "--ctx-size", "16384"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| format!("genius does not start: {err}"))?;
    let id = std::path::Path::new(&model)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let server = Server {
        child,
        addr,
        model: id,
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while first_token(&server, 0).is_err() {
        if Instant::now() > deadline {
            return Err("the server did not answer".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut n = 1;
    let mut idle = Vec::new();
    for _ in 0..tries {
        idle.push(first_token(&server, n)?);
        n += 1;
    }
    let idle_median = median(idle.clone());
    println!(
        "idle server: first token median {:.0} ms, worst {:.0} ms",
        idle_median.as_secs_f64() * 1e3,
        idle.iter().max().unwrap().as_secs_f64() * 1e3
    );
    println!("| while another client sends | first token, median | worst | worst ÷ idle median |");
    println!("|---|---|---|---|");
    for (name, path, body) in heavy(&server.model) {
        // Keep sending the heavy request while the chat requests run.
        let heavy_started = Instant::now();
        let mut heavy = send(server.addr, path, &body).map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(300));
        let mut waits = Vec::new();
        for _ in 0..tries {
            waits.push(first_token(&server, n)?);
            n += 1;
        }
        // Hang up: the heavy request stops.
        heavy.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut status = [0u8; 12];
        let answered = heavy
            .read(&mut status)
            .ok()
            .filter(|got| *got == status.len())
            .map(|_| String::from_utf8_lossy(&status[9..12]).into_owned());
        drop(heavy);
        let worst = *waits.iter().max().unwrap();
        println!(
            "| {name} ({}) | {:.0} ms | {:.0} ms | {:.2} |",
            match answered {
                Some(status) => format!(
                    "answered {status} within {:.1} s",
                    heavy_started.elapsed().as_secs_f64()
                ),
                None => "still running".to_owned(),
            },
            median(waits).as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3,
            worst.as_secs_f64() / idle_median.as_secs_f64()
        );
        // Let a cancelled request wind down before the next one.
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(())
}
