//! Review of TLS termination and TLS to nodes, as a hostile client and a misbehaving node:
//! stalled and broken handshakes (bounded, never a node's fault), a node's bad or stalled
//! TLS (its fault, failed over), odd SNI bytes, the 421 Host check and its bypasses, HTTP/2
//! over TLS watchdogs, `unknown_sni: refuse`, and the certificate reload path (bad files,
//! deleted files, symlink swaps, races with the API, expiry).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::pki::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn certs_yaml(leaves: &[(&Path, &Path)]) -> String {
    leaves
        .iter()
        .map(|(c, k)| format!("{{ cert: \"{}\", key: \"{}\" }}", c.display(), k.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pairs(leaves: &[&Leaf]) -> Vec<(PathBuf, PathBuf)> {
    leaves
        .iter()
        .map(|l| (l.cert.clone(), l.key.clone()))
        .collect()
}

/// A TLS listener `https` (and a cleartext `http`), `defaults` as given, nodes `nodes`
/// (YAML lines), environment `production` on the whole `https` port (every Host routes, so
/// a 421 is the only refusal a Host can get).
fn topology(
    certs: &[(PathBuf, PathBuf)],
    tls_extra: &str,
    defaults: &str,
    nodes: &str,
    names: &[&str],
) -> String {
    let certs: Vec<(&Path, &Path)> = certs
        .iter()
        .map(|(c, k)| (c.as_path(), k.as_path()))
        .collect();
    format!(
        r#"version: 1
listeners:
  - {{ name: http, bind: "127.0.0.1:{{port:http}}" }}
  - {{ name: https, bind: "127.0.0.1:{{port:https}}", tls: {{ certificates: [{}]{tls_extra} }} }}
defaults: {{ {defaults} }}
nodes:
{nodes}environments:
  production: {{ entries: [":{{port:https}}", ":{{port:http}}"], nodes: [{}] }}
"#,
        certs_yaml(&certs),
        names.join(", ")
    )
}

fn node_line(n: &Upstream) -> String {
    format!("  {}: {{ address: \"{}\" }}\n", n.name, n.addr)
}

async fn served_cert(port: u16, sni: &str, client: Arc<rustls::ClientConfig>) -> Option<Vec<u8>> {
    tls_connect(port, sni, client)
        .await
        .ok()
        .map(|s| peer_cert(&s))
}

async fn status_of<F>(fut: F) -> u16
where
    F: std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
{
    let resp = fut.await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// A TLS 1.2/1.3-capable ClientHello (supported_versions offers 1.3 and 1.2, key_share
/// x25519 with a dummy key) carrying `sni` as raw bytes (`None`: no SNI extension), and
/// `padding` bytes of a padding extension.
fn client_hello(sni: Option<&[u8]>, padding: usize) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(32);
    body.extend_from_slice(&[9u8; 32]); // legacy session id
                                        // TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, ECDHE-ECDSA/RSA-AES128-GCM-SHA256.
    body.extend_from_slice(&[0x00, 0x08, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]);
    let mut ext = Vec::new();
    if let Some(name) = sni {
        ext.extend_from_slice(&[0x00, 0x00]);
        let list_len = name.len() + 3;
        ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        ext.extend_from_slice(name);
    }
    // signature_algorithms.
    ext.extend_from_slice(&[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ]);
    // supported_groups x25519, secp256r1; ec_point_formats.
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // supported_versions: TLS 1.3, TLS 1.2.
    ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]);
    // key_share: x25519 with 32 bytes.
    ext.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
    ext.extend_from_slice(&[0x11u8; 32]);
    if padding > 0 {
        ext.extend_from_slice(&[0x00, 0x15]);
        ext.extend_from_slice(&(padding as u16).to_be_bytes());
        ext.extend(std::iter::repeat_n(0u8, padding));
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01, 0, 0, 0];
    let len = body.len() as u32;
    hs[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    // Split into records of at most 16 KiB.
    let mut out = Vec::new();
    for chunk in hs.chunks(16384) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// What the server answers a raw ClientHello with: `Some(true)` a ServerHello, `Some(false)`
/// an alert or a close, `None` nothing within 10 s.
async fn answer_to(port: u16, hello: &[u8]) -> Option<bool> {
    let mut s = raw_conn(port).await;
    if s.write_all(hello).await.is_err() {
        return Some(false);
    }
    let mut buf = [0u8; 6];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await {
        Err(_) => None,
        Ok(Err(_)) => Some(false),
        Ok(Ok(_)) => Some(buf[0] == 0x16 && buf[5] == 0x02),
    }
}

/// Whether a TLS stream is closed by the peer within `limit` (EOF or an error).
async fn tls_closes_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn open_on(eg: &Envgate, listener: &str) -> i64 {
    eg.server()
        .control()
        .connections()
        .iter()
        .find(|(n, _)| n == listener)
        .map_or(0, |(_, n)| *n)
}

const SHORT: &str = "timeouts: { client_header: 500ms, idle: 700ms, body_idle: 500ms }";

// ---------------------------------------------------------------------------------------
// A hostile client: stalls and broken framing are bounded and leave nothing behind.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_are_closed_and_leave_no_connection_behind() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]),
        2,
    );
    let port = eg.port("https");

    // 1. TCP only: not a byte.
    let mut silent = raw_conn(port).await;
    // 2. A record header announcing 16 KiB, then 10 bytes, forever.
    let mut partial = raw_conn(port).await;
    partial
        .write_all(&[
            0x16, 0x03, 0x01, 0x40, 0x00, 1, 0, 0x3f, 0xfc, 3, 3, 0, 0, 0, 0,
        ])
        .await
        .unwrap();
    // 3. A whole ClientHello, then nothing (the client never sends its Finished).
    let mut hello_only = raw_conn(port).await;
    hello_only
        .write_all(&client_hello(Some(b"a.test"), 0))
        .await
        .unwrap();
    // 4. A ClientHello dribbled a byte at a time, slower than the bound allows.
    let dribble = tokio::spawn(async move {
        let mut s = raw_conn(port).await;
        for b in client_hello(Some(b"a.test"), 0) {
            if s.write_all(&[b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            open_on(&eg, "https") >= 3
        })
        .await,
        "the connections are open: {:?}",
        eg.server().control().connections()
    );
    let mut out = Vec::new();
    assert!(
        closes_within(&mut silent, Duration::from_secs(10), &mut out).await,
        "silent"
    );
    assert!(
        closes_within(&mut partial, Duration::from_secs(10), &mut out).await,
        "partial record"
    );
    assert!(
        closes_within(&mut hello_only, Duration::from_secs(10), &mut out).await,
        "hello only"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(20), dribble)
            .await
            .expect("the dribbling client is cut off")
            .unwrap(),
        "the dribbling client is cut off before it finishes"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_on(&eg, "https") == 0
        })
        .await,
        "no connection left: {:?}",
        eg.server().control().connections()
    );
    // The listener still serves.
    let s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut tx = h1(s).await;
    assert_eq!(
        status_of(tx.send_request(get_req("a.test", "/"))).await,
        200
    );
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_completes_the_handshake_then_stalls_is_closed() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]),
        1,
    );
    let port = eg.port("https");

    // HTTP/1.1 by ALPN, nothing sent.
    let mut s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    assert!(
        tls_closes_within(&mut s, Duration::from_secs(10)).await,
        "h1, silent"
    );
    // HTTP/2 by ALPN, nothing sent (not even the preface).
    let mut s = tls_connect(port, "a.test", pki.client(&[b"h2"]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert!(
        tls_closes_within(&mut s, Duration::from_secs(10)).await,
        "h2, silent"
    );
    // HTTP/2: the preface and SETTINGS, then no request.
    let mut s = tls_connect(port, "a.test", pki.client(&[b"h2"]))
        .await
        .unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert!(
        tls_closes_within(&mut s, Duration::from_secs(10)).await,
        "h2, no request"
    );
    // A partial application-data record after the handshake, forever (under the TLS layer).
    let mut s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    s.get_mut()
        .0
        .write_all(&[0x17, 0x03, 0x03, 0x01, 0x00, 1, 2, 3])
        .await
        .unwrap();
    assert!(
        tls_closes_within(&mut s, Duration::from_secs(10)).await,
        "partial app record"
    );
    // Slowloris inside TLS: a request head one byte every 100 ms.
    let mut s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in head.iter() {
        if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
            cut = true;
            break;
        }
        let mut one = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut one)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(n)) => {
                // An answer (408) before the head was complete: cut off too.
                assert!(!String::from_utf8_lossy(&one[..n]).starts_with("HTTP/1.1 200"));
                cut = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(
        cut,
        "a slowloris head inside TLS is cut off before it completes"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_on(&eg, "https") == 0
        })
        .await,
        "{:?}",
        eg.server().control().connections()
    );
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_over_tls_is_closed_by_the_watchdog() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]),
        1,
    );
    let port = eg.port("https");
    let s = tls_connect(port, "a.test", pki.client(&[b"h2"]))
        .await
        .unwrap();
    let mut tx = h2(s).await;
    let req = Request::get("https://a.test/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(status_of(tx.send_request(req)).await, 200);
    assert!(
        eventually(Duration::from_secs(10), || {
            let closed = tx.is_closed();
            async move { closed }
        })
        .await,
        "an idle HTTP/2 connection over TLS is closed"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            open_on(&eg, "https") == 0
        })
        .await
    );
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_sni_bytes_and_a_huge_client_hello_do_not_break_the_listener() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    for extra in ["", ", unknown_sni: refuse"] {
        let eg = Envgate::start_with(
            &topology(&pairs(&[&a]), extra, SHORT, &node_line(&node), &["n1"]),
            1,
        );
        let port = eg.port("https");
        let refuse = !extra.is_empty();
        // Sanity: the raw hello works for the certificate's name, any case, trailing dot.
        for name in [&b"a.test"[..], b"A.TEST", b"a.test."] {
            assert_eq!(
                answer_to(port, &client_hello(Some(name), 0)).await,
                Some(true),
                "{} refuse={refuse}",
                String::from_utf8_lossy(name)
            );
        }
        let long = vec![b'a'; 300];
        let label = [b"a".repeat(70), b".test".to_vec()].concat();
        let odd: Vec<Vec<u8>> = vec![
            Vec::new(),
            b".".to_vec(),
            b"..".to_vec(),
            b"a..test".to_vec(),
            b"a.test\0evil".to_vec(),
            vec![0xff, 0xfe, b'.', b't'],
            "ünïcode.test".as_bytes().to_vec(),
            b"*.test".to_vec(),
            b"127.0.0.1".to_vec(),
            b"[::1]".to_vec(),
            b"a.test:443".to_vec(),
            long,
            label,
        ];
        for name in &odd {
            let got = answer_to(port, &client_hello(Some(name), 0)).await;
            assert!(
                got.is_some(),
                "an answer for SNI {:?}",
                String::from_utf8_lossy(name)
            );
            if refuse {
                assert_eq!(
                    got,
                    Some(false),
                    "refused: SNI {:?}",
                    String::from_utf8_lossy(name)
                );
            }
        }
        // No SNI: the default certificate, or refused.
        assert_eq!(answer_to(port, &client_hello(None, 0)).await, Some(!refuse));
        // A ClientHello of ~60 KiB over several records: an answer, whatever it is.
        assert!(answer_to(port, &client_hello(Some(b"a.test"), 60_000))
            .await
            .is_some());
        // A record longer than TLS allows.
        let mut big = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        big.extend(std::iter::repeat_n(0u8, 65535));
        assert_eq!(answer_to(port, &big).await, Some(false));
        // Still serving.
        let s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
            .await
            .unwrap();
        let mut tx = h1(s).await;
        assert_eq!(
            status_of(tx.send_request(get_req("a.test", "/"))).await,
            200
        );
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_refuse_refuses_unknown_names_and_clients_without_sni() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let w = pki.leaf("w", &["*.w.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(
            &pairs(&[&a, &w]),
            ", unknown_sni: refuse",
            SHORT,
            &node_line(&node),
            &["n1"],
        ),
        2,
    );
    let port = eg.port("https");
    let any = any_name_client(&pki, &[b"http/1.1"]);
    assert!(tls_connect(port, "a.test", any.clone()).await.is_ok());
    assert!(tls_connect(port, "x.w.test", any.clone()).await.is_ok());
    for sni in ["b.test", "w.test", "x.y.w.test", "test", "a.test.evil"] {
        assert!(
            tls_connect(port, sni, any.clone()).await.is_err(),
            "{sni} is refused"
        );
    }
    // An IP address as the server name: rustls sends no SNI.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(any.clone())
        .connect(
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
            tcp,
        )
        .await;
    assert!(r.is_err(), "no SNI is refused");
    // Session resumption does not get a refused name through: a session made for a.test
    // on a listener that knows it is not resumed for another name.
    let client = pki.client(&[b"http/1.1"]);
    let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
    let mut tx = h1(s).await;
    assert_eq!(
        status_of(tx.send_request(get_req("a.test", "/"))).await,
        200
    );
    assert!(tls_connect(port, "b.test", any).await.is_err());
    eg.stop().await;
}

/// With `unknown_sni: refuse`, a certificate for an IP address can never be served: the
/// client sends no SNI for an IP address (RFC 6066), and a hello without SNI is refused,
/// although `Names` reads IP SANs and the 421 check and entry warnings count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_an_ip_address_is_reachable_with_unknown_sni_refuse() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let ip = pki.leaf("ip", &["127.0.0.1"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(
            &pairs(&[&a, &ip]),
            ", unknown_sni: refuse",
            SHORT,
            &node_line(&node),
            &["n1"],
        ),
        1,
    );
    let tcp = TcpStream::connect(("127.0.0.1", eg.port("https")))
        .await
        .unwrap();
    let r = tokio_rustls::TlsConnector::from(pki.client(&[b"http/1.1"]))
        .connect(
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
            tcp,
        )
        .await;
    let s = r.expect("https://127.0.0.1/ is served its IP certificate");
    assert_eq!(peer_cert(&s), ip.der);
    eg.stop().await;
}

// ---------------------------------------------------------------------------------------
// The 421 check.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_the_certificate_does_not_cover_gets_421_whatever_its_spelling() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test", "::1"]);
    let b = pki.leaf("b", &["b.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a, &b]), "", SHORT, &node_line(&node), &["n1"]),
        1,
    );
    let port = eg.port("https");
    let p = port.to_string();

    // HTTP/1.1, SNI a.test.
    let covered = [
        "a.test",
        "A.TEST",
        "a.test.",
        "a.test:443",
        &format!("A.Test.:{p}"),
        "[::1]",
        "[::1]:443",
    ];
    let other = [
        "b.test",
        "B.TEST",
        "b.test.",
        "b.test:443",
        &format!("B.test.:{p}"),
        "xa.test",
        "a.tes",
        "x.a.test",
        "a.test.b.test",
        "127.0.0.1",
        "[::2]:443",
        "[0:0:0:0:0:0:0:2]",
    ];
    let s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut tx = h1(s).await;
    for host in covered.iter() {
        tx.ready().await.unwrap();
        assert_eq!(
            status_of(tx.send_request(get_req(host, "/"))).await,
            200,
            "Host {host}"
        );
    }
    for host in other.iter() {
        tx.ready().await.unwrap();
        assert_eq!(
            status_of(tx.send_request(get_req(host, "/"))).await,
            421,
            "Host {host}"
        );
    }
    // Absolute form: its authority wins over Host, both ways.
    let mut s = tls_connect(port, "a.test", pki.client(&[b"http/1.1"]))
        .await
        .unwrap();
    s.write_all(b"GET https://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 421"), "{text}");
    s.write_all(b"GET https://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // HTTP/2: :authority, and a `host` field without :authority.
    let s = tls_connect(port, "a.test", pki.client(&[b"h2"]))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsStream::Client(s);
    let (mut client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    for (uri, host, want) in [
        ("https://A.TEST/", None, 200),
        ("https://a.test./", None, 200),
        ("https://b.test/", None, 421),
        ("https://B.TEST:443/", None, 421),
        ("/", Some("b.test"), 421),
        ("/", Some("a.test"), 200),
        ("https://a.test/", Some("b.test"), 400),
    ] {
        let mut req = Request::get(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let r = h2_send(&mut client, req.body(()).unwrap()).await;
        assert_eq!(r.status.as_u16(), want, "{uri} host {host:?}: {}", r.text());
    }

    // An unknown SNI got the default certificate (a): checked against it.
    let s = tls_connect(port, "zzz.test", any_name_client(&pki, &[b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), a.der);
    let mut tx = h1(s).await;
    assert_eq!(
        status_of(tx.send_request(get_req("a.test", "/"))).await,
        200
    );
    tx.ready().await.unwrap();
    assert_eq!(
        status_of(tx.send_request(get_req("b.test", "/"))).await,
        421
    );
    tx.ready().await.unwrap();
    assert_eq!(
        status_of(tx.send_request(get_req("zzz.test", "/"))).await,
        421
    );
    eg.stop().await;
}

// ---------------------------------------------------------------------------------------
// Blame: a client's broken TLS never counts against a node; a node's does.

/// Two nodes that are ejected at their first failure: if a client fault counted, one of
/// them would be out.
fn strict_defaults() -> String {
    format!(
        "{SHORT}, passive: {{ consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_client_tls_blames_no_node() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let (n1, n2) = (Upstream::start("n1").await, Upstream::start("n2").await);
    let nodes = node_line(&n1) + &node_line(&n2);
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", &strict_defaults(), &nodes, &["n1", "n2"]),
        2,
    );
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    for i in 0..4 {
        // Garbage instead of a hello, a hello then a reset, a client that distrusts us.
        let _ = answer_to(port, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
        let mut s = raw_conn(port).await;
        s.write_all(&client_hello(Some(b"a.test"), 0))
            .await
            .unwrap();
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
        let _ = tls_connect(port, "a.test", Pki::new().client(&[])).await;

        // An upload that reached a node, then a corrupt TLS record mid-body (or a reset).
        let mut s = tls_connect(port, "a.test", client.clone()).await.unwrap();
        let before = n1.hits() + n2.hits();
        s.write_all(
            b"POST /consume HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\nsome of it",
        )
        .await
        .unwrap();
        s.flush().await.unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                n1.hits() + n2.hits() > before
            })
            .await
        );
        if i % 2 == 0 {
            s.get_mut()
                .0
                .write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
                .await
                .unwrap();
            s.get_mut().0.write_all(&[0x55; 32]).await.unwrap();
            let mut out = Vec::new();
            assert!(closes_within(s.get_mut().0, Duration::from_secs(10), &mut out).await);
        } else {
            let _ = socket2::SockRef::from(s.get_ref().0).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    }
    // Both nodes still take turns.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let s = tls_connect(port, "a.test", client.clone()).await.unwrap();
        let mut tx = h1(s).await;
        let r = tx.send_request(get_req("a.test", "/")).await.unwrap();
        assert_eq!(r.status(), 200);
        seen.insert(r.headers()["x-node"].to_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "a node was ejected: {seen:?}");
    let topo = eg.server().control().topology();
    assert!(topo.nodes.iter().all(|n| !n.state.is_ejected()));
    eg.stop().await;
}

/// A node that accepts TCP and never says a TLS word.
async fn stalled_tls_node() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_bad_certificate_or_a_stalled_handshake_is_blamed_and_failed_over() {
    let pki = Pki::new();
    let good_leaf = pki.leaf("good", &["orders.internal"]);
    let impostor = Pki::new();
    let bad_leaf = impostor.leaf("bad", &["orders.internal"]);
    let good = Upstream::start_tls("good", pki.server_config(&good_leaf)).await;
    let bad = Upstream::start_tls("bad", impostor.server_config(&bad_leaf)).await;
    let (stalled, _task) = stalled_tls_node().await;
    let ca = pki.ca_path();
    let tls = format!(
        "tls: {{ server_name: orders.internal, ca: \"{}\" }}",
        ca.display()
    );
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ retries: 2, timeouts: {{ connect: 300ms }}, health: {{ type: tcp, interval: 1m }}, passive: {{ consecutive_failures: 1, max_ejected_percent: 100, ejection: 1m }} }}
nodes:
  good: {{ address: "{}", {tls} }}
  bad: {{ address: "{}", {tls} }}
  stalled: {{ address: "{}", {tls} }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [good, bad, stalled] }}
"#,
        good.addr, bad.addr, stalled
    );
    let eg = Envgate::start_with(&yaml, 1);
    let port = eg.port("http");
    for _ in 0..6 {
        let r = get(port, "company.com", "/").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.node(), "good");
    }
    let topo = eg.server().control().topology();
    for n in &topo.nodes {
        let want = n.name.as_ref() != "good";
        assert_eq!(n.state.is_ejected(), want, "node {}", n.name);
    }
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_over_tls_gives_up_on_a_stalled_handshake() {
    let (stalled, _task) = stalled_tls_node().await;
    let pki = Pki::new();
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ interval: 400ms, timeout: 300ms, fall: 1, rise: 1 }} }}
nodes:
  stalled: {{ address: "{stalled}", tls: {{ server_name: orders.internal, ca: "{}" }} }}
environments:
  production: {{ entries: ["company.com:{{port:http}}"], nodes: [stalled] }}
"#,
        pki.ca_path().display()
    );
    let eg = Envgate::start(&yaml);
    let topo = eg.server().control().topology();
    assert!(
        eventually(Duration::from_secs(10), || async {
            topo.nodes[0].state.health() == envgate::health::Health::Down
        })
        .await,
        "{:?}",
        topo.nodes[0].state.last_check().map(|c| c.detail.clone())
    );
    eg.stop().await;
}

// ---------------------------------------------------------------------------------------
// The certificate reload path.

fn watch(eg: &Envgate) -> envgate::control::watch::FileWatch {
    envgate::control::watch::spawn_files(eg.server().control().clone()).unwrap()
}

async fn serves(port: u16, client: &Arc<rustls::ClientConfig>, want: &[u8]) -> bool {
    let (client, want) = (client.clone(), want.to_vec());
    eventually(Duration::from_secs(10), || {
        let client = client.clone();
        let want = want.clone();
        async move { served_cert(port, "a.test", client).await == Some(want) }
    })
    .await
}

fn rejections(eg: &Envgate) -> usize {
    eg.server()
        .control()
        .history()
        .iter()
        .filter(|r| r.source.as_str() == "certificates" && r.result.as_str() == "rejected")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_deleted_or_half_written_certificate_leaves_the_old_one_serving() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]),
        2,
    );
    let _w = watch(&eg);
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(a.der.clone())
    );

    // Garbage over the certificate.
    let mut refused = rejections(&eg);
    write_atomic(&a.cert, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            rejections(&eg) > refused
        })
        .await
    );
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(a.der.clone())
    );
    // Deleted.
    refused = rejections(&eg);
    std::fs::remove_file(&a.cert).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            rejections(&eg) > refused
        })
        .await
    );
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(a.der.clone())
    );
    // Half-written in place (a `cp` caught midway): the first half of a new certificate.
    let (new_cert, new_key, new_der) = pki.make(&["a.test"], |_| {});
    refused = rejections(&eg);
    std::fs::write(&a.key, &new_key).unwrap();
    std::fs::write(&a.cert, &new_cert.as_bytes()[..new_cert.len() / 2]).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            rejections(&eg) > refused
        })
        .await
    );
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(a.der.clone())
    );
    // The writer finishes: the new certificate is served.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&a.cert)
        .unwrap();
    std::io::Write::write_all(&mut f, &new_cert.as_bytes()[new_cert.len() / 2..]).unwrap();
    drop(f);
    assert!(
        serves(port, &client, &new_der).await,
        "the finished certificate is served"
    );
    // A certificate that is not valid for its key (another key): the new one stays.
    let (_, other_key, _) = pki.make(&["a.test"], |_| {});
    refused = rejections(&eg);
    write_atomic(&a.key, other_key.as_bytes());
    assert!(
        eventually(Duration::from_secs(10), || async {
            rejections(&eg) > refused
        })
        .await
    );
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(new_der)
    );
    eg.stop().await;
}

/// The layout of a Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory and renames a
/// new `..data` symlink over the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_style_data_symlink_swap_reloads_the_certificate() {
    use std::os::unix::fs::symlink;
    let pki = Pki::new();
    let first = pki.leaf("..2026_01/tls", &["a.test"]);
    let vol = pki.dir.path();
    symlink("..2026_01", vol.join("..data")).unwrap();
    symlink("..data/tls.crt", vol.join("tls.crt")).unwrap();
    symlink("..data/tls.key", vol.join("tls.key")).unwrap();
    let node = Upstream::start("n1").await;
    let certs = vec![(vol.join("tls.crt"), vol.join("tls.key"))];
    let eg = Envgate::start_with(&topology(&certs, "", SHORT, &node_line(&node), &["n1"]), 1);
    let _w = watch(&eg);
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(first.der.clone())
    );
    // Let the watch settle on its directories.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let second = pki.leaf("..2026_02/tls", &["a.test"]);
    symlink("..2026_02", vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    std::fs::remove_dir_all(vol.join("..2026_01")).unwrap();
    assert!(
        serves(port, &client, &second.der).await,
        "the swapped certificate is served"
    );
    eg.stop().await;
}

/// A release-style layout: `current -> v1`, the topology names `current/tls.crt`; the
/// update points `current` at `v2`. The directory watched is `current`, which inotify
/// resolves to `v1`: the swap is an event in the parent, which nobody watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_directory_symlink_reloads_the_certificate() {
    use std::os::unix::fs::symlink;
    let pki = Pki::new();
    let first = pki.leaf("v1/tls", &["a.test"]);
    let root = pki.dir.path();
    symlink("v1", root.join("current")).unwrap();
    let node = Upstream::start("n1").await;
    let certs = vec![(root.join("current/tls.crt"), root.join("current/tls.key"))];
    let eg = Envgate::start_with(&topology(&certs, "", SHORT, &node_line(&node), &["n1"]), 1);
    let _w = watch(&eg);
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(first.der.clone())
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let second = pki.leaf("v2/tls", &["a.test"]);
    symlink("v2", root.join("current.tmp")).unwrap();
    std::fs::rename(root.join("current.tmp"), root.join("current")).unwrap();
    assert!(
        serves(port, &client, &second.der).await,
        "the certificate behind the new symlink is served"
    );
    eg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reload_racing_api_applies_never_reverts_the_api_document() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let base = topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]);
    let eg = Envgate::start_with(&base, 2);
    let _w = watch(&eg);
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Renewals keep coming while the API applies documents that differ by a label.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let stop = stop.clone();
        let (cert, key) = (a.cert.clone(), a.key.clone());
        let made: Vec<(String, String)> = (0..6)
            .map(|_| {
                let (c, k, _) = pki.make(&["a.test"], |_| {});
                (c, k)
            })
            .collect();
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (c, k) = &made[i % made.len()];
                write_atomic(&key, k.as_bytes());
                write_atomic(&cert, c.as_bytes());
                i += 1;
                std::thread::sleep(Duration::from_millis(137));
            }
        })
    };
    let mut last = String::new();
    for i in 0..15 {
        let doc = base.replace(
            "production: {",
            &format!("production: {{ labels: {{ round: \"r{i}\" }},"),
        );
        last = eg.fill(&doc);
        let control = eg.server().control().clone();
        let text = last.clone();
        let r = tokio::task::spawn_blocking(move || {
            control.apply(envgate::control::Source::Api, &text, false)
        })
        .await
        .unwrap();
        // A renewal caught half-way may refuse one; the next goes through.
        if r.is_err() {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(90)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    renewer.join().unwrap();
    // Last word to the API: apply the last document once more, after the renewals stopped.
    let control = eg.server().control().clone();
    let text = last.clone();
    tokio::task::spawn_blocking(move || {
        control
            .apply(envgate::control::Source::Api, &text, false)
            .unwrap()
    })
    .await
    .unwrap();
    // Quiet: the watch has nothing more to do; the API's document stays.
    let final_der = {
        let pem = std::fs::read(&a.cert).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
    };
    assert!(serves(port, &client, &final_der).await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(&*eg.server().control().document(), last.as_str());
    let env = &eg.server().control().topology().environments[0];
    assert!(
        format!("{:?}", env.labels).contains("r14"),
        "{:?}",
        env.labels
    );
    eg.stop().await;
}

/// An API apply that moves the certificate to a new directory, then a renewal right after:
/// the watch starts on the new directory only at its next resync (up to a second later),
/// so a change made in between is never seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_right_after_an_api_apply_is_picked_up() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let moved = pki.leaf("moved/a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]),
        1,
    );
    let _w = watch(&eg);
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    eg.apply(&topology(
        &pairs(&[&moved]),
        "",
        SHORT,
        &node_line(&node),
        &["n1"],
    ));
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(moved.der.clone())
    );
    let renewed = pki.leaf("moved/a", &["a.test"]);
    assert!(
        serves(port, &client, &renewed.der).await,
        "the renewal is served"
    );
    eg.stop().await;
}

/// The same, once the watch has resynced on the new directory (it is watched at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_in_a_directory_added_by_an_api_apply_is_watched() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"]);
    let moved = pki.leaf("moved/a", &["a.test"]);
    let node = Upstream::start("n1").await;
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&node), &["n1"]),
        1,
    );
    let _w = watch(&eg);
    let port = eg.port("https");
    let client = pki.client(&[b"http/1.1"]);
    eg.apply(&topology(
        &pairs(&[&moved]),
        "",
        SHORT,
        &node_line(&node),
        &["n1"],
    ));
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(moved.der.clone())
    );
    // Past the watch's resync (RESYNC, 1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewed = pki.leaf("moved/a", &["a.test"]);
    assert!(
        serves(port, &client, &renewed.der).await,
        "the renewal is served"
    );
    // The old directory is no longer what counts: a change there reloads nothing new.
    let generation = eg.server().control().current().generation;
    let _ = pki.leaf("a", &["a.test"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(eg.server().control().current().generation, generation);
    assert_eq!(
        served_cert(port, "a.test", client.clone()).await,
        Some(renewed.der.clone())
    );
    eg.stop().await;
}

/// A certificate that expires while envgate runs: every later change of the topology (a
/// node drained in an incident, a new environment) is refused until it is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_does_not_block_unrelated_changes() {
    let pki = Pki::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires = now + 3;
    let a = pki.leaf_with("a", &["a.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(expires);
    });
    let (n1, n2) = (Upstream::start("n1").await, Upstream::start("n2").await);
    let eg = Envgate::start_with(
        &topology(&pairs(&[&a]), "", SHORT, &node_line(&n1), &["n1"]),
        1,
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                > expires + 1
        })
        .await
    );
    // Add a node: nothing to do with the certificate.
    let doc = eg.fill(&topology(
        &pairs(&[&a]),
        "",
        SHORT,
        &(node_line(&n1) + &node_line(&n2)),
        &["n1", "n2"],
    ));
    let r = eg
        .server()
        .control()
        .apply(envgate::control::Source::Api, &doc, false);
    assert!(r.is_ok(), "an unrelated change is applied: {r:?}");
    eg.stop().await;
}
