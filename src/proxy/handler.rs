//! Per request: snapshot -> entry -> application -> in-flight slot -> node pick ->
//! forward (next node on a failed connect) -> response. Also the one mapping from a
//! failure to envgate's own status and JSON body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::io::copy_bidirectional;

use super::body::ProxyBody;
use super::headers::{self, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
use super::pool::ConnPool;
use super::worker::Worker;
use crate::topology::{NodeId, Timeouts};

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
    NotSent(Request<Incoming>),
    /// No response head within the response-header timeout.
    Timeout,
    /// The node failed after the request was (maybe) sent.
    Failed,
}

pub async fn handle(
    worker: Rc<Worker>,
    conn: Rc<ConnInfo>,
    mut req: Request<Incoming>,
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

    let upgrade = headers::is_upgrade(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    prepare(&mut req, &conn, &worker, host_value, upgrade);

    let members = &topo.pools[app.pool].members;
    let wrr = &snap.wrr[app.pool];
    let timeouts = &topo.defaults.timeouts;
    let mut tried = [NodeId::MAX; MAX_ATTEMPTS];
    let attempts = (env.retries as usize + 1).min(MAX_ATTEMPTS);
    for attempt in 0..attempts {
        let pick = wrr.pick(members, |n| {
            topo.nodes[n].state.usable() && !tried[..attempt].contains(&n)
        });
        let Some(i) = pick else {
            let body = if attempt == 0 {
                &env.bodies.no_healthy_node
            } else {
                &env.bodies.bad_gateway
            };
            let status = if attempt == 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_GATEWAY
            };
            return Ok(own(status, body.clone()));
        };
        let node = members[i].node;
        tried[attempt] = node;
        let pool = &snap.conns[node];
        match forward(pool, req, timeouts).await {
            Ok((mut resp, sender)) => {
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
            Err(Failure::NotSent(back)) => {
                tracing::debug!(node = %topo.nodes[node].name, "connect failed, trying the next node");
                req = back;
            }
            Err(Failure::Timeout) => {
                return Ok(own(
                    StatusCode::GATEWAY_TIMEOUT,
                    env.bodies.gateway_timeout.clone(),
                ));
            }
            Err(Failure::Failed) => {
                return Ok(own(StatusCode::BAD_GATEWAY, env.bodies.bad_gateway.clone()));
            }
        }
    }
    Ok(own(StatusCode::BAD_GATEWAY, env.bodies.bad_gateway.clone()))
}

/// Rewrites the request for the node: hop-by-hop headers out, `X-Forwarded-*` and
/// `X-Request-Id` in, origin-form URI, HTTP/1.1.
#[inline]
fn prepare(
    req: &mut Request<Incoming>,
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
        h.insert(&X_REQUEST_ID, worker.request_ids.next());
    }
}

/// One attempt on one node: a pooled connection (or a new one), then the request.
async fn forward(
    pool: &ConnPool,
    mut req: Request<Incoming>,
    timeouts: &Timeouts,
) -> Result<(Response<Incoming>, SendRequest<Incoming>), Failure> {
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
