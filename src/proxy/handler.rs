//! Per request: snapshot -> target and Host checks -> path normalisation -> the routing
//! decision (`routing::route`: entry, tenant rule, canary, application, candidate pools) ->
//! limits of the environment reached -> in-flight slot -> node pick (read nodes first for
//! reads) -> forward -> response (with the canary cookie when one is due), with failover.
//!
//! Failover: a request that never reached a node (failed connect, pooled connection found
//! closed) goes to the next node; a body-less request with an idempotent method also after
//! a reset or a response-head timeout. Retries are bounded by `retries`, by the
//! environment's retry budget (a token is spent only once a node to retry on is found) and
//! by the overall request deadline. Only the node's own faults count against it (see
//! `error.rs`): a client's broken, stalled or oversized body is answered 400, 408 or 413
//! and blames no one; envgate's own resource errors are logged, never blamed.
//!
//! Time bounds of one exchange: connect (then the next node); the request body's idle time
//! (`body_idle`: a client that stalls gets 408; a node that stops reading the upload is
//! blamed); the response head, whose timer starts once the request body was sent whole;
//! the overall deadline across attempts (upload time not counted); then the response
//! body's idle time (in `body.rs`).

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use tokio::io::copy_bidirectional;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::body::{Blame, BodyWatch, ClientBody, ProxyBody, UpBody, Upload};
use super::error::{io_kind, is_local_resource_error, own, refused_stream, ClientFault, Refusal};
use super::headers::{self, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
use super::pool::{ConnPool, ConnectError, Room, Sender};
use super::record::Record;
use super::worker::LocalSnap;
use super::worker::{Worker, MAX_HEADERS};
use crate::metrics::tally::Failover;
use crate::routing::host::valid_authority;
use crate::routing::Route;
use crate::routing::{self, canary, path, Candidates, Fields, RequestView, RouteError};
use crate::server::TrackerGuard;
use crate::topology::{
    Application, Environment, InFlight, Member, NodeId, PoolId, TenantKey, Tenants, Timeouts,
    Topology,
};

/// What envgate knows of the downstream connection, computed once per connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The port of the listener the connection arrived on (the entry's port).
    pub local_port: u16,
    /// The peer's address as an `X-Forwarded-For` value.
    pub peer_value: HeaderValue,
    /// Whether the peer is a trusted proxy whose `X-Forwarded-*` headers are kept.
    pub trusted: bool,
    pub proto: HeaderValue,
    /// Requests seen on this connection so far.
    pub requests: Cell<u64>,
    /// TCP_NODELAY is set on the client's socket. The own HTTP/1.1 codec sets it only once
    /// a connection makes a second write (a second answer, or one answer in several
    /// writes): a connection served by one write never needs it.
    pub nodelay: Cell<bool>,
    /// Stream accounting of an HTTP/2 connection; `None` for HTTP/1.
    pub h2: Option<Rc<H2Conn>>,
    /// A TLS connection whose client named a host (SNI): the certificate it was given.
    pub tls: Option<TlsConn>,
    /// An HTTP/1 connection served by hyper: whether it ends with a lingering close (a
    /// request's body may not have been read whole, or hyper refused a head).
    pub unread: std::cell::OnceCell<Arc<super::io::Unread>>,
}

/// The certificate a TLS connection presented, for the Host check (421).
pub struct TlsConn {
    pub certs: Arc<crate::tls::Certs>,
    pub index: usize,
}

impl TlsConn {
    /// Whether the certificate covers `host` (a Host value, port included or not).
    #[inline]
    pub fn covers(&self, host: &[u8]) -> bool {
        self.certs.list[self.index].names.covers(host)
    }
}

/// Streams of one HTTP/2 connection, for its idle timeout and its reset bound. Written by
/// the connection's own streams (same thread), read by its watchdog in `listener.rs`.
#[derive(Debug)]
pub struct H2Conn {
    /// Streams whose exchange is not over (handler running or response body alive).
    pub open: Cell<u32>,
    /// When the last stream ended (or the connection started).
    pub last_close: Cell<Instant>,
    /// Streams the client reset (or abandoned) before envgate answered them.
    pub early_resets: Cell<u32>,
    /// Streams envgate answered.
    pub answered: Cell<u32>,
    /// Woken when `early_resets` crosses its bound: the connection is closed.
    pub abuse: Notify,
    /// When each open stream's response body was last asked for data (`None` while the
    /// handler still works on it, or for a tunnel, which has its own idle bound). A body
    /// hyper does not poll is one the client gives no flow-control window: the watchdog
    /// closes a connection that leaves one so for the body idle time.
    pub streams: RefCell<Vec<Rc<Cell<Option<Instant>>>>>,
}

/// Early resets a connection may make before it is closed, if they also exceed a quarter
/// of its answered streams (a client that resets each stream just after envgate forwarded
/// it would otherwise keep hundreds of requests in flight at the nodes).
pub const MAX_EARLY_RESETS: u32 = 100;

impl H2Conn {
    pub fn new() -> Rc<Self> {
        Rc::new(H2Conn {
            open: Cell::new(0),
            last_close: Cell::new(Instant::now()),
            early_resets: Cell::new(0),
            answered: Cell::new(0),
            abuse: Notify::new(),
            streams: RefCell::new(Vec::new()),
        })
    }

    /// The oldest progress among the open streams that are judged.
    pub fn oldest_progress(&self) -> Option<Instant> {
        self.streams.borrow().iter().filter_map(|s| s.get()).min()
    }
}

/// One open HTTP/2 stream; its drop ends the stream's exchange.
pub struct StreamGuard {
    conn: Rc<H2Conn>,
    answered: bool,
    progress: Rc<Cell<Option<Instant>>>,
}

impl StreamGuard {
    fn enter(conn: Rc<H2Conn>) -> Self {
        conn.open.set(conn.open.get() + 1);
        let progress = Rc::new(Cell::new(None));
        conn.streams.borrow_mut().push(progress.clone());
        StreamGuard {
            conn,
            answered: false,
            progress,
        }
    }

    /// The response body was asked for data now (`true`: and gave some, so the client is
    /// to ask again), or waits on the node (`false`: not judged by the watchdog).
    #[inline]
    pub fn progress(&self, judged: bool) {
        self.progress.set(judged.then(Instant::now));
    }

    /// `progress`, dated by a clock read the caller shares.
    #[inline]
    pub fn progress_at(&self, judged: bool, now: &crate::proxy::io::LazyNow) {
        self.progress.set(judged.then(|| now.get()));
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.conn;
        {
            let mut streams = c.streams.borrow_mut();
            if let Some(i) = streams.iter().position(|s| Rc::ptr_eq(s, &self.progress)) {
                streams.swap_remove(i);
            }
        }
        c.open.set(c.open.get() - 1);
        if c.open.get() == 0 {
            c.last_close.set(Instant::now());
        }
        if !self.answered {
            let resets = c.early_resets.get() + 1;
            c.early_resets.set(resets);
            if resets >= MAX_EARLY_RESETS && resets.saturating_mul(4) > c.answered.get() {
                c.abuse.notify_one();
            }
        }
    }
}

/// Most attempts one request makes (1 + the highest `retries`).
const MAX_ATTEMPTS: usize = 1 + crate::config::validate::MAX_RETRIES as usize;

/// Who an attempt's failure is put on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Node,
    /// envgate's own resources ran out.
    Local,
}

/// How one attempt on one node failed.
// The request is handed back unboxed: boxing would allocate on the failover path, and the
// success variant of the same `Result` is as large.
#[allow(clippy::large_enum_variant)]
enum Failure {
    /// The request never reached the node: another node may take it.
    NotSent(Request<UpBody>, Cause),
    /// No response head within `response_header` after the request was sent whole.
    Timeout,
    /// The overall request deadline passed.
    Deadline,
    /// The node stopped reading the request body.
    UploadStalled,
    /// The node failed after the request was (maybe) sent.
    Failed,
    /// The client's body failed: the client's fault, not the node's.
    Client(ClientFault),
    /// The node stayed at its `max_connections` for `timeouts.queue`: not its fault.
    Busy,
    /// An HTTP/2 node refused the stream unprocessed (REFUSED_STREAM, GOAWAY).
    Refused,
}

/// An HTTP/2 stream's exchange: counted open until its response body is done with, and
/// counted as an early reset if the client drops it before envgate answered. (HTTP/1
/// connections call `exchange` directly.)
pub async fn handle_h2(
    worker: Rc<Worker>,
    conn: Rc<ConnInfo>,
    h2: Rc<H2Conn>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let mut stream = StreamGuard::enter(h2.clone());
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let Ok(mut resp) = exchange(worker, conn, req).await;
    if grpc {
        grpc_error(&mut resp);
    }
    stream.answered = true;
    stream.progress(true);
    h2.answered.set(h2.answered.get().saturating_add(1));
    resp.body_mut().hold(stream);
    Ok(resp)
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// A `grpc-timeout` value: digits (at most 8) and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// An answer of envgate's own to a gRPC client, as gRPC says errors: HTTP 200 with the
/// status in `grpc-status` and the reason (the JSON envgate would have sent) in
/// `grpc-message`, no body (a trailers-only response). A node's answer is left as it is.
/// The access log and the metrics keep the HTTP status envgate decided.
#[cold]
fn grpc_error(resp: &mut Response<ProxyBody>) {
    let status = resp.status();
    if status == StatusCode::OK {
        return;
    }
    let Some(reason) = resp.body_mut().take_own() else {
        return;
    };
    // gRPC status codes (grpc/doc/statuscodes.md).
    let code: &'static str = match status.as_u16() {
        // No route, or a method the environment does not take: UNIMPLEMENTED.
        404 | 405 => "12",
        // No usable node, a node that failed, the node's cap, envgate's own limits, a
        // misdirected connection: UNAVAILABLE (a client may retry).
        421 | 502 | 503 => "14",
        // The node's answer or the upload did not come in time: DEADLINE_EXCEEDED.
        408 | 504 => "4",
        // Over a size limit: RESOURCE_EXHAUSTED.
        413 | 414 | 431 => "8",
        // A malformed request: INTERNAL (what gRPC maps HTTP 400 to).
        400 => "13",
        _ => "2",
    };
    let h = resp.headers_mut();
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static(code));
    // The JSON is printable ASCII without `%`, which grpc-message carries as it is.
    if let Ok(v) = HeaderValue::from_maybe_shared(reason) {
        h.insert("grpc-message", v);
    }
    *resp.status_mut() = StatusCode::OK;
}

/// The host a request is routed by and sent to the node with.
struct Target {
    /// `None` only for HTTP/1.0 without Host.
    host: Option<HeaderValue>,
    /// Taken from the request target's authority (absolute form, HTTP/2, CONNECT), so the
    /// Host sent to the node must be replaced by it.
    from_authority: bool,
}

/// RFC 9112 3.2 and RFC 9113 8.3.1: one Host, well formed; the authority of the target
/// wins over Host; HTTP/2's `host` must agree with `:authority`; target forms match the
/// method.
#[inline]
fn target(req: &Request<Incoming>, worker: &Worker) -> Result<Target, Refusal> {
    let h2 = req.version() == Version::HTTP_2;
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        if uri.authority().is_none() {
            return Err(Refusal::BadTarget);
        }
    } else if (uri.scheme().is_none() && uri.authority().is_some())
        || (uri.path() == "*" && req.method() != Method::OPTIONS)
    {
        // Authority-form, or `*` with a method other than OPTIONS.
        return Err(Refusal::BadTarget);
    }
    match uri.authority() {
        Some(a) => {
            let a = a.as_str().as_bytes();
            if !valid_authority(a) {
                return Err(Refusal::BadHost);
            }
            if h2 && host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(a)) {
                return Err(Refusal::HostMismatch);
            }
            let value = worker.values.value(a).ok_or(Refusal::BadHost)?;
            Ok(Target {
                host: Some(value),
                from_authority: true,
            })
        }
        None => match host {
            Some(h) if valid_authority(h.as_bytes()) => Ok(Target {
                host: Some(h.clone()),
                from_authority: false,
            }),
            Some(_) => Err(Refusal::BadHost),
            None if req.version() == Version::HTTP_10 || req.version() == Version::HTTP_09 => {
                Ok(Target {
                    host: None,
                    from_authority: false,
                })
            }
            None => Err(Refusal::MissingHost),
        },
    }
}

pub async fn exchange(
    worker: Rc<Worker>,
    conn: Rc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    conn.requests.set(conn.requests.get() + 1);
    let h1 = conn.h2.is_none();
    if let Some(u) = conn.unread.get() {
        u.request(!req.body().is_end_stream());
    }
    let snap = worker.snapshot();
    let topo = &*snap.topo;
    let mut rec = Record::new(&worker, &snap, &conn, &req);

    let target = match target(&req, &worker) {
        Ok(t) => t,
        Err(r) => return Ok(seal(rec, r.response(h1))),
    };
    if !h1 && req.headers().len() > MAX_HEADERS {
        return Ok(seal(rec, Refusal::TooManyFields.response(h1)));
    }
    // Only a body without a known length can be chunked: other requests skip the lookup.
    if h1 && req.body().size_hint().exact().is_none() {
        if let Some(te) = req.headers().get(header::TRANSFER_ENCODING) {
            // hyper decodes `chunked` only; any other coding (or a list) would reach the
            // node without its framing.
            if !te.as_bytes().eq_ignore_ascii_case(b"chunked")
                || req
                    .headers()
                    .get_all(header::TRANSFER_ENCODING)
                    .iter()
                    .count()
                    > 1
            {
                return Ok(seal(rec, Refusal::BadTransferEncoding.response(h1)));
            }
        }
    }
    let connect = req.method() == Method::CONNECT;
    let new_path = if connect || req.uri().path() == "*" {
        None
    } else {
        match path::normalize(req.uri().path(), topo.defaults.allow_encoded_slash) {
            Ok(p) => p,
            Err(e) => return Ok(seal(rec, Refusal::BadPath(e).response(h1))),
        }
    };

    let view = RequestView {
        host: target.host.as_ref().map(|h| h.as_bytes()),
        port: conn.local_port,
        path: new_path.as_deref().unwrap_or(req.uri().path()),
        query: req.uri().query(),
        method: req.method(),
        headers: Fields::Map(req.headers()),
        client: conn.peer.ip(),
        trusted: conn.trusted,
        random: worker.random(),
    };
    let route = match routing::route(topo, &view) {
        Ok(r) => r,
        Err(RouteError::NoRoute) => return Ok(seal(rec, no_route())),
        Err(e @ (RouteError::TenantRequired | RouteError::BadTenant)) => {
            return Ok(tenant_refused(rec, topo, &view, e, h1))
        }
    };
    rec.route(&route);
    // Domain fronting, or HTTP/2 coalescing onto a connection whose certificate does not
    // cover this host: the client must use a connection of its own (RFC 9110 15.5.20).
    if let (Some(tls), Some(host)) = (&conn.tls, &target.host) {
        if !tls.covers(host.as_bytes()) {
            return Ok(seal(rec, misdirected()));
        }
    }
    let cookie = route.canary.and_then(|c| c.set_cookie).and_then(|bucket| {
        let name = topo.environments[route.origin()]
            .canary
            .as_ref()?
            .cookie
            .as_deref()?;
        // Secure when the client reached us over TLS, or reached a trusted proxy over it.
        let secure = conn.proto.as_bytes() == b"https"
            || (conn.trusted
                && req
                    .headers()
                    .get(&X_FORWARDED_PROTO)
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https")));
        let mut buf = [0u8; canary::SET_COOKIE_MAX];
        let n = canary::set_cookie(&mut buf, name, bucket, secure);
        worker.values.value(&buf[..n])
    });
    // One labelled block rather than a function of its own: an `async fn` called here
    // would build its (large) future and then move it into this one, a copy per request.
    let mut resp = 'serve: {
        let env = route.environment;
        let env_id = route.env;
        let app = route.app;
        if connect && !env.allow_connect {
            break 'serve Refusal::ConnectNotAllowed.response(h1);
        }
        let limit = env.max_request_body;
        if limit.is_some_and(|l| req.body().size_hint().lower() > l) {
            break 'serve Refusal::BodyTooLarge.response(h1);
        }
        let Some(slot) = env.try_enter() else {
            break 'serve own(
                StatusCode::SERVICE_UNAVAILABLE,
                env.bodies().over_limit.clone(),
            );
        };
        let timeouts = &topo.defaults.timeouts;

        // A gRPC deadline (HTTP/2 only) shortens the request's overall one.
        let grpc_deadline = if h1 {
            None
        } else {
            req.headers()
                .get(&GRPC_TIMEOUT)
                .and_then(|v| grpc_timeout(v.as_bytes()))
                .map(|d| Instant::now() + d.min(timeouts.request))
        };
        let (parts, body) = req.into_parts();
        let (body, watch) = if body.is_end_stream() {
            (UpBody::Empty, None)
        } else {
            let watch = BodyWatch::new();
            let body = ClientBody::new(
                body,
                watch.clone(),
                limit,
                timeouts.body_idle,
                conn.unread.get().cloned(),
            );
            (UpBody::Stream(Box::new(body)), Some(watch))
        };
        let mut req = Request::from_parts(parts, body);
        let upgrade = !connect
            && headers::is_upgrade(req.headers())
            && headers::upgrade_allowed(req.headers(), &env.upgrades);
        let tunnelled = upgrade || connect;
        let mut downstream_upgrade = tunnelled.then(|| hyper::upgrade::on(&mut req));
        // The tenant id header routing read stays, whatever `Connection` names.
        let keep = match route
            .tenant
            .and(topo.environments[route.origin()].tenants.as_ref())
        {
            Some(Tenants {
                key: TenantKey::Header(name),
                ..
            }) => Some(name),
            _ => None,
        };
        // An HTTP/2 stream's request without a body goes to the node over the own codec's
        // connections where that codec speaks to every node (as HTTP/1.1 connections do):
        // its head, as hyper's client would write it from the rewritten request, is made
        // once for every attempt, straight from the client's fields where it can be.
        let own_codec = !h1 && snap.fast && !tunnelled && matches!(req.body(), UpBody::Empty);
        let direct = own_codec
            .then(|| own_prepared_head(&req, &conn, &worker, &target, new_path.as_deref()))
            .flatten();
        let own_head = match direct {
            Some((head, id)) => {
                rec.sent(Some(&head[id]), watch.as_ref());
                Some(head)
            }
            None => {
                prepare(
                    &mut req, &conn, &worker, target, new_path, upgrade, connect, keep,
                );
                rec.sent(
                    req.headers().get(&X_REQUEST_ID).map(|v| v.as_bytes()),
                    watch.as_ref(),
                );
                own_codec.then(|| own_request_head(&req))
            }
        };
        // A request without a body and with an idempotent method can be sent again after it
        // reached a node that failed; any other only when it surely never left envgate.
        let replayable =
            !tunnelled && idempotent(req.method()) && matches!(req.body(), UpBody::Empty);

        // Panic mode spreads over every primary of the application's nodes, healthy or not,
        // but only when no backup can serve either: healthy backups come first. (Read nodes
        // are never in panic: when none is usable, reads go to the application's nodes.)
        let panic_mode = panic_mode(topo, env, app);
        // Set by the first attempt from the clock read it makes anyway.
        let overall = Cell::new(grpc_deadline);
        let mut tried = [NodeId::MAX; MAX_ATTEMPTS];
        let attempts = (env.retries as usize + 1).min(MAX_ATTEMPTS);
        let mut last = Last::NoNode;
        // The first attempt costs no retry token; neither does one after an attempt that never
        // reached a node.
        let mut free = true;
        // Why the attempt before failed, for the next one.
        let mut after = None;
        let times = AttemptTimes::default();
        let head_request = req.method() == Method::HEAD;
        snap.earn_retry(env_id);
        for attempt in 0..attempts {
            let Some(picked) = pick_node(topo, &snap, &route, panic_mode, &tried[..attempt]) else {
                break;
            };
            let (p, i, node) = picked;
            if tunnelled && snap.conns[node].protocol.is_h2() {
                // WebSocket and CONNECT over HTTP/2 to a node are not relayed.
                tracing::debug!(node = %topo.nodes[node].name, "a tunnel to a node spoken to over HTTP/2: not relayed");
                break 'serve own(StatusCode::BAD_GATEWAY, env.bodies().bad_gateway.clone());
            }
            if !free && !snap.spend_retry(env_id) {
                break;
            }
            free = false;
            if attempt > 0 {
                // A rare path: a shared counter is fine here.
                env.retried
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tried[attempt] = node;
            // The application's counter slots: its nodes, then its read nodes.
            let counters = app.slot
                + if p == app.pool {
                    i
                } else {
                    topo.pools[app.pool].members.len() + i
                };
            rec.attempt(counters, node, after.take());
            let pool = &snap.conns[node];
            let (result, copy) = if let Some(head) = &own_head {
                let mut deadline = overall.get();
                let mut answer = crate::h1::fast::Answer {
                    values: &worker.values,
                    room: usize::from(cookie.is_some()),
                    parts: None,
                };
                let sent = crate::h1::fast::send_bodiless(
                    pool,
                    head,
                    head_request,
                    timeouts,
                    &mut deadline,
                    &mut answer,
                )
                .await;
                overall.set(deadline);
                let failure = match sent {
                    Ok((mut conn, up, began, connect_ns)) => {
                        rec.answered(Some(began), connect_ns);
                        let blame = Blame {
                            snap: snap.clone(),
                            scope: route.candidates,
                            node,
                        };
                        let Some(parts) = answer.parts else {
                            // A field hyper's types do not take: as a head hyper's client
                            // would refuse, the node's fault.
                            passive_failure(topo, route.candidates, node);
                            break 'serve own(
                                StatusCode::BAD_GATEWAY,
                                env.bodies().bad_gateway.clone(),
                            );
                        };
                        conn.buf.drain(..up.len);
                        break 'serve Response::from_parts(
                            parts,
                            ProxyBody::own(
                                conn,
                                up.framing,
                                up.close,
                                pool.clone(),
                                Some(slot),
                                blame,
                                timeouts.body_idle,
                            ),
                        );
                    }
                    Err(crate::h1::fast::Failure::Switched) => {
                        // A switch the client did not ask for, as on hyper's client: the
                        // node's fault, and not tried elsewhere.
                        passive_failure(topo, route.candidates, node);
                        break 'serve own(
                            StatusCode::BAD_GATEWAY,
                            env.bodies().bad_gateway.clone(),
                        );
                    }
                    Err(f) => f,
                };
                // The request stays whole in `req` (only its head went): handed back for the
                // next attempt as the hyper path hands back its own.
                let mut back = || std::mem::replace(&mut req, Request::new(UpBody::Empty));
                use crate::h1::fast::{Cause as OwnCause, Failure as Own};
                let failure = match failure {
                    Own::NotSent(OwnCause::Node) => Failure::NotSent(back(), Cause::Node),
                    Own::NotSent(OwnCause::Local) => Failure::NotSent(back(), Cause::Local),
                    Own::Timeout => Failure::Timeout,
                    Own::Deadline => Failure::Deadline,
                    Own::Busy => Failure::Busy,
                    // No upload and no client of the own codec's: only a node's failure.
                    Own::Failed
                    | Own::UploadStalled
                    | Own::Client(_)
                    | Own::ClientGone
                    | Own::Switched => Failure::Failed,
                };
                let copy = match failure {
                    Failure::NotSent(..) => None,
                    _ => (replayable && attempt + 1 < attempts).then(back),
                };
                (Err(failure), copy)
            } else {
                let copy = (replayable && attempt + 1 < attempts).then(|| replay(&req));
                (forward(pool, req, timeouts, &overall, &times).await, copy)
            };
            match result {
                Ok((mut resp, sender)) => {
                    rec.answered(times.start.get(), times.connect_ns.get());
                    let blame = Blame {
                        snap: snap.clone(),
                        scope: route.candidates,
                        node,
                    };
                    let status = resp.status();
                    let switched = status == StatusCode::SWITCHING_PROTOCOLS
                        || (connect && status.is_success());
                    if switched {
                        // A switch the client did not ask for cannot be relayed: the node's
                        // fault.
                        let Some(down) = downstream_upgrade.take() else {
                            passive_failure(topo, route.candidates, node);
                            break 'serve own(
                                StatusCode::BAD_GATEWAY,
                                env.bodies().bad_gateway.clone(),
                            );
                        };
                        blame.succeed();
                        let up = hyper::upgrade::on(&mut resp);
                        // An HTTP/2 stream carrying a tunnel stays open for the watchdog (the
                        // tunnel has its own idle bound).
                        let stream = conn.h2.as_ref().map(|h2| {
                            let mut s = StreamGuard::enter(h2.clone());
                            s.answered = true;
                            s
                        });
                        rec.status(status.as_u16());
                        tokio::task::spawn_local(tunnel(
                            down,
                            up,
                            slot,
                            timeouts.tunnel_idle,
                            (worker.tracker.enter(), stream),
                            rec,
                        ));
                        headers::strip_hop_by_hop(resp.headers_mut(), upgrade);
                        let (parts, _) = resp.into_parts();
                        let mut resp = Response::from_parts(parts, ProxyBody::empty());
                        if let Some(c) = cookie {
                            resp.headers_mut().append(header::SET_COOKIE, c);
                        }
                        return Ok(resp);
                    }
                    headers::strip_hop_by_hop(resp.headers_mut(), false);
                    let (mut parts, body) = resp.into_parts();
                    // envgate answers in its own version: a node's HTTP/1.0 would
                    // otherwise reach the client (and end a kept-alive connection).
                    if h1 {
                        parts.version = Version::HTTP_11;
                    }
                    break 'serve Response::from_parts(
                        parts,
                        ProxyBody::upstream(
                            body,
                            Some((pool.clone(), sender)),
                            Some(slot),
                            blame,
                            watch,
                            timeouts.body_idle,
                        ),
                    );
                }
                Err(failure) => {
                    let next = match failure {
                        Failure::Client(fault) => {
                            // The client's fault: not counted under the node.
                            rec.no_node();
                            break 'serve fault.refusal().response(h1);
                        }
                        Failure::NotSent(back, Cause::Local) => {
                            after = Some(Failover::Local);
                            tracing::warn!(node = %topo.nodes[node].name, "connect failed for lack of local resources (file descriptors, ports or buffers); not counted against the node");
                            last = Last::Local;
                            free = true;
                            Some(back)
                        }
                        Failure::NotSent(back, Cause::Node) => {
                            after = Some(Failover::Connect);
                            passive_failure(topo, route.candidates, node);
                            last = Last::BadGateway;
                            // The request reached no node: trying the next one adds no load
                            // to any, so it costs no retry token (a node that dies under load
                            // would otherwise drain the budget in milliseconds).
                            free = true;
                            Some(back)
                        }
                        Failure::Timeout => {
                            after = Some(Failover::Timeout);
                            passive_failure(topo, route.candidates, node);
                            last = Last::Timeout;
                            copy
                        }
                        Failure::UploadStalled => {
                            passive_failure(topo, route.candidates, node);
                            last = Last::Timeout;
                            None
                        }
                        Failure::Deadline => {
                            last = Last::Timeout;
                            None
                        }
                        Failure::Busy => {
                            rec.no_node();
                            last = Last::Busy;
                            None
                        }
                        Failure::Failed => {
                            after = Some(Failover::Reset);
                            passive_failure(topo, route.candidates, node);
                            last = Last::BadGateway;
                            copy
                        }
                        Failure::Refused => {
                            // An HTTP/2 node going away (GOAWAY) or at its stream limit: not
                            // a failure of the node; a request that can be sent again is,
                            // to it as well (on a new connection).
                            after = Some(Failover::Reset);
                            last = Last::BadGateway;
                            tried[attempt] = NodeId::MAX;
                            copy
                        }
                    };
                    match next {
                        Some(r) if overall.get().is_none_or(|d| Instant::now() < d) => req = r,
                        _ => break,
                    }
                }
            }
        }
        let mut resp = match last {
            Last::NoNode => own(
                StatusCode::SERVICE_UNAVAILABLE,
                env.bodies().no_healthy_node.clone(),
            ),
            Last::Local => own(
                StatusCode::SERVICE_UNAVAILABLE,
                env.bodies().no_capacity.clone(),
            ),
            Last::BadGateway => own(StatusCode::BAD_GATEWAY, env.bodies().bad_gateway.clone()),
            Last::Busy => own(
                StatusCode::SERVICE_UNAVAILABLE,
                env.bodies().node_busy.clone(),
            ),
            Last::Timeout => own(
                StatusCode::GATEWAY_TIMEOUT,
                env.bodies().gateway_timeout.clone(),
            ),
        };
        if h1 && watch.as_ref().is_some_and(|w| !w.is_done()) {
            // The upload went partly to a node: what is left of it on the client's connection
            // cannot be read as a next request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    };
    if let Some(c) = cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    Ok(seal(rec, resp))
}

/// A required tenant rule refused the request: counted as that rule's decision, in the
/// environment the entry matched.
#[cold]
fn tenant_refused(
    mut rec: Record,
    topo: &Topology,
    view: &RequestView<'_>,
    e: RouteError,
    h1: bool,
) -> Response<ProxyBody> {
    let missing = e == RouteError::TenantRequired;
    if let Some(entry) = topo.entries.lookup(view.host, view.port) {
        rec.tenant_refused(entry.env, missing);
    }
    let refusal = if missing {
        Refusal::TenantRequired
    } else {
        Refusal::BadTenant
    };
    seal(rec, refusal.response(h1))
}

/// Hands the exchange's record to the response body, which completes it.
#[inline]
fn seal(mut rec: Record, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    rec.status(resp.status().as_u16());
    resp.body_mut().attach(rec);
    resp
}

/// When the last attempt began, and how long its new connection took to open (none when
/// it found a pooled one).
#[derive(Default)]
struct AttemptTimes {
    start: Cell<Option<Instant>>,
    connect_ns: Cell<Option<u64>>,
}

#[cold]
fn misdirected() -> Response<ProxyBody> {
    static MISDIRECTED: &[u8] = br#"{"error":"misdirected_request"}"#;
    own(
        StatusCode::MISDIRECTED_REQUEST,
        Bytes::from_static(MISDIRECTED),
    )
}

fn no_route() -> Response<ProxyBody> {
    static NO_ROUTE: &[u8] = br#"{"error":"no_route"}"#;
    own(StatusCode::NOT_FOUND, Bytes::from_static(NO_ROUTE))
}

/// Panic mode spreads over every primary of the application's nodes, healthy or not, but
/// only when no backup can serve either: healthy backups come first. (Read nodes are never
/// in panic: when none is usable, reads go to the application's nodes.)
#[inline]
pub(crate) fn panic_mode(topo: &Topology, env: &Environment, app: &Application) -> bool {
    let primaries = &topo.pools[app.pool].members;
    env.panic_threshold > 0.0
        && in_panic(topo, primaries, env.panic_threshold)
        && !primaries
            .iter()
            .any(|m| m.backup && topo.nodes[m.node].state.usable())
}

/// The node of the next attempt, of the route's candidates (pool, position, node), not
/// one of `tried`. A node at its `max_connections` is passed over for another of its tier
/// (primaries, or backups) that has room; when none has, the request waits at the node
/// picked. Backups stay for when no primary is usable. Shared by both HTTP/1.1 codecs.
#[inline]
pub(crate) fn pick_node(
    topo: &Topology,
    snap: &LocalSnap,
    route: &Route<'_>,
    panic_mode: bool,
    tried: &[NodeId],
) -> Option<(PoolId, usize, NodeId)> {
    let app = route.app;
    let room = |n: NodeId| topo.nodes[n].max_connections.is_none() || snap.conns[n].has_room();
    let pick = |with_room: bool, primaries: bool| {
        route.candidates.iter().find_map(|p| {
            let members = &topo.pools[p].members;
            let wrr = &snap.wrr[p];
            let i = if panic_mode && p == app.pool {
                wrr.pick_primary(members, |n| {
                    !topo.nodes[n].state.is_drained()
                        && !tried.contains(&n)
                        && (!with_room || room(n))
                })
            } else {
                let ok = |n: NodeId| {
                    topo.nodes[n].state.usable() && !tried.contains(&n) && (!with_room || room(n))
                };
                if primaries {
                    wrr.pick_primary(members, ok)
                } else {
                    wrr.pick(members, ok)
                }
            }?;
            Some((p, i, members[i].node))
        })
    };
    let mut picked = pick(false, false)?;
    if !room(picked.2) {
        let primary = !topo.pools[picked.0].members[picked.1].backup;
        if let Some(other) = pick(true, primary) {
            picked = other;
        }
    }
    Some(picked)
}

/// The outcome of the last attempt, for the answer when no attempt succeeded.
#[derive(Clone, Copy)]
enum Last {
    /// No node could be picked at all.
    NoNode,
    /// envgate could not open a connection for lack of its own resources.
    Local,
    BadGateway,
    Timeout,
    /// Every node that could serve stayed at its `max_connections` for `timeouts.queue`.
    Busy,
}

#[inline]
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A copy of a body-less request, to send again after a failed attempt.
fn replay(req: &Request<UpBody>) -> Request<UpBody> {
    let mut copy = Request::new(UpBody::Empty);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// Whether fewer than `threshold` percent of the pool's primary nodes are usable.
fn in_panic(topo: &Topology, members: &[Member], threshold: f64) -> bool {
    let (mut primaries, mut usable) = (0usize, 0usize);
    for m in members.iter().filter(|m| !m.backup) {
        primaries += 1;
        usable += topo.nodes[m.node].state.usable() as usize;
    }
    primaries > 0 && (usable as f64) < primaries as f64 * threshold / 100.0
}

/// Serialises ejection decisions, so that the cap on ejected nodes holds when several
/// workers eject at once. Taken only when a node reaches its failure threshold, never on
/// the hot path.
static EJECTIONS: Mutex<()> = Mutex::new(());

/// Counts a live-traffic failure of the node's own against `node`, ejecting it when it
/// reaches the threshold and the pools that could serve the request (`scope`: read nodes,
/// the application's nodes, and for a canary request the pool it would otherwise use)
/// still have room under their cap of ejected nodes.
#[cold]
pub(crate) fn passive_failure(topo: &Topology, scope: Candidates, node: NodeId) {
    let policy = &topo.defaults.passive;
    let n = &topo.nodes[node];
    // Metrics, once the metrics module exists: ejections and envgate_retries_total count
    // here, through handles resolved when the topology is compiled.
    if !n.state.count_failure(policy) {
        return;
    }
    let _one_at_a_time = EJECTIONS.lock().unwrap_or_else(|e| e.into_inner());
    // Each node once, whichever pools of the scope hold it.
    let mut seen: Vec<NodeId> = Vec::new();
    let mut ejected = 0;
    for p in scope.scope() {
        for m in topo.pools[p].members.iter() {
            if !seen.contains(&m.node) {
                seen.push(m.node);
                ejected += topo.nodes[m.node].state.is_ejected() as usize;
            }
        }
    }
    let may_eject = (ejected + 1) * 100 <= seen.len() * policy.max_ejected_percent as usize;
    if !may_eject {
        return;
    }
    if let Some(cool) = n.state.eject(policy) {
        tracing::warn!(node = %n.name, address = %n.addr, cool_down = ?cool, "node ejected after consecutive failures on live traffic");
    }
}

/// Rewrites the request for the node: the normalised path, origin-form URI (authority
/// form for CONNECT), HTTP/1.1, exactly one Host (the one routing used), hop-by-hop
/// headers out, HTTP/2 cookies joined, `X-Forwarded-*` and `X-Request-Id` in.
#[inline]
#[allow(clippy::too_many_arguments)]
fn prepare(
    req: &mut Request<UpBody>,
    conn: &ConnInfo,
    worker: &Worker,
    target: Target,
    new_path: Option<String>,
    upgrade: bool,
    connect: bool,
    keep: Option<&HeaderName>,
) {
    let was_h2 = req.version() == Version::HTTP_2;
    if !connect {
        if let Some(mut p) = new_path {
            if let Some(q) = req.uri().query() {
                p.push('?');
                p.push_str(q);
            }
            if let Ok(uri) = Uri::try_from(p) {
                *req.uri_mut() = uri;
            }
        } else if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/");
            if let Ok(uri) = pq.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
        }
    }
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    if was_h2 {
        headers::join_cookies(h);
    }
    // One pass over the names; each lookup below is made only for a name that is there.
    let mut seen = headers::scan(h);
    // A Connection option may have named one of the fields the scan saw (a client listing
    // X-Forwarded-Proto must not make envgate drop its own): look again after such a strip.
    if seen.hop {
        // `TE: trailers` says the client takes trailers: it goes on to the node, which may
        // then send them (gRPC needs it); the rest of TE is this hop's.
        let trailers = headers::accepts_trailers(h);
        if headers::strip_hop_by_hop_keeping(h, upgrade, keep) {
            seen = headers::scan(h);
        }
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    // Room for the headers added below, in one growth at most.
    h.reserve(5);
    let [host, forwarded_host, forwarded_for, forwarded_proto, request_id] =
        set_fields(h, &seen, conn, &target);
    let untrusted = !conn.trusted;
    let set = |(name, value): (&HeaderName, Option<Set<'_>>), h: &mut http::HeaderMap| {
        let value = match value {
            None => return,
            Some(Set::Value(v)) => v.clone(),
            Some(Set::Made(v)) => v,
            Some(Set::NewId) => worker.request_ids.next(&worker.values),
        };
        h.insert(name, value);
    };
    set(host, h);
    set(forwarded_host, h);
    if untrusted && target.host.is_none() && seen.forwarded_host {
        h.remove(&X_FORWARDED_HOST);
    }
    set(forwarded_for, h);
    set(forwarded_proto, h);
    if untrusted && seen.forwarded {
        h.remove(header::FORWARDED);
    }
    set(request_id, h);
}

/// A field's value `set_fields` decided on.
enum Set<'a> {
    /// One there is already (the routed host, the client's address, the scheme): written
    /// from where it is, cloned only into a map.
    Value(&'a HeaderValue),
    /// One made for this request (X-Forwarded-For with the client's address appended).
    Made(HeaderValue),
    /// A new request id.
    NewId,
}

impl Set<'_> {
    /// The value as written, `new_id` standing for a new request id.
    fn bytes<'b>(&'b self, new_id: &'b [u8]) -> &'b [u8] {
        match self {
            Set::Value(v) => v.as_bytes(),
            Set::Made(v) => v.as_bytes(),
            Set::NewId => new_id,
        }
    }
}

/// The fields `prepare` sets for the node, in the order it sets them: Host (the routed one,
/// when it came from the target's authority), X-Forwarded-Host, X-Forwarded-For,
/// X-Forwarded-Proto and X-Request-Id; `None` where the client's field goes on as it is.
/// From the scan of the client's fields, for both ways of writing the head (`prepare` and
/// `own_prepared_head`).
fn set_fields<'a>(
    h: &http::HeaderMap,
    seen: &headers::Scan,
    conn: &'a ConnInfo,
    target: &'a Target,
) -> [(&'static HeaderName, Option<Set<'a>>); 5] {
    static HOST: HeaderName = header::HOST;
    let trusted = conn.trusted;
    let host = target.host.as_ref();
    let forwarded_for = if trusted && seen.forwarded_for {
        headers::append_forwarded_for(h, &conn.peer_value).map(Set::Made)
    } else {
        None
    };
    // A client's id goes on when it is the only one and sane.
    let keep_id = seen.request_id && {
        let mut ids = h.get_all(&X_REQUEST_ID).iter();
        matches!((ids.next(), ids.next()), (Some(v), None) if headers::sane_request_id(v))
    };
    [
        (
            &HOST,
            host.filter(|_| target.from_authority).map(Set::Value),
        ),
        (
            &X_FORWARDED_HOST,
            host.filter(|_| !(trusted && seen.forwarded_host))
                .map(Set::Value),
        ),
        (
            &X_FORWARDED_FOR,
            Some(forwarded_for.unwrap_or(Set::Value(&conn.peer_value))),
        ),
        (
            &X_FORWARDED_PROTO,
            (!(trusted && seen.forwarded_proto)).then_some(Set::Value(&conn.proto)),
        ),
        (&X_REQUEST_ID, (!keep_id).then_some(Set::NewId)),
    ]
}

/// One attempt on one node: a pooled connection (or a new one), then the request, bounded
/// by the response-head timer (from the moment the body was sent whole), the upload's idle
/// time and the overall deadline.
async fn forward(
    pool: &ConnPool,
    mut req: Request<UpBody>,
    t: &Timeouts,
    deadline: &Cell<Option<Instant>>,
    times: &AttemptTimes,
) -> Result<(Response<Incoming>, Sender), Failure> {
    loop {
        let mut start = Instant::now();
        times.start.set(Some(start));
        times.connect_ns.set(None);
        let overall = deadline.get().unwrap_or(start + t.request);
        deadline.set(Some(overall));
        let taken = match pool.take(t.upstream_idle) {
            // HTTP/2: a connection another request is opening may carry this one too.
            None if pool.opening() => {
                Box::pin(pool.stream_when_opened(start + t.connect.min(overall - start))).await
            }
            taken => taken,
        };
        let (mut sender, reused) = match taken {
            Some(s) => (s, true),
            None => 'new: {
                let now = start;
                if now >= overall {
                    return Err(Failure::Deadline);
                }
                let counted = match pool.reserve() {
                    Some(c) => c,
                    // The node is at its `max_connections`: wait for room (boxed, a rare
                    // path).
                    None => {
                        let room = Box::pin(
                            pool.wait_for_room(t.upstream_idle, (now + t.queue).min(overall)),
                        )
                        .await;
                        // The time in the queue is neither the node's answer time nor its
                        // connect time: the attempt starts now.
                        start = Instant::now();
                        times.start.set(Some(start));
                        match room {
                            Some(Room::Pooled(s)) => break 'new (s, true),
                            Some(Room::New(c)) => c,
                            None => return Err(Failure::Busy),
                        }
                    }
                };
                let now = Instant::now();
                if now >= overall {
                    return Err(Failure::Deadline);
                }
                // Boxed: the connect and handshake futures are large, and a request that
                // finds a pooled connection (the common case) should not carry their
                // size in its own future.
                match Box::pin(pool.connect(counted, t.connect.min(overall - now), t.body_idle))
                    .await
                {
                    Ok(s) => (s, false),
                    Err(ConnectError::Io(e)) if is_local_resource_error(&e) => {
                        return Err(Failure::NotSent(req, Cause::Local));
                    }
                    Err(e) => {
                        tracing::debug!(node = %pool.addr, error = %e, "connect failed");
                        return Err(Failure::NotSent(req, Cause::Node));
                    }
                }
            }
        };
        let watch = req.body().watch().cloned();
        let sent_at = if reused {
            start
        } else {
            let now = Instant::now();
            times
                .connect_ns
                .set(Some(now.saturating_duration_since(start).as_nanos() as u64));
            now
        };
        if let Some(w) = &watch {
            // Time spent finding a node is not the node's idleness.
            w.restart(sent_at);
        }
        let send = sender.send(req);
        tokio::pin!(send);
        let first = next_deadline(watch.as_deref(), sent_at, t, overall, sent_at)?;
        let sleep = tokio::time::sleep_until(first);
        tokio::pin!(sleep);
        let result = loop {
            tokio::select! {
                biased;
                r = &mut send => break r,
                () = &mut sleep => {
                    let d = next_deadline(watch.as_deref(), sent_at, t, overall, Instant::now())?;
                    sleep.as_mut().reset(d);
                }
            }
        };
        match result {
            Ok(resp) => return Ok((resp, sender)),
            Err(mut e) => {
                if let Some(f) = watch.as_ref().and_then(|w| w.client_fault()) {
                    return Err(Failure::Client(f));
                }
                if watch.as_ref().is_some_and(|w| !w.is_done())
                    && io_kind(e.error()) == Some(std::io::ErrorKind::TimedOut)
                {
                    // The node's connection gave up writing the upload (`StallIo`).
                    return Err(Failure::UploadStalled);
                }
                match e.take_message() {
                    // A pooled connection the node had closed: the request was not written,
                    // so it goes on a fresh connection to the same node.
                    Some(back) if reused => req = back,
                    Some(back) => return Err(Failure::NotSent(back, Cause::Node)),
                    None if refused_stream(e.error()) => {
                        tracing::debug!(node = %pool.addr, "the node refused the stream unprocessed");
                        return Err(Failure::Refused);
                    }
                    None => {
                        tracing::debug!(node = %pool.addr, error = %e.error(), "upstream request failed");
                        return Err(Failure::Failed);
                    }
                }
            }
        }
    }
}

/// `prepare` then `own_request_head` in one pass, for an HTTP/2 stream's request without a
/// body: the same head, byte for byte, without rewriting hyper's map, and the request id it
/// carries. `None` for the requests `prepare` rewrites in ways not repeated here (a
/// hop-by-hop field, a `Forwarded` field to drop, several cookie fields, no host, a target
/// other than a path): those take `prepare`.
fn own_prepared_head(
    req: &Request<UpBody>,
    conn: &ConnInfo,
    worker: &Worker,
    target: &Target,
    new_path: Option<&str>,
) -> Option<(Vec<u8>, std::ops::Range<usize>)> {
    let h = req.headers();
    let seen = headers::scan(h);
    // What prepare removes (an untrusted Forwarded field, X-Forwarded-Host without a
    // host) reorders the map: those requests take it.
    if target.host.is_none() || seen.hop || (!conn.trusted && seen.forwarded) {
        return None;
    }
    let mut cookies = h.get_all(header::COOKIE).iter();
    if cookies.next().is_some() && cookies.next().is_some() {
        return None;
    }
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    // The origin-form target `prepare` gives the request.
    match new_path {
        Some(p) => {
            let mut t = String::with_capacity(p.len() + 1 + req.uri().query().map_or(0, str::len));
            t.push_str(p);
            if let Some(q) = req.uri().query() {
                t.push('?');
                t.push_str(q);
            }
            let uri = Uri::try_from(t).ok()?;
            out.extend_from_slice(uri.path_and_query()?.as_str().as_bytes());
        }
        None => {
            let pq = req.uri().path_and_query()?.as_str();
            if !pq.starts_with('/') {
                return None;
            }
            out.extend_from_slice(pq.as_bytes());
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The fields `prepare` sets, in the order it sets them: each replaces the client's at
    // its first place (as `HeaderMap::insert` does), or comes after the client's fields.
    let set = set_fields(h, &seen, conn, target);
    let new_id = matches!(set[4].1, Some(Set::NewId)).then(|| worker.request_ids.next_raw());
    let new_id = new_id.as_ref().map_or(&[][..], |id| &id[..]);
    // Where the request id's value is in the head (the client's, when it goes on).
    let mut id = None;
    let mut set = set.map(|(name, value)| (name, value, false));
    for (name, field) in h {
        let at = match set.iter_mut().find(|(n, v, _)| v.is_some() && *n == name) {
            Some((_, Some(v), written)) => {
                if *written {
                    continue;
                }
                *written = true;
                push_field(&mut out, name, v.bytes(new_id))
            }
            _ => push_field(&mut out, name, field.as_bytes()),
        };
        if name == X_REQUEST_ID && id.is_none() {
            id = Some(at);
        }
    }
    for (name, v, written) in &set {
        if let (Some(v), false) = (v, written) {
            let at = push_field(&mut out, name, v.bytes(new_id));
            if *name == X_REQUEST_ID {
                id = Some(at);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    Some((out, id?))
}

/// The head hyper's HTTP/1.1 client writes for `req`, a request without a body (whose
/// target `prepare` made origin-form): the request line, then every field in the map's
/// order, as it is stored (`Transfer-Encoding` dropped, as hyper does for an empty body).
fn own_request_head(req: &Request<UpBody>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let uri = req.uri();
    match uri.path_and_query() {
        Some(pq) if uri.scheme().is_none() && uri.authority().is_none() => {
            out.extend_from_slice(pq.as_str().as_bytes())
        }
        _ => {
            use std::io::Write;
            let _ = write!(out, "{uri}");
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        if name != header::TRANSFER_ENCODING {
            push_field(&mut out, name, value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// One field of a head, as hyper writes it (`name: value` and CR LF); where the value is.
#[inline]
fn push_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) -> std::ops::Range<usize> {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    let start = out.len();
    out.extend_from_slice(value);
    let end = out.len();
    out.extend_from_slice(b"\r\n");
    start..end
}

/// When to look at an attempt again, or how it failed by `now`.
// Only the small variants of `Failure` are returned; a type of its own would need a
// conversion at each call for nothing.
#[allow(clippy::result_large_err)]
#[inline]
fn next_deadline(
    watch: Option<&BodyWatch>,
    sent_at: Instant,
    t: &Timeouts,
    overall: Instant,
    now: Instant,
) -> Result<Instant, Failure> {
    let state = watch.map_or(Upload::Done(sent_at), |w| w.state());
    match state {
        Upload::Done(done) => {
            let head = done + t.response_header;
            // The time spent uploading does not count against the overall deadline.
            let all = overall + done.saturating_duration_since(sent_at);
            if now >= head {
                Err(Failure::Timeout)
            } else if now >= all {
                Err(Failure::Deadline)
            } else {
                Ok(head.min(all))
            }
        }
        Upload::Failed(f) => Err(Failure::Client(f)),
        // The client's own idle timer (in `ClientBody`) ends a stalled upload.
        Upload::WaitingClient => Ok(now + t.body_idle.min(t.response_header)),
        Upload::Sending => {
            // The body handed its last frame on and is not asked for more: the node does
            // not read.
            let due = watch.map_or(now, |w| w.last_frame()) + t.body_idle;
            if now >= due {
                Err(Failure::UploadStalled)
            } else {
                Ok(due.min(now + t.response_header))
            }
        }
    }
}

/// Relays an upgraded connection (WebSocket, CONNECT) both ways until either side closes
/// or nothing moves for `idle`. It holds its environment's in-flight slot while open and
/// is counted by the worker's drain at shutdown (then closed at the drain's end).
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    slot: InFlight,
    idle: std::time::Duration,
    held: (TrackerGuard, Option<StreamGuard>),
    mut rec: Record,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            rec.finish(false);
            return;
        }
    };
    let activity = Cell::new(Instant::now());
    let (from_client, to_client) = (Cell::new(0), Cell::new(0));
    let mut down = Active {
        io: hyper_util::rt::TokioIo::new(down),
        last: &activity,
        read: &from_client,
    };
    let mut up = Active {
        io: hyper_util::rt::TokioIo::new(up),
        last: &activity,
        read: &to_client,
    };
    let copy = copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let closed = loop {
        tokio::select! {
            r = &mut copy => break r.is_ok(),
            () = &mut sleep => {
                let due = activity.get() + idle;
                if due <= Instant::now() {
                    tracing::debug!("tunnel closed after its idle timeout");
                    break false;
                }
                sleep.as_mut().reset(due);
            }
        }
    };
    rec.tunnelled(from_client.get(), to_client.get());
    rec.finish(closed);
    drop(slot);
    drop(held);
}

/// An I/O object that notes when bytes last moved.
struct Active<'a, T> {
    io: T,
    last: &'a Cell<Instant>,
    /// Bytes read from `io`.
    read: &'a Cell<u64>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<'_, T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.read
                .set(this.read.get() + (buf.filled().len() - before) as u64);
            this.last.set(Instant::now());
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<'_, T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            this.last.set(Instant::now());
        }
        r
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
