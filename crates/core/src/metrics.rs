//! What an Orchestrator has done so far, as plain figures: the counters
//! and histograms an operator charts (`genius serve --metrics` renders
//! them in Prometheus' text format), and the engine's own state (its KV
//! cache, its saved caches) as each engine last reported it.
//!
//! Counters only grow while the Orchestrator runs; gauges say how things
//! stand at the moment of the snapshot.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything measured, per model, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// One entry per model the Orchestrator has been asked for, by the
    /// name requests use, sorted by name.
    pub models: Vec<ModelMetrics>,
    /// Requests refused because the queue was full (`max_queue`), across
    /// every model.
    pub rejected_queue_full: u64,
    /// The bound on waiting requests, if there is one.
    pub max_queue: Option<usize>,
}

impl Metrics {
    /// The figures of the model named `name`.
    pub fn model(&self, name: &str) -> Option<&ModelMetrics> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Requests waiting for a place, across every model.
    pub fn queued(&self) -> usize {
        self.models.iter().map(|m| m.queued).sum()
    }
}

/// The figures of one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    /// The name requests use for it.
    pub name: String,
    /// Requests answered in full (an end of text, a stop, a length or
    /// time limit): generations and embeddings.
    pub requests_completed: u64,
    /// Requests that ended with an error.
    pub requests_failed: u64,
    /// Requests cancelled before their end (the client went away).
    pub requests_cancelled: u64,
    /// Requests being answered now.
    pub running: usize,
    /// Requests waiting for the model or for a place in its batch.
    pub queued: usize,
    /// Prompt tokens of ended requests, cached or not.
    pub prompt_tokens: u64,
    /// Of `prompt_tokens`, those served from the KV cache (a kept prefix,
    /// a saved cache read back) instead of being decoded.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Tokens guessed ahead and checked (speculative decoding).
    pub draft_tokens: u64,
    /// Of `draft_tokens`, those the model chose too.
    pub accepted_draft_tokens: u64,
    /// Texts embedded.
    pub embedded_inputs: u64,
    /// Seconds spent decoding prompts.
    pub prompt_seconds: f64,
    /// Seconds spent generating.
    pub generation_seconds: f64,
    /// From a request's arrival to its first token (generations only).
    pub time_to_first_token: Histogram,
    /// Per generated token after the first (generations of two tokens or
    /// more).
    pub time_per_output_token: Histogram,
    /// From a request's arrival to its end, errors included.
    pub request_duration: Histogram,
    /// Completed loads.
    pub loads: u64,
    /// Loads that failed.
    pub load_failures: u64,
    /// Unloads to make room for another model.
    pub evictions: u64,
    /// Unloads after the idle time.
    pub hibernations: u64,
    /// Unloads asked for.
    pub releases: u64,
    /// Whether it is in memory now (loading or loaded).
    pub resident: bool,
    /// Its estimated size in host memory, in bytes.
    pub memory_bytes: u64,
    /// What its engine last reported; all zero before it first loads.
    pub engine: EngineStats,
}

impl ModelMetrics {
    /// Requests that have ended, however they ended.
    pub fn requests(&self) -> u64 {
        self.requests_completed + self.requests_failed + self.requests_cancelled
    }

    /// The share of prompt tokens served from the cache (0 when no prompt
    /// has been read).
    pub fn cache_hit_ratio(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_prompt_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// The state of an engine, as it reports it: gauges of the moment, and
/// counters since the Orchestrator started (the Orchestrator adds up the
/// counters of a model's successive engines).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    /// KV cache cells holding a token now, across every slot.
    pub kv_cells_used: u64,
    /// KV cache cells the context has.
    pub kv_cells_total: u64,
    /// Bytes of slot caches kept in RAM (the RAM tier).
    pub ram_tier_bytes: u64,
    /// Saved caches read back into a slot from RAM.
    pub restores_ram: u64,
    /// Saved caches read back into a slot from a snapshot on disk.
    pub restores_disk: u64,
    /// Saved caches that could not be read back (refused by llama.cpp, or
    /// a snapshot gone or damaged): the prompt was decoded instead.
    pub restore_misses: u64,
    /// Engine steps taken.
    pub steps: u64,
    /// Time spent in those steps, in microseconds.
    pub step_micros: u64,
}

impl EngineStats {
    /// `self`'s counters added to `earlier`'s (a model's past engines),
    /// with `self`'s gauges.
    pub fn after(self, earlier: EngineStats) -> EngineStats {
        EngineStats {
            restores_ram: earlier.restores_ram + self.restores_ram,
            restores_disk: earlier.restores_disk + self.restores_disk,
            restore_misses: earlier.restore_misses + self.restore_misses,
            steps: earlier.steps + self.steps,
            step_micros: earlier.step_micros + self.step_micros,
            ..self
        }
    }

    /// The counters alone (gauges zero): what an engine leaves behind
    /// once it is gone.
    pub fn counters(self) -> EngineStats {
        EngineStats {
            restores_ram: self.restores_ram,
            restores_disk: self.restores_disk,
            restore_misses: self.restore_misses,
            steps: self.steps,
            step_micros: self.step_micros,
            ..EngineStats::default()
        }
    }
}

/// A histogram of durations in seconds, with fixed bucket bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// The upper bound of each bucket, in seconds, ascending; one more
    /// bucket, without bound, takes the rest.
    pub bounds: Vec<f64>,
    /// How many observations fell into each bucket (not cumulative):
    /// `bounds.len() + 1` entries, the last for those above every bound.
    pub counts: Vec<u64>,
    /// The sum of every observation, in seconds.
    pub sum: f64,
}

/// Bucket bounds for request latencies, from 5 ms to 5 minutes.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Bucket bounds for the time per output token, from 1 ms to 2 s.
pub const TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Self::new(LATENCY_BOUNDS)
    }
}

impl Histogram {
    /// An empty histogram with these bucket bounds (seconds, ascending).
    pub fn new(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Counts one observation.
    pub fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get_mut(bucket) {
            *count += 1;
        }
        self.sum += seconds;
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Each bucket's upper bound and its own observations, the last
    /// bound `+Inf`.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().copied())
    }

    /// Each bound with the observations at or below it (cumulative, as
    /// Prometheus' buckets count), the last bound `+Inf`.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut total = 0;
        self.buckets().map(move |(bound, count)| {
            total += count;
            (bound, total)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() {
        let mut histogram = Histogram::new(&[0.1, 1.0]);
        histogram.observe(Duration::from_millis(100));
        histogram.observe(Duration::from_millis(500));
        histogram.observe(Duration::from_secs(7));
        assert_eq!(histogram.counts, vec![1, 1, 1]);
        assert_eq!(histogram.count(), 3);
        assert!((histogram.sum - 7.6).abs() < 1e-9);
        let buckets: Vec<(f64, u64)> = histogram.buckets().collect();
        assert_eq!(buckets, vec![(0.1, 1), (1.0, 1), (f64::INFINITY, 1)]);
        let cumulative: Vec<(f64, u64)> = histogram.cumulative().collect();
        assert_eq!(cumulative, vec![(0.1, 1), (1.0, 2), (f64::INFINITY, 3)]);
    }

    #[test]
    fn counters_add_up_across_engines_and_gauges_are_the_latest() {
        let first = EngineStats {
            kv_cells_used: 10,
            kv_cells_total: 100,
            restores_disk: 2,
            steps: 50,
            ..EngineStats::default()
        };
        let second = EngineStats {
            kv_cells_used: 3,
            kv_cells_total: 100,
            restores_ram: 1,
            steps: 5,
            ..EngineStats::default()
        };
        let total = second.after(first.counters());
        assert_eq!(total.kv_cells_used, 3);
        assert_eq!(total.restores_disk, 2);
        assert_eq!(total.restores_ram, 1);
        assert_eq!(total.steps, 55);
    }
}
