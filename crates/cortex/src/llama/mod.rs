//! The llama.cpp engine, on the `llama-cpp-2` bindings.

use std::collections::VecDeque;
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
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, Usage};
use rusty_genius_core::{Embeddings, GeniusError, InferenceConfig, Pooling, Prompt};

use crate::engine::{
    check_gguf, millis_since, reusable_prefix, Ended, Engine, Output, Refused, Request, RequestId,
    Step,
};

mod embed;
mod prompt;
mod sampling;

use prompt::Prompter;
use sampling::{
    grammar_field, grammar_sampler, grammar_text, sampler_for, token_logprobs, Choice, Chooser,
};

/// Settings of the llama.cpp engine that hold for every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaOptions {
    /// The context window of each request, in tokens (prompt and answer);
    /// capped at what the model was trained for. Every one of the
    /// `parallel` requests gets the whole of it: the KV cache holds
    /// `context_size × parallel` tokens. Default 4096
    /// (`GENIUS_CONTEXT_SIZE`).
    pub context_size: u32,
    /// How many requests are decoded together, each in its own sequence
    /// of one batch. More requests wait for a free place. Default 4
    /// (`GENIUS_PARALLEL`).
    pub parallel: u32,
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
            parallel: 4,
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
            parallel: var("GENIUS_PARALLEL")
                .filter(|&n| n > 0)
                .unwrap_or(defaults.parallel),
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

/// The llama.cpp contexts of one model: the one requests generate in, and
/// the one texts are embedded in (made on first use, with its pooling).
struct Contexts<'model> {
    main: LlamaContext<'model>,
    embed: Option<(Pooling, LlamaContext<'model>)>,
}

self_cell::self_cell!(
    /// A model and the llama.cpp contexts that borrow it. The contexts are
    /// dropped before the model, and the model never moves while borrowed.
    struct ModelContext {
        owner: LlamaModel,
        #[covariant]
        dependent: Contexts,
    }
);

/// A loaded model, its context, and one slot per sequence of the context.
struct Loaded {
    name: String,
    cell: ModelContext,
    batch: LlamaBatch<'static>,
    /// How prompts become tokens for this model.
    prompter: Prompter,
    slots: Vec<Slot>,
    /// The context each request may use, in tokens.
    slot_context: usize,
    /// The most tokens one step decodes.
    batch_size: usize,
    /// The pooling the model declares: an embedding model, which embeds
    /// and does not generate.
    declared_pooling: Option<Pooling>,
    /// The embedding context's sizes.
    embed_shape: embed::Shape,
    embed_batch: LlamaBatch<'static>,
    /// `Embed` requests waiting for the next step.
    embed_jobs: VecDeque<embed::EmbedJob>,
    threads: i32,
    /// What a token of a large batch has cost lately, in milliseconds (a
    /// moving average; it grows with the depth of the context).
    ms_per_token: Option<f64>,
}

/// One sequence of the context: the tokens its KV cache holds, and the
/// request using it, if any.
struct Slot {
    seq: i32,
    /// Tokens whose keys and values sit in this sequence, in position
    /// order.
    cached: Vec<LlamaToken>,
    /// The text of the last prompt and its answer, while `cached` holds
    /// exactly their tokens: a conversation's next turn, which renders them
    /// again, continues from these tokens instead of tokenizing the answer
    /// anew (which could split it into other tokens and so lose the cache
    /// from there on).
    transcript: Option<String>,
    /// The logits after the last prompt this slot finished, with that
    /// prompt's length (`cached` starts with it). The same prompt again
    /// starts from them rather than decoding its last token anew: llama.cpp
    /// computes a batch of one token with other kernels than a batch of
    /// many, and the rounding differs enough to change a greedy answer.
    prompt_logits: Option<(usize, Vec<f32>)>,
    job: Option<Job>,
}

/// A request running in a slot.
struct Job {
    id: RequestId,
    output: Output,
    config: InferenceConfig,
    chooser: Chooser,
    /// The whole prompt.
    tokens: Vec<LlamaToken>,
    /// The prompt's text, to remember as the slot's transcript.
    text: String,
    usage: Usage,
    phase: Phase,
    /// The answer's bytes so far.
    answer: Vec<u8>,
    prompt_started: Instant,
    generation_started: Option<Instant>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Decoding its prompt; the slot's `cached` grows toward `tokens`.
    Prefill,
    /// Its first token comes from the slot's saved prompt logits.
    FromSaved,
    /// This token was chosen and shown; it is decoded in the next step.
    Decode(LlamaToken),
    /// Its grammar is still choosing its next token (a choice that checks
    /// many tokens takes several steps; see `Chooser::resume`).
    Choosing,
}

/// Where a job's next logits are.
#[derive(Debug, Clone, Copy)]
enum Logits {
    /// Its slot's saved prompt logits.
    Saved,
    /// This row of the batch just decoded.
    Batch(i32),
    /// Those of the choice under way (kept by its chooser).
    Pending,
}

/// How a job's turn in a step went.
enum Turn {
    /// It produced a token (or decoded prompt tokens).
    Moved,
    /// It ended, with this reason.
    Ended(FinishReason),
}

impl Loaded {
    fn new(name: &str, model: LlamaModel, options: &LlamaOptions) -> Result<Self, GeniusError> {
        let backend = llama_backend()?;
        let parallel = options.parallel.max(1);
        let per_request = options.context_size.min(model.n_ctx_train().max(1));
        let n_ctx = per_request.saturating_mul(parallel);
        let threads = i32::try_from(options.threads).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(options.batch_size)
            .with_n_ubatch(options.batch_size)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            // One sequence per request, each with its own part of the KV
            // cache: a request never takes another's room.
            .with_n_seq_max(parallel)
            .with_kv_unified(false)
            // Keep the full attention window of sliding-window models (such
            // as Gemma 3) so that a cached prefix can always be reused.
            .with_swa_full(true);
        let cell = ModelContext::try_new(model, |model| {
            model.new_context(backend, params).map(|main| Contexts { main, embed: None })
        })
            .map_err(|err| {
                GeniusError::engine_from(
                    format!(
                        "cannot create a context of {per_request} tokens for each of {parallel} requests (try a smaller GENIUS_CONTEXT_SIZE or GENIUS_PARALLEL)"
                    ),
                    err,
                )
            })?;
        let prompter = Prompter::of(cell.borrow_owner());
        let slot_context = cell.borrow_dependent().main.n_ctx() as usize / parallel as usize;
        let declared_pooling = embed::declared_pooling(cell.borrow_owner());
        let embed_shape = embed::Shape::new(
            (options
                .context_size
                .min(cell.borrow_owner().n_ctx_train().max(1))) as usize,
            options.batch_size as usize,
            declared_pooling.is_some(),
        );
        let slots = (0..parallel as i32)
            .map(|seq| Slot {
                seq,
                cached: Vec::new(),
                transcript: None,
                prompt_logits: None,
                job: None,
            })
            .collect();
        Ok(Self {
            name: name.to_owned(),
            cell,
            batch: LlamaBatch::new(options.batch_size as usize, 1),
            prompter,
            slots,
            slot_context,
            batch_size: options.batch_size as usize,
            declared_pooling,
            embed_batch: LlamaBatch::new(embed_shape.batch, 1),
            embed_shape,
            embed_jobs: VecDeque::new(),
            threads,
            ms_per_token: None,
        })
    }

    fn model(&self) -> &LlamaModel {
        self.cell.borrow_owner()
    }

    /// Forgets a slot's cache, e.g. after a failed decode.
    fn reset_slot(&mut self, index: usize) {
        let seq = self.slots[index].seq;
        let _ = self.cell.with_dependent_mut(|_, contexts| {
            contexts
                .main
                .clear_kv_cache_seq(Some(seq as u32), None, None)
        });
        let slot = &mut self.slots[index];
        slot.cached.clear();
        slot.prompt_logits = None;
        slot.transcript = None;
    }

    /// Drops a slot's cache after its first `keep` tokens; false if this
    /// context cannot.
    fn truncate_slot(&mut self, index: usize, keep: usize) -> bool {
        let seq = self.slots[index].seq;
        if keep < self.slots[index].cached.len() {
            let removed = self.cell.with_dependent_mut(|_, contexts| {
                contexts
                    .main
                    .clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None)
            });
            if !matches!(removed, Ok(true)) {
                return false;
            }
            self.slots[index].cached.truncate(keep);
        }
        true
    }

    /// `tokens` for the prompt `text` in `slot`: spliced onto the slot's
    /// cached tokens when `text` continues its transcript at a special token
    /// (where a tokenizer never merges across), so the last answer keeps
    /// the very tokens the model generated.
    fn continue_transcript(
        &self,
        slot: &Slot,
        text: &str,
        tokens: &[LlamaToken],
    ) -> Vec<LlamaToken> {
        let Some(rest) = slot
            .transcript
            .as_deref()
            .and_then(|transcript| text.strip_prefix(transcript))
        else {
            return tokens.to_vec();
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
            return tokens.to_vec();
        }
        let mut spliced = slot.cached.clone();
        spliced.extend(tail);
        spliced
    }

    /// Refuses a prompt whose beginning alone overflows the context,
    /// having tokenized only that beginning: rendering and tokenizing a
    /// 4 MiB prompt whole took the engine 6 s, which every other request
    /// waited through, only to find it 250 times too long.
    fn check_prompt_size(&self, prompt: &Prompt) -> Result<(), GeniusError> {
        let texts: Vec<&str> = match prompt {
            Prompt::Text(text) => vec![text.as_str()],
            Prompt::Chat(messages) => messages
                .iter()
                .filter_map(|message| message.content.as_deref())
                .collect(),
            Prompt::Embed(_) => return Ok(()),
        };
        let total: usize = texts.iter().map(|text| text.len()).sum();
        let budget = self
            .slot_context
            .saturating_mul(PROMPT_PREFIX_BYTES_PER_TOKEN);
        if total <= budget {
            return Ok(());
        }
        let vocab = self.model().vocab();
        let (mut left, mut tokens) = (budget, 0);
        for text in texts {
            if left == 0 {
                break;
            }
            let mut end = left.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            tokens += vocab.tokenize(&text.as_bytes()[..end], false, false).len();
            left -= end;
        }
        if tokens >= self.slot_context {
            // The whole is at least as long; its length is estimated from
            // the part.
            return Err(GeniusError::PromptTooLong {
                tokens: (tokens as f64 * total as f64 / budget as f64) as usize,
                context: self.slot_context,
            });
        }
        Ok(())
    }

    /// Checks and places a request; the error if it cannot run.
    fn start(&mut self, request: &mut Request) -> Result<(), GeniusError> {
        if let Prompt::Embed(embed) = &mut request.prompt {
            let pooling = embed::pooling_for(self.model(), &self.name, embed)?;
            let texts = std::mem::take(&mut embed.inputs);
            self.embed_jobs.push_back(embed::EmbedJob {
                id: request.id,
                output: std::mem::replace(&mut request.output, placeholder_output()),
                vectors: Vec::with_capacity(texts.len()),
                inputs: Vec::with_capacity(texts.len()),
                texts,
                spanning: None,
                tokens: 0,
                truncate: embed.truncate,
                limits: request.limits,
                pooling,
                normalize: embed.normalize,
                started: Instant::now(),
            });
            return Ok(());
        }
        if self.declared_pooling.is_some() {
            return Err(GeniusError::invalid_request(
                "prompt",
                format!(
                    "`{}` is an embedding model: it turns texts into vectors (Embed) and cannot generate text",
                    self.name
                ),
            ));
        }
        self.check_prompt_size(&request.prompt)?;
        let prepared = self
            .prompter
            .tokens(self.model(), &request.prompt, &request.config)?;
        // The free slot whose cache shares the longest prefix with the
        // prompt (continuing its transcript where possible); among equals,
        // the one holding least, so other caches survive for their turns.
        let (index, tokens, reuse) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.job.is_none())
            .map(|(index, slot)| {
                let tokens = self.continue_transcript(slot, &prepared.text, &prepared.tokens);
                let reuse = reusable_prefix(&slot.cached, &tokens);
                (index, tokens, reuse, slot.cached.len())
            })
            .max_by_key(|&(index, _, reuse, held)| {
                (reuse, std::cmp::Reverse(held), std::cmp::Reverse(index))
            })
            .map(|(index, tokens, reuse, _)| (index, tokens, reuse))
            .ok_or_else(|| GeniusError::engine("no free slot for the request"))?;
        if tokens.is_empty() {
            return Err(GeniusError::EmptyPrompt);
        }
        if tokens.len() >= self.slot_context {
            return Err(GeniusError::PromptTooLong {
                tokens: tokens.len(),
                context: self.slot_context,
            });
        }
        // Everything about the request that can be wrong is found before
        // any decoding: a bad schema or grammar costs nothing.
        let grammar = match grammar_text(&request.config, prepared.tool_syntax)? {
            Some(text) => Some(grammar_sampler(
                self.model(),
                &text,
                grammar_field(&request.config),
            )?),
            None => None,
        };
        if let Some(syntax) = prepared.tool_syntax {
            request.output.parse_tool_calls(syntax);
        }
        let mut chooser = Chooser::new(
            &request.config,
            sampler_for(&request.config, self.model().n_vocab()),
            grammar,
        );
        chooser.accept_prompt(&tokens);

        // The same prompt again starts from its saved logits; otherwise the
        // slot keeps the common prefix and decodes the rest.
        let slot = &self.slots[index];
        let same_prompt = slot.prompt_logits.as_ref().is_some_and(|(len, _)| {
            *len == tokens.len() && slot.cached.get(..*len) == Some(&tokens[..])
        });
        let (phase, cached) = if same_prompt && self.truncate_slot(index, tokens.len()) {
            (Phase::FromSaved, tokens.len())
        } else {
            self.slots[index].prompt_logits = None;
            if self.truncate_slot(index, reuse) {
                (Phase::Prefill, reuse)
            } else {
                log::debug!("partial KV cache removal unsupported here, decoding the whole prompt");
                self.reset_slot(index);
                (Phase::Prefill, 0)
            }
        };
        self.slots[index].transcript = None;
        let usage = Usage {
            prompt_tokens: tokens.len(),
            cached_tokens: cached,
            generated_tokens: 0,
            prompt_ms: 0.0,
            generation_ms: 0.0,
            finish_reason: FinishReason::Cancelled,
        };
        let output = std::mem::replace(&mut request.output, placeholder_output());
        self.slots[index].job = Some(Job {
            id: request.id,
            output,
            config: std::mem::take(&mut request.config),
            chooser,
            tokens,
            text: prepared.text,
            usage,
            phase,
            answer: Vec::new(),
            prompt_started: Instant::now(),
            generation_started: None,
        });
        Ok(())
    }

    /// Decodes one batch of texts of the oldest `Embed` request, ending it
    /// when all its texts have vectors. One batch per step, so that the
    /// other requests' steps come in between a long embedding's batches.
    fn embed_next(&mut self, step: &mut Step) {
        let Some(mut job) = self.embed_jobs.pop_front() else {
            return;
        };
        step.progressed = true;
        if let Some(reason) = job.output.check_cancelled() {
            let usage = embed_usage(&job, reason);
            step.ended.push(Ended {
                id: job.id,
                output: job.output,
                result: Ok(usage),
            });
            return;
        }
        if !job.is_tokenized() {
            // Its texts are tokenized a part per step, before any of them
            // is decoded.
            let tokenized = job.tokenize_some(self.model(), &self.name, self.embed_shape.window);
            match tokenized {
                Ok(()) => self.embed_jobs.push_front(job),
                Err(err) => step.ended.push(Ended {
                    id: job.id,
                    output: job.output,
                    result: Err(err),
                }),
            }
            return;
        }
        let Self {
            cell,
            embed_batch,
            embed_shape,
            threads,
            ..
        } = self;
        let (shape, threads) = (*embed_shape, *threads);
        let result = cell.with_dependent_mut(|model, contexts| {
            if contexts.embed.as_ref().map(|(pooling, _)| *pooling) != Some(job.pooling) {
                // Free the old one first.
                contexts.embed = None;
                let context = model
                    .new_context(llama_backend()?, shape.params(job.pooling, threads))
                    .map_err(|err| {
                        GeniusError::engine_from("cannot create the embedding context", err)
                    })?;
                contexts.embed = Some((job.pooling, context));
            }
            let (_, context) = contexts.embed.as_mut().expect("made above");
            embed::run_batch(context, embed_batch, shape, &mut job)
        });
        match result {
            Ok(()) if !job.is_done() => self.embed_jobs.push_front(job),
            Ok(()) => {
                let tokens = job.inputs.iter().map(Vec::len).collect();
                let vectors = std::mem::take(&mut job.vectors);
                job.output
                    .send(InferenceEvent::Embeddings(Embeddings { vectors, tokens }));
                let usage = embed_usage(&job, FinishReason::EndOfGeneration);
                step.ended.push(Ended {
                    id: job.id,
                    output: job.output,
                    result: Ok(usage),
                });
            }
            Err(err) => step.ended.push(Ended {
                id: job.id,
                output: job.output,
                result: Err(err),
            }),
        }
    }

    /// One step: every job that needs the model gets its tokens into one
    /// batch (a generating job its last token, a prefilling job a chunk of
    /// its prompt), the batch is decoded once, and every job with fresh
    /// logits chooses its next token. After it, one batch of texts to
    /// embed, if any wait.
    fn step(&mut self) -> Step {
        // Generation first: a request that just arrived gets its prompt
        // decoded before the next batch of texts to embed, not after.
        let mut step = self.generate();
        self.embed_next(&mut step);
        step
    }

    /// The generating half of a step.
    fn generate(&mut self) -> Step {
        let mut step = Step::default();
        // Cancelled jobs end before anything is spent on them.
        for index in 0..self.slots.len() {
            let cancelled = self.slots[index]
                .job
                .as_mut()
                .and_then(|job| job.output.check_cancelled());
            if let Some(reason) = cancelled {
                step.progressed = true;
                step.ended.push(self.end_job(index, Ok(reason)));
            }
        }
        // First tokens from saved logits need no decoding, nor do choices
        // a grammar is still making.
        for index in 0..self.slots.len() {
            let source = match self.slots[index].job.as_ref() {
                Some(job) if job.output.is_paused() => continue,
                Some(job) if job.phase == Phase::FromSaved => Logits::Saved,
                Some(job) if job.phase == Phase::Choosing => Logits::Pending,
                _ => continue,
            };
            step.progressed = true;
            if let Some(ended) = self.choose(index, source) {
                step.ended.push(ended);
            }
        }

        // Build the batch: generating jobs first (one token each), then
        // prompt chunks in the room left, so that a long prompt delays
        // running answers by one chunk per step, never by the whole prompt.
        self.batch.clear();
        let mut sampled: Vec<(usize, i32)> = Vec::new();
        let mut failed: Option<String> = None;
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            let Some(job) = &slot.job else { continue };
            if job.output.is_paused() {
                continue;
            }
            if let Phase::Decode(token) = job.phase {
                let position = slot.cached.len() as i32;
                if let Err(err) = self.batch.add(token, position, &[slot.seq], true) {
                    failed = Some(err.to_string());
                    break;
                }
                sampled.push((index, self.batch.n_tokens() - 1));
            }
        }
        let generating = sampled.len();
        // Prompts take the room the answers leave in the batch (chunked
        // prefill: a long prompt delays the running answers by at most one
        // batch per step, never by the whole prompt; GENIUS_BATCH_SIZE
        // bounds that delay).
        let mut prefilled: Vec<(usize, usize)> = Vec::new();
        let mut waiting: Vec<usize> = (0..self.slots.len())
            .filter(|&index| {
                self.slots[index]
                    .job
                    .as_ref()
                    .is_some_and(|job| job.phase == Phase::Prefill && !job.output.is_paused())
            })
            .collect();
        // Prompts get only as many tokens as the step can decode in about
        // a target time: deep in a long context a full batch of 512
        // prompt tokens takes seconds on a small CPU, and whoever arrives
        // meanwhile waits for it. The target is shorter while other
        // requests wait on this step (answers running, or several
        // prompts), and longer for a prompt alone, whose speed it is.
        let contended = generating > 0 || waiting.len() > 1;
        let target = if contended {
            STEP_TARGET_MS
        } else {
            STEP_TARGET_ALONE_MS
        };
        let mut budget = match self.ms_per_token {
            Some(ms) => {
                ((target / ms) as usize).clamp(MIN_PREFILL, self.batch_size.max(MIN_PREFILL))
            }
            None => self.batch_size,
        };
        // The prompt with the least left to decode first, then the oldest:
        // a short request's first token does not wait behind a long
        // prompt's whole prefill (a 9,700-token prompt held another
        // client's first token for 180 s when the oldest went first), and
        // a long prompt still gets the room the shorter ones leave.
        waiting.sort_by_key(|&index| {
            let slot = &self.slots[index];
            slot.job
                .as_ref()
                .map(|job| (job.tokens.len() - slot.cached.len(), job.prompt_started))
        });
        for index in waiting {
            let room = self
                .batch_size
                .saturating_sub(self.batch.n_tokens() as usize)
                .min(budget);
            let slot = &self.slots[index];
            let Some(job) = &slot.job else { continue };
            if room == 0 {
                break;
            }
            let start = slot.cached.len();
            let count = (job.tokens.len() - start).min(room);
            budget -= count;
            let last_chunk = start + count == job.tokens.len();
            for (offset, &token) in job.tokens[start..start + count].iter().enumerate() {
                let is_last = last_chunk && offset + 1 == count;
                if let Err(err) =
                    self.batch
                        .add(token, (start + offset) as i32, &[slot.seq], is_last)
                {
                    failed = Some(err.to_string());
                    break;
                }
            }
            prefilled.push((index, count));
            if last_chunk {
                sampled.push((index, self.batch.n_tokens() - 1));
            }
        }
        if self.batch.n_tokens() == 0 {
            return step;
        }
        step.progressed = true;
        let decoding = Instant::now();
        let decoded = match failed {
            Some(err) => Err(GeniusError::engine(format!("cannot fill the batch: {err}"))),
            None => {
                let batch = &mut self.batch;
                self.cell
                    .with_dependent_mut(|_, contexts| contexts.main.decode(batch))
                    .map_err(|err| GeniusError::engine_from("decoding failed", err))
            }
        };
        let tokens = self.batch.n_tokens() as usize;
        if tokens >= MIN_PREFILL {
            // Batches of a few tokens cost mostly their fixed overhead and
            // would overstate the cost of a token.
            let ms = millis_since(decoding) / tokens as f64;
            self.ms_per_token = Some(match self.ms_per_token {
                Some(before) => before * 0.7 + ms * 0.3,
                None => ms,
            });
        }
        if let Err(err) = decoded {
            let err = std::sync::Arc::new(err);
            // The state of every sequence in the batch is unknown now.
            let involved: Vec<usize> = sampled
                .iter()
                .map(|(index, _)| *index)
                .chain(prefilled.iter().map(|(index, _)| *index))
                .collect();
            for index in involved {
                if self.slots[index].job.is_some() {
                    let message = GeniusError::engine_from("the batch failed", err.clone());
                    step.ended.push(self.end_job(index, Err(message)));
                    self.reset_slot(index);
                }
            }
            return step;
        }
        // What was decoded is now in the cache.
        for &(index, count) in &prefilled {
            let slot = &mut self.slots[index];
            if let Some(job) = &slot.job {
                let start = slot.cached.len();
                slot.cached
                    .extend_from_slice(&job.tokens[start..start + count]);
            }
        }
        for &(index, _) in sampled.iter().take(generating) {
            let slot = &mut self.slots[index];
            if let Some(Job {
                phase: Phase::Decode(token),
                ..
            }) = &slot.job
            {
                slot.cached.push(*token);
            }
        }
        // Every job with fresh logits chooses.
        for (index, logits_index) in sampled {
            let finished_prompt = self.slots[index]
                .job
                .as_ref()
                .is_some_and(|job| job.phase == Phase::Prefill);
            if finished_prompt {
                let logits = self
                    .cell
                    .borrow_dependent()
                    .main
                    .get_logits_ith(logits_index);
                let slot = &mut self.slots[index];
                let mut kept = slot
                    .prompt_logits
                    .take()
                    .map(|(_, buffer)| buffer)
                    .unwrap_or_default();
                kept.clear();
                kept.extend_from_slice(logits);
                slot.prompt_logits = Some((slot.cached.len(), kept));
                if let Some(job) = &mut slot.job {
                    job.usage.prompt_ms = millis_since(job.prompt_started);
                }
            }
            if let Some(ended) = self.choose(index, Logits::Batch(logits_index)) {
                step.ended.push(ended);
            }
        }
        step
    }

    /// Chooses slot `index`'s next token, shows it, and either queues it
    /// for decoding or ends the job.
    fn choose(&mut self, index: usize, source: Logits) -> Option<Ended> {
        let Loaded {
            cell,
            slots,
            prompter,
            slot_context,
            ..
        } = self;
        let model = cell.borrow_owner();
        let Slot {
            cached,
            prompt_logits,
            job,
            ..
        } = &mut slots[index];
        let logits: &[f32] = match source {
            Logits::Saved => &prompt_logits.as_ref()?.1,
            Logits::Batch(at) => cell.borrow_dependent().main.get_logits_ith(at),
            Logits::Pending => &[],
        };
        let job = job.as_mut()?;
        job.generation_started.get_or_insert_with(Instant::now);
        let turn = (|| -> Result<Turn, GeniusError> {
            if job
                .config
                .max_tokens
                .is_some_and(|max| job.usage.generated_tokens >= max)
            {
                return Ok(Turn::Ended(FinishReason::MaxTokens));
            }
            if cached.len() >= *slot_context {
                return Ok(Turn::Ended(FinishReason::ContextFull));
            }
            let choice = match source {
                Logits::Pending => job.chooser.resume()?,
                _ => job.chooser.choose(logits)?,
            };
            let token = match choice {
                Choice::Token(token) => token,
                Choice::Later => {
                    job.phase = Phase::Choosing;
                    return Ok(Turn::Moved);
                }
            };
            let searched = job.chooser.take_searched_logits();
            let logits = searched.as_deref().unwrap_or(logits);
            let end = model.vocab().is_eog(token);
            if job.config.logprobs && !end {
                let report = token_logprobs(
                    model,
                    logits,
                    token,
                    usize::from(job.config.top_logprobs),
                    &mut job.chooser,
                );
                job.output.logprobs(report);
            }
            job.chooser.accept(token)?;
            if end {
                return Ok(Turn::Ended(FinishReason::EndOfGeneration));
            }
            job.usage.generated_tokens += 1;
            let mut piece = Vec::with_capacity(16);
            model
                .vocab()
                .token_to_piece_into(token, &mut piece, prompter.is_markup(token), None);
            job.answer.extend_from_slice(&piece);
            job.phase = Phase::Decode(token);
            Ok(match job.output.push(&piece) {
                Some(reason) => Turn::Ended(reason),
                None => Turn::Moved,
            })
        })();
        match turn {
            Ok(Turn::Moved) => None,
            Ok(Turn::Ended(reason)) => Some(self.end_job(index, Ok(reason))),
            Err(err) => Some(self.end_job(index, Err(err))),
        }
    }

    /// Takes the job out of slot `index`, remembering its transcript when
    /// the cache holds all of it.
    fn end_job(&mut self, index: usize, result: Result<FinishReason, GeniusError>) -> Ended {
        let slot = &mut self.slots[index];
        let mut job = slot.job.take().expect("a job to end");
        let finished_answer = job.tokens.len() + job.usage.generated_tokens;
        // The cache holds the prompt and every answer token but one that
        // was chosen and never decoded: the next turn continues from here
        // only when its text extends exactly this.
        slot.transcript = match (&result, String::from_utf8(std::mem::take(&mut job.answer))) {
            (Ok(_), Ok(answer)) if slot.cached.len() == finished_answer => {
                Some(format!("{}{answer}", job.text))
            }
            _ => None,
        };
        if let Some(started) = job.generation_started {
            job.usage.generation_ms = millis_since(started);
        }
        if job.chooser.resampled > 0 {
            log::debug!(
                "the grammar redirected {} of {} tokens",
                job.chooser.resampled,
                job.usage.generated_tokens
            );
        }
        Ended {
            id: job.id,
            output: job.output,
            result: result.map(|reason| Usage {
                finish_reason: reason,
                ..job.usage
            }),
        }
    }
}

/// How long a step that decodes prompt tokens should take at most, while
/// other requests wait on it, and for a prompt alone (a request that
/// arrives meanwhile waits for the step): prompt tokens are cut to fit.
const STEP_TARGET_MS: f64 = 500.0;
const STEP_TARGET_ALONE_MS: f64 = 1500.0;

/// The fewest prompt tokens a step decodes (when any wait), and the
/// smallest batch whose time per token counts as a measure.
const MIN_PREFILL: usize = 32;

/// A prompt of more bytes than the context's tokens times this is first
/// measured by the tokens of only that many bytes of it.
const PROMPT_PREFIX_BYTES_PER_TOKEN: usize = 16;

/// An output that goes nowhere, left in a request whose real output moved
/// into the engine.
fn placeholder_output() -> Output {
    struct Nowhere;
    impl crate::engine::EventSink for Nowhere {
        fn send(
            &mut self,
            _: Result<rusty_genius_core::protocol::InferenceEvent, rusty_genius_core::ErrorReport>,
        ) -> bool {
            false
        }
    }
    Output::new(
        &InferenceConfig::default(),
        Nowhere,
        crate::CancelToken::default(),
    )
}

/// The usage of an embedding job: its tokens, all "prompt".
fn embed_usage(job: &embed::EmbedJob, finish_reason: FinishReason) -> Usage {
    Usage {
        prompt_tokens: job.inputs.iter().map(Vec::len).sum(),
        cached_tokens: 0,
        generated_tokens: 0,
        prompt_ms: millis_since(job.started),
        generation_ms: 0.0,
        finish_reason,
    }
}

/// The llama.cpp [`Engine`].
///
/// Keeps one model and one context with a sequence per request it serves
/// at once ([`LlamaOptions::parallel`]); each step decodes the next token
/// of every answering request and a chunk of any new prompt in one batch.
/// Each sequence's KV cache survives between requests, and a new request
/// goes to the free sequence whose cache shares the longest prefix with its
/// prompt, so a conversation's next turn decodes only what is new. Create
/// it on the thread that will use it (the
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
            context_size: loaded.slot_context,
            vocab_size: loaded.model().n_vocab().max(0) as usize,
        };
        log::info!(
            "loaded {} from {} ({} requests at once, {} tokens of context each, {} threads, {})",
            info.name,
            path.display(),
            loaded.slots.len(),
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

    fn capacity(&self) -> usize {
        self.loaded
            .as_ref()
            .map_or(self.options.parallel.max(1) as usize, |loaded| {
                loaded.slots.len()
            })
    }

    fn running(&self) -> usize {
        self.loaded.as_ref().map_or(0, |loaded| {
            loaded
                .slots
                .iter()
                .filter(|slot| slot.job.is_some())
                .count()
                + loaded.embed_jobs.len()
        })
    }

    fn start(&mut self, mut request: Request) -> Result<(), Box<Refused>> {
        let Some(loaded) = self.loaded.as_mut() else {
            return Err(Box::new(Refused {
                output: request.output,
                error: GeniusError::NoModelLoaded,
            }));
        };
        match loaded.start(&mut request) {
            Ok(()) => Ok(()),
            Err(error) => Err(Box::new(Refused {
                output: request.output,
                error,
            })),
        }
    }

    fn step(&mut self) -> Step {
        match self.loaded.as_mut() {
            Some(loaded) => loaded.step(),
            None => Step::default(),
        }
    }
}
