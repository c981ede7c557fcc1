//! Engines stop at a safe point when the process exits.
//!
//! When `main` returns (or `std::process::exit` is called) while an engine
//! thread is still computing, the C library runs its exit handlers, and
//! among them the destructors of llama.cpp's static objects (ggml's list
//! of CPU buffer types, llama.cpp's tables of names), under the running
//! engine thread, which then reads freed memory and the process dies with
//! SIGSEGV (seen in about 1 run in 15 of an example piped into `head`).
//!
//! So every engine thread does its work inside the [`gate`](enter): an
//! exit handler, registered with the C library after llama.cpp's own
//! statics exist (it runs before their destructors, handlers running in
//! reverse order), closes the gate, tells running computations to stop
//! ([`closing`], which llama.cpp's abort callback reads between the
//! operations of a step), and waits, at most [`EXIT_WAIT`], for every
//! thread inside to leave. A thread that comes to the closed gate never
//! runs engine code again: it sleeps until the process is gone.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest the exit handler waits for engine threads to reach a safe
/// point: a running step stops within one of llama.cpp's operations, but
/// a model being read from disk finishes first.
pub(crate) const EXIT_WAIT: Duration = Duration::from_secs(20);

/// The gate: whether it is closed, and how many threads are inside.
struct Gate {
    closed: AtomicBool,
    inside: Mutex<usize>,
    left: Condvar,
}

static GATE: Gate = Gate::new();

/// Whether the process is exiting: computations should stop now.
pub(crate) fn closing() -> bool {
    GATE.closed.load(Ordering::Acquire)
}

/// Engine code runs while this is held.
#[must_use = "the gate is left when this is dropped"]
pub(crate) struct Inside(&'static Gate);

/// Enters the gate; when the process is exiting, never returns (the thread
/// sleeps until the process is gone).
pub(crate) fn enter() -> Inside {
    GATE.enter()
}

impl Gate {
    const fn new() -> Self {
        Self {
            closed: AtomicBool::new(false),
            inside: Mutex::new(0),
            left: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.inside.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&'static self) -> Inside {
        let mut inside = self.lock();
        if self.closed.load(Ordering::Acquire) {
            drop(inside);
            park_forever();
        }
        *inside += 1;
        Inside(self)
    }

    /// Closes the gate and waits, at most `limit`, until no thread is
    /// inside; whether they all left.
    fn close_and_wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut inside = self.lock();
        self.closed.store(true, Ordering::Release);
        while *inside > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            inside = self
                .left
                .wait_timeout(inside, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        let mut inside = self.0.lock();
        *inside -= 1;
        if *inside == 0 {
            self.0.left.notify_all();
        }
    }
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// How many times the exit handler was registered; each registration
/// comes after the static objects that existed then, so it is renewed
/// while new ones may appear (first loads and steps), a bounded number of
/// times.
static REGISTERED: AtomicUsize = AtomicUsize::new(0);
const MOST_REGISTRATIONS: usize = 16;

/// Registers the exit handler (again), so that it runs before the
/// destructors of every static object llama.cpp has made so far. Called
/// after the backend starts, after loads and after first steps.
pub(crate) fn guard_statics() {
    if REGISTERED.fetch_add(1, Ordering::AcqRel) >= MOST_REGISTRATIONS {
        return;
    }
    register();
}

#[cfg(unix)]
fn register() {
    // glibc gives the handler the exit status, so that a handler that
    // gives up waiting can end the process with it at once; elsewhere
    // the plain C handler returns and lets the exit go on.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn on_exit(
                handler: extern "C" fn(status: std::ffi::c_int, arg: *mut std::ffi::c_void),
                arg: *mut std::ffi::c_void,
            ) -> std::ffi::c_int;
        }
        extern "C" fn at_exit(status: std::ffi::c_int, _: *mut std::ffi::c_void) {
            exiting(Some(status));
        }
        // SAFETY: `at_exit` is a plain function that lives as long as the
        // program and ignores its argument.
        unsafe { on_exit(at_exit, std::ptr::null_mut()) };
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        extern "C" {
            fn atexit(handler: extern "C" fn()) -> std::ffi::c_int;
        }
        extern "C" fn at_exit() {
            exiting(None);
        }
        // SAFETY: `at_exit` is a plain function that lives as long as the
        // program.
        unsafe { atexit(at_exit) };
    }
}

#[cfg(not(unix))]
fn register() {}

/// The exit handler: engines stop; if one cannot in time, the process
/// ends at once with `status`, before any static is destroyed under it.
#[cfg(unix)]
fn exiting(status: Option<std::ffi::c_int>) {
    if closing() {
        // An earlier registration already did the work.
        return;
    }
    if GATE.close_and_wait(EXIT_WAIT) {
        return;
    }
    if let Some(status) = status {
        extern "C" {
            fn _exit(status: std::ffi::c_int) -> !;
        }
        // SAFETY: ends the process without running the remaining exit
        // handlers, which is the point; Rust's own output was flushed
        // before the C library's exit began.
        unsafe { _exit(status) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closed_gate_waits_for_those_inside_and_keeps_others_out() {
        static TEST_GATE: Gate = Gate::new();
        let inside = TEST_GATE.enter();
        let worker = std::thread::spawn(|| {
            let _inside = TEST_GATE.enter();
            std::thread::sleep(Duration::from_millis(50));
        });
        while *TEST_GATE.lock() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(inside);
        assert!(TEST_GATE.close_and_wait(Duration::from_secs(5)));
        worker.join().unwrap();
        // A thread that comes now never gets in.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _inside = TEST_GATE.enter();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(*TEST_GATE.lock(), 0);
        // The process's own gate is another one, still open.
        assert!(!closing());
    }

    #[test]
    fn the_wait_gives_up_at_its_limit() {
        static TEST_GATE: Gate = Gate::new();
        let inside = TEST_GATE.enter();
        let started = Instant::now();
        assert!(!TEST_GATE.close_and_wait(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(inside);
        assert!(TEST_GATE.close_and_wait(Duration::from_millis(50)));
    }
}
