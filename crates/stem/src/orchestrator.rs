//! The Orchestrator and its builder: what it is made of, and how its loop
//! is started (the loop itself is in `brainstem`).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use facecrab::AssetAuthority;
use futures::channel::mpsc;
use rusty_genius_core::protocol::{BrainstemInput, BrainstemOutput};
use rusty_genius_core::{GeniusError, Limits};
use rusty_genius_cortex::gguf::{Footprint, FootprintFn};
use rusty_genius_cortex::{
    default_engine_factory, default_footprint, Engine, EngineFactory, Pinky,
};

use crate::brainstem::{Brainstem, Parts};
use crate::handle::OrchestratorHandle;
use crate::residency::Residency;
use crate::rt;
use crate::strategy::CortexStrategy;

/// Runs inference requests on one or more models, each with an engine of
/// its own, loading, hibernating, evicting and reloading them as the
/// [`CortexStrategy`] and the [`Residency`] say.
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
    footprint: FootprintFn,
    authority: Arc<AssetAuthority>,
    limits: Limits,
    residency: Residency,
    max_queue: Option<usize>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("strategy", &self.strategy)
            .field("limits", &self.limits)
            .field("residency", &self.residency)
            .field("max_queue", &self.max_queue)
            .finish_non_exhaustive()
    }
}

/// Chooses the strategy, engine and asset authority of an [`Orchestrator`].
pub struct OrchestratorBuilder {
    strategy: CortexStrategy,
    factory: Option<EngineFactory>,
    footprint: Option<FootprintFn>,
    authority: Option<AssetAuthority>,
    limits: Limits,
    residency: Residency,
    max_queue: Option<usize>,
}

impl OrchestratorBuilder {
    /// Sets when an idle model is unloaded (each model on its own idle
    /// time). Default: `HibernateAfter(5 minutes)`.
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

    /// Sets how many models stay loaded at once, and in how much memory.
    /// Default [`Residency::default`]: 3 models, in the memory the
    /// machine has available.
    pub fn residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    /// Bounds the requests waiting for a place (for their model to load,
    /// or for room in its batch), across every model. A request that
    /// comes when `requests` wait already is refused at once with
    /// [`GeniusError::QueueFull`], before any work for it starts. Default:
    /// no bound.
    pub fn max_queue(mut self, requests: usize) -> Self {
        self.max_queue = Some(requests);
        self
    }

    /// Sets how a model file's size in memory is estimated before it
    /// loads (the residency policy's measure). Default: from the GGUF
    /// header and the default engine's options.
    pub fn footprint<F>(mut self, estimate: F) -> Self
    where
        F: Fn(&Path) -> Footprint + Send + Sync + 'static,
    {
        self.footprint = Some(Arc::new(estimate));
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
            footprint: self.footprint.unwrap_or_else(default_footprint),
            authority: Arc::new(authority),
            limits: self.limits,
            residency: self.residency,
            max_queue: self.max_queue,
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
            footprint: None,
            authority: None,
            limits: Limits::default(),
            residency: Residency::default(),
            max_queue: None,
        }
    }

    /// The strategy in force.
    pub fn strategy(&self) -> CortexStrategy {
        self.strategy
    }

    /// The residency policy in force.
    pub fn residency(&self) -> Residency {
        self.residency
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
        let (stopped, on_stop) = futures::channel::oneshot::channel::<()>();
        let handle = OrchestratorHandle::new(commands, on_stop);
        let parts = Parts {
            strategy: self.strategy,
            limits: self.limits,
            residency: self.residency,
            max_queue: self.max_queue,
            authority: self.authority.clone(),
            factory: self.factory.clone(),
            footprint: self.footprint.clone(),
        };
        let core = async move {
            let mut stem = Brainstem::new(parts, inbox);
            while let Some(event) = stem.next_event().await {
                stem.handle_event(event);
            }
            stem.finish().await;
            drop(stopped);
        };
        (core, handle)
    }
}
