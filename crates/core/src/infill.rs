//! Fill-in-the-middle: the code between a prefix and a suffix, as an
//! editor asks for it at the cursor.

use serde::{Deserialize, Serialize};

/// A request for the text that goes between `prefix` and `suffix` (code
/// completion at a cursor), in the model's own fill-in-the-middle layout:
/// with its repository markup and the `extra` files first where the model
/// has those tokens, else its prefix, suffix and middle tokens alone. A
/// model without fill-in-the-middle tokens refuses it, saying so.
///
/// The answer ends where the model ends the middle, and never holds its
/// markup; [`InferenceConfig::min_indent`](crate::InferenceConfig::min_indent)
/// and [`time_limit`](crate::InferenceConfig::time_limit) keep completions
/// short.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Infill {
    /// The text before the cursor.
    #[serde(default)]
    pub prefix: String,
    /// The text after the cursor.
    #[serde(default)]
    pub suffix: String,
    /// Text the middle starts with, read right after the prefix
    /// (llama.cpp's `prompt`). Default empty.
    #[serde(default)]
    pub middle: String,
    /// Other files of the project, for context: they come first, so they
    /// stay cached from one completion to the next while the cursor moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<InfillFile>,
}

/// A file given as context to an [`Infill`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfillFile {
    /// Its name (a path in the project).
    #[serde(default)]
    pub name: String,
    /// Its text.
    pub text: String,
}

impl Infill {
    /// The text between `prefix` and `suffix`.
    pub fn new(prefix: impl Into<String>, suffix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
            ..Self::default()
        }
    }

    /// Adds a file of the project as context.
    pub fn with_file(mut self, name: impl Into<String>, text: impl Into<String>) -> Self {
        self.extra.push(InfillFile {
            name: name.into(),
            text: text.into(),
        });
        self
    }

    /// Sets [`middle`](Self::middle).
    pub fn with_middle(mut self, middle: impl Into<String>) -> Self {
        self.middle = middle.into();
        self
    }

    /// How many bytes of text it holds, files included.
    pub fn bytes(&self) -> usize {
        self.prefix.len()
            + self.suffix.len()
            + self.middle.len()
            + self
                .extra
                .iter()
                .map(|file| file.name.len() + file.text.len())
                .sum::<usize>()
    }
}
