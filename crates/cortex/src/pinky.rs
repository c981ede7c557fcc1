//! Pinky: a deterministic stub engine for testing orchestration.

use std::path::Path;
use std::time::{Duration, Instant};

use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, TokenLogprobs, TopLogprob, Usage};
use rusty_genius_core::{
    Embed, EmbedInput, Embeddings, GeniusError, InferenceConfig, Limits, Prompt, Role, ToolChoice,
};

use crate::engine::{
    check_gguf, millis_since, reusable_prefix, Ended, Engine, Output, Refused, Request, RequestId,
    Step,
};
use crate::thread::sleep_unless;
use crate::tools::ToolSyntax;

/// The context size Pinky pretends to have, in tokens (one token per byte).
const PINKY_CONTEXT: usize = 4096;

/// A stub [`Engine`] whose output is fixed in advance.
///
/// Pinky behaves like a real engine in everything but the text: it checks
/// that the model file exists and is GGUF, honours `max_tokens`, stop
/// sequences and cancellation, rejects prompts larger than its context,
/// and reports usage (one token per prompt byte, with prefix reuse across
/// requests like a real KV cache), and log-probabilities when asked (0 for
/// every token: Pinky is never in doubt). Its reply is either a script of
/// tokens set with [`with_script`](Self::with_script) (or one script per
/// request with [`with_replies`](Self::with_replies)), or by default
/// `"Narf! You said: <prompt>"`, one word per token; for a conversation,
/// the last user message is the prompt.
///
/// When a request offers tools, Pinky's replies are read for tool calls in
/// the Qwen/Hermes markup, which [`tool_call`](Self::tool_call) writes, so
/// an app can test its tool loop without a model:
///
/// ```
/// use rusty_genius_cortex::Pinky;
/// use serde_json::json;
/// use std::time::Duration;
///
/// let pinky = Pinky::new()
///     .with_replies([
///         Pinky::tool_call("get_weather", json!({"city": "Paris"})),
///         Pinky::words("It is 18 C and sunny in Paris."),
///     ])
///     .with_token_delay(Duration::from_millis(5));
/// # let _ = pinky;
/// ```
#[derive(Default)]
pub struct Pinky {
    /// One script per request, in turn; the last one repeats. Empty: echo.
    replies: Vec<Vec<Vec<u8>>>,
    /// How many requests it answers at once.
    capacity: usize,
    /// The requests it is answering.
    running: Vec<Run>,
    /// Requests answered so far.
    served: usize,
    token_delay: Duration,
    load_delay: Duration,
    loaded: bool,
    /// The "tokens" (bytes) each slot of the imaginary KV cache holds,
    /// prompt and answer; a request takes the free slot that shares the
    /// longest prefix with it, as the llama.cpp engine does.
    slots: Vec<Vec<u8>>,
    /// Steps taken.
    steps: u64,
}

impl Clone for Pinky {
    /// A Pinky with the same script and settings, answering nothing yet.
    fn clone(&self) -> Self {
        Self {
            replies: self.replies.clone(),
            capacity: self.capacity,
            running: Vec::new(),
            served: self.served,
            token_delay: self.token_delay,
            load_delay: self.load_delay,
            loaded: self.loaded,
            slots: self.slots.clone(),
            steps: 0,
        }
    }
}

impl std::fmt::Debug for Pinky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinky")
            .field("replies", &self.replies.len())
            .field("capacity", &self.capacity)
            .field("running", &self.running.len())
            .field("token_delay", &self.token_delay)
            .finish_non_exhaustive()
    }
}

impl Pinky {
    /// A Pinky that answers `"Narf! You said: <prompt>"`, four requests
    /// at a time.
    pub fn new() -> Self {
        Self {
            capacity: 4,
            ..Self::default()
        }
    }

    /// Answers at most this many requests at once (one token each per
    /// step, as a batching engine does); the others wait. Default 4.
    pub fn with_capacity(mut self, requests: usize) -> Self {
        self.capacity = requests.max(1);
        self
    }

    /// Replies with exactly these pieces, one token each, whatever the
    /// prompt. Pieces are bytes, so a multi-byte character can be split
    /// across tokens as real tokenizers do.
    pub fn with_script<I, P>(mut self, pieces: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        self.replies = vec![pieces.into_iter().map(|p| p.as_ref().to_vec()).collect()];
        self
    }

    /// Answers its requests in turn with these scripts (one token per
    /// piece); after the last, the last repeats.
    pub fn with_replies<I, S, P>(mut self, replies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        self.replies = replies
            .into_iter()
            .map(|script| script.into_iter().map(|p| p.as_ref().to_vec()).collect())
            .collect();
        self
    }

    /// A script that says `text`, one word per token.
    pub fn words(text: &str) -> Vec<Vec<u8>> {
        text.split_inclusive(' ')
            .map(|word| word.as_bytes().to_vec())
            .collect()
    }

    /// A script that calls tool `name` with `arguments`, in the markup a
    /// Qwen or Hermes model writes, cut into three-byte tokens so that the
    /// markup is split as a real model splits it.
    pub fn tool_call(name: &str, arguments: serde_json::Value) -> Vec<Vec<u8>> {
        ToolSyntax::Hermes
            .markup(&[(name, arguments)])
            .into_bytes()
            .chunks(3)
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// Sleeps this long per step (one token for every running request),
    /// to imitate a slow model.
    pub fn with_token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// Sleeps this long in `load`, to imitate a large model.
    pub fn with_load_delay(mut self, delay: Duration) -> Self {
        self.load_delay = delay;
        self
    }

    fn reply(&mut self, said: &str) -> Vec<Vec<u8>> {
        let turn = self.served.min(self.replies.len().saturating_sub(1));
        self.served += 1;
        match self.replies.get(turn) {
            Some(script) => script.clone(),
            None => Self::words(&format!("Narf! You said: {said}")),
        }
    }
}

impl Pinky {
    /// The width of Pinky's embeddings.
    pub const EMBEDDING_WIDTH: usize = 64;

    /// Answers an `Embed` request at once: its vectors go out now, and the
    /// request ends at the next step.
    fn start_embedding(
        &mut self,
        id: RequestId,
        embed: &Embed,
        mut output: Output,
        config: InferenceConfig,
        limits: &Limits,
    ) -> Result<(), Box<Refused>> {
        let refuse = |output, error| Err(Box::new(Refused { output, error }));
        // Pinky's vectors are bags of words: no beginning of one is an
        // embedding of its own.
        if let Err(error) = embed.check_dimensions("pinky", Self::EMBEDDING_WIDTH, false) {
            return refuse(output, error);
        }
        let mut tokens = Vec::new();
        let mut vectors = Vec::new();
        for (index, input) in embed.inputs.iter().enumerate() {
            // Pinky's tokens are bytes: its vocabulary is 0 to 255.
            let owned;
            let mut text = match input {
                EmbedInput::Text(text) => text.as_str(),
                EmbedInput::Tokens(ids) => {
                    let mut bytes = Vec::with_capacity(ids.len());
                    for (at, &id) in ids.iter().enumerate() {
                        let Ok(byte) = u8::try_from(id) else {
                            let error = GeniusError::invalid_request(
                                format!("inputs[{index}][{at}]"),
                                format!("token id {id} is not in Pinky's vocabulary of 256 tokens"),
                            );
                            return refuse(output, error);
                        };
                        bytes.push(byte);
                    }
                    owned = String::from_utf8_lossy(&bytes).into_owned();
                    owned.as_str()
                }
            };
            if text.len() > PINKY_CONTEXT {
                if !embed.truncate {
                    let error = GeniusError::PromptTooLong {
                        tokens: text.len(),
                        context: PINKY_CONTEXT,
                    };
                    return refuse(output, error);
                }
                let mut end = PINKY_CONTEXT;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text = &text[..end];
            }
            tokens.push(text.len());
            vectors.push(Pinky::embedding(text, embed.normalize));
        }
        if let Err(error) = limits.check_embed_tokens(tokens.iter().sum()) {
            return refuse(output, error);
        }
        let busy: Vec<usize> = self.running.iter().map(|run| run.slot).collect();
        let Some(slot) = (0..self.capacity()).find(|slot| !busy.contains(slot)) else {
            let error = GeniusError::engine("Pinky has no free slot (start called past capacity)");
            return refuse(output, error);
        };
        let started = Instant::now();
        output.send(InferenceEvent::Embeddings(Embeddings {
            vectors,
            tokens: tokens.clone(),
        }));
        self.running.push(Run {
            id,
            slot,
            output,
            reply: Vec::new().into_iter(),
            usage: Usage {
                prompt_tokens: tokens.iter().sum(),
                cached_tokens: 0,
                generated_tokens: 0,
                draft_tokens: 0,
                accepted_draft_tokens: 0,
                prompt_ms: millis_since(started),
                generation_ms: 0.0,
                finish_reason: FinishReason::EndOfGeneration,
            },
            context_used: 0,
            config,
            started,
        });
        Ok(())
    }

    /// Pinky's embedding of `text`: a bag of its lower-cased words, each
    /// hashed to one of [`EMBEDDING_WIDTH`](Self::EMBEDDING_WIDTH) places with a sign. The
    /// same text always gets the same vector, and texts that share words
    /// are closer than texts that share none, so retrieval code can be
    /// tested without a model.
    pub fn embedding(text: &str, normalize: bool) -> Vec<f32> {
        let mut vector = vec![0.0; Self::EMBEDDING_WIDTH];
        let words = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|word| !word.is_empty());
        for word in words {
            // FNV-1a over the lower-cased word.
            let hash = word
                .to_lowercase()
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            let place = (hash % Self::EMBEDDING_WIDTH as u64) as usize;
            vector[place] += if hash >> 63 == 0 { 1.0 } else { -1.0 };
        }
        if normalize {
            rusty_genius_core::embed::normalize(&mut vector);
        }
        vector
    }
}

/// A conversation as Pinky reads it: one `role: content` line per message.
fn transcript(messages: &[rusty_genius_core::ChatMessage]) -> String {
    messages
        .iter()
        .map(|m| {
            format!(
                "{}: {}\n",
                m.role.as_str(),
                m.content.as_deref().unwrap_or("")
            )
        })
        .collect()
}

impl Engine for Pinky {
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError> {
        check_gguf(path)?;
        std::thread::sleep(self.load_delay);
        self.loaded = true;
        self.slots = vec![Vec::new(); self.capacity()];
        Ok(ModelInfo {
            name: name.to_owned(),
            context_size: PINKY_CONTEXT,
            vocab_size: 256,
            parallel: self.capacity(),
            embeds: false,
            placement: rusty_genius_core::manifest::Placement::default(),
        })
    }

    fn unload(&mut self) {
        self.loaded = false;
        self.slots.clear();
        self.running.clear();
    }

    fn capacity(&self) -> usize {
        self.capacity.max(1)
    }

    fn running(&self) -> usize {
        self.running.len()
    }

    fn start(&mut self, request: Request) -> Result<(), Box<Refused>> {
        let Request {
            id,
            prompt,
            config,
            limits,
            mut output,
        } = request;
        let refuse = |output, error| Err(Box::new(Refused { output, error }));
        if !self.loaded {
            return refuse(output, GeniusError::NoModelLoaded);
        }
        if let Prompt::Embed(embed) = &prompt {
            return self.start_embedding(id, embed, output, config, &limits);
        }
        // A conversation reaches Pinky as one line per message.
        let (text, said) = match &prompt {
            Prompt::Embed(_) => unreachable!("answered above"),
            Prompt::Tokens(_) => {
                return refuse(
                    output,
                    GeniusError::invalid_request(
                        "prompt",
                        "a question about tokens is answered at once",
                    ),
                )
            }
            Prompt::Text(text) => (text.clone(), text.clone()),
            // A fill-in-the-middle request: what was typed before the cursor.
            Prompt::Infill(infill) => {
                let typed = format!("{}{}", infill.prefix, infill.middle);
                (typed.clone(), typed)
            }
            Prompt::Chat(messages) => {
                let text = transcript(messages);
                let said = messages
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::User)
                    .and_then(|m| m.content.clone())
                    .unwrap_or_default();
                (text, said)
            }
        };
        let tokens = text.as_bytes();
        if tokens.len() >= PINKY_CONTEXT {
            let error = GeniusError::PromptTooLong {
                tokens: tokens.len(),
                context: PINKY_CONTEXT,
            };
            return refuse(output, error);
        }
        if !config.tools.is_empty() && config.tool_choice != ToolChoice::None {
            output.parse_tool_calls(ToolSyntax::Hermes, &config, &prompt);
        }
        let prompt_started = Instant::now();
        let busy: Vec<usize> = self.running.iter().map(|run| run.slot).collect();
        let Some((slot, cached)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(slot, _)| !busy.contains(slot))
            .map(|(slot, cache)| (slot, reusable_prefix(cache, tokens), cache.len()))
            .max_by_key(|&(slot, cached, held)| {
                (cached, std::cmp::Reverse(held), std::cmp::Reverse(slot))
            })
            .map(|(slot, cached, _)| (slot, cached))
        else {
            let error = GeniusError::engine("Pinky has no free slot (start called past capacity)");
            return refuse(output, error);
        };
        let cache = &mut self.slots[slot];
        cache.truncate(cached);
        cache.extend_from_slice(&tokens[cached..]);
        let usage = Usage {
            prompt_tokens: tokens.len(),
            cached_tokens: cached,
            generated_tokens: 0,
            draft_tokens: 0,
            accepted_draft_tokens: 0,
            prompt_ms: millis_since(prompt_started),
            generation_ms: 0.0,
            finish_reason: FinishReason::EndOfGeneration,
        };
        let reply = self.reply(&said);
        self.running.push(Run {
            id,
            slot,
            output,
            reply: reply.into_iter(),
            usage,
            context_used: tokens.len(),
            config,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Pinky's tokens are bytes: each byte of a text is a token of that
    /// id, and a conversation renders as one `role: content` line per
    /// message.
    fn tokens(
        &mut self,
        query: &rusty_genius_core::tokens::TokenQuery,
        _config: &InferenceConfig,
    ) -> Result<rusty_genius_core::tokens::TokenAnswer, GeniusError> {
        use rusty_genius_core::tokens::{TextOrToken, TokenAnswer, TokenPiece, TokenQuery};
        if !self.loaded {
            return Err(GeniusError::NoModelLoaded);
        }
        let byte = |id: u32, field: &str| {
            u8::try_from(id).map_err(|_| {
                GeniusError::invalid_request(
                    field,
                    format!("token {id} is not in Pinky's vocabulary (ids 0 to 255)"),
                )
            })
        };
        Ok(match query {
            TokenQuery::Tokenize { content, .. } => {
                let mut pieces = Vec::new();
                for part in content {
                    match part {
                        TextOrToken::Text(text) => {
                            pieces.extend(text.bytes().map(|b| TokenPiece {
                                id: u32::from(b),
                                piece: vec![b],
                            }))
                        }
                        TextOrToken::Token(id) => pieces.push(TokenPiece {
                            id: *id,
                            piece: vec![byte(*id, "content")?],
                        }),
                    }
                }
                TokenAnswer::Tokens(pieces)
            }
            TokenQuery::Detokenize { tokens } => {
                let bytes = tokens
                    .iter()
                    .map(|id| byte(*id, "tokens"))
                    .collect::<Result<Vec<u8>, _>>()?;
                TokenAnswer::Text(String::from_utf8_lossy(&bytes).into_owned())
            }
            TokenQuery::Render { messages } => TokenAnswer::Text(transcript(messages)),
        })
    }

    fn stats(&self) -> rusty_genius_core::metrics::EngineStats {
        rusty_genius_core::metrics::EngineStats {
            kv_cells_used: self.slots.iter().map(|slot| slot.len() as u64).sum(),
            steps: self.steps,
            ..Default::default()
        }
    }

    fn step(&mut self) -> Step {
        self.steps += 1;
        let mut step = Step::default();
        let all_paused = self.running.iter().all(|run| run.output.is_paused());
        if !all_paused {
            // One token for every request per step, like a batched model.
            sleep_unless(self.token_delay, || {
                self.running
                    .iter()
                    .all(|run| run.output.cancel_token().is_cancelled())
            });
        }
        let mut index = 0;
        while index < self.running.len() {
            let run = &mut self.running[index];
            match run.advance(&mut self.slots[run.slot]) {
                Advance::Paused => index += 1,
                Advance::Moved => {
                    step.progressed = true;
                    index += 1;
                }
                Advance::Ended(reason) => {
                    step.progressed = true;
                    let mut run = self.running.remove(index);
                    run.usage.finish_reason = reason;
                    run.usage.generation_ms = millis_since(run.started);
                    step.ended.push(Ended {
                        id: run.id,
                        output: run.output,
                        result: Ok(run.usage),
                    });
                }
            }
        }
        step
    }
}

/// One request Pinky is answering.
struct Run {
    id: RequestId,
    /// Its slot in [`Pinky::slots`].
    slot: usize,
    output: Output,
    reply: std::vec::IntoIter<Vec<u8>>,
    usage: Usage,
    context_used: usize,
    config: InferenceConfig,
    started: Instant,
}

enum Advance {
    Paused,
    Moved,
    Ended(FinishReason),
}

impl Run {
    /// Says the next token, unless the request is over or must wait.
    fn advance(&mut self, cache: &mut Vec<u8>) -> Advance {
        if let Some(reason) = self.output.check_cancelled() {
            return Advance::Ended(reason);
        }
        if self.output.is_paused() {
            return Advance::Paused;
        }
        if self
            .config
            .max_tokens
            .is_some_and(|max| self.usage.generated_tokens >= max)
        {
            return Advance::Ended(FinishReason::MaxTokens);
        }
        if self.context_used >= PINKY_CONTEXT {
            return Advance::Ended(FinishReason::ContextFull);
        }
        let Some(piece) = self.reply.next() else {
            return Advance::Ended(FinishReason::EndOfGeneration);
        };
        self.usage.generated_tokens += 1;
        self.context_used += piece.len();
        cache.extend_from_slice(&piece);
        if self.config.logprobs {
            // Pinky is certain of every token it says. It has no
            // vocabulary for its words: their id is that of their first
            // byte, as in its embeddings.
            let token = String::from_utf8_lossy(&piece).into_owned();
            let id = piece.first().copied().map_or(0, u32::from);
            let top_logprobs = (self.config.top_logprobs > 0)
                .then(|| TopLogprob {
                    id,
                    token: token.clone(),
                    bytes: piece.clone(),
                    logprob: 0.0,
                })
                .into_iter()
                .collect();
            self.output.logprobs(TokenLogprobs {
                id,
                token,
                bytes: piece.clone(),
                logprob: 0.0,
                top_logprobs,
            });
        }
        match self.output.push(&piece) {
            Some(reason) => Advance::Ended(reason),
            None => Advance::Moved,
        }
    }
}
