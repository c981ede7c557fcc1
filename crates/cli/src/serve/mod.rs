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

mod anthropic;
mod body;
mod chat;
mod context;
mod cors;
mod embeddings;
mod errors;
mod helpers;
mod infill;
mod metrics;
mod models;
mod ollama;
mod page;
mod responses;

use body::Json;
use chat::Watched;
use errors::ApiError;
use models::{model_id, model_object};

pub(crate) use cors::{parse_origin, CorsOrigins};

use crate::http::Timeouts;
use crate::openai::{
    self, ChatRequest, CompletionRequest, EmbeddingRequest, ErrorBody, ErrorDetail, Unsupported,
};

/// How `genius serve` was asked to run.
#[derive(Debug, Clone)]
pub(crate) struct ServeSettings {
    pub(crate) addr: SocketAddr,
    /// A second address (`--ollama-addr`), where Ollama's clients look.
    pub(crate) ollama_addr: Option<SocketAddr>,
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
    /// The most choices (`n`) one request may ask for: as many requests as
    /// the engine answers at once.
    pub(crate) max_choices: usize,
    /// Silence in a streamed answer after which a keep-alive comment goes
    /// out.
    pub(crate) sse_keep_alive: Duration,
    /// Whether `GET /metrics` answers (`--metrics`).
    pub(crate) metrics: bool,
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
    /// The HTTP requests answered, for `/metrics`.
    http: metrics::HttpMetrics,
}

/// Serves until Ctrl-C or SIGTERM; then lets the open responses finish
/// and shuts the Orchestrator down.
pub(crate) async fn serve(
    genius: OrchestratorHandle,
    authority: AssetAuthority,
    settings: ServeSettings,
) -> Result<(), String> {
    let listener = crate::http::listen(settings.addr)
        .map_err(|err| format!("cannot listen on {}: {err}", settings.addr))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    let mut listeners = vec![listener];
    if let Some(addr) = settings.ollama_addr {
        let listener = crate::http::listen(addr)
            .map_err(|err| format!("cannot listen on {addr} (--ollama-addr): {err}"))?;
        let bound = listener.local_addr().map_err(|err| err.to_string())?;
        log::info!("also listening on http://{bound} for Ollama's clients");
        eprintln!("genius: also listening for Ollama's clients at {bound}");
        listeners.push(listener);
    }
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
        http: metrics::HttpMetrics::default(),
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
    crate::http::serve(listeners, app, timeouts, shutdown_signal()).await;
    genius.shutdown();
    // The engines save their KV snapshots as they unload.
    genius.stopped().await;
    log::info!("stopped");
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
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/infill", post(infill::infill))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/models", get(models::list_models))
        .route("/models/load", post(models::load_model))
        .route("/models/unload", post(models::unload_model))
        .route("/health", get(models::health))
        .route("/metrics", get(metrics::metrics))
        .route("/tokenize", post(helpers::tokenize))
        .route("/detokenize", post(helpers::detokenize))
        .route("/apply-template", post(helpers::apply_template))
        .route("/props", get(helpers::props))
        .merge(ollama::routes())
        .merge(anthropic::routes())
        .merge(page::routes())
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cors::cors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            context::layer,
        ))
        .with_state(state)
}

/// What every request passes before its handler. With an API key, every
/// endpoint but `/health` and the chat page's files needs it (here, so that no handler can forget
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
    } else if request.uri().path() == "/health" || page::is_page(request.uri().path()) {
        Ok(())
    } else {
        state.authorize(request.headers())
    };
    if let Err(refused) = checked {
        return refused.into_response();
    }
    next.run(request).await
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
        // A bearer token, or Anthropic's `x-api-key`.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .or_else(|| {
                headers
                    .get("x-api-key")
                    .and_then(|value| value.to_str().ok())
            })
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
                "missing API key: send the header `Authorization: Bearer <key>` (or `x-api-key: <key>`)",
            )
            .code("invalid_api_key")),
        }
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

    /// The model a request naming `requested` goes to, or, naming none,
    /// the default model: `--default-model`, else the first `--model`,
    /// else the only model in the cache.
    fn model_or_default(&self, requested: Option<&str>) -> Result<Served, ApiError> {
        if let Some(requested) = requested.filter(|r| !r.is_empty()) {
            return self.model(requested);
        }
        if let Some(default) = &self.settings.default_model {
            return self.model(default);
        }
        let served = self.served();
        match &served[..] {
            [] => Err(ApiError::model_not_found("(none given)", &served)),
            [only] => Ok(only.clone()),
            [first, ..] if !self.fixed.is_empty() => Ok(first.clone()),
            _ => Err(ApiError::invalid(format!(
                "this server serves several models: name one in `model` ({})",
                served
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .param("model")),
        }
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
    async fn model_objects(&self) -> Vec<models::ModelObject> {
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
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An id for a request that came without one, or for an object of an
/// answer (a completion, a message, a call): unique within this process.
fn unique_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:x}{:08x}{n:x}", unix_now(), nanos)
}
