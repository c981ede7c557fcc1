//! `POST /infill`: fill-in-the-middle in llama.cpp's server's shape, for
//! the editor plugins written for it (llama.vim, llama.vscode): the code
//! before and after the cursor (`input_prefix`, `input_suffix`), the
//! project's other files (`input_extra`), text the middle starts with
//! (`prompt`), and `/completion`'s sampling options; the answer whole, or
//! streamed as server-sent events, with llama.cpp's fields and `timings`,
//! and only the `response_fields` asked for.

use rusty_genius::core::protocol::{FinishReason, Usage};
use rusty_genius::core::{InferenceConfig, Infill, InfillFile, PromptFormat};

use serde::{Deserialize, Serialize};

use super::chat::{answer_frames, each_event, event_stream, first_event, Frames, Watched};

use super::*;

/// A request, as llama.cpp's `/infill` takes it. Options this server does
/// not have (`cache_prompt`: it always reuses what it can; `samplers`;
/// `t_max_prompt_ms`) are read and left alone, as a plugin sends them.
#[derive(Debug, Deserialize)]
pub(super) struct InfillRequest {
    #[serde(default)]
    model: Option<String>,
    input_prefix: Option<String>,
    input_suffix: Option<String>,
    #[serde(default)]
    input_extra: Vec<ExtraChunk>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    n_predict: Option<i64>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n_indent: Option<i64>,
    #[serde(default)]
    t_max_predict_ms: Option<i64>,
    #[serde(default)]
    response_fields: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct ExtraChunk {
    #[serde(default)]
    filename: Option<String>,
    text: String,
}

impl InfillRequest {
    fn infill(&self) -> Result<Infill, ApiError> {
        let required = |field: &Option<String>, name: &'static str| {
            field.clone().ok_or_else(|| {
                ApiError::invalid(format!(
                    "{name} is required: the text before (input_prefix) and after (input_suffix) the cursor, each a string, empty if there is none"
                ))
                .param(name)
            })
        };
        Ok(Infill {
            prefix: required(&self.input_prefix, "input_prefix")?,
            suffix: required(&self.input_suffix, "input_suffix")?,
            middle: self.prompt.clone().unwrap_or_default(),
            extra: self
                .input_extra
                .iter()
                .map(|chunk| InfillFile {
                    name: chunk.filename.clone().unwrap_or_default(),
                    text: chunk.text.clone(),
                })
                .collect(),
        })
    }

    fn config(&self) -> Result<InferenceConfig, ApiError> {
        let mut config = InferenceConfig {
            // llama.cpp's defaults for these.
            temperature: 0.8,
            top_p: 0.95,
            repetition_penalty: 1.0,
            ..InferenceConfig::default()
        };
        config.prompt_format = PromptFormat::Raw;
        if let Some(temperature) = self.temperature {
            config.temperature = temperature.max(0.0);
        }
        if let Some(top_k) = self.top_k {
            config.top_k = u32::try_from(top_k).unwrap_or(0);
        }
        if let Some(top_p) = self.top_p {
            config.top_p = top_p;
        }
        if let Some(min_p) = self.min_p {
            config.min_p = min_p;
        }
        if let Some(penalty) = self.repeat_penalty {
            config.repetition_penalty = penalty;
        }
        config.presence_penalty = self.presence_penalty.unwrap_or(0.0);
        config.frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        // A negative seed is llama.cpp's "random".
        config.seed = self.seed.and_then(|seed| u32::try_from(seed).ok());
        config.stop = self.stop.clone();
        // -1 (or nothing) is "until the model stops".
        config.max_tokens = self
            .n_predict
            .or(self.max_tokens)
            .and_then(|n| usize::try_from(n).ok());
        config.min_indent = self
            .n_indent
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        config.time_limit = self
            .t_max_predict_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        Ok(config)
    }
}

pub(super) async fn infill(
    State(state): State<Arc<AppState>>,
    Json(request): Json<InfillRequest>,
) -> Result<Response, ApiError> {
    let infill = request.infill()?;
    // llama.cpp's server has one model: without a name, the default
    // model, else the first served.
    let name = request
        .model
        .clone()
        .or_else(|| state.settings.default_model.clone())
        .or_else(|| state.served().first().map(|model| model.id.clone()))
        .unwrap_or_default();
    let model = state.model(&name)?;
    let config = request.config()?.with_model(model.name);
    let mut stream = state.genius.infill(infill, config);
    let mut answer = Answer {
        model: model.id,
        content: String::new(),
        usage: None,
        fields: request.response_fields.clone(),
    };
    let first = first_event(&mut stream).await?;
    if request.stream {
        let events = Watched::new(stream, format!("infill-{}", unique_id()));
        return Ok(event_stream(answer_frames(answer, first, events)));
    }
    each_event(first, &mut stream, |event| {
        answer.take(event);
    })
    .await?;
    Ok(axum::Json(answer.last(&answer.content.clone())).into_response())
}

/// An answer as it is gathered.
struct Answer {
    model: String,
    content: String,
    usage: Option<Usage>,
    fields: Option<Vec<String>>,
}

impl Answer {
    /// The text of one event, if it has any.
    fn take(&mut self, event: InferenceEvent) -> Option<String> {
        match event {
            InferenceEvent::Content(text) => {
                self.content.push_str(&text);
                Some(text)
            }
            InferenceEvent::Usage(usage) => {
                self.usage = Some(usage);
                None
            }
            _ => None,
        }
    }

    /// The last object, `content` in it.
    fn last(&self, content: &str) -> Value {
        let stop_type = match self.usage.as_ref().map(|usage| usage.finish_reason) {
            Some(FinishReason::EndOfGeneration) => "eos",
            Some(FinishReason::StopSequence) => "word",
            _ => "limit",
        };
        let count = |of: fn(&Usage) -> usize| self.usage.as_ref().map_or(0, of);
        self.only_asked(&Last {
            index: 0,
            content,
            tokens: [],
            stop: true,
            model: &self.model,
            tokens_predicted: count(|usage| usage.generated_tokens),
            tokens_evaluated: count(|usage| usage.prompt_tokens),
            tokens_cached: count(|usage| usage.cached_tokens),
            truncated: false,
            has_new_line: self.content.contains('\n'),
            stop_type,
            stopping_word: "",
            timings: self.usage.as_ref().map(openai::timings),
        })
    }

    /// `object` with only the `response_fields` asked for, a field with a
    /// slash (`timings/prompt_n`) taken out of its object under that
    /// name, as llama.cpp does; all of it when none were asked for.
    fn only_asked(&self, object: &impl Serialize) -> Value {
        let object = serde_json::to_value(object).unwrap_or(Value::Null);
        let Some(fields) = &self.fields else {
            return object;
        };
        let mut picked = serde_json::Map::new();
        for field in fields {
            let pointer = format!("/{}", field.trim_start_matches('/'));
            if let Some(value) = object.pointer(&pointer) {
                picked.insert(field.clone(), value.clone());
            }
        }
        Value::Object(picked)
    }
}

impl Frames for Answer {
    fn frames_for(&mut self, event: InferenceEvent) -> Option<String> {
        let text = self.take(event)?;
        let object = Piece {
            index: 0,
            content: &text,
            tokens: [],
            stop: false,
        };
        Some(format!("data: {}\n\n", self.only_asked(&object)))
    }

    fn last_frames(&mut self) -> String {
        format!("data: {}\n\n", self.last(""))
    }

    fn error_frames(&mut self, err: &ErrorReport) -> String {
        let message = ApiError::from_report(err).body().error.message;
        let error = StreamError {
            error: ErrorMessage { message },
        };
        format!(
            "data: {}\n\n",
            serde_json::to_string(&error).unwrap_or_default()
        )
    }
}

/// A streamed piece of the middle.
#[derive(Debug, Serialize)]
struct Piece<'a> {
    index: u32,
    content: &'a str,
    tokens: [u32; 0],
    stop: bool,
}

/// The last object of an answer: llama.cpp's fields.
#[derive(Debug, Serialize)]
struct Last<'a, T> {
    index: u32,
    content: &'a str,
    tokens: [u32; 0],
    stop: bool,
    model: &'a str,
    tokens_predicted: usize,
    tokens_evaluated: usize,
    tokens_cached: usize,
    truncated: bool,
    has_new_line: bool,
    stop_type: &'static str,
    stopping_word: &'static str,
    timings: Option<T>,
}

/// An error in the middle of a stream, as llama.cpp sends it.
#[derive(Debug, Serialize)]
struct StreamError {
    error: ErrorMessage,
}

#[derive(Debug, Serialize)]
struct ErrorMessage {
    message: String,
}
