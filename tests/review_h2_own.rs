//! HTTP/2 clients' body-less requests over the own codec's node connections, against
//! misbehaving nodes: whatever a node sends, clients and nodes cannot tell them from
//! hyper's client (`Http1::Hyper`, the reference), and the same node is blamed. The last
//! tests check the same reading of a node's answer for HTTP/1.1 clients. Each test runs
//! both codecs and compares.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envgate::accesslog::Format;
use envgate::server::Http1;
use http::{HeaderMap, Method, Request};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A raw node: reads each request head, then hands (method, path, socket) to `script`,
/// which answers and gives the socket back to keep the connection (or `None` to drop it).
struct Node {
    addr: SocketAddr,
    /// Connections that carried a request (the health checks here only connect).
    conns: Arc<AtomicUsize>,
}

impl Node {
    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn node<F, Fut>(script: F) -> Node
where
    F: Fn(String, String, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<TcpStream>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (script, count) = (script.clone(), count.clone());
            tokio::spawn(async move {
                let mut s = s;
                let mut first = true;
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    if std::mem::take(&mut first) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut p = text.split(' ');
                    let method = p.next().unwrap_or("").to_string();
                    let path = p.next().unwrap_or("").to_string();
                    match script(method, path, s).await {
                        Some(next) => s = next,
                        None => return,
                    }
                }
            });
        }
    });
    Node { addr, conns }
}

const LEN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";

fn start(node: &Node, defaults: &str, workers: usize, codec: Http1) -> Envgate {
    Envgate::start_codec(
        &topo(
            &[("n", node.addr)],
            &format!("health: {{ type: tcp, interval: 1m }}{defaults}"),
            "",
        ),
        workers,
        Format::Text,
        None,
        codec,
    )
}

#[derive(Debug, Default)]
struct Got {
    status: u16,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    error: Option<String>,
}

/// One body-less request on `client`, read whole (body, trailers) within `limit`.
async fn fetch(
    client: &h2::client::SendRequest<Bytes>,
    method: Method,
    path: &str,
    limit: Duration,
) -> Got {
    let deadline = Instant::now() + limit;
    let mut got = Got::default();
    let mut ready = client.clone().ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(format!("http://company.com{path}"))
        .body(())
        .unwrap();
    let (resp, _) = ready.send_request(req, true).unwrap();
    let resp = match tokio::time::timeout_at(deadline, resp).await {
        Err(_) => {
            got.error = Some("no head in time".into());
            return got;
        }
        Ok(Err(e)) => {
            got.error = Some(format!("{e}"));
            return got;
        }
        Ok(Ok(r)) => r,
    };
    got.status = resp.status().as_u16();
    let mut body = resp.into_body();
    loop {
        match tokio::time::timeout_at(deadline, body.data()).await {
            Err(_) => {
                got.error = Some("body not over in time".into());
                break;
            }
            Ok(None) => {
                match tokio::time::timeout_at(deadline, body.trailers()).await {
                    Ok(Ok(t)) => got.trailers = t,
                    Ok(Err(e)) => got.error = Some(format!("trailers: {e}")),
                    Err(_) => got.error = Some("trailers not in time".into()),
                }
                break;
            }
            Ok(Some(Ok(c))) => {
                let _ = body.flow_control().release_capacity(c.len());
                got.body.extend_from_slice(&c);
            }
            Ok(Some(Err(e))) => {
                got.error = Some(format!("{e}"));
                break;
            }
        }
    }
    got
}

/// Trailers are bounded as hyper's client bounds them (its `max_header_size`, 64 KiB):
/// trailers of 20 KiB reach the client, and the node is not blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_of_20_kib_reach_the_client_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, path, mut s| async move {
            let bytes = if path == "/t" {
                let mut b = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-big: "
                    .to_vec();
                b.extend(std::iter::repeat_n(b'a', 20_000));
                b.extend_from_slice(b"\r\n\r\n");
                b
            } else {
                LEN.to_vec()
            };
            s.write_all(&bytes).await.ok()?;
            Some(s)
        })
        .await;
        let eg = start(
            &n,
            ", retries: 0, passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }",
            1,
            codec,
        );
        let client = h2_client(eg.port("http")).await;
        let g = fetch(&client, Method::GET, "/t", Duration::from_secs(5)).await;
        let after = fetch(&client, Method::GET, "/len", Duration::from_secs(5)).await;
        seen.push(format!(
            "{codec:?}: status {} body {:?} trailer len {:?} error {:?}; next request {}",
            g.status,
            String::from_utf8_lossy(&g.body),
            g.trailers
                .as_ref()
                .and_then(|t| t.get("x-big"))
                .map(|v| v.len()),
            g.error,
            after.status
        ));
    }
    assert_eq!(seen[0].replace("Fast", "Hyper"), seen[1], "{seen:#?}");
}

/// A node that sends five bytes of a chunked body, then a `0` every 100 ms for a minute
/// (leading zeros of a chunk size: framing without data).
async fn trickling_chunk_framing() -> Node {
    node(|_m, _p, mut s| async move {
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .ok()?;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"0").await.is_err() {
                break;
            }
        }
        None
    })
    .await
}

/// A node that trickles chunk framing without data (leading zeros of a chunk size) sends
/// no body: the stream is reset after `body_idle` (the timer moves on data alone, as a
/// data frame on hyper's path), long before the node would stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_trickling_chunk_framing_without_data_is_stalled_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = trickling_chunk_framing().await;
        let eg = start(&n, ", retries: 0, timeouts: { body_idle: 300ms }", 1, codec);
        let client = h2_client(eg.port("http")).await;
        // The node trickles for a minute: only envgate's reset ends the stream in time.
        let g = fetch(&client, Method::GET, "/z", Duration::from_secs(20)).await;
        seen.push(format!("{codec:?}: {:?}", g.error));
    }
    for s in &seen {
        assert!(
            s.contains("Some(") && !s.contains("in time"),
            "the stream was not reset: {seen:?}"
        );
    }
}

/// A `Transfer-Encoding` in an HTTP/1.0 answer that has no body by its status or the
/// request's method is taken (HEAD, 204 and 304 are decided first, as in hyper's client),
/// not refused as an HTTP/1.0 answer with a coding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_bodiless_answer_with_transfer_encoding_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, path, mut s| async move {
            let bytes: &[u8] = match path.as_str() {
                "/204" => {
                    b"HTTP/1.0 204 No Content\r\nTransfer-Encoding: chunked\r\nX-C: c\r\n\r\n"
                }
                "/head" => b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nX-C: c\r\n\r\n",
                _ => LEN,
            };
            s.write_all(bytes).await.ok()?;
            None
        })
        .await;
        let eg = start(&n, ", retries: 0", 1, codec);
        let client = h2_client(eg.port("http")).await;
        let a = fetch(&client, Method::GET, "/204", Duration::from_secs(5)).await;
        let b = fetch(&client, Method::HEAD, "/head", Duration::from_secs(5)).await;
        seen.push(format!("GET /204: {}, HEAD /head: {}", a.status, b.status));
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
}

/// A 101 nobody asked for is answered 502 at once, the node that sent it blamed, and the
/// request not sent to another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_101_goes_to_one_node_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let answer =
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n";
        let a = RawNode::start(answer.to_vec(), After::Close).await;
        let b = RawNode::start(answer.to_vec(), After::Close).await;
        let eg = Envgate::start_codec(
            &topo(
                &[("a", a.addr), ("b", b.addr)],
                "health: { type: tcp, interval: 1m }, retries: 1, retry_budget: { percent: 100, min_retries: 1000 }, passive: { consecutive_failures: 0 }",
                "",
            ),
            1,
            Format::Text,
            None,
            codec,
        );
        let client = h2_client(eg.port("http")).await;
        let g = fetch(&client, Method::GET, "/", Duration::from_secs(5)).await;
        seen.push(format!(
            "status {}, requests at nodes {}",
            g.status,
            a.requests() + b.requests()
        ));
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
}

/// Checks expected to hold: a client's reset while the head is awaited blames no node
/// and closes that node connection; a HEAD answered with a body, or a length body
/// followed by extra bytes, does not leave its connection pooled; a body trickled a byte
/// per body_idle/2 goes through; heads of 100 fields pass, 101 fail, on both codecs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_parity_checks() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let closed = Arc::new(AtomicUsize::new(0));
        let c = closed.clone();
        let n = node(move |m, path, mut s| {
            let c = c.clone();
            async move {
                match path.as_str() {
                    "/hang" => {
                        let mut b = [0u8; 64];
                        if let Ok(Ok(0)) =
                            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await
                        {
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                        None
                    }
                    "/headbody" if m == "HEAD" => {
                        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                            .await
                            .ok()?;
                        Some(s)
                    }
                    "/headlate" if m == "HEAD" => {
                        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                            .await
                            .ok()?;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        s.write_all(b"hello").await.ok()?;
                        Some(s)
                    }
                    "/extra" => {
                        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloXYZ")
                            .await
                            .ok()?;
                        Some(s)
                    }
                    "/trickle" => {
                        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
                            .await
                            .ok()?;
                        for b in b"abcd" {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            s.write_all(&[*b]).await.ok()?;
                        }
                        Some(s)
                    }
                    "/f100" | "/f101" => {
                        let k = if path == "/f100" { 100 } else { 101 };
                        let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
                        for i in 0..k - 1 {
                            h.extend_from_slice(format!("x-f{i}: v\r\n").as_bytes());
                        }
                        h.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
                        s.write_all(&h).await.ok()?;
                        Some(s)
                    }
                    _ => {
                        s.write_all(LEN).await.ok()?;
                        Some(s)
                    }
                }
            }
        })
        .await;
        let eg = start(
            &n,
            ", retries: 0, timeouts: { body_idle: 300ms }, passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }",
            1,
            codec,
        );
        let client = h2_client(eg.port("http")).await;
        let mut out = Vec::new();
        // A reset while the head is awaited.
        {
            let mut ready = client.clone().ready().await.unwrap();
            let req = Request::get("http://company.com/hang").body(()).unwrap();
            let (_resp, mut stream) = ready.send_request(req, true).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            stream.send_reset(h2::Reason::CANCEL);
        }
        let closed_ok = eventually(Duration::from_secs(3), || {
            let c = closed.clone();
            async move { c.load(Ordering::SeqCst) == 1 }
        })
        .await;
        out.push(format!("reset: node conn closed {closed_ok}"));
        for (m, p) in [
            (Method::GET, "/len"),
            (Method::HEAD, "/headbody"),
            (Method::GET, "/len"),
            (Method::HEAD, "/headlate"),
            (Method::GET, "/len"),
            (Method::GET, "/extra"),
            (Method::GET, "/len"),
            (Method::GET, "/trickle"),
            (Method::GET, "/f100"),
            (Method::GET, "/len"),
        ] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let g = fetch(&client, m.clone(), p, Duration::from_secs(5)).await;
            out.push(format!(
                "{m} {p}: {} {:?} {:?}",
                g.status,
                String::from_utf8_lossy(&g.body),
                g.error
            ));
        }
        let g = fetch(&client, Method::GET, "/f101", Duration::from_secs(5)).await;
        out.push(format!("GET /f101: {}", g.status));
        seen.push(out);
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
    assert!(seen[0][0].ends_with("true"), "{:?}", seen[0]);
    assert!(
        seen[0]
            .iter()
            .any(|s| s.contains("/trickle: 200 \"abcd\" None")),
        "{:?}",
        seen[0]
    );
}

/// `Transfer-Encoding` read as hyper's client reads it (each answer closes its
/// connection): `chunked,` is not chunked (what follows the last comma is empty: the body
/// runs until the node closes and is relayed as it came), and of five fields the last
/// decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minor_framing_differences_from_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, path, mut s| async move {
            let bytes: &[u8] = match path.as_str() {
                "/tecomma" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                "/te5" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                _ => LEN,
            };
            s.write_all(bytes).await.ok()?;
            None
        })
        .await;
        let eg = start(
            &n,
            ", retries: 0, passive: { consecutive_failures: 0 }",
            1,
            codec,
        );
        let client = h2_client(eg.port("http")).await;
        let mut out = Vec::new();
        for p in ["/tecomma", "/te5"] {
            let g = fetch(&client, Method::GET, p, Duration::from_secs(5)).await;
            out.push(format!(
                "{p}: {} {:?} trailers {:?} error {}",
                g.status,
                String::from_utf8_lossy(&g.body),
                g.trailers.map(|t| t.len()),
                g.error.is_some()
            ));
        }
        seen.push(out);
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
}

/// Chunk framing trickled without data, to an HTTP/1.1 client: only body data is the
/// node's progress, so the exchange ends `body_idle` after the last data, long before the
/// node would stop (a minute later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_client_node_trickling_chunk_framing_is_stalled_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = trickling_chunk_framing().await;
        let eg = start(&n, ", retries: 0, timeouts: { body_idle: 300ms }", 1, codec);
        let mut c = raw_conn(eg.port("http")).await;
        c.write_all(b"GET /z HTTP/1.1\r\nHost: company.com\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let closed = closes_within(&mut c, Duration::from_secs(20), &mut out).await;
        seen.push(format!("{codec:?}: closed {closed}"));
        eg.stop().await;
    }
    for s in &seen {
        assert!(s.ends_with("true"), "{seen:#?}");
    }
}

/// An HTTP/1.0 answer whose `Connection` says `close` and then `keep-alive`: once a
/// `close` is seen a later `keep-alive` does not undo it, and the connection is not pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_close_then_keep_alive_closes_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, path, mut s| async move {
            let bytes: &[u8] = if path == "/one" {
                b"HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 2\r\n\r\nok"
            } else {
                b"HTTP/1.0 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
            };
            s.write_all(bytes).await.ok()?;
            Some(s)
        })
        .await;
        let eg = start(&n, ", retries: 0", 1, codec);
        let client = h2_client(eg.port("http")).await;
        let mut out = Vec::new();
        for p in ["/one", "/one", "/two", "/two"] {
            let g = fetch(&client, Method::GET, p, Duration::from_secs(5)).await;
            out.push(format!("{p}: {} {:?}", g.status, g.error));
        }
        // One connection a request: none was pooled.
        out.push(format!("node connections {}", n.conns()));
        seen.push(out);
        eg.stop().await;
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
    assert_eq!(seen[0].last().unwrap(), "node connections 4", "{seen:?}");
}

/// `Content-Length` with leading zeros past 19 characters, to an HTTP/1.1 client: any
/// number of digits is read while the value fits, and the answer goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_content_length_with_leading_zeros_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, _p, mut s| async move {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 000000000000000000005\r\n\r\nhello")
                .await
                .ok()?;
            Some(s)
        })
        .await;
        let eg = start(&n, ", retries: 0", 1, codec);
        let mut c = raw_conn(eg.port("http")).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        seen.push(head.lines().next().unwrap_or("").to_string());
        eg.stop().await;
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
}

/// A trailer line ended by a bare LF (then the CRLF lines a trailer section ends with):
/// the line is kept and read as a field, and the body is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_line_with_bare_lf_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, _p, mut s| async move {
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-a: 1\n\r\n\r\n",
            )
            .await
            .ok()?;
            None
        })
        .await;
        let eg = start(&n, ", retries: 0", 1, codec);
        let client = h2_client(eg.port("http")).await;
        let g = fetch(&client, Method::GET, "/", Duration::from_secs(5)).await;
        seen.push(format!(
            "{} {:?} trailers {:?} error {}",
            g.status,
            String::from_utf8_lossy(&g.body),
            g.trailers,
            g.error.is_some()
        ));
        eg.stop().await;
    }
    assert_eq!(seen[0], seen[1], "own codec, then hyper's");
}
