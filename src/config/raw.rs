//! serde mirror of the topology YAML (DESIGN.md, "Topology file").
//!
//! No logic lives here: every field is as the operator wrote it. Unknown keys are not refused
//! by serde here: `config::parse` reads the document through `serde_ignored`, which reports
//! each ignored key with its path, so a typo becomes one validation error among the others
//! instead of hiding them. The one exception is `RawEnvNode`, which sits inside an untagged
//! enum: serde buffers such content before trying each variant, out of `serde_ignored`'s
//! sight, so it keeps `deny_unknown_fields`. `validate.rs` turns these into the checked
//! `Topology`; nothing outside `config/` sees a `RawX`.

use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};

/// The whole document.
#[derive(Debug, Deserialize)]
pub struct RawTopology {
    pub version: u32,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    pub control: Option<RawControl>,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub nodes: IndexMap<String, RawNode>,
    #[serde(default)]
    pub environments: IndexMap<String, RawEnvironment>,
    pub access_log: Option<RawAccessLog>,
}

/// `access_log: { enabled: true, sample_2xx: 100 }`
#[derive(Debug, Deserialize)]
pub struct RawAccessLog {
    pub enabled: Option<bool>,
    /// Percent of 2xx answers written.
    pub sample_2xx: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub struct RawListener {
    pub name: String,
    pub bind: String,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
pub struct RawTls {
    pub certificates: Vec<RawCertificate>,
    /// `default` (the first certificate) or `refuse`: a client naming a host no
    /// certificate covers.
    pub unknown_sni: Option<String>,
    /// Whether HTTP/2 is offered by ALPN (default true).
    pub http2: Option<bool>,
    /// Whether clients may resume sessions (tickets, session ids; default true).
    pub session_resumption: Option<bool>,
}

/// `tls: { server_name: orders.internal, ca: certs/internal-ca.pem }` on a node; `tls: {}`
/// verifies against the system's roots for the address's host.
#[derive(Debug, Default, Deserialize)]
pub struct RawNodeTls {
    pub server_name: Option<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
pub struct RawControl {
    pub bind: String,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawDefaults {
    pub health: Option<RawHealth>,
    pub timeouts: Option<RawTimeouts>,
    pub retries: Option<u32>,
    pub retry_budget: Option<RawRetryBudget>,
    pub passive: Option<RawPassive>,
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Whether a percent-encoded `/` may appear in a request path.
    pub allow_encoded_slash: Option<bool>,
    /// How node addresses given as host names are resolved.
    pub dns: Option<RawDns>,
}

/// `defaults.dns`.
#[derive(Debug, Default, Deserialize)]
pub struct RawDns {
    pub interval: Option<String>,
    pub hold: Option<String>,
    pub timeout: Option<String>,
    /// A hosts-format file answered from before the system resolver.
    pub hosts: Option<String>,
}

/// Retries allowed at once per environment: `percent` of its requests in flight, and at
/// least `min_retries`.
#[derive(Debug, Default, Deserialize)]
pub struct RawRetryBudget {
    pub percent: Option<f64>,
    pub min_retries: Option<u32>,
}

/// Passive detection: ejection of a node after consecutive failures on live traffic.
#[derive(Debug, Default, Deserialize)]
pub struct RawPassive {
    pub consecutive_failures: Option<u32>,
    pub ejection: Option<String>,
    pub max_ejection: Option<String>,
    pub max_ejected_percent: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RawHealth {
    /// `http` (default), `tcp` or `grpc`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub expect: Option<String>,
    /// Share of the interval, in percent, by which each check is moved at random.
    pub jitter: Option<f64>,
    /// Whether a node that has not been checked yet takes traffic.
    pub trust_unknown: Option<bool>,
    /// `type: grpc`: the service asked about (default: the whole server).
    pub service: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawTimeouts {
    pub connect: Option<String>,
    pub response_header: Option<String>,
    pub idle: Option<String>,
    pub client_header: Option<String>,
    pub upstream_idle: Option<String>,
    pub drain: Option<String>,
    pub body_idle: Option<String>,
    pub request: Option<String>,
    pub tunnel_idle: Option<String>,
    pub queue: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLimits {
    pub max_in_flight: Option<u64>,
    /// A size as written: `10MiB`, `64KiB` or a plain number of bytes.
    #[serde(default, deserialize_with = "opt_scalar_string")]
    pub max_request_body: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawNode {
    pub address: String,
    pub weight: Option<i64>,
    pub backup: Option<bool>,
    pub zone: Option<String>,
    #[serde(default)]
    pub labels: IndexMap<String, String>,
    pub max_connections: Option<u32>,
    pub health: Option<RawHealth>,
    /// Whether the node is drained: no new requests, those in flight finish.
    pub drain: Option<bool>,
    /// Spoken to over TLS.
    pub tls: Option<RawNodeTls>,
    /// `http1` (default), `h2c` or `h2`.
    pub protocol: Option<String>,
    /// HTTP/2: streams one connection carries before another is opened (default 100).
    pub max_streams: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct RawEnvironment {
    #[serde(default)]
    pub labels: IndexMap<String, String>,
    #[serde(default)]
    pub entries: Vec<String>,
    #[serde(default)]
    pub nodes: RawEnvNodes,
    #[serde(default)]
    pub apps: Vec<RawApp>,
    pub canary: Option<RawCanary>,
    pub tenants: Option<RawTenants>,
    pub limits: Option<RawLimits>,
    pub retries: Option<u32>,
    /// Below this percent of usable primary nodes, spread over all of them (0: off).
    pub panic_threshold: Option<f64>,
    /// Protocols a client may switch to with `Upgrade`.
    pub upgrades: Option<Vec<String>>,
    /// Whether `CONNECT` is tunnelled.
    pub allow_connect: Option<bool>,
}

/// `nodes: [a, b]` or `nodes: { a: { weight: 5 }, b: }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawEnvNodes {
    List(Vec<String>),
    Map(IndexMap<String, Option<RawEnvNode>>),
}

impl Default for RawEnvNodes {
    fn default() -> Self {
        RawEnvNodes::List(Vec::new())
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvNode {
    pub weight: Option<i64>,
    pub backup: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawApp {
    pub name: String,
    #[serde(deserialize_with = "scalar_string")]
    pub version: String,
    pub path: Option<String>,
    pub nodes: Option<Vec<String>>,
    /// Nodes that take the application's reads (GET, HEAD, OPTIONS) first.
    pub read_nodes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct RawCanary {
    pub environment: String,
    /// Percent, up to two decimals.
    pub weight: f64,
    pub header: Option<String>,
    pub cookie: Option<String>,
    /// Stable key hashed into the bucket when the request carries no valid cookie.
    pub hash: Option<RawCanaryHash>,
}

/// Exactly one of the three.
#[derive(Debug, Deserialize)]
pub struct RawCanaryHash {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub client_address: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawTenants {
    pub key: RawTenantKey,
    #[serde(default)]
    pub required: bool,
    pub ranges: Vec<RawTenantRange>,
}

#[derive(Debug, Deserialize)]
pub struct RawTenantKey {
    pub header: Option<String>,
    pub host_label: Option<u32>,
    pub path_segment: Option<u32>,
    pub query: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawTenantRange {
    pub from: u64,
    pub to: u64,
    pub environment: String,
}

/// Accepts `1.2.0`, `"1.2.0"`, `3` or `1.5` as a string: versions are labels, not numbers.
fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match serde_norway::Value::deserialize(d)? {
        serde_norway::Value::String(s) => Ok(s),
        serde_norway::Value::Number(n) => Ok(n.to_string()),
        other => Err(D::Error::custom(format!(
            "expected a version string, found {other:?}"
        ))),
    }
}

/// Accepts `10MiB` or `1048576` as a string (sizes are read by `validate.rs`); `null` or
/// nothing is `None`.
fn opt_scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match serde_norway::Value::deserialize(d)? {
        serde_norway::Value::Null => Ok(None),
        serde_norway::Value::String(s) => Ok(Some(s)),
        serde_norway::Value::Number(n) => Ok(Some(n.to_string())),
        other => Err(D::Error::custom(format!(
            "expected a size such as 10MiB or a number of bytes, found {other:?}"
        ))),
    }
}
