//! The endpoints about models: `/health`, `/v1/models`, `/models`,
//! `/models/load` and `/models/unload`.

use rusty_genius::core::manifest::Placement;
use serde::Serialize;

use super::*;

/// The id a model is listed under: a file's name without `.gguf`, or the
/// name as given.
pub(super) fn model_id(name: &str) -> String {
    let path = std::path::Path::new(name);
    if path.extension().is_some_and(|ext| ext == "gguf") && path.is_file() {
        if let Some(stem) = path.file_stem() {
            return stem.to_string_lossy().into_owned();
        }
    }
    name.to_owned()
}

/// Ready once the start-up models have loaded; it never waits for a
/// load (the Orchestrator answers what it has at once).
pub(super) async fn health(State(state): State<Arc<AppState>>) -> Response {
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
            axum::Json(Health {
                status: "loading",
                model,
                models: Some(loaded),
                message: None,
            }),
        )
            .into_response();
    }
    let failed = state.failed.lock().map(|f| f.clone()).unwrap_or_default();
    if !failed.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Health {
                status: "error",
                model: None,
                models: None,
                message: Some(format!(
                    "{} failed to load; see the server's log",
                    failed.join(", ")
                )),
            }),
        )
            .into_response();
    }
    axum::Json(Health {
        status: "ok",
        model,
        models: Some(loaded),
        message: None,
    })
    .into_response()
}

/// The answer of `/health`.
#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// The answer of `/v1/models`.
#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ModelObject {
    pub(super) id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    status: ModelStateValue,
    embeds: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    resident: Option<Resident>,
}

#[derive(Debug, Clone, Serialize)]
struct ModelStateValue {
    value: &'static str,
}

/// What a loaded model holds.
#[derive(Debug, Clone, Serialize)]
struct Resident {
    memory_bytes: u64,
    device_bytes: u64,
    context: Option<usize>,
    parallel: Option<usize>,
    placement: Option<Placement>,
    running: usize,
    queued: usize,
    idle_seconds: Option<f64>,
    keep_alive_seconds: Option<f64>,
}

pub(super) async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let data = state.model_objects().await;
    Ok(axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response())
}

pub(super) async fn get_model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let model = state.model(&id)?;
    let data = state.model_objects().await;
    match data.into_iter().find(|m| m.id == model.id) {
        Some(object) => Ok(axum::Json(object).into_response()),
        None => Err(ApiError::model_not_found(&id, &state.served())),
    }
}

/// A model as `/v1/models` lists it: OpenAI's fields, its state (as
/// llama-server's router says it) and, once loaded, what it holds.
pub(super) fn model_object(
    model: &Served,
    status: Option<&ModelStatus>,
    embeds: bool,
    created: u64,
) -> ModelObject {
    let state = match status.map(|s| s.state) {
        Some(ModelState::Loaded) => "loaded",
        Some(ModelState::Loading | ModelState::Resolving | ModelState::WaitingForRoom) => "loading",
        _ => "unloaded",
    };
    let resident = status
        .filter(|s| s.state == ModelState::Loaded)
        .map(|status| Resident {
            memory_bytes: status.memory_bytes,
            device_bytes: status.device_bytes,
            context: status.info.as_ref().map(|i| i.context_size),
            parallel: status.info.as_ref().map(|i| i.parallel),
            placement: status.info.as_ref().map(|i| i.placement.clone()),
            running: status.running,
            queued: status.queued,
            idle_seconds: status.idle_for.map(|d| d.as_secs_f64()),
            keep_alive_seconds: status.keep_alive.map(|d| d.as_secs_f64()),
        });
    ModelObject {
        id: model.id.clone(),
        object: "model",
        created,
        owned_by: "local",
        status: ModelStateValue { value: state },
        embeds,
        resident,
    }
}

/// The body of `/models/load` and `/models/unload`.
#[derive(serde::Deserialize)]
pub(super) struct ModelBody {
    model: String,
}

/// `POST /models/load`: loads a served model now (it stays loaded as the
/// residency policy allows); answers once it is loaded.
pub(super) async fn load_model(
    State(state): State<Arc<AppState>>,
    Json(request): Json<ModelBody>,
) -> Result<Response, ApiError> {
    let model = state.model(&request.model)?;
    let info = state
        .genius
        .load(&model.name)
        .await
        .map_err(|err| ApiError::from_report(&err).param("model"))?;
    Ok(axum::Json(Loaded {
        success: true,
        model: model.id,
        context: info.context_size,
        parallel: info.parallel,
    })
    .into_response())
}

/// `POST /models/unload`: unloads a model once its running requests are
/// done; answers then.
pub(super) async fn unload_model(
    State(state): State<Arc<AppState>>,
    Json(request): Json<ModelBody>,
) -> Result<Response, ApiError> {
    let model = state.model(&request.model)?;
    let was_loaded = match state.genius.unload(&model.name).await {
        Ok(was_loaded) => was_loaded,
        // Never asked for since the server started: not loaded.
        Err(err) if err.kind == ErrorKind::ModelNotFound => false,
        Err(err) => return Err(ApiError::from_report(&err)),
    };
    Ok(axum::Json(Unloaded {
        success: true,
        model: model.id,
        was_loaded,
    })
    .into_response())
}

/// The answer of `/models/load`.
#[derive(Debug, Serialize)]
struct Loaded {
    success: bool,
    model: String,
    context: usize,
    parallel: usize,
}

/// The answer of `/models/unload`.
#[derive(Debug, Serialize)]
struct Unloaded {
    success: bool,
    model: String,
    was_loaded: bool,
}
