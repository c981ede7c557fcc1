//! The Orchestrator: an actor that owns the engine and its lifecycle.
//!
//! One `next_event` holds the only `select!` (user input, engine reports,
//! asset progress, the hibernation timer); one `handle_event` decides. The
//! engine runs on its own thread, so the loop stays responsive while it
//! generates: `Stop` takes effect within a token.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use facecrab::{AssetAuthority, FacecrabError};
use futures::channel::mpsc;
use futures::future::{self, Either};
use futures::{FutureExt, SinkExt, StreamExt};
use rusty_genius_core::chat::validate_messages;
use rusty_genius_core::protocol::{
    AssetEvent, BrainstemInput, BrainstemOutput, EngineStatus, InferenceEvent,
};
use rusty_genius_core::{GeniusError, InferenceConfig, Prompt};
use rusty_genius_cortex::{
    default_engine_factory, CancelToken, Engine, EngineFactory, EngineReport, EngineThread, Pinky,
};

use crate::rt;
use crate::CortexStrategy;

/// Runs inference requests against one engine, loading, hibernating and
/// reloading its model as the [`CortexStrategy`] says.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::channel::mpsc;
/// use rusty_genius_stem::Orchestrator;
///
/// let mut genius = Orchestrator::new().await?;
/// let (input, rx) = mpsc::channel(16);
/// let (tx, output) = mpsc::channel(64);
/// async_std::task::spawn(async move { genius.run(rx, tx).await });
/// # drop((input, output)); Ok(()) }
/// ```
pub struct Orchestrator {
    strategy: CortexStrategy,
    factory: EngineFactory,
    authority: Arc<AssetAuthority>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

/// Chooses the strategy, engine and asset authority of an [`Orchestrator`].
pub struct OrchestratorBuilder {
    strategy: CortexStrategy,
    factory: Option<EngineFactory>,
    authority: Option<AssetAuthority>,
}

impl OrchestratorBuilder {
    /// Sets when the model is unloaded. Default:
    /// `HibernateAfter(5 minutes)`.
    pub fn strategy(mut self, strategy: CortexStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the engine, by a function that creates it. The function runs
    /// on the engine's own thread, so the engine need not be `Send`.
    /// Default: llama.cpp with options from the environment.
    pub fn engine<E, F>(mut self, create: F) -> Self
    where
        E: Engine + 'static,
        F: Fn() -> Result<E, GeniusError> + Send + Sync + 'static,
    {
        self.factory = Some(Arc::new(move || {
            create().map(|e| Box::new(e) as Box<dyn Engine>)
        }));
        self
    }

    /// Uses this [`Pinky`] stub as the engine.
    pub fn pinky(self, pinky: Pinky) -> Self {
        self.engine(move || Ok(pinky.clone()))
    }

    /// Sets the asset authority that resolves model names.
    pub fn asset_authority(mut self, authority: AssetAuthority) -> Self {
        self.authority = Some(authority);
        self
    }

    /// Creates the Orchestrator.
    pub fn build(self) -> Result<Orchestrator, GeniusError> {
        let authority = match self.authority {
            Some(authority) => authority,
            None => AssetAuthority::new().map_err(|err| GeniusError::Asset {
                name: "(none yet)".into(),
                source: Box::new(err),
            })?,
        };
        Ok(Orchestrator {
            strategy: self.strategy,
            factory: self.factory.unwrap_or_else(default_engine_factory),
            authority: Arc::new(authority),
        })
    }
}

impl Orchestrator {
    /// An Orchestrator with the default engine, asset authority and
    /// strategy (`HibernateAfter(5 minutes)`).
    pub async fn new() -> Result<Self, GeniusError> {
        Self::builder().build()
    }

    /// Starts choosing the parts of an Orchestrator.
    pub fn builder() -> OrchestratorBuilder {
        OrchestratorBuilder {
            strategy: CortexStrategy::default(),
            factory: None,
            authority: None,
        }
    }

    /// The strategy in force.
    pub fn strategy(&self) -> CortexStrategy {
        self.strategy
    }

    /// Serves requests from `input`, reporting on `output`, until
    /// `Shutdown` is received, the input is closed and all its requests
    /// are answered, or `output`'s receiver is dropped (which also stops a
    /// generation in progress). Returns once the engine has unloaded its
    /// model; the wait never blocks the executor.
    ///
    /// Nothing outlives it: a download in progress stops when it returns
    /// (or when this future is dropped), keeping what it has fetched for
    /// the next attempt to resume.
    pub async fn run(
        &mut self,
        input: mpsc::Receiver<BrainstemInput>,
        output: mpsc::Sender<BrainstemOutput>,
    ) {
        let (engine, reports) = match EngineThread::spawn(self.factory.clone()) {
            Ok(spawned) => spawned,
            Err(err) => {
                let mut output = output;
                let _ = output.send(BrainstemOutput::Error(err.report())).await;
                return;
            }
        };
        let (asset_tx, asset_rx) = mpsc::unbounded();
        let mut stem = Brainstem {
            strategy: self.strategy,
            authority: self.authority.clone(),
            engine: Some(engine),
            reports,
            input: Some(input),
            output,
            asset_tx,
            asset_rx,
            resolving: None,
            state: State::Unloaded { hibernated: None },
            queue: VecDeque::new(),
            shutting_down: false,
        };
        while let Some(event) = stem.next_event().await {
            if stem.handle_event(event).await.is_err() {
                break;
            }
        }
        // Stop any download before waiting for the engine.
        stem.resolving = None;
        if let Some(engine) = stem.engine.take() {
            engine.shutdown().await;
        }
        log::debug!("orchestrator stopped");
    }
}

/// A model known by its requested name and resolved file.
#[derive(Debug, Clone)]
struct Model {
    name: String,
    path: PathBuf,
}

#[derive(Debug)]
enum State {
    /// No model in memory; `hibernated` is the one to reload on `Infer`.
    Unloaded { hibernated: Option<Model> },
    /// facecrab is resolving (maybe downloading) this name.
    Resolving { name: String },
    /// The engine is loading this model.
    Loading { model: Model },
    /// Ready; idle since the given instant.
    Loaded { model: Model, idle_since: Instant },
    /// Generating.
    Inferring { model: Model, cancel: CancelToken },
}

#[derive(Debug)]
enum Request {
    Load(String),
    Infer {
        prompt: Prompt,
        config: Box<InferenceConfig>,
    },
}

enum Event {
    Input(Option<BrainstemInput>),
    Engine(Option<EngineReport>),
    Asset(AssetEvent),
    Resolved(Result<PathBuf, FacecrabError>),
    Hibernate,
}

/// facecrab making a model available: progress goes to `asset_tx`.
type Resolution = Pin<Box<dyn Future<Output = Result<PathBuf, FacecrabError>> + Send>>;

/// The loop must end: `Shutdown` was received, the output receiver is gone,
/// or the engine thread died.
struct Halt;

struct Brainstem {
    strategy: CortexStrategy,
    authority: Arc<AssetAuthority>,
    /// Taken only when the loop has ended, to shut it down.
    engine: Option<EngineThread>,
    reports: mpsc::UnboundedReceiver<EngineReport>,
    /// `None` once the user closed it (or sent `Shutdown`).
    input: Option<mpsc::Receiver<BrainstemInput>>,
    output: mpsc::Sender<BrainstemOutput>,
    asset_tx: mpsc::UnboundedSender<AssetEvent>,
    asset_rx: mpsc::UnboundedReceiver<AssetEvent>,
    /// The name being resolved (in `State::Resolving`), polled by the loop
    /// itself: dropping it cancels the download.
    resolving: Option<Resolution>,
    state: State,
    queue: VecDeque<Request>,
    /// `Shutdown` was received: finish the running request, then stop.
    shutting_down: bool,
}

impl Brainstem {
    /// Waits for the next thing to react to; `None` when the loop is done.
    async fn next_event(&mut self) -> Option<Event> {
        let idle = matches!(self.state, State::Unloaded { .. } | State::Loaded { .. });
        if self.input.is_none() && idle && self.queue.is_empty() {
            return None;
        }
        let timer = match self.hibernation_deadline() {
            Some(deadline) => Either::Left(rt::sleep_until(deadline)),
            None => Either::Right(future::pending()),
        };
        let input = match &mut self.input {
            Some(input) => Either::Left(input.next()),
            None => Either::Right(future::pending()),
        };
        let resolved = match &mut self.resolving {
            Some(resolution) => Either::Left(resolution.as_mut()),
            None => Either::Right(future::pending()),
        };
        // Progress before the result it leads to; input first, so `Stop`
        // is never stuck behind a stream of tokens.
        futures::select_biased! {
            input = input.fuse() => Some(Event::Input(input)),
            report = self.reports.next() => Some(Event::Engine(report)),
            asset = self.asset_rx.select_next_some() => Some(Event::Asset(asset)),
            result = resolved.fuse() => Some(Event::Resolved(result)),
            () = timer.fuse() => Some(Event::Hibernate),
        }
    }

    fn engine(&self) -> &EngineThread {
        self.engine
            .as_ref()
            .expect("the engine is taken only after the loop")
    }

    fn hibernation_deadline(&self) -> Option<Instant> {
        match (&self.state, self.strategy) {
            (State::Loaded { idle_since, .. }, CortexStrategy::HibernateAfter(ttl))
                if self.queue.is_empty() =>
            {
                Some(*idle_since + ttl)
            }
            _ => None,
        }
    }

    async fn handle_event(&mut self, event: Event) -> Result<(), Halt> {
        match event {
            Event::Input(None) => self.input = None,
            Event::Input(Some(BrainstemInput::Stop)) => self.cancel_generation(),
            Event::Input(Some(BrainstemInput::Shutdown)) => return self.shut_down().await,
            Event::Input(Some(BrainstemInput::LoadModel(name))) => {
                self.queue.push_back(Request::Load(name))
            }
            Event::Input(Some(BrainstemInput::Infer { prompt, config })) => {
                self.queue.push_back(Request::Infer {
                    prompt: Prompt::Text(prompt),
                    config: Box::new(config),
                })
            }
            Event::Input(Some(BrainstemInput::Chat { messages, config })) => {
                self.queue.push_back(Request::Infer {
                    prompt: Prompt::Chat(messages),
                    config: Box::new(config),
                })
            }
            Event::Input(Some(other)) => {
                let err = GeniusError::invalid_request(
                    "input",
                    format!("this Orchestrator does not support {other:?}"),
                );
                self.fail(err).await?
            }
            Event::Engine(None) => {
                self.fail(GeniusError::EngineGone).await?;
                return Err(Halt);
            }
            Event::Engine(Some(report)) => self.on_engine_report(report).await?,
            Event::Asset(event) => self.emit(BrainstemOutput::Asset(event)).await?,
            Event::Resolved(result) => {
                self.resolving = None;
                // Progress reported in the poll that finished the work is
                // still queued: it goes first.
                while let Ok(event) = self.asset_rx.try_recv() {
                    self.emit(BrainstemOutput::Asset(event)).await?;
                }
                self.on_resolved(result).await?
            }
            Event::Hibernate => {
                if let State::Loaded { model, .. } = &self.state {
                    let model = model.clone();
                    log::info!("hibernating {} after idle time", model.name);
                    self.engine().unload();
                    self.emit(BrainstemOutput::Status(EngineStatus::Hibernated(
                        model.name.clone(),
                    )))
                    .await?;
                    self.state = State::Unloaded {
                        hibernated: Some(model),
                    };
                }
            }
        }
        self.pump().await
    }

    /// Starts queued requests while the engine is free.
    async fn pump(&mut self) -> Result<(), Halt> {
        while matches!(self.state, State::Unloaded { .. } | State::Loaded { .. }) {
            let Some(request) = self.queue.pop_front() else {
                break;
            };
            match request {
                Request::Load(name) => self.start_load(name).await?,
                Request::Infer { prompt, config } => self.start_infer(prompt, *config).await?,
            }
        }
        Ok(())
    }

    async fn start_load(&mut self, name: String) -> Result<(), Halt> {
        if let State::Loaded { model, .. } = &self.state {
            if model.name == name {
                let status = EngineStatus::Loaded(name);
                return self.emit(BrainstemOutput::Status(status)).await;
            }
        }
        let path = Path::new(&name);
        if path.is_file() {
            let model = Model {
                path: path.to_path_buf(),
                name,
            };
            return self.load(model).await;
        }
        // Anything else is facecrab's to resolve (and maybe download),
        // polled by this loop, so it ends with it.
        let authority = self.authority.clone();
        let progress = self.asset_tx.clone();
        let requested = name.clone();
        self.resolving = Some(Box::pin(async move {
            let mut report = move |event| {
                let _ = progress.unbounded_send(event);
            };
            authority.ensure_model_with(&requested, &mut report).await
        }));
        self.state = State::Resolving { name };
        Ok(())
    }

    async fn load(&mut self, model: Model) -> Result<(), Halt> {
        self.engine().load(model.name.clone(), model.path.clone());
        let status = EngineStatus::Loading(model.name.clone());
        self.state = State::Loading { model };
        self.emit(BrainstemOutput::Status(status)).await
    }

    async fn start_infer(&mut self, prompt: Prompt, config: InferenceConfig) -> Result<(), Halt> {
        let checked = match &prompt {
            Prompt::Text(text) if text.trim().is_empty() => Err(GeniusError::EmptyPrompt),
            Prompt::Text(_) => Ok(()),
            Prompt::Chat(messages) => validate_messages(messages),
        };
        if let Err(err) = checked.and_then(|()| config.validate()) {
            return self.fail(err).await;
        }
        match std::mem::replace(&mut self.state, State::Unloaded { hibernated: None }) {
            State::Loaded { model, .. } => {
                let cancel = self.engine().infer(prompt, config);
                self.state = State::Inferring { model, cancel };
                self.emit(BrainstemOutput::Event(InferenceEvent::ProcessStart))
                    .await
            }
            State::Unloaded {
                hibernated: Some(model),
            } => {
                // Wake up: reload, then run this request.
                self.queue.push_front(Request::Infer {
                    prompt,
                    config: Box::new(config),
                });
                self.load(model).await
            }
            state => {
                self.state = state;
                self.fail(GeniusError::NoModelLoaded).await
            }
        }
    }

    async fn on_engine_report(&mut self, report: EngineReport) -> Result<(), Halt> {
        match report {
            EngineReport::Loaded(result) => {
                let State::Loading { model } =
                    std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
                else {
                    return Ok(());
                };
                match result {
                    Ok(info) => {
                        log::info!("{} ready, context {} tokens", info.name, info.context_size);
                        let status = EngineStatus::Loaded(model.name.clone());
                        self.state = State::Loaded {
                            model,
                            idle_since: Instant::now(),
                        };
                        self.emit(BrainstemOutput::Status(status)).await
                    }
                    Err(err) => {
                        self.fail(err).await?;
                        self.emit(BrainstemOutput::Status(EngineStatus::Unloaded))
                            .await
                    }
                }
            }
            EngineReport::Event(event) => self.emit(BrainstemOutput::Event(event)).await,
            EngineReport::Finished(result) => {
                let State::Inferring { model, .. } =
                    std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
                else {
                    return Ok(());
                };
                self.state = State::Loaded {
                    model,
                    idle_since: Instant::now(),
                };
                match result {
                    Ok(usage) => {
                        self.emit(BrainstemOutput::Event(InferenceEvent::Usage(usage)))
                            .await?;
                        self.emit(BrainstemOutput::Event(InferenceEvent::Complete))
                            .await?;
                    }
                    Err(err) => self.fail(err).await?,
                }
                let next_is_infer = matches!(self.queue.front(), Some(Request::Infer { .. }));
                if self.strategy == CortexStrategy::Immediate && !next_is_infer {
                    if let State::Loaded { model, .. } =
                        std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
                    {
                        self.engine().unload();
                        let status = EngineStatus::Hibernated(model.name.clone());
                        self.state = State::Unloaded {
                            hibernated: Some(model),
                        };
                        self.emit(BrainstemOutput::Status(status)).await?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn on_resolved(&mut self, result: Result<PathBuf, FacecrabError>) -> Result<(), Halt> {
        let State::Resolving { name } =
            std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
        else {
            return Ok(());
        };
        match result {
            Ok(path) => {
                let event = AssetEvent::Complete(path.display().to_string());
                self.emit(BrainstemOutput::Asset(event)).await?;
                self.load(Model { name, path }).await
            }
            Err(err) => {
                let event = AssetEvent::Error(err.to_string());
                self.emit(BrainstemOutput::Asset(event)).await?;
                self.fail(asset_error(name, err)).await
            }
        }
    }

    /// `Shutdown`: the running generation is cancelled and still ends with
    /// its `Complete`; every request not yet started, and a load in
    /// progress, is answered with `ShutDown`. The loop ends as soon as the
    /// engine is idle.
    async fn shut_down(&mut self) -> Result<(), Halt> {
        self.shutting_down = true;
        self.input = None;
        self.cancel_generation();
        while let Some(_request) = self.queue.pop_front() {
            self.fail(GeniusError::ShutDown).await?;
        }
        match &self.state {
            State::Inferring { .. } => Ok(()),
            State::Resolving { .. } | State::Loading { .. } => {
                self.resolving = None;
                self.fail(GeniusError::ShutDown).await?;
                Err(Halt)
            }
            State::Unloaded { .. } | State::Loaded { .. } => Err(Halt),
        }
    }

    /// Ends the generation in progress, if any, within a token.
    fn cancel_generation(&self) {
        if let State::Inferring { cancel, .. } = &self.state {
            cancel.cancel();
        }
    }

    async fn fail(&mut self, err: GeniusError) -> Result<(), Halt> {
        log::warn!("{err}");
        self.emit(BrainstemOutput::Error(err.report())).await
    }

    async fn emit(&mut self, output: BrainstemOutput) -> Result<(), Halt> {
        if self.output.send(output).await.is_err() {
            // Nobody listens any more: stop generating for nobody.
            self.cancel_generation();
            return Err(Halt);
        }
        Ok(())
    }
}

/// facecrab's error as the Orchestrator reports it, kept as the source: a
/// name that leads nowhere is `ModelNotFound` (or `FileNotFound`), anything
/// else about fetching is `Asset`.
fn asset_error(name: String, err: FacecrabError) -> GeniusError {
    match err {
        FacecrabError::MissingFile { path } => GeniusError::FileNotFound { path },
        err @ (FacecrabError::NotFound { .. }
        | FacecrabError::InvalidName { .. }
        | FacecrabError::NoSingleFile { .. }) => GeniusError::ModelNotFound {
            reason: match &err {
                FacecrabError::NotFound { reason, .. } => reason.clone(),
                other => other.to_string(),
            },
            name,
            source: Some(Box::new(err)),
        },
        err => GeniusError::Asset {
            name,
            source: Box::new(err),
        },
    }
}
