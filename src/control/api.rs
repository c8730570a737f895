//! The control endpoint (DESIGN.md "Control endpoint"): liveness, readiness, the topology
//! (read, replace, patch, dry run), status, history and rollback, over HTTP/1.1 on the
//! `control.bind` address (loopback by default).
//!
//! Every write goes through `Control::apply`, like the file watch and SIGHUP. Writes need
//! `Authorization: Bearer <token>` (compared in constant time) with the token of
//! `control.token_file`; without a token file the endpoint is read-only. `If-Match` with
//! the topology's ETag makes a write conditional (412 when stale). Answers are JSON:
//! 400 for a body that is not a document (or a patch), 401 without the token, 408 for a
//! body slower than `BODY_TIMEOUT`, 412 stale, 413 over `MAX_BODY`, 422 for a document
//! that does not validate:
//! `{"errors":[{"path","kind","message"}]}`.
//!
//! Applied changes are written back to the topology file (temporary file, fsync, rename),
//! so a restart loses nothing; the file watch finds the document it already runs there
//! and does nothing.

// A check that fails returns the answer itself (`Err(Response)`): the control plane is not
// the hot path, and boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
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
use crate::topology::TenantKey;

/// Largest request body (a topology of 10,000 environments is about 3 MiB of YAML).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connections the endpoint serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a request body may take to arrive whole.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the endpoint serves from.
pub struct Api {
    pub control: Arc<Control>,
    /// The topology file applied changes are written back to.
    pub file: Option<PathBuf>,
    /// True once the first health verdicts are in (workers accept from then on).
    pub ready: watch::Receiver<bool>,
    /// True from the moment a shutdown begins.
    pub stopping: watch::Receiver<bool>,
    /// `GET /metrics`.
    pub metrics: prometheus::Registry,
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
    // At most this many connections at once; more wait in the accept queue.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = stopping.wait_for(|s| *s) => return,
        };
        let (stream, _) = tokio::select! {
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
                async move { Ok::<_, Infallible>(handle(api, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = conn.await;
            drop(slot);
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

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        (Method::GET, "/api/v1/topology") => get_topology(&api, &req),
        (Method::PUT | Method::PATCH, "/api/v1/topology") => write_topology(api, req).await,
        (Method::GET, "/") => status_page(),
        (Method::GET, "/metrics") => metrics(&api).await,
        (Method::GET, "/api/v1/status") => off_thread(api, |api| status(&api)).await,
        (Method::GET, "/api/v1/history") => history(&api),
        (Method::GET, "/api/v1/explain") => explain(&api, &req),
        (Method::POST, "/api/v1/rollback") => rollback(api, req).await,
        (
            _,
            "/" | "/healthz" | "/ready" | "/metrics" | "/api/v1/topology" | "/api/v1/status"
            | "/api/v1/history" | "/api/v1/rollback",
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

/// The entity tags of an `If-Match` / `If-None-Match` value (a list; `W/` weak prefixes
/// kept so callers can compare strongly or weakly).
fn tags(v: &HeaderValue) -> impl Iterator<Item = &str> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn get_topology(api: &Api, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let now = api.control.current();
    let tag = &now.etag;
    // Weak comparison (RFC 9110 13.1.2): `W/"x"` matches `"x"`.
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| tags(v).any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == *tag));
    let mut resp = if matches {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        // The document itself, shared (no copy of what may be megabytes).
        let mut r = Response::new(Full::new(Bytes::from_owner(Shared(now.document.clone()))));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        );
        r
    };
    if let Ok(v) = HeaderValue::from_str(tag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// A document handed to `Bytes` without a copy.
struct Shared(Arc<str>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
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
    // The scheme is case-insensitive (RFC 9110 11.1), spaces may follow it.
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
        })
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

/// `If-Match`: `Ok(None)` without one (or `*`), `Ok(Some(generation))` when it names the
/// current ETag (strong comparison: a weak tag never matches), 412 otherwise. The
/// generation is checked again when the change is swapped in, so of two writers with the
/// same tag exactly one wins.
fn if_match(api: &Api, req: &Request<Incoming>) -> Result<Option<u64>, Response<Full<Bytes>>> {
    let Some(v) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let now = api.control.current();
    if tags(v).any(|t| t == "*") {
        return Ok(None);
    }
    if tags(v).any(|t| t == now.etag) {
        return Ok(Some(now.generation));
    }
    Err(stale_answer(&now.etag))
}

fn stale_answer(tag: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::PRECONDITION_FAILED,
        "stale",
        format!("the topology changed: its ETag is now {tag}"),
    )
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    let read = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    );
    let Ok(read) = read.await else {
        return Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the body did not arrive within {BODY_TIMEOUT:?}"),
        ));
    };
    match read {
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

/// What a write asks for, handed to the blocking apply.
enum Change {
    Document(String),
    Patch(json_patch::Patch),
    Rollback(u64),
}

async fn write_topology(api: Arc<Api>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(resp) = authorise(&api, &req) {
        return resp;
    }
    let base = match if_match(&api, &req) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let dry_run = query_param(&req, "dry_run").is_some_and(|v| v == "true" || v == "1");
    if !dry_run {
        if let Some(refused) = followed(&api) {
            return refused;
        }
    }
    let patch = req.method() == Method::PATCH;
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let change = if patch {
        match serde_json::from_slice::<json_patch::Patch>(&body) {
            Ok(p) if p.len() > MAX_PATCH_OPS => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "patch_too_large",
                    format!("a patch may hold at most {MAX_PATCH_OPS} operations"),
                )
            }
            Ok(p) => Change::Patch(p),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "parse",
                    format!("not a JSON Patch (RFC 6902): {e}"),
                )
            }
        }
    } else {
        match String::from_utf8(body.to_vec()) {
            Ok(t) => Change::Document(t),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "parse",
                    "the document is not UTF-8",
                )
            }
        }
    };
    blocking(api, change, base, dry_run).await
}

/// Runs a change off the control thread's runtime (which also runs the health
/// checkers): parsing and validating a large document, patching it and writing it back
/// take time that must not stall anything else.
async fn blocking(
    api: Arc<Api>,
    change: Change,
    base: Option<u64>,
    dry_run: bool,
) -> Response<Full<Bytes>> {
    match tokio::task::spawn_blocking(move || change_now(&api, change, base, dry_run)).await {
        Ok(resp) => resp,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Most operations in one patch.
pub const MAX_PATCH_OPS: usize = 10_000;

fn change_now(
    api: &Api,
    change: Change,
    base: Option<u64>,
    dry_run: bool,
) -> Response<Full<Bytes>> {
    match change {
        Change::Document(text) => apply(api, Source::Api, &text, dry_run, base),
        Change::Rollback(to) => {
            let document = api
                .control
                .history()
                .into_iter()
                .rev()
                .find(|r| r.generation == to && r.document.is_some())
                .and_then(|r| r.document);
            match document {
                Some(d) => apply(api, Source::Rollback, &d, dry_run, base),
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("generation {to} is not in the history (or its document was let go)"),
                ),
            }
        }
        Change::Patch(patch) => {
            // A patch is computed over one generation's document and applied only if that
            // generation is still live; when another change came between, it is computed
            // again over the new one (unless the client made it conditional).
            for _ in 0..3 {
                let now = api.control.current();
                let generation = now.generation;
                if base.is_some_and(|b| b != generation) {
                    return stale_answer(&now.etag);
                }
                let text = match patched(&now.document, &patch) {
                    Ok(t) => t,
                    Err(resp) => return resp,
                };
                let resp = apply(api, Source::Api, &text, dry_run, Some(generation));
                if resp.status() != StatusCode::PRECONDITION_FAILED || base.is_some() {
                    return resp;
                }
            }
            error(
                StatusCode::CONFLICT,
                "busy",
                "the topology kept changing while the patch was applied; try again",
            )
        }
    }
}

/// The running document with a JSON Patch (RFC 6902) applied, as YAML. A patch may not
/// make the document larger than `MAX_BODY` (each `copy` can double it).
fn patched(document: &str, patch: &json_patch::Patch) -> Result<String, Response<Full<Bytes>>> {
    let mut doc: Value = serde_norway::from_str(document).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the running document does not read as JSON: {e}"),
        )
    })?;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "document_too_large",
            format!("the patched document would pass {MAX_BODY} bytes"),
        )
    };
    for (i, op) in patch.iter().enumerate() {
        json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
            respond(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "errors": [ { "path": format!("/{i}"), "kind": "patch", "message": e.to_string() } ] }),
            )
        })?;
        // Only `copy` grows the document past the patch's own size.
        if matches!(op, json_patch::PatchOperation::Copy(_))
            && serde_json::to_vec(&doc).map_or(true, |v| v.len() > MAX_BODY)
        {
            return Err(too_large());
        }
    }
    let text = serde_norway::to_string(&doc)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "parse", e.to_string()))?;
    if text.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(text)
}

fn apply(
    api: &Api,
    source: Source,
    text: &str,
    dry_run: bool,
    base: Option<u64>,
) -> Response<Full<Bytes>> {
    match api.control.apply_on(source, text, dry_run, base) {
        Ok(applied) => {
            let mut body = json!({ "generation": applied.generation, "changes": applied.diff.changes, "unchanged": applied.unchanged, "dry_run": dry_run });
            if !dry_run && !applied.unchanged {
                if let Some(file) = &api.file {
                    match write_back(file, text, &applied.replaced) {
                        Ok(()) => body["written"] = json!(true),
                        Err(e) => {
                            tracing::error!(file = %file.display(), error = %e, "applied, but not written to the topology file: a restart would not keep this change");
                            body["written"] = json!(false);
                            body["warning"] =
                                json!(format!("not written to {}: {e}", file.display()));
                        }
                    }
                }
            }
            respond(StatusCode::OK, body)
        }
        Err(ApplyError::Parse(m)) => error(StatusCode::BAD_REQUEST, "parse", m),
        Err(ApplyError::Stale(..)) => stale_answer(&api.control.current().etag),
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

/// Writes `text` over the topology file atomically (a temporary file beside the real
/// file, fsync, rename), following a symlink to the file it names and keeping that file's
/// permissions. The file must still hold `replaced` (the document the change replaced):
/// an edit made there meanwhile is not overwritten (the watch applies it next).
fn write_back(file: &std::path::Path, text: &str, replaced: &str) -> std::io::Result<()> {
    use std::io::Write;
    let target = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let old = std::fs::read(&target).ok();
    if old.as_deref().is_some_and(|o| o != replaced.as_bytes()) {
        return Err(std::io::Error::other(
            "the file was changed meanwhile; it is not overwritten (the file watch applies it)",
        ));
    }
    let dir = target.parent().unwrap_or(std::path::Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "topology".into());
    let tmp = dir.join(format!(".{name}.envgate-tmp"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(&target) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// 409 for a write to an instance that follows another one's topology (fleet mode).
fn followed(api: &Api) -> Option<Response<Full<Bytes>>> {
    api.control.following().map(|url| {
        error(
            StatusCode::CONFLICT,
            "follows_source",
            format!("this instance follows the topology at {url}: change it there"),
        )
    })
}

async fn rollback(api: Arc<Api>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(resp) = authorise(&api, &req) {
        return resp;
    }
    let base = match if_match(&api, &req) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if let Some(refused) = followed(&api) {
        return refused;
    }
    let Some(to) = query_param(&req, "to").and_then(|v| v.parse::<u64>().ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "give ?to=GENERATION",
        );
    };
    blocking(api, Change::Rollback(to), base, false).await
}

/// A query parameter value, decoded as forms encode it (`%XX`, `+`; a malformed escape
/// is kept as a `%`).
fn decode(v: &str) -> String {
    let bytes: Vec<u8> = crate::routing::tenant::form(v.as_bytes())
        .map(|b| b.unwrap_or(b'%'))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
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
        headers: crate::routing::Fields::Map(&headers),
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
            json!(t.pools[p]
                .members
                .iter()
                .map(|m| {
                    let n = &t.nodes[m.node];
                    json!({
                        "node": &*n.name,
                        "address": n.addr.to_string(),
                        "resolved_from": n.dns.as_deref(),
                        "weight": m.weight,
                        "backup": m.backup,
                        "health": n.state.health().as_str(),
                        "drained": n.state.is_drained(),
                        "usable": n.state.usable(),
                    })
                })
                .collect::<Vec<_>>())
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

/// `answer(api)` on a blocking thread: reads that grow with the topology (status for
/// tens of thousands of nodes, polled by every open status page) stay off the health
/// checkers' thread.
async fn off_thread(
    api: Arc<Api>,
    answer: impl FnOnce(Arc<Api>) -> Response<Full<Bytes>> + Send + 'static,
) -> Response<Full<Bytes>> {
    match tokio::task::spawn_blocking(move || answer(api)).await {
        Ok(resp) => resp,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// The status page: one self-contained HTML file (no external assets) that renders
/// `/api/v1/status` and fetches it again every 2 s.
fn status_page() -> Response<Full<Bytes>> {
    static PAGE: &str = include_str!("status.html");
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing from elsewhere: scripts, styles and fetches stay on this endpoint.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        ),
    );
    resp
}

/// The Prometheus text exposition, built from the live state at each scrape, on a
/// blocking thread: for tens of thousands of nodes it takes a while, and the health
/// checkers share this thread.
async fn metrics(api: &Api) -> Response<Full<Bytes>> {
    let registry = api.metrics.clone();
    let rendered = tokio::task::spawn_blocking(move || crate::metrics::render(&registry))
        .await
        .unwrap_or_else(|e| Err(prometheus::Error::Msg(e.to_string())));
    match rendered {
        Ok(text) => {
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "metrics", e.to_string()),
    }
}

fn status(api: &Api) -> Response<Full<Bytes>> {
    let t = api.control.topology();
    let nodes: Vec<Value> = t
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": &*n.name,
                "node": &*n.defined,
                "address": n.addr.to_string(),
                "resolved_from": n.dns.as_deref(),
                "weight": n.weight,
                "backup": n.backup,
                "health": n.state.health().as_str(),
                "drained": n.state.is_drained(),
                "ejected": n.state.is_ejected(),
                "usable": n.state.usable(),
                "last_check": n.state.last_check().map(|c| json!({
                    "time": humantime::format_rfc3339_seconds(c.at).to_string(),
                    "result": if c.passed { "passed" } else { "failed" },
                    "detail": c.detail,
                })),
            })
        })
        .collect();
    // Canary decisions so far, for the live share of each arm.
    let totals = api.control.request_totals();
    let envs: Vec<Value> = t
        .environments
        .iter()
        .map(|e| {
            json!({
                "name": &*e.name,
                "entries": e.entries,
                "applications": e.apps.iter().filter(|a| !a.name.is_empty()).map(|a| json!({ "name": a.name, "version": a.version, "path": a.prefix })).collect::<Vec<_>>(),
                "canary": e.canary.as_ref().map(|c| {
                    let arms = totals.envs.get(&e.name).map_or([0; 2], |t| t.arms);
                    json!({
                        "environment": &*t.environments[c.environment].name,
                        "weight": c.threshold as f64 / 100.0,
                        "requests": { "primary": arms[0], "canary": arms[1] },
                    })
                }),
                "tenants": e.tenants.as_ref().map(|r| json!({
                    "key": match &r.key {
                        TenantKey::Header(h) => format!("header {h}"),
                        TenantKey::HostLabel(n) => format!("host label {n}"),
                        TenantKey::PathSegment(n) => format!("path segment {n}"),
                        TenantKey::Query(q) => format!("query {q}"),
                    },
                    "required": r.required,
                    "ranges": r.ranges.iter().map(|x| json!({ "from": x.from, "to": x.to, "environment": &*t.environments[x.environment].name })).collect::<Vec<_>>(),
                })),
                "in_flight": e.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let history = api.control.history();
    // Where the live generation came from.
    let source = history
        .iter()
        .rev()
        .find(|r| r.result == super::Outcome::Applied && r.generation == t.generation)
        .map(|r| r.source.as_str());
    let recent: Vec<Value> = history
        .iter()
        .rev()
        .take(10)
        .map(|r| json!({ "generation": r.generation, "source": r.source.as_str(), "result": r.result.as_str(), "time": humantime::format_rfc3339_seconds(r.at).to_string(), "summary": r.summary }))
        .collect();
    respond(
        StatusCode::OK,
        json!({
            "generation": t.generation,
            "source": source,
            "hash": api.control.topology_hash(),
            "follows": api.control.following(),
            "environments": envs,
            "nodes": nodes,
            "dns": t.dns.iter().map(|d| json!({
                "node": &*d.node,
                "name": &*d.host,
                "port": d.port,
                "addresses": d.answer.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                // The latest lookup's (one that fails while the last answer is held
                // changes no member, hence no topology).
                "error": api.control.dns().get(&d.host).map_or(d.answer.error.clone(), |a| a.error),
            })).collect::<Vec<_>>(),
            "recent": recent,
        }),
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
