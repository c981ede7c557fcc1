//! One compute scheduler for every engine in the process.
//!
//! llama.cpp's CPU threads spin at a barrier after every operation of a
//! step, waiting for each other. Two engines that each run a step over
//! every core put twice as many spinning threads as there are cores, and
//! each step then waits, at every barrier, for a thread the OS has put
//! aside (measured on 2 cores: a mix of two models 2-11× slower than each
//! alone). So the cores are leased: an engine takes a [`Lease`] before a
//! step, runs the step with exactly as many llama.cpp threads as the lease
//! holds, and gives it back after. Steps of different models then share
//! the cores in space (one core each on two cores: no barrier waits at
//! all) or, with more models than cores, in turns.
//!
//! [`grant`] is the decision, a pure function of who holds, who waits and
//! who is between two steps; [`Cores`] carries it out with a mutex and a
//! condition variable, for the engine threads, which may block.
//!
//! - A model alone gets every core (up to the threads it may use).
//! - Models with work share the cores equally. A model between two steps
//!   still counts for a moment ([`BETWEEN`]): it will be back at once, and
//!   without it the other model would take every core for its next step,
//!   turning a split into turns.
//! - Leases go out in the order they were asked for: no model waits for a
//!   later one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a model that finished a step still counts as wanting cores:
/// longer than the work an engine does between two steps (ending requests,
/// starting new ones, a template rendered and tokenized).
pub(crate) const BETWEEN: Duration = Duration::from_millis(100);

/// Where one engine stands, as [`grant`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// No work.
    Idle,
    /// Finished a step at the instant given, with more work to come.
    Between(Instant),
    /// Asked for a lease; tickets give the order.
    Waiting(u64),
    /// Runs a step on this many cores.
    Holding(usize),
}

/// One engine: where it stands, and the most threads its steps can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) standing: Standing,
    pub(crate) cap: usize,
}

impl Member {
    /// Whether it counts among those the cores are shared by.
    fn contends(&self, now: Instant) -> bool {
        match self.standing {
            Standing::Idle => false,
            Standing::Between(at) => now.saturating_duration_since(at) < BETWEEN,
            Standing::Waiting(_) | Standing::Holding(_) => true,
        }
    }
}

/// The leases to give now, as (index in `members`, cores): the waiting
/// members, oldest ticket first, each with its share of the `total`
/// cores, for as long as the free cores hold the next one's share. A share
/// is an equal part of the cores among the members that contend (each at
/// most its cap; what one cannot use goes to the others), and at least
/// one core: with more models than cores, they take turns.
pub(crate) fn grant(total: usize, members: &[Member], now: Instant) -> Vec<(usize, usize)> {
    let held: usize = members
        .iter()
        .map(|m| match m.standing {
            Standing::Holding(cores) => cores,
            _ => 0,
        })
        .sum();
    let mut free = total.max(1).saturating_sub(held);
    let waiting = waiting(members);
    if waiting.is_empty() || free == 0 {
        return Vec::new();
    }
    let shares = fair_shares(total, members, &waiting, now);
    let mut grants = Vec::new();
    for index in waiting {
        let share = share_of(&shares, index);
        if share > free {
            break;
        }
        free -= share;
        grants.push((index, share));
    }
    grants
}

/// The holders that hold more than their share while another member
/// waits: a step of theirs that can stop early should, so that the cores
/// are shared from the next step on.
pub(crate) fn over_share(total: usize, members: &[Member], now: Instant) -> Vec<usize> {
    let waiting = waiting(members);
    if waiting.is_empty() {
        return Vec::new();
    }
    let shares = fair_shares(total, members, &waiting, now);
    members
        .iter()
        .enumerate()
        .filter_map(|(index, m)| match m.standing {
            Standing::Holding(cores) if cores > share_of(&shares, index) => Some(index),
            _ => None,
        })
        .collect()
}

/// The indices of the waiting members, oldest ticket first.
fn waiting(members: &[Member]) -> Vec<usize> {
    let mut waiting: Vec<(u64, usize)> = members
        .iter()
        .enumerate()
        .filter_map(|(index, m)| match m.standing {
            Standing::Waiting(ticket) => Some((ticket, index)),
            _ => None,
        })
        .collect();
    waiting.sort_unstable();
    waiting.into_iter().map(|(_, index)| index).collect()
}

/// Every contending member's share, as (index, cores), in the order the
/// remainders go: holders, then the `waiting` (by ticket, as [`waiting`]
/// gives them), then those between steps.
fn fair_shares(
    total: usize,
    members: &[Member],
    waiting: &[usize],
    now: Instant,
) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = members
        .iter()
        .enumerate()
        .filter(|(_, m)| matches!(m.standing, Standing::Holding(_)))
        .map(|(index, _)| index)
        .collect();
    order.extend_from_slice(waiting);
    order.extend(
        members
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.standing, Standing::Between(_)) && m.contends(now))
            .map(|(index, _)| index),
    );
    let caps: Vec<usize> = order
        .iter()
        .map(|&index| members[index].cap.max(1))
        .collect();
    order.into_iter().zip(shares(total.max(1), &caps)).collect()
}

/// The share of member `index` (at least one core).
fn share_of(shares: &[(usize, usize)], index: usize) -> usize {
    shares
        .iter()
        .find(|(i, _)| *i == index)
        .map_or(1, |(_, share)| *share)
        .max(1)
}

/// `total` cores dealt out one at a time, in order, to those below their
/// cap: equal parts, the remainder to the first.
fn shares(total: usize, caps: &[usize]) -> Vec<usize> {
    let mut shares = vec![0; caps.len()];
    let mut left = total;
    while left > 0 {
        let mut dealt = false;
        for (share, &cap) in shares.iter_mut().zip(caps) {
            if left == 0 {
                break;
            }
            if *share < cap {
                *share += 1;
                left -= 1;
                dealt = true;
            }
        }
        if !dealt {
            break;
        }
    }
    shares
}

/// The cores of a process, leased to engines' steps.
///
/// One instance serves the whole process ([`Cores::process`]); engines
/// take a [`Seat`] when they load a model and a [`Lease`] for each step.
#[derive(Debug)]
pub struct Cores {
    total: usize,
    table: Mutex<Table>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Table {
    /// Members by seat id; `None` for seats given back.
    members: Vec<Option<Member>>,
    /// Each seat's flag, raised when it holds more than its share while
    /// another waits.
    nudges: Vec<Arc<AtomicBool>>,
    next_ticket: u64,
}

impl Table {
    /// Turns the waiting members that [`grant`] picks into holders.
    fn hand_out(&mut self, total: usize) -> bool {
        let now = Instant::now();
        let present: Vec<(usize, Member)> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(id, m)| m.map(|m| (id, m)))
            .collect();
        let mut view: Vec<Member> = present.iter().map(|&(_, m)| m).collect();
        let grants = grant(total, &view, now);
        for &(index, cores) in &grants {
            view[index].standing = Standing::Holding(cores);
            if let Some(member) = &mut self.members[present[index].0] {
                member.standing = Standing::Holding(cores);
            }
        }
        for index in over_share(total, &view, now) {
            self.nudges[present[index].0].store(true, Ordering::Release);
        }
        !grants.is_empty()
    }

    /// When the earliest member between steps stops counting, if any does.
    fn next_expiry(&self) -> Option<Instant> {
        self.members
            .iter()
            .flatten()
            .filter_map(|m| match m.standing {
                Standing::Between(at) => Some(at + BETWEEN),
                _ => None,
            })
            .min()
    }

    fn others_contending(&self, id: usize, now: Instant) -> usize {
        self.members
            .iter()
            .enumerate()
            .filter(|&(other, m)| other != id && m.is_some_and(|m| m.contends(now)))
            .count()
    }
}

impl Cores {
    /// A scheduler over `total` cores.
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            table: Mutex::new(Table::default()),
            changed: Condvar::new(),
        })
    }

    /// The process's scheduler, over [`default_threads`] cores: every
    /// engine of the process shares it unless given another.
    pub fn process() -> Arc<Self> {
        static PROCESS: OnceLock<Arc<Cores>> = OnceLock::new();
        PROCESS.get_or_init(|| Self::new(default_threads())).clone()
    }

    /// How many cores it leases.
    pub fn total(&self) -> usize {
        self.total
    }

    /// A place for one engine whose steps use at most `cap` threads.
    pub fn seat(self: &Arc<Self>, cap: usize) -> Seat {
        let mut table = self.lock();
        let member = Member {
            standing: Standing::Idle,
            cap: cap.max(1),
        };
        let id = match table.members.iter().position(Option::is_none) {
            Some(free) => {
                table.members[free] = Some(member);
                table.nudges[free] = Arc::new(AtomicBool::new(false));
                free
            }
            None => {
                table.members.push(Some(member));
                table.nudges.push(Arc::new(AtomicBool::new(false)));
                table.members.len() - 1
            }
        };
        Seat {
            cores: self.clone(),
            id,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table is a list of small copies, never half-written.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets seat `id`'s standing and hands out what that frees.
    fn set(&self, id: usize, standing: Standing) {
        let mut table = self.lock();
        if let Some(member) = &mut table.members[id] {
            member.standing = standing;
        }
        if table.hand_out(self.total) {
            self.changed.notify_all();
        }
    }
}

/// One engine's place at a [`Cores`]; given back when dropped.
#[derive(Debug)]
pub struct Seat {
    cores: Arc<Cores>,
    id: usize,
}

impl Seat {
    /// Waits for a lease, then holds it until the lease is dropped. Blocks
    /// the calling thread: engine threads only.
    pub fn lease(&self) -> Lease<'_> {
        let cores = &self.cores;
        let mut table = cores.lock();
        let ticket = table.next_ticket;
        table.next_ticket += 1;
        if let Some(member) = &mut table.members[self.id] {
            member.standing = Standing::Waiting(ticket);
        }
        if table.hand_out(cores.total) {
            cores.changed.notify_all();
        }
        loop {
            if let Some(Member {
                standing: Standing::Holding(held),
                ..
            }) = table.members[self.id]
            {
                table.nudges[self.id].store(false, Ordering::Release);
                let others = table.others_contending(self.id, Instant::now());
                return Lease {
                    seat: self,
                    cores: held,
                    others,
                };
            }
            // A member between steps stops counting after a while, and
            // nobody signals that: look again then.
            table = match table.next_expiry() {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    let (mut table, _) = cores
                        .changed
                        .wait_timeout(table, wait.max(Duration::from_millis(1)))
                        .unwrap_or_else(|p| p.into_inner());
                    if table.hand_out(cores.total) {
                        cores.changed.notify_all();
                    }
                    table
                }
                None => cores.changed.wait(table).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Says the engine has no work for now: its share goes to the others
    /// at once instead of after [`BETWEEN`].
    pub fn idle(&self) {
        self.cores.set(self.id, Standing::Idle);
    }

    /// How many other engines want cores now.
    pub fn others(&self) -> usize {
        let table = self.cores.lock();
        table.others_contending(self.id, Instant::now())
    }

    /// A flag raised while this seat holds more cores than its share and
    /// another engine waits for them: a step that can stop early (one that
    /// gives nobody a token) may stop, and the next step gets the share.
    pub fn nudge(&self) -> Arc<AtomicBool> {
        self.cores.lock().nudges[self.id].clone()
    }

    /// The most threads this seat's steps use.
    pub fn cap(&self) -> usize {
        self.cores.lock().members[self.id].map_or(1, |m| m.cap)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut table = self.cores.lock();
        table.members[self.id] = None;
        if table.hand_out(self.cores.total) {
            self.cores.changed.notify_all();
        }
    }
}

/// Cores held for one step; given back when dropped.
#[derive(Debug)]
pub struct Lease<'seat> {
    seat: &'seat Seat,
    cores: usize,
    others: usize,
}

impl Lease<'_> {
    /// How many cores it holds: the step's thread count.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// How many other engines wanted cores when it was given.
    pub fn others(&self) -> usize {
        self.others
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.seat
            .cores
            .set(self.seat.id, Standing::Between(Instant::now()));
    }
}

/// The threads llama.cpp computes with by default: `GENIUS_THREADS`, else
/// one per physical core this process may run on (a core's second
/// hardware thread shares its vector units, and llama.cpp's threads slow
/// each other down there), else every logical CPU.
pub fn default_threads() -> usize {
    if let Some(threads) = std::env::var("GENIUS_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return threads;
    }
    let logical = std::thread::available_parallelism().map_or(4, |n| n.get());
    physical_cores().map_or(logical, |physical| physical.clamp(1, logical))
}

/// The physical cores among the CPUs this process may run on (Linux).
fn physical_cores() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let allowed = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?;
    let mut cores = std::collections::BTreeSet::new();
    for cpu in cpu_list(allowed.trim())? {
        let siblings = std::fs::read_to_string(format!(
            "/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        ))
        .ok()?;
        cores.insert(siblings.trim().to_owned());
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// The CPUs of a Linux CPU list such as `0-3,8,10-11`.
fn cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if last < first || last - first > 4096 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn member(standing: Standing) -> Member {
        Member { standing, cap: 8 }
    }

    #[test]
    fn a_model_alone_gets_every_core() {
        let now = Instant::now();
        let members = [member(Standing::Waiting(0)), member(Standing::Idle)];
        assert_eq!(grant(2, &members, now), vec![(0, 2)]);
        // ...up to the threads it may use.
        let capped = [Member {
            standing: Standing::Waiting(0),
            cap: 1,
        }];
        assert_eq!(grant(4, &capped, now), vec![(0, 1)]);
    }

    #[test]
    fn models_with_work_split_the_cores() {
        let now = Instant::now();
        // Both ask at once: one core each.
        let both = [member(Standing::Waiting(1)), member(Standing::Waiting(0))];
        assert_eq!(grant(2, &both, now), vec![(1, 1), (0, 1)]);
        // One is between two steps: the other takes only its share.
        let between = [member(Standing::Between(now)), member(Standing::Waiting(3))];
        assert_eq!(grant(2, &between, now), vec![(1, 1)]);
        // ...until it has been away too long.
        let later = now + BETWEEN + Duration::from_millis(1);
        assert_eq!(grant(2, &between, later), vec![(1, 2)]);
        // Uneven cores: the remainder goes to the one holding, then to
        // the oldest ticket.
        let three = [
            member(Standing::Waiting(7)),
            member(Standing::Waiting(5)),
            member(Standing::Idle),
        ];
        assert_eq!(grant(3, &three, now), vec![(1, 2), (0, 1)]);
    }

    #[test]
    fn a_newcomer_waits_for_a_running_step_to_give_back_its_cores() {
        let now = Instant::now();
        let members = [member(Standing::Holding(2)), member(Standing::Waiting(0))];
        assert!(grant(2, &members, now).is_empty());
        let members = [member(Standing::Holding(1)), member(Standing::Waiting(0))];
        assert_eq!(grant(2, &members, now), vec![(1, 1)]);
    }

    #[test]
    fn what_one_model_cannot_use_goes_to_the_others() {
        let now = Instant::now();
        let members = [
            Member {
                standing: Standing::Holding(1),
                cap: 1,
            },
            member(Standing::Waiting(0)),
        ];
        assert_eq!(grant(4, &members, now), vec![(1, 3)]);
    }

    #[test]
    fn more_models_than_cores_take_turns_in_ticket_order() {
        let now = Instant::now();
        let members = [
            member(Standing::Holding(1)),
            member(Standing::Waiting(9)),
            member(Standing::Waiting(4)),
        ];
        // One core free: the older ticket gets it.
        assert_eq!(grant(2, &members, now), vec![(2, 1)]);
        let members = [
            member(Standing::Waiting(10)),
            member(Standing::Waiting(9)),
            member(Standing::Waiting(4)),
        ];
        assert_eq!(grant(2, &members, now), vec![(2, 1), (1, 1)]);
    }

    #[test]
    fn a_later_ticket_never_jumps_the_queue() {
        let now = Instant::now();
        // The oldest waiter's share (2 of 6) does not fit in the 1 core
        // free; the younger one, whose share would, waits behind it.
        let members = [
            member(Standing::Holding(5)),
            Member {
                standing: Standing::Waiting(1),
                cap: 8,
            },
            Member {
                standing: Standing::Waiting(2),
                cap: 1,
            },
        ];
        assert!(grant(6, &members, now).is_empty());
    }

    #[test]
    fn a_holder_over_its_share_is_nudged_when_another_waits() {
        let now = Instant::now();
        // Alone with both cores, then another model asks.
        let members = [member(Standing::Holding(2)), member(Standing::Waiting(0))];
        assert_eq!(over_share(2, &members, now), vec![0]);
        // At its share, or with nobody waiting: left alone.
        let members = [member(Standing::Holding(1)), member(Standing::Waiting(0))];
        assert!(over_share(2, &members, now).is_empty());
        let members = [member(Standing::Holding(2)), member(Standing::Between(now))];
        assert!(over_share(2, &members, now).is_empty());
        // Turns among more models than cores are no reason.
        let members = [
            member(Standing::Holding(1)),
            member(Standing::Holding(1)),
            member(Standing::Waiting(0)),
        ];
        assert!(over_share(2, &members, now).is_empty());
    }

    #[test]
    fn shares_are_equal_and_capped() {
        assert_eq!(shares(2, &[8, 8]), vec![1, 1]);
        assert_eq!(shares(5, &[8, 8]), vec![3, 2]);
        assert_eq!(shares(8, &[1, 8, 2]), vec![1, 5, 2]);
        assert_eq!(shares(2, &[8, 8, 8]), vec![1, 1, 0]);
        assert_eq!(shares(9, &[1, 1]), vec![1, 1]);
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(cpu_list("0-3,8,10-11"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(cpu_list("5"), Some(vec![5]));
        assert_eq!(cpu_list("3-1"), None);
        assert_eq!(cpu_list("x"), None);
    }

    /// Threads that lease at random never hold more cores together than
    /// there are, and every one gets its turn.
    #[test]
    fn leases_never_hold_more_than_the_cores() {
        let cores = Cores::new(3);
        let held = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..5)
            .map(|n| {
                let seat = cores.seat(if n % 2 == 0 { 8 } else { 1 });
                let (held, most) = (held.clone(), most.clone());
                std::thread::spawn(move || {
                    for step in 0..40 {
                        let lease = seat.lease();
                        let now = held.fetch_add(lease.cores(), Ordering::SeqCst) + lease.cores();
                        most.fetch_max(now, Ordering::SeqCst);
                        assert!(lease.cores() >= 1 && lease.cores() <= seat.cap());
                        std::thread::sleep(Duration::from_micros(200 + (step * 37 % 300)));
                        held.fetch_sub(lease.cores(), Ordering::SeqCst);
                        drop(lease);
                        if step % 7 == 0 {
                            seat.idle();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 3);
        assert!(most.load(Ordering::SeqCst) >= 2);
    }

    /// A step that started alone with every core, and a second engine
    /// that asks meanwhile: it gets its share when the step ends, and the
    /// first one's next step gets only its own share.
    #[test]
    fn a_running_engine_shares_from_its_next_step() {
        let cores = Cores::new(2);
        let (a, b) = (cores.seat(8), cores.seat(8));
        let first = a.lease();
        assert_eq!(first.cores(), 2);
        assert_eq!(first.others(), 0);
        let nudge = a.nudge();
        assert!(!nudge.load(Ordering::Acquire));
        let (got, release) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (got_tx, got_rx) = got;
        let (release_tx, release_rx) = release;
        let waiter = std::thread::spawn(move || {
            let lease = b.lease();
            got_tx.send(lease.cores()).unwrap();
            release_rx.recv().unwrap();
            drop(lease);
            b.idle();
        });
        // The second engine queues up behind the running step, which is
        // asked to stop early.
        while !nudge.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(a.others(), 1);
        drop(first);
        assert_eq!(got_rx.recv().unwrap(), 1);
        let second = a.lease();
        assert!(!nudge.load(Ordering::Acquire));
        assert_eq!(second.cores(), 1);
        assert_eq!(second.others(), 1);
        drop(second);
        release_tx.send(()).unwrap();
        waiter.join().unwrap();
        a.idle();
        assert_eq!(a.lease().cores(), 2);
    }
}
