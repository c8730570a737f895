//! The control endpoint (DESIGN.md "Control endpoint"): liveness, readiness, the topology
//! (read, replace, patch, dry run), status, history and rollback, over HTTP/1.1 on the
//! `control.bind` address (loopback by default).
//!
//! Every write goes through `Control::apply`, like the file watch and SIGHUP. Writes need
//! `Authorization: Bearer <token>` (compared in constant time) with the token of
//! `control.token_file`; without a token file the endpoint is read-only. `If-Match` with
//! the topology's ETag makes a write conditional (412 when stale). Answers are JSON:
//! 400 for a body that is not a document (or a patch), 401 without the token, 412 stale,
//! 413 over `MAX_BODY`, 422 for a document that does not validate:
//! `{"errors":[{"path","kind","message"}]}`.
//!
//! Applied changes are written back to the topology file (temporary file, fsync, rename),
//! so a restart loses nothing; the file watch finds the document it already runs there
//! and does nothing.

// A check that fails returns the answer itself (`Err(Response)`): the control plane is not
// the hot path, and boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{ApplyError, Control, Source};
use crate::health::Health;

/// Largest request body (a topology of 10,000 environments is about 3 MiB of YAML).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// What the endpoint serves from.
pub struct Api {
    pub control: Arc<Control>,
    /// The topology file applied changes are written back to.
    pub file: Option<PathBuf>,
    /// True once the first health verdicts are in (workers accept from then on).
    pub ready: watch::Receiver<bool>,
    /// True from the moment a shutdown begins.
    pub stopping: watch::Receiver<bool>,
}

/// Serves the control endpoint on `listener` until `stopping` turns true.
pub async fn serve(api: Arc<Api>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the control endpoint");
            return;
        }
    };
    let mut stopping = api.stopping.clone();
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "control accept failed");
                    continue;
                }
            },
            _ = stopping.wait_for(|s| *s) => return,
        };
        let api = api.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(handle(&api, peer, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
        });
    }
}

fn respond(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, error: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    respond(status, json!({ "error": error, "message": message.into() }))
}

/// The topology's entity tag: its generation and a hash of its document.
pub fn etag(generation: u64, document: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    document.hash(&mut h);
    format!("\"g{generation}-{:016x}\"", h.finish())
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == name).then_some(v)
    })
}

/// Constant-time comparison of the presented token with the configured one.
fn token_matches(presented: &[u8], token: &[u8]) -> bool {
    let mut diff = (presented.len() ^ token.len()) as u8 | (presented.len() != token.len()) as u8;
    for (i, t) in token.iter().enumerate() {
        diff |= t ^ presented.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

async fn handle(api: &Api, _peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => respond(StatusCode::OK, json!({ "status": "ok" })),
        (Method::GET, "/ready") => {
            if *api.stopping.borrow() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "status": "stopping" }),
                )
            } else if !*api.ready.borrow() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "status": "starting" }),
                )
            } else {
                respond(StatusCode::OK, json!({ "status": "ready" }))
            }
        }
        (Method::GET, "/api/v1/topology") => get_topology(api, &req),
        (Method::PUT | Method::PATCH, "/api/v1/topology") => write_topology(api, req).await,
        (Method::GET, "/api/v1/status") => status(api),
        (Method::GET, "/api/v1/history") => history(api),
        (Method::GET, "/api/v1/explain") => explain(api, &req),
        (Method::POST, "/api/v1/rollback") => rollback(api, req),
        (
            _,
            "/healthz" | "/ready" | "/api/v1/topology" | "/api/v1/status" | "/api/v1/history"
            | "/api/v1/rollback",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

fn get_topology(api: &Api, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (generation, document) = api.control.current();
    let tag = etag(generation, &document);
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes() || v.as_bytes() == b"*")
    {
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        if let Ok(v) = HeaderValue::from_str(&tag) {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return resp;
    }
    let mut resp = Response::new(Full::new(Bytes::from(document.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml"),
    );
    if let Ok(v) = HeaderValue::from_str(&tag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// The token check every write makes. The token file is read at each write, so a new
/// token takes effect without a restart.
fn authorise(api: &Api, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let file = api
        .control
        .topology()
        .control
        .as_ref()
        .and_then(|c| c.token_file.clone());
    let Some(file) = file else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "read_only",
            "this endpoint is read-only: set control.token_file to allow writes",
        ));
    };
    let token = match std::fs::read_to_string(&file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) | Err(_) => {
            tracing::error!(file = %file.display(), "the control token file is unreadable or empty; writes are refused");
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_token",
                "the token file is unreadable or empty",
            ));
        }
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or(b"");
    if !token_matches(presented, token.as_bytes()) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "writes need Authorization: Bearer <token>",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"envgate\""),
        );
        return Err(resp);
    }
    Ok(())
}

fn stale(api: &Api, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let want = req.headers().get(header::IF_MATCH)?;
    let (generation, document) = api.control.current();
    let tag = etag(generation, &document);
    (want.as_bytes() != tag.as_bytes() && want.as_bytes() != b"*").then(|| {
        error(
            StatusCode::PRECONDITION_FAILED,
            "stale",
            format!("the topology changed: its ETag is now {tag}"),
        )
    })
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("a document may be at most {MAX_BODY} bytes"),
            ))
        }
        Err(e) => Err(error(StatusCode::BAD_REQUEST, "bad_body", e.to_string())),
    }
}

async fn write_topology(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(resp) = authorise(api, &req) {
        return resp;
    }
    if let Some(resp) = stale(api, &req) {
        return resp;
    }
    let dry_run = query_param(&req, "dry_run").is_some_and(|v| v == "true" || v == "1");
    let patch = req.method() == Method::PATCH;
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let text = if patch {
        match patched(&api.control.document(), &body) {
            Ok(t) => t,
            Err(resp) => return resp,
        }
    } else {
        match std::str::from_utf8(&body) {
            Ok(t) => t.to_string(),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "parse",
                    "the document is not UTF-8",
                )
            }
        }
    };
    apply(api, Source::Api, &text, dry_run)
}

/// The running document with a JSON Patch (RFC 6902) applied, as YAML.
fn patched(document: &str, body: &[u8]) -> Result<String, Response<Full<Bytes>>> {
    let patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "parse",
            format!("not a JSON Patch (RFC 6902): {e}"),
        )
    })?;
    let mut doc: Value = serde_norway::from_str(document).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the running document does not read as JSON: {e}"),
        )
    })?;
    json_patch::patch(&mut doc, &patch).map_err(|e| {
        respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "errors": [ { "path": format!("/{}", e.operation), "kind": "patch", "message": e.to_string() } ] }),
        )
    })?;
    serde_norway::to_string(&doc)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

fn apply(api: &Api, source: Source, text: &str, dry_run: bool) -> Response<Full<Bytes>> {
    match api.control.apply(source, text, dry_run) {
        Ok(applied) => {
            if !dry_run && !applied.unchanged {
                if let Some(file) = &api.file {
                    if let Err(e) = write_back(file, text) {
                        tracing::error!(file = %file.display(), error = %e, "applied, but the topology file could not be written: a restart would lose this change");
                        return respond(
                            StatusCode::OK,
                            json!({ "generation": applied.generation, "changes": applied.diff.changes, "unchanged": false, "dry_run": false, "written": false, "warning": format!("not written to {}: {e}", file.display()) }),
                        );
                    }
                }
            }
            respond(
                StatusCode::OK,
                json!({ "generation": applied.generation, "changes": applied.diff.changes, "unchanged": applied.unchanged, "dry_run": dry_run }),
            )
        }
        Err(ApplyError::Parse(m)) => error(StatusCode::BAD_REQUEST, "parse", m),
        Err(ApplyError::Invalid(errs)) => respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "errors": errs.iter().map(|e| json!({ "path": e.path, "kind": e.kind.as_str(), "message": e.message })).collect::<Vec<_>>() }),
        ),
        Err(ApplyError::Refused(path, m)) => respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "errors": [ { "path": path, "kind": "conflict", "message": m } ] }),
        ),
    }
}

/// Writes `text` to `file` atomically: a temporary file beside it, fsync, rename.
fn write_back(file: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = file.parent().unwrap_or(std::path::Path::new("."));
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "topology".into());
    let tmp = dir.join(format!(".{name}.envgate-tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, file)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn rollback(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(resp) = authorise(api, &req) {
        return resp;
    }
    if let Some(resp) = stale(api, &req) {
        return resp;
    }
    let Some(to) = query_param(&req, "to").and_then(|v| v.parse::<u64>().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "give ?to=GENERATION",
        );
    };
    let document = api
        .control
        .history()
        .into_iter()
        .rev()
        .find(|r| r.generation == to && r.document.is_some())
        .and_then(|r| r.document);
    let Some(document) = document else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("generation {to} is not in the history"),
        );
    };
    apply(api, Source::Rollback, &document, false)
}

/// `%XX` and `+` decoded (query parameter values).
fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The routing decision for a described request, against the live topology and node
/// state, by the data plane's own `routing::route`: `?host=&port=&path=&method=`, and
/// any number of `header=Name:Value`, `cookie=name=value`, `client=IP`.
fn explain(api: &Api, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    use crate::routing::{self, canary::Arm, path, Described, RequestView, RouteError};
    let t = api.control.topology();
    let mut host = None;
    let mut port = None;
    let mut target = "/".to_string();
    let mut method = Method::GET;
    let mut headers = http::HeaderMap::new();
    let mut client: std::net::IpAddr = [127, 0, 0, 1].into();
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v);
        match k {
            "host" => host = Some(v),
            "port" => port = v.parse::<u16>().ok(),
            "path" => target = v,
            "method" => match Method::from_bytes(v.as_bytes()) {
                Ok(m) => method = m,
                Err(_) => return error(StatusCode::BAD_REQUEST, "bad_request", "bad method"),
            },
            "header" => {
                let Some((name, value)) = v.split_once(':') else {
                    return error(StatusCode::BAD_REQUEST, "bad_request", "header=Name:Value");
                };
                match (
                    http::HeaderName::from_bytes(name.trim().as_bytes()),
                    HeaderValue::from_str(value.trim()),
                ) {
                    (Ok(n), Ok(v)) => {
                        headers.append(n, v);
                    }
                    _ => return error(StatusCode::BAD_REQUEST, "bad_request", "bad header"),
                }
            }
            "cookie" => match HeaderValue::from_str(&v) {
                Ok(c) => {
                    headers.append(header::COOKIE, c);
                }
                Err(_) => return error(StatusCode::BAD_REQUEST, "bad_request", "bad cookie"),
            },
            "client" => match v.parse() {
                Ok(ip) => client = ip,
                Err(_) => {
                    return error(StatusCode::BAD_REQUEST, "bad_request", "bad client address")
                }
            },
            _ => {}
        }
    }
    let port = match port.or_else(|| t.listeners.first().map(|l| l.bind.port())) {
        Some(p) => p,
        None => return error(StatusCode::BAD_REQUEST, "bad_request", "give ?port="),
    };
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.clone(), None),
    };
    let normal = match path::normalize(&raw_path, t.defaults.allow_encoded_slash) {
        Ok(p) => p.unwrap_or(raw_path),
        Err(e) => {
            return respond(
                StatusCode::OK,
                json!({ "answer": 400, "error": "bad_path", "reason": e.as_str() }),
            )
        }
    };
    let view = RequestView {
        host: host.as_deref().map(str::as_bytes),
        port,
        path: &normal,
        query: query.as_deref(),
        method: &method,
        headers: &headers,
        client,
        trusted: false,
        random: 0,
    };
    let route = match routing::route(&t, &view) {
        Ok(r) => r,
        Err(e) => {
            let (status, err) = match e {
                RouteError::NoRoute => (404, "no_route"),
                RouteError::TenantRequired => (400, "tenant_required"),
                RouteError::BadTenant => (400, "bad_tenant"),
            };
            return respond(StatusCode::OK, json!({ "answer": status, "error": err }));
        }
    };
    let candidates: Vec<Value> = route
        .candidates
        .iter()
        .map(|p| {
            json!(t.pools[p].members.iter().map(|m| {
                let n = &t.nodes[m.node];
                json!({
                    "node": &*n.name,
                    "address": n.addr.to_string(),
                    "weight": m.weight,
                    "backup": m.backup,
                    "health": match n.state.health() { Health::Up => "up", Health::Down => "down", Health::Unknown => "unknown" },
                    "drained": n.state.is_drained(),
                    "usable": n.state.usable(),
                })
            }).collect::<Vec<_>>())
        })
        .collect();
    // The node a fresh round-robin would pick first (each worker keeps its own counters).
    let next = route.candidates.iter().find_map(|p| {
        let members = &t.pools[p].members;
        let wrr = crate::balance::Wrr::new(members.len());
        wrr.pick(members, |n| t.nodes[n].state.usable())
            .map(|i| t.nodes[members[i].node].name.to_string())
    });
    let canary = route.canary.map(|c| {
        json!({
            "arm": c.arm.as_str(),
            "to_canary": c.arm == Arm::Canary,
            "set_cookie": c.set_cookie,
        })
    });
    respond(
        StatusCode::OK,
        json!({
            "answer": if next.is_some() { 200 } else { 503 },
            "entry": route.entry.to_string(),
            "entry_environment": &*t.environments[route.entry.env].name,
            "environment": &*t.environments[route.env].name,
            "redirected": route.redirect.is_some(),
            "canary": canary,
            "application": { "name": route.app.name, "version": route.app.version, "path": route.app.prefix },
            "candidates": candidates,
            "next": next,
            "explanation": Described { route: &route, topo: &t }.to_string(),
        }),
    )
}

fn history(api: &Api) -> Response<Full<Bytes>> {
    let records: Vec<Value> = api
        .control
        .history()
        .iter()
        .map(|r| {
            json!({
                "generation": r.generation,
                "source": r.source.as_str(),
                "result": r.result.as_str(),
                "time": humantime::format_rfc3339_seconds(r.at).to_string(),
                "summary": r.summary,
                "rollback": r.document.is_some(),
            })
        })
        .collect();
    respond(StatusCode::OK, json!({ "history": records }))
}

fn status(api: &Api) -> Response<Full<Bytes>> {
    let t = api.control.topology();
    let nodes: Vec<Value> = t
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": &*n.name,
                "address": n.addr.to_string(),
                "weight": n.weight,
                "backup": n.backup,
                "health": match n.state.health() { Health::Up => "up", Health::Down => "down", Health::Unknown => "unknown" },
                "drained": n.state.is_drained(),
                "ejected": n.state.is_ejected(),
                "usable": n.state.usable(),
            })
        })
        .collect();
    let envs: Vec<Value> = t
        .environments
        .iter()
        .map(|e| {
            json!({
                "name": &*e.name,
                "entries": e.entries,
                "applications": e.apps.iter().filter(|a| !a.name.is_empty()).map(|a| json!({ "name": a.name, "version": a.version, "path": a.prefix })).collect::<Vec<_>>(),
                "canary": e.canary.as_ref().map(|c| json!({ "environment": &*t.environments[c.environment].name, "weight": c.threshold as f64 / 100.0 })),
                "in_flight": e.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let recent: Vec<Value> = api
        .control
        .history()
        .iter()
        .rev()
        .take(10)
        .map(|r| json!({ "generation": r.generation, "source": r.source.as_str(), "result": r.result.as_str(), "summary": r.summary }))
        .collect();
    respond(
        StatusCode::OK,
        json!({ "generation": t.generation, "environments": envs, "nodes": nodes, "recent": recent }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secre", b"secret"));
        assert!(!token_matches(b"secretx", b"secret"));
        assert!(!token_matches(b"", b"secret"));
        assert!(!token_matches(b"Secret", b"secret"));
    }
}
