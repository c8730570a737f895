//! Per-node state that outlives topology snapshots: health and administrative drain.
//!
//! A node is identified by its name and address; a reload that keeps both keeps the same
//! `NodeState`, so its health survives. The data plane only reads these atomics; the
//! control plane (checkers, the drain entry point, passive detection) writes them.

pub mod checker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::topology::Passive;

/// Milliseconds since the first call (never 0): a cheap monotonic clock for ejections.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Health as last decided for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not checked yet.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

impl Health {
    /// The word status and explain show.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        }
    }

    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }
}

#[derive(Debug)]
pub struct NodeState {
    health: AtomicU8,
    /// Whether an unknown node takes traffic (the node's `trust_unknown`).
    trust_unknown: AtomicBool,
    /// Drained by an operator: no new requests, checks go on.
    drained: AtomicBool,
    /// Consecutive failures seen on live traffic (passive detection).
    failures: AtomicU32,
    /// End of the current passive ejection, in `now_ms` time; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Ejections since the node last served a request well (the cool-down doubles).
    ejections: AtomicU32,
    /// Active checks that passed and failed (`envgate_health_checks_total`).
    checks_passed: AtomicU64,
    checks_failed: AtomicU64,
    /// Passive ejections started (`envgate_passive_ejections_total`).
    ejections_total: AtomicU64,
    /// The last active check, for status (written by the node's checker, read by the
    /// control endpoint; never touched by requests).
    last_check: std::sync::Mutex<Option<LastCheck>>,
    /// Connections open to the node from every worker (`max_connections`).
    pub conns: ConnCount,
}

/// The connections open to one node from every worker, in use and idle, against its
/// `max_connections`. Touched when a connection opens or closes, never per request.
#[derive(Debug, Default)]
pub struct ConnCount {
    open: AtomicU32,
    /// Woken when a connection closes: a request waiting for room may open one.
    pub freed: tokio::sync::Notify,
    /// Idle connections that requests waiting on other workers want closed.
    reclaim: AtomicU32,
    /// Wakes every worker's pool of the node to close idle connections for them.
    pub reclaim_wake: tokio::sync::Notify,
}

impl ConnCount {
    /// Counts a new connection, if `max` (when there is one) leaves room.
    pub fn try_open(&self, max: Option<u32>) -> bool {
        let Some(max) = max else {
            self.open.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A connection counted by `try_open` closed (or never opened); requests waiting for
    /// room are woken when the node has a cap.
    pub fn closed(&self, capped: bool) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if capped {
            self.freed.notify_waiters();
        }
    }

    /// Wants idle connections closed now (for requests waiting for room).
    pub fn wanted(&self) -> u32 {
        self.reclaim.load(Ordering::Acquire)
    }

    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// A request waits for room: an idle connection on another worker should close.
    pub fn want_idle(&self) {
        self.reclaim.fetch_add(1, Ordering::AcqRel);
        self.reclaim_wake.notify_waiters();
    }

    /// The waiter got its room another way: it no longer wants an idle connection closed.
    pub fn unwant(&self) {
        let _ = self
            .reclaim
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether an idle connection should close for a waiter (and the want is taken).
    pub fn take_reclaim(&self) -> bool {
        self.reclaim.load(Ordering::Acquire) > 0
            && self
                .reclaim
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
    }
}

/// The result of a node's last active check.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: std::time::SystemTime,
    pub passed: bool,
    /// `check passed`, or why it failed.
    pub detail: String,
}

impl NodeState {
    pub fn new(trust_unknown: bool) -> Self {
        NodeState {
            health: AtomicU8::new(Health::Unknown as u8),
            trust_unknown: AtomicBool::new(trust_unknown),
            drained: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
            last_check: std::sync::Mutex::new(None),
            conns: ConnCount::default(),
        }
    }

    /// Records one active check: counted, and kept as the last one.
    pub fn checked(&self, passed: bool, detail: String) {
        let c = if passed {
            &self.checks_passed
        } else {
            &self.checks_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(LastCheck {
            at: std::time::SystemTime::now(),
            passed,
            detail,
        });
    }

    /// The last active check, if one ran.
    pub fn last_check(&self) -> Option<LastCheck> {
        self.last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Active checks so far: (passed, failed).
    pub fn checks(&self) -> (u64, u64) {
        (
            self.checks_passed.load(Ordering::Relaxed),
            self.checks_failed.load(Ordering::Relaxed),
        )
    }

    /// Whether a passive ejection is in force now. Reads the clock only for a node that
    /// was ejected.
    #[inline]
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// A request to this node got its response head. Writes only when there is state to
    /// clear, so the common case is two relaxed loads.
    #[inline]
    pub fn record_success(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A request to this node failed by the node's own fault (connect, reset, timeout).
    /// Returns the ejection it starts, if this failure reaches the threshold and
    /// `may_eject` (the pool's cap on ejected nodes) allows it.
    pub fn record_failure(&self, policy: &Passive, may_eject: bool) -> Option<Duration> {
        if self.count_failure(policy) && may_eject {
            self.eject(policy)
        } else {
            None
        }
    }

    /// Counts one failure; true when the node has reached the ejection threshold and is
    /// not ejected already.
    pub fn count_failure(&self, policy: &Passive) -> bool {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        policy.consecutive_failures != 0 && n >= policy.consecutive_failures && !self.is_ejected()
    }

    /// Ejects the node for its cool-down, unless an ejection is already in force. Several
    /// workers may decide to eject at once: the compare-and-swap lets exactly one of them
    /// start the ejection (and double the next cool-down).
    pub fn eject(&self, policy: &Passive) -> Option<Duration> {
        let current = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        if current != 0 && now < current {
            return None;
        }
        let k = self.ejections.load(Ordering::Relaxed).min(16);
        let cool = policy
            .ejection
            .saturating_mul(1 << k)
            .min(policy.max_ejection);
        let until = now.saturating_add(cool.as_millis() as u64);
        self.ejected_until
            .compare_exchange(current, until, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        Some(cool)
    }

    /// Passive ejections started since the node was first seen.
    pub fn ejections_total(&self) -> u64 {
        self.ejections_total.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Sets the health and returns the previous one.
    pub fn set_health(&self, h: Health) -> Health {
        Health::from_u8(self.health.swap(h as u8, Ordering::Relaxed))
    }

    /// Whether the node takes traffic while unknown.
    pub fn trusts_unknown(&self) -> bool {
        self.trust_unknown.load(Ordering::Relaxed)
    }

    pub fn set_trust_unknown(&self, trust: bool) {
        self.trust_unknown.store(trust, Ordering::Relaxed);
    }

    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Ordering::Relaxed);
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Relaxed)
    }

    /// Whether new requests may go to this node. Relaxed loads: a request that sees a
    /// flip a little late is within the tolerance of health checking itself.
    #[inline]
    pub fn usable(&self) -> bool {
        if self.drained.load(Ordering::Relaxed) || self.is_ejected() {
            return false;
        }
        match self.health.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => self.trust_unknown.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_after_consecutive_failures_doubles_and_success_clears() {
        let s = NodeState::new(true);
        let p = Passive {
            consecutive_failures: 3,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
        };
        assert_eq!(s.record_failure(&p, true), None);
        assert_eq!(s.record_failure(&p, true), None);
        assert_eq!(s.record_failure(&p, true), Some(Duration::from_secs(10)));
        assert!(s.is_ejected() && !s.usable());
        // Already ejected: no second ejection.
        assert_eq!(s.record_failure(&p, true), None);
        assert!(s.record_success());
        assert!(s.usable());
        // The cap on ejected nodes wins over the threshold.
        for _ in 0..5 {
            assert_eq!(s.record_failure(&p, false), None);
        }
        assert!(s.usable());
        s.record_success();
        for _ in 0..2 {
            s.record_failure(&p, true);
        }
        assert_eq!(s.record_failure(&p, true), Some(Duration::from_secs(10)));
        s.ejected_until.store(1, Ordering::Relaxed); // the cool-down is over
        assert_eq!(s.record_failure(&p, true), Some(Duration::from_secs(20)));
        s.ejected_until.store(1, Ordering::Relaxed);
        assert_eq!(s.record_failure(&p, true), Some(Duration::from_secs(25)));
    }

    #[test]
    fn concurrent_ejections_count_once() {
        let s = Arc::new(NodeState::new(true));
        let p = Passive {
            consecutive_failures: 1,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 100,
        };
        let ejected = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if s.record_failure(&p, true).is_some() {
                            ejected.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(ejected.load(Ordering::Relaxed), 1);
        assert_eq!(s.ejections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn drained_is_never_usable() {
        let s = NodeState::new(true);
        s.set_drained(true);
        assert!(!s.usable());
        s.set_drained(false);
        assert!(s.usable());
    }
}

/// A node's identity: its name and address.
type NodeKey = (Arc<str>, SocketAddr);

/// Node states by identity, shared by every topology snapshot. Written only when a
/// topology is applied (control plane), never by requests.
#[derive(Debug, Default)]
pub struct NodeRegistry {
    states: Mutex<rustc_hash::FxHashMap<NodeKey, Arc<NodeState>>>,
    /// Drains set at run time (`Server::set_drained`), by node name (a document name, or
    /// a member's): they hold over the document's `drain` until an apply an operator made
    /// (not one that only re-read certificates or host names).
    drains: Mutex<rustc_hash::FxHashMap<Arc<str>, bool>>,
}

impl NodeRegistry {
    /// Binds every node of an accepted topology to its live state (created for a new node;
    /// a node that keeps its name and address keeps its health, drain and ejection), sets
    /// its `trust_unknown` and drain (the document's `drain`), and forgets the nodes the topology no longer has. The apply
    /// step calls it once the topology was accepted: validation itself never touches live
    /// state. Linear in the number of nodes, under one lock.
    pub fn bind(&self, topology: &mut crate::topology::Topology) {
        self.bind_keeping(topology, false)
    }

    /// `bind`; with `keep_drains`, drains set at run time stay (an apply of the running
    /// document with new host-name answers or certificates), else they are forgotten.
    pub fn bind_keeping(&self, topology: &mut crate::topology::Topology, keep_drains: bool) {
        let drains = {
            let mut d = self.drains.lock().unwrap_or_else(|e| e.into_inner());
            if !keep_drains {
                d.clear();
            }
            d.clone()
        };
        // The lock is only taken while applying a topology, off the hot path.
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut old = std::mem::take(&mut *states);
        states.reserve(topology.nodes.len());
        for n in &mut topology.nodes {
            use std::collections::hash_map::Entry;
            let state = match states.entry((n.name.clone(), n.addr)) {
                Entry::Occupied(o) => o.get().clone(),
                Entry::Vacant(v) => {
                    let s = old
                        .remove(v.key())
                        .unwrap_or_else(|| Arc::new(NodeState::new(n.health.trust_unknown)));
                    v.insert(s).clone()
                }
            };
            state.set_trust_unknown(n.health.trust_unknown);
            let drained = drains
                .get(&*n.name)
                .or_else(|| drains.get(&*n.defined))
                .copied()
                .unwrap_or(n.drain);
            state.set_drained(drained);
            n.state = state;
        }
    }

    /// Records a drain set at run time on node `name` (see `drains`).
    pub fn note_drain(&self, name: &str, drained: bool) {
        self.drains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::from(name), drained);
    }

    /// The live state of node `name` at `addr`, if a topology has it.
    pub fn get(&self, name: &str, addr: SocketAddr) -> Option<Arc<NodeState>> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        states.get(&(Arc::from(name), addr)).cloned()
    }
}
