//! `RawTopology` -> `Topology`, or every problem found.
//!
//! Each rule of DESIGN.md's conflict table is checked here; a conflict names both parties
//! and each error carries the YAML path it concerns. Validation never stops at the first
//! problem: the operator gets the whole list in one go. Compiling the lookup tables
//! (entries, pools) happens in the same pass, so a topology that validates is ready to
//! serve.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::raw::*;
use super::{parse_duration, parse_size, ConfigError, ErrorKind};
use crate::health::NodeState;
use crate::routing::host::{Entry, EntryTable};
use crate::topology::*;

/// Highest weight a node may have (weights are relative; this keeps sums small).
pub const MAX_WEIGHT: i64 = 1000;
/// Highest number of retries an environment may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest duration a document may hold (30d): far beyond any sensible timeout or interval,
/// and far below what would overflow a timer's deadline (`Instant + Duration`).
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// Protocols an environment lets clients switch to when it names none.
pub const DEFAULT_UPGRADES: &[&str] = &["websocket"];

/// Problems found (`.0`), warnings (`.1`), the files read besides the document (`.2`), and
/// the fingerprints of the certificates the running instance serves (`.3`: one of them that
/// has expired since is a warning, not a refusal).
#[derive(Default)]
struct Errors(
    Vec<ConfigError>,
    Vec<String>,
    Vec<PathBuf>,
    rustc_hash::FxHashSet<u64>,
);

impl Errors {
    fn push(&mut self, path: impl Into<String>, kind: ErrorKind, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            kind,
            message: message.into(),
        });
    }
    fn value(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(path, ErrorKind::Value, message)
    }
    fn conflict(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(path, ErrorKind::Conflict, message)
    }
    fn reference(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(path, ErrorKind::Reference, message)
    }
}

pub fn validate(
    raw: RawTopology,
    base_dir: &Path,
    served: &rustc_hash::FxHashSet<u64>,
    dns: &crate::dns::Cache,
) -> Result<Topology, Vec<ConfigError>> {
    let mut errs = Errors {
        3: served.clone(),
        ..Errors::default()
    };
    if raw.version != 1 {
        errs.value(
            "version",
            format!("version {} is not supported (expected 1)", raw.version),
        );
    }

    let listeners = listeners(&raw.listeners, base_dir, &mut errs);
    let control = raw
        .control
        .as_ref()
        .and_then(|c| control(c, base_dir, &mut errs));
    let mut defaults = defaults(&raw.defaults, &mut errs);
    if let Some(d) = &raw.defaults.dns {
        defaults.dns = dns_spec(d, base_dir, &mut errs);
    }
    let (nodes, node_ids, dns_nodes) = nodes(&raw, &defaults, base_dir, dns, &mut errs);

    let env_ids: HashMap<&str, EnvId> = raw
        .environments
        .keys()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let listener_ports: Vec<u16> = listeners.iter().map(|l| l.bind.port()).collect();

    let mut entries = EntryTable::default();
    let mut environments = Vec::new();
    let mut pools = Pools::default();
    let mut slots = 0;

    for (env_id, (name, env)) in raw.environments.iter().enumerate() {
        let at = format!("environments.{name}");
        if !valid_name(name) {
            errs.value(
                &at,
                format!("environment name {name:?} must be letters, digits, '-', '_' or '.'"),
            );
        }

        // Entry addresses. Error paths are formatted only when there is an error.
        let mut env_entries = Vec::with_capacity(env.entries.len());
        for (i, e) in env.entries.iter().enumerate() {
            let path = || format!("{at}.entries[{i}]");
            let entry = match Entry::parse(e) {
                Ok(entry) => entry,
                Err(msg) => {
                    errs.value(path(), msg);
                    continue;
                }
            };
            if !listener_ports.contains(&entry.port) {
                errs.reference(
                    path(),
                    format!(
                        "entry \"{entry}\" needs a listener on port {}, and none binds it (listener ports: {})",
                        entry.port,
                        join(listener_ports.iter())
                    ),
                );
            }
            if let Err(other) = entries.insert(&entry, env_id) {
                // The holder's own path: found again in its document (a rare, error path).
                let (other_name, other_env) = raw
                    .environments
                    .get_index(other)
                    .expect("entry holders are environments of this document");
                let j = other_env
                    .entries
                    .iter()
                    .position(|x| Entry::parse(x).is_ok_and(|x| x == entry))
                    .unwrap_or(0);
                let other_path = format!("environments.{other_name}.entries[{j}]");
                if other == env_id {
                    errs.conflict(path(), format!("entry \"{entry}\" is listed twice in environment {name:?} (also at {other_path})"));
                } else {
                    errs.conflict(
                        path(),
                        format!("entry \"{entry}\" is claimed by environments {other_name:?} ({other_path}) and {name:?}"),
                    );
                }
            }
            // An entry on a TLS listener that no certificate covers: clients verifying the
            // certificate refuse it, and envgate answers such a Host with 421.
            if let crate::routing::host::EntryHost::Exact(h) = &entry.host {
                for l in listeners.iter().filter(|l| l.bind.port() == entry.port) {
                    if let Some(t) = &l.tls {
                        if !t
                            .server
                            .certs
                            .list
                            .iter()
                            .any(|c| c.names.covers(h.as_bytes()))
                        {
                            errs.1.push(format!(
                                "entry \"{entry}\" of environment {name:?}: no certificate of listener {:?} covers {h}",
                                l.name
                            ));
                        }
                    }
                }
            }
            env_entries.push(entry.to_string());
        }

        // Nodes of the environment, with their per-environment weight and backup flag.
        let members = env_members(&at, env, &nodes, &node_ids, &mut errs);

        // Applications.
        let mut apps = Vec::new();
        // Maps only for long lists; a short one is scanned.
        let long = env.apps.len() > 16;
        let mut by_name: HashMap<&str, usize> = HashMap::default();
        let mut by_prefix: HashMap<&str, usize> = HashMap::default();
        for (i, app) in env.apps.iter().enumerate() {
            // Formatted only when there is an error to report.
            let path = || format!("{at}.apps[{i}]");
            if app.name.trim().is_empty() {
                errs.value(format!("{}.name", path()), "an application needs a name");
            }
            if app.version.trim().is_empty() {
                errs.value(
                    format!("{}.version", path()),
                    format!("application {:?} needs a version", app.name),
                );
            }
            let twice = if long {
                by_name.insert(&app.name, i)
            } else {
                env.apps[..i].iter().rposition(|a| a.name == app.name)
            };
            if let Some(j) = twice {
                errs.conflict(
                    path(),
                    format!(
                        "application {:?} appears twice in environment {name:?}: version {:?} ({at}.apps[{j}]) and version {:?}; an environment runs one version of each application",
                        app.name, env.apps[j].version, app.version
                    ),
                );
            }
            let prefix = app_prefix(app);
            if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
                errs.value(
                    format!("{}.path", path()),
                    format!(
                        "path prefix {prefix:?} must start with '/' and hold no '?', '#' or space"
                    ),
                );
            }
            let twice = if long {
                by_prefix.insert(prefix, i)
            } else {
                env.apps[..i].iter().rposition(|a| app_prefix(a) == prefix)
            };
            if let Some(j) = twice {
                let other = &env.apps[j].name;
                errs.conflict(
                    format!("{}.path", path()),
                    format!(
                        "applications {other:?} ({at}.apps[{j}]) and {:?} both claim path prefix {prefix:?} in environment {name:?}",
                        app.name
                    ),
                );
            }
            let pool = match &app.nodes {
                None => pools.intern(&members),
                Some(list) => {
                    if list.is_empty() {
                        errs.value(format!("{}.nodes", path()), format!("application {:?} lists no nodes (leave `nodes` out to use all of the environment's)", app.name));
                    }
                    let mut sub = Vec::new();
                    for (k, n) in list.iter().enumerate() {
                        if env_has_node(env, n) {
                            sub.extend(members.iter().filter(|m| &*nodes[m.node].defined == n));
                        } else {
                            errs.reference(
                                format!("{}.nodes[{k}]", path()),
                                format!("application {:?} uses node {n:?}, which is not one of environment {name:?}'s nodes", app.name),
                            );
                        }
                    }
                    pools.intern(&sub)
                }
            };
            let read_pool = app.read_nodes.as_ref().map(|list| {
                if list.is_empty() {
                    errs.value(
                        format!("{}.read_nodes", path()),
                        format!("application {:?} lists no read nodes (leave `read_nodes` out to send reads to its nodes)", app.name),
                    );
                }
                let mut sub: Vec<Member> = Vec::new();
                for (k, n) in list.iter().enumerate() {
                    if !env_has_node(env, n) {
                        errs.reference(
                            format!("{}.read_nodes[{k}]", path()),
                            format!("application {:?} reads from node {n:?}, which is not one of environment {name:?}'s nodes", app.name),
                        );
                    } else if list[..k].contains(n) {
                        errs.conflict(
                            format!("{}.read_nodes[{k}]", path()),
                            format!("node {n:?} is listed twice"),
                        );
                    } else {
                        sub.extend(members.iter().filter(|m| &*nodes[m.node].defined == n));
                    }
                }
                pools.intern(&sub)
            });
            apps.push(Application {
                name: app.name.clone(),
                version: app.version.clone(),
                prefix: prefix.to_string(),
                pool,
                read_pool,
                slot: 0,
            });
        }
        if env.apps.is_empty() {
            apps.push(Application {
                name: String::new(),
                version: String::new(),
                prefix: "/".into(),
                pool: pools.intern(&members),
                read_pool: None,
                slot: 0,
            });
        }
        apps.sort_by_key(|a| std::cmp::Reverse(a.prefix.len()));
        for a in &mut apps {
            a.slot = slots;
            slots += pools.list[a.pool].members.len()
                + a.read_pool.map_or(0, |r| pools.list[r].members.len());
        }

        let canary = env
            .canary
            .as_ref()
            .and_then(|c| canary(&at, name, c, &env_ids, &mut errs));
        let tenants = env
            .tenants
            .as_ref()
            .and_then(|t| tenants(&at, t, &env_ids, &mut errs));

        let retries = match env.retries {
            Some(r) if r > MAX_RETRIES => {
                errs.value(
                    format!("{at}.retries"),
                    format!("retries {r} is above the maximum of {MAX_RETRIES}"),
                );
                r
            }
            Some(r) => r,
            None => defaults.retries,
        };
        let max_in_flight = env
            .limits
            .as_ref()
            .and_then(|l| max_in_flight(&format!("{at}.limits"), l, &mut errs))
            .unwrap_or(defaults.max_in_flight);
        let max_request_body = env
            .limits
            .as_ref()
            .and_then(|l| max_request_body(&format!("{at}.limits"), l, &mut errs))
            .or(defaults.max_request_body);
        let upgrades = upgrades(&at, env.upgrades.as_deref(), &mut errs);

        let panic_threshold = match env.panic_threshold {
            Some(p) if !(p.is_finite() && (0.0..=100.0).contains(&p)) => {
                errs.value(
                    format!("{at}.panic_threshold"),
                    format!("panic_threshold {p} must be a percent from 0 to 100"),
                );
                0.0
            }
            Some(p) => p,
            None => 0.0,
        };

        environments.push(Arc::new(Environment {
            name: Arc::from(name.as_str()),
            labels: env.labels.clone(),
            entries: env_entries,
            apps,
            canary,
            tenants,
            retries,
            panic_threshold,
            max_in_flight,
            max_request_body,
            upgrades,
            allow_connect: env.allow_connect.unwrap_or(false),
            in_flight: Arc::new(AtomicUsize::new(0)),
            retried: Default::default(),
            bodies: std::sync::OnceLock::new(),
        }));
    }

    redirect_cycles(&raw, &mut errs);
    let access_log = access_log(raw.access_log.as_ref(), &mut errs);

    if errs.0.is_empty() {
        Ok(Topology {
            generation: 0,
            base_dir: base_dir.to_path_buf(),
            listeners,
            control,
            defaults,
            nodes,
            pools: pools.list,
            entries,
            slots,
            access_log,
            warnings: std::mem::take(&mut errs.1),
            files: std::mem::take(&mut errs.2),
            dns: dns_nodes,
            env_index: environments
                .iter()
                .enumerate()
                .map(|(i, e)| (e.name.clone(), i))
                .collect(),
            environments,
        })
    } else {
        Err(errs.0)
    }
}

fn access_log(raw: Option<&RawAccessLog>, errs: &mut Errors) -> AccessLogSpec {
    let mut spec = AccessLogSpec::default();
    let Some(raw) = raw else { return spec };
    spec.enabled = raw.enabled.unwrap_or(true);
    match raw.sample_2xx {
        Some(p) if !(p.is_finite() && (0.0..=100.0).contains(&p)) => errs.value(
            "access_log.sample_2xx".to_string(),
            format!("sample_2xx {p} must be a percent from 0 to 100"),
        ),
        Some(p) => spec.sample_2xx = p,
        None => {}
    }
    spec
}

/// An application's path prefix as routing compares it: `/` when none is given, without
/// trailing slashes.
fn app_prefix(app: &RawApp) -> &str {
    match app.path.as_deref() {
        None => "/",
        Some(p) if p.len() > 1 => p.trim_end_matches('/'),
        Some(p) => p,
    }
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A valid HTTP header or cookie name (RFC 9110 token).
fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Pools by their members, so that applications with the same candidates share one
/// pool (and one round-robin), found in O(1) whatever the size of the topology.
#[derive(Default)]
struct Pools {
    list: Vec<Pool>,
    index: HashMap<Arc<[Member]>, PoolId>,
}

impl Pools {
    /// The pool of `members`, made on first sight (one allocation, shared by the list
    /// and the index).
    fn intern(&mut self, members: &[Member]) -> PoolId {
        if let Some(&i) = self.index.get(members) {
            return i;
        }
        let id = self.list.len();
        let members: Arc<[Member]> = Arc::from(members);
        self.index.insert(members.clone(), id);
        self.list.push(Pool { members });
        id
    }
}

fn listeners(raw: &[RawListener], base: &Path, errs: &mut Errors) -> Vec<ListenerSpec> {
    let mut out = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::default();
    let mut binds: HashMap<SocketAddr, usize> = HashMap::default();
    for (i, l) in raw.iter().enumerate() {
        let at = format!("listeners[{i}]");
        if !valid_name(&l.name) {
            errs.value(
                format!("{at}.name"),
                format!(
                    "listener name {:?} must be letters, digits, '-', '_' or '.'",
                    l.name
                ),
            );
        }
        if let Some(j) = names.insert(&l.name, i) {
            errs.conflict(
                format!("{at}.name"),
                format!(
                    "listener name {:?} is used by listeners[{j}] and listeners[{i}]",
                    l.name
                ),
            );
        }
        let bind = match l.bind.parse::<SocketAddr>() {
            Ok(b) => b,
            Err(_) => {
                errs.value(
                    format!("{at}.bind"),
                    format!(
                        "bind {:?} is not an address and port such as 0.0.0.0:8080",
                        l.bind
                    ),
                );
                continue;
            }
        };
        if let Some(j) = binds.insert(bind, i) {
            errs.conflict(
                format!("{at}.bind"),
                format!(
                    "listeners {:?} (listeners[{j}]) and {:?} both bind {bind}",
                    raw[j].name, l.name
                ),
            );
        }
        let tls = l
            .tls
            .as_ref()
            .and_then(|t| listener_tls(&at, &l.name, bind, t, base, errs));
        out.push(ListenerSpec {
            name: l.name.clone(),
            bind,
            tls,
        });
    }
    out
}

/// A TLS listener's certificates, read and checked; `None` (with the errors recorded) when
/// one cannot serve.
fn listener_tls(
    at: &str,
    name: &str,
    bind: SocketAddr,
    t: &crate::config::raw::RawTls,
    base: &Path,
    errs: &mut Errors,
) -> Option<TlsSpec> {
    use crate::tls::UnknownName;
    if t.certificates.is_empty() {
        errs.value(
            format!("{at}.tls.certificates"),
            "a TLS listener needs at least one certificate",
        );
        return None;
    }
    let unknown_sni = match t.unknown_sni.as_deref() {
        None | Some("default") => UnknownName::Default,
        Some("refuse") => UnknownName::Refuse,
        Some(other) => {
            errs.value(
                format!("{at}.tls.unknown_sni"),
                format!(
                    "unknown_sni {other:?} must be `default` (the first certificate) or `refuse`"
                ),
            );
            UnknownName::Default
        }
    };
    let mut fp = rustc_hash::FxHasher::default();
    let mut certificates = Vec::new();
    let mut loaded = Vec::new();
    let mut ok = true;
    for (k, c) in t.certificates.iter().enumerate() {
        let before = errs.0.len();
        let cert = existing_file(
            base,
            &c.cert,
            &format!("{at}.tls.certificates[{k}].cert"),
            errs,
        );
        let key = existing_file(
            base,
            &c.key,
            &format!("{at}.tls.certificates[{k}].key"),
            errs,
        );
        errs.2.push(cert.clone());
        errs.2.push(key.clone());
        if errs.0.len() > before {
            ok = false;
            continue;
        }
        match crate::tls::load_cert(&cert, &key, &mut fp, &errs.3) {
            Ok(c) => {
                if let Some(ago) = &c.expired {
                    errs.1.push(format!(
                        "listener {name:?}: certificate {} expired {ago} ago and is still served (it was when this instance took it): renew it",
                        cert.display()
                    ));
                }
                if c.names.all().next().is_none() {
                    errs.1.push(format!(
                        "listener {name:?}: certificate {} names no host: it is only served as the default",
                        cert.display()
                    ));
                }
                loaded.push(c);
            }
            Err(e) => {
                ok = false;
                errs.value(format!("{at}.tls.certificates[{k}]"), e);
            }
        }
        certificates.push((cert, key));
    }
    if !ok {
        return None;
    }
    let bind_ip = Some(bind.ip()).filter(|ip| !ip.is_unspecified());
    if unknown_sni == UnknownName::Refuse
        && bind_ip.is_none()
        && loaded
            .iter()
            .any(|c| c.names.all().any(|n| n.parse::<std::net::IpAddr>().is_ok()))
    {
        errs.1.push(format!(
            "listener {name:?}: a certificate names an IP address, but clients send no SNI for an address, and with `unknown_sni: refuse` on a wildcard bind they are refused (bind the address itself to serve them that certificate)"
        ));
    }
    let http2 = t.http2.unwrap_or(true);
    let session_resumption = t.session_resumption.unwrap_or(true);
    let fp = std::hash::Hasher::finish(&fp);
    match crate::tls::server(loaded, unknown_sni, bind_ip, http2, session_resumption, fp) {
        Ok(server) => Some(TlsSpec {
            certificates,
            unknown_sni,
            http2,
            session_resumption,
            server: Arc::new(server),
        }),
        Err(e) => {
            errs.value(format!("{at}.tls"), e);
            None
        }
    }
}

fn existing_file(base: &Path, file: &str, at: &str, errs: &mut Errors) -> PathBuf {
    let path = base.join(file);
    if !path.is_file() {
        errs.value(
            at,
            format!(
                "file {} does not exist (paths are relative to the topology file's directory)",
                path.display()
            ),
        );
    }
    path
}

fn control(c: &RawControl, base: &Path, errs: &mut Errors) -> Option<ControlSpec> {
    let bind = match c.bind.parse::<SocketAddr>() {
        Ok(b) => b,
        Err(_) => {
            errs.value(
                "control.bind",
                format!(
                    "bind {:?} is not an address and port such as 127.0.0.1:9090",
                    c.bind
                ),
            );
            return None;
        }
    };
    let token_file = c
        .token_file
        .as_ref()
        .map(|t| existing_file(base, t, "control.token_file", errs));
    if token_file.is_none() && !bind.ip().is_loopback() {
        errs.value(
            "control.bind",
            format!("control endpoint on non-loopback address {bind} needs a token_file: without a token anyone who reaches it could read the topology"),
        );
    }
    Some(ControlSpec { bind, token_file })
}

/// Every duration of the document goes through here: above zero and at most
/// `MAX_DURATION`.
fn duration(
    at: &str,
    s: &Option<String>,
    default: std::time::Duration,
    errs: &mut Errors,
) -> std::time::Duration {
    match s {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if d.is_zero() => {
                errs.value(at, format!("{s:?} must be longer than zero"));
                default
            }
            Ok(d) if d > MAX_DURATION => {
                errs.value(at, format!("{s:?} is longer than the maximum of 30d"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                errs.value(at, e);
                default
            }
        },
    }
}

fn health(at: &str, raw: &RawHealth, base: &HealthSpec, errs: &mut Errors) -> HealthSpec {
    let mut h = base.clone();
    if let Some(kind) = &raw.kind {
        h.kind = match kind.as_str() {
            "http" => CheckKind::Http,
            "tcp" => CheckKind::Tcp,
            "grpc" => CheckKind::Grpc,
            other => {
                errs.value(
                    format!("{at}.type"),
                    format!("check type {other:?} is not one of http, tcp, grpc"),
                );
                h.kind
            }
        };
    }
    if let Some(svc) = &raw.service {
        h.service = svc.clone();
    }
    if let Some(p) = &raw.path {
        if !p.starts_with('/') {
            errs.value(
                format!("{at}.path"),
                format!("health path {p:?} must start with '/'"),
            );
        }
        h.path = p.clone();
    }
    h.interval = duration(&format!("{at}.interval"), &raw.interval, h.interval, errs);
    h.timeout = duration(&format!("{at}.timeout"), &raw.timeout, h.timeout, errs);
    if h.timeout > h.interval {
        errs.value(
            format!("{at}.timeout"),
            format!(
                "health timeout {:?} is longer than the interval {:?}",
                h.timeout, h.interval
            ),
        );
    }
    for (key, v, slot) in [
        ("rise", raw.rise, &mut h.rise),
        ("fall", raw.fall, &mut h.fall),
    ] {
        if let Some(v) = v {
            if v == 0 || v > 100 {
                errs.value(
                    format!("{at}.{key}"),
                    format!("{key} {v} must be from 1 to 100"),
                );
            }
            *slot = v;
        }
    }
    if let Some(e) = &raw.expect {
        match parse_status_range(e) {
            Some(r) => h.expect = r,
            None => errs.value(
                format!("{at}.expect"),
                format!("expect {e:?} must be a status or a range such as 200-399"),
            ),
        }
    }
    if let Some(j) = raw.jitter {
        if !(0.0..=50.0).contains(&j) {
            errs.value(
                format!("{at}.jitter"),
                format!("jitter {j} must be a percent from 0 to 50"),
            );
        }
        h.jitter = j;
    }
    if let Some(t) = raw.trust_unknown {
        h.trust_unknown = t;
    }
    h
}

fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    ((100..=599).contains(&a) && (100..=599).contains(&b) && a <= b).then_some((a, b))
}

fn max_in_flight(at: &str, l: &RawLimits, errs: &mut Errors) -> Option<usize> {
    match l.max_in_flight {
        Some(0) => {
            errs.value(
                format!("{at}.max_in_flight"),
                "max_in_flight must be at least 1",
            );
            None
        }
        Some(n) => Some(n as usize),
        None => None,
    }
}

fn max_request_body(at: &str, l: &RawLimits, errs: &mut Errors) -> Option<u64> {
    let at = format!("{at}.max_request_body");
    match parse_size(l.max_request_body.as_deref()?) {
        Ok(0) => {
            errs.value(at, "max_request_body must be at least 1 byte");
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            errs.value(at, e);
            None
        }
    }
}

/// The `upgrades` of environment `at`: HTTP tokens, stored lowercase; `h2c` never.
fn upgrades(at: &str, raw: Option<&[String]>, errs: &mut Errors) -> Vec<String> {
    let Some(raw) = raw else {
        return DEFAULT_UPGRADES.iter().map(|p| p.to_string()).collect();
    };
    let mut out: Vec<String> = Vec::new();
    for (i, p) in raw.iter().enumerate() {
        let path = format!("{at}.upgrades[{i}]");
        let name = p.to_ascii_lowercase();
        if !valid_token(&name) {
            errs.value(
                path,
                format!("{p:?} is not a protocol name (an HTTP token such as websocket)"),
            );
        } else if name == "h2c" {
            errs.value(
                path,
                "h2c upgrades are never tunnelled (a client could bypass routing inside the tunnel)",
            );
        } else if out.contains(&name) {
            errs.value(path, format!("upgrade {name:?} is listed twice"));
        } else {
            out.push(name);
        }
    }
    out
}

fn defaults(raw: &RawDefaults, errs: &mut Errors) -> Defaults {
    let health = raw
        .health
        .as_ref()
        .map(|h| health("defaults.health", h, &HealthSpec::default(), errs))
        .unwrap_or_default();
    let base = Timeouts::default();
    let timeouts = match &raw.timeouts {
        None => base,
        Some(t) => {
            let at = |k: &str| format!("defaults.timeouts.{k}");
            Timeouts {
                connect: duration(&at("connect"), &t.connect, base.connect, errs),
                response_header: duration(
                    &at("response_header"),
                    &t.response_header,
                    base.response_header,
                    errs,
                ),
                idle: duration(&at("idle"), &t.idle, base.idle, errs),
                client_header: duration(
                    &at("client_header"),
                    &t.client_header,
                    base.client_header,
                    errs,
                ),
                upstream_idle: duration(
                    &at("upstream_idle"),
                    &t.upstream_idle,
                    base.upstream_idle,
                    errs,
                ),
                drain: duration(&at("drain"), &t.drain, base.drain, errs),
                body_idle: duration(&at("body_idle"), &t.body_idle, base.body_idle, errs),
                request: duration(&at("request"), &t.request, base.request, errs),
                tunnel_idle: duration(&at("tunnel_idle"), &t.tunnel_idle, base.tunnel_idle, errs),
                queue: duration(&at("queue"), &t.queue, base.queue, errs),
            }
        }
    };
    let retries = raw.retries.unwrap_or(2);
    if retries > MAX_RETRIES {
        errs.value(
            "defaults.retries",
            format!("retries {retries} is above the maximum of {MAX_RETRIES}"),
        );
    }
    let max_in_flight = raw
        .limits
        .as_ref()
        .and_then(|l| max_in_flight("defaults.limits", l, errs))
        .unwrap_or(10_000);
    let max_request_body = raw
        .limits
        .as_ref()
        .and_then(|l| max_request_body("defaults.limits", l, errs));
    let mut trusted_proxies = Vec::new();
    for (i, c) in raw.trusted_proxies.iter().enumerate() {
        match parse_cidr(c) {
            Some(cidr) => trusted_proxies.push(cidr),
            None => errs.value(
                format!("defaults.trusted_proxies[{i}]"),
                format!("{c:?} is not an address or network such as 10.0.0.0/8"),
            ),
        }
    }
    let mut retry_budget = RetryBudget::default();
    if let Some(b) = &raw.retry_budget {
        if let Some(p) = b.percent {
            if !(p.is_finite() && (0.0..=100.0).contains(&p)) {
                errs.value(
                    "defaults.retry_budget.percent",
                    format!("{p} must be a percent from 0 to 100"),
                );
            }
            retry_budget.percent = p;
        }
        if let Some(m) = b.min_retries {
            retry_budget.min_retries = m;
        }
    }
    let mut passive = Passive::default();
    if let Some(p) = &raw.passive {
        let at = |k: &str| format!("defaults.passive.{k}");
        if let Some(n) = p.consecutive_failures {
            passive.consecutive_failures = n;
        }
        passive.ejection = duration(&at("ejection"), &p.ejection, passive.ejection, errs);
        passive.max_ejection = duration(
            &at("max_ejection"),
            &p.max_ejection,
            passive.max_ejection,
            errs,
        );
        if passive.max_ejection < passive.ejection {
            errs.value(
                at("max_ejection"),
                format!(
                    "max_ejection {:?} is shorter than ejection {:?}",
                    passive.max_ejection, passive.ejection
                ),
            );
        }
        if let Some(m) = p.max_ejected_percent {
            if m > 100 {
                errs.value(
                    at("max_ejected_percent"),
                    format!("{m} must be a percent from 0 to 100"),
                );
            }
            passive.max_ejected_percent = m;
        }
    }
    Defaults {
        health,
        timeouts,
        retries,
        retry_budget,
        passive,
        max_in_flight,
        max_request_body,
        trusted_proxies,
        allow_encoded_slash: raw.allow_encoded_slash.unwrap_or(false),
        dns: crate::dns::Spec::default(),
    }
}

fn dns_spec(raw: &RawDns, base: &Path, errs: &mut Errors) -> crate::dns::Spec {
    let d = crate::dns::Spec::default();
    let at = |k: &str| format!("defaults.dns.{k}");
    let timeout = duration(&at("timeout"), &raw.timeout, d.timeout, errs);
    if timeout > std::time::Duration::from_secs(30) {
        errs.value(
            at("timeout"),
            "a lookup timeout above 30s would hold up every apply that brings a new name",
        );
    }
    crate::dns::Spec {
        interval: duration(&at("interval"), &raw.interval, d.interval, errs),
        hold: duration(&at("hold"), &raw.hold, d.hold, errs),
        timeout,
        // (Only a regular file is read: a refused document must not have a pipe or a
        // device read either.)
        hosts: raw
            .hosts
            .as_deref()
            .map(|h| existing_file(base, h, &at("hosts"), errs))
            .filter(|p| p.is_file()),
    }
}

fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max).then_some(Cidr { addr, prefix })
}

/// `at` formats the path, only when there is an error to report.
fn weight(at: impl FnOnce() -> String, w: Option<i64>, default: u32, errs: &mut Errors) -> u32 {
    match w {
        None => default,
        Some(w) if (1..=MAX_WEIGHT).contains(&w) => w as u32,
        Some(w) => {
            errs.value(
                at(),
                format!(
                    "weight {w} must be from 1 to {MAX_WEIGHT} (drain a node to stop its traffic)"
                ),
            );
            default
        }
    }
}

/// Where a node is: an IP address, or a host name resolved to its members.
enum Target {
    Ip(SocketAddr),
    Name(String, u16),
}

/// The nodes of the document; a node addressed by a host name becomes one node a resolved
/// address (its members, next to each other). Returns them, each document name's range
/// of nodes, and the nodes addressed by names.
#[allow(clippy::type_complexity)]
fn nodes<'r>(
    raw: &'r RawTopology,
    defaults: &Defaults,
    base: &Path,
    dns: &crate::dns::Cache,
    errs: &mut Errors,
) -> (
    Vec<Node>,
    HashMap<&'r str, std::ops::Range<NodeId>>,
    Vec<crate::dns::DnsNode>,
) {
    let mut out = Vec::with_capacity(raw.nodes.len());
    let mut ids = HashMap::default();
    ids.reserve(raw.nodes.len());
    let mut by_addr: HashMap<SocketAddr, &str> = HashMap::default();
    by_addr.reserve(raw.nodes.len());
    let mut by_name: HashMap<(String, u16), &str> = HashMap::default();
    let mut dns_nodes = Vec::new();
    // Names never looked up are resolved first, all at once (bounded by the timeout).
    let names: Vec<(String, u16)> = raw
        .nodes
        .values()
        .filter(|n| n.address.parse::<SocketAddr>().is_err())
        .filter_map(|n| crate::dns::parse_authority(&n.address))
        .collect();
    if !names.is_empty() {
        let hosts: Vec<&str> = names.iter().map(|(h, _)| h.as_str()).collect();
        dns.resolve_new(&hosts, &defaults.dns);
    }
    for (name, n) in &raw.nodes {
        // Formatted only when there is an error to report.
        let at = || format!("nodes.{name}");
        if !valid_name(name) {
            errs.value(
                at(),
                format!("node name {name:?} must be letters, digits, '-', '_' or '.'"),
            );
        }
        let target = match n.address.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Target::Ip(a),
            Ok(_) => {
                errs.value(
                    format!("{}.address", at()),
                    format!("address {:?} needs a port other than 0", n.address),
                );
                continue;
            }
            Err(_) => match crate::dns::parse_authority(&n.address) {
                Some((host, port)) => Target::Name(host, port),
                None => {
                    errs.value(
                        format!("{}.address", at()),
                        format!("address {:?} must be an IP address or a host name, and a port, such as 10.0.0.11:8000 or orders.internal:8000", n.address),
                    );
                    continue;
                }
            },
        };
        match &target {
            Target::Ip(addr) => {
                if let Some(other) = by_addr.insert(*addr, name) {
                    errs.conflict(format!("{}.address", at()), format!("nodes {other:?} and {name:?} both have address {addr}; define a node once and use it in several environments"));
                }
            }
            Target::Name(host, port) => {
                if let Some(other) = by_name.insert((host.clone(), *port), name) {
                    errs.conflict(format!("{}.address", at()), format!("nodes {other:?} and {name:?} both have address {host}:{port}; define a node once and use it in several environments"));
                }
            }
        }
        let weight = weight(|| format!("{}.weight", at()), n.weight, 1, errs);
        if n.max_connections == Some(0) {
            errs.value(
                format!("{}.max_connections", at()),
                "max_connections must be at least 1",
            );
        }
        let health = match &n.health {
            Some(h) => health(&format!("{}.health", at()), h, &defaults.health, errs),
            None => defaults.health.clone(),
        };
        let protocol = match n.protocol.as_deref() {
            None | Some("http1") => Protocol::Http1,
            Some("h2c") => Protocol::H2c,
            Some("h2") => Protocol::H2,
            Some(other) => {
                errs.value(
                    format!("{}.protocol", at()),
                    format!("protocol {other:?} must be http1, h2c (HTTP/2 in clear) or h2 (HTTP/2 over TLS)"),
                );
                Protocol::Http1
            }
        };
        match (protocol, n.tls.is_some()) {
            (Protocol::H2, false) => errs.value(
                format!("{}.protocol", at()),
                "protocol h2 is HTTP/2 over TLS: give the node `tls` (or use h2c)",
            ),
            (Protocol::H2c, true) => errs.value(
                format!("{}.protocol", at()),
                "protocol h2c is HTTP/2 in clear: over TLS it is h2",
            ),
            _ => {}
        }
        let max_streams = match n.max_streams {
            None => crate::proxy::pool::MAX_STREAMS,
            Some(m) if (1..=10_000).contains(&m) => m,
            Some(m) => {
                errs.value(
                    format!("{}.max_streams", at()),
                    format!("max_streams {m} must be from 1 to 10000"),
                );
                crate::proxy::pool::MAX_STREAMS
            }
        };
        if health.kind == CheckKind::Grpc && !protocol.is_h2() {
            errs.value(
                format!("{}.health.type", at()),
                format!("node {name:?}: a grpc health check needs HTTP/2 to the node (protocol h2c or h2)"),
            );
        }
        let tls = n.tls.as_ref().and_then(|t| {
            let at = format!("{}.tls", at());
            let ca =
                t.ca.as_deref()
                    .map(|ca| existing_file(base, ca, &format!("{at}.ca"), errs));
            if let Some(ca) = &ca {
                errs.2.push(ca.clone());
                if !ca.is_file() {
                    return None;
                }
            }
            let server_name = t.server_name.clone().unwrap_or_else(|| match &target {
                Target::Ip(addr) => addr.ip().to_string(),
                Target::Name(host, _) => host.clone(),
            });
            match crate::tls::node(&server_name, ca.as_deref(), protocol == Protocol::H2) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    errs.value(at, e);
                    None
                }
            }
        });
        let defined: Arc<str> = Arc::from(name.as_str());
        let (addrs, dns_name) = match target {
            Target::Ip(addr) => (vec![addr], None),
            Target::Name(host, port) => {
                let answer = dns.get(&host).unwrap_or_default();
                match (&answer.error, answer.addrs.is_empty()) {
                    (Some(e), true) => errs.1.push(format!("node {name:?}: {host} does not resolve ({e}); the node has no members until it does")),
                    (None, true) => errs.1.push(format!("node {name:?}: {host} resolves to no address; the node has no members until it does")),
                    (Some(e), false) => errs.1.push(format!("node {name:?}: {host} no longer resolves ({e}); its last answer is kept for up to {:?}", defaults.dns.hold)),
                    (None, false) => {}
                }
                let addrs = answer
                    .addrs
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, port))
                    .collect();
                let written: Arc<str> = Arc::from(format!("{host}:{port}"));
                dns_nodes.push(crate::dns::DnsNode {
                    node: defined.clone(),
                    host: Arc::from(host.as_str()),
                    port,
                    answer,
                });
                (addrs, Some(written))
            }
        };
        let first = out.len();
        for addr in addrs {
            // A state of its own: validation touches no live node (the apply step binds
            // each node to its live state, `NodeRegistry::bind`, once the document is
            // accepted).
            let state = Arc::new(NodeState::new(health.trust_unknown));
            out.push(Node {
                name: match dns_name {
                    None => defined.clone(),
                    Some(_) => Arc::from(crate::dns::member_name(name, addr)),
                },
                defined: defined.clone(),
                addr,
                dns: dns_name.clone(),
                weight,
                backup: n.backup.unwrap_or(false),
                zone: n.zone.clone(),
                labels: n.labels.clone(),
                max_connections: n.max_connections,
                health: health.clone(),
                drain: n.drain.unwrap_or(false),
                state,
                tls: tls.clone(),
                protocol,
                max_streams,
            });
        }
        ids.insert(name.as_str(), first..out.len());
    }
    // A resolved address that is also another node's: both are used, each with its own
    // health and pool, which is rarely meant.
    if !dns_nodes.is_empty() {
        let mut seen: HashMap<SocketAddr, &str> = HashMap::default();
        for n in &out {
            if let Some(other) = seen.insert(n.addr, &n.defined) {
                if other != &*n.defined {
                    errs.1.push(format!(
                        "nodes {other:?} and {:?} both reach {} (one through a host name): the address gets the traffic of both",
                        n.defined, n.addr
                    ));
                }
            }
        }
    }
    (out, ids, dns_nodes)
}

/// Whether environment `env` lists node `name` (by its name in the document).
fn env_has_node(env: &RawEnvironment, name: &str) -> bool {
    match &env.nodes {
        RawEnvNodes::List(l) => l.iter().any(|n| n == name),
        RawEnvNodes::Map(m) => m.contains_key(name),
    }
}

fn env_members(
    at: &str,
    env: &RawEnvironment,
    nodes: &[Node],
    ids: &HashMap<&str, std::ops::Range<NodeId>>,
    errs: &mut Errors,
) -> Vec<Member> {
    const PLAIN: RawEnvNode = RawEnvNode {
        weight: None,
        backup: None,
    };
    // Borrowed, not cloned: this runs once per environment, and a topology may hold
    // tens of thousands.
    let list: Vec<(&str, &RawEnvNode)> = match &env.nodes {
        RawEnvNodes::List(l) => l.iter().map(|n| (n.as_str(), &PLAIN)).collect(),
        RawEnvNodes::Map(m) => m
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_ref().unwrap_or(&PLAIN)))
            .collect(),
    };
    let is_list = matches!(env.nodes, RawEnvNodes::List(_));
    // Error paths are formatted only when there is an error to report.
    let path = |i: usize, name: &str| {
        if is_list {
            format!("{at}.nodes[{i}]")
        } else {
            format!("{at}.nodes.{name}")
        }
    };
    let mut members = Vec::with_capacity(list.len());
    // A set only for long lists; a short one is scanned.
    let mut seen: Option<HashSet<&str>> = (list.len() > 16).then(HashSet::default);
    for (i, &(name, over)) in list.iter().enumerate() {
        let twice = match &mut seen {
            Some(set) => !set.insert(name),
            None => list[..i].iter().any(|(n, _)| *n == name),
        };
        if twice {
            errs.conflict(path(i, name), format!("node {name:?} is listed twice"));
            continue;
        }
        let Some(range) = ids.get(name) else {
            errs.reference(
                path(i, name),
                format!("node {name:?} is not defined (define it under `nodes`)"),
            );
            continue;
        };
        // (A node addressed by a host name has one member a resolved address, maybe none.)
        let base = range.clone().next().map_or(1, |id| nodes[id].weight);
        let w = match over.weight {
            None => base,
            Some(w) => weight(|| format!("{}.weight", path(i, name)), Some(w), base, errs),
        };
        for id in range.clone() {
            members.push(Member {
                node: id,
                weight: w,
                backup: over.backup.unwrap_or(nodes[id].backup),
            });
        }
    }
    if list.is_empty() {
        errs.value(
            format!("{at}.nodes"),
            "an environment needs at least one node",
        );
    }
    members
}

fn canary(
    at: &str,
    owner: &str,
    c: &RawCanary,
    envs: &HashMap<&str, EnvId>,
    errs: &mut Errors,
) -> Option<Canary> {
    let at = format!("{at}.canary");
    let target = envs.get(c.environment.as_str()).copied();
    if target.is_none() {
        errs.reference(
            format!("{at}.environment"),
            format!("canary environment {:?} is not defined", c.environment),
        );
    }
    let hundredths = c.weight * 100.0;
    if !(c.weight.is_finite() && (0.0..=100.0).contains(&c.weight)) {
        errs.value(
            format!("{at}.weight"),
            format!("canary weight {} must be a percent from 0 to 100", c.weight),
        );
    } else if (hundredths - hundredths.round()).abs() > 1e-6 {
        errs.value(
            format!("{at}.weight"),
            format!(
                "canary weight {} has more than two decimals (steps of 0.01%)",
                c.weight
            ),
        );
    }
    let header = c
        .header
        .as_deref()
        .and_then(|h| header_name(&format!("{at}.header"), h, errs));
    let cookie = c
        .cookie
        .as_deref()
        .filter(|v| cookie_name(&format!("{at}.cookie"), v, errs))
        .map(Box::from);
    let hash = c.hash.as_ref().and_then(|h| {
        let at = format!("{at}.hash");
        match (&h.header, &h.cookie, h.client_address) {
            (Some(name), None, None | Some(false)) => {
                header_name(&format!("{at}.header"), name, errs).map(CanaryHash::Header)
            }
            (None, Some(name), None | Some(false)) => {
                cookie_name(&format!("{at}.cookie"), name, errs)
                    .then(|| CanaryHash::Cookie(name.as_str().into()))
            }
            (None, None, Some(true)) => Some(CanaryHash::ClientAddress),
            _ => {
                errs.value(
                    &at,
                    "give exactly one of header, cookie, client_address: true",
                );
                None
            }
        }
    });
    Some(Canary {
        environment: target?,
        threshold: hundredths.round().clamp(0.0, 10_000.0) as u16,
        header,
        cookie,
        hash,
        salt: crate::routing::canary::salt(owner),
    })
}

/// A header name from the document, checked and lowercased.
fn header_name(at: &str, name: &str, errs: &mut Errors) -> Option<http::HeaderName> {
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) if valid_token(name) => Some(h),
        _ => {
            errs.value(at, format!("{name:?} is not a valid header name"));
            None
        }
    }
}

/// Whether `name` is a valid cookie name (RFC 6265: a token), short enough to be set.
fn cookie_name(at: &str, name: &str, errs: &mut Errors) -> bool {
    let ok = valid_token(name) && name.len() <= 64;
    if !ok {
        errs.value(
            at,
            format!("{name:?} is not a valid cookie name (a token of at most 64 characters)"),
        );
    }
    ok
}

fn tenants(
    at: &str,
    t: &RawTenants,
    envs: &HashMap<&str, EnvId>,
    errs: &mut Errors,
) -> Option<Tenants> {
    let at = format!("{at}.tenants");
    let k = &t.key;
    let set = [
        k.header.is_some(),
        k.host_label.is_some(),
        k.path_segment.is_some(),
        k.query.is_some(),
    ];
    let key = match set.iter().filter(|s| **s).count() {
        1 => {
            if let Some(h) = &k.header {
                TenantKey::Header(header_name(&format!("{at}.key.header"), h, errs)?)
            } else if let Some(l) = k.host_label {
                TenantKey::HostLabel(l)
            } else if let Some(s) = k.path_segment {
                if s == 0 {
                    errs.value(
                        format!("{at}.key.path_segment"),
                        "path segments are counted from 1",
                    );
                }
                TenantKey::PathSegment(s)
            } else {
                let q = k.query.clone().unwrap_or_default();
                if q.is_empty() {
                    errs.value(
                        format!("{at}.key.query"),
                        "the query parameter needs a name",
                    );
                }
                TenantKey::Query(q.into())
            }
        }
        _ => {
            errs.value(
                format!("{at}.key"),
                "give exactly one of header, host_label, path_segment, query",
            );
            return None;
        }
    };
    if t.ranges.is_empty() {
        errs.value(
            format!("{at}.ranges"),
            "a tenant rule needs at least one range",
        );
    }
    let mut ranges = Vec::new();
    let mut ok = true;
    for (i, r) in t.ranges.iter().enumerate() {
        let path = format!("{at}.ranges[{i}]");
        if r.from > r.to {
            errs.value(
                &path,
                format!("range {}-{} starts after it ends", r.from, r.to),
            );
            ok = false;
        }
        match envs.get(r.environment.as_str()) {
            Some(&env) => ranges.push((r.from, r.to, env, i)),
            None => {
                errs.reference(
                    format!("{path}.environment"),
                    format!("environment {:?} is not defined", r.environment),
                );
                ok = false;
            }
        }
    }
    ranges.sort_by_key(|r| (r.0, r.1));
    for w in ranges.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b.0 <= a.1 {
            errs.conflict(
                format!("{at}.ranges[{}]", b.3.max(a.3)),
                format!(
                    "tenant ranges {}-{} ({at}.ranges[{}]) and {}-{} ({at}.ranges[{}]) overlap",
                    a.0, a.1, a.3, b.0, b.1, b.3
                ),
            );
            ok = false;
        }
    }
    ok.then(|| Tenants {
        key,
        required: t.required,
        ranges: ranges
            .into_iter()
            .map(|(from, to, environment, _)| TenantRange {
                from,
                to,
                environment,
            })
            .collect(),
    })
}

/// Canary and tenant redirects form a graph over environments; it must have no cycle.
fn redirect_cycles(raw: &RawTopology, errs: &mut Errors) {
    let names: Vec<&str> = raw.environments.keys().map(|k| k.as_str()).collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // edges[i] = (target, why)
    let mut edges: Vec<Vec<(usize, String)>> = vec![Vec::new(); names.len()];
    for (i, env) in raw.environments.values().enumerate() {
        if let Some(c) = &env.canary {
            if let Some(&t) = index.get(c.environment.as_str()) {
                edges[i].push((t, "canary".into()));
            }
        }
        if let Some(t) = &env.tenants {
            for r in &t.ranges {
                if let Some(&e) = index.get(r.environment.as_str()) {
                    if !edges[i].iter().any(|(x, _)| *x == e) {
                        edges[i].push((e, format!("tenant range {}-{}", r.from, r.to)));
                    }
                }
            }
        }
    }
    // Iterative DFS with colours; report each cycle once, at the environment where it closes.
    #[derive(Clone, Copy, PartialEq)]
    enum C {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![C::White; names.len()];
    let mut reported: HashSet<Vec<usize>> = HashSet::default();
    for start in 0..names.len() {
        if colour[start] != C::White {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        colour[start] = C::Grey;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if *next < edges[node].len() {
                let (target, _) = &edges[node][*next];
                let target = *target;
                *next += 1;
                match colour[target] {
                    C::White => {
                        colour[target] = C::Grey;
                        stack.push((target, 0));
                    }
                    C::Grey => {
                        let from = stack.iter().position(|(n, _)| *n == target).unwrap_or(0);
                        let cycle: Vec<usize> = stack[from..].iter().map(|(n, _)| *n).collect();
                        let mut key = cycle.clone();
                        key.sort();
                        if reported.insert(key) {
                            let mut text = String::new();
                            for (k, n) in cycle.iter().enumerate() {
                                let to = cycle.get(k + 1).copied().unwrap_or(target);
                                let why = &edges[*n]
                                    .iter()
                                    .find(|(t, _)| *t == to)
                                    .map(|e| e.1.as_str())
                                    .unwrap_or("");
                                text.push_str(&format!("{} -({why})-> ", names[*n]));
                            }
                            text.push_str(names[target]);
                            errs.conflict(
                                format!("environments.{}", names[cycle[0]]),
                                format!("redirects form a cycle: {text}"),
                            );
                        }
                    }
                    C::Black => {}
                }
            } else {
                colour[node] = C::Black;
                stack.pop();
            }
        }
    }
}
