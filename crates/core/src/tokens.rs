//! Questions about a model's tokens and chat template, answered by its
//! engine without generating: what llama.cpp's server answers at
//! `/tokenize`, `/detokenize` and `/apply-template`.

use serde::{Deserialize, Serialize};

use crate::ChatMessage;

/// A question about a model's tokens or template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenQuery {
    /// The tokens of `content`: texts tokenized, token ids as they are,
    /// in order. `add_special` adds the model's start token (and end
    /// token, where its vocabulary adds one) around the first text, when
    /// the content starts with a text; `parse_special` reads the model's
    /// special tokens written out in a text (`<|im_start|>`) as those
    /// tokens rather than as plain text.
    Tokenize {
        /// Texts and token ids, in order.
        content: Vec<TextOrToken>,
        /// Add the model's start (and end) tokens around a leading text.
        add_special: bool,
        /// Read special tokens written out in a text as those tokens.
        parse_special: bool,
    },
    /// The bytes of these tokens, one after another, special tokens
    /// written out.
    Detokenize {
        /// The token ids.
        tokens: Vec<u32>,
    },
    /// The prompt a conversation renders to in the model's chat template,
    /// with the request's tools, ready for the model's answer.
    Render {
        /// The conversation.
        messages: Vec<ChatMessage>,
    },
}

/// A part of the content to tokenize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TextOrToken {
    /// A text, to tokenize.
    Text(String),
    /// A token id, as it is.
    Token(u32),
}

/// The answer to a [`TokenQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAnswer {
    /// Each token and its piece (the bytes it stands for; a piece may be
    /// part of a character).
    Tokens(Vec<TokenPiece>),
    /// A text: the detokenized bytes (as UTF-8, any invalid sequence
    /// replaced), or the rendered prompt.
    Text(String),
}

/// A token and the bytes it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPiece {
    /// Its id in the model's vocabulary.
    pub id: u32,
    /// Its bytes (special tokens written out).
    pub piece: Vec<u8>,
}
