//! What the server knows of the request it is answering, wherever it is in
//! the code: its id (`X-Request-Id`, the client's or one made here) and the
//! API its route belongs to, whose shape its errors take. The outermost
//! layer sets both for the time of the request, returns the id on the
//! response, writes the request's log line and counts it.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;

use super::AppState;

/// The header that carries a request's id, both ways.
pub(super) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest id taken from a client.
const MAX_ID: usize = 128;

/// The API a route belongs to: its errors take that API's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    OpenAi,
    Ollama,
    Anthropic,
}

impl Dialect {
    /// The API of the route at `path`.
    pub(super) fn of(path: &str) -> Self {
        if path.starts_with("/api/") {
            Self::Ollama
        } else if path.starts_with("/v1/messages") {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }
}

/// The request being answered.
#[derive(Debug, Clone)]
pub(super) struct Current {
    pub(super) id: Arc<str>,
    pub(super) dialect: Dialect,
    /// Silence in a streamed answer after which a keep-alive comment goes
    /// out (`--sse-keep-alive`).
    pub(super) keep_alive: std::time::Duration,
}

tokio::task_local! {
    static CURRENT: Current;
}

/// The request this task answers, if it answers one.
pub(super) fn current() -> Option<Current> {
    CURRENT.try_with(Current::clone).ok()
}

/// The id of the request this task answers ("-" outside one).
pub(super) fn id() -> Arc<str> {
    current().map_or_else(|| Arc::from("-"), |current| current.id)
}

/// The id a client sent, if it is one to keep: at most 128 characters,
/// none of them a space, a control or anything but ASCII letters, digits
/// and `-._:/+=@`, so that it can go into a log line and a header as is.
fn given_id(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let fits = !text.is_empty()
        && text.len() <= MAX_ID
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:/+=@".contains(&b));
    fits.then_some(text)
}

/// An id for a request that came without one.
fn made_id() -> Arc<str> {
    Arc::from(format!("req-{}", super::unique_id()))
}

/// The outermost layer: gives the request its id and API for its
/// duration, returns the id in `X-Request-Id`, counts the request by
/// route and status, and writes one log line for it: id, method, path,
/// status and the time to the response's head (for a stream, to its first
/// token).
pub(super) async fn layer(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let id: Arc<str> = match request.headers().get(&REQUEST_ID).and_then(given_id) {
        Some(given) => Arc::from(given),
        None => made_id(),
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|matched| matched.as_str().to_owned());
    let current = Current {
        id: id.clone(),
        dialect: Dialect::of(&path),
        keep_alive: state.settings.sse_keep_alive,
    };
    let started = Instant::now();
    let mut response = CURRENT.scope(current, next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    // Routes only, never the raw path: a client must not be able to grow
    // the set of series by asking for paths that do not exist.
    state.http.observe(
        route.as_deref().unwrap_or("(none)"),
        &method,
        status,
        elapsed,
    );
    let ms = elapsed.as_secs_f64() * 1000.0;
    if path == "/health" || path == "/metrics" {
        log::debug!("[{id}] {method} {path} {status} {ms:.1} ms");
    } else {
        log::info!("[{id}] {method} {path} {status} {ms:.1} ms");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_is_kept_only_when_it_is_short_and_plain() {
        let keep = |text: &str| given_id(&HeaderValue::from_str(text).unwrap()).is_some();
        assert!(keep("abc-123_x.y:z/1+2=3@host"));
        assert!(keep(&"a".repeat(128)));
        assert!(!keep(&"a".repeat(129)));
        assert!(!keep(""));
        assert!(!keep("two words"));
        assert!(!keep("quote\"d"));
        assert!(!keep("brace{"));
    }

    #[test]
    fn ids_made_here_differ() {
        assert_ne!(made_id(), made_id());
    }

    #[test]
    fn each_route_belongs_to_its_api() {
        assert_eq!(Dialect::of("/api/chat"), Dialect::Ollama);
        assert_eq!(Dialect::of("/v1/messages"), Dialect::Anthropic);
        assert_eq!(Dialect::of("/v1/messages/count_tokens"), Dialect::Anthropic);
        assert_eq!(Dialect::of("/v1/chat/completions"), Dialect::OpenAi);
        assert_eq!(Dialect::of("/health"), Dialect::OpenAi);
    }
}
