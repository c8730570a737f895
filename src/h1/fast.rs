//! The own HTTP/1.1 fast path (`--http1 fast`): HTTP/1.1 exchanges, in clear or over TLS,
//! served without hyper's per-request machinery, under the same seams as the hyper path
//! (one routing decision, `routing::route`; one exchange record, `Record`; the same node
//! pick, `handler::pick_node`; the same failure rules and answers of envgate's own).
//!
//! What it takes: HTTP/1.1 requests in origin form, with one valid Host, without a body,
//! with a `Content-Length` body (sent with the head when it came whole with it and is at
//! most `MAX_BODY` bytes, else streamed: `Upload`) or a chunked one (streamed), with or
//! without `Expect: 100-continue`, to a topology whose nodes are all spoken to over
//! cleartext HTTP/1.1 (with or without a connection cap). Anything else (`Upgrade`, `CONNECT`, a
//! coding other than chunked, a length beside chunked, another expectation, a
//! `Connection` option other than `keep-alive` or `close`, `TE`, `Trailer`, HTTP/1.0, a
//! head httparse refuses or that is too large, an odd byte in the target, chunked framing
//! already broken in the first bytes) is *declined* before a byte is relayed: the
//! connection goes to hyper with every byte read so far, so hyper answers it exactly as
//! it would have, and serves the connection from then on. Heads are parsed by httparse,
//! as hyper parses them.
//!
//! Per request: one read of the head (usually), one write to the node (the rewritten
//! head, and the body with it), one read of the answer, one write to the client (head and body together when
//! the body came with the head). Buffers belong to the connection and are reused; node
//! connections are pooled per worker and node (`ConnPool`), checked for staleness without
//! blocking when taken.
//!
//! Failover and blame follow the hyper path: a request that never reached a node goes to
//! the next; a body-less idempotent one also after a reset or a response-head timeout (a
//! node that does not take a body within the body idle time is blamed, 504); a
//! node's malformed or cut answer counts against it; a client that stops reading is not
//! the node's fault. Responses of unknown length go to the client chunked (as hyper sends
//! them), node trailers are not passed on (requests with `TE` are declined, so no client
//! here asked for them), and 1xx answers of the node are skipped (as hyper's client does).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::listener::ClientStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::Client;
use super::framing::{self, ChunkedDecoder, Framing};
use crate::metrics::tally::Failover;
use crate::proxy::body::{Blame, ProxyBody};
use crate::proxy::error::{is_local_resource_error, own, ClientFault, Refusal};
use crate::proxy::handler::{self, ConnInfo};
use crate::proxy::headers;
use crate::proxy::io::{timeout_at_unless_ready, timeout_unless_ready};
use crate::proxy::pool::{ConnPool, Counted, Room};
use crate::proxy::record::Record;
use crate::proxy::worker::{Worker, MAX_HEADERS, MAX_HEAD_BYTES};
use crate::routing::host::valid_authority;
use crate::routing::{self, canary, path, Fields, RequestView, RouteError};
use crate::topology::{NodeId, Timeouts, Topology};

/// Largest response head a node may send (as on the hyper path).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Read size for bodies.
const CHUNK: usize = 16 * 1024;
/// The client buffer's usual size.
const READ_BUF: usize = 4096;
/// Largest request body sent to the node with its head in one write (when it came whole
/// with the head); larger ones, and chunked ones, are streamed (`Upload`).
const MAX_BODY: usize = 64 * 1024;
/// Most attempts one request makes.
const MAX_ATTEMPTS: usize = 1 + crate::config::validate::MAX_RETRIES as usize;

/// How a connection's service by the fast path ended.
pub enum Served {
    /// The connection is over.
    Done,
    /// The fast path does not take the request at the start of `buf`: hyper serves the
    /// connection from here, with these bytes first.
    Decline(ClientStream, Vec<u8>),
}

/// The connection handed to hyper (registered with the reactor), or over when the reactor
/// could not take it.
fn decline(client: Client, buf: Vec<u8>) -> Served {
    match client.into_stream() {
        Ok(s) => Served::Decline(s, buf),
        Err(_) => Served::Done,
    }
}

/// A connection to a node, spoken to by the own codec.
pub struct NodeConn {
    pub(crate) io: TcpStream,
    /// Bytes read from the node and not used yet (empty while pooled).
    pub(crate) buf: Vec<u8>,
    /// The response-head timer, kept for the connection's life and moved for each request:
    /// moving a registered tokio timer later is one atomic operation, where making and
    /// dropping one takes the time driver's lock (about a dozen locked instructions a
    /// request). While the connection is pooled it may still hold the waker of the task
    /// that last used it, until its deadline passes or a request moves it.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    _counted: Counted,
}

impl NodeConn {
    /// Whether the connection is still usable: nothing to read (the node neither closed
    /// it nor sent anything unasked).
    #[inline]
    pub fn is_fresh(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.io.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Serves an HTTP/1.1 connection (in clear or TLS) whose first bytes are `buf`, until it ends or
/// a request is declined.
pub async fn serve(
    worker: &Rc<Worker>,
    info: &Rc<ConnInfo>,
    mut client: Client,
    buf: Vec<u8>,
    timeouts: &Timeouts,
    accepted: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Served {
    match run(worker, info, &mut client, buf, timeouts, accepted, shutdown).await {
        Ok(End::Close) => {
            client.close().await;
            Served::Done
        }
        Ok(End::Linger) => {
            client.linger(shutdown).await;
            Served::Done
        }
        Err(buf) => decline(client, buf),
    }
}

/// How the own codec ends a connection it served to the end.
enum End {
    Close,
    /// After an answer sent while the client still sends a body that is not read: a
    /// lingering close (`Client::linger`).
    Linger,
}

/// `serve`'s loop: `Err` with the bytes read so far when a request is declined.
async fn run(
    worker: &Rc<Worker>,
    info: &Rc<ConnInfo>,
    client: &mut Client,
    mut buf: Vec<u8>,
    timeouts: &Timeouts,
    accepted: Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<End, Vec<u8>> {
    if buf.capacity() < READ_BUF {
        buf.reserve(READ_BUF - buf.len());
    }
    let mut up = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(1024);
    // One timer for the connection, moved for each wait: a timer made and dropped per
    // request takes the time driver's lock twice, moving a registered one later does not.
    let mut wait = std::pin::pin!(tokio::time::sleep_until(accepted + timeouts.client_header));
    loop {
        // The head: within `client_header` of the accept for the first request, within
        // min(client_header, idle) of the wait's start for later ones (hyper's bounds).
        let deadline = if info.requests.get() == 0 {
            accepted + timeouts.client_header
        } else {
            Instant::now() + timeouts.client_header.min(timeouts.idle)
        };
        wait.as_mut().reset(deadline);
        let mut scanned = 0;
        loop {
            if head_end(&buf, &mut scanned) {
                break;
            }
            if buf.len() >= MAX_HEAD_BYTES || (!buf.is_empty() && broken_head(&buf)) {
                // hyper refuses a head as soon as what came of it cannot parse (without
                // waiting for its end), and one past the limit.
                worker.stats.count_fast(true);
                return Err(buf);
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            let read = tokio::select! {
                biased;
                r = client.read_buf(&mut buf) => r,
                () = wait.as_mut() => return Ok(End::Close),
                _ = shutdown.changed() => {
                    if !buf.is_empty() || info.requests.get() > 0 {
                        return Ok(End::Close);
                    }
                    // Not a byte of the first request yet: a short grace to send it.
                    match tokio::time::timeout(
                        crate::proxy::listener::FIRST_REQUEST_GRACE,
                        client.read_buf(&mut buf),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => return Ok(End::Close),
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => return Ok(End::Close),
                Ok(_) => {}
            }
        }
        // Draining: this answer is the connection's last, and says so.
        let closing = *shutdown.borrow();
        let step = exchange(worker, info, client, &mut buf, &mut up, &mut out, closing).await;
        match step {
            Step::Next(_) if closing => return Ok(End::Close),
            Step::Next(n) => {
                buf.drain(..n);
                // A buffer grown for a long head or a body goes back to its usual size, so
                // that what a pipelining client sends next is read (and moved along as each
                // request is taken from its front) a few KiB at a time.
                if buf.capacity() > 4 * READ_BUF {
                    buf.shrink_to(READ_BUF);
                }
                nodelay(client, info);
            }
            Step::Close => return Ok(End::Close),
            Step::Linger => return Ok(End::Linger),
            Step::Decline => {
                worker.stats.count_fast(true);
                return Err(buf);
            }
        }
    }
}

/// Room for a head's fields, left uninitialized (httparse fills what it parses): the
/// 3.2 KB of a zeroed array would be written for every head.
#[inline]
pub(crate) fn no_fields<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Whether the start of a head already fails to parse (a partial head only: the slow
/// path of a head that came in several reads).
#[cold]
fn broken_head(buf: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    httparse::Request::new(&mut fields).parse(buf).is_err()
}

/// `Content-Length`'s value: plain digits (hyper takes nothing else either).
#[inline]
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Whether `buf` holds a whole head (an empty line ends it; httparse takes LF alone as a
/// line end, as hyper does). `scanned` keeps how far the search went.
#[inline]
fn head_end(buf: &[u8], scanned: &mut usize) -> bool {
    let from = scanned.saturating_sub(3);
    for at in memchr::memchr_iter(b'\n', &buf[from..]) {
        let rest = &buf[from + at + 1..];
        if rest.first() == Some(&b'\n') || rest.starts_with(b"\r\n") {
            return true;
        }
    }
    *scanned = buf.len();
    false
}

/// What the connection does after one request.
enum Step {
    /// Answered; the request took this many bytes of the buffer.
    Next(usize),
    Close,
    /// Answered while the client's body was not read whole: the connection ends with a
    /// lingering close.
    Linger,
    Decline,
}

/// Names compared without regard to case.
#[inline]
fn is(name: &str, lower: &str) -> bool {
    name.eq_ignore_ascii_case(lower)
}

/// A target byte the fast path passes on as it is: unreserved, sub-delims, `:`, `@`, `/`,
/// `?`, `%` (a subset of what `http::Uri` takes; anything else is left to hyper).
#[inline]
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// What the head scan found.
#[derive(Default)]
struct Seen {
    host: Option<usize>,
    close: bool,
    forwarded_for: bool,
    forwarded_host: bool,
    forwarded_proto: bool,
    forwarded: bool,
    /// `Expect: 100-continue`.
    expect: bool,
    request_id: Option<usize>,
    request_ids: u8,
    /// The body's length (`Content-Length`).
    length: Option<u64>,
    /// `Transfer-Encoding: chunked`.
    chunked: bool,
}

async fn exchange(
    worker: &Rc<Worker>,
    info: &Rc<ConnInfo>,
    client: &mut Client,
    buf: &mut Vec<u8>,
    up: &mut Vec<u8>,
    out: &mut Vec<u8>,
    closing: bool,
) -> Step {
    let mut fields = no_fields();
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(&buf[..], &mut fields) {
        // A head past hyper's limit is hyper's to refuse (one read may bring more).
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => n,
        _ => return Step::Decline,
    };
    let (Some(m), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Step::Decline;
    };
    if !target.starts_with('/') || !target.bytes().all(plain_target_byte) {
        return Step::Decline;
    }
    let fields: &[httparse::Header<'_>] = req.headers;
    let mut seen = Seen::default();
    for (i, h) in fields.iter().enumerate() {
        let n = h.name;
        match n.len() {
            4 if is(n, "host") => {
                if seen.host.is_some() {
                    return Step::Decline;
                }
                seen.host = Some(i);
            }
            10 if is(n, "connection") => {
                for t in h.value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if t.eq_ignore_ascii_case(b"close") {
                        seen.close = true;
                    } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                        return Step::Decline;
                    }
                }
            }
            14 if is(n, "content-length") => {
                // One field of plain digits; anything else is hyper's.
                if seen.length.is_some() {
                    return Step::Decline;
                }
                match content_length(h.value) {
                    Some(n) => seen.length = Some(n),
                    None => return Step::Decline,
                }
            }
            15 if is(n, "x-forwarded-for") => seen.forwarded_for = true,
            16 if is(n, "x-forwarded-host") => seen.forwarded_host = true,
            17 if is(n, "x-forwarded-proto") => seen.forwarded_proto = true,
            17 if is(n, "transfer-encoding") => {
                // One field naming `chunked` alone; any other coding is hyper's.
                if seen.chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Step::Decline;
                }
                seen.chunked = true;
            }
            9 if is(n, "forwarded") => seen.forwarded = true,
            12 if is(n, "x-request-id") => {
                seen.request_id = Some(i);
                seen.request_ids = seen.request_ids.saturating_add(1);
            }
            2 if is(n, "te") => return Step::Decline,
            6 if is(n, "expect") => {
                // `100-continue`, once; any other expectation is hyper's (417).
                if seen.expect || !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Step::Decline;
                }
                seen.expect = true;
            }
            6 if is(n, "upgrade") => return Step::Decline,
            7 if is(n, "upgrade") || is(n, "trailer") => return Step::Decline,
            10 if is(n, "keep-alive") => return Step::Decline,
            16 if is(n, "proxy-connection") => return Step::Decline,
            18 if is(n, "proxy-authenticate") => return Step::Decline,
            19 if is(n, "proxy-authorization") => return Step::Decline,
            _ => {}
        }
    }
    let Some(host_at) = seen.host else {
        return Step::Decline;
    };
    seen.close |= closing;
    let host = fields[host_at].value;
    if !valid_authority(host) {
        return Step::Decline;
    }
    let Ok(method) = Method::from_bytes(m.as_bytes()) else {
        return Step::Decline;
    };
    if method == Method::CONNECT {
        return Step::Decline;
    }
    if method == Method::HEAD && (seen.chunked || seen.length.is_some_and(|n| n > 0)) {
        // hyper's client sends a HEAD without its body: hyper's to handle.
        return Step::Decline;
    }
    let snap = worker.snapshot();
    if !snap.fast {
        return Step::Decline;
    }
    // A small body that came whole with its head goes to the node with it; any other is
    // streamed (`Upload`). A length beside chunked framing is hyper's to refuse.
    let body_len = match (seen.length, seen.chunked) {
        (None, false) => 0,
        (Some(_), true) => return Step::Decline,
        (Some(n), false) if n <= MAX_BODY as u64 && (buf.len() - len) as u64 >= n => n as usize,
        _ => usize::MAX,
    };
    let streamed = body_len == usize::MAX;
    // Where a streamed body ends in the buffer, when it is all there.
    let body_end = if seen.chunked {
        match chunks_parse(&buf[len..]) {
            Ok(end) => end.map(|n| len + n),
            // Broken framing before a byte went anywhere: hyper refuses it as it does.
            Err(()) => return Step::Decline,
        }
    } else {
        seen.length
            .filter(|n| (buf.len() - len) as u64 >= *n)
            .map(|n| len + n as usize)
    };
    let body_len = if streamed { 0 } else { body_len };
    let total = len + body_len;
    // envgate's own answer to a request with a streamed body: the connection goes on past
    // the body when all of it is in the buffer, else it ends after the answer (`unread`;
    // hyper's server does the same: it drains what it has, or closes).
    let unread = |step: Step| match step {
        Step::Next(_) if streamed => body_end.map_or(Step::Linger, Step::Next),
        s => s,
    };
    let body_unread = streamed && body_end.is_none();
    // From here on the request is the fast path's.
    info.requests.set(info.requests.get() + 1);
    worker.stats.count_fast(false);
    let topo = &*snap.topo;
    // The node-side bounds of the topology in force (the connection's own were taken at
    // its accept, as hyper's are).
    let timeouts = &topo.defaults.timeouts;
    let mut rec = Record::raw(worker, &snap, info, &method, host, target.as_bytes());
    // envgate's own answer before the request went anywhere (its record completed, the
    // connection going on as `unread` says).
    macro_rules! early {
        ($resp:expr, $cookie:expr) => {
            return unread(
                answer(
                    client,
                    out,
                    rec,
                    $resp,
                    &method,
                    timeouts,
                    total,
                    $cookie,
                    seen.close,
                    body_unread,
                )
                .await,
            )
        };
    }
    let (path_part, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let new_path = match path::normalize(path_part, topo.defaults.allow_encoded_slash) {
        Ok(p) => p,
        Err(e) => {
            early!(Refusal::BadPath(e).response(true), None);
        }
    };
    let view = RequestView {
        host: Some(host),
        port: info.local_port,
        path: new_path.as_deref().unwrap_or(path_part),
        query,
        method: &method,
        headers: Fields::Raw(fields),
        client: info.peer.ip(),
        trusted: info.trusted,
        random: worker.random(),
    };
    let route = match routing::route(topo, &view) {
        Ok(r) => r,
        Err(RouteError::NoRoute) => {
            static NO_ROUTE: &[u8] = br#"{"error":"no_route"}"#;
            let resp = own(StatusCode::NOT_FOUND, bytes::Bytes::from_static(NO_ROUTE));
            early!(resp, None);
        }
        Err(e @ (RouteError::TenantRequired | RouteError::BadTenant)) => {
            let missing = e == RouteError::TenantRequired;
            if let Some(entry) = topo.entries.lookup(view.host, view.port) {
                rec.tenant_refused(entry.env, missing);
            }
            let r = if missing {
                Refusal::TenantRequired
            } else {
                Refusal::BadTenant
            };
            early!(r.response(true), None);
        }
    };
    rec.route(&route);
    if let Some(tls) = &info.tls {
        if !tls.covers(host) {
            static MISDIRECTED: &[u8] = br#"{"error":"misdirected_request"}"#;
            let resp = own(
                StatusCode::MISDIRECTED_REQUEST,
                bytes::Bytes::from_static(MISDIRECTED),
            );
            early!(resp, None);
        }
    }
    let mut cookie_buf = [0u8; canary::SET_COOKIE_MAX];
    let cookie = route.canary.and_then(|c| c.set_cookie).and_then(|bucket| {
        let name = topo.environments[route.origin()]
            .canary
            .as_ref()?
            .cookie
            .as_deref()?;
        let secure = info.proto.as_bytes() == b"https"
            || (info.trusted
                && Fields::Raw(fields)
                    .get(&headers::X_FORWARDED_PROTO)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"https")));
        Some(canary::set_cookie(&mut cookie_buf, name, bucket, secure))
    });
    let cookie = cookie.map(|n| &cookie_buf[..n]);
    // The client's fault with its body (400, 408, 413): no node's; the connection ends
    // (lingering when the client may still be sending).
    macro_rules! client_fault {
        ($fault:expr) => {{
            let fault: ClientFault = $fault;
            rec.no_node();
            let resp = fault.refusal().response(true);
            return answer(
                client,
                out,
                rec,
                resp,
                &method,
                timeouts,
                total,
                cookie,
                true,
                fault.unread(),
            )
            .await;
        }};
    }
    let env = route.environment;
    let env_id = route.env;
    let app = route.app;
    if env
        .max_request_body
        .is_some_and(|l| seen.length.is_some_and(|n| n > l))
    {
        let resp = Refusal::BodyTooLarge.response(true);
        early!(resp, cookie);
    }
    let Some(slot) = env.try_enter() else {
        let resp = own(
            StatusCode::SERVICE_UNAVAILABLE,
            env.bodies().over_limit.clone(),
        );
        early!(resp, cookie);
    };

    // The request for the node.
    up.clear();
    up.extend_from_slice(m.as_bytes());
    up.push(b' ');
    match &new_path {
        Some(p) => {
            up.extend_from_slice(p.as_bytes());
            if let Some(q) = query {
                up.push(b'?');
                up.extend_from_slice(q.as_bytes());
            }
        }
        None => up.extend_from_slice(target.as_bytes()),
    }
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let trusted = info.trusted;
    let keep_id = seen.request_ids == 1
        && seen
            .request_id
            .is_some_and(|i| headers::sane_request_id_bytes(fields[i].value));
    let mut xff_joined = false;
    for h in fields {
        let n = h.name;
        let skip = match n.len() {
            10 => is(n, "connection"),
            15 if is(n, "x-forwarded-for") => {
                if trusted {
                    // The trusted proxy's fields, joined, with the peer appended.
                    if !xff_joined {
                        xff_joined = true;
                        up.extend_from_slice(b"x-forwarded-for: ");
                        let mut first = true;
                        for v in fields.iter().filter(|f| is(f.name, "x-forwarded-for")) {
                            if !first {
                                up.extend_from_slice(b", ");
                            }
                            first = false;
                            up.extend_from_slice(v.value);
                        }
                        up.extend_from_slice(b", ");
                        up.extend_from_slice(info.peer_value.as_bytes());
                        up.extend_from_slice(b"\r\n");
                    }
                }
                true
            }
            16 => is(n, "x-forwarded-host") && !trusted,
            // The body's framing is written by envgate (as hyper's client writes it).
            17 => (is(n, "x-forwarded-proto") && !trusted) || is(n, "transfer-encoding"),
            9 => is(n, "forwarded") && !trusted,
            12 => is(n, "x-request-id") && !keep_id,
            // Named by the client's `Connection: close`: hop-by-hop.
            5 => seen.close && is(n, "close"),
            _ => false,
        };
        if !skip {
            push_field(up, n.as_bytes(), h.value);
        }
    }
    if seen.chunked {
        up.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !(trusted && seen.forwarded_host) {
        up.extend_from_slice(b"x-forwarded-host: ");
        up.extend_from_slice(host);
        up.extend_from_slice(b"\r\n");
    }
    if !xff_joined {
        up.extend_from_slice(b"x-forwarded-for: ");
        up.extend_from_slice(info.peer_value.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    if !(trusted && seen.forwarded_proto) {
        up.extend_from_slice(b"x-forwarded-proto: ");
        up.extend_from_slice(info.proto.as_bytes());
        up.extend_from_slice(b"\r\n");
    }
    let id_at = if keep_id {
        let v = fields[seen.request_id.unwrap_or(0)].value;
        rec.sent(Some(v), None);
        None
    } else {
        let id = worker.request_ids.next_raw();
        up.extend_from_slice(b"x-request-id: ");
        let start = up.len();
        up.extend_from_slice(&id);
        let end = up.len();
        up.extend_from_slice(b"\r\n");
        Some(start..end)
    };
    if let Some(r) = id_at {
        rec.sent(Some(&up[r]), None);
    }
    up.extend_from_slice(b"\r\n");
    // The body goes with the head, in the same write: whole, or what came of it so far.
    let mut upload = if streamed {
        let mut body = match seen.length {
            Some(n) => UpBody::Length(n),
            None => UpBody::Chunked(ChunkedDecoder::new()),
        };
        let limit = env.max_request_body.unwrap_or(u64::MAX);
        let mut sent = 0;
        let used = match body.take(&buf[len..], up, limit, &mut sent) {
            Ok(used) => used,
            Err(fault) => {
                drop(slot);
                client_fault!(fault);
            }
        };
        buf.drain(..len + used);
        Some(Upload {
            buf: &mut *buf,
            body,
            limit,
            sent,
            scratch: Vec::new(),
            at: 0,
            need_more: false,
            failed: false,
            since: None,
        })
    } else {
        up.extend_from_slice(&buf[len..total]);
        rec.add_in(body_len as u64);
        None
    };
    let total = if streamed { 0 } else { total };

    // Attempts, as on the hyper path (body-less requests only here).
    let panic_mode = handler::panic_mode(topo, env, app);
    let mut tried = [NodeId::MAX; MAX_ATTEMPTS];
    let attempts = (env.retries as usize + 1).min(MAX_ATTEMPTS);
    // As on the hyper path: only a body-less request is sent again after it reached a
    // node that failed.
    let replayable = idempotent(&method) && body_len == 0 && !streamed;
    // A client that asked for it gets 100 Continue when its body is taken (none for an
    // empty body, as hyper's server does not read it).
    let mut expect = seen.expect && (body_len > 0 || streamed);
    let mut last = Last::NoNode;
    let mut free = true;
    let mut after = None;
    let mut overall: Option<Instant> = None;
    snap.earn_retry(env_id);
    let head = method == Method::HEAD;
    for attempt in 0..attempts {
        let Some((p, i, node)) =
            handler::pick_node(topo, &snap, &route, panic_mode, &tried[..attempt])
        else {
            break;
        };
        if !free && !snap.spend_retry(env_id) {
            break;
        }
        free = false;
        if attempt > 0 {
            env.retried
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tried[attempt] = node;
        let counters = app.slot
            + if p == app.pool {
                i
            } else {
                topo.pools[app.pool].members.len() + i
            };
        rec.attempt(counters, node, after.take());
        let pool = &snap.conns[node];
        let attempt_result = forward(
            pool,
            up,
            head,
            body_len > 0 || streamed,
            timeouts,
            &mut overall,
            Some(&mut *client),
            upload.as_mut(),
            &mut expect,
            None,
        )
        .await;
        match attempt_result {
            Ok((conn, resp, began, connect_ns)) => {
                rec.answered(Some(began), connect_ns);
                let blame = Blame {
                    snap: snap.clone(),
                    scope: route.candidates,
                    node,
                };
                return relay(
                    client,
                    info,
                    out,
                    pool,
                    conn,
                    resp,
                    blame,
                    rec,
                    cookie,
                    seen.close,
                    timeouts,
                    total,
                    slot,
                    upload.as_mut(),
                )
                .await;
            }
            Err(f) => {
                let again = match f {
                    Failure::Client(fault) => {
                        // The client's fault: not counted under the node.
                        rec.add_in(upload.as_ref().map_or(0, |u| u.sent));
                        drop(upload);
                        drop(slot);
                        client_fault!(fault);
                    }
                    // Gone while its request was at the node: 499 (the record's default).
                    Failure::ClientGone => return Step::Close,
                    Failure::NotSent(Cause::Local) => {
                        after = Some(Failover::Local);
                        tracing::warn!(node = %topo.nodes[node].name, "connect failed for lack of local resources (file descriptors, ports or buffers); not counted against the node");
                        last = Last::Local;
                        free = true;
                        true
                    }
                    Failure::NotSent(Cause::Node) => {
                        after = Some(Failover::Connect);
                        handler::passive_failure(topo, route.candidates, node);
                        last = Last::BadGateway;
                        free = true;
                        true
                    }
                    Failure::Timeout => {
                        after = Some(Failover::Timeout);
                        handler::passive_failure(topo, route.candidates, node);
                        last = Last::Timeout;
                        replayable
                    }
                    Failure::UploadStalled => {
                        handler::passive_failure(topo, route.candidates, node);
                        last = Last::Timeout;
                        false
                    }
                    Failure::Deadline => {
                        last = Last::Timeout;
                        false
                    }
                    Failure::Busy => {
                        rec.no_node();
                        last = Last::Busy;
                        false
                    }
                    Failure::Failed => {
                        after = Some(Failover::Reset);
                        handler::passive_failure(topo, route.candidates, node);
                        last = Last::BadGateway;
                        replayable
                    }
                    Failure::Switched => {
                        handler::passive_failure(topo, route.candidates, node);
                        last = Last::BadGateway;
                        false
                    }
                };
                if !again || overall.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
    }
    drop(slot);
    // The upload went partly to a node: what is left of it on the client's connection
    // cannot be read as a next request.
    let cut_short = upload.as_ref().is_some_and(|u| !u.done());
    rec.add_in(upload.as_ref().map_or(0, |u| u.sent));
    drop(upload);
    let b = env.bodies();
    let resp = match last {
        Last::NoNode => own(StatusCode::SERVICE_UNAVAILABLE, b.no_healthy_node.clone()),
        Last::Local => own(StatusCode::SERVICE_UNAVAILABLE, b.no_capacity.clone()),
        Last::BadGateway => own(StatusCode::BAD_GATEWAY, b.bad_gateway.clone()),
        Last::Timeout => own(StatusCode::GATEWAY_TIMEOUT, b.gateway_timeout.clone()),
        Last::Busy => own(StatusCode::SERVICE_UNAVAILABLE, b.node_busy.clone()),
    };
    answer(
        client,
        out,
        rec,
        resp,
        &method,
        timeouts,
        total,
        cookie,
        seen.close || cut_short,
        cut_short,
    )
    .await
}

#[inline]
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[derive(Clone, Copy)]
enum Last {
    Busy,
    NoNode,
    Local,
    BadGateway,
    Timeout,
}

#[derive(Clone, Copy)]
pub(crate) enum Cause {
    Node,
    Local,
}

#[derive(Clone, Copy)]
pub(crate) enum Failure {
    /// The request never reached the node.
    NotSent(Cause),
    /// No response head within `response_header`.
    Timeout,
    /// The overall request deadline passed.
    Deadline,
    /// The node did not take the request's body within the body idle time.
    UploadStalled,
    /// The node failed after the request was (maybe) sent.
    Failed,
    /// The client failed its own body (a streamed one).
    Client(ClientFault),
    /// The client went away while its request was at the node.
    ClientGone,
    /// The node stayed at its `max_connections` for the queue time.
    Busy,
    /// The node switched protocols unasked (101).
    Switched,
}

/// A node's response head, as positions in the connection's buffer.
pub(crate) struct UpHead {
    pub(crate) status: u16,
    /// The head's length in the buffer.
    pub(crate) len: usize,
    pub(crate) framing: Framing,
    /// The node said `Connection: close` (or answered HTTP/1.0 without keep-alive).
    pub(crate) close: bool,
    /// An answer that cannot be chunked (to HEAD, 204, 304): it declares no trailers.
    unchunkable: bool,
}

/// Where `read_head` puts a node's answer as hyper's types, for a client hyper serves.
pub(crate) struct Answer<'a> {
    /// The worker's cache of field names.
    pub(crate) values: &'a headers::ValueArena,
    /// Fields added on the way out (the canary cookie).
    pub(crate) room: usize,
    pub(crate) parts: Option<http::response::Parts>,
}

/// A request without a body, whose head is `request`, sent to a node by the own codec
/// for a client it does not serve itself (an HTTP/2 stream): one attempt, as `forward`.
/// Leaving is the client's business there (hyper drops this future with the stream).
pub(crate) async fn send_bodiless(
    pool: &ConnPool,
    request: &[u8],
    head_request: bool,
    t: &Timeouts,
    overall: &mut Option<Instant>,
    answer: &mut Answer<'_>,
) -> Result<(NodeConn, UpHead, Instant, Option<u64>), Failure> {
    forward(
        pool,
        request,
        head_request,
        false,
        t,
        overall,
        None,
        None,
        &mut false,
        Some(answer),
    )
    .await
}

/// Ends when the client of the own codec went away; never without one.
async fn gone(client: &mut Option<&mut Client>) {
    match client {
        Some(c) => c.gone().await,
        None => std::future::pending().await,
    }
}

/// One attempt: a pooled connection or a new one, the request written whole, then the
/// response head (1xx skipped), within `response_header` and the overall deadline.
/// `client` is the own codec's client (`None` for `send_bodiless`); `upload` and `expect`
/// need one.
#[allow(clippy::too_many_arguments)]
async fn forward(
    pool: &ConnPool,
    request: &[u8],
    head_request: bool,
    body: bool,
    t: &Timeouts,
    overall: &mut Option<Instant>,
    mut client: Option<&mut Client>,
    mut upload: Option<&mut Upload<'_>>,
    expect: &mut bool,
    mut parts: Option<&mut Answer<'_>>,
) -> Result<(NodeConn, UpHead, Instant, Option<u64>), Failure> {
    loop {
        let mut start = Instant::now();
        let deadline = *overall.get_or_insert(start + t.request);
        let (mut conn, reused, connect_ns) = match pool.take_fast(t.upstream_idle, start) {
            Some(c) => (c, true, None),
            None => 'new: {
                if start >= deadline {
                    return Err(Failure::Deadline);
                }
                let counted = match pool.reserve() {
                    Some(c) => c,
                    // The node is at its `max_connections`: wait for room (boxed, a rare
                    // path), as on the hyper path.
                    None => {
                        // A client that leaves meanwhile takes its place in the queue
                        // with it (as on the hyper path, where its handler is dropped).
                        let room = tokio::select! {
                            biased;
                            r = Box::pin(pool.wait_for_room_fast(
                                t.upstream_idle,
                                (start + t.queue).min(deadline),
                            )) => r,
                            () = gone(&mut client) => return Err(Failure::ClientGone),
                        };
                        // The time in the queue is neither the node's answer time nor
                        // its connect time: the attempt starts now.
                        start = Instant::now();
                        match room {
                            // The deadline passed in the queue: nobody's fault.
                            _ if start >= deadline => return Err(Failure::Deadline),
                            Some(Room::Pooled(c)) => break 'new (c, true, None),
                            Some(Room::New(c)) => c,
                            None => return Err(Failure::Busy),
                        }
                    }
                };
                let until = start + t.connect.min(deadline - start);
                let connecting = tokio::time::timeout_at(until, TcpStream::connect(pool.addr));
                let connected = tokio::select! {
                    biased;
                    c = connecting => c,
                    () = gone(&mut client) => return Err(Failure::ClientGone),
                };
                let io = match connected {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) if is_local_resource_error(&e) => {
                        return Err(Failure::NotSent(Cause::Local))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(node = %pool.addr, error = %e, "connect failed");
                        return Err(Failure::NotSent(Cause::Node));
                    }
                    Err(_) => {
                        tracing::debug!(node = %pool.addr, "connect timed out");
                        return Err(Failure::NotSent(Cause::Node));
                    }
                };
                let _ = io.set_nodelay(true);
                let ns = start.elapsed().as_nanos() as u64;
                (
                    NodeConn {
                        io,
                        buf: Vec::with_capacity(CHUNK),
                        timer: None,
                        _counted: counted,
                    },
                    false,
                    Some(ns),
                )
            }
        };
        // A pooled connection came without a wait: the clock read above is still now.
        let sent_at = if reused { start } else { Instant::now() };
        // A head the node does not take within the body idle time: it does not read.
        let mut wrote = 0;
        let written = timeout_at_unless_ready(
            sent_at + t.body_idle,
            write_counted(&mut conn.io, request, &mut wrote),
        )
        .await;
        match written {
            Ok(Ok(())) => {}
            // A pooled connection the node closed meanwhile: the request did not go; a
            // fresh connection to the same node takes it.
            Ok(Err(_)) if reused && wrote == 0 => continue,
            Ok(Err(_)) if wrote == 0 => return Err(Failure::NotSent(Cause::Node)),
            // Some of it may have reached the node.
            Ok(Err(_)) => return Err(Failure::Failed),
            Err(_) if body => return Err(Failure::UploadStalled),
            Err(_) => return Err(Failure::Failed),
        }
        if let (true, Some(client)) = (*expect, client.as_deref_mut()) {
            // The body is asked for once the request is on its way to a node (where
            // hyper's server says 100 Continue: when the body is first read). The final
            // answer is a second write: no Nagle delay behind this one.
            *expect = false;
            client.set_nodelay();
            let said = tokio::time::timeout(
                t.body_idle,
                client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
            )
            .await;
            if !matches!(said, Ok(Ok(()))) {
                return Err(Failure::ClientGone);
            }
        }
        conn.buf.clear();
        // The rest of a streamed body; a node that answers meanwhile is read from here on.
        if let (Some(u), Some(client)) = (upload.as_deref_mut(), client.as_deref_mut()) {
            match pump(u, client, &mut conn, t).await {
                Ok(()) => {}
                Err(Pump::Client(f)) => return Err(Failure::Client(f)),
                Err(Pump::NodeStalled) => return Err(Failure::UploadStalled),
                Err(Pump::NodeFailed) => return Err(Failure::Failed),
            }
        }
        // The response-head timer starts once the body went whole; the time spent
        // uploading does not count against the overall deadline (as on the hyper path).
        let head_due = if body {
            let done = Instant::now();
            (done + t.response_header).min(deadline + (done - sent_at))
        } else {
            (sent_at + t.response_header).min(deadline)
        };
        // A client that goes away while its request is at the node abandons the exchange
        // (its record says 499, the node connection closes), as on the hyper path.
        let head = tokio::select! {
            biased;
            h = read_head(&mut conn, head_request, head_due, parts.as_deref_mut()) => h,
            () = gone(&mut client) => return Err(Failure::ClientGone),
        };
        match head {
            Ok(h) => return Ok((conn, h, start, connect_ns)),
            Err(HeadError::Closed) if reused && conn.buf.is_empty() => {
                // The node closed a kept-alive connection as the request went: as hyper
                // does, this counts as a failed attempt (retried if idempotent).
                return Err(Failure::Failed);
            }
            Err(HeadError::Closed | HeadError::Malformed) => return Err(Failure::Failed),
            // As on the hyper path: the node's fault, and not tried elsewhere.
            Err(HeadError::Switched) => return Err(Failure::Switched),
            Err(HeadError::Timeout) => {
                return Err(
                    if Instant::now() >= deadline && deadline < sent_at + t.response_header {
                        Failure::Deadline
                    } else {
                        Failure::Timeout
                    },
                )
            }
        }
    }
}

/// A request body on its way from the client, sent to the node as it comes.
struct Upload<'a> {
    /// The client's bytes not used yet (the rest of the body, maybe a next request).
    buf: &'a mut Vec<u8>,
    body: UpBody,
    /// Bytes the body may have (`max_request_body`).
    limit: u64,
    /// Body bytes sent so far.
    sent: u64,
    /// What goes to the node next, written up to `at`.
    scratch: Vec<u8>,
    at: usize,
    /// `buf` holds no whole piece of the body: read more first.
    need_more: bool,
    /// The upload stopped (after the node answered): nothing more is sent.
    failed: bool,
    /// Since when the upload waits without moving (the client's bytes or the node's
    /// taking them): kept across the moves a `select!` cuts short, so that the body idle
    /// bound holds whatever else happens meanwhile.
    since: Option<Instant>,
}

impl Upload<'_> {
    /// Whether the body went whole to the node.
    fn done(&self) -> bool {
        self.body.is_done() && self.at == self.scratch.len()
    }
}

/// How much of a streamed body is still to come.
enum UpBody {
    /// This many bytes.
    Length(u64),
    /// Chunked, re-chunked for the node as the data comes (as hyper's client sends it;
    /// trailers, which only a declared `Trailer` would let through, are not).
    Chunked(ChunkedDecoder),
}

impl UpBody {
    fn is_done(&self) -> bool {
        match self {
            UpBody::Length(left) => *left == 0,
            UpBody::Chunked(d) => d.is_done(),
        }
    }

    /// Takes what `input` holds of the body into `out` (framed for the node); returns
    /// the bytes of `input` used. Broken framing and a body past `limit` are the
    /// client's faults.
    fn take(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: u64,
        sent: &mut u64,
    ) -> Result<usize, ClientFault> {
        match self {
            UpBody::Length(left) => {
                let take = (input.len() as u64).min(*left) as usize;
                out.extend_from_slice(&input[..take]);
                *left -= take as u64;
                *sent += take as u64;
                Ok(take)
            }
            UpBody::Chunked(decoder) => {
                let mut at = 0;
                while at < input.len() && !decoder.is_done() {
                    let (used, data) = decoder
                        .decode(&input[at..])
                        .map_err(|_| ClientFault::Framing)?;
                    if !data.is_empty() {
                        *sent += data.len() as u64;
                        if *sent > limit {
                            return Err(ClientFault::TooLarge);
                        }
                        push_chunk(out, &input[at + data.start..at + data.end]);
                    }
                    if used == 0 {
                        break;
                    }
                    at += used;
                }
                // hyper refuses a trailer line that is not a field as soon as it comes.
                if !trailers_parse(decoder) {
                    return Err(ClientFault::Framing);
                }
                if decoder.is_done() {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                Ok(at)
            }
        }
    }
}

/// Whether what came of a chunked body so far is well framed, and where it ends.
/// `Ok(Some(n))`: the body ends after `n` bytes; `Ok(None)`: more is to come.
fn chunks_parse(input: &[u8]) -> Result<Option<usize>, ()> {
    let mut decoder = ChunkedDecoder::new();
    let mut at = 0;
    while at < input.len() && !decoder.is_done() {
        match decoder.decode(&input[at..]) {
            Ok((0, _)) => break,
            Ok((used, _)) => at += used,
            Err(_) => return Err(()),
        }
    }
    if !trailers_parse(&decoder) {
        return Err(());
    }
    Ok(decoder.is_done().then_some(at))
}

/// Whether a chunked body's trailer section (whole once the decoder is done) is header
/// fields so far, as hyper reads it (which refuses the body at the first line that is not
/// one).
fn trailers_parse(decoder: &ChunkedDecoder) -> bool {
    let trailers = decoder.trailers();
    if trailers.is_empty() {
        return true;
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    if !decoder.is_done() {
        return httparse::parse_headers(trailers, &mut fields).is_ok();
    }
    decoder
        .with_trailer_fields::<MAX_HEADERS, _>(|_| ())
        .is_some()
}

enum Pump {
    Client(ClientFault),
    /// The node took nothing of the body for the body idle time.
    NodeStalled,
    NodeFailed,
}

/// How much of a node's answer is taken while the upload goes on (more waits for its end).
const EARLY_MAX: usize = 64 * 1024;

/// Whether `conn.buf` holds a whole answer head (the node answered before the upload
/// ended).
/// Informational answers (1xx but 101, which `read_head` refuses) are dropped: the upload
/// goes on after them, as hyper's client's does.
fn answered(conn: &mut NodeConn) -> bool {
    loop {
        let mut scanned = 0;
        if !head_end(&conn.buf, &mut scanned) {
            return false;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut fields);
        match r.parse(&conn.buf) {
            Ok(httparse::Status::Complete(n))
                if r.code.is_some_and(|c| (100..200).contains(&c) && c != 101) =>
            {
                conn.buf.drain(..n);
            }
            _ => return true,
        }
    }
}

/// One move of an upload: a write to the node of what is ready, else what the client's
/// buffer holds made ready, else a read from the client, each within the body idle time
/// (a client that stalls gets 408; a node that does not read is blamed). Its state is in
/// `u`, so that a move cut short (another branch of a `select!` won) loses nothing.
/// `Ok(true)` once the body went whole.
async fn step(
    u: &mut Upload<'_>,
    client: &mut Client,
    w: &mut tokio::net::tcp::WriteHalf<'_>,
    t: &Timeouts,
) -> Result<bool, Pump> {
    if u.at < u.scratch.len() {
        let due = *u.since.get_or_insert_with(Instant::now) + t.body_idle;
        return match timeout_at_unless_ready(due, w.write(&u.scratch[u.at..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => Err(Pump::NodeFailed),
            Ok(Ok(n)) => {
                u.at += n;
                u.since = None;
                Ok(false)
            }
            Err(_) => Err(Pump::NodeStalled),
        };
    }
    if u.body.is_done() {
        return Ok(true);
    }
    if !u.buf.is_empty() && !u.need_more {
        u.scratch.clear();
        u.at = 0;
        let before = u.sent;
        let used = u
            .body
            .take(u.buf, &mut u.scratch, u.limit, &mut u.sent)
            .map_err(Pump::Client)?;
        u.buf.drain(..used);
        u.need_more = used == 0;
        // Only body data (or its end) is the client's progress, as a data frame is on
        // hyper's path: chunk framing alone (sizes padded with zeros or spaces, long
        // extensions) does not hold the wait open.
        if u.sent > before || u.body.is_done() {
            u.since = None;
        }
        return Ok(false);
    }
    if u.buf.capacity() - u.buf.len() < 1024 {
        u.buf.reserve(CHUNK);
    }
    let due = *u.since.get_or_insert_with(Instant::now) + t.body_idle;
    match tokio::time::timeout_at(due, client.read_buf(u.buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Err(Pump::Client(ClientFault::Gone)),
        Ok(Ok(_)) => {
            u.need_more = false;
            Ok(false)
        }
        Err(_) => Err(Pump::Client(ClientFault::Stalled)),
    }
}

/// Sends a streamed body to the node until it went whole, or until the node answered
/// (a whole head in `conn.buf`: its answer is relayed while the upload goes on, as a node
/// may stream its answer as the body comes). What the node sends before its head is
/// whole is kept (up to `EARLY_MAX`). A failure after the node answered ends the upload
/// and leaves the answer to be relayed.
async fn pump(
    u: &mut Upload<'_>,
    client: &mut Client,
    conn: &mut NodeConn,
    t: &Timeouts,
) -> Result<(), Pump> {
    let mut node_open = true;
    loop {
        if u.done() || answered(conn) {
            return Ok(());
        }
        if conn.buf.len() >= EARLY_MAX {
            // That much and no head: not an answer (`read_head` would refuse it too).
            return Err(Pump::NodeFailed);
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(CHUNK);
        }
        let (mut r, mut w) = conn.io.split();
        tokio::select! {
            biased;
            read = r.read_buf(&mut conn.buf), if node_open => match read {
                Ok(1..) => {}
                _ => {
                    node_open = false;
                    if !answered(conn) {
                        return Err(Pump::NodeFailed);
                    }
                }
            },
            moved = step(u, client, &mut w, t) => match moved {
                Ok(_) => {}
                // The client's fault, whatever the node did meanwhile: no blame.
                Err(Pump::Client(f)) => return Err(Pump::Client(f)),
                Err(p) => {
                    u.failed = true;
                    return if answered(conn) { Ok(()) } else { Err(p) };
                }
            },
        }
    }
}

/// `read_node`, moving a streamed upload on meanwhile (the node's answer came before the
/// body went whole). The node's idle time counts from the upload's last move.
/// `due`: when the node's body stalls if nothing came by then (once the upload is over).
async fn read_node_up(
    conn: &mut NodeConn,
    client: &mut Client,
    upload: &mut Option<&mut Upload<'_>>,
    t: &Timeouts,
    mut due: Instant,
) -> Result<usize, BodyFault> {
    if let Some(u) = upload.as_deref_mut() {
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(CHUNK);
        }
        let uploading = !u.failed && !u.done();
        while !u.failed && !u.done() {
            let (mut r, mut w) = conn.io.split();
            tokio::select! {
                biased;
                read = r.read_buf(&mut conn.buf) => {
                    return read.map_err(|_| BodyFault::Node("body error"));
                }
                moved = step(u, client, &mut w, t) => match moved {
                    Ok(_) => {}
                    // A client that fails its body ends the exchange: not the node's
                    // fault (as on the hyper path).
                    Err(Pump::Client(_)) => return Err(BodyFault::Client),
                    // The node stopped taking the body: its answer goes on; the rest of the
                    // body has nowhere to go.
                    Err(_) => u.failed = true,
                },
                () = tokio::time::sleep(t.body_idle) => return Err(BodyFault::Node("body stalled")),
            }
        }
        if uploading {
            // A node may send nothing more until the upload ended: its idle time starts
            // then.
            due = due.max(Instant::now() + t.body_idle);
        }
    }
    read_node(conn, due).await
}

/// `write_all`, counting what was written (a request that failed part way may have
/// reached the node).
async fn write_counted(io: &mut TcpStream, mut data: &[u8], wrote: &mut usize) -> io::Result<()> {
    while !data.is_empty() {
        let n = io.write(data).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *wrote += n;
        data = &data[n..];
    }
    Ok(())
}

enum HeadError {
    Closed,
    Malformed,
    Timeout,
    /// A 101 to a request that asked for no switch.
    Switched,
}

/// Drops the empty lines (CRLF or LF) at the start of `buf`, as httparse and hyper's
/// client skip them before a status line.
#[cold]
fn skip_empty_lines(buf: &mut Vec<u8>) {
    let mut at = 0;
    loop {
        match &buf[at..] {
            [b'\n', ..] => at += 1,
            [b'\r', b'\n', ..] => at += 2,
            _ => break,
        }
    }
    buf.drain(..at);
}

/// Reads the node's response head into `conn.buf` (informational answers are dropped).
async fn read_head(
    conn: &mut NodeConn,
    head_request: bool,
    due: Instant,
    parts: Option<&mut Answer<'_>>,
) -> Result<UpHead, HeadError> {
    match &mut conn.timer {
        Some(t) => t.as_mut().reset(due),
        None => conn.timer = Some(Box::pin(tokio::time::sleep_until(due))),
    }
    let mut scanned = 0;
    loop {
        if matches!(conn.buf.first(), Some(b'\r' | b'\n')) {
            skip_empty_lines(&mut conn.buf);
            scanned = 0;
        }
        if head_end(&conn.buf, &mut scanned) {
            let mut fields = no_fields();
            let mut resp = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                &conn.buf,
                &mut fields,
            );
            let len = match parsed {
                Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
                Ok(httparse::Status::Complete(_)) => return Err(HeadError::Malformed),
                Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
                Err(_) => return Err(HeadError::Malformed),
            };
            let status = resp.code.unwrap_or(0);
            if status < 100 {
                return Err(HeadError::Malformed);
            }
            let http10 = resp.version == Some(0);
            if (100..200).contains(&status) && status != 101 {
                conn.buf.drain(..len);
                scanned = 0;
                continue;
            }
            if status == 101 {
                // A switch nobody asked for.
                return Err(HeadError::Switched);
            }
            // The last `Transfer-Encoding` field alone decides, as in hyper's client.
            let mut te: Option<&[u8]> = None;
            let mut cl: [&[u8]; 4] = [b""; 4];
            let mut ncl = 0;
            let mut close = http10;
            let mut saw_close = false;
            for h in resp.headers.iter() {
                if is(h.name, "transfer-encoding") {
                    te = Some(h.value);
                } else if is(h.name, "content-length") {
                    if ncl == cl.len() {
                        // More fields than kept: each must say what the first said (hyper
                        // takes any number of equal lengths). One that differs is kept in
                        // place of the second, so that the lengths disagree if they count.
                        if framing::length(&[cl[0], h.value]).is_err() {
                            cl[1] = h.value;
                        }
                        continue;
                    }
                    cl[ncl] = h.value;
                    ncl += 1;
                } else if is(h.name, "connection") {
                    // As hyper's client: once a field says `close`, a later `keep-alive`
                    // does not undo it; `keep-alive` keeps an HTTP/1.0 answer's connection.
                    let visible = h
                        .value
                        .iter()
                        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
                    let has = |token: &[u8]| {
                        visible
                            && h.value
                                .split(|b| *b == b',')
                                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
                    };
                    if saw_close || has(b"close") {
                        saw_close = true;
                        close = true;
                    } else if close {
                        close = !has(b"keep-alive");
                    }
                }
            }
            let framing = framing::response(head_request, status, te, &cl[..ncl])
                .map_err(|_| HeadError::Malformed)?;
            if http10 && te.is_some() && framing != Framing::Empty {
                // A coding in an HTTP/1.0 answer that has a body (hyper refuses it too).
                return Err(HeadError::Malformed);
            }
            if let Some(a) = parts {
                a.parts = response_parts(&conn.buf[..len], status, resp.headers, a.values, a.room);
            }
            return Ok(UpHead {
                status,
                len,
                framing,
                close,
                unchunkable: head_request || matches!(status, 204 | 304),
            });
        }
        if conn.buf.len() >= MAX_RESPONSE_HEAD {
            return Err(HeadError::Malformed);
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(CHUNK);
        }
        let Some(timer) = conn.timer.as_mut() else {
            return Err(HeadError::Timeout);
        };
        let read = tokio::select! {
            biased;
            r = conn.io.read_buf(&mut conn.buf) => r,
            () = timer.as_mut() => return Err(HeadError::Timeout),
        };
        match read {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

/// A node's response head, read and checked by `read_head` (`fields` parsed from `head`),
/// as hyper's types for hyper's HTTP/2 server: the values share one copy of the head's
/// bytes, and the hop-by-hop fields are left out. `None` for a name hyper's types do not
/// take (as hyper's client, which refuses such a head).
fn response_parts(
    head: &[u8],
    status: u16,
    fields: &[httparse::Header<'_>],
    values: &headers::ValueArena,
    room: usize,
) -> Option<http::response::Parts> {
    use http::header::HeaderValue;
    // A copy of its own, not the arena's: HPACK tables keep values for a connection's life.
    let bytes = bytes::Bytes::copy_from_slice(head);
    let base = head.as_ptr() as usize;
    // Room for the fields added on the way out (`room`: the canary cookie) and one more:
    // hyper's HTTP/2 server looks Date and Content-Length up through `entry`, which grows a
    // full map even when they are there. The usual `Connection` field is not kept, so the
    // map of a node's usual answer stays small (a map for 6 fields is 0.6 KiB, for 7 to 12
    // fields 1.2 KiB: a large allocation for glibc).
    let connection = fields.iter().filter(|f| is(f.name, "connection")).count();
    let mut map = http::HeaderMap::with_capacity(fields.len() - connection + room + 1);
    // The usual `Connection: keep-alive` (or `close`) names only hop-by-hop fields: it is
    // left out here; any other hop-by-hop field (or option) takes the general strip after.
    let mut strip = false;
    let mut close_option = false;
    let mut close_field = false;
    for f in fields {
        if is(f.name, "connection") {
            let mut only_hop = true;
            for t in f.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if t.eq_ignore_ascii_case(b"close") {
                    close_option = true;
                } else if !(t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive")) {
                    only_hop = false;
                }
            }
            if only_hop {
                continue;
            }
            strip = true;
        } else if hop_by_hop(f.name) {
            strip = true;
        } else if is(f.name, "close") {
            close_field = true;
        }
        let name = values.name(f.name.as_bytes())?;
        let at = f.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(bytes.slice(at..at + f.value.len())).ok()?;
        map.append(name, value);
    }
    if strip {
        headers::strip_hop_by_hop(&mut map, false);
    }
    if close_option && close_field {
        map.remove("close");
    }
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(status).ok()?;
    parts.headers = map;
    Some(parts)
}

/// Hop-by-hop fields of a response (those `Connection` names are found separately).
#[inline]
fn hop_by_hop(name: &str) -> bool {
    match name.len() {
        2 => is(name, "te"),
        7 => is(name, "upgrade"),
        10 => is(name, "connection") || is(name, "keep-alive"),
        16 => is(name, "proxy-connection"),
        17 => is(name, "transfer-encoding"),
        18 => is(name, "proxy-authenticate"),
        19 => is(name, "proxy-authorization"),
        _ => false,
    }
}

/// Whether `name` is one of the options of the response's `Connection` fields.
fn named_by_connection(fields: &[httparse::Header<'_>], name: &str) -> bool {
    fields
        .iter()
        .filter(|h| is(h.name, "connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// Writes the node's answer to the client, then its body, and gives the node connection
/// back when the exchange ended whole.
#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &mut Client,
    info: &ConnInfo,
    out: &mut Vec<u8>,
    pool: &ConnPool,
    mut conn: NodeConn,
    resp: UpHead,
    blame: Blame,
    mut rec: Record,
    cookie: Option<&[u8]>,
    client_close: bool,
    t: &Timeouts,
    len: usize,
    slot: crate::topology::InFlight,
    mut upload: Option<&mut Upload<'_>>,
) -> Step {
    // A body not sent whole yet when the head goes out does not close the connection by
    // itself: it may end while the answer is relayed (an echo), and the connection goes on
    // (hyper's server does the same).
    let close = client_close;
    out.clear();
    {
        let mut fields = no_fields();
        let mut r = httparse::Response::new(&mut []);
        // Parsed before, so it parses again.
        let _ = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut r,
            &conn.buf[..resp.len],
            &mut fields,
        );
        out.extend_from_slice(b"HTTP/1.1 ");
        push_status(out, resp.status, r.reason);
        let has_connection_options = r
            .headers
            .iter()
            .any(|h| is(h.name, "connection") && !h.value.trim_ascii().is_empty());
        let mut date = false;
        let mut length = false;
        for h in r.headers.iter() {
            if hop_by_hop(h.name) {
                continue;
            }
            let is_length = is(h.name, "content-length");
            // No length beside chunked framing, nor on 204 and 304 (as hyper sends them).
            if is_length
                && (matches!(resp.framing, Framing::Chunked | Framing::Close)
                    || matches!(resp.status, 204 | 304))
            {
                continue;
            }
            if has_connection_options && named_by_connection(r.headers, h.name) {
                continue;
            }
            if resp.unchunkable && is(h.name, "trailer") {
                // No chunked body, no trailers to declare (hyper leaves it out too).
                continue;
            }
            date |= is(h.name, "date");
            length |= is_length;
            push_field(out, h.name.as_bytes(), h.value);
        }
        // A length the node's `Connection` took away is the body's framing all the same:
        // written again (as hyper does from the body's size).
        if let (Framing::Length(n), false) = (resp.framing, length) {
            push_field(out, b"content-length", itoa_buf(n).as_bytes());
        }
        if matches!(resp.framing, Framing::Chunked | Framing::Close) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !date {
            push_date(out);
        }
        if let Some(c) = cookie {
            push_field(out, b"set-cookie", c);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    rec.status(resp.status);
    conn.buf.drain(..resp.len);
    let mut sent: u64 = 0;
    // The body: what came with the head goes out with it.
    let outcome = match resp.framing {
        Framing::Empty => Ok(true),
        Framing::Length(n) => {
            relay_length(client, info, out, &mut conn, n, t, &mut sent, &mut upload).await
        }
        Framing::Chunked | Framing::Close => {
            relay_chunked(
                client,
                info,
                out,
                &mut conn,
                resp.framing == Framing::Chunked,
                t,
                &mut sent,
                &mut upload,
            )
            .await
        }
    };
    rec.add_out(sent);
    // A body not sent whole (the node answered before it ended): what is left of it on
    // the client's connection cannot be read as a next request, and the node's
    // connection is not in a state to reuse.
    let unfinished = upload.as_ref().is_some_and(|u| !u.done());
    if let Some(u) = &upload {
        rec.add_in(u.sent);
    }
    let close = close || unfinished;
    let step = match outcome {
        Ok(reusable) => {
            if !out.is_empty() && write_client(client, out, t).await.is_err() {
                rec.finish(false);
                return Step::Close;
            }
            blame.succeed();
            drop(slot);
            if reusable && !resp.close && !unfinished && conn.buf.is_empty() {
                pool.put_fast(conn);
            }
            rec.finish(true);
            if unfinished {
                Step::Linger
            } else if close {
                Step::Close
            } else {
                Step::Next(len)
            }
        }
        Err(BodyFault::Node(why)) => {
            blame.fail(why);
            rec.finish(false);
            Step::Close
        }
        Err(BodyFault::Client) => {
            rec.finish(false);
            Step::Close
        }
    };
    step
}

enum BodyFault {
    Node(&'static str),
    Client,
}

/// Sets TCP_NODELAY on the client's socket before a second write (see
/// `ConnInfo::nodelay`).
#[inline]
fn nodelay(client: &Client, info: &ConnInfo) {
    if !info.nodelay.get() {
        client.set_nodelay();
        info.nodelay.set(true);
    }
}

/// Writes `out` to the client whole, within the body idle time (a client that stops
/// reading loses its connection, and is not the node's fault).
#[inline]
async fn write_client(client: &mut Client, out: &mut Vec<u8>, t: &Timeouts) -> io::Result<()> {
    let r = timeout_unless_ready(t.body_idle, client.write_all(out)).await;
    out.clear();
    match r {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Reads more of the node's answer within the body idle time; 0 at its end.
#[inline]
async fn read_node(conn: &mut NodeConn, due: Instant) -> Result<usize, BodyFault> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(CHUNK);
    }
    match tokio::time::timeout_at(due, conn.io.read_buf(&mut conn.buf)).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(_)) => Err(BodyFault::Node("body error")),
        Err(_) => Err(BodyFault::Node("body stalled")),
    }
}

/// A body of `n` bytes. `Ok(reusable)`.
#[allow(clippy::too_many_arguments)]
async fn relay_length(
    client: &mut Client,
    info: &ConnInfo,
    out: &mut Vec<u8>,
    conn: &mut NodeConn,
    n: u64,
    t: &Timeouts,
    sent: &mut u64,
    upload: &mut Option<&mut Upload<'_>>,
) -> Result<bool, BodyFault> {
    let mut left = n;
    loop {
        let take = (conn.buf.len() as u64).min(left) as usize;
        out.extend_from_slice(&conn.buf[..take]);
        conn.buf.drain(..take);
        left -= take as u64;
        *sent += take as u64;
        if left == 0 {
            // Bytes past the body: the node's framing is off, the connection is not reused.
            return Ok(conn.buf.is_empty());
        }
        if !out.is_empty() {
            // More writes follow.
            nodelay(client, info);
            if write_client(client, out, t).await.is_err() {
                return Err(BodyFault::Client);
            }
        }
        let due = Instant::now() + t.body_idle;
        if read_node_up(conn, client, upload, t, due).await? == 0 {
            return Err(BodyFault::Node("body cut"));
        }
    }
}

/// A chunked body (or one delimited by the node's close), sent on chunked.
#[allow(clippy::too_many_arguments)]
async fn relay_chunked(
    client: &mut Client,
    info: &ConnInfo,
    out: &mut Vec<u8>,
    conn: &mut NodeConn,
    chunked: bool,
    t: &Timeouts,
    sent: &mut u64,
    upload: &mut Option<&mut Upload<'_>>,
) -> Result<bool, BodyFault> {
    let mut decoder = ChunkedDecoder::new();
    // Only body data is the node's progress (chunk framing alone is not, as a data frame
    // on hyper's path): the body stalls `body_idle` after the last data.
    let mut due = Instant::now() + t.body_idle;
    loop {
        let before = *sent;
        if chunked {
            let mut at = 0;
            while at < conn.buf.len() && !decoder.is_done() {
                let (used, data) = decoder
                    .decode(&conn.buf[at..])
                    .map_err(|_| BodyFault::Node("malformed chunked body"))?;
                if !data.is_empty() {
                    push_chunk(out, &conn.buf[at + data.start..at + data.end]);
                    *sent += data.len() as u64;
                }
                if used == 0 {
                    break;
                }
                at += used;
            }
            conn.buf.drain(..at);
            if decoder.is_done() {
                out.extend_from_slice(b"0\r\n\r\n");
                return Ok(conn.buf.is_empty());
            }
        } else if !conn.buf.is_empty() {
            push_chunk(out, &conn.buf);
            *sent += conn.buf.len() as u64;
            conn.buf.clear();
        }
        if !out.is_empty() {
            nodelay(client, info);
            if write_client(client, out, t).await.is_err() {
                return Err(BodyFault::Client);
            }
        }
        if *sent > before {
            due = Instant::now() + t.body_idle;
        }
        if read_node_up(conn, client, upload, t, due).await? == 0 {
            if chunked {
                return Err(BodyFault::Node("body cut"));
            }
            out.extend_from_slice(b"0\r\n\r\n");
            return Ok(false);
        }
    }
}

/// One chunk, its size in upper-case hex (as hyper writes it).
#[inline]
fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789ABCDEF"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A field, its name in lower case (as hyper writes names, both ways).
#[inline]
fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The status line's code and reason: the node's reason when it gave one, else the
/// standard one.
#[inline]
fn push_status(out: &mut Vec<u8>, code: u16, reason: Option<&str>) {
    out.extend_from_slice(&[
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    let reason = match reason {
        Some(r) if !r.is_empty() => r,
        _ => StatusCode::from_u16(code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or(""),
    };
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value, formatted once a second.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

#[inline]
fn push_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&d.1);
        out.extend_from_slice(b"\r\n");
    });
}

/// Writes an answer of envgate's own (a `Response` the hyper path would send as it is)
/// and completes the record. `unread`: the client's body is not read whole (the
/// connection ends with a lingering close).
#[allow(clippy::too_many_arguments)]
async fn answer(
    client: &mut Client,
    out: &mut Vec<u8>,
    mut rec: Record,
    mut resp: http::Response<ProxyBody>,
    method: &Method,
    t: &Timeouts,
    len: usize,
    cookie: Option<&[u8]>,
    client_close: bool,
    unread: bool,
) -> Step {
    let body = resp.body_mut().take_own().unwrap_or_default();
    let status = resp.status().as_u16();
    rec.status(status);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status, None);
    let mut close = false;
    for (name, value) in resp.headers() {
        close |= name == http::header::CONNECTION && value.as_bytes() == b"close";
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if client_close && !close {
        out.extend_from_slice(b"connection: close\r\n");
        close = true;
    }
    push_field(
        out,
        b"content-length",
        itoa_buf(body.len() as u64).as_bytes(),
    );
    push_date(out);
    if let Some(c) = cookie {
        push_field(out, b"set-cookie", c);
    }
    out.extend_from_slice(b"\r\n");
    if *method != Method::HEAD {
        out.extend_from_slice(&body);
        rec.add_out(body.len() as u64);
    }
    let ok = write_client(client, out, t).await.is_ok();
    rec.finish(ok);
    match (ok, unread, close) {
        (false, _, _) => Step::Close,
        (true, true, _) => Step::Linger,
        (true, false, true) => Step::Close,
        (true, false, false) => Step::Next(len),
    }
}

fn itoa_buf(mut n: u64) -> String {
    let mut s = [0u8; 20];
    let mut i = s.len();
    loop {
        i -= 1;
        s[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    String::from_utf8_lossy(&s[i..]).into_owned()
}

/// Whether the fast path may serve requests to the nodes of `topo`: all spoken to over
/// cleartext HTTP/1.1.
pub fn takes(topo: &Topology) -> bool {
    topo.nodes
        .iter()
        .all(|n| n.protocol == crate::topology::Protocol::Http1 && n.tls.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_end_at_an_empty_line() {
        let mut s = 0;
        assert!(!head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", &mut s));
        assert!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &mut s));
        let mut s = 0;
        assert!(head_end(b"GET / HTTP/1.1\nHost: a\n\n", &mut s));
        // Found across reads.
        let mut s = 0;
        let mut b = b"GET / HTTP/1.1\r\nHost: a\r\n\r".to_vec();
        assert!(!head_end(&b, &mut s));
        b.push(b'\n');
        assert!(head_end(&b, &mut s));
    }

    #[test]
    fn chunks_are_framed() {
        let mut out = Vec::new();
        push_chunk(&mut out, &[b'x'; 26]);
        assert_eq!(&out[..4], b"1A\r\n");
        assert!(out.ends_with(b"x\r\n"));
        let mut out = Vec::new();
        push_status(&mut out, 404, None);
        assert_eq!(out, b"404 Not Found\r\n");
        assert_eq!(itoa_buf(0), "0");
        assert_eq!(itoa_buf(1234567), "1234567");
    }
}
