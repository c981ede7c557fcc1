//! The llama.cpp engine, on the `llama-cpp-2` bindings.

use std::ffi::{c_char, c_void, CStr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::manifest::ModelInfo;
use rusty_genius_core::protocol::{FinishReason, Usage};
use rusty_genius_core::{GeniusError, InferenceConfig, Prompt};

use crate::engine::{check_gguf, millis_since, reusable_prefix, Engine, Output};

mod prompt;
mod sampling;

use prompt::Prompter;
use sampling::{grammar_sampler, grammar_text, sampler_for, token_logprobs, Chooser};

/// Settings of the llama.cpp engine that hold for every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaOptions {
    /// Context window in tokens; capped at what the model was trained for.
    /// Default 4096 (`GENIUS_CONTEXT_SIZE`).
    pub context_size: u32,
    /// Threads for generation and prompt processing. Default: the
    /// machine's available parallelism (`GENIUS_THREADS`).
    pub threads: usize,
    /// Tokens decoded per batch while processing a prompt. Default 512
    /// (`GENIUS_BATCH_SIZE`).
    pub batch_size: u32,
    /// Layers to offload to the GPU in GPU builds; `None` keeps llama.cpp's
    /// default (all of them when a GPU backend is compiled in).
    /// `GENIUS_GPU_LAYERS`.
    pub gpu_layers: Option<u32>,
}

impl Default for LlamaOptions {
    fn default() -> Self {
        Self {
            context_size: 4096,
            threads: std::thread::available_parallelism().map_or(4, |n| n.get()),
            batch_size: 512,
            gpu_layers: None,
        }
    }
}

impl LlamaOptions {
    /// The defaults, overridden by the `GENIUS_*` environment variables
    /// named on each field. Unparsable values are ignored with a warning.
    pub fn from_env() -> Self {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            let value = std::env::var(name).ok()?;
            let parsed = value.trim().parse().ok();
            if parsed.is_none() {
                log::warn!("ignoring {name}={value:?}: not a number");
            }
            parsed
        }
        let defaults = Self::default();
        Self {
            context_size: var("GENIUS_CONTEXT_SIZE")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.context_size),
            threads: var("GENIUS_THREADS")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.threads),
            batch_size: var("GENIUS_BATCH_SIZE")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.batch_size),
            gpu_layers: var("GENIUS_GPU_LAYERS").or(defaults.gpu_layers),
        }
    }
}

/// The process-wide llama.cpp backend, initialised on first use.
///
/// llama.cpp may be initialised only once per process; code that uses
/// `llama-cpp-2` beside this engine must take the backend from here.
pub fn llama_backend() -> Result<&'static LlamaBackend, GeniusError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // SAFETY: `forward_log` is a plain function that only reads the
            // NUL-terminated string llama.cpp passes it.
            unsafe { llama_cpp_sys_2::llama_log_set(Some(forward_log), std::ptr::null_mut()) };
            LlamaBackend::init().map_err(|err| format!("cannot initialise llama.cpp: {err}"))
        })
        .as_ref()
        .map_err(|err| GeniusError::engine(err.clone()))
}

/// Sends llama.cpp's own log lines to the `log` facade (target `llama.cpp`).
unsafe extern "C" fn forward_log(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a valid NUL-terminated string for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    if level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR {
        sampling::note_error(text);
    }
    let level = match level {
        llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR => log::Level::Error,
        llama_cpp_sys_2::GGML_LOG_LEVEL_WARN => log::Level::Warn,
        llama_cpp_sys_2::GGML_LOG_LEVEL_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "llama.cpp", level, "{text}");
}

self_cell::self_cell!(
    /// A model and the llama.cpp context that borrows it. The context is
    /// dropped before the model, and the model never moves while borrowed.
    struct ModelContext {
        owner: LlamaModel,
        #[covariant]
        dependent: LlamaContext,
    }
);

/// A loaded model, its context and the tokens whose state the context holds.
struct Loaded {
    name: String,
    cell: ModelContext,
    batch: LlamaBatch<'static>,
    /// Tokens whose keys and values sit in the KV cache, in position order.
    cached: Vec<LlamaToken>,
    /// How prompts become tokens for this model.
    prompter: Prompter,
    /// The text of the last prompt and its answer, while `cached` holds
    /// exactly their tokens: a conversation's next turn, which renders
    /// them again, continues from these tokens instead of tokenizing the
    /// answer anew (which could split it into other tokens and so lose the
    /// cache from there on).
    transcript: Option<String>,
    /// The logits after the last prompt fed, with that prompt's length
    /// (`cached` starts with the prompt). The same prompt again starts from
    /// them rather than decoding its last token anew: llama.cpp computes a
    /// batch of one token with other kernels than a batch of many, and the
    /// rounding differs enough to change a greedy answer.
    prompt_logits: Option<(usize, Vec<f32>)>,
}

/// What [`Loaded::feed_prompt`] did.
struct Fed {
    /// Prompt tokens whose state was already in the KV cache.
    reused: usize,
    /// Whether the logits to sample from are the saved `prompt_logits`
    /// (else the context's, for the batch's last token).
    saved_logits: bool,
}

impl Loaded {
    fn new(name: &str, model: LlamaModel, options: &LlamaOptions) -> Result<Self, GeniusError> {
        let backend = llama_backend()?;
        let n_ctx = options.context_size.min(model.n_ctx_train().max(1));
        let threads = i32::try_from(options.threads).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(options.batch_size)
            .with_n_ubatch(options.batch_size)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            // Keep the full attention window of sliding-window models (such
            // as Gemma 3) so that a cached prefix can always be reused.
            .with_swa_full(true);
        let cell = ModelContext::try_new(model, |model| model.new_context(backend, params))
            .map_err(|err| {
                GeniusError::engine_from(
                    format!("cannot create a context of {n_ctx} tokens (try a smaller GENIUS_CONTEXT_SIZE)"),
                    err,
                )
            })?;
        let prompter = Prompter::of(cell.borrow_owner());
        Ok(Self {
            name: name.to_owned(),
            cell,
            batch: LlamaBatch::new(options.batch_size as usize, 1),
            cached: Vec::new(),
            prompter,
            transcript: None,
            prompt_logits: None,
        })
    }

    fn model(&self) -> &LlamaModel {
        self.cell.borrow_owner()
    }

    fn context(&self) -> &LlamaContext<'_> {
        self.cell.borrow_dependent()
    }

    fn context_mut<R>(&mut self, work: impl FnOnce(&mut LlamaContext<'_>) -> R) -> R {
        self.cell.with_dependent_mut(|_, context| work(context))
    }

    /// Decodes `self.batch`; on failure the KV cache is forgotten, as its
    /// state is no longer known.
    fn decode_batch(&mut self, what: &str) -> Result<(), GeniusError> {
        let batch = &mut self.batch;
        let decoded = self
            .cell
            .with_dependent_mut(|_, context| context.decode(batch));
        decoded.map_err(|err| {
            self.reset();
            GeniusError::engine_from(format!("decoding {what} failed"), err)
        })
    }

    /// Forgets the KV cache, e.g. after a failed decode.
    fn reset(&mut self) {
        self.context_mut(|context| context.clear_kv_cache());
        self.cached.clear();
        self.prompt_logits = None;
        self.transcript = None;
    }

    /// `tokens` for the prompt `text`, spliced onto the cached tokens when
    /// `text` continues the last transcript at a special token (where a
    /// tokenizer never merges across), so the last answer keeps the very
    /// tokens the model generated.
    fn continue_transcript(&self, text: &str, tokens: Vec<LlamaToken>) -> Vec<LlamaToken> {
        let Some(rest) = self
            .transcript
            .as_deref()
            .and_then(|transcript| text.strip_prefix(transcript))
        else {
            return tokens;
        };
        let vocab = self.model().vocab();
        let tail = vocab.tokenize(rest.as_bytes(), false, true);
        let starts_with_special = tail.first().is_some_and(|&first| {
            vocab.is_control(first)
                && rest
                    .as_bytes()
                    .starts_with(&vocab.token_to_piece(first, true, None))
        });
        if !starts_with_special {
            return tokens;
        }
        let mut spliced = self.cached.clone();
        spliced.extend(tail);
        spliced
    }

    /// Drops the KV cache after the first `keep` tokens; false if this
    /// context cannot.
    fn truncate(&mut self, keep: usize) -> bool {
        if keep < self.cached.len() {
            let removed = self.context_mut(|context| {
                context.clear_kv_cache_seq(Some(0), Some(keep as u32), None)
            });
            if !matches!(removed, Ok(true)) {
                return false;
            }
            self.cached.truncate(keep);
        }
        true
    }

    /// Brings the KV cache to hold exactly `tokens`, decoding only what
    /// follows the longest prefix it already holds, and readies the logits
    /// of the last token. `None` if cancelled.
    fn feed_prompt(
        &mut self,
        tokens: &[LlamaToken],
        output: &mut Output<'_>,
    ) -> Result<Option<Fed>, GeniusError> {
        let same_prompt = self.prompt_logits.as_ref().is_some_and(|(len, _)| {
            *len == tokens.len() && self.cached.get(..*len) == Some(tokens)
        });
        if same_prompt && self.truncate(tokens.len()) {
            self.transcript = None;
            return Ok(Some(Fed {
                reused: tokens.len(),
                saved_logits: true,
            }));
        }
        let saved = self.prompt_logits.take().map(|(_, logits)| logits);
        self.transcript = None;
        let mut reuse = reusable_prefix(&self.cached, tokens);
        if !self.truncate(reuse) {
            log::debug!("partial KV cache removal unsupported here, decoding the whole prompt");
            self.reset();
            reuse = 0;
        }
        let chunk_size = self.context().n_batch().max(1) as usize;
        for chunk in tokens[reuse..].chunks(chunk_size) {
            if output.check_cancelled().is_some() {
                return Ok(None);
            }
            self.batch.clear();
            for &token in chunk {
                let position = self.cached.len() as i32;
                let last = position as usize + 1 == tokens.len();
                self.batch
                    .add(token, position, &[0], last)
                    .map_err(|err| GeniusError::engine_from("cannot fill the batch", err))?;
                self.cached.push(token);
            }
            self.decode_batch("the prompt")?;
        }
        let logits = self.context().get_logits_ith(self.batch.n_tokens() - 1);
        let mut kept = saved.unwrap_or_default();
        kept.clear();
        kept.extend_from_slice(logits);
        self.prompt_logits = Some((tokens.len(), kept));
        Ok(Some(Fed {
            reused: reuse,
            saved_logits: false,
        }))
    }
}

/// The llama.cpp [`Engine`].
///
/// Keeps one model and one context; the context's KV cache survives between
/// requests, so a prompt that extends the previous prompt (and answer) only
/// decodes the new tokens. Create it on the thread that will use it (the
/// [`EngineThread`](crate::EngineThread) does this).
pub struct LlamaEngine {
    options: LlamaOptions,
    loaded: Option<Loaded>,
}

impl LlamaEngine {
    /// Creates an engine; nothing is loaded yet.
    pub fn new(options: LlamaOptions) -> Result<Self, GeniusError> {
        llama_backend()?;
        Ok(Self {
            options,
            loaded: None,
        })
    }

    /// The options this engine was created with.
    pub fn options(&self) -> &LlamaOptions {
        &self.options
    }
}

impl Engine for LlamaEngine {
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError> {
        check_gguf(path)?;
        // Free the old model first: two models may not fit in memory.
        self.loaded = None;
        let mut params = LlamaModelParams::default();
        if let Some(layers) = self.options.gpu_layers {
            params = params.with_n_gpu_layers(layers);
        }
        let model = LlamaModel::load_from_file(llama_backend()?, path, &params).map_err(|err| {
            GeniusError::InvalidModelFile {
                path: path.to_path_buf(),
                reason: format!(
                    "llama.cpp could not load it ({err}); set RUST_LOG=llama.cpp=debug for details"
                ),
            }
        })?;
        let loaded = Loaded::new(name, model, &self.options)?;
        let info = ModelInfo {
            name: loaded.name.clone(),
            context_size: loaded.context().n_ctx() as usize,
            vocab_size: loaded.model().n_vocab().max(0) as usize,
        };
        log::info!(
            "loaded {} from {} (context {} tokens, {} threads, {})",
            info.name,
            path.display(),
            info.context_size,
            self.options.threads,
            loaded.prompter.describe()
        );
        self.loaded = Some(loaded);
        Ok(info)
    }

    fn unload(&mut self) {
        if let Some(loaded) = self.loaded.take() {
            log::info!("unloaded {}", loaded.name);
        }
    }

    fn infer(
        &mut self,
        prompt: &Prompt,
        config: &InferenceConfig,
        output: &mut Output<'_>,
    ) -> Result<Usage, GeniusError> {
        let loaded = self.loaded.as_mut().ok_or(GeniusError::NoModelLoaded)?;
        let prepared = loaded.prompter.tokens(loaded.model(), prompt, config)?;
        let tokens = loaded.continue_transcript(&prepared.text, prepared.tokens);
        if tokens.is_empty() {
            return Err(GeniusError::EmptyPrompt);
        }
        let n_ctx = loaded.context().n_ctx() as usize;
        if tokens.len() >= n_ctx {
            return Err(GeniusError::PromptTooLong {
                tokens: tokens.len(),
                context: n_ctx,
            });
        }
        // Everything about the request that can be wrong is found before
        // any decoding: a bad schema or grammar costs nothing.
        let grammar = match grammar_text(config, prepared.tool_syntax)? {
            Some(text) => Some(grammar_sampler(
                loaded.model(),
                &text,
                grammar_field(config),
            )?),
            None => None,
        };
        if let Some(syntax) = prepared.tool_syntax {
            output.parse_tool_calls(syntax);
        }

        let prompt_started = Instant::now();
        let fed = loaded.feed_prompt(&tokens, output)?;
        let prompt_ms = millis_since(prompt_started);
        let mut usage = Usage {
            prompt_tokens: tokens.len(),
            cached_tokens: fed.as_ref().map_or(0, |fed| fed.reused),
            generated_tokens: 0,
            prompt_ms,
            generation_ms: 0.0,
            finish_reason: FinishReason::Cancelled,
        };
        let Some(fed) = fed else {
            return Ok(usage);
        };

        let mut chooser = Chooser::new(sampler_for(config, loaded.model().n_vocab()), grammar);
        chooser.accept_prompt(&tokens);
        let generation_started = Instant::now();
        let mut logits_index = loaded.batch.n_tokens() - 1;
        let mut piece = Vec::with_capacity(32);
        let mut answer = Vec::new();
        usage.finish_reason = loop {
            if config
                .max_tokens
                .is_some_and(|max| usage.generated_tokens >= max)
            {
                break FinishReason::MaxTokens;
            }
            if loaded.cached.len() >= n_ctx {
                break FinishReason::ContextFull;
            }
            // The first token of a repeated prompt comes from the logits
            // saved with it; every other from the context's.
            let saved = match &loaded.prompt_logits {
                Some((_, logits)) if fed.saved_logits && usage.generated_tokens == 0 => {
                    Some(logits.as_slice())
                }
                _ => None,
            };
            let (token, accepted) = match saved {
                Some(logits) => (chooser.choose(logits)?, false),
                // The fast path reads the context's logits in place and
                // accepts the token itself.
                None if chooser.is_plain() => {
                    (chooser.chain().sample(loaded.context(), logits_index), true)
                }
                None => (
                    chooser.choose(loaded.context().get_logits_ith(logits_index))?,
                    false,
                ),
            };
            let end = loaded.model().vocab().is_eog(token);
            if config.logprobs && !end {
                let logits = saved.unwrap_or_else(|| loaded.context().get_logits_ith(logits_index));
                let report = token_logprobs(
                    loaded.model(),
                    logits,
                    token,
                    usize::from(config.top_logprobs),
                    &mut chooser,
                );
                output.logprobs(report);
            }
            if !accepted {
                chooser.accept(token)?;
            }
            if end {
                break FinishReason::EndOfGeneration;
            }
            usage.generated_tokens += 1;
            piece.clear();
            let show_special = loaded.prompter.is_markup(token);
            loaded
                .model()
                .vocab()
                .token_to_piece_into(token, &mut piece, show_special, None);
            answer.extend_from_slice(&piece);
            if let Some(reason) = output.push(&piece) {
                break reason;
            }
            loaded.batch.clear();
            let position = loaded.cached.len() as i32;
            loaded
                .batch
                .add(token, position, &[0], true)
                .map_err(|err| GeniusError::engine_from("cannot fill the batch", err))?;
            loaded.decode_batch("the next token")?;
            loaded.cached.push(token);
            logits_index = 0;
        };
        usage.generation_ms = millis_since(generation_started);
        if chooser.resampled > 0 {
            log::debug!(
                "the grammar redirected {} of {} tokens",
                chooser.resampled,
                usage.generated_tokens
            );
        }
        // The cache now holds the prompt and every answer token but the
        // last, whose state was never computed: the next turn continues
        // from here only if its text extends exactly this.
        let answered = usage.generated_tokens;
        let decoded_answer = loaded.cached.len() == tokens.len() + answered;
        loaded.transcript = match String::from_utf8(answer) {
            Ok(answer) if decoded_answer => Some(format!("{}{answer}", prepared.text)),
            _ => None,
        };
        Ok(usage)
    }
}

/// Which part of the request a grammar comes from, for its errors.
fn grammar_field(config: &InferenceConfig) -> &'static str {
    match config.response_format {
        rusty_genius_core::ResponseFormat::Grammar { .. } => "response_format.grammar",
        rusty_genius_core::ResponseFormat::Text => "tools",
        _ => "response_format",
    }
}
