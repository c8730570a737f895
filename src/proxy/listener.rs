//! Accepting and serving downstream connections on one worker.
//!
//! A cleartext connection is HTTP/1.1 unless its first bytes are the HTTP/2 connection
//! preface (HTTP/2 with prior knowledge). The bytes read to decide are handed back to
//! hyper through `ClientIo`, so the check costs no extra system call in the common case
//! where the request is already in the socket buffer. A TLS connection is HTTP/2 when ALPN
//! chose `h2`, HTTP/1.1 otherwise (no sniffing); its handshake uses the certificates of the
//! live topology's listener, so a reload serves renewed ones to new connections while the
//! open ones keep their session.
//!
//! Time bounds of a connection: the first request head must be complete within
//! `client_header` of the accept (the wait for the first byte counts: when it waited more
//! than a tenth of that, a watchdog holds the connection to the bound until the first
//! request arrives; a shorter wait is left to hyper's timer, at most 10% late); later
//! heads and idle keep-alive time are hyper's header-read timeout. HTTP/2 connections get
//! a watchdog of their own: no stream for `idle` (or no first request within
//! `client_header`, which also bounds a header block left incomplete) closes them with
//! GOAWAY; keep-alive pings find dead peers; a client that resets too many streams after
//! envgate accepted them is closed. A client that stops reading what envgate writes for
//! `body_idle` loses its connection (`ClientIo`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::handler::{exchange, handle_h2, ConnInfo, H2Conn, TlsConn};
use super::io::{StallIo, Unread};
use super::worker::Worker;
use crate::h1::client::Client;
use crate::server::Tracker;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a worker knows about one listener.
pub struct ListenerMeta {
    pub name: String,
    pub port: u16,
    /// TLS: the certificates are those of the live topology's listener of this name.
    pub tls: bool,
}

/// How long a connection accepted before shutdown, that has not sent its first request
/// yet, is given to send it.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Most connections taken from one listener in a row before other tasks get a turn.
const ACCEPT_BURST: usize = 64;

pub async fn accept_loop(
    worker: Rc<Worker>,
    listener: std::net::TcpListener,
    meta: Rc<ListenerMeta>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Rc<Tracker>,
    active: std::sync::Arc<crate::metrics::Slot>,
) {
    // Accepted sockets come out of the kernel non-blocking and are registered with the
    // reactor by whoever serves them, when they must wait (see `h1::client`). (Deprecated
    // for inner types that may not own their descriptor; a `TcpListener` owns its own for
    // as long as the `AsyncFd` holds it.)
    // Set here, on whichever socket this worker serves (bound here, inherited, or given).
    if let Err(e) = crate::sys::defer_accept(&listener) {
        tracing::debug!(listener = %meta.name, error = %e, "TCP_DEFER_ACCEPT not set");
    }
    #[allow(deprecated)]
    let listener = match AsyncFd::with_interest(listener, tokio::io::Interest::READABLE) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %meta.name, error = %e, "cannot serve listener");
            return;
        }
    };
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(listener = %meta.name, error = %e, "cannot serve listener");
                    return;
                }
            },
        };
        let mut failed = None;
        let mut drained = false;
        for _ in 0..ACCEPT_BURST {
            let accepted = ready.try_io(|l| {
                rustix::net::acceptfrom_with(
                    l.get_ref(),
                    rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
                )
                .map_err(io::Error::from)
            });
            match accepted {
                // Nothing more to take: the readiness is cleared.
                Err(_would_block) => {
                    drained = true;
                    break;
                }
                Ok(Ok((fd, addr))) => {
                    let stream = std::net::TcpStream::from(fd);
                    let peer = match addr.and_then(|a| SocketAddr::try_from(a).ok()) {
                        Some(p) => p,
                        None => match stream.peer_addr() {
                            Ok(p) => p,
                            Err(_) => continue,
                        },
                    };
                    let guard = tracker.enter();
                    let worker = worker.clone();
                    let meta = meta.clone();
                    let shutdown = shutdown.clone();
                    let open = active.open();
                    tokio::task::spawn_local(async move {
                        serve(worker, stream, peer, &meta, shutdown).await;
                        drop((open, guard));
                    });
                }
                // The peer gave up while in the queue, or a network error of that
                // connection (accept(2): to be treated as "try again").
                Ok(Err(e)) if accept_retries(&e) => {
                    tracing::debug!(listener = %meta.name, error = %e, "accept: connection lost");
                }
                Ok(Err(e)) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(ready);
        if let Some(e) = failed {
            // Out of file descriptors and the like: back off instead of spinning.
            tracing::warn!(listener = %meta.name, error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else if !drained {
            // A full burst: let the connections just taken start before taking more.
            tokio::task::yield_now().await;
        }
    }
}

/// Whether an accept error concerns only the connection being taken (the peer gave up,
/// or a network error of that connection, which accept(2) says to treat as "try
/// again"). Any other (out of file descriptors, buffers or memory, a socket in a bad
/// state) pauses the listener a little rather than spin on it.
fn accept_retries(e: &io::Error) -> bool {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    ) {
        return true;
    }
    // Linux numbers: EPERM, ENONET, EPROTO, ENOPROTOOPT, EOPNOTSUPP, ENETDOWN,
    // ENETUNREACH, EHOSTDOWN, EHOSTUNREACH.
    matches!(
        e.raw_os_error(),
        Some(1 | 64 | 71 | 92 | 95 | 100 | 101 | 112 | 113)
    )
}

/// How a connection is served once its first bytes are in.
enum Accepted {
    /// By the own HTTP/1.1 codec (a cleartext socket not registered yet, or a TLS
    /// session).
    Own(Client),
    /// By hyper.
    Hyper(ClientStream),
}

async fn serve(
    worker: Rc<Worker>,
    raw: std::net::TcpStream,
    peer: SocketAddr,
    meta: &ListenerMeta,
    mut shutdown: watch::Receiver<bool>,
) {
    // The own HTTP/1.1 codec sets it when it must (see `ConnInfo::nodelay`).
    let lazy_nodelay = worker.fast && !meta.tls;
    if !lazy_nodelay {
        let _ = raw.set_nodelay(true);
    }
    let topo = worker.shared.topology.load();
    let timeouts = topo.defaults.timeouts.clone();
    let trusted = topo
        .defaults
        .trusted_proxies
        .iter()
        .any(|c| c.contains(peer.ip()));
    let server_tls = if meta.tls {
        match topo
            .listeners
            .iter()
            .find(|l| l.name == meta.name)
            .and_then(|l| l.tls.as_ref())
        {
            Some(t) => Some(t.server.clone()),
            // The listener went away or lost TLS (a change that replaces its socket).
            None => return,
        }
    } else {
        None
    };
    drop(topo);

    let accepted = Instant::now();
    let secure = server_tls.is_some();
    let (conn, first, h2, waited_since, tls) = match server_tls {
        Some(server) => {
            let Ok(stream) = TcpStream::from_std(raw) else {
                return;
            };
            // The handshake counts in `client_header`; HTTP/2 or HTTP/1.1 is ALPN's choice.
            let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
            let s =
                match tokio::time::timeout(timeouts.client_header, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let conn = s.get_ref().1;
            let h2 = conn.alpn_protocol() == Some(b"h2");
            // The names the request's Host must be covered by: those of the certificate
            // the client asked for by SNI (a client that named no host is not checked).
            let tls = conn.server_name().and_then(|sni| {
                server.certs.find(Some(sni)).map(|c| TlsConn {
                    certs: server.certs.clone(),
                    index: c.index,
                })
            });
            // HTTP/1.1 over TLS is the own codec's too (when it is on).
            let conn = if worker.fast && !h2 {
                Accepted::Own(Client::tls(Box::new(s)))
            } else {
                Accepted::Hyper(ClientStream::Tls(Box::new(s)))
            };
            (conn, Vec::new(), h2, Some(accepted), tls)
        }
        None if lazy_nodelay => {
            // The own codec reads right after the accept, before the socket is registered
            // (see `h1::client`).
            let mut client = Client::raw(raw);
            match tokio::time::timeout(timeouts.client_header, sniff_raw(&mut client)).await {
                Ok(Ok(Some((first, false)))) => {
                    (Accepted::Own(client), first, false, Some(accepted), None)
                }
                Ok(Ok(Some((first, true)))) => match client.into_io() {
                    Ok(s) => (
                        Accepted::Hyper(ClientStream::Plain(s)),
                        first,
                        true,
                        Some(accepted),
                        None,
                    ),
                    Err(_) => return,
                },
                _ => return, // closed, failed or silent: nothing to answer
            }
        }
        None => {
            let Ok(stream) = TcpStream::from_std(raw) else {
                return;
            };
            match tokio::time::timeout(timeouts.client_header, sniff(&stream)).await {
                Ok(Ok(Some((first, h2, waited)))) => (
                    Accepted::Hyper(ClientStream::Plain(stream)),
                    first,
                    h2,
                    waited,
                    None,
                ),
                _ => return, // closed, failed or silent: nothing to answer
            }
        }
    };
    let ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(peer.ip()),
        ip => ip,
    };
    let info = Rc::new(ConnInfo {
        peer,
        local_port: meta.port,
        peer_value: peer_value(&worker, ip),
        trusted,
        proto: HeaderValue::from_static(if secure { "https" } else { "http" }),
        requests: std::cell::Cell::new(0),
        nodelay: std::cell::Cell::new(!lazy_nodelay),
        h2: h2.then(H2Conn::new),
        tls,
        unread: std::cell::OnceCell::new(),
    });
    // The own HTTP/1.1 codec serves what it takes; what it declines goes on to hyper with
    // the bytes read so far.
    let (stream, first) = match conn {
        Accepted::Own(client) => {
            match crate::h1::fast::serve(
                &worker,
                &info,
                client,
                first,
                &timeouts,
                accepted,
                &mut shutdown,
            )
            .await
            {
                crate::h1::fast::Served::Done => return,
                crate::h1::fast::Served::Decline(s, rest) => (s, rest),
            }
        }
        Accepted::Hyper(s) => (s, first),
    };
    // hyper's part of the connection's future lives in a box of its own: the spawned
    // task of a connection the own codec serves stays small.
    Box::pin(serve_hyper(
        worker,
        info,
        stream,
        first,
        timeouts,
        waited_since,
        peer,
        shutdown,
    ))
    .await;
}

/// Serves a connection with hyper (HTTP/2, or HTTP/1.1 from where the own codec declined
/// or when it is off), until it ends or the worker drains.
#[allow(clippy::too_many_arguments)]
async fn serve_hyper(
    worker: Rc<Worker>,
    info: Rc<ConnInfo>,
    stream: ClientStream,
    first: Vec<u8>,
    timeouts: crate::topology::Timeouts,
    waited_since: Option<Instant>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    if !info.nodelay.get() {
        if let ClientStream::Plain(s) = &stream {
            let _ = s.set_nodelay(true);
        }
    }
    // HTTP/1: a connection that ends while a request's body may be unread lingers.
    let unread = info.h2.is_none().then(|| {
        let unread = Arc::new(Unread::default());
        let _ = info.unread.set(unread.clone());
        unread
    });
    let io = TokioIo::new(ClientIo {
        prefix: first,
        pos: 0,
        inner: StallIo::new(
            stream,
            timeouts.body_idle,
            "the client read nothing for the body idle timeout",
        ),
        unread: unread.clone(),
    });
    // Serve until the connection ends; on shutdown, ask it to finish what it has (HTTP/1:
    // close after the response in flight; HTTP/2: GOAWAY) and wait for that (the worker's
    // drain bounds the wait).
    if let Some(h2c) = info.h2.clone() {
        let svc = {
            let (worker, info, h2c) = (worker.clone(), info.clone(), h2c.clone());
            service_fn(move |req| handle_h2(worker.clone(), info.clone(), h2c.clone(), req))
        };
        let conn = worker.http2.serve_connection(io, svc);
        tokio::pin!(conn);
        let started = waited_since.unwrap_or_else(Instant::now);
        // The first look comes early enough for each bound the watchdog keeps.
        let first = timeouts
            .client_header
            .min(timeouts.body_idle)
            .min(timeouts.idle);
        let sleep = tokio::time::sleep_until(started + first);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = shutdown.changed() => break,
                () = h2c.abuse.notified() => {
                    tracing::warn!(peer = %peer, resets = h2c.early_resets.get(), "closing an HTTP/2 connection that reset too many streams after they were accepted");
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                    return;
                }
                () = &mut sleep => {
                    let now = Instant::now();
                    let due = if h2c.open.get() > 0 {
                        // A response body left unpolled for body_idle: the client gives it
                        // no flow-control window, and holds a node connection and an
                        // in-flight slot for nothing.
                        match h2c.oldest_progress() {
                            Some(p) if p + timeouts.body_idle <= now => {
                                tracing::debug!(peer = %peer, "closing an HTTP/2 connection whose client reads nothing");
                                conn.as_mut().graceful_shutdown();
                                let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                                return;
                            }
                            Some(p) => (p + timeouts.body_idle).min(now + timeouts.idle),
                            None => now + timeouts.body_idle.min(timeouts.idle),
                        }
                    } else if info.requests.get() == 0 {
                        started + timeouts.client_header
                    } else {
                        h2c.last_close.get() + timeouts.idle
                    };
                    if due <= now {
                        tracing::debug!(peer = %peer, "closing an idle HTTP/2 connection");
                        // No stream is open: the GOAWAY needs no long wait.
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.as_mut()).await;
                        return;
                    }
                    sleep.as_mut().reset(due);
                }
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    } else {
        // hyper's connection (and the socket it holds) is gone when this ends.
        let served = async {
            let svc = {
                let (worker, info) = (worker.clone(), info.clone());
                service_fn(move |req| exchange(worker.clone(), info.clone(), req))
            };
            let conn = worker.http1.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            // A request hyper refuses itself never reaches the handler: it is recorded here.
            // Its connection then ends as one whose body is unread: what the client still sends
            // of a head too large is waited out (the connection is dropped after this).
            let ended = |r: Result<(), hyper::Error>| {
                if let Err(e) = r {
                    if let Some(code) = refusal_status(&e) {
                        super::record::Record::refused(&worker, &info, code);
                        if let Some(u) = info.unread.get() {
                            u.refused();
                        }
                    }
                }
            };
            // On shutdown, HTTP/1 closes after the response in flight. A connection whose first
            // request has not begun yet (its bytes may be here or on the way: the listening
            // socket was handed to a new instance, or the client just connected) gets a short
            // grace to send it, so that it is answered rather than reset.
            macro_rules! finish {
                () => {{
                    if info.requests.get() == 0 {
                        let grace = tokio::time::sleep(FIRST_REQUEST_GRACE);
                        tokio::pin!(grace);
                        loop {
                            tokio::select! {
                                r = conn.as_mut() => return ended(r),
                                () = &mut grace => break,
                                () = tokio::time::sleep(Duration::from_millis(5)) => {
                                    if info.requests.get() > 0 {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    conn.as_mut().graceful_shutdown();
                    ended(conn.await);
                }};
            }
            // A first byte that came late: what is left of `client_header` bounds the head.
            // A wait of up to a tenth of the bound (most new connections wait a little for
            // their first bytes) is left to hyper's own timer, which then ends at most 10% late:
            // a watchdog for each would cost a timer per connection.
            let late = waited_since.filter(|since| since.elapsed() > timeouts.client_header / 10);
            if let Some(since) = late {
                tokio::select! {
                    r = conn.as_mut() => return ended(r),
                    _ = shutdown.changed() => {
                        finish!();
                        return;
                    }
                    () = tokio::time::sleep_until(since + timeouts.client_header) => {
                        if info.requests.get() == 0 {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                r = conn.as_mut() => ended(r),
                _ = shutdown.changed() => finish!(),
            }
        };
        served.await;
        // A lingering close, in this task: the connection is still counted, and a drain
        // bounds it.
        if let Some(mut s) = unread.as_ref().and_then(|u| u.take()) {
            super::io::linger_until(&mut s, &mut shutdown).await;
        }
    }
}

/// The status hyper's HTTP/1 server answered a request it refused itself with (its
/// `on_error`): 400 for a head that does not parse, 431 for one past the size limit, 414
/// for a target too long; `None` when it answered nothing.
fn refusal_status(e: &hyper::Error) -> Option<u16> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    // hyper tells some of its kinds apart only in its message.
    let message = e.to_string();
    if e.is_parse_too_large() {
        return Some(if message.contains("URI too long") {
            414
        } else {
            431
        });
    }
    if message.contains("internal error") {
        return None;
    }
    Some(400)
}

/// The client's address as an `X-Forwarded-For` value, formatted without allocating.
/// The last one is kept: most new connections come from an address seen just before.
fn peer_value(worker: &Worker, ip: std::net::IpAddr) -> HeaderValue {
    use std::io::Write;
    if let Some((last, v)) = &*worker.last_peer.borrow() {
        if *last == ip {
            return v.clone();
        }
    }
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IP address is at most 45 characters, and always a valid header value.
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    let v = worker
        .values
        .value(&buf[..len])
        .expect("an IP address is a header value");
    *worker.last_peer.borrow_mut() = Some((ip, v.clone()));
    v
}

/// What the first read of a connection found: the bytes, whether they are the HTTP/2
/// preface, and when the wait for them began if there was one.
type Sniffed = (Vec<u8>, bool, Option<Instant>);

/// Reads the first bytes of a connection and tells whether it speaks HTTP/2 with prior
/// knowledge. `None` when the peer closed before sending anything.
async fn sniff(stream: &TcpStream) -> io::Result<Option<Sniffed>> {
    // Not zeroed: each read fills the spare capacity and sets the length (the loop ends
    // within the first 24 bytes, long before the capacity is used up, so a read of 0
    // always means the peer closed).
    let mut buf = Vec::with_capacity(4096);
    let mut len = 0;
    let mut waited = None;
    loop {
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                len += n;
                let seen = &buf[..len.min(H2_PREFACE.len())];
                if !H2_PREFACE.starts_with(seen) {
                    buf.truncate(len);
                    return Ok(Some((buf, false, waited)));
                }
                if len >= H2_PREFACE.len() {
                    buf.truncate(len);
                    return Ok(Some((buf, true, waited)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                waited.get_or_insert_with(Instant::now);
                stream.readable().await?
            }
            Err(e) => return Err(e),
        }
    }
}

/// `sniff` for a socket not registered yet: one read right after the accept (into zeroed
/// memory: a plain socket reads into a slice); the socket is registered only when the
/// first bytes are not all there. Whether it waited is not told.
async fn sniff_raw(client: &mut Client) -> io::Result<Option<(Vec<u8>, bool)>> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    match client.try_read_raw(&mut buf) {
        Ok(0) => return Ok(None),
        Ok(n) => buf.truncate(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf.clear(),
        Err(e) => return Err(e),
    }
    loop {
        if !buf.is_empty() {
            let seen = &buf[..buf.len().min(H2_PREFACE.len())];
            if !H2_PREFACE.starts_with(seen) {
                return Ok(Some((buf, false)));
            }
            if buf.len() >= H2_PREFACE.len() {
                return Ok(Some((buf, true)));
            }
        }
        if client.io()?.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// The client's connection: first bytes already read are replayed before the rest, and a
/// write that cannot proceed for the body idle time (the client does not read) fails the
/// connection.
struct ClientIo {
    prefix: Vec<u8>,
    pos: usize,
    inner: StallIo<ClientStream>,
    /// `ConnInfo::unread` of an HTTP/1 connection.
    unread: Option<Arc<Unread>>,
}

/// hyper ends a connection (its sending side shut) by dropping it: one that is to linger
/// (`Unread`) leaves a second descriptor of its socket for the connection's task.
impl Drop for ClientIo {
    fn drop(&mut self) {
        if let Some(u) = &self.unread {
            let tcp = match self.inner.get_ref() {
                ClientStream::Plain(s) => s,
                ClientStream::Tls(t) => t.get_ref().0,
            };
            u.keep(tcp);
        }
    }
}

/// A client's connection, in clear or over TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ClientStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ClientStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for ClientStream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ClientStream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }
    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }
    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}

impl AsyncRead for ClientIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
