//! Running one case through a fresh Orchestrator.

use std::time::Duration;

use facecrab::testing::{TempDir, TestHub, TestModel, GEMMA, QWEN};
use facecrab::AssetAuthority;
use rusty_genius::core::protocol::BrainstemInput;
use rusty_genius::cortex::Pinky;
use rusty_genius::stem::testing::{Reply, TestClient};
use rusty_genius::{CortexStrategy, Orchestrator};

use crate::case::{Case, Step, Strategy};
use crate::check::{check_margins, check_step, deciding_bytes, expects_json, expects_text};
use crate::{Engine, Outcome};

/// No step may take longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// The models real-model cases can run on, served by the loopback Hub.
const MODELS: [TestModel; 2] = [GEMMA, QWEN];

/// Where the harness finds what it needs.
#[derive(Debug, Clone)]
pub struct Env {
    /// The base test model's file (`GENIUS_TEST_MODEL`).
    pub model_file: Option<std::path::PathBuf>,
    /// The chat test model's file (`GENIUS_TEST_CHAT_MODEL`).
    pub chat_model_file: Option<std::path::PathBuf>,
    /// Under CI a missing model fails a case instead of skipping it.
    pub ci: bool,
}

impl Env {
    /// From `GENIUS_TEST_MODEL`, `GENIUS_TEST_CHAT_MODEL` and `CI`.
    pub fn from_env() -> Self {
        Self {
            model_file: GEMMA.local_file(),
            chat_model_file: QWEN.local_file(),
            ci: std::env::var("CI").is_ok_and(|v| v == "true"),
        }
    }

    fn file_of(&self, model: &TestModel) -> Option<&std::path::PathBuf> {
        if model.repo == GEMMA.repo {
            self.model_file.as_ref()
        } else {
            self.chat_model_file.as_ref()
        }
    }
}

/// The margins of the tokens that decided one step's expected text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Measured {
    /// The step's number, from 1.
    pub step: usize,
    /// Each deciding token, in order: its text, its margin in logits over
    /// the runner-up, and the runner-up's text.
    pub tokens: Vec<(String, f32, String)>,
}

impl Measured {
    /// The smallest margin of the step (infinite without tokens).
    pub fn min_margin(&self) -> f32 {
        self.tokens
            .iter()
            .map(|(_, margin, _)| *margin)
            .fold(f32::INFINITY, f32::min)
    }
}

/// Runs `case` on `engine`.
pub async fn run_case(case: &Case, engine: &Engine, env: &Env) -> Outcome {
    run_case_measured(case, engine, env).await.0
}

/// Runs `case` on `engine`, also returning the margins measured on every
/// greedy real-model step that expects text.
pub async fn run_case_measured(
    case: &Case,
    engine: &Engine,
    env: &Env,
) -> (Outcome, Vec<Measured>) {
    let mut measured = Vec::new();
    let outcome = run(case, engine, env, &mut measured).await;
    (outcome, measured)
}

async fn run(case: &Case, engine: &Engine, env: &Env, measured: &mut Vec<Measured>) -> Outcome {
    let scratch = TempDir::new("teaser");
    let hub = match TestHub::start() {
        Ok(hub) => hub,
        Err(err) => return Outcome::Failed(format!("cannot start the loopback Hub: {err}")),
    };
    let (builder, model_name) = match engine {
        Engine::Pinky => {
            let stand_in = scratch.join("pinky.gguf");
            std::fs::write(&stand_in, b"GGUF pinky").expect("write the stand-in model");
            let mut pinky =
                Pinky::new().with_token_delay(Duration::from_millis(case.token_delay_ms));
            if let Some(script) = &case.script {
                let repeat = case.script_repeat.unwrap_or(1);
                pinky = pinky.with_script(script.iter().cycle().take(script.len() * repeat));
            }
            if let Some(replies) = &case.replies {
                pinky = pinky.with_replies(replies.clone());
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
            let Some(model) = MODELS
                .iter()
                .find(|model| name.starts_with(&format!("{}:", model.repo)))
            else {
                return Outcome::Skipped(format!("no local copy of {name} to serve"));
            };
            let file = match env.file_of(model) {
                Some(file) if file.is_file() => file.clone(),
                _ => {
                    let why = format!(
                        "{} does not name the model file (run .ci/fetch-model.sh)",
                        model.env
                    );
                    return if env.ci {
                        Outcome::Failed(format!("{why}; CI must run every real-model case"))
                    } else {
                        Outcome::Skipped(why)
                    };
                }
            };
            if let Err(err) = hub.add_file(model.repo, model.file, &file, Some(model.sha256)) {
                return Outcome::Failed(format!("cannot serve the model: {err}"));
            }
            (builder, name.clone())
        }
    };
    let authority = AssetAuthority::builder()
        .endpoint(hub.endpoint())
        .cache_dir(scratch.join("hub"))
        .registry_file(scratch.join("registry.json"))
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
    let genius = match builder
        .strategy(strategy)
        .asset_authority(authority)
        .build()
    {
        Ok(genius) => genius,
        Err(err) => return Outcome::Failed(format!("cannot build the Orchestrator: {err}")),
    };
    let mut client = TestClient::start(genius).with_timeout(STEP_TIMEOUT);
    let real_model = matches!(engine, Engine::Model(_));

    let mut failures = Vec::new();
    let mut previous_text: Option<String> = None;
    for (index, step) in case.steps.iter().enumerate() {
        let label = format!("step {} ({})", index + 1, describe(step));
        let asks = step.infer.is_some() || step.chat.is_some();
        let measure = real_model && asks && expects_text(&step.expect);
        if measure {
            if let Some(problem) = unmeasurable(step) {
                failures.push(format!("{label}: {problem}"));
                break;
            }
        }
        let seen = match perform(step, &model_name, &scratch, &mut client, measure).await {
            Ok(seen) => seen,
            Err(err) => {
                failures.push(format!("{label}: {err}"));
                break;
            }
        };
        let mut problems = check_step(&step.expect, &seen, previous_text.as_deref());
        if measure {
            problems.extend(check_margins(&step.expect, &seen));
            let bytes = deciding_bytes(&step.expect, &seen.text);
            let margins = if expects_json(&step.expect) {
                seen.json_margins_through(bytes)
            } else {
                seen.margins_through(bytes)
            };
            let tokens = margins
                .into_iter()
                .zip(&seen.logprobs)
                .map(|((token, margin), logprobs)| {
                    let runner_up = logprobs.top_logprobs.get(1).map(|t| t.token.clone());
                    (token, margin, runner_up.unwrap_or_default())
                })
                .collect();
            measured.push(Measured {
                step: index + 1,
                tokens,
            });
        }
        if !problems.is_empty() {
            failures.push(format!("{label}:\n{}", problems.join("\n")));
        }
        if asks {
            previous_text = Some(seen.text.clone());
        }
    }
    if let Err(err) = client.shutdown().await {
        failures.push(format!("shutting down: {err}"));
    }
    if failures.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed(failures.join("\n"))
    }
}

/// Why a real-model step's expected text cannot be checked for
/// portability: only a greedy choice from the model's own distribution has
/// a margin to measure.
fn unmeasurable(step: &Step) -> Option<String> {
    let config = step.config.clone().unwrap_or_default();
    if config.temperature != 0.0 {
        return Some(
            "a real model's text may be expected only at temperature 0 (sampled text depends on \
             the CPU's rounding in ways no margin shows); compare sampled runs with \
             `same_as_previous` instead"
                .into(),
        );
    }
    if config.repetition_penalty != 1.0 {
        return Some(
            "expected text needs repetition_penalty 1.0: with a penalty the model's margins do \
             not show how firmly each token was chosen"
                .into(),
        );
    }
    None
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
    } else if let Some(messages) = &step.chat {
        let last = messages
            .last()
            .and_then(|m| m.content.clone())
            .unwrap_or_default();
        format!("chat of {} messages, last {last:?}", messages.len())
    } else if let Some(ms) = step.wait_ms {
        format!("wait {ms} ms")
    } else {
        "empty step".into()
    }
}

/// Sends the step's input and collects its outputs. With `measure`, the
/// request also asks for the top two log-probabilities of each token.
async fn perform(
    step: &Step,
    model: &str,
    scratch: &TempDir,
    client: &mut TestClient,
    measure: bool,
) -> Result<Reply, String> {
    if let Some(load) = &step.load {
        let name = match load.as_str() {
            "$model" => model.to_owned(),
            "$not_gguf" => {
                let path = scratch.join("notes.gguf");
                std::fs::write(&path, "these are notes, not weights").map_err(|e| e.to_string())?;
                path.display().to_string()
            }
            other => other.to_owned(),
        };
        let mut seen = client.load(&name).await.map_err(|e| e.to_string())?;
        // A failed load reports Unloaded right after its error.
        for output in client.gather_for(Duration::from_millis(100)).await.outputs {
            seen.record(output);
        }
        Ok(seen)
    } else if step.infer.is_some() || step.chat.is_some() {
        let mut config = step.config.clone().unwrap_or_default();
        if measure {
            config.logprobs = true;
            config.top_logprobs = config.top_logprobs.max(2);
        }
        let input = match (&step.infer, &step.chat) {
            (Some(prompt), _) => BrainstemInput::Infer {
                prompt: prompt.clone(),
                config,
            },
            (None, Some(messages)) => BrainstemInput::Chat {
                messages: messages.clone(),
                config,
            },
            (None, None) => unreachable!("checked above"),
        };
        client.send(input).await.map_err(|e| e.to_string())?;
        client
            .read_until(Reply::ends_request, step.stop_after)
            .await
            .map_err(|e| e.to_string())
    } else if let Some(ms) = step.wait_ms {
        Ok(client.gather_for(Duration::from_millis(ms)).await)
    } else {
        Ok(Reply::default())
    }
}
