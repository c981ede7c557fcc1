//! `GET /metrics` (with `--metrics`): the server's HTTP requests and the
//! Orchestrator's figures ([`OrchestratorHandle::metrics`]) in
//! Prometheus' text format, one series per model where a figure is a
//! model's.

use std::time::Duration;

use axum::http::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use rusty_genius::core::metrics::{Histogram as Spread, Metrics, ModelMetrics, LATENCY_BOUNDS};

use super::*;

/// The labels of an HTTP request's series.
type HttpLabels = [(&'static str, String); 3];

/// What the HTTP layer counts itself: requests by route, method and
/// status, and their time to the response's head.
#[derive(Debug, Clone)]
pub(super) struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    latency: Family<[(&'static str, String); 1], Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(LATENCY_BOUNDS.iter().copied())
            }),
        }
    }
}

impl HttpMetrics {
    /// Counts a request to `route` (the route's pattern, never the path
    /// asked for: the set of series stays bounded).
    pub(super) fn observe(&self, route: &str, method: &Method, status: u16, took: Duration) {
        let method = match *method {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::DELETE => "DELETE",
            Method::HEAD => "HEAD",
            Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        self.requests
            .get_or_create(&[
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&[("route", route.to_owned())])
            .observe(took.as_secs_f64());
    }
}

/// `GET /metrics`.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if !state.settings.metrics {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "metrics are off: start the server with --metrics to serve them here",
        )
        .code("unknown_url"));
    }
    let mut figures = state
        .genius
        .metrics()
        .await
        .map_err(|err| ApiError::from_report(&err))?;
    // Each model by the id clients use for it (not its file's path).
    let served = state.served();
    for model in &mut figures.models {
        if let Some(known) = served.iter().find(|s| s.name == model.name) {
            model.name.clone_from(&known.id);
        }
    }
    let mut registry = Registry::default();
    registry.register(
        "genius_http_requests",
        "HTTP requests answered, by route, method and status",
        state.http.requests.clone(),
    );
    registry.register(
        "genius_http_response_seconds",
        "Seconds from an HTTP request to its response's head (for a stream, its first token), by route",
        state.http.latency.clone(),
    );
    registry.register_collector(Box::new(Figures(figures)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).map_err(|_| {
        log::error!("cannot write the metrics in Prometheus' format");
        ApiError::internal()
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// The Orchestrator's figures at the moment of a scrape.
#[derive(Debug)]
struct Figures(Metrics);

/// A model's figure for one series.
type Of = fn(&ModelMetrics) -> f64;

/// The series with one value per model: name, help, type, value.
const PER_MODEL: &[(&str, &str, MetricType, Of)] = &[
    (
        "genius_requests_running",
        "Requests being answered now",
        MetricType::Gauge,
        |m| m.running as f64,
    ),
    (
        "genius_requests_queued",
        "Requests waiting for their model or for a place in its batch",
        MetricType::Gauge,
        |m| m.queued as f64,
    ),
    (
        "genius_prompt_tokens",
        "Prompt tokens of ended requests, read from the cache or decoded",
        MetricType::Counter,
        |m| m.prompt_tokens as f64,
    ),
    (
        "genius_prompt_cached_tokens",
        "Prompt tokens served from the KV cache instead of being decoded",
        MetricType::Counter,
        |m| m.cached_prompt_tokens as f64,
    ),
    (
        "genius_prompt_decoded_tokens",
        "Prompt tokens decoded (not found in the cache)",
        MetricType::Counter,
        |m| m.prompt_tokens.saturating_sub(m.cached_prompt_tokens) as f64,
    ),
    (
        "genius_generated_tokens",
        "Tokens generated",
        MetricType::Counter,
        |m| m.generated_tokens as f64,
    ),
    (
        "genius_draft_tokens",
        "Tokens guessed ahead and checked (speculative decoding)",
        MetricType::Counter,
        |m| m.draft_tokens as f64,
    ),
    (
        "genius_draft_accepted_tokens",
        "Tokens guessed ahead that the model chose too",
        MetricType::Counter,
        |m| m.accepted_draft_tokens as f64,
    ),
    (
        "genius_embedded_inputs",
        "Texts embedded",
        MetricType::Counter,
        |m| m.embedded_inputs as f64,
    ),
    (
        "genius_prompt_seconds",
        "Seconds spent decoding prompts",
        MetricType::Counter,
        |m| m.prompt_seconds,
    ),
    (
        "genius_generation_seconds",
        "Seconds spent generating",
        MetricType::Counter,
        |m| m.generation_seconds,
    ),
    (
        "genius_model_loads",
        "Completed model loads",
        MetricType::Counter,
        |m| m.loads as f64,
    ),
    (
        "genius_model_load_failures",
        "Model loads that failed",
        MetricType::Counter,
        |m| m.load_failures as f64,
    ),
    (
        "genius_model_evictions",
        "Unloads to make room for another model",
        MetricType::Counter,
        |m| m.evictions as f64,
    ),
    (
        "genius_model_hibernations",
        "Unloads after the model's idle time",
        MetricType::Counter,
        |m| m.hibernations as f64,
    ),
    (
        "genius_model_releases",
        "Unloads asked for",
        MetricType::Counter,
        |m| m.releases as f64,
    ),
    (
        "genius_model_resident",
        "Whether the model is in memory (1) or not (0)",
        MetricType::Gauge,
        |m| f64::from(u8::from(m.resident)),
    ),
    (
        "genius_model_memory_bytes",
        "The estimated host memory of the model while it is in memory",
        MetricType::Gauge,
        |m| m.memory_bytes as f64,
    ),
    (
        "genius_kv_cells_used",
        "KV cache cells holding a token",
        MetricType::Gauge,
        |m| m.engine.kv_cells_used as f64,
    ),
    (
        "genius_kv_cells",
        "KV cache cells of the context",
        MetricType::Gauge,
        |m| m.engine.kv_cells_total as f64,
    ),
    (
        "genius_kv_cache_usage_ratio",
        "The share of KV cache cells holding a token",
        MetricType::Gauge,
        |m| {
            if m.engine.kv_cells_total == 0 {
                0.0
            } else {
                m.engine.kv_cells_used as f64 / m.engine.kv_cells_total as f64
            }
        },
    ),
    (
        "genius_ram_tier_bytes",
        "Bytes of slot caches kept in RAM for later prompts",
        MetricType::Gauge,
        |m| m.engine.ram_tier_bytes as f64,
    ),
    (
        "genius_cache_restore_misses",
        "Saved KV caches that could not be read back (the prompt was decoded instead)",
        MetricType::Counter,
        |m| m.engine.restore_misses as f64,
    ),
    (
        "genius_engine_steps",
        "Engine steps taken",
        MetricType::Counter,
        |m| m.engine.steps as f64,
    ),
    (
        "genius_engine_step_seconds",
        "Seconds spent in engine steps (decoding prompts, generating, embedding)",
        MetricType::Counter,
        |m| m.engine.step_micros as f64 / 1e6,
    ),
];

/// Which of a model's histograms.
type Which = fn(&ModelMetrics) -> &Spread;

/// The histograms, one per model: name, help, which.
const HISTOGRAMS: &[(&str, &str, Which)] = &[
    (
        "genius_time_to_first_token_seconds",
        "Seconds from a request's arrival to its first token",
        |m| &m.time_to_first_token,
    ),
    (
        "genius_time_per_output_token_seconds",
        "Seconds per generated token after the first",
        |m| &m.time_per_output_token,
    ),
    (
        "genius_request_duration_seconds",
        "Seconds from a request's arrival to its end",
        |m| &m.request_duration,
    ),
];

/// A model's counts for a counter split by a second label.
type Split = fn(&ModelMetrics) -> Vec<(&'static str, u64)>;

/// The counters split by a second label: name, help, label, the counts.
const SPLIT: &[(&str, &str, &str, Split)] = &[
    ("genius_requests", "Generation and embedding requests that ended, by model and outcome (completed, failed, cancelled)", "outcome", |m| vec![
        ("completed", m.requests_completed),
        ("failed", m.requests_failed),
        ("cancelled", m.requests_cancelled),
    ]),
    ("genius_cache_restores", "Saved KV caches read back into a slot, by where they were kept (ram, disk)", "tier", |m| vec![
        ("ram", m.engine.restores_ram),
        ("disk", m.engine.restores_disk),
    ]),
];

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let models = &self.0.models;
        for &(name, help, kind, value) in PER_MODEL {
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for model in models {
                let labels = [("model", model.name.as_str())];
                let mut family = metric.encode_family(&labels)?;
                let value = value(model);
                match kind {
                    MetricType::Counter => {
                        family.encode_counter::<NoLabelSet, _, f64>(&value, None)?;
                    }
                    _ => family.encode_gauge(&value)?,
                }
            }
        }
        for &(name, help, spread) in HISTOGRAMS {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for model in models {
                let labels = [("model", model.name.as_str())];
                let spread = spread(model);
                let buckets: Vec<(f64, u64)> = spread.buckets().collect();
                metric
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(spread.sum, spread.count(), &buckets, None)?;
            }
        }
        for &(name, help, label, counts) in SPLIT {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for model in models {
                for (value, count) in counts(model) {
                    let labels = [("model", model.name.as_str()), (label, value)];
                    metric
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }
        }
        encoder
            .encode_descriptor(
                "genius_queue_rejected_requests",
                "Requests refused because the queue was full (--max-queue)",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.0.rejected_queue_full, None)?;
        if let Some(limit) = self.0.max_queue {
            encoder
                .encode_descriptor(
                    "genius_queue_limit_requests",
                    "The most requests that may wait (--max-queue)",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&(limit as u64))?;
        }
        Ok(())
    }
}
