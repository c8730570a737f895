//! Active health checks: one task per node, whatever the number of environments that use
//! it, on the control thread.
//!
//! Each check is an HTTP GET of the node's health path on a fresh connection (or a bare
//! TCP connect for `type: tcp`), bounded by the check timeout. `rise` consecutive passes
//! bring a down node up, `fall` consecutive failures take an up node down; a node not yet
//! checked is `Unknown` and comes up on its first pass (it goes down on its first failure
//! unless `trust_unknown` lets it serve meanwhile). Checks start at a random point of the
//! first interval and each interval moves by up to `jitter` percent, so the checks of many
//! nodes do not line up. Transitions are logged once each.

use rustc_hash::FxHashMap as HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Health, NodeState};
use crate::server::Shared;
use crate::topology::{CheckKind, HealthSpec};

/// Consecutive results of one node's checks, and the decision they lead to.
#[derive(Debug, Default)]
pub struct Counter {
    passes: u32,
    fails: u32,
}

impl Counter {
    /// Records one result; returns the new health when it changes.
    pub fn observe(
        &mut self,
        state: &NodeState,
        pass: bool,
        spec: &HealthSpec,
    ) -> Option<(Health, Health)> {
        let now = state.health();
        if pass {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
        }
        let next = match (now, pass) {
            (Health::Unknown, true) => Health::Up,
            (Health::Unknown, false) if !spec.trust_unknown || self.fails >= spec.fall => {
                Health::Down
            }
            (Health::Down, true) if self.passes >= spec.rise => Health::Up,
            (Health::Up, false) if self.fails >= spec.fall => Health::Down,
            _ => now,
        };
        (next != now).then(|| (state.set_health(next), next))
    }
}

/// Why a probe did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeError {
    /// The node failed the check.
    Failed(String),
    /// envgate could not run the check for lack of its own resources (file descriptors,
    /// ports, buffers): says nothing of the node, so it is not counted.
    Local(String),
}

/// One probe of `addr` (over TLS for a node that speaks it: the handshake and the
/// certificate's verification are part of the check).
pub async fn probe(
    addr: SocketAddr,
    authority: Option<&str>,
    spec: &HealthSpec,
    tls: Option<&crate::tls::NodeTls>,
    protocol: crate::topology::Protocol,
) -> Result<(), ProbeError> {
    let work = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| {
            if crate::proxy::error::is_local_resource_error(&e) {
                ProbeError::Local(format!("connect: {e}"))
            } else {
                ProbeError::Failed(format!("connect: {e}"))
            }
        })?;
        if spec.kind == CheckKind::Tcp {
            return Ok(());
        }
        let _ = stream.set_nodelay(true);
        let h2 = protocol.is_h2();
        let mut send = match tls {
            None => start(stream, h2).await?,
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| ProbeError::Failed(format!("TLS handshake: {e}")))?;
                start(stream, h2).await?
            }
        };
        let host = match (tls, authority) {
            (Some(t), _) => t.name().to_string(),
            (None, Some(a)) => a.to_string(),
            (None, None) => addr.to_string(),
        };
        if spec.kind == CheckKind::Grpc {
            return grpc_check(&mut send, &host, &spec.service).await;
        }
        let req = http::Request::get(spec.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "envgate-health")
            .body(Full::new(Bytes::new()))
            .map_err(|e| ProbeError::Failed(format!("request: {e}")))?;
        let mut req = req;
        if !h2 {
            // One check, one connection (HTTP/2 has no such field).
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ProbeError::Failed(format!("request: {e}")))?;
        let status = resp.status().as_u16();
        if (spec.expect.0..=spec.expect.1).contains(&status) {
            Ok(())
        } else {
            Err(ProbeError::Failed(format!(
                "status {status}, expected {}-{}",
                spec.expect.0, spec.expect.1
            )))
        }
    };
    match tokio::time::timeout(spec.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Failed(format!(
            "no answer within {:?}",
            spec.timeout
        ))),
    }
}

/// A small xorshift generator for jitter; quality does not matter here.
struct Jitter(u64);

impl Jitter {
    fn new(seed: &str) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(seed.as_bytes());
        Jitter(h.finish() | 1)
    }
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// `interval` moved by up to `percent` either way.
    fn around(&mut self, interval: Duration, percent: f64) -> Duration {
        let f = 1.0 + (self.unit() * 2.0 - 1.0) * percent / 100.0;
        interval.mul_f64(f.max(0.0))
    }
}

/// Probes in flight at once, over every node: a topology of 20,000 nodes would otherwise
/// open 20,000 connections at its first round and run out of file descriptors.
pub const MAX_CONCURRENT_PROBES: usize = 256;

/// Warns that checks were skipped for lack of local resources, at most once a second
/// for all nodes together (with how many were skipped), instead of once per node.
fn warn_local(name: &str, addr: SocketAddr, e: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SKIPPED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let skipped = SKIPPED.fetch_add(1, Ordering::Relaxed) + 1;
    let last = LAST.load(Ordering::Relaxed);
    if now > last
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        SKIPPED.store(0, Ordering::Relaxed);
        tracing::warn!(node = %name, address = %addr, error = %e, skipped, "health checks not run for lack of local resources; not counted against the nodes");
    }
}

/// `grpc.health.v1.Health/Check` for `service`: passes when the answer is `grpc-status: 0`
/// with the status SERVING.
async fn grpc_check(send: &mut Probe, host: &str, service: &str) -> Result<(), ProbeError> {
    // HealthCheckRequest { service = 1 } in a gRPC frame (not compressed, length-prefixed).
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() && service.len() < 128 {
        msg.push(0x0a);
        msg.push(service.len() as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::post("/grpc.health.v1.Health/Check")
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "envgate-health")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| ProbeError::Failed(format!("request: {e}")))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| ProbeError::Failed(format!("request: {e}")))?;
    if resp.status() != http::StatusCode::OK {
        return Err(ProbeError::Failed(format!("HTTP status {}", resp.status())));
    }
    // A trailers-only answer has its grpc-status in the head.
    let head_status = resp.headers().get("grpc-status").cloned();
    // An answer is a few bytes: a larger one is not a health service's.
    let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| ProbeError::Failed(format!("body: {e}")))?;
    let grpc_status = body
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head_status);
    match grpc_status.as_ref().map(|v| v.as_bytes()) {
        Some(b"0") => {}
        Some(code) => {
            return Err(ProbeError::Failed(format!(
                "grpc-status {}",
                String::from_utf8_lossy(code)
            )))
        }
        None => return Err(ProbeError::Failed("no grpc-status".into())),
    }
    // One uncompressed gRPC message: HealthCheckResponse { status = 1 }, SERVING being 1
    // (an empty message is UNKNOWN).
    let bytes = body.to_bytes();
    let status = match bytes.get(..5) {
        Some([0, l @ ..]) => {
            let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
            match bytes.get(5..5 + len) {
                Some([0x08, s, ..]) => *s,
                Some(_) => 0,
                None => return Err(ProbeError::Failed("a cut gRPC message".into())),
            }
        }
        Some(_) => return Err(ProbeError::Failed("a compressed gRPC message".into())),
        None => 0,
    };
    match status {
        1 => Ok(()),
        2 => Err(ProbeError::Failed("NOT_SERVING".into())),
        3 => Err(ProbeError::Failed("SERVICE_UNKNOWN".into())),
        _ => Err(ProbeError::Failed("status UNKNOWN".into())),
    }
}

/// One check's way to send its request: HTTP/1.1 or HTTP/2.
enum Probe {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Probe {
    async fn send_request(
        &mut self,
        req: http::Request<Full<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Probe::H1(s) => s.send_request(req).await,
            Probe::H2(s) => s.send_request(req).await,
        }
    }
}

/// HTTP/1.1 (or HTTP/2) over an open connection, for one check.
async fn start<S>(stream: S, h2: bool) -> Result<Probe, ProbeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .map_err(|e| ProbeError::Failed(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(conn);
        return Ok(Probe::H2(send));
    }
    let (send, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| ProbeError::Failed(format!("handshake: {e}")))?;
    tokio::spawn(conn);
    Ok(Probe::H1(send))
}

/// `authority`: the Host of an HTTP check in clear (the host name the node was resolved
/// from, else its address).
async fn check_loop(
    (name, addr, authority): (Arc<str>, SocketAddr, Option<Arc<str>>),
    tls: Option<Arc<crate::tls::NodeTls>>,
    protocol: crate::topology::Protocol,
    spec: HealthSpec,
    state: Arc<NodeState>,
    probes: Arc<tokio::sync::Semaphore>,
) {
    let mut jitter = Jitter::new(&name);
    let mut counter = Counter::default();
    // The first check runs at once (a new node serves only after its first pass); the
    // second lands at a random point of the interval, so that nodes added together do not
    // stay in step.
    let mut next = spec.interval.mul_f64(jitter.unit());
    loop {
        let probed = {
            // The semaphore is never closed, so acquiring only waits.
            let _slot = probes.acquire().await;
            probe(addr, authority.as_deref(), &spec, tls.as_deref(), protocol).await
        };
        let result = match probed {
            Err(ProbeError::Local(e)) => {
                warn_local(&name, addr, &e.to_string());
                tokio::time::sleep(next).await;
                next = jitter.around(spec.interval, spec.jitter);
                continue;
            }
            Err(ProbeError::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        let reason = match &result {
            Ok(()) => "check passed".to_string(),
            Err(e) => e.clone(),
        };
        // envgate_health_checks_total{node,result}; envgate_node_up{node} follows the
        // node's health, read at scrape time.
        state.checked(result.is_ok(), reason.clone());
        if let Some((from, to)) = counter.observe(&state, result.is_ok(), &spec) {
            tracing::info!(node = %name, address = %addr, from = ?from, to = ?to, reason = %reason, "node health changed");
        }
        tokio::time::sleep(next).await;
        next = jitter.around(spec.interval, spec.jitter);
    }
}

/// Keeps one checker per node of the live topology, until `shutdown`. Once every node of
/// the first topology has a verdict (or its first check timed out), `ready` turns true.
pub async fn supervise(
    shared: Arc<Shared>,
    mut changed: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
    ready: watch::Sender<bool>,
) {
    // Keyed by node identity; a checker is kept only while it updates the very state the
    // live topology reads (a node removed and added back between two looks gets a new
    // state, hence a new checker).
    #[allow(clippy::type_complexity)]
    let mut running: HashMap<
        (Arc<str>, SocketAddr),
        (
            HealthSpec,
            Arc<NodeState>,
            Option<Arc<crate::tls::NodeTls>>,
            crate::topology::Protocol,
            JoinHandle<()>,
        ),
    > = HashMap::default();
    let mut first = true;
    let probes = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_PROBES));
    loop {
        let topo = shared.topology.load_full();
        // Linear in the number of nodes: a topology of 20,000 is reconciled in milliseconds.
        let mut keep = rustc_hash::FxHashSet::default();
        keep.reserve(topo.nodes.len());
        for node in &topo.nodes {
            let key = (node.name.clone(), node.addr);
            keep.insert(key.clone());
            if let Some((spec, state, tls, protocol, _)) = running.get(&key) {
                if *spec == node.health
                    && Arc::ptr_eq(state, &node.state)
                    && *tls == node.tls
                    && *protocol == node.protocol
                {
                    continue;
                }
            }
            let task = tokio::spawn(check_loop(
                (node.name.clone(), node.addr, node.dns.clone()),
                node.tls.clone(),
                node.protocol,
                node.health.clone(),
                node.state.clone(),
                probes.clone(),
            ));
            if let Some((_, _, _, _, old)) = running.insert(
                key,
                (
                    node.health.clone(),
                    node.state.clone(),
                    node.tls.clone(),
                    node.protocol,
                    task,
                ),
            ) {
                old.abort();
            }
        }
        running.retain(|k, (_, _, _, _, task)| {
            let stay = keep.contains(k);
            if !stay {
                task.abort();
            }
            stay
        });
        if first {
            first = false;
            let bound = topo
                .nodes
                .iter()
                .map(|n| n.health.timeout)
                .max()
                .unwrap_or_default();
            let deadline = tokio::time::Instant::now() + bound + Duration::from_millis(50);
            // Control plane, once at start: a short poll is simpler than a notification.
            while tokio::time::Instant::now() < deadline
                && topo
                    .nodes
                    .iter()
                    .any(|n| n.state.health() == Health::Unknown)
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let _ = ready.send(true);
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
    for (_, (_, _, _, _, task)) in running {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rise: u32, fall: u32, trust_unknown: bool) -> HealthSpec {
        HealthSpec {
            rise,
            fall,
            trust_unknown,
            ..HealthSpec::default()
        }
    }

    #[test]
    fn unknown_comes_up_on_first_pass() {
        let s = NodeState::new(false);
        let mut c = Counter::default();
        assert!(!s.usable());
        assert_eq!(
            c.observe(&s, true, &spec(2, 3, false)),
            Some((Health::Unknown, Health::Up))
        );
        assert!(s.usable());
    }

    #[test]
    fn fall_then_rise() {
        let s = NodeState::new(false);
        let sp = spec(2, 3, false);
        let mut c = Counter::default();
        c.observe(&s, true, &sp);
        assert_eq!(c.observe(&s, false, &sp), None);
        assert_eq!(c.observe(&s, false, &sp), None);
        assert_eq!(c.observe(&s, false, &sp), Some((Health::Up, Health::Down)));
        assert!(!s.usable());
        assert_eq!(c.observe(&s, true, &sp), None);
        assert_eq!(c.observe(&s, true, &sp), Some((Health::Down, Health::Up)));
    }

    #[test]
    fn trusted_unknown_needs_fall_failures() {
        let s = NodeState::new(true);
        let sp = spec(2, 2, true);
        let mut c = Counter::default();
        assert!(s.usable());
        assert_eq!(c.observe(&s, false, &sp), None);
        assert_eq!(
            c.observe(&s, false, &sp),
            Some((Health::Unknown, Health::Down))
        );
    }
}
