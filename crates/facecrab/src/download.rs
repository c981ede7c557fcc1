//! Downloading one blob into the cache: resumable, verified, locked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusty_genius_core::protocol::AssetEvent;
use sha2::{Digest, Sha256};
use surf::http::StatusCode;

use crate::cache::RepoCache;
use crate::hub::HubClient;
use crate::FacecrabError;

/// Report progress at most this often ...
const PROGRESS_BYTES: u64 = 1 << 20;
/// ... or after this long.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
const BUFFER: usize = 256 * 1024;
/// Start writing data back to disk after this many new bytes.
const FLUSH_BYTES: usize = 16 << 20;

/// What to fetch and how to check it.
pub(crate) struct BlobRequest<'a> {
    pub(crate) repo: &'a str,
    pub(crate) file: &'a str,
    pub(crate) url: String,
    pub(crate) etag: &'a str,
    pub(crate) size: Option<u64>,
    /// The sha256 the bytes must have, when known.
    pub(crate) sha256: Option<String>,
    pub(crate) max_retries: u32,
}

/// Holds the cross-process lock of one blob; released on drop.
///
/// Whoever holds it may create, link or delete that blob: downloads hold it
/// from the first byte until the blob is renamed into place and linked,
/// and removal holds it while it decides whether any snapshot still links
/// to the blob.
pub(crate) struct BlobLock {
    file: File,
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

fn open_lock_file(path: &Path) -> Result<File, FacecrabError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|err| FacecrabError::io(path, err))
}

/// Takes the lock at `path`, waiting (without blocking the executor) for
/// another thread or process that holds it.
pub(crate) async fn lock_blob(path: &Path) -> Result<BlobLock, FacecrabError> {
    let file = open_lock_file(path)?;
    let mut waited = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(BlobLock { file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                if !waited {
                    log::info!("waiting for another download of {}", path.display());
                    waited = true;
                }
                crate::rt::sleep(Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(FacecrabError::io(path, err)),
        }
    }
}

/// Takes the lock at `path` for a synchronous caller, waiting at most
/// `patience`; `None` if someone else still holds it then.
pub(crate) fn try_lock_blob(
    path: &Path,
    patience: Duration,
) -> Result<Option<BlobLock>, FacecrabError> {
    let file = open_lock_file(path)?;
    let give_up = Instant::now() + patience;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(BlobLock { file })),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(err)) => return Err(FacecrabError::io(path, err)),
        }
    }
}

/// Makes `blobs/<etag>` exist with the right content, downloading what is
/// missing, and returns it with the blob's lock held, so the caller can
/// link it into a snapshot before anyone may remove it.
pub(crate) async fn ensure_blob(
    client: &HubClient,
    cache: &RepoCache,
    request: &BlobRequest<'_>,
    report: &mut (dyn FnMut(AssetEvent) + Send),
) -> Result<(PathBuf, BlobLock), FacecrabError> {
    let blob = cache.blob(request.etag);
    let blobs = blob.parent().expect("blobs folder");
    std::fs::create_dir_all(blobs).map_err(|err| FacecrabError::io(blobs, err))?;
    let lock = lock_blob(&cache.lock_file(request.etag)).await?;
    // Someone else may have finished while we waited for the lock.
    if blob.is_file() {
        return Ok((blob, lock));
    }
    let partial = cache.incomplete(request.etag);
    // A failed download keeps the partial file, to resume next time (a
    // corrupt one is deleted by `download`).
    let lock = download(client, &partial, request, lock, report).await?;
    std::fs::rename(&partial, &blob).map_err(|err| FacecrabError::io(&blob, err))?;
    Ok((blob, lock))
}

/// Downloads into `partial` (resuming what it holds) and verifies it,
/// holding `lock` throughout. The lock travels with the file into the
/// writing threads, so that if this future is dropped midway it is released
/// only once they have written and synced what they were given; it comes
/// back with a complete, verified file.
async fn download(
    client: &HubClient,
    partial: &Path,
    request: &BlobRequest<'_>,
    lock: BlobLock,
    report: &mut (dyn FnMut(AssetEvent) + Send),
) -> Result<BlobLock, FacecrabError> {
    let io = |err| FacecrabError::io(partial, err);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(partial)
        .map_err(io)?;
    let mut have = file.metadata().map_err(io)?.len();
    if request.size.is_some_and(|size| have > size) {
        have = 0;
    }
    file.set_len(have).map_err(io)?;
    file.seek(SeekFrom::Start(have)).map_err(io)?;
    // What an earlier attempt left is hashed first, on the sink's thread,
    // while the request for the rest goes out.
    let resumed = if have > 0 {
        log::info!("resuming {} at {have} bytes", request.file);
        Some((partial.to_path_buf(), have))
    } else {
        None
    };
    let mut sink = Sink::start(file, resumed, lock).map_err(io)?;

    let total = request.size.unwrap_or(0);
    let mut progress = Progress::new(have);
    report(AssetEvent::Progress(have, total));
    let mut failures = 0;
    loop {
        if request.size == Some(have) {
            break;
        }
        let attempt = async {
            let mut body = client.open(&request.url, request.repo, have).await?;
            if body.status == StatusCode::RequestedRangeNotSatisfiable {
                // Nothing more to send: either complete, or our part is bad.
                return Ok(true);
            }
            if body.status == StatusCode::PartialContent && body.range_start != Some(have) {
                return Err(FacecrabError::Network {
                    url: request.url.clone(),
                    reason: format!(
                        "asked for bytes from {have}, got a range from {:?}",
                        body.range_start
                    ),
                });
            }
            if have > 0 && body.status == StatusCode::Ok {
                log::warn!(
                    "the server ignored the range request; restarting {} from the start",
                    request.file
                );
                have = 0;
                progress = Progress::new(0);
                if !sink.send(Chunk::Restart).await {
                    return Ok(false);
                }
            }
            loop {
                let mut buf = sink.buffer();
                let n = body.read(&mut buf).await?;
                if n == 0 {
                    return Ok(true);
                }
                buf.truncate(n);
                if !sink.send(Chunk::Data(buf)).await {
                    return Ok(false);
                }
                have += n as u64;
                if request.size.is_some_and(|size| have > size) {
                    return Err(FacecrabError::Network {
                        url: request.url.clone(),
                        reason: "the server sent more bytes than announced".into(),
                    });
                }
                if progress.due(have) {
                    report(AssetEvent::Progress(have, total));
                }
            }
        };
        // `Ok(false)`: the sink failed; its error is the one to report.
        let outcome: Result<bool, FacecrabError> = attempt.await;
        if let Ok(false) = outcome {
            return Err(io(sink
                .finish()
                .await
                .err()
                .unwrap_or_else(|| std::io::Error::other("the writer stopped"))));
        }
        match outcome {
            Ok(_) if request.size.is_none_or(|size| have == size) => break,
            Ok(_) | Err(FacecrabError::Network { .. }) if failures < request.max_retries => {
                failures += 1;
                let pause = Duration::from_millis(200 << failures.min(5));
                log::warn!(
                    "download of {} stopped at {have} bytes; retry {failures}/{} in {pause:?}",
                    request.file,
                    request.max_retries
                );
                crate::rt::sleep(pause).await;
            }
            Ok(_) => {
                return Err(FacecrabError::Network {
                    url: request.url.clone(),
                    reason: format!("the connection kept closing early ({have} of {total} bytes)"),
                })
            }
            Err(err) => return Err(err),
        }
    }
    let (digest, lock) = sink.finish().await.map_err(io)?;
    report(AssetEvent::Progress(have, total));

    let actual = hex(&digest);
    if let Some(expected) = &request.sha256 {
        if !expected.eq_ignore_ascii_case(&actual) {
            let _ = std::fs::remove_file(partial);
            return Err(FacecrabError::ChecksumMismatch {
                file: format!("{}/{}", request.repo, request.file),
                expected: expected.to_ascii_lowercase(),
                actual,
            });
        }
    } else if crate::cache::is_git_oid(request.etag) {
        // Not an LFS file: the Hub's ETag is the git object id, the SHA-1
        // of "blob <length>\0" and the bytes, which checks length and
        // content at once (such files are small: the Hub keeps larger
        // ones in LFS).
        let actual = git_blob_id(partial.to_path_buf()).await.map_err(io)?;
        if !request.etag.eq_ignore_ascii_case(&actual) {
            let _ = std::fs::remove_file(partial);
            return Err(FacecrabError::ChecksumMismatch {
                file: format!("{}/{}", request.repo, request.file),
                expected: request.etag.to_ascii_lowercase(),
                actual,
            });
        }
    } else {
        let _ = std::fs::remove_file(partial);
        return Err(FacecrabError::Network {
            url: request.url.clone(),
            reason: format!(
                "the Hub gave neither a sha256 nor a git object id for {} (ETag `{}`), so the download cannot be verified",
                request.file, request.etag
            ),
        });
    }
    Ok(lock)
}

/// The git object id of the file at `path`, computed on a thread of its
/// own and awaited.
async fn git_blob_id(path: PathBuf) -> std::io::Result<String> {
    let (done, result) = futures::channel::oneshot::channel();
    std::thread::Builder::new()
        .name("facecrab-verify".into())
        .spawn(move || {
            let hashed = (|| {
                use sha1::{Digest, Sha1};
                let mut file = File::open(&path)?;
                let length = file.metadata()?.len();
                let mut hasher = Sha1::new();
                hasher.update(format!("blob {length}\0").as_bytes());
                std::io::copy(&mut file, &mut hasher)?;
                Ok(hex(&hasher.finalize()))
            })();
            let _ = done.send(hashed);
        })?;
    result
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("the verifying thread stopped")))
}

/// Takes downloaded chunks off the async task and runs them through a
/// pipeline of threads: a hasher, then a writer, then a flusher that pushes
/// written data to disk. Receiving, hashing and writing so overlap, each a
/// few buffers behind the one before.
///
/// No method blocks: the end of the pipeline is awaited, never joined, and
/// dropping the sink lets the threads finish by themselves.
struct Sink {
    chunks: Option<futures::channel::mpsc::Sender<Chunk>>,
    /// Written buffers come back here to be filled again: fresh 256 KiB
    /// allocations would each cost an mmap and a round of page faults.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    /// The digest of the whole file and the blob lock, once the writer is
    /// done and the file is synced.
    done: Option<futures::channel::oneshot::Receiver<std::io::Result<(Digest256, BlobLock)>>>,
}

type Digest256 = sha2::digest::Output<Sha256>;

enum Chunk {
    Data(Vec<u8>),
    /// Start the file and the hash over.
    Restart,
}

/// Chunks in flight between two stages of the pipeline.
const QUEUE: usize = 4;

impl Sink {
    /// `resumed`: the partial file and how many bytes of it to hash before
    /// the first chunk. `lock` is released when the last thread is done
    /// with the file, unless `finish` takes it back.
    fn start(file: File, resumed: Option<(PathBuf, u64)>, lock: BlobLock) -> std::io::Result<Self> {
        let (chunks, incoming) = futures::channel::mpsc::channel::<Chunk>(QUEUE);
        let (give_back, spare) = std::sync::mpsc::channel();
        let (to_writer, writer_input) = std::sync::mpsc::sync_channel::<Chunk>(QUEUE);
        let (report, done) = futures::channel::oneshot::channel();
        let writer = std::thread::Builder::new()
            .name("facecrab-writer".into())
            .spawn(move || write_chunks(file, writer_input, give_back))?;
        // Detached: the end of the pipeline is reported through `done`.
        let _hasher = std::thread::Builder::new()
            .name("facecrab-hasher".into())
            .spawn(move || {
                let hashed = hash_chunks(resumed, incoming, &to_writer);
                drop(to_writer);
                // A join on this thread of the pipeline, never on the
                // async side.
                let written = writer
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the writer thread panicked")));
                // A writer error is the cause when both failed: the hasher
                // only stops because the writer went away.
                let result = written.and(hashed).map(|digest| (digest, lock));
                // Nobody waiting: the download was dropped; the lock goes
                // with the unsent result.
                let _ = report.send(result);
            })?;
        Ok(Self {
            chunks: Some(chunks),
            spare,
            done: Some(done),
        })
    }

    /// An empty buffer of `BUFFER` bytes' capacity, reused when possible.
    fn buffer(&self) -> Vec<u8> {
        match self.spare.try_recv() {
            Ok(mut buf) => {
                buf.resize(BUFFER, 0);
                buf
            }
            Err(_) => vec![0u8; BUFFER],
        }
    }

    /// Queues a chunk; `false` if the pipeline has stopped (call `finish`
    /// for its error).
    async fn send(&mut self, chunk: Chunk) -> bool {
        use futures::SinkExt;
        match &mut self.chunks {
            Some(chunks) => chunks.send(chunk).await.is_ok(),
            None => false,
        }
    }

    /// Waits for every queued chunk to be hashed, written and synced;
    /// returns the sha256 of the whole file and the blob lock.
    async fn finish(mut self) -> std::io::Result<(Digest256, BlobLock)> {
        self.chunks = None;
        let done = self.done.take().expect("finish runs once");
        done.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the hasher thread stopped")))
    }
}

/// The hasher stage: hashes the resumed part of the file, then each chunk,
/// passing chunks on to the writer.
fn hash_chunks(
    resumed: Option<(PathBuf, u64)>,
    incoming: futures::channel::mpsc::Receiver<Chunk>,
    to_writer: &std::sync::mpsc::SyncSender<Chunk>,
) -> std::io::Result<Digest256> {
    let mut hasher = Sha256::new();
    if let Some((path, len)) = resumed {
        // A handle of its own: the writer's position must not move.
        let mut done = File::open(&path)?.take(len);
        let copied = std::io::copy(&mut done, &mut hasher)?;
        if copied != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the partial file shrank to {copied} bytes while resuming"),
            ));
        }
    }
    for chunk in futures::executor::block_on_stream(incoming) {
        match &chunk {
            Chunk::Data(bytes) => hasher.update(bytes),
            Chunk::Restart => hasher = Sha256::new(),
        }
        if to_writer.send(chunk).is_err() {
            return Err(std::io::Error::other("the writer stopped"));
        }
    }
    Ok(hasher.finalize())
}

/// The writer stage: appends chunks to the file, returns their buffers,
/// and has the flusher push data to disk as it goes.
fn write_chunks(
    mut file: File,
    input: std::sync::mpsc::Receiver<Chunk>,
    give_back: std::sync::mpsc::Sender<Vec<u8>>,
) -> std::io::Result<()> {
    let flusher = Flusher::start(file.try_clone()?)?;
    let mut unflushed = 0;
    for chunk in input {
        match chunk {
            Chunk::Data(bytes) => {
                file.write_all(&bytes)?;
                unflushed += bytes.len();
                if unflushed >= FLUSH_BYTES {
                    flusher.poke();
                    unflushed = 0;
                }
                let _ = give_back.send(bytes);
            }
            Chunk::Restart => {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
            }
        }
    }
    drop(flusher);
    // Durable before it is renamed into place. Most of the data is on disk
    // already, so this is short.
    file.sync_all()
}

/// Pushes written data to disk while the download goes on, so that the
/// final `fsync` has little left to do and a large file does not pile up
/// as dirty pages. Runs on its own thread: a flush blocks until the disk
/// is done, and neither receiving nor writing should wait for that.
struct Flusher {
    pokes: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(file: File) -> std::io::Result<Self> {
        // One pending poke is enough: a flush covers all data written
        // before it starts.
        let (pokes, poked) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("facecrab-flusher".into())
            .spawn(move || {
                while poked.recv().is_ok() {
                    if let Err(err) = file.sync_data() {
                        // The final sync reports errors; this one only
                        // runs ahead of it.
                        log::debug!("early flush failed: {err}");
                    }
                }
            })?;
        Ok(Self {
            pokes: Some(pokes),
            thread: Some(thread),
        })
    }

    /// Asks for a flush, unless one is already waiting to start.
    fn poke(&self) {
        if let Some(pokes) = &self.pokes {
            let _ = pokes.try_send(());
        }
    }
}

/// Waits for a flush under way, so none outlives the download.
impl Drop for Flusher {
    fn drop(&mut self) {
        self.pokes = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Throttles progress reports.
struct Progress {
    bytes: u64,
    at: Instant,
}

impl Progress {
    fn new(bytes: u64) -> Self {
        Self {
            bytes,
            at: Instant::now(),
        }
    }

    fn due(&mut self, bytes: u64) -> bool {
        if bytes.saturating_sub(self.bytes) >= PROGRESS_BYTES
            || self.at.elapsed() >= PROGRESS_INTERVAL
        {
            self.bytes = bytes;
            self.at = Instant::now();
            true
        } else {
            false
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A writer stuck on a slow "disk": a FIFO that nobody reads until
    /// `after` has passed (so a blocking join would show as a long wait,
    /// not a hang).
    fn stuck_pipeline(dir: &Path, after: Duration) -> (Sink, std::thread::JoinHandle<u64>) {
        let fifo = dir.join("disk");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let reader_path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let mut disk = File::open(reader_path).unwrap();
            std::thread::sleep(after);
            std::io::copy(&mut disk, &mut std::io::sink()).unwrap()
        });
        let file = OpenOptions::new().write(true).open(&fifo).unwrap();
        let lock = BlobLock {
            file: File::create(dir.join("blob.lock")).unwrap(),
        };
        let mut sink = Sink::start(file, None, lock).unwrap();
        futures::executor::block_on(async {
            for _ in 0..3 {
                assert!(sink.send(Chunk::Data(vec![7; BUFFER])).await);
            }
        });
        (sink, reader)
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("facecrab-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn dropping_a_download_never_waits_for_its_writer() {
        let dir = scratch("sink-drop");
        let (sink, reader) = stuck_pipeline(&dir, Duration::from_secs(2));
        let started = Instant::now();
        drop(sink);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "drop blocked for {took:?}"
        );
        // The threads still write everything they were given.
        assert_eq!(reader.join().unwrap(), 3 * BUFFER as u64);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finishing_a_download_is_awaited_not_joined() {
        let dir = scratch("sink-finish");
        let (sink, reader) = stuck_pipeline(&dir, Duration::from_secs(2));
        let mut finish = Box::pin(sink.finish());
        let started = Instant::now();
        let first_poll = futures::executor::block_on(async { futures::poll!(finish.as_mut()) });
        assert!(
            first_poll.is_pending(),
            "finished before the disk took the data"
        );
        assert!(started.elapsed() < Duration::from_millis(200));
        // Once the disk takes the data the future completes (a FIFO cannot
        // be synced, so with an error).
        let _ = futures::executor::block_on(finish);
        assert_eq!(reader.join().unwrap(), 3 * BUFFER as u64);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
