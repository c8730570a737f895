//! Nodes addressed by a host name (`address: "orders.internal:8000"`).
//!
//! Each address a name resolves to becomes a *member* of the node: a node of its own in
//! the topology (named `orders@10.0.0.7:8000`), with its own health, passive ejection,
//! connection pool, cap and metrics, and the node's weight, backup flag and settings.
//! Environments and applications that name the node get every member.
//!
//! Names are resolved off the request path: when a document is validated (only names not
//! seen before, all at once, bounded by `defaults.dns.timeout`), and then every
//! `defaults.dns.interval` by a task on the control thread. When the answers differ from
//! the running topology's members, the running document is applied again (source `dns`),
//! through the same apply path as any change: members that left are drained (requests in
//! flight finish; no new ones), new ones are health-checked before they serve.
//!
//! The system resolver (`getaddrinfo`) answers, so `/etc/hosts`, `nsswitch.conf` and the
//! search domains of `resolv.conf` (Kubernetes' short service names) work as for any
//! other program on the machine. It gives no TTL, so the interval is the refresh period.
//! `defaults.dns.hosts` names a file in hosts format consulted first: the names it lists
//! are answered from it alone (re-read at every refresh).
//!
//! A name that stops resolving keeps its last good answer for `defaults.dns.hold`, then
//! loses its members (its environments get 503 if nothing else can serve them). A name
//! that never resolved has no members; both are warnings, never a refused topology.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `defaults.dns`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// How often every name in use is resolved again.
    pub interval: Duration,
    /// How long a name that stops resolving keeps its last good answer.
    pub hold: Duration,
    /// Longest wait for one resolution.
    pub timeout: Duration,
    /// A hosts-format file answered from before the system resolver.
    pub hosts: Option<PathBuf>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            interval: Duration::from_secs(5),
            hold: Duration::from_secs(300),
            timeout: Duration::from_secs(2),
            hosts: None,
        }
    }
}

/// Most members one name may have (a headless Service of a large deployment fits; a
/// wildcard record answering thousands of addresses does not flood the topology).
pub const MAX_MEMBERS: usize = 256;

/// What a name resolves to now, as the topology uses it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    /// Sorted, without duplicates: the members, in a stable order.
    pub addrs: Vec<IpAddr>,
    /// Why the last resolution failed, when it did (the addresses are then the last good
    /// answer, held, or none).
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    answer: Answer,
    /// When the name last resolved (`None`: never).
    good_at: Option<Instant>,
    /// When the name was first looked up (a refresh forgets only names it knew of).
    added: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            answer: Answer::default(),
            good_at: None,
            added: now,
        }
    }
}

/// Most lookups of the system resolver running at once. A lookup that outlives the
/// timeout keeps its thread until `getaddrinfo` returns (it cannot be stopped); the name
/// is not looked up again meanwhile, and past this bound new lookups fail at once, so a
/// resolver that drops packets cannot pile up threads.
pub const MAX_RUNNING_LOOKUPS: usize = 64;

/// Largest hosts file read (a bigger one is refused).
pub const MAX_HOSTS_FILE: u64 = 4 << 20;

/// The answers of every name looked up so far, shared by validation and the refresh task
/// of one instance. Only the control plane uses it, never a request.
#[derive(Debug, Default)]
pub struct Cache {
    entries: Mutex<HashMap<String, Entry>>,
    /// Names whose system lookup is still running (maybe past its timeout).
    running: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer for `host`, if it was looked up.
    pub fn get(&self, host: &str) -> Option<Answer> {
        self.lock().get(host).map(|e| e.answer.clone())
    }

    /// Resolves the names of `hosts` this cache has never seen, all at once, waiting at
    /// most `spec.timeout` (a lookup still running then counts as failed; it is tried
    /// again at the next refresh). Blocking: for validation, on the control plane.
    pub fn resolve_new(&self, hosts: &[&str], spec: &Spec) {
        let new: Vec<String> = {
            let entries = self.lock();
            let mut new: Vec<String> = hosts
                .iter()
                .filter(|h| !entries.contains_key(**h))
                .map(|h| h.to_string())
                .collect();
            new.sort_unstable();
            new.dedup();
            new
        };
        if new.is_empty() {
            return;
        }
        let results = resolve_all(&new, spec, &self.running);
        let now = Instant::now();
        let mut entries = self.lock();
        for (host, result) in new.into_iter().zip(results) {
            let e = entries.entry(host).or_insert_with(|| Entry::new(now));
            update(e, result, spec.hold, now);
        }
    }

    /// Resolves every name of `hosts` again and records the answers (with the hold for a
    /// name that stopped resolving). Blocking, bounded by `spec.timeout`. Names not in
    /// `hosts` are forgotten.
    pub fn refresh(&self, hosts: &[String], spec: &Spec) {
        let started = Instant::now();
        let results = resolve_all(hosts, spec, &self.running);
        let now = Instant::now();
        let mut entries = self.lock();
        // (A name an apply looked up meanwhile is kept: the topology it is for may be
        // live by now.)
        entries.retain(|h, e| hosts.contains(h) || e.added >= started);
        for (host, result) in hosts.iter().zip(results) {
            let e = entries
                .entry(host.clone())
                .or_insert_with(|| Entry::new(now));
            let before = e.answer.clone();
            update(e, result, spec.hold, now);
            match (&before.error, &e.answer.error) {
                (None, Some(err)) if !e.answer.addrs.is_empty() => {
                    tracing::warn!(name = %host, error = %err, hold = ?spec.hold, "the name no longer resolves; its last answer is kept for now")
                }
                (_, Some(err)) if e.answer.addrs.is_empty() && !before.addrs.is_empty() => {
                    tracing::warn!(name = %host, error = %err, "the name no longer resolves; its members are drained")
                }
                (Some(_), None) => tracing::info!(name = %host, "the name resolves again"),
                _ => {}
            }
        }
    }
}

fn update(e: &mut Entry, result: Result<Vec<IpAddr>, String>, hold: Duration, now: Instant) {
    match result {
        Ok(mut addrs) => {
            addrs.sort_unstable();
            addrs.dedup();
            addrs.truncate(MAX_MEMBERS);
            e.answer = Answer { addrs, error: None };
            e.good_at = Some(now);
        }
        Err(error) => {
            let held = e.good_at.is_some_and(|at| now.duration_since(at) < hold);
            if !held {
                e.answer.addrs.clear();
            }
            e.answer.error = Some(error);
        }
    }
}

/// Resolves each of `hosts` (the hosts file first, then the system resolver, each lookup
/// on a thread of its own), waiting at most `spec.timeout` in all.
fn resolve_all(
    hosts: &[String],
    spec: &Spec,
    running: &Arc<Mutex<std::collections::HashSet<String>>>,
) -> Vec<Result<Vec<IpAddr>, String>> {
    let deadline = Instant::now() + spec.timeout;
    let table = match &spec.hosts {
        None => Ok(None),
        // Read on a thread too: a file that stalls (a pipe, a hung network mount) counts
        // against the timeout like a lookup.
        // One read at a time (a key no name can have, among the running lookups).
        Some(path) => {
            let key = format!("\0{}", path.display());
            let fresh = running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone());
            if !fresh {
                Err("hosts file: the previous read has not returned yet".into())
            } else {
                let (tx, rx) = std::sync::mpsc::channel();
                let (path, done, k) = (path.clone(), running.clone(), key.clone());
                match std::thread::Builder::new()
                    .name("envgate-dns".into())
                    .spawn(move || {
                        let r = read_hosts(&path);
                        done.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
                        let _ = tx.send(r);
                    }) {
                    Ok(_) => rx
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(|_| {
                            Err(format!("hosts file: not read within {:?}", spec.timeout))
                        })
                        .map(Some),
                    Err(e) => {
                        running
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                        Err(format!("cannot read the hosts file: {e}"))
                    }
                }
            }
        }
    };
    let table = match table {
        Ok(t) => t,
        Err(e) => return hosts.iter().map(|_| Err(e.clone())).collect(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out: Vec<Option<Result<Vec<IpAddr>, String>>> = vec![None; hosts.len()];
    let mut waiting = 0;
    for (i, host) in hosts.iter().enumerate() {
        if let Some(addrs) = table.as_ref().and_then(|t| t.get(host)) {
            out[i] = Some(Ok(addrs.clone()));
            continue;
        }
        {
            let mut r = running.lock().unwrap_or_else(|e| e.into_inner());
            if r.contains(host) {
                out[i] = Some(Err("the previous lookup has not returned yet".into()));
                continue;
            }
            if r.len() >= MAX_RUNNING_LOOKUPS {
                out[i] = Some(Err(format!(
                    "{MAX_RUNNING_LOOKUPS} lookups are still running"
                )));
                continue;
            }
            r.insert(host.clone());
        }
        let (tx, host, done) = (tx.clone(), host.clone(), running.clone());
        let spawned = std::thread::Builder::new()
            .name("envgate-dns".into())
            .spawn(move || {
                let r = system(&host);
                done.lock().unwrap_or_else(|e| e.into_inner()).remove(&host);
                let _ = tx.send((i, r));
            });
        match spawned {
            Ok(_) => waiting += 1,
            Err(e) => {
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&hosts[i]);
                out[i] = Some(Err(format!("cannot start a lookup: {e}")));
            }
        }
    }
    while waiting > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, r)) => {
                out[i] = Some(r);
                waiting -= 1;
            }
            Err(_) => break,
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(format!("no answer within {:?}", spec.timeout))))
        .collect()
}

/// The system resolver's addresses for `host`.
fn system(host: &str) -> Result<Vec<IpAddr>, String> {
    let addrs: Vec<IpAddr> = (host, 0u16)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .map(|a| a.ip())
        .collect();
    if addrs.is_empty() {
        return Err("no address".into());
    }
    Ok(addrs)
}

/// A hosts-format file: `ADDRESS NAME [NAME...]` per line, `#` comments. Names are
/// lowercased; a name on several lines gets every address.
fn read_hosts(path: &Path) -> Result<HashMap<String, Vec<IpAddr>>, String> {
    use std::io::Read;
    let err = |e: &dyn std::fmt::Display| format!("hosts file {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(|e| err(&e))?;
    if !file.metadata().map_err(|e| err(&e))?.is_file() {
        return Err(err(&"not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_HOSTS_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| err(&e))?;
    if text.len() as u64 > MAX_HOSTS_FILE {
        return Err(err(&format!("larger than {MAX_HOSTS_FILE} bytes")));
    }
    let mut table: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in words {
            table
                .entry(name.trim_end_matches('.').to_ascii_lowercase())
                .or_default()
                .push(ip);
        }
    }
    Ok(table)
}

/// Splits a node address `host:port` whose host is a name (not an IP address): the name
/// lowercased and without a trailing dot, and the port. `None` when it is not one.
pub fn parse_authority(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    valid_host(host).then(|| (host.to_ascii_lowercase(), port))
}

/// A DNS name: labels of letters, digits, `-` and `_` (1 to 63 bytes, not starting or
/// ending with `-`), 253 bytes at most, the last label not all digits and not every label
/// a number (`0x7f.1`): a mistyped IP address such as `10.0.0.256`, or one in a form the
/// resolver reads as a number, is not taken for a name.
fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let labels_ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let numeric = |l: &str| {
        let hex = l.strip_prefix("0x").or_else(|| l.strip_prefix("0X"));
        match hex {
            Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
            None => l.bytes().all(|b| b.is_ascii_digit()),
        }
    };
    labels_ok
        && !host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && !host.split('.').all(numeric)
}

/// The name a member of node `node` at `addr` goes by (in metrics, logs, status).
pub fn member_name(node: &str, addr: SocketAddr) -> String {
    format!("{node}@{addr}")
}

/// One node addressed by a name, as the topology resolved it.
#[derive(Debug, Clone)]
pub struct DnsNode {
    /// The node's name in the document.
    pub node: Arc<str>,
    /// The name as resolved (lowercased) and the port.
    pub host: Arc<str>,
    pub port: u16,
    /// The members' addresses, sorted.
    pub answer: Answer,
}

/// Resolves the names of the live topology every `defaults.dns.interval` and applies the
/// running document again when the answers no longer match its members. Runs on the
/// control thread until `stop` turns true.
pub async fn refresh_loop(
    control: Arc<crate::control::Control>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // The answers of a refused apply, so that the same refusal is not repeated every
    // interval (a new answer is tried again).
    let mut refused: Vec<Vec<(Arc<str>, Answer)>> = Vec::new();
    loop {
        let topo = control.topology();
        let spec = topo.defaults.dns.clone();
        let wait = if topo.dns.is_empty() {
            Duration::from_secs(1)
        } else {
            let mut hosts: Vec<String> = topo.dns.iter().map(|d| d.host.to_string()).collect();
            hosts.sort_unstable();
            hosts.dedup();
            let cache = control.dns().clone();
            let s = spec.clone();
            // (The lookups are bounded by the timeout; the margin is for the thread pool.)
            let bound = spec.timeout * 2 + Duration::from_secs(1);
            let done = tokio::time::timeout(
                bound,
                tokio::task::spawn_blocking(move || cache.refresh(&hosts, &s)),
            )
            .await;
            if done.is_err() {
                tracing::warn!("a refresh of the node names did not finish in time; trying again");
            }
            if matches!(done, Ok(Ok(()))) {
                let now: Vec<(Arc<str>, Answer)> = topo
                    .dns
                    .iter()
                    .map(|d| {
                        let a = control.dns().get(&d.host).unwrap_or_default();
                        (d.node.clone(), a)
                    })
                    .collect();
                let moved = topo
                    .dns
                    .iter()
                    .zip(&now)
                    .any(|(d, (_, a))| d.answer.addrs != a.addrs);
                if moved && !refused.contains(&now) {
                    let current = control.current();
                    if current.generation == topo.generation {
                        let c = control.clone();
                        let applied = tokio::task::spawn_blocking(move || {
                            let parsed = c.parse(&current.document);
                            c.apply_dns(&current, parsed)
                        })
                        .await;
                        match applied {
                            Ok(Err(crate::control::ApplyError::Stale(..))) | Ok(Ok(_)) => {
                                refused.clear()
                            }
                            // Refused (a hosts file gone, a certificate broken since): not
                            // tried again with these answers (a few remembered, so that
                            // answers that rotate do not flood the history).
                            _ => {
                                if refused.len() >= 8 {
                                    refused.remove(0);
                                }
                                refused.push(now);
                            }
                        }
                    }
                }
            }
            spec.interval
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(
            parse_authority("Orders.Internal.:8000"),
            Some(("orders.internal".into(), 8000))
        );
        assert_eq!(parse_authority("orders:80"), Some(("orders".into(), 80)));
        assert_eq!(parse_authority("10.0.0.256:80"), None);
        assert_eq!(parse_authority("orders:0"), None);
        assert_eq!(parse_authority("orders"), None);
        assert_eq!(parse_authority("-x.y:1"), None);
        assert_eq!(parse_authority("a b:1"), None);
        assert_eq!(parse_authority("::1:80"), None);
        assert_eq!(parse_authority(&format!("{}:1", "a".repeat(64))), None);
        assert_eq!(parse_authority("orders.test:+9000"), None);
        assert_eq!(parse_authority("0x7f000001:9000"), None);
        assert_eq!(parse_authority("0x7f.0.0.0x1:9000"), None);
        assert_eq!(
            parse_authority("0xcafe.test:9000"),
            Some(("0xcafe.test".into(), 9000))
        );
    }

    #[test]
    fn a_failed_lookup_keeps_the_last_answer_for_the_hold_only() {
        let t0 = Instant::now();
        let mut e = Entry::new(t0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        update(&mut e, Ok(vec![ip, ip]), Duration::from_secs(10), t0);
        assert_eq!(e.answer.addrs, vec![ip]);
        update(
            &mut e,
            Err("nx".into()),
            Duration::from_secs(10),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(e.answer.addrs, vec![ip]);
        assert_eq!(e.answer.error.as_deref(), Some("nx"));
        update(
            &mut e,
            Err("nx".into()),
            Duration::from_secs(10),
            t0 + Duration::from_secs(11),
        );
        assert!(e.answer.addrs.is_empty());
    }

    #[test]
    fn a_hosts_file_answers_the_names_it_lists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(
            &path,
            "# nodes\n127.0.0.2 Orders.test other\n127.0.0.1 orders.test. # two\nbad line\n",
        )
        .unwrap();
        let spec = Spec {
            hosts: Some(path),
            ..Spec::default()
        };
        let r = resolve_all(
            &["orders.test".into(), "other".into()],
            &spec,
            &Arc::default(),
        );
        let mut a = r[0].clone().unwrap();
        a.sort();
        assert_eq!(
            a,
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "127.0.0.2".parse().unwrap()
            ]
        );
        assert_eq!(r[1].clone().unwrap().len(), 1);
    }
}
