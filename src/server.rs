//! `start()`: the worker threads, the live topology, shutdown and the apply path.
//!
//! Each worker is a thread with a current-thread runtime and a `LocalSet`, serving every
//! listener through a listening socket of its own (SO_REUSEPORT: the kernel spreads new
//! connections over the workers' sockets and wakes one worker per connection, like nginx's
//! `reuseport`). The live topology is one
//! `ArcSwap` in `Shared`; `control::Control::apply` is the one way to change it. Shutdown: stop
//! accepting, ask every connection to finish (HTTP/1 closes after the response in flight,
//! HTTP/2 sends GOAWAY), wait for them up to the drain timeout, then return.

use std::cell::Cell;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::control::api::{self, Api};
use crate::control::Control;
use crate::health::{checker, NodeRegistry};
use crate::proxy::listener::{accept_loop, ListenerMeta};
use crate::proxy::worker::Worker;
use crate::topology::Topology;

/// State shared by every worker and the control plane.
pub struct Shared {
    /// The live topology. Written only by `control::Control::apply`.
    pub topology: ArcSwap<Topology>,
    /// Node health and drain, by node identity, across topologies.
    pub registry: Arc<NodeRegistry>,
    /// Tells the control plane (health checkers) that the topology changed.
    changed: watch::Sender<u64>,
    /// True once the first round of health checks has given its verdicts: workers accept
    /// only then (connections wait in the accept queue meanwhile), so the first requests
    /// do not meet nodes that are merely not checked yet.
    pub ready: watch::Sender<bool>,
    /// Open client connections by listener, for the metrics.
    pub connections: crate::metrics::Connections,
    /// Every listening socket, for a handoff to a new instance (`upgrade`).
    pub sockets: Arc<crate::upgrade::Sockets>,
    /// Every worker's request counters, for the metrics and the status page.
    pub stats: crate::metrics::tally::Stats,
    /// Access log lines dropped because its writer fell behind (none without a log).
    pub log_dropped: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Counts a worker's open connections so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    open: Cell<usize>,
    idle: Notify,
}

/// One open connection or tunnel; dropping it ends its count.
pub struct TrackerGuard(Rc<Tracker>);

impl Tracker {
    pub fn enter(self: &Rc<Self>) -> TrackerGuard {
        self.open.set(self.open.get() + 1);
        TrackerGuard(self.clone())
    }

    async fn wait_idle(&self) {
        while self.open.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        let left = self.0.open.get() - 1;
        self.0.open.set(left);
        if left == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A change of the listeners, for every worker: serve a new listening socket (each
/// worker gets its own clone), or stop accepting on one (its connections go on).
pub enum ListenerCmd {
    Start(StdListener, ListenerMeta),
    Stop(String),
}

/// The listening socket worker `worker` serves `l`'s address with: `l` itself for the
/// first, a socket of its own (SO_REUSEPORT) for the others, so that the kernel spreads
/// new connections over the workers and wakes one worker per connection instead of all.
/// A socket bound without SO_REUSEPORT (by an embedder) is shared instead.
fn worker_socket(l: &StdListener, worker: usize) -> std::io::Result<StdListener> {
    if worker > 0 {
        if let Ok(own) = l.local_addr().and_then(bind) {
            own.set_nonblocking(true)?;
            return Ok(own);
        }
    }
    l.try_clone()
}

/// How the apply path reaches the workers' listeners.
pub struct ListenerControl {
    pub workers: Vec<tokio::sync::mpsc::UnboundedSender<ListenerCmd>>,
    /// Every listening socket, for a handoff to a new instance.
    pub sockets: Arc<crate::upgrade::Sockets>,
}

impl ListenerControl {
    /// Binds `spec`'s address (the OS error when it cannot) for `start`.
    pub fn bind(&self, spec: &crate::topology::ListenerSpec) -> std::io::Result<StdListener> {
        let l = bind(spec.bind)?;
        l.set_nonblocking(true)?;
        Ok(l)
    }

    /// Whether `spec`'s address can be bound, without joining any socket's reuse group
    /// (for a dry run).
    pub fn probe(&self, spec: &crate::topology::ListenerSpec) -> std::io::Result<StdListener> {
        bind_with(spec.bind, false)
    }

    /// Starts serving `sock` on every worker (a TLS listener's certificates are those of
    /// the live topology's listener `name`).
    pub fn start(&self, name: &str, sock: &StdListener, tls: bool) -> std::io::Result<()> {
        let port = sock.local_addr()?.port();
        for (i, w) in self.workers.iter().enumerate() {
            let own = worker_socket(sock, i)?;
            self.sockets.add(name, &own);
            let _ = w.send(ListenerCmd::Start(
                own,
                ListenerMeta {
                    name: name.to_string(),
                    port,
                    tls,
                },
            ));
        }
        Ok(())
    }

    /// Stops accepting on listener `name` in every worker.
    pub fn stop(&self, name: &str) {
        self.sockets.remove(name);
        for w in &self.workers {
            let _ = w.send(ListenerCmd::Stop(name.to_string()));
        }
    }
}

/// How to run.
#[derive(Debug, Default)]
pub struct Options {
    /// Worker threads; 0 means one per CPU.
    pub workers: usize,
    /// The document the topology was read from (kept in the history; a later apply of
    /// the same text is no change).
    pub document: String,
    /// Where relative paths in documents point (the topology file's directory).
    pub base_dir: std::path::PathBuf,
    /// The topology file, where changes made through the control endpoint are written
    /// back (`None`: they live in memory only).
    pub file: Option<std::path::PathBuf>,
    /// Where the workers write their access log lines (`None`: no access log).
    pub access_log: Option<crate::accesslog::Sink>,
    /// Listening sockets received from the instance this one replaces, by listener name
    /// (`upgrade::CONTROL` for the control endpoint's): served instead of binding.
    pub inherited: Vec<(String, StdListener)>,
    /// Which codec serves HTTP/1.1 connections.
    pub http1: Http1,
}

/// Which codec serves HTTP/1.1 connections (`--http1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http1 {
    /// hyper, for every connection.
    Hyper,
    /// The own codec (`h1::fast`) for what it takes; hyper for the rest.
    #[default]
    Fast,
}

impl Http1 {
    /// From `ENVGATE_HTTP1` (`hyper` or `fast`; the own codec when unset), the variable
    /// `--http1` also reads: the test suite runs against either codec with it.
    pub fn from_env() -> Self {
        match std::env::var("ENVGATE_HTTP1").as_deref() {
            Ok("hyper") => Http1::Hyper,
            Ok("fast") | Err(_) => Http1::Fast,
            Ok(other) => {
                // As `--http1` would refuse it; said here, where nothing else would.
                eprintln!("ENVGATE_HTTP1={other:?} is neither `fast` nor `hyper`: using `fast`");
                Http1::Fast
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("node {0:?} is not in the running topology")]
pub struct UnknownNode(pub String);

impl Shared {
    /// Wakes the health checkers after a swap.
    pub(crate) fn topology_changed(&self, generation: u64) {
        let _ = self.changed.send(generation);
    }
}

/// A running envgate.
pub struct Server {
    shared: Arc<Shared>,
    control: Arc<Control>,
    shutdown: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

/// Binds a listener the way envgate serves it: address reuse, SO_REUSEPORT (so that each
/// worker can have a socket of its own on the address) and a deep accept queue (the
/// accept loop asks for connections once their first bytes came: `sys::defer_accept`).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<StdListener> {
    bind_with(addr, true)
}

/// `bind`, with or without SO_REUSEPORT (the control endpoint goes without: a second
/// instance on the same control address fails to start instead of sharing it).
fn bind_with(addr: std::net::SocketAddr, reuse_port: bool) -> std::io::Result<StdListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Starts serving `topology` on `listeners` (one per topology listener, by name, already
/// bound). Returns once every worker runs.
pub fn start(
    mut topology: Topology,
    registry: Arc<NodeRegistry>,
    listeners: Vec<(String, StdListener)>,
    mut options: Options,
) -> std::io::Result<Server> {
    // Inherited sockets besides the listeners' own (`listeners` holds one of each
    // listener's): given to the other workers, and any left over to the first worker as
    // extra accept loops, so that every socket the old instance had is accepted on.
    let mut inherited: std::collections::HashMap<String, Vec<StdListener>> = Default::default();
    for (name, sock) in std::mem::take(&mut options.inherited) {
        inherited.entry(name).or_default().push(sock);
    }
    let inherited_control = inherited
        .remove(crate::upgrade::CONTROL)
        .and_then(|mut v| v.pop());
    for spec in &topology.listeners {
        if !listeners.iter().any(|(n, _)| *n == spec.name) {
            return Err(std::io::Error::other(format!(
                "listener {:?} was not bound",
                spec.name
            )));
        }
    }
    if topology.generation == 0 {
        topology.generation = 1;
        for w in &topology.warnings {
            tracing::warn!("{w}");
        }
    }
    registry.bind(&mut topology);
    let ports: Vec<(String, u16)> = listeners
        .iter()
        .map(|(name, l)| {
            let configured = topology
                .listeners
                .iter()
                .find(|s| s.name == *name)
                .map(|s| s.bind.port());
            let port = match configured {
                Some(p) if p != 0 => p,
                _ => l.local_addr().map(|a| a.port()).unwrap_or(0),
            };
            (name.clone(), port)
        })
        .collect();
    for (_, l) in &listeners {
        l.set_nonblocking(true)?;
    }
    let (changed, changed_rx) = watch::channel(topology.generation);
    let ready_bound = topology
        .nodes
        .iter()
        .map(|n| n.health.timeout)
        .max()
        .unwrap_or_default();
    // The control endpoint is bound before anything starts: an address that cannot be
    // bound fails the start with the OS error.
    let control_listener = match &topology.control {
        Some(_) if inherited_control.is_some() => {
            let l = inherited_control.expect("checked");
            l.set_nonblocking(true)?;
            Some(l)
        }
        Some(c) => {
            let l = bind_with(c.bind, false).map_err(|e| {
                std::io::Error::new(e.kind(), format!("control endpoint {}: {e}", c.bind))
            })?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        topology: ArcSwap::from_pointee(topology),
        registry,
        changed,
        ready: watch::channel(false).0,
        connections: Default::default(),
        stats: Default::default(),
        log_dropped: options.access_log.as_ref().map(|s| s.dropped.clone()),
        sockets: Default::default(),
    });
    if let Some(l) = &control_listener {
        shared.sockets.add(crate::upgrade::CONTROL, l);
    }
    let (tx, rx) = watch::channel(false);
    let workers = match options.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    // One channel a worker, for listeners added or removed by an apply.
    let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| tokio::sync::mpsc::unbounded_channel::<ListenerCmd>())
        .unzip();
    let control = Arc::new(Control::new(
        shared.clone(),
        &options.document,
        &options.base_dir,
        Some(ListenerControl {
            workers: senders,
            sockets: shared.sockets.clone(),
        }),
    ));
    let mut handles = Vec::new();
    {
        let (shared, rx) = (shared.clone(), rx.clone());
        let api = control_listener.map(|l| {
            (
                Arc::new(Api {
                    control: control.clone(),
                    file: options.file.clone(),
                    ready: shared.ready.subscribe(),
                    stopping: rx.clone(),
                    metrics: crate::metrics::Metrics::new(control.clone()).registry(),
                }),
                l,
            )
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let dns = (control.clone(), rx.clone());
        handles.push(
            std::thread::Builder::new()
                .name("envgate-control".into())
                .spawn(move || {
                    let ready = shared.ready.clone();
                    rt.block_on(async move {
                        if let Some((api, listener)) = api {
                            tokio::spawn(api::serve(api, listener));
                        }
                        tokio::spawn(crate::dns::refresh_loop(dns.0, dns.1));
                        checker::supervise(shared, changed_rx, rx, ready).await
                    })
                })?,
        );
    }
    // Each worker's sockets: its own for every listener (an inherited one first), and the
    // first worker also serves the inherited sockets no worker took.
    let mut per_worker: Vec<Vec<(StdListener, ListenerMeta)>> = Vec::new();
    let first = shared.topology.load_full();
    let is_tls = |name: &str| {
        first
            .listeners
            .iter()
            .any(|l| l.name == name && l.tls.is_some())
    };
    for i in 0..workers {
        let mut socks = Vec::new();
        for ((name, l), (_, port)) in listeners.iter().zip(&ports) {
            let own = match inherited.get_mut(name).filter(|v| i > 0 && !v.is_empty()) {
                Some(v) => {
                    let s = v.remove(0);
                    s.set_nonblocking(true)?;
                    s
                }
                None => worker_socket(l, i)?,
            };
            shared.sockets.add(name, &own);
            let meta = ListenerMeta {
                name: name.clone(),
                port: *port,
                tls: is_tls(name),
            };
            socks.push((own, meta));
        }
        per_worker.push(socks);
    }
    for ((name, left), (_, port)) in listeners
        .iter()
        .map(|(n, _)| (n.clone(), inherited.remove(n).unwrap_or_default()))
        .zip(&ports)
    {
        for s in left {
            s.set_nonblocking(true)?;
            shared.sockets.add(&name, &s);
            let meta = ListenerMeta {
                name: name.clone(),
                port: *port,
                tls: is_tls(&name),
            };
            per_worker[0].push((s, meta));
        }
    }
    for (i, socks) in per_worker.into_iter().enumerate() {
        let shared = shared.clone();
        let rx = rx.clone();
        let cmds = receivers.remove(0);
        let log = options.access_log.clone();
        let fast = options.http1 == Http1::Fast;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("envgate-worker-{i}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(
                        &rt,
                        worker_main(shared, socks, rx, cmds, ready_bound, log, i, fast),
                    );
                })?,
        );
    }
    Ok(Server {
        shared,
        control,
        shutdown: tx,
        workers: handles,
    })
}

#[allow(clippy::too_many_arguments)]
async fn worker_main(
    shared: Arc<Shared>,
    socks: Vec<(StdListener, ListenerMeta)>,
    mut shutdown: watch::Receiver<bool>,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<ListenerCmd>,
    ready_bound: Duration,
    log: Option<crate::accesslog::Sink>,
    index: usize,
    fast: bool,
) {
    let mut ready = shared.ready.subscribe();
    let _ = tokio::time::timeout(
        ready_bound + Duration::from_millis(200),
        ready.wait_for(|r| *r),
    )
    .await;
    let tracker = Rc::new(Tracker::default());
    let worker = Rc::new(Worker::new(
        shared.clone(),
        tracker.clone(),
        log,
        index,
        fast,
    ));
    if worker.log.is_some() {
        let worker = worker.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(crate::accesslog::FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Some(log) = &worker.log {
                    log.flush();
                }
            }
        });
    }
    {
        let worker = worker.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(crate::proxy::pool::SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                worker.sweep_pools();
            }
        });
    }
    // A topology change is taken at once, not at the worker's next request: the pools of
    // nodes that left or changed (and their idle connections, which count against a
    // node's cap) go now, also on a worker that gets no traffic.
    {
        let worker = worker.clone();
        let mut changed = shared.changed.subscribe();
        tokio::task::spawn_local(async move {
            while changed.changed().await.is_ok() {
                drop(worker.snapshot());
            }
        });
    }
    // A worker-local copy of the shutdown signal keeps per-connection clones off the
    // shared channel's counters.
    let (local_tx, local_rx) = watch::channel(false);
    // The accept loop of each listener, by name: an apply may stop one (its connections
    // go on) or start a new one.
    let mut loops: std::collections::HashMap<String, Vec<tokio::task::JoinHandle<()>>> =
        Default::default();
    let start =
        |loops: &mut std::collections::HashMap<String, Vec<tokio::task::JoinHandle<()>>>,
         sock: StdListener,
         meta: ListenerMeta| {
            let name = meta.name.clone();
            let active = shared.connections.slot(&name);
            let task = tokio::task::spawn_local(accept_loop(
                worker.clone(),
                sock,
                Rc::new(meta),
                local_rx.clone(),
                tracker.clone(),
                active,
            ));
            // A listener may have several sockets in one worker (inherited ones).
            loops.entry(name).or_default().push(task);
        };
    for (sock, meta) in socks {
        start(&mut loops, sock, meta);
    }
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { break },
            cmd = cmds.recv() => match cmd {
                Some(ListenerCmd::Start(sock, meta)) => start(&mut loops, sock, meta),
                Some(ListenerCmd::Stop(name)) => {
                    for task in loops.remove(&name).unwrap_or_default() {
                        task.abort();
                    }
                }
                None => {}
            },
        }
    }
    let _ = local_tx.send(true);
    let drain = shared.topology.load().defaults.timeouts.drain;
    if tokio::time::timeout(drain, tracker.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.open.get(),
            "drain timed out; closing the remaining connections"
        );
    }
    if let Some(log) = &worker.log {
        log.flush();
    }
}

impl Server {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The live topology.
    pub fn topology(&self) -> Arc<Topology> {
        self.shared.topology.load_full()
    }

    /// The apply path: every change of the topology goes through it.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Drains a node (`true`): it gets no new requests, finishes those in flight, and
    /// keeps being health-checked; `false` returns it to service. `node` is a document
    /// name (every member of a node addressed by a host name, those to come included) or
    /// one member's. Applies wherever the node is used, until the next apply an operator
    /// makes, which sets drain from the document (the node's `drain` key, which the
    /// control API patches); applies of new host-name answers or certificates keep it.
    pub fn set_drained(&self, node: &str, drained: bool) -> Result<(), UnknownNode> {
        let topo = self.shared.topology.load();
        // A node's name, or one member's of a node addressed by a host name.
        let mut found = false;
        for n in topo
            .nodes
            .iter()
            .filter(|n| &*n.name == node || &*n.defined == node)
        {
            n.state.set_drained(drained);
            found = true;
        }
        if !found {
            return Err(UnknownNode(node.to_string()));
        }
        self.shared.registry.note_drain(node, drained);
        tracing::info!(node, drained, "node drain changed");
        Ok(())
    }

    /// Stops accepting, drains open connections (bounded by the drain timeout) and waits
    /// for the workers to end.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for w in self.workers {
            let _ = w.join();
        }
    }
}
