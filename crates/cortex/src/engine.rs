//! The engine trait and the output handle engines write tokens to.

use std::path::Path;

use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, TokenLogprobs, Usage};
use rusty_genius_core::{GeniusError, InferenceConfig, Prompt};

use crate::text::TextPipeline;
use crate::tools::ToolSyntax;

/// An inference engine: loads one model at a time and completes prompts.
///
/// Methods block; an engine is always driven from its own thread (see
/// [`EngineThread`](crate::EngineThread)), never from an async executor.
/// Engines need not be `Send`: they are created on the thread that uses them.
pub trait Engine {
    /// Loads the model file at `path`, replacing any loaded model. `name`
    /// is how the user asked for it, for reports.
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError>;

    /// Frees the loaded model, if any.
    fn unload(&mut self);

    /// Answers `prompt` (a text or a conversation), writing tokens to
    /// `output` until the model ends its answer, a limit of `config` is
    /// reached, or `output` says stop.
    ///
    /// Returns the usage of the request; its `finish_reason` says which of
    /// those happened (the engine thread turns an answer that made tool
    /// calls into [`FinishReason::ToolCalls`]).
    fn infer(
        &mut self,
        prompt: &Prompt,
        config: &InferenceConfig,
        output: &mut Output<'_>,
    ) -> Result<Usage, GeniusError>;
}

/// Where an engine writes the tokens it generates.
///
/// `Output` turns token bytes into [`InferenceEvent`]s (UTF-8 reassembly,
/// stop sequences, `<think>` tags) and tells the engine when to stop: a stop
/// sequence was reached, or the consumer cancelled or went away.
pub struct Output<'a> {
    pipeline: TextPipeline,
    events: Vec<InferenceEvent>,
    sink: &'a mut dyn FnMut(InferenceEvent) -> bool,
    cancelled: &'a dyn Fn() -> bool,
    finished: Option<FinishReason>,
}

impl<'a> Output<'a> {
    /// Creates an output for one request. `sink` receives each event and
    /// returns `false` once nobody listens; `cancelled` is polled per token.
    pub fn new(
        config: &InferenceConfig,
        sink: &'a mut dyn FnMut(InferenceEvent) -> bool,
        cancelled: &'a dyn Fn() -> bool,
    ) -> Self {
        Self {
            pipeline: TextPipeline::new(&config.stop),
            events: Vec::new(),
            sink,
            cancelled,
            finished: None,
        }
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
    /// content and reports them as [`InferenceEvent::ToolCall`]s. Engines
    /// call this before generating when the request offers tools.
    pub fn parse_tool_calls(&mut self, syntax: ToolSyntax) {
        self.pipeline.parse_tool_calls(syntax);
    }

    /// How many tool calls the answer made so far.
    pub fn tool_calls(&self) -> usize {
        self.pipeline.tool_calls()
    }

    /// Reports the log-probabilities of the token about to be pushed (when
    /// the request asked for them). Sent as it is, ahead of any text the
    /// pipeline still holds back.
    pub fn logprobs(&mut self, logprobs: TokenLogprobs) {
        if !(self.sink)(InferenceEvent::Logprobs(logprobs)) {
            self.finished.get_or_insert(FinishReason::Cancelled);
        }
    }

    /// Whether the consumer asked to stop (or went away). Engines should
    /// also poll this during long prompt processing.
    pub fn check_cancelled(&mut self) -> Option<FinishReason> {
        if self.finished.is_none() && (self.cancelled)() {
            self.finished = Some(FinishReason::Cancelled);
        }
        self.finished
    }

    /// Releases text held back for tag or stop-sequence matching. Called by
    /// the engine thread when the engine returns; engines need not call it.
    pub fn finish(&mut self) {
        let stopped = self.finished == Some(FinishReason::StopSequence);
        self.pipeline.finish(stopped, &mut self.events);
        self.flush();
    }

    /// The reason recorded by [`push`](Self::push), if generation was cut
    /// short by the output side.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    fn flush(&mut self) {
        for event in self.events.drain(..) {
            if !(self.sink)(event) {
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
        Err(err) => return Err(err.into()),
    };
    if !file.metadata()?.is_file() {
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
