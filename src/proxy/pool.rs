//! One worker's pool of connections to one node.
//!
//! HTTP/1.1: a plain stack of ready `SendRequest`s (most recently used on top, so idle ones
//! at the bottom age out): no lock. A connection is put back by the response body when it
//! ends (see `body.rs`), and a pooled connection idle for longer than the upstream idle
//! timeout is discarded on checkout, so the node never closes first.
//!
//! HTTP/2 (`protocol: h2c | h2`): a few multiplexed connections, each carrying up to
//! the node's `max_streams` (`MAX_STREAMS` by default) requests at once, or fewer when the
//! node's own SETTINGS_MAX_CONCURRENT_STREAMS (read from its first SETTINGS frame as it goes
//! by, `SettingsSniff`) is lower; a new one is opened when every open one is at that bound
//! (hyper would queue the request behind the node's stream limit instead). A connection the
//! node closed or sent GOAWAY on is not given new streams.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::body::UpBody;
use super::io::StallIo;
use crate::health::NodeState;
use crate::tls::NodeTls;
use crate::topology::{Node, Protocol};

/// How often a request waiting for room at a node's cap looks again whether its ask for an
/// idle connection to close still stands.
const RE_WANT: Duration = Duration::from_millis(200);
/// How often pools close their connections idle past the upstream idle time (those of a
/// node with a cap, and every pool of a worker's current topology).
pub const SWEEP: Duration = Duration::from_secs(2);
/// Idle connections kept per node and worker.
const MAX_IDLE: usize = 512;
/// Largest response head a node may send (like the request side): beyond it the answer
/// is malformed, 502, and counts against the node.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub struct ConnPool {
    pub addr: SocketAddr,
    /// Spoken to over TLS.
    pub tls: Option<Arc<NodeTls>>,
    /// The node's shared state: its open connections are counted there (all workers).
    pub state: Arc<NodeState>,
    /// The node's `max_connections`.
    pub max: Option<u32>,
    idle: RefCell<Vec<(SendRequest<UpBody>, Instant)>>,
    /// Idle connections of the own HTTP/1.1 codec (`h1::fast`).
    fast: RefCell<Vec<(crate::h1::fast::NodeConn, Instant)>>,
    /// The upstream idle timeout last used (for the sweep of a capped pool).
    max_idle: std::cell::Cell<Duration>,
    /// Woken when a connection comes back to this pool (for a request waiting for room).
    returned: Notify,
    /// Requests of this worker waiting for room at the node.
    waiting: std::cell::Cell<u32>,
    pub protocol: Protocol,
    /// HTTP/2: streams a connection carries before another is opened.
    max_streams: u32,
    /// HTTP/2 connections and their streams in flight.
    mux: RefCell<Vec<Mux>>,
    /// HTTP/2 connections being opened, requests waiting for them, and their wake-up.
    opening: Cell<u32>,
    queued: Cell<u32>,
    opened: Notify,
}

/// An HTTP/2 connection to the node, and its streams in flight.
/// An HTTP/2 connection: its sender, the streams open on it, and the node's stream limit
/// (`u32::MAX` until its SETTINGS frame is read).
type Mux = (http2::SendRequest<UpBody>, Rc<Cell<u32>>, Arc<AtomicU32>);

/// Streams one HTTP/2 connection carries at once before another is opened, by default.
pub const MAX_STREAMS: u32 = 100;

/// A way to send one request to the node, given back (or let go) when its exchange ends.
pub enum Sender {
    H1(SendRequest<UpBody>),
    /// A stream of an HTTP/2 connection: counted in flight until dropped.
    H2(http2::SendRequest<UpBody>, Stream),
}

impl Sender {
    /// Sends `req`; `Err` hands the request back when it surely was not sent.
    #[allow(clippy::result_large_err)]
    pub fn send(
        &mut self,
        req: http::Request<UpBody>,
    ) -> impl std::future::Future<
        Output = Result<
            http::Response<hyper::body::Incoming>,
            hyper::client::conn::TrySendError<http::Request<UpBody>>,
        >,
    > {
        match self {
            Sender::H1(s) => Either::A {
                f: s.try_send_request(req),
            },
            Sender::H2(s, _) => Either::B {
                f: s.try_send_request(req),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// One of two futures of the same output.
    #[project = EitherProj]
    pub enum Either<A, B> {
        A { #[pin] f: A },
        B { #[pin] f: B },
    }
}

impl<A, B, T> std::future::Future for Either<A, B>
where
    A: std::future::Future<Output = T>,
    B: std::future::Future<Output = T>,
{
    type Output = T;
    #[inline]
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match self.project() {
            EitherProj::A { f } => f.poll(cx),
            EitherProj::B { f } => f.poll(cx),
        }
    }
}

/// One stream in flight on an HTTP/2 connection to a node.
pub struct Stream(Rc<Cell<u32>>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Why a new connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnPool {
    pub fn new(node: &Node) -> Self {
        ConnPool {
            addr: node.addr,
            tls: node.tls.clone(),
            state: node.state.clone(),
            max: node.max_connections,
            idle: RefCell::new(Vec::new()),
            fast: RefCell::new(Vec::new()),
            max_idle: std::cell::Cell::new(Duration::from_secs(4)),
            returned: Notify::new(),
            waiting: std::cell::Cell::new(0),
            protocol: node.protocol,
            max_streams: node.max_streams,
            mux: RefCell::new(Vec::new()),
            opening: Cell::new(0),
            queued: Cell::new(0),
            opened: Notify::new(),
        }
    }

    /// HTTP/2: whether a connection is being opened (a request may wait for a stream on it
    /// rather than open one more).
    #[inline]
    pub fn opening(&self) -> bool {
        self.opening.get() > 0
    }

    /// HTTP/2: a stream on a connection being opened by another request, while those being
    /// opened have room for the requests waiting on them; `None` when this request should
    /// open a connection itself (or none came by `until`).
    pub async fn stream_when_opened(&self, until: Instant) -> Option<Sender> {
        struct Queued<'a>(&'a Cell<u32>);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.set(self.0.get() - 1);
            }
        }
        loop {
            if let Some(s) = self.take_stream() {
                return Some(s);
            }
            let opening = self.opening.get();
            if opening == 0 || self.queued.get() >= opening.saturating_mul(self.max_streams) {
                return None;
            }
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            self.queued.set(self.queued.get() + 1);
            let _queued = Queued(&self.queued);
            tokio::select! {
                () = opened => {}
                () = tokio::time::sleep_until(until) => return None,
            }
        }
    }

    /// A stream on an open HTTP/2 connection with room for one, the least busy.
    pub fn take_stream(&self) -> Option<Sender> {
        let mut mux = self.mux.borrow_mut();
        mux.retain(|(s, _, _)| !s.is_closed());
        let (s, n, _) = mux
            .iter()
            .filter(|(s, n, limit)| {
                n.get() < self.max_streams.min(limit.load(Ordering::Relaxed)) && s.is_ready()
            })
            .min_by_key(|(_, n, _)| n.get())?;
        n.set(n.get() + 1);
        Some(Sender::H2(s.clone(), Stream(n.clone())))
    }

    /// Whether this pool serves `node` as it is now: same address, TLS settings, state and
    /// cap (a reload that keeps them keeps the pool).
    pub fn serves(&self, node: &Node) -> bool {
        self.addr == node.addr
            && self.protocol == node.protocol
            && self.max_streams == node.max_streams
            && self.tls == node.tls
            && self.max == node.max_connections
            && Arc::ptr_eq(&self.state, &node.state)
    }

    /// Whether a request could have a connection to the node now: a pooled one, or room
    /// under its cap for a new one.
    #[inline]
    pub fn has_room(&self) -> bool {
        match self.max {
            None => true,
            Some(max) => {
                !self.idle.borrow().is_empty()
                    || !self.fast.borrow().is_empty()
                    || self.state.conns.open() < max
            }
        }
    }

    /// Room for one more connection to the node under its cap (counted until the
    /// `Counted` is dropped or handed to `connect`).
    #[inline]
    pub fn reserve(&self) -> Option<Counted> {
        self.state
            .conns
            .try_open(self.max)
            .then(|| Counted(self.state.clone(), self.max.is_some()))
    }

    /// Waits until `until` for a pooled connection or room for a new one, for a node at
    /// its cap. `None` when neither came in time.
    pub async fn wait_for_room(&self, max_idle: Duration, until: Instant) -> Option<Room> {
        // An idle connection of the own codec on this worker is of no use to this request:
        // closed to make room.
        self.wait_for_room_with(max_idle, until, Self::take, |p| {
            p.fast.borrow_mut().pop().is_some()
        })
        .await
    }

    /// `wait_for_room`, for a request of the own HTTP/1.1 codec (which takes its own
    /// pooled connections).
    pub async fn wait_for_room_fast(
        &self,
        max_idle: Duration,
        until: Instant,
    ) -> Option<Room<crate::h1::fast::NodeConn>> {
        // An idle connection of hyper's on this worker is of no use to this request: closed
        // to make room (its count goes once its task ends).
        self.wait_for_room_with(
            max_idle,
            until,
            |p, d| p.take_fast(d, Instant::now()),
            |p| p.idle.borrow_mut().pop().is_some(),
        )
        .await
    }

    async fn wait_for_room_with<T>(
        &self,
        max_idle: Duration,
        until: Instant,
        take: impl Fn(&Self, Duration) -> Option<T>,
        close_other: impl Fn(&Self) -> bool,
    ) -> Option<Room<T>> {
        let mut closed_other = false;
        let conns = &self.state.conns;
        // Undone however the wait ends (the client may go away meanwhile).
        struct Waiting<'a> {
            pool: &'a ConnPool,
            wants: u32,
        }
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.pool.waiting.set(self.pool.waiting.get() - 1);
                for _ in 0..self.wants {
                    self.pool.state.conns.unwant();
                }
            }
        }
        self.waiting.set(self.waiting.get() + 1);
        let mut waiting = Waiting {
            pool: self,
            wants: 0,
        };
        loop {
            let freed = conns.freed.notified();
            let returned = self.returned.notified();
            tokio::pin!(freed, returned);
            // Registered before looking, so that a close in between is not missed.
            freed.as_mut().enable();
            returned.as_mut().enable();
            if let Some(c) = take(self, max_idle) {
                return Some(Room::Pooled(c));
            }
            if let Some(c) = self.reserve() {
                return Some(Room::New(c));
            }
            if !closed_other && close_other(self) {
                // Once: then the room it leaves is waited for like any other.
                closed_other = true;
                continue;
            }
            // Idle connections of other workers count against the cap: one is asked to
            // close (again, if an earlier ask was taken by another waiter's room).
            if conns.wanted() < waiting.wants.max(1) {
                conns.want_idle();
                waiting.wants += 1;
            }
            tokio::select! {
                () = freed => {}
                () = returned => {}
                () = tokio::time::sleep(RE_WANT) => {}
                () = tokio::time::sleep_until(until) => return None,
            }
        }
    }

    /// A pooled connection that is still open and was idle less than `max_idle` (for
    /// HTTP/2, a stream on an open connection with room).
    #[inline]
    pub fn take(&self, max_idle: Duration) -> Option<Sender> {
        if self.protocol.is_h2() {
            return self.take_stream();
        }
        self.take_h1(max_idle).map(Sender::H1)
    }

    #[inline]
    fn take_h1(&self, max_idle: Duration) -> Option<SendRequest<UpBody>> {
        self.max_idle.set(max_idle);
        let mut idle = self.idle.borrow_mut();
        while let Some((conn, since)) = idle.pop() {
            if conn.is_closed() || since.elapsed() > max_idle {
                continue;
            }
            return Some(conn);
        }
        None
    }

    /// Closes the own codec's idle connections (a topology that turned the own codec off
    /// would never take them again).
    pub fn close_fast(&self) {
        self.fast.borrow_mut().clear();
    }

    /// A pooled connection of the own codec that is still usable and was idle less than
    /// `max_idle` (most recently used first).
    #[inline]
    pub fn take_fast(&self, max_idle: Duration, now: Instant) -> Option<crate::h1::fast::NodeConn> {
        self.max_idle.set(max_idle);
        let mut idle = self.fast.borrow_mut();
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) > max_idle || !conn.is_fresh() {
                continue;
            }
            return Some(conn);
        }
        None
    }

    /// Gives a connection of the own codec back after its exchange ended whole. Those
    /// idle past the upstream idle time at the bottom of the stack (left there after a
    /// burst) are closed on the way: nothing would take them again.
    #[inline]
    pub fn put_fast(&self, conn: crate::h1::fast::NodeConn) {
        self.put_fast_at(conn, Instant::now());
    }

    /// `put_fast` at `now` (a clock read the caller made).
    pub fn put_fast_at(&self, conn: crate::h1::fast::NodeConn, now: Instant) {
        // As `put`: at a node's cap, a connection a request on another worker waits for
        // is closed instead (its room goes there).
        if self.max.is_some() && self.waiting.get() == 0 && self.state.conns.take_reclaim() {
            return;
        }
        let mut idle = self.fast.borrow_mut();
        let max_idle = self.max_idle.get();
        let stale = idle
            .iter()
            .take_while(|(_, since)| now.saturating_duration_since(*since) > max_idle)
            .count();
        if stale > 0 {
            idle.drain(..stale);
        }
        if idle.len() < MAX_IDLE {
            idle.push((conn, now));
            drop(idle);
            if self.max.is_some() {
                self.returned.notify_waiters();
            }
        }
    }

    /// Gives a connection back after its response ended. At a node's cap, a connection a
    /// request on another worker waits for is closed instead (its room goes there). An
    /// HTTP/2 stream is let go.
    #[inline]
    pub fn put(&self, conn: Sender) {
        let conn = match conn {
            Sender::H1(c) => c,
            Sender::H2(..) => {
                self.returned.notify_waiters();
                return;
            }
        };
        if conn.is_closed() {
            return;
        }
        // A request of this worker waiting for room takes it; otherwise one waiting on
        // another worker may want it closed.
        if self.max.is_some() && self.waiting.get() == 0 && self.state.conns.take_reclaim() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
            drop(idle);
            self.returned.notify_waiters();
        }
    }

    /// Closes the idle connections that would not be taken again: idle past the upstream
    /// idle time, or closed by the node.
    pub fn sweep(&self) {
        let max_idle = self.max_idle.get();
        self.idle
            .borrow_mut()
            .retain(|(c, since)| !c.is_closed() && since.elapsed() <= max_idle);
        self.fast
            .borrow_mut()
            .retain(|(c, since)| since.elapsed() <= max_idle && c.is_fresh());
    }

    /// Closes idle connections that requests waiting on other workers want closed, for as
    /// long as the pool lives (a task per pool of a node with a cap).
    pub async fn reclaim(pool: Weak<ConnPool>) {
        let Some(state) = pool.upgrade().map(|p| p.state.clone()) else {
            return;
        };
        loop {
            let wake = state.conns.reclaim_wake.notified();
            tokio::pin!(wake);
            // Registered before looking, so that a want in between is not missed.
            wake.as_mut().enable();
            {
                let Some(p) = pool.upgrade() else { return };
                // Connections idle past the upstream idle time would not be used again,
                // but count against the cap: they close (oldest first).
                p.sweep();
                loop {
                    let has = !p.idle.borrow().is_empty() || !p.fast.borrow().is_empty();
                    if !has || !state.conns.take_reclaim() {
                        break;
                    }
                    // The oldest idle one (dropping it closes it), of either codec.
                    if !p.fast.borrow().is_empty() {
                        drop(p.fast.borrow_mut().remove(0));
                    } else {
                        drop(p.idle.borrow_mut().remove(0));
                    }
                }
            }
            // Looked at again now and then: stale connections are swept, and the task
            // ends soon after its pool.
            let _ = tokio::time::timeout(SWEEP, wake).await;
        }
    }

    /// Opens a new connection (TCP, then TLS for a node that speaks it, both within
    /// `timeout`) and starts its connection task on this worker. The connection was counted
    /// (`reserve`): it is uncounted when it closes, or at once when it cannot be opened. A node that stops reading what envgate writes for `write_idle`
    /// loses the connection.
    pub async fn connect(
        &self,
        counted: Counted,
        timeout: Duration,
        write_idle: Duration,
    ) -> Result<Sender, ConnectError> {
        let h2 = self.protocol.is_h2();
        // Requests of this worker wait for this connection rather than open their own; they
        // are woken however the open ends.
        struct Opening<'a>(&'a ConnPool);
        impl Drop for Opening<'_> {
            fn drop(&mut self) {
                self.0.opening.set(self.0.opening.get() - 1);
                self.0.opened.notify_waiters();
            }
        }
        let _opening = h2.then(|| {
            self.opening.set(self.opening.get() + 1);
            Opening(self)
        });
        let deadline = Instant::now() + timeout;
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        let _ = stream.set_nodelay(true);
        let limit = h2.then(|| Arc::new(AtomicU32::new(u32::MAX)));
        let sender = match &self.tls {
            None => start(stream, write_idle, counted, limit.clone()).await?,
            Some(tls) => {
                let stream = tokio::time::timeout_at(
                    deadline,
                    tls.connector.connect(tls.server_name.clone(), stream),
                )
                .await
                .map_err(|_| ConnectError::Timeout)?
                .map_err(ConnectError::Tls)?;
                start(stream, write_idle, counted, limit.clone()).await?
            }
        };
        Ok(match (sender, limit) {
            (Sender::H2(s, _), Some(limit)) => {
                // Shared by the requests to come; this one takes the first stream.
                let n = Rc::new(Cell::new(1));
                self.mux.borrow_mut().push((s.clone(), n.clone(), limit));
                Sender::H2(s, Stream(n))
            }
            (sender, _) => sender,
        })
    }
}

/// A connection counted against its node (and whether the node has a cap); uncounted when
/// dropped.
pub struct Counted(Arc<NodeState>, bool);

/// What a request waiting at a node's cap got.
pub enum Room<T = Sender> {
    /// A connection given back to this worker's pool.
    Pooled(T),
    /// Room for a new one.
    New(Counted),
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.conns.closed(self.1);
    }
}

/// A node connection that stays counted as long as its socket lives: through an upgrade
/// too (a tunnel holds the socket after hyper's connection task has ended).
struct CountedIo<S> {
    inner: S,
    _counted: Counted,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountedIo<S> {
    #[inline]
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountedIo<S> {
    #[inline]
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    #[inline]
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    #[inline]
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    #[inline]
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// HTTP/1.1 (or HTTP/2) over an open connection, its task on this worker.
/// HTTP/2 when `limit` is given: the node's stream limit is stored there once read.
async fn start<S>(
    stream: S,
    write_idle: Duration,
    counted: Counted,
    limit: Option<Arc<AtomicU32>>,
) -> Result<Sender, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(StallIo::new(
        CountedIo {
            inner: SettingsSniff::new(stream, limit.clone()),
            _counted: counted,
        },
        write_idle,
        "the node read nothing for the body idle timeout",
    ));
    if limit.is_some() {
        let (send, conn) = http2::Builder::new(super::worker::LocalExec)
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(MAX_RESPONSE_HEAD as u32)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake::<_, UpBody>(io)
            .await?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        // The stream guard is set by the caller.
        return Ok(Sender::H2(send, Stream(Rc::new(Cell::new(0)))));
    }
    let (send, conn) = http1::Builder::new()
        .max_header_size(MAX_RESPONSE_HEAD)
        .handshake::<_, UpBody>(io)
        .await?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Sender::H1(send))
}

/// Reads the node's SETTINGS_MAX_CONCURRENT_STREAMS from the first frame an HTTP/2 node
/// sends (its SETTINGS, RFC 9113 3.4) as the bytes go by to hyper, which keeps it to
/// itself; then steps aside. Nothing is buffered: the frame is parsed byte by byte. A
/// later change of the setting is not seen (the configured `max_streams` still bounds).
struct SettingsSniff<S> {
    inner: S,
    /// `None`: not HTTP/2, or the first frame is read.
    limit: Option<Arc<AtomicU32>>,
    /// Bytes of the first frame seen so far.
    seen: usize,
    head: [u8; 9],
    /// The setting being read (6 bytes: identifier, value).
    entry: [u8; 6],
}

impl<S> SettingsSniff<S> {
    fn new(inner: S, limit: Option<Arc<AtomicU32>>) -> Self {
        SettingsSniff {
            inner,
            limit,
            seen: 0,
            head: [0; 9],
            entry: [0; 6],
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let Some(limit) = &self.limit else { return };
            if self.seen < 9 {
                self.head[self.seen] = b;
                self.seen += 1;
                if self.seen == 9 {
                    let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                    // SETTINGS (type 4), not an ACK, on stream 0; anything else: give up.
                    if self.head[3] != 4 || self.head[4] & 1 != 0 || len == 0 || len % 6 != 0 {
                        self.limit = None;
                    }
                }
                continue;
            }
            let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
            let at = (self.seen - 9) % 6;
            self.entry[at] = b;
            self.seen += 1;
            if at == 5 && u16::from_be_bytes([self.entry[0], self.entry[1]]) == 3 {
                let v = u32::from_be_bytes([
                    self.entry[2],
                    self.entry[3],
                    self.entry[4],
                    self.entry[5],
                ]);
                // 0 would let no stream through: one at least, so that the connection is
                // used (the node then refuses it, and the request goes elsewhere).
                limit.store(v.max(1), Ordering::Relaxed);
            }
            if self.seen >= 9 + len {
                self.limit = None;
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SettingsSniff<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.limit.is_some() {
            this.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SettingsSniff<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod sniff_tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, 0]);
        f.extend(payload);
        f
    }

    fn sniff(bytes: &[u8], step: usize) -> u32 {
        let limit = Arc::new(AtomicU32::new(u32::MAX));
        let mut s = SettingsSniff::new((), Some(limit.clone()));
        for c in bytes.chunks(step) {
            s.feed(c);
        }
        limit.load(Ordering::Relaxed)
    }

    #[test]
    fn the_first_settings_frame_gives_the_stream_limit() {
        // HEADER_TABLE_SIZE 4096, MAX_CONCURRENT_STREAMS 7, INITIAL_WINDOW_SIZE 65535.
        let mut payload = vec![0, 1, 0, 0, 16, 0, 0, 3, 0, 0, 0, 7, 0, 4, 0, 0, 255, 255];
        let f = frame(4, 0, &payload);
        for step in [1, 2, 5, 64] {
            assert_eq!(sniff(&f, step), 7, "step {step}");
        }
        // A second SETTINGS frame is not read.
        let mut two = frame(4, 0, &[0, 1, 0, 0, 16, 0]);
        two.extend(frame(4, 0, &[0, 3, 0, 0, 0, 9]));
        assert_eq!(sniff(&two, 3), u32::MAX);
        // Not SETTINGS first, or an ACK: nothing.
        assert_eq!(sniff(&frame(6, 0, &[0; 8]), 1), u32::MAX);
        assert_eq!(sniff(&frame(4, 1, &[]), 1), u32::MAX);
        // 0 is taken as 1.
        payload = vec![0, 3, 0, 0, 0, 0];
        assert_eq!(sniff(&frame(4, 0, &payload), 4), 1);
    }
}
