//! The validated, immutable topology and its compiled lookup tables.
//!
//! A `Topology` is built once by `config::validate` (off the hot path), then published
//! whole through an `ArcSwap`; requests read it and never write it. Indices (`NodeId`,
//! `EnvId`, `PoolId`) are positions in this snapshot's vectors and mean nothing across
//! snapshots. The only shared mutable state reachable from here is per-node health
//! (`NodeState`, owned by the `NodeRegistry` and carried across reloads by node identity)
//! and the per-environment in-flight counter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderName;
use indexmap::IndexMap;

use crate::health::NodeState;
use crate::routing::host::EntryTable;

pub type NodeId = usize;
pub type EnvId = usize;
pub type PoolId = usize;

#[derive(Debug)]
pub struct Topology {
    /// Bumped by every apply; 0 until the first apply.
    pub generation: u64,
    /// Directory that relative paths in the document are resolved against.
    pub base_dir: PathBuf,
    pub listeners: Vec<ListenerSpec>,
    pub control: Option<ControlSpec>,
    pub defaults: Defaults,
    pub nodes: Vec<Node>,
    pub environments: Vec<Arc<Environment>>,
    pub pools: Vec<Pool>,
    pub entries: EntryTable,
    /// Environments by name, for carrying per-environment state across topologies.
    pub env_index: rustc_hash::FxHashMap<Arc<str>, EnvId>,
    /// Counter slots of all applications (see `Application::slot`).
    pub slots: usize,
    pub access_log: AccessLogSpec,
    /// Things worth an operator's look that do not refuse the topology (logged when it is
    /// applied, printed by `envgate check`).
    pub warnings: Vec<String>,
    /// Files read at validation besides the document (certificates, keys, CA files): a
    /// change of one reloads the topology.
    pub files: Vec<PathBuf>,
    /// The nodes addressed by a host name, with the answer their members come from.
    pub dns: Vec<crate::dns::DnsNode>,
}

/// Which exchanges the access log writes (where and in which format is the command
/// line's business).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessLogSpec {
    pub enabled: bool,
    /// Percent of 2xx answers written (others are always written).
    pub sample_2xx: f64,
}

impl Default for AccessLogSpec {
    fn default() -> Self {
        AccessLogSpec {
            enabled: true,
            sample_2xx: 100.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub name: String,
    pub bind: SocketAddr,
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Clone)]
pub struct TlsSpec {
    /// Certificate and key files, as resolved.
    pub certificates: Vec<(PathBuf, PathBuf)>,
    pub unknown_sni: crate::tls::UnknownName,
    pub http2: bool,
    pub session_resumption: bool,
    /// Built at validation from the files' contents.
    pub server: Arc<crate::tls::ServerTls>,
}

#[derive(Debug, Clone)]
pub struct ControlSpec {
    pub bind: SocketAddr,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub health: HealthSpec,
    pub timeouts: Timeouts,
    pub retries: u32,
    pub retry_budget: RetryBudget,
    pub passive: Passive,
    pub max_in_flight: usize,
    /// Largest request body, in bytes, for environments that set none (`None`: no limit).
    pub max_request_body: Option<u64>,
    pub trusted_proxies: Vec<Cidr>,
    /// Whether a percent-encoded `/` (`%2F`) may appear in a path (passed on encoded);
    /// by default such a request gets 400.
    pub allow_encoded_slash: bool,
    /// How node addresses given as host names are resolved.
    pub dns: crate::dns::Spec,
}

/// How many retries an environment may make (DESIGN.md: a budget of 20%): each request
/// earns `percent`/100 of a retry, each retry spends one. The balance starts at
/// `min_retries` and holds at most what the last 1,000 requests earned (or
/// `min_retries`, if more), so a healthy past does not pay for an unbounded storm. When
/// every request fails, retries add at most `percent` to the load on the nodes. Each worker
/// keeps its own balance (no shared counter on the hot path).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_retries: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20.0,
            min_retries: 10,
        }
    }
}

impl RetryBudget {
    /// Requests whose earnings the balance can hold.
    pub const WINDOW: f64 = 1000.0;

    pub fn cap(&self) -> f64 {
        (self.percent / 100.0 * Self::WINDOW).max(self.min_retries as f64)
    }
}

/// Passive detection (DESIGN.md: 5 consecutive failures, 30 s doubling to 300 s, at most
/// half the nodes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Passive {
    /// Consecutive failures on live traffic that eject a node; 0 turns ejection off.
    pub consecutive_failures: u32,
    pub ejection: Duration,
    pub max_ejection: Duration,
    /// Most nodes of one pool ejected at once, in percent.
    pub max_ejected_percent: u32,
}

impl Default for Passive {
    fn default() -> Self {
        Passive {
            consecutive_failures: 5,
            ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Http,
    Tcp,
    /// `grpc.health.v1.Health/Check` (nodes spoken to over HTTP/2).
    Grpc,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthSpec {
    pub kind: CheckKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Inclusive range of statuses that pass.
    pub expect: (u16, u16),
    /// Percent of the interval.
    pub jitter: f64,
    pub trust_unknown: bool,
    /// The service a gRPC check asks about (`""`: the server as a whole).
    pub service: String,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            kind: CheckKind::Http,
            path: "/healthz".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            expect: (200, 399),
            jitter: 10.0,
            trust_unknown: false,
            service: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub response_header: Duration,
    /// Client keep-alive idle time.
    pub idle: Duration,
    /// Time a client has to send a whole request head.
    pub client_header: Duration,
    /// How long an idle pooled upstream connection may be reused.
    pub upstream_idle: Duration,
    /// Bound on the graceful drain at shutdown.
    pub drain: Duration,
    /// Longest wait for progress of a body in either direction: a client that stalls its
    /// upload gets 408; a node that stalls its response is cut and counted against.
    pub body_idle: Duration,
    /// Overall deadline of one request across every attempt (connects, retries and the
    /// waits for a response head); the time spent uploading the request body is not
    /// counted.
    pub request: Duration,
    /// Longest a tunnel (`Upgrade`, `CONNECT`) may stay without a byte either way.
    pub tunnel_idle: Duration,
    /// Longest a request waits for room at a node at its `max_connections` (then 503
    /// `node_busy`).
    pub queue: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            response_header: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            client_header: Duration::from_secs(10),
            upstream_idle: Duration::from_secs(4),
            drain: Duration::from_secs(30),
            body_idle: Duration::from_secs(60),
            request: Duration::from_secs(60),
            tunnel_idle: Duration::from_secs(3600),
            queue: Duration::from_secs(3),
        }
    }
}

/// An IPv4 or IPv6 network, for `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
pub struct Node {
    /// Unique in the topology: the node's name in the document, or for a member of a node
    /// addressed by a host name, `NAME@ADDRESS` (`dns::member_name`).
    pub name: Arc<str>,
    /// The node's name in the document (what environments and applications name).
    pub defined: Arc<str>,
    pub addr: SocketAddr,
    /// The address as written when it is a host name (`orders.internal:8000`): this node is
    /// one of the addresses it resolved to.
    pub dns: Option<Arc<str>>,
    pub weight: u32,
    pub backup: bool,
    pub zone: Option<String>,
    pub labels: IndexMap<String, String>,
    pub max_connections: Option<u32>,
    pub health: HealthSpec,
    /// Drained by the document (`drain: true`): set on the live state when applied.
    pub drain: bool,
    /// Health and drain, shared with the checker and carried across reloads.
    pub state: Arc<NodeState>,
    /// Spoken to over TLS (`None`: cleartext).
    pub tls: Option<Arc<crate::tls::NodeTls>>,
    /// HTTP/1.1, or HTTP/2 (in clear with prior knowledge, or over TLS by ALPN).
    pub protocol: Protocol,
    /// HTTP/2: most streams one connection carries before another is opened (the node's
    /// own SETTINGS_MAX_CONCURRENT_STREAMS, when lower, bounds each connection too).
    pub max_streams: u32,
}

/// How envgate speaks to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2 in clear, with prior knowledge.
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
}

impl Protocol {
    pub fn is_h2(self) -> bool {
        self != Protocol::Http1
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::H2 => "h2",
        }
    }
}

#[derive(Debug)]
pub struct Environment {
    pub name: Arc<str>,
    pub labels: IndexMap<String, String>,
    /// Entry addresses as written (normalised), for status and explain.
    pub entries: Vec<String>,
    /// Applications, longest prefix first.
    pub apps: Vec<Application>,
    pub canary: Option<Canary>,
    pub tenants: Option<Tenants>,
    pub retries: u32,
    /// Percent of usable primaries below which the pick ignores health (0: off).
    pub panic_threshold: f64,
    pub max_in_flight: usize,
    /// Largest request body in bytes (`None`: no limit); 413 beyond.
    pub max_request_body: Option<u64>,
    /// Protocols a client may switch to with `Upgrade` (lowercase; default `websocket`);
    /// any other `Upgrade` is removed and the request forwarded as a plain one.
    pub upgrades: Vec<String>,
    /// Whether `CONNECT` is tunnelled to a node (otherwise 405).
    pub allow_connect: bool,
    /// Requests of this environment now being served (all workers). Shared with the
    /// environment of the same name in the previous topology, so a reload does not reset
    /// the count (bound when the topology is applied).
    pub in_flight: Arc<AtomicUsize>,
    /// Retries (attempts after the first) of this environment's requests, all workers;
    /// carried over like `in_flight`. Written only when a retry happens.
    pub retried: Arc<std::sync::atomic::AtomicU64>,
    /// The JSON bodies of envgate's own answers for this environment, built at the first
    /// answer (a cold path) and then shared, so the hot path formats nothing and a
    /// topology of many environments is not slowed down building bodies it may never send.
    pub bodies: std::sync::OnceLock<EnvBodies>,
}

#[derive(Debug)]
pub struct EnvBodies {
    pub no_healthy_node: Bytes,
    pub over_limit: Bytes,
    pub bad_gateway: Bytes,
    pub gateway_timeout: Bytes,
    pub no_capacity: Bytes,
    pub node_busy: Bytes,
}

impl EnvBodies {
    pub fn new(env: &str) -> Self {
        let env = serde_json::to_string(env).expect("a string always serialises");
        let body =
            |error: &str| Bytes::from(format!(r#"{{"error":"{error}","environment":{env}}}"#));
        EnvBodies {
            no_healthy_node: body("no_healthy_node"),
            over_limit: body("over_limit"),
            bad_gateway: body("bad_gateway"),
            gateway_timeout: body("gateway_timeout"),
            no_capacity: body("no_capacity"),
            node_busy: body("node_busy"),
        }
    }
}

impl Environment {
    /// The bodies of envgate's own answers for this environment.
    #[inline]
    pub fn bodies(&self) -> &EnvBodies {
        self.bodies.get_or_init(|| EnvBodies::new(&self.name))
    }

    /// The application owning `path`: the longest prefix that matches on a segment
    /// boundary (`/api` matches `/api` and `/api/x`, not `/apix`).
    #[inline]
    pub fn app_for(&self, path: &str) -> Option<&Application> {
        self.apps.iter().find(|a| prefix_matches(&a.prefix, path))
    }

    /// Takes one in-flight slot, or `None` when the environment is at its limit.
    #[inline]
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlight> {
        // Relaxed: the counter guards a capacity, not other memory.
        let prev = self.in_flight.fetch_add(1, Ordering::Relaxed);
        if prev >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight(self.clone()))
    }
}

/// One in-flight slot of an environment, given back on drop (when the response body ends
/// or is abandoned).
#[derive(Debug)]
pub struct InFlight(Arc<Environment>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[inline]
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let p = prefix.trim_end_matches('/');
    path.starts_with(p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
}

#[derive(Debug)]
pub struct Application {
    /// Empty for the implicit application of an environment that lists none.
    pub name: String,
    pub version: String,
    pub prefix: String,
    pub pool: PoolId,
    /// Where reads (GET, HEAD, OPTIONS) go first, when the application has `read_nodes`;
    /// `pool` takes them when no read node can.
    pub read_pool: Option<PoolId>,
    /// The first of this application's counter slots (`metrics::tally`): one per member
    /// of `pool`, then one per member of `read_pool`, so the node a request went to
    /// names its counters without a lookup.
    pub slot: usize,
}

/// The candidate nodes of one application in one environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub members: Arc<[Member]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Member {
    pub node: NodeId,
    pub weight: u32,
    pub backup: bool,
}

/// A canary split (DESIGN.md "Canary"): requests whose bucket (0..9999) is below
/// `threshold` go to `environment`. The bucket is sticky: read from the canary cookie, or
/// derived from a stable request key, else drawn at random (and then kept in the cookie).
#[derive(Debug, Clone)]
pub struct Canary {
    pub environment: EnvId,
    /// The weight in hundredths of a percent (0..=10,000): `weight: 0.5` is 50.
    pub threshold: u16,
    /// Header whose value `always` or `never` (any case) overrides the split.
    pub header: Option<HeaderName>,
    /// Cookie that holds the bucket (not the arm, so it stays valid when the weight moves).
    pub cookie: Option<Box<str>>,
    /// Stable key the bucket is derived from when the request has no valid cookie.
    pub hash: Option<CanaryHash>,
    /// The hash state after the owning environment's name: every instance with the same
    /// topology derives the same bucket from the same key, and two environments' canaries
    /// do not pick the same users first.
    pub salt: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CanaryHash {
    Header(HeaderName),
    Cookie(Box<str>),
    /// The client's address (behind a trusted proxy, the address that proxy saw).
    ClientAddress,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TenantKey {
    Header(HeaderName),
    /// Label N of the host, counted from 0 at the left (`t42.company.com`: label 0).
    HostLabel(u32),
    /// Segment N of the path, counted from 1 (`/tenants/42`: segment 2).
    PathSegment(u32),
    Query(Box<str>),
}

#[derive(Debug, Clone)]
pub struct Tenants {
    pub key: TenantKey,
    /// Whether a missing or malformed id is refused (400) rather than left in place.
    pub required: bool,
    /// Sorted by `from`, never overlapping, searched by binary search.
    pub ranges: Box<[TenantRange]>,
}

/// Tenants `from..=to` belong to `environment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantRange {
    pub from: u64,
    pub to: u64,
    pub environment: EnvId,
}

impl Tenants {
    /// The range holding `id`, in O(log n).
    #[inline]
    pub fn range_of(&self, id: u64) -> Option<&TenantRange> {
        let i = self.ranges.partition_point(|r| r.to < id);
        self.ranges.get(i).filter(|r| r.from <= id)
    }
}

impl Topology {
    /// Fingerprints of the certificates the TLS listeners serve.
    pub fn served_certificates(&self) -> rustc_hash::FxHashSet<u64> {
        self.listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|t| t.server.certs.list.iter().map(|c| c.fingerprint))
            .collect()
    }

    pub fn env_by_name(&self, name: &str) -> Option<EnvId> {
        self.env_index.get(name).copied()
    }
}
