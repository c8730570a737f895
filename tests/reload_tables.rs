//! A worker's tables across topology swaps, over real sockets: after nodes are reordered,
//! swap addresses, change address, leave and come back, every request still reaches the
//! node the document names (each upstream names itself); connection pools follow the
//! address, not the index, and the idle connections of a node that left close (once no
//! request holds the tables they belong to). Long application lists (maps instead of
//! scans in the validator) give the same problems as short ones through the apply path,
//! and route like short ones.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envgate::config::ErrorKind;
use envgate::control::{ApplyError, Source};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;

/// Health checks that never get in the way: a verdict flapping under load would turn a
/// node away, and these tests are about where requests go, not about health.
const CHECKS: &str = "health: { interval: 1m, timeout: 1s }";

/// `nodes` (name, address) in this order, and one environment per `(env, node)` on host
/// `<env>.com`, in this order, each served by its one node.
fn layout(nodes: &[(&str, SocketAddr)], envs: &[(&str, &str)]) -> String {
    let mut t = Topo::new().defaults(CHECKS);
    for (n, a) in nodes {
        t = t.node(n, *a);
    }
    for (e, n) in envs {
        t = t.env(e, &[&format!("{e}.com")], &format!("nodes: [{n}]"));
    }
    t.yaml()
}

/// Whether `host` reaches the upstream named `want` within 5 s. An answer from any other
/// upstream fails the test at once: a request sent to the wrong address.
async fn lands(port: u16, host: &str, want: &str) -> bool {
    eventually(Duration::from_secs(5), || async {
        let r = get(port, host, "/").await;
        let got = r.node().to_string();
        assert!(
            got.is_empty() || got == want,
            "{host}: answered by {got}, the document says {want}"
        );
        got == want
    })
    .await
}

/// Every `(host, upstream)` pair lands, on fresh connections and on one kept-alive client
/// connection; a few rounds, so that both workers see every host.
async fn all_land(port: u16, want: &[(&str, &str)]) {
    for (host, node) in want {
        assert!(lands(port, host, node).await, "{host} never reached {node}");
    }
    let mut tx = connect::<Full<Bytes>>(port).await;
    for _ in 0..3 {
        for (host, node) in want {
            let r = get(port, host, "/").await;
            assert_eq!(r.node(), *node, "{host} (fresh connection)");
            let r = get_on(&mut tx, host, "/").await;
            assert_eq!(r.node(), *node, "{host} (kept-alive connection)");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_and_readdressed_nodes_reach_the_right_upstream() {
    let mut u = Vec::new();
    for i in 0..6 {
        u.push(Upstream::start(&format!("u{i}")).await);
    }
    let a = |i: usize| u[i].addr;
    let g1 = layout(
        &[("n0", a(0)), ("n1", a(1)), ("n2", a(2)), ("n3", a(3))],
        &[("e0", "n0"), ("e1", "n1"), ("e2", "n2"), ("e3", "n3")],
    );
    let eg = Envgate::start_with(&g1, 2);
    let port = eg.port("http");
    let first = [
        ("e0.com", "u0"),
        ("e1.com", "u1"),
        ("e2.com", "u2"),
        ("e3.com", "u3"),
    ];
    all_land(port, &first).await;

    // Every node at another index; n1 and n2 swap addresses, n0 moves to a new address,
    // n5 takes n0's old one; environments reordered, e5 added.
    eg.apply(&layout(
        &[
            ("n3", a(3)),
            ("n2", a(1)),
            ("n1", a(2)),
            ("n0", a(4)),
            ("n5", a(0)),
        ],
        &[
            ("e5", "n5"),
            ("e2", "n2"),
            ("e1", "n1"),
            ("e0", "n0"),
            ("e3", "n3"),
        ],
    ));
    all_land(
        port,
        &[
            ("e0.com", "u4"),
            ("e1.com", "u2"),
            ("e2.com", "u1"),
            ("e3.com", "u3"),
            ("e5.com", "u0"),
        ],
    )
    .await;

    // Back to the first generation: n5 leaves, n0, n1 and n2 return to their addresses.
    eg.apply(&g1);
    all_land(port, &first).await;
    assert_eq!(get(port, "e5.com", "/").await.node(), "");

    // The node list reversed, n1 gone, n4 added last at a brand new address; one node
    // keeps its index (n2 in the middle of five) with another address.
    eg.apply(&layout(
        &[
            ("n3", a(3)),
            ("n0", a(0)),
            ("n2", a(5)),
            ("n6", a(2)),
            ("n4", a(4)),
        ],
        &[
            ("e4", "n4"),
            ("e3", "n3"),
            ("e2", "n2"),
            ("e0", "n0"),
            ("e6", "n6"),
        ],
    ));
    all_land(
        port,
        &[
            ("e0.com", "u0"),
            ("e2.com", "u5"),
            ("e3.com", "u3"),
            ("e4.com", "u4"),
            ("e6.com", "u2"),
        ],
    )
    .await;
    assert_eq!(get(port, "e1.com", "/").await.node(), "");
}

/// A request in flight when its node's address goes to another node finishes on the node
/// it started on, and what follows goes where the new document says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_in_flight_across_an_address_swap() {
    let (u0, u1) = (Upstream::start("u0").await, Upstream::start("u1").await);
    let g1 = layout(
        &[("n0", u0.addr), ("n1", u1.addr)],
        &[("e0", "n0"), ("e1", "n1")],
    );
    let eg = Envgate::start(&g1);
    let port = eg.port("http");
    all_land(port, &[("e0.com", "u0"), ("e1.com", "u1")]).await;

    let before = u0.hits();
    let slow = tokio::spawn(async move { get(port, "e0.com", "/slow?ms=1500").await });
    assert!(
        eventually(Duration::from_secs(5), || async { u0.hits() > before }).await,
        "the slow request never reached u0"
    );
    // The addresses swap while it is in flight.
    eg.apply(&layout(
        &[("n1", u0.addr), ("n0", u1.addr)],
        &[("e1", "n1"), ("e0", "n0")],
    ));
    all_land(port, &[("e0.com", "u1"), ("e1.com", "u0")]).await;
    let r = slow.await.unwrap();
    assert_eq!((r.status.as_u16(), r.node()), (200, "u0"));
    // Its connection went back to the pool of u0's address, which n1 now uses.
    all_land(port, &[("e0.com", "u1"), ("e1.com", "u0")]).await;
}

/// An upstream that names itself (`x-node`) and counts the connections that carried
/// requests other than health checks: how many ever, how many are open. `/hold` answers
/// once `release` is called (one answer per call).
struct Counted {
    addr: SocketAddr,
    ever: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
    held: Arc<AtomicUsize>,
}

impl Counted {
    async fn start(name: &'static str) -> Counted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ever = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let (e, o, g, h) = (ever.clone(), open.clone(), gate.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (e, o, g, h) = (e.clone(), o.clone(), g.clone(), h.clone());
                let counted = Arc::new(AtomicBool::new(false));
                let c = counted.clone();
                let o2 = o.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (e, o, g, h, c) =
                            (e.clone(), o.clone(), g.clone(), h.clone(), c.clone());
                        async move {
                            if req.uri().path() != "/healthz" && !c.swap(true, Ordering::SeqCst) {
                                e.fetch_add(1, Ordering::SeqCst);
                                o.fetch_add(1, Ordering::SeqCst);
                            }
                            if req.uri().path() == "/hold" {
                                h.fetch_add(1, Ordering::SeqCst);
                                g.acquire().await.unwrap().forget();
                            }
                            let mut r = Response::new(Full::new(Bytes::from(name)));
                            r.headers_mut().insert("x-node", name.parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    if counted.load(Ordering::SeqCst) {
                        o2.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Counted {
            addr,
            ever,
            open,
            gate,
            held,
        }
    }

    fn ever(&self) -> usize {
        self.ever.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn release(&self) {
        self.gate.add_permits(1);
    }

    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

async fn open_is(c: &Counted, n: usize) -> bool {
    eventually(Duration::from_secs(5), || async { c.open() == n }).await
}

/// One worker: pools follow the address whatever the index; the idle connection of a node
/// that left (or changed address) closes once the worker took the new tables and no
/// request holds the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_follow_addresses_and_departed_nodes_close() {
    let (ua, ub, uc, ud) = (
        Counted::start("A").await,
        Counted::start("B").await,
        Counted::start("C").await,
        Counted::start("D").await,
    );
    let three = |order: &[&str]| {
        let addr = |n: &str| match n {
            "a" => ua.addr,
            "b" => ub.addr,
            _ => uc.addr,
        };
        let nodes: Vec<(&str, SocketAddr)> = order.iter().map(|n| (*n, addr(n))).collect();
        let envs: Vec<(String, &str)> = order.iter().map(|n| (format!("e{n}"), *n)).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(e, n)| (e.as_str(), *n)).collect();
        layout(&nodes, &envs)
    };
    let eg = Envgate::start(&three(&["a", "b", "c"]));
    let port = eg.port("http");
    let everyone = [("ea.com", "A"), ("eb.com", "B"), ("ec.com", "C")];
    all_land(port, &everyone).await;
    // One request at a time: one pooled connection each.
    assert_eq!((ua.ever(), ub.ever(), uc.ever()), (1, 1, 1));

    // Every node at another index: the pools move with their addresses.
    eg.apply(&three(&["c", "a", "b"]));
    all_land(port, &everyone).await;
    assert_eq!(
        (ua.ever(), ub.ever(), uc.ever()),
        (1, 1, 1),
        "a pool was not carried to its node's new index"
    );

    // b leaves: its idle connection closes once the worker has rebuilt its tables.
    eg.apply(&three(&["c", "a"]));
    all_land(port, &[("ea.com", "A"), ("ec.com", "C")]).await;
    assert!(
        open_is(&ub, 0).await,
        "the pool of a departed node stayed open"
    );
    assert_eq!((ua.open(), uc.open()), (1, 1));

    // b comes back at index 0, on a fresh connection.
    eg.apply(&three(&["b", "c", "a"]));
    all_land(port, &everyone).await;
    assert_eq!((ub.ever(), ub.open()), (2, 1));
    assert_eq!((ua.ever(), uc.ever()), (1, 1));

    // a keeps its index and name, with a new address: D serves it, A's connection closes.
    let readdressed = three(&["b", "c", "a"]).replace(&ua.addr.to_string(), &ud.addr.to_string());
    eg.apply(&readdressed);
    all_land(port, &[("ea.com", "D"), ("eb.com", "B"), ("ec.com", "C")]).await;
    assert!(
        open_is(&ua, 0).await,
        "the pool of a left address stayed open"
    );
    assert_eq!(ud.ever(), 1);

    // An exchange in flight holds the old tables: c leaves while it waits on c, the
    // worker takes the new tables, and c's connections close once the exchange ended.
    let held = tokio::spawn(async move { get(port, "ec.com", "/hold").await });
    assert!(eventually(Duration::from_secs(5), || async { uc.held() == 1 }).await);
    eg.apply(
        &readdressed
            .replace(&format!("  c: {{ address: \"{}\" }}\n", uc.addr), "")
            .replace(
                "  ec: { entries: [\"ec.com:{port:http}\"], nodes: [c] }\n",
                "",
            ),
    );
    all_land(port, &[("ea.com", "D"), ("eb.com", "B")]).await;
    assert_eq!(get(port, "ec.com", "/").await.node(), "");
    uc.release();
    let r = held.await.unwrap();
    assert_eq!((r.status.as_u16(), r.node()), (200, "C"));
    // The worker's next request lets the old tables go, if the exchange's end did not.
    all_land(port, &[("ea.com", "D")]).await;
    assert!(
        open_is(&uc, 0).await,
        "a departed node's connection stayed open"
    );
    assert_eq!((ud.open(), ub.open()), (1, 1));
}

/// The errors of one refused apply, as (path, kind, message), sorted.
fn refused(eg: &Envgate, yaml: &str) -> Vec<(String, ErrorKind, String)> {
    let text = eg.fill(yaml);
    match eg.server().control().apply(Source::Api, &text, false) {
        Err(ApplyError::Invalid(errs)) => {
            let mut v: Vec<_> = errs
                .into_iter()
                .map(|e| (e.path, e.kind, e.message))
                .collect();
            v.sort_by(|x, y| (&x.0, &x.2).cmp(&(&y.0, &y.2)));
            v
        }
        other => panic!("not refused as invalid: {other:?}\n{text}"),
    }
}

/// An environment `production` on company.com with the applications given (each a YAML
/// flow map), padded with distinct applications up to `len`.
fn with_apps(node: SocketAddr, apps: &[&str], len: usize) -> String {
    let mut list: Vec<String> = apps.iter().map(|a| a.to_string()).collect();
    let mut i = 0;
    while list.len() < len {
        list.push(format!("{{ name: pad{i}, version: \"1\", path: /pad{i} }}"));
        i += 1;
    }
    Topo::new()
        .node("a", node)
        .env(
            "production",
            &["company.com"],
            &format!("nodes: [a], apps: [ {} ]", list.join(", ")),
        )
        .yaml()
}

/// The same duplicates give the same problems, with the same paths and the same other
/// party, in a list of 16 applications (scanned) and of 17 (maps), through the apply path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_short_application_lists_refuse_alike() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&with_apps(a.addr, &[], 1));
    let port = eg.port("http");
    let generation = eg.server().control().topology().generation;
    let apps = [
        // apps[0..3]: one name three times.
        "{ name: x, version: \"1\", path: /x1 }",
        "{ name: x, version: \"2\", path: /x2 }",
        "{ name: x, version: \"3\", path: /x3 }",
        // apps[3..6]: one prefix three times, written three ways.
        "{ name: p1, version: \"1\", path: /p }",
        "{ name: p2, version: \"1\", path: /p/ }",
        "{ name: p3, version: \"1\", path: /p// }",
        // apps[6..8]: empty and all-slash prefixes (both become \"\").
        "{ name: e1, version: \"1\", path: \"\" }",
        "{ name: e2, version: \"1\", path: \"//\" }",
        // apps[8]: `/` given, and apps[9] none: the same prefix.
        "{ name: r1, version: \"1\", path: / }",
        "{ name: r2, version: \"1\" }",
    ];
    let short = refused(&eg, &with_apps(a.addr, &apps, 16));
    let long = refused(&eg, &with_apps(a.addr, &apps, 17));
    assert_eq!(
        short, long,
        "16 and 17 applications are checked differently"
    );
    let at = |i: usize| format!("environments.production.apps[{i}]");
    let find = |path: String| {
        short
            .iter()
            .filter(|e| e.0 == path)
            .map(|e| (e.1, e.2.clone()))
            .collect::<Vec<_>>()
    };
    // The third `x` names the second one (the latest before it), as before maps were
    // kept for long lists only.
    let third = find(at(2));
    assert_eq!(third.len(), 1, "{short:#?}");
    assert_eq!(third[0].0, ErrorKind::Conflict);
    assert!(
        third[0].1.contains(&format!("({}) ", at(1))) && third[0].1.contains("\"2\""),
        "{third:?}"
    );
    let second = find(at(1));
    assert!(second[0].1.contains(&format!("({})", at(0))), "{second:?}");
    // `/p//` conflicts with `/p/`, the latest application on `/p` before it.
    let p3 = find(format!("{}.path", at(5)));
    assert_eq!(p3.len(), 1, "{short:#?}");
    assert!(
        p3[0].1.contains("\"p2\"") && p3[0].1.contains(&at(4)) && p3[0].1.contains("\"/p\""),
        "{p3:?}"
    );
    // "" and "//" are both malformed, and claim the same (empty) prefix.
    let e1 = find(format!("{}.path", at(6)));
    assert_eq!(e1.len(), 1, "{short:#?}");
    assert_eq!(e1[0].0, ErrorKind::Value);
    let e2 = find(format!("{}.path", at(7)));
    assert_eq!(
        e2.iter().map(|e| e.0).collect::<Vec<_>>(),
        [ErrorKind::Conflict, ErrorKind::Value],
        "{e2:?}"
    );
    // No path given is `/`.
    let r2 = find(format!("{}.path", at(9)));
    assert!(
        r2.len() == 1 && r2[0].1.contains("\"r1\"") && r2[0].1.contains(&at(8)),
        "{r2:?}"
    );
    // Nothing else, and nothing changed.
    assert_eq!(short.len(), 8, "{short:#?}");
    assert_eq!(eg.server().control().topology().generation, generation);
    assert_eq!(get(port, "company.com", "/pad0/").await.node(), "a");
}

/// A long application list routes each prefix to its application's nodes, and keeps doing
/// so when the applications and the nodes are reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_application_lists_route_by_prefix() {
    let u = [
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
    ];
    let doc = |reverse: bool| {
        let mut apps: Vec<String> = (0..20)
            .map(|i| {
                format!(
                    "{{ name: app{i}, version: \"1\", path: /p{i}/, nodes: [n{}] }}",
                    i % 3
                )
            })
            .collect();
        let mut nodes: Vec<usize> = vec![0, 1, 2];
        if reverse {
            apps.reverse();
            nodes.reverse();
        }
        let mut t = Topo::new().defaults(CHECKS);
        for n in nodes {
            t = t.node(&format!("n{n}"), u[n].addr);
        }
        t.env(
            "production",
            &["company.com"],
            &format!("nodes: [n0, n1, n2], apps: [ {} ]", apps.join(", ")),
        )
        .yaml()
    };
    let eg = Envgate::start_with(&doc(false), 2);
    let port = eg.port("http");
    for reverse in [false, true] {
        if reverse {
            eg.apply(&doc(true));
        }
        for i in 0..20 {
            let want = format!("u{}", i % 3);
            assert!(
                eventually(Duration::from_secs(5), || async {
                    let got = get(port, "company.com", &format!("/p{i}/x")).await;
                    assert!(
                        got.node().is_empty() || got.node() == want,
                        "/p{i}/x answered by {}, not {want}",
                        got.node()
                    );
                    got.node() == want
                })
                .await,
                "/p{i}/x never reached {want}"
            );
        }
        // `/p1x` is no application's path (`/p1` is not a prefix of it by segments).
        assert_eq!(get(port, "company.com", "/p1x").await.status, 404);
    }
}
