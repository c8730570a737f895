//! Prometheus metrics (DESIGN.md "Metrics"), served at `GET /metrics` on the control
//! listener.
//!
//! Nothing here runs on a request: every value is read at scrape time from state envgate
//! keeps anyway (the live topology, each node's state, the apply path's counts), by a
//! collector of envgate's own (`prometheus::core::Collector`), so a scrape is exact and
//! series of removed nodes and environments disappear with them. The prometheus crate
//! only checks the families and writes the text format.

mod process;
pub mod tally;

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use crate::control::{Control, Outcome, Source};
use crate::health::{Health, NodeState};

/// Open client connections by listener (`envgate_connections_active`): one padded counter
/// per accept loop (a worker's loop of one listener), written only by its worker, summed
/// at scrape time.
#[derive(Default)]
pub struct Connections {
    slots: std::sync::Mutex<Vec<(String, Arc<Slot>)>>,
}

/// One accept loop's open connections, on a cache line of its own (workers never write
/// the same line).
#[derive(Default)]
#[repr(align(64))]
pub struct Slot(std::sync::atomic::AtomicI64);

impl Slot {
    /// Its worker is the only writer: a relaxed load and store, no locked instruction.
    #[inline]
    pub fn add(&self, n: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.store(self.0.load(Relaxed) + n, Relaxed);
    }
}

/// One open connection; dropping it (however its task ends) ends its count.
pub struct Open(Arc<Slot>);

impl Slot {
    /// Counts one connection open until the returned guard is dropped.
    #[inline]
    pub fn open(self: &Arc<Self>) -> Open {
        self.add(1);
        Open(self.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

impl Connections {
    /// A counter for a new accept loop of `listener` (called when a worker starts one).
    pub fn slot(&self, listener: &str) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Loops that stopped with no connection left are forgotten.
        slots.retain(|(_, s)| {
            Arc::strong_count(s) > 1 || s.0.load(std::sync::atomic::Ordering::Relaxed) != 0
        });
        slots.push((listener.to_string(), slot.clone()));
        slot
    }

    /// Open connections by listener name, in name order.
    pub fn by_listener(&self) -> Vec<(String, i64)> {
        let mut sums: std::collections::BTreeMap<String, i64> = Default::default();
        for (name, s) in self.slots.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            *sums.entry(name.clone()).or_default() +=
                s.0.load(std::sync::atomic::Ordering::Relaxed);
        }
        sums.into_iter().collect()
    }
}

/// A sample with `labels` and no value yet.
fn labelled(labels: &[(&str, &str)]) -> proto::Metric {
    proto::Metric::from_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect(),
    )
}

/// Families, built one scrape at a time.
#[derive(Default)]
struct Families(Vec<MetricFamily>);

impl Families {
    /// A new family; its samples follow with `sample`.
    fn family(&mut self, name: &str, help: &str, kind: MetricType) -> &mut Self {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        self.0.push(f);
        self
    }

    /// One sample of the last family.
    fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let f = self.0.last_mut().expect("a family comes first");
        let mut m = labelled(labels);
        match f.get_field_type() {
            MetricType::COUNTER => {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            _ => {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        f.mut_metric().push(m);
        self
    }

    /// One histogram of the last family (seconds, from nanosecond bins).
    fn histogram(&mut self, labels: &[(&str, &str)], h: &tally::HistogramTotals) -> &mut Self {
        let f = self.0.last_mut().expect("a family comes first");
        let mut m = labelled(labels);
        let mut p = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(tally::BUCKETS.len());
        for (bound, n) in tally::BUCKETS.iter().zip(&h.bins) {
            cumulative += n;
            let mut b = proto::Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound as f64 / 1e9);
            buckets.push(b);
        }
        p.set_bucket(buckets);
        p.set_sample_count(h.count());
        p.set_sample_sum(h.sum_ns as f64 / 1e9);
        m.set_histogram(p);
        f.mut_metric().push(m);
        self
    }
}

/// The collector of one running instance.
pub struct Metrics {
    control: Arc<Control>,
}

/// Sources whose applies are reloads (the document envgate started with is not).
const RELOAD_SOURCES: [Source; 7] = [
    Source::File,
    Source::Certificates,
    Source::Dns,
    Source::Signal,
    Source::Api,
    Source::Rollback,
    Source::Fleet,
];
const OUTCOMES: [Outcome; 3] = [Outcome::Applied, Outcome::Rejected, Outcome::Unchanged];

impl Metrics {
    pub fn new(control: Arc<Control>) -> Metrics {
        Metrics { control }
    }

    /// A registry holding this collector alone.
    pub fn registry(self) -> prometheus::Registry {
        let r = prometheus::Registry::new();
        r.register(Box::new(self))
            .expect("the collector's families are well-formed and registered once");
        r
    }

    fn families(&self) -> Families {
        let mut out = Families::default();
        out.family(
            "envgate_build_info",
            "The running version (always 1).",
            MetricType::GAUGE,
        )
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);

        let current = self.control.current();
        out.family(
            "envgate_topology_generation",
            "The number of the live topology, bumped by every apply.",
            MetricType::GAUGE,
        )
        .sample(&[], current.generation as f64);

        out.family(
            "envgate_topology_info",
            "The hash of the live topology document (as the source serves it, in fleet mode); equal on instances that converged.",
            MetricType::GAUGE,
        )
        .sample(&[("hash", &self.control.topology_hash())], 1.0);

        // Certificates served, by listener and file: when each expires.
        let topo = self.control.topology();
        out.family(
            "envgate_tls_certificate_expiry_seconds",
            "When each certificate a TLS listener serves stops being valid (notAfter), in seconds since the epoch.",
            MetricType::GAUGE,
        );
        for l in &topo.listeners {
            if let Some(tls) = &l.tls {
                for c in &tls.server.certs.list {
                    let file = c.cert_path.to_string_lossy();
                    out.sample(
                        &[("listener", &l.name), ("certificate", &file)],
                        c.not_after as f64,
                    );
                }
            }
        }

        let reloads = self.control.reload_counts();
        out.family(
            "envgate_topology_reloads_total",
            "Documents offered to the apply path, by source and result.",
            MetricType::COUNTER,
        );
        for source in RELOAD_SOURCES {
            for result in OUTCOMES {
                out.sample(
                    &[("source", source.as_str()), ("result", result.as_str())],
                    reloads.get(source, result) as f64,
                );
            }
        }

        let topo = self.control.topology();
        // One sample per node of the live topology.
        let mut per_node = |name: &str, help: &str, kind, value: &dyn Fn(&NodeState) -> f64| {
            out.family(name, help, kind);
            for n in &topo.nodes {
                out.sample(&[("node", &n.name)], value(&n.state));
            }
        };
        let flag = |b: bool| f64::from(u8::from(b));
        per_node(
            "envgate_node_up",
            "1 when the node's health checks say it is up, 0 when down or not checked yet.",
            MetricType::GAUGE,
            &|s| flag(s.health() == Health::Up),
        );
        per_node(
            "envgate_node_connections",
            "Connections open to the node from every worker, in use and idle (against its max_connections).",
            MetricType::GAUGE,
            &|s| f64::from(s.conns.open()),
        );
        per_node(
            "envgate_node_ejected",
            "1 while passive detection keeps the node out of rotation.",
            MetricType::GAUGE,
            &|s| flag(s.is_ejected()),
        );
        per_node(
            "envgate_node_drained",
            "1 while the node is drained (no new requests).",
            MetricType::GAUGE,
            &|s| flag(s.is_drained()),
        );
        per_node(
            "envgate_passive_ejections_total",
            "Ejections of a node by passive detection (consecutive failures on live traffic).",
            MetricType::COUNTER,
            &|s| s.ejections_total() as f64,
        );
        out.family(
            "envgate_health_checks_total",
            "Active health checks, by node and result.",
            MetricType::COUNTER,
        );
        for n in &topo.nodes {
            let (passed, failed) = n.state.checks();
            out.sample(&[("node", &n.name), ("result", "passed")], passed as f64);
            out.sample(&[("node", &n.name), ("result", "failed")], failed as f64);
        }
        if !topo.dns.is_empty() {
            out.family(
                "envgate_dns_addresses",
                "Addresses a node's host name resolves to (its members), by node.",
                MetricType::GAUGE,
            );
            for d in &topo.dns {
                out.sample(&[("node", &d.node)], d.answer.addrs.len() as f64);
            }
            out.family(
                "envgate_dns_failing",
                "1 while a node's host name does not resolve (its last answer held, or none).",
                MetricType::GAUGE,
            );
            for d in &topo.dns {
                // The latest lookup's (a failure that holds the last answer changes no
                // member, hence no topology).
                let failing = self
                    .control
                    .dns()
                    .get(&d.host)
                    .map_or(d.answer.error.is_some(), |a| a.error.is_some());
                out.sample(&[("node", &d.node)], f64::from(u8::from(failing)));
            }
        }
        out.family(
            "envgate_retries_total",
            "Attempts after the first, by environment.",
            MetricType::COUNTER,
        );
        for e in &topo.environments {
            out.sample(
                &[("environment", &e.name)],
                e.retried.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
        }
        out.family(
            "envgate_in_flight",
            "Requests being served, by environment.",
            MetricType::GAUGE,
        );
        for e in &topo.environments {
            out.sample(
                &[("environment", &e.name)],
                e.in_flight.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
        }

        // Every listener of the topology, and one removed while connections it accepted
        // are still open.
        let open = self.control.connections();
        out.family(
            "envgate_connections_active",
            "Open client connections, by listener.",
            MetricType::GAUGE,
        );
        for l in &topo.listeners {
            let n = open
                .iter()
                .find(|(name, _)| *name == l.name)
                .map_or(0, |(_, n)| *n);
            out.sample(&[("listener", &l.name)], n as f64);
        }
        for (name, n) in &open {
            if *n != 0 && !topo.listeners.iter().any(|l| &l.name == name) {
                out.sample(&[("listener", name)], *n as f64);
            }
        }

        self.requests(&mut out, &topo);
        out.family(
            "envgate_access_log_dropped_total",
            "Access log lines dropped because the log writer fell behind.",
            MetricType::COUNTER,
        )
        .sample(&[], self.control.log_dropped() as f64);
        let [served, declined] = self.control.http1_fast();
        out.family(
            "envgate_http1_fast_requests_total",
            "HTTP/1.1 requests under --http1 fast: served by the own codec, or handed to hyper (declined) before a byte was relayed.",
            MetricType::COUNTER,
        );
        out.sample(&[("outcome", "served")], served as f64);
        out.sample(&[("outcome", "declined")], declined as f64);

        process::collect(&mut out);
        out
    }

    /// The request families, from every worker's counters.
    fn requests(&self, out: &mut Families, topo: &crate::topology::Topology) {
        let totals = self.control.request_totals();
        let mut requests: Vec<_> = totals.requests.iter().collect();
        requests.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out.family(
            "envgate_requests_total",
            "Exchanges, by environment that served, the last node tried (empty when none was, or when the client was at fault) and status (499: the client went away first; other: outside 100-599).",
            MetricType::COUNTER,
        );
        let mut code = itoa::Buffer::new();
        for ((env, node, status), n) in requests {
            let status = match *status {
                tally::OTHER_CODE => "other",
                s => code.format(s),
            };
            out.sample(
                &[
                    ("environment", env.as_deref().unwrap_or("")),
                    ("node", node.as_deref().unwrap_or("")),
                    ("code", status),
                ],
                *n as f64,
            );
        }
        // Environments in topology order; those that served nothing yet have no series.
        let envs: Vec<(&str, &tally::EnvTotals)> = topo
            .environments
            .iter()
            .filter_map(|e| totals.envs.get(&e.name).map(|t| (&*e.name, t)))
            .collect();
        out.family(
            "envgate_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by environment.",
            MetricType::HISTOGRAM,
        );
        for (e, t) in &envs {
            out.histogram(&[("environment", e)], &t.duration);
        }
        out.family(
            "envgate_upstream_connect_seconds",
            "Time to open a connection to a node, by environment.",
            MetricType::HISTOGRAM,
        );
        for (e, t) in &envs {
            if t.connect.count() > 0 {
                out.histogram(&[("environment", e)], &t.connect);
            }
        }
        out.family(
            "envgate_request_bytes_total",
            "Request body bytes received from clients, by environment.",
            MetricType::COUNTER,
        );
        for (e, t) in &envs {
            out.sample(&[("environment", e)], t.bytes_in as f64);
        }
        out.family(
            "envgate_response_bytes_total",
            "Response body bytes sent to clients, by environment.",
            MetricType::COUNTER,
        );
        for (e, t) in &envs {
            out.sample(&[("environment", e)], t.bytes_out as f64);
        }
        out.family(
            "envgate_failovers_total",
            "Attempts that failed and sent the request on to another node, by environment and reason.",
            MetricType::COUNTER,
        );
        for (e, t) in &envs {
            for (reason, n) in tally::Failover::ALL.iter().zip(t.failovers) {
                out.sample(&[("environment", e), ("reason", reason.as_str())], n as f64);
            }
        }
        // Decisions are counted for the environment whose rule decided.
        out.family(
            "envgate_canary_requests_total",
            "Requests an environment's canary split decided, by arm (primary or canary).",
            MetricType::COUNTER,
        );
        for e in topo.environments.iter().filter(|e| e.canary.is_some()) {
            let arms = totals.envs.get(&e.name).map_or([0; 2], |t| t.arms);
            for (arm, n) in ["primary", "canary"].iter().zip(arms) {
                out.sample(&[("environment", &e.name), ("arm", arm)], n as f64);
            }
        }
        out.family(
            "envgate_tenant_decisions_total",
            "Verdicts of an environment's tenant rule: routed to a range, outside every range, id missing or malformed.",
            MetricType::COUNTER,
        );
        for e in topo.environments.iter().filter(|e| e.tenants.is_some()) {
            let d = totals.envs.get(&e.name).map_or([0; 4], |t| t.tenant);
            for (decision, n) in tally::TENANT_DECISIONS.iter().zip(d) {
                out.sample(
                    &[("environment", &e.name), ("decision", decision)],
                    n as f64,
                );
            }
        }
        out.family(
            "envgate_tenant_routed_total",
            "Requests a tenant range sent to its environment, by the environment whose rule decided and the target.",
            MetricType::COUNTER,
        );
        for e in topo.environments.iter().filter(|e| e.tenants.is_some()) {
            let Some(t) = totals.envs.get(&e.name) else {
                continue;
            };
            let mut to: Vec<_> = t.tenant_to.iter().collect();
            to.sort_unstable();
            for (target, n) in to {
                out.sample(&[("environment", &e.name), ("target", target)], *n as f64);
            }
        }
    }
}

impl Collector for Metrics {
    fn desc(&self) -> Vec<&Desc> {
        // None declared up front: the series follow the live topology, so the families
        // are built (and checked by the registry's `gather`) at each scrape.
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families().0
    }
}

/// The text exposition of `registry`.
pub fn render(registry: &prometheus::Registry) -> Result<String, prometheus::Error> {
    use prometheus::Encoder;
    let mut buf = Vec::with_capacity(16 * 1024);
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    Ok(String::from_utf8(buf).unwrap_or_default())
}
