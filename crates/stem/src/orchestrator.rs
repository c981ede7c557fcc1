//! The Orchestrator: an actor that owns the engine and its lifecycle.
//!
//! One `next_event` holds the only `select!` (user input, engine reports,
//! asset progress, the hibernation timer); one `handle_event` decides. The
//! engine runs on its own thread, so the loop stays responsive while it
//! generates: `Stop` takes effect within a token.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use facecrab::AssetAuthority;
use futures::channel::mpsc;
use futures::future::{self, Either};
use futures::{FutureExt, SinkExt, StreamExt};
use rusty_genius_core::protocol::{
    AssetEvent, BrainstemInput, BrainstemOutput, EngineStatus, InferenceEvent,
};
use rusty_genius_core::{GeniusError, InferenceConfig};
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
            None => AssetAuthority::new().map_err(|err| GeniusError::Asset(err.to_string()))?,
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
    /// generation in progress).
    pub async fn run(
        &mut self,
        input: mpsc::Receiver<BrainstemInput>,
        output: mpsc::Sender<BrainstemOutput>,
    ) {
        let (engine, reports) = match EngineThread::spawn(self.factory.clone()) {
            Ok(spawned) => spawned,
            Err(err) => {
                let mut output = output;
                let _ = output.send(BrainstemOutput::Error(err.to_string())).await;
                return;
            }
        };
        let (asset_tx, asset_rx) = mpsc::unbounded();
        let mut stem = Brainstem {
            strategy: self.strategy,
            authority: self.authority.clone(),
            engine,
            reports,
            input: Some(input),
            output,
            asset_tx,
            asset_rx,
            state: State::Unloaded { hibernated: None },
            queue: VecDeque::new(),
        };
        while let Some(event) = stem.next_event().await {
            if stem.handle_event(event).await.is_err() {
                break;
            }
        }
        stem.engine.unload();
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
        prompt: String,
        config: InferenceConfig,
    },
}

enum Event {
    Input(Option<BrainstemInput>),
    Engine(Option<EngineReport>),
    Asset(AssetEvent),
    Hibernate,
}

/// The loop must end: `Shutdown` was received, the output receiver is gone,
/// or the engine thread died.
struct Halt;

struct Brainstem {
    strategy: CortexStrategy,
    authority: Arc<AssetAuthority>,
    engine: EngineThread,
    reports: mpsc::UnboundedReceiver<EngineReport>,
    /// `None` once the user closed it.
    input: Option<mpsc::Receiver<BrainstemInput>>,
    output: mpsc::Sender<BrainstemOutput>,
    asset_tx: mpsc::UnboundedSender<AssetEvent>,
    asset_rx: mpsc::UnboundedReceiver<AssetEvent>,
    state: State,
    queue: VecDeque<Request>,
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
        futures::select_biased! {
            input = input.fuse() => Some(Event::Input(input)),
            report = self.reports.next() => Some(Event::Engine(report)),
            asset = self.asset_rx.select_next_some() => Some(Event::Asset(asset)),
            () = timer.fuse() => Some(Event::Hibernate),
        }
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
            Event::Input(Some(BrainstemInput::Shutdown)) => {
                self.cancel_generation();
                return Err(Halt);
            }
            Event::Input(Some(BrainstemInput::LoadModel(name))) => {
                self.queue.push_back(Request::Load(name))
            }
            Event::Input(Some(BrainstemInput::Infer { prompt, config })) => {
                self.queue.push_back(Request::Infer { prompt, config })
            }
            Event::Input(Some(other)) => {
                self.emit(BrainstemOutput::Error(format!(
                    "unsupported request {other:?}"
                )))
                .await?
            }
            Event::Engine(None) => {
                self.emit(BrainstemOutput::Error(GeniusError::EngineGone.to_string()))
                    .await?;
                return Err(Halt);
            }
            Event::Engine(Some(report)) => self.on_engine_report(report).await?,
            Event::Asset(event) => self.on_asset_event(event).await?,
            Event::Hibernate => {
                if let State::Loaded { model, .. } = &self.state {
                    let model = model.clone();
                    log::info!("hibernating {} after idle time", model.name);
                    self.engine.unload();
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
                Request::Infer { prompt, config } => self.start_infer(prompt, config).await?,
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
        // Anything else is facecrab's to resolve (and maybe download).
        let events = self.authority.ensure_model_stream(&name);
        let forward = self.asset_tx.clone();
        rt::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                if forward.unbounded_send(event).is_err() {
                    break;
                }
            }
        });
        self.state = State::Resolving { name };
        Ok(())
    }

    async fn load(&mut self, model: Model) -> Result<(), Halt> {
        self.engine.load(model.name.clone(), model.path.clone());
        let status = EngineStatus::Loading(model.name.clone());
        self.state = State::Loading { model };
        self.emit(BrainstemOutput::Status(status)).await
    }

    async fn start_infer(&mut self, prompt: String, config: InferenceConfig) -> Result<(), Halt> {
        if prompt.trim().is_empty() {
            return self.fail(GeniusError::EmptyPrompt).await;
        }
        if let Err(err) = config.validate() {
            return self.fail(err).await;
        }
        match std::mem::replace(&mut self.state, State::Unloaded { hibernated: None }) {
            State::Loaded { model, .. } => {
                let cancel = self.engine.infer(prompt, config);
                self.state = State::Inferring { model, cancel };
                self.emit(BrainstemOutput::Event(InferenceEvent::ProcessStart))
                    .await
            }
            State::Unloaded {
                hibernated: Some(model),
            } => {
                // Wake up: reload, then run this request.
                self.queue.push_front(Request::Infer { prompt, config });
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
                        self.engine.unload();
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

    async fn on_asset_event(&mut self, event: AssetEvent) -> Result<(), Halt> {
        self.emit(BrainstemOutput::Asset(event.clone())).await?;
        let State::Resolving { name } = &self.state else {
            return Ok(());
        };
        let name = name.clone();
        match event {
            AssetEvent::Complete(path) => {
                let model = Model {
                    name,
                    path: PathBuf::from(path),
                };
                self.load(model).await
            }
            AssetEvent::Error(message) => {
                self.state = State::Unloaded { hibernated: None };
                self.fail(GeniusError::Asset(message)).await
            }
            _ => Ok(()),
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
        self.emit(BrainstemOutput::Error(err.to_string())).await
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
