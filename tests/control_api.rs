//! The control endpoint over real sockets: liveness and readiness, the topology with its
//! ETag, writes with the bearer token (401 without it, 403 when read-only), 400/412/413/422,
//! dry runs, JSON Patch (drain, canary step, an entry moved in one change), the write-back
//! to the topology file, history, rollback and status.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::Value;
use support::*;

const TOKEN: &str = "s3cret-token";

struct Setup {
    eg: Envgate,
    api: u16,
    a: Upstream,
    b: Upstream,
}

/// blue (node a) on company.com, green (node b) without entries, a 0% canary from blue to
/// green; the control endpoint on its own port, with a token file unless `read_only`.
async fn setup(read_only: bool) -> Setup {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let control = if read_only {
        format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n")
    } else {
        format!(
            "control: {{ bind: \"127.0.0.1:{api}\", token_file: \"{}\" }}\n",
            token.display()
        )
    };
    let yaml = Topo::new()
        .defaults("health: { interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }")
        .node("a", a.addr)
        .node("b", b.addr)
        .env(
            "blue",
            &["company.com"],
            "nodes: [a], canary: { environment: green, weight: 0, header: X-Canary, cookie: c }",
        )
        .env("green", &[], "nodes: [b]")
        .yaml()
        + &control;
    let eg = Envgate::start(&yaml);
    // The token's directory must outlive the test.
    std::mem::forget(dir);
    Setup { eg, api, a, b }
}

fn req(method: Method, path: &str, token: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn json(r: &Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

async fn call(port: u16, method: Method, path: &str, token: Option<&str>, body: &str) -> Reply {
    send(port, req(method, path, token, body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_endpoints_and_conditional_get() {
    let s = setup(false).await;
    let r = call(s.api, Method::GET, "/healthz", None, "").await;
    assert_eq!(r.status, 200);
    assert!(
        eventually(Duration::from_secs(3), || async {
            call(s.api, Method::GET, "/ready", None, "").await.status == 200
        })
        .await
    );
    let r = call(s.api, Method::GET, "/api/v1/topology", None, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), &*s.eg.server().control().document());
    let tag = r.headers["etag"].to_str().unwrap().to_string();
    let mut conditional = req(Method::GET, "/api/v1/topology", None, "");
    conditional
        .headers_mut()
        .insert("if-none-match", tag.parse().unwrap());
    assert_eq!(send(s.api, conditional).await.status, 304);

    let st = json(&call(s.api, Method::GET, "/api/v1/status", None, "").await);
    assert_eq!(st["generation"], 1);
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(nodes
        .iter()
        .all(|n| n["health"] == "up" || n["health"] == "unknown"));
    assert_eq!(st["environments"][0]["canary"]["weight"], 0.0);
    assert_eq!(st["source"], "start");
    // Each node shows its last check once one ran.
    let mut checked = false;
    for _ in 0..200 {
        let st = json(&call(s.api, Method::GET, "/api/v1/status", None, "").await);
        if st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["last_check"]["result"] == "passed")
        {
            let c = &st["nodes"][0]["last_check"];
            assert_eq!(c["detail"], "check passed", "{c}");
            assert!(c["time"].as_str().unwrap().ends_with('Z'), "{c}");
            checked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(checked, "no node showed a passed check");
    assert_eq!(
        call(s.api, Method::GET, "/nope", None, "").await.status,
        404
    );
    assert_eq!(
        call(s.api, Method::DELETE, "/api/v1/topology", None, "")
            .await
            .status,
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_a_valid_document() {
    let s = setup(false).await;
    let port = s.eg.port("http");
    let doc = s.eg.server().control().document().to_string();
    // The same document with company.com moved from blue to green.
    let moved = doc
        .replace(
            &format!("blue: {{ entries: [\"company.com:{port}\"],"),
            "blue: { entries: [],",
        )
        .replace(
            "green: { entries: [],",
            &format!("green: {{ entries: [\"company.com:{port}\"],"),
        );
    assert_ne!(moved, doc);

    for token in [None, Some("wrong"), Some("s3cret-token-and-more")] {
        let r = call(s.api, Method::PUT, "/api/v1/topology", token, &moved).await;
        assert_eq!(r.status, 401, "{token:?}");
        assert!(r.headers.contains_key("www-authenticate"));
    }
    // Not a document: 400.
    let r = call(
        s.api,
        Method::PUT,
        "/api/v1/topology",
        Some(TOKEN),
        "version: [",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Invalid: 422 with every problem and its path.
    let bad = moved.replace("nodes: [b]", "nodes: [ghost]");
    let r = call(s.api, Method::PUT, "/api/v1/topology", Some(TOKEN), &bad).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let errs = json(&r)["errors"].as_array().unwrap().clone();
    assert!(
        errs.iter()
            .any(|e| e["path"] == "environments.green.nodes[0]" && e["kind"] == "reference"),
        "{errs:?}"
    );
    // A dry run: the changes, nothing applied.
    let r = call(
        s.api,
        Method::PUT,
        "/api/v1/topology?dry_run=true",
        Some(TOKEN),
        &moved,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = json(&r);
    assert_eq!(j["dry_run"], true);
    assert_eq!(
        j["changes"][0],
        format!("entry company.com:{port}: blue -> green")
    );
    assert_eq!(get(port, "company.com", "/").await.node(), "a");
    assert_eq!(s.eg.server().control().topology().generation, 1);

    // Applied: routing follows, the file holds the document, and the watch would find
    // nothing new in it.
    let r = call(s.api, Method::PUT, "/api/v1/topology", Some(TOKEN), &moved).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["generation"], 2);
    assert_eq!(get(port, "company.com", "/").await.node(), "b");
    let file = std::fs::read_to_string(s.eg.dir.path().join("envgate.yaml")).unwrap();
    assert_eq!(file, moved);

    // A stale If-Match: 412; the current ETag: applied.
    let mut stale = req(Method::PUT, "/api/v1/topology", Some(TOKEN), &doc);
    stale
        .headers_mut()
        .insert("if-match", "\"g1-0000000000000000\"".parse().unwrap());
    assert_eq!(send(s.api, stale).await.status, 412);
    let tag = call(s.api, Method::GET, "/api/v1/topology", None, "")
        .await
        .headers["etag"]
        .clone();
    let mut fresh = req(Method::PUT, "/api/v1/topology", Some(TOKEN), &doc);
    fresh.headers_mut().insert("if-match", tag);
    assert_eq!(send(s.api, fresh).await.status, 200);
    assert_eq!(get(port, "company.com", "/").await.node(), "a");

    // Over the body limit: 413.
    let huge = "#".repeat(17 * 1024 * 1024);
    let r = call(s.api, Method::PUT, "/api/v1/topology", Some(TOKEN), &huge).await;
    assert_eq!(r.status, 413);
    let _ = (&s.a, &s.b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patches_drain_step_the_canary_and_roll_back() {
    let s = setup(false).await;
    let port = s.eg.port("http");
    let api = s.api;
    let patch =
        move |ops: &'static str| call(api, Method::PATCH, "/api/v1/topology", Some(TOKEN), ops);

    // A canary step: 0% -> 100%.
    let r =
        patch(r#"[{"op":"replace","path":"/environments/blue/canary/weight","value":100}]"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["changes"][0], "canary blue: 0% -> 100%");
    assert_eq!(get(port, "company.com", "/").await.node(), "b");

    // Drain b: the canary has no usable node, so its requests stay in blue.
    let r = patch(r#"[{"op":"add","path":"/nodes/b/drain","value":true}]"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["changes"][0], "node b: drained");
    for _ in 0..3 {
        assert_eq!(get(port, "company.com", "/").await.node(), "a");
    }
    // A patch that breaks the document: 422, nothing changes.
    let r =
        patch(r#"[{"op":"replace","path":"/environments/green/nodes","value":["ghost"]}]"#).await;
    assert_eq!(r.status, 422, "{}", r.text());
    // A patch that does not apply (no such path): 422 naming the operation.
    let r = patch(r#"[{"op":"replace","path":"/environments/red/nodes","value":[]}]"#).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(json(&r)["errors"][0]["kind"], "patch");
    // Not a patch: 400.
    assert_eq!(patch(r#"{"op":"add"}"#).await.status, 400);

    // History: start, two applied patches, one refused document.
    let h = json(&call(s.api, Method::GET, "/api/v1/history", None, "").await);
    let seen: Vec<(u64, String, String)> = h["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["generation"].as_u64().unwrap(),
                r["source"].as_str().unwrap().to_string(),
                r["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "start".into(), "applied".into()),
            (2, "api".into(), "applied".into()),
            (3, "api".into(), "applied".into()),
            (3, "api".into(), "rejected".into()),
        ]
    );
    // Back to generation 1: the canary at 0% and b in service again.
    let r = call(
        s.api,
        Method::POST,
        "/api/v1/rollback?to=1",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(json(&r)["generation"], 4);
    let t = s.eg.server().control().topology();
    assert!(!t.nodes.iter().any(|n| n.state.is_drained()));
    assert_eq!(t.environments[0].canary.as_ref().unwrap().threshold, 0);
    assert_eq!(
        call(
            s.api,
            Method::POST,
            "/api/v1/rollback?to=99",
            Some(TOKEN),
            ""
        )
        .await
        .status,
        404
    );
    assert_eq!(
        call(s.api, Method::POST, "/api/v1/rollback?to=1", None, "")
            .await
            .status,
        401
    );
    let last = s.eg.server().control().history().pop().unwrap();
    assert_eq!(last.source, envgate::control::Source::Rollback);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_the_endpoint_is_read_only() {
    let s = setup(true).await;
    let doc = s.eg.server().control().document().to_string();
    let r = call(s.api, Method::PUT, "/api/v1/topology", Some(TOKEN), &doc).await;
    assert_eq!(r.status, 403);
    assert_eq!(json(&r)["error"], "read_only");
    assert_eq!(
        call(s.api, Method::GET, "/api/v1/topology", None, "")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_where_requests_go() {
    let nodes = [
        Upstream::start("p1").await,
        Upstream::start("p2").await,
        Upstream::start("c1").await,
        Upstream::start("t1").await,
    ];
    let api = free_port();
    let mut topo = Topo::new().defaults("health: { interval: 100ms, timeout: 100ms }");
    for n in &nodes {
        topo = topo.node(&n.name, n.addr);
    }
    let yaml = topo
        .env(
            "production",
            &["company.com"],
            "nodes: [p1, p2], tenants: { key: { header: X-Tenant-Id }, ranges: [ { from: 1001, to: 1001, environment: acme } ] }, canary: { environment: canary, weight: 50, cookie: envgate_canary }",
        )
        .env("canary", &[], "nodes: [c1]")
        .env("acme", &[], "nodes: [t1]")
        .yaml()
        .replace("  p2: {", "  p2: { drain: true,")
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    assert!(
        eventually(Duration::from_secs(3), || async {
            call(api, Method::GET, "/ready", None, "").await.status == 200
        })
        .await
    );
    let explain = |q: String| async move {
        json(
            &call(
                api,
                Method::GET,
                &format!("/api/v1/explain?host=company.com&port={port}&{q}"),
                None,
                "",
            )
            .await,
        )
    };
    for (query, header, env, node) in [
        (
            "header=X-Tenant-Id:1001",
            ("x-tenant-id", "1001"),
            "acme",
            "t1",
        ),
        (
            "cookie=envgate_canary%3D10",
            ("cookie", "envgate_canary=10"),
            "canary",
            "c1",
        ),
        (
            "cookie=envgate_canary%3D9000",
            ("cookie", "envgate_canary=9000"),
            "production",
            "p1",
        ),
    ] {
        let e = explain(format!("path=/x&{query}")).await;
        assert_eq!(e["environment"], env, "{e}");
        assert_eq!(e["next"], node, "{e}");
        for _ in 0..3 {
            let r = send(
                port,
                Request::get("/x")
                    .header("host", "company.com")
                    .header(header.0, header.1)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
            assert_eq!(r.node(), node, "{query}");
        }
    }
    let e = explain("path=/x&cookie=envgate_canary%3D9000".into()).await;
    let members = e["candidates"][0].as_array().unwrap();
    let p2 = members.iter().find(|m| m["node"] == "p2").unwrap();
    assert_eq!(
        (p2["drained"].as_bool(), p2["usable"].as_bool()),
        (Some(true), Some(false))
    );
    assert!(
        e["explanation"]
            .as_str()
            .unwrap()
            .contains("canary bucket 9000 (cookie) >= 5000: stays"),
        "{e}"
    );
    let e = explain("path=/x&header=X-Tenant-Id:1001".into()).await;
    assert!(
        e["explanation"]
            .as_str()
            .unwrap()
            .contains("tenant 1001 in range 1001-1001 -> acme"),
        "{e}"
    );
    let e = json(
        &call(
            api,
            Method::GET,
            "/api/v1/explain?host=nowhere.org&path=/",
            None,
            "",
        )
        .await,
    );
    assert_eq!(
        (e["answer"].as_u64(), e["error"].as_str()),
        (Some(404), Some("no_route"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(true).await;
    let mut held = Vec::new();
    for _ in 0..envgate::control::api::MAX_CONNECTIONS {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", s.api))
                .await
                .unwrap(),
        );
    }
    // Let the endpoint take every one of them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(("127.0.0.1", s.api))
        .await
        .unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), extra.read(&mut buf)).await;
    assert!(early.is_err(), "answered beyond the connection cap");
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
        .await
        .expect("not answered once a slot was free")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}
