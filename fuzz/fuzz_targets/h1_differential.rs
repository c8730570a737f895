//! Differential: the same request bytes through envgate with hyper's HTTP/1.1 codec and
//! through envgate with its own (`--http1 fast`) must give the node the same requests and
//! the client the same bytes back (the `Date` values and the request ids envgate makes
//! aside, and header fields compared as a set per head).
//!
//! Two envgates run in this process, each in front of a node of its own that records
//! every request it reads (head and body) and answers `/N` with the N-th of a set of
//! answers (lengths, chunked with trailers, close-delimited, 204, 304, 1xx,
//! `Connection`-named fields...). The input is written to one connection to each
//! envgate; what comes back is read until the connection closes or stays quiet.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use envgate::h1::framing::ChunkedDecoder;
use envgate::server::{Http1, Options};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The node's answers, by the number in the request's path (`/N`, else the first), and
/// whether the node closes after it.
const ANSWERS: &[(&[u8], bool)] = &[
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello", false),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n", false),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close", true),
    (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", false),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 5\r\n\r\n", false),
    (b"HTTP/1.1 200 OK\r\nConnection: x-secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok", false),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 201 Made\r\nContent-Length: 3\r\n\r\nnew", false),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nnope", false),
    (b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc", false),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", false),
];

/// How long a connection may stay quiet before what came back is taken as all. A
/// difference is looked at again once (the same input through both), so that a slow
/// answer past this spell is not taken for one.
const QUIET: Duration = Duration::from_millis(50);

struct Side {
    port: u16,
    /// Each request the node read: its head (normalised) and its body.
    seen: Arc<Mutex<Vec<(Vec<String>, Vec<u8>)>>>,
    _server: envgate::server::Server,
}

struct Rig {
    rt: tokio::runtime::Runtime,
    sides: Vec<Side>,
    _dir: tempfile::TempDir,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        // libFuzzer's `main` is not Rust's, which ignores SIGPIPE (as the envgate binary
        // does): a write to a connection the peer closed must fail, not end the process.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread of ours.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sides = Vec::new();
        for codec in [Http1::Hyper, Http1::Fast] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let node = rt.block_on(node(seen.clone()));
            let sock = envgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let port = sock.local_addr().unwrap().port();
            let yaml = format!(
                "version: 1\n\
                 listeners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\n\
                 defaults: {{ health: {{ type: tcp, interval: 1h, timeout: 1s, trust_unknown: true }}, timeouts: {{ client_header: 2s, body_idle: 2s, response_header: 2s }} }}\n\
                 nodes:\n  n: {{ address: \"{node}\" }}\n\
                 environments:\n\
                 \x20 blue: {{ entries: [\"company.com:{port}\"], nodes: [n] }}\n\
                 \x20 small: {{ entries: [\"small.com:{port}\"], nodes: [n], limits: {{ max_request_body: 10 }} }}\n"
            );
            let topology = envgate::config::parse(&yaml, dir.path()).unwrap();
            let server = envgate::server::start(
                topology,
                Arc::new(envgate::health::NodeRegistry::default()),
                vec![("http".to_string(), sock)],
                Options {
                    workers: 1,
                    document: yaml.clone(),
                    base_dir: dir.path().to_path_buf(),
                    file: None,
                    access_log: None,
                    inherited: Vec::new(),
                    http1: codec,
                },
            )
            .unwrap();
            sides.push(Side {
                port,
                seen,
                _server: server,
            });
        }
        // Connections to the nodes opened, code paths warmed: the first answers are the
        // slowest.
        for side in &sides {
            for _ in 0..3 {
                rt.block_on(exchange(
                    side.port,
                    b"GET /0 HTTP/1.1\r\nHost: company.com\r\nConnection: close\r\n\r\n",
                ));
            }
        }
        Rig {
            rt,
            sides,
            _dir: dir,
        }
    })
}

/// The recording node.
async fn node(seen: Arc<Mutex<Vec<(Vec<String>, Vec<u8>)>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(node_conn(s, seen.clone()));
        }
    });
    addr
}

async fn node_conn(mut s: TcpStream, seen: Arc<Mutex<Vec<(Vec<String>, Vec<u8>)>>>) {
    let mut buf = Vec::new();
    loop {
        let (head, n, length, chunked, path) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let mut lines = vec![format!(
                        "{} {} HTTP/1.{}",
                        req.method.unwrap_or(""),
                        req.path.unwrap_or(""),
                        req.version.unwrap_or(9)
                    )];
                    let mut length = 0usize;
                    let mut chunked = false;
                    for f in req.headers.iter() {
                        let name = f.name.to_ascii_lowercase();
                        let value = String::from_utf8_lossy(f.value).to_string();
                        if name == "content-length" {
                            length = value.trim().parse().expect("a length envgate sent");
                        }
                        if name == "transfer-encoding" {
                            chunked = true;
                        }
                        if name != "x-request-id" {
                            lines.push(format!("{name}: {value}"));
                        }
                    }
                    lines[1..].sort();
                    let path = req.path.unwrap_or("").to_string();
                    break (lines, n, length, chunked, path);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => panic!(
                    "envgate sent a node a head it cannot parse ({e}): {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            }
            if !more(&mut s, &mut buf).await {
                return;
            }
        };
        buf.drain(..n);
        let mut body = Vec::new();
        if chunked {
            let mut d = ChunkedDecoder::new();
            loop {
                let (used, data) = d.decode(&buf).expect("a chunked body envgate sent");
                body.extend_from_slice(&buf[data]);
                buf.drain(..used);
                if d.is_done() {
                    break;
                }
                // One call decodes a piece at most: more is read only when it took nothing.
                if used == 0 && !more(&mut s, &mut buf).await {
                    return;
                }
            }
        } else {
            while buf.len() < length {
                if !more(&mut s, &mut buf).await {
                    return;
                }
            }
            body.extend(buf.drain(..length));
        }
        seen.lock().unwrap().push((head, body));
        let i: usize = path
            .trim_start_matches('/')
            .split(['?', '/'])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let (answer, close) = ANSWERS[i % ANSWERS.len()];
        if s.write_all(answer).await.is_err() || close {
            return;
        }
    }
}

async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 8192];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

/// Writes the input, then reads what comes back until the close or a quiet spell.
async fn exchange(port: u16, input: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(input).await;
    let mut back = Vec::new();
    let mut tmp = [0u8; 8192];
    loop {
        match tokio::time::timeout(QUIET, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => back.extend_from_slice(&tmp[..n]),
            _ => return back,
        }
    }
}

/// The bytes the client got, comparable: `Date` fields left out, and each head's fields
/// sorted (hyper writes fields grouped by name).
fn normal(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = Vec::new();
    let mut fields: Option<Vec<String>> = None;
    for line in text.split("\r\n") {
        match &mut fields {
            Some(f) if line.is_empty() => {
                f.sort();
                out.append(f);
                out.push(String::new());
                fields = None;
            }
            Some(f) => {
                let l = line.to_ascii_lowercase();
                if !l.starts_with("date: ") {
                    f.push(l);
                }
            }
            None => {
                out.push(line.to_string());
                if line.starts_with("HTTP/1.") && line.len() >= 12 {
                    fields = Some(Vec::new());
                }
            }
        }
    }
    if let Some(f) = fields {
        out.extend(f);
    }
    out
}

type Outcome = (Vec<Vec<(Vec<String>, Vec<u8>)>>, Vec<Vec<String>>);

/// The input through both envgates: what each node got, and what each client got.
fn run(rig: &Rig, input: &[u8]) -> Outcome {
    for side in &rig.sides {
        side.seen.lock().unwrap().clear();
    }
    let (hyper, fast) = rig.rt.block_on(async {
        tokio::join!(
            exchange(rig.sides[0].port, input),
            exchange(rig.sides[1].port, input)
        )
    });
    let nodes = rig
        .sides
        .iter()
        .map(|s| s.seen.lock().unwrap().clone())
        .collect();
    (nodes, vec![normal(&hyper), normal(&fast)])
}

fuzz_target!(|input: &[u8]| {
    let rig = rig();
    let mut got = run(rig, input);
    if got.0[0] != got.0[1] || got.1[0] != got.1[1] {
        got = run(rig, input);
    }
    let (nodes, clients) = got;
    assert_eq!(
        nodes[0],
        nodes[1],
        "what the node got differs (hyper, then fast) for {:?}; the clients got {:?}",
        String::from_utf8_lossy(input),
        clients
    );
    assert_eq!(
        clients[0],
        clients[1],
        "what the client got differs (hyper, then fast) for {:?}",
        String::from_utf8_lossy(input)
    );
});
