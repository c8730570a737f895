//! Nodes spoken to over HTTP/2 (`protocol: h2c`, and `h2` over TLS): requests multiplexed
//! on few connections, a new one past the streams bound, health checks over HTTP/2,
//! trailers and streaming both ways at once (what gRPC needs), and a node that closes its
//! connection with GOAWAY losing no request.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// A response body fed by a channel.
struct ChanBody(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// An HTTP/2 node (prior knowledge, or TLS with ALPN h2). `/echo` streams each request body
/// frame back as it comes and ends with trailers `grpc-status: 0`; `/slow` answers after
/// 300 ms; anything else answers its name. With `goaway_after`, each connection is closed
/// gracefully (GOAWAY) after that many requests.
struct H2Node {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    busy_max: Arc<AtomicUsize>,
}

impl H2Node {
    async fn start(
        name: &'static str,
        tls: Option<Arc<rustls::ServerConfig>>,
        goaway_after: Option<usize>,
    ) -> H2Node {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicUsize::new(0));
        let busy_max = Arc::new(AtomicUsize::new(0));
        let (c, r, b, m) = (
            conns.clone(),
            requests.clone(),
            busy.clone(),
            busy_max.clone(),
        );
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (c, r, b, m, acceptor) =
                    (c.clone(), r.clone(), b.clone(), m.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let per_conn = Arc::new(AtomicUsize::new(0));
                    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (r, b, m, per_conn, done_tx) = (
                            r.clone(),
                            b.clone(),
                            m.clone(),
                            per_conn.clone(),
                            done_tx.clone(),
                        );
                        async move {
                            let path = req.uri().path().to_string();
                            if path != "/healthz" {
                                r.fetch_add(1, Ordering::SeqCst);
                                let n = per_conn.fetch_add(1, Ordering::SeqCst) + 1;
                                if goaway_after.is_some_and(|g| n >= g) {
                                    let _ = done_tx.try_send(());
                                }
                            }
                            let (tx, rx) = tokio::sync::mpsc::channel(16);
                            if path == "/echo" {
                                let mut body = req.into_body();
                                tokio::spawn(async move {
                                    while let Some(Ok(f)) = body.frame().await {
                                        if let Ok(d) = f.into_data() {
                                            let _ = tx.send(Frame::data(d)).await;
                                        }
                                    }
                                    let mut t = HeaderMap::new();
                                    t.insert("grpc-status", "0".parse().unwrap());
                                    let _ = tx.send(Frame::trailers(t)).await;
                                });
                            } else {
                                if path == "/slow" {
                                    let now = b.fetch_add(1, Ordering::SeqCst) + 1;
                                    m.fetch_max(now, Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                    b.fetch_sub(1, Ordering::SeqCst);
                                }
                                let _ = tx.send(Frame::data(Bytes::from_static(b"ok"))).await;
                            }
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("x-node", name)
                                    .body(ChanBody(rx))
                                    .unwrap(),
                            )
                        }
                    });
                    c.fetch_add(1, Ordering::SeqCst);
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    macro_rules! serve {
                        ($io:expr) => {{
                            let conn = builder.serve_connection(TokioIo::new($io), svc);
                            tokio::pin!(conn);
                            tokio::select! {
                                _ = conn.as_mut() => {}
                                _ = done_rx.recv() => {
                                    conn.as_mut().graceful_shutdown();
                                    let _ = conn.await;
                                }
                            }
                        }};
                    }
                    match acceptor {
                        None => serve!(s),
                        Some(a) => {
                            if let Ok(s) = a.accept(s).await {
                                serve!(s)
                            }
                        }
                    }
                });
            }
        });
        H2Node {
            addr,
            conns,
            requests,
            busy_max,
        }
    }
}

fn topology(node: &H2Node, extra: &str) -> String {
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ interval: 1h }} }}
nodes: {{ n: {{ address: "{}", protocol: h2c{extra} }} }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [n] }}
"#,
        node.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_multiplexed_on_few_connections_and_checked_over_http2() {
    for workers in [1, 2] {
        let node = H2Node::start("h2", None, None).await;
        let eg = Envgate::start_with(&topology(&node, ""), workers);
        // The node came up by a health check over HTTP/2 (no traffic is sent to a node
        // that was not seen up).
        let topo = eg.server().control().topology();
        assert!(
            eventually(Duration::from_secs(5), || async {
                topo.nodes[0].state.health() == envgate::health::Health::Up
            })
            .await
        );
        let port = eg.port("http");
        let tasks: Vec<_> = (0..60)
            .map(|_| tokio::spawn(async move { get(port, "company.com", "/slow").await }))
            .collect();
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.node(), "h2");
            assert_eq!(r.text(), "ok");
        }
        // 60 at once on at most one connection a worker (plus the health check's own).
        assert!(node.busy_max.load(Ordering::SeqCst) > 10);
        assert!(
            node.conns.load(Ordering::SeqCst) <= workers + 1,
            "{} connections",
            node.conns.load(Ordering::SeqCst)
        );
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_streams_bound_a_second_connection_opens() {
    let node = H2Node::start("h2", None, None).await;
    let eg = Envgate::start(&topology(&node, ""));
    let port = eg.port("http");
    let tasks: Vec<_> = (0..150)
        .map(|_| tokio::spawn(async move { get(port, "company.com", "/slow").await }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    // 100 streams a connection: 150 at once need two (and the health check had one).
    assert!(node.busy_max.load(Ordering::SeqCst) > 100);
    let conns = node.conns.load(Ordering::SeqCst);
    assert!((2..=3).contains(&conns), "{conns} connections");
    eg.stop().await;
}

/// Streaming both ways at once with trailers, as a gRPC bidirectional stream: each message
/// the client sends comes back before the next is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bidirectional_stream_with_trailers_passes_through() {
    for workers in [1, 2] {
        let node = H2Node::start("h2", None, None).await;
        let eg = Envgate::start_with(&topology(&node, ""), workers);
        let mut client = h2_client(eg.port("http")).await;
        let req = Request::post("http://company.com/echo")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut up) = client.send_request(req, false).unwrap();
        up.send_data(Bytes::from_static(b"ping-1"), false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut down = resp.into_body();
        let mut got = Vec::new();
        for i in 1..=3 {
            let mut echoed = Vec::new();
            while echoed.len() < 6 {
                let d = down.data().await.unwrap().unwrap();
                let _ = down.flow_control().release_capacity(d.len());
                echoed.extend_from_slice(&d);
            }
            got.push(String::from_utf8(echoed).unwrap());
            if i < 3 {
                let next = Bytes::from(format!("ping-{}", i + 1));
                up.send_data(next, i + 1 == 3).unwrap();
            }
        }
        assert_eq!(got, ["ping-1", "ping-2", "ping-3"]);
        let trailers = down.trailers().await.unwrap().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_sends_goaway_loses_no_request() {
    let node = H2Node::start("h2", None, Some(5)).await;
    let eg = Envgate::start_with(&topology(&node, ""), 2);
    let port = eg.port("http");
    for _ in 0..40 {
        let r = get(port, "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(node.requests.load(Ordering::SeqCst), 40);
    // Each connection carried about five requests before its GOAWAY.
    assert!(node.conns.load(Ordering::SeqCst) >= 8);
    let topo = eg.server().control().topology();
    assert!(!topo.nodes[0].state.is_ejected());
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_over_tls_with_alpn_h2() {
    let pki = support::pki::Pki::new();
    let leaf = pki.leaf("node", &["grpc.internal"]);
    let mut config = (*pki.server_config(&leaf)).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let ca_path = pki.ca_path();
    let node = H2Node::start("h2tls", Some(Arc::new(config)), None).await;
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ interval: 1h }} }}
nodes: {{ n: {{ address: "{}", protocol: h2, tls: {{ server_name: grpc.internal, ca: "{}" }} }} }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [n] }}
"#,
        node.addr,
        ca_path.display()
    );
    let eg = Envgate::start(&yaml);
    for _ in 0..5 {
        let r = get(eg.port("http"), "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.node(), "h2tls");
    }
    assert!(node.conns.load(Ordering::SeqCst) <= 2);
    eg.stop().await;
}

#[test]
fn protocols_are_checked() {
    for (extra, problem) in [
        (", protocol: h2", "protocol h2 is HTTP/2 over TLS"),
        (
            ", protocol: h2c, tls: {}",
            "protocol h2c is HTTP/2 in clear",
        ),
        (", protocol: spdy", "must be http1, h2c"),
    ] {
        let doc = format!(
            "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:8080\" }} ]\nnodes: {{ n: {{ address: \"127.0.0.1:9\"{extra} }} }}\nenvironments:\n  p: {{ entries: [\":8080\"], nodes: [n] }}\n"
        );
        let e = envgate::config::parse(&doc, std::path::Path::new("."))
            .err()
            .unwrap_or_else(|| panic!("{extra} is refused"));
        assert!(e.to_string().contains(problem), "{e}");
    }
}

/// A node that refuses every stream unprocessed (REFUSED_STREAM): each request goes to
/// the other node, and the refusing one is not counted as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_streams_go_to_another_node_without_blame() {
    let refusing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refusing_addr = refusing.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let r = refused.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = refusing.accept().await else {
                continue;
            };
            let r = r.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if req.uri().path() == "/healthz" {
                        let _ = respond.send_response(Response::new(()), true);
                    } else {
                        r.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                }
            });
        }
    });
    let good = H2Node::start("good", None, None).await;
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ interval: 1h }}, passive: {{ consecutive_failures: 2 }} }}
nodes:
  refusing: {{ address: "{refusing_addr}", protocol: h2c }}
  good: {{ address: "{}", protocol: h2c }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [refusing, good] }}
"#,
        good.addr
    );
    let eg = Envgate::start(&yaml);
    let topo = eg.server().control().topology();
    assert!(
        eventually(Duration::from_secs(5), || async {
            topo.nodes
                .iter()
                .all(|n| n.state.health() == envgate::health::Health::Up)
        })
        .await
    );
    for _ in 0..10 {
        let r = get(eg.port("http"), "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.node(), "good");
    }
    assert!(refused.load(Ordering::SeqCst) >= 3);
    assert!(!topo.nodes[0].state.is_ejected());
    eg.stop().await;
}

/// A gRPC health service by hand (grpc.health.v1.Health/Check): SERVING (1) or
/// NOT_SERVING (2) as `serving` says, with `grpc-status: 0` in trailers.
async fn grpc_health_node(serving: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let serving = serving.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let serving = serving.clone();
                    tokio::spawn(async move {
                        let path = req.uri().path().to_string();
                        let grpc = req.headers()["content-type"] == "application/grpc";
                        let mut body = req.into_body();
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        if path != "/grpc.health.v1.Health/Check" || !grpc {
                            let _ = respond.send_response(
                                Response::builder().status(404).body(()).unwrap(),
                                true,
                            );
                            return;
                        }
                        let resp = Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut out = respond.send_response(resp, false).unwrap();
                        let status = if serving.load(Ordering::SeqCst) { 1 } else { 2 };
                        let _ =
                            out.send_data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]), false);
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", "0".parse().unwrap());
                        let _ = out.send_trailers(t);
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_health_check_flips_a_node() {
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let addr = grpc_health_node(serving.clone()).await;
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ type: grpc, interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }} }}
nodes: {{ g: {{ address: "{addr}", protocol: h2c }} }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [g] }}
"#
    );
    let eg = Envgate::start(&yaml);
    let topo = eg.server().control().topology();
    let state = &topo.nodes[0].state;
    let health = |h: envgate::health::Health| {
        let state = state.clone();
        async move {
            eventually(Duration::from_secs(5), || {
                let state = state.clone();
                async move { state.health() == h }
            })
            .await
        }
    };
    assert!(health(envgate::health::Health::Up).await);
    serving.store(false, Ordering::SeqCst);
    assert!(health(envgate::health::Health::Down).await);
    let reason = state.last_check().map(|c| c.detail).unwrap_or_default();
    assert!(reason.contains("NOT_SERVING"), "{reason}");
    serving.store(true, Ordering::SeqCst);
    assert!(health(envgate::health::Health::Up).await);
    eg.stop().await;

    // Only over HTTP/2.
    let doc = "version: 1\nlisteners: [ { name: http, bind: \"127.0.0.1:8080\" } ]\nnodes: { n: { address: \"127.0.0.1:9\", health: { type: grpc } } }\nenvironments:\n  p: { entries: [\":8080\"], nodes: [n] }\n";
    let e = envgate::config::parse(doc, std::path::Path::new(".")).expect_err("refused");
    assert!(
        e.to_string().contains("grpc health check needs HTTP/2"),
        "{e}"
    );
}

/// A gRPC deadline (`grpc-timeout`) bounds the request: past it the client gets
/// DEADLINE_EXCEEDED, and the node, which was only slower than this client allowed, is not
/// counted as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_timeout_bounds_the_request() {
    let node = H2Node::start("h2", None, None).await;
    let eg = Envgate::start(
        &topology(&node, ", health: { trust_unknown: true }").replace(
            "defaults: { health: { interval: 1h } }",
            "defaults: { health: { interval: 1h }, passive: { consecutive_failures: 1 } }",
        ),
    );
    let mut client = h2_client(eg.port("http")).await;
    for (timeout, status) in [("50m", Some("4")), ("5S", None)] {
        let req = Request::post("http://company.com/slow")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", timeout)
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap()),
            status,
            "grpc-timeout {timeout}"
        );
    }
    let topo = eg.server().control().topology();
    assert!(!topo.nodes[0].state.is_ejected());
    eg.stop().await;
}

/// A node that takes one stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS 1), with
/// `max_streams: 1`: a second request while the first is held goes on a connection of its
/// own instead of waiting behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_streams_follows_a_node_that_takes_few_streams() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let held = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    {
        let (release, held, conns) = (release.clone(), held.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (release, held) = (release.clone(), held.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::Builder::new()
                        .max_concurrent_streams(1)
                        .handshake::<_, Bytes>(s)
                        .await
                    else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let (release, held) = (release.clone(), held.clone());
                        tokio::spawn(async move {
                            if req.uri().path() == "/hold" {
                                held.fetch_add(1, Ordering::SeqCst);
                                release.notified().await;
                            }
                            let _ = respond.send_response(Response::new(()), true);
                        });
                    }
                });
            }
        });
    }
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ type: tcp, interval: 1h }} }}
nodes: {{ n: {{ address: "{addr}", protocol: h2c, max_streams: 1 }} }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [n] }}
"#
    );
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let hold = tokio::spawn(async move { get(port, "company.com", "/hold").await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            held.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let r = tokio::time::timeout(Duration::from_secs(5), get(port, "company.com", "/"))
        .await
        .expect("answered while the first request is held");
    assert_eq!(r.status, 200);
    // A permit, should the held request not wait on it yet.
    release.notify_one();
    assert_eq!(hold.await.unwrap().status, 200);
    // One connection for each request in flight (the health check's is a bare connect).
    assert!(conns.load(Ordering::SeqCst) >= 2);
    eg.stop().await;
}
