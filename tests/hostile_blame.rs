//! A client must never get a healthy node ejected: broken, aborted and stalled request
//! bodies are the client's fault, answered 400 or 408 (or not at all), and leave the node's
//! record alone. Raw sockets send what a polite client would refuse to.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

/// Two nodes that eject after two consecutive failures, with no cap on ejections: if
/// client faults counted, `a` would be out after the first abuses.
fn strict(a: &Upstream, b: &Upstream) -> String {
    topo(
        &[("a", a.addr), ("b", b.addr)],
        "timeouts: { body_idle: 300ms }, passive: { consecutive_failures: 2, max_ejected_percent: 100, ejection: 1m }",
        "",
    )
}

/// Both nodes still take turns: nobody was ejected.
async fn both_serve(port: u16) {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = get(port, "company.com", "/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.node().to_string());
    }
    assert_eq!(seen.len(), 2, "a node was ejected: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_chunked_bodies_are_400_and_blame_no_node() {
    broken_chunked_bodies(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_chunked_bodies_blame_no_node_with_several_workers() {
    broken_chunked_bodies(3).await;
}

async fn broken_chunked_bodies(workers: usize) {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start_with(&strict(&a, &b), workers);
    let p = eg.port("http");
    for _ in 0..6 {
        let answer = raw(
            p,
            b"POST /consume HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("bad_body"), "{answer}");
    }
    both_serve(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_408_and_blame_no_node() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start_with(&strict(&a, &b), 2);
    let p = eg.port("http");
    for _ in 0..4 {
        let mut s = raw_conn(p).await;
        s.write_all(
            b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 100\r\n\r\nonly ten b",
        )
        .await
        .unwrap();
        // Nothing more: envgate gives up on the client after body_idle.
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
        let mut rest = Vec::new();
        assert!(closes_within(&mut s, Duration::from_secs(5), &mut rest).await);
    }
    both_serve(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_uploads_blame_no_node() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&strict(&a, &b));
    let p = eg.port("http");
    for i in 0..6 {
        let mut s = raw_conn(p).await;
        s.write_all(b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 1000\r\n\r\nsome of it")
            .await
            .unwrap();
        // Wait until the upload reached a node, then go away (half the time with a reset).
        let before = a.hits() + b.hits();
        assert!(
            eventually(Duration::from_secs(5), || async {
                a.hits() + b.hits() > before
            })
            .await
        );
        if i % 2 == 0 {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
        drop(s);
    }
    both_serve(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_and_blames_no_node() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topo(
        &[("a", a.addr), ("b", b.addr)],
        "passive: { consecutive_failures: 2, max_ejected_percent: 100, ejection: 1m }, limits: { max_request_body: 1KiB }",
        "",
    ));
    let p = eg.port("http");
    // Announced: refused before anything reaches a node.
    let big = format!(
        "POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 2000\r\n\r\n{}",
        "x".repeat(2000)
    );
    let answer = raw(p, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(a.hits() + b.hits(), 0);
    // Chunked: cut once it passes the limit.
    for _ in 0..4 {
        let chunk = "y".repeat(600);
        let req = format!(
            "POST /consume HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
        );
        let answer = raw(p, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    // Within the limit all is well.
    let ok = raw(
        p,
        b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("5"), "{ok}");
    both_serve(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waiting_for_a_slow_upload_is_not_blamed() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&topo(
        &[("a", a.addr), ("b", b.addr)],
        "timeouts: { body_idle: 400ms }, passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }",
        "",
    ));
    let p = eg.port("http");
    for _ in 0..2 {
        let mut s = raw_conn(p).await;
        s.write_all(b"POST /late-count HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // The node answers its head at once and the rest only after the upload, which
        // takes well over body_idle while never pausing that long.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            s.write_all(b"a\r\n0123456789\r\n").await.unwrap();
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        assert!(closes_within(&mut s, Duration::from_secs(10), &mut out).await);
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200") && out.contains("\r\n50"),
            "{out}"
        );
    }
    both_serve(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_reads_the_upload_is_cut_both_ways() {
    // Reads the head, then nothing: the upload fills the buffers and stops.
    let deaf = RawNode::start(Vec::new(), After::Hang).await;
    let eg = Envgate::start(&topo(
        &[("deaf", deaf.addr)],
        "timeouts: { body_idle: 400ms }, health: { type: tcp, interval: 1m }",
        "",
    ));
    let mut s = raw_conn(eg.port("http")).await;
    let size = 64 * 1024 * 1024;
    s.write_all(
        format!("POST / HTTP/1.1\r\nHost: company.com\r\nContent-Length: {size}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut rd, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the client's connection stayed open");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    writer.abort();
}

/// The node answers its head at once and waits for the rest of the upload; the client
/// then stalls, breaks its framing or leaves. The client's fault all the same: nobody is
/// ejected (the answer relayed so far is cut, the connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_failing_its_upload_after_the_node_answered_blames_no_one() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&strict(&a, &b));
    let p = eg.port("http");
    for abuse in 0..3 {
        // Four times each: both nodes get two in a row.
        for _ in 0..4 {
            let mut s = raw_conn(p).await;
            s.write_all(b"POST /late-count HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
                .await
                .unwrap();
            match abuse {
                // Stalls: body_idle (300ms) ends it.
                0 => {}
                1 => s.write_all(b"zz\r\n").await.unwrap(),
                _ => {
                    drop(s);
                    continue;
                }
            }
            let mut out = Vec::new();
            assert!(closes_within(&mut s, Duration::from_secs(10), &mut out).await);
        }
    }
    both_serve(p).await;
}

/// A node may send 100 Continue (or 103) on its own while the body comes: the upload goes
/// on and the final answer is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_informational_answer_during_the_upload_does_not_stop_it() {
    use tokio::io::AsyncReadExt;
    let node = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = node.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = node.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if got.starts_with(b"POST") {
                    s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
                        .await
                        .unwrap();
                    while !got.ends_with(b"0\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let eg = Envgate::start(&topo(
        &[("n", addr)],
        "timeouts: { body_idle: 2s }, health: { type: tcp, interval: 1m }, passive: { consecutive_failures: 1, ejection: 1m }",
        "",
    ));
    let p = eg.port("http");
    for _ in 0..2 {
        let mut s = raw_conn(p).await;
        s.write_all(b"POST / HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        // The rest comes once the node had time to send its informational answers.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"5\r\nworld\r\n0\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        assert!(closes_within(&mut s, Duration::from_secs(10), &mut out).await);
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("\r\n\r\nok"), "{out}");
    }
}

/// An answer sent while the client still uploads (envgate's own 413 for a length over the
/// limit, a node that answers without reading the body) is not lost: the rest of the
/// upload is read and dropped until the client is done (a lingering close), so its writes
/// do not fail under a reset and it reads the answer to a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_during_an_upload_is_not_lost_to_a_reset() {
    use tokio::io::AsyncReadExt;
    let a = Upstream::start("a").await;
    // A node that answers once it has the head, then keeps the connection without reading.
    let early = RawNode::start(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno".to_vec(),
        After::Hang,
    )
    .await;
    let piece = vec![b'x'; 64 * 1024];
    for (node, length, status) in [
        (a.addr, 100 << 20, "HTTP/1.1 413"),
        (early.addr, 16 << 20, "HTTP/1.1 403"),
    ] {
        let eg = Envgate::start(&topo(
            &[("n", node)],
            // On hyper's codec the upload to the node that stopped reading ends after
            // body_idle; the own codec ends it once the answer went whole.
            "health: { type: tcp, interval: 1m }, limits: { max_request_body: 64MiB }, timeouts: { body_idle: 500ms }",
            "",
        ));
        let mut s = raw_conn(eg.port("http")).await;
        let head = format!(
            "POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: {length}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // 16 MiB of the body, far more than the sockets' buffers hold.
        let (mut r, mut w) = s.into_split();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let end = r.read_to_end(&mut got).await;
            (end.map(|_| ()), got)
        });
        let wrote = tokio::time::timeout(Duration::from_secs(30), async {
            for _ in 0..256 {
                w.write_all(&piece).await?;
            }
            w.shutdown().await
        })
        .await
        .unwrap_or_else(|_| panic!("{status}: the upload stalled"));
        assert!(wrote.is_ok(), "{status}: the upload failed: {wrote:?}");
        let (end, got) = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the connection ended")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(status), "{status}: {text}");
        assert!(end.is_ok(), "{status}: {end:?} after {text}");
    }
}

/// A chunked upload that sends only framing (a size line padded with spaces, a byte at a
/// time, well within body_idle each) makes no progress: 408 after body_idle, on either
/// codec, and no node is blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_of_framing_alone_is_408_and_blames_no_node() {
    use tokio::io::AsyncReadExt;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let eg = Envgate::start(&strict(&a, &b));
    let p = eg.port("http");
    for filler in [b' ', b'0'] {
        let mut s = raw_conn(p).await;
        s.write_all(
            b"POST /consume HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\n5",
        )
        .await
        .unwrap();
        let (mut r, mut w) = s.into_split();
        let trickle = tokio::spawn(async move {
            // Up to 20 s of it: far past body_idle (300 ms).
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if w.write_all(&[filler]).await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                other => panic!("no answer: {other:?} {}", String::from_utf8_lossy(&got)),
            }
        }
        trickle.abort();
        let head = String::from_utf8_lossy(&got);
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    }
    both_serve(p).await;
}

/// A keep-alive connection whose request body hyper read whole (an own answer, 404, to a
/// POST with a short body) ends at the idle timeout without lingering: the client's
/// next bytes meet a closed socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_close_after_a_short_body_does_not_linger() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "health: { type: tcp, interval: 1m }, timeouts: { idle: 1s }",
        "",
    ));
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"POST / HTTP/1.1\r\nHost: nowhere.example\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, false).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    // The idle close: a FIN.
    let mut rest = Vec::new();
    assert!(closes_within(&mut s, Duration::from_secs(10), &mut rest).await);
    // Closed, not lingering: a write soon fails (the first meets a reset). A lingering
    // socket would take a byte every 200 ms for 30 s.
    let mut failed = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(b"z").await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the connection lingered after an idle close");
}

/// A head past the size limit is answered 431 (by hyper, on either codec) while the client
/// may still be sending it: the rest is waited out, so the client's writes go through and
/// it reads the answer to a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_too_large_gets_its_431_while_the_client_still_sends() {
    use tokio::io::AsyncReadExt;
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "health: { type: tcp, interval: 1m }",
        "",
    ));
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n")
        .await
        .unwrap();
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let end = r.read_to_end(&mut got).await;
        (end.map(|_| ()), got)
    });
    // 16 MiB of fields, far past the 64 KiB limit and the sockets' buffers.
    let field = format!("X-Filler: {}\r\n", "f".repeat(4000));
    let wrote = tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..4000 {
            w.write_all(field.as_bytes()).await?;
        }
        w.shutdown().await
    })
    .await
    .expect("the client's writes went on");
    assert!(wrote.is_ok(), "the client's writes failed: {wrote:?}");
    let (end, got) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the connection ended")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(end.is_ok(), "{end:?} after {text}");
}

/// A head hyper refuses, its body sent after the answer: the client's writes still go
/// through, and it reads the 400 to a clean end. While the rest is waited out the
/// connection is counted as open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_is_waited_out_while_its_body_comes() {
    use tokio::io::AsyncReadExt;
    let a = Upstream::start("a").await;
    let api = free_port();
    let eg = Envgate::start(
        &(topo(&[("a", a.addr)], "health: { type: tcp, interval: 1m }", "")
            + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n")),
    );
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"POST /a b c HTTP/1.1\r\nHost: company.com\r\nContent-Length: 4000000\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // The body comes after the answer: waited out, and counted.
    let piece = vec![b'x'; 40_000];
    for _ in 0..50 {
        s.write_all(&piece).await.unwrap();
    }
    until(api, "the lingering connection counted as open", |m| {
        sum(m, "envgate_connections_active", &["listener=\"http\""]) >= 1.0
    })
    .await;
    for _ in 0..50 {
        s.write_all(&piece).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest))
        .await
        .expect("the connection ended");
    assert!(end.is_ok(), "{end:?}");
}
