//! Guessing tokens ahead for speculative decoding: from the client's
//! predicted text, and from the request's own tokens (the continuation of
//! the last few tokens where they appeared before); and how many tokens
//! to ask of a draft model (`ModelRoom`; the engine runs the model).
//! Plain data in, guesses out; the engine decodes a slot's last
//! token and its guesses in one step and keeps the guesses its own
//! choices agree with.
//!
//! A guess costs a row of the batch whether it is kept or not, and on a
//! CPU a row is not free. So a slot guesses only what it has grounds for
//! (a match in the text), guesses more while its guesses are kept, and
//! guesses at all only while its record of kept tokens pays for what the
//! engine measured guesses to cost: free prose, where matches rarely
//! continue, runs at the speed it would without.

/// The most tokens guessed ahead in one step.
pub(crate) const MAX_GUESSES: usize = 64;

/// The fewest tokens the end of the text must share with an earlier place
/// for that place's continuation to be guessed.
const MIN_MATCH: usize = 2;

/// The most tokens of the text's end that are looked up.
const MAX_MATCH: usize = 4;

/// What guesses add to a step, as parts of a step without them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GuessCost {
    /// Once, for having guesses at all: a batch of one row per sequence
    /// runs other kernels than one of several rows.
    pub(crate) fixed: f64,
    /// Each guess's row.
    pub(crate) row: f64,
}

/// Guess costs before the engine has measured them: about a CPU's
/// (Qwen2.5-0.5B on 2 cores: a step of one token 27 ms; 4 guesses add
/// 67 ms, 64 add 550 ms; a guess's row costs more than a prompt token's,
/// as each needs its logits).
pub(crate) const UNMEASURED: GuessCost = GuessCost {
    fixed: 1.0,
    row: 0.3,
};

/// The fewest guesses checked at once: the first one costs most.
const MIN_GUESSES: usize = 4;

/// A match of the text's end this long is a copy under way: its guess is
/// sized by how often copies of that source break (`Hazard`).
const LONG_MATCH: usize = 8;

/// Each source's share of copied tokens after which a copy breaks, before
/// any was checked: a prediction is rarely left, a repetition more often.
const HAZARD_PRIOR: [f64; 2] = [0.01, 0.02];

/// How much longer the text's own repetition must have been followed
/// than the prediction for its guess to go first.
const PREDICTION_EDGE: usize = 4;

/// What a paused source's copies must yield, against a step without
/// guesses, to be guessed again.
const RESUME: f64 = 1.3;

/// How much of its breaks a source's copy record forgets in a step where
/// a copy was judged not worth guessing.
const COPY_RECOVERY: f64 = 0.005;

/// How many tokens the prior counts for: few, so that copies that break
/// at once (a JSON answer repeating its structure with other data) stop
/// being guessed after a few checks.
const HAZARD_WEIGHT: f64 = 10.0;

/// How many tokens the record of breaks remembers, about: older ones
/// fade, so that the record follows the answer.
const HAZARD_MEMORY: f64 = 400.0;

/// How much more a step must yield per unit of time with guesses than
/// without them for the guesses to go out: guesses that only break even
/// are not worth the latency they add.
const WORTH: f64 = 1.1;

/// Where a guess comes from. Each source has its own record: a prediction
/// is usually right for long runs, a repetition of the text less often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Prediction,
    Lookup,
}

/// Each source's tokens kept per check before any was checked, and what
/// its record drifts back to while it is not used.
const PRIOR: [f64; 2] = [16.0, 4.0];

/// How much one check moves its source's record.
const LEARNING: f64 = 0.3;

/// How far a source's record drifts back to its prior in a step where it
/// had a guess but was judged not worth it, so that a source that failed
/// is tried again, some steps later.
const RECOVERY: f64 = 0.02;

/// One request's guesser.
#[derive(Debug, Clone)]
pub(crate) struct Drafter<T> {
    /// The client's predicted answer, if any.
    prediction: Vec<T>,
    /// Where in `prediction` the answer stands: the index of the token
    /// expected next, while the answer's last tokens follow it.
    aligned: Option<usize>,
    /// The answer's length when `aligned` was last set.
    aligned_at: usize,
    /// For each source, the tokens its checks kept lately (a running
    /// average).
    kept: [f64; 2],
    /// For each source, how many to guess next: twice as many after a
    /// check kept them all.
    room: [usize; 2],
    /// For each source, how often its copies break.
    hazard: [Hazard; 2],
    /// For each source, whether its copies were last judged not worth
    /// guessing.
    paused: [bool; 2],
    /// The source of the guesses being checked.
    last: Option<Source>,
    /// Whether they continue a copy under way.
    copying: bool,
}

/// How often copies from a source break: breaks per token checked, from
/// the checks of guesses that continued a copy (a decaying count).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hazard {
    breaks: f64,
    tokens: f64,
}

impl Hazard {
    const fn prior(rate: f64) -> Self {
        Self {
            breaks: rate * HAZARD_WEIGHT,
            tokens: HAZARD_WEIGHT,
        }
    }

    /// The chance that a copied token is not the model's, given those
    /// before it were.
    fn rate(self) -> f64 {
        (self.breaks / self.tokens).clamp(1e-3, 0.9)
    }

    fn add(&mut self, offered: usize, kept: usize) {
        let broke = kept < offered;
        self.tokens += (kept + usize::from(broke)) as f64;
        self.breaks += f64::from(u8::from(broke));
        if self.tokens > HAZARD_MEMORY {
            let fade = HAZARD_MEMORY / self.tokens;
            self.tokens *= fade;
            self.breaks *= fade;
        }
    }
}

impl<T: Copy + Eq> Drafter<T> {
    /// A guesser from the client's `prediction` (may be empty) and from
    /// the request's own text.
    pub(crate) fn new(prediction: Vec<T>) -> Self {
        let aligned = (!prediction.is_empty()).then_some(0);
        Self {
            prediction,
            aligned,
            aligned_at: 0,
            kept: PRIOR,
            room: [PRIOR[0] as usize, MIN_GUESSES],
            hazard: [
                Hazard::prior(HAZARD_PRIOR[0]),
                Hazard::prior(HAZARD_PRIOR[1]),
            ],
            paused: [false; 2],
            last: None,
            copying: false,
        }
    }

    /// Up to `max` tokens guessed to follow `text`, the prompt and then
    /// the answer so far (`answer` tokens of it, at its end), when by the
    /// source's record they are worth what they add to the step (`cost`).
    pub(crate) fn guess(
        &mut self,
        text: &[T],
        answer: usize,
        max: usize,
        cost: GuessCost,
    ) -> Vec<T> {
        let answer = answer.min(text.len());
        self.follow_prediction(&text[text.len() - answer..]);
        self.last = None;
        self.copying = false;
        // Each source's run, with how long the text has followed the place
        // it is guessed from (a long match is a copy under way).
        let predicted = match self.aligned {
            Some(at) if at < self.prediction.len() => Some((
                Source::Prediction,
                at,
                matching_tail(&self.prediction[..at], text),
            )),
            _ => None,
        };
        let looked_up =
            continuation(text, text.len()).map(|(from, matched)| (Source::Lookup, from, matched));
        // The prediction first, unless the text's own repetition has been
        // followed for far longer (a prediction found again by a few
        // common tokens, in a wrong prediction, say).
        let candidates = match (predicted, looked_up) {
            (Some(p), Some(l)) if l.2 > p.2 + PREDICTION_EDGE => [Some(l), Some(p)],
            (p, l) => [p, l],
        };
        for (source, from, matched) in candidates.into_iter().flatten() {
            let whole = match source {
                Source::Prediction => &self.prediction,
                Source::Lookup => text,
            };
            if let Some(count) = self.size(source, whole.len() - from, matched, max, cost) {
                let whole = match source {
                    Source::Prediction => &self.prediction,
                    Source::Lookup => text,
                };
                return whole[from..from + count].to_vec();
            }
        }
        Vec::new()
    }

    /// How many of a `source`'s `run` of tokens to guess, at most `max`,
    /// its text having followed the run's place for `matched` tokens; when
    /// that many are worth what they add to the step (`cost`), the source
    /// becomes the one being checked.
    fn size(
        &mut self,
        source: Source,
        run: usize,
        matched: usize,
        max: usize,
        cost: GuessCost,
    ) -> Option<usize> {
        let most = max.min(MAX_GUESSES).min(run);
        let index = source as usize;
        if matched >= LONG_MATCH {
            // A copy under way: as many as yield the most per unit of
            // time, by how often this source's copies break.
            self.room[index] = self.room[index].max(matched);
            self.kept[index] = self.kept[index].max(matched as f64);
            let (count, rate) = best_length(self.hazard[index].rate(), most, cost);
            // Once stopped, it starts again only with a margin, so that it
            // does not stop and start at every step near the line.
            let needed = if self.paused[index] { RESUME } else { WORTH };
            if count == 0 || rate <= needed {
                // Forgets its breaks slowly, so that it is tried again
                // some tens of steps later.
                self.hazard[index].breaks *= 1.0 - COPY_RECOVERY;
                self.paused[index] = true;
                return None;
            }
            self.paused[index] = false;
            self.last = Some(source);
            self.copying = true;
            return Some(count);
        }
        // As many as the room says, or, if that many are not worth it,
        // about as many as the record keeps.
        let record = &mut self.kept[index];
        let count = [self.room[index], (record.ceil() as usize).max(MIN_GUESSES)]
            .into_iter()
            .map(|count| count.min(most))
            .find(|&count| count > 0 && worth_guessing(*record, count, cost));
        if count.is_none() {
            *record += (PRIOR[index] - *record) * RECOVERY;
        } else {
            self.last = Some(source);
        }
        count
    }

    /// Takes in how a guess of `offered` tokens went: the first `kept`
    /// were the model's own choices.
    pub(crate) fn settle(&mut self, offered: usize, kept: usize) {
        let Some(source) = self.last.take() else {
            return;
        };
        if offered == 0 {
            return;
        }
        if std::mem::take(&mut self.copying) {
            self.hazard[source as usize].add(offered, kept);
        }
        // A check that kept every guess says the run goes on past them:
        // it counts as twice as many, so that the record (and with it the
        // guesses) can grow past what was offered.
        let found = if kept == offered { 2 * kept } else { kept };
        let record = &mut self.kept[source as usize];
        *record += (found as f64 - *record) * LEARNING;
        self.room[source as usize] = if kept == offered {
            (offered * 2).min(MAX_GUESSES)
        } else {
            (2 * kept).clamp(MIN_GUESSES, MAX_GUESSES)
        };
    }

    /// Moves the place in the prediction along with the `answer`, or finds
    /// it again where the answer's last tokens appear in the prediction
    /// (an edit changes a few lines: the answer leaves the prediction and
    /// comes back to it further on).
    fn follow_prediction(&mut self, answer: &[T]) {
        if self.prediction.is_empty() {
            return;
        }
        if let Some(at) = self.aligned {
            let new = answer.get(self.aligned_at..).unwrap_or(&[]);
            let expected = self.prediction.get(at..at + new.len());
            if expected == Some(new) {
                self.aligned = Some(at + new.len());
                self.aligned_at = answer.len();
                return;
            }
        }
        self.aligned_at = answer.len();
        let key = MAX_MATCH.min(answer.len());
        if key < MIN_MATCH {
            self.aligned = None;
            return;
        }
        let key = &answer[answer.len() - key..];
        // The first place after the old one, else the first anywhere.
        let after = self.aligned.unwrap_or(0);
        let place = find(&self.prediction, key, after).or_else(|| find(&self.prediction, key, 0));
        self.aligned = place.map(|start| start + key.len());
    }
}

/// The most tokens a draft model guesses in one step: each is a decode
/// of the draft model, one after another.
pub(crate) const MAX_MODEL_GUESSES: usize = 16;

/// How many tokens a request asks its draft model for: twice as many
/// after a check kept them all, and a couple more than were kept after
/// one that did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelRoom(usize);

impl ModelRoom {
    pub(crate) const fn new() -> Self {
        Self(8)
    }

    /// How many to ask for now.
    pub(crate) fn count(self) -> usize {
        self.0
    }

    /// Takes in how a guess of `offered` tokens went: `kept` were kept.
    pub(crate) fn settle(&mut self, offered: usize, kept: usize) {
        if offered == 0 {
            return;
        }
        self.0 = if kept == offered {
            (2 * offered).clamp(2, MAX_MODEL_GUESSES)
        } else {
            (kept + 2).clamp(2, MAX_MODEL_GUESSES)
        };
    }
}

/// What checking one guessed token gives.
#[cfg_attr(not(test), allow(dead_code))] // see `check`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The guess stands: it is the token at this place.
    Keep,
    /// The guess falls; this token takes its place, and the guesses after
    /// it fall too.
    Replace(usize),
}

/// The speculative-sampling rule: whether the token `guess`, drawn from
/// the guesser's distribution `q`, stands where the model's distribution
/// (after every sampler stage) is `p`, given two uniform draws `u` and
/// `v` in [0, 1). The guess stands with probability min(1, p/q); else a
/// token is drawn from what p has over q, max(0, p - q), normalised. The
/// token that comes out follows `p` exactly, whatever `q` is: guessing
/// changes how many tokens a step yields, never which.
///
/// A guess copied from text (a prediction, an earlier run of tokens) is
/// certain, q = 1 on it: then the guess stands with probability p(guess),
/// and otherwise the token is drawn from p without it. That is drawing
/// from p as usual and keeping the guess when it is drawn, which is how
/// the engine checks such guesses (the sampler chain draws, at each place
/// in turn). The general rule is for guesses that carry a distribution (a
/// draft model's).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn check(p: &[f64], q: &[f64], guess: usize, u: f64, v: f64) -> Verdict {
    // A guess q never makes counts as a certain one.
    let certain = q.get(guess).is_none_or(|&q| q <= 0.0);
    let q_of = |token: usize| {
        if certain {
            f64::from(u8::from(token == guess))
        } else {
            q.get(token).copied().unwrap_or(0.0)
        }
    };
    // u < p/q, without dividing.
    if u * q_of(guess) < p.get(guess).copied().unwrap_or(0.0) {
        return Verdict::Keep;
    }
    let excess: Vec<f64> = p
        .iter()
        .enumerate()
        .map(|(token, &p)| (p - q_of(token)).max(0.0))
        .collect();
    // Where p and q agree (up to rounding) the guess stands but for
    // rounding: draw from p.
    let weights = if excess.iter().sum::<f64>() > 0.0 {
        &excess[..]
    } else {
        p
    };
    let target = v * weights.iter().sum::<f64>();
    let mut sum = 0.0;
    let mut last = guess;
    for (token, &weight) in weights.iter().enumerate() {
        if weight <= 0.0 {
            continue;
        }
        last = token;
        sum += weight;
        if target < sum {
            return Verdict::Replace(token);
        }
    }
    Verdict::Replace(last)
}

/// Whether checking `count` guesses, of a source whose checks keep
/// `kept` tokens lately, yields more tokens per unit of time than a step
/// without them (by a margin: a guess that only breaks even is not
/// worth the latency it adds).
pub(crate) fn worth_guessing(kept: f64, count: usize, cost: GuessCost) -> bool {
    let tokens = 1.0 + kept.min(count as f64);
    let time = 1.0 + cost.fixed + cost.row * count as f64;
    tokens / time > WORTH
}

/// How many guesses, at most `most`, yield the most tokens per unit of
/// time, when each holds (given that those before it held) but with the
/// chance `hazard`; and that yield against a step without guesses.
fn best_length(hazard: f64, most: usize, cost: GuessCost) -> (usize, f64) {
    let hold = 1.0 - hazard;
    let (mut best, mut best_rate) = (0, 1.0);
    // The step's own token, then each guess as likely as all before it.
    let (mut expected, mut reached) = (1.0, 1.0);
    for count in 1..=most {
        reached *= hold;
        expected += reached;
        let rate = expected / (1.0 + cost.fixed + cost.row * count as f64);
        if rate > best_rate {
            (best, best_rate) = (count, rate);
        }
    }
    (best, best_rate)
}

/// Where the tokens that followed an earlier occurrence of the end of
/// `text[..end]` start, and how many tokens before that place match the
/// text's end: among the occurrences of its longest suffix of
/// [`MIN_MATCH`] to [`MAX_MATCH`] tokens that are followed by something,
/// the one whose match reaches furthest back (the place a copy under way
/// is following: a line that appears twice in a file must go on as the
/// copied one does), the latest of those.
fn continuation<T: Eq>(text: &[T], end: usize) -> Option<(usize, usize)> {
    for len in (MIN_MATCH..=MAX_MATCH.min(end.saturating_sub(1))).rev() {
        let key = &text[end - len..end];
        let best = (0..end - len)
            .rev()
            .filter(|&s| &text[s..s + len] == key)
            .map(|s| (s + len, matching_tail(&text[..s + len], &text[..end])))
            // Latest first, so a later place wins a tie.
            .fold(None, |best: Option<(usize, usize)>, place| match best {
                Some(best) if best.1 >= place.1 => Some(best),
                _ => Some(place),
            });
        if best.is_some() {
            return best;
        }
    }
    None
}

/// How many tokens `before` and `text` share at their ends (at most
/// [`MAX_GUESSES`]).
fn matching_tail<T: Eq>(before: &[T], text: &[T]) -> usize {
    before
        .iter()
        .rev()
        .zip(text.iter().rev())
        .take(MAX_GUESSES)
        .take_while(|(a, b)| a == b)
        .count()
}

/// The first index at or after `from` where `key` starts in `text`.
fn find<T: Eq>(text: &[T], key: &[T], from: usize) -> Option<usize> {
    if key.is_empty() || text.len() < key.len() {
        return None;
    }
    (from..=text.len() - key.len()).find(|&s| &text[s..s + key.len()] == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_models_room_follows_what_its_checks_keep() {
        let mut room = ModelRoom::new();
        room.settle(8, 8);
        assert_eq!(room.count(), 16);
        room.settle(16, 16);
        assert_eq!(room.count(), MAX_MODEL_GUESSES);
        room.settle(16, 3);
        assert_eq!(room.count(), 5);
        room.settle(5, 0);
        assert_eq!(room.count(), 2);
        room.settle(0, 0);
        assert_eq!(room.count(), 2);
    }

    fn tokens(text: &str) -> Vec<char> {
        text.chars().collect()
    }

    const COST: GuessCost = UNMEASURED;

    #[test]
    fn a_repeated_run_of_tokens_is_guessed_to_go_on_as_before() {
        let mut drafter = Drafter::new(Vec::new());
        let text = tokens("abcdefg xyz abc");
        assert_eq!(drafter.guess(&text, 3, 8, COST), tokens("defg"));
        drafter.settle(4, 4);
        assert_eq!(
            drafter.guess(&text, 3, 8, COST),
            tokens("defg xyz"),
            "kept: more"
        );
        drafter.settle(8, 8);
        assert_eq!(
            drafter.guess(&text, 3, 2, COST),
            tokens("de"),
            "never over the limit"
        );
    }

    #[test]
    fn the_latest_occurrence_of_the_longest_match_wins() {
        let text = tokens("xab1 yab2 zab3 ab");
        let (from, _) = continuation(&text, text.len()).unwrap();
        assert_eq!(text[from], '3');
        // Without a longer match, the latest "ab" decides.
        let text = tokens("qab1 pzab2 ab");
        assert_eq!(text[continuation(&text, text.len()).unwrap().0], '2');
    }

    #[test]
    fn a_copy_goes_on_from_the_place_it_follows_not_a_later_repeat() {
        // "ret x" appears twice; the copy under way follows the first.
        let text = tokens("def f: ret x; a=1; def g: ret x; b=2; def f: ret x");
        let (from, matched) = continuation(&text, text.len()).unwrap();
        assert_eq!(&text[from..from + 5], &tokens("; a=1"));
        assert_eq!(matched, 12);
    }

    #[test]
    fn nothing_is_guessed_without_a_match() {
        let mut drafter = Drafter::new(Vec::new());
        assert!(drafter.guess(&tokens("abcdefgh"), 2, 8, COST).is_empty());
    }

    #[test]
    fn the_prediction_is_followed_from_the_first_token_and_found_again_after_an_edit() {
        let prediction = tokens("fn main() { one(); two(); three(); }");
        let mut drafter = Drafter::new(prediction);
        // The answer starts as predicted.
        assert_eq!(drafter.guess(&tokens("P"), 0, 4, COST), tokens("fn m"));
        drafter.settle(4, 4);
        let answer = "fn main() { one(); ";
        assert_eq!(
            drafter.guess(&tokens(&format!("P{answer}")), answer.len(), 8, COST),
            tokens("two(); t")
        );
        // The answer changes two() into six() and rejoins after it.
        let answer = "fn main() { one(); six(); t";
        let text = tokens(&format!("P{answer}"));
        assert_eq!(
            drafter.guess(&text, answer.len(), 8, COST),
            tokens("hree(); ")
        );
    }

    #[test]
    fn guesses_that_fail_stop_until_their_record_recovers_and_kept_ones_lengthen() {
        let mut drafter: Drafter<char> = Drafter::new(Vec::new());
        let text = tokens("abcdefghijklmnopqrstuvwxyz abc");
        let first = drafter.guess(&text, 3, 64, COST).len();
        assert_eq!(first, MIN_GUESSES);
        drafter.settle(first, 0);
        let mut failures = 1;
        loop {
            let offered = drafter.guess(&text, 3, 64, COST).len();
            if offered == 0 {
                break;
            }
            drafter.settle(offered, 0);
            failures += 1;
            assert!(failures < 5, "still guessing after {failures} failures");
        }
        let mut waited = 1;
        while drafter.guess(&text, 3, 64, COST).is_empty() {
            waited += 1;
            assert!(waited < 200, "never tried again");
        }
        for _ in 0..10 {
            let offered = drafter.guess(&text, 3, 64, COST).len();
            drafter.settle(offered, offered);
        }
        assert!(
            drafter.guess(&text, 3, 64, COST).len() > 16,
            "a record of kept guesses: longer guesses"
        );
    }

    #[test]
    fn guessing_pays_only_when_guesses_hold_for_what_they_cost() {
        // A CPU, and guesses that keep less than half a token: no.
        assert!(!worth_guessing(0.4, 4, UNMEASURED));
        // A CPU, and guesses that keep a dozen: yes.
        assert!(worth_guessing(12.0, 16, UNMEASURED));
        // Rows as dear as a step: no, whatever is kept.
        let dear = GuessCost {
            fixed: 0.0,
            row: 1.0,
        };
        assert!(!worth_guessing(4.0, 4, dear));
        // Nearly free rows (a GPU): even a poor record pays.
        let free = GuessCost {
            fixed: 0.05,
            row: 0.01,
        };
        assert!(worth_guessing(1.0, 4, free));
    }

    /// A small seeded generator of uniform draws in [0, 1).
    struct Draws(u64);

    impl Draws {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }

        /// A token drawn from `weights`.
        fn pick(&mut self, weights: &[f64]) -> usize {
            let total: f64 = weights.iter().sum();
            let target = self.next() * total;
            let mut sum = 0.0;
            for (token, weight) in weights.iter().enumerate() {
                sum += weight;
                if target < sum {
                    return token;
                }
            }
            weights.len() - 1
        }
    }

    /// The total-variation distance between the tokens that come out of
    /// `trials` checks (guess drawn from `q`) and `p`, and the share of
    /// guesses kept.
    fn outcome(p: &[f64], q: &[f64], trials: usize, seed: u64) -> (f64, f64) {
        let mut draws = Draws(seed);
        let mut counts = vec![0usize; p.len()];
        let mut kept = 0;
        for _ in 0..trials {
            let guess = draws.pick(q);
            let (u, v) = (draws.next(), draws.next());
            let token = match check(p, q, guess, u, v) {
                Verdict::Keep => {
                    kept += 1;
                    guess
                }
                Verdict::Replace(token) => token,
            };
            counts[token] += 1;
        }
        let distance = p
            .iter()
            .zip(&counts)
            .map(|(p, &n)| (p - n as f64 / trials as f64).abs())
            .sum::<f64>()
            / 2.0;
        (distance, kept as f64 / trials as f64)
    }

    #[test]
    fn the_tokens_checked_guesses_give_follow_the_model_whatever_the_guesser() {
        let p = [0.5, 0.25, 0.15, 0.1, 0.0];
        let guessers: [(&str, [f64; 5]); 5] = [
            ("right", p),
            ("wrong", [0.0, 0.0, 0.0, 0.1, 0.9]),
            ("partly right", [0.2, 0.5, 0.0, 0.3, 0.0]),
            ("certain and likely", [1.0, 0.0, 0.0, 0.0, 0.0]),
            ("certain and unlikely", [0.0, 0.0, 0.0, 1.0, 0.0]),
        ];
        // With 200,000 trials, sampling noise keeps the distance near 0.002.
        for (seed, (name, q)) in guessers.iter().enumerate() {
            let (distance, kept) = outcome(&p, q, 200_000, 0x9E37_79B9 + seed as u64);
            assert!(distance < 0.01, "{name}: distance {distance}");
            // A guess stands with probability sum(min(p, q)).
            let expected: f64 = p.iter().zip(q).map(|(p, q)| p.min(*q)).sum();
            assert!(
                (kept - expected).abs() < 0.01,
                "{name}: kept {kept}, expected {expected}"
            );
        }
    }

    #[test]
    fn a_certain_guess_stands_as_often_as_the_model_would_draw_it() {
        let p = [0.7, 0.2, 0.1];
        let q = [0.0, 1.0, 0.0];
        assert_eq!(check(&p, &q, 1, 0.19, 0.5), Verdict::Keep);
        // Refused: the rest of p, without the guess, decides.
        assert_eq!(check(&p, &q, 1, 0.21, 0.5), Verdict::Replace(0));
        assert_eq!(check(&p, &q, 1, 0.21, 0.95), Verdict::Replace(2));
        // A greedy model (all of p on one token) keeps exactly its token.
        let greedy = [0.0, 1.0, 0.0];
        assert_eq!(check(&greedy, &q, 1, 0.999, 0.3), Verdict::Keep);
        assert_eq!(
            check(&[1.0, 0.0, 0.0], &q, 1, 0.0, 0.3),
            Verdict::Replace(0)
        );
    }

    #[test]
    fn a_long_copy_under_way_is_guessed_far_ahead_at_once() {
        let mut drafter = Drafter::new(Vec::new());
        let line = "the quick brown fox jumps over the lazy dog and runs away";
        let text = tokens(&format!("{line}\n{}", &line[..20]));
        // 20 tokens already copied: a long guess, not 4.
        assert!(drafter.guess(&text, 20, 64, COST).len() >= 16);
    }

    #[test]
    fn a_copy_under_way_goes_before_a_prediction_found_again_by_a_few_tokens() {
        // The prediction is wrong but for "jklm"; the answer copies the
        // prompt, and has for 13 tokens.
        let mut drafter = Drafter::new(tokens("XXjklmYYYYYYYY"));
        let text = tokens("abcdefghijklmnop abcdefghijklm");
        let guess = drafter.guess(&text, 13, 64, COST);
        assert!(guess.starts_with(&tokens("nop a")), "{guess:?}");
        // Without the copy, the prediction's guess.
        let mut drafter = Drafter::new(tokens("XXjklmYYYYYYYY"));
        let text = tokens("prompt: jklm");
        assert_eq!(drafter.guess(&text, 4, 4, COST), tokens("YYYY"));
    }

    #[test]
    fn a_copys_guesses_are_as_long_as_its_breaks_make_worth_it() {
        // Copies that never break: as far as allowed.
        assert_eq!(best_length(0.0, 64, COST).0, 64);
        // Copies that break every few tokens: short guesses, or none.
        let (count, rate) = best_length(0.3, 64, COST);
        assert!(count <= 4 && rate < WORTH, "{count} {rate}");
        // Between, the longest guesses cost more than they bring.
        let (count, _) = best_length(0.016, 64, COST);
        assert!((12..=40).contains(&count), "{count}");
        // Dearer rows: shorter.
        let dear = GuessCost {
            fixed: 1.0,
            row: 0.6,
        };
        assert!(best_length(0.016, 64, dear).0 < count);
    }

    #[test]
    fn copies_that_break_at_once_stop_being_guessed_and_are_tried_again_later() {
        let line = "the quick brown fox jumps over the lazy dog and runs far away from the farm";
        let text = tokens(&format!("{line}\n{}", &line[..20]));
        let mut drafter = Drafter::new(Vec::new());
        let mut checks = 0;
        while !drafter.guess(&text, 20, 64, COST).is_empty() {
            drafter.settle(1, 0);
            checks += 1;
            assert!(
                checks <= 5,
                "still guessing after {checks} checks that kept nothing"
            );
        }
        let mut waited = 0;
        while drafter.guess(&text, 20, 64, COST).is_empty() {
            waited += 1;
            assert!(waited < 500, "never tried again");
        }
        assert!(waited > 10, "tried again at once");
    }

    #[test]
    fn a_copy_that_breaks_often_guesses_shorter() {
        let line = "the quick brown fox jumps over the lazy dog and runs far away from the farm";
        let text = tokens(&format!("{line}\n{}", &line[..20]));
        let mut steady = Drafter::new(Vec::new());
        let mut broken = Drafter::new(Vec::new());
        for _ in 0..10 {
            let offered = steady.guess(&text, 20, 64, COST).len();
            steady.settle(offered, offered);
            let offered = broken.guess(&text, 20, 64, COST).len();
            broken.settle(offered, 3);
        }
        let (steady, broken) = (
            steady.guess(&text, 20, 64, COST).len(),
            broken.guess(&text, 20, 64, COST).len(),
        );
        assert!(broken < steady, "{broken} {steady}");
    }
}
