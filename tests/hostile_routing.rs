//! Hostile clients and misbehaving nodes against tenant ranges, canary splits and read
//! nodes: odd tenant ids from every source, hostile canary cookies, a Connection option
//! naming the tenant header, lone read and canary nodes that reset every request, a
//! canary that runs another application on a shorter prefix, upgrades and read nodes.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use tokio::io::AsyncWriteExt;

/// One raw HTTP/1 exchange on a fresh connection (the request should carry
/// `Connection: close`); returns the status and everything that came back.
async fn raw_status(port: u16, req: &[u8]) -> (u16, String) {
    let out = raw(port, req).await;
    let status = out
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    (status, out)
}

fn header_of<'a>(resp: &'a str, name: &str) -> Vec<&'a str> {
    let head = resp.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

/// Checks a response carries at most one canary `Set-Cookie`, well formed; returns its
/// bucket.
fn one_cookie(values: &[&str]) -> Option<u16> {
    assert!(
        values.len() <= 1,
        "Set-Cookie added more than once: {values:?}"
    );
    let v = values.first()?;
    let rest = v
        .strip_prefix("envgate_canary=")
        .unwrap_or_else(|| panic!("{v}"));
    let (bucket, attrs) = rest.split_once(';').unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        attrs, " Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax",
        "malformed Set-Cookie {v:?}"
    );
    let b: u16 = bucket.parse().unwrap_or_else(|_| panic!("{v}"));
    assert!(b < 10_000 && (b == 0 || !bucket.starts_with('0')), "{v}");
    Some(b)
}

fn cookies_of(r: &Reply) -> Vec<&str> {
    r.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

async fn get_h(port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(port, b.body(Full::new(Bytes::new())).unwrap()).await
}

// ---------------------------------------------------------------------------------------
// Tenant ids
// ---------------------------------------------------------------------------------------

const TENANT_RANGES: &str =
    "ranges: [ { from: 1001, to: 1001, environment: acme }, { from: 5, to: 5, environment: five } ]";

struct Tenancy {
    shared: Upstream,
    acme: Upstream,
    five: Upstream,
    eg: Envgate,
}

/// `shared`, `acme` (tenant 1001) and `five` (tenant 5) behind environments keyed by a
/// header (optional: `h.`, required: `rh.`), a host label (`*.l.`, required), a path
/// segment (`p.`, required, segment 2), a query parameter (optional: `q.`, required:
/// `rq.`), and a port-wide environment keyed by host label 0, required.
async fn tenancy() -> Tenancy {
    let (shared, acme, five) = (
        Upstream::start("shared").await,
        Upstream::start("acme").await,
        Upstream::start("five").await,
    );
    let rule = |key: &str, required: bool| {
        format!("nodes: [shared], tenants: {{ key: {{ {key} }}, required: {required}, {TENANT_RANGES} }}")
    };
    let yaml = Topo::new()
        .node("shared", shared.addr)
        .node("acme", acme.addr)
        .node("five", five.addr)
        .env(
            "by-header",
            &["h.company.com"],
            &rule("header: X-Tenant-Id", false),
        )
        .env(
            "by-header-req",
            &["rh.company.com"],
            &rule("header: X-Tenant-Id", true),
        )
        .env(
            "by-label",
            &["*.l.company.com"],
            &rule("host_label: 0", true),
        )
        .env(
            "by-segment",
            &["p.company.com"],
            &rule("path_segment: 2", true),
        )
        .env(
            "by-query",
            &["q.company.com"],
            &rule("query: tenant", false),
        )
        .env(
            "by-query-req",
            &["rq.company.com"],
            &rule("query: tenant", true),
        )
        .env("port-wide", &[""], &rule("host_label: 0", true))
        .env("acme", &[], "nodes: [acme]")
        .env("five", &[], "nodes: [five]")
        .yaml();
    let eg = Envgate::start(&yaml);
    Tenancy {
        shared,
        acme,
        five,
        eg,
    }
}

/// A query parameter's name is decoded as frameworks decode it: `?%74enant=1001` is tenant
/// 1001 (not "no id", which would leave tenant 1001 in the shared environment), and
/// `?tenant=5&%74enant=1001` is the key given twice with different values: malformed (a
/// last-wins node would read 1001 in tenant 5's environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameter_names_are_read_as_nodes_read_them() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    let r = get(port, "q.company.com", "/?%74enant=1001").await;
    assert_eq!(
        r.node(),
        "acme",
        "`%74enant=1001` is tenant 1001 to the node, but envgate routed it to {:?}",
        r.node()
    );
    let r = get(port, "rq.company.com", "/?tenant=5&%74enant=1001").await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (400, r#"{"error":"bad_tenant"}"#),
        "two different ids for the same key were routed to {:?}",
        r.node()
    );
    assert_eq!(
        t.five.hits(),
        0,
        "tenant 5's environment served tenant 1001"
    );
}

/// A query value has no length limit of its own: `?tenant=<40 zeros>1001` is tenant 1001,
/// as the same value in `X-Tenant-Id` is, and as every node's integer parser reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_query_value_with_leading_zeros_is_the_same_tenant() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    let padded = format!("{}1001", "0".repeat(40));
    // By header the padded id is tenant 1001.
    let r = get_h(port, "h.company.com", "/", &[("x-tenant-id", &padded)]).await;
    assert_eq!(r.node(), "acme");
    // By query it should be too.
    let r = get(port, "q.company.com", &format!("/?tenant={padded}")).await;
    assert_eq!(
        r.node(),
        "acme",
        "tenant {padded} by query went to {:?}",
        r.node()
    );
    let r = get(port, "rq.company.com", &format!("/?tenant={padded}")).await;
    assert_eq!((r.status.as_u16(), r.node()), (200, "acme"), "{}", r.text());
}

/// `Connection: X-Tenant-Id` does not remove the tenant id routing used: like Host, the
/// tenant key header reaches the node as routing saw it (also past a `required` rule,
/// whose point is that the node always gets an id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_option_does_not_strip_the_tenant_id_routing_used() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    let (status, out) = raw_status(
        port,
        b"GET /headers HTTP/1.1\r\nHost: rh.company.com\r\nConnection: close, X-Tenant-Id\r\nX-Tenant-Id: 1001\r\n\r\n",
    )
    .await;
    if status == 400 {
        assert!(out.ends_with(r#"{"error":"bad_tenant"}"#), "{out}");
        return;
    }
    assert_eq!(status, 200, "{out}");
    assert_eq!(t.acme.hits(), 1, "routed by tenant 1001");
    let seen = t.acme.last_headers().unwrap();
    assert_eq!(
        seen.get("x-tenant-id").map(|v| v.to_str().unwrap()),
        Some("1001"),
        "tenant 1001's node got the request without the tenant id routing used"
    );
}

/// Hostile header values: huge, negative, unicode (obs-text), percent-encoded, lists,
/// repeated fields. Refusals are 400 before any node; nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenant_headers_are_refused_before_any_node() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    let huge = "9".repeat(4000);
    let bad: Vec<Vec<u8>> = vec![
        format!("X-Tenant-Id: {huge}").into_bytes(),
        b"X-Tenant-Id: 18446744073709551616".to_vec(),
        b"X-Tenant-Id: -1001".to_vec(),
        b"X-Tenant-Id: +1001".to_vec(),
        "X-Tenant-Id: \u{ff11}\u{ff10}\u{ff10}\u{ff11}"
            .as_bytes()
            .to_vec(),
        b"X-Tenant-Id: \xff\xfe1001".to_vec(),
        b"X-Tenant-Id: %31%30%30%31".to_vec(),
        b"X-Tenant-Id: 1001, 1001".to_vec(),
        b"X-Tenant-Id: 0x3e9".to_vec(),
        b"X-Tenant-Id: 1001\r\nX-Tenant-Id: 5".to_vec(),
        b"X-Tenant-Id: 1001\r\nX-Tenant-Id: ".to_vec(),
    ];
    for h in &bad {
        let mut req = b"GET / HTTP/1.1\r\nHost: rh.company.com\r\nConnection: close\r\n".to_vec();
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n\r\n");
        let (status, out) = raw_status(port, &req).await;
        assert_eq!(status, 400, "{:?}: {out}", String::from_utf8_lossy(h));
        assert!(
            out.ends_with(r#"{"error":"bad_tenant"}"#),
            "{:?}: {out}",
            String::from_utf8_lossy(h)
        );
    }
    // The same id twice (even spelled differently) is one id.
    let (status, out) = raw_status(
        port,
        b"GET / HTTP/1.1\r\nHost: rh.company.com\r\nConnection: close\r\nX-Tenant-Id: 1001\r\nx-tenant-id: 0001001\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(t.acme.hits(), 1);
    assert_eq!(t.shared.hits(), 0);
    // Optional rule: each of them stays in the shared environment.
    for h in &bad {
        let mut req = b"GET / HTTP/1.1\r\nHost: h.company.com\r\nConnection: close\r\n".to_vec();
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n\r\n");
        let (status, out) = raw_status(port, &req).await;
        assert_eq!(status, 200, "{out}");
        assert!(out.contains("x-node: shared"), "{out}");
    }
    assert_eq!((t.acme.hits(), t.five.hits()), (1, 0));
}

/// Host labels: case, port, trailing dot, leading zeros; IP literals and HTTP/1.0 without
/// Host have no label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_host_labels() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    for (host, want) in [
        (format!("t1001.l.company.com.:{port}"), "acme"),
        ("T1001.L.COMPANY.COM".to_string(), "acme"),
        ("tenant-0001001.l.company.com".to_string(), "acme"),
        ("1001.l.company.com".to_string(), "acme"),
        ("t5.l.company.com:1".to_string(), "five"),
        ("t6.l.company.com".to_string(), "shared"),
    ] {
        let r = get(port, &host, "/").await;
        assert_eq!((r.status.as_u16(), r.node()), (200, want), "{host}");
    }
    for (host, answer) in [
        ("t1001x.l.company.com", "bad_tenant"),
        ("tenant-.l.company.com", "bad_tenant"),
        ("t-1001.l.company.com", "acme"),
        ("t99999999999999999999999.l.company.com", "bad_tenant"),
        ("127.0.0.1", "tenant_required"),
        ("127.0.0.1.", "tenant_required"),
        ("[::1]", "tenant_required"),
        ("[::ffff:127.0.0.1]:80", "tenant_required"),
        ("_.x", "bad_tenant"),
    ] {
        let r = get(port, host, "/").await;
        if answer == "acme" {
            // `t-` is a prefix of letters and '-': the id is 1001.
            assert_eq!(r.node(), "acme", "{host}");
            continue;
        }
        assert_eq!(r.status, 400, "{host}: {}", r.text());
        assert_eq!(r.text(), format!(r#"{{"error":"{answer}"}}"#), "{host}");
    }
    // HTTP/1.0 without Host reaches the port-wide environment, which requires a label.
    let (status, out) = raw_status(port, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 400, "{out}");
    assert!(out.ends_with(r#"{"error":"tenant_required"}"#), "{out}");
    // The authority of an absolute-form target wins over Host, for routing and for the
    // node alike.
    let (status, out) = raw_status(
        port,
        b"GET http://t1001.l.company.com/headers HTTP/1.1\r\nHost: t5.l.company.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert!(out.contains("x-node: acme"), "{out}");
    assert_eq!(
        t.acme.last_headers().unwrap()["host"],
        "t1001.l.company.com"
    );
    assert_eq!(t.five.hits(), 1);
}

/// HTTP/2: repeated tenant fields, `:authority` against `host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tenant_ids_over_http2() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    let mut c = h2_client(port).await;
    let uri = |host: &str| format!("http://{host}:{port}/");
    let r = h2_send(
        &mut c,
        Request::get(uri("rh.company.com"))
            .header("x-tenant-id", "1001")
            .header("x-tenant-id", "5")
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.text()),
        (400, r#"{"error":"bad_tenant"}"#)
    );
    let r = h2_send(
        &mut c,
        Request::get(uri("t1001.l.company.com"))
            .header("host", "t5.l.company.com")
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = h2_send(
        &mut c,
        Request::get(uri("t1001.l.company.com")).body(()).unwrap(),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.node()), (200, "acme"));
    // The connection is still good after the refusals.
    let r = h2_send(
        &mut c,
        Request::get(uri("rh.company.com"))
            .header("x-tenant-id", "5")
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(r.node(), "five");
}

/// Path segments: dot-segments, encoded digits, merged slashes; the node gets the path
/// routing used. `OPTIONS *` and CONNECT have no segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_path_segments() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    for (path, node, target) in [
        ("/x/../tenants/1001/orders", "acme", "/tenants/1001/orders"),
        (
            "/tenants/%31%30%30%31/orders",
            "acme",
            "/tenants/1001/orders",
        ),
        ("/tenants//1001", "acme", "/tenants/1001"),
        ("/tenants/./t5/", "five", "/tenants/t5/"),
        ("/tenants/7?x=1", "shared", "/tenants/7?x=1"),
    ] {
        let r = get(port, "p.company.com", path).await;
        assert_eq!((r.status.as_u16(), r.node()), (200, node), "{path}");
        assert_eq!(r.headers["x-target"], target, "{path}");
    }
    for (path, answer) in [
        ("/tenants", "tenant_required"),
        ("/tenants/", "tenant_required"),
        ("/tenants/1001;jsessionid=1/x", "bad_tenant"),
        ("/tenants/%C3%A91001", "bad_tenant"),
        ("/tenants/1001%20", "bad_tenant"),
        ("/tenants/1001/../x", "bad_tenant"),
    ] {
        let r = get(port, "p.company.com", path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.text(), format!(r#"{{"error":"{answer}"}}"#), "{path}");
    }
    for req in [
        &b"OPTIONS * HTTP/1.1\r\nHost: p.company.com\r\nConnection: close\r\n\r\n"[..],
        b"CONNECT p.company.com:443 HTTP/1.1\r\nHost: p.company.com:443\r\nConnection: close\r\n\r\n",
    ] {
        let (status, out) = raw_status(port, req).await;
        assert_eq!(status, 400, "{out}");
        assert!(out.ends_with(r#"{"error":"tenant_required"}"#), "{out}");
    }
    assert_eq!(
        t.shared.hits() + t.acme.hits() + t.five.hits(),
        5,
        "only the five routed requests reached a node"
    );
}

/// A refused tenant keeps an HTTP/1 connection open; the unread body of the refused
/// request must never be read as the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tenant_with_a_body_smuggles_nothing() {
    let t = tenancy().await;
    let port = t.eg.port("http");
    let inner = b"GET /smuggled HTTP/1.1\r\nHost: rh.company.com\r\nX-Tenant-Id: 1001\r\n\r\n";
    for framing in ["length", "chunked"] {
        let mut s = raw_conn(port).await;
        let mut req = Vec::new();
        match framing {
            "length" => {
                req.extend_from_slice(
                    format!(
                        "POST / HTTP/1.1\r\nHost: rh.company.com\r\nX-Tenant-Id: nope\r\nContent-Length: {}\r\n\r\n",
                        inner.len()
                    )
                    .as_bytes(),
                );
                req.extend_from_slice(inner);
            }
            _ => {
                req.extend_from_slice(
                    b"POST / HTTP/1.1\r\nHost: rh.company.com\r\nX-Tenant-Id: nope\r\nTransfer-Encoding: chunked\r\n\r\n",
                );
                req.extend_from_slice(format!("{:x}\r\n", inner.len()).as_bytes());
                req.extend_from_slice(inner);
                req.extend_from_slice(b"\r\n0\r\n\r\n");
            }
        }
        s.write_all(&req).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{framing}: {head}");
        let mut rest = Vec::new();
        closes_within(&mut s, Duration::from_millis(500), &mut rest).await;
        let rest = String::from_utf8_lossy(&rest);
        assert!(!rest.contains("HTTP/1.1 200"), "{framing}: {rest}");
        assert_eq!(
            t.acme.hits(),
            0,
            "{framing}: the body was read as a request"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Canary
// ---------------------------------------------------------------------------------------

struct Split {
    shop: Upstream,
    canary: Upstream,
    eg: Envgate,
}

/// `production` on company.com (node shop-1) with a canary split to `production-canary`
/// (canary-1, one application on `/`), the given weight and `extra` canary keys.
async fn split(weight: &str, env_extra: &str, defaults: &str) -> Split {
    let (shop, canary) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
    );
    let eg = Envgate::start(&split_yaml(&shop, &canary, weight, env_extra, defaults));
    Split { shop, canary, eg }
}

fn split_yaml(
    shop: &Upstream,
    canary: &Upstream,
    weight: &str,
    env_extra: &str,
    defaults: &str,
) -> String {
    Topo::new()
        .defaults(defaults)
        .node("shop-1", shop.addr)
        .node("canary-1", canary.addr)
        .env(
            "production",
            &["company.com"],
            &format!(
                "nodes: [shop-1], canary: {{ environment: production-canary, weight: {weight}, header: X-Canary, cookie: envgate_canary }}{env_extra}"
            ),
        )
        .env(
            "production-canary",
            &[],
            "nodes: [canary-1], apps: [ { name: shop, version: \"2\", path: / } ]",
        )
        .yaml()
}

/// Hostile canary cookies and override values, at 50%: each request lands on the side
/// its valid cookie says, or gets exactly one well-formed new cookie for its side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_canary_cookies() {
    let s = split("50", "", "").await;
    let port = s.eg.port("http");
    let many: String = (0..90).map(|i| format!("Cookie: a{i}=1\r\n")).collect();
    let giant = format!("Cookie: big={}; envgate_canary=9000", "x".repeat(40_000));
    let cases: Vec<(String, Option<&str>)> = vec![
        // (header lines, side expected from the cookie; None: a new bucket is set)
        ("Cookie: envgate_canary=\"42\"".into(), Some("canary-1")),
        ("Cookie: envgate_canary=0042".into(), Some("canary-1")),
        ("Cookie: envgate_canary=0".into(), Some("canary-1")),
        ("Cookie: envgate_canary=4999".into(), Some("canary-1")),
        ("Cookie: envgate_canary=5000".into(), Some("shop-1")),
        ("Cookie: envgate_canary=9999".into(), Some("shop-1")),
        (
            "Cookie: a=1;envgate_canary=9000 ;b=2".into(),
            Some("shop-1"),
        ),
        (
            "Cookie: envgate_canary=9000; envgate_canary=42".into(),
            Some("shop-1"),
        ),
        (format!("{many}Cookie: envgate_canary=42"), Some("canary-1")),
        (giant, Some("shop-1")),
        ("Cookie: envgate_canary=".into(), None),
        ("Cookie: envgate_canary=\"\"".into(), None),
        ("Cookie: envgate_canary=\"".into(), None),
        ("Cookie: envgate_canary=10000".into(), None),
        ("Cookie: envgate_canary=00042".into(), None),
        ("Cookie: envgate_canary=-1".into(), None),
        ("Cookie: envgate_canary=4 2".into(), None),
        ("Cookie: envgate_canary=\u{664}\u{662}".into(), None),
        ("Cookie: envgate_canary==42".into(), None),
        ("Cookie: envgate_canary".into(), None),
        (
            "Cookie: envgate_canar=1; envgate_canary_x=1; xenvgate_canary=1; Envgate_canary=1"
                .into(),
            None,
        ),
        (
            "X-Canary: sometimes\r\nCookie: envgate_canary=42".into(),
            Some("canary-1"),
        ),
        (
            "X-Canary: \r\nCookie: envgate_canary=9000".into(),
            Some("shop-1"),
        ),
    ];
    for (lines, side) in &cases {
        let req =
            format!("GET / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n{lines}\r\n\r\n");
        let (status, out) = raw_status(port, req.as_bytes()).await;
        let what = &lines[..lines.len().min(80)];
        assert_eq!(status, 200, "{what}: {out}");
        let node = header_of(&out, "x-node")[0];
        let set = one_cookie(&header_of(&out, "set-cookie"));
        match side {
            Some(side) => {
                assert_eq!(node, *side, "{what}");
                assert_eq!(set, None, "{what}: a valid cookie is not set again");
            }
            None => {
                let b = set.unwrap_or_else(|| panic!("{what}: no new bucket: {out}"));
                assert_eq!(node == "canary-1", b < 5000, "{what}: bucket {b} on {node}");
            }
        }
    }
    // The override decides alone (the first field when repeated) and sets nothing.
    for (lines, node) in [
        ("X-Canary: always\r\nX-Canary: never", "canary-1"),
        ("X-Canary: NeVeR\r\nCookie: envgate_canary=1", "shop-1"),
        (
            "X-Canary: ALWAYS\r\nCookie: envgate_canary=9999",
            "canary-1",
        ),
    ] {
        let req =
            format!("GET / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n{lines}\r\n\r\n");
        let (_, out) = raw_status(port, req.as_bytes()).await;
        assert_eq!(header_of(&out, "x-node"), [node], "{lines}");
        assert!(header_of(&out, "set-cookie").is_empty(), "{lines}");
    }
    assert!(s.shop.hits() > 0 && s.canary.hits() > 0);
}

/// The canary cookie is set once, well formed, also on envgate's own answers (503, 413),
/// over HTTP/2, and on a 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_once_on_own_answers_http2_and_upgrades() {
    // Weight 0: every fresh client stays in production and gets a bucket.
    let s = split(
        "0",
        ", upgrades: [echo], limits: { max_request_body: 10 }",
        "health: { interval: 100ms, timeout: 80ms, rise: 1, fall: 1 }",
    )
    .await;
    let port = s.eg.port("http");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/").await.status == 200
        })
        .await
    );
    // 101: one cookie on the switch.
    let (status, out) = raw_status(
        port,
        b"GET / HTTP/1.1\r\nHost: company.com\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    assert_eq!(status, 101, "{out}");
    assert!(
        one_cookie(&header_of(&out, "set-cookie")).is_some(),
        "{out}"
    );
    // 413 of envgate's own.
    let (status, out) = raw_status(
        port,
        b"POST / HTTP/1.1\r\nHost: company.com\r\nContent-Length: 100\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413, "{out}");
    assert!(
        one_cookie(&header_of(&out, "set-cookie")).is_some(),
        "{out}"
    );
    // HTTP/2, node answer and own answer.
    let mut c = h2_client(port).await;
    let uri = format!("http://company.com:{port}/");
    let r = h2_send(&mut c, Request::get(&uri).body(()).unwrap()).await;
    assert_eq!(r.status, 200);
    assert!(one_cookie(&cookies_of(&r)).is_some());
    s.shop.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/").await.status == 503
        })
        .await
    );
    let r = get(port, "company.com", "/").await;
    assert_eq!(r.status, 503);
    assert!(one_cookie(&cookies_of(&r)).is_some());
    let r = h2_send(&mut c, Request::get(&uri).body(()).unwrap()).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(one_cookie(&cookies_of(&r)).is_some());
    // A client that carries a cookie gets none, even on an error.
    let r = get_h(port, "company.com", "/", &[("cookie", "envgate_canary=42")]).await;
    assert_eq!(r.status, 503);
    assert!(cookies_of(&r).is_empty());
}

/// The canary cookie is `Secure` when the client reached a trusted proxy over TLS
/// (`X-Forwarded-Proto: https` from a trusted peer), and not when an untrusted client
/// claims it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_is_secure_behind_a_trusted_tls_proxy() {
    let s = split("50", "", "trusted_proxies: [127.0.0.1/32]").await;
    let port = s.eg.port("http");
    let (status, out) = raw_status(
        port,
        b"GET / HTTP/1.1\r\nHost: company.com\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let v = header_of(&out, "set-cookie");
    assert_eq!(v.len(), 1, "{out}");
    assert!(
        v[0].ends_with("; Secure"),
        "an HTTPS user's cookie without Secure: {v:?}"
    );
}

/// A canary that cannot serve costs its users nothing: with its only node down, requests
/// the split (or the override) sends to it stay in production and blame no node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_fallback_stays_in_the_origin_environment() {
    let s = split(
        "100",
        "",
        "health: { interval: 100ms, timeout: 80ms, rise: 1, fall: 1 }",
    )
    .await;
    let port = s.eg.port("http");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/").await.node() == "canary-1"
        })
        .await
    );
    // Weight 100: everyone is on the canary, whatever the bucket.
    for c in ["envgate_canary=9999", "envgate_canary=0"] {
        assert_eq!(
            get_h(port, "company.com", "/", &[("cookie", c)])
                .await
                .node(),
            "canary-1"
        );
    }
    s.canary.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/").await.node() == "shop-1"
        })
        .await
    );
    let before = s.canary.hits();
    for h in [
        vec![("x-canary", "always")],
        vec![("cookie", "envgate_canary=0")],
        vec![],
    ] {
        let r = get_h(port, "company.com", "/x", &h).await;
        assert_eq!((r.status.as_u16(), r.node()), (200, "shop-1"), "{h:?}");
    }
    let r = send(
        port,
        Request::post("/x")
            .header("host", "company.com")
            .header("x-canary", "always")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(r.node(), "shop-1");
    assert_eq!(s.canary.hits(), before);
}

/// `OPTIONS *`, CONNECT and HTTP/1.0 without Host against an environment with a canary:
/// answered, no panic, at most one cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_targets_against_a_canary() {
    let (shop, canary) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
    );
    let yaml = split_yaml(&shop, &canary, "50", "", "").replace("[\"company.com:", "[\":");
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    for req in [
        &b"OPTIONS * HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n"[..],
        b"OPTIONS * HTTP/1.1\r\nHost: company.com\r\nX-Canary: always\r\nConnection: close\r\n\r\n",
        b"CONNECT company.com:443 HTTP/1.1\r\nHost: company.com:443\r\nConnection: close\r\n\r\n",
        b"CONNECT company.com:443 HTTP/1.1\r\nHost: company.com:443\r\nX-Canary: always\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nCookie: envgate_canary=1\r\n\r\n",
    ] {
        let (status, out) = raw_status(port, req).await;
        assert!(status < 600, "{out}");
        one_cookie(&header_of(&out, "set-cookie"));
    }
    let r = get(port, "company.com", "/").await;
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------------
// Read nodes
// ---------------------------------------------------------------------------------------

fn read_yaml(primary: SocketAddr, replica: SocketAddr, app_extra: &str) -> String {
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ interval: 100ms, timeout: 80ms, rise: 1, fall: 1 }} }}
nodes:
  primary: {{ address: "{primary}" }}
  replica: {{ address: "{replica}", health: {{ type: tcp }} }}
environments:
  production:
    entries: ["company.com:{{port:http}}"]
    nodes: [primary, replica]
    apps: [ {{ name: orders, version: "1", path: /, nodes: [primary]{app_extra} }} ]
"#
    )
}

/// A read node that passes its health check but resets every request is ejected after
/// `consecutive_failures`: the cap on ejected nodes counts the request's whole candidate
/// set (read pool and application pool), so a lone replica can go while the primaries
/// serve the reads (before, every read paid a failed attempt and a retry token, and reads
/// got 502 once the budget was spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_single_read_node_is_ejected() {
    let primary = Upstream::start("primary").await;
    let replica = Breaker::start().await;
    let eg = Envgate::start(&read_yaml(
        primary.addr,
        replica.addr,
        ", read_nodes: [replica]",
    ));
    let port = eg.port("http");
    // Both nodes up (the replica's TCP check passes).
    assert!(
        eventually(Duration::from_secs(5), || async {
            send(
                port,
                Request::post("/")
                    .header("host", "company.com")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .status
                == 200
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let r = get(port, "company.com", "/orders").await;
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    let on_replica = replica.requests();
    assert!(
        on_replica <= 8,
        "the broken read node took {on_replica} of 60 reads: never ejected (statuses {statuses:?})"
    );
    assert_eq!(
        statuses.get(&200),
        Some(&60),
        "reads failed while the primary was healthy: {statuses:?}"
    );
}

/// A read pool whose node refuses connections (down): reads go to the application's
/// nodes, and writes never touch the read node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_when_the_read_pool_is_down() {
    let primary = Upstream::start("primary").await;
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let eg = Envgate::start(&read_yaml(primary.addr, dead, ", read_nodes: [replica]"));
    let port = eg.port("http");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/").await.status == 200
        })
        .await
    );
    for m in ["GET", "HEAD", "OPTIONS", "POST", "DELETE"] {
        let r = send(
            port,
            Request::builder()
                .method(m)
                .uri("/orders")
                .header("host", "company.com")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!((r.status.as_u16(), r.node()), (200, "primary"), "{m}");
    }
}

// ---------------------------------------------------------------------------------------
// Topologies that validate
// ---------------------------------------------------------------------------------------

fn parse(yaml: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let text = yaml.replace("{port:http}", "18080");
    envgate::config::parse(&text, dir.path())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Edge topologies the validator accepts route sanely; those it should refuse are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validated_edge_topologies_route_sanely() {
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let base = |canary: &str, extra_env: &str| {
        Topo::new()
            .node("a", a)
            .node("b", "127.0.0.1:2".parse().unwrap())
            .env(
                "production",
                &["company.com"],
                &format!("nodes: [a]{canary}"),
            )
            .env("other", &[], &format!("nodes: [b]{extra_env}"))
            .yaml()
    };
    // Refused: a canary onto itself, a tenant range onto itself (cycles), weights off
    // the 0.01 grid or outside 0..100, empty read nodes, read nodes outside the
    // environment.
    for (what, yaml) in [
        ("canary self", base(", canary: { environment: production, weight: 5 }", "")),
        ("weight 0.001", base(", canary: { environment: other, weight: 0.001 }", "")),
        ("weight 100.01", base(", canary: { environment: other, weight: 100.01 }", "")),
        ("weight -1", base(", canary: { environment: other, weight: -1 }", "")),
        ("weight nan", base(", canary: { environment: other, weight: .nan }", "")),
        (
            "cycle",
            base(
                ", canary: { environment: other, weight: 5 }",
                ", tenants: { key: { header: T }, ranges: [ { from: 1, to: 1, environment: production } ] }",
            ),
        ),
        (
            "empty read nodes",
            base(", apps: [ { name: x, version: \"1\", read_nodes: [] } ]", ""),
        ),
        (
            "foreign read node",
            base(", apps: [ { name: x, version: \"1\", read_nodes: [b] } ]", ""),
        ),
        (
            "cookie name too long",
            base(
                &format!(
                    ", canary: {{ environment: other, weight: 5, cookie: {} }}",
                    "c".repeat(65)
                ),
                "",
            ),
        ),
        (
            "cookie name not a token",
            base(", canary: { environment: other, weight: 5, cookie: \"a;b\" }", ""),
        ),
    ] {
        let e = parse(&yaml).expect_err(&format!("{what} validated:\n{yaml}"));
        eprintln!("{what}: {e}");
    }
    // Accepted: 100, 0, 0.01, read nodes equal to nodes, a canary without applications.
    for yaml in [
        base(", canary: { environment: other, weight: 100 }", ""),
        base(", canary: { environment: other, weight: 0 }", ""),
        base(
            ", canary: { environment: other, weight: 0.01, cookie: envgate_canary }",
            "",
        ),
        base(
            ", apps: [ { name: x, version: \"1\", nodes: [a], read_nodes: [a] } ]",
            "",
        ),
    ] {
        parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    }
}

/// Weight 100 / weight 0, a canary environment without applications (its implicit
/// one), read nodes equal to nodes, and a tenant range onto an environment whose node is
/// down (503 there, never a fall-back into the shared one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_topologies_through_a_running_envgate() {
    let (shop, canary, acme) = (
        Upstream::start("shop-1").await,
        Upstream::start("canary-1").await,
        Upstream::start("acme").await,
    );
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let yaml = Topo::new()
        .defaults("health: { interval: 100ms, timeout: 80ms, rise: 1, fall: 1 }")
        .node("shop-1", shop.addr)
        .node("canary-1", canary.addr)
        .node("acme", acme.addr)
        .node("gone", dead)
        .env(
            "all",
            &["all.company.com"],
            "nodes: [shop-1], canary: { environment: bare, weight: 100, cookie: envgate_canary }",
        )
        .env(
            "none",
            &["none.company.com"],
            "nodes: [shop-1], canary: { environment: bare, weight: 0, cookie: envgate_canary }",
        )
        .env("bare", &[], "nodes: [canary-1]")
        .env(
            "same",
            &["same.company.com"],
            "nodes: [shop-1, acme], apps: [ { name: x, version: \"1\", nodes: [shop-1, acme], read_nodes: [shop-1, acme] } ], panic_threshold: 50",
        )
        .env(
            "tenanted",
            &["t.company.com"],
            "nodes: [shop-1], tenants: { key: { header: X-Tenant-Id }, ranges: [ { from: 7, to: 7, environment: down } ] }",
        )
        .env("down", &[], "nodes: [gone]")
        .yaml();
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "all.company.com", "/").await.node() == "canary-1"
        })
        .await
    );
    for c in ["envgate_canary=9999", "envgate_canary=0", ""] {
        let h = [("cookie", c)];
        let h = if c.is_empty() { &h[..0] } else { &h[..] };
        let r = get_h(port, "all.company.com", "/any/path", h).await;
        assert_eq!(r.node(), "canary-1", "weight 100, {c:?}");
        let r = get_h(port, "none.company.com", "/any/path", h).await;
        assert_eq!(r.node(), "shop-1", "weight 0, {c:?}");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = get(port, "same.company.com", "/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.node().to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let r = get_h(port, "t.company.com", "/", &[("x-tenant-id", "7")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("\"environment\":\"down\""),
        "{}",
        r.text()
    );
    assert_eq!(
        get_h(port, "t.company.com", "/", &[("x-tenant-id", "8")])
            .await
            .node(),
        "shop-1"
    );
}

// ---------------------------------------------------------------------------------------
// More: a failing canary node, a canary that swallows other applications, tunnels on read
// nodes
// ---------------------------------------------------------------------------------------

/// A canary environment's only node that passes its health check but resets every
/// request is ejected (its requests have somewhere else to go: the origin environment, in
/// the cap's scope), and the canary side then falls back to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_single_canary_node_is_ejected_and_the_canary_falls_back() {
    let shop = Upstream::start("shop-1").await;
    let canary = Breaker::start().await;
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ interval: 100ms, timeout: 80ms, rise: 1, fall: 1 }} }}
nodes:
  shop-1: {{ address: "{}" }}
  canary-1: {{ address: "{}", health: {{ type: tcp }} }}
environments:
  production:
    entries: ["company.com:{{port:http}}"]
    nodes: [shop-1]
    canary: {{ environment: production-canary, weight: 100 }}
  production-canary:
    nodes: [canary-1]
"#,
        shop.addr, canary.addr
    );
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    // Wait until both are up: a write on the canary side reaches the breaker.
    assert!(
        eventually(Duration::from_secs(5), || async {
            get(port, "company.com", "/").await;
            canary.requests() > 0
        })
        .await
    );
    let before = canary.requests();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let r = get(port, "company.com", "/").await;
        *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
    }
    let on_canary = canary.requests() - before;
    assert!(
        on_canary <= 8,
        "the broken canary node took {on_canary} of 40 requests: never ejected, no fall-back (statuses {statuses:?})"
    );
}

/// A canary running `shop` on `/` does not take the origin's `/reports` (another
/// application): those requests stay; the canary takes only the versions it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_application_on_a_shorter_prefix_does_not_take_other_applications() {
    let (app, reports, canary) = (
        Upstream::start("app-1").await,
        Upstream::start("reports-1").await,
        Upstream::start("canary-1").await,
    );
    let yaml = Topo::new()
        .node("app-1", app.addr)
        .node("reports-1", reports.addr)
        .node("canary-1", canary.addr)
        .defaults("health: { trust_unknown: true }")
        .env(
            "production",
            &["company.com"],
            "nodes: [app-1, reports-1], apps: [ { name: shop, version: \"1.1.0\", path: /, nodes: [app-1] }, { name: reports, version: \"3.0.0\", path: /reports, nodes: [reports-1] } ], canary: { environment: production-canary, weight: 5, header: X-Canary }",
        )
        .env(
            "production-canary",
            &[],
            "nodes: [canary-1], apps: [ { name: shop, version: \"1.2.0-rc.1\", path: / } ]",
        )
        .yaml();
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    // The shop's canary side: the release candidate.
    let r = get_h(port, "company.com", "/cart", &[("x-canary", "always")]).await;
    assert_eq!(r.node(), "canary-1");
    // The reports application has no canary.
    let r = get_h(
        port,
        "company.com",
        "/reports/q3",
        &[("x-canary", "always")],
    )
    .await;
    assert_eq!(
        r.node(),
        "reports-1",
        "a /reports request was sent to the shop's release candidate"
    );
}

/// A GET with `Upgrade` (WebSocket) is not a read: the tunnel opens on the application's
/// nodes, not on a read replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_goes_to_the_primaries() {
    let (primary, replica) = (
        Upstream::start("primary").await,
        Upstream::start("replica").await,
    );
    let yaml = Topo::new()
        .defaults("health: { trust_unknown: true }")
        .node("primary", primary.addr)
        .node("replica", replica.addr)
        .env(
            "production",
            &["company.com"],
            "nodes: [primary, replica], upgrades: [echo], apps: [ { name: live, version: \"1\", path: /, nodes: [primary], read_nodes: [replica] } ]",
        )
        .yaml();
    let eg = Envgate::start(&yaml);
    let port = eg.port("http");
    let mut s = raw_conn(port).await;
    s.write_all(
        b"GET /live HTTP/1.1\r\nHost: company.com\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header_of(&head, "x-node"),
        ["primary"],
        "a two-way tunnel was opened on the read replica"
    );
}
