//! Routing through a running envgate: entry precedence, 404s, application prefixes,
//! smooth weighted round-robin, per-environment weights, backup nodes, HTTP/2 cleartext.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_precedence_exact_wildcard_port() {
    let (exact, wild, deep, any, other) = (
        Upstream::start("exact").await,
        Upstream::start("wild").await,
        Upstream::start("deep").await,
        Upstream::start("any").await,
        Upstream::start("other").await,
    );
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners:
  - {{ name: a, bind: "127.0.0.1:{{port:a}}" }}
  - {{ name: b, bind: "127.0.0.1:{{port:b}}" }}
nodes:
  exact: {{ address: "{}" }}
  wild: {{ address: "{}" }}
  deep: {{ address: "{}" }}
  any: {{ address: "{}" }}
  other: {{ address: "{}" }}
environments:
  e-exact: {{ entries: ["shop.company.com:{{port:a}}"], nodes: [exact] }}
  e-wild:  {{ entries: ["*.company.com:{{port:a}}"], nodes: [wild] }}
  e-deep:  {{ entries: ["*.eu.company.com:{{port:a}}"], nodes: [deep] }}
  e-any:   {{ entries: [":{{port:a}}"], nodes: [any] }}
  e-other: {{ entries: ["shop.company.com:{{port:b}}"], nodes: [other] }}
"#,
        exact.addr, wild.addr, deep.addr, any.addr, other.addr
    ));
    let (a, b) = (eg.port("a"), eg.port("b"));
    for (port, host, node) in [
        (a, "shop.company.com", "exact"),
        (a, "SHOP.Company.COM", "exact"),
        (a, "shop.company.com.", "exact"),
        (a, "shop.company.com:9999", "exact"),
        (a, "blog.company.com", "wild"),
        (a, "x.y.company.com", "wild"),
        (a, "x.eu.company.com", "deep"),
        (a, "a.b.eu.company.com:80", "deep"),
        (a, "company.com", "any"),
        (a, "elsewhere.org", "any"),
        (b, "shop.company.com", "other"),
    ] {
        let r = get(port, host, "/").await;
        assert_eq!(r.status, 200, "{host} on {port}");
        assert_eq!(r.node(), node, "{host} on {port}");
    }
    // Port b has no wildcard and no port-wide entry.
    let r = get(b, "blog.company.com", "/").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), r#"{"error":"no_route"}"#);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(other.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_path_prefix_picks_the_application() {
    let (shop, api, admin) = (
        Upstream::start("shop").await,
        Upstream::start("api").await,
        Upstream::start("admin").await,
    );
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
nodes:
  shop: {{ address: "{}" }}
  api: {{ address: "{}" }}
  admin: {{ address: "{}" }}
environments:
  production:
    entries: ["company.com:{{port:http}}"]
    nodes: [shop, api, admin]
    apps:
      - {{ name: shop, version: "1.0", path: /, nodes: [shop] }}
      - {{ name: api, version: "2.0", path: /api, nodes: [api] }}
      - {{ name: admin, version: "1.0", path: /api/admin/, nodes: [admin] }}
  strict:
    entries: ["strict.com:{{port:http}}"]
    nodes: [api]
    apps: [ {{ name: api, version: "2.0", path: /api }} ]
"#,
        shop.addr, api.addr, admin.addr
    ));
    let p = eg.port("http");
    for (path, node) in [
        ("/", "shop"),
        ("/apix", "shop"),
        ("/api", "api"),
        ("/api/v1/users?x=1", "api"),
        ("/api/admin", "admin"),
        ("/api/admin/users", "admin"),
    ] {
        assert_eq!(get(p, "company.com", path).await.node(), node, "{path}");
    }
    // No application owns `/` in `strict`: 404.
    let r = get(p, "strict.com", "/other").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), r#"{"error":"no_route"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smooth_weighted_round_robin_sequence_and_distribution() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
nodes:
  a: {{ address: "{}", weight: 5 }}
  b: {{ address: "{}" }}
  c: {{ address: "{}" }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [a, b, c] }}
  # The same nodes, weighted for this environment only.
  staging:
    entries: ["staging.company.com:{{port:http}}"]
    nodes: {{ a: {{ weight: 1 }}, b: {{ weight: 2 }}, c: }}
"#,
        a.addr, b.addr, c.addr
    ));
    let p = eg.port("http");
    let mut seq = String::new();
    for _ in 0..14 {
        seq.push_str(get(p, "company.com", "/").await.node());
    }
    assert_eq!(seq, "aabacaaaabacaa");

    for u in [&a, &b, &c] {
        u.reset_hits();
    }
    for _ in 0..40 {
        assert_eq!(get(p, "staging.company.com", "/").await.status, 200);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (10, 20, 10));
}

const HEALTH_FAST: &str =
    "defaults: { health: { interval: 100ms, timeout: 80ms, rise: 1, fall: 1 } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_traffic_only_when_no_primary_is_up() {
    let (p1, p2, bk) = (
        Upstream::start("p1").await,
        Upstream::start("p2").await,
        Upstream::start("bk").await,
    );
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
{HEALTH_FAST}
nodes:
  p1: {{ address: "{}" }}
  p2: {{ address: "{}" }}
  bk: {{ address: "{}", backup: true }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [p1, p2, bk] }}
"#,
        p1.addr, p2.addr, bk.addr
    ));
    let p = eg.port("http");
    for _ in 0..10 {
        assert_ne!(get(p, "x", "/").await.node(), "bk");
    }
    p1.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let mut all_p2 = true;
            for _ in 0..4 {
                all_p2 &= get(p, "x", "/").await.node() == "p2";
            }
            all_p2
        })
        .await
    );
    p2.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "x", "/").await.node() == "bk"
        })
        .await
    );
    bk.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "x", "/").await.status == 503
        })
        .await
    );
    let r = get(p, "x", "/").await;
    assert_eq!(
        r.text(),
        r#"{"error":"no_healthy_node","environment":"production"}"#
    );
    p2.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(p, "x", "/").await.node() == "p2"
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_prior_knowledge() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&format!(
        r#"
version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
nodes: {{ a: {{ address: "{}" }} }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [a] }}
"#,
        a.addr
    ));
    let (mut tx, _conn) = connect_h2(eg.port("http")).await;
    for path in ["/", "/headers"] {
        let uri = format!("http://company.com:{}{path}", eg.port("http"));
        let req = http::Request::get(uri)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if path == "/headers" {
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.contains(&format!("host: company.com:{}\n", eg.port("http"))),
                "{text}"
            );
        } else {
            assert_eq!(&body[..], b"a");
        }
    }
    assert_eq!(a.hits(), 2);
}
