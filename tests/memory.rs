//! Large bodies pass through in constant memory: 1 GiB down and 1 GiB up through the
//! `envgate` binary, whose peak resident memory (VmHWM) must stay far below that.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::*;

const GIB: u64 = 1 << 30;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn drain(body: hyper::body::Incoming) -> u64 {
    let mut body = body;
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            n += d.len() as u64;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabytes_stream_in_constant_memory() {
    let node = Upstream::start("a").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("envgate.yaml");
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ a: {{ address: \"{}\" }} }}\nenvironments:\n  e: {{ entries: [\":{port}\"], nodes: [a] }}\n", node.addr),
    )
    .unwrap();
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--workers", "1", "--config"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(eventually(Duration::from_secs(10), || async { get_ok(port).await }).await);
    let before = peak_rss_kib(child.0.id());

    let mut tx = connect(port).await;
    let req = Request::get(format!("/download?bytes={GIB}"))
        .header("host", "x")
        .body(Zeros { left: 0 })
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(drain(resp.into_body()).await, GIB);
    tx.ready().await.unwrap();
    let req = Request::post("/echo")
        .header("host", "x")
        .body(Zeros { left: GIB })
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(drain(resp.into_body()).await, GIB);

    let after = peak_rss_kib(child.0.id());
    // 2 GiB went through; the peak grew by a few buffers at most.
    assert!(
        after < 48 * 1024,
        "peak RSS {after} KiB (was {before} KiB before the transfers)"
    );
}

async fn get_ok(port: u16) -> bool {
    match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        Ok(_) => get(port, "x", "/").await.status == 200,
        Err(_) => false,
    }
}
