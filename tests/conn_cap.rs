//! `max_connections` per node, across workers: never more connections at the node than its
//! cap; a request that finds it full goes to another node with room, or waits
//! `timeouts.queue` for a pooled connection (or room) and then gets 503 `node_busy`,
//! without counting against the node.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;

/// A node that answers after `delay` and records how many requests it had at once (each
/// connection carries one at a time, so this is also the connections busy at once), and how
/// many connections carried requests in all (health checks, on connections of their own,
/// are left out).
struct Counting {
    addr: SocketAddr,
    busy: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    conns: Arc<AtomicUsize>,
}

impl Counting {
    async fn start(name: &'static str, delay: Duration) -> Counting {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let busy = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (b, m, sv, cn) = (busy.clone(), max.clone(), served.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (b, m, sv, cn) = (b.clone(), m.clone(), sv.clone(), cn.clone());
                tokio::spawn(async move {
                    let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let c = counted.clone();
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (b, m, sv, c, cn) =
                            (b.clone(), m.clone(), sv.clone(), c.clone(), cn.clone());
                        async move {
                            if req.uri().path() != "/healthz" {
                                if !c.swap(true, Ordering::SeqCst) {
                                    cn.fetch_add(1, Ordering::SeqCst);
                                }
                                let now = b.fetch_add(1, Ordering::SeqCst) + 1;
                                m.fetch_max(now, Ordering::SeqCst);
                                tokio::time::sleep(delay).await;
                                b.fetch_sub(1, Ordering::SeqCst);
                                sv.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("x-node", name)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Counting {
            addr,
            busy,
            max,
            served,
            conns,
        }
    }
}

fn yaml(nodes: &[(&str, SocketAddr, &str)], queue: &str) -> String {
    let list: String = nodes
        .iter()
        .map(|(n, a, extra)| format!("  {n}: {{ address: \"{a}\"{extra} }}\n"))
        .collect();
    let names: Vec<&str> = nodes.iter().map(|(n, _, _)| *n).collect();
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults:
  health: {{ trust_unknown: true, interval: 1h }}
  timeouts: {{ queue: {queue} }}
  retries: 0
nodes:
{list}environments:
  production: {{ entries: [":{{port:http}}"], nodes: [{}] }}
"#,
        names.join(", ")
    )
}

/// `n` requests at once, each on a connection of its own: (status, node, body) each.
async fn burst(port: u16, n: usize) -> Vec<(u16, String, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { get(port, "company.com", "/").await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        out.push((
            r.status.as_u16(),
            r.node().to_string(),
            r.text().to_string(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_slow_requests_share_two_connections_on_one_worker_and_on_several() {
    for workers in [1, 2] {
        let node = Counting::start("a", Duration::from_millis(150)).await;
        let eg = Envgate::start_with(
            &yaml(&[("a", node.addr, ", max_connections: 2")], "20s"),
            workers,
        );
        let replies = burst(eg.port("http"), 10).await;
        assert!(
            replies.iter().all(|(s, n, _)| *s == 200 && n == "a"),
            "{replies:?}"
        );
        assert_eq!(node.served.load(Ordering::SeqCst), 10);
        assert_eq!(node.busy.load(Ordering::SeqCst), 0);
        assert!(
            node.max.load(Ordering::SeqCst) <= 2,
            "at most 2 connections at the node, saw {} (workers {workers})",
            node.max.load(Ordering::SeqCst)
        );
        // The count envgate keeps agrees; on one worker the two connections are reused,
        // not replaced.
        let topo = eg.server().control().topology();
        assert!(topo.nodes[0].state.conns.open() <= 2);
        if workers == 1 {
            assert_eq!(node.conns.load(Ordering::SeqCst), 2);
        }
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_node_is_passed_over_for_one_with_room() {
    let a = Counting::start("a", Duration::from_millis(300)).await;
    let b = Counting::start("b", Duration::from_millis(300)).await;
    let eg = Envgate::start(&yaml(
        &[("a", a.addr, ", max_connections: 1"), ("b", b.addr, "")],
        "20s",
    ));
    let replies = burst(eg.port("http"), 6).await;
    assert!(replies.iter().all(|(s, _, _)| *s == 200), "{replies:?}");
    assert!(
        a.max.load(Ordering::SeqCst) <= 1,
        "{}",
        a.max.load(Ordering::SeqCst)
    );
    // Round-robin would give `a` three; its cap sent the others to `b` at once.
    assert!(b.served.load(Ordering::SeqCst) >= 4, "{replies:?}");
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_queue_time_a_full_node_answers_node_busy_and_is_not_blamed() {
    for workers in [1, 2] {
        let node = Counting::start("a", Duration::from_secs(2)).await;
        let eg = Envgate::start_with(
            &yaml(&[("a", node.addr, ", max_connections: 1")], "50ms"),
            workers,
        );
        let replies = burst(eg.port("http"), 4).await;
        let ok = replies.iter().filter(|(s, _, _)| *s == 200).count();
        let busy: Vec<_> = replies.iter().filter(|(s, _, _)| *s == 503).collect();
        assert_eq!(ok, 1, "{replies:?}");
        assert_eq!(busy.len(), 3, "{replies:?}");
        for (_, _, body) in busy {
            assert_eq!(
                body, r#"{"error":"node_busy","environment":"production"}"#,
                "{replies:?}"
            );
        }
        assert!(node.max.load(Ordering::SeqCst) <= 1);
        let topo = eg.server().control().topology();
        assert!(!topo.nodes[0].state.is_ejected());
        // Once the slow answer is over, the node serves again.
        let r = get(eg.port("http"), "company.com", "/").await;
        assert_eq!(r.status, 200);
        eg.stop().await;
    }
}
