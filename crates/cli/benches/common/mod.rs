//! What the benchmarks share: server processes, health checks, JSON
//! requests over plain HTTP/1.1, medians and memory.

#![allow(dead_code)] // each benchmark uses its own part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A server process, killed when dropped.
pub(crate) struct Server {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) model: String,
    /// Its standard error, line by line, when it was captured.
    pub(crate) log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Children first (llama-server's router runs one per model).
        for child in children(self.child.id()) {
            let _ = Command::new("kill").arg(child.to_string()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `command` and waits until `/health` says 200.
    pub(crate) fn start(
        name: &'static str,
        mut command: Command,
        addr: SocketAddr,
        model: String,
    ) -> Result<Self, String> {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("{name} does not start: {err}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        let server = Self {
            name,
            child,
            addr,
            model,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut server = server;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                // Another process may answer on its port (one it could not
                // bind): do not take that for this server.
                let log = server.log.lock().unwrap().join("\n");
                return Err(format!("{name} exited ({status}):\n{log}"));
            }
            if health(addr) {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("{name} did not become healthy"))
    }

    /// Log lines so far that contain `text`.
    pub(crate) fn log_count(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(text))
            .count()
    }

    /// Resident memory of the process and its children, in bytes.
    pub(crate) fn rss(&self) -> u64 {
        let pid = self.child.id();
        std::iter::once(pid).chain(children(pid)).map(rss_of).sum()
    }
}

/// The pids whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

pub(crate) fn health(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    line.contains(" 200 ")
}

/// `POST path` with a JSON body; the whole answer's time and its body.
pub(crate) fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<(Duration, serde_json::Value), String> {
    let body = body.to_string();
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{path}: {}", head.lines().next().unwrap_or("")));
    }
    // A chunked body (llama-server) or a plain one.
    let json = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    let value = serde_json::from_str(&json).map_err(|e| format!("{path}: {e}"))?;
    Ok((took, value))
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The engine threads a benchmark uses: `GENIUS_THREADS`, or every core.
pub(crate) fn threads() -> String {
    std::env::var("GENIUS_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get()))
        .to_string()
}

/// `genius serve` on `addr` with `models`, `parallel` requests of
/// `context` tokens each, the benchmark's threads and batch size.
pub(crate) fn genius_command(
    addr: SocketAddr,
    parallel: u32,
    context: u32,
    models: &[&str],
) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_genius"));
    command
        .args(["serve", "--addr", &addr.to_string()])
        .args(["--parallel", &parallel.to_string()])
        .args(["--ctx-size", &context.to_string()])
        .args(["--threads", &threads()])
        .env("GENIUS_BATCH_SIZE", "512");
    for model in models {
        command.args(["--model", model]);
    }
    command
}

/// A model file's name without its folder and `.gguf`: the name the
/// servers know it by.
pub(crate) fn stem(path: &str) -> String {
    std::path::Path::new(path)
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}
