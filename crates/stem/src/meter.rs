//! The one place requests are counted: every request's events pass
//! through a [`Metered`] sink on their way to its stream, which notes its
//! first token, its usage and how it ended in the [`Tally`] the loop reads
//! for [`OrchestratorHandle::metrics`](crate::OrchestratorHandle::metrics).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusty_genius_core::metrics::{Histogram, ModelMetrics, TOKEN_BOUNDS};
use rusty_genius_core::protocol::{FinishReason, InferenceEvent, Usage};
use rusty_genius_core::ErrorReport;
use rusty_genius_cortex::EventSink;

/// The counters of every model, shared by the loop and the sinks (which
/// the engine threads drive).
#[derive(Clone, Default)]
pub(crate) struct Tally(Arc<Mutex<HashMap<String, ModelMetrics>>>);

impl Tally {
    /// The counters, for a moment (a poisoned lock still counts: a
    /// counter is never left half-updated).
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<String, ModelMetrics>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes the counters of `model`, making them if they are new.
    pub(crate) fn update(&self, model: &str, change: impl FnOnce(&mut ModelMetrics)) {
        let mut models = self.lock();
        let metrics = match models.get_mut(model) {
            Some(metrics) => metrics,
            None => models
                .entry(model.to_owned())
                .or_insert_with(|| fresh(model)),
        };
        change(metrics);
    }
}

/// The counters of a model not yet seen.
pub(crate) fn fresh(model: &str) -> ModelMetrics {
    ModelMetrics {
        name: model.to_owned(),
        time_per_output_token: Histogram::new(TOKEN_BOUNDS),
        ..ModelMetrics::default()
    }
}

/// A request's sink, counting what passes.
pub(crate) struct Metered {
    inner: Box<dyn EventSink>,
    tally: Tally,
    model: String,
    arrived: Instant,
    first_token: Option<Duration>,
    usage: Option<Usage>,
    embedded: u64,
    ended: bool,
}

impl Metered {
    /// Counts `inner`'s request, for `model`, from now.
    pub(crate) fn new(inner: Box<dyn EventSink>, tally: Tally, model: String) -> Self {
        Self {
            inner,
            tally,
            model,
            arrived: Instant::now(),
            first_token: None,
            usage: None,
            embedded: 0,
            ended: false,
        }
    }

    fn note(&mut self, event: &Result<InferenceEvent, ErrorReport>) {
        match event {
            Ok(
                InferenceEvent::Content(_)
                | InferenceEvent::Thought(_)
                | InferenceEvent::ToolCall { .. },
            ) if self.first_token.is_none() => {
                self.first_token = Some(self.arrived.elapsed());
            }
            Ok(InferenceEvent::Usage(usage)) => self.usage = Some(usage.clone()),
            Ok(InferenceEvent::Embeddings(embeddings)) => {
                self.embedded = embeddings.vectors.len() as u64;
            }
            Ok(InferenceEvent::Complete) => self.end(true),
            Err(_) => self.end(false),
            Ok(_) => {}
        }
    }

    /// Counts the request's end, once.
    fn end(&mut self, answered: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        let took = self.arrived.elapsed();
        let usage = self.usage.take();
        let first_token = self.first_token;
        let embedded = self.embedded;
        self.tally.update(&self.model, |metrics| {
            metrics.request_duration.observe(took);
            let cancelled = usage
                .as_ref()
                .is_some_and(|u| u.finish_reason == FinishReason::Cancelled);
            if !answered {
                metrics.requests_failed += 1;
            } else if cancelled {
                metrics.requests_cancelled += 1;
            } else {
                metrics.requests_completed += 1;
            }
            metrics.embedded_inputs += embedded;
            if let Some(first) = first_token {
                metrics.time_to_first_token.observe(first);
            }
            if let Some(usage) = usage {
                metrics.prompt_tokens += usage.prompt_tokens as u64;
                metrics.cached_prompt_tokens += usage.cached_tokens as u64;
                metrics.generated_tokens += usage.generated_tokens as u64;
                metrics.draft_tokens += usage.draft_tokens as u64;
                metrics.accepted_draft_tokens += usage.accepted_draft_tokens as u64;
                metrics.prompt_seconds += usage.prompt_ms / 1000.0;
                metrics.generation_seconds += usage.generation_ms / 1000.0;
                if usage.generated_tokens >= 2 && usage.generation_ms > 0.0 {
                    // The first token's time is the prompt's; the rest
                    // share the generation.
                    let per_token =
                        usage.generation_ms / 1000.0 / (usage.generated_tokens - 1) as f64;
                    metrics
                        .time_per_output_token
                        .observe(Duration::from_secs_f64(per_token));
                }
            }
        });
    }
}

impl EventSink for Metered {
    fn send(&mut self, event: Result<InferenceEvent, ErrorReport>) -> bool {
        self.note(&event);
        self.inner.send(event)
    }

    fn backlog(&self) -> usize {
        self.inner.backlog()
    }
}

impl Drop for Metered {
    /// A request dropped without an end (its engine went away) failed.
    fn drop(&mut self) {
        self.end(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;

    impl EventSink for Nowhere {
        fn send(&mut self, _: Result<InferenceEvent, ErrorReport>) -> bool {
            true
        }
    }

    #[test]
    fn a_request_is_counted_once_with_its_tokens_and_times() {
        let tally = Tally::default();
        let mut sink = Metered::new(Box::new(Nowhere), tally.clone(), "m".into());
        sink.send(Ok(InferenceEvent::ProcessStart));
        sink.send(Ok(InferenceEvent::Content("a".into())));
        sink.send(Ok(InferenceEvent::Content("b".into())));
        sink.send(Ok(InferenceEvent::Usage(Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            generated_tokens: 3,
            draft_tokens: 0,
            accepted_draft_tokens: 0,
            prompt_ms: 5.0,
            generation_ms: 20.0,
            finish_reason: FinishReason::EndOfGeneration,
        })));
        sink.send(Ok(InferenceEvent::Complete));
        drop(sink);
        let models = tally.lock();
        let m = &models["m"];
        assert_eq!(m.requests_completed, 1);
        assert_eq!(m.requests_failed, 0);
        assert_eq!((m.prompt_tokens, m.cached_prompt_tokens), (10, 4));
        assert_eq!(m.generated_tokens, 3);
        assert_eq!(m.time_to_first_token.count(), 1);
        assert_eq!(m.time_per_output_token.count(), 1);
        assert!((m.time_per_output_token.sum - 0.01).abs() < 1e-9);
        assert_eq!(m.request_duration.count(), 1);
    }

    #[test]
    fn a_sink_dropped_without_an_end_counts_as_failed() {
        let tally = Tally::default();
        drop(Metered::new(Box::new(Nowhere), tally.clone(), "m".into()));
        assert_eq!(tally.lock()["m"].requests_failed, 1);
    }
}
