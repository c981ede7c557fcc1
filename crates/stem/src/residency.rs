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
    /// The most host memory, in bytes, the loaded models may take
    /// together, by their estimates. Default: the memory the machine has
    /// available when the Orchestrator is built (`MemAvailable` on Linux;
    /// unbounded where it cannot be read).
    pub memory_budget: u64,
    /// The most GPU memory, in bytes, the loaded models' offloaded layers
    /// may take together, by their estimates. Default: the free memory of
    /// the devices the default engine offloads to when the Orchestrator is
    /// built; unbounded when it offloads nothing.
    pub device_budget: u64,
    /// How long a model waits for busy models to become idle before its
    /// requests fail. Default 60 s.
    pub wait: Duration,
}

impl Default for Residency {
    fn default() -> Self {
        Self {
            max_models: 3,
            memory_budget: available_memory().unwrap_or(u64::MAX),
            device_budget: rusty_genius_cortex::default_device_memory().unwrap_or(u64::MAX),
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

    /// Sets [`device_budget`](Self::device_budget).
    pub fn with_device_budget(mut self, bytes: u64) -> Self {
        self.device_budget = bytes;
        self
    }

    /// Sets [`wait`](Self::wait).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Whether `memory` fits in both budgets.
    fn holds(&self, memory: Memory) -> bool {
        memory.host <= self.memory_budget && memory.device <= self.device_budget
    }
}

/// The memory this machine has available now, in bytes.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory a model takes, on the host and on its GPU devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Memory {
    pub(crate) host: u64,
    pub(crate) device: u64,
}

impl Memory {
    #[cfg(test)]
    pub(crate) fn host(bytes: u64) -> Self {
        Self {
            host: bytes,
            device: 0,
        }
    }

    pub(crate) fn plus(self, other: Self) -> Self {
        Self {
            host: self.host.saturating_add(other.host),
            device: self.device.saturating_add(other.device),
        }
    }

    pub(crate) fn minus(self, other: Self) -> Self {
        Self {
            host: self.host.saturating_sub(other.host),
            device: self.device.saturating_sub(other.device),
        }
    }
}

impl std::iter::Sum for Memory {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), Self::plus)
    }
}

/// A model that holds memory, as [`find_room`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) name: String,
    pub(crate) memory: Memory,
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
    /// It never fits: larger than the whole host budget.
    TooLarge,
    /// It never fits: its offloaded layers are larger than the whole
    /// device budget.
    TooLargeForDevice,
}

/// Decides how a model taking `needed` gets room among `holders` (the
/// models loaded or loading), with `freeing` still held by models being
/// unloaded. Host and device memory are each held to their own budget.
pub(crate) fn find_room(
    policy: &Residency,
    holders: &[Holder],
    freeing: Memory,
    needed: Memory,
) -> Room {
    if needed.host > policy.memory_budget {
        return Room::TooLarge;
    }
    if needed.device > policy.device_budget {
        return Room::TooLargeForDevice;
    }
    let held: Memory = holders.iter().map(|h| h.memory).sum();
    let fits =
        |held: Memory, count: usize| count < policy.max_models && policy.holds(held.plus(needed));
    if fits(held, holders.len()) {
        return if fits(held.plus(freeing), holders.len()) {
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
        // Only a model that frees what is short goes: a model on the CPU
        // makes no room on the GPU.
        let wanted = held_after.plus(needed);
        let helps = count_after >= policy.max_models
            || (wanted.host > policy.memory_budget && holder.memory.host > 0)
            || (wanted.device > policy.device_budget && holder.memory.device > 0);
        if !helps {
            continue;
        }
        held_after = held_after.minus(holder.memory);
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
    } else if held_after.host.saturating_add(needed.host) > policy.memory_budget {
        format!(
            "the busy models take {} of the {} byte memory budget",
            held_after.host, policy.memory_budget
        )
    } else {
        format!(
            "the busy models take {} of the {} bytes of GPU memory",
            held_after.device, policy.device_budget
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
            memory: Memory::host(bytes),
            busy,
            last_used: now - Duration::from_secs(age),
        }
    }

    fn policy(max_models: usize, budget: u64) -> Residency {
        Residency {
            max_models,
            memory_budget: budget,
            device_budget: u64::MAX,
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
            find_room(&policy(2, 100), &holders, Memory::host(0), Memory::host(10)),
            Room::Evict(vec!["old".into()])
        );
        assert_eq!(
            find_room(&policy(3, 100), &holders, Memory::host(0), Memory::host(10)),
            Room::Fits
        );
    }

    #[test]
    fn a_busy_model_is_never_evicted() {
        let now = Instant::now();
        let holders = [
            holder("busy-old", 10, true, 9, now),
            holder("idle-new", 10, false, 1, now),
        ];
        assert_eq!(
            find_room(&policy(2, 100), &holders, Memory::host(0), Memory::host(10)),
            Room::Evict(vec!["idle-new".into()])
        );
        let busy = [holder("a", 10, true, 1, now), holder("b", 10, true, 2, now)];
        assert!(matches!(
            find_room(&policy(2, 100), &busy, Memory::host(0), Memory::host(10)),
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
            find_room(&policy(8, 100), &holders, Memory::host(0), Memory::host(30)),
            Room::Evict(vec!["a".into()])
        );
        // Evicting the idle one would not make room next to a busy 80.
        let holders = [
            holder("big", 80, true, 9, now),
            holder("c", 10, false, 1, now),
        ];
        assert!(matches!(
            find_room(&policy(8, 100), &holders, Memory::host(0), Memory::host(30)),
            Room::Wait(_)
        ));
        assert_eq!(
            find_room(
                &policy(8, 100),
                &holders,
                Memory::host(0),
                Memory::host(101)
            ),
            Room::TooLarge
        );
        assert_eq!(
            find_room(&policy(8, 100), &holders, Memory::host(5), Memory::host(10)),
            Room::WaitForFreeing
        );
    }

    #[test]
    fn gpu_memory_is_held_to_its_own_budget() {
        let now = Instant::now();
        let on_gpu = |name: &str, host, device, busy, age| Holder {
            memory: Memory { host, device },
            ..holder(name, 0, busy, age, now)
        };
        let policy = Residency {
            device_budget: 50,
            ..policy(8, 1000)
        };
        let needed = Memory {
            host: 10,
            device: 30,
        };
        // Host memory is plenty; the GPU holds 40 of 50, so the older
        // offloaded model goes, and the model on the CPU stays.
        let holders = [
            on_gpu("cpu-only", 500, 0, false, 9),
            on_gpu("gpu-old", 10, 20, false, 8),
            on_gpu("gpu-new", 10, 20, false, 1),
        ];
        assert_eq!(
            find_room(&policy, &holders, Memory::default(), needed),
            Room::Evict(vec!["gpu-old".into()])
        );
        let busy = [on_gpu("gpu-busy", 10, 40, true, 1)];
        assert!(matches!(
            find_room(&policy, &busy, Memory::default(), needed),
            Room::Wait(why) if why.contains("GPU memory")
        ));
        assert_eq!(
            find_room(
                &policy,
                &[],
                Memory::default(),
                Memory {
                    host: 1,
                    device: 51
                }
            ),
            Room::TooLargeForDevice
        );
    }
}
