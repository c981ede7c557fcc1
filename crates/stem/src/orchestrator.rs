//! The Orchestrator: an actor that owns the engine and its lifecycle.
//!
//! One `next_event` holds the only `select!` (commands from handles, engine
//! reports, download progress, the download itself, the hibernation
//! timer); one `handle_event` decides. The engine runs on its own thread
//! and sends each request's events straight to that request's stream, so
//! the loop only keeps count of what runs and stays responsive while
//! requests generate.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use facecrab::{AssetAuthority, FacecrabError};
use futures::channel::mpsc;
use futures::future::{self, Either};
use futures::{FutureExt, StreamExt};
use rusty_genius_core::chat::validate_messages;
use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{AssetEvent, BrainstemInput, BrainstemOutput, EngineStatus};
use rusty_genius_core::{ErrorReport, GeniusError, Limits, Prompt};
use rusty_genius_cortex::{
    default_engine_factory, CancelToken, Engine, EngineFactory, EngineReport, EngineThread, Output,
    Pinky, Request, RequestId,
};

use crate::handle::{Command, Listener, LoadDone, OrchestratorHandle, Submission};
use crate::rt;
use crate::strategy::CortexStrategy;

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
    limits: Limits,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("strategy", &self.strategy)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Chooses the strategy, engine and asset authority of an [`Orchestrator`].
pub struct OrchestratorBuilder {
    strategy: CortexStrategy,
    factory: Option<EngineFactory>,
    authority: Option<AssetAuthority>,
    limits: Limits,
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

    /// Sets the bounds every request is checked against before it runs
    /// (grammar and schema sizes, tools, texts to embed). Default
    /// [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
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
            limits: self.limits,
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
            limits: Limits::default(),
        }
    }

    /// The strategy in force.
    pub fn strategy(&self) -> CortexStrategy {
        self.strategy
    }

    /// Starts the Orchestrator's loop in the background and returns a
    /// handle to it, for any number of concurrent requests, each with a
    /// stream of its own (see [`OrchestratorHandle`]).
    pub fn start(&self) -> OrchestratorHandle {
        let (core, handle) = self.core();
        rt::spawn(core);
        handle
    }

    /// Serves requests from `input`, reporting on `output`, until
    /// `Shutdown` is received, the input is closed and all its requests
    /// are answered, or `output`'s receiver is dropped (which also stops a
    /// generation in progress). Returns once the engine has unloaded its
    /// model; the wait never blocks the executor.
    ///
    /// Requests sent here are answered one after another, in order, so
    /// their outputs never interleave; for requests that run together, use
    /// [`start`](Self::start) and its handle. It reads at most 64 inputs
    /// ahead of the one being answered; past that a sender waits on its
    /// own bounded channel (and a `Stop` or `Shutdown` sent behind them is
    /// read when there is room again).
    ///
    /// Nothing outlives it: a download in progress stops when it returns
    /// (or when this future is dropped), keeping what it has fetched for
    /// the next attempt to resume.
    pub async fn run(
        &mut self,
        input: mpsc::Receiver<BrainstemInput>,
        output: mpsc::Sender<BrainstemOutput>,
    ) {
        let (core, handle) = self.core();
        let channel = crate::channel::serve(handle, input, output);
        futures::join!(core, channel);
    }

    /// The loop, and a handle to it; the loop ends when every handle is
    /// dropped and nothing runs, or at `Shutdown`.
    fn core(
        &self,
    ) -> (
        impl Future<Output = ()> + Send + 'static,
        OrchestratorHandle,
    ) {
        let (commands, inbox) = mpsc::unbounded();
        let handle = OrchestratorHandle::new(commands);
        let strategy = self.strategy;
        let limits = self.limits;
        let factory = self.factory.clone();
        let authority = self.authority.clone();
        let core = async move {
            let (engine, reports) = match EngineThread::spawn(factory) {
                Ok(spawned) => spawned,
                Err(err) => {
                    log::error!("{err}");
                    fail_commands(inbox, &Arc::new(err)).await;
                    return;
                }
            };
            let (asset_tx, asset_rx) = mpsc::unbounded();
            let mut stem = Brainstem {
                strategy,
                limits,
                authority,
                engine: Some(engine),
                reports,
                commands: Some(inbox),
                listeners: Vec::new(),
                asset_tx,
                asset_rx,
                state: State::Unloaded { hibernated: None },
                queue: VecDeque::new(),
                running: HashMap::new(),
            };
            while let Some(event) = stem.next_event().await {
                stem.handle_event(event);
            }
            // Stop any download before waiting for the engine.
            stem.state = State::Unloaded { hibernated: None };
            stem.fail_queue(GeniusError::ShutDown);
            if let Some(engine) = stem.engine.take() {
                engine.shutdown().await;
            }
            log::debug!("orchestrator stopped");
        };
        (core, handle)
    }
}

/// Answers every command with `err`: the loop could not start.
async fn fail_commands(mut inbox: mpsc::UnboundedReceiver<Command>, err: &Arc<GeniusError>) {
    inbox.close();
    while let Some(command) = inbox.next().await {
        match command {
            Command::Submit(submission) => submission.fail_shared(err),
            Command::Load { done, .. } => done(Err(ErrorReport::shared(err))),
            Command::Listen(_) | Command::Shutdown => {}
        }
    }
}

/// A model known by its requested name and resolved file.
#[derive(Debug, Clone)]
struct Model {
    name: String,
    path: PathBuf,
}

enum State {
    /// No model in memory; `hibernated` is the one to reload on a request.
    Unloaded { hibernated: Option<Model> },
    /// facecrab is resolving (maybe downloading) this name; the loop
    /// polls `resolution` itself, and dropping it cancels the download.
    Resolving {
        name: String,
        resolution: Resolution,
    },
    /// The engine is loading this model.
    Loading { model: Model },
    /// Ready; idle since the given instant when nothing runs.
    Loaded {
        model: Model,
        info: ModelInfo,
        idle_since: Instant,
    },
}

/// What waits for the model: requests, and loads (which wait for the
/// requests before them to end).
enum Pending {
    Load {
        name: String,
        done: Option<LoadDone>,
    },
    Submit(Submission),
}

enum Event {
    Command(Option<Command>),
    Engine(Option<EngineReport>),
    Asset(AssetEvent),
    Resolved(Result<PathBuf, FacecrabError>),
    Hibernate,
}

/// facecrab making a model available: progress goes to `asset_tx`.
type Resolution = Pin<Box<dyn Future<Output = Result<PathBuf, FacecrabError>> + Send>>;

struct Brainstem {
    strategy: CortexStrategy,
    limits: Limits,
    authority: Arc<AssetAuthority>,
    /// Taken only when the loop has ended, to shut it down.
    engine: Option<EngineThread>,
    reports: mpsc::UnboundedReceiver<EngineReport>,
    /// `None` once every handle is gone (or at `Shutdown`).
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    /// Where status and download events go.
    listeners: Vec<Listener>,
    asset_tx: mpsc::UnboundedSender<AssetEvent>,
    asset_rx: mpsc::UnboundedReceiver<AssetEvent>,
    state: State,
    /// What waits, in order: requests wait for the model, loads for the
    /// requests before them.
    queue: VecDeque<Pending>,
    /// Requests given to the engine and not yet ended, with their cancel
    /// tokens.
    running: HashMap<RequestId, CancelToken>,
}

impl Brainstem {
    /// Waits for the next thing to react to; `None` when the loop is done.
    async fn next_event(&mut self) -> Option<Event> {
        let idle = matches!(self.state, State::Unloaded { .. } | State::Loaded { .. });
        if self.commands.is_none() && idle && self.queue.is_empty() && self.running.is_empty() {
            return None;
        }
        let timer = match self.hibernation_deadline() {
            Some(deadline) => Either::Left(rt::sleep_until(deadline)),
            None => Either::Right(future::pending()),
        };
        let commands = match &mut self.commands {
            Some(commands) => Either::Left(commands.next()),
            None => Either::Right(future::pending()),
        };
        let resolved = match &mut self.state {
            State::Resolving { resolution, .. } => Either::Left(resolution.as_mut()),
            _ => Either::Right(future::pending()),
        };
        // Progress before the result it leads to; commands first, so
        // `Shutdown` is never stuck behind engine reports.
        futures::select_biased! {
            command = commands.fuse() => Some(Event::Command(command)),
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
                if self.queue.is_empty() && self.running.is_empty() =>
            {
                Some(*idle_since + ttl)
            }
            _ => None,
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Command(None) => self.commands = None,
            Event::Command(Some(command)) => self.on_command(command),
            Event::Engine(None) => {
                // The engine thread is gone: nothing more can run.
                log::error!("{}", GeniusError::EngineGone);
                self.fail_queue(GeniusError::EngineGone);
                self.running.clear();
                self.commands = None;
                self.state = State::Unloaded { hibernated: None };
            }
            Event::Engine(Some(report)) => self.on_engine_report(report),
            Event::Asset(event) => self.broadcast(BrainstemOutput::Asset(event)),
            Event::Resolved(result) => {
                // Progress reported in the poll that finished the work is
                // still queued: it goes first.
                while let Ok(event) = self.asset_rx.try_recv() {
                    self.broadcast(BrainstemOutput::Asset(event));
                }
                self.on_resolved(result);
            }
            Event::Hibernate => {
                if let State::Loaded { model, .. } = &self.state {
                    let model = model.clone();
                    log::info!("hibernating {} after idle time", model.name);
                    self.engine().unload();
                    self.broadcast(BrainstemOutput::Status(EngineStatus::Hibernated(
                        model.name.clone(),
                    )));
                    self.state = State::Unloaded {
                        hibernated: Some(model),
                    };
                }
            }
        }
        self.pump();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            // After `Shutdown` no command is read (`commands` is gone),
            // so whatever arrives here is served.
            Command::Submit(submission) => self.queue.push_back(Pending::Submit(submission)),
            Command::Load { name, done } => {
                self.queue.push_back(Pending::Load {
                    name,
                    done: Some(done),
                });
            }
            Command::Listen(listener) => self.listeners.push(listener),
            Command::Shutdown => self.shut_down(),
        }
    }

    /// `Shutdown`: running requests are cancelled (each still ends with
    /// its `Complete`), everything queued is answered with `ShutDown`, and
    /// the loop ends once the engine is idle.
    fn shut_down(&mut self) {
        // Commands already sent are answered too, not dropped unread.
        if let Some(mut commands) = self.commands.take() {
            commands.close();
            while let Ok(command) = commands.try_recv() {
                match command {
                    Command::Submit(submission) => submission.fail(GeniusError::ShutDown),
                    Command::Load { done, .. } => done(Err(GeniusError::ShutDown.report())),
                    Command::Listen(listener) => self.listeners.push(listener),
                    Command::Shutdown => {}
                }
            }
        }
        for cancel in self.running.values() {
            cancel.cancel();
        }
        self.fail_queue(GeniusError::ShutDown);
        if matches!(self.state, State::Resolving { .. } | State::Loading { .. }) {
            self.state = State::Unloaded { hibernated: None };
        }
    }

    fn fail_queue(&mut self, err: GeniusError) {
        let err = Arc::new(err);
        for pending in std::mem::take(&mut self.queue) {
            match pending {
                Pending::Submit(submitted) => submitted.fail_shared(&err),
                Pending::Load { done, .. } => {
                    if let Some(done) = done {
                        done(Err(ErrorReport::shared(&err)));
                    }
                }
            }
        }
    }

    /// Moves the queue forward as far as the model's state allows.
    fn pump(&mut self) {
        while let Some(front) = self.queue.front() {
            match front {
                Pending::Submit(_) => {
                    match &self.state {
                        State::Loaded { .. } => {}
                        State::Unloaded {
                            hibernated: Some(model),
                        } => {
                            // Wake up: reload, then run the request.
                            let model = model.clone();
                            self.load(model);
                            return;
                        }
                        State::Unloaded { hibernated: None } => {
                            let Some(Pending::Submit(submitted)) = self.queue.pop_front() else {
                                unreachable!("the front is a request")
                            };
                            submitted.fail(GeniusError::NoModelLoaded);
                            continue;
                        }
                        State::Resolving { .. } | State::Loading { .. } => return,
                    }
                    let Some(Pending::Submit(submitted)) = self.queue.pop_front() else {
                        unreachable!("the front is a request")
                    };
                    self.run(submitted);
                }
                Pending::Load { name, .. } => {
                    // A load waits until the requests before it are done.
                    let busy = !self.running.is_empty()
                        || matches!(self.state, State::Resolving { .. } | State::Loading { .. });
                    if busy {
                        return;
                    }
                    let already = match &self.state {
                        State::Loaded { model, info, .. } if model.name == *name => {
                            Some(info.clone())
                        }
                        _ => None,
                    };
                    let Some(info) = already else {
                        self.start_load();
                        return;
                    };
                    if let Some(Pending::Load { name, done }) = self.queue.pop_front() {
                        self.broadcast(BrainstemOutput::Status(EngineStatus::Loaded(name)));
                        if let Some(done) = done {
                            done(Ok(info));
                        }
                    }
                }
            }
        }
    }

    /// Starts the load at the front of the queue, which stays there until
    /// the model is loaded or fails.
    fn start_load(&mut self) {
        let Some(Pending::Load { name, .. }) = self.queue.front() else {
            return;
        };
        let name = name.clone();
        let path = Path::new(&name);
        if path.is_file() {
            let model = Model {
                path: path.to_path_buf(),
                name,
            };
            return self.load(model);
        }
        // Anything else is facecrab's to resolve (and maybe download),
        // polled by this loop, so it ends with it.
        let authority = self.authority.clone();
        let progress = self.asset_tx.clone();
        let requested = name.clone();
        let resolution = Box::pin(async move {
            let mut report = move |event| {
                let _ = progress.unbounded_send(event);
            };
            authority.ensure_model_with(&requested, &mut report).await
        });
        self.state = State::Resolving { name, resolution };
    }

    fn load(&mut self, model: Model) {
        self.engine().load(model.name.clone(), model.path.clone());
        let status = EngineStatus::Loading(model.name.clone());
        self.state = State::Loading { model };
        self.broadcast(BrainstemOutput::Status(status));
    }

    /// Checks a request and gives it to the engine.
    fn run(&mut self, submitted: Submission) {
        let checked = match &submitted.prompt {
            Prompt::Text(text) if text.trim().is_empty() => Err(GeniusError::EmptyPrompt),
            Prompt::Text(_) => Ok(()),
            Prompt::Chat(messages) => validate_messages(messages),
            Prompt::Embed(embed) => embed.validate(),
        };
        let checked = checked
            .and_then(|()| submitted.config.validate())
            .and_then(|()| self.limits.check(&submitted.prompt, &submitted.config));
        if let Err(err) = checked {
            return submitted.fail(err);
        }
        let Submission {
            id,
            prompt,
            config,
            sink,
            cancel,
        } = submitted;
        let output = Output::new(&config, sink, cancel.clone());
        self.running.insert(id, cancel);
        self.engine().submit(Request {
            id,
            prompt,
            config: *config,
            limits: self.limits,
            output,
        });
    }

    fn on_engine_report(&mut self, report: EngineReport) {
        match report {
            EngineReport::Loaded(result) => {
                let State::Loading { model } =
                    std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
                else {
                    return;
                };
                // The load that asked for it, if one did (a reload after
                // hibernation has none).
                let done = match self.queue.front_mut() {
                    Some(Pending::Load { name, done }) if *name == model.name => {
                        let done = done.take();
                        self.queue.pop_front();
                        done
                    }
                    _ => None,
                };
                match result {
                    Ok(info) => {
                        log::info!("{} ready, context {} tokens", info.name, info.context_size);
                        let status = EngineStatus::Loaded(model.name.clone());
                        self.state = State::Loaded {
                            model,
                            info: info.clone(),
                            idle_since: Instant::now(),
                        };
                        self.broadcast(BrainstemOutput::Status(status));
                        if let Some(done) = done {
                            done(Ok(info));
                        }
                    }
                    Err(err) => {
                        log::warn!("{err}");
                        let err = Arc::new(err);
                        if let Some(done) = done {
                            done(Err(ErrorReport::shared(&err)));
                        }
                        self.broadcast(BrainstemOutput::Status(EngineStatus::Unloaded));
                        // Requests that waited for this model cannot run.
                        self.fail_waiting_requests(&err);
                    }
                }
            }
            EngineReport::Ended(id) => {
                self.running.remove(&id);
                if !self.running.is_empty() {
                    return;
                }
                if let State::Loaded { idle_since, .. } = &mut self.state {
                    *idle_since = Instant::now();
                }
                let next_is_request = matches!(self.queue.front(), Some(Pending::Submit(_)));
                if self.strategy == CortexStrategy::Immediate && !next_is_request {
                    if let State::Loaded { model, .. } =
                        std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
                    {
                        self.engine().unload();
                        let status = EngineStatus::Hibernated(model.name.clone());
                        self.state = State::Unloaded {
                            hibernated: Some(model),
                        };
                        self.broadcast(BrainstemOutput::Status(status));
                    }
                }
            }
            _ => {}
        }
    }

    /// The requests at the front of the queue (before any load) fail with
    /// the load's own error: a model that is not found is `ModelNotFound`
    /// for them too.
    fn fail_waiting_requests(&mut self, err: &Arc<GeniusError>) {
        while matches!(self.queue.front(), Some(Pending::Submit(_))) {
            if let Some(Pending::Submit(submitted)) = self.queue.pop_front() {
                submitted.fail_shared(err);
            }
        }
    }

    fn on_resolved(&mut self, result: Result<PathBuf, FacecrabError>) {
        let State::Resolving { name, .. } =
            std::mem::replace(&mut self.state, State::Unloaded { hibernated: None })
        else {
            return;
        };
        match result {
            Ok(path) => {
                let event = AssetEvent::Complete(path.display().to_string());
                self.broadcast(BrainstemOutput::Asset(event));
                self.load(Model { name, path });
            }
            Err(err) => {
                let event = AssetEvent::Error(err.to_string());
                self.broadcast(BrainstemOutput::Asset(event));
                let err = Arc::new(asset_error(name.clone(), err));
                log::warn!("{err}");
                if let Some(Pending::Load { done, .. }) = self.queue.front_mut() {
                    if let Some(done) = done.take() {
                        done(Err(ErrorReport::shared(&err)));
                    }
                    self.queue.pop_front();
                }
                self.fail_waiting_requests(&err);
            }
        }
    }

    /// Sends a status or download event to every listener still there.
    fn broadcast(&mut self, output: BrainstemOutput) {
        self.listeners
            .retain_mut(|listener| listener(output.clone()));
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
