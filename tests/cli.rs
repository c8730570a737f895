//! The `envgate` binary: `check` exit codes and output, the shipped topologies in
//! `config/`, and `run` serving then stopping on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::Child;

fn envgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_envgate"))
}

#[test]
fn every_file_in_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let out = envgate().arg("check").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stdout)
            );
            seen += 1;
        }
    }
    assert!(seen >= 2, "config/ holds {seen} topologies");
}

#[test]
fn check_exit_codes_and_one_problem_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:8080\" } ]\nnodes: { a: { address: \"10.0.0.1:80\" } }\nenvironments:\n  x: { entries: [\"t.com:8080\"], nodes: [a] }\n  y: { entries: [\"t.com:8080\", \":9999\"], nodes: [b] }\n",
    )
    .unwrap();
    let out = envgate().arg("check").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines.iter().any(|l| l.contains("environments.y.entries[0]")
            && l.contains("\"x\"")
            && l.contains("\"y\"")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("environments.y.entries[1]") && l.contains("9999")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("environments.y.nodes[0]") && l.contains("\"b\"")),
        "{text}"
    );

    let syntax = dir.path().join("syntax.yaml");
    std::fs::write(
        &syntax,
        "version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:8080\", port: 1 } ]\n",
    )
    .unwrap();
    let out = envgate().arg("check").arg(&syntax).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown field `port`"));

    let out = envgate()
        .arg("check")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = envgate().arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Sends one request with a raw socket and returns the whole answer.
fn http_get(port: u16, host: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Waits (10 s at most) for a process just started to accept on `port`, then sends it
/// one request.
fn first_answer(port: u16, host: &str) -> String {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nothing accepts on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    http_get(port, host)
}

#[test]
fn run_serves_and_stops_on_sigterm() {
    // A node: a plain TCP server answering every request with 200 "node".
    let node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node_addr = node.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in node.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                let mut line = String::new();
                // Answer each request once its head (up to the empty line) is read.
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n"
                        && stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnode")
                            .is_err()
                    {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("envgate.yaml");
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\ndefaults: {{ health: {{ path: / }} }}\nnodes: {{ a: {{ address: \"{node_addr}\" }} }}\nenvironments:\n  e: {{ entries: [\":{port}\"], nodes: [a] }}\n"),
    )
    .unwrap();
    let log = dir.path().join("envgate.log");
    let mut child = Child(
        envgate()
            .args(["run", "--workers", "1", "--config"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let answer = first_answer(port, "anything");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("node"), "{answer}");
    let pid = child.0.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };

    // SIGHUP re-reads the file: a broken one is refused and the running topology stays...
    std::fs::write(
        &conf,
        "version: 1\nlisteners: [ { name: http, bind: oops } ]\n",
    )
    .unwrap();
    signal("-HUP");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("topology refused")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "broken reload not reported"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...a good one is applied: the port-wide entry becomes an exact host.
    std::fs::write(
        &conf,
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\ndefaults: {{ health: {{ path: / }} }}\nnodes: {{ a: {{ address: \"{node_addr}\" }} }}\nenvironments:\n  e: {{ entries: [\"only.example:{port}\"], nodes: [a] }}\n"),
    )
    .unwrap();
    assert!(http_get(port, "anything").starts_with("HTTP/1.1 200"));
    signal("-HUP");
    let start = Instant::now();
    while !http_get(port, "anything").starts_with("HTTP/1.1 404") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "reload not applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(http_get(port, "only.example").ends_with("node"));

    signal("-TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "envgate did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn demo_serves_its_topology() {
    // A port p with p + 3 free as well.
    let port = (0..50)
        .find_map(|_| {
            let a = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let p = a.local_addr().ok()?.port();
            std::net::TcpListener::bind(("127.0.0.1", p.checked_add(3)?)).ok()?;
            Some(p)
        })
        .expect("no free port pair");
    let _child = Child(
        envgate()
            .args(["demo", "--workers", "1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let answer = first_answer(port, "company.localhost");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("app-1: GET /") || answer.contains("app-2: GET /"),
        "{answer}"
    );
    let answer = http_get(port + 3, "anything.example");
    assert!(answer.ends_with("tools-1: GET /\n"), "{answer}");
}
