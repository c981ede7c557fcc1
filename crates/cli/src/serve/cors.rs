//! Cross-origin requests from the web pages `--cors-origin` names.
//!
//! Off by default: no response says a page may read it, and a page's
//! preflight is refused, so a browser lets no other site call the
//! server (with the keyless server's Host and content-type checks, not
//! even blindly). An allowed origin has its preflight answered and its
//! requests' responses marked readable for it (the origin is echoed, with
//! `Vary: Origin`, so that no cache hands one origin's grant to another).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// How long a browser may keep a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The origins pages may call from: exact `scheme://host[:port]` values,
/// or `*` for any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CorsOrigins {
    any: bool,
    /// Pages served from this machine, on any port.
    local: bool,
    origins: Vec<String>,
}

/// One `--cors-origin` value, checked: `*`, `localhost` (any page served
/// from this machine: localhost, 127.0.0.1 or [::1], on any port), or an
/// origin as a browser sends it (lower-cased, without a trailing `/`).
pub(crate) fn parse_origin(value: &str) -> Result<String, String> {
    let value = value.trim().trim_end_matches('/');
    if value == "*" || value.eq_ignore_ascii_case("localhost") {
        return Ok(value.to_ascii_lowercase());
    }
    let well_formed = value.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https")
            && !rest.is_empty()
            && !rest.contains(['/', '?', '#', ' '])
    });
    if !well_formed {
        return Err(format!(
            "`{value}` is not an origin: give it as the browser sends it, scheme://host[:port] (such as http://localhost:3000), localhost for any page of this machine, or *"
        ));
    }
    Ok(value.to_ascii_lowercase())
}

impl CorsOrigins {
    /// The origins of checked `--cors-origin` values (see [`parse_origin`]).
    pub(crate) fn new(values: Vec<String>) -> Self {
        Self {
            any: values.iter().any(|value| value == "*"),
            local: values.iter().any(|value| value == "localhost"),
            origins: values
                .into_iter()
                .filter(|value| value != "*" && value != "localhost")
                .collect(),
        }
    }

    /// Whether any page may call.
    pub(crate) fn any(&self) -> bool {
        self.any
    }

    fn allows(&self, origin: &str) -> bool {
        self.any
            || (self.local && is_local(origin))
            || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// Whether `origin` is a page of this machine: http(s) on localhost,
/// 127.0.0.1 or [::1], any port.
fn is_local(origin: &str) -> bool {
    let Some((scheme, host)) = origin.split_once("://") else {
        return false;
    };
    let host = match host.strip_prefix('[') {
        Some(v6) => v6
            .split(']')
            .next()
            .map(|h| format!("[{h}]"))
            .unwrap_or_default(),
        None => host.split(':').next().unwrap_or("").to_owned(),
    };
    matches!(scheme, "http" | "https")
        && matches!(
            host.to_ascii_lowercase().as_str(),
            "localhost" | "127.0.0.1" | "[::1]"
        )
}

/// Answers preflights and marks responses readable for allowed origins.
pub(super) async fn cors(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let allowed = state.cors.allows(&origin);
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                format!(
                    "the origin `{}` may not call this server from a browser (genius serve --cors-origin)",
                    origin.escape_debug()
                ),
            )
            .code("origin_not_allowed")
            .into_response();
        }
        let mut response = StatusCode::OK.into_response();
        let headers = response.headers_mut();
        grant(headers, &origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
        );
        let asked = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE),
        );
        return response;
    }
    let mut response = next.run(request).await;
    if allowed {
        grant(response.headers_mut(), &origin);
    }
    response
}

/// Lets `origin` read the response.
fn grant(headers: &mut HeaderMap, origin: &str) {
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_and_matched_exactly() {
        let parse = |values: &[&str]| {
            values
                .iter()
                .map(|value| parse_origin(value))
                .collect::<Result<Vec<_>, _>>()
                .map(CorsOrigins::new)
        };
        let allowed = parse(&["http://localhost:3000/"]).unwrap();
        assert!(allowed.allows("http://localhost:3000"));
        assert!(allowed.allows("HTTP://LOCALHOST:3000"));
        assert!(!allowed.allows("http://localhost:3001"));
        assert!(!allowed.allows("http://localhost:3000.evil.example"));
        assert!(parse(&["*"]).unwrap().allows("https://a.example"));
        assert!(!parse(&[]).unwrap().allows("http://localhost:3000"));
        let local = parse(&["localhost"]).unwrap();
        for origin in [
            "http://localhost",
            "http://localhost:8080",
            "http://127.0.0.1:3000",
            "http://[::1]:3000",
        ] {
            assert!(local.allows(origin), "{origin}");
        }
        for origin in [
            "http://localhost.evil.com",
            "http://notlocalhost",
            "http://evil.com",
            "http://127.0.0.1.nip.io",
        ] {
            assert!(!local.allows(origin), "{origin}");
        }
        for bad in ["localhost:3000", "http://", "ftp://x", "http://a/b", "null"] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
    }
}
