//! A second, smaller model that guesses ahead for the loaded one
//! (speculative decoding with a draft model): for each answering slot it
//! reads what the slot's sequence holds and chooses, greedily, the tokens
//! it expects next. The loaded model checks them in its next step like any
//! other guesses, so the answer is the loaded model's alone.
//!
//! The draft model has its own context with one sequence per slot. Each
//! sequence keeps what it decoded; a new guess decodes only what the
//! slot's text added since (the tokens its last guesses got wrong are
//! taken out first). A guess stops at the first token the draft model is
//! unsure of: a near-tie is as likely wrong as right, and each guess is a
//! row in the loaded model's step.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::GeniusError;

use super::llama_backend;
use super::threads::{self, Control, Stops};

/// The least probability the draft model must give a token for it to be
/// guessed.
const SURE: f32 = 0.6;

/// The draft model's context and its thread control.
struct DraftContext<'model> {
    context: LlamaContext<'model>,
    control: Option<Control>,
}

self_cell::self_cell!(
    /// The draft model and its context, which borrows it.
    struct DraftCell {
        owner: LlamaModel,
        #[covariant]
        dependent: DraftContext,
    }
);

/// A loaded draft model, with a sequence per slot of the model it drafts
/// for.
pub(super) struct DraftModel {
    name: String,
    cell: DraftCell,
    batch: LlamaBatch<'static>,
    /// What each sequence's cache holds.
    cached: Vec<Vec<LlamaToken>>,
    batch_size: usize,
    /// The attention window of its sliding-window layers, 0 without.
    window: usize,
    /// The target's vocabulary size: a guess past it is not a token there.
    target_vocab: i32,
    /// The tokens each sequence holds.
    per_seq: usize,
}

/// One slot's guess to make: after `text`, at most `most` tokens.
pub(super) struct Want<'a> {
    pub(super) seq: usize,
    pub(super) text: &'a [LlamaToken],
    pub(super) most: usize,
}

impl DraftModel {
    /// Loads the draft model at `path` (called `name`) for `target`
    /// (called `target_name`), with a sequence of `per_request` tokens for
    /// each of `parallel` slots, on the CPU or `devices` as the target.
    /// Refused, naming both models, when their vocabularies differ.
    #[allow(clippy::too_many_arguments)] // each is one setting of the context
    pub(super) fn load(
        name: &str,
        path: &Path,
        target: &LlamaModel,
        target_name: &str,
        model_params: &LlamaModelParams,
        per_request: u32,
        parallel: u32,
        batch_size: u32,
        threads: i32,
        stops: &Arc<Stops>,
    ) -> Result<Self, GeniusError> {
        let backend = llama_backend()?;
        let model = LlamaModel::load_from_file(backend, path, model_params).map_err(|err| {
            GeniusError::InvalidModelFile {
                path: path.to_path_buf(),
                reason: format!("llama.cpp could not load it as a draft model ({err})"),
            }
        })?;
        if let Err(reason) = same_vocabulary(target, &model) {
            return Err(GeniusError::InvalidRequest {
                what: "draft model".into(),
                reason: format!(
                    "`{name}` cannot draft for `{target_name}`: {reason}; a draft model must share its target's tokens (the same family's smaller model)"
                ),
            });
        }
        let per_request = per_request.min(model.n_ctx_train().max(1));
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(per_request.saturating_mul(parallel)))
            .with_n_batch(batch_size)
            .with_n_ubatch(batch_size)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_n_seq_max(parallel)
            .with_kv_unified(false)
            .with_swa_full(false);
        let window = threads::sliding_window(&model);
        let target_vocab = target.n_vocab();
        let cell = DraftCell::try_new(model, |model| {
            model.new_context(backend, params).map(|context| {
                let control = Control::of(&context, model, threads, stops);
                DraftContext { context, control }
            })
        })
        .map_err(|err| {
            GeniusError::engine_from(
                format!("cannot create the draft model {name}'s context"),
                err,
            )
        })?;
        Ok(Self {
            name: name.to_owned(),
            cell,
            batch: LlamaBatch::new(batch_size as usize, 1),
            cached: vec![Vec::new(); parallel as usize],
            batch_size: batch_size as usize,
            window,
            target_vocab,
            per_seq: per_request as usize,
        })
    }

    /// For each of `wants`, in order, the tokens the draft model chooses
    /// after its text, up to its `most`, on `cores` threads; none for a
    /// slot where decoding fails (its sequence starts over next time).
    pub(super) fn draft(&mut self, wants: &[Want<'_>], cores: usize) -> Vec<Vec<LlamaToken>> {
        let mut guesses = vec![Vec::new(); wants.len()];
        if wants.is_empty() {
            return guesses;
        }
        if let Some(control) = &self.cell.borrow_dependent().control {
            control.set_threads(cores);
        }
        // Each sequence drops what its text no longer holds; it decodes
        // at least the text's last token again, for its logits.
        let mut starts = Vec::with_capacity(wants.len());
        for want in wants {
            // A text the draft model's context cannot hold gets nothing.
            if want.text.is_empty() || want.text.len() + want.most > self.per_seq {
                starts.push(want.text.len());
                continue;
            }
            let cached = &self.cached[want.seq];
            let mut common = cached
                .iter()
                .zip(want.text)
                .take_while(|(a, b)| a == b)
                .count()
                .min(want.text.len().saturating_sub(1));
            // A sliding-window cache no longer holds what lies a window
            // back: going back that far starts over.
            if self.window > 0 && cached.len() - common > self.window / 2 {
                common = 0;
            }
            if !self.forget(want.seq, common) {
                common = 0;
            }
            starts.push(common);
        }
        // Catch up, in batches of the context's size: each sequence's
        // logits after its text.
        let mut rows: Vec<Option<i32>> = vec![None; wants.len()];
        let mut next = starts.clone();
        while next.iter().zip(wants).any(|(&n, w)| n < w.text.len()) {
            self.batch.clear();
            let mut added: Vec<(usize, usize)> = Vec::new();
            for (index, want) in wants.iter().enumerate() {
                let from = next[index];
                let room = self.batch_size - self.batch.n_tokens() as usize;
                let count = (want.text.len() - from).min(room);
                if count == 0 {
                    continue;
                }
                for (offset, &token) in want.text[from..from + count].iter().enumerate() {
                    let position = from + offset;
                    let last = position + 1 == want.text.len();
                    if last {
                        rows[index] = Some(self.batch.n_tokens());
                    }
                    if self
                        .batch
                        .add(token, position as i32, &[want.seq as i32], last)
                        .is_err()
                    {
                        return self.failed(wants, "the batch is full");
                    }
                }
                added.push((index, count));
            }
            if let Err(err) = self.decode() {
                return self.failed(wants, &err);
            }
            for (index, count) in added {
                let want = &wants[index];
                self.cached[want.seq].extend_from_slice(&want.text[next[index]..][..count]);
                next[index] += count;
            }
        }
        // Then a token per sequence per decode, while each is sure.
        let mut going: Vec<usize> = (0..wants.len()).filter(|&i| wants[i].most > 0).collect();
        while !going.is_empty() {
            let mut still = Vec::with_capacity(going.len());
            for index in going {
                let Some(row) = rows[index] else { continue };
                let logits = self.cell.borrow_dependent().context.get_logits_ith(row);
                // The answer's end is not guessed: nothing would follow it.
                let vocab = self.cell.borrow_owner().vocab();
                match sure_choice(logits) {
                    Some(token)
                        if token < self.target_vocab && !vocab.is_eog(LlamaToken(token)) =>
                    {
                        guesses[index].push(LlamaToken(token));
                        if guesses[index].len() < wants[index].most {
                            still.push(index);
                        }
                    }
                    _ => {}
                }
            }
            if still.is_empty() {
                break;
            }
            self.batch.clear();
            for &index in &still {
                let seq = wants[index].seq;
                let token = *guesses[index].last().unwrap_or(&LlamaToken(0));
                rows[index] = Some(self.batch.n_tokens());
                let position = self.cached[seq].len() as i32;
                if self
                    .batch
                    .add(token, position, &[seq as i32], true)
                    .is_err()
                {
                    return self.failed(wants, "the batch is full");
                }
            }
            if let Err(err) = self.decode() {
                return self.failed(wants, &err);
            }
            for &index in &still {
                let seq = wants[index].seq;
                if let Some(&token) = guesses[index].last() {
                    self.cached[seq].push(token);
                }
            }
            going = still;
        }
        guesses
    }

    /// Takes every position from `from` on out of sequence `seq`; whether
    /// the cache now ends there (else it is emptied).
    fn forget(&mut self, seq: usize, from: usize) -> bool {
        if self.cached[seq].len() <= from {
            return true;
        }
        let context = &mut self.cell;
        let removed = context.with_dependent_mut(|_, draft| {
            draft
                .context
                .clear_kv_cache_seq(Some(seq as u32), Some(from as u32), None)
        });
        let last = self
            .cell
            .borrow_dependent()
            .context
            .kv_cache_seq_pos_max(seq as i32);
        if matches!(removed, Ok(true)) && last == from as i32 - 1 {
            self.cached[seq].truncate(from);
            return true;
        }
        self.clear(seq);
        false
    }

    /// Empties sequence `seq`.
    fn clear(&mut self, seq: usize) {
        let _ = self.cell.with_dependent_mut(|_, draft| {
            draft
                .context
                .clear_kv_cache_seq(Some(seq as u32), None, None)
        });
        self.cached[seq].clear();
    }

    fn decode(&mut self) -> Result<(), String> {
        let batch = &mut self.batch;
        self.cell
            .with_dependent_mut(|_, draft| draft.context.decode(batch))
            .map_err(|err| err.to_string())
    }

    /// No guesses for anyone, after a failure; the sequences involved
    /// start over.
    fn failed(&mut self, wants: &[Want<'_>], why: &str) -> Vec<Vec<LlamaToken>> {
        log::warn!("the draft model {} failed to guess: {why}", self.name);
        for want in wants {
            self.clear(want.seq);
        }
        vec![Vec::new(); wants.len()]
    }
}

/// The most likely token of `logits`, if its probability is at least
/// [`SURE`].
fn sure_choice(logits: &[f32]) -> Option<i32> {
    let (best, &top) = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))?;
    if !top.is_finite() {
        return None;
    }
    // p(best) = 1 / Σ exp(l - top).
    let sum: f32 = logits.iter().map(|&l| (l - top).exp()).sum();
    (sum > 0.0 && 1.0 / sum >= SURE).then_some(best as i32)
}

/// Whether a model with `draft`'s vocabulary can guess tokens for
/// `target`: the same kind of tokenizer, the same special tokens, and the
/// same text for every token both have (a family's models pad their
/// vocabularies to different sizes, by a little).
fn same_vocabulary(target: &LlamaModel, draft: &LlamaModel) -> Result<(), String> {
    let (t, d) = (target.vocab(), draft.vocab());
    let (nt, nd) = (t.n_tokens(), d.n_tokens());
    if t.vocab_type() != d.vocab_type() {
        return Err(format!(
            "their tokenizers differ ({:?} against {:?})",
            d.vocab_type(),
            t.vocab_type()
        ));
    }
    if nt.abs_diff(nd) > 256 {
        return Err(format!(
            "their vocabularies differ ({nd} tokens against {nt})"
        ));
    }
    if t.should_add_bos() != d.should_add_bos()
        || (t.should_add_bos() && t.bos() != d.bos())
        || t.eos() != d.eos()
    {
        return Err("their start and end tokens differ".into());
    }
    for id in 0..nt.min(nd) {
        let token = LlamaToken(id);
        if t.text(token) != d.text(token) {
            return Err(format!("their token {id} differs"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sure_choice_needs_most_of_the_probability() {
        assert_eq!(sure_choice(&[0.0, 5.0, 0.0]), Some(1));
        // Two tokens about equal: neither is sure.
        assert_eq!(sure_choice(&[3.0, 3.1, -9.0]), None);
        assert_eq!(sure_choice(&[]), None);
        assert_eq!(sure_choice(&[f32::NAN, 1.0]), None);
    }
}
