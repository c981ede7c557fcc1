//! Errors in the OpenAI API's shape, and how library errors become them.

use serde::Serialize;

use super::context::{self, Dialect};
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
            ErrorKind::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("queue_full"),
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        // A client learns what it did wrong, never where the server keeps
        // its files or what failed inside it: the log has those.
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR
            || status == StatusCode::BAD_GATEWAY
        {
            let reference = context::id();
            log::error!("[{reference}] {status}: {}", report.message);
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

    /// The OpenAI-shaped body, for an error inside a stream.
    pub(super) fn body(self) -> ErrorBody {
        ErrorBody {
            error: self.detail,
            request_id: Some(context::id().to_string()),
        }
    }
}

impl From<Unsupported> for ApiError {
    fn from(unsupported: Unsupported) -> Self {
        Self::invalid(unsupported.message).param(unsupported.param)
    }
}

impl IntoResponse for ApiError {
    /// The error in the shape of the API the request's route belongs to,
    /// with the request's id; a 503 says when to come back.
    fn into_response(self) -> Response {
        let current = context::current();
        let id = current.as_ref().map(|c| c.id.clone());
        let dialect = current.map_or(Dialect::OpenAi, |c| c.dialect);
        let request_id = id.as_deref().unwrap_or("-");
        if self.status.is_server_error() {
            log::warn!("[{request_id}] {} {}", self.status, self.detail.message);
        } else {
            log::debug!("[{request_id}] {} {}", self.status, self.detail.message);
        }
        let status = self.status;
        let request_id = id.map(|id| id.to_string());
        let mut response = match dialect {
            Dialect::OpenAi => (
                status,
                axum::Json(ErrorBody {
                    error: self.detail,
                    request_id,
                }),
            )
                .into_response(),
            Dialect::Ollama => (
                status,
                axum::Json(OllamaError {
                    error: self.detail.message,
                    request_id,
                }),
            )
                .into_response(),
            Dialect::Anthropic => (
                status,
                axum::Json(AnthropicError {
                    kind: "error",
                    error: AnthropicDetail {
                        kind: anthropic_kind(status),
                        message: self.detail.message,
                    },
                    request_id,
                }),
            )
                .into_response(),
        };
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
        }
        response
    }
}

/// Seconds a client refused with a 503 is asked to wait (`Retry-After`).
pub(super) const RETRY_AFTER: &str = "1";

/// Ollama's error body.
#[derive(Debug, Serialize)]
struct OllamaError {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

/// Anthropic's error body.
#[derive(Debug, Serialize)]
pub(super) struct AnthropicError {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) error: AnthropicDetail,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) request_id: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct AnthropicDetail {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) message: String,
}

/// The `type` Anthropic gives an error of this status.
fn anthropic_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
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
