//! Several models at once, on Pinky: each request goes to the model it
//! names, models stay loaded under the residency policy, the least
//! recently used idle model is evicted for a new one, and a busy model
//! never is.

use std::path::Path;
use std::time::{Duration, Instant};

use facecrab::testing::TempDir;
use facecrab::AssetAuthority;
use futures::{Stream, StreamExt};
use rusty_genius_core::manifest::{ModelInfo, ModelState};
use rusty_genius_core::protocol::{BrainstemOutput, EngineStatus};
use rusty_genius_core::{Embed, ErrorKind, GeniusError, InferenceConfig};
use rusty_genius_cortex::{Engine, Pinky, Refused, Request, Step};
use rusty_genius_stem::testing::read_stream;
use rusty_genius_stem::{CortexStrategy, Orchestrator, OrchestratorHandle, Residency};

const LIMIT: Duration = Duration::from_secs(20);

/// Pinky, answering with the name of the model it loaded, one token; a
/// model whose name has `slow` in it takes 1.5 s to load.
struct Named {
    pinky: Pinky,
    delay: Duration,
}

impl Named {
    fn new(delay: Duration) -> Self {
        Self {
            pinky: Pinky::new(),
            delay,
        }
    }
}

impl Engine for Named {
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError> {
        let file = path.file_stem().unwrap().to_string_lossy().into_owned();
        if file.contains("slow") {
            std::thread::sleep(Duration::from_millis(1500));
        }
        let mut script = vec![file];
        script.extend(std::iter::repeat_n(" tick".to_owned(), 199));
        self.pinky = Pinky::new()
            .with_script(script)
            .with_token_delay(self.delay);
        self.pinky.load(name, path)
    }
    fn unload(&mut self) {
        self.pinky.unload()
    }
    fn capacity(&self) -> usize {
        self.pinky.capacity()
    }
    fn running(&self) -> usize {
        self.pinky.running()
    }
    fn start(&mut self, request: Request) -> Result<(), Box<Refused>> {
        self.pinky.start(request)
    }
    fn step(&mut self) -> Step {
        self.pinky.step()
    }
}

struct Fixture {
    dir: TempDir,
    genius: OrchestratorHandle,
}

impl Fixture {
    /// An Orchestrator on `Named` Pinkies, offline, with this policy.
    fn new(residency: Residency, strategy: CortexStrategy) -> Self {
        let dir = TempDir::new("stem-residency");
        let authority = AssetAuthority::builder()
            .cache_dir(dir.join("hub"))
            .registry_file(dir.join("no-registry.json"))
            .offline(true)
            .token(None)
            .build()
            .unwrap();
        let genius = Orchestrator::builder()
            .engine(|| Ok(Named::new(Duration::from_millis(5))))
            .asset_authority(authority)
            .residency(residency)
            .strategy(strategy)
            .build()
            .unwrap()
            .start();
        Self { dir, genius }
    }

    /// A stand-in model file of `bytes` (sparse), by its path.
    fn model(&self, name: &str, bytes: u64) -> String {
        let path = self.dir.join(format!("{name}.gguf"));
        let file = std::fs::File::create(&path).unwrap();
        use std::io::Write;
        (&file).write_all(b"GGUF pinky").unwrap();
        file.set_len(bytes.max(10)).unwrap();
        path.display().to_string()
    }

    /// The first token of `model`'s answer (its file's name), or the error.
    async fn ask(&self, model: &str) -> Result<String, rusty_genius_core::ErrorReport> {
        let config = InferenceConfig::default()
            .with_model(model)
            .with_max_tokens(1);
        let streamed = read_stream(self.genius.infer("hi", config), LIMIT).await;
        match streamed.reply.error() {
            Some(err) => Err(err.clone()),
            None => Ok(streamed.reply.text.trim().to_owned()),
        }
    }
}

/// Status events until `quiet` passes without one.
async fn statuses(
    events: &mut (impl Stream<Item = BrainstemOutput> + Unpin),
    quiet: Duration,
) -> Vec<EngineStatus> {
    let mut seen = Vec::new();
    while let Ok(Some(event)) = async_std::future::timeout(quiet, events.next()).await {
        if let BrainstemOutput::Status(status) = event {
            seen.push(status);
        }
    }
    seen
}

fn loads(statuses: &[EngineStatus]) -> usize {
    statuses
        .iter()
        .filter(|s| matches!(s, EngineStatus::Loading(_)))
        .count()
}

#[async_std::test]
async fn each_request_goes_to_the_model_it_names_and_both_stay_loaded() {
    let f = Fixture::new(Residency::default(), CortexStrategy::KeepAlive);
    let chat = f.model("chat", 10);
    let embed = f.model("embed", 10);
    let mut events = f.genius.events();
    f.genius.load(&chat).await.unwrap();
    for round in 0..10 {
        let vectors = f
            .genius
            .embeddings(Embed::new(["question"]).with_model(embed.clone()))
            .await
            .unwrap();
        assert_eq!(vectors.vectors.len(), 1);
        // No model named: the default, the one `load` loaded.
        let streamed = read_stream(
            f.genius
                .infer("hi", InferenceConfig::default().with_max_tokens(1)),
            LIMIT,
        )
        .await;
        assert_eq!(streamed.reply.text, "chat", "round {round}");
        assert_eq!(f.ask(&embed).await.unwrap(), "embed", "round {round}");
    }
    let seen = statuses(&mut events, Duration::from_millis(200)).await;
    assert_eq!(loads(&seen), 2, "{seen:?}");
    let listed = f.genius.models().await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed[0].default && listed[0].name == chat, "{listed:?}");
    assert!(listed.iter().all(|m| m.state == ModelState::Loaded));
    assert!(listed
        .iter()
        .all(|m| m.info.as_ref().unwrap().parallel == 4));
}

#[async_std::test]
async fn with_two_places_the_least_recently_used_idle_model_is_evicted() {
    let f = Fixture::new(
        Residency::default().with_max_models(2),
        CortexStrategy::KeepAlive,
    );
    let names: Vec<String> = ["a", "b", "c"].iter().map(|n| f.model(n, 10)).collect();
    let mut events = f.genius.events();
    for round in 0..2 {
        for (i, name) in names.iter().enumerate() {
            let answer = f.ask(name).await.unwrap();
            assert_eq!(answer, ["a", "b", "c"][i], "round {round}");
        }
    }
    let seen = statuses(&mut events, Duration::from_millis(200)).await;
    let evicted: Vec<(String, String)> = seen
        .iter()
        .filter_map(|s| match s {
            EngineStatus::Evicted { name, for_model } => Some((name.clone(), for_model.clone())),
            _ => None,
        })
        .collect();
    // a b | c evicts a | a evicts b | b evicts c | c evicts a
    let expected: Vec<(String, String)> = [(0, 2), (1, 0), (2, 1), (0, 2)]
        .iter()
        .map(|&(gone, new)| (names[gone].clone(), names[new].clone()))
        .collect();
    assert_eq!(evicted, expected, "{seen:?}");
    assert_eq!(loads(&seen), 6);
    let loaded = f.genius.models().await.unwrap();
    let resident: Vec<&str> = loaded
        .iter()
        .filter(|m| m.state == ModelState::Loaded)
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(resident.len(), 2, "{loaded:?}");
}

#[async_std::test]
async fn a_model_with_a_running_request_is_never_evicted() {
    let f = Fixture::new(
        Residency::default()
            .with_max_models(2)
            .with_wait(Duration::from_millis(300)),
        CortexStrategy::KeepAlive,
    );
    let a = f.model("a", 10);
    let b = f.model("b", 10);
    let c = f.model("c", 10);
    // `a` is the least recently used, but it is generating (200 tokens
    // of 5 ms).
    let long = f
        .genius
        .infer("go", InferenceConfig::default().with_model(a.clone()));
    let mut events = f.genius.events();
    let long = async_std::task::spawn(read_stream(long, LIMIT));
    async_std::task::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.ask(&b).await.unwrap(), "b");
    assert_eq!(f.ask(&c).await.unwrap(), "c");
    let seen = statuses(&mut events, Duration::from_millis(50)).await;
    assert!(
        seen.contains(&EngineStatus::Evicted {
            name: b.clone(),
            for_model: c.clone()
        }),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| matches!(s, EngineStatus::Evicted { name, .. } if *name == a)),
        "{seen:?}"
    );
    let long = long.await;
    assert_eq!(long.reply.usage().generated_tokens, 200);

    // Both places busy for longer than a load may wait: a typed error
    // that says what is loaded, and the busy models go on.
    let busy_a = f
        .genius
        .infer("go", InferenceConfig::default().with_model(a.clone()));
    let busy_c = f
        .genius
        .infer("go", InferenceConfig::default().with_model(c.clone()));
    let (busy_a, busy_c) = (
        async_std::task::spawn(read_stream(busy_a, LIMIT)),
        async_std::task::spawn(read_stream(busy_c, LIMIT)),
    );
    async_std::task::sleep(Duration::from_millis(100)).await;
    let err = f.ask(&b).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NoRoom, "{err}");
    assert!(
        err.contains(&a) && err.contains(&c) && err.contains("busy"),
        "{err}"
    );
    assert_eq!(busy_a.await.reply.usage().generated_tokens, 200);
    assert_eq!(busy_c.await.reply.usage().generated_tokens, 200);
    // Once they are idle, there is room again.
    assert_eq!(f.ask(&b).await.unwrap(), "b");
}

#[async_std::test]
async fn a_model_larger_than_the_budget_is_a_typed_error_and_the_others_keep_serving() {
    let f = Fixture::new(
        Residency::default().with_memory_budget(50_000_000),
        CortexStrategy::KeepAlive,
    );
    let small = f.model("small", 20_000_000);
    let huge = f.model("huge", 80_000_000);
    let second = f.model("second", 20_000_000);
    let third = f.model("third", 20_000_000);
    assert_eq!(f.ask(&small).await.unwrap(), "small");
    let err = f.ask(&huge).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ModelTooLarge, "{err}");
    match err.error() {
        Some(GeniusError::ModelTooLarge {
            name,
            needed,
            budget,
            loaded,
        }) => {
            assert_eq!(name, &huge);
            assert_eq!(*needed, 80_000_000);
            assert_eq!(*budget, 50_000_000);
            assert_eq!(loaded, &[(small.clone(), 20_000_000)]);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.contains("80 MB") && err.contains("50 MB"), "{err}");
    assert_eq!(f.ask(&small).await.unwrap(), "small");
    // Memory, not the count, evicts: two of 20 MB fit in 50, three do not.
    assert_eq!(f.ask(&second).await.unwrap(), "second");
    let mut events = f.genius.events();
    assert_eq!(f.ask(&third).await.unwrap(), "third");
    let seen = statuses(&mut events, Duration::from_millis(100)).await;
    assert!(
        seen.contains(&EngineStatus::Evicted {
            name: small.clone(),
            for_model: third.clone()
        }),
        "{seen:?}"
    );
}

#[async_std::test]
async fn a_request_for_an_unknown_model_fails_alone() {
    let f = Fixture::new(Residency::default(), CortexStrategy::KeepAlive);
    let known = f.model("known", 10);
    f.genius.load(&known).await.unwrap();
    let err = f.ask("no-such-model-anywhere").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ModelNotFound, "{err}");
    // The default is unchanged, and still answers.
    let streamed = read_stream(
        f.genius
            .infer("hi", InferenceConfig::default().with_max_tokens(1)),
        LIMIT,
    )
    .await;
    assert_eq!(streamed.reply.text, "known");
}

#[async_std::test]
async fn a_loaded_model_answers_while_another_loads() {
    let f = Fixture::new(Residency::default(), CortexStrategy::KeepAlive);
    let fast = f.model("fast", 10);
    let slow = f.model("slow", 10);
    assert_eq!(f.ask(&fast).await.unwrap(), "fast");
    let started = Instant::now();
    let slow_answer = {
        let config = InferenceConfig::default()
            .with_model(slow.clone())
            .with_max_tokens(1);
        async_std::task::spawn(read_stream(f.genius.infer("hi", config), LIMIT))
    };
    async_std::task::sleep(Duration::from_millis(100)).await;
    let listed = f.genius.models().await.unwrap();
    let state = listed.iter().find(|m| m.name == slow).map(|m| m.state);
    assert_eq!(state, Some(ModelState::Loading), "{listed:?}");
    assert_eq!(f.ask(&fast).await.unwrap(), "fast");
    let answered = started.elapsed();
    assert!(answered < Duration::from_millis(1000), "{answered:?}");
    assert_eq!(slow_answer.await.reply.text, "slow");
}

#[async_std::test]
async fn each_model_hibernates_on_its_own_idle_time_and_keep_alive_overrides_it() {
    let f = Fixture::new(
        Residency::default(),
        CortexStrategy::HibernateAfter(Duration::from_millis(300)),
    );
    let kept = f.model("kept", 10);
    let idle = f.model("idle", 10);
    let mut events = f.genius.events();
    let config = InferenceConfig::default()
        .with_model(kept.clone())
        .with_max_tokens(1)
        .with_keep_alive(Duration::MAX);
    read_stream(f.genius.infer("hi", config), LIMIT).await;
    assert_eq!(f.ask(&idle).await.unwrap(), "idle");
    let seen = statuses(&mut events, Duration::from_millis(800)).await;
    assert!(
        seen.contains(&EngineStatus::Hibernated(idle.clone())),
        "{seen:?}"
    );
    assert!(
        !seen.contains(&EngineStatus::Hibernated(kept.clone())),
        "{seen:?}"
    );
    let listed = f.genius.models().await.unwrap();
    let state = |name: &str| listed.iter().find(|m| m.name == name).unwrap().state;
    assert_eq!(state(&kept), ModelState::Loaded);
    assert_eq!(state(&idle), ModelState::Unloaded);

    // A keep-alive of zero unloads as soon as the request ends.
    let config = InferenceConfig::default()
        .with_model(kept.clone())
        .with_max_tokens(1)
        .with_keep_alive(Duration::ZERO);
    read_stream(f.genius.infer("hi", config), LIMIT).await;
    let seen = statuses(&mut events, Duration::from_millis(100)).await;
    assert!(
        seen.contains(&EngineStatus::Hibernated(kept.clone())),
        "{seen:?}"
    );
}

#[async_std::test]
async fn unload_waits_for_the_running_request_and_the_next_request_reloads() {
    let f = Fixture::new(Residency::default(), CortexStrategy::KeepAlive);
    let model = f.model("m", 10);
    let long = f
        .genius
        .infer("go", InferenceConfig::default().with_model(model.clone()));
    let long = async_std::task::spawn(read_stream(long, LIMIT));
    async_std::task::sleep(Duration::from_millis(100)).await;
    assert!(f.genius.unload(&model).await.unwrap());
    assert_eq!(long.await.reply.usage().generated_tokens, 200);
    assert!(!f.genius.unload(&model).await.unwrap());
    let unknown = f.genius.unload("never-seen").await.unwrap_err();
    assert_eq!(unknown.kind, ErrorKind::ModelNotFound);
    assert_eq!(f.ask(&model).await.unwrap(), "m");
}

#[async_std::test]
async fn immediate_unloads_after_a_request_not_after_a_load() {
    let f = Fixture::new(Residency::default(), CortexStrategy::Immediate);
    let model = f.model("m", 10);
    let mut events = f.genius.events();
    f.genius.load(&model).await.unwrap();
    async_std::task::sleep(Duration::from_millis(200)).await;
    let seen = statuses(&mut events, Duration::from_millis(50)).await;
    assert!(
        !seen.contains(&EngineStatus::Hibernated(model.clone())),
        "unloaded before any request: {seen:?}"
    );
    assert_eq!(f.ask(&model).await.unwrap(), "m");
    let seen = statuses(&mut events, Duration::from_millis(200)).await;
    assert_eq!(
        seen,
        [EngineStatus::Hibernated(model.clone())],
        "one load only"
    );
}

#[async_std::test]
async fn a_request_given_up_while_its_model_waits_for_room_never_loads_it() {
    let one = Residency {
        max_models: 1,
        ..Residency::default()
    };
    let f = Fixture::new(one, CortexStrategy::KeepAlive);
    let (a, b) = (f.model("first", 1000), f.model("second", 1000));
    f.ask(&a).await.unwrap();
    let mut events = f.genius.events();
    // `first` is busy for about a second: `second` must wait for room.
    let busy = f.genius.infer(
        "hi",
        InferenceConfig::default()
            .with_model(&a)
            .with_max_tokens(200),
    );
    let given_up = f
        .genius
        .infer("hi", InferenceConfig::default().with_model(&b));
    async_std::task::sleep(Duration::from_millis(100)).await;
    let metrics = f.genius.metrics().await.unwrap();
    assert_eq!(metrics.model(&b).unwrap().queued, 1, "{metrics:?}");
    drop(given_up);
    let streamed = read_stream(busy, LIMIT).await;
    assert!(streamed.reply.completed);
    let seen = statuses(&mut events, Duration::from_millis(300)).await;
    assert!(
        !seen
            .iter()
            .any(|s| matches!(s, EngineStatus::Loading(name) if name == &b)),
        "{seen:?}"
    );
    let metrics = f.genius.metrics().await.unwrap();
    let second = metrics.model(&b).unwrap();
    assert_eq!((second.loads, second.queued), (0, 0), "{second:?}");
    assert_eq!(second.requests_cancelled, 1, "{second:?}");
    let first = metrics.model(&a).unwrap();
    assert_eq!((first.loads, first.evictions), (1, 0), "{first:?}");
}
