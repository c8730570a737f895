//! The status page (`GET /` on the control endpoint), loaded by a real browser: headless
//! Chromium (Debian's `chromium`; `.ci/run` installs it) renders it from `/api/v1/status`,
//! shows the environments and nodes, and a node that goes down turns red.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_topology_and_a_node_going_down() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let yaml = Topo::new()
        .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
        .node("a", a.addr)
        .node("b", b.addr)
        .env(
            "production",
            &["company.com"],
            "nodes: [a, b], apps: [ { name: shop, version: \"1.4.2\", path: / } ], canary: { environment: preview, weight: 5, cookie: c, header: X-Canary }",
        )
        .env("preview", &["preview.company.com"], "nodes: [b]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(&yaml, 2);

    // The page itself: HTML, self-contained (nothing fetched from elsewhere).
    let r = get(api, "localhost", "/").await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    let html = r.text();
    assert!(html.contains("/api/v1/status"), "{html}");
    assert!(!html.contains("://"), "an external reference: {html}");

    // Both nodes up first (the page shows what status says).
    let status = |want_b: &'static str| async move {
        for _ in 0..200 {
            let r = get(api, "localhost", "/api/v1/status").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let health = |n: &str| {
                v["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["name"] == n)
                    .map(|x| x["health"].as_str().unwrap().to_string())
            };
            if health("a").as_deref() == Some("up") && health("b").as_deref() == Some(want_b) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node b never {want_b}");
    };
    status("up").await;
    // Two requests the override sends to the canary, six it keeps: the page shows the
    // canary's live share, 25%.
    let port = eg.port("http");
    for i in 0..8 {
        let arm = if i < 2 { "always" } else { "never" };
        let req = http::Request::builder()
            .uri("/")
            .header("host", "company.com")
            .header("x-canary", arm)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert_eq!(send(port, req).await.status, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            let r = get(api, "localhost", "/api/v1/status").await;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            let c = &v["environments"][0]["canary"]["requests"];
            c["primary"] == 6 && c["canary"] == 2
        })
        .await
    );
    let url = format!("http://127.0.0.1:{api}/");
    let Some(dom) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || rendered(&url)
    })
    .await
    .unwrap() else {
        eg.stop().await;
        return;
    };
    assert!(dom.contains("data-environment=\"production\""), "{dom}");
    assert!(dom.contains("data-environment=\"preview\""), "{dom}");
    assert!(dom.contains("shop 1.4.2 at /"), "{dom}");
    // The first refresh has no window yet (the share since start); later ones look at the
    // last 30 s, which hold the same eight requests.
    assert!(
        dom.contains("5% → preview · live 25.0% since start (8 requests)")
            || dom.contains("5% → preview · live 25.0% in the last 30 s (8 requests)"),
        "{dom}"
    );
    assert!(dom.contains("data-node=\"a\" data-health=\"up\""), "{dom}");
    assert!(dom.contains("data-node=\"b\" data-health=\"up\""), "{dom}");
    assert!(dom.contains("generation 1 (start)"), "{dom}");

    // b fails its checks: the page shows it down, its row marked.
    b.set_healthy(false);
    status("down").await;
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap()
        .unwrap();
    assert!(
        dom.contains("<tr class=\"bad\" data-node=\"b\" data-health=\"down\">"),
        "{dom}"
    );
    assert!(dom.contains("data-node=\"a\" data-health=\"up\""), "{dom}");
    assert!(dom.contains("pill down"), "{dom}");
    eg.stop().await;
}
