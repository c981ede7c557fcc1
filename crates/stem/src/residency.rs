//! How many models stay in memory at once, and which one leaves to make
//! room for another.
//!
//! [`Residency`] is the policy an application sets; [`find_room`] is the
//! decision, a pure function of what is resident, so it is tested without
//! an engine.

use std::time::{Duration, Instant};

/// The limits on the models an Orchestrator keeps loaded at once.
///
/// A model is estimated before it loads (weights, KV cache for its context
/// × parallel requests, working buffers, from the GGUF header). When it
/// does not fit, the least recently used *idle* models are unloaded until
/// it does; a model with running or queued requests is never unloaded for
/// another. When even that is not enough, the model waits for room, at
/// most [`wait`](Self::wait), and its requests then fail with
/// `NoRoomForModel`; a model larger than the whole budget fails at once
/// with `ModelTooLarge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residency {
    /// The most models loaded (or loading) at once. Default 3.
    pub max_models: usize,
    /// The most memory, in bytes, the loaded models may take together, by
    /// their estimates. Default: the memory the machine has available when
    /// the Orchestrator is built (`MemAvailable` on Linux; unbounded where
    /// it cannot be read).
    pub memory_budget: u64,
    /// How long a model waits for busy models to become idle before its
    /// requests fail. Default 60 s.
    pub wait: Duration,
}

impl Default for Residency {
    fn default() -> Self {
        Self {
            max_models: 3,
            memory_budget: available_memory().unwrap_or(u64::MAX),
            wait: Duration::from_secs(60),
        }
    }
}

impl Residency {
    /// Sets [`max_models`](Self::max_models) (at least 1).
    pub fn with_max_models(mut self, max_models: usize) -> Self {
        self.max_models = max_models.max(1);
        self
    }

    /// Sets [`memory_budget`](Self::memory_budget).
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Sets [`wait`](Self::wait).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// The memory this machine has available now, in bytes.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A model that holds memory, as [`find_room`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) name: String,
    pub(crate) bytes: u64,
    /// Running or queued requests, or a load in progress: not evictable.
    pub(crate) busy: bool,
    pub(crate) last_used: Instant,
}

/// What to do to load a model of `bytes`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Room {
    /// It fits now.
    Fits,
    /// It fits once these idle models (least recently used first) are
    /// unloaded.
    Evict(Vec<String>),
    /// It fits once the memory of models already being unloaded is freed.
    WaitForFreeing,
    /// It does not fit until busy models become idle: why, in words.
    Wait(String),
    /// It never fits: larger than the whole budget.
    TooLarge,
}

/// Decides how a model of `bytes` gets room among `holders` (the models
/// loaded or loading), with `freeing` bytes still held by models being
/// unloaded.
pub(crate) fn find_room(policy: &Residency, holders: &[Holder], freeing: u64, bytes: u64) -> Room {
    if bytes > policy.memory_budget {
        return Room::TooLarge;
    }
    let held: u64 = holders.iter().map(|h| h.bytes).sum();
    let fits = |held: u64, count: usize| {
        count < policy.max_models && held.saturating_add(bytes) <= policy.memory_budget
    };
    if fits(held, holders.len()) {
        return if fits(held + freeing, holders.len()) {
            Room::Fits
        } else {
            Room::WaitForFreeing
        };
    }
    let mut idle: Vec<&Holder> = holders.iter().filter(|h| !h.busy).collect();
    idle.sort_by_key(|h| h.last_used);
    let (mut held_after, mut count_after) = (held, holders.len());
    let mut evict = Vec::new();
    for holder in idle {
        if fits(held_after, count_after) {
            break;
        }
        held_after -= holder.bytes;
        count_after -= 1;
        evict.push(holder.name.clone());
    }
    if fits(held_after, count_after) {
        return Room::Evict(evict);
    }
    let why = if holders.len() - evict.len() >= policy.max_models {
        format!(
            "{} models are loaded and busy, the most allowed at once",
            holders.len() - evict.len()
        )
    } else {
        format!(
            "the busy models take {} of the {} byte memory budget",
            held_after, policy.memory_budget
        )
    };
    Room::Wait(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(name: &str, bytes: u64, busy: bool, age: u64, now: Instant) -> Holder {
        Holder {
            name: name.into(),
            bytes,
            busy,
            last_used: now - Duration::from_secs(age),
        }
    }

    fn policy(max_models: usize, budget: u64) -> Residency {
        Residency {
            max_models,
            memory_budget: budget,
            wait: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_least_recently_used_idle_model_goes_first() {
        let now = Instant::now();
        let holders = [
            holder("new", 10, false, 1, now),
            holder("old", 10, false, 9, now),
        ];
        assert_eq!(
            find_room(&policy(2, 100), &holders, 0, 10),
            Room::Evict(vec!["old".into()])
        );
        assert_eq!(find_room(&policy(3, 100), &holders, 0, 10), Room::Fits);
    }

    #[test]
    fn a_busy_model_is_never_evicted() {
        let now = Instant::now();
        let holders = [
            holder("busy-old", 10, true, 9, now),
            holder("idle-new", 10, false, 1, now),
        ];
        assert_eq!(
            find_room(&policy(2, 100), &holders, 0, 10),
            Room::Evict(vec!["idle-new".into()])
        );
        let busy = [holder("a", 10, true, 1, now), holder("b", 10, true, 2, now)];
        assert!(matches!(
            find_room(&policy(2, 100), &busy, 0, 10),
            Room::Wait(why) if why.contains("busy")
        ));
    }

    #[test]
    fn memory_evicts_as_few_as_needed_and_never_more_than_helps() {
        let now = Instant::now();
        let holders = [
            holder("a", 40, false, 9, now),
            holder("b", 40, false, 5, now),
            holder("c", 10, false, 1, now),
        ];
        // 90 held, 100 budget: a 30 needs 20 more, so `a` alone goes.
        assert_eq!(
            find_room(&policy(8, 100), &holders, 0, 30),
            Room::Evict(vec!["a".into()])
        );
        // Evicting the idle one would not make room next to a busy 80.
        let holders = [
            holder("big", 80, true, 9, now),
            holder("c", 10, false, 1, now),
        ];
        assert!(matches!(
            find_room(&policy(8, 100), &holders, 0, 30),
            Room::Wait(_)
        ));
        assert_eq!(find_room(&policy(8, 100), &holders, 0, 101), Room::TooLarge);
        assert_eq!(
            find_room(&policy(8, 100), &holders, 5, 10),
            Room::WaitForFreeing
        );
    }
}
