//! Pinky: a deterministic stub engine for testing orchestration.

use std::path::Path;
use std::time::{Duration, Instant};

use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{FinishReason, TokenLogprobs, TopLogprob, Usage};
use rusty_genius_core::{GeniusError, InferenceConfig};

use crate::engine::{check_gguf, millis_since, reusable_prefix, Engine, Output};

/// The context size Pinky pretends to have, in tokens (one token per byte).
const PINKY_CONTEXT: usize = 4096;

/// A stub [`Engine`] whose output is fixed in advance.
///
/// Pinky behaves like a real engine in everything but the text: it checks
/// that the model file exists and is GGUF, honours `max_tokens`, stop
/// sequences and cancellation, rejects prompts larger than its context,
/// and reports usage (one token per prompt byte, with prefix reuse across
/// requests like a real KV cache), and log-probabilities when asked (0 for
/// every token: Pinky is never in doubt). Its reply is either a script of tokens
/// set with [`with_script`](Self::with_script), or by default
/// `"Narf! You said: <prompt>"`, one word per token.
///
/// ```
/// use rusty_genius_cortex::Pinky;
/// use std::time::Duration;
///
/// let pinky = Pinky::new()
///     .with_script(["<think>", "hmm", "</think>", "Hello", " world"])
///     .with_token_delay(Duration::from_millis(5));
/// # let _ = pinky;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Pinky {
    script: Option<Vec<Vec<u8>>>,
    token_delay: Duration,
    load_delay: Duration,
    loaded: bool,
    /// The "tokens" (bytes) the imaginary KV cache holds.
    cache: Vec<u8>,
}

impl Pinky {
    /// A Pinky that answers `"Narf! You said: <prompt>"`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replies with exactly these pieces, one token each, whatever the
    /// prompt. Pieces are bytes, so a multi-byte character can be split
    /// across tokens as real tokenizers do.
    pub fn with_script<I, P>(mut self, pieces: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        self.script = Some(pieces.into_iter().map(|p| p.as_ref().to_vec()).collect());
        self
    }

    /// Sleeps this long before each token, to imitate a slow model.
    pub fn with_token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// Sleeps this long in `load`, to imitate a large model.
    pub fn with_load_delay(mut self, delay: Duration) -> Self {
        self.load_delay = delay;
        self
    }

    fn reply(&self, prompt: &str) -> Vec<Vec<u8>> {
        match &self.script {
            Some(script) => script.clone(),
            None => format!("Narf! You said: {prompt}")
                .split_inclusive(' ')
                .map(|word| word.as_bytes().to_vec())
                .collect(),
        }
    }
}

impl Engine for Pinky {
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError> {
        check_gguf(path)?;
        std::thread::sleep(self.load_delay);
        self.loaded = true;
        self.cache.clear();
        Ok(ModelInfo {
            name: name.to_owned(),
            context_size: PINKY_CONTEXT,
            vocab_size: 256,
        })
    }

    fn unload(&mut self) {
        self.loaded = false;
        self.cache.clear();
    }

    fn infer(
        &mut self,
        prompt: &str,
        config: &InferenceConfig,
        output: &mut Output<'_>,
    ) -> Result<Usage, GeniusError> {
        if !self.loaded {
            return Err(GeniusError::NoModelLoaded);
        }
        let tokens = prompt.as_bytes();
        if tokens.len() >= PINKY_CONTEXT {
            return Err(GeniusError::PromptTooLong {
                tokens: tokens.len(),
                context: PINKY_CONTEXT,
            });
        }
        let prompt_started = Instant::now();
        let cached = reusable_prefix(&self.cache, tokens);
        self.cache.truncate(cached);
        self.cache.extend_from_slice(&tokens[cached..]);
        let prompt_ms = millis_since(prompt_started);

        let generation_started = Instant::now();
        let mut generated = 0;
        let mut finish = FinishReason::EndOfGeneration;
        for piece in self.reply(prompt) {
            if config.max_tokens.is_some_and(|max| generated >= max) {
                finish = FinishReason::MaxTokens;
                break;
            }
            if self.cache.len() >= PINKY_CONTEXT {
                finish = FinishReason::ContextFull;
                break;
            }
            if let Some(reason) = output.check_cancelled() {
                finish = reason;
                break;
            }
            std::thread::sleep(self.token_delay);
            generated += 1;
            if config.logprobs {
                // Pinky is certain of every token it says.
                let token = String::from_utf8_lossy(&piece).into_owned();
                let top_logprobs = (config.top_logprobs > 0)
                    .then(|| TopLogprob {
                        token: token.clone(),
                        bytes: piece.clone(),
                        logprob: 0.0,
                    })
                    .into_iter()
                    .collect();
                output.logprobs(TokenLogprobs {
                    token,
                    bytes: piece.clone(),
                    logprob: 0.0,
                    top_logprobs,
                });
            }
            if let Some(reason) = output.push(&piece) {
                finish = reason;
                break;
            }
            self.cache.extend_from_slice(&piece);
        }
        Ok(Usage {
            prompt_tokens: tokens.len(),
            cached_tokens: cached,
            generated_tokens: generated,
            prompt_ms,
            generation_ms: millis_since(generation_started),
            finish_reason: finish,
        })
    }
}
