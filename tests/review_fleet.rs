//! Fleet mode, SO_REUSEPORT listeners and the systemd watchdog against hostile input: a
//! source document that only the apply path accepts, a source document this instance
//! refuses at start, a listener on the control endpoint's address, a zero watchdog period.

mod support;

use std::sync::Arc;
use std::time::Duration;

use envgate::control::fleet::{self, Follow};
use envgate::health::NodeRegistry;
use envgate::server::Options;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP server that answers every request with 200 and `body` (as "any HTTP
/// server serving a topology document" may), closing after each answer.
async fn static_source(body: String) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/yaml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    port
}

/// A source document with a listener `src` on `port` and a node map that holds the key
/// `n` twice (a YAML document every other envgate path accepts: the last entry wins).
fn source_doc_with_duplicate_node(port: u16, node: std::net::SocketAddr) -> String {
    format!(
        "version: 1\nlisteners: [ {{ name: src, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ n: {{ address: \"127.0.0.1:5\" }}, n: {{ address: \"{node}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{port}\"], nodes: [n] }}\n"
    )
}

/// A source document that `merge` cannot read but the apply path would accept (a node
/// map with a repeated key) is refused: the follower never applies the source's own
/// `listeners` (it would bind the source's port and close its own listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_never_takes_the_sources_listeners() {
    let own = Upstream::start("own").await;
    let theirs = Upstream::start("theirs").await;
    let src_port = free_port();
    let source = static_source(source_doc_with_duplicate_node(src_port, theirs.addr)).await;

    let http = envgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = http.local_addr().unwrap().port();
    let local = format!(
        "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ own: {{ address: \"{}\" }} }}\nenvironments:\n  blue: {{ entries: [\"company.com:{port}\"], nodes: [own] }}\n",
        own.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let topology = envgate::config::parse(&local, dir.path()).unwrap();
    let server = envgate::server::start(
        topology,
        Arc::new(NodeRegistry::default()),
        vec![("http".to_string(), http)],
        Options {
            workers: 1,
            document: local.clone(),
            base_dir: dir.path().to_path_buf(),
            file: None,
            access_log: None,
            inherited: Vec::new(),
            http1: envgate::server::Http1::from_env(),
        },
    )
    .unwrap();
    let follow = Follow::new(
        &format!("http://127.0.0.1:{source}/api/v1/topology"),
        Duration::from_millis(100),
        None,
    )
    .unwrap();
    let control = server.control().clone();
    let fleet = fleet::spawn(control.clone(), local, follow, None).unwrap();
    // Give the follower a few polls.
    let took = eventually(Duration::from_secs(3), || {
        let c = control.clone();
        async move { c.current().generation > 1 }
    })
    .await;
    let names: Vec<String> = control
        .topology()
        .listeners
        .iter()
        .map(|l| l.name.to_string())
        .collect();
    drop(fleet);
    tokio::task::spawn_blocking(move || server.shutdown())
        .await
        .unwrap();
    assert!(
        !took || names == ["http"],
        "the follower applied the source's listeners: {names:?} (its own `http` on {port} is closed, the source's {src_port} is bound)"
    );
}

/// `envgate run --topology-url`: a source that answers with a mapping that does not
/// validate here leaves the file's topology serving ("garbage changes nothing"): a bad
/// source document must not crash-loop every follower.
#[test]
fn a_bad_source_document_at_start_does_not_stop_the_follower() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let source = rt.block_on(static_source("version: 1\nnodes: 5\n".to_string()));
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("envgate.yaml");
    std::fs::write(
        &file,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\n"),
    )
    .unwrap();
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--config"])
            .arg(&file)
            .args(["--access-log", "off", "--workers", "1", "--topology-url"])
            .arg(format!("http://127.0.0.1:{source}/api/v1/topology"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let mut exited = None;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if exited.is_some() {
        let mut err = String::new();
        use std::io::Read;
        let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
        panic!("the follower exited ({exited:?}) instead of serving the file's topology:\n{err}");
    }
}

/// An apply that adds a listener on the control endpoint's own address is refused (with
/// SO_REUSEPORT the kernel would otherwise split new connections to that address between
/// the control API and the proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_the_control_address_is_refused() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let base = Topo::new()
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(&base, 2);
    assert_eq!(get(api, "localhost", "/healthz").await.status, 200);
    let stolen = eg.fill(&base).replacen(
        "listeners: [ ",
        &format!("listeners: [ {{ name: stolen, bind: \"127.0.0.1:{api}\" }}, "),
        1,
    );
    let applied = eg
        .server()
        .control()
        .apply(envgate::control::Source::Api, &stolen, false);
    let mut not_control = 0;
    if applied.is_ok() {
        for _ in 0..40 {
            if get(api, "localhost", "/healthz").await.status != 200 {
                not_control += 1;
            }
        }
    }
    eg.stop().await;
    assert!(
        applied.is_err(),
        "a listener on the control endpoint's address {api} was applied; {not_control}/40 fresh requests to /healthz there reached the proxy instead"
    );
}

/// `WATCHDOG_USEC` below 2 (or 0) would make the ping period zero (and
/// `tokio::time::interval(Duration::ZERO)` panics): the watchdog is off instead.
#[test]
fn a_tiny_watchdog_period_does_not_panic() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("envgate.yaml");
    std::fs::write(
        &file,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\n"),
    )
    .unwrap();
    // `exec` keeps the shell's pid, which WATCHDOG_PID must name.
    let mut child = Child(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("export WATCHDOG_PID=$$; exec \"$0\" run --access-log off --workers 1 --config \"$1\"")
            .arg(env!("CARGO_BIN_EXE_envgate"))
            .arg(&file)
            .env("WATCHDOG_USEC", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("envgate exited ({status}) with WATCHDOG_USEC=1:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
