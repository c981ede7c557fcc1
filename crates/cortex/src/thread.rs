//! The engine's own thread.
//!
//! Engines block while they compute, and llama.cpp's context must stay on
//! one thread. `EngineThread` owns an engine on a dedicated OS thread and
//! takes commands through a channel. Requests queue there until the engine
//! has room; the thread then steps the engine for as long as requests run,
//! and each request's events go straight from the engine to that request's
//! own sink, so a slow consumer never holds up the thread or the other
//! requests. The KV cache lives across requests, and no method of the
//! handle blocks: not the commands, not dropping it, not waiting for it to
//! end ([`EngineThread::shutdown`] is a future).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::channel::oneshot;
use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::metrics::EngineStats;
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, Usage};
use rusty_genius_core::GeniusError;
use rusty_genius_core::Prompt;

use crate::cancel::CancelToken;
use crate::engine::{Ended, Engine, Knock, Request, RequestId, Step};
use crate::exit;

/// Creates an engine. Called on the engine thread, so the engine itself
/// need not be `Send`.
pub type EngineFactory = Arc<dyn Fn() -> Result<Box<dyn Engine>, GeniusError> + Send + Sync>;

/// What the engine thread reports, in the order it happens. Requests'
/// own events go to their outputs, not here.
#[derive(Debug)]
#[non_exhaustive]
pub enum EngineReport {
    /// A `load` finished.
    Loaded(Result<ModelInfo, GeniusError>),
    /// The engine took the request into its batch: it is being answered,
    /// no longer waiting for a place.
    Started(RequestId),
    /// The request ended; its `Complete` or error was sent to its output.
    Ended(RequestId),
    /// How the engine stands: sent when it changed, at most every
    /// `STATS_EVERY` (250 ms) while requests run, and as soon as they all ended.
    Stats(EngineStats),
}

/// How often, at most, a busy engine reports its [`EngineStats`].
pub(crate) const STATS_EVERY: Duration = Duration::from_millis(250);

enum Command {
    Load { name: String, path: PathBuf },
    Unload,
    Submit(Box<Request>),
}

/// An engine running on a thread of its own.
///
/// Commands are carried out in order. Dropping the handle lets the thread
/// finish its running requests, unload and exit in the background; the
/// drop itself returns at once. To wait for the thread to be gone (its
/// model freed), await [`shutdown`](Self::shutdown) instead.
pub struct EngineThread {
    commands: Option<mpsc::Sender<Command>>,
    /// Raised with every request sent, for the engine to hear mid-step.
    knock: Knock,
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
        let knock = Knock::default();
        let heard = knock.clone();
        // Never joined: `shutdown` waits for `exiting` instead, so no async
        // caller ever blocks on the thread.
        let _detached: JoinHandle<()> = std::thread::Builder::new()
            .name("genius-engine".into())
            .stack_size(ENGINE_STACK)
            .spawn(move || {
                let serving = {
                    let _inside = exit::enter();
                    Serving::new(factory, reports, heard)
                };
                serving.serve(inbox);
                let _ = exiting.send(());
            })?;
        Ok((
            Self {
                commands: Some(commands),
                knock,
                exited: Some(exited),
            },
            receiver,
        ))
    }

    /// Lets the thread finish its running and queued requests (cancel them
    /// first to be quick), unload the model and exit; completes when it
    /// has. Awaiting this never blocks the executor.
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

    /// Loads a model; answered by [`EngineReport::Loaded`]. Requests that
    /// are still running or queued end first with an error.
    pub fn load(&self, name: impl Into<String>, path: impl Into<PathBuf>) {
        self.send(Command::Load {
            name: name.into(),
            path: path.into(),
        });
    }

    /// Unloads the model; running and queued requests end with an error.
    /// Not answered.
    pub fn unload(&self) {
        self.send(Command::Unload);
    }

    /// Queues a request; it starts when the engine has room and ends with
    /// [`EngineReport::Ended`].
    /// Its events go to its own output; its cancel token (in the output)
    /// ends it early, queued or running.
    pub fn submit(&self, request: Request) {
        self.knock.sending();
        self.send(Command::Submit(Box::new(request)));
    }

    fn send(&self, command: Command) {
        // If the thread is gone, the report channel is closed too, which
        // is how the owner learns of it.
        if let Some(commands) = &self.commands {
            let _ = commands.send(command);
        }
    }
}

/// The thread's state: the engine (or why it could not start) and the
/// requests waiting for room.
struct Serving {
    engine: Result<Box<dyn Engine>, Arc<GeniusError>>,
    /// Counts the requests sent and taken in.
    knock: Knock,
    waiting: VecDeque<Request>,
    /// The cancel tokens of the running requests.
    started: Vec<(RequestId, CancelToken)>,
    reports: UnboundedSender<EngineReport>,
    /// The stats last reported, and when.
    stats_sent: (EngineStats, Instant),
}

/// The engine thread's stack. llama.cpp parses a grammar's groups
/// recursively, about 400 bytes of stack per level of nesting (measured:
/// 4,000 levels parse on a 2 MiB stack, 8,000 overflow it, which aborts
/// the process). [`Limits::grammar_depth`](rusty_genius_core::Limits)
/// keeps requests far below that; this is the margin for callers that
/// raise the limit. Only the pages touched are ever committed.
const ENGINE_STACK: usize = 64 << 20;

/// How long the thread waits for commands when every running request is
/// paused behind a slow consumer.
const PAUSED_POLL: Duration = Duration::from_millis(5);

/// The next command, for an idle thread. It looks for one without sleeping
/// for a few microseconds first: a client that sends its next request as
/// soon as the last one ends would otherwise wait for the thread to be
/// woken from its sleep (a few microseconds on bare metal, tens in a
/// virtual machine), on every request.
fn wait_for_command(inbox: &mpsc::Receiver<Command>) -> Result<Command, mpsc::RecvTimeoutError> {
    let until = Instant::now() + IDLE_SPIN;
    while Instant::now() < until {
        match inbox.try_recv() {
            Ok(command) => return Ok(command),
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(mpsc::RecvTimeoutError::Disconnected)
            }
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    inbox
        .recv()
        .map_err(|_| mpsc::RecvTimeoutError::Disconnected)
}

/// How long an idle engine thread looks for its next command before it
/// sleeps.
const IDLE_SPIN: Duration = Duration::from_micros(50);

/// The next command, waiting at most `wait` (not at all when zero).
fn receive(
    inbox: &mpsc::Receiver<Command>,
    wait: Duration,
) -> Result<Command, mpsc::RecvTimeoutError> {
    if wait.is_zero() {
        inbox.try_recv().map_err(|err| match err {
            mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
            mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
        })
    } else {
        inbox.recv_timeout(wait)
    }
}

impl Serving {
    fn new(factory: EngineFactory, reports: UnboundedSender<EngineReport>, knock: Knock) -> Self {
        // Every request fails with the reason the engine could not start.
        let mut engine = match catch_unwind(AssertUnwindSafe(|| factory())) {
            Ok(result) => result.map_err(Arc::new),
            Err(panic) => Err(Arc::new(GeniusError::engine(format!(
                "the engine panicked while starting: {}",
                panic_message(&panic)
            )))),
        };
        match &mut engine {
            Ok(engine) => engine.listen(knock.clone()),
            Err(err) => log::error!("{err}"),
        }
        Self {
            engine,
            knock,
            waiting: VecDeque::new(),
            started: Vec::new(),
            reports,
            stats_sent: (EngineStats::default(), Instant::now()),
        }
    }

    /// Serves commands until the handle is dropped and the work is done,
    /// then unloads. Engine code runs only inside the exit gate, which a
    /// thread leaves while it waits for commands.
    fn serve(mut self, inbox: mpsc::Receiver<Command>) {
        let mut paused = false;
        let mut open = true;
        loop {
            let busy = !self.waiting.is_empty() || self.running() > 0;
            if !busy && !open {
                break;
            }
            if paused && !open {
                std::thread::sleep(PAUSED_POLL);
            }
            // Block for a command when there is nothing else to do; when
            // every running request waits on its consumer, look again soon.
            let received = if !open {
                Err(mpsc::RecvTimeoutError::Disconnected)
            } else if !busy {
                wait_for_command(&inbox)
            } else if paused {
                receive(&inbox, PAUSED_POLL)
            } else {
                receive(&inbox, Duration::ZERO)
            };
            let _inside = exit::enter();
            match received {
                Ok(command) => {
                    open &= self.handle(command);
                    // Whatever else has arrived joins this step: requests
                    // sent together start together. Nothing waits for more
                    // to come; one arriving during the step joins the next.
                    while open {
                        match receive(&inbox, Duration::ZERO) {
                            Ok(command) => open &= self.handle(command),
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
            if !open {
                // The Orchestrator is gone: nothing may outlive it.
                self.cancel_everything();
            }
            self.admit();
            paused = self.step().is_some_and(|step| !step.progressed);
            self.report_stats();
        }
        let _inside = exit::enter();
        self.stop();
        // The engine (and its model) is freed inside the gate too.
        drop(self);
    }

    /// Cancels every running request and fails every waiting one.
    fn cancel_everything(&mut self) {
        for (_, cancel) in &self.started {
            cancel.cancel();
        }
        self.fail_all(|| GeniusError::ShutDown);
    }

    fn stop(&mut self) {
        self.fail_all(|| GeniusError::EngineGone);
        if let Ok(engine) = &mut self.engine {
            let _ = guarded(engine.as_mut(), |engine| {
                engine.unload();
                Ok(())
            });
        }
    }

    fn running(&self) -> usize {
        self.engine.as_ref().map_or(0, |engine| engine.running())
    }

    /// Carries out one command; `false` when the reports have no reader.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Load { name, path } => {
                let report = match &mut self.engine {
                    Ok(engine) => {
                        if engine.running() > 0 {
                            // The Orchestrator loads only when idle; running
                            // requests would lose their model.
                            let _ = guarded(engine.as_mut(), |engine| {
                                engine.unload();
                                Ok(())
                            });
                        }
                        let loaded = guarded(engine.as_mut(), |engine| engine.load(&name, &path));
                        self.forget_started();
                        loaded
                    }
                    Err(err) => Err(not_started(err)),
                };
                self.reports
                    .unbounded_send(EngineReport::Loaded(report))
                    .is_ok()
            }
            Command::Unload => {
                self.fail_all(|| GeniusError::NoModelLoaded);
                if let Ok(engine) = &mut self.engine {
                    let _ = guarded(engine.as_mut(), |engine| {
                        engine.unload();
                        Ok(())
                    });
                }
                self.forget_started();
                true
            }
            Command::Submit(request) if matches!(request.prompt, Prompt::Tokens(_)) => {
                // Takes no place and no step: answered now.
                self.knock.taken();
                self.answer_tokens(*request);
                true
            }
            Command::Submit(request) => {
                self.waiting.push_back(*request);
                self.knock.taken();
                true
            }
        }
    }

    /// Answers a question about the model's tokens or template.
    fn answer_tokens(&mut self, request: Request) {
        let Request {
            id,
            prompt,
            config,
            mut output,
            ..
        } = request;
        let Prompt::Tokens(query) = prompt else {
            return;
        };
        let answer = match &mut self.engine {
            Ok(engine) => guarded(engine.as_mut(), |engine| engine.tokens(&query, &config)),
            Err(err) => Err(not_started(err)),
        };
        match answer {
            Ok(answer) => {
                output.send(InferenceEvent::Tokens(answer));
                output.end(Ok(Usage::nothing(FinishReason::EndOfGeneration)));
            }
            Err(err) => output.end(Err(err)),
        }
        self.report(EngineReport::Ended(id));
    }

    /// Starts waiting requests while the engine has room.
    fn admit(&mut self) {
        loop {
            let room = match &self.engine {
                Ok(engine) => engine.running() < engine.capacity(),
                Err(_) => true,
            };
            if !room {
                return;
            }
            let Some(mut request) = self.waiting.pop_front() else {
                return;
            };
            let id = request.id;
            if request.output.check_cancelled().is_some() {
                // Cancelled while it waited: it ends without running.
                request
                    .output
                    .end(Ok(Usage::nothing(FinishReason::Cancelled)));
                self.report(EngineReport::Ended(id));
                continue;
            }
            let engine = match &mut self.engine {
                Ok(engine) => engine,
                Err(err) => {
                    request.output.end(Err(not_started(err)));
                    self.report(EngineReport::Ended(id));
                    continue;
                }
            };
            // ProcessStart goes out once the engine has accepted the
            // request; a refused one ends with its error alone.
            let accepted = request.output.hold_start();
            let cancel = request.output.cancel_token();
            let started = catch_unwind(AssertUnwindSafe(|| engine.start(request)));
            match started {
                Ok(Ok(())) => {
                    accepted.accepted();
                    self.started.push((id, cancel));
                    self.report(EngineReport::Started(id));
                }
                Ok(Err(mut refused)) => {
                    refused.output.end(Err(refused.error));
                    self.report(EngineReport::Ended(id));
                }
                Err(panic) => {
                    // The request went down with the engine's state.
                    self.panicked(&panic);
                    self.report(EngineReport::Ended(id));
                }
            }
        }
    }

    /// One step of the engine, ending what ended; `None` when nothing runs.
    fn step(&mut self) -> Option<Step> {
        let engine = self.engine.as_mut().ok()?;
        if engine.running() == 0 {
            return None;
        }
        let ids_before = engine.running();
        match catch_unwind(AssertUnwindSafe(|| engine.step())) {
            Ok(mut step) => {
                for ended in step.ended.drain(..) {
                    self.end(ended);
                }
                Some(Step {
                    ended: Vec::new(),
                    progressed: step.progressed,
                })
            }
            Err(panic) => {
                log::error!("{ids_before} running requests were lost");
                self.panicked(&panic);
                Some(Step::default())
            }
        }
    }

    fn end(&mut self, mut ended: Ended) {
        ended.output.end(ended.result);
        self.started.retain(|(id, _)| *id != ended.id);
        self.report(EngineReport::Ended(ended.id));
    }

    /// The engine panicked: its state cannot be trusted, so it unloads
    /// (which drops its running requests; their streams end with an error)
    /// and the waiting requests fail.
    fn panicked(&mut self, panic: &Box<dyn std::any::Any + Send>) {
        let message = format!("the engine panicked: {}", panic_message(panic));
        log::error!("{message}");
        if let Ok(engine) = &mut self.engine {
            let _ = catch_unwind(AssertUnwindSafe(|| engine.discard()));
        }
        for (id, _) in std::mem::take(&mut self.started) {
            self.report(EngineReport::Ended(id));
        }
        self.fail_all(|| GeniusError::engine(message.clone()));
    }

    /// Reports as ended the requests an unload dropped.
    fn forget_started(&mut self) {
        if self.running() == 0 {
            for (id, _) in std::mem::take(&mut self.started) {
                self.report(EngineReport::Ended(id));
            }
        }
    }

    /// Ends every waiting request with the error `err` makes.
    fn fail_all(&mut self, err: impl Fn() -> GeniusError) {
        for mut request in std::mem::take(&mut self.waiting) {
            request.output.end(Err(err()));
            self.report(EngineReport::Ended(request.id));
        }
    }

    /// Reports the engine's stats if they changed, and either nothing runs
    /// or the last report is [`STATS_EVERY`] old.
    fn report_stats(&mut self) {
        let Ok(engine) = &self.engine else {
            return;
        };
        let due = self.running() == 0 || self.stats_sent.1.elapsed() >= STATS_EVERY;
        if !due {
            return;
        }
        let stats = match catch_unwind(AssertUnwindSafe(|| engine.stats())) {
            Ok(stats) => stats,
            Err(_) => return,
        };
        if stats != self.stats_sent.0 {
            self.stats_sent = (stats, Instant::now());
            self.report(EngineReport::Stats(stats));
        }
    }

    fn report(&self, report: EngineReport) {
        let _ = self.reports.unbounded_send(report);
    }
}

fn not_started(err: &Arc<GeniusError>) -> GeniusError {
    GeniusError::engine_from("the engine could not start", err.clone())
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
            let _ = catch_unwind(AssertUnwindSafe(|| engine.discard()));
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

/// Waits `delay`, or returns early once `cancel` is set; Pinky's way of
/// being a slow model that still stops at once.
pub(crate) fn sleep_unless(delay: Duration, cancel: impl Fn() -> bool) {
    let until = Instant::now() + delay;
    while Instant::now() < until && !cancel() {
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(2)));
    }
}
