//! envgate's own answers to a gRPC client are gRPC errors (HTTP 200, `grpc-status`,
//! `grpc-message`, no body), not JSON; a node's answers pass as they are.

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::*;

fn grpc(uri: &str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_errors_to_grpc_clients_are_grpc_statuses() {
    let live = RawNode::start(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy".to_vec(),
        After::Close,
    )
    .await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ health: {{ type: tcp, interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }}, retries: 0 }}
nodes:
  dead: {{ address: "{dead}" }}
  live: {{ address: "{}" }}
environments:
  down: {{ entries: ["down.test:{{port:http}}"], nodes: [dead] }}
  up: {{ entries: ["up.test:{{port:http}}"], nodes: [live] }}
"#,
        live.addr
    );
    for workers in [1, 2] {
        let eg = Envgate::start_with(&yaml, workers);
        let (mut h2, _conn) = connect_h2(eg.port("http")).await;
        for (uri, code, reason) in [
            // Every node down: UNAVAILABLE.
            ("http://down.test/pkg.Svc/Call", "14", "no_healthy_node"),
            // No entry: UNIMPLEMENTED.
            ("http://nowhere.test/pkg.Svc/Call", "12", "no_route"),
        ] {
            let resp = h2.send_request(grpc(uri)).await.unwrap();
            assert_eq!(resp.status(), 200, "{uri}");
            assert_eq!(resp.headers()["content-type"], "application/grpc");
            assert_eq!(resp.headers()["grpc-status"], code, "{uri}");
            let msg = resp.headers()["grpc-message"].to_str().unwrap().to_string();
            assert!(msg.contains(reason), "{msg}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(body.is_empty(), "{body:?}");
        }
        // A node's answer is the node's, even an error.
        let resp = h2
            .send_request(grpc("http://up.test/pkg.Svc/Call"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().get("grpc-status").is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "busy");
        // The same errors to a client that is not gRPC stay JSON.
        let r = get(eg.port("http"), "down.test", "/").await;
        assert_eq!(r.status, 503);
        assert!(r.text().contains("no_healthy_node"), "{}", r.text());
        eg.stop().await;
    }
}
