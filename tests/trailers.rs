//! Trailers: a node's HTTP/1.1 trailers reach HTTP/1.1 and HTTP/2 clients that said
//! `TE: trailers`, and that `TE: trailers` reaches the node (the rest of `TE` is hop-by-hop).

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

const CHUNKED_WITH_TRAILERS: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status, x-checksum\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\nx-checksum: abc123\r\n\r\n";

fn topology(node: std::net::SocketAddr) -> String {
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ trust_unknown: true, interval: 1h }} }}
nodes: {{ n: {{ address: "{node}" }} }}
environments:
  production: {{ entries: [":{{port:http}}"], nodes: [n] }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_from_a_node_reach_http1_and_http2_clients_that_accept_them() {
    for workers in [1, 2] {
        let node = RawNode::start(CHUNKED_WITH_TRAILERS.to_vec(), After::Close).await;
        let eg = Envgate::start_with(&topology(node.addr), workers);
        let port = eg.port("http");

        // HTTP/1.1 with TE: trailers.
        let mut tx = connect::<Full<Bytes>>(port).await;
        let req = Request::get("/")
            .header("host", "company.com")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers over HTTP/1.1");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-checksum"], "abc123");
        assert_eq!(collected.to_bytes(), "hello");

        // HTTP/2 (prior knowledge): trailers are a HEADERS frame that ends the stream.
        let (mut h2, _conn) = connect_h2(port).await;
        let req = Request::get("http://company.com/")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers over HTTP/2");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "hello");

        // A client that did not ask for them still gets the whole body.
        let r = get(port, "company.com", "/").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello");
        eg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_reaches_the_node_and_other_te_codings_do_not() {
    let node = Upstream::start("n").await;
    let eg = Envgate::start(&topology(node.addr));
    let port = eg.port("http");
    for (te, forwarded) in [
        ("trailers", Some("trailers")),
        ("gzip;q=0.5, trailers", Some("trailers")),
        ("gzip", None),
    ] {
        let req = Request::get("/headers")
            .header("host", "company.com")
            .header("te", te)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(port, req).await;
        assert_eq!(r.status, 200);
        let seen = node.last_headers().unwrap();
        assert_eq!(
            seen.get("te").map(|v| v.to_str().unwrap()),
            forwarded,
            "TE: {te}"
        );
    }
    eg.stop().await;
}
