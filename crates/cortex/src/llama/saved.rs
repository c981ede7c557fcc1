//! Slot caches kept out of their slots: the RAM tier, where a slot's
//! state goes when another conversation takes the slot, and the disk tier
//! (`snapshot.rs`) behind it. A request whose prompt one of them holds
//! more of than any free slot does gets that state read back into a slot,
//! and decodes only the rest.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::token::LlamaToken;

use super::slot::{usable, SHARE_MIN};
use super::snapshot::{self, ModelSnapshots, Saved, Shape};
use super::Loaded;

/// Saved caches in memory, most recently saved or used first, within a
/// byte budget.
pub(super) struct RamTier {
    budget: usize,
    held: usize,
    saved: VecDeque<Saved>,
}

impl RamTier {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            budget,
            held: 0,
            saved: VecDeque::new(),
        }
    }

    /// The bytes of the caches it holds.
    pub(super) fn held(&self) -> usize {
        self.held
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Saved> {
        self.saved.iter()
    }

    /// Takes out the `index`th cache (it goes back into a slot).
    pub(super) fn take(&mut self, index: usize) -> Option<Saved> {
        let saved = self.saved.remove(index)?;
        self.held -= saved.bytes();
        Some(saved)
    }

    /// Whether a cache here holds these tokens, or more starting with them.
    pub(super) fn covers(&self, tokens: &[LlamaToken]) -> bool {
        self.saved.iter().any(|s| s.tokens.starts_with(tokens))
    }

    /// Keeps `saved`, dropping the caches it holds all of; returns the
    /// caches pushed out past the budget (oldest first), for the disk
    /// tier. One larger than the whole budget comes straight back.
    pub(super) fn put(&mut self, saved: Saved) -> Vec<Saved> {
        if saved.bytes() > self.budget {
            return vec![saved];
        }
        let mut kept = VecDeque::with_capacity(self.saved.len() + 1);
        for old in self.saved.drain(..) {
            if saved.tokens.starts_with(&old.tokens) {
                self.held -= old.bytes();
            } else {
                kept.push_back(old);
            }
        }
        self.saved = kept;
        self.held += saved.bytes();
        self.saved.push_front(saved);
        let mut out = Vec::new();
        while self.held > self.budget {
            let Some(oldest) = self.saved.pop_back() else {
                break;
            };
            self.held -= oldest.bytes();
            out.push(oldest);
        }
        out
    }

    /// Empties the tier, oldest last.
    pub(super) fn drain(&mut self) -> Vec<Saved> {
        self.held = 0;
        self.saved.drain(..).collect()
    }
}

/// The disk tier of a loaded model: its snapshots in `root`, once the
/// model file's sha256 is known. A file hashed before (or named by its
/// hash in a Hub cache) has its snapshots listed at load; any other is
/// hashed, and its snapshots listed, in the background (hashing a large
/// file takes a while), and until then no snapshot is read or written.
pub(super) struct Disk {
    pending: Option<mpsc::Receiver<std::io::Result<Arc<ModelSnapshots>>>>,
    snapshots: Option<Arc<ModelSnapshots>>,
}

impl Disk {
    /// The snapshots in `root` of the model at `path`, whose caches have
    /// `shape` (its `model` is filled in here).
    pub(super) fn start(root: &Path, budget: u64, mut shape: Shape, path: &Path) -> Self {
        if let Some(known) = snapshot::known_sha256(path, root) {
            shape.model = known;
            return Self {
                pending: None,
                snapshots: Some(ModelSnapshots::open(root, shape, budget)),
            };
        }
        let (tell, pending) = mpsc::channel();
        let (path, root) = (path.to_path_buf(), root.to_path_buf());
        let spawned = std::thread::Builder::new()
            .name("genius-model-sha256".into())
            .spawn(move || {
                let opened = snapshot::hash_model(&path, &root).map(|sha| {
                    shape.model = sha;
                    ModelSnapshots::open(&root, shape, budget)
                });
                let _ = tell.send(opened);
            });
        if let Err(err) = &spawned {
            log::warn!("KV snapshots are off: cannot start a thread ({err})");
        }
        Self {
            pending: spawned.ok().map(|_| pending),
            snapshots: None,
        }
    }

    /// The model's snapshots, waiting up to `wait` for them to be listed;
    /// `None` while they are not (or cannot be).
    pub(super) fn snapshots(&mut self, wait: Duration) -> Option<Arc<ModelSnapshots>> {
        if self.snapshots.is_none() {
            let found = self.pending.as_ref()?.recv_timeout(wait);
            match found {
                Ok(Ok(snapshots)) => {
                    self.snapshots = Some(snapshots);
                    self.pending = None;
                }
                Ok(Err(err)) => {
                    log::warn!("KV snapshots are off for this model: cannot hash its file ({err})");
                    self.pending = None;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => self.pending = None,
            }
        }
        self.snapshots.clone()
    }
}

/// Where a kept cache is.
pub(super) enum Source {
    Ram(usize),
    Disk(snapshot::Entry),
}

/// A kept cache that holds more of a prompt than any free slot.
pub(super) struct Kept {
    pub(super) source: Source,
    /// The prompt's tokens after it (spliced onto its transcript).
    pub(super) tokens: Vec<LlamaToken>,
}

/// How long an unload waits for the model file's sha256 to save its
/// snapshots.
const IDENTITY_WAIT: Duration = Duration::from_secs(30);

impl Loaded {
    /// The kept cache (RAM first, then disk) that spares the most of the
    /// prompt `text` (tokenized as `tokens`), when that beats the `in_slot`
    /// tokens the best free slot spares by at least `SHARE_MIN`, or spares
    /// the whole prompt.
    pub(super) fn best_kept(
        &mut self,
        text: &str,
        tokens: &[LlamaToken],
        in_slot: usize,
    ) -> Option<Kept> {
        // The most tokens spared so far, and by which cache.
        let mut best: Option<(usize, Vec<LlamaToken>)> = None;
        let mut consider = |this: &Self,
                            cached: &[LlamaToken],
                            transcript: Option<&str>,
                            logits_after: Option<usize>|
         -> bool {
            if cached.first() != tokens.first() {
                return false;
            }
            let spliced = this.continue_transcript(cached, transcript, text, tokens);
            let spared = usable(cached, logits_after, &spliced);
            let whole = spared == spliced.len();
            let better = spared > in_slot && (whole || spared >= in_slot + SHARE_MIN);
            if better && best.as_ref().is_none_or(|(most, _)| spared > *most) {
                best = Some((spared, spliced));
                return true;
            }
            false
        };
        let mut source = None;
        for (at, saved) in self.ram.iter().enumerate() {
            let logits_after = saved.logits.as_ref().map(|(len, _)| *len);
            if consider(
                self,
                &saved.tokens,
                saved.transcript.as_deref(),
                logits_after,
            ) {
                source = Some(Source::Ram(at));
            }
        }
        let snapshots = self
            .disk
            .as_mut()
            .and_then(|disk| disk.snapshots(Duration::ZERO));
        if let Some(snapshots) = snapshots {
            snapshots.for_each(|entry| {
                if consider(
                    self,
                    &entry.tokens,
                    entry.transcript.as_deref(),
                    entry.logits_after,
                ) {
                    source = Some(Source::Disk(entry.clone()));
                }
            });
        }
        let (source, (_, tokens)) = (source?, best?);
        Some(Kept { source, tokens })
    }

    /// The free slot a kept cache is read into: the one holding least.
    pub(super) fn restore_target(&self) -> usize {
        crate::plan::pick_slot(
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, slot)| slot.job.is_none())
                .map(|(index, slot)| (index, 0, slot.cached.len())),
            0,
        )
        .unwrap_or(0)
    }

    /// Reads a kept cache into slot `index` (whose own cache goes to the
    /// RAM tier first); false if it could not be, and the slot is empty.
    pub(super) fn restore(&mut self, index: usize, source: Source) -> bool {
        if self.copies_pending {
            // A sequence copy not yet carried out would land on top.
            return false;
        }
        let started = Instant::now();
        let from_ram = matches!(source, Source::Ram(_));
        let (saved, from) = match source {
            Source::Ram(at) => (self.ram.take(at), "RAM"),
            Source::Disk(entry) => (
                self.disk
                    .as_mut()
                    .and_then(|disk| disk.snapshots(Duration::ZERO))
                    .and_then(|snapshots| snapshots.read(&entry)),
                "disk",
            ),
        };
        let Some(saved) = saved else {
            self.counts.restore_misses += 1;
            return false;
        };
        if !self.slots[index].cached.is_empty() {
            self.stash(index);
        }
        self.reset_slot(index);
        let seq = self.slots[index].seq;
        let read = self.cell.with_dependent_mut(|_, contexts| {
            // SAFETY: the bytes are a state llama.cpp wrote for a sequence
            // of a context of this very shape (a snapshot's shape and
            // checksum are checked before it gets here), and llama.cpp
            // reads them with bounds checks, failing (0) rather than reading
            // past their end.
            unsafe {
                contexts
                    .main
                    .state_seq_set_data_ext(&saved.state, seq, LlamaStateSeqFlags::empty())
            }
        });
        if !read {
            log::warn!(
                "llama.cpp refused a saved KV cache of {} tokens (from {from}); decoding the prompt",
                saved.tokens.len()
            );
            self.counts.restore_misses += 1;
            self.reset_slot(index);
            return false;
        }
        log::info!(
            "restored {} cached tokens into slot {index} from {from} in {:.1} ms",
            saved.tokens.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        if from_ram {
            self.counts.restores_ram += 1;
        } else {
            self.counts.restores_disk += 1;
        }
        let slot = &mut self.slots[index];
        slot.cached = saved.tokens;
        slot.transcript = saved.transcript;
        slot.prompt_logits = saved.logits;
        true
    }

    /// Slot `index`'s cache, copied out of the context; `None` if it is
    /// too short to be worth keeping or cannot be copied now.
    fn save_slot(&self, index: usize) -> Option<Saved> {
        let slot = &self.slots[index];
        if slot.cached.len() < SHARE_MIN || self.copies_pending {
            return None;
        }
        let context = &self.cell.borrow_dependent().main;
        let size = context.state_seq_get_size_ext(slot.seq, LlamaStateSeqFlags::empty());
        let mut state = vec![0u8; size];
        // SAFETY: `state` has the room llama.cpp just said the sequence's
        // state takes, and nothing changes the context in between.
        let written = unsafe {
            context.state_seq_get_data_ext(
                state.as_mut_ptr(),
                slot.seq,
                LlamaStateSeqFlags::empty(),
            )
        };
        if written != size || size == 0 {
            log::debug!("cannot copy out the KV cache of slot {index} ({written} of {size} bytes)");
            return None;
        }
        Some(Saved {
            tokens: slot.cached.clone(),
            transcript: slot.transcript.clone(),
            logits: slot.prompt_logits.clone(),
            state,
        })
    }

    /// Moves slot `index`'s cache to the RAM tier before the slot is taken
    /// for another prompt (what the tier pushes out goes to disk).
    pub(super) fn stash(&mut self, index: usize) {
        if self.ram.covers(&self.slots[index].cached) {
            return;
        }
        let started = Instant::now();
        let Some(saved) = self.save_slot(index) else {
            return;
        };
        log::debug!(
            "kept the {} cached tokens of slot {index} in RAM ({:.1} MiB, {:.1} ms)",
            saved.tokens.len(),
            saved.bytes() as f64 / (1 << 20) as f64,
            started.elapsed().as_secs_f64() * 1e3
        );
        let out = self.ram.put(saved);
        if out.is_empty() {
            return;
        }
        if let Some(snapshots) = self
            .disk
            .as_mut()
            .and_then(|disk| disk.snapshots(Duration::ZERO))
        {
            for saved in out {
                snapshots.write(&saved);
            }
        }
    }

    /// Writes every slot's cache and the RAM tier to disk, as the model
    /// leaves memory.
    pub(super) fn save_all(&mut self) {
        let Some(snapshots) = self
            .disk
            .as_mut()
            .and_then(|disk| disk.snapshots(IDENTITY_WAIT))
        else {
            return;
        };
        for index in 0..self.slots.len() {
            if let Some(saved) = self.save_slot(index) {
                snapshots.write(&saved);
            }
        }
        for saved in self.ram.drain() {
            snapshots.write(&saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(tokens: &[i32], state: usize) -> Saved {
        Saved {
            tokens: tokens.iter().copied().map(LlamaToken).collect(),
            transcript: None,
            logits: None,
            state: vec![0; state],
        }
    }

    #[test]
    fn the_ram_tier_keeps_the_newest_within_its_budget_and_drops_what_a_longer_one_holds() {
        let mut ram = RamTier::new(100);
        assert!(ram.put(saved(&[1, 2], 40)).is_empty());
        assert!(ram.put(saved(&[1, 2, 3], 40)).is_empty());
        assert_eq!(ram.iter().count(), 1, "[1, 2] is held by [1, 2, 3]");
        assert!(ram.covers(&[1, 2].map(LlamaToken)));
        assert!(ram.put(saved(&[7], 40)).is_empty());
        let out = ram.put(saved(&[8], 40));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tokens, [1, 2, 3].map(LlamaToken));
        assert_eq!(ram.put(saved(&[9], 200)).len(), 1, "larger than the budget");
        assert_eq!(ram.take(0).unwrap().tokens, [LlamaToken(8)]);
        assert_eq!(ram.drain().len(), 1);
    }
}
