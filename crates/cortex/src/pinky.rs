//! Pinky: a deterministic stub engine for testing orchestration.

use std::path::Path;
use std::time::{Duration, Instant};

use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{FinishReason, TokenLogprobs, TopLogprob, Usage};
use rusty_genius_core::{GeniusError, InferenceConfig, Prompt, Role, ToolChoice};

use crate::engine::{check_gguf, millis_since, reusable_prefix, Engine, Output};
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
#[derive(Debug, Clone, Default)]
pub struct Pinky {
    /// One script per request, in turn; the last one repeats. Empty: echo.
    replies: Vec<Vec<Vec<u8>>>,
    /// Requests answered so far.
    served: usize,
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

    fn reply(&mut self, said: &str) -> Vec<Vec<u8>> {
        let turn = self.served.min(self.replies.len().saturating_sub(1));
        self.served += 1;
        match self.replies.get(turn) {
            Some(script) => script.clone(),
            None => Self::words(&format!("Narf! You said: {said}")),
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
        prompt: &Prompt,
        config: &InferenceConfig,
        output: &mut Output<'_>,
    ) -> Result<Usage, GeniusError> {
        if !self.loaded {
            return Err(GeniusError::NoModelLoaded);
        }
        // A conversation reaches Pinky as one line per message.
        let (text, said) = match prompt {
            Prompt::Text(text) => (text.clone(), text.clone()),
            Prompt::Chat(messages) => {
                let text: String = messages
                    .iter()
                    .map(|m| {
                        format!(
                            "{}: {}\n",
                            m.role.as_str(),
                            m.content.as_deref().unwrap_or("")
                        )
                    })
                    .collect();
                let said = messages
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::User)
                    .and_then(|m| m.content.clone())
                    .unwrap_or_default();
                (text, said)
            }
        };
        if !config.tools.is_empty() && config.tool_choice != ToolChoice::None {
            output.parse_tool_calls(ToolSyntax::Hermes);
        }
        let tokens = text.as_bytes();
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
        for piece in self.reply(&said) {
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
