//! Embeddings with llama.cpp: many texts decoded together, one sequence
//! each, in a context of their own that pools each sequence into a vector.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::{Embed, GeniusError, Limits, Pooling};

use crate::engine::{Output, RequestId};

/// The most texts one decode embeds together.
pub(super) const MAX_SEQUENCES: u32 = 64;

/// An `Embed` request, already tokenized, and the vectors made so far.
/// Each engine step decodes one batch of its texts, so that the other
/// requests get their steps in between.
pub(super) struct EmbedJob {
    pub(super) id: RequestId,
    pub(super) output: Output,
    pub(super) inputs: Vec<Vec<LlamaToken>>,
    pub(super) pooling: Pooling,
    pub(super) normalize: bool,
    pub(super) started: Instant,
    /// The vectors of `inputs[..vectors.len()]`.
    pub(super) vectors: Vec<Vec<f32>>,
}

impl EmbedJob {
    /// Whether every text has its vector.
    pub(super) fn is_done(&self) -> bool {
        self.vectors.len() == self.inputs.len()
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
    /// The most tokens one decode takes (at least `window`: an
    /// encoder sees a whole text at once).
    pub(super) batch: usize,
}

/// How many bytes the output of one embedding decode may take. With
/// embeddings on, llama.cpp computes the output layer for every token of
/// the batch, into a buffer of vocabulary × batch floats (twice: the
/// compute buffer and the output buffer): for a generative model with a
/// large vocabulary that is gigabytes (gemma 3: 262,144 × 4096 × 4 bytes
/// = 4 GiB per buffer), and most of the decode's time.
const OUTPUT_BUDGET: usize = 256 << 20;

impl Shape {
    /// The shape for a model with `vocab` tokens whose texts may be up to
    /// `window` tokens. An embedding model (`declares_pooling`) keeps its
    /// whole window: it has no output layer over the vocabulary. A
    /// generative model embeds texts of at most as many tokens as keep
    /// that layer's output within [`OUTPUT_BUDGET`] (at least 64).
    pub(super) fn new(
        window: usize,
        batch_size: usize,
        vocab: usize,
        declares_pooling: bool,
    ) -> Self {
        let window = if declares_pooling {
            window
        } else {
            let fits = OUTPUT_BUDGET / (vocab.max(1) * std::mem::size_of::<f32>() * 2);
            window.min((fits / 64 * 64).max(64))
        };
        let batch = if declares_pooling {
            batch_size.max(window)
        } else {
            window
        };
        Self { window, batch }
    }

    pub(super) fn params(&self, pooling: Pooling, threads: i32) -> LlamaContextParams {
        let batch = u32::try_from(self.batch).unwrap_or(u32::MAX);
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(batch))
            .with_n_batch(batch)
            .with_n_ubatch(batch)
            .with_n_seq_max(MAX_SEQUENCES)
            // The texts of one decode share the cells; each decode starts
            // from an empty cache.
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_embeddings(true)
            .with_pooling_type(llama_pooling(pooling))
    }
}

/// Checks and tokenizes an `Embed` request: the pooling to use, and each
/// text's tokens (cut to the window when the request allows it).
pub(super) fn prepare(
    model: &LlamaModel,
    name: &str,
    embed: &Embed,
    window: usize,
    limits: &Limits,
) -> Result<(Pooling, Vec<Vec<LlamaToken>>), GeniusError> {
    embed.validate()?;
    let pooling = embed.pooling.or_else(|| declared_pooling(model)).ok_or_else(|| {
        GeniusError::invalid_request(
            "pooling",
            format!(
                "`{name}` is a generative model and declares no pooling: ask with a pooling (mean, cls or last) to embed with it, or load an embedding model"
            ),
        )
    })?;
    let vocab = model.vocab();
    let mut inputs = Vec::with_capacity(embed.inputs.len());
    let mut total = 0;
    for (index, text) in embed.inputs.iter().enumerate() {
        let mut tokens = vocab.tokenize(text.as_bytes(), true, false);
        if tokens.is_empty() {
            return Err(GeniusError::invalid_request(
                format!("inputs[{index}]"),
                "the text has no tokens",
            ));
        }
        if tokens.len() > window {
            if !embed.truncate {
                return Err(GeniusError::invalid_request(
                    format!("inputs[{index}]"),
                    format!(
                        "the text is {} tokens but `{name}` embeds at most {window}: shorten it, or ask with truncate to cut it",
                        tokens.len()
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
        total += tokens.len();
        limits.check_embed_tokens(total)?;
        inputs.push(tokens);
    }
    Ok((pooling, inputs))
}

/// Embeds the next texts of `job` in `context`: as many as fit one batch
/// (each its own sequence), each pooled by the context into one vector.
pub(super) fn run_batch(
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
            let mut vector = pooled.to_vec();
            if job.normalize {
                rusty_genius_core::embed::normalize(&mut vector);
            }
            job.vectors.push(vector);
        }
        Ok(())
    });
    context.clear_kv_cache();
    pooled
}
