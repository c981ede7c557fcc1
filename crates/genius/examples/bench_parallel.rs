//! Total generation speed with many requests at once, against llama.cpp's
//! own server, measured side by side in the same run.
//!
//! ```text
//! LLAMA_SERVER=$(.ci/build-llama-server.sh) \
//!   cargo run --release --example bench_parallel -- <model.gguf> [rounds]
//! ```
//!
//! For N = 1, 2, 4 and 8, an Orchestrator with `parallel` N and a
//! `llama-server --parallel N` (same model, threads, context per request
//! and batch size) each answer N concurrent greedy 128-token requests,
//! rounds alternating between them; the median total tokens per second is
//! reported with the ratio. Then, on our side with `parallel` 4:
//!
//! - the time to first token of a short request alone, and while a
//!   400-token generation runs;
//! - the speed of three read streams beside a fourth nobody reads for 10 s,
//!   against four read streams;
//! - 16 concurrent requests, and the process's peak RSS.
//!
//! Without `LLAMA_SERVER` only our side is measured.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use rusty_genius::core::protocol::InferenceEvent;
use rusty_genius::core::{ErrorReport, InferenceConfig, PromptFormat};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::{Orchestrator, OrchestratorHandle, RequestStream};

/// Tokens each request generates.
const TOKENS: usize = 128;
/// Context per request, on both sides.
const CONTEXT: u32 = 1024;
/// Prompts that keep a base model going for far more than 128 tokens.
const PROMPTS: [&str; 8] = [
    "1, 2, 3, 4, 5, 6, 7,",
    "A B C D E F G",
    "100, 99, 98, 97, 96,",
    "2, 4, 6, 8, 10,",
    "10, 20, 30, 40,",
    "a b c d e f g h",
    "5, 10, 15, 20, 25,",
    "3, 6, 9, 12, 15,",
];

fn options(parallel: u32) -> LlamaOptions {
    LlamaOptions {
        context_size: CONTEXT,
        parallel,
        ..LlamaOptions::from_env()
    }
}

async fn start_ours(
    model: &Path,
    parallel: u32,
) -> Result<OrchestratorHandle, Box<dyn std::error::Error>> {
    let options = options(parallel);
    let genius = Orchestrator::builder()
        .engine(move || LlamaEngine::new(options.clone()))
        .build()?
        .start();
    genius.load(&model.display().to_string()).await?;
    Ok(genius)
}

fn greedy(tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy()
        .with_max_tokens(tokens)
        .with_prompt_format(PromptFormat::Raw)
}

/// What one request saw: tokens generated, and when its first text came.
struct Seen {
    tokens: usize,
    first: Option<Instant>,
    end: Instant,
}

async fn drain(stream: RequestStream) -> Result<Seen, ErrorReport> {
    drain_every(stream, None).await
}

/// Reads `stream` to its end: each event as it comes, or (`every`) all
/// that waits, at that interval, as a client that wants the whole answer.
async fn drain_every(
    mut stream: RequestStream,
    every: Option<Duration>,
) -> Result<Seen, ErrorReport> {
    let mut seen = Seen {
        tokens: 0,
        first: None,
        end: Instant::now(),
    };
    let mut ended = false;
    while !ended {
        let event = match every {
            Some(every) => match stream.next().now_or_never() {
                Some(event) => event,
                None => {
                    async_std::task::sleep(every).await;
                    continue;
                }
            },
            None => stream.next().await,
        };
        let Some(event) = event else { break };
        match event? {
            InferenceEvent::Content(_) => {
                seen.first.get_or_insert_with(Instant::now);
            }
            InferenceEvent::Usage(usage) => seen.tokens = usage.generated_tokens,
            InferenceEvent::Complete => ended = true,
            _ => {}
        }
    }
    seen.end = Instant::now();
    Ok(seen)
}

/// How a client reads: each token as it comes, or the whole answer.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Streamed,
    Collected,
}

/// How often a collecting client looks at its streams.
const COLLECT_EVERY: Duration = Duration::from_millis(50);

/// Total tokens per second of `n` concurrent requests on our side.
async fn ours_round(
    genius: &OrchestratorHandle,
    n: usize,
    round: usize,
    mode: Mode,
) -> Result<f64, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let streams: Vec<_> = (0..n)
        .map(|i| genius.infer(PROMPTS[(i + round) % PROMPTS.len()], greedy(TOKENS)))
        .collect();
    let mut total = 0;
    let every = (mode == Mode::Collected).then_some(COLLECT_EVERY);
    for seen in join_all(streams.into_iter().map(|stream| drain_every(stream, every))).await {
        total += seen?.tokens;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// llama.cpp's server, running until dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(
        binary: &str,
        model: &Path,
        parallel: u32,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let port = 18_000 + parallel as u16;
        let threads = options(parallel).threads.to_string();
        let child = Command::new(binary)
            .args(["-m", &model.display().to_string()])
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .args(["--parallel", &parallel.to_string()])
            .args(["-c", &(CONTEXT * parallel).to_string()])
            .args(["-t", &threads, "-tb", &threads])
            .args(["-b", "512", "-ub", "512", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok((200, _)) = server.request("GET", "/health", "") {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("llama-server did not become healthy in 2 minutes".into())
    }

    /// A blocking HTTP/1.1 exchange; the status and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Ok((
            status,
            if chunked {
                dechunk(body)
            } else {
                body.to_owned()
            },
        ))
    }

    /// Total tokens per second of `n` concurrent requests.
    fn round(
        &self,
        n: usize,
        round: usize,
        mode: Mode,
    ) -> Result<f64, Box<dyn std::error::Error + Send + Sync>> {
        let started = Instant::now();
        let total = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let prompt = PROMPTS[(i + round) % PROMPTS.len()];
                    scope.spawn(
                        move || -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
                            let body = serde_json::json!({
                                "prompt": prompt,
                                "n_predict": TOKENS,
                                "temperature": 0.0,
                                "top_k": 1,
                                "repeat_penalty": 1.0,
                                "stream": mode == Mode::Streamed,
                            });
                            let (status, reply) =
                                self.request("POST", "/completion", &body.to_string())?;
                            if status != 200 {
                                return Err(
                                    format!("llama-server answered {status}: {reply}").into()
                                );
                            }
                            Ok(tokens_predicted(&reply, mode)?)
                        },
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("request thread"))
                .sum::<Result<usize, _>>()
        })?;
        Ok(total as f64 / started.elapsed().as_secs_f64())
    }
}

/// The body of a chunked HTTP response.
fn dechunk(mut body: &str) -> String {
    let mut whole = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || size > rest.len() {
            break;
        }
        whole.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    whole
}

/// How many tokens llama-server says it generated: in its answer, or in
/// the last event of its stream.
fn tokens_predicted(reply: &str, mode: Mode) -> Result<usize, serde_json::Error> {
    let last = match mode {
        Mode::Collected => serde_json::from_str::<serde_json::Value>(reply)?,
        Mode::Streamed => reply
            .lines()
            .rev()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .find(|event| event["stop"] == true)
            .unwrap_or_default(),
    };
    Ok(last["tokens_predicted"]
        .as_u64()
        .or_else(|| last["timings"]["predicted_n"].as_u64())
        .unwrap_or(0) as usize)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The process's peak resident memory, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

#[async_std::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let Some(model) = args.next() else {
        eprintln!("usage: bench_parallel <model.gguf> [rounds]   (LLAMA_SERVER=path to compare)");
        std::process::exit(2);
    };
    let model = Path::new(&model);
    let rounds: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(3);
    let server_binary = std::env::var("LLAMA_SERVER").ok();
    println!(
        "{} threads, {TOKENS} tokens per request, {CONTEXT} tokens of context per request, median of {rounds} rounds",
        options(1).threads
    );

    // Memory first, while the peak is ours alone: 16 requests on 4 slots.
    {
        let genius = start_ours(model, 4).await?;
        let started = Instant::now();
        let streams: Vec<_> = (0..16)
            .map(|i| genius.infer(PROMPTS[i % PROMPTS.len()], greedy(64)))
            .collect();
        let mut complete = 0;
        for seen in join_all(streams.into_iter().map(drain)).await {
            complete += usize::from(seen?.tokens == 64);
        }
        println!(
            "16 concurrent 64-token requests, parallel 4: {complete}/16 complete in {:.1} s, peak RSS {:.0} MiB",
            started.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
    }

    println!(
        "\nN concurrent requests; tok/s = total generated tokens per second.\n\
         streamed: every client reads each token as it comes; collected: the\n\
         server answers whole, our clients look at their streams every {} ms.",
        COLLECT_EVERY.as_millis()
    );
    println!(
        "\n{:>3} {:>10} {:>10} {:>6}   {:>10} {:>10} {:>6}",
        "N", "streamed", "server", "ratio", "collected", "server", "ratio"
    );
    let mut single = None;
    for n in [1usize, 2, 4, 8] {
        let genius = start_ours(model, n as u32).await?;
        let server = match &server_binary {
            Some(binary) => Some(Server::start(binary, model, n as u32)?),
            None => None,
        };
        let mut line = format!("{n:>3}");
        for mode in [Mode::Streamed, Mode::Collected] {
            // One warm-up round each, not counted.
            ours_round(&genius, n, 0, mode).await?;
            if let Some(server) = &server {
                server.round(n, 0, mode).map_err(|err| err.to_string())?;
            }
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                ours.push(ours_round(&genius, n, round, mode).await?);
                if let Some(server) = &server {
                    theirs.push(
                        server
                            .round(n, round, mode)
                            .map_err(|err| err.to_string())?,
                    );
                }
            }
            let ours = median(ours);
            if mode == Mode::Streamed {
                single.get_or_insert(ours);
            }
            if theirs.is_empty() {
                line += &format!(" {ours:>10.1} {:>10} {:>6}  ", "-", "-");
            } else {
                let theirs = median(theirs);
                line += &format!(" {ours:>10.1} {theirs:>10.1} {:>6.3}  ", ours / theirs);
            }
        }
        println!("{line}");
        genius.shutdown();
    }

    let genius = start_ours(model, 4).await?;
    let one = ours_round(&genius, 1, 1, Mode::Streamed).await?;
    let four = ours_round(&genius, 4, 1, Mode::Streamed).await?;
    println!(
        "\nparallel 4: 4 concurrent requests {four:.1} tok/s = {:.2}x a single request's {one:.1} tok/s",
        four / one
    );

    // Time to first token of a short request, alone and beside a long one.
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    for round in 0..rounds {
        // Prompts no slot has seen, so that each one is really decoded.
        let short = |when: &str| {
            format!(
                "Run {round}, {when}. {}",
                PROMPTS[(round + 3) % PROMPTS.len()]
            )
        };
        let sent = Instant::now();
        let seen = drain(genius.infer(short("first"), greedy(4))).await?;
        alone.push(seen.first.map_or(f64::NAN, |t| (t - sent).as_secs_f64()));

        let mut long = genius.infer(PROMPTS[round % PROMPTS.len()], greedy(400));
        while !matches!(long.next().await, Some(Ok(InferenceEvent::Content(_)))) {}
        let long = async_std::task::spawn(drain(long));
        async_std::task::sleep(Duration::from_millis(500)).await;
        let sent = Instant::now();
        let seen = drain(genius.infer(short("second"), greedy(4))).await?;
        beside.push(seen.first.map_or(f64::NAN, |t| (t - sent).as_secs_f64()));
        long.await?;
    }
    let (alone, beside) = (median(alone), median(beside));
    println!(
        "time to first token of a short request: alone {:.0} ms, during a 400-token generation {:.0} ms, ratio {:.2}",
        alone * 1000.0,
        beside * 1000.0,
        beside / alone
    );

    // Three read streams beside one nobody reads for 10 s, against four
    // read streams.
    let three_of_four = |unread: bool| {
        let genius = genius.clone();
        async move {
            let fourth = genius.infer(PROMPTS[0], greedy(400));
            let started = Instant::now();
            let streams: Vec<_> = (1..4)
                .map(|i| genius.infer(PROMPTS[i], greedy(TOKENS)))
                .collect();
            let three = join_all(streams.into_iter().map(drain));
            let seen = if unread {
                let seen = three.await;
                async_std::task::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()))
                    .await;
                seen
            } else {
                // Read the fourth too, until the three are done.
                let mut fourth = fourth;
                let reading = async move {
                    while fourth.next().await.is_some() {}
                    futures::future::pending::<()>().await
                };
                futures::pin_mut!(three, reading);
                match futures::future::select(three, reading).await {
                    futures::future::Either::Left((seen, _)) => seen,
                    futures::future::Either::Right(((), _)) => unreachable!("reading never ends"),
                }
            };
            let end = seen
                .iter()
                .flatten()
                .map(|s| s.end)
                .max()
                .unwrap_or_else(Instant::now);
            let tokens: usize = seen.into_iter().flatten().map(|s| s.tokens).sum();
            tokens as f64 / (end - started).as_secs_f64()
        }
    };
    let (mut read, mut unread) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        read.push(three_of_four(false).await);
        unread.push(three_of_four(true).await);
    }
    let (read, unread) = (median(read), median(unread));
    println!(
        "three streams beside a fourth: read {read:.1} tok/s, unread for 10 s {unread:.1} tok/s, ratio {:.2}",
        unread / read
    );
    genius.shutdown();
    if let Some(single) = single {
        println!("(single-request rate with parallel 1: {single:.1} tok/s)");
    }
    Ok(())
}
