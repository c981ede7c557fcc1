//! Errors in the OpenAI API's shape, and how library errors become them.

use super::*;

/// An HTTP error answered with the OpenAI error body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind,
                param: None,
                code: None,
            },
        }
    }

    /// A failure of the server itself (a poisoned lock): the client
    /// learns only that.
    pub(super) fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the server could not answer this request; its log says why",
        )
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub(super) fn param(mut self, param: impl Into<String>) -> Self {
        self.detail.param = Some(param.into());
        self
    }

    /// Names the field of the request the error is about, given the name
    /// the library used for it (`None` when it named none).
    pub(super) fn map_param(mut self, map: impl FnOnce(Option<String>) -> String) -> Self {
        self.detail.param = Some(map(self.detail.param.take()));
        self
    }

    pub(super) fn code(mut self, code: &'static str) -> Self {
        self.detail.code = Some(code);
        self
    }

    pub(super) fn model_not_found(model: &str, known: &[Served]) -> Self {
        let known = known
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let known = if known.is_empty() {
            "none yet: `genius pull <model>` first".to_owned()
        } else {
            known
        };
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{model}` does not exist on this server (served: {known})"),
        )
        .param("model")
        .code("model_not_found")
    }

    /// The HTTP answer to a library error.
    pub(super) fn from_report(report: &ErrorReport) -> Self {
        let (status, kind, code) = match report.kind {
            ErrorKind::InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            ErrorKind::ContextExceeded => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            ErrorKind::ModelNotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            ErrorKind::NoModelLoaded | ErrorKind::ShutDown => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", None)
            }
            ErrorKind::Asset => (StatusCode::BAD_GATEWAY, "server_error", None),
            ErrorKind::ModelTooLarge => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("model_too_large"),
            ),
            ErrorKind::NoRoom => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("no_room"),
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        // A client learns what it did wrong, never where the server keeps
        // its files or what failed inside it: the log has those.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR
            || status == StatusCode::BAD_GATEWAY
        {
            let reference = request_id();
            log::error!("{status} (ref {reference}): {}", report.message);
            format!("the server could not answer this request; its log says why (ref {reference})")
        } else {
            without_paths(&report.message)
        };
        let mut error = Self::new(status, kind, message);
        error.detail.code = code;
        error.detail.param = match report.error() {
            Some(GeniusError::InvalidConfig { field, .. }) => Some((*field).to_owned()),
            Some(GeniusError::InvalidRequest { what, .. }) => Some(what.clone()),
            _ => None,
        };
        error
    }

    pub(super) fn body(self) -> ErrorBody {
        ErrorBody { error: self.detail }
    }
}

impl From<Unsupported> for ApiError {
    fn from(unsupported: Unsupported) -> Self {
        Self::invalid(unsupported.message).param(unsupported.param)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            log::warn!("{} {}", self.status, self.detail.message);
        } else {
            log::debug!("{} {}", self.status, self.detail.message);
        }
        let status = self.status;
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

pub(super) async fn method_not_allowed(method: Method, request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", request.uri().path()),
    )
}

pub(super) async fn not_found(method: Method, request: Request) -> ApiError {
    let path = request.uri().path().to_owned();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no such endpoint: {method} {path}"),
    )
    .code("unknown_url")
}

/// `message` with every absolute file path cut to its file name.
pub(super) fn without_paths(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find('/') {
        let before = &rest[..at];
        let starts_path = before
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || matches!(c, '`' | '\'' | '"' | '(' | '='));
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '`' | '\'' | '"' | ')' | ',' | ';'))
            .map_or(rest.len(), |n| at + n);
        let token = &rest[at..end];
        out.push_str(before);
        if starts_path && token.len() > 1 && token[1..].contains('/') {
            let token = token.trim_end_matches(['.', ':']);
            let name = token.rsplit('/').next().unwrap_or("");
            out.push_str(name);
            out.push_str(&rest[at + token.len()..end]);
        } else {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// An error response in another API's shape: its message (the OpenAI-shaped
/// body's, or the body itself) and status given to `shape`, which writes the
/// new body. Used by the Ollama and Anthropic routes, whose clients read
/// their own shape from every error, the gate's included.
pub(super) async fn reshape(
    response: Response,
    shape: impl FnOnce(StatusCode, String) -> Value,
) -> Response {
    let (mut parts, body) = response.into_parts();
    let message = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(bytes) => serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
        Err(_) => "the server failed".to_owned(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    let (_, body) = axum::Json(shape(parts.status, message))
        .into_response()
        .into_parts();
    Response::from_parts(parts, body)
}
