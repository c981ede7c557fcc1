//! Embeddings: one vector per text, for retrieval, search and clustering.

use serde::{Deserialize, Serialize};

/// How the vectors of a text's tokens become the text's one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The average over all tokens (sentence-transformers models).
    Mean,
    /// The first token's (`[CLS]`; BERT-style classifiers, BGE).
    Cls,
    /// The last token's (decoder models trained for embeddings).
    Last,
}

/// One input to embed: a text, or the token ids of one in the model's own
/// vocabulary (as the OpenAI API accepts them), used exactly as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbedInput {
    /// A text, tokenized by the model (with its special tokens, such as
    /// an encoder's `[CLS]` and `[SEP]`).
    Text(String),
    /// Token ids, each checked against the model's vocabulary.
    Tokens(Vec<u32>),
}

impl EmbedInput {
    /// The text, if this is one.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            Self::Tokens(_) => None,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Text(text) => text.trim().is_empty(),
            Self::Tokens(ids) => ids.is_empty(),
        }
    }
}

impl From<String> for EmbedInput {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for EmbedInput {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

impl From<&String> for EmbedInput {
    fn from(text: &String) -> Self {
        Self::Text(text.clone())
    }
}

impl From<Vec<u32>> for EmbedInput {
    fn from(ids: Vec<u32>) -> Self {
        Self::Tokens(ids)
    }
}

/// Asks for the embeddings of one or more texts.
///
/// An embedding model (a GGUF that declares its pooling, such as a BERT
/// sentence encoder) uses its own pooling unless `pooling` overrides it; a
/// generative model embeds only when `pooling` is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Embed {
    /// The texts (or token ids), each embedded on its own. At least one;
    /// none empty.
    pub inputs: Vec<EmbedInput>,
    /// How token vectors are pooled. Default: the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,
    /// Scale every vector to length 1 (so a dot product is the cosine).
    /// Default `true`.
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Cut texts longer than the model's window to fit, instead of
    /// refusing the request. Default `false`.
    #[serde(default)]
    pub truncate: bool,
    /// The model to embed with (see
    /// [`InferenceConfig::model`](crate::InferenceConfig::model)). Default
    /// `None`: the model of the last `LoadModel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How long the model stays loaded once idle (see
    /// [`InferenceConfig::keep_alive`](crate::InferenceConfig::keep_alive)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<std::time::Duration>,
    /// Keep only the first this many components of each vector (then
    /// normalized, when [`normalize`](Self::normalize) is set). Only for
    /// models trained so that a vector's beginning is an embedding of its
    /// own (Matryoshka representation learning); any other model refuses
    /// it, as the cut vectors would mean little. Default `None`: the
    /// model's whole width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
}

fn yes() -> bool {
    true
}

impl Embed {
    /// Embeds `inputs` with the model's pooling, normalised, refusing
    /// texts longer than the window.
    pub fn new<I, S>(inputs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<EmbedInput>,
    {
        Self {
            inputs: inputs.into_iter().map(Into::into).collect(),
            pooling: None,
            normalize: true,
            truncate: false,
            model: None,
            keep_alive: None,
            dimensions: None,
        }
    }

    /// Sets [`dimensions`](Self::dimensions).
    pub fn with_dimensions(mut self, dimensions: usize) -> Self {
        self.dimensions = Some(dimensions);
        self
    }

    /// Checks [`dimensions`](Self::dimensions) against the model `name`,
    /// whose vectors have `width` components and which was (or was not)
    /// `trained_for_shorter` vectors.
    pub fn check_dimensions(
        &self,
        name: &str,
        width: usize,
        trained_for_shorter: bool,
    ) -> Result<(), crate::GeniusError> {
        let Some(wanted) = self.dimensions else {
            return Ok(());
        };
        let refuse = |why: String| Err(crate::GeniusError::invalid_request("dimensions", why));
        if wanted == width {
            return Ok(());
        }
        if wanted == 0 || wanted > width {
            return refuse(format!(
                "dimensions={wanted}: `{name}` makes vectors of {width} components; ask for 1 to {width}"
            ));
        }
        if !trained_for_shorter {
            return refuse(format!(
                "dimensions={wanted}: `{name}` was not trained for shorter vectors (Matryoshka embeddings), so the first {wanted} of its {width} components would not be an embedding of their own; leave dimensions out, or use a model trained for it (nomic-embed-text-v1.5, mxbai-embed-large-v1, embeddinggemma, Qwen3-Embedding, snowflake-arctic-embed v1.5/v2)"
            ));
        }
        Ok(())
    }

    /// Sets [`model`](Self::model): the texts are embedded by this model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets [`keep_alive`](Self::keep_alive).
    pub fn with_keep_alive(mut self, idle: std::time::Duration) -> Self {
        self.keep_alive = Some(idle);
        self
    }

    /// Sets [`pooling`](Self::pooling).
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = Some(pooling);
        self
    }

    /// Keeps the vectors as the model makes them, unnormalised.
    pub fn without_normalizing(mut self) -> Self {
        self.normalize = false;
        self
    }

    /// Cuts over-long texts to the window (see [`truncate`](Self::truncate)).
    pub fn truncating(mut self) -> Self {
        self.truncate = true;
        self
    }

    /// Checks what can be checked without a model: at least one input,
    /// none empty.
    pub fn validate(&self) -> Result<(), crate::GeniusError> {
        if self.inputs.is_empty() {
            return Err(crate::GeniusError::invalid_request(
                "inputs",
                "there is nothing to embed: send at least one text",
            ));
        }
        if let Some(index) = self.inputs.iter().position(EmbedInput::is_empty) {
            return Err(crate::GeniusError::invalid_request(
                format!("inputs[{index}]"),
                "the input is empty: an empty text (or token list) has no embedding",
            ));
        }
        Ok(())
    }
}

/// The answer to an [`Embed`] request: one vector per input, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// The vectors, in the order of the inputs; all of the model's width.
    pub vectors: Vec<Vec<f32>>,
    /// How many tokens each input was (after truncation).
    pub tokens: Vec<usize>,
}

impl Embeddings {
    /// The cosine similarity of two vectors (0 when either is all zeros).
    pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let (na, nb) = (norm(a), norm(b));
        if na == 0.0 || nb == 0.0 {
            0.0
        } else {
            dot / (na * nb)
        }
    }
}

/// Scales `vector` to length 1 (leaves an all-zero vector as it is).
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_are_checked_against_the_width_and_the_training() {
        let embed = Embed::new(["a"]).with_dimensions(256);
        assert!(embed.check_dimensions("m", 768, true).is_ok());
        let refused =
            |embed: &Embed, width, trained| match embed.check_dimensions("m", width, trained) {
                Err(crate::GeniusError::InvalidRequest { what, reason }) => {
                    assert_eq!(what, "dimensions");
                    reason
                }
                other => panic!("{other:?}"),
            };
        assert!(refused(&embed, 768, false).contains("not trained for shorter vectors"));
        assert!(refused(&embed, 128, true).contains("ask for 1 to 128"));
        assert!(refused(&Embed::new(["a"]).with_dimensions(0), 128, true).contains("1 to 128"));
        // The whole width is no cut: any model gives it.
        assert!(Embed::new(["a"])
            .with_dimensions(384)
            .check_dimensions("m", 384, false)
            .is_ok());
        assert!(Embed::new(["a"]).check_dimensions("m", 384, false).is_ok());
    }

    #[test]
    fn defaults_fill_in_when_deserialising() {
        let embed: Embed = serde_json::from_str(r#"{"inputs": ["a"]}"#).unwrap();
        assert_eq!(embed, Embed::new(["a"]));
        assert!(embed.normalize && !embed.truncate && embed.pooling.is_none());
        let cls: Embed = serde_json::from_str(r#"{"inputs": ["a"], "pooling": "cls"}"#).unwrap();
        assert_eq!(cls.pooling, Some(Pooling::Cls));
    }

    #[test]
    fn empty_requests_and_texts_are_refused_by_name() {
        assert!(Embed::new(Vec::<String>::new()).validate().is_err());
        let err = Embed::new(["fine", "  "]).validate().unwrap_err();
        assert!(err.to_string().contains("inputs[1]"), "{err}");
        assert!(Embed::new(["fine"]).validate().is_ok());
    }

    #[test]
    fn cosine_and_normalize_agree() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert!((Embeddings::cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert_eq!(Embeddings::cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
