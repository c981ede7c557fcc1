//! The slots of a loaded model: one sequence of the context each, the
//! tokens its KV cache holds, the request running in it; and how a new
//! request is checked and given the slot whose cache it reuses most.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::protocol::{FinishReason, Usage};
use rusty_genius_core::{GeniusError, InferenceConfig, Prompt};

use super::sampling::{
    check_logit_bias, grammar_field, grammar_sampler, grammar_text, sampler_for, Chooser,
};
use super::Loaded;
use crate::draft::{Drafter, ModelRoom};
use crate::engine::{reusable_prefix, Output, RequestId};
use crate::plan;

/// One sequence of the context: the tokens its KV cache holds, and the
/// request using it, if any.
pub(super) struct Slot {
    pub(super) seq: i32,
    /// Tokens whose keys and values sit in this sequence, in position
    /// order.
    pub(super) cached: Vec<LlamaToken>,
    /// The text of the last prompt and its answer, while `cached` holds
    /// exactly their tokens: a conversation's next turn, which renders them
    /// again, continues from these tokens instead of tokenizing the answer
    /// anew (which could split it into other tokens and so lose the cache
    /// from there on).
    pub(super) transcript: Option<String>,
    /// The logits after the last prompt this slot finished, with that
    /// prompt's length (`cached` starts with it). The same prompt again
    /// starts from them rather than decoding its last token anew: llama.cpp
    /// computes a batch of one token with other kernels than a batch of
    /// many, and the rounding differs enough to change a greedy answer.
    pub(super) prompt_logits: Option<(usize, Vec<f32>)>,
    pub(super) job: Option<Job>,
}

/// A request running in a slot.
pub(super) struct Job {
    pub(super) id: RequestId,
    pub(super) output: Output,
    pub(super) config: InferenceConfig,
    pub(super) chooser: Chooser,
    /// The whole prompt.
    pub(super) tokens: Vec<LlamaToken>,
    /// The prompt's text, to remember as the slot's transcript.
    pub(super) text: String,
    pub(super) usage: Usage,
    pub(super) phase: Phase,
    /// The answer's bytes so far.
    pub(super) answer: Vec<u8>,
    pub(super) prompt_started: Instant,
    pub(super) generation_started: Option<Instant>,
    /// Guesses tokens ahead (speculative decoding); `None` when off.
    pub(super) drafter: Option<Drafter<LlamaToken>>,
    /// How many tokens to ask of the engine's draft model; `None` when
    /// the request takes none of its guesses.
    pub(super) model_room: Option<ModelRoom>,
    /// Whether this step's guesses are the draft model's.
    pub(super) guessed_by_model: bool,
    /// What guessing has gained this job lately, whatever the drafter
    /// expected: steps saved by kept guesses less the steps the guesses
    /// cost, by the measured cost (see `Loaded::check_guesses`).
    pub(super) gained: Gained,
    /// A fill-in-the-middle request's markup tokens: any of them ends the
    /// answer.
    pub(super) fim: Option<super::prompt::Fim>,
    /// Whether the answer has had a line break (see
    /// `InferenceConfig::time_limit`).
    pub(super) broke_line: bool,
    /// The guesses of this step, decoded after the job's last token.
    pub(super) guesses: Vec<LlamaToken>,
}

impl Job {
    /// Whether it has generated every token `max_tokens` allows.
    pub(super) fn reached_max_tokens(&self) -> bool {
        self.config
            .max_tokens
            .is_some_and(|max| self.usage.generated_tokens >= max)
    }
}

/// What guessing has gained a job, checked against what it cost: a job
/// whose guesses lose time stops guessing for a while, longer each time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gained {
    /// Steps saved less steps spent, fading.
    pub(super) balance: f64,
    /// Checks since the last pause.
    pub(super) checks: u32,
    /// Steps left without guesses.
    pub(super) pause: u32,
    /// How long the next pause is.
    pub(super) next_pause: u32,
}

/// The first pause of a job whose guesses lose time, in steps; each pause
/// after it is twice as long, until guesses gain again.
const FIRST_PAUSE: u32 = 32;

/// The checks a job's guesses have before they are judged, and the steps
/// they start ahead by: an edit's first guesses often fall where the edit
/// is, and the copy after it pays them back.
const JUDGED_AFTER: u32 = 4;
const HEAD_START: f64 = 3.0;

impl Default for Gained {
    fn default() -> Self {
        Self {
            balance: HEAD_START,
            checks: 0,
            pause: 0,
            next_pause: FIRST_PAUSE,
        }
    }
}

impl Gained {
    /// Whether the job may guess in this step (counting the pause down).
    pub(super) fn may_guess(&mut self) -> bool {
        if self.pause == 0 {
            return true;
        }
        self.pause -= 1;
        false
    }

    /// Takes in a check that kept `kept` guesses costing `cost`, in steps
    /// without guesses.
    pub(super) fn settle(&mut self, kept: usize, cost: f64) {
        self.balance = self.balance * 0.8 + kept as f64 - cost;
        self.checks += 1;
        if self.checks < JUDGED_AFTER {
            return;
        }
        if self.balance < 0.0 {
            self.pause = self.next_pause.max(FIRST_PAUSE);
            self.next_pause = self.pause.saturating_mul(2);
            self.balance = HEAD_START;
            self.checks = 0;
        } else {
            self.next_pause = FIRST_PAUSE;
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Decoding its prompt; the slot's `cached` grows toward `tokens`.
    Prefill,
    /// Its first token comes from the slot's saved prompt logits.
    FromSaved,
    /// This token was chosen and shown; it is decoded in the next step.
    Decode(LlamaToken),
    /// Its grammar is still choosing its next token (a choice that checks
    /// many tokens takes several steps; see `Chooser::resume`).
    Choosing,
    /// Waits for the running request in slot `source` to hold the first
    /// `upto` tokens of this prompt in its cache, to copy them rather than
    /// decode them again (see `Loaded::follow`).
    Follow { source: usize, upto: usize },
}

/// Where a job's next logits are.
#[derive(Debug, Clone, Copy)]
pub(super) enum Logits {
    /// Its slot's saved prompt logits.
    Saved,
    /// This row of the batch just decoded.
    Batch(i32),
    /// Those of the choice under way (kept by its chooser).
    Pending,
}

/// A prompt checked and given a slot, ready to become its job.
pub(super) struct Placed {
    pub(super) index: usize,
    pub(super) tokens: Vec<LlamaToken>,
    pub(super) text: String,
    pub(super) tool_syntax: Option<crate::tools::ToolSyntax>,
    pub(super) chooser: Chooser,
    pub(super) phase: Phase,
    pub(super) cached: usize,
}

/// How a job's turn in a step went.
pub(super) enum Turn {
    /// It produced a token (or decoded prompt tokens).
    Moved,
    /// It ended, with this reason.
    Ended(FinishReason),
}

/// The fewest prompt tokens that copying a busy slot's cache must spare
/// over the free slot's own cache to be worth it (a copy moves the whole
/// sequence's buffer), unless it spares the whole prompt.
pub(super) const SHARE_MIN: usize = 64;

/// A prompt of more bytes than the context's tokens times this is first
/// measured by the tokens of only that many bytes of it.
const PROMPT_PREFIX_BYTES_PER_TOKEN: usize = 16;

/// The longest start of `text` of at most `bytes` bytes that ends
/// between characters.
fn char_prefix(text: &str, bytes: usize) -> &str {
    let mut end = bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// How many of `prompt`'s tokens a copy of the cache of a request with
/// the prompt `other` gives: all of them when the prompts are the same
/// (its saved logits give the first token), else their common prefix
/// short of `prompt`'s last token, which must be decoded for its logits.
pub(super) fn shared_upto(other: &[LlamaToken], prompt: &[LlamaToken]) -> usize {
    if other == prompt {
        prompt.len()
    } else {
        reusable_prefix(other, prompt)
    }
}

/// How many of `tokens` a cache holding `cached` spares decoding: all of
/// them when it has the logits after exactly these tokens (`logits_after`
/// is their count), else the prefix it shares short of the last token.
pub(super) fn usable(
    cached: &[LlamaToken],
    logits_after: Option<usize>,
    tokens: &[LlamaToken],
) -> usize {
    if logits_after == Some(tokens.len()) && cached.get(..tokens.len()) == Some(tokens) {
        tokens.len()
    } else {
        reusable_prefix(cached, tokens)
    }
}

impl Loaded {
    /// Forgets a slot's cache, e.g. after a failed decode.
    pub(super) fn reset_slot(&mut self, index: usize) {
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

    /// Whether slot `index` can go on from its first `keep` cached tokens.
    /// A sliding-window layer's cache reuses the cells of positions its
    /// window has passed, so going back needs the window before `keep`
    /// still held: a sequence extended where it ends always can, one cut
    /// further back than about a batch cannot (and is decoded again).
    pub(super) fn can_keep(&self, index: usize, keep: usize) -> bool {
        let slot = &self.slots[index];
        if self.window == 0 || keep == 0 || keep >= slot.cached.len() {
            return true;
        }
        let oldest = self
            .cell
            .borrow_dependent()
            .main
            .kv_cache_seq_pos_min(slot.seq);
        usize::try_from(oldest).is_ok_and(|oldest| oldest <= keep.saturating_sub(self.window))
    }

    /// The cached tokens of slot `index` a prompt sharing `shared` of them
    /// can go on from: all of those, or none when the slot cannot go back
    /// to there.
    fn keepable(&self, index: usize, shared: usize) -> usize {
        if self.can_keep(index, shared) {
            shared
        } else {
            0
        }
    }

    /// Drops a slot's cache after its first `keep` tokens; false if this
    /// context cannot.
    pub(super) fn truncate_slot(&mut self, index: usize, keep: usize) -> bool {
        let seq = self.slots[index].seq;
        if keep < self.slots[index].cached.len() {
            if !self.can_keep(index, keep) {
                return false;
            }
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

    /// `tokens` for the prompt `text` after a cache holding `cached`, the
    /// tokens of `transcript`: spliced onto them when `text` continues the
    /// transcript at a special token (where a tokenizer never merges
    /// across), so the last answer keeps the very tokens the model
    /// generated.
    pub(super) fn continue_transcript(
        &self,
        cached: &[LlamaToken],
        transcript: Option<&str>,
        text: &str,
        tokens: &[LlamaToken],
    ) -> Vec<LlamaToken> {
        let Some(rest) = transcript.and_then(|transcript| text.strip_prefix(transcript)) else {
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
        let mut spliced = cached.to_vec();
        spliced.extend(tail);
        spliced
    }

    /// Refuses a prompt whose beginning alone overflows the context,
    /// having tokenized only that beginning: rendering and tokenizing a
    /// 4 MiB prompt whole took the engine 6 s, which every other request
    /// waited through, only to find it 250 times too long.
    pub(super) fn check_prompt_size(&self, prompt: &Prompt) -> Result<(), GeniusError> {
        let texts: Vec<&str> = match prompt {
            Prompt::Text(text) => vec![text.as_str()],
            Prompt::Chat(messages) => messages
                .iter()
                .filter_map(|message| message.content.as_deref())
                .collect(),
            // Only what fits is read of a fill-in-the-middle request.
            Prompt::Embed(_) | Prompt::Infill(_) | Prompt::Tokens(_) => return Ok(()),
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
            let part = char_prefix(text, left);
            tokens += vocab.tokenize(part.as_bytes(), false, false).len();
            left -= part.len();
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

    /// Refuses an empty prompt, or one that leaves no room to answer.
    fn check_length(&self, tokens: &[LlamaToken]) -> Result<(), GeniusError> {
        if tokens.is_empty() {
            return Err(GeniusError::EmptyPrompt);
        }
        if tokens.len() >= self.slot_context {
            return Err(GeniusError::PromptTooLong {
                tokens: tokens.len(),
                context: self.slot_context,
            });
        }
        Ok(())
    }

    /// The busy slot whose prompt shares the most with `tokens`, and how
    /// many of them copying its cache would give, when that spares at
    /// least `SHARE_MIN` tokens over the `cached` ones a free slot holds,
    /// or the whole prompt (the same prompt again, with its logits).
    fn share_source(&self, tokens: &[LlamaToken], cached: usize) -> Option<(usize, usize)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                let job = slot.job.as_ref()?;
                if matches!(job.phase, Phase::Follow { .. }) {
                    return None;
                }
                let upto = shared_upto(&job.tokens, tokens);
                let whole = upto == tokens.len();
                (upto > cached && (whole || upto >= cached + SHARE_MIN)).then_some((index, upto))
            })
            .max_by_key(|&(_, upto)| upto)
    }

    /// A request's `prediction` as tokens, at most a slot's context of them
    /// (no answer outgrows it). Only the start of a long text is
    /// tokenized, as for a prompt's size.
    pub(super) fn prediction_tokens(&self, text: &str) -> Vec<LlamaToken> {
        let part = char_prefix(
            text,
            self.slot_context
                .saturating_mul(PROMPT_PREFIX_BYTES_PER_TOKEN),
        );
        let mut tokens = self.model().vocab().tokenize(part.as_bytes(), false, false);
        tokens.truncate(self.slot_context);
        tokens
    }

    /// Tokenizes a prompt, builds its sampler and grammar, and gives it a
    /// slot: everything about a request that can be wrong is found here,
    /// before any decoding (a bad schema or grammar costs nothing), and
    /// only then is the slot's cache cut to what the prompt reuses.
    pub(super) fn place(
        &mut self,
        prompt: &Prompt,
        config: &InferenceConfig,
    ) -> Result<Placed, GeniusError> {
        if self.declared_pooling.is_some() {
            return Err(GeniusError::invalid_request(
                "prompt",
                format!(
                    "`{}` is an embedding model: it turns texts into vectors (Embed) and cannot generate text",
                    self.name
                ),
            ));
        }
        self.check_prompt_size(prompt)?;
        let prepared = match prompt {
            Prompt::Infill(infill) => {
                let room = super::prompt::Room {
                    batch: super::prompt::INFILL_BATCH,
                    context: self.slot_context,
                    predict: config.max_tokens.unwrap_or(0),
                };
                self.prompter.infill(self.model(), infill, room)?
            }
            _ => self.prompter.tokens(self.model(), prompt, config)?,
        };
        // The free slot whose cache shares the longest prefix with the
        // prompt (continuing its transcript where possible), as the
        // planner picks it.
        let mut candidates: Vec<(usize, Vec<LlamaToken>, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.job.is_none())
            .map(|(index, slot)| {
                let tokens = self.continue_transcript(
                    &slot.cached,
                    slot.transcript.as_deref(),
                    &prepared.text,
                    &prepared.tokens,
                );
                let reuse = self.keepable(index, reusable_prefix(&slot.cached, &tokens));
                (index, tokens, reuse)
            })
            .collect();
        let picked = plan::pick_slot(
            candidates
                .iter()
                .map(|(index, _, reuse)| (*index, *reuse, self.slots[*index].cached.len())),
            prepared.tokens.len(),
        )
        .ok_or_else(|| GeniusError::engine("no free slot for the request"))?;
        let at = candidates
            .iter()
            .position(|(index, _, _)| *index == picked)
            .expect("a candidate");
        let (mut index, mut tokens, mut reuse) = candidates.swap_remove(at);
        // A cache kept out of the slots, in RAM or on disk, may hold more
        // of the prompt than any free slot.
        let in_slot = self.keepable(
            index,
            usable(
                &self.slots[index].cached,
                self.slots[index]
                    .prompt_logits
                    .as_ref()
                    .map(|(len, _)| *len),
                &tokens,
            ),
        );
        let kept = self.best_kept(&prepared.text, &prepared.tokens, in_slot);
        if let Some(kept) = &kept {
            tokens.clone_from(&kept.tokens);
        }
        self.check_length(&tokens)?;
        check_logit_bias(config, self.model().n_vocab())?;
        let grammar = match grammar_text(config, prepared.tool_syntax)? {
            Some(text) => Some(grammar_sampler(self.model(), &text, grammar_field(config))?),
            None => None,
        };
        let mut chooser =
            Chooser::new(config, sampler_for(config, self.model().n_vocab()), grammar);
        if let Some(kept) = kept {
            let target = self.restore_target();
            if self.restore(target, kept.source) {
                index = target;
                reuse = reusable_prefix(&self.slots[index].cached, &tokens);
            } else {
                // Back to the slot picked first, as far as it still holds.
                let slot = &self.slots[index];
                tokens = self.continue_transcript(
                    &slot.cached,
                    slot.transcript.as_deref(),
                    &prepared.text,
                    &prepared.tokens,
                );
                self.check_length(&tokens)?;
                reuse = reusable_prefix(&self.slots[index].cached, &tokens);
            }
        }
        chooser.accept_prompt(&tokens);

        // The same prompt again starts from its saved logits; otherwise the
        // slot keeps the common prefix and decodes the rest. What the slot
        // loses goes to the RAM tier when it is worth keeping.
        let slot = &self.slots[index];
        let logits_after = slot.prompt_logits.as_ref().map(|(len, _)| *len);
        let same_prompt = usable(&slot.cached, logits_after, &tokens) == tokens.len();
        let keep = if same_prompt { tokens.len() } else { reuse };
        if slot.cached.len() >= keep + SHARE_MIN {
            self.stash(index);
        }
        let (phase, cached) = if same_prompt && self.truncate_slot(index, tokens.len()) {
            (Phase::FromSaved, tokens.len())
        } else {
            self.slots[index].prompt_logits = None;
            if self.truncate_slot(index, reuse) {
                (Phase::Prefill, reuse)
            } else {
                log::debug!(
                    "slot {index} cannot go back to token {reuse}, decoding the whole prompt"
                );
                self.reset_slot(index);
                (Phase::Prefill, 0)
            }
        };
        // A request running in another slot may hold (or be decoding) more
        // of this prompt: the choices of one request (`n`), or requests
        // sent together with one system prompt.
        let phase = match self.share_source(&tokens, cached) {
            Some((source, upto)) => Phase::Follow { source, upto },
            None => phase,
        };
        self.slots[index].transcript = None;
        Ok(Placed {
            index,
            tokens,
            text: prepared.text,
            tool_syntax: prepared.tool_syntax,
            chooser,
            phase,
            cached,
        })
    }
}

#[cfg(test)]
mod gained_tests {
    use super::*;

    /// Checks that each keep `kept` of guesses costing 2.5 steps, until
    /// the job pauses (at most `most` of them): how many it took.
    fn until_paused(gained: &mut Gained, kept: usize, most: u32) -> u32 {
        for done in 1..=most {
            assert!(gained.may_guess());
            gained.settle(kept, 2.5);
            if gained.pause > 0 {
                return done;
            }
        }
        most + 1
    }

    fn paused_for(gained: &mut Gained) -> u32 {
        let mut steps = 0;
        while !gained.may_guess() {
            steps += 1;
        }
        steps
    }

    #[test]
    fn guesses_that_lose_time_pause_longer_each_time_and_gains_end_that() {
        let mut gained = Gained::default();
        // Guesses that keep more than they cost go on.
        assert_eq!(until_paused(&mut gained, 4, 20), 21);
        // Guesses that keep little: a pause within a few checks, then,
        // losing again, a longer one.
        assert!(until_paused(&mut gained, 0, 8) <= 8);
        assert_eq!(paused_for(&mut gained), FIRST_PAUSE);
        assert_eq!(until_paused(&mut gained, 1, 8), JUDGED_AFTER);
        assert_eq!(paused_for(&mut gained), 2 * FIRST_PAUSE);
        // Gains again: the next pause is short again.
        assert_eq!(until_paused(&mut gained, 8, 5), 6);
        assert!(until_paused(&mut gained, 0, 10) <= 10);
        assert_eq!(paused_for(&mut gained), FIRST_PAUSE);
    }
}
