//! Choosing tokens: llama.cpp's sampler chain, a grammar that holds the
//! answer to a JSON schema, a tool-call syntax or GBNF, and the
//! log-probabilities reported to the application.

use std::cell::RefCell;

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
        llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|err| {
            let why = take_last_error().unwrap_or_else(|| err.to_string());
            GeniusError::invalid_request(
                what,
                format!("the JSON-schema converter cannot handle this schema: {why}"),
            )
        })
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
    /// The candidate list, one entry per vocabulary token, kept between
    /// tokens so that choosing allocates nothing (it is megabytes).
    buffer: Vec<LlamaTokenData>,
    /// Whether the chain only takes the likeliest token (greedy, no
    /// penalty), so that a scan of the logits can stand in for it.
    argmax: bool,
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
            buffer: Vec::new(),
            argmax: config.temperature <= 0.0 && config.repetition_penalty == 1.0,
        }
    }

    /// Feeds the prompt's last tokens to the chain's repetition penalty.
    pub(super) fn accept_prompt(&mut self, tokens: &[LlamaToken]) {
        self.chain
            .accept_many(&tokens[tokens.len().saturating_sub(PENALTY_WINDOW)..]);
    }

    /// Whether no grammar constrains the choice.
    pub(super) fn is_plain(&self) -> bool {
        self.grammar.is_none()
    }

    /// Chooses a token from `logits` (call [`accept`](Self::accept) with
    /// it next). With a grammar, the chain chooses first and the grammar
    /// only checks that one token; only when it is refused is the grammar
    /// applied to the whole vocabulary and the choice made again, as
    /// llama.cpp's own sampler does, because checking every token at every
    /// step is what makes grammars slow.
    pub(super) fn choose(&mut self, logits: &[f32]) -> Result<LlamaToken, GeniusError> {
        if self.argmax && self.is_plain() {
            // What the greedy sampler picks (the first of equal maxima),
            // without building the candidate list of the whole vocabulary.
            return first_max(logits)
                .ok_or_else(|| GeniusError::engine("the model gave no logits"));
        }
        let mut candidates = self.candidates(logits);
        candidates.apply_sampler(&mut self.chain);
        let token = selected(&candidates);
        self.buffer = candidates.data;
        let token = token?;
        if !self.is_plain() && self.allowed(&[token]).is_empty() {
            self.resampled += 1;
            let mut candidates = self.candidates(logits);
            let grammar = self.grammar.as_mut().expect("only a grammar refuses");
            candidates.apply_sampler(grammar);
            candidates.apply_sampler(&mut self.chain);
            let token = selected(&candidates);
            self.buffer = candidates.data;
            return token;
        }
        Ok(token)
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

/// The token with the largest logit; the first one on a tie.
fn first_max(logits: &[f32]) -> Option<LlamaToken> {
    let mut best: Option<(usize, f32)> = None;
    for (id, &logit) in logits.iter().enumerate() {
        if best.is_none_or(|(_, top)| logit > top) {
            best = Some((id, logit));
        }
    }
    best.map(|(id, _)| LlamaToken(id as i32))
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
        token: String::from_utf8_lossy(&chosen_bytes).into_owned(),
        logprob: usize::try_from(chosen.0).map_or(f32::NEG_INFINITY, logprob),
        bytes: chosen_bytes,
        top_logprobs: best
            .into_iter()
            .map(|id| {
                let bytes = bytes_of(LlamaToken(id as i32));
                TopLogprob {
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
