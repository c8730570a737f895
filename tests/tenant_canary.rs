//! Tenant ranges, canary splits and read nodes through a running envgate: ids at the
//! edges of each range from each key source, missing and malformed ids, the canary's
//! share over fresh clients, cookie stickiness (across instances too), the override
//! header, one-way moves while the weight changes, and reads sent to read nodes.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

/// The bucket a response stores in the canary cookie, if it sets one.
fn set_bucket(r: &Reply) -> Option<u16> {
    let v = r.headers.get("set-cookie")?.to_str().unwrap();
    let rest = v.strip_prefix("envgate_canary=")?;
    assert!(
        rest.contains("; Path=/") && rest.contains("HttpOnly") && rest.contains("SameSite=Lax"),
        "{v}"
    );
    rest.split(';').next()?.parse().ok()
}

/// `count` GETs over `conns` keep-alive connections; `make(i)` builds request `i`.
async fn fetch_all(
    port: u16,
    conns: usize,
    count: usize,
    make: Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync>,
) -> Vec<Reply> {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = connect(port).await;
            let mut out = Vec::new();
            for i in (c..count).step_by(conns) {
                tx.ready().await.unwrap();
                let resp = tx.send_request(make(i)).await.unwrap();
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                out.push((
                    i,
                    Reply {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                    },
                ));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

fn get_req(host: &str, path: &str, headers: &[(&str, String)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

async fn get_with(port: u16, host: &str, path: &str, headers: &[(&str, String)]) -> Reply {
    send(port, get_req(host, path, headers)).await
}

const RANGES: &str =
    "ranges: [ { from: 1001, to: 1001, environment: acme }, { from: 2000, to: 2999, environment: big } ]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_ids_at_range_edges_from_each_key_source() {
    let (shared, acme, big) = (
        Upstream::start("shared").await,
        Upstream::start("acme").await,
        Upstream::start("big").await,
    );
    let yaml = Topo::new()
        .node("shared", shared.addr)
        .node("acme", acme.addr)
        .node("big", big.addr)
        .env(
            "by-header",
            &["h.company.com"],
            &format!("nodes: [shared], tenants: {{ key: {{ header: X-Tenant-Id }}, {RANGES} }}"),
        )
        .env(
            "by-label",
            &["*.l.company.com"],
            &format!("nodes: [shared], tenants: {{ key: {{ host_label: 0 }}, {RANGES} }}"),
        )
        .env(
            "by-segment",
            &["p.company.com"],
            &format!("nodes: [shared], tenants: {{ key: {{ path_segment: 2 }}, {RANGES} }}"),
        )
        .env(
            "by-query",
            &["q.company.com"],
            &format!("nodes: [shared], tenants: {{ key: {{ query: tenant }}, {RANGES} }}"),
        )
        .env("acme", &[], "nodes: [acme]")
        .env("big", &[], "nodes: [big]")
        .yaml();
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    let cases = [
        (1000u64, "shared"),
        (1001, "acme"),
        (1002, "shared"),
        (1999, "shared"),
        (2000, "big"),
        (2001, "big"),
        (2999, "big"),
        (3000, "shared"),
        (0, "shared"),
        (u64::MAX, "shared"),
    ];
    for (id, node) in cases {
        let header = get_with(
            port,
            "h.company.com",
            "/x",
            &[("x-tenant-id", id.to_string())],
        )
        .await;
        let label = get(port, &format!("t{id}.l.company.com"), "/x").await;
        let segment = get(
            port,
            "p.company.com",
            &format!("/tenants/tenant-{id}/orders"),
        )
        .await;
        let query = get(
            port,
            "q.company.com",
            &format!("/orders?a=1&tenant={id}&b=2"),
        )
        .await;
        for (source, r) in [
            ("header", &header),
            ("host label", &label),
            ("path segment", &segment),
            ("query", &query),
        ] {
            assert_eq!(r.status, 200, "tenant {id} by {source}: {}", r.text());
            assert_eq!(r.node(), node, "tenant {id} by {source}");
        }
    }
    // The node sees the request as sent (the path keeps its tenant segment).
    let r = get(port, "p.company.com", "/tenants/1001/orders").await;
    assert_eq!(r.node(), "acme");
    assert_eq!(r.headers["x-target"], "/tenants/1001/orders");
    // A query value may be percent-encoded.
    assert_eq!(
        get(port, "q.company.com", "/?tenant=%32%30%30%30")
            .await
            .node(),
        "big"
    );
    assert_eq!(acme.hits(), 4 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_ids_stay_or_get_400_when_required() {
    let (shared, acme) = (
        Upstream::start("shared").await,
        Upstream::start("acme").await,
    );
    let rule = "ranges: [ { from: 1, to: 100, environment: acme } ]";
    let yaml = Topo::new()
        .node("shared", shared.addr)
        .node("acme", acme.addr)
        .env(
            "optional",
            &["opt.company.com"],
            &format!("nodes: [shared], tenants: {{ key: {{ header: X-Tenant-Id }}, {rule} }}"),
        )
        .env(
            "required",
            &["req.company.com"],
            &format!(
                "nodes: [shared], tenants: {{ key: {{ header: X-Tenant-Id }}, required: true, {rule} }}"
            ),
        )
        .env(
            "required-query",
            &["rq.company.com"],
            &format!("nodes: [shared], tenants: {{ key: {{ query: t }}, required: true, {rule} }}"),
        )
        .env("acme", &[], "nodes: [acme]")
        .yaml();
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let id = |v: &str| vec![("x-tenant-id", v.to_string())];
    for (what, headers, required_answer) in [
        ("missing", vec![], r#"{"error":"tenant_required"}"#),
        ("empty", id(""), r#"{"error":"tenant_required"}"#),
        ("not a number", id("acme"), r#"{"error":"bad_tenant"}"#),
        ("negative", id("-5"), r#"{"error":"bad_tenant"}"#),
        (
            "overflow",
            id("18446744073709551616"),
            r#"{"error":"bad_tenant"}"#,
        ),
    ] {
        let r = get_with(port, "opt.company.com", "/", &headers).await;
        assert_eq!((r.status.as_u16(), r.node()), (200, "shared"), "{what}");
        let r = get_with(port, "req.company.com", "/", &headers).await;
        assert_eq!(r.status, 400, "{what}");
        assert_eq!(r.text(), required_answer, "{what}");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // The same header twice with different values is ambiguous: malformed.
    let r = get_with(
        port,
        "req.company.com",
        "/",
        &[
            ("x-tenant-id", "5".to_string()),
            ("x-tenant-id", "500".to_string()),
        ],
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (400, r#"{"error":"bad_tenant"}"#)
    );
    // So is a query parameter given twice.
    let r = get(port, "rq.company.com", "/?t=5&t=6").await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (400, r#"{"error":"bad_tenant"}"#)
    );
    assert_eq!(
        get(port, "rq.company.com", "/?t=5&t=5").await.node(),
        "acme"
    );
    // A valid id outside every range stays, required or not.
    let r = get_with(port, "req.company.com", "/", &id("101")).await;
    assert_eq!(r.node(), "shared");
    let r = get_with(port, "req.company.com", "/", &id("100")).await;
    assert_eq!(r.node(), "acme");
    assert_eq!(acme.hits(), 2);

    // The 400 is an answer to a well-framed request: the connection carries on.
    let mut tx = connect::<Full<Bytes>>(port).await;
    for (v, status) in [("x", 400), ("7", 200)] {
        tx.ready().await.unwrap();
        let resp = tx
            .send_request(get_req("req.company.com", "/", &id(v)))
            .await
            .unwrap();
        assert_eq!(resp.status(), status);
        resp.into_body().collect().await.unwrap();
    }
}

fn canary_topo(shop: &Upstream, canary: &Upstream, weight: &str) -> String {
    Topo::new()
        .node("shop-1", shop.addr)
        .node("canary-1", canary.addr)
        .env(
            "production",
            &["company.com"],
            &format!(
                "nodes: [shop-1], canary: {{ environment: production-canary, weight: {weight}, header: X-Canary, cookie: envgate_canary }}"
            ),
        )
        .env(
            "production-canary",
            &[],
            "nodes: [canary-1], apps: [ { name: shop, version: \"1.2.0-rc.1\", path: /shop } ]",
        )
        .yaml()
}

/// Sends `n` cookie-less requests; checks that each response sets a bucket and went to
/// the canary exactly when that bucket is below `threshold`; returns the canary count.
async fn fresh_clients(port: u16, n: usize, threshold: u16) -> usize {
    let replies = fetch_all(
        port,
        8,
        n,
        Arc::new(|_| get_req("company.com", "/shop/cart", &[])),
    )
    .await;
    let mut on_canary = 0;
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        let bucket = set_bucket(r).expect("a fresh client gets a bucket");
        let canary = r.node() == "canary-1";
        assert_eq!(
            canary,
            bucket < threshold,
            "bucket {bucket} went to {}",
            r.node()
        );
        on_canary += canary as usize;
    }
    on_canary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_share_over_fresh_clients_is_the_weight() {
    let (shop, canary) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
    );
    let eg = Envgate::start_with(&canary_topo(&shop, &canary, "5"), 2);
    let port = eg.port("http");
    // 10,000 draws at p = 5%: sd = 21.8; a band of +-5 sd.
    let n = fresh_clients(port, 10_000, 500).await;
    assert!((391..=609).contains(&n), "5%: {n} of 10,000 on the canary");
    // 0.5% is a real first step: p = 0.5%, sd = 7.05.
    eg.apply(&canary_topo(&shop, &canary, "0.5"));
    let n = fresh_clients(port, 10_000, 50).await;
    assert!((15..=85).contains(&n), "0.5%: {n} of 10,000 on the canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_sticks_on_every_instance_and_the_header_overrides_it() {
    let (shop, canary) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
    );
    let yaml = canary_topo(&shop, &canary, "30");
    let (a, b) = (Envgate::start_with(&yaml, 2), Envgate::start(&yaml));
    let (pa, pb) = (a.port("http"), b.port("http"));
    // Twenty users get a bucket from instance A; each then stays on its side on A and on
    // B, and neither sets the cookie again.
    for _ in 0..20 {
        let first = get(pa, "company.com", "/shop").await;
        let bucket = set_bucket(&first).unwrap();
        let side = first.node().to_string();
        assert_eq!(side == "canary-1", bucket < 3000);
        let cookie = vec![("cookie", format!("session=x; envgate_canary={bucket}"))];
        for port in [pa, pb, pa, pb] {
            let r = get_with(port, "company.com", "/shop/cart", &cookie).await;
            assert_eq!(r.node(), side, "bucket {bucket} on port {port}");
            assert!(r.headers.get("set-cookie").is_none());
        }
    }
    // The override header decides alone, and sets nothing.
    for (value, node) in [
        ("always", "canary-1"),
        ("never", "shop-1"),
        ("ALWAYS", "canary-1"),
    ] {
        for bucket in [0, 9999] {
            let h = vec![
                ("cookie", format!("envgate_canary={bucket}")),
                ("x-canary", value.to_string()),
            ];
            let r = get_with(pb, "company.com", "/shop", &h).await;
            assert_eq!(r.node(), node, "{value} with bucket {bucket}");
            assert!(r.headers.get("set-cookie").is_none());
        }
    }
    // A cookie that holds no bucket is replaced.
    let h = vec![("cookie", "envgate_canary=canary".to_string())];
    assert!(set_bucket(&get_with(pa, "company.com", "/shop", &h).await).is_some());
    // The canary has no application for `/about`: the request stays, whatever the bucket.
    let h = vec![("x-canary", "always".to_string())];
    assert_eq!(
        get_with(pa, "company.com", "/about", &h).await.node(),
        "shop-1"
    );

    // HTTP/2 clients may split cookies over several fields.
    let mut h2 = h2_client(pa).await;
    let uri = format!("http://company.com:{pa}/shop");
    for (bucket, node) in [(7, "canary-1"), (2999, "canary-1"), (3000, "shop-1")] {
        let req = Request::get(&uri)
            .header("cookie", "a=1")
            .header("cookie", format!("envgate_canary={bucket}"))
            .header("cookie", "b=2")
            .body(())
            .unwrap();
        let r = h2_send(&mut h2, req).await;
        assert_eq!(r.node(), node, "bucket {bucket} over HTTP/2");
        assert!(r.headers.get("set-cookie").is_none());
    }
    let r = h2_send(&mut h2, Request::get(&uri).body(()).unwrap()).await;
    let bucket = set_bucket(&r).unwrap();
    assert_eq!(r.node() == "canary-1", bucket < 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_key_gives_the_same_bucket_on_every_instance() {
    let (shop, canary) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
    );
    let yaml = canary_topo(&shop, &canary, "50").replace(
        "cookie: envgate_canary",
        "cookie: envgate_canary, hash: { header: X-User-Id }",
    );
    let (a, b) = (Envgate::start(&yaml), Envgate::start_with(&yaml, 2));
    let mut sides: HashMap<String, usize> = HashMap::new();
    for user in 0..200 {
        let h = vec![("x-user-id", format!("user-{user}"))];
        let ra = get_with(a.port("http"), "company.com", "/shop", &h).await;
        let rb = get_with(b.port("http"), "company.com", "/shop", &h).await;
        assert_eq!(set_bucket(&ra), set_bucket(&rb), "user-{user}");
        assert_eq!(ra.node(), rb.node(), "user-{user}");
        // The same user on the same instance again: the same side.
        let again = get_with(a.port("http"), "company.com", "/shop", &h).await;
        assert_eq!(again.node(), ra.node());
        *sides.entry(ra.node().to_string()).or_default() += 1;
    }
    // A fixed hash spreads 200 users over both sides of a 50% split.
    assert!(sides["canary-1"] > 60 && sides["shop-1"] > 60, "{sides:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_weight_only_moves_users_onto_the_canary() {
    let (shop, canary) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
    );
    let eg = Envgate::start_with(&canary_topo(&shop, &canary, "5"), 2);
    let port = eg.port("http");
    const USERS: usize = 1000;
    // Each user's first visit gives it a cookie, which it sends from then on.
    let first = fetch_all(
        port,
        8,
        USERS,
        Arc::new(|_| get_req("company.com", "/shop", &[])),
    )
    .await;
    let jars: Arc<Vec<String>> = Arc::new(
        first
            .iter()
            .map(|r| format!("envgate_canary={}", set_bucket(r).unwrap()))
            .collect(),
    );
    let mut history: Vec<Vec<bool>> = first.iter().map(|r| vec![r.node() == "canary-1"]).collect();
    for weight in ["20", "50", "20"] {
        eg.apply(&canary_topo(&shop, &canary, weight));
        let jars = jars.clone();
        let replies = fetch_all(
            port,
            8,
            USERS,
            Arc::new(move |i| get_req("company.com", "/shop", &[("cookie", jars[i].clone())])),
        )
        .await;
        for (h, r) in history.iter_mut().zip(&replies) {
            assert!(r.headers.get("set-cookie").is_none());
            h.push(r.node() == "canary-1");
        }
    }
    let count = |phase: usize| history.iter().filter(|h| h[phase]).count();
    let shares: Vec<usize> = (0..4).map(count).collect();
    for (user, h) in history.iter().enumerate() {
        // 5 -> 20 -> 50: only onto the canary; 50 -> 20: only back (true: on the canary).
        assert!(
            h[1] >= h[0],
            "user {user} left the canary at 5 -> 20: {h:?}"
        );
        assert!(
            h[2] >= h[1],
            "user {user} left the canary at 20 -> 50: {h:?}"
        );
        assert!(
            h[3] <= h[2],
            "user {user} joined the canary at 50 -> 20: {h:?}"
        );
        // Back at 20%, everyone is where they were at 20% the first time.
        assert_eq!(h[1], h[3], "user {user}: {h:?}");
    }
    assert!(
        shares[0] < shares[1] && shares[1] < shares[2] && shares[3] == shares[1],
        "{shares:?}"
    );
    assert!(
        (100..=300).contains(&shares[1]) && (400..=600).contains(&shares[2]),
        "{shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_read_nodes_and_to_the_primaries_without_them() {
    let (primary, replica, other) = (
        Upstream::start("primary").await,
        Upstream::start("replica").await,
        Upstream::start("other").await,
    );
    let yaml = Topo::new()
        .defaults("health: { interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }")
        .node("primary", primary.addr)
        .node("replica", replica.addr)
        .node("other", other.addr)
        .env(
            "production",
            &["company.com"],
            "nodes: [primary, replica, other], apps: [ { name: orders, version: \"2\", path: /orders, nodes: [primary], read_nodes: [replica] }, { name: site, version: \"1\", path: /, nodes: [other] } ]",
        )
        .yaml();
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    let with = |method: &str| {
        Request::builder()
            .method(method)
            .uri("/orders/7")
            .header("host", "company.com")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    for (method, node) in [
        ("GET", "replica"),
        ("HEAD", "replica"),
        ("OPTIONS", "replica"),
        ("POST", "primary"),
        ("PUT", "primary"),
        ("DELETE", "primary"),
        ("PATCH", "primary"),
    ] {
        let r = send(port, with(method)).await;
        assert_eq!((r.status.as_u16(), r.node()), (200, node), "{method}");
    }
    // Another application has no read nodes: its reads go to its nodes.
    assert_eq!(get(port, "company.com", "/").await.node(), "other");
    // With its read node down, reads go to the primary.
    replica.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/orders/7").await.node() == "primary"
        })
        .await
    );
    replica.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/orders/7").await.node() == "replica"
        })
        .await
    );
}
