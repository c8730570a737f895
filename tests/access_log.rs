//! The access log, over real sockets: one line per exchange with its request id, route
//! and sizes, in text and JSON; sampling and off from the topology; a blocked writer
//! drops (and counts) lines but never a request; the command line's file is reopened on
//! SIGUSR1 and stdout is the default.

mod support;

use std::io::{BufRead, Read};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envgate::accesslog::Format;
use http::Request;
use http_body_util::Full;
use support::*;

const BOUND: Duration = Duration::from_secs(10);

fn topo(a: std::net::SocketAddr, extra: &str) -> String {
    Topo::new()
        .defaults("health: { interval: 50ms, timeout: 50ms, rise: 1, fall: 1 }")
        .node("a", a)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + extra
}

/// Waits (bounded) until the log holds `n` lines, and returns them.
async fn lines(eg: &Envgate, n: usize) -> Vec<String> {
    assert!(
        eventually(BOUND, || async { eg.access_log().len() >= n }).await,
        "expected {n} lines: {:?}",
        eg.access_log()
    );
    eg.access_log()
}

fn request(
    method: &str,
    host: &str,
    path: &str,
    id: Option<&str>,
    body: &str,
) -> Request<Full<Bytes>> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if let Some(id) = id {
        r = r.header("x-request-id", id);
    }
    r.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exchange_writes_one_line_with_its_request_id() {
    for workers in [1, 2] {
        let a = Upstream::start("a").await;
        let eg = Envgate::start_with(&topo(a.addr, ""), workers);
        let port = eg.port("http");

        let r = send(
            port,
            request("GET", "company.com", "/hello?x=1", Some("trace-1234"), ""),
        )
        .await;
        assert_eq!(r.status, 200);
        let line = &lines(&eg, 1).await[0];
        let fields = format!(
            "\"GET company.com /hello?x=1 HTTP/1.1\" 200 env=blue app=- node=a attempts=1 canary=- tenant=- in=0 out={} ",
            r.body.len()
        );
        assert!(line.contains(&fields), "{line}\n{fields}");
        assert!(line.ends_with(" id=trace-1234"), "{line}");
        assert!(line.contains(" 127.0.0.1:"), "{line}");

        // An id envgate made is the one the node saw.
        let r = send(
            port,
            request("POST", "company.com", "/upload", None, "hello"),
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = a.last_headers().unwrap()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let line = &lines(&eg, 2).await[1];
        assert!(line.ends_with(&format!(" id={seen}")), "{line} / {seen}");
        assert!(line.contains(" in=5 "), "{line}");

        // envgate's own answer has a line too.
        assert_eq!(get(port, "nowhere.example", "/x").await.status, 404);
        let line = &lines(&eg, 3).await[2];
        assert!(
            line.contains("\"GET nowhere.example /x HTTP/1.1\" 404 env=- app=- node=- attempts=0"),
            "{line}"
        );
        // One line per exchange, no more (the log is flushed at shutdown).
        let all = eg.stop_with_log().await;
        assert_eq!(all.len(), 3, "{all:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_exchange() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start_logged(&topo(a.addr, ""), 2, Format::Json);
    let port = eg.port("http");
    let mut sizes = Vec::new();
    for i in 0..10 {
        let id = format!("id-{i}");
        let r = send(
            port,
            request("GET", "company.com", &format!("/p/{i}"), Some(&id), ""),
        )
        .await;
        assert_eq!(r.status, 200);
        sizes.push((id, r.body.len()));
    }
    let got = lines(&eg, 10).await;
    assert_eq!(got.len(), 10, "{got:?}");
    for line in &got {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let id = v["request_id"].as_str().unwrap();
        let (_, size) = sizes.iter().find(|(i, _)| i == id).unwrap();
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["environment"], "blue", "{line}");
        assert_eq!(v["node"], "a", "{line}");
        assert_eq!(v["method"], "GET", "{line}");
        assert_eq!(v["host"], "company.com", "{line}");
        assert_eq!(v["bytes_out"], *size as u64, "{line}");
        assert_eq!(v["complete"], true, "{line}");
        assert!(v["duration"].as_f64().unwrap() > 0.0, "{line}");
        assert!(v["upstream_time"].as_f64().unwrap() > 0.0, "{line}");
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    eg.stop().await;
}

/// `access_log: { sample_2xx: 0 }` keeps errors only; `enabled: false` writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_samples_or_turns_the_log_off() {
    let a = Upstream::start("a").await;
    let eg = Envgate::start(&topo(a.addr, "access_log: { sample_2xx: 0 }\n"));
    let port = eg.port("http");
    for _ in 0..20 {
        assert_eq!(get(port, "company.com", "/").await.status, 200);
    }
    assert_eq!(get(port, "nowhere.example", "/").await.status, 404);
    let got = lines(&eg, 1).await;
    assert!(got[0].contains(" 404 "), "{got:?}");

    eg.apply(&topo(a.addr, "access_log: { enabled: false }\n"));
    for _ in 0..5 {
        assert_eq!(get(port, "nowhere.example", "/").await.status, 404);
    }
    // And back on: only the lines after that appear.
    eg.apply(&topo(a.addr, ""));
    assert_eq!(get(port, "company.com", "/back").await.status, 200);
    let got = lines(&eg, 2).await;
    assert!(got[1].contains("/back"), "{got:?}");
    let all = eg.stop_with_log().await;
    assert_eq!(all.len(), 2, "{all:?}");
}

/// A log writer stuck on a full pipe: every request is still served, and the lines that
/// did not fit are counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_log_writer_loses_no_request() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A reader that never reads: the writer fills the pipe, then blocks.
    use std::os::unix::fs::OpenOptionsExt;
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK
        .open(&fifo)
        .unwrap();
    let api = free_port();
    let yaml = topo(
        a.addr,
        &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n"),
    );
    let eg = Envgate::start_log_to(&yaml, 2, Format::Text, Some(fifo.clone()));
    let port = eg.port("http");

    let per = 250;
    let tasks: Vec<_> = (0..32)
        .map(|c| {
            tokio::spawn(async move {
                let mut tx = connect::<Full<Bytes>>(port).await;
                for i in 0..per {
                    tx.ready().await.unwrap();
                    let r = tx
                        .send_request(request(
                            "GET",
                            "company.com",
                            &format!("/flood/{c}/{i}"),
                            None,
                            "",
                        ))
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    use http_body_util::BodyExt;
                    r.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.hits(), 32 * per);
    let dropped = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("envgate_access_log_dropped_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        eventually(BOUND, || async {
            dropped(get(api, "localhost", "/metrics").await.text()) > 0.0
        })
        .await
    );
    // Unblock the writer: what it writes plus what was dropped comes to every exchange
    // (a worker's last lines are handed over within its flush interval, written if the
    // queue has room by then, dropped and counted if not).
    let lines = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let drain = std::thread::spawn({
        let (lines, stop) = (lines.clone(), stop.clone());
        move || {
            let mut reader = reader;
            let mut buf = [0u8; 65536];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let nl = buf[..n].iter().filter(|&&b| b == b'\n').count();
                        lines.fetch_add(nl, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    let total = (32 * per) as f64;
    let settled = eventually(BOUND, || {
        let lines = lines.clone();
        async move {
            let lost = dropped(get(api, "localhost", "/metrics").await.text());
            lines.load(Ordering::Relaxed) as f64 + lost == total
        }
    })
    .await;
    let lost = dropped(get(api, "localhost", "/metrics").await.text());
    let written = lines.load(Ordering::Relaxed) as f64;
    assert!(settled, "written {written} dropped {lost} of {total}");
    eg.stop().await;
    stop.store(true, Ordering::Relaxed);
    drain.join().unwrap();
    // Nothing came after: no line both written and counted as dropped.
    assert_eq!(
        lines.load(Ordering::Relaxed) as f64 + lost,
        total,
        "written {} dropped {lost}",
        lines.load(Ordering::Relaxed)
    );
}

fn write_conf(dir: &std::path::Path, port: u16, node: std::net::SocketAddr) -> std::path::PathBuf {
    let conf = dir.join("envgate.yaml");
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ a: {{ address: \"{node}\" }} }}\nenvironments:\n  e: {{ entries: [\":{port}\"], nodes: [a] }}\n"),
    )
    .unwrap();
    conf
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// `envgate run --access-log FILE`: after logrotate moves the file, SIGUSR1 makes envgate
/// write to a new one; the lines before stay in the moved file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_log_file() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = write_conf(dir.path(), port, a.addr);
    let log = dir.path().join("access.log");
    let child = Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--workers", "2", "--config"])
            .arg(&conf)
            .arg("--access-log")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(BOUND, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await
    );
    assert_eq!(get(port, "x", "/before").await.status, 200);
    let count = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert!(eventually(BOUND, || async { count(&log) == 1 }).await);
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(&child, "-USR1");
    // The reopen happens with the next buffer the writer gets: keep sending until the new
    // file appears (bounded).
    let mut sent = 0;
    let deadline = std::time::Instant::now() + BOUND;
    while count(&log) == 0 {
        assert!(std::time::Instant::now() < deadline, "no new log file");
        assert_eq!(get(port, "x", "/after").await.status, 200);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rotated_text = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        rotated_text.lines().next().unwrap().contains("/before"),
        "{rotated_text}"
    );
    let fresh = std::fs::read_to_string(&log).unwrap();
    assert!(fresh.lines().all(|l| l.contains("/after")), "{fresh}");
    signal(&child, "-TERM");
    let mut child = child;
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    // Every request has its line, in one file or the other.
    assert_eq!(
        count(&rotated) + count(&log),
        1 + sent,
        "{rotated_text}{fresh}"
    );
}

/// By default the access log goes to stdout, one line per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_is_the_default() {
    let a = Upstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = write_conf(dir.path(), port, a.addr);
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--workers", "1", "--log-format", "json", "--config"])
            .arg(&conf)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    assert!(
        eventually(BOUND, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await
    );
    let r = send(port, request("GET", "x", "/stdout", Some("on-stdout"), "")).await;
    assert_eq!(r.status, 200);
    let line = rx.recv_timeout(BOUND).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["request_id"], "on-stdout", "{line}");
    assert_eq!(v["path"], "/stdout", "{line}");
}

/// A client that gives up while envgate waits on the node: its exchange is counted and
/// logged as 499 (the node's request is abandoned with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_exchange_is_a_499() {
    use tokio::io::AsyncWriteExt;
    let a = Upstream::start("a").await;
    let api = free_port();
    let yaml = Topo::new()
        .defaults("health: { interval: 1m, timeout: 1s, trust_unknown: true }")
        .node("a", a.addr)
        .env("blue", &["company.com"], "nodes: [a]")
        .yaml()
        + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n");
    let eg = Envgate::start_with(&yaml, 2);
    let port = eg.port("http");
    a.set_hanging(true);
    let mut s = raw_conn(port).await;
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: company.com\r\nX-Request-Id: gone-1\r\n\r\n")
        .await
        .unwrap();
    // The request is at the node (in flight); then the client goes away.
    assert!(
        eventually(BOUND, || async {
            get(api, "localhost", "/metrics")
                .await
                .text()
                .contains("envgate_in_flight{environment=\"blue\"} 1")
        })
        .await
    );
    drop(s);
    let line = &lines(&eg, 1).await[0];
    assert!(
        line.contains("\"GET company.com /slow HTTP/1.1\" 499 env=blue app=- node=a attempts=1"),
        "{line}"
    );
    assert!(line.ends_with("id=gone-1 cut"), "{line}");
    let key = "envgate_requests_total{environment=\"blue\",node=\"a\",code=\"499\"} 1";
    assert!(
        eventually(BOUND, || async {
            get(api, "localhost", "/metrics").await.text().contains(key)
        })
        .await
    );
    a.set_hanging(false);
    eg.stop().await;
}

/// Requests hyper refuses itself (a request line that does not parse, a head past the
/// size limit), on either codec, have their line and their count, with the status the
/// client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_routing_are_logged_and_counted() {
    let a = Upstream::start("a").await;
    let api = free_port();
    let eg = Envgate::start(
        &(topo(a.addr, "") + &format!("control: {{ bind: \"127.0.0.1:{api}\" }}\n")),
    );
    let port = eg.port("http");
    let bad = raw(port, b"GET /a b c HTTP/1.1\r\nHost: company.com\r\n\r\n").await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: company.com\r\nX-Big: {}\r\n\r\n",
        "b".repeat(66_000)
    );
    let big = raw(port, big.as_bytes()).await;
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    let log = lines(&eg, 2).await;
    assert_eq!(log.len(), 2, "{log:?}");
    for (line, code) in log.iter().zip(["400", "431"]) {
        let fields = format!("\"- - - HTTP/1.1\" {code} env=- app=- node=- attempts=0 ");
        assert!(line.contains(&fields), "{line}\n{fields}");
    }
    let (_, m) = scrape(api).await;
    for code in ["400", "431"] {
        assert_eq!(
            sum(&m, "envgate_requests_total", &[&format!("code=\"{code}\"")]),
            1.0,
            "{code}"
        );
    }
}
