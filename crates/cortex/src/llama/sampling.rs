//! Choosing tokens: llama.cpp's sampler chain, a grammar that holds the
//! answer to a JSON schema, a tool-call syntax or GBNF, and the
//! log-probabilities reported to the application.

use std::cell::RefCell;
use std::collections::VecDeque;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::protocol::{TokenLogprobs, TopLogprob};
use rusty_genius_core::{GeniusError, InferenceConfig, ResponseFormat};

use crate::tools::ToolSyntax;

/// How many recent tokens the repetition penalty looks at.
pub(super) const PENALTY_WINDOW: usize = 64;

thread_local! {
    /// The last error llama.cpp logged on this thread, so that a failure
    /// it reports only by a null result (a grammar that does not parse)
    /// can say why.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Keeps `message` as this thread's last llama.cpp error.
pub(super) fn note_error(message: &str) {
    LAST_ERROR.with(|last| *last.borrow_mut() = Some(message.to_owned()));
}

fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|last| last.borrow_mut().take())
}

/// Builds llama.cpp's sampler chain for `config` (without a grammar).
pub(super) fn sampler_for(config: &InferenceConfig, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::with_capacity(6);
    if config.repetition_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            PENALTY_WINDOW as i32,
            config.repetition_penalty,
            0.0,
            0.0,
        ));
    }
    if config.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if config.top_k > 0 {
            chain.push(LlamaSampler::top_k(config.top_k.min(i32::MAX as u32) as i32));
        }
        if config.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(config.top_p, 1));
        }
        if config.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(config.min_p, 1));
        }
        chain.push(LlamaSampler::temp(config.temperature));
        // llama.cpp draws a random seed for LLAMA_DEFAULT_SEED (u32::MAX).
        chain.push(LlamaSampler::dist(config.seed.unwrap_or(u32::MAX)));
    }
    LlamaSampler::chain_simple(chain)
}

/// The GBNF grammar `config` holds the answer to, if any: its response
/// format, or the tool-call syntax when a call is required or named.
pub(super) fn grammar_text(
    config: &InferenceConfig,
    tool_syntax: Option<ToolSyntax>,
) -> Result<Option<String>, GeniusError> {
    let schema_grammar = |schema: &serde_json::Value, what: &str| {
        // A schema is refused rather than quietly weakened: every keyword
        // the converter would drop is an error, and so is every pattern it
        // would replace by "any string".
        for pattern in crate::schema::check(what, schema)? {
            check_pattern(&pattern)?;
        }
        convert_schema(schema, what)
    };
    match &config.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            let schema = serde_json::json!({"type": "object"});
            return schema_grammar(&schema, "response_format").map(Some);
        }
        ResponseFormat::JsonSchema { json_schema } => {
            if !json_schema.schema.is_object() && !json_schema.schema.is_boolean() {
                return Err(GeniusError::invalid_request(
                    "response_format.json_schema.schema",
                    "must be a JSON schema (an object)",
                ));
            }
            return schema_grammar(&json_schema.schema, "response_format.json_schema.schema")
                .map(Some);
        }
        ResponseFormat::Grammar { grammar } => return Ok(Some(grammar.clone())),
    }
    let Some(syntax) = tool_syntax else {
        return Ok(None);
    };
    let Some(schema) = syntax.call_schema(&config.tools, &config.tool_choice) else {
        return Ok(None);
    };
    let call = schema_grammar(&schema, "tools")?;
    Ok(Some(syntax.calls_grammar(&call)))
}

/// Which part of the request a grammar comes from, for its errors.
pub(super) fn grammar_field(config: &InferenceConfig) -> &'static str {
    match config.response_format {
        ResponseFormat::Grammar { .. } => "response_format.grammar",
        ResponseFormat::Text => "tools",
        _ => "response_format",
    }
}

/// llama.cpp's grammar for `schema`, or why it has none.
fn convert_schema(schema: &serde_json::Value, what: &str) -> Result<String, GeniusError> {
    llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|err| {
        let why = take_last_error().unwrap_or_else(|| err.to_string());
        GeniusError::invalid_request(
            what,
            format!("the JSON-schema converter cannot handle this schema: {why}"),
        )
    })
}

/// Refuses a pattern the converter cannot turn into grammar rules: it
/// would accept any string in its place (and only say so on stderr).
fn check_pattern(pattern: &crate::schema::Pattern) -> Result<(), GeniusError> {
    let alone = serde_json::json!({"type": "string", "pattern": pattern.pattern});
    let grammar = convert_schema(&alone, &pattern.at).map_err(|_| {
        GeniusError::invalid_request(
            pattern.at.clone(),
            format!(
                "the pattern `{}` is not a regular expression the grammar converter can read (check its brackets and escapes)",
                pattern.pattern
            ),
        )
    })?;
    let unconstrained = grammar
        .lines()
        .any(|line| line.trim_end() == "root ::= string");
    if unconstrained {
        return Err(GeniusError::invalid_request(
            pattern.at.clone(),
            format!(
                "the pattern `{}` uses regular-expression syntax the grammar converter does not support (it must be anchored with ^ and $, without lookaround, backreferences or anchors inside), so the answer could not be held to it",
                pattern.pattern
            ),
        ));
    }
    Ok(())
}

/// A grammar sampler for `grammar` (rule `root`), or why it cannot be one.
pub(super) fn grammar_sampler(
    model: &LlamaModel,
    grammar: &str,
    what: &str,
) -> Result<LlamaSampler, GeniusError> {
    take_last_error();
    LlamaSampler::grammar(model, grammar, "root").map_err(|err| {
        let why = take_last_error().unwrap_or_else(|| err.to_string());
        GeniusError::invalid_request(what, format!("llama.cpp cannot use this grammar: {why}"))
    })
}

/// Chooses tokens for one request: the chain, and the grammar if any.
pub(super) struct Chooser {
    chain: LlamaSampler,
    grammar: Option<LlamaSampler>,
    /// How often the grammar had to reject the chain's first choice.
    pub(super) resampled: usize,
    /// Tokens accepted so far.
    accepted: usize,
    /// The part of the request the grammar comes from, for errors.
    field: &'static str,
    /// Greedy decoding: the likeliest allowed token is the choice.
    greedy: bool,
    /// The chain's `top_k` (0: off) and `min_p` (0: off).
    top_k: usize,
    min_p: f32,
    /// The chain's repetition penalty and the tokens it looks at.
    penalty: f32,
    recent: VecDeque<LlamaToken>,
    /// A choice under way across steps.
    search: Option<Search>,
    /// The logits of the last choice that took more than one step.
    searched: Option<Vec<f32>>,
    /// The candidate list, one entry per vocabulary token, kept between
    /// tokens so that choosing allocates nothing (it is megabytes).
    buffer: Vec<LlamaTokenData>,
    /// Whether the chain only takes the likeliest token (greedy, no
    /// penalty), so that a scan of the logits can stand in for it.
    argmax: bool,
    /// Changes to the logits before anything chooses: the request's
    /// `logit_bias`, frequency and presence penalties.
    adjust: Option<Adjust>,
}

/// The request's own changes to the logits, applied to a copy before the
/// chain, the grammar search and the greedy scan see them, so that every
/// way of choosing agrees (a bias can raise a logit, which the search's
/// order would otherwise not know).
struct Adjust {
    bias: Vec<(usize, f32)>,
    frequency: f32,
    presence: f32,
    /// How often each generated token came so far.
    counts: std::collections::HashMap<LlamaToken, u32>,
    /// The adjusted logits (reused).
    logits: Vec<f32>,
}

impl Adjust {
    fn new(config: &InferenceConfig) -> Option<Self> {
        let none = config.logit_bias.is_empty()
            && config.frequency_penalty == 0.0
            && config.presence_penalty == 0.0;
        (!none).then(|| Self {
            bias: config
                .logit_bias
                .iter()
                .map(|(&id, &bias)| (id as usize, bias))
                .collect(),
            frequency: config.frequency_penalty,
            presence: config.presence_penalty,
            counts: std::collections::HashMap::new(),
            logits: Vec::new(),
        })
    }

    /// `logits` with the changes, in `self.logits`.
    fn apply(&mut self, logits: &[f32]) {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        for &(id, bias) in &self.bias {
            if let Some(logit) = self.logits.get_mut(id) {
                *logit += bias;
            }
        }
        for (token, &count) in &self.counts {
            if let Some(logit) = self.logits.get_mut(token.0 as usize) {
                *logit -= self.frequency * count as f32 + self.presence;
            }
        }
    }
}

/// Checks that every `logit_bias` id is in the vocabulary of `n_vocab`
/// tokens.
pub(super) fn check_logit_bias(config: &InferenceConfig, n_vocab: i32) -> Result<(), GeniusError> {
    let size = u32::try_from(n_vocab).unwrap_or(0);
    match config.logit_bias.keys().find(|&&id| id >= size) {
        Some(id) => Err(GeniusError::invalid_request(
            "logit_bias",
            format!("token id {id} is not in this model's vocabulary of {size} tokens"),
        )),
        None => Ok(()),
    }
}

impl Chooser {
    /// Chooses for `config` with `chain` (from [`sampler_for`]) and the
    /// grammar, if any.
    pub(super) fn new(
        config: &InferenceConfig,
        chain: LlamaSampler,
        grammar: Option<LlamaSampler>,
    ) -> Self {
        Self {
            chain,
            grammar,
            resampled: 0,
            accepted: 0,
            field: grammar_field(config),
            greedy: config.temperature <= 0.0,
            top_k: config.top_k as usize,
            min_p: config.min_p,
            penalty: config.repetition_penalty,
            recent: VecDeque::with_capacity(PENALTY_WINDOW + 1),
            search: None,
            searched: None,
            buffer: Vec::new(),
            argmax: config.temperature <= 0.0 && config.repetition_penalty == 1.0,
            adjust: Adjust::new(config),
        }
    }

    /// Feeds the prompt's last tokens to the chain's repetition penalty.
    pub(super) fn accept_prompt(&mut self, tokens: &[LlamaToken]) {
        let tail = &tokens[tokens.len().saturating_sub(PENALTY_WINDOW)..];
        self.chain.accept_many(tail);
        for &token in tail {
            self.remember(token);
        }
    }

    /// Keeps `token` in the window the repetition penalty looks at.
    fn remember(&mut self, token: LlamaToken) {
        if self.penalty != 1.0 {
            if self.recent.len() == PENALTY_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(token);
        }
    }

    /// Whether no grammar constrains the choice.
    pub(super) fn is_plain(&self) -> bool {
        self.grammar.is_none()
    }

    /// Chooses a token from `logits` (call [`accept`](Self::accept) with
    /// it next). With a grammar, the chain chooses first and the grammar
    /// only checks that one token, as llama.cpp's own sampler does; only
    /// when it is refused does the grammar look further, and then not at
    /// the whole vocabulary at once (see [`resume`](Self::resume)), which
    /// may take more than one call: [`Choice::Later`].
    pub(super) fn choose(&mut self, logits: &[f32]) -> Result<Choice, GeniusError> {
        let Some(mut adjust) = self.adjust.take() else {
            return self.choose_from(logits);
        };
        adjust.apply(logits);
        let choice = self.choose_from(&adjust.logits);
        self.adjust = Some(adjust);
        choice
    }

    fn choose_from(&mut self, logits: &[f32]) -> Result<Choice, GeniusError> {
        if self.argmax && self.is_plain() {
            // What the greedy sampler picks (the first of equal maxima),
            // without building the candidate list of the whole vocabulary.
            return first_max(logits)
                .map(Choice::Token)
                .ok_or_else(|| GeniusError::engine("the model gave no logits"));
        }
        let mut candidates = self.candidates(logits);
        candidates.apply_sampler(&mut self.chain);
        let token = selected(&candidates);
        self.buffer = candidates.data;
        let token = token?;
        if !self.is_plain() && self.allowed(&[token]).is_empty() {
            self.resampled += 1;
            self.search = Some(Search {
                logits: logits.to_vec(),
                order: (0..logits.len() as u32).collect(),
                checked: 0,
                round: FIRST_ROUND,
                allowed: Vec::new(),
            });
            return self.resume();
        }
        Ok(Choice::Token(token))
    }

    /// Goes on choosing among the tokens the grammar allows. A grammar's
    /// cost is the number of its open alternatives times the tokens it
    /// checks, so checking a whole vocabulary (150,000 tokens and more)
    /// under a grammar of a thousand alternatives takes a second. Instead
    /// the likeliest tokens are checked first, in growing rounds (64, 512,
    /// 4096, ...), until the allowed ones found must hold the choice: for
    /// greedy decoding, any allowed token (the likeliest of them wins, and
    /// every unchecked token is less likely); for sampling, `top_k` of
    /// them, or a best allowed token so far above everything unchecked
    /// that the rest could never be drawn (`min_p` would drop them, or
    /// they are 20 logits down). The chain then chooses among them as it
    /// would among all allowed tokens. One call checks at most
    /// [`CHECKS_PER_STEP`] tokens and answers [`Choice::Later`] if that was
    /// not enough, so that the engine's other requests take their steps
    /// in between.
    pub(super) fn resume(&mut self) -> Result<Choice, GeniusError> {
        let Some(mut search) = self.search.take() else {
            return Err(GeniusError::engine("no choice to resume"));
        };
        let mut budget = CHECKS_PER_STEP;
        loop {
            let Search {
                logits,
                order,
                checked,
                round,
                ..
            } = &mut search;
            // The next likeliest tokens, likeliest first.
            let rest = &mut order[*checked..];
            let take = (*round).min(budget).min(rest.len());
            if take < rest.len() {
                rest.select_nth_unstable_by(take, |a, b| {
                    logits[*b as usize].total_cmp(&logits[*a as usize])
                });
            }
            rest[..take]
                .sort_unstable_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
            let batch: Vec<LlamaToken> = rest[..take]
                .iter()
                .map(|&id| LlamaToken(id as i32))
                .collect();
            *checked += take;
            if take == *round {
                *round = round.saturating_mul(ROUND_GROWTH);
            } else {
                *round -= take;
            }
            budget -= take;
            let exhausted = *checked == order.len();
            // Every unchecked token's logit is at most this.
            let boundary = if exhausted {
                f32::NEG_INFINITY
            } else {
                logits[order[*checked - 1] as usize]
            };
            let allowed = self.allowed(&batch);
            search.allowed.extend(allowed);
            if exhausted || self.holds_the_choice(&search.allowed, &search.logits, boundary) {
                break;
            }
            if budget == 0 {
                self.search = Some(search);
                return Ok(Choice::Later);
            }
        }
        if search.allowed.is_empty() {
            return Err(GeniusError::invalid_request(
                self.field,
                format!(
                    "no token of this model can continue the required grammar here (after {} generated tokens): it asks for text no token spells, such as a control character",
                    self.accepted
                ),
            ));
        }
        let logits = &search.logits;
        let mut candidates = LlamaTokenDataArray::from_iter(
            search
                .allowed
                .iter()
                .map(|&token| LlamaTokenData::new(token, logits[token.0 as usize], 0.0)),
            false,
        );
        candidates.apply_sampler(&mut self.chain);
        let token = selected(&candidates)?;
        self.searched = Some(search.logits);
        Ok(Choice::Token(token))
    }

    /// The logits a choice that took [`Choice::Later`] was made from, once
    /// it is made (for its log-probabilities).
    pub(super) fn take_searched_logits(&mut self) -> Option<Vec<f32>> {
        self.searched.take()
    }

    /// Whether the allowed tokens found so far must hold the chain's
    /// choice, when no unchecked token's logit is above `boundary`.
    fn holds_the_choice(&self, allowed: &[LlamaToken], logits: &[f32], boundary: f32) -> bool {
        // A repetition penalty only ever lowers a logit, so the best
        // allowed token is judged by its penalised logit.
        let Some(best) = allowed
            .iter()
            .map(|token| self.penalised(*token, logits[token.0 as usize]))
            .max_by(f32::total_cmp)
        else {
            return false;
        };
        if self.greedy {
            return best >= boundary;
        }
        if self.top_k > 0 && allowed.len() >= self.top_k {
            // The top_k likeliest allowed tokens are all among them (up to
            // penalties, which only push checked tokens down).
            return best >= boundary;
        }
        let negligible = if self.min_p > 0.0 {
            -self.min_p.ln()
        } else {
            NEGLIGIBLE
        };
        best - boundary >= negligible
    }

    /// `logit` after the chain's repetition penalty, as llama.cpp applies
    /// it to a token seen in the recent window.
    fn penalised(&self, token: LlamaToken, logit: f32) -> f32 {
        if self.penalty == 1.0 || !self.recent.contains(&token) {
            logit
        } else if logit > 0.0 {
            logit / self.penalty
        } else {
            logit * self.penalty
        }
    }

    /// Every token with its logit, in the reused buffer.
    fn candidates(&mut self, logits: &[f32]) -> LlamaTokenDataArray {
        let mut data = std::mem::take(&mut self.buffer);
        data.clear();
        data.extend(
            logits
                .iter()
                .enumerate()
                .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)),
        );
        LlamaTokenDataArray::new(data, false)
    }

    /// Takes `token` as chosen: the grammar and the chain move on.
    pub(super) fn accept(&mut self, token: LlamaToken) -> Result<(), GeniusError> {
        if let Some(grammar) = &mut self.grammar {
            grammar.try_accept(token).map_err(|err| {
                GeniusError::engine_from("the grammar refused the token it allowed", err)
            })?;
        }
        self.chain.accept(token);
        self.remember(token);
        if let Some(adjust) = &mut self.adjust {
            *adjust.counts.entry(token).or_insert(0) += 1;
        }
        self.accepted += 1;
        Ok(())
    }

    /// Those of `tokens` the grammar allows next (all without a grammar),
    /// in the same order.
    pub(super) fn allowed(&mut self, tokens: &[LlamaToken]) -> Vec<LlamaToken> {
        let Some(grammar) = &mut self.grammar else {
            return tokens.to_vec();
        };
        let mut probe = LlamaTokenDataArray::from_iter(
            tokens
                .iter()
                .map(|&token| LlamaTokenData::new(token, 0.0, 0.0)),
            false,
        );
        probe.apply_sampler(grammar);
        probe
            .data
            .iter()
            .filter(|data| data.logit() != f32::NEG_INFINITY)
            .map(LlamaTokenData::id)
            .collect()
    }
}

/// The outcome of [`Chooser::choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Choice {
    /// This token.
    Token(LlamaToken),
    /// Not yet: call [`Chooser::resume`] in a later step.
    Later,
}

/// A grammar's search for an allowed token, kept between steps.
struct Search {
    /// The logits it chooses from.
    logits: Vec<f32>,
    /// Every token id; `order[..checked]` are those checked, likeliest
    /// first.
    order: Vec<u32>,
    checked: usize,
    /// How many more to check before the next test of whether the allowed
    /// ones found hold the choice.
    round: usize,
    /// Those checked that the grammar allows, likeliest first.
    allowed: Vec<LlamaToken>,
}

/// How many of the likeliest tokens the grammar checks first, when it
/// refused the chain's choice, and how much each further round grows.
const FIRST_ROUND: usize = 64;
const ROUND_GROWTH: usize = 8;

/// The most tokens a grammar checks in one engine step; a choice that
/// needs more goes on in the next step. Checking 16,384 tokens under a
/// grammar of 2,000 alternatives takes about 0.2 s on one 2-core machine.
const CHECKS_PER_STEP: usize = 16_384;

/// How far below the best allowed token (in logits) unchecked tokens may
/// be ignored when sampling without `min_p`: e^-20 is 2e-9 of its
/// probability, less than a 150,000-token vocabulary could add up to.
const NEGLIGIBLE: f32 = 20.0;

/// The token with the largest logit; the first one on a tie.
fn first_max(logits: &[f32]) -> Option<LlamaToken> {
    // The largest logit first, over lanes the compiler keeps in vector
    // registers (a vocabulary of 262,144 logits is a megabyte, read on the
    // engine thread between two decodes of every answer), then the first
    // place it is at. NaNs are never the largest.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &logit) in lanes.iter_mut().zip(chunk) {
            *lane = if logit > *lane { logit } else { *lane };
        }
    }
    let max =
        lanes.iter().chain(tail).fold(
            f32::NEG_INFINITY,
            |max, &logit| if logit > max { logit } else { max },
        );
    if logits.is_empty() {
        return None;
    }
    let id = logits.iter().position(|&logit| logit == max).unwrap_or(0);
    Some(LlamaToken(id as i32))
}

fn selected(candidates: &LlamaTokenDataArray) -> Result<LlamaToken, GeniusError> {
    candidates
        .selected_token()
        .ok_or_else(|| GeniusError::engine("the sampler selected no token"))
}

/// How many of the likeliest tokens are checked against a grammar when
/// log-probabilities are reported under one.
const GRAMMAR_PROBE: usize = 64;

/// The log-probability of `chosen` under `logits`, and the `top` most
/// likely tokens, as the model's softmax gives them (before any sampler).
/// Under a grammar, the alternatives are the most likely tokens the
/// grammar allowed at this place (among the 64 likeliest), so they show
/// the choice that was really made.
pub(super) fn token_logprobs(
    model: &LlamaModel,
    logits: &[f32],
    chosen: LlamaToken,
    top: usize,
    chooser: &mut Chooser,
) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_total = f64::from(max) + sum.ln();
    let logprob = |id: usize| (f64::from(logits[id]) - log_total) as f32;
    let wanted = if top == 0 {
        0
    } else if chooser.is_plain() {
        top
    } else {
        GRAMMAR_PROBE.max(top)
    };
    let mut best = largest(logits, wanted);
    if !chooser.is_plain() && top > 0 {
        let tokens: Vec<LlamaToken> = best.iter().map(|&id| LlamaToken(id as i32)).collect();
        best = chooser
            .allowed(&tokens)
            .into_iter()
            .map(|token| token.0 as usize)
            .take(top)
            .collect();
    }
    let bytes_of = |token: LlamaToken| {
        let mut bytes = Vec::new();
        model
            .vocab()
            .token_to_piece_into(token, &mut bytes, false, None);
        bytes
    };
    let chosen_bytes = bytes_of(chosen);
    TokenLogprobs {
        id: u32::try_from(chosen.0).unwrap_or(0),
        token: String::from_utf8_lossy(&chosen_bytes).into_owned(),
        logprob: usize::try_from(chosen.0).map_or(f32::NEG_INFINITY, logprob),
        bytes: chosen_bytes,
        top_logprobs: best
            .into_iter()
            .map(|id| {
                let bytes = bytes_of(LlamaToken(id as i32));
                TopLogprob {
                    id: id as u32,
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    bytes,
                    logprob: logprob(id),
                }
            })
            .collect(),
    }
}

/// The ids of the `count` largest logits, largest first, in one pass:
/// `best` stays sorted and never grows past `count`.
fn largest(logits: &[f32], count: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(count + 1);
    if count == 0 {
        return best;
    }
    for (id, &logit) in logits.iter().enumerate() {
        if best.len() == count && logit <= logits[best[count - 1]] {
            continue;
        }
        let at = best.partition_point(|&other| logits[other] >= logit);
        best.insert(at, id);
        best.truncate(count);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_equal_maxima_wins_wherever_it_is() {
        let id = |logits: &[f32]| first_max(logits).map(|token| token.0);
        assert_eq!(id(&[]), None);
        assert_eq!(id(&[-3.0]), Some(0));
        for len in [5, 16, 17, 33, 1000] {
            for at in [0, len / 2, len - 1] {
                let mut logits: Vec<f32> = (0..len).map(|i| -((i % 7) as f32)).collect();
                logits[at] = 9.0;
                if at + 3 < len {
                    logits[at + 3] = 9.0;
                }
                assert_eq!(id(&logits), Some(at as i32), "len {len}, at {at}");
            }
        }
        assert_eq!(id(&[f32::NAN, -1.0, 2.0, f32::NAN, 2.0]), Some(2));
        assert_eq!(id(&[f32::NEG_INFINITY; 20]), Some(0));
    }
}
