//! Running one case through a fresh Orchestrator.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use facecrab::testing::TestHub;
use facecrab::AssetAuthority;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius::cortex::Pinky;
use rusty_genius::{CortexStrategy, Orchestrator};

use crate::case::{Case, Step, Strategy};
use crate::check::{check_step, Seen};
use crate::{Engine, Outcome, TEST_MODEL_FILE, TEST_MODEL_REPO, TEST_MODEL_SHA256};

/// No step may take longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Where the harness finds what it needs.
#[derive(Debug, Clone)]
pub struct Env {
    /// The test model file (`GENIUS_TEST_MODEL`).
    pub model_file: Option<PathBuf>,
    /// Under CI a missing model fails a case instead of skipping it.
    pub ci: bool,
}

impl Env {
    /// From `GENIUS_TEST_MODEL` and `CI`.
    pub fn from_env() -> Self {
        Self {
            model_file: std::env::var_os("GENIUS_TEST_MODEL").map(PathBuf::from),
            ci: std::env::var("CI").is_ok_and(|v| v == "true"),
        }
    }
}

/// A private folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "teaser-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch folder");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `case` on `engine`.
pub async fn run_case(case: &Case, engine: &Engine, env: &Env) -> Outcome {
    let scratch = Scratch::new();
    let hub = match TestHub::start() {
        Ok(hub) => hub,
        Err(err) => return Outcome::Failed(format!("cannot start the loopback Hub: {err}")),
    };
    let (builder, model_name) = match engine {
        Engine::Pinky => {
            let stand_in = scratch.0.join("pinky.gguf");
            std::fs::write(&stand_in, b"GGUF pinky").expect("write the stand-in model");
            let mut pinky =
                Pinky::new().with_token_delay(Duration::from_millis(case.token_delay_ms));
            if let Some(script) = &case.script {
                let repeat = case.script_repeat.unwrap_or(1);
                pinky = pinky.with_script(script.iter().cycle().take(script.len() * repeat));
            }
            (
                Orchestrator::builder().pinky(pinky),
                stand_in.display().to_string(),
            )
        }
        Engine::Model(name) => {
            let Some(builder) = llama_builder() else {
                return Outcome::Skipped(
                    "this build has no llama.cpp engine (feature `llama`)".into(),
                );
            };
            if !name.starts_with(&format!("{TEST_MODEL_REPO}:")) {
                return Outcome::Skipped(format!("no local copy of {name} to serve"));
            }
            let file = match &env.model_file {
                Some(file) if file.is_file() => file.clone(),
                _ => {
                    let why = "GENIUS_TEST_MODEL does not name the test model file (run .ci/fetch-model.sh)";
                    return if env.ci {
                        Outcome::Failed(format!("{why}; CI must run every real-model case"))
                    } else {
                        Outcome::Skipped(why.into())
                    };
                }
            };
            if let Err(err) = hub.add_file(
                TEST_MODEL_REPO,
                TEST_MODEL_FILE,
                &file,
                Some(TEST_MODEL_SHA256),
            ) {
                return Outcome::Failed(format!("cannot serve the model: {err}"));
            }
            (builder, name.clone())
        }
    };
    let authority = AssetAuthority::builder()
        .endpoint(hub.endpoint())
        .cache_dir(scratch.0.join("hub"))
        .registry_file(scratch.0.join("registry.json"))
        .token(None)
        .offline(case.offline)
        .build();
    let authority = match authority {
        Ok(authority) => authority,
        Err(err) => return Outcome::Failed(format!("cannot create the asset authority: {err}")),
    };
    let strategy = match case.strategy {
        Strategy::KeepAlive => CortexStrategy::KeepAlive,
        Strategy::Immediate => CortexStrategy::Immediate,
        Strategy::HibernateAfterMs(ms) => CortexStrategy::HibernateAfter(Duration::from_millis(ms)),
    };
    let mut genius = match builder
        .strategy(strategy)
        .asset_authority(authority)
        .build()
    {
        Ok(genius) => genius,
        Err(err) => return Outcome::Failed(format!("cannot build the Orchestrator: {err}")),
    };
    let (mut input, rx) = mpsc::channel(16);
    let (tx, mut output) = mpsc::channel(256);
    let running = async_std::task::spawn(async move { genius.run(rx, tx).await });

    let mut failures = Vec::new();
    let mut previous_text: Option<String> = None;
    for (index, step) in case.steps.iter().enumerate() {
        let seen = match perform(step, &model_name, &scratch, &mut input, &mut output).await {
            Ok(seen) => seen,
            Err(err) => {
                failures.push(format!("step {} ({}): {err}", index + 1, describe(step)));
                break;
            }
        };
        let problems = check_step(&step.expect, &seen, previous_text.as_deref());
        if !problems.is_empty() {
            failures.push(format!(
                "step {} ({}):\n{}",
                index + 1,
                describe(step),
                problems.join("\n")
            ));
        }
        if step.infer.is_some() {
            previous_text = Some(seen.text.clone());
        }
    }
    let _ = input.send(BrainstemInput::Shutdown).await;
    drop(output);
    let _ = async_std::future::timeout(Duration::from_secs(30), running).await;
    if failures.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed(failures.join("\n"))
    }
}

#[cfg(feature = "llama")]
fn llama_builder() -> Option<rusty_genius::stem::OrchestratorBuilder> {
    use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
    let options = LlamaOptions {
        context_size: 2048,
        ..LlamaOptions::from_env()
    };
    Some(Orchestrator::builder().engine(move || LlamaEngine::new(options.clone())))
}

#[cfg(not(feature = "llama"))]
fn llama_builder() -> Option<rusty_genius::stem::OrchestratorBuilder> {
    None
}

fn describe(step: &Step) -> String {
    if let Some(load) = &step.load {
        format!("load {load:?}")
    } else if let Some(prompt) = &step.infer {
        format!("infer {prompt:?}")
    } else if let Some(ms) = step.wait_ms {
        format!("wait {ms} ms")
    } else {
        "empty step".into()
    }
}

/// Sends the step's input and collects its outputs.
async fn perform(
    step: &Step,
    model: &str,
    scratch: &Scratch,
    input: &mut mpsc::Sender<BrainstemInput>,
    output: &mut mpsc::Receiver<BrainstemOutput>,
) -> Result<Seen, String> {
    let mut seen = Seen::default();
    let send_failed = |_| "the Orchestrator stopped taking input".to_owned();
    if let Some(load) = &step.load {
        let name = match load.as_str() {
            "$model" => model.to_owned(),
            "$not_gguf" => {
                let path = scratch.0.join("notes.gguf");
                std::fs::write(&path, "these are notes, not weights").map_err(|e| e.to_string())?;
                path.display().to_string()
            }
            other => other.to_owned(),
        };
        input
            .send(BrainstemInput::LoadModel(name))
            .await
            .map_err(send_failed)?;
        collect(
            output,
            &mut seen,
            |o| {
                matches!(
                    o,
                    BrainstemOutput::Status(rusty_genius::core::protocol::EngineStatus::Loaded(_))
                        | BrainstemOutput::Error(_)
                )
            },
            None,
            input,
        )
        .await?;
        // A failed load reports Unloaded right after its error.
        drain(output, &mut seen, Duration::from_millis(100)).await;
    } else if let Some(prompt) = &step.infer {
        let config = step.config.clone().unwrap_or_default();
        input
            .send(BrainstemInput::Infer {
                prompt: prompt.clone(),
                config,
            })
            .await
            .map_err(send_failed)?;
        collect(
            output,
            &mut seen,
            |o| {
                matches!(
                    o,
                    BrainstemOutput::Event(InferenceEvent::Complete) | BrainstemOutput::Error(_)
                )
            },
            step.stop_after,
            input,
        )
        .await?;
    } else if let Some(ms) = step.wait_ms {
        drain(output, &mut seen, Duration::from_millis(ms)).await;
    }
    Ok(seen)
}

/// Reads outputs until `done` holds for one, sending `Stop` after
/// `stop_after` content events.
async fn collect(
    output: &mut mpsc::Receiver<BrainstemOutput>,
    seen: &mut Seen,
    done: impl Fn(&BrainstemOutput) -> bool,
    stop_after: Option<usize>,
    input: &mut mpsc::Sender<BrainstemInput>,
) -> Result<(), String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut stopped = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = async_std::future::timeout(left, output.next())
            .await
            .map_err(|_| format!("no end within {STEP_TIMEOUT:?}; saw {}", seen.event_list()))?
            .ok_or("the Orchestrator closed its output")?;
        let finished = done(&next);
        seen.record(next);
        if !stopped && stop_after.is_some_and(|n| seen.content_events >= n) {
            stopped = true;
            input
                .send(BrainstemInput::Stop)
                .await
                .map_err(|_| "cannot send Stop")?;
        }
        if finished {
            return Ok(());
        }
    }
}

/// Collects whatever arrives within `period`.
async fn drain(output: &mut mpsc::Receiver<BrainstemOutput>, seen: &mut Seen, period: Duration) {
    let deadline = Instant::now() + period;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match async_std::future::timeout(left, output.next()).await {
            Ok(Some(message)) => seen.record(message),
            _ => return,
        }
    }
}
