//! Messages exchanged between an application and the Orchestrator.
//!
//! The application sends [`BrainstemInput`]s and receives a stream of
//! [`BrainstemOutput`]s. Requests are handled one at a time, in the order
//! they were sent; outputs of one request never interleave with another's.
//! Every `Infer` ends in exactly one [`InferenceEvent::Complete`] or one
//! [`BrainstemOutput::Error`].

use serde::{Deserialize, Serialize};

use crate::{ChatMessage, Embed, Embeddings, ErrorReport, InferenceConfig};

/// A request to the Orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrainstemInput {
    /// Load a model: a path to a `.gguf` file, a registry name or a
    /// HuggingFace id (resolved and fetched by facecrab).
    LoadModel(String),
    /// Answer `prompt` with the loaded model. If the model was hibernated
    /// it is loaded again first.
    Infer {
        /// The text to answer or complete. With the default
        /// [`PromptFormat::Auto`](crate::PromptFormat::Auto) it is sent as
        /// one user turn in the model's chat template (when the model has
        /// one); with [`PromptFormat::Raw`](crate::PromptFormat::Raw)
        /// exactly as given.
        prompt: String,
        /// Sampling and stopping settings.
        config: InferenceConfig,
    },
    /// Answer the conversation `messages` with the loaded model, rendered
    /// by the model's own chat template. The answer is the next assistant
    /// message: `Content`, or `ToolCall`s when `config.tools` are offered.
    Chat {
        /// The conversation so far, OpenAI-style.
        messages: Vec<ChatMessage>,
        /// Sampling, stopping, tools and output format.
        config: InferenceConfig,
    },
    /// Embed texts with the loaded model: answered with one
    /// [`InferenceEvent::Embeddings`] (one vector per input, in order),
    /// then `Usage` and `Complete`. An embedding model (BERT-style) uses
    /// its own pooling; a generative model needs [`Embed::pooling`].
    Embed(Embed),
    /// Fill in the middle between a prefix and a suffix (code completion;
    /// see [`Infill`](crate::Infill)), answered as `Infer` is.
    Infill {
        /// The code around the cursor, and the project's files.
        infill: crate::Infill,
        /// Sampling and stopping settings.
        #[serde(default)]
        config: InferenceConfig,
    },
    /// End the generation in progress early. Its output still ends with
    /// [`InferenceEvent::Usage`] and [`InferenceEvent::Complete`]. Requests
    /// queued behind it are kept. Without a generation, does nothing.
    Stop,
    /// End the Orchestrator's loop now: the generation in progress is
    /// cancelled (it still ends with `Usage` and `Complete`), every queued
    /// request is answered with an [`ErrorKind::ShutDown`](crate::ErrorKind)
    /// error, and the model is unloaded. Closing the input channel instead
    /// lets the queued requests run to their end first.
    Shutdown,
}

/// Something the Orchestrator reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BrainstemOutput {
    /// Progress of an inference.
    Event(InferenceEvent),
    /// Progress of resolving or downloading a model.
    Asset(AssetEvent),
    /// A request failed: its [`ErrorKind`](crate::ErrorKind) and a message
    /// saying why and what to do. The Orchestrator keeps running.
    Error(ErrorReport),
    /// The engine changed state (loaded, hibernated, ...).
    Status(EngineStatus),
}

/// The stream of one inference, from `ProcessStart` to `Complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum InferenceEvent {
    /// The engine accepted the request (its prompt, settings, tools and
    /// format are checked) and is processing its prompt. A request refused
    /// before this ends with its error alone; once it has come, errors are
    /// rare (a failed decode).
    ProcessStart,
    /// Reasoning the model wrapped in `<think>...</think>`.
    Thought(ThoughtEvent),
    /// A piece of the answer. Pieces are valid UTF-8 and concatenate to
    /// the whole answer.
    Content(String),
    /// How likely the token just generated was, and its likeliest
    /// alternatives; only when [`InferenceConfig::logprobs`] is set. Sent
    /// when the token is chosen, before its text appears in `Content`
    /// (text can be held back a little to match stop sequences and tags).
    Logprobs(TokenLogprobs),
    /// The model called a tool. Sent once the call is complete; the
    /// call's markup never appears in `Content`.
    ToolCall {
        /// The call's id, for the tool result's `tool_call_id`.
        id: String,
        /// The function's name.
        name: String,
        /// Its arguments (a JSON object).
        arguments: serde_json::Value,
    },
    /// The vectors of an `Embed` request, one per input, in order.
    Embeddings(Embeddings),
    /// The answer to a [`TokenQuery`](crate::tokens::TokenQuery).
    Tokens(crate::tokens::TokenAnswer),
    /// Token counts and timings of the request; sent just before `Complete`.
    Usage(Usage),
    /// The answer is finished.
    Complete,
}

/// One generated token's log-probability, from the model's distribution
/// before any sampling filter, and the most likely tokens at its place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token's id in the model's vocabulary (what `logit_bias` and
    /// token-id inputs take).
    #[serde(default)]
    pub id: u32,
    /// The token's text (invalid UTF-8, as in a token holding part of a
    /// character, is shown as U+FFFD).
    pub token: String,
    /// The token's exact bytes.
    pub bytes: Vec<u8>,
    /// Its natural-log probability.
    pub logprob: f32,
    /// The [`InferenceConfig::top_logprobs`] most likely tokens at this
    /// place, most likely first (the chosen one among them when it ranks).
    /// When a grammar holds the answer (a JSON schema, a required tool
    /// call), these are the most likely tokens the grammar allowed there.
    pub top_logprobs: Vec<TopLogprob>,
}

/// A likely token at one place of the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's id in the model's vocabulary.
    #[serde(default)]
    pub id: u32,
    /// The token's text (lossy, as in [`TokenLogprobs::token`]).
    pub token: String,
    /// The token's exact bytes.
    pub bytes: Vec<u8>,
    /// Its natural-log probability.
    pub logprob: f32,
}

/// Reasoning output, wrapped by the model in `<think>` tags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThoughtEvent {
    /// `<think>` was seen.
    Start,
    /// A piece of reasoning text.
    Delta(String),
    /// `</think>` was seen (or the output ended inside a thought).
    Stop,
}

/// Progress of making a model available locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AssetEvent {
    /// Work on the named model began.
    Started(String),
    /// Bytes downloaded so far, and the total (0 when unknown).
    Progress(u64, u64),
    /// The model is ready at this local path.
    Complete(String),
    /// Resolving or downloading failed.
    Error(String),
}

/// A change of the engine's lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EngineStatus {
    /// Loading the model with this name (as requested) into memory.
    Loading(String),
    /// The model is loaded and ready.
    Loaded(String),
    /// The `CortexStrategy` (or the model's requests' `keep_alive`)
    /// unloaded the model after its idle time, or after an inference with
    /// `Immediate`; the next request for it loads it again by itself.
    Hibernated(String),
    /// No model is loaded: a load failed.
    Unloaded,
    /// `name` was unloaded to make room for `for_model` (the least
    /// recently used idle model goes first); a request for it loads it
    /// again.
    Evicted {
        /// The model unloaded.
        name: String,
        /// The model it made room for.
        for_model: String,
    },
    /// The model was unloaded because it was asked to be
    /// (`OrchestratorHandle::unload`).
    Released(String),
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The output reached one of the stop sequences.
    StopSequence,
    /// The context window is full.
    ContextFull,
    /// `Stop` was sent or the output receiver was dropped.
    Cancelled,
    /// The model ended its answer with tool calls.
    ToolCalls,
}

/// Token counts and timings of one inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose state was already in the cache and so were not
    /// decoded again.
    pub cached_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Tokens guessed ahead and checked (speculative decoding); those the
    /// model chose too are `accepted_draft_tokens`, the rest were thrown
    /// away. Of `generated_tokens`, the accepted ones cost no step of
    /// their own.
    #[serde(default)]
    pub draft_tokens: usize,
    /// Tokens guessed ahead that the model chose too.
    #[serde(default)]
    pub accepted_draft_tokens: usize,
    /// Time spent decoding the uncached part of the prompt, in milliseconds.
    pub prompt_ms: f64,
    /// Time spent generating, in milliseconds.
    pub generation_ms: f64,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

impl Usage {
    /// The usage of a request that read and generated nothing (refused
    /// work, a question answered without decoding, a request given up
    /// while it waited), ended for `finish_reason`.
    pub fn nothing(finish_reason: FinishReason) -> Self {
        Self {
            prompt_tokens: 0,
            cached_tokens: 0,
            generated_tokens: 0,
            draft_tokens: 0,
            accepted_draft_tokens: 0,
            prompt_ms: 0.0,
            generation_ms: 0.0,
            finish_reason,
        }
    }

    /// Generated tokens per second (0 when nothing was generated).
    pub fn generation_tokens_per_second(&self) -> f64 {
        if self.generation_ms > 0.0 {
            self.generated_tokens as f64 * 1000.0 / self.generation_ms
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_json() {
        let inputs = [
            BrainstemInput::LoadModel("org/repo:Q4_K_M".into()),
            BrainstemInput::Infer {
                prompt: "hi".into(),
                config: InferenceConfig::greedy().with_stop("\n"),
            },
            BrainstemInput::Stop,
        ];
        for input in inputs {
            let json = serde_json::to_string(&input).unwrap();
            assert_eq!(
                serde_json::from_str::<BrainstemInput>(&json).unwrap(),
                input
            );
        }
        let output =
            BrainstemOutput::Event(InferenceEvent::Thought(ThoughtEvent::Delta("x".into())));
        let json = serde_json::to_string(&output).unwrap();
        assert_eq!(
            serde_json::from_str::<BrainstemOutput>(&json).unwrap(),
            output
        );
    }
}
