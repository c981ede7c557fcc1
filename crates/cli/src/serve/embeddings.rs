//! `/v1/embeddings`.

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
    let data: Vec<Value> = embeddings
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                Value::String(openai::base64_f32(vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: usize = embeddings.tokens.iter().sum();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
