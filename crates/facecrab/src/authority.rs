//! The asset authority: from a model name to a verified local file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::mpsc;
use futures::{future, FutureExt, Stream, StreamExt};
use rusty_genius_core::protocol::AssetEvent;

use crate::cache::{is_sha256, RepoCache};
use crate::download::{ensure_blob, try_lock_blob, BlobRequest};
use crate::hub::{FileMeta, HubClient};
use crate::name::{FileChoice, HubRef, ModelRef};
use crate::registry::Registry;
use crate::split;
use crate::FacecrabError;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_QUANT: &str = "Q4_K_M";
/// How long `remove_model` waits for another process to let go of a blob.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

/// A model file present in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// `org/repo`.
    pub repo: String,
    /// The snapshot's commit.
    pub commit: String,
    /// The file's path in the repository; for a split model, its first part.
    pub file: String,
    /// Where it is on disk (inside `snapshots/`): the path to load.
    pub path: PathBuf,
    /// Its size in bytes; for a split model, that of all its parts.
    pub size: u64,
    /// How many files the model is in: 1, or the number of parts of a
    /// split model. (A split model missing parts is listed part by part.)
    pub parts: usize,
}

/// Resolves model names to local files, downloading them when needed.
///
/// Cheap to clone; clones share their settings.
#[derive(Clone)]
pub struct AssetAuthority {
    inner: Arc<Inner>,
}

struct Inner {
    cache_dir: PathBuf,
    registry: Registry,
    offline: bool,
    client: HubClient,
    max_retries: u32,
}

impl std::fmt::Debug for AssetAuthority {
    // Hand-written so that the token can never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssetAuthority")
            .field("cache_dir", &self.inner.cache_dir)
            .field("endpoint", &self.inner.client.endpoint().as_str())
            .field("offline", &self.inner.offline)
            .finish_non_exhaustive()
    }
}

/// Settings of an [`AssetAuthority`]; every one defaults from the
/// environment.
#[derive(Default)]
pub struct AuthorityBuilder {
    cache_dir: Option<PathBuf>,
    registry_file: Option<PathBuf>,
    endpoint: Option<String>,
    token: Option<Option<String>>,
    offline: Option<bool>,
    stall_timeout: Option<Duration>,
    max_retries: Option<u32>,
}

impl std::fmt::Debug for AuthorityBuilder {
    // Hand-written so that the token can never be printed: only whether
    // one was set.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = match &self.token {
            None => "from the environment",
            Some(None) => "none",
            Some(Some(_)) => "set (redacted)",
        };
        f.debug_struct("AuthorityBuilder")
            .field("cache_dir", &self.cache_dir)
            .field("registry_file", &self.registry_file)
            .field("endpoint", &self.endpoint)
            .field("token", &token)
            .field("offline", &self.offline)
            .field("stall_timeout", &self.stall_timeout)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl AuthorityBuilder {
    /// The hub cache folder. Default: `$GENIUS_HOME/hub`, else
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else the platform cache folder
    /// `huggingface/hub` — shared with the HuggingFace tools.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// The user registry file. Default: `$GENIUS_HOME/registry.json`, else
    /// `rusty-genius/registry.json` in the platform config folder.
    pub fn registry_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.registry_file = Some(file.into());
        self
    }

    /// The Hub's address. Default: `$HF_ENDPOINT`, else
    /// `https://huggingface.co`.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// The access token for private or gated repositories. Default:
    /// `$HF_TOKEN`, else the token file the HuggingFace CLI writes.
    pub fn token(mut self, token: Option<String>) -> Self {
        self.token = Some(token);
        self
    }

    /// Never use the network. Default: `$HF_HUB_OFFLINE` is `1`/`true`.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = Some(offline);
        self
    }

    /// Longest wait for the server before a download attempt counts as
    /// failed (and is retried). Default 30 s.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = Some(timeout);
        self
    }

    /// Retries of a download cut short, with growing pauses. Default 5.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = Some(retries);
        self
    }

    /// Creates the authority (reads the user registry, if any).
    pub fn build(self) -> Result<AssetAuthority, FacecrabError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let genius_home = env("GENIUS_HOME").map(PathBuf::from);
        let hf_home = env("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| dirs::cache_dir().map(|d| d.join("huggingface")));
        let cache_dir = self
            .cache_dir
            .or_else(|| genius_home.as_ref().map(|h| h.join("hub")))
            .or_else(|| env("HF_HUB_CACHE").map(PathBuf::from))
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")))
            .ok_or_else(|| {
                FacecrabError::io(
                    Path::new("~"),
                    std::io::Error::other("no cache folder: set HF_HOME or GENIUS_HOME"),
                )
            })?;
        let registry_file = self
            .registry_file
            .or_else(|| genius_home.as_ref().map(|h| h.join("registry.json")))
            .or_else(|| dirs::config_dir().map(|d| d.join("rusty-genius").join("registry.json")));
        let token = self.token.unwrap_or_else(|| {
            env("HF_TOKEN")
                .or_else(|| env("HUGGING_FACE_HUB_TOKEN"))
                .or_else(|| {
                    let file = hf_home.as_ref()?.join("token");
                    std::fs::read_to_string(file)
                        .ok()
                        .map(|t| t.trim().to_owned())
                        .filter(|t| !t.is_empty())
                })
        });
        let offline = self.offline.unwrap_or_else(|| {
            env("HF_HUB_OFFLINE").is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        });
        let endpoint = self
            .endpoint
            .or_else(|| env("HF_ENDPOINT"))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let client = HubClient::new(
            &endpoint,
            token,
            self.stall_timeout.unwrap_or(Duration::from_secs(30)),
        )?;
        Ok(AssetAuthority {
            inner: Arc::new(Inner {
                cache_dir,
                registry: Registry::load(registry_file.as_deref())?,
                offline,
                client,
                max_retries: self.max_retries.unwrap_or(5),
            }),
        })
    }
}

/// A Hub file after resolution: exact path, and what to verify it against.
struct Target {
    repo: String,
    revision: String,
    file: String,
    sha256: Option<String>,
}

impl AssetAuthority {
    /// An authority configured from the environment (see
    /// [`AuthorityBuilder`]).
    pub fn new() -> Result<Self, FacecrabError> {
        Self::builder().build()
    }

    /// Starts configuring an authority.
    pub fn builder() -> AuthorityBuilder {
        AuthorityBuilder::default()
    }

    /// The hub cache folder in use.
    pub fn cache_dir(&self) -> &Path {
        &self.inner.cache_dir
    }

    /// The registry in use.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Whether the network is off limits.
    pub fn is_offline(&self) -> bool {
        self.inner.offline
    }

    /// Returns a local path for `name` (a path, a registry name or a
    /// HuggingFace id), downloading and verifying the file first if it is
    /// not cached. A cached file costs no network request. For a model
    /// split over several files, every part is fetched and the path is the
    /// first part's.
    pub async fn ensure_model(&self, name: &str) -> Result<PathBuf, FacecrabError> {
        self.ensure_model_with(name, &mut |_| {}).await
    }

    /// Like [`ensure_model`](Self::ensure_model), reported as events: one
    /// `Started`, `Progress(done, total)` while downloading (at most every
    /// MiB or 100 ms), then `Complete(path)` or `Error(message)`.
    ///
    /// The work runs as the stream is polled; dropping the stream stops it
    /// (a partial download stays in the cache and resumes next time).
    pub fn ensure_model_stream(
        &self,
        name: &str,
    ) -> impl Stream<Item = AssetEvent> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        let authority = self.clone();
        let name = name.to_owned();
        let work = async move {
            let mut forward = |event| {
                let _ = tx.unbounded_send(event);
            };
            let last = match authority.ensure_model_with(&name, &mut forward).await {
                Ok(path) => AssetEvent::Complete(path.display().to_string()),
                Err(err) => AssetEvent::Error(err.to_string()),
            };
            forward(last);
            // `tx` goes here, which ends `rx` after the last event.
        };
        // The events, and the work driven by the same polls. No task is
        // spawned, so nothing outlives the stream.
        let work = work.into_stream().filter_map(|()| future::ready(None));
        futures::stream::select(rx, work)
    }

    /// [`ensure_model`](Self::ensure_model) with `Started` and `Progress`
    /// events passed to `report` as they happen.
    pub async fn ensure_model_with(
        &self,
        name: &str,
        report: &mut (dyn FnMut(AssetEvent) + Send),
    ) -> Result<PathBuf, FacecrabError> {
        report(AssetEvent::Started(name.to_owned()));
        let hub = match ModelRef::parse(name)? {
            ModelRef::Local(path) => {
                return if path.is_file() {
                    crate::cache::check_gguf_magic(&path)?;
                    Ok(path)
                } else {
                    Err(FacecrabError::MissingFile { path })
                };
            }
            ModelRef::Registry(short) => {
                let spec = self.inner.registry.get(&short).ok_or_else(|| FacecrabError::NotFound {
                    name: name.to_owned(),
                    reason: format!(
                        "it is not a local file nor a registry name (known: {}); use an `org/repo` HuggingFace id or add it to the registry",
                        self.inner.registry.entries().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                })?;
                let target = Target {
                    repo: spec.repo.clone(),
                    revision: spec.revision.clone().unwrap_or_else(|| "main".into()),
                    file: spec.filename.clone(),
                    sha256: spec.sha256.clone(),
                };
                return self.fetch(name, target, report).await;
            }
            ModelRef::Hub(hub) => hub,
        };
        let target = self.choose_file(name, &hub).await?;
        self.fetch(name, target, report).await
    }

    /// Picks the file of a Hub id: exact, or by quantisation from the cache
    /// or the Hub's listing.
    async fn choose_file(&self, name: &str, hub: &HubRef) -> Result<Target, FacecrabError> {
        let target = |file: String| Target {
            repo: hub.repo.clone(),
            revision: hub.revision().to_owned(),
            file,
            sha256: None,
        };
        let wanted = match &hub.file {
            FileChoice::Path(path) => return Ok(target(path.clone())),
            FileChoice::Quantization(quant) => quant.as_str(),
            FileChoice::Default => DEFAULT_QUANT,
        };
        let cache = RepoCache::new(&self.inner.cache_dir, &hub.repo);
        let cached: Vec<String> = cache
            .cached_gguf_files(hub.revision())
            .into_iter()
            .filter(|f| quant_matches(f, wanted))
            .collect();
        if let Some(file) = split::one_model(&cached) {
            return Ok(target(file.clone()));
        }
        if self.inner.offline {
            return Err(self.not_cached(name));
        }
        let info = self
            .inner
            .client
            .repo_info(&hub.repo, hub.revision.as_deref())
            .await?;
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.retain(|f| f.to_ascii_lowercase().ends_with(".gguf"));
        files.sort();
        let matches: Vec<String> = files
            .iter()
            .filter(|f| quant_matches(f, wanted))
            .cloned()
            .collect();
        match split::one_model(&matches) {
            Some(file) => {
                crate::name::check_file_path(file).map_err(|reason| {
                    FacecrabError::InvalidName {
                        name: file.escape_debug().to_string(),
                        reason: format!("the Hub listed an unsafe file name: {reason}"),
                    }
                })?;
                Ok(target(file.clone()))
            }
            None => Err(FacecrabError::NoSingleFile {
                repo: hub.repo.clone(),
                wanted: wanted.to_owned(),
                available_matches: matches,
                files,
            }),
        }
    }

    fn not_cached(&self, name: &str) -> FacecrabError {
        FacecrabError::NotCached {
            name: name.to_owned(),
            cache: self.inner.cache_dir.clone(),
        }
    }

    /// Returns the cached file, or downloads it into the cache. A part of
    /// a split model brings all its parts, and the path is the first's.
    async fn fetch(
        &self,
        name: &str,
        target: Target,
        report: &mut (dyn FnMut(AssetEvent) + Send),
    ) -> Result<PathBuf, FacecrabError> {
        let cache = RepoCache::new(&self.inner.cache_dir, &target.repo);
        let files = split::parts_of(&target.file).unwrap_or_else(|| vec![target.file.clone()]);
        let cached: Option<Vec<PathBuf>> = files
            .iter()
            .map(|file| cache.cached_file(&target.revision, file))
            .collect();
        if let Some(first) = cached.and_then(|paths| paths.into_iter().next()) {
            log::debug!("{name} is cached at {}", first.display());
            return Ok(first);
        }
        if self.inner.offline {
            return Err(self.not_cached(name));
        }
        let client = &self.inner.client;
        let first = client
            .file_meta(&target.repo, &target.revision, &files[0])
            .await?;
        let commit = first.commit.clone();
        let mut metas = vec![first];
        for file in &files[1..] {
            // Later parts come from the commit the first resolved to, even
            // if the branch moves meanwhile.
            let meta = client.file_meta(&target.repo, &commit, file).await?;
            if meta.commit != commit {
                return Err(FacecrabError::CommitMismatch {
                    repo: target.repo.clone(),
                    file: file.clone(),
                    expected: commit,
                    actual: meta.commit,
                });
            }
            metas.push(meta);
        }
        let cache_io = |err| FacecrabError::io(cache.root(), err);
        std::fs::create_dir_all(cache.root()).map_err(cache_io)?;
        cache
            .write_ref(&target.revision, &commit)
            .map_err(cache_io)?;
        let total = metas.iter().map(|meta| meta.size).sum::<Option<u64>>();
        let mut before = 0;
        for (file, meta) in files.iter().zip(&metas) {
            if !cache.snapshot(&commit, file).is_file() {
                let mut part_report = |event| match event {
                    AssetEvent::Progress(done, size) => {
                        report(AssetEvent::Progress(before + done, total.unwrap_or(size)))
                    }
                    other => report(other),
                };
                self.fetch_file(&cache, &target, file, meta, &mut part_report)
                    .await?;
            }
            before += meta.size.unwrap_or(0);
        }
        Ok(cache.snapshot(&commit, &files[0]))
    }

    /// Downloads one file of `target`'s snapshot (`meta.commit`) and links
    /// it in place.
    async fn fetch_file(
        &self,
        cache: &RepoCache,
        target: &Target,
        file: &str,
        meta: &FileMeta,
        report: &mut (dyn FnMut(AssetEvent) + Send),
    ) -> Result<PathBuf, FacecrabError> {
        let (repo, commit) = (target.repo.as_str(), meta.commit.as_str());
        // The registry's sha256 is that of the file it names.
        let pinned = target.sha256.as_ref().filter(|_| file == target.file);
        let announced = is_sha256(&meta.etag).then(|| meta.etag.to_ascii_lowercase());
        if let (Some(pinned), Some(announced)) = (pinned, &announced) {
            if !pinned.eq_ignore_ascii_case(announced) {
                return Err(FacecrabError::PinMismatch {
                    file: format!("{repo}/{file}"),
                    pinned: pinned.to_ascii_lowercase(),
                    announced: announced.clone(),
                });
            }
        }
        let client = &self.inner.client;
        let request = BlobRequest {
            repo,
            file,
            url: client.file_url(repo, commit, file),
            etag: &meta.etag,
            size: meta.size,
            sha256: pinned.cloned().or(announced),
            max_retries: self.inner.max_retries,
        };
        // Linked under the blob's lock, so a concurrent `remove_model`
        // cannot delete the blob between its download and its link.
        let (_blob, _lock) = ensure_blob(client, cache, &request, report).await?;
        cache
            .link_snapshot(commit, file, &meta.etag)
            .map_err(|err| FacecrabError::io(cache.root(), err))
    }

    /// Every model file in the cache.
    pub fn cached_models(&self) -> Result<Vec<CachedModel>, FacecrabError> {
        let root = &self.inner.cache_dir;
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(FacecrabError::io(root, err)),
        };
        let mut models = Vec::new();
        for entry in entries.flatten() {
            let folder = entry.file_name().to_string_lossy().into_owned();
            let Some(repo) = folder
                .strip_prefix("models--")
                .map(|r| r.replacen("--", "/", 1))
            else {
                continue;
            };
            let snapshots = entry.path().join("snapshots");
            for snapshot in std::fs::read_dir(&snapshots)
                .into_iter()
                .flatten()
                .flatten()
            {
                let commit = snapshot.file_name().to_string_lossy().into_owned();
                let cache = RepoCache::new(root, &repo);
                let files = cache.cached_gguf_files(&commit);
                let size_of = |file: &str| {
                    std::fs::metadata(cache.snapshot(&commit, file)).map_or(0, |m| m.len())
                };
                // A complete split model is one entry, under its first part.
                let complete_set = |file: &str| {
                    split::parts_of(file).filter(|parts| parts.iter().all(|p| files.contains(p)))
                };
                for file in &files {
                    let parts = match complete_set(file) {
                        Some(parts) if parts[0] != *file => continue,
                        Some(parts) => parts,
                        None => vec![file.clone()],
                    };
                    models.push(CachedModel {
                        repo: repo.clone(),
                        commit: commit.clone(),
                        file: file.clone(),
                        path: cache.snapshot(&commit, file),
                        size: parts.iter().map(|part| size_of(part)).sum(),
                        parts: parts.len(),
                    });
                }
            }
        }
        models.sort_by(|a, b| (&a.repo, &a.file, &a.commit).cmp(&(&b.repo, &b.file, &b.commit)));
        Ok(models)
    }

    /// Removes one model listed by [`cached_models`](Self::cached_models),
    /// every part of it if it is split: its snapshot entries, and each blob
    /// no other snapshot links to. Other files of the repository stay.
    /// Returns the bytes freed (0 if it was already gone).
    pub fn remove_model(&self, model: &CachedModel) -> Result<u64, FacecrabError> {
        let invalid = |reason: String| FacecrabError::InvalidName {
            name: format!("{}/{}@{}", model.repo, model.file, model.commit),
            reason,
        };
        let repo = match ModelRef::parse(&model.repo)? {
            ModelRef::Hub(hub) if hub.repo == model.repo => hub.repo,
            _ => return Err(invalid("expected an `org/repo` id".into())),
        };
        crate::name::check_file_path(&model.file).map_err(invalid)?;
        if model.commit.contains('/') {
            return Err(invalid("the snapshot is not a single folder name".into()));
        }
        crate::name::check_revision(&model.commit).map_err(invalid)?;
        let files = match split::parts_of(&model.file) {
            Some(parts) if model.parts > 1 => parts,
            _ => vec![model.file.clone()],
        };
        let cache = RepoCache::new(&self.inner.cache_dir, &repo);
        let mut freed = 0;
        for file in &files {
            let link = cache.snapshot(&model.commit, file);
            // Whether another snapshot still links to the blob is decided
            // under the blob's lock, which every download and link takes.
            let _lock = match cache.blob_of(&link) {
                Some(etag) => {
                    let lock_file = cache.lock_file(&etag);
                    match try_lock_blob(&lock_file, REMOVE_PATIENCE)? {
                        Some(lock) => Some(lock),
                        None => {
                            return Err(FacecrabError::Busy {
                                file: format!("{repo}/{file}"),
                            })
                        }
                    }
                }
                None => None,
            };
            freed += cache
                .remove_snapshot_file(&model.commit, file)
                .map_err(|err| FacecrabError::io(&link, err))?;
        }
        log::info!("removed {repo}/{} ({freed} bytes freed)", model.file);
        Ok(freed)
    }

    /// Removes everything cached for `repo` (`org/repo`). Returns whether
    /// there was anything.
    pub fn remove_repo(&self, repo: &str) -> Result<bool, FacecrabError> {
        if let ModelRef::Hub(hub) = ModelRef::parse(repo)? {
            let cache = RepoCache::new(&self.inner.cache_dir, &hub.repo);
            return match std::fs::remove_dir_all(cache.root()) {
                Ok(()) => Ok(true),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(err) => Err(FacecrabError::io(cache.root(), err)),
            };
        }
        Err(FacecrabError::InvalidName {
            name: repo.to_owned(),
            reason: "expected an `org/repo` id".into(),
        })
    }
}

/// Whether `file` names quantisation `quant`: the tag appears
/// case-insensitively, not inside a longer word (`Q4_K` does not match
/// `Q4_K_M`).
fn quant_matches(file: &str, quant: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_uppercase();
    let quant = quant.to_ascii_uppercase();
    let bytes = name.as_bytes();
    name.match_indices(&quant).any(|(at, _)| {
        let before_ok = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let after = bytes.get(at + quant.len()).copied();
        let after_ok = after.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == b'_'));
        before_ok && after_ok
    })
}

#[cfg(test)]
mod tests {
    use super::quant_matches;

    #[test]
    fn quantisation_tags_match_whole() {
        assert!(quant_matches("gemma-3-270m-q4_k_m.gguf", "Q4_K_M"));
        assert!(quant_matches("sub/Model.Q8_0.gguf", "q8_0"));
        assert!(!quant_matches("model-Q4_K_M.gguf", "Q4_K"));
        assert!(!quant_matches("model-IQ4_XS.gguf", "Q4_XS"));
    }
}
