//! TLS termination and TLS to nodes, with certificates made at test time: SNI picks the
//! certificate (two names and a wildcard), ALPN h2 is routed like HTTP/1.1, TLS 1.1 is
//! refused, a Host the certificate does not cover gets 421, a renewed certificate is
//! served once its files change while an open connection keeps working, a node over TLS
//! with a private CA (and its health checks), and `envgate check` on bad certificates.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use support::pki::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn certs_yaml(leaves: &[&Leaf]) -> String {
    leaves
        .iter()
        .map(|l| {
            format!(
                "{{ cert: \"{}\", key: \"{}\" }}",
                l.cert.display(),
                l.key.display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One TLS listener `https` (and a cleartext `http`) with `leaves`, `tls_extra` more keys
/// of its `tls` map, the nodes given, and environment `production` on `hosts` of `https`.
fn tls_topology(
    leaves: &[&Leaf],
    tls_extra: &str,
    nodes: &[&Upstream],
    hosts: &[&str],
    env_extra: &str,
) -> String {
    let entries: Vec<String> = hosts
        .iter()
        .map(|h| format!("\"{h}:{{port:https}}\""))
        .collect();
    let nodes_yaml: String = nodes
        .iter()
        .map(|n| format!("  {}: {{ address: \"{}\" }}\n", n.name, n.addr))
        .collect();
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    format!(
        r#"version: 1
listeners:
  - {{ name: http, bind: "127.0.0.1:{{port:http}}" }}
  - {{ name: https, bind: "127.0.0.1:{{port:https}}", tls: {{ certificates: [{}]{tls_extra} }} }}
nodes:
{nodes_yaml}environments:
  production: {{ entries: [{}], nodes: [{}]{env_extra} }}
"#,
        certs_yaml(leaves),
        entries.join(", "),
        names.join(", ")
    )
}

/// Status, `x-node` and body of one request.
async fn ask<F>(fut: F) -> (u16, String, String)
where
    F: std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
{
    let resp = fut.await.unwrap();
    let status = resp.status().as_u16();
    let node = resp
        .headers()
        .get("x-node")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, node, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_for_two_names_and_a_wildcard() {
    for workers in [1, 2] {
        let pki = Pki::new();
        let a = pki.leaf("a", &["a.test"]);
        let b = pki.leaf("b", &["b.test"]);
        let w = pki.leaf("w", &["*.w.test"]);
        let node = Upstream::start("n1").await;
        let eg = Envgate::start_with(
            &tls_topology(
                &[&a, &b, &w],
                "",
                &[&node],
                &["a.test", "b.test", "*.w.test"],
                "",
            ),
            workers,
        );
        let port = eg.port("https");
        let client = pki.client(&[b"http/1.1"]);
        for (sni, leaf) in [
            ("a.test", &a),
            ("b.test", &b),
            ("x.w.test", &w),
            ("Y.W.test", &w),
            // No certificate names it: the first is the default.
            ("elsewhere.test", &a),
        ] {
            // The client verifies the chain, but a name mismatch fails its handshake, so
            // the default certificate is checked with a client that accepts any name.
            let s = if sni == "elsewhere.test" {
                tls_connect(port, sni, any_name_client(&pki, &[]))
                    .await
                    .unwrap()
            } else {
                tls_connect(port, sni, client.clone()).await.unwrap()
            };
            assert_eq!(peer_cert(&s), leaf.der, "certificate for SNI {sni}");
            if sni != "elsewhere.test" {
                assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
                let mut tx = h1(s).await;
                let (status, n, _) = ask(tx.send_request(get_req(sni, "/headers"))).await;
                assert_eq!((status, n.as_str()), (200, "n1"), "{sni}");
                let seen = node.last_headers().unwrap();
                assert_eq!(seen["x-forwarded-proto"], "https", "{sni}");
            }
        }
        eg.stop().await;

        // `unknown_sni: refuse`: a name no certificate covers fails the handshake.
        let eg = Envgate::start_with(
            &tls_topology(
                &[&a, &b],
                ", unknown_sni: refuse",
                &[&node],
                &["a.test"],
                "",
            ),
            workers,
        );
        let port = eg.port("https");
        assert!(tls_connect(port, "a.test", client.clone()).await.is_ok());
        let Err(e) = tls_connect(port, "elsewhere.test", any_name_client(&pki, &[])).await else {
            panic!("a handshake for an unknown name is refused");
        };
        assert!(
            e.to_string().contains("UnrecognisedName") || e.to_string().contains("alert"),
            "{e}"
        );
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_is_routed_like_http1_and_a_host_the_certificate_does_not_cover_gets_421() {
    for workers in [1, 2] {
        let pki = Pki::new();
        let a = pki.leaf("a", &["a.test"]);
        let b = pki.leaf("b", &["b.test"]);
        let node = Upstream::start("n1").await;
        let eg = Envgate::start_with(
            &tls_topology(&[&a, &b], "", &[&node], &["a.test", "b.test"], ""),
            workers,
        );
        let port = eg.port("https");

        // HTTP/2 by ALPN: routed by :authority like HTTP/1.1 is by Host.
        let s = tls_connect(port, "a.test", pki.client(&[b"h2", b"http/1.1"]))
            .await
            .unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut tx = h2(s).await;
        let req = || {
            Request::get("https://a.test/headers")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        for _ in 0..3 {
            let (status, n, body) = ask(tx.send_request(req())).await;
            assert_eq!((status, n.as_str()), (200, "n1"));
            assert!(body.contains("x-forwarded-proto: https"), "{body}");
        }
        // Coalescing: the same connection (certificate for a.test) asked for b.test.
        let (status, _, body) = ask(tx.send_request(
            Request::get("https://b.test/")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ))
        .await;
        assert_eq!(status, 421, "{body}");
        assert!(body.contains("misdirected_request"), "{body}");
        // The connection goes on serving its own host.
        let (status, _, _) = ask(tx.send_request(req())).await;
        assert_eq!(status, 200);

        // Domain fronting over HTTP/1.1: SNI a.test, Host b.test.
        let s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
            .await
            .unwrap();
        let mut tx = h1(s).await;
        let (status, _, _) = ask(tx.send_request(get_req("b.test", "/"))).await;
        assert_eq!(status, 421);
        tx.ready().await.unwrap();
        let (status, n, _) = ask(tx.send_request(get_req("a.test:443", "/"))).await;
        assert_eq!((status, n.as_str()), (200, "n1"));
        // A client without ALPN gets HTTP/1.1.
        let s = tls_connect(port, "b.test", pki.client(&[])).await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), None);
        let mut tx = h1(s).await;
        let (status, n, _) = ask(tx.send_request(get_req("b.test", "/"))).await;
        assert_eq!((status, n.as_str()), (200, "n1"));
        eg.stop().await;
    }
}

/// curl, a client of its own TLS stack, over HTTP/2 (where installed; CI installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http2_over_tls() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "curl is missing in CI");
        return;
    }
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start(&tls_topology(&[&a], "", &[&node], &["a.test"], ""));
    let port = eg.port("https");
    let ca = pki.ca_path();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--http2", "--cacert"])
            .arg(&ca)
            .args([
                "--resolve",
                &format!("a.test:{port}:127.0.0.1"),
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &format!("https://a.test:{port}/"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "2 200", "{}", String::from_utf8_lossy(&out.stderr));
    eg.stop().await;
}

/// A TLS 1.1 ClientHello (no supported_versions extension), byte by byte.
fn tls11_client_hello(sni: &str) -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // session id
                  // ECDHE-ECDSA/RSA-AES128-GCM-SHA256 (suites a TLS 1.2 server takes) and AES-CBC-SHA.
    body.extend_from_slice(&[0x00, 0x08, 0xc0, 0x2b, 0xc0, 0x2f, 0x00, 0x2f, 0x00, 0x35]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let name = sni.as_bytes();
    let mut ext = vec![0x00, 0x00];
    let list_len = name.len() + 3;
    ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(list_len as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256.
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ]);
    // supported_groups: x25519, secp256r1; ec_point_formats: uncompressed.
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01, 0, 0, 0];
    let len = body.len() as u32;
    hs[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start(&tls_topology(&[&a], "", &[&node], &["a.test"], ""));
    let port = eg.port("https");

    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&tls11_client_hello("a.test")).await.unwrap();
    let mut buf = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    // An alert record: fatal, protocol_version (70). No ServerHello.
    assert_eq!(buf[0], 0x15, "{buf:?}");
    assert_eq!(&buf[5..7], &[2, 70], "{buf:?}");

    // OpenSSL's client, allowed to offer TLS 1.1 (its default security level forbids it).
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok()
    {
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{port}"),
                    "-servername",
                    "a.test",
                    "-tls1_1",
                    "-cipher",
                    "DEFAULT@SECLEVEL=0",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("Cipher is (NONE)") && text.contains("alert"),
            "{text}"
        );
    }
    // TLS 1.2 and 1.3 are served.
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let c = rustls::ClientConfig::builder_with_protocol_versions(&[v])
            .with_root_certificates(roots)
            .with_no_client_auth();
        let s = tls_connect(port, "a.test", Arc::new(c)).await.unwrap();
        assert_eq!(s.get_ref().1.protocol_version(), Some(v.version));
    }
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_once_its_files_change_and_open_connections_go_on() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(&tls_topology(&[&a], "", &[&node], &["a.test"], ""), 2);
    // As `envgate run` does.
    let _watch = envgate::control::watch::spawn_files(eg.server().control().clone()).unwrap();
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
    assert_eq!(peer_cert(&s), a.der);
    let mut open = h1(s).await;
    let (status, _, _) = ask(open.send_request(get_req("a.test", "/"))).await;
    assert_eq!(status, 200);
    let generation = eg.server().control().current().generation;

    // Renewal: a new key and certificate, written over the old files.
    let renewed = pki.leaf("a", &["a.test"]);
    assert_ne!(renewed.der, a.der);
    let served = eventually(Duration::from_secs(10), || {
        let client = client.clone();
        let want = renewed.der.clone();
        async move {
            match tls_connect(port, "a.test", client).await {
                Ok(s) => peer_cert(&s) == want,
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(served, "the renewed certificate is served");
    // The connection opened before goes on, on its own session.
    open.ready().await.unwrap();
    let (status, _, _) = ask(open.send_request(get_req("a.test", "/"))).await;
    assert_eq!(status, 200);
    let control = eg.server().control();
    assert!(control.current().generation > generation);
    let last = control.history().pop().unwrap();
    assert_eq!(last.source.as_str(), "certificates");
    assert!(
        last.summary
            .contains("listener https: certificates reloaded"),
        "{}",
        last.summary
    );

    // A key that does not match is refused: the renewed certificate stays.
    let other = pki.leaf("other", &["a.test"]);
    std::fs::copy(&other.key, &renewed.key).unwrap();
    let refused = eventually(Duration::from_secs(10), || async {
        control
            .history()
            .last()
            .is_some_and(|r| r.result.as_str() == "rejected")
    })
    .await;
    assert!(refused, "{:?}", control.history().last());
    let why = control.history().pop().unwrap().summary;
    assert!(why.contains("does not match"), "{why}");
    let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
    assert_eq!(peer_cert(&s), renewed.der);

    // SIGHUP's path (the same document applied again) reads the files again too.
    std::fs::copy(&other.cert, &renewed.cert).unwrap();
    let text = control.document();
    let applied = control
        .apply(envgate::control::Source::Signal, &text, false)
        .unwrap();
    assert!(!applied.unchanged);
    let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
    assert_eq!(peer_cert(&s), other.der);
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_tls_with_a_private_ca_is_verified_pooled_and_health_checked() {
    let pki = Pki::new();
    let leaf = pki.leaf("node", &["orders.internal"]);
    let node = Upstream::start_tls("secure", pki.server_config(&leaf)).await;
    let ca = pki.ca_path();
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
nodes:
  secure: {{ address: "{}", tls: {{ server_name: orders.internal, ca: "{}" }} }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [secure] }}
"#,
        node.addr,
        ca.display()
    );
    for workers in [1, 2] {
        let eg = Envgate::start_with(&yaml, workers);
        let port = eg.port("http");
        let mut tx = connect::<Full<Bytes>>(port).await;
        for _ in 0..5 {
            tx.ready().await.unwrap();
            let r = tx.send_request(get_req("company.com", "/")).await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-node"], "secure");
            r.into_body().collect().await.unwrap();
        }
        // Pooled: the node saw fewer connections than requests (health checks aside).
        assert!(node.connections() <= workers, "{}", node.connections());
        let status = eg.server().control().topology();
        assert_eq!(status.nodes[0].state.health(), envgate::health::Health::Up);
        eg.stop().await;
    }

    // The same node verified against another CA (or for another name) fails its checks
    // and serves nothing: 503, not a connection to an impostor.
    let other = Pki::new();
    for tls in [
        format!(
            "{{ server_name: orders.internal, ca: \"{}\" }}",
            other.ca_path().display()
        ),
        format!(
            "{{ server_name: payments.internal, ca: \"{}\" }}",
            ca.display()
        ),
    ] {
        let yaml = format!(
            r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
nodes:
  secure: {{ address: "{}", tls: {tls} }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [secure] }}
"#,
            node.addr
        );
        let eg = Envgate::start(&yaml);
        let topo = eg.server().control().topology();
        let down = eventually(Duration::from_secs(5), || async {
            topo.nodes[0].state.health() == envgate::health::Health::Down
        })
        .await;
        assert!(down, "{tls}");
        let reason = topo.nodes[0]
            .state
            .last_check()
            .map(|c| c.detail.clone())
            .unwrap_or_default();
        assert!(reason.contains("TLS handshake"), "{reason}");
        let r = get(eg.port("http"), "company.com", "/").await;
        assert_eq!(r.status, 503, "{tls}");
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_cookie_is_secure_on_a_tls_listener() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let (p, c) = (Upstream::start("p").await, Upstream::start("c").await);
    let yaml = format!(
        r#"version: 1
listeners:
  - {{ name: http, bind: "127.0.0.1:{{port:http}}" }}
  - {{ name: https, bind: "127.0.0.1:{{port:https}}", tls: {{ certificates: [{}] }} }}
nodes:
  p: {{ address: "{}" }}
  c: {{ address: "{}" }}
environments:
  production: {{ entries: ["a.test:{{port:https}}", "a.test:{{port:http}}"], nodes: [p], canary: {{ environment: preview, weight: 50, cookie: eg_canary }} }}
  preview: {{ nodes: [c] }}
"#,
        certs_yaml(&[&a]),
        p.addr,
        c.addr
    );
    let eg = Envgate::start(&yaml);
    let s = tls_connect(eg.port("https"), "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut tx = h1(s).await;
    let resp = tx.send_request(get_req("a.test", "/")).await.unwrap();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("Secure"), "{cookie}");
    // Not on the cleartext listener.
    let r = get(eg.port("http"), "a.test", "/").await;
    let cookie = r.headers["set-cookie"].to_str().unwrap();
    assert!(!cookie.contains("Secure"), "{cookie}");
    eg.stop().await;
}

fn envgate_check(dir: &Path, yaml: &str) -> (i32, String) {
    let path = dir.join("topology.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envgate"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn envgate_check_refuses_bad_certificates_with_their_paths() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let b = pki.leaf("b", &["b.test"]);
    let old = pki.leaf_with("old", &["a.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2019, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 1);
    });
    let junk = pki.dir.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let doc = |cert: &Path, key: &Path, hosts: &str| {
        format!(
            r#"version: 1
listeners: [ {{ name: https, bind: "127.0.0.1:8443", tls: {{ certificates: [ {{ cert: "{}", key: "{}" }} ] }} }} ]
nodes: {{ n: {{ address: "127.0.0.1:9" }} }}
environments:
  production: {{ entries: [{hosts}], nodes: [n] }}
"#,
            cert.display(),
            key.display()
        )
    };
    let dir = tempfile::tempdir().unwrap();

    let (code, out) = envgate_check(dir.path(), &doc(&a.cert, &a.key, "\"a.test:8443\""));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");

    // A key that does not match its certificate: refused, both paths named.
    let (code, out) = envgate_check(dir.path(), &doc(&a.cert, &b.key, "\"a.test:8443\""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("listeners[0].tls.certificates[0]"), "{out}");
    assert!(out.contains("does not match"), "{out}");
    assert!(out.contains(&*b.key.to_string_lossy()), "{out}");

    let (code, out) = envgate_check(dir.path(), &doc(&old.cert, &old.key, "\"a.test:8443\""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("expired"), "{out}");

    let (code, out) = envgate_check(dir.path(), &doc(&junk, &a.key, "\"a.test:8443\""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&*junk.to_string_lossy()), "{out}");

    let missing = pki.dir.path().join("missing.crt");
    let (code, out) = envgate_check(dir.path(), &doc(&missing, &a.key, "\"a.test:8443\""));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not exist"), "{out}");

    // An entry no certificate covers is a warning, not a refusal.
    let (code, out) = envgate_check(
        dir.path(),
        &doc(&a.cert, &a.key, "\"a.test:8443\", \"b.test:8443\""),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning") && out.contains("covers b.test"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_on_every_worker_and_certificate_expiry_is_exported() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let api = free_port();
    let control = format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(
        &(tls_topology(&[&a], "", &[&node], &["a.test"], "") + &control),
        2,
    );
    let port = eg.port("https");
    // One client, its session store shared by its connections (as a browser's).
    let client = pki.client(&[b"http/1.1"]);
    let mut kinds = Vec::new();
    for _ in 0..8 {
        let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
        kinds.push(s.get_ref().1.handshake_kind());
        // A request, so that the client reads the session ticket sent after the handshake.
        let mut tx = h1(s).await;
        let (status, _, _) = ask(tx.send_request(get_req("a.test", "/"))).await;
        assert_eq!(status, 200);
    }
    assert_eq!(kinds[0], Some(rustls::HandshakeKind::Full));
    assert!(
        kinds[1..]
            .iter()
            .all(|k| *k == Some(rustls::HandshakeKind::Resumed)),
        "{kinds:?}"
    );

    // The expiry of each certificate served, for an alert before it lapses.
    let (_, s) = scrape(api).await;
    let key = format!(
        "envgate_tls_certificate_expiry_seconds{{certificate=\"{}\",listener=\"https\"}}",
        a.cert.display()
    );
    let expiry = s
        .get(&key)
        .copied()
        .unwrap_or_else(|| panic!("{key} in {s:?}"));
    // rcgen's default validity runs to 4096.
    assert!(expiry > 4_000_000_000.0, "{expiry}");
    eg.stop().await;

    // Resumption off: every handshake is a full one.
    let eg = Envgate::start(&tls_topology(
        &[&a],
        ", session_resumption: false",
        &[&node],
        &["a.test"],
        "",
    ));
    let port = eg.port("https");
    for _ in 0..3 {
        let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
        assert_eq!(
            s.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        let mut tx = h1(s).await;
        let (status, _, _) = ask(tx.send_request(get_req("a.test", "/"))).await;
        assert_eq!(status, 200);
    }
    eg.stop().await;
}

/// An HTTPS server that answers every request with `body` and counts the requests.
async fn https_source(
    config: Arc<rustls::ServerConfig>,
    body: String,
) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (acceptor, body, h) = (acceptor.clone(), body.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, hits)
}

/// Fleet mode over HTTPS: the source's certificate is verified against the CA given
/// (`--topology-ca`); a source whose certificate that CA did not sign is not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_fetches_its_topology_over_https_and_verifies_the_source() {
    use envgate::control::fleet::{self, Follow};
    let pki = Pki::new();
    let leaf = pki.leaf("source", &["localhost"]);
    let (own, theirs) = (
        Upstream::start("own").await,
        Upstream::start("theirs").await,
    );
    let local = format!(
        "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{{port:http}}\" }} ]\nnodes: {{ own: {{ address: \"{}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{{port:http}}\"], nodes: [own] }}\n",
        own.addr
    );
    let served = format!(
        "version: 1\nnodes: {{ theirs: {{ address: \"{}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{{port:http}}\"], nodes: [theirs] }}\n",
        theirs.addr
    );
    let eg = Envgate::start(&local);
    let port = eg.port("http");
    let (src, hits) = https_source(pki.server_config(&leaf), eg.fill(&served)).await;
    let url = format!("https://localhost:{src}/api/v1/topology");
    let poll = Duration::from_millis(100);

    // Signed by another CA: polled, never applied.
    let other = Pki::new();
    let follow = Follow::with_ca(&url, poll, None, Some(&other.ca_path())).unwrap();
    let fleet = fleet::spawn(eg.server().control().clone(), eg.fill(&local), follow, None).unwrap();
    // The handshake fails before any request reaches the source.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(get(port, "company.com", "/").await.node(), "own");
    drop(fleet);

    // The right CA: followed.
    let follow = Follow::with_ca(&url, poll, None, Some(&pki.ca_path())).unwrap();
    let _fleet =
        fleet::spawn(eg.server().control().clone(), eg.fill(&local), follow, None).unwrap();
    let followed = eventually(Duration::from_secs(10), || async {
        get(port, "company.com", "/").await.node() == "theirs"
    })
    .await;
    assert!(followed);
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
    eg.stop().await;
}

/// HTTP/1.1 over TLS is served by the own codec when it is on (`--http1 fast`): the same
/// answers, `X-Forwarded-Proto: https`, 421 for a Host the certificate does not cover,
/// a chunked upload, and HTTP/2 by ALPN still hyper's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_is_the_own_codecs_when_it_is_on() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let b = pki.leaf("b", &["b.test"]);
    let node = Upstream::start("n1").await;
    let api = free_port();
    let yaml = tls_topology(&[&a, &b], "", &[&node], &["a.test", "b.test"], "")
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_codec(
        &yaml,
        1,
        envgate::accesslog::Format::Text,
        None,
        envgate::server::Http1::Fast,
    );
    let port = eg.port("https");
    let served = || async {
        let (_, s) = scrape(api).await;
        sum(
            &s,
            "envgate_http1_fast_requests_total",
            &["outcome=\"served\""],
        )
    };
    let s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut tx = h1(s).await;
    for _ in 0..3 {
        let (status, n, body) = ask(tx.send_request(
            Request::get("/headers")
                .header("host", "a.test")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ))
        .await;
        assert_eq!((status, n.as_str()), (200, "n1"));
        assert!(body.contains("x-forwarded-proto: https"), "{body}");
        tx.ready().await.unwrap();
    }
    // Domain fronting: SNI a.test, Host b.test.
    let (status, _, _) = ask(tx.send_request(get_req("b.test", "/"))).await;
    assert_eq!(status, 421);
    tx.ready().await.unwrap();
    // A streamed (chunked) upload, read whole by the node.
    let mut s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    s.write_all(b"POST /consume HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !(out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"11")) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(served().await, 5.0);
    // HTTP/2 by ALPN stays hyper's.
    let s = tls_connect(port, "a.test", pki.client(&[b"h2"]))
        .await
        .unwrap();
    let mut tx = h2(s).await;
    let (status, _, _) = ask(tx.send_request(
        Request::get("https://a.test/")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(served().await, 5.0);
    eg.stop().await;
}
