//! llama.cpp's server's helper endpoints, in its shapes, for the clients
//! and tools that call them: `/tokenize`, `/detokenize`, `/apply-template`
//! and `GET /props`. Each may name a `model` (as in llama.cpp's router);
//! without one, the default model answers.

use rusty_genius::core::tokens::{TextOrToken, TokenAnswer, TokenPiece, TokenQuery};
use rusty_genius::core::{ChatMessage, InferenceConfig, Tool, ToolChoice};
use serde::{Deserialize, Serialize};

use super::*;

/// `content`: a text, or texts and token ids mixed.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Mixed(Vec<TextOrToken>),
}

#[derive(Debug, Deserialize)]
pub(super) struct TokenizeBody {
    #[serde(default)]
    model: Option<String>,
    /// Absent: no tokens (as llama.cpp answers).
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub(super) struct DetokenizeBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tokens: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub(super) struct TemplateBody {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
}

#[derive(Debug, Serialize)]
struct Tokens<T> {
    tokens: Vec<T>,
}

/// A token with its piece: the text, or its bytes when they are not
/// UTF-8 on their own (part of a character).
#[derive(Debug, Serialize)]
struct WithPiece {
    id: u32,
    piece: Piece,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Piece {
    Text(String),
    Bytes(Vec<u8>),
}

impl From<TokenPiece> for WithPiece {
    fn from(token: TokenPiece) -> Self {
        let piece = match String::from_utf8(token.piece) {
            Ok(text) => Piece::Text(text),
            Err(err) => Piece::Bytes(err.into_bytes()),
        };
        Self {
            id: token.id,
            piece,
        }
    }
}

#[derive(Debug, Serialize)]
struct Detokenized {
    content: String,
}

#[derive(Debug, Serialize)]
struct Rendered {
    prompt: String,
}

/// `POST /tokenize`.
pub(super) async fn tokenize(
    State(state): State<Arc<AppState>>,
    Json(request): Json<TokenizeBody>,
) -> Result<Response, ApiError> {
    let content = match request.content {
        None => Vec::new(),
        Some(Content::Text(text)) => vec![TextOrToken::Text(text)],
        Some(Content::Mixed(parts)) => parts,
    };
    let pieces = if content.is_empty() {
        Vec::new()
    } else {
        let query = TokenQuery::Tokenize {
            content,
            add_special: request.add_special,
            parse_special: request.parse_special,
        };
        let model = request.model.as_deref();
        match ask(&state, model, query, InferenceConfig::default()).await? {
            TokenAnswer::Tokens(pieces) => pieces,
            TokenAnswer::Text(_) => return Err(ApiError::internal()),
        }
    };
    Ok(if request.with_pieces {
        axum::Json(Tokens {
            tokens: pieces.into_iter().map(WithPiece::from).collect(),
        })
        .into_response()
    } else {
        axum::Json(Tokens {
            tokens: pieces.into_iter().map(|p| p.id).collect(),
        })
        .into_response()
    })
}

/// `POST /detokenize`.
pub(super) async fn detokenize(
    State(state): State<Arc<AppState>>,
    Json(request): Json<DetokenizeBody>,
) -> Result<Response, ApiError> {
    let content = if request.tokens.is_empty() {
        String::new()
    } else {
        let query = TokenQuery::Detokenize {
            tokens: request.tokens,
        };
        let model = request.model.as_deref();
        ask_text(&state, model, query, InferenceConfig::default()).await?
    };
    Ok(axum::Json(Detokenized { content }).into_response())
}

/// `POST /apply-template`: the prompt a chat request would be, in the
/// model's template, tools included.
pub(super) async fn apply_template(
    State(state): State<Arc<AppState>>,
    Json(request): Json<TemplateBody>,
) -> Result<Response, ApiError> {
    let mut config = InferenceConfig {
        tools: request.tools.unwrap_or_default(),
        ..InferenceConfig::default()
    };
    if let Some(choice) = request.tool_choice {
        config.tool_choice = choice;
    }
    let query = TokenQuery::Render {
        messages: request.messages,
    };
    let prompt = ask_text(&state, request.model.as_deref(), query, config).await?;
    Ok(axum::Json(Rendered { prompt }).into_response())
}

/// Asks a question whose answer is a text.
async fn ask_text(
    state: &AppState,
    requested: Option<&str>,
    query: TokenQuery,
    config: InferenceConfig,
) -> Result<String, ApiError> {
    match ask(state, requested, query, config).await? {
        TokenAnswer::Text(text) => Ok(text),
        TokenAnswer::Tokens(_) => Err(ApiError::internal()),
    }
}

/// Asks the model `requested` (or the default one) `query`.
async fn ask(
    state: &AppState,
    requested: Option<&str>,
    query: TokenQuery,
    config: InferenceConfig,
) -> Result<TokenAnswer, ApiError> {
    let model = state.model_or_default(requested)?;
    state
        .genius
        .tokens(query, config.with_model(model.name))
        .await
        .map_err(|err| ApiError::from_report(&err))
}

#[derive(Debug, Deserialize)]
pub(super) struct PropsQuery {
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Serialize)]
struct Props {
    default_generation_settings: GenerationSettings,
    total_slots: usize,
    model_alias: String,
    model_path: String,
    modalities: Modalities,
    endpoint_slots: bool,
    endpoint_props: bool,
    endpoint_metrics: bool,
    build_info: String,
    is_sleeping: bool,
}

#[derive(Debug, Serialize)]
struct GenerationSettings {
    n_ctx: usize,
    params: Params,
}

/// The sampling a request gets when it sets none.
#[derive(Debug, Serialize)]
struct Params {
    temperature: f32,
    top_p: f32,
    top_k: u32,
    min_p: f32,
    n_predict: i64,
    seed: i64,
}

#[derive(Debug, Serialize)]
struct Modalities {
    vision: bool,
    audio: bool,
}

/// `GET /props`: the model's context and places, read-only. The model
/// is loaded to answer, if it is not.
pub(super) async fn props(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(query): axum::extract::Query<PropsQuery>,
) -> Result<Response, ApiError> {
    let model = state.model_or_default(query.model.as_deref())?;
    let info = state
        .genius
        .load(&model.name)
        .await
        .map_err(|err| ApiError::from_report(&err))?;
    let defaults = InferenceConfig::default();
    let file = model
        .path
        .as_deref()
        .and_then(|p| p.file_name())
        .map_or_else(|| model.id.clone(), |f| f.to_string_lossy().into_owned());
    let props = Props {
        default_generation_settings: GenerationSettings {
            n_ctx: info.context_size,
            params: Params {
                temperature: defaults.temperature,
                top_p: defaults.top_p,
                top_k: defaults.top_k,
                min_p: defaults.min_p,
                n_predict: defaults.max_tokens.map_or(-1, |n| n as i64),
                seed: defaults.seed.map_or(-1, i64::from),
            },
        },
        total_slots: info.parallel,
        model_alias: model.id,
        model_path: file,
        modalities: Modalities {
            vision: false,
            audio: false,
        },
        endpoint_slots: false,
        endpoint_props: false,
        endpoint_metrics: state.settings.metrics,
        build_info: concat!("rusty-genius ", env!("CARGO_PKG_VERSION")).to_owned(),
        is_sleeping: false,
    };
    Ok(axum::Json(props).into_response())
}
