//! The engine trait and the output handle engines write tokens to.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::metrics::EngineStats;
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, TokenLogprobs, Usage};
use rusty_genius_core::tokens::{TokenAnswer, TokenQuery};
use rusty_genius_core::{ErrorReport, GeniusError, InferenceConfig, Limits, Prompt};

use crate::cancel::CancelToken;
use crate::text::TextPipeline;
use crate::tools::ToolSyntax;

/// An inference engine: loads one model at a time and answers requests,
/// several at once if it can.
///
/// The engine thread drives it: it [`start`](Self::start)s requests while
/// fewer than [`capacity`](Self::capacity) run, and calls
/// [`step`](Self::step) while any run; each step advances every running
/// request a little (a token, a chunk of a new prompt) and hands back those
/// that ended. An engine writes each request's tokens to its [`Output`] and
/// watches it: a request whose output is cancelled ends within a step, and
/// one whose consumer lags ([`Output::is_paused`]) waits, holding its
/// place, while the others go on.
///
/// Methods block; an engine always runs on its own thread (see
/// [`EngineThread`](crate::EngineThread)), never on an async executor.
/// Engines need not be `Send`: they are created on the thread that uses them.
pub trait Engine {
    /// Loads the model file at `path`, replacing any loaded model. `name`
    /// is how the user asked for it, for reports. Called only while no
    /// request runs.
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError>;

    /// Frees the loaded model, if any, and drops every running request
    /// (their consumers see their streams end without an answer).
    fn unload(&mut self);

    /// Frees the loaded model like [`unload`](Self::unload), but after a
    /// panic, when nothing the engine holds can be trusted: an engine that
    /// saves state as it unloads (the llama.cpp engine's KV snapshots) must
    /// not save it here. Default: `unload`.
    fn discard(&mut self) {
        self.unload();
    }

    /// How many requests it serves at once. Default 1.
    fn capacity(&self) -> usize {
        1
    }

    /// How many requests are running.
    fn running(&self) -> usize;

    /// Takes `request`: checks it, tokenizes it, gives it a place. A
    /// request it refuses comes back with the reason; nothing of it ran.
    fn start(&mut self, request: Request) -> Result<(), Box<Refused>>;

    /// Advances every running request that is not paused; returns those
    /// that ended, and whether anything moved.
    fn step(&mut self) -> Step;

    /// Called once, after the engine is made: `knock` is raised while a
    /// request is on its way to the engine. An engine whose step can stop
    /// early (a long prompt alone, which gives nobody a token) may stop it
    /// then, so that the newcomer does not wait for the whole step.
    /// Default: not heard.
    fn listen(&mut self, knock: Knock) {
        let _ = knock;
    }

    /// How the engine stands (its KV cache, its saved caches) and what it
    /// has done since it was made. Called between steps, so it must be
    /// cheap. Default: nothing measured.
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// Answers a question about the loaded model's tokens or template
    /// (`Prompt::Tokens`), at once, between steps. Default: not answered.
    fn tokens(
        &mut self,
        query: &TokenQuery,
        config: &InferenceConfig,
    ) -> Result<TokenAnswer, GeniusError> {
        let _ = (query, config);
        Err(GeniusError::invalid_request(
            "prompt",
            "this engine does not answer questions about tokens",
        ))
    }
}

/// Tells an engine mid-step that a request is on its way: counts the
/// requests sent to the engine thread and those it has taken in.
#[derive(Debug, Clone, Default)]
pub struct Knock(Arc<KnockCounts>);

#[derive(Debug, Default)]
struct KnockCounts {
    sent: AtomicU64,
    taken: AtomicU64,
}

impl Knock {
    /// A request is about to be sent (called before sending it, so that
    /// the knock is heard until the engine thread has taken it in).
    pub fn sending(&self) {
        self.0.sent.fetch_add(1, Ordering::AcqRel);
    }

    /// The engine thread took a request in.
    pub fn taken(&self) {
        self.0.taken.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a request was sent that the engine thread has not taken in.
    pub fn is_raised(&self) -> bool {
        // `taken` first: a request taken after this read and sent before
        // the next only makes `sent` larger.
        let taken = self.0.taken.load(Ordering::Acquire);
        self.0.sent.load(Ordering::Acquire) > taken
    }
}

/// Identifies a request for as long as it runs.
pub type RequestId = u64;

/// One request, as the engine receives it.
pub struct Request {
    /// Its id, unique in the Orchestrator.
    pub id: RequestId,
    /// What to answer.
    pub prompt: Prompt,
    /// How.
    pub config: InferenceConfig,
    /// The bounds it was checked against; the engine checks those only it
    /// can count (the tokens of texts to embed) before it starts work.
    pub limits: Limits,
    /// Where its events go.
    pub output: Output,
}

/// A request the engine did not start, and why.
pub struct Refused {
    /// The request's output, to send the error through.
    pub output: Output,
    /// Why.
    pub error: GeniusError,
}

/// A request that ended.
pub struct Ended {
    /// The request's id.
    pub id: RequestId,
    /// Its output, to send the end through.
    pub output: Output,
    /// Its usage (the finish reason says why it ended), or its error.
    pub result: Result<Usage, GeniusError>,
}

/// What one [`Engine::step`] did.
#[derive(Default)]
pub struct Step {
    /// The requests that ended in this step.
    pub ended: Vec<Ended>,
    /// Whether any request moved (false when every running one is paused).
    pub progressed: bool,
}

/// Where a request's events go: a stream's channel, usually.
pub trait EventSink: Send + Sync {
    /// Delivers one event (or the request's error); `false` once nobody
    /// listens.
    fn send(&mut self, event: Result<InferenceEvent, ErrorReport>) -> bool;

    /// Events delivered but not yet taken by the consumer; a request whose
    /// backlog passes [`MAX_BACKLOG`] pauses until the consumer catches up.
    fn backlog(&self) -> usize {
        0
    }
}

impl EventSink for Box<dyn EventSink> {
    fn send(&mut self, event: Result<InferenceEvent, ErrorReport>) -> bool {
        (**self).send(event)
    }

    fn backlog(&self) -> usize {
        (**self).backlog()
    }
}

/// How many events may wait for a slow consumer before its request pauses.
/// A paused request keeps its place and cache; the others go on.
pub const MAX_BACKLOG: usize = 256;

/// Where an engine writes the tokens it generates for one request.
///
/// `Output` turns token bytes into [`InferenceEvent`]s (UTF-8 reassembly,
/// stop sequences, `<think>` tags, tool calls) and tells the engine when
/// to stop (a stop sequence was reached, the consumer cancelled or went
/// away) or to wait (the consumer lags).
pub struct Output {
    pipeline: TextPipeline,
    events: Vec<InferenceEvent>,
    delivery: Arc<Mutex<Delivery>>,
    cancel: CancelToken,
    finished: Option<FinishReason>,
    /// Whether the request's end (`Complete` or an error) was sent.
    closed: bool,
}

/// Where an output's events go, with its `ProcessStart` while it is held
/// back (see [`Output::hold_start`]).
struct Delivery {
    sink: Box<dyn EventSink>,
    start_held: bool,
}

impl Delivery {
    fn send(&mut self, event: Result<InferenceEvent, ErrorReport>) -> bool {
        if self.start_held {
            self.start_held = false;
            if event.is_ok() && !self.sink.send(Ok(InferenceEvent::ProcessStart)) {
                return false;
            }
        }
        self.sink.send(event)
    }
}

/// Sends a request's held-back `ProcessStart` once the engine has accepted
/// it (see [`Output::hold_start`]).
pub struct StartSignal(Arc<Mutex<Delivery>>);

impl StartSignal {
    /// The engine accepted the request: `ProcessStart` goes out now, unless
    /// an event of the request already took it along.
    pub fn accepted(self) {
        let mut delivery = lock(&self.0);
        if delivery.start_held {
            delivery.start_held = false;
            delivery.sink.send(Ok(InferenceEvent::ProcessStart));
        }
    }
}

/// The delivery, even if a panic elsewhere left its lock poisoned (its
/// state is a flag and a channel: never half-written).
fn lock(delivery: &Mutex<Delivery>) -> std::sync::MutexGuard<'_, Delivery> {
    delivery
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Output {
    /// An output for one request, delivering to `sink`; `cancel` ends it.
    pub fn new(
        config: &InferenceConfig,
        sink: impl EventSink + 'static,
        cancel: CancelToken,
    ) -> Self {
        Self {
            pipeline: TextPipeline::new(&config.stop, config.min_indent),
            events: Vec::new(),
            delivery: Arc::new(Mutex::new(Delivery {
                sink: Box::new(sink),
                start_held: false,
            })),
            cancel,
            finished: None,
            closed: false,
        }
    }

    /// Holds this request's [`InferenceEvent::ProcessStart`] until the
    /// engine accepts it: the returned signal sends it then (or the
    /// request's first event takes it along, if the engine sends one
    /// first). A request the engine refuses ends with its error alone, so
    /// a consumer knows, from `ProcessStart`, that the request was checked
    /// and is being worked on.
    pub fn hold_start(&mut self) -> StartSignal {
        lock(&self.delivery).start_held = true;
        StartSignal(self.delivery.clone())
    }

    /// Writes the bytes of one generated token. Returns `Some(reason)` when
    /// generation must end now; the token was still counted as output.
    pub fn push(&mut self, token_bytes: &[u8]) -> Option<FinishReason> {
        if let Some(reason) = self.finished {
            return Some(reason);
        }
        if self.pipeline.push(token_bytes, &mut self.events) {
            self.finished = Some(FinishReason::StopSequence);
        }
        self.flush();
        self.check_cancelled()
    }

    /// From now on, takes tool calls written in `syntax` out of the
    /// content and reports them as [`InferenceEvent::ToolCall`]s; with
    /// [`InferenceConfig::json_tool_calls`], so is an answer that is only
    /// a JSON call of one of `config.tools`. Engines call this before
    /// generating when the request offers tools.
    ///
    /// A call without markup that repeats one `prompt` already made and
    /// got a result for since its last user message is not read as a new
    /// call: small models often echo the call they made instead of
    /// answering with its result.
    pub fn parse_tool_calls(
        &mut self,
        syntax: ToolSyntax,
        config: &InferenceConfig,
        prompt: &Prompt,
    ) {
        let without_markup = config
            .json_tool_calls
            .then(|| (config.tools.as_slice(), answered_calls(prompt)));
        self.pipeline.parse_tool_calls(syntax, without_markup);
    }

    /// How many tool calls the answer made so far.
    pub fn tool_calls(&self) -> usize {
        self.pipeline.tool_calls()
    }

    /// Reports the log-probabilities of the token about to be pushed (when
    /// the request asked for them). Sent as it is, ahead of any text the
    /// pipeline still holds back.
    pub fn logprobs(&mut self, logprobs: TokenLogprobs) {
        self.send(InferenceEvent::Logprobs(logprobs));
    }

    /// Sends an event straight to the consumer.
    pub fn send(&mut self, event: InferenceEvent) {
        if !lock(&self.delivery).send(Ok(event)) {
            self.finished.get_or_insert(FinishReason::Cancelled);
        }
    }

    /// Whether the consumer asked to stop (or went away). Engines should
    /// also poll this during long prompt processing.
    pub fn check_cancelled(&mut self) -> Option<FinishReason> {
        if self.finished.is_none() && self.cancel.is_cancelled() {
            self.finished = Some(FinishReason::Cancelled);
        }
        self.finished
    }

    /// Whether the request is to end at its next step: it was cancelled,
    /// its consumer went away, or its output finished it (a stop
    /// sequence).
    pub fn must_end(&self) -> bool {
        self.finished.is_some() || self.cancel.is_cancelled()
    }

    /// A handle that cancels this request.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Whether the consumer lags so far behind that the request should
    /// wait before producing more.
    pub fn is_paused(&self) -> bool {
        lock(&self.delivery).sink.backlog() > MAX_BACKLOG
    }

    /// The reason recorded by [`push`](Self::push), if generation was cut
    /// short by the output side.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Ends the request: releases held-back text, then sends `Usage` and
    /// `Complete`, or the error. An answer that made tool calls ends with
    /// [`FinishReason::ToolCalls`]. Called once, by the engine thread.
    pub fn end(&mut self, result: Result<Usage, GeniusError>) {
        if self.closed {
            return;
        }
        self.closed = true;
        let stopped = self.finished == Some(FinishReason::StopSequence);
        self.pipeline.finish(stopped, &mut self.events);
        self.flush();
        match result {
            Ok(mut usage) => {
                let ended_by_model = matches!(
                    usage.finish_reason,
                    FinishReason::EndOfGeneration | FinishReason::StopSequence
                );
                if self.tool_calls() > 0 && ended_by_model {
                    usage.finish_reason = FinishReason::ToolCalls;
                }
                let mut delivery = lock(&self.delivery);
                delivery.send(Ok(InferenceEvent::Usage(usage)));
                delivery.send(Ok(InferenceEvent::Complete));
            }
            Err(err) => {
                log::warn!("{err}");
                // A held ProcessStart is dropped: the request never ran.
                lock(&self.delivery).send(Err(err.into()));
            }
        }
    }

    fn flush(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let mut delivery = lock(&self.delivery);
        for event in self.events.drain(..) {
            if !delivery.send(Ok(event)) {
                self.finished.get_or_insert(FinishReason::Cancelled);
            }
        }
    }
}

/// Checks that `path` is an existing file that starts with the GGUF magic,
/// so that a wrong file gets a clear error before any engine touches it.
pub fn check_gguf(path: &Path) -> Result<(), GeniusError> {
    use std::io::Read;

    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(GeniusError::FileNotFound {
                path: path.to_path_buf(),
            })
        }
        Err(err) => return Err(GeniusError::io(path, err)),
    };
    let metadata = file.metadata().map_err(|err| GeniusError::io(path, err))?;
    if !metadata.is_file() {
        return Err(GeniusError::InvalidModelFile {
            path: path.to_path_buf(),
            reason: "it is a directory, not a file".into(),
        });
    }
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(()),
        Ok(()) => Err(GeniusError::InvalidModelFile {
            path: path.to_path_buf(),
            reason:
                "it does not start with the GGUF magic bytes (is it a safetensors or other format?)"
                    .into(),
        }),
        Err(_) => Err(GeniusError::InvalidModelFile {
            path: path.to_path_buf(),
            reason: "the file is too short to be a model".into(),
        }),
    }
}

/// Milliseconds elapsed since `start`, for [`Usage`] timings.
pub(crate) fn millis_since(start: std::time::Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

/// How many leading prompt tokens a cache holding `cached` can keep: the
/// common prefix, less the last prompt token, which is always decoded
/// again because the first generated token is sampled from its logits.
pub(crate) fn reusable_prefix<T: PartialEq>(cached: &[T], prompt: &[T]) -> usize {
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prompt.len().saturating_sub(1))
}

/// The calls (name, arguments) of `prompt`'s conversation since its last
/// user message that have a tool result.
fn answered_calls(prompt: &Prompt) -> crate::tools::AnsweredCalls {
    let Prompt::Chat(messages) = prompt else {
        return Vec::new();
    };
    let since = messages
        .iter()
        .rposition(|m| m.role == rusty_genius_core::Role::User)
        .map_or(0, |at| at + 1);
    let recent = &messages[since..];
    let answered = |id: &str| {
        recent.iter().any(|m| {
            m.role == rusty_genius_core::Role::Tool && m.tool_call_id.as_deref() == Some(id)
        })
    };
    recent
        .iter()
        .flat_map(|m| &m.tool_calls)
        .filter(|call| answered(&call.id))
        .map(|call| {
            let arguments = serde_json::from_str(&call.function.arguments)
                .unwrap_or_else(|_| serde_json::Value::String(call.function.arguments.clone()));
            (call.function.name.clone(), arguments)
        })
        .collect()
}
