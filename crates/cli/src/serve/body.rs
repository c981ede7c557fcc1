//! The one way a handler reads its request's body: [`Json`], which takes
//! it within the size limit and the body timeout and reads it as the
//! handler's type, naming the field that does not fit. Its errors take the
//! shape of the route's API like every other error.

use axum::extract::FromRequest;

use super::*;

/// A request body, read and checked.
pub(super) struct Json<T>(pub(super) T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        read(state, &parts.headers, body).await.map(Json)
    }
}

/// Reads `body` as a `T`, up to the size limit and within the body
/// timeout.
async fn read<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let limit = state.settings.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request body is larger than {limit} bytes (genius serve --max-body-bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let timeout = state.settings.timeouts.body;
    let bytes: Bytes = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s (genius serve --body-timeout)",
                    timeout.as_secs_f64()
                ),
            )
        })?
        .map_err(|_| too_large())?;
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut json).map_err(|err| {
        let mut path = err.path().to_string();
        let mut inner = err.into_inner();
        if path.is_empty() || path == "." {
            // A field of the flattened sampling settings: serde loses
            // its path through `flatten`, so read them on their own.
            let mut again = serde_json::Deserializer::from_slice(&bytes);
            if let Err(err) = serde_path_to_error::deserialize::<_, openai::Sampling>(&mut again) {
                path = err.path().to_string();
                inner = err.into_inner();
            }
        }
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid(format!("the body is not valid JSON: {inner}"));
        }
        let message = openai::body_error(&path, &inner.to_string());
        let error = ApiError::invalid(message);
        if path.is_empty() || path == "." {
            error
        } else {
            error.param(path)
        }
    })
}
