//! The Orchestrator's lifecycle and protocol, driven through its channels
//! with the Pinky engine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius_core::protocol::{
    BrainstemInput, BrainstemOutput, EngineStatus, FinishReason, InferenceEvent, ThoughtEvent,
    Usage,
};
use rusty_genius_core::InferenceConfig;
use rusty_genius_cortex::Pinky;
use rusty_genius_stem::{CortexStrategy, Orchestrator};

/// A running Orchestrator and its two channel ends.
struct Session {
    input: mpsc::Sender<BrainstemInput>,
    output: mpsc::Receiver<BrainstemOutput>,
    _dir: TempDir,
    model: String,
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "genius-stem-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn start(pinky: Pinky, strategy: CortexStrategy) -> Session {
    let dir = temp_dir();
    let model = dir.0.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    let mut genius = Orchestrator::builder()
        .strategy(strategy)
        .pinky(pinky)
        .build()
        .unwrap();
    let (input, rx) = mpsc::channel(16);
    let (tx, output) = mpsc::channel(16);
    async_std::task::spawn(async move { genius.run(rx, tx).await });
    Session {
        input,
        output,
        model: model.display().to_string(),
        _dir: dir,
    }
}

impl Session {
    async fn send(&mut self, input: BrainstemInput) {
        self.input.send(input).await.unwrap();
    }

    async fn load(&mut self) {
        let model = self.model.clone();
        self.send(BrainstemInput::LoadModel(model)).await;
    }

    async fn infer(&mut self, prompt: &str, config: InferenceConfig) {
        let prompt = prompt.to_owned();
        self.send(BrainstemInput::Infer { prompt, config }).await;
    }

    async fn next(&mut self) -> BrainstemOutput {
        async_std::future::timeout(Duration::from_secs(10), self.output.next())
            .await
            .expect("no output within 10 s")
            .expect("output closed")
    }

    /// Collects outputs up to and including `Complete` or an `Error`.
    async fn until_done(&mut self) -> Vec<BrainstemOutput> {
        let mut seen = Vec::new();
        loop {
            let message = self.next().await;
            let done = matches!(
                message,
                BrainstemOutput::Event(InferenceEvent::Complete) | BrainstemOutput::Error(_)
            );
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

fn text_of(outputs: &[BrainstemOutput]) -> String {
    outputs
        .iter()
        .filter_map(|o| match o {
            BrainstemOutput::Event(InferenceEvent::Content(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn usage_of(outputs: &[BrainstemOutput]) -> Usage {
    outputs
        .iter()
        .find_map(|o| match o {
            BrainstemOutput::Event(InferenceEvent::Usage(usage)) => Some(usage.clone()),
            _ => None,
        })
        .expect("no usage reported")
}

fn statuses(outputs: &[BrainstemOutput]) -> Vec<EngineStatus> {
    outputs
        .iter()
        .filter_map(|o| match o {
            BrainstemOutput::Status(status) => Some(status.clone()),
            _ => None,
        })
        .collect()
}

fn errors(outputs: &[BrainstemOutput]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| match o {
            BrainstemOutput::Error(message) => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[async_std::test]
async fn load_then_infer_streams_content_then_complete() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("hello there", InferenceConfig::default()).await;
    let out = s.until_done().await;
    assert_eq!(
        statuses(&out),
        [
            EngineStatus::Loading(s.model.clone()),
            EngineStatus::Loaded(s.model.clone())
        ]
    );
    let start = out
        .iter()
        .position(|o| *o == BrainstemOutput::Event(InferenceEvent::ProcessStart));
    assert!(start.is_some(), "{out:?}");
    assert_eq!(text_of(&out), "Narf! You said: hello there");
    assert_eq!(
        out.last(),
        Some(&BrainstemOutput::Event(InferenceEvent::Complete))
    );
    assert_eq!(usage_of(&out).finish_reason, FinishReason::EndOfGeneration);
}

#[async_std::test]
async fn infer_before_load_is_an_error_that_says_what_to_do() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    s.infer("hello", InferenceConfig::default()).await;
    let out = s.until_done().await;
    let errors = errors(&out);
    assert_eq!(errors.len(), 1, "{out:?}");
    assert!(errors[0].contains("LoadModel"), "{}", errors[0]);
    // The Orchestrator is still usable afterwards.
    s.load().await;
    s.infer("again", InferenceConfig::default()).await;
    assert_eq!(text_of(&s.until_done().await), "Narf! You said: again");
}

#[async_std::test]
async fn bad_files_and_prompts_get_errors_and_leave_the_state_unloaded() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    let not_gguf = s._dir.0.join("notes.gguf");
    std::fs::write(&not_gguf, b"just some text").unwrap();
    s.send(BrainstemInput::LoadModel(not_gguf.display().to_string()))
        .await;
    let out = s.until_done().await;
    assert!(errors(&out)[0].contains("GGUF"), "{out:?}");
    assert_eq!(
        s.next().await,
        BrainstemOutput::Status(EngineStatus::Unloaded)
    );

    let missing = s._dir.0.join("missing.gguf").display().to_string();
    s.send(BrainstemInput::LoadModel(missing)).await;
    let out = s.until_done().await;
    assert!(errors(&out)[0].contains("missing.gguf"), "{out:?}");

    // After failed loads, Infer reports that nothing is loaded.
    s.infer("hi", InferenceConfig::default()).await;
    assert!(errors(&s.until_done().await)[0].contains("no model is loaded"));

    s.load().await;
    s.infer("   ", InferenceConfig::default()).await;
    assert!(errors(&s.until_done().await)[0].contains("prompt is empty"));
    let bad = InferenceConfig {
        top_p: 2.0,
        ..InferenceConfig::default()
    };
    s.infer("hi", bad).await;
    assert!(errors(&s.until_done().await)[0].contains("top_p"));
}

#[async_std::test]
async fn thought_tags_split_across_tokens_become_thought_events() {
    let script = [
        "<thi",
        "nk>",
        "Pondering",
        " the",
        " plan</th",
        "ink>",
        "Take over",
        " the world",
    ];
    let mut s = start(Pinky::new().with_script(script), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("what are we doing tonight?", InferenceConfig::default())
        .await;
    let events: Vec<InferenceEvent> = s
        .until_done()
        .await
        .into_iter()
        .filter_map(|o| match o {
            BrainstemOutput::Event(e) if !matches!(e, InferenceEvent::Usage(_)) => Some(e),
            _ => None,
        })
        .collect();
    let thought: String = events
        .iter()
        .filter_map(|e| match e {
            InferenceEvent::Thought(ThoughtEvent::Delta(t)) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(thought, "Pondering the plan");
    let pos = |wanted: &InferenceEvent| events.iter().position(|e| e == wanted).unwrap();
    let start = pos(&InferenceEvent::Thought(ThoughtEvent::Start));
    let stop = pos(&InferenceEvent::Thought(ThoughtEvent::Stop));
    let first_content = events
        .iter()
        .position(|e| matches!(e, InferenceEvent::Content(_)))
        .unwrap();
    assert!(pos(&InferenceEvent::ProcessStart) < start && start < stop && stop < first_content);
    assert_eq!(events.last(), Some(&InferenceEvent::Complete));
}

#[async_std::test]
async fn utf8_split_across_tokens_streams_whole_characters() {
    let crab = "🦀".as_bytes();
    let script: Vec<Vec<u8>> = vec![
        b"Tok".to_vec(),
        b"yo ".to_vec(),
        "東".as_bytes()[..2].to_vec(),
        "東".as_bytes()[2..].to_vec(),
        crab[..1].to_vec(),
        crab[1..].to_vec(),
    ];
    let mut s = start(Pinky::new().with_script(script), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("?", InferenceConfig::default()).await;
    let out = s.until_done().await;
    assert_eq!(text_of(&out), "Tokyo 東🦀");
    assert!(!text_of(&out).contains('\u{fffd}'));
}

#[async_std::test]
async fn max_tokens_and_stop_sequences_end_generation() {
    let script = ["one ", "two ", "three ", "four ", "five"];
    let mut s = start(Pinky::new().with_script(script), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("count", InferenceConfig::default().with_max_tokens(2))
        .await;
    let out = s.until_done().await;
    assert_eq!(text_of(&out), "one two ");
    assert_eq!(usage_of(&out).generated_tokens, 2);
    assert_eq!(usage_of(&out).finish_reason, FinishReason::MaxTokens);

    s.infer("count", InferenceConfig::default().with_stop("ee f"))
        .await;
    let out = s.until_done().await;
    assert_eq!(text_of(&out), "one two thr");
    assert_eq!(usage_of(&out).finish_reason, FinishReason::StopSequence);
}

#[async_std::test]
async fn stop_ends_a_long_generation_within_a_few_tokens() {
    let script = vec!["tick "; 1000];
    let pinky = Pinky::new()
        .with_script(script)
        .with_token_delay(Duration::from_millis(5));
    let mut s = start(pinky, CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("go", InferenceConfig::default()).await;
    // Wait for some content, then stop.
    loop {
        if let BrainstemOutput::Event(InferenceEvent::Content(_)) = s.next().await {
            break;
        }
    }
    s.send(BrainstemInput::Stop).await;
    let out = s.until_done().await;
    let usage = usage_of(&out);
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    assert!(
        usage.generated_tokens < 100,
        "stop took {} tokens",
        usage.generated_tokens
    );
    // A later request runs normally.
    s.infer("again", InferenceConfig::default().with_max_tokens(3))
        .await;
    assert_eq!(usage_of(&s.until_done().await).generated_tokens, 3);
}

#[async_std::test]
async fn prefix_reuse_is_reported_in_usage() {
    let mut s = start(Pinky::new().with_script(["ok"]), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("The quick brown fox", InferenceConfig::default())
        .await;
    let first = usage_of(&s.until_done().await);
    assert_eq!(first.cached_tokens, 0);
    s.infer("The quick brown fox", InferenceConfig::default())
        .await;
    let again = usage_of(&s.until_done().await);
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    s.infer("The quick brown foxok jumps", InferenceConfig::default())
        .await;
    let extended = usage_of(&s.until_done().await);
    assert_eq!(extended.cached_tokens, "The quick brown foxok".len());
}

#[async_std::test]
async fn hibernates_after_idle_and_reloads_on_infer_but_never_mid_generation() {
    let ttl = Duration::from_millis(200);
    // 60 tokens x 10 ms = 600 ms of generation, three times the TTL.
    let pinky = Pinky::new()
        .with_script(vec!["z"; 60])
        .with_token_delay(Duration::from_millis(10));
    let mut s = start(pinky, CortexStrategy::HibernateAfter(ttl));
    s.load().await;
    s.infer("sleepy", InferenceConfig::default()).await;
    let out = s.until_done().await;
    assert_eq!(usage_of(&out).generated_tokens, 60);
    assert!(
        !statuses(&out)
            .iter()
            .any(|st| matches!(st, EngineStatus::Hibernated(_))),
        "unloaded during generation: {out:?}"
    );

    let idle_from = Instant::now();
    assert_eq!(
        s.next().await,
        BrainstemOutput::Status(EngineStatus::Hibernated(s.model.clone()))
    );
    let idle = idle_from.elapsed();
    assert!(
        idle >= ttl - Duration::from_millis(20),
        "hibernated after only {idle:?}"
    );

    s.infer("wake up", InferenceConfig::default().with_max_tokens(2))
        .await;
    let out = s.until_done().await;
    assert_eq!(
        statuses(&out),
        [
            EngineStatus::Loading(s.model.clone()),
            EngineStatus::Loaded(s.model.clone())
        ]
    );
    assert_eq!(text_of(&out), "zz");
}

#[async_std::test]
async fn immediate_strategy_unloads_after_each_inference() {
    let mut s = start(Pinky::new(), CortexStrategy::Immediate);
    s.load().await;
    for round in 0..2 {
        s.infer("hi", InferenceConfig::default()).await;
        let out = s.until_done().await;
        assert_eq!(text_of(&out), "Narf! You said: hi", "round {round}");
        assert_eq!(
            s.next().await,
            BrainstemOutput::Status(EngineStatus::Hibernated(s.model.clone()))
        );
    }
}

#[async_std::test]
async fn unknown_model_name_is_a_clear_error() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    s.send(BrainstemInput::LoadModel("no-such-model-anywhere".into()))
        .await;
    let out = s.until_done().await;
    let errors = errors(&out);
    assert!(errors[0].contains("no-such-model-anywhere"), "{out:?}");
}

#[async_std::test]
async fn a_dropped_output_receiver_stops_generation() {
    use rusty_genius_core::GeniusError;
    use rusty_genius_cortex::{Engine, Output};
    use std::sync::{Arc, Mutex};

    /// Pinky, recording the usage of each inference.
    struct Recording(Pinky, Arc<Mutex<Vec<Usage>>>);
    impl Engine for Recording {
        fn load(
            &mut self,
            name: &str,
            path: &std::path::Path,
        ) -> Result<rusty_genius_core::manifest::ModelInfo, GeniusError> {
            self.0.load(name, path)
        }
        fn unload(&mut self) {
            self.0.unload()
        }
        fn infer(
            &mut self,
            prompt: &str,
            config: &InferenceConfig,
            output: &mut Output<'_>,
        ) -> Result<Usage, GeniusError> {
            let usage = self.0.infer(prompt, config, output)?;
            self.1.lock().unwrap().push(usage.clone());
            Ok(usage)
        }
    }

    let usages = Arc::new(Mutex::new(Vec::new()));
    let recorded = usages.clone();
    let pinky = Pinky::new()
        .with_script(vec!["tock "; 2000])
        .with_token_delay(Duration::from_millis(2));
    let dir = temp_dir();
    let model = dir.0.join("pinky.gguf");
    std::fs::write(&model, b"GGUF").unwrap();
    let mut genius = Orchestrator::builder()
        .engine(move || Ok(Recording(pinky.clone(), recorded.clone())))
        .build()
        .unwrap();
    let (mut input, rx) = mpsc::channel(4);
    let (tx, mut output) = mpsc::channel(4);
    let running = async_std::task::spawn(async move { genius.run(rx, tx).await });
    input
        .send(BrainstemInput::LoadModel(model.display().to_string()))
        .await
        .unwrap();
    input
        .send(BrainstemInput::Infer {
            prompt: "go".into(),
            config: InferenceConfig::default(),
        })
        .await
        .unwrap();
    while !matches!(
        output.next().await,
        Some(BrainstemOutput::Event(InferenceEvent::Content(_)))
    ) {}
    drop(output);
    async_std::future::timeout(Duration::from_secs(10), running)
        .await
        .expect("run did not end");
    // The engine thread records the usage when it returns.
    let deadline = Instant::now() + Duration::from_secs(10);
    while usages.lock().unwrap().is_empty() && Instant::now() < deadline {
        async_std::task::sleep(Duration::from_millis(10)).await;
    }
    let usage = usages.lock().unwrap()[0].clone();
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    assert!(
        usage.generated_tokens < 200,
        "generated {} tokens for nobody",
        usage.generated_tokens
    );
}
