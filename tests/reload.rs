//! The apply path and the file watch through a running envgate: a refused document (and a
//! dry run) changes nothing, not even a node's trust; the history records every source
//! and result; the watched file is applied after a rename-save, a Kubernetes-style
//! `..data` symlink swap, and a write in two halves, while garbage leaves the running
//! topology serving.

mod support;

use std::path::Path;
use std::time::Duration;

use envgate::control::{watch, ApplyError, Outcome, Source};
use envgate::health::Health;
use support::*;

fn two_nodes(a: &Upstream, b: &Upstream, serving: &str, extra_defaults: &str) -> String {
    Topo::new()
        .defaults(extra_defaults)
        .node("a", a.addr)
        .node("b", b.addr)
        .env(
            "production",
            &["company.com"],
            &format!("nodes: [{serving}]"),
        )
        .env("spare", &[], "nodes: [a, b]")
        .yaml()
}

/// Writes `text` to a temporary file beside `path` and renames it over `path`, as editors
/// and `kubectl cp`-style tools save.
fn rename_save(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn serves(port: u16, node: &str) -> bool {
    eventually(Duration::from_secs(5), || async {
        get(port, "company.com", "/").await.node() == node
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_document_or_a_dry_run_changes_nothing() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let defaults = "health: { interval: 1m, timeout: 1s }";
    let eg = Envgate::start(&two_nodes(&a, &b, "a, b", defaults));
    let control = eg.server().control().clone();
    let port = eg.port("http");
    let state_b = || {
        let t = control.topology();
        t.nodes
            .iter()
            .find(|n| &*n.name == "b")
            .unwrap()
            .state
            .clone()
    };
    let node_b = || (state_b().health(), state_b().trusts_unknown());
    assert!(
        eventually(Duration::from_secs(5), || async {
            node_b() == (Health::Up, false)
        })
        .await
    );
    let generation = control.topology().generation;

    // Valid except for one reference, and trusting unknown nodes: refused whole. Before
    // validation was pure, compiling it flipped b's trust on the live node.
    let bad = eg.fill(
        &two_nodes(
            &a,
            &b,
            "a, b",
            "health: { interval: 1m, timeout: 1s, trust_unknown: true }",
        )
        .replace("nodes: [a, b] }", "nodes: [a, ghost] }"),
    );
    match control.apply(Source::Api, &bad, false) {
        Err(ApplyError::Invalid(errs)) => {
            assert!(
                errs.iter().any(|e| e.path == "environments.spare.nodes[1]"),
                "{errs:?}"
            )
        }
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(
        node_b(),
        (Health::Up, false),
        "a refused document changed a node"
    );
    assert_eq!(control.topology().generation, generation);

    // A dry run of a valid change says what it would do, and does nothing.
    let only_b = eg.fill(&two_nodes(&a, &b, "b", defaults));
    let dry = control.apply(Source::Api, &only_b, true).unwrap();
    assert_eq!(dry.generation, generation + 1);
    assert!(
        dry.diff.to_string().contains("production: nodes changed"),
        "{}",
        dry.diff
    );
    assert_eq!(control.topology().generation, generation);
    let mut nodes: Vec<String> = Vec::new();
    for _ in 0..4 {
        nodes.push(get(port, "company.com", "/").await.node().to_string());
    }
    nodes.sort();
    assert_eq!(nodes, ["a", "a", "b", "b"], "the dry run changed routing");
    // A new listener on a port that cannot be bound is refused with the OS error.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let more = eg.fill(&two_nodes(&a, &b, "a, b", defaults)).replacen(
        "listeners: [ ",
        &format!("listeners: [ {{ name: extra, bind: \"127.0.0.1:{taken_port}\" }}, "),
        1,
    );
    match control.apply(Source::Api, &more, false) {
        Err(ApplyError::Refused(path, why)) => {
            assert_eq!(path, "listeners");
            assert!(
                why.contains("cannot bind listener \"extra\"") && why.contains("in use"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }

    // So is a change of the timeouts the workers' servers took at start.
    let slower = eg.fill(&two_nodes(
        &a,
        &b,
        "a, b",
        "health: { interval: 1m, timeout: 1s }, timeouts: { idle: 5m }",
    ));
    match control.apply(Source::Api, &slower, false) {
        Err(ApplyError::Refused(_, why)) => assert!(
            why.contains("timeouts.client_header and timeouts.idle"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }

    // The history: the start, three refusals, nothing from the dry run.
    drop(taken);
    let h = control.history();
    let seen: Vec<(Source, Outcome)> = h.iter().map(|r| (r.source, r.result)).collect();
    assert_eq!(
        seen,
        [
            (Source::Start, Outcome::Applied),
            (Source::Api, Outcome::Rejected),
            (Source::Api, Outcome::Rejected),
            (Source::Api, Outcome::Rejected),
        ]
    );
    assert!(h[1].summary.contains("ghost"), "{}", h[1].summary);
    assert!(h.iter().all(|r| r.generation == generation));

    // The same document again is no change; a real change bumps the generation once.
    let same = control.document();
    assert!(control.apply(Source::Api, &same, false).unwrap().unchanged);
    assert_eq!(eg.apply(&two_nodes(&a, &b, "b", defaults)), generation + 1);
    let last = control.history().pop().unwrap();
    assert_eq!(
        (last.result, last.generation),
        (Outcome::Applied, generation + 1)
    );
    assert!(last.document.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_file_follows_rename_saves_and_survives_garbage() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start_with(&two_nodes(&a, &b, "a", ""), 2);
    let path = eg.dir.path().join("envgate.yaml");
    let control = eg.server().control().clone();
    let _watch = watch::spawn(control.clone(), &path).unwrap();
    let port = eg.port("http");
    assert!(serves(port, "a").await);

    rename_save(&path, &eg.fill(&two_nodes(&a, &b, "b", "")));
    assert!(serves(port, "b").await, "a rename-save was not applied");

    // Garbage: refused after a few reads, and b keeps serving.
    let rejected = |n: usize| {
        let c = control.clone();
        move || {
            let c = c.clone();
            async move {
                c.history()
                    .iter()
                    .filter(|r| r.source == Source::File && r.result == Outcome::Rejected)
                    .count()
                    == n
            }
        }
    };
    std::fs::write(&path, "version: 1\nlisteners: [ { name: http").unwrap();
    assert!(eventually(Duration::from_secs(5), rejected(1)).await);
    for _ in 0..4 {
        assert_eq!(get(port, "company.com", "/").await.node(), "b");
    }

    // Written in two halves, the first not even YAML: the watch waits for the second.
    let full = eg.fill(&two_nodes(&a, &b, "a", ""));
    let cut = full.find("nodes: [a] }").unwrap() + "nodes: [".len();
    std::fs::write(&path, &full[..cut]).unwrap();
    tokio::time::sleep(watch::DEBOUNCE + Duration::from_millis(100)).await;
    std::fs::write(&path, &full).unwrap();
    assert!(serves(port, "a").await);
    assert!(
        eventually(Duration::from_secs(2), rejected(1)).await,
        "the half-written file was refused"
    );
    let applied = control
        .history()
        .iter()
        .filter(|r| r.source == Source::File && r.result == Outcome::Applied)
        .count();
    assert_eq!(applied, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_file_follows_a_configmap_symlink_swap() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&two_nodes(&a, &b, "a", ""));
    // The layout Kubernetes gives a mounted ConfigMap: envgate.yaml -> ..data/envgate.yaml,
    // ..data -> ..<timestamp>/.
    let dir = eg.dir.path().join("config");
    std::fs::create_dir(&dir).unwrap();
    let version = |name: &str, text: &str| {
        let v = dir.join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("envgate.yaml"), text).unwrap();
    };
    let first = eg.fill(&two_nodes(&a, &b, "a", ""));
    version("..2026_11_27_1", &first);
    std::os::unix::fs::symlink("..2026_11_27_1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/envgate.yaml", dir.join("envgate.yaml")).unwrap();
    let path = dir.join("envgate.yaml");
    let control = eg.server().control().clone();
    // The file holds the running document: no change.
    assert!(
        control
            .apply(Source::File, &first, false)
            .unwrap()
            .unchanged
    );
    let _watch = watch::spawn(control.clone(), &path).unwrap();
    let port = eg.port("http");
    assert!(serves(port, "a").await);

    // The swap: a new version directory, a new link, renamed over `..data` at once.
    version("..2026_11_27_2", &eg.fill(&two_nodes(&a, &b, "b", "")));
    std::os::unix::fs::symlink("..2026_11_27_2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_11_27_1")).unwrap();
    assert!(serves(port, "b").await, "the symlink swap was not applied");
}

/// Steady load (keep-alive and fresh connections, two workers) while the topology is
/// replaced 50 times, each time moving the entry between two environments: not one
/// request fails or gets anything but 200, and both sides served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_replacements_under_load_drop_nothing() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let doc = |serving: &str| {
        let (blue, green) = if serving == "blue" {
            (&["company.com"][..], &[][..])
        } else {
            (&[][..], &["company.com"][..])
        };
        Topo::new()
            .node("a", a.addr)
            .node("b", b.addr)
            .env("blue", blue, "nodes: [a]")
            .env("green", green, "nodes: [b]")
            .yaml()
    };
    let eg = Envgate::start_with(&doc("blue"), 2);
    let port = eg.port("http");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut bad) = (0usize, Vec::new());
            let mut tx = connect::<http_body_util::Full<bytes::Bytes>>(port).await;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = if c % 2 == 0 {
                    // Keep-alive.
                    tx.ready().await.unwrap();
                    let resp = tx
                        .send_request(
                            http::Request::get("/")
                                .header("host", "company.com")
                                .body(http_body_util::Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                        .await;
                    match resp {
                        Ok(r) => {
                            let status = r.status();
                            let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                            Some(status)
                        }
                        Err(_) => None,
                    }
                } else {
                    Some(get(port, "company.com", "/").await.status)
                };
                match r {
                    Some(s) if s == 200 => ok += 1,
                    other => bad.push(other),
                }
            }
            (ok, bad)
        }));
    }
    for i in 0..50 {
        eg.apply(&doc(if i % 2 == 0 { "green" } else { "blue" }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, bad) = c.await.unwrap();
        assert!(bad.is_empty(), "failed or non-200 answers: {bad:?}");
        total += ok;
    }
    assert_eq!(eg.server().control().topology().generation, 51);
    eprintln!("{total} requests during 50 applies, none failed");
    assert!(total > 100, "only {total} requests");
    assert!(
        a.hits() > 0 && b.hits() > 0,
        "a {} b {}",
        a.hits(),
        b.hits()
    );
}

/// A listener added by an apply serves at once (on every worker), with the entries on its
/// port; one removed stops accepting while its open connections finish; the others are
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_and_removed_by_an_apply() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start_with(&two_nodes(&a, &b, "a", ""), 2);
    let port = eg.port("http");
    let extra = free_port();
    let with_extra = eg
        .fill(&two_nodes(&a, &b, "a", ""))
        .replacen(
            "listeners: [ ",
            &format!("listeners: [ {{ name: extra, bind: \"127.0.0.1:{extra}\" }}, "),
            1,
        )
        .replace(
            "spare: { entries: [],",
            &format!("spare: {{ entries: [\":{extra}\"],"),
        );
    let control = eg.server().control().clone();
    let applied = control.apply(Source::Api, &with_extra, false).unwrap();
    assert!(
        applied
            .diff
            .changes
            .iter()
            .any(|c| c.contains(&format!(":{extra} -> spare"))),
        "{:?}",
        applied.diff
    );
    // Served at once (retried only while the workers pick the new socket up).
    assert!(
        eventually(Duration::from_secs(3), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", extra))
                .await
                .is_ok()
        })
        .await
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let r = get(extra, "anything", "/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.node().to_string());
    }
    assert!(seen.contains("a") && seen.contains("b"), "{seen:?}");
    assert_eq!(get(port, "company.com", "/").await.node(), "a");

    // A keep-alive connection on the listener that goes away.
    let mut kept = connect(extra).await;
    assert_eq!(get_on(&mut kept, "x", "/").await.status, 200);

    let without = eg.fill(&two_nodes(&a, &b, "a", ""));
    control.apply(Source::Api, &without, false).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", extra))
                .await
                .is_err()
        })
        .await,
        "the removed listener still accepts"
    );
    // Its open connection finishes what it carries (the port's entry is gone: 404).
    assert_eq!(get_on(&mut kept, "x", "/").await.status, 404);
    assert_eq!(get(port, "company.com", "/").await.node(), "a");
}
