//! One record per exchange (STYLE.md "Seams"): made when the request arrives, filled by
//! the handler as it decides (route, node, attempts), carried by the response body, and
//! completed exactly once, when that body ends or is dropped (for a tunnel, when it
//! closes). The metrics and the access log are both fed from here, envgate's own answers
//! included.

use std::rc::Rc;

use http::{Method, Version};
use tokio::time::Instant;

use super::body::BodyWatch;
use super::handler::ConnInfo;
use super::worker::{LocalSnap, Worker};
use crate::accesslog::Line;
use crate::metrics::tally::GenTally;
use crate::metrics::tally::{Facts, Failover};
use crate::routing::canary::Arm;
use crate::routing::tenant::TenantDecision;
use crate::routing::Route;
use std::sync::Arc;

/// What the access log needs beyond the counters (kept only while the log is on). The
/// request's fields are copied, not shared: a clone of hyper's `Bytes` would keep its read
/// buffer from being reused in place.
struct Logged {
    method: Method,
    version: Version,
    /// Host, request target and request id, one after the other.
    text: Copied,
    host: std::ops::Range<usize>,
    target: std::ops::Range<usize>,
    request_id: std::ops::Range<usize>,
    /// Position of the application in its environment's list.
    app: Option<usize>,
    upstream_us: Option<u64>,
}

/// Bytes kept inline up to `INLINE`, on the heap past it.
struct Copied {
    inline: [u8; INLINE],
    len: usize,
    heap: Vec<u8>,
}

const INLINE: usize = 192;

impl Copied {
    fn new() -> Self {
        Copied {
            inline: [0; INLINE],
            len: 0,
            heap: Vec::new(),
        }
    }

    fn push(&mut self, v: &[u8]) -> std::ops::Range<usize> {
        let start = self.len;
        if self.heap.is_empty() && start + v.len() <= INLINE {
            self.inline[start..start + v.len()].copy_from_slice(v);
        } else {
            if self.heap.is_empty() {
                self.heap.extend_from_slice(&self.inline[..start]);
            }
            self.heap.extend_from_slice(v);
        }
        self.len += v.len();
        start..self.len
    }

    fn get(&self, r: std::ops::Range<usize>) -> &[u8] {
        if self.heap.is_empty() {
            &self.inline[r]
        } else {
            &self.heap[r]
        }
    }
}

pub struct Record {
    worker: Rc<Worker>,
    /// The counters of the generation the exchange began in (not the whole generation's
    /// tables: a long tunnel must not keep its connection pools open).
    // The worker's `Rc` around the shared `Arc`: an allocation per generation, and no
    // atomic operation per request.
    #[allow(clippy::redundant_allocation)]
    tally: Rc<Arc<GenTally>>,
    conn: Rc<ConnInfo>,
    start: Instant,
    facts: Facts,
    attempts: u8,
    upload: Option<Rc<BodyWatch>>,
    logged: Option<Box<Logged>>,
    /// A HEAD request: its answer has no body to send, so it is never cut.
    head: bool,
    /// The status as sent (0 until there is one).
    code: u16,
    done: bool,
    /// When the response body ended, if a clock read of its last poll dated it.
    ended: Option<Instant>,
}

/// The status of an exchange the client abandoned before envgate answered (nginx's).
pub const CLIENT_CLOSED: u16 = 499;
pub use crate::metrics::tally::OTHER_CODE;

impl Drop for Record {
    /// A record dropped before it was completed belongs to an exchange the client
    /// abandoned while envgate was still working on it (hyper drops the handler when the
    /// connection closes or the HTTP/2 stream is reset): it is counted and logged as 499.
    fn drop(&mut self) {
        if !self.done {
            if self.code == 0 {
                self.status(CLIENT_CLOSED);
            }
            self.complete(false);
        }
    }
}

impl Record {
    #[inline]
    pub fn new<B>(
        worker: &Rc<Worker>,
        snap: &Rc<LocalSnap>,
        conn: &Rc<ConnInfo>,
        req: &http::Request<B>,
    ) -> Record {
        let uri = req.uri();
        let host = || {
            req.headers()
                .get(http::header::HOST)
                .map(|h| h.as_bytes())
                .or_else(|| uri.authority().map(|a| a.as_str().as_bytes()))
                .unwrap_or(b"")
        };
        let target = || {
            if req.method() == Method::CONNECT {
                uri.authority().map_or("", |a| a.as_str())
            } else {
                uri.path_and_query()
                    .map_or_else(|| uri.path(), |pq| pq.as_str())
            }
            .as_bytes()
        };
        Self::make(
            worker,
            snap,
            conn,
            req.method(),
            req.version(),
            host,
            target,
        )
    }

    /// A request hyper refused itself (a head that does not parse, or is too large), with
    /// the status hyper answered: a record of its own, method, host and target `-`, no
    /// environment, completed at once.
    #[cold]
    pub fn refused(worker: &Rc<Worker>, conn: &Rc<ConnInfo>, code: u16) {
        let snap = worker.snapshot();
        let method = Method::from_bytes(b"-").expect("- is a token");
        let mut rec = Self::raw(worker, &snap, conn, &method, b"-", b"-");
        rec.no_node();
        rec.status(code);
        rec.finish(true);
    }

    /// A record of a request read by the own HTTP/1.1 codec (Host and target as sent).
    #[inline]
    pub fn raw(
        worker: &Rc<Worker>,
        snap: &Rc<LocalSnap>,
        conn: &Rc<ConnInfo>,
        method: &Method,
        host: &[u8],
        target: &[u8],
    ) -> Record {
        Self::make(
            worker,
            snap,
            conn,
            method,
            Version::HTTP_11,
            || host,
            || target,
        )
    }

    #[inline]
    fn make<'a>(
        worker: &Rc<Worker>,
        snap: &Rc<LocalSnap>,
        conn: &Rc<ConnInfo>,
        method: &Method,
        version: Version,
        host: impl FnOnce() -> &'a [u8],
        target: impl FnOnce() -> &'a [u8],
    ) -> Record {
        let logged = (worker.log.is_some() && snap.topo.access_log.enabled).then(|| {
            let mut text = Copied::new();
            let host = text.push(host());
            let target = text.push(target());
            let request_id = target.end..target.end;
            Box::new(Logged {
                method: method.clone(),
                version,
                text,
                host,
                target,
                request_id,
                app: None,
                upstream_us: None,
            })
        });
        Record {
            worker: worker.clone(),
            tally: snap.tally.clone(),
            conn: conn.clone(),
            start: Instant::now(),
            facts: Facts::default(),
            attempts: 0,
            upload: None,
            logged,
            head: *method == Method::HEAD,
            code: 0,
            done: false,
            ended: None,
        }
    }

    /// The routing decision.
    #[inline]
    pub fn route(&mut self, route: &Route<'_>) {
        let f = &mut self.facts;
        f.set_env(route.env);
        if let Some(c) = route.canary {
            f.set_canary(route.origin(), u8::from(c.arm == Arm::Canary));
        }
        if let Some(d) = route.tenant {
            let (decision, target) = match d {
                TenantDecision::Routed { range, .. } => (0, Some(range.environment)),
                TenantDecision::Outside { .. } => (1, None),
                TenantDecision::Missing => (2, None),
                TenantDecision::Malformed => (3, None),
            };
            f.set_tenant(route.origin(), decision, target);
        }
        if let Some(l) = &mut self.logged {
            l.app = route
                .environment
                .apps
                .iter()
                .position(|a| std::ptr::eq(a, route.app));
        }
    }

    /// A required tenant rule of `origin` refused the request (its id `missing`, or
    /// malformed).
    #[cold]
    pub fn tenant_refused(&mut self, origin: usize, missing: bool) {
        self.facts.set_env(origin);
        self.facts
            .set_tenant(origin, if missing { 2 } else { 3 }, None);
    }

    /// The request as sent to nodes: its id and its body's watch.
    #[inline]
    pub fn sent(&mut self, request_id: Option<&[u8]>, upload: Option<&Rc<BodyWatch>>) {
        self.upload = upload.cloned();
        if let (Some(l), Some(id)) = (&mut self.logged, request_id) {
            l.request_id = l.text.push(id);
        }
    }

    /// An attempt begins on the node at `slot`; `after` is why the one before failed.
    #[inline]
    pub fn attempt(&mut self, slot: usize, node: usize, after: Option<Failover>) {
        self.attempts = self.attempts.saturating_add(1);
        self.facts.set_slot(Some((slot, node)));
        if let Some(r) = after {
            let n = &mut self.facts.failovers[r as usize];
            *n = n.saturating_add(1);
        }
    }

    /// No node answered (envgate answers instead).
    #[inline]
    pub fn no_node(&mut self) {
        self.facts.set_slot(None);
    }

    /// The node's response head arrived; the attempt began at `began` and its new
    /// connection (if one was made) took `connect_ns`.
    #[inline]
    pub fn answered(&mut self, began: Option<Instant>, connect_ns: Option<u64>) {
        self.facts.set_connect_ns(connect_ns);
        if let (Some(l), Some(b)) = (&mut self.logged, began) {
            l.upstream_us = Some(b.elapsed().as_micros() as u64);
        }
    }

    /// The answer's status. The counters take codes outside 100-599 (hyper passes any
    /// three digits) as `OTHER_CODE`, so a node cannot mint hundreds of series; the log
    /// keeps the code as sent.
    #[inline]
    pub fn status(&mut self, code: u16) {
        self.code = code;
        self.facts.code = if (100..=599).contains(&code) {
            code
        } else {
            OTHER_CODE
        };
    }

    /// Bytes of the request body read from the client (the own HTTP/1.1 codec's; the
    /// hyper path's are counted by the body's watch).
    #[inline]
    pub fn add_in(&mut self, n: u64) {
        self.facts.bytes_in += n;
    }

    #[inline]
    pub fn add_out(&mut self, n: u64) {
        self.facts.bytes_out += n;
    }

    /// Bytes of a tunnel, both ways.
    pub fn tunnelled(&mut self, from_client: u64, to_client: u64) {
        self.facts.bytes_in = from_client;
        self.facts.bytes_out = to_client;
    }

    /// The response body's last frame was taken at `at` (the exchange ends there).
    #[inline]
    pub fn ended_at(&mut self, at: Instant) {
        self.ended = Some(at);
    }

    /// The exchange is over: `complete` when the response went out whole.
    pub fn finish(mut self, complete: bool) {
        self.complete(complete);
    }

    fn complete(&mut self, complete: bool) {
        self.done = true;
        // Answers without a body (to HEAD, 204, 304) are whole once sent, whether or not
        // hyper asked their body for anything.
        let complete = complete
            || (self.code != CLIENT_CLOSED && (self.head || matches!(self.code, 204 | 304)));
        let now = self.ended.unwrap_or_else(Instant::now);
        let elapsed = now.saturating_duration_since(self.start);
        self.facts.duration_ns = elapsed.as_nanos() as u64;
        if let Some(w) = &self.upload {
            self.facts.bytes_in = w.bytes();
        }
        let current = self.worker.is_current(&self.tally);
        self.worker.stats.record(&self.tally, current, &self.facts);
        if let Some(l) = &self.logged {
            let spec = self.tally.topo.access_log;
            let sampled = !(200..300).contains(&self.code)
                || spec.sample_2xx >= 100.0
                || ((self.worker.random() % 10_000) as f64) < spec.sample_2xx * 100.0;
            if sampled {
                self.log(l, now, elapsed.as_micros() as u64, complete);
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn log(&self, l: &Logged, now: Instant, duration_us: u64, complete: bool) {
        let Some(out) = &self.worker.log else { return };
        let topo = &self.tally.topo;
        let env = self.facts.env().map(|e| &topo.environments[e]);
        let app = env
            .zip(l.app)
            .and_then(|(e, i)| e.apps.get(i))
            .map_or("", |a| a.name.as_str());
        out.write(&Line {
            time: out.wall(now.into_std()),
            client: self.conn.peer_value.as_bytes(),
            client_port: self.conn.peer.port(),
            method: l.method.as_str(),
            host: l.text.get(l.host.clone()),
            target: l.text.get(l.target.clone()),
            version: version(l.version),
            status: self.code,
            environment: env.map_or("", |e| &e.name),
            application: app,
            node: self.facts.slot().map_or("", |(_, n)| &topo.nodes[n].name),
            attempts: self.attempts,
            canary: self.facts.canary().map_or("", |(_, arm)| {
                if arm == 1 {
                    Arm::Canary.as_str()
                } else {
                    Arm::Primary.as_str()
                }
            }),
            tenant: match self.facts.tenant() {
                Some((_, _, Some(to))) => &topo.environments[to].name,
                _ => "",
            },
            bytes_in: self.facts.bytes_in,
            bytes_out: self.facts.bytes_out,
            duration_us,
            upstream_us: l.upstream_us,
            request_id: l.text.get(l.request_id.clone()),
            complete,
        });
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}
