//! Review attacks on HTTP/2 nodes: blame, replays, stream accounting, node stream limits.
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy)]
enum Misbehave {
    /// GOAWAY (NO_ERROR, last stream id 0) on each request: the stream was not processed.
    GoAway,
    /// RST_STREAM with this code on each request.
    Reset(u32),
}

/// A hand-driven HTTP/2 node speaking raw frames; counts the HEADERS frames it got.
async fn raw_h2_node(how: Misbehave) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                loop {
                    let mut h = [0u8; 9];
                    if s.read_exact(&mut h).await.is_err() {
                        return;
                    }
                    let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let (ty, flags) = (h[3], h[4]);
                    let sid = &h[5..9];
                    if ty == 4 && flags & 1 == 0 {
                        let _ = s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                    }
                    if ty == 1 {
                        seen.fetch_add(1, Ordering::SeqCst);
                        match how {
                            Misbehave::GoAway => {
                                let _ = s
                                    .write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                                    .await;
                            }
                            Misbehave::Reset(code) => {
                                let mut f = vec![0, 0, 4, 3, 0];
                                f.extend_from_slice(sid);
                                f.extend_from_slice(&code.to_be_bytes());
                                let _ = s.write_all(&f).await;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// An HTTP/2 node by hyper, with the given SETTINGS_MAX_CONCURRENT_STREAMS. `/hold` answers
/// once `release` is notified; `/503` answers 503 with a body; anything else "ok".
struct HyperNode {
    addr: SocketAddr,
    /// Connections that carried a request.
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    release: Arc<tokio::sync::Notify>,
}

async fn hyper_node(max_streams: u32) -> HyperNode {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (c, r, rel) = (conns.clone(), requests.clone(), release.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (r, rel) = (r.clone(), rel.clone());
            // Counted at its first request: a TCP health check's connection carries none
            // (and its accept may come after a test looked).
            let (c, counted) = (c.clone(), Arc::new(AtomicBool::new(false)));
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (r, rel) = (r.clone(), rel.clone());
                    if !counted.swap(true, Ordering::SeqCst) {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        let resp = match req.uri().path() {
                            "/hold" => {
                                rel.notified().await;
                                Response::new(Full::new(Bytes::from_static(b"held")))
                            }
                            "/503" => Response::builder()
                                .status(503)
                                .header("content-type", "application/grpc")
                                .header("content-length", "4")
                                .body(Full::new(Bytes::from_static(b"down")))
                                .unwrap(),
                            _ => Response::new(Full::new(Bytes::from_static(b"ok"))),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(max_streams)
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    HyperNode {
        addr,
        conns,
        requests,
        release,
    }
}

fn yaml(nodes: &[(&str, SocketAddr)], extra_defaults: &str) -> String {
    let list: Vec<String> = nodes
        .iter()
        .map(|(n, a)| format!("  {n}: {{ address: \"{a}\", protocol: h2c }}"))
        .collect();
    let names: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ type: tcp, interval: 1h }}{extra_defaults} }}
nodes:
{}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [{}] }}
"#,
        list.join("\n"),
        names.join(", ")
    )
}

async fn all_up(eg: &Envgate) {
    let topo = eg.server().control().topology();
    assert!(
        eventually(Duration::from_secs(5), || async {
            topo.nodes
                .iter()
                .all(|n| n.state.health() == envgate::health::Health::Up)
        })
        .await,
        "nodes up"
    );
}

fn ejected(eg: &Envgate, name: &str) -> bool {
    let topo = eg.server().control().topology();
    topo.nodes
        .iter()
        .find(|n| &*n.name == name)
        .unwrap()
        .state
        .is_ejected()
}

/// A GOAWAY whose last stream id is below the request's stream says the request was not
/// processed: like REFUSED_STREAM, it must not count against the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_past_a_goaway_is_not_blamed_on_the_node() {
    let (bad, seen) = raw_h2_node(Misbehave::GoAway).await;
    let good = hyper_node(100).await;
    let eg = Envgate::start(&yaml(
        &[("leaving", bad), ("good", good.addr)],
        ", passive: { consecutive_failures: 1 }",
    ));
    all_up(&eg).await;
    for _ in 0..6 {
        let r = get(eg.port("http"), "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(
        seen.load(Ordering::SeqCst) >= 1,
        "the leaving node saw a stream"
    );
    assert!(
        !ejected(&eg, "leaving"),
        "a node that answered GOAWAY (stream unprocessed) was ejected"
    );
    eg.stop().await;
}

/// A node resetting streams with INTERNAL_ERROR is failing: it is blamed and ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_resetting_streams_with_internal_error_is_blamed() {
    let (bad, seen) = raw_h2_node(Misbehave::Reset(2)).await;
    let good = hyper_node(100).await;
    let eg = Envgate::start(&yaml(
        &[("resetting", bad), ("good", good.addr)],
        ", passive: { consecutive_failures: 2 }",
    ));
    all_up(&eg).await;
    for _ in 0..8 {
        // A GET reset by the node goes again to the other node.
        let r = get(eg.port("http"), "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(seen.load(Ordering::SeqCst) >= 2);
    assert!(ejected(&eg, "resetting"));
    eg.stop().await;
}

/// A POST with a body reset by one node (INTERNAL_ERROR: maybe processed) is never sent
/// to another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_with_a_body_reset_by_a_node_is_not_sent_again() {
    let (bad, seen) = raw_h2_node(Misbehave::Reset(2)).await;
    let good = hyper_node(100).await;
    let eg = Envgate::start(&yaml(&[("resetting", bad), ("good", good.addr)], ""));
    all_up(&eg).await;
    let mut sent_to_bad = 0;
    for _ in 0..6 {
        let before = seen.load(Ordering::SeqCst);
        let good_before = good.requests.load(Ordering::SeqCst);
        let r = send(
            eg.port("http"),
            Request::post("http://company.com/")
                .body(Full::new(Bytes::from_static(b"pay once")))
                .unwrap(),
        )
        .await;
        if seen.load(Ordering::SeqCst) > before {
            sent_to_bad += 1;
            assert_eq!(r.status, 502, "{}", r.text());
            assert_eq!(
                good.requests.load(Ordering::SeqCst),
                good_before,
                "replayed"
            );
        }
    }
    assert!(sent_to_bad >= 1);
    eg.stop().await;
}

/// A node that allows one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS 1): a second
/// request while the first is held must not wait behind it inside the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stream_limit_below_100_does_not_queue_requests_behind_each_other() {
    let node = hyper_node(1).await;
    let eg = Envgate::start(&yaml(
        &[("n", node.addr)],
        ", passive: { consecutive_failures: 1 }",
    ));
    all_up(&eg).await;
    let port = eg.port("http");
    let held = tokio::spawn(async move { get(port, "company.com", "/hold").await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            node.requests.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let second = tokio::spawn(async move { get(port, "company.com", "/").await });
    let finished = eventually(Duration::from_secs(5), || async { second.is_finished() }).await;
    node.release.notify_waiters();
    let _ = held.await;
    assert!(
        finished,
        "the second request waited behind the node's stream limit on the same connection"
    );
    eg.stop().await;
}

/// Clients cancelling HTTP/2 streams while the node works: the node is not blamed, and the
/// stream count comes back (past 100 cancels, still one connection to the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_client_streams_neither_blame_the_node_nor_leak_streams() {
    let node = hyper_node(1000).await;
    let eg = Envgate::start(&yaml(
        &[("n", node.addr)],
        ", passive: { consecutive_failures: 1 }",
    ));
    all_up(&eg).await;
    let conns_before = node.conns.load(Ordering::SeqCst);
    let mut client = h2_client(eg.port("http")).await;
    for i in 1..=120 {
        // A connection of its own each (envgate closes one with many early resets).
        let mut c = h2_client(eg.port("http")).await.ready().await.unwrap();
        let (resp, _) = c
            .send_request(
                Request::get("http://company.com/hold").body(()).unwrap(),
                true,
            )
            .unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                node.requests.load(Ordering::SeqCst) == i
            })
            .await
        );
        drop(resp);
        drop(c);
    }
    // Each cancelled stream reaches the node as a reset; then a fresh request.
    let r = h2_send(
        &mut client,
        Request::get("http://company.com/").body(()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        !ejected(&eg, "n"),
        "cancelled client streams blamed the node"
    );
    let opened = node.conns.load(Ordering::SeqCst) - conns_before;
    assert_eq!(opened, 1, "{opened} connections opened: streams leaked");
    eg.stop().await;
}

/// A node's own error answer to a gRPC client is relayed as it is (not turned into a
/// gRPC error, its content-length kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nodes_own_error_to_a_grpc_client_is_left_as_it_is() {
    let node = hyper_node(100).await;
    let eg = Envgate::start(&yaml(&[("n", node.addr)], ""));
    all_up(&eg).await;
    let mut client = h2_client(eg.port("http")).await;
    let r = h2_send(
        &mut client,
        Request::post("http://company.com/503")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(r.headers.get("grpc-status").is_none());
    assert_eq!(&r.body[..], b"down");
    eg.stop().await;
}

/// envgate's own error to a gRPC client is a gRPC error without content-length; an
/// HTTP/1.1 client with the same content type gets the plain answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envgate_own_error_is_grpc_only_for_http2_grpc_clients() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let eg = Envgate::start(
        &yaml(&[("n", addr)], "").replace("interval: 1h", "interval: 1h, trust_unknown: true"),
    );
    let mut client = h2_client(eg.port("http")).await;
    let r = h2_send(
        &mut client,
        Request::post("http://company.com/x")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["grpc-status"], "14");
    assert!(r.headers.get("content-length").is_none_or(|v| v == "0"));
    assert!(r.body.is_empty());
    let r = send(
        eg.port("http"),
        Request::post("http://company.com/x")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert!(r.status == 502 || r.status == 503, "{}", r.status);
    assert!(r.headers.get("grpc-status").is_none());
    eg.stop().await;
}
