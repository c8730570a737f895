//! One worker thread's state: its view of the live topology, its round-robin counters
//! and its upstream connection pools.
//!
//! `snapshot()` is the one lock-free load of the shared topology per request. When the
//! topology changed since the last request, the worker rebuilds its local tables (counters
//! per pool, connection pools per node, reusing the pool of every node whose address
//! stayed); otherwise it hands out an `Rc` to the tables it has.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use rustc_hash::FxHashMap;

use super::headers::{RequestIds, ValueArena};
use super::pool::ConnPool;
use crate::accesslog::{LogBuf, Sink};
use crate::balance::Wrr;
use crate::metrics::tally::{GenTally, WorkerStats};
use crate::server::{Shared, Tracker};
use crate::topology::{EnvId, Topology};

/// Request head limit (DESIGN.md: 64 KiB in all, 100 fields), for HTTP/1 and HTTP/2.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
pub const MAX_HEADERS: usize = 100;
/// HTTP/2 flow-control windows: what one stream, and one connection, may push at envgate
/// before it reads. With 1,000 connections pushing bodies at a slow node, this bounds the
/// buffered bytes to about 1 GiB in the worst case instead of hyper's default of several.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONN_WINDOW: u32 = 1024 * 1024;
/// Keep-alive pings on idle HTTP/2 connections, and how long a ping may go unanswered.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The tables of one topology generation, as seen by one worker.
pub struct LocalSnap {
    pub topo: Arc<Topology>,
    /// Indexed by `PoolId`.
    pub wrr: Vec<Wrr>,
    /// Indexed by `NodeId`.
    pub conns: Vec<Rc<ConnPool>>,
    /// This worker's retry budget per environment (indexed by `EnvId`), in retries.
    pub retry_tokens: Vec<Cell<f64>>,
    /// This worker's request counters for this generation. Each exchange's record keeps
    /// them: an `Rc` around the shared `Arc`, so that taking them costs no atomic operation
    /// (a locked instruction on the hot path, where it waits for every store before it).
    #[allow(clippy::redundant_allocation)]
    pub tally: Rc<Arc<GenTally>>,
    /// The own HTTP/1.1 codec serves requests to this topology (`--http1 fast`, and every
    /// node is spoken to over cleartext HTTP/1.1 without a cap).
    pub fast: bool,
}

impl LocalSnap {
    /// Credits the budget of `env` for one request.
    #[inline]
    pub fn earn_retry(&self, env: EnvId) {
        let b = &self.topo.defaults.retry_budget;
        let t = &self.retry_tokens[env];
        t.set((t.get() + b.percent / 100.0).min(b.cap()));
    }

    /// Spends one retry of `env`'s budget, if there is one.
    #[inline]
    pub fn spend_retry(&self, env: EnvId) -> bool {
        let t = &self.retry_tokens[env];
        if t.get() >= 1.0 {
            t.set(t.get() - 1.0);
            true
        } else {
            false
        }
    }
}

pub struct Worker {
    pub shared: Arc<Shared>,
    current: RefCell<Option<Rc<LocalSnap>>>,
    pub request_ids: RequestIds,
    pub values: ValueArena,
    /// The last client address made into a header value, and that value.
    pub last_peer: std::cell::RefCell<Option<(std::net::IpAddr, http::HeaderValue)>>,
    pub http1: http1::Builder,
    pub http2: http2::Builder<LocalExec>,
    /// Open connections and tunnels of this worker, for the drain at shutdown.
    pub tracker: Rc<Tracker>,
    /// xorshift64 state: canary buckets that nothing else decides (never zero).
    rng: Cell<u64>,
    /// This worker's request counters, as the collector sees them.
    pub stats: Arc<WorkerStats>,
    /// This worker's access log buffer, when the log is on.
    pub log: Option<LogBuf>,
    /// This worker's position among the process's workers.
    index: usize,
    /// HTTP/1.1 connections are served by the own codec where it can (`--http1 fast`).
    pub fast: bool,
}

/// A different non-zero seed per worker and per process.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS once per process, then advanced per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// Runs hyper's HTTP/2 stream tasks on this worker's `LocalSet`.
#[derive(Clone, Copy)]
pub struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

impl Worker {
    /// The HTTP builders take the timeouts of the topology at start: hyper's header-read
    /// timer runs from the moment a connection waits for a request head, so it bounds both
    /// a slow head and an idle keep-alive connection: min(client_header, idle).
    pub fn new(
        shared: Arc<Shared>,
        tracker: Rc<Tracker>,
        log: Option<Sink>,
        index: usize,
        fast: bool,
    ) -> Self {
        let timeouts = shared.topology.load().defaults.timeouts.clone();
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(timeouts.client_header.min(timeouts.idle))
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS);
        let mut h2 = http2::Builder::new(LocalExec);
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(200)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(Some(256));
        Worker {
            current: RefCell::new(None),
            request_ids: RequestIds::default(),
            values: ValueArena::default(),
            last_peer: Default::default(),
            http1: h1,
            http2: h2,
            tracker,
            rng: Cell::new(seed()),
            stats: shared.stats.worker(),
            log: log.map(LogBuf::new),
            index,
            fast,
            shared,
        }
    }

    /// Closes the idle node connections of the current topology's pools that would not be
    /// taken again (a pool is otherwise trimmed only when it is used: a worker left quiet
    /// after a burst would keep them open).
    pub fn sweep_pools(&self) {
        if let Some(cur) = &*self.current.borrow() {
            for p in &cur.conns {
                p.sweep();
            }
        }
    }

    /// Whether `tally` holds the counters of the generation this worker serves now (an
    /// exchange that began before the topology changed holds older ones).
    #[inline]
    pub fn is_current(&self, tally: &Arc<GenTally>) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&*c.tally, tally))
    }

    /// A pseudo-random number (xorshift64: cheap, and good enough to spread canary buckets).
    #[inline]
    pub fn random(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        x
    }

    /// The worker's tables for the live topology.
    #[inline]
    pub fn snapshot(&self) -> Rc<LocalSnap> {
        let live = self.shared.topology.load();
        if let Some(cur) = &*self.current.borrow() {
            if Arc::ptr_eq(&cur.topo, &live) {
                return cur.clone();
            }
        }
        let snap = Rc::new(self.build(Arc::clone(&live)));
        *self.current.borrow_mut() = Some(snap.clone());
        snap
    }

    /// Linear in the size of the topology, and cheap: a change usually keeps nodes and
    /// environments where they were, so each node's connection pool and each
    /// environment's retry balance is first looked for at its own index in the worker's
    /// previous tables, and by address or name only when it moved. The pools of nodes
    /// that left go with the previous tables (their idle connections close).
    fn build(&self, topo: Arc<Topology>) -> LocalSnap {
        let old = self.current.borrow();
        let mut moved: Option<FxHashMap<SocketAddr, Rc<ConnPool>>> = None;
        let conns: Vec<Rc<ConnPool>> = topo
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let fresh = || {
                    let p = Rc::new(ConnPool::new(n));
                    if n.max_connections.is_some() {
                        tokio::task::spawn_local(ConnPool::reclaim(Rc::downgrade(&p)));
                    }
                    p
                };
                let Some(old) = old.as_deref() else {
                    return fresh();
                };
                if let Some(c) = old.conns.get(i).filter(|c| c.serves(n)) {
                    return c.clone();
                }
                moved
                    .get_or_insert_with(|| old.conns.iter().map(|c| (c.addr, c.clone())).collect())
                    .get(&n.addr)
                    .filter(|c| c.serves(n))
                    .cloned()
                    .unwrap_or_else(fresh)
            })
            .collect();
        // Worker i starts i picks into each pool's cycle (bounded, so that a rebuild of
        // large pools stays cheap).
        let wrr = topo
            .pools
            .iter()
            .map(|p| {
                let n = p.members.len();
                match self.index % n.clamp(1, 64) {
                    0 => Wrr::new(n),
                    skip => Wrr::starting_at(&p.members, skip),
                }
            })
            .collect();
        // Balances carry over by environment name; a new environment starts at the floor.
        let budget = topo.defaults.retry_budget;
        let retry_tokens = topo
            .environments
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let carried = old.as_deref().and_then(|old| {
                    let same = old
                        .topo
                        .environments
                        .get(i)
                        .is_some_and(|o| o.name == e.name);
                    let i = if same {
                        i
                    } else {
                        old.topo.env_by_name(&e.name)?
                    };
                    Some(old.retry_tokens[i].get())
                });
                Cell::new(
                    carried
                        .unwrap_or(budget.min_retries as f64)
                        .min(budget.cap()),
                )
            })
            .collect();
        drop(old);
        let tally = Arc::new(GenTally::new(topo.clone()));
        self.stats.advance(tally.clone());
        let fast = self.fast && crate::h1::fast::takes(&topo);
        if !fast {
            // Pools carried over from a topology the own codec served keep its idle
            // connections, which nothing would take again.
            for c in &conns {
                c.close_fast();
            }
        }
        LocalSnap {
            fast,
            topo,
            wrr,
            conns,
            retry_tokens,
            tally: Rc::new(tally),
        }
    }
}
