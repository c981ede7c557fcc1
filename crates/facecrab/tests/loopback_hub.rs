//! facecrab against a loopback server that behaves like the Hub.

use std::path::{Path, PathBuf};
use std::time::Duration;

use facecrab::testing::{sha256_hex, Fault, Host, TempDir, TestHub};
use facecrab::{AssetAuthority, FacecrabError};
use futures::StreamExt;
use rusty_genius_core::protocol::AssetEvent;

const REPO: &str = "acme/tiny-GGUF";
const FILE: &str = "tiny-Q4_K_M.gguf";
const MIB: u64 = 1 << 20;

fn temp_dir(tag: &str) -> TempDir {
    TempDir::new(&format!("facecrab-{tag}"))
}

/// A file of `size` deterministic pseudo-random bytes starting with the
/// GGUF magic, and its sha256.
fn make_model(dir: &Path, name: &str, size: u64) -> (PathBuf, String) {
    let path = dir.join(name);
    let mut bytes = Vec::with_capacity(size as usize);
    bytes.extend_from_slice(b"GGUF");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ size;
    while (bytes.len() as u64) < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(size as usize);
    std::fs::write(&path, &bytes).unwrap();
    (path, sha256_hex(&bytes))
}

struct Setup {
    hub: TestHub,
    dir: TempDir,
    source: PathBuf,
    sha: String,
    commit: String,
}

fn setup(tag: &str, size: u64) -> Setup {
    let dir = temp_dir(tag);
    let (source, sha) = make_model(dir.path(), "source.gguf", size);
    let hub = TestHub::start().unwrap();
    let commit = hub.add_file(REPO, FILE, &source, None).unwrap();
    Setup {
        hub,
        dir,
        source,
        sha,
        commit,
    }
}

impl Setup {
    fn cache(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    fn builder(&self) -> facecrab::AuthorityBuilder {
        AssetAuthority::builder()
            .endpoint(self.hub.endpoint())
            .cache_dir(self.cache())
            .registry_file(self.dir.path().join("no-registry.json"))
            .token(None)
            .offline(false)
            .stall_timeout(Duration::from_secs(2))
            .max_retries(5)
    }

    fn authority(&self) -> AssetAuthority {
        self.builder().build().unwrap()
    }

    fn blob(&self) -> PathBuf {
        self.cache()
            .join("models--acme--tiny-GGUF")
            .join("blobs")
            .join(&self.sha)
    }

    fn snapshot(&self) -> PathBuf {
        self.cache()
            .join("models--acme--tiny-GGUF")
            .join("snapshots")
            .join(&self.commit)
            .join(FILE)
    }
}

/// The `(done, total)` of every progress event, checked to never go back.
fn rising_progress(events: &[AssetEvent]) -> Vec<(u64, u64)> {
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            AssetEvent::Progress(done, total) => Some((*done, *total)),
            _ => None,
        })
        .collect();
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress went back: {progress:?}"
    );
    progress
}

fn same_content(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[async_std::test]
async fn downloads_into_the_hub_layout_and_then_needs_no_network() {
    let s = setup("layout", 3 * MIB + 17);
    let authority = s.authority();
    let path = authority.ensure_model(REPO).await.unwrap();
    assert_eq!(path, s.snapshot());
    assert!(same_content(&path, &s.source));
    // The snapshot entry is a relative link to the blob, as the HF tools make.
    let link = std::fs::read_link(&path).unwrap();
    assert_eq!(link, Path::new("../../blobs").join(&s.sha));
    let main_ref =
        std::fs::read_to_string(s.cache().join("models--acme--tiny-GGUF/refs/main")).unwrap();
    assert_eq!(main_ref, s.commit);
    assert!(!s.blob().with_extension("incomplete").exists());

    s.hub.clear_requests();
    for name in [
        REPO.to_owned(),
        format!("{REPO}:q4_k_m"),
        format!("{REPO}/{FILE}"),
        format!("{REPO}/{FILE}@{}", s.commit),
    ] {
        assert_eq!(authority.ensure_model(&name).await.unwrap(), path, "{name}");
    }
    assert!(
        s.hub.requests().is_empty(),
        "cached models must not touch the network: {:?}",
        s.hub.requests()
    );

    let cached = authority.cached_models().unwrap();
    assert_eq!(cached.len(), 1);
    assert_eq!(
        (
            cached[0].repo.as_str(),
            cached[0].file.as_str(),
            cached[0].size
        ),
        (REPO, FILE, 3 * MIB + 17)
    );
    assert!(authority.remove_repo(REPO).unwrap());
    assert!(authority.cached_models().unwrap().is_empty());
}

#[async_std::test]
async fn progress_events_are_throttled_and_end_with_the_path() {
    let s = setup("events", 8 * MIB);
    let events: Vec<AssetEvent> = s.authority().ensure_model_stream(REPO).collect().await;
    assert_eq!(events.first(), Some(&AssetEvent::Started(REPO.into())));
    assert_eq!(
        events.last(),
        Some(&AssetEvent::Complete(s.snapshot().display().to_string()))
    );
    let progress = rising_progress(&events);
    assert_eq!(progress.last(), Some(&(8 * MIB, 8 * MIB)));
    // At most one report per MiB (plus the first and the last) or per 100 ms.
    assert!(
        progress.len() <= 8 + 2 + 20,
        "{} progress events",
        progress.len()
    );
}

#[async_std::test]
async fn a_download_cut_three_times_resumes_each_time() {
    let size = 20 * MIB;
    let s = setup("cut", size);
    s.hub.set_fault(
        REPO,
        FILE,
        Some(Fault::DropAfter {
            bytes: 4 * MIB,
            times: 3,
        }),
    );
    let path = s.authority().ensure_model(REPO).await.unwrap();
    assert!(same_content(&path, &s.source));
    let downloads = s.hub.downloads();
    assert_eq!(
        downloads.len(),
        4,
        "one first try and three resumes: {downloads:?}"
    );
    let ranges: Vec<Option<&str>> = downloads.iter().map(|r| r.header("range")).collect();
    assert_eq!(
        ranges,
        [
            None,
            Some("bytes=4194304-"),
            Some("bytes=8388608-"),
            Some("bytes=12582912-")
        ]
    );
    let sent: u64 = downloads.iter().map(|r| r.body_bytes).sum();
    assert!(
        sent < size + 3 * MIB,
        "sent {sent} bytes for a {size} byte file"
    );
}

#[async_std::test]
async fn a_server_ignoring_range_restarts_the_file_cleanly() {
    let s = setup("norange", 2 * MIB);
    // A previous run left a partial file with wrong bytes in it.
    let partial = s.blob().with_extension("incomplete");
    std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
    std::fs::write(&partial, vec![0xEE; 100_000]).unwrap();
    s.hub.set_fault(REPO, FILE, Some(Fault::IgnoreRange));
    let path = s.authority().ensure_model(REPO).await.unwrap();
    assert!(same_content(&path, &s.source));
    assert_eq!(s.hub.downloads()[0].header("range"), Some("bytes=100000-"));
}

#[async_std::test]
async fn wrong_bytes_are_a_checksum_mismatch_and_leave_nothing_behind() {
    let s = setup("corrupt", 2 * MIB);
    s.hub.set_fault(REPO, FILE, Some(Fault::WrongBytes));
    let err = s.authority().ensure_model(REPO).await.unwrap_err();
    assert!(
        matches!(err, FacecrabError::ChecksumMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&s.sha), "{err}");
    assert!(!s.blob().exists());
    assert!(!s.blob().with_extension("incomplete").exists());
    let snapshots = s.cache().join("models--acme--tiny-GGUF/snapshots");
    let entries = std::fs::read_dir(&snapshots)
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(entries, 0, "nothing may appear in snapshots/");

    // Once the server is fixed, the same call succeeds.
    s.hub.set_fault(REPO, FILE, None);
    assert!(same_content(
        &s.authority().ensure_model(REPO).await.unwrap(),
        &s.source
    ));
}

#[async_std::test]
async fn eight_concurrent_calls_download_once() {
    let s = setup("concurrent", 16 * MIB);
    let authority = s.authority();
    let calls = (0..8).map(|_| {
        let authority = authority.clone();
        async_std::task::spawn(async move { authority.ensure_model(REPO).await })
    });
    let paths = futures::future::join_all(calls).await;
    for path in paths {
        assert_eq!(path.unwrap(), s.snapshot());
    }
    assert_eq!(s.hub.downloads().len(), 1, "{:?}", s.hub.downloads());
}

#[async_std::test]
async fn the_token_reaches_the_hub_but_never_the_redirect_host() {
    let s = setup("token", MIB);
    s.hub.set_redirect(true);
    let secret = "hf_secret_value_123";
    let authority = s.builder().token(Some(secret.into())).build().unwrap();
    let path = authority.ensure_model(REPO).await.unwrap();
    assert!(same_content(&path, &s.source));
    let requests = s.hub.requests();
    let bearer = format!("Bearer {secret}");
    let hub: Vec<_> = requests.iter().filter(|r| r.host == Host::Hub).collect();
    let cdn: Vec<_> = requests.iter().filter(|r| r.host == Host::Cdn).collect();
    assert!(!hub.is_empty() && !cdn.is_empty(), "{requests:?}");
    assert!(
        hub.iter()
            .all(|r| r.header("authorization") == Some(bearer.as_str())),
        "{hub:?}"
    );
    assert!(
        cdn.iter().all(|r| r.header("authorization").is_none()),
        "{cdn:?}"
    );

    // Errors never carry the token either.
    s.hub.set_fault(REPO, FILE, Some(Fault::Unauthorized));
    authority.remove_repo(REPO).unwrap();
    let err = authority.ensure_model(REPO).await.unwrap_err();
    assert!(
        matches!(err, FacecrabError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("HF_TOKEN") && !err.to_string().contains(secret),
        "{err}"
    );
}

#[async_std::test]
async fn a_hand_placed_file_is_found_offline_and_a_missing_one_is_explained() {
    let s = setup("offline", MIB);
    // Lay the file out by hand, as another HF tool would have.
    let root = s.cache().join("models--acme--tiny-GGUF");
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::create_dir_all(root.join("snapshots").join(&s.commit)).unwrap();
    std::fs::copy(&s.source, root.join("blobs").join(&s.sha)).unwrap();
    std::fs::write(root.join("refs/main"), &s.commit).unwrap();
    std::os::unix::fs::symlink(Path::new("../../blobs").join(&s.sha), s.snapshot()).unwrap();

    let offline = s.builder().offline(true).build().unwrap();
    assert_eq!(offline.ensure_model(REPO).await.unwrap(), s.snapshot());
    let online = s.authority();
    assert_eq!(
        online
            .ensure_model(&format!("{REPO}:Q4_K_M"))
            .await
            .unwrap(),
        s.snapshot()
    );
    assert!(s.hub.requests().is_empty(), "{:?}", s.hub.requests());

    let err = offline.ensure_model("acme/other-GGUF").await.unwrap_err();
    assert!(matches!(err, FacecrabError::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    assert!(s.hub.requests().is_empty());
}

#[async_std::test]
async fn hub_errors_are_typed() {
    let s = setup("errors", MIB);
    let authority = s.authority();

    let err = authority
        .ensure_model("acme/missing-GGUF")
        .await
        .unwrap_err();
    assert!(matches!(err, FacecrabError::NotFound { .. }), "{err}");
    let err = authority
        .ensure_model(&format!("{REPO}/absent.gguf"))
        .await
        .unwrap_err();
    assert!(matches!(err, FacecrabError::NotFound { .. }), "{err}");
    let err = authority
        .ensure_model("acme/tiny-GGUF:Q8_0")
        .await
        .unwrap_err();
    assert!(matches!(err, FacecrabError::NoSingleFile { .. }), "{err}");
    assert!(
        err.to_string().contains(FILE),
        "the error lists what there is: {err}"
    );
    s.hub.set_fault(REPO, FILE, Some(Fault::NotFound));
    let err = authority
        .ensure_model(&format!("{REPO}/{FILE}"))
        .await
        .unwrap_err();
    assert!(matches!(err, FacecrabError::NotFound { .. }), "{err}");

    // A server that stops sending: bounded retries, then a network error,
    // and the partial file stays only as `.incomplete`.
    s.hub.set_fault(REPO, FILE, Some(Fault::StallAfter(1000)));
    let impatient = s
        .builder()
        .max_retries(1)
        .stall_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = impatient
        .ensure_model(&format!("{REPO}/{FILE}"))
        .await
        .unwrap_err();
    assert!(matches!(err, FacecrabError::Network { .. }), "{err}");
    assert!(!s.blob().exists() && !s.snapshot().exists());
}

#[async_std::test]
async fn quantisation_picks_one_file_and_ambiguity_is_refused() {
    let s = setup("quant", MIB);
    let (q8, _) = make_model(s.dir.path(), "q8.gguf", MIB / 2);
    s.hub.add_file(REPO, "tiny-Q8_0.gguf", &q8, None).unwrap();
    let authority = s.authority();
    let path = authority
        .ensure_model(&format!("{REPO}:Q8_0"))
        .await
        .unwrap();
    assert!(same_content(&path, &q8));

    s.hub
        .add_file(REPO, "sub/tiny-Q8_0.gguf", &q8, None)
        .unwrap();
    authority.remove_repo(REPO).unwrap();
    let err = authority
        .ensure_model(&format!("{REPO}:Q8_0"))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("sub/tiny-Q8_0.gguf") && message.contains("more than one"),
        "{message}"
    );
}

#[async_std::test]
async fn unsafe_names_are_refused_and_nothing_is_written_outside_the_cache() {
    let s = setup("names", MIB);
    let (evil, _) = make_model(s.dir.path(), "evil.gguf", 1000);
    let repo = "acme/evil-GGUF";
    s.hub
        .add_file(repo, "../../../escape-Q4_K_M.gguf", &evil, None)
        .unwrap();
    let authority = s.authority();
    let err = authority.ensure_model(repo).await.unwrap_err();
    assert!(matches!(err, FacecrabError::InvalidName { .. }), "{err}");
    for bad in [
        "acme/x/../../y.gguf",
        "acme/..",
        "acme/x@../../main",
        "bad\u{7}name",
        // A percent-encoded `..` would be decoded and taken out of the URL
        // by the URL parser, and the revision with it.
        "acme/tiny-GGUF/%2e%2e/x.gguf",
        "acme/tiny-GGUF/%2E%2E/%2E%2E/x.gguf@main",
        "acme/tiny-GGUF/./x.gguf",
    ] {
        let err = authority.ensure_model(bad).await.unwrap_err();
        assert!(
            matches!(err, FacecrabError::InvalidName { .. }),
            "{bad}: {err}"
        );
    }
    assert!(!s.dir.path().join("escape-Q4_K_M.gguf").exists());
    assert!(!s.cache().join("escape-Q4_K_M.gguf").exists());
}

/// Run as a child process by the next test: downloads until killed.
#[test]
fn child_download_until_killed() {
    let (Ok(endpoint), Ok(cache)) = (
        std::env::var("FACECRAB_CHILD_ENDPOINT"),
        std::env::var("FACECRAB_CHILD_CACHE"),
    ) else {
        return;
    };
    let authority = AssetAuthority::builder()
        .endpoint(endpoint)
        .cache_dir(cache)
        .token(None)
        .offline(false)
        .stall_timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    async_std::task::block_on(authority.ensure_model(REPO)).unwrap();
}

fn spawn_child(s: &Setup) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_download_until_killed", "--exact", "--nocapture"])
        .env("FACECRAB_CHILD_ENDPOINT", s.hub.endpoint())
        .env("FACECRAB_CHILD_CACHE", s.cache())
        .spawn()
        .unwrap()
}

/// Checks that the Hub sent the file once more, from byte `cut` to `size`.
fn assert_one_download_from(s: &Setup, cut: u64, size: u64) {
    let downloads = s.hub.downloads();
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    assert_eq!(
        downloads[0].header("range"),
        Some(format!("bytes={cut}-").as_str())
    );
    assert_eq!(downloads[0].body_bytes, size - cut);
}

/// Waits until the blob's partial file holds at least `bytes`.
async fn wait_for_partial(s: &Setup, bytes: u64) {
    let partial = s.blob().with_extension("incomplete");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never got {bytes} bytes in"
        );
        async_std::task::sleep(Duration::from_millis(20)).await;
    }
}

#[async_std::test]
async fn a_download_killed_with_its_process_resumes_in_the_next() {
    let size = 12 * MIB;
    let s = setup("killed", size);
    let cut = 5 * MIB;
    s.hub.set_fault(REPO, FILE, Some(Fault::StallAfter(cut)));
    let mut child = spawn_child(&s);
    wait_for_partial(&s, cut).await;
    child.kill().unwrap();
    child.wait().unwrap();

    s.hub.set_fault(REPO, FILE, None);
    s.hub.clear_requests();
    let path = s.authority().ensure_model(REPO).await.unwrap();
    assert!(same_content(&path, &s.source));
    assert_one_download_from(&s, cut, size);
}

#[async_std::test]
async fn a_second_process_waits_for_the_first_and_then_resumes_its_file() {
    let size = 12 * MIB;
    let s = setup("two-processes", size);
    let cut = 3 * MIB;
    // The first process stalls halfway, holding the blob's lock.
    s.hub.set_fault(REPO, FILE, Some(Fault::StallAfter(cut)));
    let mut first = spawn_child(&s);
    wait_for_partial(&s, cut).await;
    s.hub.set_fault(REPO, FILE, None);
    // The stalled request is only recorded once it ends, which it never
    // does: from here on, the log shows the second process alone.
    s.hub.clear_requests();

    let mut second = spawn_child(&s);
    // The second asks the Hub about the file, then waits for the lock
    // instead of fetching it a second time.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.hub.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no second process");
        async_std::task::sleep(Duration::from_millis(20)).await;
    }
    async_std::task::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.hub.downloads().len(), 0, "{:?}", s.hub.downloads());
    assert!(second.try_wait().unwrap().is_none());

    // When the first dies, its lock goes with it and the second takes over
    // the partial file.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(second.wait().unwrap().success());
    assert_one_download_from(&s, cut, size);
    assert!(same_content(&s.blob(), &s.source));
}

#[async_std::test]
async fn a_split_model_arrives_whole_and_loads_from_its_first_part() {
    const BIG: &str = "acme/big-GGUF";
    let dir = temp_dir("split");
    let hub = TestHub::start().unwrap();
    let sizes = [3 * MIB, 2 * MIB + 5, MIB + 1];
    let parts: Vec<String> = (1..=3)
        .map(|no| format!("q4/big-Q4_K_M-{no:05}-of-00003.gguf"))
        .collect();
    let mut sources = Vec::new();
    for (part, size) in parts.iter().zip(sizes) {
        let (source, _) = make_model(dir.path(), &format!("part{size}.gguf"), size);
        hub.add_file(BIG, part, &source, None).unwrap();
        sources.push(source);
    }
    let (other, _) = make_model(dir.path(), "other.gguf", MIB);
    hub.add_file(BIG, "big-Q8_0.gguf", &other, None).unwrap();
    let authority = AssetAuthority::builder()
        .endpoint(hub.endpoint())
        .cache_dir(dir.join("hub"))
        .registry_file(dir.join("no-registry.json"))
        .token(None)
        .offline(false)
        .build()
        .unwrap();

    let events: Vec<AssetEvent> = authority.ensure_model_stream(BIG).collect().await;
    let Some(AssetEvent::Complete(path)) = events.last() else {
        panic!("{events:?}");
    };
    let first = PathBuf::from(path);
    assert!(first.ends_with(&parts[0]), "{}", first.display());
    // Every part sits beside the first, where llama.cpp looks for them.
    for (part, source) in parts.iter().zip(&sources) {
        let beside = first
            .parent()
            .unwrap()
            .join(part.rsplit('/').next().unwrap());
        assert!(same_content(&beside, source), "{part}");
    }
    // One progress count over all parts, ending at their sum.
    let total: u64 = sizes.iter().sum();
    let progress = rising_progress(&events);
    assert!(progress.iter().all(|p| p.1 == total), "{progress:?}");
    assert_eq!(progress.last(), Some(&(total, total)));
    assert_eq!(hub.downloads().len(), 3);

    // Any part's name, or the repository, finds the cached model at once.
    hub.clear_requests();
    for name in [
        BIG.to_owned(),
        format!("{BIG}/{}", parts[1]),
        format!("{BIG}/{}", parts[2]),
    ] {
        assert_eq!(
            authority.ensure_model(&name).await.unwrap(),
            first,
            "{name}"
        );
    }
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    // The cache lists it as one model of three parts.
    let listed: Vec<_> = authority
        .cached_models()
        .unwrap()
        .into_iter()
        .map(|m| (m.file, m.path, m.size, m.parts))
        .collect();
    assert_eq!(listed, [(parts[0].clone(), first.clone(), total, 3)]);

    // With a part gone from the cache, offline mode says it is not there
    // rather than handing out a model llama.cpp cannot open.
    let third = first
        .parent()
        .unwrap()
        .join(parts[2].rsplit('/').next().unwrap());
    let blob = third
        .parent()
        .unwrap()
        .join(std::fs::read_link(&third).unwrap());
    std::fs::remove_file(&blob).unwrap();
    std::fs::remove_file(&third).unwrap();
    let listed: Vec<_> = authority
        .cached_models()
        .unwrap()
        .into_iter()
        .map(|m| (m.file, m.size, m.parts))
        .collect();
    assert_eq!(
        listed,
        [
            (parts[0].clone(), sizes[0], 1),
            (parts[1].clone(), sizes[1], 1)
        ]
    );
    let offline = AssetAuthority::builder()
        .cache_dir(dir.join("hub"))
        .registry_file(dir.join("no-registry.json"))
        .offline(true)
        .build()
        .unwrap();
    let err = offline.ensure_model(BIG).await.unwrap_err();
    assert!(matches!(err, FacecrabError::NotCached { .. }), "{err}");
    // Online, only the missing part is fetched.
    assert_eq!(authority.ensure_model(BIG).await.unwrap(), first);
    assert_eq!(hub.downloads().len(), 1, "{:?}", hub.downloads());
    assert!(hub.downloads()[0].path.ends_with(&parts[2]));
}

#[async_std::test]
async fn a_split_model_with_a_part_missing_on_the_hub_is_refused() {
    const BIG: &str = "acme/broken-GGUF";
    let dir = temp_dir("split-missing");
    let hub = TestHub::start().unwrap();
    let (source, _) = make_model(dir.path(), "part.gguf", MIB);
    for no in [1, 3] {
        let part = format!("broken-Q4_K_M-{no:05}-of-00003.gguf");
        hub.add_file(BIG, &part, &source, None).unwrap();
    }
    let authority = AssetAuthority::builder()
        .endpoint(hub.endpoint())
        .cache_dir(dir.join("hub"))
        .registry_file(dir.join("no-registry.json"))
        .token(None)
        .offline(false)
        .build()
        .unwrap();
    let err = authority.ensure_model(BIG).await.unwrap_err();
    assert!(matches!(err, FacecrabError::NoSingleFile { .. }), "{err}");
    let err = authority
        .ensure_model(&format!("{BIG}/broken-Q4_K_M-00001-of-00003.gguf"))
        .await
        .unwrap_err();
    assert!(matches!(err, FacecrabError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("00002-of-00003"), "{err}");
    assert!(hub.downloads().is_empty(), "{:?}", hub.downloads());
}

#[cfg(unix)]
#[async_std::test]
async fn one_cached_model_is_removed_and_the_rest_stay() {
    let s = setup("remove-one", 2 * MIB);
    let (q8, _) = make_model(s.dir.path(), "q8.gguf", 3 * MIB + 3);
    s.hub.add_file(REPO, "tiny-Q8_0.gguf", &q8, None).unwrap();
    let parts = ["big-00001-of-00002.gguf", "big-00002-of-00002.gguf"];
    for (part, size) in parts.iter().zip([MIB, MIB + 7]) {
        let (source, _) = make_model(s.dir.path(), part, size);
        s.hub.add_file(REPO, part, &source, None).unwrap();
    }
    let authority = s.authority();
    for name in [
        format!("{REPO}:Q4_K_M"),
        format!("{REPO}:Q8_0"),
        format!("{REPO}/{}", parts[1]),
    ] {
        authority.ensure_model(&name).await.unwrap();
    }
    let listed = authority.cached_models().unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    let find = |file: &str| listed.iter().find(|m| m.file == file).cloned().unwrap();
    let (q4, q8, big) = (find(FILE), find("tiny-Q8_0.gguf"), find(parts[0]));

    // A second snapshot sharing the Q4 blob, as another revision would.
    let other = q4.path.parent().unwrap().with_file_name("0".repeat(40));
    std::fs::create_dir_all(&other).unwrap();
    std::os::unix::fs::symlink(std::fs::read_link(&q4.path).unwrap(), other.join(FILE)).unwrap();

    assert_eq!(authority.remove_model(&q8).unwrap(), 3 * MIB + 3);
    assert!(std::fs::symlink_metadata(&q8.path).is_err());
    assert_eq!(authority.remove_model(&q8).unwrap(), 0, "already gone");
    // The Q4 blob stays while the other snapshot still links to it.
    assert_eq!(authority.remove_model(&q4).unwrap(), 0);
    assert!(same_content(&other.join(FILE), &s.source));
    let shared = authority
        .cached_models()
        .unwrap()
        .into_iter()
        .find(|m| m.file == FILE)
        .unwrap();
    assert_eq!(shared.commit, "0".repeat(40));
    assert_eq!(authority.remove_model(&shared).unwrap(), 2 * MIB);
    assert!(!other.exists(), "an emptied snapshot folder goes too");
    // A split model goes with all its parts.
    assert_eq!(big.parts, 2);
    assert_eq!(authority.remove_model(&big).unwrap(), 2 * MIB + 7);
    assert!(authority.cached_models().unwrap().is_empty());
    let blobs = s.cache().join("models--acme--tiny-GGUF").join("blobs");
    let left: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // An entry naming something outside the cache is refused untouched.
    let canary = s.cache().join("escape.gguf");
    std::fs::write(&canary, b"keep me").unwrap();
    for (repo, file, commit) in [
        (REPO, "../../../escape.gguf", q4.commit.as_str()),
        (REPO, FILE, ".."),
        (REPO, FILE, "a/../.."),
        ("../hub", FILE, q4.commit.as_str()),
    ] {
        let mut bad = q4.clone();
        (bad.repo, bad.file, bad.commit) = (repo.into(), file.into(), commit.into());
        let err = authority.remove_model(&bad).unwrap_err();
        assert!(matches!(err, FacecrabError::InvalidName { .. }), "{err}");
    }
    assert!(canary.exists());
}

#[async_std::test]
async fn the_token_never_shows_in_the_debug_output_of_any_type_holding_it() {
    let s = setup("token-debug", MIB);
    let secret = "hf_never_print_me_0123456789";
    let debug_of_builder = |builder: &facecrab::AuthorityBuilder| format!("{builder:?}");
    // The builder, with the token given and from the environment's file.
    let given = s.builder().token(Some(secret.into()));
    assert!(!debug_of_builder(&given).contains(secret), "{given:?}");
    assert!(debug_of_builder(&given).contains("redacted"), "{given:?}");
    let authority = given.build().unwrap();
    assert!(!format!("{authority:?}").contains(secret), "{authority:?}");
    assert!(!format!("{:?}", authority.clone()).contains(secret));
    // Errors and events of a refused download.
    s.hub.set_fault(REPO, FILE, Some(Fault::Unauthorized));
    let err = authority.ensure_model(REPO).await.unwrap_err();
    assert!(!format!("{err:?}").contains(secret) && !err.to_string().contains(secret));
    let events: Vec<AssetEvent> = authority.ensure_model_stream(REPO).collect().await;
    assert!(!format!("{events:?}").contains(secret), "{events:?}");
}

#[async_std::test]
async fn a_bad_endpoint_is_its_own_error_not_a_missing_model() {
    for endpoint in ["not a url", "ftp://example.org", "file:///tmp/hub"] {
        let err = AssetAuthority::builder()
            .endpoint(endpoint)
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, FacecrabError::InvalidEndpoint { url, .. } if url == endpoint),
            "{endpoint}: {err:?}"
        );
        assert!(err.to_string().contains("HF_ENDPOINT"), "{err}");
    }
}

#[async_std::test]
async fn removal_waits_for_the_blob_lock_and_gives_up_cleanly() {
    let s = setup("remove-locked", MIB);
    let authority = s.authority();
    authority.ensure_model(REPO).await.unwrap();
    let model = authority.cached_models().unwrap().remove(0);
    // Another process (here: this test) holds the blob's lock, as a
    // download or a link of the same blob would.
    let lock_path = s
        .cache()
        .join("models--acme--tiny-GGUF/blobs")
        .join(format!("{}.lock", s.sha));
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock_path)
        .unwrap();
    lock.lock().unwrap();
    let err = authority.remove_model(&model).unwrap_err();
    assert!(matches!(err, FacecrabError::Busy { .. }), "{err}");
    assert!(
        s.blob().is_file() && s.snapshot().is_file(),
        "nothing removed"
    );
    lock.unlock().unwrap();
    assert_eq!(authority.remove_model(&model).unwrap(), MIB);
    assert!(!s.blob().exists());
}

/// Where the snapshot of `file` in `repo` would be, and whether anything
/// of it (blob or snapshot) was left in the cache.
fn left_in_cache(cache: &Path, repo: &str) -> Vec<PathBuf> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let mut found = Vec::new();
    for sub in ["blobs", "snapshots"] {
        let mut stack = vec![folder.join(sub)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if !path.to_string_lossy().ends_with(".lock") {
                    found.push(path);
                }
            }
        }
    }
    found
}

#[async_std::test]
async fn a_file_kept_in_git_is_checked_against_its_object_id() {
    let s = setup("git-file", 0);
    let (small, _) = make_model(s.dir.path(), "small.gguf", 300_000);
    let repo = "acme/small-GGUF";
    let file = "small-Q4_K_M.gguf";
    s.hub.add_git_file(repo, file, &small).unwrap();

    // Corrupted on the way: refused, and nothing reaches a final path.
    s.hub.set_fault(repo, file, Some(Fault::WrongBytes));
    let err = s.authority().ensure_model(repo).await.unwrap_err();
    assert!(
        matches!(err, FacecrabError::ChecksumMismatch { .. }),
        "{err}"
    );
    let left: Vec<PathBuf> = left_in_cache(&s.cache(), repo)
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(left.is_empty(), "left at final paths: {left:?}");

    // Served right: it arrives, identical.
    s.hub.set_fault(repo, file, None);
    let path = s.authority().ensure_model(repo).await.unwrap();
    assert!(same_content(&path, &small));
}

#[async_std::test]
async fn a_body_with_no_length_that_ends_early_is_never_taken_as_complete() {
    // An LFS file and a git file, each from a server that announces no
    // length and whose body ends when the connection does: here it ends
    // after nothing at all (the client sees a clean end of file).
    let s = setup("no-length", MIB);
    let (small, _) = make_model(s.dir.path(), "small.gguf", 200_000);
    let git_repo = "acme/small-GGUF";
    let git_file = "small-Q4_K_M.gguf";
    s.hub.add_git_file(git_repo, git_file, &small).unwrap();
    for (repo, file) in [(REPO, FILE), (git_repo, git_file)] {
        s.hub.set_fault(repo, file, Some(Fault::NoLength));
        let err = s.authority().ensure_model(repo).await.unwrap_err();
        assert!(
            matches!(err, FacecrabError::ChecksumMismatch { .. }),
            "{repo}: {err}"
        );
        let left = left_in_cache(&s.cache(), repo);
        assert!(left.is_empty(), "{repo}: left behind: {left:?}");
    }
}

#[async_std::test]
async fn a_local_file_that_is_not_a_model_is_refused_by_type() {
    let s = setup("not-a-model", 0);
    let text = s.dir.path().join("notes.txt");
    std::fs::write(&text, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    let short = s.dir.path().join("short.gguf");
    std::fs::write(&short, "GG").unwrap();
    for path in [&text, &short] {
        let err = s
            .authority()
            .ensure_model(&path.display().to_string())
            .await
            .unwrap_err();
        assert!(matches!(err, FacecrabError::NotAModel { .. }), "{err}");
    }
    let (model, _) = make_model(s.dir.path(), "fine.gguf", 1000);
    let found = s
        .authority()
        .ensure_model(&model.display().to_string())
        .await
        .unwrap();
    assert_eq!(found, model);
}
