//! Fleet mode, over real sockets: an instance that follows another one's topology
//! converges on a change made through the first's API, keeps its own listeners, refuses
//! local writes with 409 naming its source, keeps serving when the source dies, and
//! records a source's garbage once as refused while the last good topology serves.

mod support;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use envgate::control::fleet::{self, Follow};
use envgate::health::NodeRegistry;
use envgate::server::{Options, Server};
use http::{Method, Request};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "fleet-token";
const POLL: Duration = Duration::from_millis(100);

/// The second instance: the same port as the first, on 127.0.0.2 (as two machines would
/// each listen on the same port), with a control endpoint of its own.
struct Follower {
    server: Option<Server>,
    local: String,
    api: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn follower(port: u16, node: SocketAddr, token: &std::path::Path) -> Follower {
    let api = free_port();
    let local = format!(
        "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.2:{port}\" }} ]\ncontrol: {{ bind: \"127.0.0.1:{api}\", token_file: \"{}\" }}\ndefaults: {{ health: {{ interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }} }}\nnodes: {{ own: {{ address: \"{node}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{port}\"], nodes: [own] }}\n",
        token.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let listener = StdListener::bind(("127.0.0.2", port)).unwrap();
    let topology = envgate::config::parse(&local, dir.path()).unwrap();
    let server = envgate::server::start(
        topology,
        Arc::new(NodeRegistry::default()),
        vec![("http".to_string(), listener)],
        Options {
            workers: 2,
            document: local.clone(),
            base_dir: dir.path().to_path_buf(),
            file: None,
            access_log: None,
            inherited: Vec::new(),
            http1: envgate::server::Http1::from_env(),
        },
    )
    .unwrap();
    Follower {
        server: Some(server),
        local,
        api,
        _dir: dir,
    }
}

/// The node that answers `GET /` on `ip:port` for company.com (`None`: no answer).
async fn node_at(ip: &str, port: u16) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).to_string();
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("x-node: "))
        .map(str::to_string)
}

async fn status(api: u16) -> serde_json::Value {
    serde_json::from_slice(&get(api, "localhost", "/api/v1/status").await.body).unwrap()
}

async fn put(api: u16, body: &str, query: &str) -> (http::StatusCode, String) {
    let r = send(
        api,
        Request::builder()
            .method(Method::PUT)
            .uri(format!("/api/v1/topology{query}"))
            .header("host", "localhost")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await;
    (r.status, r.text().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_converges_keeps_serving_and_refuses_local_writes() {
    let (a, b, own) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("own").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let api = free_port();
    let source = |node: &str| {
        Topo::new()
            .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
            .node("a", a.addr)
            .node("b", b.addr)
            .env("blue", &["company.com"], &format!("nodes: [{node}]"))
            .yaml()
            + &format!(
                "control: {{ bind: \"127.0.0.1:{api}\", token_file: \"{}\" }}\n",
                token.display()
            )
    };
    let first = Envgate::start_with(&source("a"), 2);
    let port = first.port("http");
    let second = follower(port, own.addr, &token);
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_at("127.0.0.2", port).await.as_deref() == Some("own")
        })
        .await
    );

    let url = format!("http://127.0.0.1:{api}/api/v1/topology");
    let _fleet = fleet::spawn(
        second.server.as_ref().unwrap().control().clone(),
        second.local.clone(),
        Follow::new(&url, POLL, Some(token.clone())).unwrap(),
        None,
    )
    .unwrap();
    // The follower takes the source's environments and keeps its own listener.
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_at("127.0.0.2", port).await.as_deref() == Some("a")
        })
        .await
    );
    let (s1, s2) = (status(api).await, status(second.api).await);
    assert_eq!(s1["hash"], s2["hash"], "{s1}\n{s2}");
    assert_eq!(s2["follows"], url.as_str());
    let info = |api: u16| async move {
        get(api, "localhost", "/metrics")
            .await
            .text()
            .lines()
            .find(|l| l.starts_with("envgate_topology_info{"))
            .map(str::to_string)
    };
    assert_eq!(info(api).await, info(second.api).await);

    // A change through the source's API reaches the follower within a poll or so.
    let (code, body) = put(api, &first.fill(&source("b")), "").await;
    assert_eq!(code, 200, "{body}");
    let changed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_at("127.0.0.2", port).await.as_deref() == Some("b")
        })
        .await
    );
    eprintln!(
        "follower converged {:?} after the source's apply (poll {POLL:?})",
        changed.elapsed()
    );
    assert_eq!(status(api).await["hash"], status(second.api).await["hash"]);

    // Local writes are refused, naming the source; a dry run is still answered.
    let (code, body) = put(second.api, &second.local, "").await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains(&url), "{body}");
    let (code, body) = put(second.api, &second.local, "?dry_run=true").await;
    assert_eq!(code, 200, "{body}");

    // The source dies: the follower keeps serving its last good topology.
    first.stop().await;
    for _ in 0..5 {
        tokio::time::sleep(POLL).await;
        assert_eq!(node_at("127.0.0.2", port).await.as_deref(), Some("b"));
    }
    let s = status(second.api).await;
    assert_eq!(s["follows"], url.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_source_is_refused_once_and_changes_nothing() {
    let own = Upstream::start("own").await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let garbage = RawNode::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nnodes: [ {{ ".to_vec(),
        After::Close,
    )
    .await;
    let port = free_port();
    let second = follower(port, own.addr, &token);
    let url = format!("http://{}/api/v1/topology", garbage.addr);
    let _fleet = fleet::spawn(
        second.server.as_ref().unwrap().control().clone(),
        second.local.clone(),
        Follow::new(&url, POLL, None).unwrap(),
        None,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            garbage.requests() >= 5
        })
        .await
    );
    assert_eq!(node_at("127.0.0.2", port).await.as_deref(), Some("own"));
    let text = get(second.api, "localhost", "/metrics")
        .await
        .text()
        .to_string();
    assert!(
        text.contains("envgate_topology_reloads_total{source=\"fleet\",result=\"rejected\"} 1\n"),
        "{text}"
    );
    let s = status(second.api).await;
    assert_eq!(s["generation"], 1);
}

/// `envgate run --topology-url`: the follower starts from the source's topology (fetched
/// before it serves) and follows it; its own file gives its listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_follows_a_source() {
    let (a, own) = (Upstream::start("a").await, Upstream::start("own").await);
    let api = free_port();
    let yaml = Topo::new()
        .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let first = Envgate::start(&yaml);
    let port = first.port("http");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("envgate.yaml");
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.2:{port}\" }} ]\nnodes: {{ own: {{ address: \"{}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{port}\"], nodes: [own] }}\n", own.addr),
    )
    .unwrap();
    assert_eq!(node_at("127.0.0.2", port).await, None, "nothing there yet");
    let _child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args([
                "run",
                "--workers",
                "1",
                "--access-log",
                "off",
                "--poll",
                "200ms",
            ])
            .arg("--topology-url")
            .arg(format!("http://127.0.0.1:{api}/api/v1/topology"))
            .arg("--config")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            node_at("127.0.0.2", port).await.as_deref() == Some("a")
        })
        .await
    );
}
