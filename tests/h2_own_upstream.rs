//! HTTP/2 clients' requests without a body reach HTTP/1.1 nodes over the own codec's
//! connections (when it speaks to every node), and hyper's client otherwise: the nodes must
//! get the same bytes and the clients the same answers either way.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use envgate::accesslog::Format;
use envgate::server::Http1;
use http::{Method, Request};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIG: usize = 1 << 20;

/// A node on raw TCP: records every request head and answers by its path, as the bytes
/// below say. Connections are kept unless the answer ends by closing.
struct ScriptNode {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    /// Connections that carried a request (the health checks here only connect).
    accepts: Arc<AtomicUsize>,
}

/// The answer to `path` (`head` for a HEAD request), and whether the node closes after it.
fn answer(path: &str, head: bool) -> (Vec<u8>, bool) {
    let mut close = false;
    let bytes: Vec<u8> = match path {
        "/len" if head => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
        "/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello".to_vec(),
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: t\r\n\r\n".to_vec(),
        "/close" => {
            close = true;
            b"HTTP/1.1 200 OK\r\nX-B: b\r\n\r\nuntil the node closes".to_vec()
        }
        "/none" => b"HTTP/1.1 204 No Content\r\nX-C: c\r\n\r\n".to_vec(),
        "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        "/hop" => b"HTTP/1.1 201 Created\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        // `Connection` naming only itself and `keep-alive`, with a field named `close`.
        "/keep" => b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nClose: x\r\nX-Stay: 1\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        // `Connection: keep-alive` with the `Keep-Alive` field it names.
        "/keep2" => b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Stay: 2\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        "/big" => {
            let mut b = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
            b.extend((0..BIG).map(|i| (i % 251) as u8));
            b
        }
        "/bye" => {
            // Closes a connection it kept alive, without saying so.
            close = true;
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye".to_vec()
        }
        "/stall" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
        "/cut" => {
            close = true;
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec()
        }
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    };
    (bytes, close)
}

impl ScriptNode {
    async fn start() -> ScriptNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let accepts = Arc::new(AtomicUsize::new(0));
        let (h, a) = (heads.clone(), accepts.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (h, a) = (h.clone(), a.clone());
                tokio::spawn(async move {
                    let mut first = true;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&got[..end + 4]).into_owned();
                        got.drain(..end + 4);
                        let mut parts = head.split(' ');
                        let method = parts.next().unwrap_or("").to_string();
                        let path = parts.next().unwrap_or("").to_string();
                        if std::mem::take(&mut first) {
                            a.fetch_add(1, Ordering::SeqCst);
                        }
                        h.lock().unwrap().push(head);
                        let (bytes, close) = answer(&path, method == "HEAD");
                        if s.write_all(&bytes).await.is_err() || close {
                            return;
                        }
                        if path == "/stall" {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                    }
                });
            }
        });
        ScriptNode {
            addr,
            heads,
            accepts,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

fn yaml(node: &ScriptNode, defaults: &str) -> String {
    topo(
        &[("n", node.addr)],
        &format!("health: {{ type: tcp, interval: 1m }}{defaults}"),
        "",
    )
}

fn request(method: Method, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://company.com{path}"))
        .header("x-request-id", "fixed-id-1")
        .header("accept", "*/*")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// An answer as a client sees it, without the field that differs by the moment.
fn seen(r: &Reply) -> String {
    let mut fields: Vec<String> = r
        .headers
        .iter()
        .filter(|(n, _)| n.as_str() != "date")
        .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    fields.sort();
    format!("{} {:?} {}", r.status, fields, r.body.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_codecs_give_nodes_and_clients_the_same_bytes() {
    let cases = [
        (Method::GET, "/len"),
        (Method::HEAD, "/len"),
        (Method::GET, "/chunked"),
        (Method::GET, "/close"),
        (Method::GET, "/none"),
        (Method::GET, "/early"),
        (Method::GET, "/hop"),
        (Method::GET, "/keep"),
        (Method::GET, "/keep2"),
        (Method::GET, "/big"),
        (Method::DELETE, "/len"),
        (Method::OPTIONS, "/len?q=1&r=%20"),
        (Method::GET, "/missing"),
    ];
    let mut runs = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let node = ScriptNode::start().await;
        let eg = Envgate::start_codec(&yaml(&node, ""), 1, Format::Text, None, codec);
        let mut client = h2_client(eg.port("http")).await;
        let mut answers = Vec::new();
        for (m, p) in &cases {
            let r = h2_send(&mut client, request(m.clone(), p)).await;
            if *p == "/big" {
                let want: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
                assert!(r.body == want, "{codec:?}: the big body differs");
            }
            if *p == "/chunked" {
                assert_eq!(r.body, Bytes::from_static(b"hello world"), "{codec:?}");
            }
            if *p == "/close" {
                assert_eq!(
                    r.body,
                    Bytes::from_static(b"until the node closes"),
                    "{codec:?}"
                );
            }
            answers.push(format!("{m} {p}: {}", seen(&r)));
        }
        assert!(
            answers
                .iter()
                .any(|a| a.contains("x-a: 1") && a.contains("x-a: 2")),
            "{answers:?}"
        );
        assert!(
            !answers.iter().any(|a| a.contains("x-hop")
                || a.contains("keep-alive")
                || a.contains("\"close")
                || a.contains("connection")),
            "{answers:?}"
        );
        assert!(
            answers.iter().any(|a| a.contains("x-stay: 1"))
                && answers.iter().any(|a| a.contains("x-stay: 2")),
            "{answers:?}"
        );
        runs.push((node.heads(), answers));
    }
    let (fast, hyper) = (&runs[0], &runs[1]);
    assert_eq!(
        fast.1, hyper.1,
        "the clients' answers differ (own codec, then hyper's)"
    );
    assert_eq!(fast.0.len(), cases.len());
    assert_eq!(
        fast.0, hyper.0,
        "the nodes' request heads differ (own codec, then hyper's)"
    );
}

/// A node's request head with the request ids envgate made (32 hex digits) masked: each
/// instance makes its own.
fn masked(head: &str) -> String {
    head.split("\r\n")
        .map(|l| match l.strip_prefix("x-request-id: ") {
            Some(v) if v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
                "x-request-id: <made>".to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The rewrite for the node (X-Forwarded-*, X-Request-Id, Host, the target) gives the
/// same head on both codecs, from a direct and from a trusted client, whatever of those
/// fields the client sent (none, some, repeated, between others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_codecs_rewrite_the_request_head_alike() {
    let fields: &[&[(&str, &str)]] = &[
        &[("accept", "*/*")],
        &[
            ("x-request-id", "kept-1"),
            ("cookie", "a=1"),
            ("accept", "*/*"),
        ],
        &[
            ("x-forwarded-for", "10.0.0.1"),
            ("accept", "a"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "http"),
            ("accept", "b"),
            ("x-forwarded-host", "elsewhere.example"),
            ("x-request-id", "not sane!"),
            ("host", "company.com"),
        ],
        &[
            ("x-request-id", "a"),
            ("x-request-id", "b"),
            ("user-agent", "t"),
        ],
        &[("forwarded", "for=10.0.0.9"), ("accept", "*/*")],
        &[("cookie", "a=1"), ("cookie", "b=2")],
        &[("te", "trailers"), ("x-forwarded-proto", "https")],
    ];
    let paths = ["/len", "/len?q=1", "/a/../len?x=%41", "/a//b/./len"];
    for trusted in ["", ", trusted_proxies: [127.0.0.0/8]"] {
        let mut runs = Vec::new();
        for codec in [Http1::Fast, Http1::Hyper] {
            let node = ScriptNode::start().await;
            let eg = Envgate::start_codec(&yaml(&node, trusted), 1, Format::Text, None, codec);
            let mut client = h2_client(eg.port("http")).await;
            for f in fields {
                for p in paths {
                    let mut b = Request::builder()
                        .method(Method::GET)
                        .uri(format!("http://company.com{p}"));
                    for (n, v) in *f {
                        b = b.header(*n, *v);
                    }
                    let r = h2_send(&mut client, b.body(()).unwrap()).await;
                    assert!(
                        r.status == 200 || r.status == 404,
                        "{p} {f:?}: {}",
                        r.status
                    );
                }
            }
            let heads: Vec<String> = node.heads().iter().map(|h| masked(h)).collect();
            assert_eq!(heads.len(), fields.len() * paths.len());
            // Each exchange's log line carries the id its node got, made or kept.
            let ids: Vec<String> = node
                .heads()
                .iter()
                .map(|h| {
                    h.lines()
                        .find_map(|l| l.strip_prefix("x-request-id: "))
                        .map_or("-", str::trim_end)
                        .to_string()
                })
                .collect();
            assert!(
                eventually(Duration::from_secs(10), || async {
                    eg.access_log().len() >= ids.len()
                })
                .await,
                "{:?}",
                eg.access_log()
            );
            let logged: Vec<String> = eg
                .access_log()
                .iter()
                .map(|l| l.rsplit_once(" id=").map_or("", |(_, id)| id).to_string())
                .collect();
            assert_eq!(logged, ids, "{codec:?}{trusted}");
            runs.push(heads);
        }
        assert!(
            runs[0].iter().any(|h| h.contains("x-request-id: <made>"))
                && runs[0].iter().any(|h| h.contains("x-request-id: kept-1")),
            "{:?}",
            runs[0]
        );
        assert_eq!(
            runs[0], runs[1],
            "the nodes' request heads differ (own codec, then hyper's){trusted}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_keep_their_node_connection_and_survive_one_the_node_closed() {
    for workers in [1, 2] {
        let node = ScriptNode::start().await;
        let eg = Envgate::start_codec(&yaml(&node, ""), workers, Format::Text, None, Http1::Fast);
        let mut client = h2_client(eg.port("http")).await;
        for _ in 0..5 {
            let r = h2_send(&mut client, request(Method::GET, "/len")).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body, Bytes::from_static(b"hello"));
        }
        // One connection at most per worker carried the five.
        assert!(node.accepts() <= workers, "{} connections", node.accepts());
        // The node closes each connection after its answer, without saying so: the next
        // request finds the connection gone and takes a new one.
        let before = node.accepts();
        for _ in 0..5 {
            let r = h2_send(&mut client, request(Method::GET, "/bye")).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body, Bytes::from_static(b"bye"));
        }
        assert!(
            node.accepts() >= before + 4,
            "{} connections",
            node.accepts()
        );
    }
}

/// A node that ends its body short, or stops sending it for `body_idle`, resets the
/// client's stream (its answer is not passed off as whole) and is counted against: with
/// one failure to eject, the next request finds no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cuts_or_stalls_its_body_resets_the_stream_and_is_ejected() {
    for (codec, path) in [
        (Http1::Fast, "/cut"),
        (Http1::Hyper, "/cut"),
        (Http1::Fast, "/stall"),
        (Http1::Hyper, "/stall"),
    ] {
        let node = ScriptNode::start().await;
        let eg = Envgate::start_codec(
            &yaml(
                &node,
                ", passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }, retries: 0, timeouts: { body_idle: 300ms }",
            ),
            1,
            Format::Text,
            None,
            codec,
        );
        let mut client = h2_client(eg.port("http")).await;
        let mut ready = client.clone().ready().await.unwrap();
        let (resp, _) = ready
            .send_request(request(Method::GET, path), true)
            .unwrap();
        // The reset may come before the client read the head: either way, not whole.
        let mut got = Vec::new();
        let mut failed = false;
        match tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .unwrap()
        {
            Err(_) => failed = true,
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                let mut body = resp.into_body();
                while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data())
                    .await
                    .unwrap()
                {
                    match chunk {
                        Ok(c) => got.extend_from_slice(&c),
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
            }
        }
        assert!(
            failed,
            "{codec:?} {path}: a body ended as if whole ({} bytes)",
            got.len()
        );
        let r = h2_send(&mut client, request(Method::GET, "/len")).await;
        assert_eq!(r.status, 503, "{codec:?} {path}: the node was not ejected");
    }
}

/// A node that does not answer in time: 504, on the own codec's connections as on hyper's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_a_504() {
    let node = RawNode::start(Vec::new(), After::Hang).await;
    for codec in [Http1::Fast, Http1::Hyper] {
        let eg = Envgate::start_codec(
            &topo(
                &[("n", node.addr)],
                "health: { type: tcp, interval: 1m }, timeouts: { response_header: 300ms }, retries: 0",
                "",
            ),
            1,
            Format::Text,
            None,
            codec,
        );
        let mut client = h2_client(eg.port("http")).await;
        let r = h2_send(&mut client, request(Method::GET, "/len")).await;
        assert_eq!(r.status, 504, "{codec:?}");
    }
    assert_eq!(node.requests(), 2);
}

/// HTTP/1.1 and HTTP/2 clients' requests share the own codec's node connections: one
/// connection carries both (hyper's client would open one of its own for HTTP/2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_share_node_connections() {
    for codec in [Http1::Fast, Http1::Hyper] {
        let node = ScriptNode::start().await;
        let eg = Envgate::start_codec(&yaml(&node, ""), 1, Format::Text, None, codec);
        let p = eg.port("http");
        let r = get(p, "company.com", "/len").await;
        assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
        let mut client = h2_client(p).await;
        let r = h2_send(&mut client, request(Method::GET, "/len")).await;
        assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
        assert_eq!(node.accepts(), 1, "{codec:?}");
    }
}

/// A client that resets its stream while the node's body comes (here, held back by the
/// client's flow control) leaves on its own: the node is not counted against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_its_stream_mid_body_blames_no_node() {
    for codec in [Http1::Fast, Http1::Hyper] {
        let node = ScriptNode::start().await;
        let eg = Envgate::start_codec(
            &yaml(
                &node,
                ", passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }, retries: 0",
            ),
            1,
            Format::Text,
            None,
            codec,
        );
        let mut client = h2_client(eg.port("http")).await;
        for _ in 0..3 {
            let mut ready = client.clone().ready().await.unwrap();
            let (resp, mut stream) = ready
                .send_request(request(Method::GET, "/big"), true)
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            // Some of it, never released: the rest waits on the client's window.
            let first = body.data().await.unwrap().unwrap();
            assert!(!first.is_empty());
            stream.send_reset(h2::Reason::CANCEL);
        }
        let r = h2_send(&mut client, request(Method::GET, "/len")).await;
        assert_eq!(
            r.status, 200,
            "{codec:?}: a node was blamed for the client's reset"
        );
        assert_eq!(r.body, Bytes::from_static(b"hello"));
    }
}
