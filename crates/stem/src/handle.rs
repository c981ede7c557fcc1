//! Many requests at once: a cloneable handle to a running Orchestrator,
//! and a stream of its own events for every request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::channel::{mpsc, oneshot};
use futures::Stream;
use rusty_genius_core::manifest::{ModelInfo, ModelStatus};
use rusty_genius_core::metrics::Metrics;
use rusty_genius_core::protocol::{BrainstemOutput, FinishReason, InferenceEvent, Usage};
use rusty_genius_core::tokens::{TokenAnswer, TokenQuery};
use rusty_genius_core::{
    ChatMessage, Embed, Embeddings, ErrorReport, GeniusError, InferenceConfig, Infill, Prompt,
};
use rusty_genius_cortex::{CancelToken, EventSink, RequestId};

/// What handles ask of the Orchestrator's loop.
pub(crate) enum Command {
    /// Answer a request.
    Submit(Submission),
    /// Load a model and make it the default; `done` hears how it went.
    Load { name: String, done: LoadDone },
    /// Unload a model once it is idle; `done` hears whether it was loaded.
    Unload { name: String, done: UnloadDone },
    /// List the models the loop knows of.
    Models(ModelsDone),
    /// Report what has been measured.
    Metrics(MetricsDone),
    /// Hear every status and download event too.
    Listen(Listener),
    /// End every running and queued request, then the loop.
    Shutdown,
}

/// A request as a handle sends it, kept as one value until the engine
/// takes it: its events go to `sink`, and `cancel` ends it early.
pub(crate) struct Submission {
    pub(crate) id: RequestId,
    pub(crate) prompt: Prompt,
    pub(crate) config: Box<InferenceConfig>,
    pub(crate) sink: Box<dyn EventSink>,
    pub(crate) cancel: CancelToken,
}

impl Submission {
    /// The model the request names, if it names one.
    pub(crate) fn model(&self) -> Option<&str> {
        match &self.prompt {
            Prompt::Embed(embed) => embed.model.as_deref(),
            _ => self.config.model.as_deref(),
        }
    }

    /// The keep-alive the request asks for, if any.
    pub(crate) fn keep_alive(&self) -> Option<std::time::Duration> {
        match &self.prompt {
            Prompt::Embed(embed) => embed.keep_alive,
            _ => self.config.keep_alive,
        }
    }

    /// Answers the request with `err` alone.
    pub(crate) fn fail(self, err: GeniusError) {
        self.fail_shared(&Arc::new(err));
    }

    /// Ends a request whose client went away before it ran: it did
    /// nothing, and says so.
    pub(crate) fn cancelled(mut self) {
        log::debug!("request {}: cancelled while queued", self.id);
        self.sink.send(Ok(InferenceEvent::Usage(Usage::nothing(
            FinishReason::Cancelled,
        ))));
        self.sink.send(Ok(InferenceEvent::Complete));
    }

    /// Fails with an error other requests share (one load failure ends
    /// every request that waited for it, each with the error itself).
    pub(crate) fn fail_shared(mut self, err: &Arc<GeniusError>) {
        log::warn!("request {}: {err}", self.id);
        self.sink.send(Err(ErrorReport::shared(err)));
    }
}

/// Hears how a load went.
pub(crate) type LoadDone = Box<dyn FnOnce(Result<ModelInfo, ErrorReport>) + Send>;

/// Hears how an unload went: whether the model was loaded.
pub(crate) type UnloadDone = Box<dyn FnOnce(Result<bool, ErrorReport>) + Send>;

/// Hears the list of models.
pub(crate) type ModelsDone = Box<dyn FnOnce(Vec<ModelStatus>) + Send>;

/// Hears the figures measured.
pub(crate) type MetricsDone = Box<dyn FnOnce(Metrics) + Send>;

/// Hears status and download events; `false` once it stopped listening.
pub(crate) type Listener = Box<dyn FnMut(BrainstemOutput) -> bool + Send>;

/// A handle to a running Orchestrator, for any number of tasks at once.
///
/// Cheap to clone. Every request gets a [`RequestStream`] of its own
/// events; requests run together, as many at once as the engine decodes
/// together (`parallel`), the others wait their turn. The loop ends when
/// every handle and stream is gone and nothing runs, or at
/// [`shutdown`](Self::shutdown).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::StreamExt;
/// use rusty_genius_core::protocol::InferenceEvent;
/// use rusty_genius_core::InferenceConfig;
/// use rusty_genius_stem::Orchestrator;
///
/// let genius = Orchestrator::new().await?.start();
/// genius.load("qwen-2.5-0.5b-instruct").await?;
/// let mut a = genius.infer("Name a colour.", InferenceConfig::default());
/// let mut b = genius.infer("Name a fruit.", InferenceConfig::default());
/// while let Some(event) = a.next().await {
///     if let InferenceEvent::Content(text) = event? {
///         print!("{text}");
///     }
/// }
/// # drop(b); Ok(()) }
/// ```
#[derive(Clone)]
pub struct OrchestratorHandle {
    commands: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    /// Completes (with `Canceled`) when the loop has ended.
    stopped: futures::future::Shared<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for OrchestratorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrchestratorHandle")
            .field("running", &!self.commands.is_closed())
            .finish_non_exhaustive()
    }
}

impl OrchestratorHandle {
    /// A handle sending to `commands`; `stopped` is dropped by the loop
    /// once it has ended and every engine has unloaded.
    pub(crate) fn new(
        commands: mpsc::UnboundedSender<Command>,
        stopped: oneshot::Receiver<()>,
    ) -> Self {
        Self {
            commands,
            next_id: Arc::new(AtomicU64::new(1)),
            stopped: futures::FutureExt::shared(stopped),
        }
    }

    /// Answers `prompt` (see `BrainstemInput::Infer`).
    pub fn infer(&self, prompt: impl Into<String>, config: InferenceConfig) -> RequestStream {
        self.submit(Prompt::Text(prompt.into()), config)
    }

    /// Answers a conversation (see `BrainstemInput::Chat`).
    pub fn chat(&self, messages: Vec<ChatMessage>, config: InferenceConfig) -> RequestStream {
        self.submit(Prompt::Chat(messages), config)
    }

    /// Fills in the middle between a prefix and a suffix (code completion
    /// at a cursor; see [`Infill`]), with the model `config` names.
    pub fn infill(&self, infill: Infill, config: InferenceConfig) -> RequestStream {
        self.submit(Prompt::Infill(infill), config)
    }

    /// Embeds texts (see `BrainstemInput::Embed`): the stream carries one
    /// [`InferenceEvent::Embeddings`], then `Usage` and `Complete`.
    pub fn embed(&self, request: Embed) -> RequestStream {
        self.submit(Prompt::Embed(request), InferenceConfig::default())
    }

    /// Embeds texts and returns the vectors, one per input, in order.
    pub async fn embeddings(&self, request: Embed) -> Result<Embeddings, ErrorReport> {
        use futures::StreamExt;
        let mut stream = self.embed(request);
        let mut found = None;
        while let Some(event) = stream.next().await {
            match event? {
                InferenceEvent::Embeddings(embeddings) => found = Some(embeddings),
                InferenceEvent::Complete => break,
                _ => {}
            }
        }
        found.ok_or_else(|| GeniusError::engine("the engine answered without embeddings").report())
    }

    /// Answers a question about the tokens or chat template of the model
    /// `config` names (or the default model): tokenizes, detokenizes or
    /// renders a conversation (with `config`'s tools), without generating.
    /// The model is loaded first if it is not.
    pub async fn tokens(
        &self,
        query: TokenQuery,
        config: InferenceConfig,
    ) -> Result<TokenAnswer, ErrorReport> {
        use futures::StreamExt;
        let mut stream = self.submit(Prompt::Tokens(query), config);
        let mut found = None;
        while let Some(event) = stream.next().await {
            match event? {
                InferenceEvent::Tokens(answer) => found = Some(answer),
                InferenceEvent::Complete => break,
                _ => {}
            }
        }
        found.ok_or_else(|| GeniusError::engine("the engine answered without tokens").report())
    }

    /// Answers `prompt`, a text or a conversation.
    pub fn submit(&self, prompt: Prompt, config: InferenceConfig) -> RequestStream {
        let id = self.next_id();
        let (sink, stream) = request_channel(id);
        self.submit_to(id, prompt, config, Box::new(sink), stream.cancel.clone());
        stream
    }

    /// Sends a request whose events go to `sink`. If the loop has ended
    /// (shut down, or every handle dropped before), the request is
    /// answered as one that came too late.
    pub(crate) fn submit_to(
        &self,
        id: RequestId,
        prompt: Prompt,
        config: InferenceConfig,
        sink: Box<dyn EventSink>,
        cancel: CancelToken,
    ) {
        let submitted = self.commands.unbounded_send(Command::Submit(Submission {
            id,
            prompt,
            config: Box::new(config),
            sink,
            cancel,
        }));
        if let Err(refused) = submitted {
            if let Command::Submit(submission) = refused.into_inner() {
                submission.fail(GeniusError::ShutDown);
            }
        }
    }

    /// Loads a model (a path, registry name or HuggingFace id) and makes
    /// it the default: requests that name no model, sent after this, go
    /// to it (and wait for it to load). Models loaded before stay loaded
    /// as the [`Residency`](crate::Residency) allows. Download progress
    /// and status changes go to [`events`](Self::events) listeners.
    pub async fn load(&self, name: &str) -> Result<ModelInfo, ErrorReport> {
        let name = name.to_owned();
        self.ask(|done| Command::Load { name, done }).await?
    }

    /// Unloads the model requests know as `name` once the requests it is
    /// answering and those queued for it are done; `Ok(true)` once it
    /// is unloaded, `Ok(false)` if it was not loaded. The next request
    /// for it loads it again. A name the Orchestrator has never seen is
    /// `ModelNotFound`.
    pub async fn unload(&self, name: &str) -> Result<bool, ErrorReport> {
        let name = name.to_owned();
        self.ask(|done| Command::Unload { name, done }).await?
    }

    /// The models the Orchestrator knows of: loaded, loading, waiting for
    /// room, or unloaded after use; the default model first. Answered at
    /// once, whatever is loading.
    pub async fn models(&self) -> Result<Vec<ModelStatus>, ErrorReport> {
        self.ask(Command::Models).await
    }

    /// What the Orchestrator has measured since it started, per model:
    /// requests and how they ended, tokens read (and of them, served from
    /// the cache) and generated, latencies, loads and unloads, and each
    /// engine's KV cache and saved caches as it last reported them (see
    /// [`Metrics`]). Answered at once, whatever runs.
    pub async fn metrics(&self) -> Result<Metrics, ErrorReport> {
        self.ask(Command::Metrics).await
    }

    /// Sends the command `make` builds around a callback, and waits for
    /// the loop to call it; `ShutDown` if the loop has ended (or ends
    /// without answering).
    async fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> Command,
    ) -> Result<T, ErrorReport> {
        let (done, answer) = oneshot::channel();
        let command = make(Box::new(move |result| {
            let _ = done.send(result);
        }));
        if self.commands.unbounded_send(command).is_err() {
            return Err(GeniusError::ShutDown.report());
        }
        answer.await.map_err(|_| GeniusError::ShutDown.report())
    }

    /// Every status change (`Loading`, `Loaded`, `Hibernated`, ...) and
    /// download event from now on.
    pub fn events(&self) -> impl Stream<Item = BrainstemOutput> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        let _ = self
            .commands
            .unbounded_send(Command::Listen(Box::new(move |output| {
                tx.unbounded_send(output).is_ok()
            })));
        rx
    }

    /// Ends the Orchestrator: running requests are cancelled (each still
    /// ends with `Complete`), queued ones answered with a `ShutDown` error.
    pub fn shutdown(&self) {
        let _ = self.commands.unbounded_send(Command::Shutdown);
    }

    /// Completes once the Orchestrator's loop has ended (after
    /// [`shutdown`](Self::shutdown), or when every handle is gone) and
    /// every engine has unloaded its model, saving what it saves as it
    /// does (the llama.cpp engine's KV snapshots). A program that shuts
    /// down waits for this before it exits.
    pub async fn stopped(&self) {
        let _ = self.stopped.clone().await;
    }

    pub(crate) fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn send(&self, command: Command) -> bool {
        self.commands.unbounded_send(command).is_ok()
    }
}

/// The events of one request, from `ProcessStart` to `Complete`, or its
/// error; then the stream ends.
///
/// Dropping it cancels the request (and no other): the engine stops within
/// a token. A stream read slowly holds up only its own request: up to
/// [`MAX_BACKLOG`](rusty_genius_cortex::MAX_BACKLOG) events wait for it,
/// then its generation pauses (keeping its place and cache) until it is
/// read again.
pub struct RequestStream {
    id: RequestId,
    events: mpsc::UnboundedReceiver<Result<InferenceEvent, ErrorReport>>,
    backlog: Arc<AtomicUsize>,
    cancel: CancelToken,
    ended: bool,
}

impl std::fmt::Debug for RequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestStream")
            .field("id", &self.id)
            .field("backlog", &self.backlog.load(Ordering::Relaxed))
            .field("ended", &self.ended)
            .finish()
    }
}

impl RequestStream {
    /// The request's id.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Stops this request's generation early (like `Stop`): the stream
    /// still ends with `Usage` and `Complete`.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Stream for RequestStream {
    type Item = Result<InferenceEvent, ErrorReport>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.events).poll_next(cx) {
            Poll::Ready(Some(item)) => {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
                if matches!(item, Ok(InferenceEvent::Complete) | Err(_)) {
                    self.ended = true;
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                // The engine dropped the request without answering it (it
                // stopped or failed): say so once.
                self.ended = true;
                Poll::Ready(Some(Err(GeniusError::EngineGone.report())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel.cancel();
        }
    }
}

/// A request's side of its events' channel: counts what waits to be read,
/// and ends the request with `EngineGone` if it is dropped unanswered
/// (its engine stopped). `T` is what the channel carries: a request's own
/// stream takes the events as they are; the channel API wraps them into
/// its one ordered queue.
pub(crate) struct ChannelSink<T> {
    tx: mpsc::UnboundedSender<T>,
    wrap: fn(Result<InferenceEvent, ErrorReport>) -> T,
    backlog: Arc<AtomicUsize>,
    ended: bool,
}

impl<T> ChannelSink<T> {
    /// A sink into `tx`, and the count of what it sent that is not yet
    /// read (the reader takes one off for every item it reads).
    pub(crate) fn new(
        tx: mpsc::UnboundedSender<T>,
        wrap: fn(Result<InferenceEvent, ErrorReport>) -> T,
    ) -> (Self, Arc<AtomicUsize>) {
        let backlog = Arc::new(AtomicUsize::new(0));
        let sink = ChannelSink {
            tx,
            wrap,
            backlog: backlog.clone(),
            ended: false,
        };
        (sink, backlog)
    }
}

impl<T: Send> EventSink for ChannelSink<T> {
    fn send(&mut self, event: Result<InferenceEvent, ErrorReport>) -> bool {
        self.ended |= matches!(event, Ok(InferenceEvent::Complete) | Err(_));
        self.backlog.fetch_add(1, Ordering::Relaxed);
        self.tx.unbounded_send((self.wrap)(event)).is_ok()
    }

    fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }
}

impl<T> Drop for ChannelSink<T> {
    fn drop(&mut self) {
        if !self.ended {
            self.backlog.fetch_add(1, Ordering::Relaxed);
            let _ = self
                .tx
                .unbounded_send((self.wrap)(Err(GeniusError::EngineGone.report())));
        }
    }
}

/// A request's sink and stream.
pub(crate) fn request_channel(
    id: RequestId,
) -> (
    ChannelSink<Result<InferenceEvent, ErrorReport>>,
    RequestStream,
) {
    let (tx, events) = mpsc::unbounded();
    let (sink, backlog) = ChannelSink::new(tx, |event| event);
    let stream = RequestStream {
        id,
        events,
        backlog,
        cancel: CancelToken::default(),
        ended: false,
    };
    (sink, stream)
}
