//! Framing and sizes of what nodes and HTTP/2 clients send: a stale Content-Length beside
//! Transfer-Encoding, oversized response heads, too many HTTP/2 fields, and HTTP/2 clients
//! that reset streams right after envgate accepted them.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_content_length_beside_chunked_is_dropped() {
    // Content-Length says 5, the chunks carry 10 bytes: the chunks frame the body.
    let node = RawNode::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n".to_vec(),
        After::Close,
    )
    .await;
    let eg = Envgate::start(&topo(
        &[("n", node.addr)],
        "health: { type: tcp, interval: 1m }",
        "",
    ));
    let r = get(eg.port("http"), "company.com", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"0123456789");
    assert_ne!(
        r.headers.get("content-length").map(|v| v.to_str().unwrap()),
        Some("5")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_response_head_is_502() {
    let mut answer = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    answer.extend(std::iter::repeat_n(b'b', 70 * 1024));
    answer.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
    let node = RawNode::start(answer, After::Close).await;
    let eg = Envgate::start(&topo(
        &[("n", node.addr)],
        "health: { type: tcp, interval: 1m }, retries: 0",
        "",
    ));
    let r = get(eg.port("http"), "company.com", "/").await;
    assert_eq!(r.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_http2_fields_are_431() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    let mut client = h2_client(p).await;
    let mut req = http::Request::get(format!("http://company.com:{p}/"));
    for i in 0..101 {
        req = req.header(format!("x-field-{i}"), "v");
    }
    let r = h2_send(&mut client, req.body(()).unwrap()).await;
    assert_eq!(r.status, 431);
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_resets_close_the_connection() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start_with(&topo(&[("a", a.addr)], "", ""), 2);
    let p = eg.port("http");
    let tcp = raw_conn(p).await;
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    // Each stream asks for an answer that never comes, and is reset once envgate has
    // passed it on to the node.
    let mut sent = 0;
    for _ in 0..400 {
        let Ok(mut c) = client.clone().ready().await else {
            break;
        };
        let req = http::Request::get(format!("http://company.com:{p}/hang"))
            .body(())
            .unwrap();
        let Ok((resp, mut stream)) = c.send_request(req, true) else {
            break;
        };
        sent += 1;
        let before = a.hits();
        let reached = eventually(Duration::from_secs(2), || async { a.hits() > before }).await;
        stream.send_reset(h2::Reason::CANCEL);
        drop(resp);
        if !reached {
            break;
        }
    }
    // The connection was closed long before 400 streams: the node never saw hundreds.
    assert!(sent < 400, "{sent} streams went through");
    assert!(
        a.hits() <= envgate::proxy::handler::MAX_EARLY_RESETS as usize + 5,
        "{} requests reached the node",
        a.hits()
    );
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the abusive connection stays open")
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_nobody_asked_for_is_502_and_counted() {
    let rogue = RawNode::start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n".to_vec(),
        After::Close,
    )
    .await;
    let good = Upstream::start("good").await;
    let eg = Envgate::start(&topo(
        &[("rogue", rogue.addr), ("good", good.addr)],
        "health: { type: tcp, interval: 1m }, retries: 0, passive: { consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }",
        "",
    ));
    let p = eg.port("http");
    let mut codes = Vec::new();
    for _ in 0..2 {
        codes.push(get(p, "company.com", "/").await.status.as_u16());
    }
    codes.sort();
    assert_eq!(codes, [200, 502]);
    for _ in 0..4 {
        assert_eq!(get(p, "company.com", "/").await.node(), "good");
    }
    assert_eq!(rogue.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_codings_other_than_one_chunked_are_refused() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    for te in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: gzip\r\n",
    ] {
        let req = format!(
            "POST /consume HTTP/1.1\r\nHost: company.com\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let answer = raw(p, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{te:?}: {answer}");
    }
    assert_eq!(a.hits(), 0);
}

/// Chunk-size lines as hyper reads them (more than 16 digits of leading zeros, spaces or
/// tabs after the size, extensions) go through on either codec, whether they come with the
/// head or in a later read of a body already on its way to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_lines_are_read_alike_in_any_read() {
    use tokio::io::AsyncWriteExt;
    let node = Upstream::start("n").await;
    let eg = Envgate::start(&topo(
        &[("n", node.addr)],
        "health: { type: tcp, interval: 1m }",
        "",
    ));
    let p = eg.port("http");
    let head: &[u8] =
        b"POST /echo HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let rest: &[u8] = b"5 \t;a=b\r\nworld\r\n000000000000000000003\r\nabc\r\n0 \r\n\r\n";
    for split in [false, true] {
        let mut s = raw_conn(p).await;
        if split {
            let before = node.hits();
            s.write_all(head).await.unwrap();
            assert!(
                eventually(Duration::from_secs(5), || async { node.hits() > before }).await,
                "the request did not reach the node"
            );
            s.write_all(rest).await.unwrap();
        } else {
            s.write_all(&[head, rest].concat()).await.unwrap();
        }
        let (answer, body) = read_response(&mut s, false).await;
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            "helloworldabc",
            "split: {split}"
        );
    }
}

/// A node's head as hyper's client takes it: empty lines before the status line, the same
/// Content-Length in many fields. Both codecs relay the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_heads_hyper_reads_are_relayed_by_both_codecs() {
    let mut answer = b"\r\n\n\r\nHTTP/1.1 200 OK\r\n".to_vec();
    for _ in 0..6 {
        answer.extend_from_slice(b"Content-Length: 2\r\n");
    }
    answer.extend_from_slice(b"Content-Length: 2, 2\r\n\r\nok");
    let node = RawNode::start(answer, After::Close).await;
    let eg = Envgate::start(&topo(
        &[("n", node.addr)],
        "health: { type: tcp, interval: 1m }",
        "",
    ));
    let r = get(eg.port("http"), "company.com", "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"ok");
}

/// A chunked upload's trailer lines, read as hyper reads them: only CR LF ends a line, a
/// bare LF is a byte of it. httparse then reads that LF as a line end: a section where it
/// finds more fields than lines is refused (400), one where it does not is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailer_lines_ended_by_a_bare_lf_are_read_as_hyper_reads_them() {
    use tokio::io::AsyncWriteExt;
    let node = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", node.addr)], "", ""));
    for (trailers, status) in [
        ("x: 1\ny: 2\r\n\r\n", "400"),
        ("x: 1\n\r\n\r\n", "200"),
        ("x: 1\r\ny: 2\r\n\r\n", "200"),
    ] {
        let mut s = raw_conn(eg.port("http")).await;
        s.write_all(
            format!(
                "POST /echo HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n{trailers}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{trailers:?}: {head}"
        );
    }
}
