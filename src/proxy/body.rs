//! The bodies envgate relays, with the time bounds and the blame that go with them.
//!
//! `ProxyBody` goes downstream: envgate's own small JSON answer, or the node's body
//! streamed frame by frame. An upstream body carries the pooled connection it came on; the
//! connection goes back to its pool only once the body has ended (and the request body, if
//! any, was sent whole), and is dropped, closing it, if the body fails or the client goes
//! away first. It also holds the environment's in-flight slot, so the limit counts whole
//! exchanges. A node that sends no byte for `body_idle` while envgate waits on it, or
//! breaks its body, is counted against (passive detection) and the body ends in an error,
//! so hyper closes the client's connection instead of passing a cut body off as complete.
//!
//! `UpBody` goes to a node: nothing, or the client's body (`ClientBody`), which enforces
//! `max_request_body` and `body_idle` on the client and records in a `BodyWatch` how the
//! upload goes: the handler reads it to start the response-head timer only once the body
//! was sent whole, and to tell a client's fault from a node's.
//!
//! Idle timers are armed lazily: only when a poll finds no data, and re-armed only when
//! they fire early, so a body that flows costs one clock read per wait, not a timer reset.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::error::{BodyError, ClientFault};
use super::handler::StreamGuard;
use super::io::IdleTimer;
use super::io::LazyNow;
use super::io::Unread;
use super::pool::{ConnPool, Sender};
use super::record::Record;
use super::worker::LocalSnap;
use super::worker::MAX_HEADERS;
use crate::h1::fast::NodeConn;
use crate::h1::framing::{ChunkedDecoder, Framing};
use crate::routing::Candidates;
use crate::topology::{InFlight, NodeId};

pub struct ProxyBody {
    kind: Kind,
    /// The HTTP/2 stream this answers, counted open until the body is dropped.
    stream: Option<StreamGuard>,
    /// The exchange's record, completed when this body is dropped.
    record: Option<Record>,
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            let complete = match &self.kind {
                Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
                Kind::Upstream(u) => u.finished || u.body.is_end_stream(),
                // Whole once its last frame (the trailers, if any) was taken.
                Kind::Own(o) => o.is_end_stream(),
            };
            r.finish(complete);
        }
    }
}

// The upstream variant is the common one; boxing it would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Upstream),
    /// A node's body on a connection of the own codec's (`ProxyBody::own`).
    Own(Own),
}

/// Which node a body came from, to count its failures against it.
pub struct Blame {
    pub snap: Rc<LocalSnap>,
    /// The pools that could serve the request (the ejection cap is counted over them).
    pub scope: Candidates,
    pub node: NodeId,
}

impl Blame {
    /// The node served an exchange whole: its consecutive failures start again from zero
    /// (a response head alone is not enough, or a node that breaks every body mid-way
    /// would never reach its threshold).
    #[inline]
    pub fn succeed(&self) {
        let n = &self.snap.topo.nodes[self.node];
        if n.state.record_success() {
            tracing::info!(node = %n.name, "node served again after its ejection");
        }
    }

    #[cold]
    pub(crate) fn fail(&self, why: &'static str) {
        let topo = &self.snap.topo;
        tracing::debug!(node = %topo.nodes[self.node].name, why, "node failed mid-body");
        super::handler::passive_failure(topo, self.scope, self.node);
    }
}

struct Upstream {
    body: Incoming,
    /// The connection to give back once `body` has ended.
    conn: Option<(Rc<ConnPool>, Sender)>,
    slot: Option<InFlight>,
    blame: Blame,
    /// How the request body went, when there was one.
    upload: Option<Rc<BodyWatch>>,
    idle: Duration,
    /// Armed on the first wait for the node; fires `idle` after the wait began.
    stall: IdleTimer,
    /// Set once the body ended whole (success recorded, slot and connection released).
    finished: bool,
}

impl Upstream {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.blame.succeed();
        if let Some((pool, conn)) = self.conn.take() {
            // A connection still sending the request body is not free.
            if self.upload.as_ref().is_none_or(|w| w.is_done()) {
                pool.put(conn);
            }
        }
        self.slot = None;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // A body that ended without being polled to `None` (or one with nothing in it)
        // leaves the connection reusable; any other drop abandons it.
        if self.body.is_end_stream() {
            self.finish();
        }
    }
}

/// A node's body read by the own codec for a client hyper serves (an HTTP/2 stream's
/// body-less request, `h1::fast::send_bodiless`): framed as the node's head said, the
/// connection back to its pool once the body ended whole, closed on any other end.
struct Own {
    conn: Option<NodeConn>,
    pool: Rc<ConnPool>,
    framing: OwnFraming,
    /// The node keeps the connection open after this answer.
    reusable: bool,
    slot: Option<InFlight>,
    blame: Blame,
    idle: Duration,
    stall: IdleTimer,
    finished: bool,
    /// A chunked body's trailer fields, yielded after its data.
    trailers: Option<http::HeaderMap>,
}

enum OwnFraming {
    /// This many bytes left.
    Length(u64),
    Chunked(Box<ChunkedDecoder>),
    /// Until the node closes.
    Close,
    Done,
    /// The node failed the body (the connection is closed).
    Broken,
}

/// Read size for an own body.
const OWN_READ: usize = 16 * 1024;
/// Reads without a data byte in one poll of an own body.
const OWN_READS_PER_POLL: u32 = 16;

impl Own {
    fn is_end_stream(&self) -> bool {
        matches!(self.framing, OwnFraming::Done) && self.trailers.is_none()
    }

    fn finish(&mut self, now: &LazyNow) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.blame.succeed();
        if let Some(conn) = self.conn.take() {
            // Bytes past the body are a node's error: the connection is not reused.
            if self.reusable && conn.buf.is_empty() {
                self.pool.put_fast_at(conn, now.get());
            }
        }
        self.slot = None;
    }

    /// The node broke its body: the connection is closed, the node blamed.
    #[cold]
    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.fail_with(why, BodyError::NodeBroken(why))
    }

    #[cold]
    fn fail_with(
        &mut self,
        why: &'static str,
        error: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.framing = OwnFraming::Broken;
        self.slot = None;
        self.blame.fail(why);
        Poll::Ready(Some(Err(error)))
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        now: &LazyNow,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Reads that brought no data byte (chunk framing alone) before this poll gives way
        // to the worker's other tasks.
        let mut reads = 0;
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            let data = match &mut self.framing {
                _ if conn.buf.is_empty() => None,
                OwnFraming::Length(left) => {
                    let n = conn
                        .buf
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    let data = Bytes::copy_from_slice(&conn.buf[..n]);
                    conn.buf.drain(..n);
                    *left -= n as u64;
                    if *left == 0 {
                        self.framing = OwnFraming::Done;
                    }
                    Some(data)
                }
                OwnFraming::Chunked(dec) => {
                    // Every chunk in the buffer at once: one copy of their data, one move
                    // of what is left.
                    let mut out = Vec::new();
                    let mut at = 0;
                    while at < conn.buf.len() && !dec.is_done() {
                        match dec.decode(&conn.buf[at..]) {
                            Ok((0, _)) => break,
                            Ok((used, range)) => {
                                out.extend_from_slice(&conn.buf[at + range.start..at + range.end]);
                                at += used;
                            }
                            Err(_) => return self.fail("broken chunked body"),
                        }
                    }
                    conn.buf.drain(..at);
                    if dec.is_done() {
                        if !dec.trailers().is_empty() {
                            match trailer_fields(dec) {
                                Some(t) => self.trailers = Some(t),
                                None => return self.fail("broken trailers"),
                            }
                        }
                        self.framing = OwnFraming::Done;
                    }
                    Some(Bytes::from(out))
                }
                OwnFraming::Close => {
                    let data = Bytes::copy_from_slice(&conn.buf);
                    conn.buf.clear();
                    Some(data)
                }
                OwnFraming::Done | OwnFraming::Broken => None,
            };
            if matches!(self.framing, OwnFraming::Done) {
                self.finish(now);
            }
            if let Some(d) = data.filter(|d| !d.is_empty()) {
                // Only body data is the node's progress (as a data frame on hyper's path).
                self.stall.progress();
                return Poll::Ready(Some(Ok(Frame::data(d))));
            }
            if self.finished {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            reads += 1;
            if reads > OWN_READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(OWN_READ);
            }
            match poll_read(&conn.io, &mut conn.buf, cx) {
                Poll::Ready(Ok(0)) => {
                    if matches!(self.framing, OwnFraming::Close) {
                        self.reusable = false;
                        self.framing = OwnFraming::Done;
                        self.finish(now);
                        return Poll::Ready(None);
                    }
                    return self.fail("body cut short");
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return self.fail("body read failed"),
                Poll::Pending => {
                    let idle = self.idle;
                    if self
                        .stall
                        .poll_idle(cx, |since, _| since + idle)
                        .is_pending()
                    {
                        return Poll::Pending;
                    }
                    return self.fail_with("body stalled", BodyError::NodeStalled);
                }
            }
        }
    }
}

/// A chunked body's trailer section as hyper's client reads it (its `max_header_size`,
/// the pool's 64 KiB, bounds it with the final empty line; fields as
/// `ChunkedDecoder::with_trailer_fields` reads them), each a valid name and value; `None`
/// otherwise.
#[cold]
fn trailer_fields(dec: &ChunkedDecoder) -> Option<http::HeaderMap> {
    if dec.trailers().len() + 2 >= super::pool::MAX_RESPONSE_HEAD {
        return None;
    }
    dec.with_trailer_fields::<MAX_HEADERS, _>(|fields| {
        let mut map = http::HeaderMap::with_capacity(fields.len());
        for f in fields {
            map.append(
                http::HeaderName::from_bytes(f.name.as_bytes()).ok()?,
                http::HeaderValue::from_bytes(f.value).ok()?,
            );
        }
        Some(map)
    })
    .flatten()
}

/// Reads what the socket has onto the end of `buf`.
fn poll_read(
    io: &tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    loop {
        match io.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r),
        }
        std::task::ready!(io.poll_read_ready(cx))?;
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        // A body that ended (or had nothing in it) leaves the connection reusable; any
        // other drop closes it.
        if self.is_end_stream() && self.conn.is_some() {
            self.finish(&LazyNow::default());
        }
    }
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(bytes)),
            stream: None,
            record: None,
        }
    }

    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Full(None),
            stream: None,
            record: None,
        }
    }

    pub fn upstream(
        body: Incoming,
        conn: Option<(Rc<ConnPool>, Sender)>,
        slot: Option<InFlight>,
        blame: Blame,
        upload: Option<Rc<BodyWatch>>,
        idle: Duration,
    ) -> Self {
        ProxyBody {
            kind: Kind::Upstream(Upstream {
                body,
                conn,
                slot,
                blame,
                upload,
                idle,
                stall: IdleTimer::default(),
                finished: false,
            }),
            stream: None,
            record: None,
        }
    }

    /// A node's body on the own codec's connection `conn`, whose buffer starts with the
    /// body's first bytes.
    pub fn own(
        conn: NodeConn,
        framing: Framing,
        close: bool,
        pool: Rc<ConnPool>,
        slot: Option<InFlight>,
        blame: Blame,
        idle: Duration,
    ) -> Self {
        let framing = match framing {
            Framing::Empty => OwnFraming::Done,
            Framing::Length(n) => OwnFraming::Length(n),
            Framing::Chunked => OwnFraming::Chunked(Box::default()),
            Framing::Close => OwnFraming::Close,
        };
        let mut own = Own {
            conn: Some(conn),
            pool,
            framing,
            reusable: !close,
            slot,
            blame,
            idle,
            stall: IdleTimer::default(),
            finished: false,
            trailers: None,
        };
        if own.is_end_stream() {
            own.finish(&LazyNow::default());
        }
        ProxyBody {
            kind: Kind::Own(own),
            stream: None,
            record: None,
        }
    }

    /// Whether this is an answer of envgate's own (not a node's body), and takes its bytes
    /// (the answer becomes empty).
    pub fn take_own(&mut self) -> Option<Bytes> {
        match &mut self.kind {
            Kind::Full(b) => Some(b.take().unwrap_or_default()),
            Kind::Upstream(_) | Kind::Own(_) => None,
        }
    }

    /// Keeps an HTTP/2 stream counted open until this body is done with.
    pub fn hold(&mut self, stream: StreamGuard) {
        self.stream = Some(stream);
    }

    /// Completes `record` when this body is done with.
    #[inline]
    pub fn attach(&mut self, record: Record) {
        self.record = Some(record);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        // One clock read for what this poll dates: the node connection given back, the
        // stream's progress, the end of the exchange.
        let now = LazyNow::default();
        let r = poll_kind(&mut this.kind, cx, &now);
        if let (Poll::Ready(Some(Ok(f))), Some(rec)) = (&r, &mut this.record) {
            if let Some(d) = f.data_ref() {
                rec.add_out(d.len() as u64);
            }
        }
        if let Some(s) = &this.stream {
            // Waiting on the node is the node's timer's business; a body that yielded
            // data and is not asked again waits on the client.
            s.progress_at(!r.is_pending(), &now);
        }
        if !r.is_pending() && this.is_end_stream() {
            if let Some(rec) = &mut this.record {
                rec.ended_at(now.get());
            }
        }
        r
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Kind::Upstream(u) => u.body.is_end_stream(),
            Kind::Own(o) => o.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(u) => u.body.size_hint(),
            Kind::Own(o) => match o.framing {
                OwnFraming::Length(n) => SizeHint::with_exact(n),
                OwnFraming::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}

#[inline]
fn poll_kind(
    kind: &mut Kind,
    cx: &mut Context<'_>,
    now: &LazyNow,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    {
        match kind {
            Kind::Own(o) => o.poll(cx, now),
            Kind::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Kind::Upstream(u) => match Pin::new(&mut u.body).poll_frame(cx) {
                Poll::Ready(None) => {
                    u.finish();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(frame))) => {
                    u.stall.progress();
                    if u.body.is_end_stream() {
                        u.finish();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    // The connection's state is unknown: close it rather than reuse it.
                    u.conn = None;
                    // A client whose upload broke also breaks the node's exchange.
                    if u.upload.as_ref().is_none_or(|w| w.client_fault().is_none()) {
                        u.blame.fail("body error");
                    }
                    Poll::Ready(Some(Err(BodyError::Node(e))))
                }
                Poll::Pending => {
                    let idle = u.idle;
                    let upload = u.upload.as_deref();
                    // A node may wait for the rest of the upload before it answers more:
                    // while the client is still sending, the client's pace (and its own
                    // idle timer) decides, not the node.
                    let due = |since: Instant, now: Instant| match upload.map(|w| w.state()) {
                        Some(Upload::WaitingClient) | Some(Upload::Failed(_)) => now + idle,
                        Some(Upload::Sending) => {
                            since.max(upload.map_or(since, |w| w.last_frame())) + idle
                        }
                        _ => since + idle,
                    };
                    if u.stall.poll_idle(cx, due).is_pending() {
                        return Poll::Pending;
                    }
                    u.conn = None;
                    u.blame.fail("body stalled");
                    Poll::Ready(Some(Err(BodyError::NodeStalled)))
                }
            },
        }
    }
}

/// How a request body's upload goes, shared between the body (which writes it) and the
/// handler (which reads it). Same thread, so plain cells.
#[derive(Debug)]
pub struct BodyWatch {
    state: Cell<Upload>,
    /// When the body last handed a frame on.
    last_frame: Cell<Instant>,
    /// Bytes of the body handed on so far.
    bytes: Cell<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// The node's connection holds the last frame (or none was asked for yet).
    Sending,
    /// Waiting for the client's next bytes.
    WaitingClient,
    /// Sent whole at this instant.
    Done(Instant),
    Failed(ClientFault),
}

impl BodyWatch {
    pub fn new() -> Rc<Self> {
        Rc::new(BodyWatch {
            state: Cell::new(Upload::Sending),
            last_frame: Cell::new(Instant::now()),
            bytes: Cell::new(0),
        })
    }

    pub fn state(&self) -> Upload {
        self.state.get()
    }

    /// A new attempt starts at `now`: the upload's idleness counts from here.
    pub fn restart(&self, now: Instant) {
        if self.state.get() == Upload::Sending {
            self.last_frame.set(now);
        }
    }

    pub fn last_frame(&self) -> Instant {
        self.last_frame.get()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state.get(), Upload::Done(_))
    }

    pub fn client_fault(&self) -> Option<ClientFault> {
        match self.state.get() {
            Upload::Failed(f) => Some(f),
            _ => None,
        }
    }
}

/// The client's request body on its way to a node.
pub struct ClientBody {
    inner: Incoming,
    watch: Rc<BodyWatch>,
    /// Bytes still allowed by `max_request_body`.
    left: u64,
    idle: Duration,
    stall: IdleTimer,
    /// The connection's lingering state (`ConnInfo::unread`), told of the body's end.
    unread: Option<Arc<Unread>>,
}

impl ClientBody {
    pub fn new(
        inner: Incoming,
        watch: Rc<BodyWatch>,
        limit: Option<u64>,
        idle: Duration,
        unread: Option<Arc<Unread>>,
    ) -> Self {
        ClientBody {
            inner,
            watch,
            left: limit.unwrap_or(u64::MAX),
            idle,
            stall: IdleTimer::default(),
            unread,
        }
    }

    /// The body was read to its end.
    fn done(&mut self, now: Instant) {
        self.watch.state.set(Upload::Done(now));
        if let Some(u) = &self.unread {
            u.body_over();
        }
    }

    #[cold]
    fn fail(&mut self, fault: ClientFault) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.watch.state.set(Upload::Failed(fault));
        if !fault.unread() {
            // A stalled or gone client sends nothing more: no lingering.
            if let Some(u) = &self.unread {
                u.body_over();
            }
        }
        Poll::Ready(Some(Err(BodyError::Client(fault))))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Upload::Failed(f) = this.watch.state.get() {
            return Poll::Ready(Some(Err(BodyError::Client(f))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        return this.fail(ClientFault::TooLarge);
                    }
                    this.left -= n;
                    this.watch.bytes.set(this.watch.bytes.get() + n);
                }
                let now = Instant::now();
                this.stall.progress();
                this.watch.last_frame.set(now);
                if this.inner.is_end_stream() {
                    this.done(now);
                } else {
                    this.watch.state.set(Upload::Sending);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done(Instant::now());
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let fault = ClientFault::of(&e);
                tracing::debug!(error = %e, ?fault, "client body failed");
                this.fail(fault)
            }
            Poll::Pending => {
                this.watch.state.set(Upload::WaitingClient);
                let idle = this.idle;
                if this
                    .stall
                    .poll_idle(cx, |since, _| since + idle)
                    .is_pending()
                {
                    return Poll::Pending;
                }
                this.fail(ClientFault::Stalled)
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body envgate sends to a node: the client's, streamed, or none at all. A request
/// without a body is `Empty`, which lets it be copied for a retry.
pub enum UpBody {
    Empty,
    /// Boxed: a request with a body pays one allocation, every request a smaller move.
    Stream(Box<ClientBody>),
}

impl UpBody {
    pub fn watch(&self) -> Option<&Rc<BodyWatch>> {
        match self {
            UpBody::Empty => None,
            UpBody::Stream(b) => Some(&b.watch),
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BodyError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Stream(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Stream(b) => b.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Stream(b) => b.size_hint(),
        }
    }
}
