//! What a new topology changes, in words an operator reads in a log line or an API answer:
//! `+environment green; entry shop.com:80: blue -> green; canary production: 5% -> 20%`.
//!
//! Linear in the size of both topologies (maps by name), so it costs little next to
//! validation even for 10,000 environments.

use std::fmt;

use rustc_hash::FxHashMap as HashMap;

use crate::topology::{Environment, Topology};

/// The changes, one phrase each, in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub changes: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return f.write_str("no change in routing");
        }
        // A long list is cut: the history keeps the whole document anyway.
        const SHOWN: usize = 20;
        for (i, c) in self.changes.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(c)?;
        }
        if self.changes.len() > SHOWN {
            write!(f, "; and {} more", self.changes.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// The changes from `old` to `new`.
pub fn diff(old: &Topology, new: &Topology) -> Diff {
    let mut out = Vec::new();
    if old.access_log != new.access_log {
        let a = new.access_log;
        out.push(if a.enabled {
            format!("access log on, {}% of 2xx", a.sample_2xx)
        } else {
            "access log off".to_string()
        });
    }
    if old.defaults != new.defaults {
        out.push("defaults changed".to_string());
    }
    // Listeners, by name: added, removed, moved, or serving other certificates.
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => out.push(format!("+listener {} ({})", l.name, l.bind)),
            Some(o) if o.bind != l.bind => out.push(format!(
                "listener {}: bind {} -> {}",
                l.name, o.bind, l.bind
            )),
            Some(o) => match (&o.tls, &l.tls) {
                (Some(a), Some(b)) => {
                    if a.certificates != b.certificates
                        || a.server.fingerprint != b.server.fingerprint
                    {
                        out.push(format!("listener {}: certificates reloaded", l.name));
                    }
                    if a.unknown_sni != b.unknown_sni
                        || a.http2 != b.http2
                        || a.session_resumption != b.session_resumption
                    {
                        out.push(format!("listener {}: TLS settings changed", l.name));
                    }
                }
                (None, Some(_)) => out.push(format!("listener {}: TLS on", l.name)),
                (Some(_), None) => out.push(format!("listener {}: TLS off", l.name)),
                (None, None) => {}
            },
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|l| l.name == o.name) {
            out.push(format!("-listener {}", o.name));
        }
    }

    // Nodes, by name.
    let old_nodes: HashMap<&str, usize> = old
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (&*n.name, i))
        .collect();
    let new_nodes: HashMap<&str, usize> = new
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (&*n.name, i))
        .collect();
    for n in &new.nodes {
        match old_nodes.get(&*n.name) {
            None => out.push(format!("+node {} ({})", n.name, n.addr)),
            Some(&i) => {
                let o = &old.nodes[i];
                if o.addr != n.addr {
                    out.push(format!("node {}: address {} -> {}", n.name, o.addr, n.addr));
                }
                if o.weight != n.weight {
                    out.push(format!(
                        "node {}: weight {} -> {}",
                        n.name, o.weight, n.weight
                    ));
                }
                if o.backup != n.backup {
                    out.push(format!(
                        "node {}: backup {} -> {}",
                        n.name, o.backup, n.backup
                    ));
                }
                if o.drain != n.drain {
                    out.push(format!(
                        "node {}: {}",
                        n.name,
                        if n.drain {
                            "drained"
                        } else {
                            "back in service"
                        }
                    ));
                }
                if o.health != n.health {
                    out.push(format!("node {}: health check changed", n.name));
                }
                if o.tls != n.tls {
                    out.push(format!("node {}: TLS changed", n.name));
                }
                if o.protocol != n.protocol {
                    out.push(format!(
                        "node {}: protocol {} -> {}",
                        n.name,
                        o.protocol.as_str(),
                        n.protocol.as_str()
                    ));
                }
            }
        }
    }
    for n in &old.nodes {
        if !new_nodes.contains_key(&*n.name) {
            out.push(format!("-node {}", n.name));
        }
    }

    // Environments, by name.
    let old_envs: HashMap<&str, &Environment> =
        old.environments.iter().map(|e| (&*e.name, &**e)).collect();
    let new_envs: HashMap<&str, &Environment> =
        new.environments.iter().map(|e| (&*e.name, &**e)).collect();
    let name = |t: &Topology, id: usize| t.environments[id].name.clone();
    for e in &new.environments {
        let Some(o) = old_envs.get(&*e.name) else {
            out.push(format!("+environment {}", e.name));
            continue;
        };
        // Applications, by name.
        for a in &e.apps {
            match o.apps.iter().find(|x| x.name == a.name) {
                None if a.name.is_empty() => {}
                None => out.push(format!(
                    "{}: +application {} {} at {}",
                    e.name, a.name, a.version, a.prefix
                )),
                Some(x) => {
                    if x.version != a.version {
                        out.push(format!(
                            "{}: application {} {} -> {}",
                            e.name, a.name, x.version, a.version
                        ));
                    }
                    if x.prefix != a.prefix {
                        out.push(format!(
                            "{}: application {} path {} -> {}",
                            e.name, a.name, x.prefix, a.prefix
                        ));
                    }
                    if !same_members(old, x.pool, new, a.pool)
                        || match (x.read_pool, a.read_pool) {
                            (None, None) => false,
                            (Some(p), Some(q)) => !same_members(old, p, new, q),
                            _ => true,
                        }
                    {
                        if a.name.is_empty() {
                            out.push(format!("{}: nodes changed", e.name));
                        } else {
                            out.push(format!("{}: application {} nodes changed", e.name, a.name));
                        }
                    }
                }
            }
        }
        for x in &o.apps {
            if !x.name.is_empty() && !e.apps.iter().any(|a| a.name == x.name) {
                out.push(format!("{}: -application {}", e.name, x.name));
            }
        }
        match (&o.canary, &e.canary) {
            (None, Some(c)) => out.push(format!(
                "{}: +canary -> {} at {}",
                e.name,
                name(new, c.environment),
                percent(c.threshold)
            )),
            (Some(_), None) => out.push(format!("{}: -canary", e.name)),
            (Some(a), Some(b)) => {
                if a.threshold != b.threshold {
                    out.push(format!(
                        "canary {}: {} -> {}",
                        e.name,
                        percent(a.threshold),
                        percent(b.threshold)
                    ));
                }
                if name(old, a.environment) != name(new, b.environment)
                    || a.header != b.header
                    || a.cookie != b.cookie
                    || a.hash != b.hash
                {
                    out.push(format!("canary {}: target or stickiness changed", e.name));
                }
            }
            (None, None) => {}
        }
        let same_ranges = match (&o.tenants, &e.tenants) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.key == b.key
                    && a.required == b.required
                    && a.ranges.len() == b.ranges.len()
                    && a.ranges.iter().zip(b.ranges.iter()).all(|(x, y)| {
                        x.from == y.from
                            && x.to == y.to
                            && old.environments[x.environment].name
                                == new.environments[y.environment].name
                    })
            }
            _ => false,
        };
        if !same_ranges {
            out.push(format!("{}: tenant ranges changed", e.name));
        }
        if o.max_in_flight != e.max_in_flight
            || o.max_request_body != e.max_request_body
            || o.retries != e.retries
            || o.panic_threshold != e.panic_threshold
            || o.upgrades != e.upgrades
            || o.allow_connect != e.allow_connect
        {
            out.push(format!("{}: limits or retries changed", e.name));
        }
    }
    for e in &old.environments {
        if !new_envs.contains_key(&*e.name) {
            out.push(format!("-environment {}", e.name));
        }
    }

    // Entry addresses: each belongs to one environment, so a move is one change.
    let (old_entries, new_entries) = (owners(old), owners(new));
    let mut entries: Vec<String> = Vec::new();
    for (entry, env) in &new_entries {
        match old_entries.get(entry) {
            None => entries.push(format!("+entry {entry} -> {env}")),
            Some(was) if was != env => entries.push(format!("entry {entry}: {was} -> {env}")),
            Some(_) => {}
        }
    }
    for (entry, was) in &old_entries {
        if !new_entries.contains_key(entry) {
            entries.push(format!("-entry {entry} (was {was})"));
        }
    }
    entries.sort();
    out.extend(entries);
    Diff { changes: out }
}

/// Each entry address and the environment that holds it.
fn owners(t: &Topology) -> HashMap<&str, &str> {
    t.environments
        .iter()
        .flat_map(|e| e.entries.iter().map(move |x| (x.as_str(), &*e.name)))
        .collect()
}

/// Whether pool `p` of `a` and pool `q` of `b` hold the same nodes (by name), weights
/// and backup flags, in the same order. Compared in place: this runs for every
/// application of every environment.
fn same_members(a: &Topology, p: usize, b: &Topology, q: usize) -> bool {
    let (x, y) = (&a.pools[p].members, &b.pools[q].members);
    x.len() == y.len()
        && x.iter().zip(y.iter()).all(|(m, n)| {
            m.weight == n.weight
                && m.backup == n.backup
                && a.nodes[m.node].name == b.nodes[n.node].name
        })
}

/// A canary threshold (hundredths of a percent) as a percentage: `5%`, `0.5%`, `12.25%`.
fn percent(threshold: u16) -> String {
    let (whole, frac) = (threshold / 100, threshold % 100);
    match frac {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(envs: &str) -> Topology {
        let doc = format!(
            "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:80\" }} ]\nnodes:\n  a: {{ address: \"10.0.0.1:80\" }}\n  b: {{ address: \"10.0.0.2:80\" }}\nenvironments:\n{envs}"
        );
        crate::config::parse(&doc, std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn an_entry_move_is_one_change() {
        let old =
            topo("  blue: { entries: [\"shop.com:80\"], nodes: [a] }\n  green: { nodes: [b] }\n");
        let new =
            topo("  blue: { nodes: [a] }\n  green: { entries: [\"shop.com:80\"], nodes: [b] }\n");
        assert_eq!(
            diff(&old, &new).changes,
            ["entry shop.com:80: blue -> green"]
        );
        assert!(diff(&old, &old).is_empty());
        assert_eq!(diff(&old, &old).to_string(), "no change in routing");
    }

    #[test]
    fn canary_steps_environments_and_nodes() {
        let old = topo("  p: { entries: [\":80\"], nodes: [a], canary: { environment: c, weight: 5 } }\n  c: { nodes: [b] }\n");
        let new = topo("  p: { entries: [\":80\"], nodes: { a: { weight: 3 } }, canary: { environment: c, weight: 0.5 } }\n  c: { nodes: [b] }\n  d: { nodes: [b] }\n");
        let d = diff(&old, &new);
        assert!(
            d.changes.contains(&"canary p: 5% -> 0.5%".to_string()),
            "{d}"
        );
        assert!(d.changes.contains(&"+environment d".to_string()), "{d}");
        assert!(d.changes.contains(&"p: nodes changed".to_string()), "{d}");
        assert_eq!(percent(1225), "12.25%");
        assert_eq!(percent(10_000), "100%");
    }

    /// Three nodes, and environments as given; `nodes_first` reverses the node list when
    /// false (the same nodes at other indices).
    fn topo3(envs: &str, nodes_first: bool) -> Topology {
        let mut nodes = [
            "  a: { address: \"10.0.0.1:80\" }\n",
            "  b: { address: \"10.0.0.2:80\" }\n",
            "  c: { address: \"10.0.0.3:80\" }\n",
        ];
        if !nodes_first {
            nodes.reverse();
        }
        let doc = format!(
            "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:80\" }} ]\nnodes:\n{}environments:\n{envs}",
            nodes.concat()
        );
        crate::config::parse(&doc, std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn member_order_weight_and_backup_are_changes() {
        let old = topo3("  p: { entries: [\":80\"], nodes: [a, b] }\n", true);
        for (envs, why) in [
            ("  p: { entries: [\":80\"], nodes: [b, a] }\n", "order"),
            (
                "  p: { entries: [\":80\"], nodes: { a: { weight: 2 }, b: {} } }\n",
                "weight",
            ),
            (
                "  p: { entries: [\":80\"], nodes: { a: {}, b: { backup: true } } }\n",
                "backup",
            ),
            ("  p: { entries: [\":80\"], nodes: [a, c] }\n", "member"),
            ("  p: { entries: [\":80\"], nodes: [a] }\n", "fewer"),
        ] {
            let d = diff(&old, &topo3(envs, true));
            assert_eq!(d.changes, ["p: nodes changed"], "{why}");
        }
        // The same members at other node indices are no change.
        let moved = topo3("  p: { entries: [\":80\"], nodes: [a, b] }\n", false);
        assert!(diff(&old, &moved).is_empty(), "{}", diff(&old, &moved));
    }

    #[test]
    fn read_pools_added_removed_and_changed() {
        let app = |read: &str| {
            topo3(
                &format!("  p: {{ entries: [\":80\"], nodes: [a, b, c], apps: [ {{ name: r, version: \"1\", path: /r{read} }} ] }}\n"),
                true,
            )
        };
        let none = app("");
        let ab = app(", read_nodes: [a, b]");
        let ba = app(", read_nodes: [b, a]");
        let c = app(", read_nodes: [c]");
        let changed = ["p: application r nodes changed"];
        assert_eq!(diff(&none, &ab).changes, changed, "added");
        assert_eq!(diff(&ab, &none).changes, changed, "removed");
        assert_eq!(diff(&ab, &ba).changes, changed, "reordered");
        assert_eq!(diff(&ab, &c).changes, changed, "replaced");
        assert!(diff(&ab, &ab).is_empty());
        // A read pool equal to the nodes of the application is still a read pool.
        let all = app(", read_nodes: [a, b, c]");
        assert_eq!(diff(&none, &all).changes, changed, "same nodes as reads");
        // Node indices moved, same names: no change.
        let moved = topo3(
            "  p: { entries: [\":80\"], nodes: [a, b, c], apps: [ { name: r, version: \"1\", path: /r, read_nodes: [a, b] } ] }\n",
            false,
        );
        assert!(diff(&ab, &moved).is_empty(), "{}", diff(&ab, &moved));
    }

    #[test]
    fn tenant_ranges_follow_names_not_indices() {
        let ranges = |target: &str| {
            format!("tenants: {{ key: {{ header: X-T }}, ranges: [ {{ from: 1, to: 9, environment: {target} }} ] }}")
        };
        let old = topo3(
            &format!(
                "  p: {{ entries: [\":80\"], nodes: [a], {} }}\n  t1: {{ nodes: [b] }}\n  t2: {{ nodes: [c] }}\n",
                ranges("t1")
            ),
            true,
        );
        // The target renamed (same index, same nodes): a change of the ranges.
        let renamed = topo3(
            &format!(
                "  p: {{ entries: [\":80\"], nodes: [a], {} }}\n  t3: {{ nodes: [b] }}\n  t2: {{ nodes: [c] }}\n",
                ranges("t3")
            ),
            true,
        );
        let d = diff(&old, &renamed);
        assert!(
            d.changes.contains(&"p: tenant ranges changed".to_string()),
            "{d}"
        );
        assert!(d.changes.contains(&"+environment t3".to_string()), "{d}");
        assert!(d.changes.contains(&"-environment t1".to_string()), "{d}");
        // The same target moved to another index (t1 and t2 swapped): the ranges did not
        // change (the nodes of t1 and t2 did).
        let other = topo3(
            &format!(
                "  p: {{ entries: [\":80\"], nodes: [a], {} }}\n  t2: {{ nodes: [b] }}\n  t1: {{ nodes: [c] }}\n",
                ranges("t1")
            ),
            true,
        );
        let d = diff(&old, &other);
        assert!(
            !d.changes.contains(&"p: tenant ranges changed".to_string()),
            "{d}"
        );
        let retarget = topo3(
            &format!(
                "  p: {{ entries: [\":80\"], nodes: [a], {} }}\n  t1: {{ nodes: [b] }}\n  t2: {{ nodes: [c] }}\n",
                ranges("t2")
            ),
            true,
        );
        assert_eq!(diff(&old, &retarget).changes, ["p: tenant ranges changed"]);
        // The same document with environments and nodes reordered: no change at all.
        let reordered = topo3(
            &format!(
                "  t2: {{ nodes: [c] }}\n  t1: {{ nodes: [b] }}\n  p: {{ entries: [\":80\"], nodes: [a], {} }}\n",
                ranges("t1")
            ),
            false,
        );
        assert!(
            diff(&old, &reordered).is_empty(),
            "{}",
            diff(&old, &reordered)
        );
        // Ranges added or removed.
        let without = topo3(
            "  p: { entries: [\":80\"], nodes: [a] }\n  t1: { nodes: [b] }\n  t2: { nodes: [c] }\n",
            true,
        );
        assert_eq!(diff(&old, &without).changes, ["p: tenant ranges changed"]);
        assert_eq!(diff(&without, &old).changes, ["p: tenant ranges changed"]);
    }

    #[test]
    fn a_node_renamed_at_its_address_changes_the_pools() {
        let old = topo("  p: { entries: [\":80\"], nodes: [a, b] }\n");
        let doc = "version: 1\nlisteners: [ { name: http, bind: \"127.0.0.1:80\" } ]\nnodes:\n  a: { address: \"10.0.0.1:80\" }\n  z: { address: \"10.0.0.2:80\" }\nenvironments:\n  p: { entries: [\":80\"], nodes: [a, z] }\n";
        let new = crate::config::parse(doc, std::path::Path::new(".")).unwrap();
        assert_eq!(
            diff(&old, &new).changes,
            ["+node z (10.0.0.2:80)", "-node b", "p: nodes changed"]
        );
    }
}
