//! The batch planner: which requests put which tokens into the next step's
//! batch, and which free slot a new request takes. Plain data in, a plan
//! out; the engine carries it out with llama.cpp.

use std::time::Instant;

/// What one slot's request wants from the next batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Want {
    /// Nothing: the slot is free, or its request waits (its consumer lags,
    /// or it chooses its next token without decoding).
    Nothing,
    /// Its last chosen token decoded, which gives the logits of the next.
    Decode,
    /// As `Decode`, and after it up to `guesses` tokens guessed ahead
    /// (speculative decoding), each with its logits, to check the guesses
    /// against the model's own choices.
    Check { guesses: usize },
    /// Part of its prompt decoded: `left` tokens are still to go; `since`
    /// is when the request started, which breaks ties (older first).
    Prompt { left: usize, since: Instant },
}

/// How much one step may take, and what its tokens cost lately.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Budget {
    /// The most tokens a batch holds.
    pub(crate) batch: usize,
    /// What a prompt token of a large batch has cost lately, in
    /// milliseconds on this step's cores; `None` before the first.
    pub(crate) ms_per_token: Option<f64>,
    /// What the answers' part of a step (one token each) has cost lately,
    /// in milliseconds on this step's cores; `None` before the first.
    pub(crate) ms_per_answer_step: Option<f64>,
    /// Whether other models want the cores too: a step then holds only
    /// its share of them, and should end soon enough to hand them on.
    pub(crate) shared: bool,
}

/// While answers run, a step's prompt tokens cost at most this many times
/// the answers' own part of the step: every running answer keeps at least
/// a fifth of its speed while a long prompt is read beside it, and the
/// prompt gets the rest, on any CPU (both costs are measured, so a slow
/// CPU does not shrink the chunks).
pub(crate) const PROMPT_PER_ANSWER_STEP: f64 = 4.0;

/// While other models want the cores, a step ends after about this long:
/// a model's share of the cores changes only between its steps, so when
/// the others are done, the cores they leave wait at most this long.
pub(crate) const SHARED_STEP_MS: f64 = 500.0;

/// The fewest prompt tokens a step decodes, when any wait (and the
/// smallest batch whose time per token counts as a measure).
pub(crate) const MIN_PREFILL: usize = 32;

/// A step's prompt tokens beside running answers before their costs are
/// measured: the floor, so that the first answers of a fresh model do not
/// wait.
const UNMEASURED_PREFILL: usize = MIN_PREFILL;

/// The next batch: every slot that decodes its last token, then the
/// prompt chunks, in the order they go into the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) decode: Vec<usize>,
    pub(crate) prefill: Vec<(usize, usize)>,
    /// The slots of `decode` that check guesses, with how many.
    pub(crate) guesses: Vec<(usize, usize)>,
}

impl Plan {
    /// Tokens in the batch.
    pub(crate) fn tokens(&self) -> usize {
        self.decode.len()
            + self.prefill.iter().map(|(_, count)| count).sum::<usize>()
            + self.guesses.iter().map(|(_, count)| count).sum::<usize>()
    }
}

/// Plans the next batch for the slots' `wants`.
///
/// - Every answering request decodes its one token, first: a long prompt
///   delays the running answers by at most one batch per step.
/// - Prompts take the room left, the one with the least left to decode
///   first, then the oldest: a short request's first token does not wait
///   behind a long prompt's whole prefill, and the long prompt gets the
///   room the shorter ones leave.
/// - Prompts with nothing else to keep going fill whole batches: a prompt
///   alone is read at full speed. When one of them finishes in the step,
///   the unfinished ones take only what they would beside an answer, so
///   that the short one's first token does not wait for the long one.
/// - Beside running answers, a step's prompt tokens cost at most
///   [`PROMPT_PER_ANSWER_STEP`] times the answers' part, more when more
///   prompts wait than answers run (requests count alike); while other
///   models want the cores, a step takes about [`SHARED_STEP_MS`] at most.
///   Both by the costs measured lately, and at least [`MIN_PREFILL`].
/// - Guesses ahead are checked only while no prompt waits: a prompt's
///   first token comes before any answer's speed-up. They take the room
///   the answers leave in the batch, in slot order.
pub(crate) fn plan(wants: &[Want], budget: Budget) -> Plan {
    let decode: Vec<usize> = wants
        .iter()
        .enumerate()
        .filter(|(_, want)| matches!(want, Want::Decode | Want::Check { .. }))
        .map(|(slot, _)| slot)
        .take(budget.batch)
        .collect();
    let mut prompts: Vec<(usize, usize, Instant)> = wants
        .iter()
        .enumerate()
        .filter_map(|(slot, want)| match *want {
            Want::Prompt { left, since } if left > 0 => Some((slot, left, since)),
            _ => None,
        })
        .collect();
    prompts.sort_by_key(|&(slot, left, since)| (left, since, slot));
    let waiting = prompts.len();
    let mut tokens = prompt_tokens(budget, decode.len(), waiting);
    let mut room = budget.batch - decode.len();
    let mut prefill = Vec::new();
    // Once prompts finish in this step, their first tokens come out of it:
    // the unfinished prompts beside them take only what they would beside
    // that many running answers.
    let mut finished = 0;
    let mut beside_taken = 0;
    for (slot, left, _) in prompts {
        let mut count = left.min(room).min(tokens);
        if finished > 0 && count < left {
            let beside = prompt_tokens(budget, decode.len() + finished, waiting - finished);
            count = count.min(beside.saturating_sub(beside_taken));
            beside_taken += count;
        }
        if count == 0 {
            break;
        }
        prefill.push((slot, count));
        room -= count;
        tokens -= count;
        if count == left {
            finished += 1;
        }
    }
    let mut guesses = Vec::new();
    if waiting == 0 {
        for &slot in &decode {
            if let Want::Check { guesses: offered } = wants[slot] {
                let count = offered.min(room);
                if count > 0 {
                    guesses.push((slot, count));
                    room -= count;
                }
            }
        }
    }
    Plan {
        decode,
        prefill,
        guesses,
    }
}

/// How many prompt tokens the next step may hold beside `answers`
/// running answers, for `waiting` prompts. Requests count alike: while
/// more prompts wait than answers run, the prompts' part grows with them
/// (each waiting prompt gets what [`PROMPT_PER_ANSWER_STEP`] allows beside
/// one answer's part), so that a few short chats arriving together start
/// in one step rather than one after another.
fn prompt_tokens(budget: Budget, answers: usize, waiting: usize) -> usize {
    let floor = MIN_PREFILL.min(budget.batch);
    let mut tokens = budget.batch;
    let per_token = budget.ms_per_token.filter(|ms| *ms > 0.0);
    if answers > 0 {
        let requests = (waiting as f64 / answers as f64).max(1.0);
        tokens = tokens.min(match (per_token, budget.ms_per_answer_step) {
            (Some(prompt), Some(part)) => {
                ((PROMPT_PER_ANSWER_STEP * part * requests / prompt) as usize).max(floor)
            }
            _ => UNMEASURED_PREFILL,
        });
    }
    if budget.shared {
        if let Some(prompt) = per_token {
            tokens = tokens.min(((SHARED_STEP_MS / prompt) as usize).max(floor));
        }
    }
    tokens
}

/// The fewest shared tokens that make a slot's cache worth taking over
/// for a prompt, unless they are half of what it holds.
const WORTH_REUSING: usize = 64;

/// The free slot a new request takes, given each free slot's `(index,
/// tokens of the request's prompt its cache already holds, tokens it holds
/// in all)`: the longest reusable prefix; among equals the one holding
/// least, so that other caches survive for their turns; then the lowest
/// index. A prefix counts only when it is at least `WORTH_REUSING` tokens,
/// half of what the slot holds, or all of the prompt (of `prompt_len`
/// tokens) but its last: a short common beginning (a chat template's first
/// tokens, a system prompt's first words) does not pay for another
/// conversation's cache. `None` when no slot is free.
pub(crate) fn pick_slot(
    free: impl IntoIterator<Item = (usize, usize, usize)>,
    prompt_len: usize,
) -> Option<usize> {
    free.into_iter()
        .max_by_key(|&(index, reuse, held)| {
            let worth = reuse >= WORTH_REUSING || reuse * 2 >= held || reuse + 1 >= prompt_len;
            (
                if worth { reuse } else { 0 },
                std::cmp::Reverse(held),
                std::cmp::Reverse(index),
            )
        })
        .map(|(index, _, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(ms: u64) -> Instant {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *START.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    fn prompt(left: usize, since_ms: u64) -> Want {
        Want::Prompt {
            left,
            since: at(since_ms),
        }
    }

    const FRESH: Budget = Budget {
        batch: 512,
        ms_per_token: None,
        ms_per_answer_step: None,
        shared: false,
    };

    #[test]
    fn answers_decode_first_and_prompts_fill_the_room_they_leave() {
        let wants = [Want::Decode, prompt(1000, 0), Want::Decode, Want::Nothing];
        let cheap = Budget {
            ms_per_token: Some(1.0),
            ms_per_answer_step: Some(1000.0),
            ..FRESH
        };
        let plan = plan(&wants, cheap);
        assert_eq!(plan.decode, vec![0, 2]);
        assert_eq!(plan.prefill, vec![(1, 510)]);
        assert_eq!(plan.tokens(), 512);
    }

    #[test]
    fn the_prompt_with_least_left_goes_first_then_the_oldest() {
        let wants = [
            prompt(900, 0),
            prompt(20, 5),
            prompt(300, 2),
            prompt(300, 1),
        ];
        let plan = plan(&wants, FRESH);
        // The two that finish go whole; the third takes what it would
        // beside an answer, and the fourth waits.
        assert_eq!(
            plan.prefill,
            vec![(1, 20), (3, 300), (2, UNMEASURED_PREFILL)]
        );
        // Prompts sent together, all short, share the first step.
        let together = [
            prompt(110, 0),
            prompt(110, 0),
            prompt(110, 0),
            prompt(110, 0),
        ];
        let plan = super::plan(&together, FRESH);
        assert_eq!(plan.prefill, vec![(0, 110), (1, 110), (2, 110), (3, 110)]);
    }

    #[test]
    fn prompts_waiting_beside_fewer_answers_get_a_part_each() {
        let measured = Budget {
            ms_per_token: Some(2.0),
            ms_per_answer_step: Some(20.0),
            ..FRESH
        };
        // One answer, three chats' prompts arrived together: each prompt
        // gets what four answer parts cost (40 tokens), so all start now.
        let wants = [Want::Decode, prompt(40, 1), prompt(40, 2), prompt(40, 3)];
        let plan = plan(&wants, measured);
        assert_eq!(plan.decode, vec![0]);
        assert_eq!(plan.prefill, vec![(1, 40), (2, 40), (3, 40)]);
        // As many answers as prompts: the prompt part stays four answer
        // parts in all, so a long prompt does not stall the answers.
        let wants = [Want::Decode, Want::Decode, prompt(900, 1), prompt(900, 2)];
        let plan = super::plan(&wants, measured);
        assert_eq!(plan.prefill, vec![(2, 40)]);
    }

    #[test]
    fn a_short_prompt_finishing_beside_a_long_one_keeps_its_step_short() {
        let measured = Budget {
            ms_per_token: Some(2.0),
            ms_per_answer_step: Some(20.0),
            ..FRESH
        };
        let plan = plan(&[prompt(9000, 0), prompt(30, 5)], measured);
        assert_eq!(plan.prefill, vec![(1, 30), (0, 40)]);
        // The long one alone again: whole batches.
        let plan = super::plan(&[prompt(9000, 0)], measured);
        assert_eq!(plan.prefill, vec![(0, 512)]);
        // Prompts that all finish share the step whole.
        let plan = super::plan(&[prompt(100, 0), prompt(120, 1), prompt(9000, 2)], measured);
        assert_eq!(plan.prefill, vec![(0, 100), (1, 120), (2, 40)]);
    }

    #[test]
    fn paused_and_free_slots_take_nothing() {
        let wants = [Want::Nothing, Want::Nothing, prompt(5, 0)];
        let plan = plan(&wants, FRESH);
        assert!(plan.decode.is_empty());
        assert_eq!(plan.prefill, vec![(2, 5)]);
        assert_eq!(super::plan(&[Want::Nothing; 4], FRESH), Plan::default());
    }

    #[test]
    fn prompts_alone_fill_whole_batches_on_any_cpu() {
        // However slow a token is, prompts with nothing beside them are
        // read in whole batches.
        for ms in [0.5, 22.0, 1000.0] {
            let slow = Budget {
                ms_per_token: Some(ms),
                ms_per_answer_step: Some(ms * 3.0),
                ..FRESH
            };
            assert_eq!(
                super::plan(&[prompt(5000, 0)], slow).prefill,
                vec![(0, 512)]
            );
            assert_eq!(
                super::plan(&[prompt(5000, 0), prompt(600, 1)], slow).prefill,
                vec![(1, 512)]
            );
        }
    }

    #[test]
    fn beside_answers_a_prompt_costs_a_few_answer_steps_on_any_cpu() {
        // A prompt token costs a tenth of the answers' step: 4 steps' worth
        // is 40 tokens, whether the CPU is fast or ten times slower.
        for scale in [1.0, 10.0] {
            let measured = Budget {
                ms_per_token: Some(2.0 * scale),
                ms_per_answer_step: Some(20.0 * scale),
                ..FRESH
            };
            let plan = plan(&[Want::Decode, prompt(5000, 0), Want::Decode], measured);
            assert_eq!(plan.decode, vec![0, 2]);
            assert_eq!(plan.prefill, vec![(1, 40)]);
        }
        // Never below the floor.
        let dear = Budget {
            ms_per_token: Some(100.0),
            ms_per_answer_step: Some(10.0),
            ..FRESH
        };
        assert_eq!(
            plan(&[Want::Decode, prompt(5000, 0)], dear).prefill,
            vec![(1, MIN_PREFILL)]
        );
        // Before anything is measured, a modest chunk.
        assert_eq!(
            plan(&[Want::Decode, prompt(5000, 0)], FRESH).prefill,
            vec![(1, UNMEASURED_PREFILL)]
        );
    }

    #[test]
    fn while_other_models_wait_a_step_ends_soon() {
        let shared = Budget {
            ms_per_token: Some(10.0),
            ms_per_answer_step: None,
            shared: true,
            ..FRESH
        };
        assert_eq!(plan(&[prompt(5000, 0)], shared).prefill, vec![(0, 50)]);
        let glacial = Budget {
            ms_per_token: Some(1000.0),
            ..shared
        };
        assert_eq!(
            plan(&[prompt(5000, 0)], glacial).prefill,
            vec![(0, MIN_PREFILL)]
        );
    }

    #[test]
    fn a_full_batch_of_answers_leaves_no_room_for_prompts() {
        let small = Budget { batch: 2, ..FRESH };
        let plan = plan(
            &[Want::Decode, Want::Decode, Want::Decode, prompt(9, 0)],
            small,
        );
        assert_eq!(plan.decode, vec![0, 1]);
        assert!(plan.prefill.is_empty());
    }

    #[test]
    fn a_request_takes_the_slot_that_reuses_most_then_holds_least() {
        // (index, reusable prefix, tokens held)
        assert_eq!(
            pick_slot([(0, 0, 0), (1, 70, 100), (2, 12, 12)], 1000),
            Some(1)
        );
        assert_eq!(
            pick_slot([(0, 0, 0), (1, 40, 70), (2, 12, 12)], 1000),
            Some(1)
        );
        // A short shared beginning does not take another's cache.
        assert_eq!(
            pick_slot([(0, 0, 0), (1, 40, 100), (2, 8, 900)], 1000),
            Some(0)
        );
        assert_eq!(pick_slot([(1, 40, 100), (2, 8, 900)], 1000), Some(1));
        // The same short prompt again keeps its slot.
        assert_eq!(pick_slot([(0, 0, 0), (1, 13, 46)], 14), Some(1));
        // Equal reuse: the slot holding least, so other caches survive.
        assert_eq!(
            pick_slot([(0, 0, 300), (1, 0, 0), (2, 0, 50)], 1000),
            Some(1)
        );
        // Equal in both: the lowest index.
        assert_eq!(pick_slot([(3, 5, 9), (1, 5, 9)], 1000), Some(1));
        assert_eq!(pick_slot([], 1000), None);
    }

    #[test]
    fn guesses_are_checked_in_the_room_the_answers_leave_and_never_while_a_prompt_waits() {
        let budget = Budget {
            batch: 8,
            ms_per_token: Some(5.0),
            ms_per_answer_step: Some(20.0),
            shared: false,
        };
        let wants = [
            Want::Check { guesses: 4 },
            Want::Decode,
            Want::Check { guesses: 6 },
        ];
        let planned = plan(&wants, budget);
        assert_eq!(planned.decode, vec![0, 1, 2]);
        assert_eq!(planned.guesses, vec![(0, 4), (2, 1)]);
        assert_eq!(planned.tokens(), 8);
        let waiting = [
            Want::Check { guesses: 4 },
            Want::Prompt {
                left: 10,
                since: at(0),
            },
        ];
        let planned = plan(&waiting, budget);
        assert!(planned.guesses.is_empty());
        assert_eq!(planned.decode, vec![0]);
    }
}
