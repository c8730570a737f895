//! Host, authority and targets (RFC 9112 3.2, RFC 9113 8.3.1) and paths: the environment
//! is chosen by exactly the Host the node then receives, and by exactly the path the node
//! then receives. Raw sockets send what polite clients refuse to.

mod support;

use support::*;

fn two_apps(public: &Upstream, admin: &Upstream, defaults: &str) -> String {
    let base = topo(&[("pub", public.addr), ("adm", admin.addr)], defaults, "");
    base.replace(
        "nodes: [pub, adm] }",
        "nodes: [pub, adm], apps: [ { name: site, version: 1, path: /public, nodes: [pub] }, { name: admin, version: 1, path: /admin, nodes: [adm] } ] }",
    )
}

async fn status_of(port: u16, request: &str) -> String {
    let answer = raw(port, request.as_bytes()).await;
    answer.lines().next().unwrap_or("").to_string() + "\n" + &answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_one_and_well_formed() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    let cases = [
        ("GET / HTTP/1.1\r\n\r\n", "missing_host"),
        (
            "GET / HTTP/1.1\r\nHost: company.com\r\nHost: evil.org\r\n\r\n",
            "duplicate_host",
        ),
        (
            "GET / HTTP/1.1\r\nHost: company.com:@evil\r\n\r\n",
            "bad_host",
        ),
        ("GET / HTTP/1.1\r\nHost: company.com/x\r\n\r\n", "bad_host"),
        ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "bad_host"),
        (
            "GET / HTTP/1.1\r\nHost: company.com:80:81\r\n\r\n",
            "bad_host",
        ),
        (
            "GET http://user@company.com/ HTTP/1.1\r\nHost: company.com\r\n\r\n",
            "bad_host",
        ),
    ];
    for (req, reason) in cases {
        let answer = status_of(p, req).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{req:?}: {answer}");
        assert!(answer.contains(reason), "{req:?}: {answer}");
    }
    assert_eq!(a.hits(), 0);
    // HTTP/1.0 may leave Host out: only a port-wide entry could match it here.
    let answer = status_of(p, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 404"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_of_an_absolute_target_wins_and_is_the_host_sent() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    let answer = raw(
        p,
        b"GET http://www.company.com/headers HTTP/1.1\r\nHost: other.org\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = a.last_headers().unwrap();
    let hosts: Vec<_> = seen.get_all("host").iter().collect();
    assert_eq!(hosts, ["www.company.com"]);
    assert_eq!(seen["x-forwarded-host"], "www.company.com");
    // The other way round the request is not routed to production at all.
    let answer = raw(
        p,
        b"GET http://other.org/headers HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_host_must_agree_with_the_authority() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    let mut client = h2_client(p).await;
    let req = http::Request::get(format!("http://company.com:{p}/headers"))
        .header("host", "evil.org")
        .body(())
        .unwrap();
    let r = h2_send(&mut client, req).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("host_mismatch"), "{}", r.text());
    let req = http::Request::get(format!("http://company.com:{p}/headers"))
        .header("host", format!("COMPANY.com:{p}"))
        .body(())
        .unwrap();
    let r = h2_send(&mut client, req).await;
    assert_eq!(r.status, 200);
    let seen = a.last_headers().unwrap();
    let hosts: Vec<_> = seen.get_all("host").iter().collect();
    assert_eq!(hosts, [format!("company.com:{p}").as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_forms_match_their_methods() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", ""));
    let p = eg.port("http");
    let answer = status_of(
        p,
        "CONNECT company.com:443 HTTP/1.1\r\nHost: company.com:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let answer = status_of(
        p,
        "GET company.com:80 HTTP/1.1\r\nHost: company.com\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = status_of(p, "GET * HTTP/1.1\r\nHost: company.com\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(a.hits(), 0);
    let answer = status_of(
        p,
        "OPTIONS * HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-target: *"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_tunnelled_where_allowed() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(&[("a", a.addr)], "", "allow_connect: true"));
    let p = eg.port("http");
    // The test node answers CONNECT like any request (200): envgate then tunnels.
    let mut s = raw_conn(p).await;
    use tokio::io::AsyncWriteExt;
    s.write_all(b"CONNECT company.com:443 HTTP/1.1\r\nHost: company.com:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_the_node_see_the_same_path() {
    let (public, admin) = (Upstream::start("pub").await, Upstream::start("adm").await);
    let eg = Envgate::start(&two_apps(&public, &admin, ""));
    let p = eg.port("http");
    for (path, node, target) in [
        ("/public/../admin/x", "adm", "/admin/x"),
        ("/public/%2e%2E/admin/x?q=1", "adm", "/admin/x?q=1"),
        ("//admin//x", "adm", "/admin/x"),
        ("/%61dmin/./x/", "adm", "/admin/x/"),
        ("/public/a%20b", "pub", "/public/a%20b"),
    ] {
        let r = get(p, "company.com", path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.node(), node, "{path}");
        assert_eq!(r.headers["x-target"], target, "{path}");
    }
    for path in [
        "/..",
        "/public/../../admin",
        "/public/%00",
        "/public%2F..%2Fadmin",
        "/a%zz",
        "/public\\..\\admin",
        "/public/..;/admin",
    ] {
        let answer = status_of(
            p,
            &format!("GET {path} HTTP/1.1\r\nHost: company.com\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("bad_path"), "{path}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_slash_passes_encoded_where_allowed() {
    let (public, admin) = (Upstream::start("pub").await, Upstream::start("adm").await);
    let eg = Envgate::start(&two_apps(&public, &admin, "allow_encoded_slash: true"));
    let p = eg.port("http");
    let r = get(p, "company.com", "/public/a%2fb").await;
    assert_eq!((r.status.as_u16(), r.node()), (200, "pub"));
    assert_eq!(r.headers["x-target"], "/public/a%2Fb");
    // It never splits a segment: `..` after it still climbs one real segment.
    let r = get(p, "company.com", "/admin/a%2F..%2F..%2Fpublic").await;
    assert_eq!(r.node(), "adm");
}
