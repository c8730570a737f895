//! Request counters: one table per worker and topology generation, written only by its
//! worker, read by the collector at scrape time.
//!
//! A request's counters are found by index, never by label: the environment's by its
//! `EnvId`, the (environment, node) pair's by the application's counter slot plus the
//! member's position (`Application::slot`, laid out when the topology is compiled). Each
//! counter is an atomic written by one thread only (a relaxed load and store, no locked
//! instruction), so the collector reads exact values from another thread. Tables are
//! made on first use, so a topology of 10,000 environments costs memory only for those
//! that serve.
//!
//! When a worker moves to a new generation it folds its old table, by name, into the
//! totals it carries (`Totals`), dropping the names the new topology lacks: counters of
//! kept environments and nodes continue, series of removed ones disappear. An exchange
//! that began before the move completes into the carried totals, by name (a cold path
//! that takes the worker's lock, as does a status code past the few a slot holds).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use rustc_hash::FxHashMap;

use crate::topology::{EnvId, NodeId, Topology};

/// Upper bounds of the latency buckets, in nanoseconds: 100 µs to 30 s.
pub const BUCKETS: [u64; 17] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];
/// Buckets with `+Inf`.
pub const BINS: usize = BUCKETS.len() + 1;

/// Why an attempt failed and the request went on to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// The connection to the node could not be made (or was found closed).
    Connect,
    /// envgate lacked the resources to connect (not the node's fault).
    Local,
    /// No response head in time.
    Timeout,
    /// The node reset or broke the exchange before a response.
    Reset,
}

impl Failover {
    pub const ALL: [Failover; 4] = [
        Failover::Connect,
        Failover::Local,
        Failover::Timeout,
        Failover::Reset,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failover::Connect => "connect_failed",
            Failover::Local => "local_resources",
            Failover::Timeout => "timeout",
            Failover::Reset => "reset",
        }
    }
}

/// The status counted for codes outside 100-599 (label `other`). Never 0: a row key of
/// 0 means an empty row.
pub const OTHER_CODE: u16 = 1;

/// The tenant rule's verdicts, as counted (`envgate_tenant_decisions_total{decision}`).
pub const TENANT_DECISIONS: [&str; 4] = ["routed", "outside", "missing", "malformed"];

/// What one exchange adds to the counters (filled by the exchange's record). Compact (ids
/// as `u32`, `NONE` for absent): it travels inside every response body.
#[derive(Debug, Clone)]
pub struct Facts {
    env: u32,
    slot: u32,
    node: u32,
    canary_env: u32,
    tenant_env: u32,
    tenant_to: u32,
    pub code: u16,
    canary_arm: u8,
    tenant_decision: u8,
    pub failovers: [u8; 4],
    pub duration_ns: u64,
    connect_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

const NONE: u32 = u32::MAX;

impl Default for Facts {
    fn default() -> Self {
        Facts {
            env: NONE,
            slot: NONE,
            node: NONE,
            canary_env: NONE,
            tenant_env: NONE,
            tenant_to: NONE,
            code: 0,
            canary_arm: 0,
            tenant_decision: 0,
            failovers: [0; 4],
            duration_ns: 0,
            connect_ns: u64::MAX,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

fn some(v: u32) -> Option<usize> {
    (v != NONE).then_some(v as usize)
}

impl Facts {
    /// The environment that served (after a redirect); `None`: no route.
    #[inline]
    pub fn env(&self) -> Option<EnvId> {
        some(self.env)
    }
    #[inline]
    pub fn set_env(&mut self, e: EnvId) {
        self.env = e as u32;
    }
    /// The counter slot and node of the last node tried; `None`: no node.
    #[inline]
    pub fn slot(&self) -> Option<(usize, NodeId)> {
        some(self.slot).map(|s| (s, self.node as usize))
    }
    #[inline]
    pub fn set_slot(&mut self, slot: Option<(usize, NodeId)>) {
        (self.slot, self.node) = slot.map_or((NONE, NONE), |(s, n)| (s as u32, n as u32));
    }
    /// The environment whose canary split decided, and its arm (0 primary, 1 canary).
    #[inline]
    pub fn canary(&self) -> Option<(EnvId, u8)> {
        some(self.canary_env).map(|e| (e, self.canary_arm))
    }
    #[inline]
    pub fn set_canary(&mut self, e: EnvId, arm: u8) {
        (self.canary_env, self.canary_arm) = (e as u32, arm);
    }
    /// The environment whose tenant rule decided, the verdict (`TENANT_DECISIONS`), and
    /// for a redirect the environment it went to.
    #[inline]
    pub fn tenant(&self) -> Option<(EnvId, u8, Option<EnvId>)> {
        some(self.tenant_env).map(|e| (e, self.tenant_decision, some(self.tenant_to)))
    }
    #[inline]
    pub fn set_tenant(&mut self, e: EnvId, decision: u8, to: Option<EnvId>) {
        self.tenant_env = e as u32;
        self.tenant_decision = decision;
        self.tenant_to = to.map_or(NONE, |t| t as u32);
    }
    #[inline]
    pub fn connect_ns(&self) -> Option<u64> {
        (self.connect_ns != u64::MAX).then_some(self.connect_ns)
    }
    #[inline]
    pub fn set_connect_ns(&mut self, ns: Option<u64>) {
        self.connect_ns = ns.unwrap_or(u64::MAX);
    }
}

/// A counter with one writer.
#[derive(Default)]
struct C(AtomicU64);

impl C {
    #[inline]
    fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
struct Histogram {
    bins: [C; BINS],
    sum_ns: C,
}

#[inline]
fn bin(ns: u64) -> usize {
    BUCKETS
        .iter()
        .position(|&b| ns <= b)
        .unwrap_or(BUCKETS.len())
}

impl Histogram {
    #[inline]
    fn observe(&self, ns: u64) {
        self.bins[bin(ns)].add(1);
        self.sum_ns.add(ns);
    }
}

/// Counts by a small key (a status code, an environment + 1), in a few rows. A row's key
/// is written once, after its count, so a reader that sees the key sees a count that
/// belongs to it.
#[derive(Default)]
struct Rows {
    rows: [(AtomicU32, C); 4],
}

impl Rows {
    /// `false` when every row holds another key.
    #[inline]
    fn add(&self, key: u32, n: u64) -> bool {
        for (k, c) in &self.rows {
            let have = k.load(Relaxed);
            if have == key {
                c.add(n);
                return true;
            }
            if have == 0 {
                c.add(n);
                k.store(key, std::sync::atomic::Ordering::Release);
                return true;
            }
        }
        false
    }

    fn each(&self, mut f: impl FnMut(u32, u64)) {
        for (k, c) in &self.rows {
            match k.load(std::sync::atomic::Ordering::Acquire) {
                0 => break,
                key => f(key, c.get()),
            }
        }
    }
}

/// One environment's counters in one worker.
#[derive(Default)]
struct EnvTally {
    duration: Histogram,
    connect: Histogram,
    bytes_in: C,
    bytes_out: C,
    /// envgate's own answers (no node), by status.
    own: Rows,
    /// As the environment whose canary split decided: primary, canary.
    arms: [C; 2],
    /// As the environment whose tenant rule decided: `TENANT_DECISIONS`.
    tenant: [C; 4],
    /// Tenant redirects by target environment (id + 1).
    tenant_to: Rows,
    failovers: [C; 4],
}

/// One worker's counters for one topology generation.
pub struct GenTally {
    pub topo: Arc<Topology>,
    envs: Box<[OnceLock<Box<EnvTally>>]>,
    /// (environment, node) pairs by status, indexed by counter slot.
    slots: Box<[OnceLock<Box<Rows>>]>,
    /// Requests no environment took, by status.
    unrouted: Rows,
}

impl GenTally {
    pub fn new(topo: Arc<Topology>) -> Self {
        GenTally {
            envs: (0..topo.environments.len())
                .map(|_| OnceLock::new())
                .collect(),
            slots: (0..topo.slots).map(|_| OnceLock::new()).collect(),
            unrouted: Rows::default(),
            topo,
        }
    }

    #[inline]
    fn env(&self, e: EnvId) -> &EnvTally {
        self.envs[e].get_or_init(Default::default)
    }

    /// Adds one exchange; what does not fit the rows goes to `spill`.
    #[inline]
    fn add(&self, f: &Facts, spill: &WorkerStats) {
        let code = u32::from(f.code);
        let fits = match (f.env(), f.slot()) {
            (Some(_), Some((slot, _))) => {
                self.slots[slot].get_or_init(Default::default).add(code, 1)
            }
            (Some(e), None) => self.env(e).own.add(code, 1),
            (None, _) => self.unrouted.add(code, 1),
        };
        if let Some(e) = f.env() {
            let t = self.env(e);
            t.duration.observe(f.duration_ns);
            if let Some(c) = f.connect_ns() {
                t.connect.observe(c);
            }
            t.bytes_in.add(f.bytes_in);
            t.bytes_out.add(f.bytes_out);
            if f.failovers != [0; 4] {
                for (c, n) in t.failovers.iter().zip(f.failovers) {
                    c.add(u64::from(n));
                }
            }
        }
        if let Some((e, arm)) = f.canary() {
            self.env(e).arms[usize::from(arm & 1)].add(1);
        }
        let mut redirect_fits = true;
        if let Some((e, decision, target)) = f.tenant() {
            let t = self.env(e);
            t.tenant[usize::from(decision & 3)].add(1);
            if let Some(to) = target {
                redirect_fits = t.tenant_to.add(to as u32 + 1, 1);
            }
        }
        if !fits || !redirect_fits {
            spill.spill(&self.topo, f, !fits, !redirect_fits);
        }
    }

    /// Adds this table to `totals`, by name.
    fn fold_into(&self, totals: &mut Totals) {
        let topo = &self.topo;
        self.unrouted.each(|code, n| {
            *totals
                .requests
                .entry((None, None, code as u16))
                .or_default() += n
        });
        for (e, t) in self.envs.iter().enumerate() {
            let Some(t) = t.get() else { continue };
            let name = &topo.environments[e].name;
            let out = totals.envs.entry(name.clone()).or_default();
            out.duration.add(&t.duration);
            out.connect.add(&t.connect);
            out.bytes_in += t.bytes_in.get();
            out.bytes_out += t.bytes_out.get();
            for (o, c) in out.arms.iter_mut().zip(&t.arms) {
                *o += c.get();
            }
            for (o, c) in out.tenant.iter_mut().zip(&t.tenant) {
                *o += c.get();
            }
            for (o, c) in out.failovers.iter_mut().zip(&t.failovers) {
                *o += c.get();
            }
            t.tenant_to.each(|to, n| {
                *out.tenant_to
                    .entry(topo.environments[to as usize - 1].name.clone())
                    .or_default() += n
            });
            t.own.each(|code, n| {
                *totals
                    .requests
                    .entry((Some(name.clone()), None, code as u16))
                    .or_default() += n
            });
        }
        if self.slots.iter().all(|s| s.get().is_none()) {
            return;
        }
        for_each_slot(topo, |slot, e, node| {
            if let Some(rows) = self.slots[slot].get() {
                let env = &topo.environments[e].name;
                let node = &topo.nodes[node].name;
                rows.each(|code, n| {
                    *totals
                        .requests
                        .entry((Some(env.clone()), Some(node.clone()), code as u16))
                        .or_default() += n
                });
            }
        });
    }
}

/// Calls `f(slot, environment, node)` for every counter slot of `topo`.
fn for_each_slot(topo: &Topology, mut f: impl FnMut(usize, EnvId, NodeId)) {
    for (e, env) in topo.environments.iter().enumerate() {
        for app in &env.apps {
            let read = app.read_pool.map(|r| &topo.pools[r].members[..]);
            let members = topo.pools[app.pool]
                .members
                .iter()
                .chain(read.unwrap_or(&[]));
            for (i, m) in members.enumerate() {
                f(app.slot + i, e, m.node);
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct HistogramTotals {
    pub bins: [u64; BINS],
    pub sum_ns: u64,
}

impl HistogramTotals {
    fn add(&mut self, h: &Histogram) {
        for (o, c) in self.bins.iter_mut().zip(&h.bins) {
            *o += c.get();
        }
        self.sum_ns += h.sum_ns.get();
    }

    fn merge(&mut self, h: &HistogramTotals) {
        for (o, c) in self.bins.iter_mut().zip(&h.bins) {
            *o += c;
        }
        self.sum_ns += h.sum_ns;
    }

    fn observe(&mut self, ns: u64) {
        self.bins[bin(ns)] += 1;
        self.sum_ns += ns;
    }

    pub fn count(&self) -> u64 {
        self.bins.iter().sum()
    }
}

/// One environment's counters, by name.
#[derive(Debug, Clone, Default)]
pub struct EnvTotals {
    pub duration: HistogramTotals,
    pub connect: HistogramTotals,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub arms: [u64; 2],
    pub tenant: [u64; 4],
    pub tenant_to: FxHashMap<Arc<str>, u64>,
    pub failovers: [u64; 4],
}

impl EnvTotals {
    fn merge(&mut self, o: &EnvTotals) {
        self.duration.merge(&o.duration);
        self.connect.merge(&o.connect);
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        for (a, b) in self.arms.iter_mut().zip(o.arms) {
            *a += b;
        }
        for (a, b) in self.tenant.iter_mut().zip(o.tenant) {
            *a += b;
        }
        for (a, b) in self.failovers.iter_mut().zip(o.failovers) {
            *a += b;
        }
        for (k, v) in &o.tenant_to {
            *self.tenant_to.entry(k.clone()).or_default() += v;
        }
    }
}

/// Requests by (environment, node, status); `None`: no environment, or envgate answered.
pub type RequestKey = (Option<Arc<str>>, Option<Arc<str>>, u16);

/// Counters by name: what a worker carries across generations, and what a scrape sums.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub requests: FxHashMap<RequestKey, u64>,
    pub envs: FxHashMap<Arc<str>, EnvTotals>,
}

impl Totals {
    pub fn merge(&mut self, o: &Totals) {
        for (k, v) in &o.requests {
            *self.requests.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.envs {
            self.envs.entry(k.clone()).or_default().merge(v);
        }
    }

    /// Keeps only the environments and nodes `topo` has.
    fn retain(&mut self, topo: &Topology) {
        let has_node = |n: &str| topo.nodes.iter().any(|x| &*x.name == n);
        let nodes: Option<rustc_hash::FxHashSet<&str>> =
            (topo.nodes.len() > 16).then(|| topo.nodes.iter().map(|n| &*n.name).collect());
        let node_kept = |n: &str| {
            nodes
                .as_ref()
                .map_or_else(|| has_node(n), |s| s.contains(n))
        };
        self.requests.retain(|(e, n, _), _| {
            e.as_ref().is_none_or(|e| topo.env_by_name(e).is_some())
                && n.as_ref().is_none_or(|n| node_kept(n))
        });
        self.envs.retain(|e, t| {
            t.tenant_to.retain(|to, _| topo.env_by_name(to).is_some());
            topo.env_by_name(e).is_some()
        });
    }

    /// One exchange, by name (the cold path: an exchange of an older generation).
    fn add(&mut self, topo: &Topology, f: &Facts, requests: bool, redirects: bool) {
        let env_name = |e: EnvId| topo.environments[e].name.clone();
        if requests {
            let key = (
                f.env().map(env_name),
                f.slot().map(|(_, n)| topo.nodes[n].name.clone()),
                f.code,
            );
            *self.requests.entry(key).or_default() += 1;
        }
        if !redirects {
            return;
        }
        if let Some((e, _, Some(to))) = f.tenant() {
            *self
                .envs
                .entry(env_name(e))
                .or_default()
                .tenant_to
                .entry(env_name(to))
                .or_default() += 1;
        }
    }

    fn add_all(&mut self, topo: &Topology, f: &Facts) {
        self.add(topo, f, true, false);
        let env_name = |e: EnvId| topo.environments[e].name.clone();
        if let Some(e) = f.env() {
            let t = self.envs.entry(env_name(e)).or_default();
            t.duration.observe(f.duration_ns);
            if let Some(c) = f.connect_ns() {
                t.connect.observe(c);
            }
            t.bytes_in += f.bytes_in;
            t.bytes_out += f.bytes_out;
            for (c, n) in t.failovers.iter_mut().zip(f.failovers) {
                *c += u64::from(n);
            }
        }
        if let Some((e, arm)) = f.canary() {
            self.envs.entry(env_name(e)).or_default().arms[usize::from(arm & 1)] += 1;
        }
        if let Some((e, decision, _)) = f.tenant() {
            self.envs.entry(env_name(e)).or_default().tenant[usize::from(decision & 3)] += 1;
        }
        self.add(topo, f, false, true);
    }
}

/// One worker's counters: the table of the generation it serves (written without a
/// lock), and the totals it carries from earlier generations (behind a lock the worker
/// takes only when it changes generation or on a cold path).
#[derive(Default)]
pub struct WorkerStats {
    inner: Mutex<Inner>,
    /// HTTP/1.1 requests the own codec served, and those it handed to hyper (`--http1
    /// fast`); written by the worker alone.
    http1_fast: [AtomicU64; 2],
}

#[derive(Default)]
struct Inner {
    current: Option<Arc<GenTally>>,
    carried: Totals,
}

impl WorkerStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker moves to `next`: the table it leaves is folded into the carried totals,
    /// which keep only what `next`'s topology still has.
    pub fn advance(&self, next: Arc<GenTally>) {
        let mut inner = self.lock();
        if let Some(old) = inner.current.take() {
            old.fold_into(&mut inner.carried);
        }
        inner.carried.retain(&next.topo);
        inner.current = Some(next);
    }

    /// One request the own HTTP/1.1 codec served (`declined`: handed to hyper).
    #[inline]
    pub fn count_fast(&self, declined: bool) {
        let c = &self.http1_fast[declined as usize];
        c.store(c.load(Relaxed) + 1, Relaxed);
    }

    /// Adds one exchange counted against `tally` (the generation it began in).
    #[inline]
    pub fn record(&self, tally: &Arc<GenTally>, current: bool, f: &Facts) {
        if current {
            tally.add(f, self);
        } else {
            self.late(tally, f);
        }
    }

    /// An exchange of an older generation, by name; dropped when its environment or node
    /// left the generation the worker serves now (a later reload bringing back the name
    /// must not bring back its count).
    #[cold]
    fn late(&self, tally: &GenTally, f: &Facts) {
        let mut inner = self.lock();
        if let Some(cur) = &inner.current {
            let (old, now) = (&*tally.topo, &*cur.topo);
            let env_kept = |e: EnvId| now.env_by_name(&old.environments[e].name).is_some();
            let node_kept = |n: NodeId| {
                let name = &old.nodes[n].name;
                now.nodes.get(n).is_some_and(|x| x.name == *name)
                    || now.nodes.iter().any(|x| x.name == *name)
            };
            if f.env().is_some_and(|e| !env_kept(e))
                || f.slot().is_some_and(|(_, n)| !node_kept(n))
                || f.canary().is_some_and(|(e, _)| !env_kept(e))
                || f.tenant()
                    .is_some_and(|(e, _, to)| !env_kept(e) || to.is_some_and(|t| !env_kept(t)))
            {
                return;
            }
        }
        inner.carried.add_all(&tally.topo, f);
    }

    #[cold]
    fn spill(&self, topo: &Topology, f: &Facts, requests: bool, redirects: bool) {
        self.lock().carried.add(topo, f, requests, redirects);
    }

    /// Adds this worker's counters to `out`.
    fn sum_into(&self, out: &mut Totals) {
        let inner = self.lock();
        out.merge(&inner.carried);
        if let Some(cur) = &inner.current {
            cur.fold_into(out);
        }
    }
}

/// The counters of every worker, summed at scrape time.
#[derive(Default)]
pub struct Stats {
    workers: Mutex<Vec<Arc<WorkerStats>>>,
}

impl Stats {
    /// The counters of a new worker.
    pub fn worker(&self) -> Arc<WorkerStats> {
        let w = Arc::new(WorkerStats::default());
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w.clone());
        w
    }

    /// Requests the own HTTP/1.1 codec served and handed to hyper, over every worker.
    pub fn http1_fast(&self) -> [u64; 2] {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = [0u64; 2];
        for w in workers.iter() {
            for (i, c) in w.http1_fast.iter().enumerate() {
                n[i] += c.load(Relaxed);
            }
        }
        n
    }

    /// Every worker's counters, by name, restricted to what `topo` has.
    pub fn totals(&self, topo: &Topology) -> Totals {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Totals::default();
        for w in &workers {
            w.sum_into(&mut out);
        }
        out.retain(topo);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_upper_bound() {
        assert_eq!(bin(0), 0);
        assert_eq!(bin(100_000), 0);
        assert_eq!(bin(100_001), 1);
        assert_eq!(bin(30_000_000_000), 16);
        assert_eq!(bin(30_000_000_001), 17);
    }

    #[test]
    fn rows_count_four_keys_then_refuse() {
        let r = Rows::default();
        for k in 1..=4 {
            assert!(r.add(k, k as u64));
        }
        assert!(r.add(2, 10));
        assert!(!r.add(5, 1));
        let mut seen = Vec::new();
        r.each(|k, n| seen.push((k, n)));
        assert_eq!(seen, vec![(1, 1), (2, 12), (3, 3), (4, 4)]);
    }
}
