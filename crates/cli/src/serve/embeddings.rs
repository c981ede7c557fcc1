//! `/v1/embeddings`.

use serde::Serialize;

use super::*;

pub(super) async fn embeddings(
    State(state): State<Arc<AppState>>,
    Json(request): Json<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    let base64 = request.base64()?;
    let model = state.model(&request.model)?;
    let embeddings = state
        .genius
        .embeddings(request.embed().with_model(model.name))
        .await
        .map_err(|err| {
            // The library calls the request's `input` its `inputs`.
            ApiError::from_report(&err).map_param(|param| match param {
                Some(param) => match param.strip_prefix("inputs") {
                    Some(rest) => format!("input{rest}"),
                    None => param,
                },
                None => "input".into(),
            })
        })?;
    let data = embeddings
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingObject {
            object: "embedding",
            index,
            embedding: if base64 {
                Vector::Base64(openai::base64_f32(vector))
            } else {
                // As f64, the width JSON numbers are read at.
                Vector::Floats(vector.iter().map(|&x| f64::from(x)).collect())
            },
        })
        .collect();
    let tokens: usize = embeddings.tokens.iter().sum();
    Ok(axum::Json(EmbeddingList {
        object: "list",
        data,
        model: model.id,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response())
}

/// The answer of `/v1/embeddings`.
#[derive(Debug, Serialize)]
struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

/// A vector as numbers, or as the base64 of its little-endian f32s.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Vector {
    Floats(Vec<f64>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}
