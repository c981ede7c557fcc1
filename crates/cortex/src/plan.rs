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
    /// Part of its prompt decoded: `left` tokens are still to go; `since`
    /// is when the request started, which breaks ties (older first).
    Prompt { left: usize, since: Instant },
}

/// How much one step may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Budget {
    /// The most tokens a batch holds.
    pub(crate) batch: usize,
    /// What a token of a large batch has cost lately, in milliseconds;
    /// `None` before the first such batch.
    pub(crate) ms_per_token: Option<f64>,
}

/// How long a step that decodes prompt tokens should take at most while
/// other requests wait on it (answers running, or several prompts), and
/// for a prompt alone: whoever arrives during a step waits for it, and
/// deep in a long context a full batch of 512 prompt tokens takes seconds
/// on a small CPU. Prompt tokens are cut to fit.
pub(crate) const STEP_TARGET_MS: f64 = 500.0;
pub(crate) const STEP_TARGET_ALONE_MS: f64 = 1500.0;

/// The fewest prompt tokens a step decodes, when any wait (and the
/// smallest batch whose time per token counts as a measure).
pub(crate) const MIN_PREFILL: usize = 32;

/// The next batch: every slot that decodes its last token, then the
/// prompt chunks, in the order they go into the batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) decode: Vec<usize>,
    pub(crate) prefill: Vec<(usize, usize)>,
}

impl Plan {
    /// Tokens in the batch.
    pub(crate) fn tokens(&self) -> usize {
        self.decode.len() + self.prefill.iter().map(|(_, count)| count).sum::<usize>()
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
/// - The prompt tokens of a step are as many as it decodes in about
///   [`STEP_TARGET_MS`] while others wait on it ([`STEP_TARGET_ALONE_MS`]
///   for a prompt alone), going by the recent cost of a token, and at
///   least [`MIN_PREFILL`].
pub(crate) fn plan(wants: &[Want], budget: Budget) -> Plan {
    let decode: Vec<usize> = wants
        .iter()
        .enumerate()
        .filter(|(_, want)| **want == Want::Decode)
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
    let contended = !decode.is_empty() || prompts.len() > 1;
    let target = if contended {
        STEP_TARGET_MS
    } else {
        STEP_TARGET_ALONE_MS
    };
    let mut tokens = match budget.ms_per_token {
        Some(ms) if ms > 0.0 => {
            ((target / ms) as usize).clamp(MIN_PREFILL, budget.batch.max(MIN_PREFILL))
        }
        _ => budget.batch,
    };
    let mut room = budget.batch - decode.len();
    let mut prefill = Vec::new();
    for (slot, left, _) in prompts {
        let count = left.min(room).min(tokens);
        if count == 0 {
            break;
        }
        prefill.push((slot, count));
        room -= count;
        tokens -= count;
    }
    Plan { decode, prefill }
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
    };

    #[test]
    fn answers_decode_first_and_prompts_fill_the_room_they_leave() {
        let wants = [Want::Decode, prompt(1000, 0), Want::Decode, Want::Nothing];
        let plan = plan(&wants, FRESH);
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
        assert_eq!(plan.prefill, vec![(1, 20), (3, 300), (2, 192)]);
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
    fn paused_and_free_slots_take_nothing() {
        let wants = [Want::Nothing, Want::Nothing, prompt(5, 0)];
        let plan = plan(&wants, FRESH);
        assert!(plan.decode.is_empty());
        assert_eq!(plan.prefill, vec![(2, 5)]);
        assert_eq!(super::plan(&[Want::Nothing; 4], FRESH), Plan::default());
    }

    #[test]
    fn prompt_tokens_are_cut_to_the_step_time_target() {
        // 10 ms a token, deep in a long context: while an answer runs, a
        // step holds 50 prompt tokens (0.5 s); a prompt alone gets 150.
        let slow = Budget {
            batch: 512,
            ms_per_token: Some(10.0),
        };
        let plan = plan(&[Want::Decode, prompt(5000, 0)], slow);
        assert_eq!(plan.prefill, vec![(1, 50)]);
        let alone = super::plan(&[prompt(5000, 0)], slow);
        assert_eq!(alone.prefill, vec![(0, 150)]);
        // Never below the floor, never above the batch.
        let glacial = Budget {
            batch: 512,
            ms_per_token: Some(1000.0),
        };
        assert_eq!(
            super::plan(&[prompt(5000, 0), prompt(10, 1)], glacial).prefill,
            vec![(1, 10), (0, MIN_PREFILL - 10)]
        );
        let fast = Budget {
            batch: 512,
            ms_per_token: Some(0.01),
        };
        assert_eq!(
            super::plan(&[prompt(5000, 0)], fast).prefill,
            vec![(0, 512)]
        );
    }

    #[test]
    fn a_full_batch_of_answers_leaves_no_room_for_prompts() {
        let small = Budget {
            batch: 2,
            ms_per_token: None,
        };
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
}
