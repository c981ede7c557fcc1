//! KV snapshots on disk: a slot's cache, saved when its model leaves
//! memory (or when the RAM tier overflows), read back by a later request
//! that shares its prefix, even after a restart.
//!
//! A snapshot is one file, `<dir>/<model sha256>/<name>.kvs`:
//!
//! ```text
//! b"RGKV" | format (u32 LE) | header length (u32 LE) | header (JSON)
//!        | logits (f32 LE) | llama.cpp's sequence state | sha256 of all before
//! ```
//!
//! The header names everything that shapes the KV cache ([`Shape`]: the
//! model file's sha256, the context per request, the number of sequences,
//! the KV types, llama.cpp's version, the CPU's kernels), the tokens the
//! state holds, and the transcript they render. A snapshot is used only
//! when its shape is exactly the loaded model's and its checksum holds: a
//! wrong cache gives wrong answers without any error, so anything else is
//! deleted (and logged), never read into a context. Files are written
//! under a temporary name and renamed, so a process killed mid-write
//! leaves only a temporary file, which is never read. The folder is
//! bounded: past its budget the least recently used snapshots go first.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One sequence's cache, out of its slot: the tokens it holds, the text
/// they render (to splice the next turn onto, as a slot does), the logits
/// after a prompt it starts with, and llama.cpp's serialized state.
#[derive(Clone)]
pub(super) struct Saved {
    pub(super) tokens: Vec<LlamaToken>,
    pub(super) transcript: Option<String>,
    pub(super) logits: Option<(usize, Vec<f32>)>,
    pub(super) state: Vec<u8>,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saved")
            .field("tokens", &self.tokens.len())
            .field("state_bytes", &self.state.len())
            .finish_non_exhaustive()
    }
}

impl Saved {
    /// What it takes in memory.
    pub(super) fn bytes(&self) -> usize {
        self.state.len()
            + self.tokens.len() * 4
            + self.logits.as_ref().map_or(0, |(_, l)| l.len() * 4)
            + self.transcript.as_ref().map_or(0, String::len)
    }
}

const MAGIC: &[u8; 4] = b"RGKV";
/// The layout of the file and its header; a new one makes old files
/// unreadable, and they are deleted.
const FORMAT: u32 = 1;
const SUFFIX: &str = "kvs";
/// A temporary file older than this belongs to a process that died while
/// writing it.
const STALE_TEMP: Duration = Duration::from_secs(600);

/// Everything that makes a saved cache fit a loaded model: a snapshot is
/// used only where every field is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Shape {
    /// The model file's sha256.
    pub(super) model: String,
    /// Tokens of context per sequence.
    pub(super) context: u32,
    /// Sequences in the context (each has its own stream of the cache).
    pub(super) sequences: u32,
    /// The types of the keys and values.
    pub(super) kv_types: String,
    /// Whether sliding-window layers keep the whole window.
    pub(super) swa_full: bool,
    /// Layers offloaded to a GPU (`None`: llama.cpp's default) and the
    /// GPU backend compiled in: another device computes other values.
    pub(super) offload: String,
    /// llama.cpp's (ggml's) version and commit.
    pub(super) llama: String,
    /// The CPU features llama.cpp's kernels use: another CPU computes
    /// slightly other values.
    pub(super) cpu: String,
    /// The vocabulary's size (the saved logits' length).
    pub(super) vocab: usize,
}

impl Shape {
    /// Why a snapshot of shape `self` does not fit a model of shape
    /// `loaded`, in words; `None` when it fits.
    pub(super) fn mismatch(&self, loaded: &Shape) -> Option<String> {
        if self.model != loaded.model {
            return Some(format!(
                "it was made for another model file (sha256 {}), not this one ({})",
                short(&self.model),
                short(&loaded.model)
            ));
        }
        let fields = [
            (
                "with a context (tokens per request) of",
                self.context.to_string(),
                loaded.context.to_string(),
            ),
            (
                "with requests at once (parallel) of",
                self.sequences.to_string(),
                loaded.sequences.to_string(),
            ),
            (
                "with KV types",
                self.kv_types.clone(),
                loaded.kv_types.clone(),
            ),
            (
                "with swa_full",
                self.swa_full.to_string(),
                loaded.swa_full.to_string(),
            ),
            ("with offload", self.offload.clone(), loaded.offload.clone()),
            ("by llama.cpp", self.llama.clone(), loaded.llama.clone()),
            (
                "on a CPU with kernels",
                self.cpu.clone(),
                loaded.cpu.clone(),
            ),
            (
                "with a vocabulary of",
                self.vocab.to_string(),
                loaded.vocab.to_string(),
            ),
        ];
        fields
            .into_iter()
            .find(|(_, saved, now)| saved != now)
            .map(|(what, saved, now)| {
                format!("it was made {what} {saved}, the model now has {now}")
            })
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// What a snapshot's header says.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    shape: Shape,
    tokens: Vec<i32>,
    transcript: Option<String>,
    /// The length of the prompt the saved logits follow, if any.
    logits_after: Option<usize>,
    /// Bytes of saved logits (4 per float).
    logits_bytes: u64,
    /// Bytes of llama.cpp's sequence state.
    state_bytes: u64,
}

/// A snapshot file the index knows: what it holds, without its state.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) path: PathBuf,
    pub(super) tokens: Vec<LlamaToken>,
    pub(super) transcript: Option<String>,
    pub(super) logits_after: Option<usize>,
    used: SystemTime,
}

/// The snapshots of one model in one folder, shared by every engine of
/// the process that loads that model with that shape.
pub(super) struct ModelSnapshots {
    dir: PathBuf,
    root: PathBuf,
    shape: Shape,
    budget: u64,
    entries: Mutex<Vec<Entry>>,
}

/// The folder's snapshots of each model, read once per process: after
/// that the process keeps the list as it writes and deletes.
fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<ModelSnapshots>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<ModelSnapshots>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl ModelSnapshots {
    /// The snapshots in `root` of the model of `shape`, listed (and the
    /// unusable ones deleted) on first use in this process.
    pub(super) fn open(root: &Path, shape: Shape, budget: u64) -> Arc<Self> {
        let dir = root.join(&shape.model);
        let mut registry = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = registry.get(&dir) {
            if known.shape == shape && known.budget == budget {
                return known.clone();
            }
        }
        let entries = scan(&dir, &shape);
        if !entries.is_empty() {
            log::info!(
                "{} KV snapshots of this model in {}",
                entries.len(),
                dir.display()
            );
        }
        let opened = Arc::new(Self {
            dir: dir.clone(),
            root: root.to_path_buf(),
            shape,
            budget,
            entries: Mutex::new(entries),
        });
        registry.insert(dir, opened.clone());
        opened
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shows `visit` every snapshot of the model (the list stays locked
    /// meanwhile: `visit` must not write or read snapshots).
    pub(super) fn for_each(&self, mut visit: impl FnMut(&Entry)) {
        for entry in self.entries().iter() {
            visit(entry);
        }
    }

    /// Every snapshot of the model, newest use first.
    #[cfg(test)]
    fn list(&self) -> Vec<Entry> {
        let mut entries = self.entries().clone();
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.used));
        entries
    }

    /// Reads the snapshot `entry` names, checking its shape and checksum;
    /// a snapshot that fails is deleted and `None` comes back.
    pub(super) fn read(&self, entry: &Entry) -> Option<Saved> {
        let started = std::time::Instant::now();
        match read_file(&entry.path, &self.shape) {
            Ok(saved) => {
                let now = SystemTime::now();
                if let Ok(file) = fs::File::options().write(true).open(&entry.path) {
                    let _ = file.set_modified(now);
                }
                if let Some(known) = self.entries().iter_mut().find(|e| e.path == entry.path) {
                    known.used = now;
                }
                log::debug!(
                    "read the KV snapshot {} ({} tokens) in {:.1} ms",
                    entry.path.display(),
                    saved.tokens.len(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                Some(saved)
            }
            Err(why) => {
                log::warn!(
                    "KV snapshot {} not used and deleted: {why}",
                    entry.path.display()
                );
                self.forget(&entry.path);
                None
            }
        }
    }

    fn forget(&self, path: &Path) {
        let _ = fs::remove_file(path);
        self.entries().retain(|entry| entry.path != path);
    }

    /// Whether a snapshot holds these tokens, or more starting with them.
    pub(super) fn covers(&self, tokens: &[LlamaToken]) -> bool {
        self.entries()
            .iter()
            .any(|entry| entry.tokens.starts_with(tokens))
    }

    /// Writes `saved` as a snapshot (unless one holds as much already),
    /// deleting the snapshots it makes useless (those holding a prefix of
    /// its tokens) and, past the budget, the least recently used ones.
    pub(super) fn write(&self, saved: &Saved) {
        if self.covers(&saved.tokens) {
            return;
        }
        let started = std::time::Instant::now();
        let bytes = match encode(&self.shape, saved) {
            Ok(bytes) => bytes,
            Err(err) => {
                log::warn!("cannot encode a KV snapshot: {err}");
                return;
            }
        };
        if bytes.len() as u64 > self.budget {
            log::info!(
                "a KV snapshot of {} tokens ({} MiB) is larger than the whole snapshot budget ({} MiB): not saved",
                saved.tokens.len(),
                bytes.len() >> 20,
                self.budget >> 20
            );
            return;
        }
        let name = format!(
            "{}.{SUFFIX}",
            hex(&Sha256::digest(tokens_bytes(&saved.tokens))[..16])
        );
        let path = self.dir.join(name);
        if let Err(err) = write_atomically(&self.dir, &path, &bytes) {
            log::warn!("cannot write the KV snapshot {}: {err}", path.display());
            return;
        }
        log::info!(
            "saved a KV snapshot of {} tokens ({:.1} MiB) to {} in {:.0} ms",
            saved.tokens.len(),
            bytes.len() as f64 / (1 << 20) as f64,
            path.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let superseded: Vec<PathBuf> = {
            let mut entries = self.entries();
            let superseded = entries
                .iter()
                .filter(|entry| entry.path != path && saved.tokens.starts_with(&entry.tokens))
                .map(|entry| entry.path.clone())
                .collect();
            entries.retain(|entry| entry.path != path);
            entries.push(Entry {
                path: path.clone(),
                tokens: saved.tokens.clone(),
                transcript: saved.transcript.clone(),
                logits_after: saved.logits.as_ref().map(|(len, _)| *len),
                used: SystemTime::now(),
            });
            superseded
        };
        for old in superseded {
            log::debug!(
                "deleting {}: the new snapshot holds all of it",
                old.display()
            );
            self.forget(&old);
        }
        self.keep_to_budget();
    }

    /// Deletes the least recently used snapshots of every model in the
    /// folder until they fit the budget.
    fn keep_to_budget(&self) {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let Ok(models) = fs::read_dir(&self.root) else {
            return;
        };
        for model in models.flatten() {
            let Ok(snapshots) = fs::read_dir(model.path()) else {
                continue;
            };
            for file in snapshots.flatten() {
                let path = file.path();
                if path.extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
                    continue;
                }
                if let Ok(meta) = file.metadata() {
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    files.push((used, meta.len(), path));
                }
            }
        }
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        if total <= self.budget {
            return;
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.budget {
                break;
            }
            log::info!(
                "deleting the KV snapshot {} ({} KiB): the snapshots exceed their budget of {} MiB",
                path.display(),
                len >> 10,
                self.budget >> 20
            );
            self.forget(&path);
            registry_forget(&path);
            total -= len;
        }
    }
}

/// Drops a deleted file from the lists of the other models' snapshots.
fn registry_forget(path: &Path) {
    let Some(dir) = path.parent() else {
        return;
    };
    let known = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(dir)
        .cloned();
    if let Some(known) = known {
        known.entries().retain(|entry| entry.path != path);
    }
}

/// Lists a model's snapshots by their headers, deleting those that cannot
/// be used (another shape, a bad header, a wrong length) and stale
/// temporary files.
fn scan(dir: &Path, shape: &Shape) -> Vec<Entry> {
    let Ok(files) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    for file in files.flatten() {
        let path = file.path();
        let Ok(meta) = file.metadata() else {
            continue;
        };
        let is_snapshot = path.extension().and_then(|e| e.to_str()) == Some(SUFFIX);
        if !is_snapshot {
            let stale = meta
                .modified()
                .ok()
                .and_then(|at| at.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP);
            if stale && path.to_string_lossy().contains(".tmp-") {
                log::info!(
                    "deleting {}: a snapshot whose writing never finished",
                    path.display()
                );
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        match read_header(&path, meta.len()) {
            Ok((header, _)) => match header.shape.mismatch(shape) {
                None => entries.push(Entry {
                    path,
                    tokens: header.tokens.into_iter().map(LlamaToken).collect(),
                    transcript: header.transcript,
                    logits_after: header.logits_after,
                    used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                Some(why) => {
                    log::warn!("KV snapshot {} not used and deleted: {why}", path.display());
                    let _ = fs::remove_file(&path);
                }
            },
            Err(why) => {
                log::warn!("KV snapshot {} not used and deleted: {why}", path.display());
                let _ = fs::remove_file(&path);
            }
        }
    }
    entries
}

/// The header of the snapshot at `path`, whose file has `len` bytes, and
/// where its payload starts; an error says what is wrong in words.
fn read_header(path: &Path, len: u64) -> Result<(Header, usize), String> {
    let mut file = fs::File::open(path).map_err(|err| format!("cannot open it: {err}"))?;
    let mut start = [0u8; 12];
    file.read_exact(&mut start)
        .map_err(|_| "it is too short to be a snapshot (truncated)".to_owned())?;
    let header_len = check_start(&start)?;
    let mut header = vec![0u8; header_len];
    file.read_exact(&mut header)
        .map_err(|_| "its header is cut short (truncated)".to_owned())?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|err| format!("its header does not parse ({err})"))?;
    let payload = 12 + header_len;
    let expected = payload as u64 + header.logits_bytes + header.state_bytes + 32;
    if len != expected {
        return Err(format!(
            "it has {len} bytes where its header promises {expected} (truncated or damaged)"
        ));
    }
    Ok((header, payload))
}

/// The header length the first 12 bytes of a snapshot give.
fn check_start(start: &[u8; 12]) -> Result<usize, String> {
    if &start[..4] != MAGIC {
        return Err("it does not start as a rusty-genius KV snapshot".into());
    }
    let format = u32::from_le_bytes(start[4..8].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(format!(
            "it has format {format}, this version reads format {FORMAT}"
        ));
    }
    let header_len = u32::from_le_bytes(start[8..12].try_into().expect("4 bytes")) as usize;
    if header_len > 64 << 20 {
        return Err(format!("its header claims {header_len} bytes (damaged)"));
    }
    Ok(header_len)
}

/// Reads and checks a whole snapshot.
fn read_file(path: &Path, shape: &Shape) -> Result<Saved, String> {
    let bytes = fs::read(path).map_err(|err| format!("cannot read it: {err}"))?;
    if bytes.len() < 12 + 32 {
        return Err("it is too short to be a snapshot (truncated)".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("its checksum does not match its contents (damaged or cut short)".into());
    }
    let header_len = check_start(body[..12].try_into().expect("12 bytes"))?;
    let header_end = 12usize
        .checked_add(header_len)
        .filter(|&end| end <= body.len())
        .ok_or("its header is cut short (truncated)")?;
    let header: Header = serde_json::from_slice(&body[12..header_end])
        .map_err(|err| format!("its header does not parse ({err})"))?;
    if let Some(why) = header.shape.mismatch(shape) {
        return Err(why);
    }
    let logits_end = header_end as u64 + header.logits_bytes;
    if logits_end + header.state_bytes != body.len() as u64
        || !header.logits_bytes.is_multiple_of(4)
    {
        return Err("its parts do not add up to its length (damaged)".into());
    }
    let logits_end = logits_end as usize;
    let logits = match header.logits_after {
        Some(after) if after <= header.tokens.len() => Some((
            after,
            body[header_end..logits_end]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        )),
        Some(_) => return Err("its logits follow more tokens than it holds (damaged)".into()),
        None => None,
    };
    Ok(Saved {
        tokens: header.tokens.into_iter().map(LlamaToken).collect(),
        transcript: header.transcript,
        logits,
        state: body[logits_end..].to_vec(),
    })
}

/// A snapshot's bytes.
fn encode(shape: &Shape, saved: &Saved) -> Result<Vec<u8>, String> {
    let logits: &[f32] = saved.logits.as_ref().map_or(&[], |(_, l)| l);
    let header = Header {
        shape: shape.clone(),
        tokens: saved.tokens.iter().map(|t| t.0).collect(),
        transcript: saved.transcript.clone(),
        logits_after: saved.logits.as_ref().map(|(len, _)| *len),
        logits_bytes: logits.len() as u64 * 4,
        state_bytes: saved.state.len() as u64,
    };
    let header = serde_json::to_vec(&header).map_err(|err| err.to_string())?;
    let header_len = u32::try_from(header.len()).map_err(|_| "the header is too long")?;
    let mut bytes =
        Vec::with_capacity(12 + header.len() + logits.len() * 4 + saved.state.len() + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    bytes.extend_from_slice(&header_len.to_le_bytes());
    bytes.extend_from_slice(&header);
    for value in logits {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes.extend_from_slice(&saved.state);
    let sum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&sum);
    Ok(bytes)
}

/// Writes `bytes` to `path` through a temporary file in `dir`, renamed
/// into place once whole.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(
        "{}.tmp-{}-{n}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("snapshot"),
        std::process::id()
    ));
    let written = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.flush()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn tokens_bytes(tokens: &[LlamaToken]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.0.to_le_bytes()).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of the model file at `path`, in hex, when it is known
/// without reading the file: a file in a Hub cache's `blobs` folder is
/// named by it (facecrab checks it when downloading); any other file was
/// hashed before and is remembered (in `root`) by its path, length and
/// modification time.
pub(super) fn known_sha256(path: &Path, root: &Path) -> Option<String> {
    let real = fs::canonicalize(path).ok()?;
    let name = real.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let in_blobs = real
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "blobs");
    if in_blobs && is_sha256(name) {
        return Some(name.to_ascii_lowercase());
    }
    let known = fs::read_to_string(memo_path(&real, root).ok()?).ok()?;
    let known = known.trim();
    is_sha256(known).then(|| known.to_owned())
}

fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the sha256 of the file at `real` (a canonical path) is
/// remembered: named by its path, length and modification time.
fn memo_path(real: &Path, root: &Path) -> std::io::Result<PathBuf> {
    let meta = fs::metadata(real)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |at| at.as_nanos());
    let stamp = format!("{} {} {modified}", real.display(), meta.len());
    Ok(root
        .join("ids")
        .join(hex(&Sha256::digest(stamp.as_bytes())[..16])))
}

/// The sha256 of the model file at `path`, in hex, by reading the whole
/// file (for a file [`known_sha256`] does not know); remembered in `root`
/// for the next time.
pub(super) fn hash_model(path: &Path, root: &Path) -> std::io::Result<String> {
    let real = fs::canonicalize(path)?;
    let memo = memo_path(&real, root)?;
    let started = std::time::Instant::now();
    let mut file = fs::File::open(&real)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    let sha = hex(&hasher.finalize());
    log::info!(
        "hashed {} for its KV snapshots in {:.1} s",
        real.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(parent) = memo.parent() {
        let _ = write_atomically(parent, &memo, sha.as_bytes());
    }
    Ok(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            model: "ab".repeat(32),
            context: 1024,
            sequences: 4,
            kv_types: "f16/f16".into(),
            swa_full: true,
            offload: "cpu".into(),
            llama: "0.26.0".into(),
            cpu: "AVX2 = 1".into(),
            vocab: 3,
        }
    }

    fn saved() -> Saved {
        Saved {
            tokens: vec![LlamaToken(1), LlamaToken(2), LlamaToken(3)],
            transcript: Some("abc".into()),
            logits: Some((2, vec![0.5, -1.0, 2.0])),
            state: (0..200u8).collect(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rg-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("a.kvs");
        fs::write(&path, encode(&shape(), &saved()).unwrap()).unwrap();
        let back = read_file(&path, &shape()).unwrap();
        assert_eq!(back.tokens, saved().tokens);
        assert_eq!(back.transcript, saved().transcript);
        assert_eq!(back.logits, saved().logits);
        assert_eq!(back.state, saved().state);
    }

    #[test]
    fn a_damaged_truncated_or_misfit_snapshot_is_refused_with_a_reason() {
        let dir = temp_dir("bad");
        let bytes = encode(&shape(), &saved()).unwrap();
        let path = dir.join("a.kvs");

        let mut flipped = bytes.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert!(read_file(&path, &shape()).unwrap_err().contains("checksum"));

        fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let len = fs::metadata(&path).unwrap().len();
        assert!(read_header(&path, len).unwrap_err().contains("truncated"));

        fs::write(&path, &bytes).unwrap();
        let other = Shape {
            context: 2048,
            ..shape()
        };
        let why = read_file(&path, &other).unwrap_err();
        assert!(
            why.contains("context") && why.contains("1024") && why.contains("2048"),
            "{why}"
        );
        let other = Shape {
            model: "cd".repeat(32),
            ..shape()
        };
        assert!(read_file(&path, &other)
            .unwrap_err()
            .contains("another model"));
    }

    #[test]
    fn the_budget_deletes_the_least_recently_used_first() {
        let root = temp_dir("budget");
        let one = encode(&shape(), &saved()).unwrap().len() as u64;
        let snapshots = ModelSnapshots::open(&root, shape(), one * 2 + one / 2);
        for first in 10..14 {
            let mut next = saved();
            next.tokens[0] = LlamaToken(first);
            snapshots.write(&next);
            std::thread::sleep(Duration::from_millis(20));
        }
        let left: Vec<i32> = snapshots.list().iter().map(|e| e.tokens[0].0).collect();
        assert_eq!(left, [13, 12]);
        assert_eq!(fs::read_dir(root.join(&shape().model)).unwrap().count(), 2);
    }
}
