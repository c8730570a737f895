//! Restart without refusing a connection: under steady load (a new connection per
//! request, several clients), a second envgate takes the listening sockets over from the
//! running one (`--takeover` / `--upgrade-socket`), which then drains and exits. Not one
//! connection is refused or reset, not one request fails.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn envgate(workers: &str, args: &[&str], conf: &std::path::Path) -> Child {
    Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args([
                "run",
                "--workers",
                workers,
                "--access-log",
                "off",
                "--config",
            ])
            .arg(conf)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// One request on a fresh connection: `Ok(node)` or why it failed.
async fn one(port: u16) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {text}"));
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("x-node: "))
        .unwrap_or("")
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_under_load_refuses_nothing() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let api = free_port();
    let conf = dir.path().join("envgate.yaml");
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\ncontrol: {{ bind: \"127.0.0.1:{api}\" }}\ndefaults: {{ health: {{ interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }} }}\nnodes: {{ a: {{ address: \"{}\" }} }}\nenvironments:\n  e: {{ entries: [\":{port}\"], nodes: [a] }}\n", a.addr),
    )
    .unwrap();
    // One path for every instance, as a service would use.
    let socket = dir.path().join("upgrade.sock");
    let (first_socket, second_socket, third_socket) = (&socket, &socket, &socket);
    // The same command line as the later ones: with nothing to take over, it binds.
    let first = envgate(
        "2",
        &[
            "--takeover",
            first_socket.to_str().unwrap(),
            "--upgrade-socket",
            first_socket.to_str().unwrap(),
        ],
        &conf,
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            one(port).await.is_ok()
        })
        .await
    );

    // Steady load: eight clients, a new connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, ok, failed, errors) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match one(port).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || async {
            ok.load(Ordering::Relaxed) > 200
        })
        .await
    );

    // The second instance (one worker: it serves both of the first's sockets) takes over
    // and the first drains and exits on its own; then a third (three workers: one socket
    // of its own besides the two it inherits) takes over from the second the same way.
    let before = ok.load(Ordering::Relaxed);
    let mut previous = first;
    for (workers, from, to) in [
        ("1", first_socket, second_socket),
        ("3", second_socket, third_socket),
    ] {
        let next = envgate(
            workers,
            &[
                "--takeover",
                from.to_str().unwrap(),
                "--upgrade-socket",
                to.to_str().unwrap(),
            ],
            &conf,
        );
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(s) = previous.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the replaced instance did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status}");
        // The new one serves alone now.
        let after = ok.load(Ordering::Relaxed);
        assert!(
            eventually(Duration::from_secs(10), || async {
                ok.load(Ordering::Relaxed) > after + 500
            })
            .await
        );
        previous = next;
    }
    let second = previous;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(get(api, "localhost", "/healthz").await.status, 200);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests across the takeover ({before} before it), {failed} failed");
    assert_eq!(failed, 0, "{:?}", errors.lock().unwrap());
    drop(second);
}
