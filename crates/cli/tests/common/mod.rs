//! A `genius serve` process for tests, and a small HTTP/1.1 client that
//! can stop reading (or hang up) wherever a test wants.

#![allow(dead_code, clippy::print_stderr)] // each test binary uses a part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `genius serve`; killed when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `genius serve --addr 127.0.0.1:0 <args>` with `env` set and
    /// waits until it listens. KV snapshots on disk are off unless `env`
    /// names a folder for them (`GENIUS_KV_DIR`): no test reads what
    /// another wrote.
    pub(crate) fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_genius"));
        command
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("GENIUS_KV_DIR", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("genius starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("on http://").nth(1) {
                        if line.starts_with("genius: serving") {
                            let addr = rest.trim_end_matches("/v1").to_owned();
                            let _ = addr_tx.send(addr);
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match addr_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => addr.parse().expect("an address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "genius serve did not start:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Self { child, addr, log }
    }

    /// Waits until /health says ok (the model is loaded).
    pub(crate) fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if let Ok(reply) = request(self.addr, "GET", "/health", &[], None) {
                if reply.status == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the server never became healthy:\n{}",
            self.log().join("\n")
        );
    }

    /// Everything the server logged so far.
    pub(crate) fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a log line containing `text`.
    pub(crate) fn wait_for_log(&self, text: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(text)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the process to stop (SIGTERM) and waits up to a minute for it
    /// to exit: it finishes what it was doing and saves its KV snapshots.
    pub(crate) fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "genius serve did not exit within a minute of SIGTERM:\n{}",
            self.log().join("\n")
        );
    }

    /// Kills the process at once (SIGKILL).
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in bytes (Linux).
    pub(crate) fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// Whether the process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {}", String::from_utf8_lossy(&self.body))
        })
    }

    /// The body as text (lossy), for messages.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON chunks of a server-sent event stream, which must have
    /// ended in `data: [DONE]`.
    pub(crate) fn chunks(&self) -> Vec<Value> {
        let events = self.events();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "the stream did not end in [DONE]: {events:?}"
        );
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    /// The text a stream carried, joined from each chunk's string at
    /// `pointer` (e.g. `/choices/0/delta/content`).
    pub(crate) fn streamed_text(&self, pointer: &str) -> String {
        self.chunks()
            .iter()
            .filter_map(|chunk| chunk.pointer(pointer).and_then(Value::as_str))
            .collect()
    }

    /// The text of a successful `/v1/completions` answer, whole or streamed.
    pub(crate) fn completion_text(&self, streamed: bool) -> String {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.body));
        if streamed {
            self.streamed_text("/choices/0/text")
        } else {
            self.json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }

    /// The `data:` payloads of a server-sent event stream.
    pub(crate) fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }
}

/// Sends one request (`Connection: close`) and reads the whole answer.
pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Reply> {
    let mut stream = send(addr, method, path, headers, body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    Ok(parse(&raw))
}

/// Sends a request and returns the connection, to read as the test likes.
pub(crate) fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        // A server may answer (413) and close before taking it all.
        let _ = stream.write_all(body);
    }
    Ok(stream)
}

/// Sends `raw` bytes as they are (a whole request, head and body) and
/// reads the whole answer.
pub(crate) fn raw(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(raw)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(parse(&answer))
}

/// Posts JSON.
pub(crate) fn post(addr: SocketAddr, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    request(
        addr,
        "POST",
        path,
        headers,
        Some(body.to_string().as_bytes()),
    )
    .expect("the server answers")
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..end]).to_string();
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        body.extend_from_slice(&raw[start..(start + size).min(raw.len())]);
        raw = &raw[(start + size + 2).min(raw.len())..];
    }
    body
}

/// A file Pinky accepts as a model (the GGUF magic and little else).
pub(crate) fn pinky_model(dir: &Path) -> String {
    let path = dir.join("pinky.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&[3, 0, 0, 0]);
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// `genius serve` on the Pinky stub engine, its stand-in model written in
/// `dir` and its home there, with `extra` arguments; healthy.
pub(crate) fn pinky_server(dir: &Path, extra: &[&str]) -> Server {
    let model = pinky_model(dir);
    let mut args = vec!["--engine", "pinky", "--model", model.as_str()];
    args.extend_from_slice(extra);
    let server = Server::start(
        &args,
        &[("GENIUS_HOME", &dir.join("home").display().to_string())],
    );
    server.wait_healthy();
    server
}

/// A Python that imports every one of `modules`, or `None` with a note
/// (under CI, a failure: CI must run the client tests). `pip` is what to
/// install for them.
pub(crate) fn python_with(modules: &[&str], pip: &str) -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let found = Command::new(&python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        return Some(python);
    }
    let why = format!("{python} lacks one of {modules:?} (pip install {pip})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}: CI must run the client tests");
    }
    eprintln!("skipped: {why}");
    None
}

/// Runs the client script `script` (in tests/) with `python` and `args`,
/// and checks that it passed all its `checks` (it prints `N checks
/// passed`); the server's log goes with a failure.
pub(crate) fn run_client_script(
    python: &str,
    script: &str,
    args: &[&str],
    checks: usize,
    server: &Server,
) {
    let script = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "the client checks of {script} failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log().join("\n")
    );
    assert!(
        stdout.contains(&format!("{checks} checks passed")),
        "{stdout}"
    );
}

/// Where the npm package `name` is among the tools `site/check.sh`
/// installs, when it and Node are there.
pub(crate) fn node_module(name: &str) -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".cache"))
        })?;
    let module = cache
        .join("rusty-genius-site-check/node_modules")
        .join(name);
    let ready = module.is_dir()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    ready.then_some(module)
}

/// Where playwright-core is (`site/check.sh` installs it), when it, Node
/// and Chromium at /usr/bin/chromium are all there.
pub(crate) fn playwright() -> Option<std::path::PathBuf> {
    node_module("playwright-core").filter(|_| std::path::Path::new("/usr/bin/chromium").exists())
}
