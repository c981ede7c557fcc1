//! The Orchestrator's loop: the models it knows of, each with its own
//! engine thread, queue and lifecycle.
//!
//! One `next_event` holds the only `select!` (commands from handles,
//! engine reports, download progress, resolutions, engines finishing
//! their unload, the timer); one `handle_event` decides, and `pump` then
//! moves every model's queue as far as it can. Each model's engine runs on
//! its own thread and sends each request's events straight to that
//! request's stream, so the loop only keeps count and stays responsive
//! while requests generate and other models load.
//!
//! A model's life: `Resolving` (facecrab, and the estimate of its size)
//! → `Waiting` (for room under the [`Residency`]) → `Loading` → `Loaded`
//! → `Unloaded` (hibernated, evicted or released; the next request for it
//! waits for room again, without resolving).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use facecrab::{AssetAuthority, FacecrabError};
use futures::channel::mpsc;
use futures::future::{self, BoxFuture, Either};
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};
use rusty_genius_core::chat::validate_messages;
use rusty_genius_core::manifest::{ModelInfo, ModelState, ModelStatus};
use rusty_genius_core::metrics::{EngineStats, Metrics};
use rusty_genius_core::protocol::{AssetEvent, BrainstemOutput, EngineStatus};
use rusty_genius_core::tokens::TokenQuery;
use rusty_genius_core::{ErrorReport, GeniusError, Limits, Prompt};
use rusty_genius_cortex::gguf::{Footprint, FootprintFn};
use rusty_genius_cortex::{
    CancelToken, EngineFactory, EngineReport, EngineThread, EventSink, Output, Request, RequestId,
};

use crate::handle::{Command, Listener, LoadDone, Submission, UnloadDone};
use crate::meter::{fresh, Metered, Tally};
use crate::residency::{find_room, Holder, Memory, Residency, Room};
use crate::rt;
use crate::strategy::CortexStrategy;

/// What the loop is built from.
pub(crate) struct Parts {
    pub(crate) strategy: CortexStrategy,
    pub(crate) limits: Limits,
    pub(crate) residency: Residency,
    pub(crate) max_queue: Option<usize>,
    pub(crate) authority: Arc<AssetAuthority>,
    pub(crate) factory: EngineFactory,
    pub(crate) footprint: FootprintFn,
}

/// A model's file, found, and its estimated size.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    path: PathBuf,
    footprint: Footprint,
    /// Whether facecrab found it (then its `Complete` is reported).
    fetched: bool,
}

enum Phase {
    /// facecrab is resolving the name (maybe downloading).
    Resolving,
    /// Resolved; waiting for room since the given instant.
    Waiting {
        since: Instant,
    },
    Loading {
        engine: EngineThread,
        serial: u64,
    },
    Loaded {
        engine: EngineThread,
        serial: u64,
        info: ModelInfo,
    },
    /// Not in memory; a request for it loads it again.
    Unloaded,
}

/// One model the loop knows of, by the name requests use.
struct Entry {
    /// Tells this entry's resolution from an earlier one's.
    generation: u64,
    phase: Phase,
    resolved: Option<Resolved>,
    /// Requests waiting for the model to load.
    queue: VecDeque<Submission>,
    /// Loads waiting for it.
    loads: Vec<LoadDone>,
    /// Requests given to the engine and not yet ended.
    running: HashMap<RequestId, CancelToken>,
    /// Those of them the engine has started (in its batch); the others
    /// wait in its queue for a place.
    started: HashSet<RequestId>,
    /// The last request's arrival or end, or the load's end: where its idle
    /// time starts.
    last_used: Instant,
    /// The last request's arrival (or load): the order in which the least
    /// recently used model makes room. Arrivals come in the order clients
    /// sent them; the reports of requests' ends come from each model's
    /// engine thread, in no order across models.
    last_asked: Instant,
    /// A request's keep-alive, in place of the strategy's.
    keep_alive: Option<Duration>,
    /// Unloads waiting for it to be idle.
    releases: Vec<UnloadDone>,
    /// What its engine last reported.
    stats: EngineStats,
    /// The counters its earlier engines left.
    past_stats: EngineStats,
}

impl Entry {
    fn new(generation: u64) -> Self {
        Self {
            generation,
            phase: Phase::Resolving,
            resolved: None,
            queue: VecDeque::new(),
            loads: Vec::new(),
            running: HashMap::new(),
            started: HashSet::new(),
            last_used: Instant::now(),
            last_asked: Instant::now(),
            keep_alive: None,
            releases: Vec::new(),
            stats: EngineStats::default(),
            past_stats: EngineStats::default(),
        }
    }

    /// Requests waiting: for the model, or in its engine for a place.
    fn waiting(&self) -> usize {
        self.queue.len() + self.running.len() - self.started.len()
    }

    /// Ends the queued requests whose clients stopped listening, so that
    /// none of them loads a model.
    fn drop_cancelled(&mut self) {
        if self.queue.iter().any(|s| s.cancel.is_cancelled()) {
            let queue = std::mem::take(&mut self.queue);
            for submission in queue {
                if submission.cancel.is_cancelled() {
                    submission.cancelled();
                } else {
                    self.queue.push_back(submission);
                }
            }
        }
    }

    fn idle(&self) -> bool {
        self.running.is_empty() && self.queue.is_empty() && self.loads.is_empty()
    }

    /// Whether it holds memory (loading or loaded).
    fn resident(&self) -> bool {
        matches!(self.phase, Phase::Loading { .. } | Phase::Loaded { .. })
    }

    /// Its estimated memory, on the host and on the GPU.
    fn memory(&self) -> Memory {
        self.resolved
            .as_ref()
            .map_or(Memory::default(), |r| Memory {
                host: r.footprint.bytes,
                device: r.footprint.device_bytes,
            })
    }

    fn bytes(&self) -> u64 {
        self.memory().host
    }

    fn serial(&self) -> Option<u64> {
        match &self.phase {
            Phase::Loading { serial, .. } | Phase::Loaded { serial, .. } => Some(*serial),
            _ => None,
        }
    }

    /// Takes the engine out, leaving the entry `Unloaded` (and keeping
    /// the engine's counters).
    fn take_engine(&mut self) -> Option<EngineThread> {
        match std::mem::replace(&mut self.phase, Phase::Unloaded) {
            Phase::Loading { engine, .. } | Phase::Loaded { engine, .. } => {
                self.past_stats = self.stats.after(self.past_stats).counters();
                self.stats = EngineStats::default();
                Some(engine)
            }
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// Answers every waiting load and request with `err`.
    fn fail(&mut self, err: &Arc<GeniusError>) {
        for done in self.loads.drain(..) {
            done(Err(ErrorReport::shared(err)));
        }
        for submission in self.queue.drain(..) {
            submission.fail_shared(err);
        }
    }
}

pub(crate) enum Event {
    Command(Option<Command>),
    Engine(u64, Option<EngineReport>),
    Asset(AssetEvent),
    Resolved(String, u64, Result<Resolved, FacecrabError>),
    /// An unloaded engine has freed this much memory.
    Freed(Memory),
    Tick,
    /// A set of engines, resolutions or unloads became empty.
    Emptied,
}

type Resolution = BoxFuture<'static, (String, u64, Result<Resolved, FacecrabError>)>;

pub(crate) struct Brainstem {
    parts: Parts,
    /// `None` once every handle is gone (or at `Shutdown`).
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    /// Where status and download events go.
    listeners: Vec<Listener>,
    asset_tx: mpsc::UnboundedSender<AssetEvent>,
    asset_rx: mpsc::UnboundedReceiver<AssetEvent>,
    /// Every engine's reports, tagged with its serial; `None` last, when
    /// its thread is gone.
    reports: SelectAll<BoxStream<'static, (u64, Option<EngineReport>)>>,
    resolutions: FuturesUnordered<Resolution>,
    /// Engines unloading, each done with the bytes it held.
    freeing: FuturesUnordered<BoxFuture<'static, Memory>>,
    freeing_bytes: Memory,
    models: HashMap<String, Entry>,
    /// The model of the last `LoadModel`: requests that name none go to it.
    default: Option<String>,
    next_serial: u64,
    /// Every request's counters, by model.
    tally: Tally,
    /// Requests refused because the queue was full.
    rejected: u64,
}

impl Brainstem {
    pub(crate) fn new(parts: Parts, commands: mpsc::UnboundedReceiver<Command>) -> Self {
        let (asset_tx, asset_rx) = mpsc::unbounded();
        Self {
            parts,
            commands: Some(commands),
            listeners: Vec::new(),
            asset_tx,
            asset_rx,
            reports: SelectAll::new(),
            resolutions: FuturesUnordered::new(),
            freeing: FuturesUnordered::new(),
            freeing_bytes: Memory::default(),
            models: HashMap::new(),
            default: None,
            next_serial: 1,
            tally: Tally::default(),
            rejected: 0,
        }
    }

    /// Waits for the next thing to react to; `None` when the loop is done.
    pub(crate) async fn next_event(&mut self) -> Option<Event> {
        let settled = self.models.values().all(|entry| {
            entry.idle() && matches!(entry.phase, Phase::Loaded { .. } | Phase::Unloaded)
        });
        if self.commands.is_none() && settled && self.resolutions.is_empty() {
            return None;
        }
        let timer = match self.deadline() {
            Some(deadline) => Either::Left(rt::sleep_until(deadline)),
            None => Either::Right(future::pending()),
        };
        let commands = match &mut self.commands {
            Some(commands) => Either::Left(commands.next()),
            None => Either::Right(future::pending()),
        };
        // `next()`, not `select_next_some()`: a set that empties while
        // this select waits says `None` once, and is polled again after
        // it (which `select_next_some` refuses, by panicking).
        let reports = if self.reports.is_empty() {
            Either::Right(future::pending())
        } else {
            Either::Left(self.reports.next())
        };
        let resolved = if self.resolutions.is_empty() {
            Either::Right(future::pending())
        } else {
            Either::Left(self.resolutions.next())
        };
        let freed = if self.freeing.is_empty() {
            Either::Right(future::pending())
        } else {
            Either::Left(self.freeing.next())
        };
        // Commands first, so `Shutdown` is never stuck behind engine
        // reports; progress before the result it leads to.
        futures::select_biased! {
            command = commands.fuse() => Some(Event::Command(command)),
            report = reports.fuse() => Some(match report {
                Some((serial, report)) => Event::Engine(serial, report),
                None => Event::Emptied,
            }),
            asset = self.asset_rx.select_next_some() => Some(Event::Asset(asset)),
            resolved = resolved.fuse() => Some(match resolved {
                Some((name, generation, result)) => Event::Resolved(name, generation, result),
                None => Event::Emptied,
            }),
            freed = freed.fuse() => Some(freed.map_or(Event::Emptied, Event::Freed)),
            () = timer.fuse() => Some(Event::Tick),
        }
    }

    /// The next instant something is due: a model's idle time ends, or a
    /// model has waited for room as long as it may.
    fn deadline(&self) -> Option<Instant> {
        self.models
            .values()
            .filter_map(|entry| match &entry.phase {
                // A zero idle time (`Immediate`, or a keep-alive of zero)
                // unloads at the end of a request, not after a load.
                Phase::Loaded { .. } if entry.idle() => self
                    .idle_time(entry)
                    .filter(|idle| !idle.is_zero())
                    .and_then(|idle| entry.last_used.checked_add(idle)),
                Phase::Waiting { since } => since.checked_add(self.parts.residency.wait),
                _ => None,
            })
            .min()
    }

    /// How long `entry` stays loaded when idle; `None`: until evicted.
    fn idle_time(&self, entry: &Entry) -> Option<Duration> {
        idle_time(self.parts.strategy, entry.keep_alive)
    }

    pub(crate) fn handle_event(&mut self, event: Event) {
        match event {
            Event::Command(None) => self.commands = None,
            Event::Command(Some(command)) => self.on_command(command),
            Event::Engine(serial, report) => self.on_engine_report(serial, report),
            Event::Asset(event) => self.broadcast(BrainstemOutput::Asset(event)),
            Event::Resolved(name, generation, result) => {
                // Progress reported in the poll that finished the work is
                // still queued: it goes first.
                while let Ok(event) = self.asset_rx.try_recv() {
                    self.broadcast(BrainstemOutput::Asset(event));
                }
                self.on_resolved(name, generation, result);
            }
            Event::Freed(memory) => self.freeing_bytes = self.freeing_bytes.minus(memory),
            Event::Tick => self.hibernate_idle(),
            Event::Emptied => {}
        }
        self.pump();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            // After `Shutdown` no command is read (`commands` is gone),
            // so whatever arrives here is served.
            Command::Submit(submission) => self.submit(submission),
            Command::Load { name, done } => self.load(name, done),
            Command::Unload { name, done } => self.unload(&name, done),
            Command::Models(done) => done(self.statuses()),
            Command::Metrics(done) => done(self.metrics()),
            Command::Listen(listener) => self.listeners.push(listener),
            Command::Shutdown => self.shut_down(),
        }
    }

    /// The entry for `name`, created (and its resolution started) if the
    /// loop has not seen it.
    fn entry(&mut self, name: &str) -> &mut Entry {
        if !self.models.contains_key(name) {
            let generation = self.next_serial;
            self.next_serial += 1;
            self.resolve(name.to_owned(), generation);
            self.models.insert(name.to_owned(), Entry::new(generation));
        }
        self.models.get_mut(name).expect("inserted above")
    }

    fn submit(&mut self, submission: Submission) {
        let Some(name) = submission
            .model()
            .map(str::to_owned)
            .or_else(|| self.default.clone())
        else {
            return submission.fail(GeniusError::NoModelLoaded);
        };
        let mut submission = submission;
        // Counted from here, but a name the loop has not seen is counted
        // only once it is checked: a bad request naming a model that
        // does not exist leaves nothing behind.
        let known = self.models.contains_key(&name);
        if known {
            submission.sink = self.metered(submission.sink, &name);
        }
        if let Err(err) = self.check(&submission) {
            return submission.fail(err);
        }
        if let Some(limit) = self.parts.max_queue {
            let mut queued = 0;
            for entry in self.models.values_mut() {
                entry.drop_cancelled();
                queued += entry.waiting();
            }
            if queued >= limit {
                self.rejected += 1;
                return submission.fail(GeniusError::QueueFull { queued, limit });
            }
        }
        if !known {
            submission.sink = self.metered(submission.sink, &name);
        }
        let keep_alive = submission.keep_alive();
        let entry = self.entry(&name);
        if keep_alive.is_some() {
            entry.keep_alive = keep_alive;
        }
        entry.last_used = Instant::now();
        entry.last_asked = entry.last_used;
        entry.queue.push_back(submission);
    }

    /// `sink`, counting its request's events for `model`.
    fn metered(&self, sink: Box<dyn EventSink>, model: &str) -> Box<dyn EventSink> {
        Box::new(Metered::new(sink, self.tally.clone(), model.to_owned()))
    }

    /// Checks a request before any work for it starts (a load included).
    fn check(&self, submission: &Submission) -> Result<(), GeniusError> {
        match &submission.prompt {
            Prompt::Text(text) if text.trim().is_empty() => Err(GeniusError::EmptyPrompt),
            Prompt::Text(_) => Ok(()),
            Prompt::Chat(messages) => validate_messages(messages),
            Prompt::Embed(embed) => embed.validate(),
            // An empty file is a file to complete: nothing to check.
            Prompt::Infill(_) => Ok(()),
            Prompt::Tokens(TokenQuery::Render { messages }) => validate_messages(messages),
            Prompt::Tokens(_) => Ok(()),
        }?;
        submission.config.validate()?;
        self.parts
            .limits
            .check(&submission.prompt, &submission.config)
    }

    fn load(&mut self, name: String, done: LoadDone) {
        self.default = Some(name.clone());
        let entry = self.entry(&name);
        entry.last_used = Instant::now();
        entry.last_asked = entry.last_used;
        if let Phase::Loaded { info, .. } = &entry.phase {
            let info = info.clone();
            self.broadcast(BrainstemOutput::Status(EngineStatus::Loaded(name)));
            done(Ok(info));
        } else {
            entry.loads.push(done);
        }
    }

    fn unload(&mut self, name: &str, done: UnloadDone) {
        let Some(entry) = self.models.get_mut(name) else {
            return done(Err(GeniusError::ModelNotFound {
                name: name.to_owned(),
                reason: "no model of that name was loaded or asked for".into(),
                source: None,
            }
            .report()));
        };
        if matches!(entry.phase, Phase::Unloaded) && entry.idle() {
            return done(Ok(false));
        }
        entry.releases.push(done);
    }

    /// What [`OrchestratorHandle::models`](crate::OrchestratorHandle::models) lists.
    fn statuses(&self) -> Vec<ModelStatus> {
        let mut list: Vec<ModelStatus> = self
            .models
            .iter()
            .map(|(name, entry)| {
                let (state, info) = match &entry.phase {
                    Phase::Resolving => (ModelState::Resolving, None),
                    Phase::Waiting { .. } => (ModelState::WaitingForRoom, None),
                    Phase::Loading { .. } => (ModelState::Loading, None),
                    Phase::Loaded { info, .. } => (ModelState::Loaded, Some(info.clone())),
                    Phase::Unloaded => (ModelState::Unloaded, None),
                };
                let idle_for = (state == ModelState::Loaded && entry.idle())
                    .then(|| entry.last_used.elapsed());
                ModelStatus {
                    name: name.clone(),
                    state,
                    default: self.default.as_deref() == Some(name),
                    memory_bytes: entry.bytes(),
                    device_bytes: entry.memory().device,
                    embeds: info.as_ref().map_or_else(
                        || entry.resolved.as_ref().is_some_and(|r| r.footprint.embeds),
                        |info| info.embeds,
                    ),
                    info,
                    running: entry.started.len(),
                    queued: entry.queue.len() + entry.running.len() - entry.started.len(),
                    idle_for,
                    keep_alive: self.idle_time(entry),
                }
            })
            .collect();
        list.sort_by(|a, b| b.default.cmp(&a.default).then(a.name.cmp(&b.name)));
        list
    }

    /// What [`OrchestratorHandle::metrics`](crate::OrchestratorHandle::metrics)
    /// returns: the counters, and each model's gauges now.
    fn metrics(&self) -> Metrics {
        let mut counted = self.tally.lock().clone();
        for name in self.models.keys() {
            counted.entry(name.clone()).or_insert_with(|| fresh(name));
        }
        let mut models: Vec<_> = counted
            .into_values()
            .map(|mut metrics| {
                if let Some(entry) = self.models.get(&metrics.name) {
                    metrics.running = entry.started.len();
                    metrics.queued = entry.waiting();
                    metrics.resident = entry.resident();
                    metrics.memory_bytes = if entry.resident() { entry.bytes() } else { 0 };
                    metrics.engine = entry.stats.after(entry.past_stats);
                }
                metrics
            })
            .collect();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Metrics {
            models,
            rejected_queue_full: self.rejected,
            max_queue: self.parts.max_queue,
        }
    }

    /// `Shutdown`: running requests are cancelled (each still ends with
    /// its `Complete`), everything queued is answered with `ShutDown`, and
    /// the loop ends once the engines are idle.
    fn shut_down(&mut self) {
        // Commands already sent are answered too, not dropped unread.
        if let Some(mut commands) = self.commands.take() {
            commands.close();
            while let Ok(command) = commands.try_recv() {
                match command {
                    Command::Submit(submission) => submission.fail(GeniusError::ShutDown),
                    Command::Load { done, .. } => done(Err(GeniusError::ShutDown.report())),
                    Command::Unload { done, .. } => done(Err(GeniusError::ShutDown.report())),
                    Command::Models(done) => done(self.statuses()),
                    Command::Metrics(done) => done(self.metrics()),
                    Command::Listen(listener) => self.listeners.push(listener),
                    Command::Shutdown => {}
                }
            }
        }
        // Stops every download.
        self.resolutions = FuturesUnordered::new();
        let err = Arc::new(GeniusError::ShutDown);
        let mut stopping = Vec::new();
        for entry in self.models.values_mut() {
            for cancel in entry.running.values() {
                cancel.cancel();
            }
            entry.fail(&err);
            for done in entry.releases.drain(..) {
                done(Err(ErrorReport::shared(&err)));
            }
            match entry.phase {
                Phase::Resolving | Phase::Waiting { .. } => entry.phase = Phase::Unloaded,
                Phase::Loading { .. } => {
                    let bytes = entry.memory();
                    if let Some(engine) = entry.take_engine() {
                        stopping.push((engine, bytes));
                    }
                }
                _ => {}
            }
        }
        for (engine, bytes) in stopping {
            self.free(engine, bytes);
        }
    }

    /// Starts finding `name`'s file (a path, or facecrab's to resolve and
    /// maybe download) and estimating its size, off the loop's thread.
    fn resolve(&mut self, name: String, generation: u64) {
        let authority = self.parts.authority.clone();
        let progress = self.asset_tx.clone();
        let footprint = self.parts.footprint.clone();
        let resolution = async move {
            let given = PathBuf::from(&name);
            let is_file = rt::blocking({
                let given = given.clone();
                move || given.is_file()
            })
            .await;
            let found = if is_file {
                Ok((given, false))
            } else {
                let mut report = move |event| {
                    let _ = progress.unbounded_send(event);
                };
                authority
                    .ensure_model_with(&name, &mut report)
                    .await
                    .map(|path| (path, true))
            };
            let result = match found {
                Ok((path, fetched)) => {
                    let measured = path.clone();
                    let footprint = rt::blocking(move || footprint(&measured)).await;
                    Ok(Resolved {
                        path,
                        footprint,
                        fetched,
                    })
                }
                Err(err) => Err(err),
            };
            (name, generation, result)
        };
        self.resolutions.push(resolution.boxed());
    }

    fn on_resolved(
        &mut self,
        name: String,
        generation: u64,
        result: Result<Resolved, FacecrabError>,
    ) {
        let Some(entry) = self
            .models
            .get_mut(&name)
            .filter(|e| e.generation == generation && matches!(e.phase, Phase::Resolving))
        else {
            return;
        };
        match result {
            Ok(resolved) => {
                log::debug!(
                    "{name}: {} estimated at {} bytes of host memory and {} of GPU memory",
                    resolved.path.display(),
                    resolved.footprint.bytes,
                    resolved.footprint.device_bytes
                );
                let fetched = resolved
                    .fetched
                    .then(|| resolved.path.display().to_string());
                entry.resolved = Some(resolved);
                entry.phase = Phase::Waiting {
                    since: Instant::now(),
                };
                if let Some(path) = fetched {
                    self.broadcast(BrainstemOutput::Asset(AssetEvent::Complete(path)));
                }
            }
            Err(err) => {
                self.broadcast(BrainstemOutput::Asset(AssetEvent::Error(err.to_string())));
                let err = Arc::new(asset_error(name.clone(), err));
                log::warn!("{err}");
                self.forget(&name, &err);
            }
        }
    }

    /// Fails everything waiting for `name` and forgets it (it could not
    /// be found or loaded); it stops being the default.
    fn forget(&mut self, name: &str, err: &Arc<GeniusError>) {
        if let Some(mut entry) = self.models.remove(name) {
            entry.fail(err);
            for done in entry.releases.drain(..) {
                done(Ok(false));
            }
            // A name that led to no model leaves no counters behind: the
            // names clients send are not a list to grow without bound.
            let mut tally = self.tally.lock();
            if tally
                .get(name)
                .is_some_and(|m| m.loads == 0 && m.load_failures == 0)
            {
                tally.remove(name);
            }
            drop(tally);
            if let Some(engine) = entry.take_engine() {
                self.free(engine, Memory::default());
            }
        }
        if self.default.as_deref() == Some(name) {
            self.default = None;
        }
    }

    /// Moves every model forward as far as it can go: loaded models take
    /// their queued requests, idle ones asked to unload do, models wanted
    /// again wait for room, and waiting ones load when there is room.
    fn pump(&mut self) {
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in &names {
            let Some(entry) = self.models.get_mut(name) else {
                continue;
            };
            if !matches!(entry.phase, Phase::Loaded { .. }) {
                entry.drop_cancelled();
            }
            match &entry.phase {
                Phase::Loaded { engine, .. } => {
                    while let Some(submission) = entry.queue.pop_front() {
                        run(engine, &mut entry.running, submission, self.parts.limits);
                    }
                    if entry.idle() && !entry.releases.is_empty() {
                        self.unload_now(name, Unloading::Released);
                    }
                }
                Phase::Unloaded if !entry.queue.is_empty() || !entry.loads.is_empty() => {
                    entry.phase = Phase::Waiting {
                        since: Instant::now(),
                    };
                }
                Phase::Unloaded => {
                    for done in entry.releases.drain(..) {
                        done(Ok(false));
                    }
                }
                // Nothing wants it any more (every client waiting for it
                // went away): it need not load.
                Phase::Waiting { .. } if entry.queue.is_empty() && entry.loads.is_empty() => {
                    entry.phase = Phase::Unloaded;
                }
                _ => {}
            }
        }
        self.place_waiting();
    }

    /// Loads the models waiting for room, oldest first, as the residency
    /// policy allows, evicting idle models for them.
    fn place_waiting(&mut self) {
        let mut waiting: Vec<(Instant, String)> = self
            .models
            .iter()
            .filter_map(|(name, entry)| match entry.phase {
                Phase::Waiting { since } => Some((since, name.clone())),
                _ => None,
            })
            .collect();
        waiting.sort();
        for (since, name) in waiting {
            let needed = self.models[&name].memory();
            let holders: Vec<Holder> = self
                .models
                .iter()
                .filter(|(_, e)| e.resident())
                .map(|(n, e)| Holder {
                    name: n.clone(),
                    memory: e.memory(),
                    busy: !e.idle() || matches!(e.phase, Phase::Loading { .. }),
                    last_used: e.last_asked,
                })
                .collect();
            match find_room(&self.parts.residency, &holders, self.freeing_bytes, needed) {
                Room::Fits => self.start_load(&name),
                Room::Evict(victims) => {
                    for victim in victims {
                        self.unload_now(&victim, Unloading::Evicted(&name));
                    }
                    // Loads once their memory is freed.
                }
                Room::WaitForFreeing => {}
                Room::Wait(why) => {
                    if since.elapsed() >= self.parts.residency.wait {
                        let err = GeniusError::NoRoomForModel {
                            name: name.clone(),
                            needed: needed.host,
                            why,
                            loaded: self.loaded_sizes(),
                        };
                        log::warn!("{err}");
                        self.give_up(&name, &Arc::new(err));
                    }
                }
                Room::TooLargeForDevice => {
                    let err = GeniusError::ModelTooLargeForDevice {
                        name: name.clone(),
                        needed: needed.device,
                        budget: self.parts.residency.device_budget,
                    };
                    log::warn!("{err}");
                    self.give_up(&name, &Arc::new(err));
                }
                Room::TooLarge => {
                    let err = GeniusError::ModelTooLarge {
                        name: name.clone(),
                        needed: needed.host,
                        budget: self.parts.residency.memory_budget,
                        loaded: self.loaded_sizes(),
                    };
                    log::warn!("{err}");
                    self.give_up(&name, &Arc::new(err));
                }
            }
        }
    }

    /// The models in memory and their estimated sizes.
    fn loaded_sizes(&self) -> Vec<(String, u64)> {
        let mut loaded: Vec<(String, u64)> = self
            .models
            .iter()
            .filter(|(_, e)| e.resident())
            .map(|(n, e)| (n.clone(), e.bytes()))
            .collect();
        loaded.sort();
        loaded
    }

    /// A model that cannot get room: what waits for it fails, and it
    /// stays known (unloaded) so a later request tries again.
    fn give_up(&mut self, name: &str, err: &Arc<GeniusError>) {
        if let Some(entry) = self.models.get_mut(name) {
            entry.fail(err);
            entry.phase = Phase::Unloaded;
        }
    }

    fn start_load(&mut self, name: &str) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let Some(resolved) = entry.resolved.clone() else {
            return;
        };
        let (engine, reports) = match EngineThread::spawn(self.parts.factory.clone()) {
            Ok(spawned) => spawned,
            Err(err) => {
                log::error!("{err}");
                return self.forget(name, &Arc::new(err));
            }
        };
        engine.load(name.to_owned(), resolved.path.clone());
        entry.phase = Phase::Loading { engine, serial };
        self.reports.push(
            reports
                .map(move |report| (serial, Some(report)))
                .chain(futures::stream::once(future::ready((serial, None))))
                .boxed(),
        );
        self.broadcast(BrainstemOutput::Status(EngineStatus::Loading(
            name.to_owned(),
        )));
    }

    /// Unloads a loaded model now (its engine frees the memory in the
    /// background) and says why.
    fn unload_now(&mut self, name: &str, why: Unloading) {
        let Some(entry) = self.models.get_mut(name) else {
            return;
        };
        let bytes = entry.memory();
        let Some(engine) = entry.take_engine() else {
            return;
        };
        let releases: Vec<UnloadDone> = entry.releases.drain(..).collect();
        self.free(engine, bytes);
        let status = match why {
            Unloading::Hibernated => {
                log::info!("hibernating {name} after its idle time");
                EngineStatus::Hibernated(name.to_owned())
            }
            Unloading::Evicted(for_model) => {
                log::info!("unloading {name}, idle longest, to make room for {for_model}");
                EngineStatus::Evicted {
                    name: name.to_owned(),
                    for_model: for_model.to_owned(),
                }
            }
            Unloading::Released => {
                log::info!("unloading {name} as asked");
                EngineStatus::Released(name.to_owned())
            }
        };
        self.tally.update(name, |metrics| match why {
            Unloading::Hibernated => metrics.hibernations += 1,
            Unloading::Evicted(_) => metrics.evictions += 1,
            Unloading::Released => metrics.releases += 1,
        });
        self.broadcast(BrainstemOutput::Status(status));
        for done in releases {
            done(Ok(true));
        }
    }

    /// Lets `engine` unload and exit; its `bytes` count as held until it has.
    fn free(&mut self, engine: EngineThread, bytes: Memory) {
        self.freeing_bytes = self.freeing_bytes.plus(bytes);
        self.freeing
            .push(engine.shutdown().map(move |()| bytes).boxed());
    }

    /// Unloads the idle models whose idle time is over.
    fn hibernate_idle(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .models
            .iter()
            .filter(|(_, entry)| matches!(entry.phase, Phase::Loaded { .. }) && entry.idle())
            .filter(|(_, entry)| {
                self.idle_time(entry)
                    .filter(|idle| !idle.is_zero())
                    .and_then(|idle| entry.last_used.checked_add(idle))
                    .is_some_and(|deadline| deadline <= now)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            self.unload_now(&name, Unloading::Hibernated);
        }
    }

    fn on_engine_report(&mut self, serial: u64, report: Option<EngineReport>) {
        let Some(name) = self
            .models
            .iter()
            .find(|(_, e)| e.serial() == Some(serial))
            .map(|(name, _)| name.clone())
        else {
            // An engine unloaded before: its last words do not matter.
            return;
        };
        match report {
            Some(EngineReport::Loaded(result)) => self.on_loaded(&name, result),
            Some(EngineReport::Started(id)) => {
                let entry = self.models.get_mut(&name).expect("found above");
                if entry.running.contains_key(&id) {
                    entry.started.insert(id);
                }
            }
            Some(EngineReport::Stats(stats)) => {
                if let Some(entry) = self.models.get_mut(&name) {
                    entry.stats = stats;
                }
            }
            Some(EngineReport::Ended(id)) => {
                let entry = self.models.get_mut(&name).expect("found above");
                entry.running.remove(&id);
                entry.started.remove(&id);
                if entry.running.is_empty() {
                    entry.last_used = Instant::now();
                    let immediate =
                        idle_time(self.parts.strategy, entry.keep_alive) == Some(Duration::ZERO);
                    if entry.idle() && immediate {
                        self.unload_now(&name, Unloading::Hibernated);
                    }
                }
            }
            Some(_) => {}
            None => {
                // The engine thread is gone: what runs on it has ended
                // (its streams say `EngineGone`); what waits fails.
                log::error!("{name}: {}", GeniusError::EngineGone);
                let err = Arc::new(GeniusError::EngineGone);
                if let Some(entry) = self.models.get_mut(&name) {
                    entry.phase = Phase::Unloaded;
                    entry.running.clear();
                    entry.started.clear();
                }
                self.forget(&name, &err);
            }
        }
    }

    fn on_loaded(&mut self, name: &str, result: Result<ModelInfo, GeniusError>) {
        let entry = self.models.get_mut(name).expect("the caller found it");
        match result {
            Ok(info) => {
                let Phase::Loading { engine, serial } =
                    std::mem::replace(&mut entry.phase, Phase::Unloaded)
                else {
                    return;
                };
                log::info!("{name} ready, context {} tokens", info.context_size);
                self.tally.update(name, |metrics| metrics.loads += 1);
                entry.phase = Phase::Loaded {
                    engine,
                    serial,
                    info: info.clone(),
                };
                entry.last_used = Instant::now();
                let loads: Vec<LoadDone> = entry.loads.drain(..).collect();
                self.broadcast(BrainstemOutput::Status(EngineStatus::Loaded(
                    name.to_owned(),
                )));
                for done in loads {
                    done(Ok(info.clone()));
                }
            }
            Err(err) => {
                log::warn!("{err}");
                self.tally
                    .update(name, |metrics| metrics.load_failures += 1);
                self.forget(name, &Arc::new(err));
                self.broadcast(BrainstemOutput::Status(EngineStatus::Unloaded));
            }
        }
    }

    /// Ends the loop: what still waits is answered with `ShutDown`, and
    /// every engine unloads; returns when they all have.
    pub(crate) async fn finish(mut self) {
        self.resolutions = FuturesUnordered::new();
        let err = Arc::new(GeniusError::ShutDown);
        let mut engines = Vec::new();
        for entry in self.models.values_mut() {
            entry.fail(&err);
            for done in entry.releases.drain(..) {
                done(Err(ErrorReport::shared(&err)));
            }
            if let Some(engine) = entry.take_engine() {
                engines.push(engine.shutdown());
            }
        }
        let freeing = std::mem::take(&mut self.freeing);
        futures::join!(future::join_all(engines), freeing.collect::<Vec<_>>());
        log::debug!("orchestrator stopped");
    }

    /// Sends a status or download event to every listener still there.
    fn broadcast(&mut self, output: BrainstemOutput) {
        self.listeners
            .retain_mut(|listener| listener(output.clone()));
    }
}

/// Why a model leaves memory.
enum Unloading<'a> {
    Hibernated,
    Evicted(&'a str),
    Released,
}

/// How long a model stays loaded when idle, by its requests' keep-alive
/// or else the strategy; `None`: until evicted.
fn idle_time(strategy: CortexStrategy, keep_alive: Option<Duration>) -> Option<Duration> {
    match keep_alive {
        Some(Duration::MAX) => None,
        Some(keep) => Some(keep),
        None => match strategy {
            CortexStrategy::Immediate => Some(Duration::ZERO),
            CortexStrategy::HibernateAfter(ttl) => Some(ttl),
            CortexStrategy::KeepAlive => None,
        },
    }
}

/// Gives a checked request to a loaded model's engine.
fn run(
    engine: &EngineThread,
    running: &mut HashMap<RequestId, CancelToken>,
    submitted: Submission,
    limits: Limits,
) {
    let Submission {
        id,
        prompt,
        config,
        sink,
        cancel,
    } = submitted;
    let output = Output::new(&config, sink, cancel.clone());
    running.insert(id, cancel);
    engine.submit(Request {
        id,
        prompt,
        config: *config,
        limits,
        output,
    });
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
