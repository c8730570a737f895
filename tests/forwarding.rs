//! Forwarding through a running envgate: header rewriting, streaming bodies, upgrades,
//! timeouts, failover on a failed connect, the in-flight limit and graceful drain.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn one_node(addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
{extra}
nodes: {{ a: {{ address: "{addr}" }} }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [a] }}
"#
    )
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_both_ways() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    let req = Request::get("/headers")
        .header("host", "Company.com:8080")
        .header("connection", "keep-alive, x-drop-me, X-Forwarded-For")
        .header("x-drop-me", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        // A transfer coding is this hop's (`TE: trailers` alone goes on: tests/trailers.rs).
        .header("te", "gzip, deflate")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "abc-123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(p, req).await;
    assert_eq!(r.status, 200);
    let seen = lines(r.text());
    for gone in [
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "te",
        "connection",
    ] {
        assert!(
            !seen.iter().any(|l| l.starts_with(&format!("{gone}:"))),
            "{gone} reached the node: {seen:?}"
        );
    }
    // The client's X-Forwarded-For is replaced (127.0.0.1 is not a trusted proxy) even
    // though the client listed the header in Connection.
    assert!(seen.contains(&"x-forwarded-for: 127.0.0.1"), "{seen:?}");
    assert!(seen.contains(&"x-forwarded-proto: http"), "{seen:?}");
    assert!(
        seen.contains(&"x-forwarded-host: Company.com:8080"),
        "{seen:?}"
    );
    assert!(seen.contains(&"host: Company.com:8080"), "{seen:?}");
    assert!(seen.contains(&"x-request-id: abc-123"), "{seen:?}");
    // Hop-by-hop headers of the answer do not reach the client.
    for gone in ["x-upstream-secret", "keep-alive", "proxy-authenticate"] {
        assert!(!r.headers.contains_key(gone), "{gone} reached the client");
    }
    assert_eq!(r.headers["x-node"], "a");

    // An insane request id is replaced by a fresh one; two fresh ones differ.
    let mut ids = Vec::new();
    for bad in ["has space", ""] {
        let req = Request::get("/headers")
            .header("host", "company.com")
            .header("x-request-id", bad)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(p, req).await;
        let id = lines(r.text())
            .into_iter()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap()
            .to_string();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_forwarded_for_is_appended() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(
        a.addr,
        "defaults: { trusted_proxies: [127.0.0.0/8] }",
    ));
    let req = Request::get("/headers")
        .header("host", "company.com")
        .header("x-forwarded-for", "203.0.113.7")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(eg.port("http"), req).await;
    assert!(
        lines(r.text()).contains(&"x-forwarded-for: 203.0.113.7, 127.0.0.1"),
        "{}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    const SIZE: u64 = 64 * 1024 * 1024;

    // Upload: a streamed (chunked) body of SIZE bytes comes back whole from /echo.
    let mut tx = connect(p).await;
    let req = Request::post("/echo")
        .header("host", "company.com")
        .body(Zeros { left: SIZE })
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            assert!(data.iter().all(|b| *b == 0));
            got += data.len() as u64;
        }
    }
    assert_eq!(got, SIZE);

    // Download: SIZE bytes with a Content-Length, read frame by frame.
    let r = send(
        p,
        Request::get(format!("/download?bytes={SIZE}"))
            .header("host", "company.com")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], SIZE.to_string().as_str());
    assert_eq!(r.body.len() as u64, SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_round_trip() {
    let a = Upstream::start("a").await;
    // Only the protocols an environment lists are tunnelled (by default, websocket).
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", "upgrades: [echo]"));
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", eg.port("http")))
        .await
        .unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: company.com\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"hello"[..], b"through the tunnel"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_upgrades_and_h2c_are_stripped() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    for proto in ["echo", "h2c", "websocket, h2c"] {
        let req = format!(
            "GET /headers HTTP/1.1\r\nHost: company.com\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {proto}\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        );
        let mut s = raw_conn(p).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        // Forwarded as a plain request: the node saw no Upgrade and answered normally.
        assert!(head.starts_with("HTTP/1.1 200"), "{proto}: {head}");
        let seen = a.last_headers().unwrap();
        assert!(seen.get("upgrade").is_none(), "{proto}: {seen:?}");
        assert!(seen.get("http2-settings").is_none(), "{proto}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_header_timeout_is_504_and_dead_node_is_502() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(
        a.addr,
        "defaults: { timeouts: { response_header: 300ms }, health: { interval: 1m } }",
    ));
    let p = eg.port("http");
    let r = get(p, "company.com", "/hang").await;
    assert_eq!(r.status, 504);
    assert_eq!(
        r.text(),
        r#"{"error":"gateway_timeout","environment":"production"}"#
    );
    // The node dies; its health check is a minute away, so the request meets the dead
    // port, and with no other node to try the answer is 502.
    a.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "company.com", "/").await.status == 502
        })
        .await
    );
    let r = get(p, "company.com", "/").await;
    assert_eq!(
        r.text(),
        r#"{"error":"bad_gateway","environment":"production"}"#
    );
}

/// A node connection keeps its response-head timer from request to request. A request
/// that hangs right after an answered one on the same pooled connection still gets its 504
/// (the timer moved later while still armed for the request before); one sent after that
/// timer's deadline passed while the connection was pooled gets its own full time. Over
/// HTTP/1.1 and HTTP/2, with one worker and two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_node_connection_times_each_response_head_afresh() {
    let bounded = Duration::from_secs(10);
    for workers in [1, 2] {
        let a = Upstream::start("a").await;
        let eg = Envgate::start_with(
            &one_node(
                a.addr,
                "defaults: { timeouts: { response_header: 1s }, health: { interval: 1m } }",
            ),
            workers,
        );
        let p = eg.port("http");
        let mut tx = connect(p).await;
        let mut h2 = h2_client(p).await;
        let h2_get = |path: &str| {
            Request::get(format!("http://company.com{path}"))
                .body(())
                .unwrap()
        };
        for round in 0..2 {
            // Answered, then at once a request that hangs, on the node connection the
            // first gave back.
            let r = tokio::time::timeout(bounded, get_on(&mut tx, "company.com", "/"))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{workers} workers, round {round}");
            let r = tokio::time::timeout(bounded, get_on(&mut tx, "company.com", "/hang"))
                .await
                .expect("the response-head timer never fired");
            assert_eq!(
                r.status,
                504,
                "{workers} workers, round {round}: {}",
                r.text()
            );
            let r = tokio::time::timeout(bounded, h2_send(&mut h2, h2_get("/")))
                .await
                .unwrap();
            assert_eq!(r.status, 200, "HTTP/2, {workers} workers, round {round}");
            let r = tokio::time::timeout(bounded, h2_send(&mut h2, h2_get("/hang")))
                .await
                .expect("the response-head timer never fired");
            assert_eq!(
                r.status,
                504,
                "HTTP/2, {workers} workers, round {round}: {}",
                r.text()
            );
        }
        // The timer of a pooled connection passes its deadline (1 s after the answered
        // request began); the next request on it has a full second again.
        let r = get_on(&mut tx, "company.com", "/").await;
        assert_eq!(r.status, 200);
        let r = h2_send(&mut h2, h2_get("/")).await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let r = get_on(&mut tx, "company.com", "/slow?ms=300").await;
        assert_eq!(r.status, 200, "{workers} workers: {}", r.text());
        let r = h2_send(&mut h2, h2_get("/slow?ms=300")).await;
        assert_eq!(r.status, 200, "HTTP/2, {workers} workers: {}", r.text());
        // One node connection for each request that hung (it is closed after its 504),
        // then the ones the last requests took: none opened for a request that followed
        // an answered one on its worker.
        assert!(a.connections() <= 4 + 2, "{} connections", a.connections());
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_fails_over_to_the_next_node() {
    // A listener that never accepts, its accept queue filled: connects to it hang.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let black: std::net::SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(black),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let b = Upstream::start("b").await;
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults:
  timeouts: {{ connect: 200ms }}
  health: {{ type: tcp, interval: 1m, timeout: 1s, trust_unknown: true }}
nodes:
  black: {{ address: "{black}" }}
  b: {{ address: "{}" }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [black, b] }}
  alone: {{ entries: ["alone.com:{{port:http}}"], nodes: [black] }}
"#,
        b.addr
    ));
    let p = eg.port("http");
    // Whichever node round-robin picks first, every request is answered by b.
    for _ in 0..4 {
        let r = get(p, "x", "/").await;
        assert_eq!((r.status.as_u16(), r.node()), (200, "b"));
    }
    let r = get(p, "alone.com", "/").await;
    assert_eq!(r.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_isolates_environments() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
nodes: {{ a: {{ address: "{}" }} }}
environments:
  busy: {{ entries: ["busy.com:{{port:http}}"], nodes: [a], limits: {{ max_in_flight: 1 }} }}
  calm: {{ entries: ["calm.com:{{port:http}}"], nodes: [a] }}
"#,
        a.addr
    ));
    let p = eg.port("http");
    let slow = tokio::spawn(async move { get(p, "busy.com", "/slow?ms=1000").await });
    assert!(eventually(Duration::from_secs(5), || async { a.hits() == 1 }).await);
    let r = get(p, "busy.com", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), r#"{"error":"over_limit","environment":"busy"}"#);
    assert_eq!(get(p, "calm.com", "/").await.status, 200);
    assert_eq!(slow.await.unwrap().status, 200);
    // The slot is given back once the slow exchange ended.
    assert_eq!(get(p, "busy.com", "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_upstream_connections() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    // Twenty requests one after the other, each on a new client connection: the node sees
    // them all on one pooled connection.
    for _ in 0..20 {
        assert_eq!(get(p, "company.com", "/").await.status, 200);
    }
    assert_eq!(a.hits(), 20);
    assert_eq!(a.connections(), 1);
    // Two at once need two.
    let (x, y) = tokio::join!(
        get(p, "company.com", "/slow?ms=200"),
        get(p, "company.com", "/slow?ms=200")
    );
    assert_eq!((x.status.as_u16(), y.status.as_u16()), (200, 200));
    assert_eq!(a.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    let slow = tokio::spawn(async move { get(p, "company.com", "/slow?ms=700").await });
    assert!(eventually(Duration::from_secs(5), || async { a.hits() == 1 }).await);
    let stopping = tokio::spawn(eg.stop());
    // New connections are refused (or closed unanswered) while the slow one finishes.
    assert!(
        eventually(Duration::from_secs(5), || async {
            match tokio::net::TcpStream::connect(("127.0.0.1", p)).await {
                Err(_) => true,
                Ok(mut s) => {
                    let _ = s
                        .write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n\r\n")
                        .await;
                    let mut buf = Vec::new();
                    matches!(
                        tokio::time::timeout(Duration::from_millis(300), s.read_to_end(&mut buf))
                            .await,
                        Ok(Ok(0))
                    )
                }
            }
        })
        .await
    );
    let r = slow.await.unwrap();
    assert_eq!((r.status.as_u16(), r.text()), (200, "a"));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_refused() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    // 101 header fields.
    let mut req = String::from("GET / HTTP/1.1\r\nHost: company.com\r\n");
    for i in 0..100 {
        req.push_str(&format!("X-Field-{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let answer = raw(p, req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A head past 64 KiB in all.
    let req = format!(
        "GET / HTTP/1.1\r\nHost: company.com\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70 * 1024)
    );
    let answer = raw(p, req.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.starts_with("HTTP/1.1 414"),
        "{answer}"
    );
    assert_eq!(a.hits(), 0);
    // Within the limits all is well.
    let answer = raw(
        p,
        b"GET / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_http2_streams() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    let (mut tx, conn) = connect_h2(p).await;
    let uri = format!("http://company.com:{p}/slow?ms=600");
    let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    let slow = tokio::spawn(async move {
        let resp = tx.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    assert!(eventually(Duration::from_secs(5), || async { a.hits() == 1 }).await);
    let stopping = tokio::spawn(eg.stop());
    let (status, body) = slow.await.unwrap();
    assert_eq!((status.as_u16(), &body[..]), (200, &b"a"[..]));
    // The server said GOAWAY and closed the connection once the stream was done.
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
}

/// `Expect: 100-continue`: the client waits for 100 Continue before it sends its body, and
/// gets it once its request is on its way to the node (which answers only once it read
/// the body); the final answer follows. An empty
/// body gets no 100, nor does a request envgate answers itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_asks_for_the_body() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    let mut s = raw_conn(p).await;
    for round in 0..2 {
        s.write_all(b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("100 Continue in time")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            "HTTP/1.1 100 Continue\r\n\r\n",
            "round {round}"
        );
        s.write_all(b"hello").await.unwrap();
        let (head, body) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        // The node read the whole body before it answered.
        assert_eq!(body, b"5");
    }
    // An empty body is not asked for: the answer comes straight.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: company.com\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, false).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // A request to no entry is answered without a 100, and the unread body ends the
    // connection.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: nowhere.com\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    assert!(closes_within(&mut s, Duration::from_secs(10), &mut out).await);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
}

/// A client that pipelines: a request with a long head, then 300 small ones in the same
/// write, the last asking to close. Every one is answered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_after_a_long_head_are_answered_in_order() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&one_node(a.addr, ""));
    let p = eg.port("http");
    let mut all = format!(
        "GET /p?i=long HTTP/1.1\r\nHost: company.com\r\nX-Long: {}\r\n\r\n",
        "l".repeat(40_000)
    );
    for i in 0..300 {
        let close = if i == 299 {
            "Connection: close\r\n"
        } else {
            ""
        };
        all.push_str(&format!(
            "GET /p?i={i} HTTP/1.1\r\nHost: company.com\r\n{close}\r\n"
        ));
    }
    let mut s = raw_conn(p).await;
    s.write_all(all.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("every answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&got).to_lowercase();
    let targets: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("x-target: /p?i="))
        .collect();
    let mut want = vec!["long".to_string()];
    want.extend((0..300).map(|i| i.to_string()));
    assert_eq!(targets, want);
    assert_eq!(text.matches("http/1.1 200 ok").count(), 301);
}
