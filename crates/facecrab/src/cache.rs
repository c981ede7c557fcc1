//! The HuggingFace hub cache layout, as plain path logic.
//!
//! ```text
//! <cache>/models--<org>--<repo>/
//!     blobs/<etag>                    the file's bytes (etag = sha256 for LFS files)
//!     blobs/<etag>.incomplete         a download in progress
//!     blobs/<etag>.lock               the cross-process download lock
//!     refs/<revision>                 the commit hash a branch or tag pointed to
//!     snapshots/<commit>/<file path>  relative symlink to ../../blobs/<etag>
//! ```
//!
//! The same layout as the `huggingface_hub` tools, so models are shared both
//! ways. Nothing here touches the network.

use crate::FacecrabError;
use std::io;
use std::path::{Path, PathBuf};

/// One repository's folder in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    /// The folder of `repo` (`org/repo`) under `cache`.
    pub(crate) fn new(cache: &Path, repo: &str) -> Self {
        Self {
            root: cache.join(format!("models--{}", repo.replace('/', "--"))),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub(crate) fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub(crate) fn lock_file(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.lock"))
    }

    pub(crate) fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub(crate) fn snapshot(&self, commit: &str, file: &str) -> PathBuf {
        let mut path = self.snapshot_dir(commit);
        path.extend(file.split('/'));
        path
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        let mut path = self.root.join("refs");
        path.extend(revision.split('/'));
        path
    }

    /// The commit a revision points to: a full commit hash stands for
    /// itself, a branch or tag is looked up in `refs/`.
    pub(crate) fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_owned());
        }
        let commit = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let commit = commit.trim();
        is_commit_hash(commit).then(|| commit.to_owned())
    }

    /// Records that `revision` points at `commit`.
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> io::Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.ref_path(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomically(&path, commit.as_bytes())
    }

    /// The cached file for `revision`, if it is there and complete.
    pub(crate) fn cached_file(&self, revision: &str, file: &str) -> Option<PathBuf> {
        let commit = self.commit_of(revision)?;
        let path = self.snapshot(&commit, file);
        // `is_file` follows the link: a dangling link is not a cached file.
        path.is_file().then_some(path)
    }

    /// Every `.gguf` file in the snapshot of `revision` (paths relative to
    /// the snapshot), for choosing by quantisation without the network.
    pub(crate) fn cached_gguf_files(&self, revision: &str) -> Vec<String> {
        let Some(commit) = self.commit_of(revision) else {
            return Vec::new();
        };
        let mut files = Vec::new();
        collect_gguf(&self.snapshot_dir(&commit), "", &mut files);
        files.sort();
        files
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative
    /// symlink (a copy where links are not supported).
    pub(crate) fn link_snapshot(
        &self,
        commit: &str,
        file: &str,
        etag: &str,
    ) -> io::Result<PathBuf> {
        let link = self.snapshot(commit, file);
        let parent = link.parent().expect("a snapshot path has a parent");
        std::fs::create_dir_all(parent)?;
        // From snapshots/<commit>/<dirs...>/ back up to the repo folder.
        let depth = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let staging = parent.join(format!(
            ".{}.{}",
            link.file_name().unwrap().to_string_lossy(),
            unique_suffix()
        ));
        let _ = std::fs::remove_file(&staging);
        symlink_or_copy(&target, &self.blob(etag), &staging)?;
        std::fs::rename(&staging, &link)?;
        Ok(link)
    }
}

impl RepoCache {
    /// Removes `snapshots/<commit>/<file>`, then the blob it links to if no
    /// other snapshot links to it, then folders left empty. Returns the
    /// bytes freed; 0 if the file was not there.
    pub(crate) fn remove_snapshot_file(&self, commit: &str, file: &str) -> io::Result<u64> {
        let link = self.snapshot(commit, file);
        let meta = match std::fs::symlink_metadata(&link) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(err),
        };
        let blob = if meta.file_type().is_symlink() {
            self.blob_of(&link).map(|etag| self.blob(&etag))
        } else {
            None
        };
        std::fs::remove_file(&link)?;
        let mut freed = if meta.is_file() { meta.len() } else { 0 };
        if let Some(blob) = blob {
            if !self.links_to(blob.file_name().unwrap_or_default()) {
                match std::fs::metadata(&blob) {
                    Ok(meta) => {
                        std::fs::remove_file(&blob)?;
                        freed += meta.len();
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err),
                }
            }
        }
        // Folders the file was the last thing in, up to `snapshots/`.
        let snapshots = self.root.join("snapshots");
        let mut dir = link.parent();
        while let Some(folder) = dir.filter(|d| d.starts_with(&snapshots) && *d != snapshots) {
            if std::fs::remove_dir(folder).is_err() {
                break;
            }
            dir = folder.parent();
        }
        Ok(freed)
    }

    /// The blob in this repository's `blobs/` that the snapshot `link`
    /// points to, if it points into it.
    /// The blob (its etag) a snapshot link points to.
    pub(crate) fn blob_of(&self, link: &Path) -> Option<String> {
        let target = std::fs::read_link(link).ok()?;
        let name = target.file_name()?.to_str()?;
        let parent = target.parent()?.file_name()?;
        (parent == "blobs" && !name.starts_with('.')).then(|| name.to_owned())
    }

    /// Whether any snapshot links to the blob called `name`.
    fn links_to(&self, name: &std::ffi::OsStr) -> bool {
        fn walk(dir: &Path, name: &std::ffi::OsStr) -> bool {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return false;
            };
            entries.flatten().any(|entry| {
                let path = entry.path();
                match entry.file_type() {
                    Ok(kind) if kind.is_dir() => walk(&path, name),
                    Ok(kind) if kind.is_symlink() => std::fs::read_link(&path)
                        .is_ok_and(|target| target.file_name() == Some(name)),
                    _ => false,
                }
            })
        }
        walk(&self.root.join("snapshots"), name)
    }
}

/// Whether `s` is a full 40-character git commit hash.
pub(crate) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `s` is a lowercase or uppercase sha256 in hex.
/// Checks that the file at `path` starts with the GGUF magic bytes.
pub(crate) fn check_gguf_magic(path: &Path) -> Result<(), FacecrabError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut file| file.read_exact(&mut magic));
    let reason = match read {
        Ok(()) if &magic == b"GGUF" => return Ok(()),
        Ok(()) => {
            "it does not start with the GGUF magic bytes (is it a safetensors or other file?)"
        }
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            "it is too short to be a model"
        }
        Err(err) => return Err(FacecrabError::io(path, err)),
    };
    Err(FacecrabError::NotAModel {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    })
}

/// Whether `s` is a git object id (40 hex digits, a SHA-1).
pub(crate) fn is_git_oid(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn collect_gguf(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            collect_gguf(&path, &relative, out);
        } else if path.is_file() && name.to_ascii_lowercase().ends_with(".gguf") {
            out.push(relative);
        }
    }
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, link: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink_or_copy(_target: &Path, blob: &Path, link: &Path) -> io::Result<()> {
    std::fs::copy(blob, link).map(|_| ())
}

/// A name suffix no other writer (thread or process) uses at the same time.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `bytes` to a temporary sibling of `path`, then renames it over
/// `path`, so readers see the old or the new content, never half of it.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let staging = path.with_extension(unique_suffix());
    std::fs::write(&staging, bytes)?;
    std::fs::rename(&staging, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_hub_cache() {
        let cache = RepoCache::new(Path::new("/c"), "org/Repo-GGUF");
        assert_eq!(cache.root(), Path::new("/c/models--org--Repo-GGUF"));
        assert_eq!(
            cache.blob("abc"),
            Path::new("/c/models--org--Repo-GGUF/blobs/abc")
        );
        assert_eq!(
            cache.snapshot("0123", "sub/m.gguf"),
            Path::new("/c/models--org--Repo-GGUF/snapshots/0123/sub/m.gguf")
        );
        assert!(is_commit_hash(&"a".repeat(40)));
        assert!(!is_commit_hash("main"));
    }
}
