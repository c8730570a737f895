//! How the own codec reads misbehaving nodes' answers, for HTTP/1.1 and HTTP/2 clients
//! alike: as hyper's client (`Http1::Hyper`, the reference) reads them. Each test runs
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
}

async fn node<F, Fut>(script: F) -> Node
where
    F: Fn(String, String, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<TcpStream>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut s = s;
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
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
    Node { addr }
}

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

/// A node like `node`, counting the connections that carried a request (the health
/// checks here only connect).
async fn counting_node<F, Fut>(script: F) -> (Node, Arc<AtomicUsize>)
where
    F: Fn(String, String, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<TcpStream>> + Send + 'static,
{
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
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
    (Node { addr }, accepted)
}

/// Chunk framing trickled without data, to an HTTP/1.1 client: only body data is the
/// node's progress, so the exchange ends `body_idle` after the last data, long before the
/// node would stop (a minute later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_client_node_trickling_chunk_framing_is_stalled_as_with_hyper() {
    let mut seen = Vec::new();
    for codec in [Http1::Fast, Http1::Hyper] {
        let n = node(|_m, _p, mut s| async move {
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
        .await;
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
        let (n, accepted) = counting_node(|_m, path, mut s| async move {
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
        out.push(format!(
            "node connections {}",
            accepted.load(Ordering::SeqCst)
        ));
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
