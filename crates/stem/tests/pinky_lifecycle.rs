//! The Orchestrator's lifecycle and protocol, driven through its channels
//! with the Pinky engine.

use std::time::{Duration, Instant};

use facecrab::testing::TempDir;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius_core::protocol::{
    BrainstemInput, BrainstemOutput, EngineStatus, FinishReason, InferenceEvent, ThoughtEvent,
};
use rusty_genius_core::{ErrorKind, InferenceConfig};
use rusty_genius_cortex::Pinky;
use rusty_genius_stem::testing::{wait_for_usages, RecordingEngine, Reply, TestClient, Usages};
use rusty_genius_stem::{CortexStrategy, Orchestrator};

/// A running Orchestrator on Pinky, and the stand-in model file it loads.
struct Session {
    client: TestClient,
    dir: TempDir,
    model: String,
}

fn stand_in_model(dir: &TempDir) -> String {
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    model.display().to_string()
}

fn start(pinky: Pinky, strategy: CortexStrategy) -> Session {
    let dir = TempDir::new("stem");
    let model = stand_in_model(&dir);
    let genius = Orchestrator::builder()
        .strategy(strategy)
        .pinky(pinky)
        .build()
        .unwrap();
    Session {
        client: TestClient::start(genius).with_timeout(Duration::from_secs(10)),
        model,
        dir,
    }
}

impl Session {
    async fn send(&mut self, input: BrainstemInput) {
        self.client.send(input).await.unwrap();
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
        self.client
            .next()
            .await
            .expect("an output in time")
            .expect("output closed")
    }

    /// Collects outputs up to and including `Complete` or an `Error`.
    async fn until_done(&mut self) -> Reply {
        self.client.reply().await.unwrap()
    }
}

fn errors(reply: &Reply) -> Vec<String> {
    reply.errors.iter().map(|e| e.message.clone()).collect()
}

#[async_std::test]
async fn load_then_infer_streams_content_then_complete() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("hello there", InferenceConfig::default()).await;
    let out = s.until_done().await;
    assert_eq!(
        out.statuses,
        [
            EngineStatus::Loading(s.model.clone()),
            EngineStatus::Loaded(s.model.clone())
        ]
    );
    let start = out
        .outputs
        .iter()
        .position(|o| *o == BrainstemOutput::Event(InferenceEvent::ProcessStart));
    assert!(start.is_some(), "{out:?}");
    assert_eq!(out.text, "Narf! You said: hello there");
    assert_eq!(
        out.outputs.last(),
        Some(&BrainstemOutput::Event(InferenceEvent::Complete))
    );
    assert_eq!(out.usage().finish_reason, FinishReason::EndOfGeneration);
}

#[async_std::test]
async fn infer_before_load_is_an_error_that_says_what_to_do() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    s.infer("hello", InferenceConfig::default()).await;
    let out = s.until_done().await;
    assert_eq!(out.errors.len(), 1, "{out:?}");
    assert_eq!(out.errors[0].kind, ErrorKind::NoModelLoaded);
    assert!(out.errors[0].contains("LoadModel"), "{}", out.errors[0]);
    // The Orchestrator is still usable afterwards.
    s.load().await;
    s.infer("again", InferenceConfig::default()).await;
    assert_eq!(s.until_done().await.text, "Narf! You said: again");
}

#[async_std::test]
async fn bad_files_and_prompts_get_errors_and_leave_the_state_unloaded() {
    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    let not_gguf = s.dir.join("notes.gguf");
    std::fs::write(&not_gguf, b"just some text").unwrap();
    s.send(BrainstemInput::LoadModel(not_gguf.display().to_string()))
        .await;
    let out = s.until_done().await;
    assert!(errors(&out)[0].contains("GGUF"), "{out:?}");
    assert_eq!(
        s.next().await,
        BrainstemOutput::Status(EngineStatus::Unloaded)
    );

    let missing = s.dir.join("missing.gguf").display().to_string();
    s.send(BrainstemInput::LoadModel(missing)).await;
    let out = s.until_done().await;
    assert!(errors(&out)[0].contains("missing.gguf"), "{out:?}");
    assert_eq!(out.errors[0].kind, ErrorKind::ModelNotFound);

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
        .outputs
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
    assert_eq!(out.text, "Tokyo 東🦀");
    assert!(!out.text.contains('\u{fffd}'));
}

#[async_std::test]
async fn max_tokens_and_stop_sequences_end_generation() {
    let script = ["one ", "two ", "three ", "four ", "five"];
    let mut s = start(Pinky::new().with_script(script), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("count", InferenceConfig::default().with_max_tokens(2))
        .await;
    let out = s.until_done().await;
    assert_eq!(out.text, "one two ");
    assert_eq!(out.usage().generated_tokens, 2);
    assert_eq!(out.usage().finish_reason, FinishReason::MaxTokens);

    s.infer("count", InferenceConfig::default().with_stop("ee f"))
        .await;
    let out = s.until_done().await;
    assert_eq!(out.text, "one two thr");
    assert_eq!(out.usage().finish_reason, FinishReason::StopSequence);
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
    let usage = out.usage();
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    assert!(
        usage.generated_tokens < 100,
        "stop took {} tokens",
        usage.generated_tokens
    );
    // A later request runs normally.
    s.infer("again", InferenceConfig::default().with_max_tokens(3))
        .await;
    assert_eq!(s.until_done().await.usage().clone().generated_tokens, 3);
}

#[async_std::test]
async fn prefix_reuse_is_reported_in_usage() {
    let mut s = start(Pinky::new().with_script(["ok"]), CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("The quick brown fox", InferenceConfig::default())
        .await;
    let first = s.until_done().await.usage().clone();
    assert_eq!(first.cached_tokens, 0);
    s.infer("The quick brown fox", InferenceConfig::default())
        .await;
    let again = s.until_done().await.usage().clone();
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    s.infer("The quick brown foxok jumps", InferenceConfig::default())
        .await;
    let extended = s.until_done().await.usage().clone();
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
    assert_eq!(out.usage().generated_tokens, 60);
    assert!(
        !out.statuses
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
        out.statuses,
        [
            EngineStatus::Loading(s.model.clone()),
            EngineStatus::Loaded(s.model.clone())
        ]
    );
    assert_eq!(out.text, "zz");
}

#[async_std::test]
async fn immediate_strategy_unloads_after_each_inference() {
    let mut s = start(Pinky::new(), CortexStrategy::Immediate);
    s.load().await;
    for round in 0..2 {
        s.infer("hi", InferenceConfig::default()).await;
        let out = s.until_done().await;
        assert_eq!(out.text, "Narf! You said: hi", "round {round}");
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
    let usages = Usages::default();
    let recorded = usages.clone();
    let pinky = Pinky::new()
        .with_script(vec!["tock "; 2000])
        .with_token_delay(Duration::from_millis(2));
    let dir = TempDir::new("stem-dropped");
    let model = stand_in_model(&dir);
    let genius = Orchestrator::builder()
        .engine(move || Ok(RecordingEngine::new(pinky.clone(), recorded.clone())))
        .build()
        .unwrap();
    let (mut input, mut output, running) = TestClient::start(genius).into_parts();
    input.send(BrainstemInput::LoadModel(model)).await.unwrap();
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
    let usage = wait_for_usages(&usages, 1, Duration::from_secs(10)).await[0].clone();
    assert_eq!(usage.finish_reason, FinishReason::Cancelled);
    assert!(
        usage.generated_tokens < 200,
        "generated {} tokens for nobody",
        usage.generated_tokens
    );
}

#[async_std::test]
async fn shutdown_ends_the_running_request_and_answers_every_queued_one() {
    let pinky = Pinky::new()
        .with_script(vec!["tick "; 1000])
        .with_token_delay(Duration::from_millis(5));
    let mut s = start(pinky, CortexStrategy::KeepAlive);
    s.load().await;
    s.infer("first", InferenceConfig::default()).await;
    s.infer("second", InferenceConfig::default()).await;
    s.infer("third", InferenceConfig::default()).await;
    s.load().await;
    // Once the first request streams, shut down.
    loop {
        if let BrainstemOutput::Event(InferenceEvent::Content(_)) = s.next().await {
            break;
        }
    }
    let rest = s.client.shutdown().await.expect("the loop ended");
    let completes = rest
        .outputs
        .iter()
        .filter(|o| matches!(o, BrainstemOutput::Event(InferenceEvent::Complete)))
        .count();
    assert_eq!(completes, 1, "{}", rest.event_list());
    assert_eq!(rest.usage().finish_reason, FinishReason::Cancelled);
    let kinds: Vec<ErrorKind> = rest.errors.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [ErrorKind::ShutDown; 3],
        "two queued Infers and one queued load: {}",
        rest.event_list()
    );
    // The running request's end comes before the queued ones' errors.
    let complete_at = rest
        .outputs
        .iter()
        .position(|o| matches!(o, BrainstemOutput::Event(InferenceEvent::Complete)));
    let first_error = rest
        .outputs
        .iter()
        .position(|o| matches!(o, BrainstemOutput::Error(_)));
    assert!(complete_at.is_some() && first_error.is_some());
}

#[test]
fn run_waits_for_a_slow_engine_without_blocking_its_executor() {
    // One thread runs both the Orchestrator and a ticker. A blocking join
    // on the engine thread (which is busy loading for 1.5 s when Shutdown
    // arrives) would stop the ticker for that long.
    let dir = TempDir::new("stem-executor");
    let model = stand_in_model(&dir);
    let mut genius = Orchestrator::builder()
        .pinky(Pinky::new().with_load_delay(Duration::from_millis(1500)))
        .build()
        .unwrap();
    let (mut input, rx) = mpsc::channel(4);
    let (tx, mut output) = mpsc::channel(16);
    input.try_send(BrainstemInput::LoadModel(model)).unwrap();
    let (run_took, longest_gap, outputs) = futures::executor::block_on(async move {
        let started = Instant::now();
        let run = async {
            genius.run(rx, tx).await;
            started.elapsed()
        };
        let drive = async {
            // Shut down once loading has begun.
            while !matches!(
                output.next().await,
                Some(BrainstemOutput::Status(EngineStatus::Loading(_)))
            ) {}
            input.send(BrainstemInput::Shutdown).await.unwrap();
            output.collect::<Vec<_>>().await
        };
        let ticks = async {
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            loop {
                async_std::task::sleep(Duration::from_millis(10)).await;
                longest = longest.max(last.elapsed());
                last = Instant::now();
                if started.elapsed() > Duration::from_secs(3) {
                    return longest;
                }
            }
        };
        let ((run_took, outputs), longest_gap) =
            futures::join!(futures::future::join(run, drive), ticks);
        (run_took, longest_gap, outputs)
    });
    assert!(
        longest_gap < Duration::from_millis(500),
        "the executor thread was blocked for {longest_gap:?}"
    );
    assert!(
        run_took >= Duration::from_millis(1000),
        "run returned after {run_took:?}, before the engine finished loading and unloaded"
    );
    let errors: Vec<_> = outputs
        .iter()
        .filter_map(|o| match o {
            BrainstemOutput::Error(report) => Some(report.kind),
            _ => None,
        })
        .collect();
    assert_eq!(errors, [ErrorKind::ShutDown], "{outputs:?}");
}

#[async_std::test]
async fn a_dropped_orchestrator_stops_its_download_and_leaves_it_resumable() {
    use facecrab::testing::{Fault, TestHub};
    use facecrab::AssetAuthority;

    const REPO: &str = "acme/slow-GGUF";
    const FILE: &str = "slow-Q4_K_M.gguf";
    let dir = TempDir::new("stem-download");
    let source = dir.join("source.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.resize(24 << 20, 0x5a);
    std::fs::write(&source, &bytes).unwrap();
    let hub = TestHub::start().unwrap();
    hub.add_file(REPO, FILE, &source, None).unwrap();
    hub.set_fault(REPO, FILE, Some(Fault::Throttle(4 << 20)));
    let authority = || {
        AssetAuthority::builder()
            .endpoint(hub.endpoint())
            .cache_dir(dir.join("hub"))
            .registry_file(dir.join("registry.json"))
            .token(None)
            .build()
            .unwrap()
    };
    let genius = Orchestrator::builder()
        .pinky(Pinky::new())
        .asset_authority(authority())
        .build()
        .unwrap();
    let (mut input, mut output, running) = TestClient::start(genius).into_parts();
    input
        .send(BrainstemInput::LoadModel(REPO.into()))
        .await
        .unwrap();
    // Let a few MiB arrive, then drop the running Orchestrator.
    loop {
        match output.next().await {
            Some(BrainstemOutput::Asset(rusty_genius_core::protocol::AssetEvent::Progress(
                done,
                _,
            ))) if done >= 2 << 20 => break,
            Some(_) => {}
            None => panic!("the Orchestrator ended early"),
        }
    }
    running.cancel().await;
    let dropped_at = Instant::now();
    async_std::task::sleep(Duration::from_secs(1)).await;
    let after_one_second = hub.bytes_sent();
    async_std::task::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        hub.bytes_sent(),
        after_one_second,
        "bytes still flowing {:?} after the drop",
        dropped_at.elapsed()
    );
    assert!(after_one_second < bytes.len() as u64);

    // What arrived is kept, and the next attempt resumes from it.
    let partial = std::fs::read_dir(dir.join("hub/models--acme--slow-GGUF/blobs"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .expect("an .incomplete file")
        .path();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept >= 2 << 20, "kept only {kept} bytes");
    hub.set_fault(REPO, FILE, None);
    hub.clear_requests();
    let path = authority().ensure_model(REPO).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let downloads = hub.downloads();
    assert_eq!(downloads.len(), 1, "{downloads:?}");
    assert_eq!(
        downloads[0].header("range"),
        Some(format!("bytes={kept}-").as_str())
    );
}

#[async_std::test]
async fn pinky_scripts_a_tool_loop_for_apps_to_test_against() {
    use rusty_genius_core::{ChatMessage, Tool, ToolCall};
    use serde_json::json;

    let pinky = Pinky::new().with_replies([
        Pinky::tool_call("get_weather", json!({"city": "Paris"})),
        Pinky::words("It is 18 C and sunny in Paris."),
    ]);
    let mut s = start(pinky, CortexStrategy::KeepAlive);
    s.load().await;
    let weather = Tool::function(
        "get_weather",
        "The weather in a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}}}),
    );
    let config = InferenceConfig::default().with_tools(vec![weather]);
    let mut messages = vec![ChatMessage::user("Weather in Paris?")];
    let asked = s
        .client
        .chat(messages.clone(), config.clone())
        .await
        .unwrap();
    assert_eq!(asked.text, "", "no markup reaches the content");
    assert_eq!(asked.tool_calls.len(), 1, "{asked:?}");
    let (id, name, arguments) = asked.tool_calls[0].clone();
    assert_eq!(
        (name.as_str(), &arguments),
        ("get_weather", &json!({"city": "Paris"}))
    );
    assert_eq!(asked.usage().finish_reason, FinishReason::ToolCalls);

    messages.push(ChatMessage::assistant_tool_calls(vec![ToolCall::new(
        id.clone(),
        name,
        &arguments,
    )]));
    messages.push(ChatMessage::tool(id, "18 C and sunny"));
    let answered = s.client.chat(messages, config).await.unwrap();
    assert_eq!(answered.text, "It is 18 C and sunny in Paris.");
    assert_eq!(
        answered.usage().finish_reason,
        FinishReason::EndOfGeneration
    );
}

#[async_std::test]
async fn bad_conversations_are_refused_before_the_engine_sees_them() {
    use rusty_genius_core::{ChatMessage, Role};

    let mut s = start(Pinky::new(), CortexStrategy::KeepAlive);
    s.load().await;
    let unknown = vec![ChatMessage {
        role: Role::from("narrator"),
        ..ChatMessage::user("Once upon a time")
    }];
    let reply = s
        .client
        .chat(unknown, InferenceConfig::default())
        .await
        .unwrap();
    assert_eq!(reply.errors[0].kind, ErrorKind::InvalidRequest);
    assert!(reply.errors[0].contains("narrator"), "{}", reply.errors[0]);
    // A conversation is answered by its last user message.
    let fine = vec![ChatMessage::system("Be kind."), ChatMessage::user("hello")];
    let reply = s
        .client
        .chat(fine, InferenceConfig::default())
        .await
        .unwrap();
    assert_eq!(reply.text, "Narf! You said: hello");
}
