//! The engine's own thread.
//!
//! Engines block while they compute, and llama.cpp's context must stay on
//! one thread. `EngineThread` owns an engine on a dedicated OS thread, takes
//! commands through a channel and reports through an async channel, so the
//! KV cache lives across requests and no method of the handle blocks: not
//! the commands, not dropping it, not waiting for it to end
//! ([`EngineThread::shutdown`] is a future).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::channel::oneshot;
use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, Usage};
use rusty_genius_core::{ErrorReport, GeniusError, InferenceConfig, Prompt};

use crate::engine::{Engine, Output};

/// Creates an engine. Called on the engine thread, so the engine itself
/// need not be `Send`.
pub type EngineFactory = Arc<dyn Fn() -> Result<Box<dyn Engine>, GeniusError> + Send + Sync>;

/// What the engine thread reports, in the order it happens.
#[derive(Debug)]
#[non_exhaustive]
pub enum EngineReport {
    /// A `load` finished.
    Loaded(Result<ModelInfo, GeniusError>),
    /// An event of the running inference.
    Event(InferenceEvent),
    /// The running inference ended.
    Finished(Result<Usage, GeniusError>),
}

enum Command {
    Load {
        name: String,
        path: PathBuf,
    },
    Unload,
    Infer {
        prompt: Prompt,
        config: Box<InferenceConfig>,
        cancel: CancelToken,
    },
}

/// Ends a running inference early when [`cancel`](Self::cancel)led.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the inference to stop; it ends within one token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// An engine running on a thread of its own.
///
/// Commands are carried out in order. Dropping the handle lets the thread
/// finish its current command, unload and exit in the background; the drop
/// itself returns at once. To wait for the thread to be gone (its model
/// freed), await [`shutdown`](Self::shutdown) instead.
pub struct EngineThread {
    commands: Option<mpsc::Sender<Command>>,
    /// Fires (or is dropped) when the thread has unloaded and is exiting.
    exited: Option<oneshot::Receiver<()>>,
}

impl EngineThread {
    /// Starts the thread; `factory` creates the engine on it. Reports
    /// arrive on the returned receiver.
    pub fn spawn(
        factory: EngineFactory,
    ) -> Result<(Self, UnboundedReceiver<EngineReport>), GeniusError> {
        let (commands, inbox) = mpsc::channel();
        let (reports, receiver) = unbounded();
        let (exiting, exited) = oneshot::channel();
        // Never joined: `shutdown` waits for `exiting` instead, so no async
        // caller ever blocks on the thread.
        let _detached: JoinHandle<()> = std::thread::Builder::new()
            .name("genius-engine".into())
            .spawn(move || {
                serve(factory, inbox, reports);
                let _ = exiting.send(());
            })?;
        Ok((
            Self {
                commands: Some(commands),
                exited: Some(exited),
            },
            receiver,
        ))
    }

    /// Lets the thread finish its current command (a running inference
    /// should be cancelled first), unload the model and exit; completes
    /// when it has. Awaiting this never blocks the executor.
    pub fn shutdown(mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.commands = None;
        let exited = self.exited.take();
        async move {
            if let Some(exited) = exited {
                // Err means the thread dropped the sender: it is gone too.
                let _ = exited.await;
            }
        }
    }

    /// Loads a model; answered by [`EngineReport::Loaded`].
    pub fn load(&self, name: impl Into<String>, path: impl Into<PathBuf>) {
        self.send(Command::Load {
            name: name.into(),
            path: path.into(),
        });
    }

    /// Unloads the model. Not answered.
    pub fn unload(&self) {
        self.send(Command::Unload);
    }

    /// Starts an inference (of a text or a conversation); answered by
    /// [`EngineReport::Event`]s and one [`EngineReport::Finished`]. The
    /// token stops it early.
    pub fn infer(&self, prompt: impl Into<Prompt>, config: InferenceConfig) -> CancelToken {
        let cancel = CancelToken::default();
        self.send(Command::Infer {
            prompt: prompt.into(),
            config: Box::new(config),
            cancel: cancel.clone(),
        });
        cancel
    }

    fn send(&self, command: Command) {
        // If the thread is gone, the report channel is closed too, which
        // is how the owner learns of it.
        if let Some(commands) = &self.commands {
            let _ = commands.send(command);
        }
    }
}

fn serve(
    factory: EngineFactory,
    inbox: mpsc::Receiver<Command>,
    reports: UnboundedSender<EngineReport>,
) {
    // Every command fails with the reason the engine could not start.
    let mut engine = match catch_unwind(AssertUnwindSafe(|| factory())) {
        Ok(result) => result.map_err(|err| err.report()),
        Err(panic) => Err(GeniusError::engine(format!(
            "the engine panicked while starting: {}",
            panic_message(&panic)
        ))
        .report()),
    };
    if let Err(err) = &engine {
        log::error!("{err}");
    }
    let not_started =
        |err: &ErrorReport| GeniusError::engine_from("the engine could not start", err.clone());
    for command in inbox {
        let report = match command {
            Command::Load { name, path } => EngineReport::Loaded(match &mut engine {
                Ok(engine) => guarded(engine.as_mut(), |engine| engine.load(&name, &path)),
                Err(err) => Err(not_started(err)),
            }),
            Command::Unload => {
                if let Ok(engine) = &mut engine {
                    let _ = guarded(engine.as_mut(), |engine| {
                        engine.unload();
                        Ok(())
                    });
                }
                continue;
            }
            Command::Infer {
                prompt,
                config,
                cancel,
            } => EngineReport::Finished(match &mut engine {
                Ok(engine) => guarded(engine.as_mut(), |engine| {
                    let mut sink =
                        |event| reports.unbounded_send(EngineReport::Event(event)).is_ok();
                    let cancelled = || cancel.is_cancelled();
                    let mut output = Output::new(&config, &mut sink, &cancelled);
                    let result = engine.infer(&prompt, &config, &mut output);
                    output.finish();
                    result.map(|mut usage| {
                        let ended_by_model = matches!(
                            usage.finish_reason,
                            FinishReason::EndOfGeneration | FinishReason::StopSequence
                        );
                        if output.tool_calls() > 0 && ended_by_model {
                            usage.finish_reason = FinishReason::ToolCalls;
                        }
                        usage
                    })
                }),
                Err(err) => Err(not_started(err)),
            }),
        };
        if reports.unbounded_send(report).is_err() {
            break;
        }
    }
    if let Ok(engine) = &mut engine {
        let _ = guarded(engine.as_mut(), |engine| {
            engine.unload();
            Ok(())
        });
    }
}

/// Runs `work`, turning a panic into an error and unloading the engine,
/// whose state can no longer be trusted.
fn guarded<T>(
    engine: &mut dyn Engine,
    work: impl FnOnce(&mut dyn Engine) -> Result<T, GeniusError>,
) -> Result<T, GeniusError> {
    match catch_unwind(AssertUnwindSafe(|| work(&mut *engine))) {
        Ok(result) => result,
        Err(panic) => {
            let message = format!("the engine panicked: {}", panic_message(&panic));
            log::error!("{message}");
            let _ = catch_unwind(AssertUnwindSafe(|| engine.unload()));
            Err(GeniusError::engine(message))
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
