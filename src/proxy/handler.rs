//! Per request: snapshot -> entry -> application -> in-flight slot -> node pick ->
//! forward -> response, with failover: a request that never reached a node (failed
//! connect, pooled connection found closed) goes to the next node; a body-less request
//! with an idempotent method also after a reset or a response-header timeout. Retries are
//! bounded by `retries` and by the environment's retry budget; every failure counts
//! against the node (passive ejection). Also the one mapping from a failure to envgate's
//! own status and JSON body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use tokio::io::copy_bidirectional;

use super::body::{ProxyBody, UpBody};
use super::headers::{self, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
use super::pool::ConnPool;
use super::worker::Worker;
use crate::topology::{Member, NodeId, Timeouts, Topology};

/// What envgate knows of the downstream connection, computed once per connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The port of the listener the connection arrived on (the entry's port).
    pub local_port: u16,
    /// The peer's address as an `X-Forwarded-For` value.
    pub peer_value: HeaderValue,
    /// Whether the peer is a trusted proxy whose `X-Forwarded-For` is kept.
    pub trusted: bool,
    pub proto: HeaderValue,
}

static NO_ROUTE: &[u8] = br#"{"error":"no_route"}"#;
/// Most attempts one request makes (1 + the highest `retries`).
const MAX_ATTEMPTS: usize = 1 + crate::config::validate::MAX_RETRIES as usize;

#[inline]
fn own(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// How one attempt on one node failed.
// The request is handed back unboxed: boxing would allocate on the failover path, and the
// success variant of the same `Result` is as large.
#[allow(clippy::large_enum_variant)]
enum Failure {
    /// The request never reached the node (connect failed): another node may take it.
    NotSent(Request<UpBody>),
    /// No response head within the response-header timeout.
    Timeout,
    /// The node failed after the request was (maybe) sent.
    Failed,
}

pub async fn handle(
    worker: Rc<Worker>,
    conn: Rc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = worker.snapshot();
    let topo = &*snap.topo;

    // The authority of an absolute URI (always there in HTTP/2) wins over Host.
    let host_value: Option<HeaderValue> = match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    };
    let Some(env_id) = topo
        .entries
        .lookup(host_value.as_ref().map(|h| h.as_bytes()), conn.local_port)
    else {
        return Ok(own(StatusCode::NOT_FOUND, Bytes::from_static(NO_ROUTE)));
    };
    let env = &topo.environments[env_id];
    let Some(app) = env.app_for(req.uri().path()) else {
        return Ok(own(StatusCode::NOT_FOUND, Bytes::from_static(NO_ROUTE)));
    };
    let Some(slot) = env.try_enter() else {
        return Ok(own(
            StatusCode::SERVICE_UNAVAILABLE,
            env.bodies.over_limit.clone(),
        ));
    };

    let (parts, body) = req.into_parts();
    let body = if body.is_end_stream() {
        UpBody::Empty
    } else {
        UpBody::Stream(body)
    };
    let mut req = Request::from_parts(parts, body);
    let upgrade = headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare(&mut req, &conn, &worker, host_value, upgrade);
    // A request without a body and with an idempotent method can be sent again after it
    // reached a node that failed; any other only when it surely never left envgate.
    let replayable = !upgrade && idempotent(req.method()) && matches!(req.body(), UpBody::Empty);

    let members = &topo.pools[app.pool].members;
    let wrr = &snap.wrr[app.pool];
    let defaults = &topo.defaults;
    let panic_mode = env.panic_threshold > 0.0 && in_panic(topo, members, env.panic_threshold);
    let mut tried = [NodeId::MAX; MAX_ATTEMPTS];
    let attempts = (env.retries as usize + 1).min(MAX_ATTEMPTS);
    let mut last = Last::NoNode;
    snap.earn_retry(env_id);
    for attempt in 0..attempts {
        if attempt > 0 && !snap.spend_retry(env_id) {
            break;
        }
        let tried_so_far = &tried[..attempt];
        let pick = if panic_mode {
            wrr.pick(members, |n| {
                !topo.nodes[n].state.is_drained() && !tried_so_far.contains(&n)
            })
        } else {
            wrr.pick(members, |n| {
                topo.nodes[n].state.usable() && !tried_so_far.contains(&n)
            })
        };
        let Some(i) = pick else {
            break;
        };
        let node = members[i].node;
        tried[attempt] = node;
        let state = &topo.nodes[node].state;
        let pool = &snap.conns[node];
        let copy = (replayable && attempt + 1 < attempts).then(|| replay(&req));
        match forward(pool, req, &defaults.timeouts).await {
            Ok((mut resp, sender)) => {
                if state.record_success() {
                    tracing::info!(node = %topo.nodes[node].name, "node served again after its ejection");
                }
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    // A switch the client did not ask for cannot be relayed.
                    let Some(down) = downstream_upgrade else {
                        return Ok(own(StatusCode::BAD_GATEWAY, env.bodies.bad_gateway.clone()));
                    };
                    let up = hyper::upgrade::on(&mut resp);
                    tokio::task::spawn_local(tunnel(down, up));
                    headers::strip_hop_by_hop(resp.headers_mut(), true);
                    let (parts, body) = resp.into_parts();
                    return Ok(Response::from_parts(
                        parts,
                        ProxyBody::upstream(body, None, Some(slot)),
                    ));
                }
                headers::strip_hop_by_hop(resp.headers_mut(), false);
                let (parts, body) = resp.into_parts();
                let conn = Some((pool.clone(), sender));
                return Ok(Response::from_parts(
                    parts,
                    ProxyBody::upstream(body, conn, Some(slot)),
                ));
            }
            Err(failure) => {
                passive_failure(topo, members, node);
                let next = match failure {
                    Failure::NotSent(back) => {
                        last = Last::BadGateway;
                        Some(back)
                    }
                    Failure::Timeout => {
                        last = Last::Timeout;
                        copy
                    }
                    Failure::Failed => {
                        last = Last::BadGateway;
                        copy
                    }
                };
                match next {
                    Some(r) => req = r,
                    None => break,
                }
            }
        }
    }
    Ok(match last {
        Last::NoNode => own(
            StatusCode::SERVICE_UNAVAILABLE,
            env.bodies.no_healthy_node.clone(),
        ),
        Last::BadGateway => own(StatusCode::BAD_GATEWAY, env.bodies.bad_gateway.clone()),
        Last::Timeout => own(
            StatusCode::GATEWAY_TIMEOUT,
            env.bodies.gateway_timeout.clone(),
        ),
    })
}

/// The outcome of the last attempt, for the answer when no attempt succeeded.
#[derive(Clone, Copy)]
enum Last {
    /// No node could be picked at all.
    NoNode,
    BadGateway,
    Timeout,
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

/// Counts a live-traffic failure against `node`, ejecting it when it reaches the
/// threshold and the pool still has room under its cap of ejected nodes.
#[cold]
fn passive_failure(topo: &Topology, members: &[Member], node: NodeId) {
    let policy = &topo.defaults.passive;
    let ejected = members
        .iter()
        .filter(|m| topo.nodes[m.node].state.is_ejected())
        .count();
    let may_eject = (ejected + 1) * 100 <= members.len() * policy.max_ejected_percent as usize;
    let n = &topo.nodes[node];
    // Metrics, once the metrics module exists: ejections and envgate_retries_total count
    // here, through handles resolved when the topology is compiled.
    if let Some(cool) = n.state.record_failure(policy, may_eject) {
        tracing::warn!(node = %n.name, address = %n.addr, cool_down = ?cool, "node ejected after consecutive failures on live traffic");
    }
}

/// Rewrites the request for the node: hop-by-hop headers out, `X-Forwarded-*` and
/// `X-Request-Id` in, origin-form URI, HTTP/1.1.
#[inline]
fn prepare(
    req: &mut Request<UpBody>,
    conn: &ConnInfo,
    worker: &Worker,
    host: Option<HeaderValue>,
    upgrade: bool,
) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    headers::strip_hop_by_hop(h, upgrade);
    // Room for the four headers added below, in one growth at most.
    h.reserve(4);
    if let Some(host) = host {
        if !h.contains_key(header::HOST) {
            h.insert(header::HOST, host.clone());
        }
        h.insert(&X_FORWARDED_HOST, host);
    }
    let xff = match h.get(&X_FORWARDED_FOR) {
        Some(prev) if conn.trusted => {
            let mut v = Vec::with_capacity(prev.len() + 2 + conn.peer_value.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(conn.peer_value.as_bytes());
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| conn.peer_value.clone())
        }
        _ => conn.peer_value.clone(),
    };
    h.insert(&X_FORWARDED_FOR, xff);
    h.insert(&X_FORWARDED_PROTO, conn.proto.clone());
    if !h.get(&X_REQUEST_ID).is_some_and(headers::sane_request_id) {
        h.insert(&X_REQUEST_ID, worker.request_ids.next(&worker.values));
    }
}

/// One attempt on one node: a pooled connection (or a new one), then the request.
async fn forward(
    pool: &ConnPool,
    mut req: Request<UpBody>,
    timeouts: &Timeouts,
) -> Result<(Response<Incoming>, SendRequest<UpBody>), Failure> {
    loop {
        let (mut sender, reused) = match pool.take(timeouts.upstream_idle) {
            Some(s) => (s, true),
            None => match pool.connect(timeouts.connect).await {
                Ok(s) => (s, false),
                Err(e) => {
                    tracing::debug!(node = %pool.addr, error = %e, "connect failed");
                    return Err(Failure::NotSent(req));
                }
            },
        };
        match tokio::time::timeout(timeouts.response_header, sender.try_send_request(req)).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Ok(resp)) => return Ok((resp, sender)),
            Ok(Err(mut e)) => match e.take_message() {
                // A pooled connection the node had closed: the request was not written,
                // so it goes on a fresh connection to the same node.
                Some(back) if reused => req = back,
                Some(back) => return Err(Failure::NotSent(back)),
                None => {
                    tracing::debug!(node = %pool.addr, error = %e.error(), "upstream request failed");
                    return Err(Failure::Failed);
                }
            },
        }
    }
}

/// Relays an upgraded connection (WebSocket and the like) both ways until either side
/// closes.
async fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    let _ = copy_bidirectional(&mut down, &mut up).await;
}
