//! One step of a loaded model: the planned batch built, decoded once,
//! and every request with fresh logits choosing its next token.

use std::time::Instant;

use rusty_genius_core::protocol::{FinishReason, Usage};
use rusty_genius_core::GeniusError;

use super::sampling::{token_logprobs, Choice};
use super::slot::{Job, Logits, Phase, Slot, Turn, SHARE_MIN};
use super::{draft_model, Loaded};
use crate::cores::Seat;
use crate::draft::{GuessCost, UNMEASURED};
use crate::engine::{millis_since, reusable_prefix, Ended, Step};
use crate::plan::{self, Budget, Want, MIN_PREFILL};
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;

/// What steps have cost lately, in core-milliseconds (milliseconds times
/// the threads of the step), so that steps on fewer cores compare.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Costs {
    /// A prompt token of a large batch.
    pub(super) prompt_token: Option<f64>,
    /// The answers' part of a step: one token each.
    pub(super) answer_step: Option<f64>,
    /// What guesses added to steps lately: a line through (guesses,
    /// core-milliseconds added).
    pub(super) guesses: Fit,
}

/// A straight line fitted to recent points, the older ones counting less
/// (least squares over sums that decay).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Fit {
    weight: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl Fit {
    /// How much the last point outweighs the one before.
    const DECAY: f64 = 0.95;

    fn add(&mut self, x: f64, y: f64) {
        let Fit {
            weight,
            x: sx,
            y: sy,
            xx,
            xy,
        } = self;
        for sum in [&mut *weight, &mut *sx, &mut *sy, &mut *xx, &mut *xy] {
            *sum *= Self::DECAY;
        }
        *weight += 1.0;
        *sx += x;
        *sy += y;
        *xx += x * x;
        *xy += x * y;
    }

    /// (intercept, slope), both at least 0; `None` before a few points.
    /// While every point had about the same x, the slope is the mean y
    /// over the mean x and the intercept 0.
    pub(super) fn line(&self) -> Option<(f64, f64)> {
        if self.weight < 3.0 {
            return None;
        }
        let (mean_x, mean_y) = (self.x / self.weight, self.y / self.weight);
        let spread = self.xx / self.weight - mean_x * mean_x;
        if spread < 1.0 {
            return (mean_x > 0.0).then(|| (0.0, (mean_y / mean_x).max(0.0)));
        }
        let slope = ((self.xy / self.weight - mean_x * mean_y) / spread).max(0.0);
        Some(((mean_y - slope * mean_x).max(0.0), slope))
    }
}

impl Costs {
    /// Takes in a step of `ms` on `cores` threads that decoded `answers`
    /// answers' tokens, `prompt` prompt tokens and `guesses` guesses.
    fn measured(&mut self, ms: f64, cores: usize, answers: usize, prompt: usize, guesses: usize) {
        let core_ms = ms * cores.max(1) as f64;
        let average = |before: Option<f64>, now: f64| {
            Some(before.map_or(now, |before| before * 0.7 + now * 0.3))
        };
        if guesses > 0 {
            // What the guesses added to the answers' part, when that is
            // known; the step says nothing else new.
            if let (Some(part), 0) = (self.answer_step, prompt) {
                self.guesses.add(guesses as f64, (core_ms - part).max(0.0));
            }
            return;
        }
        if prompt >= MIN_PREFILL {
            // Batches of a few tokens cost mostly their fixed overhead and
            // would overstate the cost of a token.
            self.prompt_token = average(self.prompt_token, core_ms / (prompt + answers) as f64);
        }
        if answers > 0 {
            // The answers' part is what the prompt tokens beside them did
            // not take (at least a tenth of the step).
            let prompt_part = self.prompt_token.unwrap_or(0.0) * prompt as f64;
            let part = (core_ms - prompt_part).max(core_ms / 10.0);
            self.answer_step = average(self.answer_step, part);
        }
    }
}

impl Loaded {
    /// One step: every job that needs the model gets its tokens into one
    /// batch (a generating job its last token, a prefilling job a chunk of
    /// its prompt), the batch is decoded once, and every job with fresh
    /// logits chooses its next token. After it, one batch of texts to
    /// embed, if any wait.
    ///
    /// The step runs on a lease of the process's cores from `seat`, with
    /// as many llama.cpp threads as the lease holds; an engine with nothing
    /// to do (no request, or all of them waiting on their consumers) takes
    /// none.
    pub(super) fn step(&mut self, seat: &Seat) -> Step {
        if !self.has_work() {
            return Step::default();
        }
        let lease = seat.lease();
        let cores = lease.cores();
        if let Some(control) = &self.cell.borrow_dependent().control {
            control.set_threads(cores);
        }
        // Generation first: a request that just arrived gets its prompt
        // decoded before the next batch of texts to embed, not after.
        let mut step = self.generate(cores, lease.others() > 0);
        self.embed_next(&mut step, cores);
        step
    }

    /// Whether a step would do anything: a request that is not waiting on
    /// its consumer, or one that is to end.
    pub(super) fn has_work(&self) -> bool {
        !self.embed_jobs.is_empty()
            || self.slots.iter().any(|slot| {
                slot.job
                    .as_ref()
                    .is_some_and(|job| job.output.must_end() || !job.output.is_paused())
            })
    }

    /// The generating half of a step, on `cores` threads; `shared` when
    /// other models want the cores too.
    pub(super) fn generate(&mut self, cores: usize, shared: bool) -> Step {
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
        // Requests waiting on another slot's cache copy it once it is there.
        self.follow();
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

        self.guess(cores);
        // The batch: what the planner decides, from each slot's want.
        let wants: Vec<Want> = self
            .slots
            .iter()
            .map(|slot| match &slot.job {
                Some(job) if job.output.is_paused() => Want::Nothing,
                Some(Job {
                    phase: Phase::Decode(_),
                    guesses,
                    ..
                }) if !guesses.is_empty() => Want::Check {
                    guesses: guesses.len(),
                },
                Some(Job {
                    phase: Phase::Decode(_),
                    ..
                }) => Want::Decode,
                Some(job) if job.phase == Phase::Prefill => Want::Prompt {
                    left: job.tokens.len() - slot.cached.len(),
                    since: job.prompt_started,
                },
                _ => Want::Nothing,
            })
            .collect();
        let plan = plan::plan(
            &wants,
            Budget {
                batch: self.batch_size,
                ms_per_token: self.costs.prompt_token.map(|ms| ms / cores as f64),
                ms_per_answer_step: self.costs.answer_step.map(|ms| ms / cores as f64),
                shared,
            },
        );
        // Each slot checks as many of its guesses as the plan gives it.
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(job) = &mut slot.job {
                let room = plan
                    .guesses
                    .iter()
                    .find(|(i, _)| *i == index)
                    .map_or(0, |(_, count)| *count);
                job.guesses.truncate(room);
            }
        }
        if plan.tokens() == 0 {
            return step;
        }
        self.batch.clear();
        // The batch goes in slot (sequence) order: llama.cpp cuts a batch of
        // several sequences into micro-batches that take as many tokens
        // from each of a run of consecutive sequences, so tokens in any other
        // order cost more micro-batches, each about a whole step's time.
        let mut entries: Vec<(usize, Option<usize>)> = plan
            .decode
            .iter()
            .map(|&index| (index, None))
            .chain(
                plan.prefill
                    .iter()
                    .map(|&(index, count)| (index, Some(count))),
            )
            .collect();
        entries.sort_unstable_by_key(|&(index, _)| self.slots[index].seq);
        let mut sampled: Vec<(usize, i32)> = Vec::new();
        let mut finishing: Vec<(usize, i32)> = Vec::new();
        let mut prefilled: Vec<(usize, usize)> = Vec::new();
        let mut guessed = 0;
        let mut failed: Option<String> = None;
        for (index, chunk) in entries {
            let slot = &self.slots[index];
            let Some(job) = &slot.job else { continue };
            match (chunk, &job.phase) {
                (None, Phase::Decode(token)) => {
                    let position = slot.cached.len() as i32;
                    let row = self.batch.n_tokens();
                    // The last token, then the guesses after it, each
                    // with its logits.
                    for (offset, &token) in std::iter::once(token).chain(&job.guesses).enumerate() {
                        if let Err(err) =
                            self.batch
                                .add(token, position + offset as i32, &[slot.seq], true)
                        {
                            failed = Some(err.to_string());
                            break;
                        }
                    }
                    if failed.is_some() {
                        break;
                    }
                    guessed += job.guesses.len();
                    sampled.push((index, row));
                }
                (Some(count), _) => {
                    let start = slot.cached.len();
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
                    if failed.is_some() {
                        break;
                    }
                    if last_chunk {
                        finishing.push((index, self.batch.n_tokens() - 1));
                    }
                }
                (None, _) => {}
            }
        }
        // Answers choose first, then the prompts that finished.
        let generating = sampled.len();
        sampled.append(&mut finishing);
        if self.batch.n_tokens() == 0 {
            return step;
        }
        step.progressed = true;
        // A step that gives nobody a token (prompt chunks that finish no
        // prompt) may stop early when a request arrives or another model
        // waits for the cores: llama.cpp drops what it wrote, and a later
        // step decodes those tokens again, beside the newcomer.
        let preemptible = sampled.is_empty() && failed.is_none();
        self.stops.arm(preemptible);
        let decoding = Instant::now();
        let decoded = match failed {
            Some(err) => Err(GeniusError::engine(format!("cannot fill the batch: {err}"))),
            None => {
                let batch = &mut self.batch;
                match self
                    .cell
                    .with_dependent_mut(|_, contexts| contexts.main.decode(batch))
                {
                    Ok(()) => Ok(()),
                    // llama.cpp's code for a computation its abort callback
                    // stopped.
                    Err(DecodeError::Unknown(2)) if preemptible && !crate::exit::closing() => {
                        self.stops.arm(false);
                        self.copies_pending = false;
                        log::debug!(
                            "a step of {} prompt tokens stopped after {:.0} ms, for a newcomer",
                            self.batch.n_tokens(),
                            millis_since(decoding)
                        );
                        return step;
                    }
                    Err(err) => Err(GeniusError::engine_from("decoding failed", err)),
                }
            }
        };
        self.stops.arm(false);
        // A decode carries out the sequence copies queued before it.
        self.copies_pending = false;
        if decoded.is_ok() {
            let prompt: usize = prefilled.iter().map(|(_, count)| count).sum();
            let ms = millis_since(decoding);
            log::trace!(
                "step on {cores} cores: {generating} answers, {guessed} guesses, {prompt} prompt tokens, {ms:.0} ms"
            );
            self.costs.measured(ms, cores, generating, prompt, guessed);
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
            if finished_prompt {
                if let Some(ended) = self.choose(index, Logits::Batch(logits_index)) {
                    step.ended.push(ended);
                }
            } else if let Some(ended) = self.check_guesses(index, logits_index) {
                step.ended.push(ended);
            }
        }
        step
    }

    /// Each answering job (other than those prompts finishing) with the
    /// guesses it will check in this step, up to what its drafter offers,
    /// what its `max_tokens` leaves room for and what its context holds.
    /// Guesses from text come first; a job they give nothing to asks the
    /// draft model, if it takes that model's guesses, which runs on
    /// `cores` threads for all such jobs at once.
    fn guess(&mut self, cores: usize) {
        let slot_context = self.slot_context;
        let cost = self.guess_cost();
        // (slot, its text, how many the draft model may guess).
        let mut for_model: Vec<(usize, Vec<LlamaToken>, usize)> = Vec::new();
        let vocab = self.cell.borrow_owner().vocab();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(job) = &mut slot.job else { continue };
            job.guesses.clear();
            job.guessed_by_model = false;
            let Phase::Decode(token) = job.phase else {
                continue;
            };
            if job.drafter.is_none() && job.model_room.is_none() || !job.gained.may_guess() {
                continue;
            }
            // The last token chosen gives the next; each kept guess one
            // more, up to the last one allowed.
            let left = job.config.max_tokens.map_or(usize::MAX, |max| {
                max.saturating_sub(job.usage.generated_tokens)
            });
            let room = slot_context.saturating_sub(slot.cached.len() + 1);
            let most = left.saturating_sub(1).min(room);
            if most == 0 {
                continue;
            }
            let mut text = Vec::with_capacity(slot.cached.len() + 1);
            text.extend_from_slice(&slot.cached);
            text.push(token);
            let answer = text.len().saturating_sub(job.tokens.len());
            let mut guesses = match &mut job.drafter {
                Some(drafter) => drafter.guess(&text, answer, most, cost),
                None => Vec::new(),
            };
            // Nothing follows the answer's end: a run copied from the
            // prompt stops at its end-of-turn token (what comes after it
            // there is the template's markup and the answer's own start).
            if let Some(end) = guesses.iter().position(|&t| vocab.is_eog(t)) {
                guesses.truncate(end + 1);
            }
            if guesses.is_empty() {
                if let Some(room) = job.model_room {
                    for_model.push((index, text, most.min(room.count())));
                }
                continue;
            }
            job.guesses = guesses;
        }
        if let (Some(draft), false) = (&mut self.draft, for_model.is_empty()) {
            let wants: Vec<draft_model::Want<'_>> = for_model
                .iter()
                .map(|(index, text, most)| draft_model::Want {
                    seq: self.slots[*index].seq as usize,
                    text,
                    most: *most,
                })
                .collect();
            let drafted = draft.draft(&wants, cores);
            for ((index, _, _), guesses) in for_model.into_iter().zip(drafted) {
                if let Some(job) = &mut self.slots[index].job {
                    job.guessed_by_model = !guesses.is_empty();
                    job.guesses = guesses;
                }
            }
        }
        // A grammar that refuses the first guess refuses them all: no row
        // is spent on them. (Later guesses would need the grammar moved
        // along the earlier ones; the check after decoding refuses those.)
        for slot in &mut self.slots {
            let Some(job) = &mut slot.job else { continue };
            if !job.chooser.is_plain()
                && job
                    .guesses
                    .first()
                    .is_some_and(|first| job.chooser.allowed(&[*first]).is_empty())
            {
                job.guesses.clear();
            }
        }
    }

    /// What guesses added to steps lately, against the answers' part of a
    /// step.
    fn guess_cost(&self) -> GuessCost {
        match (self.costs.guesses.line(), self.costs.answer_step) {
            (Some((fixed, row)), Some(step)) if step > 0.0 => GuessCost {
                fixed: fixed / step,
                row: row / step,
            },
            _ => UNMEASURED,
        }
    }

    /// Slot `index`'s job chooses from the batch's row `row` (its last
    /// token's logits) and, for as long as each choice is the guess that
    /// followed in the batch, from the next row too: every guess it keeps
    /// is a token it would have chosen anyway, whose keys and values the
    /// step already computed. The cache then drops the guesses it did not
    /// keep. The job's end, if it ended.
    fn check_guesses(&mut self, index: usize, row: i32) -> Option<Ended> {
        let guesses = self.slots[index]
            .job
            .as_mut()
            .map(|job| std::mem::take(&mut job.guesses))
            .unwrap_or_default();
        if let Some(job) = &mut self.slots[index].job {
            job.usage.draft_tokens += guesses.len();
        }
        let cost = self.guess_cost();
        let mut kept = 0;
        let mut ended = None;
        loop {
            if let Some(end) = self.choose(index, Logits::Batch(row + kept as i32)) {
                ended = Some(end);
                break;
            }
            let slot = &mut self.slots[index];
            let Some(job) = &mut slot.job else { break };
            match (job.phase, guesses.get(kept)) {
                (Phase::Decode(chosen), Some(&guess)) if chosen == guess => {
                    // Decoded already, in this step.
                    slot.cached.push(chosen);
                    job.usage.accepted_draft_tokens += 1;
                    kept += 1;
                }
                _ => break,
            }
        }
        log::trace!("slot {index} kept {kept} of {} guesses", guesses.len());
        if let (Some(job), false) = (&mut self.slots[index].job, guesses.is_empty()) {
            job.gained
                .settle(kept, cost.fixed + cost.row * guesses.len() as f64);
        }
        if let Some(job) = &mut self.slots[index].job {
            match (&mut job.model_room, &mut job.drafter) {
                (Some(room), _) if job.guessed_by_model => room.settle(guesses.len(), kept),
                (_, Some(drafter)) => drafter.settle(guesses.len(), kept),
                _ => {}
            }
        }
        if !guesses.is_empty() {
            // Every check leaves the cache ending where the slot says,
            // whether the job goes on or not.
            let failed = self.drop_after(index, self.slots[index].cached.len());
            ended = ended.or(failed);
        }
        ended
    }

    /// Takes every position from `from` on out of slot `index`'s cache
    /// (guesses that were not kept). A model whose cache cannot do that
    /// ends the slot's job (given back).
    fn drop_after(&mut self, index: usize, from: usize) -> Option<Ended> {
        let seq = self.slots[index].seq;
        let last = self.cell.borrow_dependent().main.kv_cache_seq_pos_max(seq);
        let removed = last < from as i32
            || self.cell.with_dependent_mut(|_, contexts| {
                matches!(
                    contexts
                        .main
                        .clear_kv_cache_seq(Some(seq as u32), Some(from as u32), None),
                    Ok(true)
                )
            });
        // The cache must now end where the slot says it does: a guess left
        // behind would be read by every later token.
        let last = self.cell.borrow_dependent().main.kv_cache_seq_pos_max(seq);
        if removed && last == from as i32 - 1 {
            return None;
        }
        log::warn!(
            "cannot take the unkept guesses out of slot {index}'s cache (it ends at {last}, not {})",
            from as i32 - 1
        );
        let result = Err(GeniusError::engine(
            "this model's cache cannot take back tokens guessed ahead: turn speculative decoding off",
        ));
        let ended = self.slots[index]
            .job
            .is_some()
            .then(|| self.end_job(index, result));
        self.reset_slot(index);
        ended
    }

    /// Settles every job that follows another slot (`Phase::Follow`): once
    /// the source's cache holds the tokens it waits for, they are copied
    /// into the job's own sequence, and the job decodes only the rest of
    /// its prompt (or, with the whole prompt copied, starts from the
    /// source's saved logits). If the source will not get there (it ended
    /// or its slot was taken), the job copies what there is when that
    /// spares enough, or decodes its prompt itself.
    pub(super) fn follow(&mut self) {
        for index in 0..self.slots.len() {
            let Some(Job {
                phase: Phase::Follow { source, upto },
                tokens,
                ..
            }) = &self.slots[index].job
            else {
                continue;
            };
            let (source, upto) = (*source, *upto);
            let from = &self.slots[source];
            let whole = upto == tokens.len();
            let held = from.cached.get(..upto) == Some(&tokens[..upto])
                && (!whole
                    || from
                        .prompt_logits
                        .as_ref()
                        .is_some_and(|(len, _)| *len == upto));
            let coming = from.job.as_ref().is_some_and(|job| {
                job.phase == Phase::Prefill && job.tokens.get(..upto) == Some(&tokens[..upto])
            });
            let upto = if held {
                upto
            } else if coming {
                continue;
            } else {
                reusable_prefix(&from.cached, tokens)
            };
            let own = self.slots[index].cached.len();
            let phase = if held || upto >= own + SHARE_MIN {
                self.copy_cache(source, index, upto)
            } else {
                Phase::Prefill
            };
            let slot = &mut self.slots[index];
            if let Some(job) = &mut slot.job {
                job.phase = phase;
                job.usage.cached_tokens = slot.cached.len();
            }
        }
    }

    /// Copies slot `from`'s cache into slot `to` and keeps its first `upto`
    /// tokens; the phase the job in `to` goes on with.
    fn copy_cache(&mut self, from: usize, to: usize, upto: usize) -> Phase {
        let logits = self.slots[from]
            .prompt_logits
            .clone()
            .filter(|(len, _)| *len == upto);
        let whole = self.slots[to]
            .job
            .as_ref()
            .is_some_and(|job| job.tokens.len() == upto);
        // Without the logits after the whole prompt, its last token is
        // decoded again.
        let upto = if whole && logits.is_none() {
            upto - 1
        } else {
            upto
        };
        let (source, target) = (self.slots[from].seq, self.slots[to].seq);
        // Between sequences of their own, llama.cpp copies a sequence's
        // whole buffer (at the next decode); the tail is dropped after.
        let copied = self.cell.with_dependent_mut(|_, contexts| {
            contexts
                .main
                .clear_kv_cache_seq(Some(target as u32), None, None)
                .map_err(|err| err.to_string())?;
            contexts
                .main
                .copy_kv_cache_seq(source, target, None, None)
                .map_err(|err| err.to_string())
        });
        self.copies_pending = true;
        if let Err(err) = copied {
            log::debug!("cannot copy the cache of slot {from}: {err}");
            self.reset_slot(to);
            return Phase::Prefill;
        }
        let cached = self.slots[from].cached.clone();
        let slot = &mut self.slots[to];
        slot.cached = cached;
        slot.prompt_logits = None;
        if !self.truncate_slot(to, upto) {
            log::debug!("slot {to} cannot go back to token {upto}, decoding the whole prompt");
            self.reset_slot(to);
            return Phase::Prefill;
        }
        match logits {
            Some(logits) if whole => {
                self.slots[to].prompt_logits = Some(logits);
                Phase::FromSaved
            }
            _ => Phase::Prefill,
        }
    }

    /// Chooses slot `index`'s next token, shows it, and either queues it
    /// for decoding or ends the job.
    pub(super) fn choose(&mut self, index: usize, source: Logits) -> Option<Ended> {
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
            if job.reached_max_tokens() {
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
            let end = model.vocab().is_eog(token) || job.fim.is_some_and(|fim| fim.contains(token));
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
            if let Some(reason) = job.output.push(&piece) {
                return Ok(Turn::Ended(reason));
            }
            // Past its time, an answer ends once it has a line break.
            job.broke_line |= piece.contains(&b'\n');
            if let (Some(limit), Some(started), true) = (
                job.config.time_limit,
                job.generation_started,
                job.broke_line,
            ) {
                if started.elapsed() >= limit {
                    return Ok(Turn::Ended(FinishReason::MaxTokens));
                }
            }
            // The last token allowed ends the answer now: decoding it would
            // cost a step whose logits nobody reads.
            if job.reached_max_tokens() {
                return Ok(Turn::Ended(FinishReason::MaxTokens));
            }
            Ok(Turn::Moved)
        })();
        match turn {
            Ok(Turn::Moved) => None,
            Ok(Turn::Ended(reason)) => Some(self.end_job(index, Ok(reason))),
            Err(err) => Some(self.end_job(index, Err(err))),
        }
    }

    /// Takes the job out of slot `index`, remembering its transcript when
    /// the cache holds all of it.
    pub(super) fn end_job(
        &mut self,
        index: usize,
        result: Result<FinishReason, GeniusError>,
    ) -> Ended {
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

#[cfg(test)]
mod tests {
    use super::Fit;

    #[test]
    fn the_fit_finds_the_line_through_what_guesses_added() {
        let mut fit = Fit::default();
        assert_eq!(fit.line(), None);
        for (x, y) in [(4.0, 67.0), (8.0, 100.0), (16.0, 165.0), (64.0, 550.0)] {
            fit.add(x, y);
        }
        let (fixed, row) = fit.line().unwrap();
        assert!((row - 8.1).abs() < 0.3, "{row}");
        assert!((fixed - 35.0).abs() < 8.0, "{fixed}");
        // Always the same count: the cost is all per row.
        let mut same = Fit::default();
        for _ in 0..5 {
            same.add(16.0, 160.0);
        }
        let (fixed, row) = same.line().unwrap();
        assert_eq!(fixed, 0.0);
        assert!((row - 10.0).abs() < 1e-9);
    }
}
