//! `genius serve`: the OpenAI HTTP API over an [`OrchestratorHandle`].
//!
//! Every HTTP request becomes one library request with a stream of its
//! own, so concurrent clients are decoded together by the engine's
//! parallel sequences. A client that goes away drops its stream, which
//! cancels its generation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::{Stream, StreamExt};
use rusty_genius::core::manifest::{ModelState, ModelStatus};
use rusty_genius::core::protocol::{InferenceEvent, ThoughtEvent, TokenLogprobs, Usage};
use rusty_genius::core::{ErrorKind, ErrorReport, GeniusError};
use rusty_genius::facecrab::AssetAuthority;
use rusty_genius::{OrchestratorHandle, RequestStream};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

mod cors;
mod responses;

pub(crate) use cors::{parse_origin, CorsOrigins};

use crate::http::Timeouts;
use crate::openai::{
    self, ChatRequest, CompletionRequest, EmbeddingRequest, ErrorBody, ErrorDetail, Unsupported,
};

/// How `genius serve` was asked to run.
#[derive(Debug, Clone)]
pub(crate) struct ServeSettings {
    pub(crate) addr: SocketAddr,
    /// The models to serve, all loaded at start; none serves whatever the
    /// local cache holds, loading each on first use.
    pub(crate) models: Vec<String>,
    /// Other names clients may use for a served model (`--alias`).
    pub(crate) aliases: Vec<(String, String)>,
    /// Where a request naming an unknown model goes (`--default-model`).
    pub(crate) default_model: Option<String>,
    pub(crate) api_key: Option<String>,
    pub(crate) max_body_bytes: usize,
    /// Host names accepted besides `localhost` and IP addresses, when no
    /// API key is set (`--allowed-host`).
    pub(crate) allowed_hosts: Vec<String>,
    /// The web origins whose pages may call the server (`--cors-origin`).
    pub(crate) cors: CorsOrigins,
    pub(crate) timeouts: Timeouts,
}

/// A model the server answers for: the id clients send, the name the
/// Orchestrator loads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    id: String,
    name: String,
    /// Its file, when the cache says where it is.
    path: Option<std::path::PathBuf>,
}

impl Served {
    /// Whether a request naming `model` means this one.
    fn answers_to(&self, model: &str) -> bool {
        self.id == model || self.name == model
    }
}

struct AppState {
    genius: OrchestratorHandle,
    cors: CorsOrigins,
    /// Answers of the Responses API, for `previous_response_id` and `GET`.
    responses: std::sync::Mutex<responses::Store>,
    settings: ServeSettings,
    authority: AssetAuthority,
    /// The models `--model` named: the only ones served. Empty serves the
    /// cache.
    fixed: Vec<Served>,
    /// Whether the start-up loads have finished (successfully or not).
    ready: std::sync::atomic::AtomicBool,
    /// The start-up models that failed to load.
    failed: std::sync::Mutex<Vec<String>>,
    /// Whether each model file embeds, as its header says (read once).
    embeds: std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, bool>>,
    created: u64,
}

/// Serves until Ctrl-C or SIGTERM; then lets the open responses finish
/// and shuts the Orchestrator down.
pub(crate) async fn serve(
    genius: OrchestratorHandle,
    authority: AssetAuthority,
    settings: ServeSettings,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", settings.addr))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    let fixed: Vec<Served> = settings
        .models
        .iter()
        .map(|name| Served {
            id: model_id(name),
            name: name.clone(),
            path: None,
        })
        .collect();
    let state = Arc::new(AppState {
        genius: genius.clone(),
        cors: settings.cors.clone(),
        responses: std::sync::Mutex::new(responses::Store::default()),
        settings: settings.clone(),
        authority,
        fixed: fixed.clone(),
        ready: std::sync::atomic::AtomicBool::new(fixed.is_empty()),
        failed: std::sync::Mutex::new(Vec::new()),
        embeds: std::sync::Mutex::new(std::collections::HashMap::new()),
        created: unix_now(),
    });
    if !fixed.is_empty() {
        // Load in the background so that /health can say "loading"
        // meanwhile; requests for a model wait for its load.
        let state = state.clone();
        tokio::spawn(async move {
            let loads = fixed.iter().map(|model| {
                let state = state.clone();
                async move {
                    match state.genius.load(&model.name).await {
                        Ok(info) => log::info!(
                            "model `{}` loaded: context {} tokens per request, {} at once",
                            model.id,
                            info.context_size,
                            info.parallel
                        ),
                        Err(err) => {
                            log::error!("cannot load `{}`: {err}", model.name);
                            if let Ok(mut failed) = state.failed.lock() {
                                failed.push(model.id.clone());
                            }
                        }
                    }
                }
            });
            futures::future::join_all(loads).await;
            state
                .ready
                .store(true, std::sync::atomic::Ordering::Release);
        });
    }
    let timeouts = settings.timeouts;
    let app = router(state);
    log::info!("listening on http://{local}");
    // The one line scripts wait for (the port may have been 0).
    eprintln!("genius: serving the OpenAI API on http://{local}/v1");
    crate::http::serve(listener, app, timeouts, shutdown_signal()).await;
    genius.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    log::info!("shutting down: finishing the open responses");
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/models", get(list_models))
        .route("/models/load", post(load_model))
        .route("/models/unload", post(unload_model))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cors::cors,
        ))
        .layer(axum::middleware::from_fn(access_log))
        .with_state(state)
}

/// What every request passes before its handler. With an API key, every
/// endpoint but `/health` needs it (here, so that no handler can forget
/// to ask). Without one, the
/// server trusts whoever can reach it, so it makes sure a web page cannot
/// be that someone: the `Host` must be `localhost`, an IP address or a
/// name given with `--allowed-host` (a DNS-rebinding page sends its own
/// domain), and a POST must say it is JSON (a page can send `text/plain`
/// across origins without asking; `application/json` needs a CORS
/// preflight, which this server grants only to `--cors-origin` origins).
/// With a key, a page cannot authenticate unless given it, and neither
/// check applies.
async fn gate(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let checked = if state.settings.api_key.is_none() {
        state.check_origin(&request)
    } else if request.uri().path() == "/health" {
        Ok(())
    } else {
        state.authorize(request.headers())
    };
    if let Err(refused) = checked {
        return refused.into_response();
    }
    next.run(request).await
}

/// One log line per request: method, path, status and the time to the
/// response's head (for a stream, to its first token).
async fn access_log(request: Request, next: axum::middleware::Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    if path == "/health" {
        log::debug!("{method} {path} {status} {elapsed:.1} ms");
    } else {
        log::info!("{method} {path} {status} {elapsed:.1} ms");
    }
    response
}

// ---- errors -------------------------------------------------------------

/// An HTTP error answered with the OpenAI error body.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
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
    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the server could not answer this request; its log says why",
        )
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn param(mut self, param: impl Into<String>) -> Self {
        self.detail.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.detail.code = Some(code);
        self
    }

    fn model_not_found(model: &str, known: &[Served]) -> Self {
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
    fn from_report(report: &ErrorReport) -> Self {
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

    fn body(self) -> ErrorBody {
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

async fn method_not_allowed(method: Method, request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", request.uri().path()),
    )
}

async fn not_found(method: Method, request: Request) -> ApiError {
    let path = request.uri().path().to_owned();
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no such endpoint: {method} {path}"),
    )
    .code("unknown_url")
}

// ---- request checks -----------------------------------------------------

impl AppState {
    /// The keyless server's checks of where a request comes from.
    fn check_origin(&self, request: &Request) -> Result<(), ApiError> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
        if let Some(host) = host {
            if !host_allowed(&host, &self.settings.allowed_hosts) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "invalid_request_error",
                    format!(
                        "the Host `{}` is not one this server answers to: without an API key it accepts only localhost, IP addresses and the names given with --allowed-host (so that no web page can reach it through DNS rebinding)",
                        host.escape_debug()
                    ),
                )
                .code("host_not_allowed"));
            }
        }
        if request.method() == Method::POST {
            let content_type = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("");
            let essence = content_type.split(';').next().unwrap_or("").trim();
            if !essence.eq_ignore_ascii_case("application/json") {
                let given = if content_type.is_empty() {
                    "no Content-Type".to_owned()
                } else {
                    format!("Content-Type `{}`", content_type.escape_debug())
                };
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    format!("the body must be JSON sent with `Content-Type: application/json`; this request has {given}"),
                )
                .code("unsupported_media_type"));
            }
        }
        Ok(())
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.settings.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "incorrect API key provided",
            )
            .code("invalid_api_key")),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing API key: send the header `Authorization: Bearer <key>`",
            )
            .code("invalid_api_key")),
        }
    }

    /// Reads the body, up to the size limit.
    async fn body<T: DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<T, ApiError> {
        let limit = self.settings.max_body_bytes;
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
        let timeout = self.settings.timeouts.body;
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
                if let Err(err) =
                    serde_path_to_error::deserialize::<_, openai::Sampling>(&mut again)
                {
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

    /// The models this server answers for.
    fn served(&self) -> Vec<Served> {
        if !self.fixed.is_empty() {
            return self.fixed.clone();
        }
        match self.authority.cached_models() {
            Ok(models) => models
                .into_iter()
                .map(|m| {
                    let id = format!("{}/{}", m.repo, m.file);
                    Served {
                        name: id.clone(),
                        id,
                        path: Some(m.path),
                    }
                })
                .collect(),
            Err(err) => {
                log::warn!("cannot list the model cache: {err}");
                Vec::new()
            }
        }
    }

    /// The served model a request naming `requested` goes to: the model
    /// of that id or name, or of that `--alias`, or else the
    /// `--default-model`. Nothing is loaded here: the Orchestrator loads
    /// the model when the request reaches it, and requests for models
    /// already loaded never wait for that.
    fn model(&self, requested: &str) -> Result<Served, ApiError> {
        let served = self.served();
        let find = |name: &str| served.iter().find(|m| m.answers_to(name)).cloned();
        if let Some(model) = find(requested) {
            return Ok(model);
        }
        let aliased = self
            .settings
            .aliases
            .iter()
            .find(|(alias, _)| alias == requested)
            .map(|(_, target)| target.as_str());
        if let Some(model) = aliased
            .or(self.settings.default_model.as_deref())
            .and_then(find)
        {
            return Ok(model);
        }
        Err(ApiError::model_not_found(requested, &served))
    }

    /// Whether the model file at `path` is an embedding model.
    async fn embeds(&self, path: &std::path::Path) -> bool {
        if let Some(known) = self.embeds.lock().ok().and_then(|m| m.get(path).copied()) {
            return known;
        }
        let file = path.to_path_buf();
        let embeds = tokio::task::spawn_blocking(move || {
            rusty_genius::cortex::gguf::GgufFacts::read(&file).is_ok_and(|f| f.declares_pooling)
        })
        .await
        .unwrap_or(false);
        if let Ok(mut known) = self.embeds.lock() {
            known.insert(path.to_path_buf(), embeds);
        }
        embeds
    }

    /// Every served model as `/v1/models` lists it, with its state.
    async fn model_objects(&self) -> Vec<Value> {
        let statuses = self.genius.models().await.unwrap_or_default();
        let mut objects = Vec::new();
        for model in self.served() {
            let status = statuses.iter().find(|s| s.name == model.name);
            let embeds = match (status, &model.path) {
                (Some(status), _) if status.info.is_some() || status.memory_bytes > 0 => {
                    status.embeds
                }
                (_, Some(path)) => self.embeds(path).await,
                _ => false,
            };
            objects.push(model_object(&model, status, embeds, self.created));
        }
        objects
    }
}

/// The id a model is listed under: a file's name without `.gguf`, or the
/// name as given.
fn model_id(name: &str) -> String {
    let path = std::path::Path::new(name);
    if path.extension().is_some_and(|ext| ext == "gguf") && path.is_file() {
        if let Some(stem) = path.file_stem() {
            return stem.to_string_lossy().into_owned();
        }
    }
    name.to_owned()
}

/// `message` with every absolute file path cut to its file name.
fn without_paths(message: &str) -> String {
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

/// Whether a keyless server answers requests for `host` (a `Host`
/// header: a name or address, maybe with a port).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || allowed
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(name) || allowed.eq_ignore_ascii_case(host))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---- endpoints ----------------------------------------------------------

/// Ready once the start-up models have loaded; it never waits for a
/// load (the Orchestrator answers what it has at once).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let ready = state.ready.load(std::sync::atomic::Ordering::Acquire);
    let loaded: Vec<String> = state
        .genius
        .models()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.state == ModelState::Loaded)
        .map(|m| model_id(&m.name))
        .collect();
    let model = loaded.first().cloned();
    if !ready {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading", "model": model, "models": loaded})),
        )
            .into_response();
    }
    let failed = state.failed.lock().map(|f| f.clone()).unwrap_or_default();
    if !failed.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "status": "error",
                "message": format!("{} failed to load; see the server's log", failed.join(", ")),
            })),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ok", "model": model, "models": loaded})).into_response()
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let data = state.model_objects().await;
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let model = state.model(&id)?;
    let data = state.model_objects().await;
    match data.into_iter().find(|m| m["id"] == model.id.as_str()) {
        Some(object) => Ok(axum::Json(object).into_response()),
        None => Err(ApiError::model_not_found(&id, &state.served())),
    }
}

/// A model as `/v1/models` lists it: OpenAI's fields, its state (as
/// llama-server's router says it) and, once loaded, what it holds.
fn model_object(model: &Served, status: Option<&ModelStatus>, embeds: bool, created: u64) -> Value {
    let state = match status.map(|s| s.state) {
        Some(ModelState::Loaded) => "loaded",
        Some(ModelState::Loading | ModelState::Resolving | ModelState::WaitingForRoom) => "loading",
        _ => "unloaded",
    };
    let mut object = json!({
        "id": model.id,
        "object": "model",
        "created": created,
        "owned_by": "local",
        "status": {"value": state},
        "embeds": embeds,
    });
    if let Some(status) = status.filter(|s| s.state == ModelState::Loaded) {
        object["resident"] = json!({
            "memory_bytes": status.memory_bytes,
            "context": status.info.as_ref().map(|i| i.context_size),
            "parallel": status.info.as_ref().map(|i| i.parallel),
            "running": status.running,
            "queued": status.queued,
            "idle_seconds": status.idle_for.map(|d| d.as_secs_f64()),
            "keep_alive_seconds": status.keep_alive.map(|d| d.as_secs_f64()),
        });
    }
    object
}

/// The body of `/models/load` and `/models/unload`.
#[derive(serde::Deserialize)]
struct ModelBody {
    model: String,
}

/// `POST /models/load`: loads a served model now (it stays loaded as the
/// residency policy allows); answers once it is loaded.
async fn load_model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: ModelBody = state.body(&headers, body).await?;
    let model = state.model(&request.model)?;
    let info = state
        .genius
        .load(&model.name)
        .await
        .map_err(|err| ApiError::from_report(&err).param("model"))?;
    Ok(axum::Json(json!({
        "success": true,
        "model": model.id,
        "context": info.context_size,
        "parallel": info.parallel,
    }))
    .into_response())
}

/// `POST /models/unload`: unloads a model once its running requests are
/// done; answers then.
async fn unload_model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: ModelBody = state.body(&headers, body).await?;
    let model = state.model(&request.model)?;
    let was_loaded = match state.genius.unload(&model.name).await {
        Ok(was_loaded) => was_loaded,
        // Never asked for since the server started: not loaded.
        Err(err) if err.kind == ErrorKind::ModelNotFound => false,
        Err(err) => return Err(ApiError::from_report(&err)),
    };
    Ok(
        axum::Json(json!({"success": true, "model": model.id, "was_loaded": was_loaded}))
            .into_response(),
    )
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: ChatRequest = state.body(&headers, body).await?;
    let model = state.model(&request.model)?;
    let config = request.config()?.with_model(model.name);
    let reply = Reply::new(Endpoint::Chat, model.id, unix_now());
    let stream = state.genius.chat(request.messages, config);
    answer(reply, stream, &request.sampling).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = state.body(&headers, body).await?;
    let prompt = request.prompt()?;
    let model = state.model(&request.model)?;
    let config = request.config()?.with_model(model.name);
    let reply = Reply::new(Endpoint::Completion, model.id, unix_now());
    let stream = state.genius.infer(prompt, config);
    answer(reply, stream, &request.sampling).await
}

/// The answer to a generating request: whole, or streamed as the request
/// asked.
async fn answer(
    reply: Reply,
    stream: RequestStream,
    sampling: &openai::Sampling,
) -> Result<Response, ApiError> {
    if sampling.streams() {
        stream_reply(reply, stream, sampling.include_usage()).await
    } else {
        whole_reply(reply, stream).await
    }
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = state.body(&headers, body).await?;
    let base64 = request.base64()?;
    let model = state.model(&request.model)?;
    let embeddings = state
        .genius
        .embeddings(request.embed().with_model(model.name))
        .await
        .map_err(|err| ApiError::from_report(&err).param("input"))?;
    if let Some(wanted) = request.dimensions {
        let width = embeddings.vectors.first().map_or(0, Vec::len);
        if wanted != width {
            return Err(ApiError::invalid(format!(
                "dimensions={wanted}: this model's vectors have {width}; leave dimensions out"
            ))
            .param("dimensions"));
        }
    }
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

// ---- answers ------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

/// What one answer has gathered so far, and how to write it.
struct Reply {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    content: String,
    reasoning: String,
    tool_calls: Vec<Value>,
    logprobs: Vec<Value>,
    /// How many of `logprobs` went out with streamed chunks.
    logprobs_sent: usize,
    usage: Option<Usage>,
}

impl Reply {
    fn new(endpoint: Endpoint, model: String, created: u64) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self {
            endpoint,
            id: format!("{prefix}-{}", request_id()),
            model,
            created,
            content: String::new(),
            reasoning: String::new(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            logprobs_sent: 0,
            usage: None,
        }
    }

    fn finish_reason(&self) -> &'static str {
        self.usage
            .as_ref()
            .map_or("stop", |usage| openai::finish_reason(usage.finish_reason))
    }

    fn object(&self, streamed: bool) -> &'static str {
        match (self.endpoint, streamed) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn whole(&self) -> Value {
        let logprobs = if self.logprobs.is_empty() {
            Value::Null
        } else {
            json!({"content": self.logprobs})
        };
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut message = json!({
                    "role": "assistant",
                    "content": if self.content.is_empty() && !self.tool_calls.is_empty() {
                        Value::Null
                    } else {
                        Value::String(self.content.clone())
                    },
                });
                if !self.tool_calls.is_empty() {
                    message["tool_calls"] = Value::Array(self.tool_calls.clone());
                }
                if !self.reasoning.is_empty() {
                    message["reasoning_content"] = Value::String(self.reasoning.clone());
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self.finish_reason()})
            }
            Endpoint::Completion => {
                let logprobs = legacy_logprobs(&self.logprobs);
                json!({"index": 0, "text": self.content, "logprobs": logprobs, "finish_reason": self.finish_reason()})
            }
        };
        let mut whole = self.envelope(false, vec![choice]);
        if let Some(usage) = &self.usage {
            whole["usage"] = openai::usage(usage);
        }
        whole
    }

    fn envelope(&self, streamed: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": self.object(streamed),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": concat!("rusty-genius-", env!("CARGO_PKG_VERSION")),
            "choices": choices,
        })
    }

    /// A streamed chunk with one change of the answer.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>, logprobs: Option<Value>) -> Value {
        let logprobs = logprobs.map_or(Value::Null, |content| json!({"content": content}));
        let choice = match self.endpoint {
            Endpoint::Chat => {
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Endpoint::Completion => json!({
                "index": 0,
                "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        self.envelope(true, vec![choice])
    }

    /// Takes in one event; returns the chunk to stream for it, if any.
    fn take(&mut self, event: InferenceEvent) -> Option<Value> {
        match event {
            InferenceEvent::Content(text) => {
                self.content.push_str(&text);
                let logprobs = self.pending_logprobs();
                Some(self.chunk(json!({"content": text}), None, logprobs))
            }
            InferenceEvent::Thought(ThoughtEvent::Delta(text)) => {
                self.reasoning.push_str(&text);
                (self.endpoint == Endpoint::Chat)
                    .then(|| self.chunk(json!({"reasoning_content": text}), None, None))
            }
            InferenceEvent::ToolCall {
                id,
                name,
                arguments,
            } => {
                let index = self.tool_calls.len();
                let call = json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments.to_string()},
                });
                self.tool_calls.push(call.clone());
                let mut streamed = call;
                streamed["index"] = json!(index);
                Some(self.chunk(json!({"tool_calls": [streamed]}), None, None))
            }
            InferenceEvent::Logprobs(token) => {
                self.logprobs.push(logprob_json(&token));
                None
            }
            InferenceEvent::Usage(usage) => {
                self.usage = Some(usage);
                None
            }
            _ => None,
        }
    }

    /// Log-probabilities not yet sent with a streamed chunk.
    fn pending_logprobs(&mut self) -> Option<Value> {
        let sent = self.logprobs_sent;
        (sent < self.logprobs.len()).then(|| {
            self.logprobs_sent = self.logprobs.len();
            Value::Array(self.logprobs[sent..].to_vec())
        })
    }
}

/// Log-probabilities in the completions API's older shape: parallel
/// lists of tokens, their log-probabilities, the likeliest alternatives
/// (token to log-probability) and each token's offset in the text.
fn legacy_logprobs(tokens: &[Value]) -> Value {
    if tokens.is_empty() {
        return Value::Null;
    }
    let mut offset = 0;
    let mut offsets = Vec::new();
    for token in tokens {
        offsets.push(offset);
        offset += token["token"].as_str().map_or(0, str::len);
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|token| {
            let mut map = serde_json::Map::new();
            for alternative in token["top_logprobs"].as_array().into_iter().flatten() {
                if let Some(text) = alternative["token"].as_str() {
                    map.entry(text.to_owned())
                        .or_insert_with(|| alternative["logprob"].clone());
                }
            }
            Value::Object(map)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

fn logprob_json(token: &TokenLogprobs) -> Value {
    json!({
        "id": token.id,
        "token": token.token,
        "logprob": token.logprob,
        "bytes": token.bytes,
        "top_logprobs": token.top_logprobs.iter().map(|top| json!({
            "id": top.id,
            "token": top.token,
            "logprob": top.logprob,
            "bytes": top.bytes,
        })).collect::<Vec<_>>(),
    })
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:08x}{n:x}", unix_now(), nanos)
}

async fn whole_reply(mut reply: Reply, mut stream: RequestStream) -> Result<Response, ApiError> {
    while let Some(event) = stream.next().await {
        match event {
            Ok(InferenceEvent::Complete) => break,
            Ok(event) => {
                reply.take(event);
            }
            Err(err) => return Err(ApiError::from_report(&err)),
        }
    }
    Ok(axum::Json(reply.whole()).into_response())
}

/// Streams the answer as server-sent events. The first event is awaited
/// before the response starts, so that a request the library refuses
/// gets its HTTP error status rather than an error inside a 200 stream.
async fn stream_reply(
    reply: Reply,
    mut stream: RequestStream,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let first = loop {
        match stream.next().await {
            Some(Ok(InferenceEvent::ProcessStart)) => continue,
            Some(Ok(event)) => break Some(event),
            Some(Err(err)) => return Err(ApiError::from_report(&err)),
            None => break None,
        }
    };
    let opening = match reply.endpoint {
        Endpoint::Chat => {
            Some(reply.chunk(json!({"role": "assistant", "content": ""}), None, None))
        }
        Endpoint::Completion => None,
    };
    let events = Watched {
        stream: Some(stream),
        id: reply.id.clone(),
        sent: 0,
    };
    let body = sse(reply, opening, first, events, include_usage);
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx (and proxies like it) not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn data(value: &Value) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(format!("data: {value}\n\n")))
}

/// The SSE frames of one answer, ending in `data: [DONE]`.
fn sse(
    reply: Reply,
    opening: Option<Value>,
    first: Option<InferenceEvent>,
    events: Watched,
    include_usage: bool,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    enum Phase {
        Running,
        Done,
    }
    let start = futures::stream::iter(opening.as_ref().map(data));
    let state = (reply, first, events, Phase::Running);
    let rest = futures::stream::unfold(
        state,
        move |(mut reply, mut first, mut events, phase)| async move {
            if let Phase::Done = phase {
                return None;
            }
            loop {
                let event = match first.take() {
                    Some(event) => Some(Ok(event)),
                    None => events.next().await,
                };
                match event {
                    Some(Ok(InferenceEvent::Complete)) | None => {
                        events.finished();
                        let mut frames = String::new();
                        let logprobs = reply.pending_logprobs();
                        let finish = reply.chunk(json!({}), Some(reply.finish_reason()), logprobs);
                        frames.push_str(&format!("data: {finish}\n\n"));
                        if include_usage {
                            if let Some(usage) = &reply.usage {
                                let mut last = reply.envelope(true, Vec::new());
                                last["usage"] = openai::usage(usage);
                                frames.push_str(&format!("data: {last}\n\n"));
                            }
                        }
                        frames.push_str("data: [DONE]\n\n");
                        return Some((Ok(Bytes::from(frames)), (reply, None, events, Phase::Done)));
                    }
                    Some(Ok(event)) => {
                        let is_token = matches!(event, InferenceEvent::Content(_));
                        if let Some(chunk) = reply.take(event) {
                            if is_token {
                                events.sent += 1;
                            }
                            return Some((data(&chunk), (reply, None, events, Phase::Running)));
                        }
                    }
                    Some(Err(err)) => {
                        events.finished();
                        let error = ApiError::from_report(&err).body();
                        let frame = json!(error);
                        return Some((data(&frame), (reply, None, events, Phase::Done)));
                    }
                }
            }
        },
    );
    start.chain(rest)
}

/// A request's stream while its answer is streamed to a client. If the
/// client goes away first, the request is stopped and what the engine
/// generated is logged, so a cancelled generation can be seen to end.
struct Watched {
    stream: Option<RequestStream>,
    id: String,
    /// Content events handed to the client.
    sent: usize,
}

impl Watched {
    async fn next(&mut self) -> Option<Result<InferenceEvent, ErrorReport>> {
        self.stream.as_mut()?.next().await
    }

    /// The stream has ended normally.
    fn finished(&mut self) {
        self.stream = None;
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        stream.stop();
        let id = self.id.clone();
        let sent = self.sent;
        // The stopped request still ends with its usage: read it, without
        // holding anything else up.
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_secs(30));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    event = stream.next() => match event {
                        Some(Ok(InferenceEvent::Usage(usage))) => {
                            log::info!(
                                "{id}: the client went away after {sent} streamed pieces; generation stopped after {} tokens ({} after the last piece sent)",
                                usage.generated_tokens,
                                usage.generated_tokens.saturating_sub(sent),
                            );
                            return;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    },
                    () = &mut deadline => return,
                }
            }
        });
    }
}
