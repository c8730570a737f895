//! Attacks on the exchange record (one per exchange), the per-worker request counters and
//! the access log, over real sockets: exchanges abandoned or reset at every stage,
//! tunnels, failovers, client faults, reloads with exchanges in flight, many status codes
//! and tenant targets (the spill paths), hostile bytes in logged fields, and a log writer
//! stuck on a full pipe at shutdown.
//!
//! Each test's comment names the fault it guards against.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envgate::accesslog::Format;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOUND: Duration = Duration::from_secs(10);
const HEALTH: &str = "health: { type: tcp, interval: 1m, timeout: 1s, trust_unknown: true }";

fn control(api: u16) -> String {
    format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n")
}

fn requests(env: &str, node: &str, code: u16) -> String {
    format!("envgate_requests_total{{code=\"{code}\",environment=\"{env}\",node=\"{node}\"}}")
}

fn total(s: &HashMap<String, f64>) -> f64 {
    sum(s, "envgate_requests_total", &[])
}

/// Waits (bounded) until the log holds at least `n` lines; then a little longer, so that a
/// line written twice would show, and returns them.
async fn log_lines(eg: &Envgate, n: usize) -> Vec<String> {
    assert!(
        eventually(BOUND, || async { eg.access_log().len() >= n }).await,
        "expected {n} lines: {:?}",
        eg.access_log()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    eg.access_log()
}

async fn in_flight(api: u16, env: &str, n: f64) {
    let key = format!("envgate_in_flight{{environment=\"{env}\"}}");
    until(api, &format!("{n} in flight in {env}"), |s| {
        s.get(&key) == Some(&n)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Exchanges abandoned or reset: each counted and logged exactly once.
// ---------------------------------------------------------------------------------------

/// An HTTP/2 client resets its stream (RST_STREAM CANCEL) while envgate waits on the node:
/// one exchange, counted and logged once as 499, against the node it was sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_reset_before_the_answer_is_one_499() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api);
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    let client = h2_client(port).await;
    let mut c = client.clone().ready().await.unwrap();
    let req = Request::get(format!("http://company.com:{port}/hang"))
        .header("x-request-id", "rst-before")
        .body(())
        .unwrap();
    let (resp, _) = c.send_request(req, true).unwrap();
    in_flight(api, "blue", 1.0).await;
    drop(resp);
    let s = until(api, "the reset exchange counted", |s| total(s) >= 1.0).await;
    assert_eq!(s.get(&requests("blue", "a", 499)), Some(&1.0), "{s:?}");
    let lines = log_lines(&eg, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(" 499 env=blue"), "{}", lines[0]);
    assert!(lines[0].contains("HTTP/2.0"), "{}", lines[0]);
    assert!(lines[0].ends_with(" cut"), "{}", lines[0]);
    let (_, s) = scrape(api).await;
    assert_eq!(total(&s), 1.0);
    // The stream is no longer in flight: the environment's slot came back.
    in_flight(api, "blue", 0.0).await;
}

/// An HTTP/2 client resets its stream after the head, mid-body: one 200, logged as cut,
/// with the bytes that went out (not the whole body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_reset_mid_body_is_one_cut_200() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api);
    let eg = Envgate::start_with(&yaml, 1);
    let port = eg.port("http");
    let client = h2_client(port).await;
    let mut c = client.clone().ready().await.unwrap();
    let size = 20_000_000u64;
    let req = Request::get(format!("http://company.com:{port}/download?bytes={size}"))
        .body(())
        .unwrap();
    let (resp, _) = c.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.data().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(body);
    let s = until(api, "the reset exchange counted", |s| total(s) >= 1.0).await;
    assert_eq!(s.get(&requests("blue", "a", 200)), Some(&1.0), "{s:?}");
    let out = s["envgate_response_bytes_total{environment=\"blue\"}"];
    assert!(out > 0.0 && out < size as f64, "{out}");
    let lines = log_lines(&eg, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(" 200 env=blue"), "{}", lines[0]);
    assert!(lines[0].ends_with(" cut"), "{}", lines[0]);
    let (_, s) = scrape(api).await;
    assert_eq!(total(&s), 1.0);
}

/// An HTTP/1.1 client that goes away mid-response: one 200, cut; and a client that goes
/// away before sending a whole body: one exchange (whatever its code: envgate answers
/// 400, counted under the node, see `a_clients_body_fault_is_not_counted_under_the_node`),
/// never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_gone_mid_response_or_mid_upload_is_one_exchange_each() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api);
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    let mut s = raw_conn(port).await;
    s.write_all(b"GET /download?bytes=50000000 HTTP/1.1\r\nHost: company.com\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut buf = vec![0u8; 65536];
    let _ = s.read(&mut buf).await.unwrap();
    drop(s);
    let mut s = raw_conn(port).await;
    s.write_all(
        b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    in_flight(api, "blue", 1.0).await;
    drop(s);
    let s = until(api, "two exchanges counted", |s| total(s) >= 2.0).await;
    assert_eq!(s.get(&requests("blue", "a", 200)), Some(&1.0), "{s:?}");
    let lines = log_lines(&eg, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/download") && l.ends_with(" cut")),
        "{lines:?}"
    );
    let (_, s) = scrape(api).await;
    assert_eq!(total(&s), 2.0);
    // The upload's bytes that reached envgate are counted.
    assert!(s["envgate_request_bytes_total{environment=\"blue\"}"] >= 10.0);
}

/// HEAD answers, 204 and 304 carry no body: they went out whole and must not be logged
/// as cut.
/// Answers without a body (to HEAD, 204, 304) are whole once sent, envgate's own included:
/// hyper never polls the body of an answer to HEAD, which must not make it `cut`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_are_not_cut() {
    let a = Upstream::start("a").await;
    let n204 = RawNode::start(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), After::Close).await;
    let n304 = RawNode::start(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n".to_vec(),
        After::Close,
    )
    .await;
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .node("n204", n204.addr)
        .node("n304", n304.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .env("nc", &["nc.example"], "nodes: [n204]")
        .env("nm", &["nm.example"], "nodes: [n304]")
        .yaml();
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    for (req, status) in [
        (
            "HEAD / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n",
            "200",
        ),
        (
            "GET / HTTP/1.1\r\nHost: nc.example\r\nConnection: close\r\n\r\n",
            "204",
        ),
        (
            "GET / HTTP/1.1\r\nHost: nm.example\r\nConnection: close\r\n\r\n",
            "304",
        ),
        (
            "HEAD / HTTP/1.1\r\nHost: nowhere.example\r\nConnection: close\r\n\r\n",
            "404",
        ),
    ] {
        let answer = raw(port, req.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
    let lines = log_lines(&eg, 4).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    for l in &lines {
        assert!(!l.ends_with(" cut"), "a bodiless answer logged as cut: {l}");
    }
}

// ---------------------------------------------------------------------------------------
// Blame: a client's fault is not the node's.
// ---------------------------------------------------------------------------------------

/// A client that stalls its upload (408) or sends more than the limit in chunks (413):
/// the node is not failed (passive detection at one failure would eject it), and the
/// answer, envgate's own, is not counted under the node.
/// A client whose body breaks, stalls or runs over the limit (400, 408, 413) is not counted
/// under the node its request was being sent to, in the metrics or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_body_fault_is_not_counted_under_the_node() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(&format!("{HEALTH}, timeouts: {{ body_idle: 300ms }}, passive: {{ consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }}"))
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a], limits: { max_request_body: 100 }")
        .yaml()
        + &control(api);
    let eg = Envgate::start_with(&yaml, 1);
    let port = eg.port("http");
    // A stalled upload.
    let mut s = raw_conn(port).await;
    s.write_all(
        b"POST /consume HTTP/1.1\r\nHost: company.com\r\nContent-Length: 50\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    drop(s);
    // Too much, in chunks.
    let chunk = "x".repeat(60);
    let req = format!(
        "POST /consume HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3c\r\n{chunk}\r\n3c\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw(port, req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // The node was not failed: it still serves.
    assert_eq!(get(port, "company.com", "/").await.status, 200);
    let s = until(api, "three exchanges", |s| total(s) >= 3.0).await;
    assert_eq!(
        s.get("envgate_node_ejected{node=\"a\"}"),
        Some(&0.0),
        "{s:?}"
    );
    assert_eq!(s.get(&requests("blue", "a", 200)), Some(&1.0));
    for code in [408, 413] {
        assert_eq!(
            s.get(&requests("blue", "", code)),
            Some(&1.0),
            "envgate's {code} for a client's fault is counted under node a: {:?}",
            s.get(&requests("blue", "a", code))
        );
    }
}

// ---------------------------------------------------------------------------------------
// Tenant and canary decisions.
// ---------------------------------------------------------------------------------------

/// A required tenant rule refuses a request without an id, or with a malformed one: the
/// rule decided (missing, malformed), in the environment whose entry matched.
/// A required tenant rule's refusals (id missing or malformed) are counted as that rule's
/// decisions, and as answers of the entry's environment, not as unrouted requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_tenant_rules_refusals_are_counted_as_its_decisions() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .env(
            "shared",
            &["t.example"],
            "nodes: [a], tenants: { key: { header: X-Tenant }, required: true, ranges: [ { from: 1, to: 10, environment: private } ] }",
        )
        .env("private", &[], "nodes: [a]")
        .yaml()
        + &control(api);
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let req = |id: Option<&str>| {
        let mut r = Request::get("/").header("host", "t.example");
        if let Some(id) = id {
            r = r.header("x-tenant", id);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    assert_eq!(send(port, req(Some("3"))).await.status, 200);
    let missing = send(port, req(None)).await.status.as_u16();
    let malformed = send(port, req(Some("x"))).await.status.as_u16();
    assert!(missing >= 400 && malformed >= 400);
    let s = until(api, "three exchanges", |s| total(s) >= 3.0).await;
    let decision = |d: &str| {
        s.get(&format!(
            "envgate_tenant_decisions_total{{decision=\"{d}\",environment=\"shared\"}}"
        ))
        .copied()
    };
    assert_eq!(decision("routed"), Some(1.0));
    assert_eq!(
        (decision("missing"), decision("malformed")),
        (Some(1.0), Some(1.0)),
        "a required rule's refusals are not counted as its decisions"
    );
    // Both refusals are the entry environment's own answers.
    let both = if missing == malformed { 2.0 } else { 1.0 };
    assert_eq!(
        s.get(&requests("shared", "", missing)),
        Some(&both),
        "{s:?}"
    );
}

/// Tenant ranges that send requests to more environments than a row holds inline (4):
/// every target counted exactly, through the spill, and across a reload that moves every
/// environment's index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_redirects_to_many_environments_are_counted_exactly() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let targets = 7;
    let yaml = |front: bool| {
        let ranges: Vec<String> = (1..=targets)
            .map(|i| format!("{{ from: {i}, to: {i}, environment: t{i} }}"))
            .collect();
        let mut t = Topo::new().defaults(HEALTH).node("a", a.addr);
        if front {
            t = t.env("front", &["front.example"], "nodes: [a]");
        }
        t = t.env(
            "shared",
            &["t.example"],
            &format!(
                "nodes: [a], tenants: {{ key: {{ header: X-Tenant }}, ranges: [ {} ] }}",
                ranges.join(", ")
            ),
        );
        for i in (1..=targets).rev() {
            t = t.env(&format!("t{i}"), &[], "nodes: [a]");
        }
        t.yaml() + &control(api)
    };
    let eg = Envgate::start(&yaml(false));
    let port = eg.port("http");
    let send_all = |times: usize| async move {
        for _ in 0..times {
            for i in 1..=targets {
                let r = Request::get("/")
                    .header("host", "t.example")
                    .header("x-tenant", i.to_string())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                assert_eq!(send(port, r).await.status, 200);
            }
        }
    };
    send_all(2).await;
    eg.apply(&yaml(true));
    send_all(1).await;
    let want = (3 * targets) as f64;
    let s = until(api, "every redirect counted", |s| total(s) >= want).await;
    for i in 1..=targets {
        assert_eq!(
            s.get(&format!(
                "envgate_tenant_routed_total{{environment=\"shared\",target=\"t{i}\"}}"
            )),
            Some(&3.0),
            "t{i}: {s:?}"
        );
        assert_eq!(s.get(&requests(&format!("t{i}"), "a", 200)), Some(&3.0));
    }
    assert_eq!(
        s.get("envgate_tenant_decisions_total{decision=\"routed\",environment=\"shared\"}"),
        Some(&want)
    );
}

// ---------------------------------------------------------------------------------------
// Status codes past the inline rows.
// ---------------------------------------------------------------------------------------

/// A node that answers with any status code it is asked for (`/code/NNN`), keep-alive.
async fn code_node() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let code = head
                        .split(' ')
                        .nth(1)
                        .and_then(|p| p.strip_prefix("/code/"))
                        .and_then(|p| p.split('?').next())
                        .unwrap_or("200")
                        .to_string();
                    let answer = format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok");
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One node answers with 37 distinct codes (more than the 4 a slot holds inline), from
/// two workers, across a reload that moves the slots: every (code) counted exactly, none
/// lost, none twice. Codes outside 100-599 share one series, `other`, so one misbehaving
/// node cannot mint hundreds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_status_codes_from_one_node_are_counted_exactly() {
    let node = code_node().await;
    let (f1, f2) = (code_node().await, code_node().await);
    let api = free_port();
    let codes: Vec<u16> = vec![
        200, 201, 202, 203, 206, 207, 208, 226, 400, 401, 402, 403, 404, 405, 406, 409, 410, 418,
        421, 422, 425, 429, 451, 500, 501, 502, 503, 504, 505, 507, 508, 510, 511, 599, 600, 799,
        999,
    ];
    let yaml = |front: bool| {
        let mut t = Topo::new()
            .defaults(&format!("{HEALTH}, passive: {{ consecutive_failures: 0 }}"))
            .node("c", node);
        if front {
            t = t
                .node("f1", f1)
                .node("f2", f2)
                .env("front", &["front.example"], "nodes: [f1, f2]");
        }
        t.env("blue", &["company.com"], "nodes: [c]").yaml() + &control(api)
    };
    let eg = Envgate::start_with(&yaml(false), 2);
    let port = eg.port("http");
    let run = |codes: Vec<u16>| async move {
        let mut tasks = Vec::new();
        for conn in 0..2 {
            let codes = codes.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = connect::<Full<Bytes>>(port).await;
                for c in codes {
                    let r = get_on(&mut tx, "company.com", &format!("/code/{c}?conn={conn}")).await;
                    assert_eq!(r.status.as_u16(), c);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    run(codes.clone()).await;
    eg.apply(&yaml(true));
    run(codes.clone()).await;
    let want = (4 * codes.len()) as f64;
    let s = until(api, "every answer counted", |s| total(s) >= want).await;
    let (text, _) = scrape(api).await;
    // Codes outside 100-599 share one series, `other`: a node cannot mint hundreds.
    let usual: Vec<u16> = codes.iter().copied().filter(|c| *c <= 599).collect();
    for c in &usual {
        assert_eq!(s.get(&requests("blue", "c", *c)), Some(&4.0), "{c}\n{text}");
    }
    let other = "envgate_requests_total{code=\"other\",environment=\"blue\",node=\"c\"}";
    assert_eq!(
        s.get(other),
        Some(&(4.0 * (codes.len() - usual.len()) as f64)),
        "{text}"
    );
    assert_eq!(total(&s), want, "{text}");
    let series = text
        .lines()
        .filter(|l| l.starts_with("envgate_requests_total{"))
        .count();
    assert_eq!(
        series,
        usual.len() + 1,
        "one series per usual code, one for the rest"
    );
}

// ---------------------------------------------------------------------------------------
// Retries and failovers.
// ---------------------------------------------------------------------------------------

/// Three nodes: one resets every request, one never answers (response_header timeout),
/// one serves. Every request succeeds on the live one; each failed attempt is one
/// failover of the right reason; no request is counted under a failed node; the log has
/// the attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_are_counted_by_reason_and_requests_under_the_node_that_answered() {
    let live = Upstream::start("live").await;
    let breaker = Breaker::start().await;
    let hang = RawNode::start(Vec::new(), After::Hang).await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(&format!("{HEALTH}, timeouts: {{ response_header: 300ms }}, retries: 2, retry_budget: {{ percent: 100, min_retries: 1000 }}, passive: {{ consecutive_failures: 0 }}"))
        .node("live", live.addr)
        .node("breaker", breaker.addr)
        .node("hang", hang.addr)
        .env("blue", &["company.com"], "nodes: [breaker, hang, live]")
        .yaml()
        + &control(api);
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let n = 9;
    for i in 0..n {
        let r = get(port, "company.com", &format!("/f/{i}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.node(), "live");
    }
    let s = until(api, "all counted", |s| total(s) >= n as f64).await;
    let (text, _) = scrape(api).await;
    assert_eq!(
        s.get(&requests("blue", "live", 200)),
        Some(&(n as f64)),
        "{text}"
    );
    assert_eq!(total(&s), n as f64, "{text}");
    let reason =
        |r: &str| s[&format!("envgate_failovers_total{{environment=\"blue\",reason=\"{r}\"}}")];
    assert!(breaker.requests() > 0 && hang.requests() > 0);
    assert_eq!(reason("reset"), breaker.requests() as f64, "{text}");
    assert_eq!(reason("timeout"), hang.requests() as f64, "{text}");
    assert_eq!(reason("connect_failed") + reason("local_resources"), 0.0);
    let lines = log_lines(&eg, n).await;
    assert_eq!(lines.len(), n);
    let attempts: usize = lines
        .iter()
        .map(|l| {
            l.split(" attempts=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        attempts,
        n + breaker.requests() + hang.requests(),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.contains(" node=live ")), "{lines:?}");
}

// ---------------------------------------------------------------------------------------
// Tunnels.
// ---------------------------------------------------------------------------------------

/// A node that answers CONNECT with 200, then echoes.
async fn connect_echo_node() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                if s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                if s.write_all(&buf[end..]).await.is_err() {
                    return;
                }
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// An `Upgrade: echo` tunnel and a CONNECT tunnel: each one exchange, counted when it
/// closes (101 and 200 under their node), its bytes both ways in the metrics and the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_one_exchange_each_with_their_bytes() {
    let a = Upstream::start("a").await;
    let c = connect_echo_node().await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .node("c", c)
        .env("blue", &["company.com"], "nodes: [a], upgrades: [echo]")
        .env("tun", &["tun.example"], "nodes: [c], allow_connect: true")
        .yaml()
        + &control(api);
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    for (req, status, key) in [
        (
            &b"GET /ws HTTP/1.1\r\nHost: company.com\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"[..],
            "101",
            requests("blue", "a", 101),
        ),
        (
            b"CONNECT tun.example:443 HTTP/1.1\r\nHost: tun.example:443\r\n\r\n",
            "200",
            requests("tun", "c", 200),
        ),
    ] {
        let mut s = raw_conn(port).await;
        s.write_all(req).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        s.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(BOUND, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"hello");
        // Open: not counted yet.
        let (_, m) = scrape(api).await;
        assert_eq!(m.get(&key), None);
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert!(closes_within(&mut s, BOUND, &mut rest).await);
    }
    let s = until(api, "both tunnels counted", |s| total(s) >= 2.0).await;
    assert_eq!(s.get(&requests("blue", "a", 101)), Some(&1.0), "{s:?}");
    assert_eq!(s.get(&requests("tun", "c", 200)), Some(&1.0), "{s:?}");
    for env in ["blue", "tun"] {
        assert_eq!(
            s[&format!("envgate_request_bytes_total{{environment=\"{env}\"}}")],
            5.0
        );
        assert_eq!(
            s[&format!("envgate_response_bytes_total{{environment=\"{env}\"}}")],
            5.0
        );
    }
    let lines = log_lines(&eg, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(l.contains(" in=5 out=5 "), "{l}");
        assert!(!l.ends_with(" cut"), "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"CONNECT tun.example:443 tun.example:443 HTTP/1.1\" 200 env=tun")),
        "{lines:?}"
    );
    in_flight(api, "blue", 0.0).await;
    in_flight(api, "tun", 0.0).await;
}

/// A chunked upload echoed back chunked: request and response bytes exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_both_ways_count_their_bytes() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api);
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let chunk = "y".repeat(1000);
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: company.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3e8\r\n{chunk}\r\n3e8\r\n{chunk}\r\n3e8\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw(port, req.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let s = until(api, "counted", |s| total(s) >= 1.0).await;
    assert_eq!(
        s["envgate_request_bytes_total{environment=\"blue\"}"],
        3000.0
    );
    assert_eq!(
        s["envgate_response_bytes_total{environment=\"blue\"}"],
        3000.0
    );
    let lines = log_lines(&eg, 1).await;
    assert!(lines[0].contains(" in=3000 out=3000 "), "{}", lines[0]);
}

// ---------------------------------------------------------------------------------------
// Reloads with exchanges in flight.
// ---------------------------------------------------------------------------------------

/// An exchange that began before a reload which moved every index (a new environment and
/// a new node first) completes after the worker moved on: it is counted by name, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_across_a_reload_is_counted_by_name() {
    let (a, z) = (Upstream::start("a").await, Upstream::start("z").await);
    let api = free_port();
    let gen1 = Topo::new()
        .defaults(HEALTH)
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api);
    let gen2 = Topo::new()
        .defaults(HEALTH)
        .node("z", z.addr)
        .node("a", a.addr)
        .env("early", &["early.example"], "nodes: [z, a], retries: 0")
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &control(api);
    let eg = Envgate::start_with(&gen1, 1);
    let port = eg.port("http");
    let slow = tokio::spawn(async move { get(port, "company.com", "/slow?ms=1500").await });
    in_flight(api, "blue", 1.0).await;
    eg.apply(&gen2);
    // The worker moves to the new generation with this request...
    let r = get(port, "early.example", "/").await;
    assert_eq!(r.status, 200);
    let early = r.node().to_string();
    // ...and the old exchange completes afterwards.
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(get(port, "company.com", "/").await.status, 200);
    let s = until(api, "three counted", |s| total(s) >= 3.0).await;
    let (text, _) = scrape(api).await;
    assert_eq!(s.get(&requests("blue", "a", 200)), Some(&2.0), "{text}");
    assert_eq!(s.get(&requests("early", &early, 200)), Some(&1.0), "{text}");
    assert_eq!(total(&s), 3.0, "{text}");
    assert_eq!(
        s["envgate_request_duration_seconds_count{environment=\"blue\"}"], 2.0,
        "{text}"
    );
    let lines = log_lines(&eg, 3).await;
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .any(|l| l.contains("/slow?ms=1500") && l.contains(" node=a ")));
}

/// An exchange whose node is removed while it is in flight: its count vanishes with the
/// node, and stays gone when a later reload brings a node of that name back (a series
/// that reappears at 1 is a counter that went backwards, then forwards, to Prometheus).
/// An exchange that completes after its node was removed is not carried by name: a later
/// generation that brings the node back does not bring back its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_on_a_removed_node_does_not_come_back() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let gen = |a_in: &str| {
        let mut t = Topo::new().defaults(HEALTH).node("b", b.addr);
        match a_in {
            "blue" => {
                t = t
                    .node("a", a.addr)
                    .env("blue", &["company.com"], "nodes: [a]")
            }
            "again" => {
                t = t
                    .node("a", a.addr)
                    .env("blue", &["company.com"], "nodes: [b]")
                    .env("again", &["again.example"], "nodes: [a]")
            }
            _ => t = t.env("blue", &["company.com"], "nodes: [b]"),
        }
        t.yaml() + &control(api)
    };
    let eg = Envgate::start_with(&gen("blue"), 1);
    let port = eg.port("http");
    let slow = tokio::spawn(async move { get(port, "company.com", "/slow?ms=1500").await });
    in_flight(api, "blue", 1.0).await;
    eg.apply(&gen("none"));
    assert_eq!(get(port, "company.com", "/").await.node(), "b");
    assert_eq!(slow.await.unwrap().node(), "a");
    let (text, _) = scrape(api).await;
    assert!(!text.contains("node=\"a\""), "{text}");
    eg.apply(&gen("again"));
    assert_eq!(get(port, "again.example", "/").await.node(), "a");
    let s = until(api, "a counted in again", |s| {
        s.get(&requests("again", "a", 200)) == Some(&1.0)
    })
    .await;
    let (text, _) = scrape(api).await;
    assert_eq!(
        s.get(&requests("blue", "a", 200)),
        None,
        "a series of a removed node came back:\n{text}"
    );
}

/// Two workers, traffic (some of it slow, so in flight across reloads) while the topology
/// is reloaded again and again into layouts that move every environment index and counter
/// slot but keep the meaning (blue's /shop reads go to b through read_nodes; its writes and
/// other paths to a): at the end every request is counted exactly once, by name, and no
/// worker panicked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_survive_a_reload_storm_by_name() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    // Extra nodes, each named anew, all at this address (an address is one node's).
    let x = Upstream::start("x").await;
    let api = free_port();
    let shape = |i: usize| -> String {
        let mut t = Topo::new().defaults(HEALTH);
        let extra = format!("x{i}");
        if i % 2 == 0 {
            t = t.node("a", a.addr).node("b", b.addr);
        } else {
            t = t.node(&extra, x.addr).node("b", b.addr).node("a", a.addr);
        }
        let blue = "nodes: [a, b], apps: [ { name: shop, version: 1, path: /shop, nodes: [a], read_nodes: [b] }, { name: rest, version: 1, nodes: [a] } ]";
        let blue_rev = "nodes: [b, a], apps: [ { name: rest, version: 1, nodes: [a] }, { name: shop, version: 1, path: /shop, nodes: [a], read_nodes: [b] } ]";
        match i % 4 {
            0 => t.env("blue", &["company.com"], blue).env(
                "green",
                &["green.example"],
                "nodes: [a, b]",
            ),
            1 => t
                .env(
                    &format!("pre{i}"),
                    &["pre.example"],
                    &format!("nodes: [{extra}, b, a]"),
                )
                .env("green", &["green.example"], "nodes: [b, a]")
                .env("blue", &["company.com"], blue_rev),
            2 => t.env("green", &["green.example"], "nodes: [a, b]").env(
                "blue",
                &["company.com"],
                blue_rev,
            ),
            _ => t
                .env("green", &["green.example"], "nodes: [a, b]")
                .env(&format!("pre{i}"), &["pre.example"], "nodes: [b]")
                .env("blue", &["company.com"], blue),
        }
        .yaml()
            + &control(api)
    };
    let eg = Envgate::start_with(&shape(0), 2);
    let port = eg.port("http");
    let counts = Arc::new([
        AtomicUsize::new(0), // GET /shop -> b
        AtomicUsize::new(0), // POST /shop, GET /slow -> a
        AtomicUsize::new(0), // green
    ]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = connect::<Full<Bytes>>(port).await;
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let (method, host, path, k, node) = match (i + t) % 4 {
                    0 => ("GET", "company.com", format!("/shop/{i}"), 0, Some("b")),
                    1 => ("POST", "company.com", format!("/shop/{i}"), 1, Some("a")),
                    2 => (
                        "GET",
                        "company.com",
                        "/slow?ms=40".to_string(),
                        1,
                        Some("a"),
                    ),
                    _ => ("GET", "green.example", format!("/g/{i}"), 2, None),
                };
                tx.ready().await.unwrap();
                let r = tx
                    .send_request(
                        Request::builder()
                            .method(method)
                            .uri(path)
                            .header("host", host)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                if let Some(n) = node {
                    assert_eq!(r.headers()["x-node"], n);
                }
                r.into_body().collect().await.unwrap();
                counts[k].fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for i in 1..=24 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        eg.apply(&shape(i));
    }
    eg.apply(&shape(0));
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    // Each worker moves to the last generation with its next request.
    for _ in 0..8 {
        assert_eq!(get(port, "green.example", "/last").await.status, 200);
        counts[2].fetch_add(1, Ordering::SeqCst);
    }
    let [shop_reads, to_a, green] = [0, 1, 2].map(|k| counts[k].load(Ordering::SeqCst) as f64);
    let all = shop_reads + to_a + green;
    let s = until(api, "every request counted", |s| total(s) >= all).await;
    let (text, _) = scrape(api).await;
    assert_eq!(
        s.get(&requests("blue", "b", 200)),
        Some(&shop_reads),
        "{text}"
    );
    assert_eq!(s.get(&requests("blue", "a", 200)), Some(&to_a), "{text}");
    assert_eq!(
        sum(&s, "envgate_requests_total", &["environment=\"green\""]),
        green,
        "{text}"
    );
    assert_eq!(total(&s), all, "{text}");
    assert_eq!(
        s["envgate_request_duration_seconds_count{environment=\"blue\"}"],
        shop_reads + to_a,
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// The access log: hostile bytes, one line each.
// ---------------------------------------------------------------------------------------

/// Requests with quotes, backslashes, tabs and bytes past ASCII in the path, the query,
/// the Host and X-Request-Id (and a huge Host and id): every line stays one line, the text
/// format has only its own quotes and no raw byte past ASCII, the JSON format parses and
/// gives the bytes back. (hyper itself refuses some of these heads, `"` or bytes past ASCII
/// in the query for one, with its own bodiless 400: those never reach envgate and have no
/// line, nor a count.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_stay_inside_one_line_in_both_formats() {
    for format in [Format::Text, Format::Json] {
        let a = Upstream::start("a").await;
        let yaml = Topo::new()
            .defaults(HEALTH)
            .node("a", a.addr)
            .env("blue", &["company.com"], "nodes: [a]")
            .yaml();
        let eg = Envgate::start_logged(&yaml, 1, format);
        let port = eg.port("http");
        let big = "h".repeat(6000);
        let big_id = "i".repeat(20000);
        let cases: Vec<Vec<u8>> = vec![
            b"GET /m1/a\"b HTTP/1.1\r\nHost: company.com\r\n".to_vec(),
            b"GET /m2/{x}|\\y HTTP/1.1\r\nHost: company.com\r\n".to_vec(),
            b"GET /m3?q=\"x\"\\y HTTP/1.1\r\nHost: company.com\r\n".to_vec(),
            b"GET /m4/\xc3\xa9 HTTP/1.1\r\nHost: company.com\r\n".to_vec(),
            b"GET /m5?q=\xc3\xa9\xff HTTP/1.1\r\nHost: company.com\r\n".to_vec(),
            b"GET /m6?q=%0d%0a%22 HTTP/1.1\r\nHost: evil\"\\host\xff\tx\r\n".to_vec(),
            format!("GET /m7 HTTP/1.1\r\nHost: {big}\r\n").into_bytes(),
            b"GET /m8 HTTP/1.1\r\nHost: company.com\r\nX-Request-Id: a\"b\\c\xff\td\r\n".to_vec(),
            format!("GET /m9 HTTP/1.1\r\nHost: company.com\r\nX-Request-Id: {big_id}\r\n")
                .into_bytes(),
            b"GET /m10 HTTP/1.1\r\nHost: company.com\r\nX-Request-Id: fine-id-10\r\n".to_vec(),
            b"GET /m11 HTTP/1.1\r\nHost: company.com\xc3\xa9\r\n".to_vec(),
        ];
        let mut served = Vec::new();
        let mut refused = 0;
        for (i, case) in cases.iter().enumerate() {
            let mut req = case.clone();
            req.extend_from_slice(b"Connection: close\r\n\r\n");
            let answer = raw(port, &req).await;
            // Every answer has its line: envgate's carry a body or come from the node;
            // hyper's own refusals of a malformed head have `-` for what was not read.
            let status: u16 = answer
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if status == 400 && answer.contains("content-length: 0") {
                refused += 1;
            } else if status != 0 {
                served.push(format!("/m{}", i + 1));
            }
        }
        let lines = log_lines(&eg, served.len() + refused).await;
        assert_eq!(
            lines.len(),
            served.len() + refused,
            "{format:?} {served:?} and {refused} refused\n{lines:#?}"
        );
        let dashes = match format {
            Format::Text => "\"- - - HTTP/1.1\" 400 ",
            Format::Json => "\"method\":\"-\"",
        };
        assert_eq!(
            lines.iter().filter(|l| l.contains(dashes)).count(),
            refused,
            "{lines:#?}"
        );
        // The huge id is replaced; the sane one is kept.
        for l in &lines {
            // Text escapes every byte past ASCII; JSON keeps valid UTF-8 as it is.
            assert!(format == Format::Json || l.is_ascii(), "{l}");
            assert!(!l.chars().any(|c| c.is_control()), "{l}");
            assert!(!l.contains('\r') && !l.contains('\t'), "{l}");
            assert!(!l.contains(&big_id), "the huge request id was logged");
            match format {
                Format::Text => {
                    assert_eq!(l.matches('"').count(), 2, "{l}");
                }
                Format::Json => {
                    let v: serde_json::Value =
                        serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                    let path = v["path"].as_str().unwrap();
                    if path.starts_with("/m3") {
                        assert_eq!(path, "/m3?q=\"x\"\\y");
                    }
                    if path.starts_with("/m6") {
                        assert_eq!(v["host"], "evil\"\\host\u{ff}\tx", "{l}");
                    }
                    if path == "/m10" {
                        assert_eq!(v["request_id"], "fine-id-10", "{l}");
                    }
                }
            }
        }
        for m in &served {
            assert!(
                lines.iter().any(|l| l.contains(&format!("{m} "))
                    || l.contains(&format!("{m}/"))
                    || l.contains(&format!("{m}?"))
                    || l.contains(&format!("{m}\""))),
                "{m} has no line: {lines:#?}"
            );
        }
        drop(eg);
    }
}

// ---------------------------------------------------------------------------------------
// Shutdown.
// ---------------------------------------------------------------------------------------

/// The log writer is stuck on a pipe whose reader never reads (a hung log shipper):
/// shutdown must still end.
/// A log writer stuck on a full pipe at shutdown: envgate still stops (the writer is given
/// a bound, then left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_writer_stuck_on_a_full_pipe_does_not_hang_shutdown() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    use std::os::unix::fs::OpenOptionsExt;
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK
        .open(&fifo)
        .unwrap();
    let yaml = Topo::new()
        .defaults(&format!("{HEALTH}, timeouts: {{ drain: 1s }}"))
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml();
    let eg = Envgate::start_log_to(&yaml, 1, Format::Text, Some(fifo.clone()));
    let port = eg.port("http");
    // About 2,000 lines of 200+ bytes: far more than a pipe holds (64 KiB).
    let tasks: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let mut tx = connect::<Full<Bytes>>(port).await;
                for i in 0..500 {
                    let r = get_on(&mut tx, "company.com", &format!("/fill/{c}/{i}")).await;
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let handle = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        handle.block_on(eg.stop());
        let _ = done_tx.send(());
    });
    let stopped = tokio::task::spawn_blocking(move || {
        let r = done_rx.recv_timeout(Duration::from_secs(15)).is_ok();
        (r, done_rx)
    })
    .await
    .unwrap();
    let (stopped, done_rx) = stopped;
    if !stopped {
        // Unblock the writer so that the test can end, then report.
        let drain = std::thread::spawn(move || {
            use std::io::Read;
            let mut reader = reader;
            let mut buf = [0u8; 65536];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        tokio::task::spawn_blocking(move || done_rx.recv())
            .await
            .unwrap()
            .unwrap();
        drain.join().unwrap();
        panic!("shutdown hung on a log writer stuck on a full pipe (it ended only once the pipe was read)");
    }
}

/// Exchanges still open when the drain bound runs out (a request waiting on a node, an
/// open tunnel) are ended by shutdown: each still has its line in the log.
/// Exchanges cut by shutdown (still open when the drain ends) still have their line: the
/// worker's log buffer is flushed when it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_cut_by_shutdown_still_have_their_line() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults(&format!("{HEALTH}, timeouts: {{ drain: 300ms }}"))
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a], upgrades: [echo]")
        .yaml()
        + &control(api);
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let mut waiting = raw_conn(port).await;
    waiting
        .write_all(b"GET /hang HTTP/1.1\r\nHost: company.com\r\nX-Request-Id: cut-by-stop\r\n\r\n")
        .await
        .unwrap();
    let mut tunnel = raw_conn(port).await;
    tunnel
        .write_all(b"GET /ws HTTP/1.1\r\nHost: company.com\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut tunnel).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    in_flight(api, "blue", 2.0).await;
    let lines = eg.stop_with_log().await;
    drop((waiting, tunnel));
    assert!(
        lines.iter().any(|l| l.contains("id=cut-by-stop")),
        "the exchange waiting on the node has no line: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"GET company.com /ws HTTP/1.1\" 101")),
        "the tunnel has no line: {lines:?}"
    );
}

// ---------------------------------------------------------------------------------------
// What an open tunnel keeps alive.
// ---------------------------------------------------------------------------------------

/// A keep-alive node that answers every request with 200 and counts the connections that
/// carried a request and were then closed by envgate.
async fn close_counting_node() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let count = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut served = false;
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            // Health checks (TCP) carry no request: not counted.
                            if served {
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                        served = true;
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nr")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, closed)
}

/// When a reload removes a node, the worker's idle connections to it close as soon as the
/// worker serves from the new tables ("the pools of nodes that left go with the previous
/// tables"). An open WebSocket of the old generation must not keep them (nor the old
/// topology and counter tables) alive.
/// An open tunnel keeps only its counters, not its generation's connection pools: the idle
/// connection to a node removed by a reload closes while a WebSocket stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_does_not_pin_its_generations_connections() {
    let a = Upstream::start("a").await;
    let (r, closed) = close_counting_node().await;
    let api = free_port();
    let gen = |with_r: bool| {
        let mut t = Topo::new().defaults(HEALTH).node("a", a.addr);
        if with_r {
            t = t.node("r", r).env("red", &["red.example"], "nodes: [r]");
        }
        t.env("blue", &["company.com"], "nodes: [a], upgrades: [echo]")
            .yaml()
            + &control(api)
    };
    let eg = Envgate::start_with(&gen(true), 1);
    let port = eg.port("http");

    // Without a tunnel: the idle connection to r closes once the worker moved on.
    assert_eq!(get(port, "red.example", "/").await.status, 200);
    eg.apply(&gen(false));
    assert_eq!(get(port, "company.com", "/").await.status, 200);
    assert!(
        eventually(BOUND, || async { closed.load(Ordering::SeqCst) == 1 }).await,
        "baseline: the connection to a removed node is closed"
    );

    // With a WebSocket of the old generation open.
    eg.apply(&gen(true));
    assert_eq!(get(port, "red.example", "/").await.status, 200);
    let mut ws = raw_conn(port).await;
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: company.com\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    eg.apply(&gen(false));
    assert_eq!(get(port, "company.com", "/").await.status, 200);
    let released = eventually(Duration::from_secs(5), || async {
        closed.load(Ordering::SeqCst) == 2
    })
    .await;
    // The tunnel still works; once it closes, the old generation goes.
    ws.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(BOUND, ws.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    drop(ws);
    assert!(
        eventually(BOUND, || async { closed.load(Ordering::SeqCst) == 2 }).await,
        "the old generation's connection never closed"
    );
    assert!(
        released,
        "an open tunnel kept the removed node's idle connection (its whole generation) alive"
    );
}
