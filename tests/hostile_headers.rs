//! Headers as nodes receive them: HTTP/2 cookies joined, one request id, forwarding
//! headers kept only from trusted proxies, `Forwarded` removed from anyone else.

mod support;

use support::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookies_become_one_field() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    let mut client = h2_client(p).await;
    let req = http::Request::get(format!("http://company.com:{p}/headers"))
        .header("cookie", "a=1")
        .header("cookie", "envgate_canary=b")
        .body(())
        .unwrap();
    assert_eq!(h2_send(&mut client, req).await.status, 200);
    let seen = a.last_headers().unwrap();
    let cookies: Vec<_> = seen.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; envgate_canary=b"]);
}

async fn headers_seen(port: u16, a: &Upstream, extra: &str) -> http::HeaderMap {
    let mut s = raw_conn(port).await;
    s.write_all(
        format!("GET /headers HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n{extra}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    a.last_headers().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_request_ids_are_replaced_by_one() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let seen = headers_seen(
        eg.port("http"),
        &a,
        "X-Request-Id: first\r\nX-Request-Id: second\r\n",
    )
    .await;
    let ids: Vec<_> = seen.get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1);
    assert!(
        ids[0] != "first" && ids[0] != "second" && ids[0].len() == 32,
        "{ids:?}"
    );
}

const FORWARDING: &str = "X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2, 3.3.3.3\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\nForwarded: for=1.1.1.1;proto=https\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_keeps_its_forwarding_headers() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "trusted_proxies: [127.0.0.1/32]",
        "",
    ));
    let seen = headers_seen(eg.port("http"), &a, FORWARDING).await;
    let xff: Vec<_> = seen.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]);
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "shop.example");
    assert_eq!(seen["forwarded"], "for=1.1.1.1;proto=https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anyone_else_gets_them_replaced() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "trusted_proxies: [10.0.0.0/8]", ""));
    let seen = headers_seen(eg.port("http"), &a, FORWARDING).await;
    let xff: Vec<_> = seen.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["127.0.0.1"]);
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "company.com");
    assert!(seen.get("forwarded").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_the_host() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: company.com\r\nConnection: host, close\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = a.last_headers().unwrap();
    assert_eq!(seen["host"], "company.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_host_no_forwarded_host_passes_either() {
    let a = Upstream::start("a").await;
    let yaml = topo(&[("a", a.addr)], "", "").replace(
        "entries: [\"company.com",
        "entries: [\":{port:http}\", \"company.com",
    );
    let eg = Envgate::start(&yaml);
    let mut s = raw_conn(eg.port("http")).await;
    s.write_all(b"GET /headers HTTP/1.0\r\nX-Forwarded-Host: evil.com\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.contains(" 200 "), "{head}");
    let seen = a.last_headers().unwrap();
    assert!(seen.get("x-forwarded-host").is_none(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_drop_the_forwarding_headers_envgate_adds() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(
        &[("a", a.addr)],
        "trusted_proxies: [127.0.0.1/32]",
        "",
    ));
    let seen = headers_seen(
        eg.port("http"),
        &a,
        "X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\nX-Forwarded-For: 1.1.1.1\r\nConnection: x-forwarded-proto, x-forwarded-host, x-forwarded-for, x-request-id\r\n",
    )
    .await;
    // The trusted proxy's own values were withdrawn by its Connection option: envgate's
    // take their place.
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "company.com");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-request-id"].len(), 32);
}
