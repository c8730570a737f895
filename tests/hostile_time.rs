//! Time bounds on every phase: the response-head timer starts once the upload is whole;
//! body idle timeouts both ways; HTTP/2 idle and first-request bounds; the overall
//! deadline across retries; the first byte's wait counts toward `client_header`; tunnels
//! time out and hold their in-flight slot. Assertions are on behaviour (who got what, what
//! was closed), each wait bounded.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_longer_than_the_response_header_timeout_is_fine() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "timeouts: { response_header: 300ms, body_idle: 5s }",
        "",
    ));
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 50\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // Five pieces 200 ms apart: a second in all, well past response_header.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"0123456789").await.unwrap();
    }
    let mut out = Vec::new();
    assert!(closes_within(&mut s, Duration::from_secs(10), &mut out).await);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("50"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stalls_mid_response_is_cut_and_counted() {
    let stall = RawNode::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789".to_vec(),
        After::Hang,
    )
    .await;
    let good = Upstream::start("good").await;
    let eg = Envgate::start(&topo(
        &[("stall", stall.addr), ("good", good.addr)],
        "timeouts: { body_idle: 300ms }, health: { type: tcp, interval: 1m }, passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }",
        "",
    ));
    let p = eg.port("http");
    // Round-robin: one of the first two requests meets the stalling node.
    let mut cut = 0;
    for _ in 0..2 {
        let mut s = raw_conn(p).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        if head.contains("content-length: 100") {
            // The client's connection is closed with 10 of the 100 bytes: not passed off
            // as a complete response.
            let mut body = Vec::new();
            assert!(closes_within(&mut s, Duration::from_secs(5), &mut body).await);
            assert_eq!(body, b"0123456789");
            cut += 1;
        }
    }
    assert_eq!(cut, 1);
    // Counted against the node: it is ejected and gets nothing more.
    let seen = stall.requests();
    for _ in 0..6 {
        assert_eq!(get(p, "company.com", "/").await.node(), "good");
    }
    assert_eq!(stall.requests(), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_idle_out() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "timeouts: { idle: 400ms, client_header: 300ms }",
        "",
    ));
    let p = eg.port("http");
    // After the preface, never a request: closed after client_header.
    let tcp = raw_conn(p).await;
    let (_client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an HTTP/2 connection without a request stays open")
        .ok();
    // One request, then nothing: closed after idle.
    let tcp = raw_conn(p).await;
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://company.com:{p}/"))
        .body(())
        .unwrap();
    let r = h2_send(&mut client, req).await;
    assert_eq!(r.status, 200);
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("an idle HTTP/2 connection stays open")
        .unwrap()
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_first_byte_counts_toward_client_header() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "timeouts: { client_header: 600ms }",
        "",
    ));
    let mut s = raw_conn(eg.port("http")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    // The rest of the head would come 400 ms later, 800 ms after the connect: too late.
    let mut out = Vec::new();
    let closed = closes_within(&mut s, Duration::from_secs(5), &mut out).await;
    assert!(closed);
    assert!(
        !String::from_utf8_lossy(&out).contains("200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overall_deadline_bounds_retries() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let eg = Envgate::start(&topo(
        &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
        "timeouts: { response_header: 400ms, request: 600ms }, retries: 2, passive: { consecutive_failures: 0 }",
        "",
    ));
    let r = get(eg.port("http"), "company.com", "/hang").await;
    assert_eq!(r.status, 504);
    // The first attempt used 400 ms, the second ran into the 600 ms deadline: the third
    // node was never asked.
    assert_eq!(a.hits() + b.hits() + c.hits(), 2);
}

fn tunnel_topology(a: &Upstream) -> String {
    topo(
        &[("a", a.addr)],
        "timeouts: { tunnel_idle: 400ms }",
        "upgrades: [echo], limits: { max_in_flight: 1 }",
    )
}

async fn open_tunnel(port: u16) -> tokio::net::TcpStream {
    let mut s = raw_conn(port).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: company.com\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_idle_out_and_hold_their_slot() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&tunnel_topology(&a));
    let p = eg.port("http");
    let mut s = open_tunnel(p).await;
    // While the tunnel is open, the environment is at its limit of one.
    let r = get(p, "company.com", "/").await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("over_limit"), "{}", r.text());
    // Nothing moves: the tunnel is closed after tunnel_idle, and the slot comes back.
    let mut out = Vec::new();
    assert!(closes_within(&mut s, Duration::from_secs(5), &mut out).await);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "company.com", "/").await.status == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_breaks_every_body_is_ejected() {
    let broken = RawNode::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789".to_vec(),
        After::Close,
    )
    .await;
    let good = Upstream::start("good").await;
    let eg = Envgate::start(&topo(
        &[("broken", broken.addr), ("good", good.addr)],
        "health: { type: tcp, interval: 1m }, passive: { consecutive_failures: 2, max_ejected_percent: 100, ejection: 1m }",
        "",
    ));
    let p = eg.port("http");
    // Its heads are fine, its bodies never: two of them eject it.
    for _ in 0..4 {
        let mut s = raw_conn(p).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n\r\n")
            .await
            .unwrap();
        let _ = read_head(&mut s).await;
        let mut rest = Vec::new();
        let _ = closes_within(&mut s, Duration::from_millis(500), &mut rest).await;
    }
    assert!(eventually(Duration::from_secs(2), || async { broken.requests() >= 2 }).await);
    let seen = broken.requests();
    for _ in 0..6 {
        assert_eq!(get(p, "company.com", "/").await.node(), "good");
    }
    assert_eq!(broken.requests(), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_gives_no_window_is_closed() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "timeouts: { body_idle: 400ms }",
        "limits: { max_in_flight: 2 }",
    ));
    let p = eg.port("http");
    let tcp = raw_conn(p).await;
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut responses = Vec::new();
    for _ in 0..2 {
        let mut c = client.clone().ready().await.unwrap();
        let req = http::Request::get(format!("http://company.com:{p}/download?bytes=1000000"))
            .body(())
            .unwrap();
        responses.push(c.send_request(req, true).unwrap().0);
    }
    // Kept, not dropped: dropping a response body resets its stream.
    let mut kept = Vec::new();
    for r in responses {
        let r = r.await.unwrap();
        assert_eq!(r.status(), 200);
        kept.push(r);
    }
    // Both slots are taken by bodies the client never lets through...
    assert_eq!(get(p, "company.com", "/").await.status, 503);
    // ...until envgate closes that connection, which frees them.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("a connection that reads nothing stays open")
        .ok();
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "company.com", "/").await.status == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_even_if_the_client_ignores_goaway() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "timeouts: { client_header: 300ms }",
        "",
    ));
    // The preface and an empty SETTINGS frame, then silence: no ack of anything.
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut out = Vec::new();
    assert!(closes_within(&mut s, Duration::from_secs(5), &mut out).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_tunnels_then_closes_them() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "timeouts: { drain: 500ms }",
        "upgrades: [echo]",
    ));
    let mut s = open_tunnel(eg.port("http")).await;
    // The tunnel is counted by the drain: shutdown waits for it (up to `drain`), so it
    // still carries bytes once shutdown began...
    let stopping = tokio::spawn(eg.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut back),
    )
    .await
    .expect("the tunnel died with the shutdown")
    .unwrap();
    assert_eq!(&back, b"still here");
    // ...and is closed at the end of the drain instead of being left behind.
    let mut out = Vec::new();
    assert!(closes_within(&mut s, Duration::from_secs(5), &mut out).await);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown did not end")
        .unwrap();
}
