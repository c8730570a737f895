//! The `envgate` binary: `check` exit codes and output, the shipped topologies in
//! `config/`, `run` serving then stopping on SIGTERM, and signals that arrive during
//! start-up.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{free_port, Child};

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

/// Writes `yaml` into `dir` as `name` and runs `envgate check` on it: the exit code and
/// what it printed.
fn check_file(dir: &std::path::Path, name: &str, yaml: &str) -> (Option<i32>, String) {
    let file = dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    let out = envgate().arg("check").arg(&file).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn check_exit_codes_and_one_problem_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = check_file(
        dir.path(),
        "bad.yaml",
        "version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:8080\" } ]\nnodes: { a: { address: \"10.0.0.1:80\" } }\nenvironments:\n  x: { entries: [\"t.com:8080\"], nodes: [a] }\n  y: { entries: [\"t.com:8080\", \":9999\"], nodes: [b] }\n",
    );
    assert_eq!(code, Some(1));
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

    let (code, text) = check_file(
        dir.path(),
        "syntax.yaml",
        "version: 1\nlisteners: { name: http, bind: \"0.0.0.0:8080\" }\n",
    );
    assert_eq!(code, Some(1));
    assert!(
        text.contains("listeners") && text.contains("line"),
        "{text}"
    );

    let out = envgate()
        .arg("check")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = envgate().arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_reports_a_typo_and_the_other_problems() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = check_file(
        dir.path(),
        "typo.yaml",
        "version: 1\nlisteners: [ { name: http, bind: \"0.0.0.0:8080\" } ]\nnodes: { a: { address: \"10.0.0.1:80\" } }\nenvironments:\n  staging: { entires: [\"s.com:8080\"], nodes: [a, ghost] }\n",
    );
    assert_eq!(code, Some(1));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("environments.staging.entires")
            && lines[0].contains("unknown key \"entires\""),
        "{text}"
    );
    assert!(
        lines[1].contains("environments.staging.nodes[1]") && lines[1].contains("\"ghost\""),
        "{text}"
    );
}

/// Sends one request with a raw socket and returns the whole answer.
fn http_get(port: u16, host: &str) -> String {
    http_get_with(port, host, "")
}

/// `GET /` with `extra` header lines (each ending in CRLF).
fn http_get_with(port: u16, host: &str, extra: &str) -> String {
    request(port, "/", host, extra)
}

/// `GET path` to localhost.
fn http_get_path(port: u16, path: &str) -> String {
    request(port, path, "localhost", "")
}

fn request(port: u16, path: &str, host: &str, extra: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
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
    // A port p with p + 3 and p + 10 (the control endpoint) free as well.
    let port = (0..50)
        .find_map(|_| {
            let a = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let p = a.local_addr().ok()?.port();
            std::net::TcpListener::bind(("127.0.0.1", p.checked_add(3)?)).ok()?;
            std::net::TcpListener::bind(("127.0.0.1", p.checked_add(10)?)).ok()?;
            Some(p)
        })
        .expect("no free ports");
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
    let answer = http_get_with(port, "company.localhost", "X-Canary: never\r\n");
    assert!(
        answer.contains("app-1: GET /") || answer.contains("app-2: GET /"),
        "{answer}"
    );
    let answer = http_get_with(port, "company.localhost", "X-Canary: always\r\n");
    assert!(answer.ends_with("canary-1: GET /\n"), "{answer}");
    let answer = http_get_with(port, "company.localhost", "Cookie: envgate_canary=42\r\n");
    assert!(answer.ends_with("canary-1: GET /\n"), "{answer}");
    let answer = http_get_with(port, "company.localhost", "X-Tenant-Id: 1001\r\n");
    assert!(answer.ends_with("acme-1: GET /\n"), "{answer}");
    let answer = http_get(port + 3, "anything.example");
    assert!(answer.ends_with("tools-1: GET /\n"), "{answer}");
    // The control endpoint: the status page and the metrics.
    let answer = http_get(port + 10, "localhost");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("<title>envgate</title>"), "{answer}");
    let answer = http_get_path(port + 10, "/metrics");
    assert!(
        answer.contains("envgate_node_up{node=\"app-1\"}"),
        "{answer}"
    );
    // The requests above were counted (the tenant's went to private-acme on acme-1).
    assert!(
        answer.contains(
            "envgate_requests_total{environment=\"private-acme\",node=\"acme-1\",code=\"200\"} 1"
        ),
        "{answer}"
    );
}

fn kill(sig: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success())
}

/// Waits (10 s at most) for `child` to exit.
fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "envgate did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `envgate run` held in its start-up: its topology file is a FIFO, so reading it waits
/// until `release` writes the topology.
struct HeldStart {
    dir: tempfile::TempDir,
    conf: std::path::PathBuf,
    log: std::path::PathBuf,
    port: u16,
    child: Child,
}

/// Starts `envgate run` on a FIFO and waits (10 s at most) until SIGHUP, SIGINT and SIGTERM
/// are caught: a signal sent before the program reaches `main` meets the default action
/// whatever it does, so the test starts signalling from there, with start-up still held
/// at reading the topology (before any listener is bound).
fn held_start() -> HeldStart {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("envgate.yaml");
    assert!(Command::new("mkfifo")
        .arg(&conf)
        .status()
        .unwrap()
        .success());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
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
    // Bits of SIGHUP (1), SIGINT (2) and SIGTERM (15) in /proc's signal masks.
    const HANDLED: u64 = 1 << 0 | 1 << 1 | 1 << 14;
    let pid = child.0.id();
    let start = Instant::now();
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0);
        if caught & HANDLED == HANDLED {
            break;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "envgate exited: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP, SIGINT and SIGTERM are not caught while the topology is read (SigCgt {caught:x})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    HeldStart {
        dir,
        conf,
        log,
        port,
        child,
    }
}

impl HeldStart {
    /// Lets start-up go on with a topology that serves `only.example` on the port. Once
    /// envgate has the FIFO open, a regular file with the same text takes its name, so a
    /// later reload reads that.
    fn release(&self) {
        let port = self.port;
        let text = format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\nnodes: {{ a: {{ address: \"127.0.0.1:1\" }} }}\nenvironments:\n  e: {{ entries: [\"only.example:{port}\"], nodes: [a] }}\n");
        let plain = self.dir.path().join("plain.yaml");
        std::fs::write(&plain, &text).unwrap();
        let (conf, done) = (self.conf.clone(), std::sync::mpsc::channel());
        std::thread::spawn(move || {
            // Opening a FIFO for writing waits for its reader.
            let mut fifo = std::fs::OpenOptions::new().write(true).open(&conf).unwrap();
            std::fs::rename(&plain, &conf).unwrap();
            fifo.write_all(text.as_bytes()).unwrap();
            drop(fifo);
            let _ = done.0.send(());
        });
        done.1
            .recv_timeout(Duration::from_secs(10))
            .expect("envgate never read its topology");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

#[test]
fn sighup_during_start_up_does_not_stop_it() {
    let mut held = held_start();
    let pid = held.child.0.id();
    // SIGHUP a few times over 200 ms, before the topology is even read.
    for _ in 0..5 {
        kill("-HUP", pid);
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            held.child.0.try_wait().unwrap().is_none(),
            "SIGHUP during start-up stopped envgate: {}",
            held.log()
        );
    }
    held.release();
    let answer = first_answer(held.port, "anything");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    // The SIGHUP was kept, not lost: once serving, the file is read again (and found to
    // be the document running).
    let start = Instant::now();
    while !held.log().contains("topology read again: no change") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no reload after start-up: {}",
            held.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(http_get(held.port, "anything").starts_with("HTTP/1.1 404"));

    kill("-TERM", pid);
    let status = exit_status(&mut held.child);
    assert!(status.success(), "{status:?}: {}", held.log());
}

#[test]
fn sigterm_during_start_up_stops_it_cleanly() {
    let mut held = held_start();
    kill("-TERM", held.child.0.id());
    held.release();
    let status = exit_status(&mut held.child);
    assert!(status.success(), "{status:?}: {}", held.log());
}

#[test]
fn apply_status_and_explain_talk_to_a_running_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (port, api) = (free_port(), free_port());
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let doc = |env: &str| {
        format!("version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\ncontrol: {{ bind: \"127.0.0.1:{api}\", token_file: token }}\nnodes: {{ a: {{ address: \"127.0.0.1:1\" }} }}\nenvironments:\n  {env}: {{ entries: [\"company.com:{port}\"], nodes: [a] }}\n")
    };
    let conf = dir.path().join("envgate.yaml");
    std::fs::write(&conf, doc("blue")).unwrap();
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
    let _ = first_answer(port, "company.com");
    let cli = |args: &[&str]| {
        let out = envgate()
            .args(args)
            .arg("--config")
            .arg(&conf)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // A dry run, then the change; both found through the topology file's control key.
    let next = dir.path().join("next.yaml");
    std::fs::write(&next, doc("green")).unwrap();
    let next = next.to_str().unwrap();
    let (code, out) = cli(&["apply", next, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("\"dry_run\": true") && out.contains("+environment green"),
        "{out}"
    );
    let (code, out) = cli(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"generation\": 1"), "{out}");
    let (code, out) = cli(&["apply", next]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"generation\": 2"), "{out}");
    let (code, out) = cli(&[
        "explain",
        &format!("http://company.com:{port}/x?y=1"),
        "-H",
        "X-Tenant-Id: 5",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"environment\": \"green\""), "{out}");

    // A document that does not validate: exit 1, one problem a line with its path.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, doc("red").replace("nodes: [a]", "nodes: [ghost]")).unwrap();
    let (code, out) = cli(&["apply", bad.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("environments.red.nodes[0]:") && out.contains("(reference)"),
        "{out}"
    );
    // No endpoint there: exit 2.
    let out = envgate()
        .args(["status", "--control", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    kill("-TERM", child.0.id());
    assert!(
        exit_status(&mut child).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}
