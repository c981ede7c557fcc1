//! Embeddings with llama.cpp, in a context of their own: many texts decoded
//! together, one sequence each. An embedding model (an encoder, which sees
//! a whole text at once) has llama.cpp pool each sequence into a vector; a
//! generative model is causal, so a text may span several decodes, and
//! the vector is pooled here from its tokens' hidden states.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::{Embed, EmbedInput, GeniusError, Limits, Pooling};

use rusty_genius_core::protocol::{FinishReason, InferenceEvent, Usage};
use rusty_genius_core::Embeddings;

use super::{llama_backend, Control, Loaded};
use crate::engine::{millis_since, Ended, Output, RequestId, Step};

/// The most texts one decode embeds together.
pub(super) const MAX_SEQUENCES: u32 = 64;

/// An `Embed` request, already tokenized, and the vectors made so far.
/// Each engine step decodes one batch of its texts, so that the other
/// requests get their steps in between.
pub(super) struct EmbedJob {
    pub(super) id: RequestId,
    pub(super) output: Output,
    /// The texts (or token ids) to embed.
    pub(super) texts: Vec<EmbedInput>,
    /// The tokens of `texts[..inputs.len()]`.
    pub(super) inputs: Vec<Vec<LlamaToken>>,
    /// How many tokens `inputs` hold in all.
    pub(super) tokens: usize,
    pub(super) truncate: bool,
    pub(super) limits: Limits,
    pub(super) pooling: Pooling,
    pub(super) normalize: bool,
    /// The components of each vector kept (`Embed::dimensions`).
    pub(super) dimensions: Option<usize>,
    pub(super) started: Instant,
    /// The vectors of `inputs[..vectors.len()]`.
    pub(super) vectors: Vec<Vec<f32>>,
    /// In a generative model's context: the text whose tokens are partly
    /// decoded (it goes on in the next decode).
    pub(super) spanning: Option<Spanning>,
}

/// A text decoded in part: where it is, and what its vector gathers.
pub(super) struct Spanning {
    index: usize,
    seq: i32,
    done: usize,
    pooled: Vec<f32>,
}

impl EmbedJob {
    /// Whether every text has its vector.
    pub(super) fn is_done(&self) -> bool {
        self.vectors.len() == self.texts.len()
    }
}

/// The pooling the model file declares (`<arch>.pooling_type`), which
/// makes it an embedding model; `None` for a generative model.
pub(super) fn declared_pooling(model: &LlamaModel) -> Option<Pooling> {
    let arch = model.meta_val_str("general.architecture").ok()?;
    let value = model.meta_val_str(&format!("{arch}.pooling_type")).ok()?;
    match LlamaPoolingType::from(value.trim().parse::<i32>().ok()?) {
        LlamaPoolingType::Mean => Some(Pooling::Mean),
        LlamaPoolingType::Cls => Some(Pooling::Cls),
        LlamaPoolingType::Last => Some(Pooling::Last),
        _ => None,
    }
}

/// Embedding models trained so that the beginning of each vector is an
/// embedding of its own (Matryoshka representation learning), as their
/// model cards say: names as GGUF files give them, lower case, words
/// joined by `-`.
const MATRYOSHKA: &[&str] = &[
    "nomic-embed-text-v1.5",
    "nomic-embed-text-v2",
    "mxbai-embed-large-v1",
    "embeddinggemma",
    "qwen3-embedding",
    "snowflake-arctic-embed-m-v1.5",
    "snowflake-arctic-embed-m-v2",
    "snowflake-arctic-embed-l-v2",
    "jina-embeddings-v3",
];

/// Whether the model file names one of the [`MATRYOSHKA`] models.
pub(super) fn trained_for_shorter(model: &LlamaModel) -> bool {
    let meta = |key: &str| model.meta_val_str(key).ok();
    let basename = meta("general.basename");
    let versioned = basename
        .as_ref()
        .zip(meta("general.version"))
        .map(|(base, version)| format!("{base}-{version}"));
    [meta("general.name"), basename, versioned]
        .into_iter()
        .flatten()
        .any(|name| names_matryoshka(&name))
}

fn names_matryoshka(name: &str) -> bool {
    let name: String = name
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c == ' ' || c == '_' { '-' } else { c })
        .collect();
    MATRYOSHKA.iter().any(|family| name.contains(family))
}

/// The width of the model's vectors.
pub(super) fn width(model: &LlamaModel) -> usize {
    let out = model.n_embd_out();
    usize::try_from(if out > 0 { out } else { model.n_embd() }).unwrap_or(0)
}

/// A finished vector, cut to the asked `dimensions` and normalized as
/// asked.
fn finish(mut vector: Vec<f32>, dimensions: Option<usize>, normalize: bool) -> Vec<f32> {
    if let Some(dimensions) = dimensions {
        vector.truncate(dimensions);
    }
    if normalize {
        rusty_genius_core::embed::normalize(&mut vector);
    }
    vector
}

fn llama_pooling(pooling: Pooling) -> LlamaPoolingType {
    match pooling {
        Pooling::Mean => LlamaPoolingType::Mean,
        Pooling::Cls => LlamaPoolingType::Cls,
        Pooling::Last => LlamaPoolingType::Last,
    }
}

/// Sizes of the embedding context.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// The longest text, in tokens.
    pub(super) window: usize,
    /// The most tokens one decode takes: at least `window` for an encoder,
    /// which sees a whole text at once; [`STEP_TOKENS`] for a generative
    /// model.
    pub(super) batch: usize,
    /// Whether texts are pooled here from a generative model's hidden
    /// states, over as many decodes as they need.
    pub(super) causal: bool,
}

/// The most tokens one embedding decode of a generative model takes. With
/// embeddings on, llama.cpp computes the output layer for every token of
/// the batch (vocabulary × batch floats: for gemma 3, 262,144 × 4096 × 4
/// bytes = 4 GiB per buffer at a 4096-token batch, in the compute buffer
/// and again in the output buffer, and most of the time); 64 tokens keep
/// that under 100 MB and a decode under half a second on two cores, which
/// is how long the other requests wait for it.
const STEP_TOKENS: usize = 64;

impl Shape {
    /// The shape for texts of up to `window` tokens. An embedding model
    /// (`declares_pooling`) decodes whole texts, as many as fit a batch of
    /// `batch_size` tokens; a generative model [`STEP_TOKENS`] at a time.
    pub(super) fn new(window: usize, batch_size: usize, declares_pooling: bool) -> Self {
        if declares_pooling {
            Self {
                window,
                batch: batch_size.max(window),
                causal: false,
            }
        } else {
            Self {
                window,
                batch: STEP_TOKENS,
                causal: true,
            }
        }
    }

    pub(super) fn params(&self, pooling: Pooling, threads: i32) -> LlamaContextParams {
        let batch = u32::try_from(self.batch).unwrap_or(u32::MAX);
        // A text spanning decodes keeps its cells until it ends, beside
        // the next decode's.
        let cells = if self.causal {
            self.window + self.batch
        } else {
            self.batch
        };
        let pooling = if self.causal {
            LlamaPoolingType::None
        } else {
            llama_pooling(pooling)
        };
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(u32::try_from(cells).unwrap_or(u32::MAX)))
            .with_n_batch(batch)
            .with_n_ubatch(batch)
            .with_n_seq_max(MAX_SEQUENCES)
            // The texts of one decode share the cells; finished texts'
            // cells are cleared after each decode.
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_embeddings(true)
            .with_pooling_type(pooling)
    }
}

/// Checks an `Embed` request and chooses its pooling; its texts are
/// tokenized later, a part per step ([`EmbedJob::tokenize_some`]).
pub(super) fn pooling_for(
    model: &LlamaModel,
    name: &str,
    embed: &Embed,
) -> Result<Pooling, GeniusError> {
    embed.validate()?;
    if embed.dimensions.is_some() {
        // The model's metadata is read only when a cut is asked for.
        embed.check_dimensions(name, width(model), trained_for_shorter(model))?;
    }
    embed.pooling.or_else(|| declared_pooling(model)).ok_or_else(|| {
        GeniusError::invalid_request(
            "pooling",
            format!(
                "`{name}` is a generative model and declares no pooling: ask with a pooling (mean, cls or last) to embed with it, or load an embedding model"
            ),
        )
    })
}

/// Bytes of text tokenized per engine step: tokenizing runs at a few
/// megabytes a second, and the other requests wait while it does.
const TOKENIZE_PER_STEP: usize = 128 * 1024;

/// A text longer than this many bytes per token of the window has only
/// this much of its beginning tokenized first: if that is already over
/// the window, the rest cannot matter (it is refused, or cut).
const PREFIX_BYTES_PER_TOKEN: usize = 16;

impl EmbedJob {
    /// Whether every text has its tokens.
    pub(super) fn is_tokenized(&self) -> bool {
        self.inputs.len() == self.texts.len()
    }

    /// Tokenizes the next texts, about [`TOKENIZE_PER_STEP`] bytes of
    /// them, each cut to `window` tokens when the request allows it, and
    /// checks the request's token limit as it goes.
    pub(super) fn tokenize_some(
        &mut self,
        model: &LlamaModel,
        name: &str,
        window: usize,
    ) -> Result<(), GeniusError> {
        let vocab = model.vocab();
        let mut budget = TOKENIZE_PER_STEP;
        while !self.is_tokenized() && budget > 0 {
            let index = self.inputs.len();
            let text = match &self.texts[index] {
                EmbedInput::Text(text) => text.as_str(),
                EmbedInput::Tokens(ids) => {
                    let tokens = token_ids(ids, index, model, name)?;
                    budget = budget.saturating_sub(tokens.len());
                    self.push_tokens(tokens, index, name, window, false, &vocab)?;
                    continue;
                }
            };
            let prefix = window.saturating_mul(PREFIX_BYTES_PER_TOKEN);
            let tokens = if text.len() > prefix {
                let mut end = prefix;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                let head = vocab.tokenize(&text.as_bytes()[..end], true, false);
                if head.len() > window {
                    head
                } else {
                    vocab.tokenize(text.as_bytes(), true, false)
                }
            } else {
                vocab.tokenize(text.as_bytes(), true, false)
            };
            budget = budget.saturating_sub(text.len().min(prefix.max(1)));
            if tokens.is_empty() {
                return Err(GeniusError::invalid_request(
                    format!("inputs[{index}]"),
                    "the text has no tokens",
                ));
            }
            let at_least = text.len() > prefix;
            self.push_tokens(tokens, index, name, window, at_least, &vocab)?;
        }
        Ok(())
    }

    /// Adds the tokens of input `index`, cut to `window` when the request
    /// allows it. `at_least`: only a prefix was tokenized, so the count is
    /// a lower bound.
    fn push_tokens(
        &mut self,
        mut tokens: Vec<LlamaToken>,
        index: usize,
        name: &str,
        window: usize,
        at_least: bool,
        vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    ) -> Result<(), GeniusError> {
        if tokens.len() > window {
            if !self.truncate {
                return Err(GeniusError::invalid_request(
                    format!("inputs[{index}]"),
                    format!(
                        "the input is {}{} tokens but `{name}` embeds at most {window}: shorten it, or ask with truncate to cut it",
                        if at_least { "more than " } else { "" },
                        tokens.len().min(if at_least { window } else { usize::MAX })
                    ),
                ));
            }
            // Keep the end marker an encoder was trained with ([SEP]).
            let last = *tokens.last().expect("not empty");
            tokens.truncate(window);
            if vocab.is_control(last) {
                tokens[window - 1] = last;
            }
        }
        self.tokens += tokens.len();
        self.limits.check_embed_tokens(self.tokens)?;
        self.inputs.push(tokens);
        Ok(())
    }
}

/// Token ids sent as input `index`, each checked against the vocabulary.
fn token_ids(
    ids: &[u32],
    index: usize,
    model: &LlamaModel,
    name: &str,
) -> Result<Vec<LlamaToken>, GeniusError> {
    let size = u32::try_from(model.n_vocab()).unwrap_or(0);
    ids.iter()
        .enumerate()
        .map(|(at, &id)| {
            if id >= size {
                return Err(GeniusError::invalid_request(
                    format!("inputs[{index}][{at}]"),
                    format!(
                        "token id {id} is not in the vocabulary of `{name}`, which has {size} tokens (ids must be this model's own, not another tokenizer's: send text otherwise)"
                    ),
                ));
            }
            Ok(LlamaToken(id as i32))
        })
        .collect()
}

/// Embeds the next texts of `job` in `context`, one decode's worth.
pub(super) fn run_batch(
    context: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    shape: Shape,
    job: &mut EmbedJob,
) -> Result<(), GeniusError> {
    if shape.causal {
        run_causal(context, batch, shape, job)
    } else {
        run_whole(context, batch, shape, job)
    }
}

/// The next [`STEP_TOKENS`] tokens of `job`'s texts in a generative model:
/// the text left partly decoded goes on first (its cells stayed), then new
/// texts, each its own sequence, the last of them perhaps in part. Every
/// token's hidden state is pooled into its text's vector as it comes.
fn run_causal(
    context: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    shape: Shape,
    job: &mut EmbedJob,
) -> Result<(), GeniusError> {
    let fill = |err| GeniusError::engine_from("cannot fill the batch", err);
    if job.vectors.is_empty() && job.spanning.is_none() {
        // A job cancelled midway may have left a text's cells.
        context.clear_kv_cache();
    }
    batch.clear();
    // (text index, sequence, first position, tokens in this batch, row of
    // its first token)
    let mut parts: Vec<(usize, i32, usize, usize, i32)> = Vec::new();
    let mut room = shape.batch;
    let mut spanning = job.spanning.take();
    let mut next = job.vectors.len() + usize::from(spanning.is_some());
    if let Some(text) = &spanning {
        let tokens = &job.inputs[text.index];
        let count = (tokens.len() - text.done).min(room);
        let row = batch.n_tokens();
        for (offset, &token) in tokens[text.done..text.done + count].iter().enumerate() {
            batch
                .add(token, (text.done + offset) as i32, &[text.seq], true)
                .map_err(fill)?;
        }
        parts.push((text.index, text.seq, text.done, count, row));
        room -= count;
    }
    let busy = spanning.as_ref().map(|text| text.seq);
    let mut seqs = (0..MAX_SEQUENCES as i32).filter(|seq| Some(*seq) != busy);
    while room > 0 && next < job.inputs.len() {
        let Some(seq) = seqs.next() else { break };
        let tokens = &job.inputs[next];
        let count = tokens.len().min(room);
        let row = batch.n_tokens();
        for (position, &token) in tokens[..count].iter().enumerate() {
            batch
                .add(token, position as i32, &[seq], true)
                .map_err(fill)?;
        }
        parts.push((next, seq, 0, count, row));
        room -= count;
        next += 1;
    }
    let result = (|| {
        context
            .decode(batch)
            .map_err(|err| GeniusError::engine_from("decoding the texts to embed failed", err))?;
        for &(index, seq, start, count, row) in &parts {
            let mut text = match spanning.take() {
                Some(text) if text.index == index => text,
                other => {
                    spanning = other;
                    Spanning {
                        index,
                        seq,
                        done: 0,
                        pooled: Vec::new(),
                    }
                }
            };
            for offset in 0..count {
                let hidden = context.embeddings_ith(row + offset as i32).map_err(|err| {
                    GeniusError::engine_from("llama.cpp returned no hidden state", err)
                })?;
                pool_token(job.pooling, &mut text.pooled, hidden, start + offset);
            }
            text.done = start + count;
            let length = job.inputs[index].len();
            if text.done < length {
                job.spanning = Some(text);
                continue;
            }
            let mut vector = text.pooled;
            if job.pooling == Pooling::Mean {
                let n = length as f32;
                vector.iter_mut().for_each(|x| *x /= n);
            }
            job.vectors
                .push(finish(vector, job.dimensions, job.normalize));
            let _ = context.clear_kv_cache_seq(Some(seq as u32), None, None);
        }
        Ok(())
    })();
    if result.is_err() {
        job.spanning = None;
        context.clear_kv_cache();
    }
    result
}

/// Adds the hidden state of a text's token at `position` to its vector.
fn pool_token(pooling: Pooling, pooled: &mut Vec<f32>, hidden: &[f32], position: usize) {
    match pooling {
        Pooling::Mean => {
            if pooled.is_empty() {
                pooled.resize(hidden.len(), 0.0);
            }
            pooled.iter_mut().zip(hidden).for_each(|(sum, x)| *sum += x);
        }
        Pooling::Cls if position == 0 => *pooled = hidden.to_vec(),
        Pooling::Cls => {}
        Pooling::Last => {
            pooled.clear();
            pooled.extend_from_slice(hidden);
        }
    }
}

/// Embeds the next whole texts of `job` in an encoder's `context`: as
/// many as fit one batch (each its own sequence), each pooled by the
/// context into one vector.
fn run_whole(
    context: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    shape: Shape,
    job: &mut EmbedJob,
) -> Result<(), GeniusError> {
    let inputs = &job.inputs;
    batch.clear();
    let first = job.vectors.len();
    let mut next = first;
    let mut tokens = 0;
    while next < inputs.len()
        && next - first < MAX_SEQUENCES as usize
        && tokens + inputs[next].len() <= shape.batch
    {
        let seq = (next - first) as i32;
        for (position, &token) in inputs[next].iter().enumerate() {
            batch
                .add(token, position as i32, &[seq], true)
                .map_err(|err| GeniusError::engine_from("cannot fill the batch", err))?;
        }
        tokens += inputs[next].len();
        next += 1;
    }
    context.clear_kv_cache();
    let decoded = context
        .decode(batch)
        .map_err(|err| GeniusError::engine_from("decoding the texts to embed failed", err));
    let pooled = decoded.and_then(|()| {
        for seq in 0..(next - first) as i32 {
            let pooled = context.embeddings_seq_ith(seq).map_err(|err| {
                GeniusError::engine_from("llama.cpp returned no pooled embedding", err)
            })?;
            job.vectors
                .push(finish(pooled.to_vec(), job.dimensions, job.normalize));
        }
        Ok(())
    });
    context.clear_kv_cache();
    pooled
}

/// The usage of an embedding job: its tokens, all "prompt".
fn embed_usage(job: &EmbedJob, finish_reason: FinishReason) -> Usage {
    Usage {
        prompt_tokens: job.inputs.iter().map(Vec::len).sum(),
        cached_tokens: 0,
        generated_tokens: 0,
        draft_tokens: 0,
        accepted_draft_tokens: 0,
        prompt_ms: millis_since(job.started),
        generation_ms: 0.0,
        finish_reason,
    }
}

impl Loaded {
    /// Decodes one batch of texts of the oldest `Embed` request, ending it
    /// when all its texts have vectors. One batch per step, so that the
    /// other requests' steps come in between a long embedding's batches;
    /// on `cores` threads, the step's lease.
    pub(super) fn embed_next(&mut self, step: &mut Step, cores: usize) {
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
            stops,
            ..
        } = self;
        let (shape, threads) = (*embed_shape, *threads);
        let result = cell.with_dependent_mut(|model, contexts| {
            if contexts.embed.as_ref().map(|(pooling, _, _)| *pooling) != Some(job.pooling) {
                // Free the old one first.
                contexts.embed = None;
                let context = model
                    .new_context(llama_backend()?, shape.params(job.pooling, threads))
                    .map_err(|err| {
                        GeniusError::engine_from("cannot create the embedding context", err)
                    })?;
                let control = Control::of(&context, model, threads, stops);
                contexts.embed = Some((job.pooling, context, control));
            }
            let (_, context, control) = contexts.embed.as_mut().expect("made above");
            if let Some(control) = control {
                control.set_threads(cores);
            }
            run_batch(context, embed_batch, shape, &mut job)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matryoshka_models_are_known_by_their_names_in_any_spelling() {
        for name in [
            "nomic-embed-text-v1.5",
            "Nomic Embed Text V1.5",
            "mxbai_embed_large_v1",
            "EmbeddingGemma 300m",
            "Qwen3-Embedding-0.6B",
            "snowflake-arctic-embed-m-v2.0",
        ] {
            assert!(names_matryoshka(name), "{name}");
        }
        for name in [
            "all-MiniLM-L6-v2",
            "nomic-embed-text-v1",
            "bge-small-en-v1.5",
            "Qwen2.5-Coder-0.5B-Instruct",
        ] {
            assert!(!names_matryoshka(name), "{name}");
        }
    }

    #[test]
    fn a_cut_vector_keeps_its_beginning_and_is_normalized_again() {
        let cut = finish(vec![3.0, 4.0, 12.0], Some(2), true);
        assert_eq!(cut, [0.6, 0.8]);
        assert_eq!(finish(vec![3.0, 4.0, 12.0], Some(2), false), [3.0, 4.0]);
        assert_eq!(finish(vec![3.0, 4.0], None, false), [3.0, 4.0]);
    }
}
