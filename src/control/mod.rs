//! The apply path: the one way the live topology changes.
//!
//! Every source (start-up, SIGHUP, the file watch, and later the control API, rollback
//! and fleet mode) hands a document to `Control::apply`, which runs, serialised by one
//! lock: parse -> validate (pure: it reads no live state) -> compare with the running
//! topology -> bind node state -> swap (one `ArcSwap` store) -> wake the health checkers
//! -> record. A refused document changes nothing: not the topology, not a node's health or
//! trust, not the generation. Each apply bumps the generation and appends a record
//! (generation, source, result, time, diff summary, the document) to a bounded history.
//!
//! Requests never wait on this lock: they read the `ArcSwap` without locking, and a swap
//! is one atomic store. Requests in flight finish on the topology they started with.

pub mod api;
pub mod client;
pub mod diff;
pub mod fleet;
pub mod watch;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::config::{self, ConfigError, LoadError};
use crate::server::Shared;
use crate::topology::Topology;

/// How many applied or refused documents the history keeps.
pub const HISTORY: usize = 64;

/// Where a document came from (the `source` label of `envgate_topology_reloads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The document envgate started with.
    Start,
    /// The topology file changed (watched).
    File,
    /// SIGHUP.
    Signal,
    /// The control API.
    Api,
    /// A return to an earlier generation.
    Rollback,
    /// Another instance (fleet mode).
    Fleet,
    /// A certificate, key or CA file the topology reads changed (watched).
    Certificates,
    /// A node's host name resolved to other addresses.
    Dns,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Start => "start",
            Source::File => "file",
            Source::Signal => "signal",
            Source::Api => "api",
            Source::Rollback => "rollback",
            Source::Fleet => "fleet",
            Source::Certificates => "certificates",
            Source::Dns => "dns",
        }
    }
}

/// What an apply did (the `result` label: `applied`, `rejected`, `unchanged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Rejected,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Rejected => "rejected",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// Applies by source and result, since start (`envgate_topology_reloads_total`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReloadCounts([[u64; 3]; 8]);

impl ReloadCounts {
    pub fn get(&self, source: Source, result: Outcome) -> u64 {
        self.0[source as usize][result as usize]
    }
    fn add(&mut self, source: Source, result: Outcome) {
        self.0[source as usize][result as usize] += 1;
    }
}

/// One entry of the history.
#[derive(Debug, Clone)]
pub struct Record {
    /// The generation live after this apply (for a refused document, the one that stayed).
    pub generation: u64,
    pub source: Source,
    pub result: Outcome,
    pub at: SystemTime,
    /// What changed (`+environment blue; entry shop.com:80 blue -> green`), or why the
    /// document was refused.
    pub summary: String,
    /// The document, kept for applied ones (a rollback re-applies it).
    pub document: Option<Arc<str>>,
}

/// A change that was made (or, for a dry run, would be).
#[derive(Debug, Clone)]
pub struct Applied {
    pub generation: u64,
    pub diff: diff::Diff,
    /// Nothing changed: the document is the one running.
    pub unchanged: bool,
    /// The document that was running before (for a write-back that must not overwrite
    /// an edit it did not see).
    pub replaced: Arc<str>,
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Not YAML (or JSON), or not the shape of a topology.
    #[error("{0}")]
    Parse(String),
    /// Every problem validation found, each with its path.
    #[error("{} problem(s)", .0.len())]
    Invalid(Vec<ConfigError>),
    /// The write was conditional on generation `.0`, and `.1` is live now.
    #[error("the topology changed: generation {1} is live, not {0}")]
    Stale(u64, u64),
    /// Valid, but not applicable to the running instance: the document path concerned
    /// (`listeners`, `control.bind`, `defaults.timeouts`) and why.
    #[error("{1}")]
    Refused(&'static str, String),
}

impl From<LoadError> for ApplyError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Invalid(errs) => ApplyError::Invalid(errs),
            other => ApplyError::Parse(other.to_string()),
        }
    }
}

struct Inner {
    history: VecDeque<Record>,
    /// Topologies replaced by applies, kept until no worker holds them any more, then
    /// dropped off every request path: freeing a topology of 10,000 environments takes
    /// tens of milliseconds, which a worker's next request would otherwise pay.
    retired: Vec<Arc<Topology>>,
    /// Every apply, by source and result (the history forgets; these do not).
    counts: ReloadCounts,
}

/// The live generation, the document it was built from and its entity tag, read
/// together without a lock.
#[derive(Debug)]
pub struct Current {
    pub generation: u64,
    pub document: Arc<str>,
    /// `"g<generation>-<hash of the document>"`, computed once per apply (the document
    /// may be megabytes; readers compare tags, they do not hash it again).
    pub etag: String,
    /// The hash in the tag.
    doc_hash: u64,
}

impl Current {
    fn new(generation: u64, document: Arc<str>) -> Current {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        document.hash(&mut h);
        let doc_hash = h.finish();
        let etag = format!("\"g{generation}-{doc_hash:016x}\"");
        Current {
            generation,
            document,
            etag,
            doc_hash,
        }
    }
}

/// The apply path of one running instance.
pub struct Control {
    shared: Arc<Shared>,
    /// Where relative paths in documents point (the topology file's directory).
    base_dir: PathBuf,
    /// Replaced whole at each apply; readers (the API's GETs, the file watch) never wait.
    current: arc_swap::ArcSwap<Current>,
    /// Binds and closes listeners an apply adds or removes (`None`: listeners are fixed).
    listeners: Option<crate::server::ListenerControl>,
    /// Serialises the swap and the history. Held only for the diff, the swap and the
    /// record, never during the parse or validation (which may take a while), and never
    /// by requests.
    inner: Mutex<Inner>,
    /// The URL this instance follows (fleet mode): local writes are refused.
    follows: std::sync::OnceLock<String>,
    /// The hash of the local document the source's last document became, and the hash of
    /// the source's.
    fleet_hash: Mutex<Option<(u64, u64)>>,
    /// The answers for node host names (validation reads them; `dns::refresh_loop`
    /// renews them).
    dns: Arc<crate::dns::Cache>,
}

impl Control {
    /// The control of a server that started with `topology` (generation 1) read from
    /// `document`.
    pub fn new(
        shared: Arc<Shared>,
        document: &str,
        base_dir: &Path,
        listeners: Option<crate::server::ListenerControl>,
    ) -> Control {
        let generation = shared.topology.load().generation;
        let document: Arc<str> = Arc::from(document);
        let mut history = VecDeque::with_capacity(HISTORY);
        history.push_back(Record {
            generation,
            source: Source::Start,
            result: Outcome::Applied,
            at: SystemTime::now(),
            summary: "started".into(),
            document: Some(document.clone()),
        });
        Control {
            shared,
            base_dir: base_dir.to_path_buf(),
            current: arc_swap::ArcSwap::from_pointee(Current::new(generation, document)),
            listeners,
            inner: Mutex::new(Inner {
                history,
                retired: Vec::new(),
                counts: ReloadCounts::default(),
            }),
            follows: std::sync::OnceLock::new(),
            fleet_hash: Mutex::new(None),
            dns: Arc::default(),
        }
    }

    /// The answers for node host names.
    pub fn dns(&self) -> &Arc<crate::dns::Cache> {
        &self.dns
    }

    /// Fleet mode: this instance follows `url`; local writes are refused from now on.
    pub fn follow(&self, url: String) {
        let _ = self.follows.set(url);
    }

    /// The URL this instance follows, in fleet mode.
    pub fn following(&self) -> Option<&str> {
        self.follows.get().map(String::as_str)
    }

    /// The source's document (of hash `hash`) became generation `generation`. Kept with
    /// the local document it gave, so that re-applies of that same document (new answers
    /// for host names, renewed certificates) keep reporting it.
    pub fn set_fleet_hash(&self, generation: u64, hash: u64) {
        let now = self.current();
        if now.generation == generation {
            *self.fleet_hash.lock().unwrap_or_else(|e| e.into_inner()) = Some((now.doc_hash, hash));
        }
    }

    /// The hash instances compare to see that they converged: of the document as the
    /// source serves it (a follower's own document differs by its local keys), or of
    /// this instance's document when it follows nobody.
    pub fn topology_hash(&self) -> String {
        let now = self.current();
        let fleet = *self.fleet_hash.lock().unwrap_or_else(|e| e.into_inner());
        let h = match fleet {
            Some((doc, h)) if doc == now.doc_hash => h,
            _ => fleet::hash(&now.document),
        };
        format!("{h:016x}")
    }

    /// The live topology.
    pub fn topology(&self) -> Arc<Topology> {
        self.shared.topology.load_full()
    }

    /// The document the live topology was built from.
    pub fn document(&self) -> Arc<str> {
        self.current.load().document.clone()
    }

    /// The live generation, its document and entity tag, read together (without waiting
    /// on an apply).
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Open client connections by listener.
    pub fn connections(&self) -> Vec<(String, i64)> {
        self.shared.connections.by_listener()
    }

    /// Every worker's request counters, by name, for the live topology's environments
    /// and nodes.
    pub fn request_totals(&self) -> crate::metrics::tally::Totals {
        self.shared.stats.totals(&self.topology())
    }

    /// Requests the own HTTP/1.1 codec served, and those it handed to hyper.
    pub fn http1_fast(&self) -> [u64; 2] {
        self.shared.stats.http1_fast()
    }

    /// Access log lines dropped so far.
    pub fn log_dropped(&self) -> u64 {
        self.shared
            .log_dropped
            .as_ref()
            .map_or(0, |d| d.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Every apply since start, by source and result.
    pub fn reload_counts(&self) -> ReloadCounts {
        self.lock().counts
    }

    /// The history, oldest first.
    pub fn history(&self) -> Vec<Record> {
        self.lock().history.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written (each field is
        // replaced whole), so a poisoned lock is still good.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates `text` and, unless `dry_run`, makes it the live topology. The same steps
    /// for every source; a refused document changes nothing but the history.
    pub fn apply(&self, source: Source, text: &str, dry_run: bool) -> Result<Applied, ApplyError> {
        self.apply_on(source, text, dry_run, None)
    }

    /// `apply`, only if generation `base` is still the live one when the swap is made
    /// (`ApplyError::Stale` otherwise): a conditional write (`If-Match`), or a patch
    /// computed over that generation's document.
    pub fn apply_on(
        &self,
        source: Source,
        text: &str,
        dry_run: bool,
        base: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        self.apply_inner(source, text, None, dry_run, base)
    }

    /// Parses and validates `text` as `apply` would, changing nothing (for a source that
    /// looks at the result before applying it, like the file watch).
    pub fn parse(&self, text: &str) -> Result<Topology, LoadError> {
        config::parse_serving(
            text,
            &self.base_dir,
            &self.topology().served_certificates(),
            &self.dns,
        )
    }

    /// `apply` of a document already parsed by `parse` (not parsed a second time).
    pub fn apply_parsed(
        &self,
        source: Source,
        text: &str,
        parsed: Result<Topology, LoadError>,
    ) -> Result<Applied, ApplyError> {
        self.apply_inner(source, text, Some(parsed), false, None)
    }

    /// Applies `current`'s document again, already parsed with the files it reads (a
    /// certificate renewed): only if `current` is still live.
    pub fn apply_files(
        &self,
        current: &Current,
        parsed: Result<Topology, LoadError>,
    ) -> Result<Applied, ApplyError> {
        self.apply_inner(
            Source::Certificates,
            &current.document,
            Some(parsed),
            false,
            Some(current.generation),
        )
    }

    /// Applies `current`'s document again, already parsed with new answers for its host
    /// names: only if `current` is still live.
    pub fn apply_dns(
        &self,
        current: &Current,
        parsed: Result<Topology, LoadError>,
    ) -> Result<Applied, ApplyError> {
        self.apply_inner(
            Source::Dns,
            &current.document,
            Some(parsed),
            false,
            Some(current.generation),
        )
    }

    fn apply_inner(
        &self,
        source: Source,
        text: &str,
        parsed: Option<Result<Topology, LoadError>>,
        dry_run: bool,
        base: Option<u64>,
    ) -> Result<Applied, ApplyError> {
        let now = self.current();
        let (generation, running) = (now.generation, now.document.clone());
        if let Some(b) = base.filter(|b| *b != generation) {
            return Err(ApplyError::Stale(b, generation));
        }
        // The same document read again (SIGHUP, a certificate that changed): the files it
        // names are read again too, and new contents make it a change.
        let mut parsed = parsed;
        let mut same = text == &*running;
        if same && {
            let live = self.shared.topology.load();
            !live.files.is_empty() || !live.dns.is_empty()
        } {
            give_way();
            let again = parsed.take().unwrap_or_else(|| self.parse(text));
            same = again
                .as_ref()
                .is_ok_and(|t| diff::diff(&self.shared.topology.load(), t).is_empty());
            parsed = Some(again);
        }
        if same {
            if !dry_run {
                tracing::info!(
                    source = source.as_str(),
                    generation,
                    "topology read again: no change"
                );
                record(
                    &mut self.lock(),
                    generation,
                    source,
                    Outcome::Unchanged,
                    "no change".into(),
                    None,
                );
            }
            return Ok(Applied {
                generation,
                diff: diff::Diff::default(),
                unchanged: true,
                replaced: running,
            });
        }
        // The long part, outside the lock, at a lower priority than the workers.
        give_way();
        let parsed = parsed
            .unwrap_or_else(|| self.parse(text))
            .map_err(ApplyError::from);
        let mut inner = self.lock();
        let live = self.shared.topology.load_full();
        if let Some(b) = base.filter(|b| *b != live.generation) {
            return Err(ApplyError::Stale(b, live.generation));
        }
        let checked = parsed.and_then(|topology| match fixed_at_start(&live, &topology) {
            Some((path, why)) => Err(ApplyError::Refused(path, why)),
            None => Ok(topology),
        });
        // Listeners added (or moved) are bound now, so that a port that cannot be bound
        // refuses the change with the OS error before anything is swapped.
        let checked = checked.and_then(|topology| {
            let (added, removed) = listener_diff(&live, &topology);
            if (!added.is_empty() || !removed.is_empty()) && self.listeners.is_none() {
                return Err(ApplyError::Refused(
                    "listeners",
                    "listeners cannot change in this instance".into(),
                ));
            }
            let mut bound = Vec::new();
            if let Some(lc) = &self.listeners {
                for i in added {
                    let spec = &topology.listeners[i];
                    // Sockets share an address only within one listener's workers
                    // (SO_REUSEPORT): an address another listener or the control endpoint
                    // holds is refused, as the kernel would without it.
                    let taken = live
                        .listeners
                        .iter()
                        .find(|l| l.bind == spec.bind)
                        .map(|l| format!("listener {:?}", l.name))
                        .or_else(|| {
                            live.control
                                .as_ref()
                                .filter(|c| c.bind == spec.bind)
                                .map(|_| "the control endpoint".to_string())
                        });
                    if let Some(holder) = taken {
                        return Err(ApplyError::Refused(
                            "listeners",
                            format!(
                                "cannot bind listener {:?} on {}: {holder} is bound there (remove it in one change, add the new one in the next)",
                                spec.name, spec.bind
                            ),
                        ));
                    }
                    // A dry run only checks that the address is free (a socket of the
                    // reuse group would take a share of new connections meanwhile).
                    let sock = if dry_run {
                        lc.probe(spec)
                    } else {
                        lc.bind(spec)
                    };
                    match sock {
                        Ok(sock) => bound.push((spec.name.clone(), sock)),
                        Err(e) => {
                            return Err(ApplyError::Refused(
                                "listeners",
                                format!(
                                    "cannot bind listener {:?} on {}: {e}",
                                    spec.name, spec.bind
                                ),
                            ))
                        }
                    }
                }
            }
            Ok((topology, bound, removed))
        });
        let (topology, bound, removed) = match checked {
            Ok(t) => t,
            Err(e) => {
                if !dry_run {
                    let why = match &e {
                        ApplyError::Invalid(errs) => errs
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                        other => other.to_string(),
                    };
                    tracing::warn!(source = source.as_str(), problems = %why, "topology refused; the running one stays");
                    record(
                        &mut inner,
                        live.generation,
                        source,
                        Outcome::Rejected,
                        why,
                        None,
                    );
                }
                return Err(e);
            }
        };
        let diff = diff::diff(&live, &topology);
        let replaced = self.current.load().document.clone();
        if dry_run {
            return Ok(Applied {
                generation: live.generation + 1,
                diff,
                unchanged: false,
                replaced,
            });
        }
        for w in &topology.warnings {
            tracing::warn!(source = source.as_str(), "{w}");
        }
        let generation = self.swap(&live, topology, source);
        inner.retired.push(live);
        // Those only this list still holds are freed on a thread of their own.
        let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut inner.retired)
            .into_iter()
            .partition(|t| Arc::strong_count(t) == 1);
        inner.retired = kept;
        if !done.is_empty() {
            let _ = std::thread::Builder::new()
                .name("envgate-free".into())
                .spawn(move || drop(done));
        }
        // The new topology (with the entries of new ports) is live: listeners that went
        // away stop accepting (their connections go on), new ones start.
        if let Some(lc) = &self.listeners {
            for name in &removed {
                lc.stop(name);
                tracing::info!(listener = %name, "listener closed");
            }
            for (name, sock) in &bound {
                let tls = self
                    .shared
                    .topology
                    .load()
                    .listeners
                    .iter()
                    .any(|l| l.name == *name && l.tls.is_some());
                match lc.start(name, sock, tls) {
                    Ok(()) => {
                        tracing::info!(listener = %name, address = ?sock.local_addr().ok(), "listener added")
                    }
                    Err(e) => {
                        tracing::error!(listener = %name, error = %e, "cannot serve the new listener")
                    }
                }
            }
        }
        let document: Arc<str> = Arc::from(text);
        self.current
            .store(Arc::new(Current::new(generation, document.clone())));
        let summary = diff.to_string();
        tracing::info!(source = source.as_str(), generation, changes = %summary, "topology applied");
        record(
            &mut inner,
            generation,
            source,
            Outcome::Applied,
            summary,
            Some(document),
        );
        Ok(Applied {
            generation,
            diff,
            unchanged: false,
            replaced,
        })
    }

    /// Binds node state, carries the in-flight counters over, and publishes `topology`.
    fn swap(&self, live: &Topology, mut topology: Topology, source: Source) -> u64 {
        topology.generation = live.generation + 1;
        // Run-time drains stay through applies nobody made by hand.
        let automatic = matches!(source, Source::Dns | Source::Certificates);
        self.shared.registry.bind_keeping(&mut topology, automatic);
        // An environment that stays keeps counting its requests in flight, so a reload
        // does not open a second allowance next to the first.
        for env in &mut topology.environments {
            if let Some(old) = live.env_by_name(&env.name) {
                if let Some(env) = Arc::get_mut(env) {
                    env.in_flight = live.environments[old].in_flight.clone();
                    env.retried = live.environments[old].retried.clone();
                }
            }
        }
        let generation = topology.generation;
        self.shared.topology.store(Arc::new(topology));
        self.shared.topology_changed(generation);
        generation
    }
}

/// Lowers the calling thread's CPU priority by 10 nice levels, once: an apply (parse,
/// validation, diff, and the thread that frees the old topology, which inherits it) gives
/// way to the workers when they share a core, so a large apply delays requests as little
/// as possible. Linux keeps a nice value per thread; the thread stays lowered (raising
/// it back would need privileges), which suits the threads that apply: the control
/// endpoint's blocking pool, the file watch, the signal handler.
fn give_way() {
    thread_local!(static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if LOWERED.with(|l| l.replace(true)) {
        return;
    }
    // `None` is the calling thread.
    if let Ok(now) = rustix::process::getpriority_process(None) {
        let _ = rustix::process::setpriority_process(None, (now + 10).min(19));
    }
}

/// The listeners `new` adds (indices in `new`) and the names of those it removes. A
/// listener whose address or TLS changed is removed and added again.
fn listener_diff(live: &Topology, new: &Topology) -> (Vec<usize>, Vec<String>) {
    let same = |a: &crate::topology::ListenerSpec, b: &crate::topology::ListenerSpec| {
        a.name == b.name && a.bind == b.bind && a.tls.is_some() == b.tls.is_some()
    };
    let added = (0..new.listeners.len())
        .filter(|&i| !live.listeners.iter().any(|l| same(l, &new.listeners[i])))
        .collect();
    let removed = live
        .listeners
        .iter()
        .filter(|l| !new.listeners.iter().any(|n| same(l, n)))
        .map(|l| l.name.clone())
        .collect();
    (added, removed)
}

/// Most bytes of documents the history keeps for rollbacks; older records lose theirs.
pub const HISTORY_BYTES: usize = 256 * 1024 * 1024;

fn record(
    inner: &mut Inner,
    generation: u64,
    source: Source,
    result: Outcome,
    summary: String,
    document: Option<Arc<str>>,
) {
    inner.counts.add(source, result);
    if inner.history.len() == HISTORY {
        // Refusals and no-changes go first, so a run of bad saves does not push out the
        // documents a rollback needs.
        let i = inner
            .history
            .iter()
            .position(|r| r.result != Outcome::Applied)
            .unwrap_or(0);
        inner.history.remove(i);
    }
    inner.history.push_back(Record {
        generation,
        source,
        result,
        at: SystemTime::now(),
        summary,
        document,
    });
    // The oldest documents give way when the kept ones pass the budget.
    let mut bytes: usize = inner
        .history
        .iter()
        .filter_map(|r| r.document.as_ref().map(|d| d.len()))
        .sum();
    for r in inner.history.iter_mut() {
        if bytes <= HISTORY_BYTES {
            break;
        }
        if let Some(d) = r.document.take() {
            bytes -= d.len();
        }
    }
}

/// Why `new` cannot replace `live` in this running instance (what was fixed at start:
/// the control address, the servers' header and idle timeouts), if it cannot.
fn fixed_at_start(live: &Topology, new: &Topology) -> Option<(&'static str, String)> {
    // The HTTP/1 and HTTP/2 servers of each worker take these when the worker starts.
    let (a, b) = (&live.defaults.timeouts, &new.defaults.timeouts);
    if a.client_header != b.client_header || a.idle != b.idle {
        return Some(("defaults.timeouts", format!(
            "timeouts.client_header and timeouts.idle cannot change while running (restart to change them): running {:?}/{:?}, new {:?}/{:?}",
            a.client_header, a.idle, b.client_header, b.idle
        )));
    }
    let bind = |t: &Topology| t.control.as_ref().map(|c| c.bind);
    if bind(live) != bind(new) {
        return Some((
            "control.bind",
            format!(
            "control.bind cannot change while running (restart to rebind): running {:?}, new {:?}",
            bind(live),
            bind(new)
        ),
        ));
    }
    None
}
