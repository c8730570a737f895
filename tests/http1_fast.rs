//! The own HTTP/1.1 codec (`--http1 fast`): what it serves, what it hands to hyper, and
//! differential checks: the same request bytes through either codec give the node the same
//! request and the client the same answer.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use envgate::accesslog::Format;
use envgate::server::Http1;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `envgate_http1_fast_requests_total` by outcome (served, declined).
async fn fast_counts(api: u16) -> (f64, f64) {
    let (_, s) = scrape(api).await;
    (
        sum(
            &s,
            "envgate_http1_fast_requests_total",
            &["outcome=\"served\""],
        ),
        sum(
            &s,
            "envgate_http1_fast_requests_total",
            &["outcome=\"declined\""],
        ),
    )
}

fn control(yaml: String, api: u16) -> String {
    yaml + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_own_codec_serves_then_hands_a_connection_to_hyper() {
    for workers in [1, 2] {
        let a = Upstream::start("a").await;
        let api = free_port();
        let yaml = control(
            Topo::new()
                .defaults("health: { interval: 1m, timeout: 1s, trust_unknown: true }")
                .node("a", a.addr)
                .env("blue", &["company.com"], "nodes: [a]")
                .yaml(),
            api,
        );
        let eg = Envgate::start_codec(&yaml, workers, Format::Text, None, Http1::Fast);
        let port = eg.port("http");
        let mut s = raw_conn(port).await;
        // Served by the own codec, three times on one connection.
        for i in 0..3 {
            s.write_all(
                format!("GET /x/./y?q={i} HTTP/1.1\r\nHost: company.com\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let (head, body) = read_response(&mut s, false).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(head.contains("date: "), "{head}");
            assert_eq!(String::from_utf8_lossy(&body), "a", "{head}");
            let h = a.last_headers().unwrap();
            // Not trusted: the client's X-Forwarded-For is replaced by its address.
            assert_eq!(h["x-forwarded-for"], "127.0.0.1");
            assert_eq!(h["x-forwarded-host"], "company.com");
            assert_eq!(h["x-forwarded-proto"], "http");
            assert_eq!(h["x-request-id"].len(), 32);
        }
        assert_eq!(fast_counts(api).await, (3.0, 0.0));
        // A small body with a length, come whole with its head, is the own codec's too.
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: company.com\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"hello");
        assert_eq!(fast_counts(api).await, (4.0, 0.0));
        // A chunked body, and a body larger than what came with its head, are streamed by
        // the own codec.
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
            .await
            .unwrap();
        s.write_all(b"lo\r\n3\r\n!!!\r\n0\r\n\r\n").await.unwrap();
        let (head, body) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"hello!!!");
        let big = vec![b'z'; 300 * 1024];
        s.write_all(
            format!(
                "POST /echo HTTP/1.1\r\nHost: company.com\r\nContent-Length: {}\r\n\r\n",
                big.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        s.write_all(&big).await.unwrap();
        let (head, body) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(body == big, "{} bytes back", body.len());
        assert_eq!(fast_counts(api).await, (6.0, 0.0));
        // A request asking for trailers (`TE`) is handed to hyper, which serves the
        // connection from then on.
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: company.com\r\nTE: trailers\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, b"a");
        assert_eq!(fast_counts(api).await, (6.0, 1.0));
        // Malformed heads go to hyper too, which answers them as before.
        let reply = raw(
            port,
            b"GET / HTTP/1.1\r\nHost: company.com\r\nBad Header: x\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert_eq!(fast_counts(api).await, (6.0, 2.0));
        // The access log has the fast path's exchanges too.
        let lines = eg.stop_with_log().await;
        let fast_lines = lines
            .iter()
            .filter(|l| l.contains("\"GET company.com /x/./y?q="))
            .count();
        assert_eq!(fast_lines, 3, "{lines:?}");
        assert!(lines
            .iter()
            .any(|l| l.contains(" 200 env=blue app=- node=a attempts=1")));
    }
}

/// A node that records each request head it reads and answers `/N` with `answers[N]`,
/// closing after it when the answer says so (a body delimited by the close).
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<Vec<u8>>>>,
}

async fn recorder(answers: Vec<(Vec<u8>, bool)>) -> Recorder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let kept = heads.clone();
    let answers = Arc::new(answers);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (heads, answers) = (kept.clone(), answers.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let mut head: Vec<u8> = buf.drain(..end).collect();
                    let text = String::from_utf8_lossy(&head).to_string();
                    // A body with a length is read, and recorded after the head.
                    let length = text.lines().find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    });
                    if let Some(n) = length {
                        while buf.len() < n {
                            match s.read(&mut tmp).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&tmp[..k]),
                            }
                        }
                        head.extend(buf.drain(..n));
                    }
                    // A chunked body is decoded (whatever the chunks' sizes) and recorded
                    // after the head; trailers are left out.
                    let chunked = text.lines().any(|l| {
                        l.split_once(':').is_some_and(|(n, v)| {
                            n.eq_ignore_ascii_case("transfer-encoding")
                                && v.trim().eq_ignore_ascii_case("chunked")
                        })
                    });
                    if chunked {
                        loop {
                            let line = loop {
                                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                                    break buf.drain(..p + 2).collect::<Vec<u8>>();
                                }
                                match s.read(&mut tmp).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(k) => buf.extend_from_slice(&tmp[..k]),
                                }
                            };
                            let line = String::from_utf8_lossy(&line).to_string();
                            let size = line.trim_end().split(';').next().unwrap_or("");
                            let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
                                return;
                            };
                            if size == 0 {
                                // Trailer lines, up to the empty one.
                                loop {
                                    if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                                        let empty = p == 0;
                                        buf.drain(..p + 2);
                                        if empty {
                                            break;
                                        }
                                        continue;
                                    }
                                    match s.read(&mut tmp).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                                    }
                                }
                                break;
                            }
                            while buf.len() < size + 2 {
                                match s.read(&mut tmp).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(k) => buf.extend_from_slice(&tmp[..k]),
                                }
                            }
                            head.extend(buf.drain(..size));
                            buf.drain(..2);
                        }
                    }
                    let i: usize = text
                        .split(' ')
                        .nth(1)
                        .and_then(|t| t.trim_start_matches('/').split('?').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    heads.lock().unwrap().push(head);
                    let (answer, close) = &answers[i.min(answers.len() - 1)];
                    if s.write_all(answer).await.is_err() || *close {
                        return;
                    }
                }
            });
        }
    });
    Recorder { addr, heads }
}

/// A head as a comparable value: the first line, then its fields in lower case, sorted,
/// leaving out those that differ by nature (`date`, and the id envgate makes).
fn normal(head: &[u8], drop: &[&str]) -> Vec<String> {
    let text = String::from_utf8_lossy(head).to_string();
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    let mut fields: Vec<String> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or((l, ""));
            format!("{}: {}", n.to_lowercase(), v.trim())
        })
        .filter(|l| !drop.iter().any(|d| l.starts_with(&format!("{d}: "))))
        .collect();
    fields.sort();
    let mut out = vec![first];
    out.extend(fields);
    out
}

/// What the node got, the answer's head and its body.
type Seen = (Vec<String>, Vec<String>, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_codecs_give_the_node_the_same_request_and_the_client_the_same_answer() {
    let answers: Vec<(Vec<u8>, bool)> = vec![
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello".to_vec(), false),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n".to_vec(), false),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close".to_vec(), true),
        (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec(), false),
        (b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(), false),
        (b"HTTP/1.1 200 OK\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\nok".to_vec(), false),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 201 Made\r\nContent-Length: 3\r\n\r\nnew".to_vec(), false),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nnope".to_vec(), false),
        // A length the node's `Connection` names; a 304 with a length.
        (b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc".to_vec(), false),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n".to_vec(), false),
        // HTTP/1.0 from the node: the client is answered in HTTP/1.1 all the same.
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi".to_vec(), false),
        // A declared trailer on an answer to HEAD: left out.
        (b"HTTP/1.1 200 OK\r\nTrailer: x-t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), false),
    ];
    // (request bytes, is HEAD)
    let requests: Vec<(String, bool)> = vec![
        ("GET /0 HTTP/1.1\r\nHost: company.com\r\n\r\n".into(), false),
        ("GET /1?a=b&c=%20d HTTP/1.1\r\nhost: company.com\r\nAccept: */*\r\nX-Request-Id: abc-123\r\n\r\n".into(), false),
        ("GET /2 HTTP/1.1\r\nHost: company.com\r\nConnection: keep-alive\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n".into(), false),
        ("GET /3 HTTP/1.1\r\nHost: company.com:80\r\nX-Forwarded-Host: evil\r\nForwarded: for=1.2.3.4\r\n\r\n".into(), false),
        ("GET /4 HTTP/1.1\r\nHost: company.com\r\nIf-None-Match: \"v1\"\r\n\r\n".into(), false),
        ("GET /./5/../5 HTTP/1.1\r\nHost: company.com\r\nX-Request-Id: a\r\nX-Request-Id: b\r\n\r\n".into(), false),
        ("HEAD /0 HTTP/1.1\r\nHost: company.com\r\n\r\n".into(), true),
        ("OPTIONS /6 HTTP/1.1\r\nHost: company.com\r\nContent-Length: 0\r\n\r\n".into(), false),
        ("DELETE /7 HTTP/1.1\r\nHost: company.com\r\nX-Forwarded-Proto: https\r\n\r\n".into(), false),
        // Bodies with a length: sent on with the head; past the environment's limit, 413;
        // to no entry, 404 (the body read, the connection kept).
        ("POST /0 HTTP/1.1\r\nHost: company.com\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world".into(), false),
        ("PUT /1 HTTP/1.1\r\nHost: company.com\r\ncontent-length: 003\r\n\r\nabc".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: small.com\r\nContent-Length: 12\r\n\r\ntwelve bytes".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: small.com\r\nContent-Length: 4\r\n\r\nfour".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: nowhere.com\r\nContent-Length: 4\r\n\r\nfour".into(), false),
        // Streamed bodies: chunked (a trailer is not passed on), chunked past the limit
        // (413), a length past what is sent with the head.
        ("POST /0 HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-t: 1\r\n\r\n".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: small.com\r\nTransfer-Encoding: chunked\r\n\r\nc\r\ntwelve bytes\r\n0\r\n\r\n".into(), false),
        (format!("PUT /1 HTTP/1.1\r\nHost: company.com\r\nContent-Length: {}\r\n\r\n{}", 100 * 1024, "b".repeat(100 * 1024)), false),
        // Expect: 100-continue, with a body (100 Continue first), an empty one (none), a
        // chunked one, and to no entry (none; the body in the buffer read past).
        ("POST /0 HTTP/1.1\r\nHost: company.com\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: company.com\r\nExpect: 100-Continue\r\nContent-Length: 0\r\n\r\n".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: company.com\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n".into(), false),
        ("POST /0 HTTP/1.1\r\nHost: nowhere.com\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nfour".into(), false),
        ("GET /8 HTTP/1.1\r\nHost: company.com\r\n\r\n".into(), false),
        ("GET /9 HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\nClose: x\r\n\r\n".into(), false),
        ("GET /10 HTTP/1.1\r\nHost: company.com\r\n\r\n".into(), false),
        ("HEAD /11 HTTP/1.1\r\nHost: company.com\r\n\r\n".into(), true),
        // envgate's own answer to a client that closes.
        ("GET / HTTP/1.1\r\nHost: nowhere.com\r\nConnection: close\r\n\r\n".into(), false),
    ];
    let mut seen: HashMap<&str, Vec<Seen>> = HashMap::new();
    for (codec, name) in [(Http1::Hyper, "hyper"), (Http1::Fast, "fast")] {
        let node = recorder(answers.clone()).await;
        let api = free_port();
        let yaml = control(
            Topo::new()
                .defaults("health: { type: tcp, interval: 1m, timeout: 1s, trust_unknown: true }")
                .node("n", node.addr)
                .env("blue", &["company.com"], "nodes: [n]")
                .env(
                    "small",
                    &["small.com"],
                    "nodes: [n], limits: { max_request_body: 10 }",
                )
                .yaml(),
            api,
        );
        let eg = Envgate::start_codec(&yaml, 1, Format::Text, None, codec);
        let port = eg.port("http");
        let mut got = Vec::new();
        for (req, head) in &requests {
            // Each on a connection of its own, so that a close-delimited answer does not
            // end the next exchange.
            let mut s = raw_conn(port).await;
            let before = node.heads.lock().unwrap().len();
            s.write_all(req.as_bytes()).await.unwrap();
            let (resp, body) = read_response(&mut s, *head).await;
            // Nothing when the request did not reach the node.
            let sent = node.heads.lock().unwrap()[before..]
                .last()
                .cloned()
                .unwrap_or_default();
            // The id envgate made differs run to run; a client's sane one must go as it is.
            let keeps_id = req.contains("X-Request-Id: abc-123");
            let drop: &[&str] = if keeps_id { &[] } else { &["x-request-id"] };
            got.push((
                normal(&sent, drop),
                normal(resp.as_bytes(), &["date"]),
                body,
            ));
        }
        let (served, _) = fast_counts(api).await;
        if codec == Http1::Fast {
            assert_eq!(
                served,
                requests.len() as f64,
                "each request took the own codec"
            );
        } else {
            assert_eq!(served, 0.0);
        }
        seen.insert(name, got);
    }
    for (i, (hyper, fast)) in seen["hyper"].iter().zip(&seen["fast"]).enumerate() {
        assert_eq!(hyper.0, fast.0, "request {i}: what the node got");
        assert_eq!(hyper.1, fast.1, "request {i}: the answer's head");
        assert_eq!(hyper.2, fast.2, "request {i}: the answer's body");
    }
}

/// A reload that turns the own codec off (a node spoken to over HTTP/2 joins) closes the
/// own codec's idle connections to the nodes kept: nothing would take them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_the_own_codec_off_closes_its_idle_connections() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let topo = |extra_node: &str| {
        control(
            format!(
                r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ type: tcp, interval: 1m }} }}
nodes: {{ a: {{ address: "{}" }}{extra_node} }}
environments:
  blue: {{ entries: ["company.com:{{port:http}}"], nodes: [a] }}
"#,
                a.addr
            ),
            api,
        )
    };
    let eg = Envgate::start_codec(&topo(""), 1, Format::Text, None, Http1::Fast);
    let port = eg.port("http");
    let mut s = raw_conn(port).await;
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut s, false).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    assert_eq!(fast_counts(api).await, (3.0, 0.0));
    let conns = "envgate_node_connections";
    until(api, "one idle connection of the own codec", |m| {
        sum(m, conns, &["node=\"a\""]) == 1.0
    })
    .await;
    // An h2c node joins: the own codec is off from here on.
    eg.apply(&topo(&format!(
        ", b: {{ address: \"127.0.0.1:{}\", protocol: h2c }}",
        free_port()
    )));
    let r = get(port, "company.com", "/").await;
    assert_eq!(r.status, 200);
    // hyper's connection is the only one left.
    until(api, "only hyper's connection open", |m| {
        sum(m, conns, &["node=\"a\""]) == 1.0
    })
    .await;
    // The own codec hands every request to hyper now.
    assert_eq!(fast_counts(api).await, (3.0, 1.0), "the own codec is off");
}

/// Node connections idle past `upstream_idle` close within the pools' sweep even when no
/// request comes to use the pool again (a quiet worker after a burst), on both codecs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_node_connections_close_on_a_quiet_worker() {
    for (codec, workers) in [(Http1::Fast, 1), (Http1::Hyper, 1), (Http1::Fast, 2)] {
        let a = Upstream::start("a").await;
        let api = free_port();
        let yaml = control(
            Topo::new()
                .defaults("health: { type: tcp, interval: 1h }, timeouts: { upstream_idle: 1s }")
                .node("a", a.addr)
                .env("blue", &["company.com"], "nodes: [a]")
                .yaml(),
            api,
        );
        let eg = Envgate::start_codec(&yaml, workers, Format::Text, None, codec);
        let port = eg.port("http");
        // Four requests at once: four node connections, idle once answered.
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(tokio::spawn(async move {
                get(port, "company.com", "/slow?ms=300").await.status
            }));
        }
        for c in clients {
            assert_eq!(c.await.unwrap(), 200, "{codec:?}");
        }
        let conns = "envgate_node_connections";
        let s = until(api, "the burst's node connections", |m| {
            sum(m, conns, &["node=\"a\""]) >= 2.0
        })
        .await;
        assert!(
            sum(&s, conns, &["node=\"a\""]) <= 4.0,
            "{codec:?} {workers}"
        );
        // No request follows: the sweep closes them.
        until(api, "no node connection left", |m| {
            sum(m, conns, &["node=\"a\""]) == 0.0
        })
        .await;
    }
}
