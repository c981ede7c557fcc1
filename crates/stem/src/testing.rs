//! A client that drives an Orchestrator over its channels, for tests
//! (feature `testing`).
//!
//! It starts [`Orchestrator::run`] on the channels the README shows, sends
//! requests, and gathers what comes back into a [`Reply`]: the text, the
//! usage, errors, status changes and, when asked for, each token's
//! log-probabilities, from which [`Reply::margins`] tells how firmly a
//! greedy answer was chosen.

use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius_core::protocol::{
    BrainstemInput, BrainstemOutput, EngineStatus, InferenceEvent, ThoughtEvent, TokenLogprobs,
    Usage,
};
use rusty_genius_core::{ErrorReport, InferenceConfig};

use crate::Orchestrator;

/// The smallest margin, in logits, by which a greedy real-model answer
/// must have chosen each token that decides an expected text over the
/// runner-up, for the expectation to hold on every CPU. fixtures/README.md
/// gives the measurements behind the number.
pub const MIN_MARGIN: f32 = 1.0;

/// Prompts for gemma-3-270m (a base model) whose greedy continuations
/// run on for many tokens: counting, the alphabet, weekdays. Most are firm
/// on most CPUs, but margins move by about 0.3 logits from one CPU's
/// kernels to another's, so a test that compares answers across batches
/// measures them where it runs and keeps those that are firm there
/// ([`Reply::smallest_margin`] of at least [`MIN_MARGIN`]).
pub const SEQUENCE_PROMPTS: [&str; 10] = [
    "1, 2, 3, 4, 5, 6, 7,",
    "A B C D E F G",
    "100, 99, 98, 97, 96,",
    "2, 4, 6, 8, 10,",
    "10, 20, 30, 40, 50,",
    "Monday, Tuesday, Wednesday,",
    "a b c d e f g",
    "5, 10, 15, 20, 25,",
    "January, February, March, April,",
    "one, two, three, four,",
];

/// How long a client waits for any one output before it gives up.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// Drives one running Orchestrator.
pub struct TestClient {
    input: mpsc::Sender<BrainstemInput>,
    output: mpsc::Receiver<BrainstemOutput>,
    running: Option<async_std::task::JoinHandle<()>>,
    timeout: Duration,
}

/// Why the client could not get what it waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// Nothing arrived in time; what did arrive is listed.
    Timeout(String),
    /// The Orchestrator closed its output (or its input).
    Closed,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout(seen) => write!(f, "no end in time; saw {seen}"),
            Self::Closed => f.write_str("the Orchestrator closed its channels"),
        }
    }
}

impl std::error::Error for ClientError {}

impl TestClient {
    /// Spawns `orchestrator.run` on channels of the README's sizes.
    pub fn start(mut orchestrator: Orchestrator) -> Self {
        let (input, rx) = mpsc::channel(100);
        let (tx, output) = mpsc::channel(100);
        let running = async_std::task::spawn(async move { orchestrator.run(rx, tx).await });
        Self {
            input,
            output,
            running: Some(running),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Waits at most `timeout` for each output (default 180 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends one input.
    pub async fn send(&mut self, input: BrainstemInput) -> Result<(), ClientError> {
        self.input
            .send(input)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next output, `Ok(None)` when the Orchestrator has ended.
    pub async fn next(&mut self) -> Result<Option<BrainstemOutput>, ClientError> {
        async_std::future::timeout(self.timeout, self.output.next())
            .await
            .map_err(|_| ClientError::Timeout("nothing".into()))
    }

    /// Sends `LoadModel(name)` and reads until `Loaded` or an error.
    pub async fn load(&mut self, name: &str) -> Result<Reply, ClientError> {
        self.send(BrainstemInput::LoadModel(name.to_owned()))
            .await?;
        self.read_until(Reply::ends_load, None).await
    }

    /// Sends `Infill` and reads its reply, until `Complete` or an error.
    pub async fn infill(
        &mut self,
        infill: rusty_genius_core::Infill,
        config: InferenceConfig,
    ) -> Result<Reply, ClientError> {
        self.send(BrainstemInput::Infill { infill, config }).await?;
        self.reply().await
    }

    /// Sends `Infer` and reads its reply, until `Complete` or an error.
    pub async fn infer(
        &mut self,
        prompt: &str,
        config: InferenceConfig,
    ) -> Result<Reply, ClientError> {
        self.send(BrainstemInput::Infer {
            prompt: prompt.to_owned(),
            config,
        })
        .await?;
        self.reply().await
    }

    /// Sends `Chat` and reads its reply, until `Complete` or an error.
    pub async fn chat(
        &mut self,
        messages: Vec<rusty_genius_core::ChatMessage>,
        config: InferenceConfig,
    ) -> Result<Reply, ClientError> {
        self.send(BrainstemInput::Chat { messages, config }).await?;
        self.reply().await
    }

    /// Reads one request's reply: until `Complete` or an error.
    pub async fn reply(&mut self) -> Result<Reply, ClientError> {
        self.read_until(Reply::ends_request, None).await
    }

    /// Reads outputs until `done` holds for one (it is included); with
    /// `stop_after`, sends `Stop` once that many `Content` events came.
    pub async fn read_until(
        &mut self,
        done: impl Fn(&BrainstemOutput) -> bool,
        stop_after: Option<usize>,
    ) -> Result<Reply, ClientError> {
        let mut reply = Reply::default();
        let mut stopped = false;
        loop {
            let next = async_std::future::timeout(self.timeout, self.output.next())
                .await
                .map_err(|_| ClientError::Timeout(reply.event_list()))?
                .ok_or(ClientError::Closed)?;
            let finished = done(&next);
            reply.record(next);
            if !stopped && stop_after.is_some_and(|n| reply.content_events >= n) {
                stopped = true;
                self.send(BrainstemInput::Stop).await?;
            }
            if finished {
                return Ok(reply);
            }
        }
    }

    /// Everything that arrives within `period`.
    pub async fn gather_for(&mut self, period: Duration) -> Reply {
        let mut reply = Reply::default();
        let deadline = Instant::now() + period;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match async_std::future::timeout(left, self.output.next()).await {
                Ok(Some(output)) => reply.record(output),
                _ => return reply,
            }
        }
    }

    /// The output receiver, for tests that read it their own way (or drop
    /// it: that ends the Orchestrator).
    pub fn output(&mut self) -> &mut mpsc::Receiver<BrainstemOutput> {
        &mut self.output
    }

    /// Splits the client into its channels and the running loop.
    pub fn into_parts(
        mut self,
    ) -> (
        mpsc::Sender<BrainstemInput>,
        mpsc::Receiver<BrainstemOutput>,
        async_std::task::JoinHandle<()>,
    ) {
        let running = self.running.take().expect("the loop is running");
        let (dead_input, _) = mpsc::channel(1);
        let (_, dead_output) = mpsc::channel(1);
        let input = std::mem::replace(&mut self.input, dead_input);
        let output = std::mem::replace(&mut self.output, dead_output);
        (input, output, running)
    }

    /// Sends `Shutdown` and returns every output until the Orchestrator
    /// ended, or an error if it did not end within the timeout.
    pub async fn shutdown(mut self) -> Result<Reply, ClientError> {
        let _ = self.input.send(BrainstemInput::Shutdown).await;
        let mut reply = Reply::default();
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match async_std::future::timeout(left, self.output.next()).await {
                Ok(Some(output)) => reply.record(output),
                Ok(None) => break,
                Err(_) => return Err(ClientError::Timeout(reply.event_list())),
            }
        }
        if let Some(running) = self.running.take() {
            let left = deadline.saturating_duration_since(Instant::now());
            async_std::future::timeout(left, running)
                .await
                .map_err(|_| ClientError::Timeout("the loop did not return".into()))?;
        }
        Ok(reply)
    }
}

/// What came back for one request (or in one period), in order.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Every output, as received.
    pub outputs: Vec<BrainstemOutput>,
    /// The answer: all `Content` joined.
    pub text: String,
    /// All reasoning (`Thought` deltas) joined.
    pub thought: String,
    /// How many `Content` events made up `text`.
    pub content_events: usize,
    /// The request's usage, if it got that far.
    pub usage: Option<Usage>,
    /// Errors, in order.
    pub errors: Vec<ErrorReport>,
    /// Engine status changes, in order.
    pub statuses: Vec<EngineStatus>,
    /// Each generated token's log-probabilities, when they were asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// The tool calls, in order: id, name, arguments.
    pub tool_calls: Vec<(String, String, serde_json::Value)>,
    /// Whether `Complete` arrived.
    pub completed: bool,
}

impl Reply {
    /// Whether `output` ends a load: `Loaded` or an error.
    pub fn ends_load(output: &BrainstemOutput) -> bool {
        matches!(
            output,
            BrainstemOutput::Status(EngineStatus::Loaded(_)) | BrainstemOutput::Error(_)
        )
    }

    /// Whether `output` ends a request: `Complete` or an error.
    pub fn ends_request(output: &BrainstemOutput) -> bool {
        matches!(
            output,
            BrainstemOutput::Event(InferenceEvent::Complete) | BrainstemOutput::Error(_)
        )
    }

    /// Adds one output.
    pub fn record(&mut self, output: BrainstemOutput) {
        match &output {
            BrainstemOutput::Event(InferenceEvent::Content(text)) => {
                self.text.push_str(text);
                self.content_events += 1;
            }
            BrainstemOutput::Event(InferenceEvent::Thought(ThoughtEvent::Delta(text))) => {
                self.thought.push_str(text)
            }
            BrainstemOutput::Event(InferenceEvent::Logprobs(logprobs)) => {
                self.logprobs.push(logprobs.clone())
            }
            BrainstemOutput::Event(InferenceEvent::Usage(usage)) => {
                self.usage = Some(usage.clone())
            }
            BrainstemOutput::Event(InferenceEvent::ToolCall {
                id,
                name,
                arguments,
            }) => self
                .tool_calls
                .push((id.clone(), name.clone(), arguments.clone())),
            BrainstemOutput::Event(InferenceEvent::Complete) => self.completed = true,
            BrainstemOutput::Error(report) => self.errors.push(report.clone()),
            BrainstemOutput::Status(status) => self.statuses.push(status.clone()),
            _ => {}
        }
        self.outputs.push(output);
    }

    /// The usage; panics (with the reply) when there is none.
    pub fn usage(&self) -> &Usage {
        self.usage
            .as_ref()
            .unwrap_or_else(|| panic!("no usage in {self:#?}"))
    }

    /// The first error, if any.
    pub fn error(&self) -> Option<&ErrorReport> {
        self.errors.first()
    }

    /// The names of the outputs in order, runs of one kind shortened
    /// (`Content×12`), for messages.
    pub fn event_list(&self) -> String {
        let mut names: Vec<(String, usize)> = Vec::new();
        for output in &self.outputs {
            let name = output_name(output);
            match names.last_mut() {
                Some((last, count)) if *last == name => *count += 1,
                _ => names.push((name.to_owned(), 1)),
            }
        }
        let names: Vec<String> = names
            .into_iter()
            .map(|(name, count)| match count {
                1 => name,
                n => format!("{name}×{n}"),
            })
            .collect();
        if names.is_empty() {
            "nothing".into()
        } else {
            names.join(", ")
        }
    }

    /// For each generated token, in order: its text and the margin by which
    /// the model preferred its first choice over its second, in logits
    /// (the difference of their log-probabilities). Needs the request's
    /// `logprobs` with `top_logprobs` of at least 2; a token without two
    /// alternatives has an infinite margin.
    ///
    /// A greedy answer that rests on a small margin can come out otherwise
    /// on another CPU, whose kernels round differently. A token that is
    /// not the model's own first choice was forced by a grammar (a JSON
    /// schema, a required tool call): the grammar, not the rounding,
    /// decided it, and its margin counts as infinite.
    pub fn margins(&self) -> Vec<(String, f32)> {
        self.margins_of(false)
    }

    /// [`margins`](Self::margins) for an expectation on JSON (tool calls, a
    /// schema's answer). A choice between two tokens made of nothing but
    /// JSON punctuation and whitespace, where the non-blank characters of
    /// one begin those of the other (`{"` or `{` then a newline, `":"` or
    /// `":`), is a choice of layout and token boundaries: both lead to the
    /// same JSON, so it counts as firm.
    pub fn json_margins(&self) -> Vec<(String, f32)> {
        self.margins_of(true)
    }

    fn margins_of(&self, json: bool) -> Vec<(String, f32)> {
        self.logprobs
            .iter()
            .map(|token| {
                let margin = match token.top_logprobs.as_slice() {
                    [first, _, ..] if first.bytes != token.bytes => f32::INFINITY,
                    [first, second, ..] if json && same_json(&first.token, &second.token) => {
                        f32::INFINITY
                    }
                    [first, second, ..] => first.logprob - second.logprob,
                    _ => f32::INFINITY,
                };
                (token.token.clone(), margin)
            })
            .collect()
    }

    /// Panics unless the answer contains `needle` and every token up to
    /// the end of its first occurrence was chosen by at least
    /// [`MIN_MARGIN`] (the request needs `logprobs` with `top_logprobs` 2).
    pub fn assert_contains_firmly(&self, needle: &str) {
        let Some(at) = self.text.find(needle) else {
            panic!("{needle:?} is not in the answer {:?}", self.text);
        };
        let margins = self.margins_through(at + needle.len());
        assert!(
            !margins.is_empty(),
            "no log-probabilities: ask with InferenceConfig::with_logprobs(2)"
        );
        report_margin(&format!("{needle:?}"), &margins);
        let weak: Vec<_> = margins
            .iter()
            .filter(|(_, margin)| *margin < MIN_MARGIN)
            .collect();
        assert!(
            weak.is_empty(),
            "{needle:?} rests on near ties that another CPU may break otherwise: {weak:?} in {:?}",
            self.text
        );
    }

    /// Panics unless every generated token was chosen by at least
    /// [`MIN_MARGIN`]: for an expectation that every token decides.
    pub fn assert_all_firm(&self) {
        self.assert_firm(self.margins());
    }

    /// [`assert_all_firm`](Self::assert_all_firm) for JSON, such as a tool
    /// call: choices of layout alone do not count (see
    /// [`json_margins`](Self::json_margins)).
    pub fn assert_json_firm(&self) {
        self.assert_firm(self.json_margins());
    }

    /// [`assert_json_firm`](Self::assert_json_firm) from the `skip`th
    /// generated token on, for an answer whose first tokens are a choice
    /// the test has judged on its own.
    pub fn assert_json_firm_after(&self, skip: usize) {
        self.assert_firm(self.json_margins().into_iter().skip(skip).collect());
    }

    fn assert_firm(&self, margins: Vec<(String, f32)>) {
        assert!(
            !self.logprobs.is_empty(),
            "no log-probabilities: ask with InferenceConfig::with_logprobs(2)"
        );
        report_margin(&format!("all of {:?}", self.text), &margins);
        let weak: Vec<_> = margins
            .into_iter()
            .filter(|(_, margin)| *margin < MIN_MARGIN)
            .collect();
        assert!(
            weak.is_empty(),
            "the output rests on near ties that another CPU may break otherwise: {weak:?}"
        );
    }

    /// The smallest margin of all generated tokens (see
    /// [`margins`](Self::margins)); `None` without log-probabilities.
    pub fn smallest_margin(&self) -> Option<f32> {
        self.margins()
            .into_iter()
            .map(|(_, margin)| margin)
            .min_by(f32::total_cmp)
    }

    /// The tokens that produce the first `bytes` bytes of the generated
    /// text, with their margins (see [`margins`](Self::margins)).
    pub fn margins_through(&self, bytes: usize) -> Vec<(String, f32)> {
        self.through(self.margins(), bytes)
    }

    /// [`json_margins`](Self::json_margins) of the tokens that produce the
    /// first `bytes` bytes.
    pub fn json_margins_through(&self, bytes: usize) -> Vec<(String, f32)> {
        self.through(self.json_margins(), bytes)
    }

    fn through(&self, margins: Vec<(String, f32)>, bytes: usize) -> Vec<(String, f32)> {
        let mut start = 0;
        margins
            .into_iter()
            .zip(&self.logprobs)
            .take_while(|(_, token)| {
                let inside = start < bytes;
                start += token.bytes.len();
                inside
            })
            .map(|(margin, _)| margin)
            .collect()
    }
}

/// Whether two tokens differ only in JSON layout: both are JSON
/// punctuation and whitespace alone, and the non-blank characters of one
/// begin those of the other.
fn same_json(a: &str, b: &str) -> bool {
    let structural = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_whitespace() || matches!(c, '{' | '}' | '[' | ']' | '"' | ':' | ','))
    };
    if !structural(a) || !structural(b) {
        return false;
    }
    let (a, b): (String, String) = (
        a.chars().filter(|c| !c.is_whitespace()).collect(),
        b.chars().filter(|c| !c.is_whitespace()).collect(),
    );
    a.starts_with(&b) || b.starts_with(&a)
}

/// Writes the smallest of `margins` to the test log ("margin: ..."), so
/// that a run shows how much headroom each expectation had on its CPU.
#[allow(clippy::print_stderr)] // the test log is where it belongs
fn report_margin(what: &str, margins: &[(String, f32)]) {
    if let Some((token, smallest)) = margins.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
        eprintln!("margin: smallest {smallest:.2} at {token:?} for {what}");
    }
}

/// The short name of an output, as fixtures and messages write it.
pub fn output_name(output: &BrainstemOutput) -> &'static str {
    match output {
        BrainstemOutput::Event(event) => match event {
            InferenceEvent::ProcessStart => "ProcessStart",
            InferenceEvent::Thought(ThoughtEvent::Start) => "ThoughtStart",
            InferenceEvent::Thought(ThoughtEvent::Delta(_)) => "ThoughtDelta",
            InferenceEvent::Thought(ThoughtEvent::Stop) => "ThoughtStop",
            InferenceEvent::Content(_) => "Content",
            InferenceEvent::Logprobs(_) => "Logprobs",
            InferenceEvent::ToolCall { .. } => "ToolCall",
            InferenceEvent::Usage(_) => "Usage",
            InferenceEvent::Complete => "Complete",
            _ => "Event",
        },
        BrainstemOutput::Error(_) => "Error",
        BrainstemOutput::Status(status) => match status {
            EngineStatus::Loading(_) => "Loading",
            EngineStatus::Loaded(_) => "Loaded",
            EngineStatus::Hibernated(_) => "Hibernated",
            EngineStatus::Unloaded => "Unloaded",
            _ => "Status",
        },
        BrainstemOutput::Asset(asset) => match asset {
            rusty_genius_core::protocol::AssetEvent::Started(_) => "AssetStarted",
            rusty_genius_core::protocol::AssetEvent::Progress(..) => "AssetProgress",
            rusty_genius_core::protocol::AssetEvent::Complete(_) => "AssetComplete",
            rusty_genius_core::protocol::AssetEvent::Error(_) => "AssetError",
            _ => "Asset",
        },
        _ => "Output",
    }
}

/// Wraps an engine and keeps the [`Usage`] of every inference it ran, as
/// the engine counted it, so a test can see what happened even when no
/// output reached anyone (a dropped receiver, a cancelled stream).
pub struct RecordingEngine<E> {
    inner: E,
    usages: std::sync::Arc<std::sync::Mutex<Vec<Usage>>>,
    peak: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
}

/// The shared list a [`RecordingEngine`] writes to.
pub type Usages = std::sync::Arc<std::sync::Mutex<Vec<Usage>>>;

impl<E> RecordingEngine<E> {
    /// Wraps `inner`, recording into `usages`.
    pub fn new(inner: E, usages: Usages) -> Self {
        Self {
            inner,
            usages,
            peak: None,
        }
    }

    /// Also keeps in `peak` the most requests that ever ran at once.
    pub fn with_peak(mut self, peak: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        self.peak = Some(peak);
        self
    }
}

impl<E: rusty_genius_cortex::Engine> rusty_genius_cortex::Engine for RecordingEngine<E> {
    fn load(
        &mut self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<rusty_genius_core::manifest::ModelInfo, rusty_genius_core::GeniusError> {
        self.inner.load(name, path)
    }

    fn unload(&mut self) {
        self.inner.unload()
    }

    fn discard(&mut self) {
        self.inner.discard()
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn running(&self) -> usize {
        self.inner.running()
    }

    fn start(
        &mut self,
        request: rusty_genius_cortex::Request,
    ) -> Result<(), Box<rusty_genius_cortex::Refused>> {
        let started = self.inner.start(request);
        if let Some(peak) = &self.peak {
            peak.fetch_max(self.inner.running(), std::sync::atomic::Ordering::Relaxed);
        }
        started
    }

    fn step(&mut self) -> rusty_genius_cortex::Step {
        let step = self.inner.step();
        let mut usages = self.usages.lock().unwrap();
        for ended in &step.ended {
            if let Ok(usage) = &ended.result {
                usages.push(usage.clone());
            }
        }
        step
    }
}

/// Waits up to `limit` for `usages` to hold at least `count` entries, and
/// returns them.
pub async fn wait_for_usages(usages: &Usages, count: usize, limit: Duration) -> Vec<Usage> {
    let deadline = Instant::now() + limit;
    loop {
        let seen = usages.lock().unwrap().clone();
        if seen.len() >= count || Instant::now() >= deadline {
            return seen;
        }
        async_std::task::sleep(Duration::from_millis(10)).await;
    }
}

/// One request's events read from its [`RequestStream`], with when the
/// first and last pieces of text arrived.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// The events, as a [`Reply`].
    pub reply: Reply,
    /// When the first `Content` arrived.
    pub first_content: Option<Instant>,
    /// When the stream ended.
    pub ended: Instant,
}

/// Reads `stream` to its end (or until `limit` passes), recording it.
pub async fn read_stream(stream: crate::RequestStream, limit: Duration) -> Streamed {
    read_stream_with(stream, limit, |_| {}).await
}

/// As [`read_stream`], calling `each` with every event as it arrives.
pub async fn read_stream_with(
    mut stream: crate::RequestStream,
    limit: Duration,
    mut each: impl FnMut(&BrainstemOutput),
) -> Streamed {
    let deadline = Instant::now() + limit;
    let mut streamed = Streamed {
        reply: Reply::default(),
        first_content: None,
        ended: Instant::now(),
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(next) = async_std::future::timeout(left, stream.next()).await else {
            let seen = streamed.reply.event_list();
            panic!(
                "request {} did not end in {limit:?}; saw {seen}",
                stream.id()
            );
        };
        let Some(item) = next else { break };
        let output = match item {
            Ok(event) => BrainstemOutput::Event(event),
            Err(report) => BrainstemOutput::Error(report),
        };
        if matches!(output, BrainstemOutput::Event(InferenceEvent::Content(_))) {
            streamed.first_content.get_or_insert_with(Instant::now);
        }
        each(&output);
        streamed.reply.record(output);
    }
    streamed.ended = Instant::now();
    streamed
}

/// The events `stream` already holds, taken without waiting for more: what
/// the engine sent that the reader has not read yet.
pub fn ready_events(
    stream: &mut crate::RequestStream,
) -> Vec<Result<InferenceEvent, rusty_genius_core::ErrorReport>> {
    use futures::FutureExt;
    let mut ready = Vec::new();
    while let Some(Some(event)) = stream.next().now_or_never() {
        ready.push(event);
    }
    ready
}
