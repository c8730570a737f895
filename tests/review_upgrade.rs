//! The takeover against awkward cases, end to end: a listener moved by the new topology,
//! a new instance that fails before it can serve, a silent client on the upgrade socket.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn envgate(args: &[&str], conf: &std::path::Path) -> Child {
    Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--workers", "1", "--access-log", "off", "--config"])
            .arg(conf)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn conf(port: u16, upstream: std::net::SocketAddr) -> String {
    format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ a: {{ address: \"{upstream}\" }} }}\nenvironments:\n  e: {{ entries: [\":{port}\"], nodes: [a] }}\n")
}

async fn serves(port: u16) -> bool {
    eventually(Duration::from_secs(10), || async {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out.starts_with(b"HTTP/1.1 200")
    })
    .await
}

fn exited(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = c.0.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The new topology moves listener `http` to another port: the new instance binds the new
/// address (sockets are taken over by name and address, not by name alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_in_the_new_topology_is_bound_at_its_new_address() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let sock = dir.path().join("u.sock");
    let s = sock.to_str().unwrap();
    let c1 = dir.path().join("one.yaml");
    std::fs::write(&c1, conf(p1, a.addr)).unwrap();
    let mut first = envgate(&["--upgrade-socket", s], &c1);
    assert!(serves(p1).await);
    let c2 = dir.path().join("two.yaml");
    std::fs::write(&c2, conf(p2, a.addr)).unwrap();
    let _second = envgate(&["--takeover", s, "--upgrade-socket", s], &c2);
    let st = exited(&mut first, Duration::from_secs(20));
    assert!(st.is_some(), "the first instance did not hand over");
    let p1_open = std::net::TcpStream::connect(("127.0.0.1", p1)).is_ok();
    let p2_open = std::net::TcpStream::connect(("127.0.0.1", p2)).is_ok();
    assert!(
        p2_open && !p1_open,
        "after the takeover: new address {p2} open = {p2_open}, old address {p1} open = {p1_open}"
    );
}

/// A new instance that cannot serve its own --upgrade-socket fails before it tells the
/// old one to drain: the old one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_that_fails_after_ready_leaves_nobody_serving() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sock = dir.path().join("u.sock");
    let s = sock.to_str().unwrap();
    let c = dir.path().join("c.yaml");
    std::fs::write(&c, conf(port, a.addr)).unwrap();
    let mut first = envgate(&["--upgrade-socket", s], &c);
    assert!(serves(port).await);
    let bad = dir.path().join("missing-dir/u.sock");
    let mut second = envgate(
        &["--takeover", s, "--upgrade-socket", bad.to_str().unwrap()],
        &c,
    );
    let st2 = exited(&mut second, Duration::from_secs(20));
    let st1 = exited(&mut first, Duration::from_secs(20));
    let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(
        open,
        "second exited {st2:?}, first exited {st1:?}: port {port} refuses connections"
    );
}

/// A local client that connects to the upgrade socket and says nothing does not hold up a
/// real upgrade (each peer is served on its own thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_on_the_upgrade_socket_does_not_block_an_upgrade() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sock = dir.path().join("u.sock");
    let s = sock.to_str().unwrap();
    let c = dir.path().join("c.yaml");
    std::fs::write(&c, conf(port, a.addr)).unwrap();
    let _first = envgate(&["--upgrade-socket", s], &c);
    assert!(serves(port).await);
    let _squatter = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut second = envgate(&["--takeover", s], &c);
    let st = exited(&mut second, Duration::from_secs(15));
    assert!(
        st.is_none(),
        "the upgrade failed: new instance exited {st:?}"
    );
}
