//! Connections of `genius serve`: HTTP/1.1 over each accepted socket, with
//! the timeouts a server facing arbitrary clients needs.
//!
//! Every connection is watched. One that has sent part of a request head
//! must finish it within the header timeout (a client sending half its
//! headers, or a byte a second, is cut off); one with no request in
//! flight is closed after the idle timeout; and one whose client stops
//! reading the answer for as long is closed too, which drops the answer's
//! stream and so stops its generation. The body timeout is the handlers'
//! (they read bodies). On shutdown no new connection is taken, idle ones
//! close, and open answers finish.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

/// How long a connection may take over each part of its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// From the first byte of a request head to its end.
    pub(crate) header: Duration,
    /// To receive a whole request body (the handlers apply it).
    pub(crate) body: Duration,
    /// Without a request in flight, or with an answer the client does not
    /// read.
    pub(crate) idle: Duration,
}

/// Connections the kernel holds for the server before it accepts them.
/// Rust's default (128, as in `std`) drops connections from a crowd of
/// clients arriving at once (600 at once overflowed it; the dropped ones
/// see a reset). The kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// A listener on `addr` with room for [`BACKLOG`] connections waiting to
/// be accepted.
pub(crate) fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted server can bind at once.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves `app` on every connection `listener` accepts, until `shutdown`
/// completes; then lets the open answers finish.
pub(crate) async fn serve(
    listeners: Vec<TcpListener>,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // Each listener accepts on its own task; the connections meet here.
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(16);
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let accepted_tx = accepted_tx.clone();
            tokio::spawn(async move {
                loop {
                    let accepted = listener.accept().await;
                    if accepted_tx.send(accepted).await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(accepted_tx);
    loop {
        let accepted = tokio::select! {
            accepted = accepted_rx.recv() => match accepted {
                Some(accepted) => accepted,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait a moment rather than
                // spinning on the error.
                log::warn!("cannot accept a connection: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let service = {
            let activity = activity.clone();
            let app = app.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let activity = activity.clone();
                let app = app.clone();
                async move {
                    activity.begin();
                    let response = app.oneshot(request.map(Body::new)).await;
                    response.map(|response| {
                        response.map(|body| {
                            Body::new(Tracked {
                                inner: body,
                                _end: EndOfAnswer(activity),
                            })
                        })
                    })
                }
            })
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // The watchdog below keeps time (hyper's own header timer would
            // also close idle keep-alive connections after the same time).
            .header_read_timeout(None)
            .serve_connection(io, service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        log::debug!("connection from {peer}: {err}");
                    }
                }
                reason = watchdog(&activity, timeouts) => {
                    log::info!("closed the connection from {peer}: {reason}");
                }
            }
        });
    }
    // No new connections; the open ones finish their answers.
    for acceptor in acceptors {
        acceptor.abort();
    }
    drop(accepted_rx);
    graceful.shutdown().await;
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight and none begun.
    Idle = 0,
    /// Part of a request head has arrived.
    Head = 1,
    /// A request is being answered.
    Busy = 2,
}

/// What a connection's watchdog knows of it.
struct Activity {
    phase: AtomicU8,
    /// When the phase last changed, or (while an answer is written) when
    /// the client last took bytes.
    since: Mutex<Instant>,
    /// Since when writes have been refused because the client is not
    /// reading; `None` while they go through.
    stalled: Mutex<Option<Instant>>,
    in_flight: AtomicUsize,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Idle as u8),
            since: Mutex::new(Instant::now()),
            stalled: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Idle,
            1 => Phase::Head,
            _ => Phase::Busy,
        }
    }

    fn set(&self, phase: Phase) {
        *self.since.lock().expect("not poisoned") = Instant::now();
        self.phase.store(phase as u8, Ordering::Release);
        self.changed.notify_one();
    }

    /// Bytes of a request arrived.
    fn read(&self) {
        if self.phase() == Phase::Idle {
            self.set(Phase::Head);
        }
    }

    /// A request head is complete: it is being answered.
    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.set(Phase::Busy);
    }

    /// An answer was written to the end (or dropped).
    fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.set(Phase::Idle);
        }
    }

    fn wrote(&self, refused: bool) {
        let mut stalled = self.stalled.lock().expect("not poisoned");
        match (refused, stalled.is_some()) {
            (true, false) => {
                *stalled = Some(Instant::now());
                drop(stalled);
                self.changed.notify_one();
            }
            (false, true) => *stalled = None,
            _ => {}
        }
    }
}

/// Completes when the connection has overstayed one of its timeouts, with
/// the reason.
async fn watchdog(activity: &Activity, timeouts: Timeouts) -> &'static str {
    loop {
        let since = *activity.since.lock().expect("not poisoned");
        let stalled = *activity.stalled.lock().expect("not poisoned");
        let (deadline, reason) = match (activity.phase(), stalled) {
            (Phase::Idle, _) => (since + timeouts.idle, "idle for too long"),
            (Phase::Head, _) => (
                since + timeouts.header,
                "the request head did not arrive in time",
            ),
            (Phase::Busy, Some(stalled)) => (
                stalled + timeouts.idle,
                "the client stopped reading its answer",
            ),
            (Phase::Busy, None) => {
                activity.changed.notified().await;
                continue;
            }
        };
        let wait = tokio::time::sleep_until(deadline.into());
        tokio::select! {
            () = wait => {
                // The phase may have moved on just now: look again.
                let still = *activity.since.lock().expect("not poisoned") == since
                    && *activity.stalled.lock().expect("not poisoned") == stalled;
                if still {
                    return reason;
                }
            }
            () = activity.changed.notified() => {}
        }
    }
}

/// A socket that tells its connection's [`Activity`] what moves.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.wrote(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.wrote(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Marks the end of an answer when dropped (hyper drops a body once it is
/// written, or when the connection goes).
struct EndOfAnswer(Arc<Activity>);

impl Drop for EndOfAnswer {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// An answer's body, carrying its [`EndOfAnswer`].
struct Tracked {
    inner: Body,
    _end: EndOfAnswer,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
