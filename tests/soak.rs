//! Soak: the `envgate` binary (2 workers) in front of 3 nodes for `SOAK_SECS` seconds
//! (default 600) of mixed traffic (keep-alive GETs, GETs on fresh connections, POST /echo
//! with small bodies, HTTP/2 GETs) while nodes fail their health checks, stop and come back
//! on the same address, and the topology file is rewritten (other weights) and reloaded
//! with SIGHUP every 3 s.
//!
//! Expected: GETs never fail (a dead node costs a retry, never an answer); a POST may get
//! 502, or lose its answer midway, only when a node stopped while it was in flight (counted
//! apart as "allowed"); every reload is applied; envgate's resident memory stays flat.
//! Anything else is an unexpected error and fails the test.
//!
//! Ignored by default (it runs for minutes):
//! `cargo test --release --test soak -- --ignored --nocapture`
//! (`SOAK_SECS=60` for a short run, `SOAK_SEED=N` to replay a chaos sequence,
//! `SOAK_DEFAULTS='retry_budget: { percent: 50 }'` to add keys to the topology's
//! `defaults`). envgate's log is copied to `$TMPDIR/envgate-soak.log` at the end.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{eventually, free_port, Child, Upstream};

/// Longest a single exchange may take before it counts as an unexpected error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the topology is rewritten and reloaded.
const RELOAD_EVERY: Duration = Duration::from_secs(3);
/// How often envgate's resident memory is sampled.
const RSS_EVERY: Duration = Duration::from_secs(10);
/// A POST that started this long after a node stopped may still have been cut by the stop
/// (the node's connections close a moment after `stop()`, and envgate may meet a pooled one
/// whose close it has not seen yet). Later than that, the node refuses connections, and a
/// request that never reached a node must go to the next one.
const STOP_MARGIN: Duration = Duration::from_millis(200);
const NODES: [&str; 3] = ["a", "b", "c"];

/// What the run saw, shared by every task.
struct Ctx {
    start: Instant,
    end: Instant,
    done: AtomicBool,
    /// (request kind, outcome) -> count. Outcome: a status, or "error" (no answer).
    counts: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Failures explained by a node stop while the request was in flight.
    allowed: Mutex<BTreeMap<String, u64>>,
    /// (seconds since start, request kind, what happened).
    unexpected: Mutex<Vec<(f64, &'static str, String)>>,
    /// When nodes were stopped.
    stops: Mutex<Vec<Instant>>,
    /// What the chaos task did, and when (seconds since start).
    events: Mutex<Vec<(f64, String)>>,
    flaps: AtomicU64,
    restarts: AtomicU64,
    reloads: AtomicU64,
}

impl Ctx {
    fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst) || Instant::now() >= self.end
    }

    fn count(&self, kind: &'static str, outcome: impl Into<String>) {
        *self
            .counts
            .lock()
            .unwrap()
            .entry((kind, outcome.into()))
            .or_default() += 1;
    }

    fn unexpected(&self, kind: &'static str, what: impl std::fmt::Display) {
        let at = self.start.elapsed().as_secs_f64();
        self.unexpected
            .lock()
            .unwrap()
            .push((at, kind, what.to_string()));
    }

    fn event(&self, what: String) {
        let at = self.start.elapsed().as_secs_f64();
        self.events.lock().unwrap().push((at, what));
    }

    fn allow(&self, what: &str) {
        *self
            .allowed
            .lock()
            .unwrap()
            .entry(what.to_string())
            .or_default() += 1;
    }

    /// Whether a node was stopped while a request that ran from `from` to `to` was in
    /// flight.
    fn stopped_during(&self, from: Instant, to: Instant) -> bool {
        self.stops
            .lock()
            .unwrap()
            .iter()
            .any(|s| *s + STOP_MARGIN >= from && *s <= to)
    }

    /// Sleeps `d`, or less if the run ends meanwhile.
    async fn sleep(&self, d: Duration) {
        let until = (Instant::now() + d).min(self.end);
        while !self.done() && Instant::now() < until {
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(200))).await;
        }
    }
}

/// xorshift64*: reproducible chaos from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// From the high bits, the good ones of xorshift64*.
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 32) % n
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h1_connect(port: u16) -> Result<H1, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(tx)
}

/// The kept keep-alive connection, or a new one; `None` (counted as an unexpected error,
/// after a short pause) when envgate cannot be reached.
async fn reuse_or_connect<'a>(
    ctx: &Ctx,
    kind: &'static str,
    port: u16,
    conn: &'a mut Option<H1>,
) -> Option<&'a mut H1> {
    if conn.is_none() {
        match h1_connect(port).await {
            Ok(tx) => *conn = Some(tx),
            Err(e) => {
                ctx.count(kind, "error");
                ctx.unexpected(kind, e);
                ctx.sleep(Duration::from_millis(100)).await;
                return None;
            }
        }
    }
    conn.as_mut()
}

async fn h2_connect(port: u16) -> Result<H2, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(tx)
}

/// A response read whole, or where the exchange broke.
enum Outcome {
    Answer {
        status: StatusCode,
        node: String,
        body: Bytes,
    },
    /// No response head (connection refused, reset, protocol error, timeout).
    NoAnswer(String),
    /// A head with this status came, then the body broke.
    BodyCut(StatusCode, String),
}

async fn exchange<F>(send: F) -> Outcome
where
    F: std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, String>>,
{
    let work = async {
        let resp = match send.await {
            Ok(r) => r,
            Err(e) => return Outcome::NoAnswer(e),
        };
        let status = resp.status();
        let node = resp
            .headers()
            .get("x-node")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match resp.into_body().collect().await {
            Ok(b) => Outcome::Answer {
                status,
                node,
                body: b.to_bytes(),
            },
            Err(e) => Outcome::BodyCut(status, e.to_string()),
        }
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
        Ok(o) => o,
        Err(_) => Outcome::NoAnswer(format!("no answer within {REQUEST_TIMEOUT:?}")),
    }
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "soak.example")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Counts a GET's outcome: only a 200 from a node, with the node's name as its body, is
/// right. Returns whether the connection is still usable.
fn judge_get(ctx: &Ctx, kind: &'static str, o: Outcome) -> bool {
    match o {
        Outcome::Answer { status, node, body } => {
            if status == StatusCode::OK && !node.is_empty() && body == node.as_bytes() {
                ctx.count(kind, "200");
            } else {
                ctx.count(kind, status.as_str());
                ctx.unexpected(
                    kind,
                    format!(
                        "status {status}, node {node:?}, body {:?}",
                        String::from_utf8_lossy(&body)
                    ),
                );
            }
            true
        }
        Outcome::NoAnswer(e) => {
            ctx.count(kind, "error");
            ctx.unexpected(kind, format!("no answer: {e}"));
            false
        }
        Outcome::BodyCut(status, e) => {
            ctx.count(kind, format!("{} then body error", status.as_str()));
            ctx.unexpected(kind, format!("status {status}, then the body broke: {e}"));
            false
        }
    }
}

/// GETs one after another on one keep-alive connection (a new one after an error).
async fn keepalive_gets(ctx: Arc<Ctx>, port: u16) {
    const KIND: &str = "GET keep-alive";
    let mut conn: Option<H1> = None;
    while !ctx.done() {
        let Some(tx) = reuse_or_connect(&ctx, KIND, port, &mut conn).await else {
            continue;
        };
        let o = exchange(async {
            tx.ready().await.map_err(|e| format!("not ready: {e}"))?;
            tx.send_request(get("/")).await.map_err(|e| e.to_string())
        })
        .await;
        if !judge_get(&ctx, KIND, o) {
            conn = None;
        }
    }
}

/// GETs each on a connection of its own.
async fn fresh_gets(ctx: Arc<Ctx>, port: u16) {
    const KIND: &str = "GET new-connection";
    while !ctx.done() {
        let o = exchange(async {
            let mut tx = h1_connect(port).await?;
            let mut req = get("/fresh");
            req.headers_mut()
                .insert("connection", http::HeaderValue::from_static("close"));
            tx.send_request(req).await.map_err(|e| e.to_string())
        })
        .await;
        judge_get(&ctx, KIND, o);
    }
}

/// HTTP/2 GETs, four streams at a time on one connection (a new one after an error).
async fn h2_gets(ctx: Arc<Ctx>, port: u16) {
    const KIND: &str = "GET HTTP/2";
    let mut conn: Option<H2> = None;
    while !ctx.done() {
        let tx = match &conn {
            Some(tx) => tx.clone(),
            None => match h2_connect(port).await {
                Ok(tx) => conn.insert(tx).clone(),
                Err(e) => {
                    ctx.count(KIND, "error");
                    ctx.unexpected(KIND, e);
                    ctx.sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let streams = (0..4).map(|i| {
            let mut tx = tx.clone();
            async move {
                exchange(async move {
                    let req = Request::get(format!("http://soak.example:{port}/h2/{i}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    tx.ready().await.map_err(|e| format!("not ready: {e}"))?;
                    tx.send_request(req).await.map_err(|e| e.to_string())
                })
                .await
            }
        });
        let mut usable = true;
        for o in futures_join(streams).await {
            usable &= judge_get(&ctx, KIND, o);
        }
        if !usable {
            conn = None;
        }
    }
}

/// Runs the futures concurrently, results in order (no `futures` crate here).
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// POST /echo with small bodies on one keep-alive connection; the node streams the body
/// back. A body-carrying POST is never retried once sent, so a node stopped while it is
/// in flight may cost it (502, or an answer cut midway): allowed, counted apart.
async fn echo_posts(ctx: Arc<Ctx>, port: u16, seed: u64) {
    const KIND: &str = "POST /echo";
    let mut rng = Rng(seed | 1);
    let mut conn: Option<H1> = None;
    while !ctx.done() {
        let Some(tx) = reuse_or_connect(&ctx, KIND, port, &mut conn).await else {
            continue;
        };
        let len = 1 + rng.below(4096) as usize;
        let fill = rng.next() as u8;
        let body: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
        let body = Bytes::from(body);
        let req = Request::post("/echo")
            .header("host", "soak.example")
            .header("content-type", "application/octet-stream")
            .body(Full::new(body.clone()))
            .unwrap();
        let started = Instant::now();
        let o = exchange(async {
            tx.ready().await.map_err(|e| format!("not ready: {e}"))?;
            tx.send_request(req).await.map_err(|e| e.to_string())
        })
        .await;
        let stopped = ctx.stopped_during(started, Instant::now());
        match o {
            Outcome::Answer {
                status,
                body: ref echoed,
                ..
            } if status == StatusCode::OK && *echoed == body => ctx.count(KIND, "200"),
            Outcome::Answer { status, .. } if status == StatusCode::BAD_GATEWAY && stopped => {
                ctx.count(KIND, "502 (allowed)");
                ctx.allow("POST 502: node stopped in flight");
                // envgate closes a connection whose request body it did not read whole.
                conn = None;
            }
            Outcome::Answer {
                status,
                body: echoed,
                node,
            } => {
                ctx.count(KIND, status.as_str());
                let what = if status == StatusCode::OK {
                    format!(
                        "200 from node {node:?} with {} bytes back for {} sent",
                        echoed.len(),
                        body.len()
                    )
                } else {
                    format!("status {status}: {}", String::from_utf8_lossy(&echoed))
                };
                ctx.unexpected(KIND, what);
                if status != StatusCode::OK {
                    // envgate closes a connection whose request body it did not read whole.
                    conn = None;
                }
            }
            Outcome::BodyCut(status, _) if stopped => {
                ctx.count(KIND, format!("{} cut (allowed)", status.as_str()));
                ctx.allow("POST answer cut: node stopped in flight");
                conn = None;
            }
            Outcome::BodyCut(status, e) => {
                ctx.count(KIND, format!("{} then body error", status.as_str()));
                ctx.unexpected(KIND, format!("status {status}, then the body broke: {e}"));
                conn = None;
            }
            Outcome::NoAnswer(e) => {
                ctx.count(KIND, "error");
                ctx.unexpected(
                    KIND,
                    format!(
                        "no answer: {e}{}",
                        if stopped {
                            " (a node stopped meanwhile)"
                        } else {
                            ""
                        }
                    ),
                );
                conn = None;
            }
        }
    }
}

/// One node at a time: fails its health path for a while, or stops (listener and every
/// connection closed) and comes back on the same address. The other two stay healthy, so
/// a usable node always exists (passive ejection takes at most one of three out).
async fn chaos(ctx: Arc<Ctx>, nodes: Arc<Mutex<Vec<Upstream>>>, addrs: Vec<SocketAddr>, seed: u64) {
    let mut rng = Rng(seed | 1);
    // Let the first requests settle first.
    ctx.sleep(Duration::from_secs(2)).await;
    let mut round = 0u64;
    while !ctx.done() {
        round += 1;
        let i = rng.below(NODES.len() as u64) as usize;
        let name = NODES[i];
        // Every third disturbance is a stop, the others health flaps.
        if round % 3 == 0 {
            ctx.stops.lock().unwrap().push(Instant::now());
            nodes.lock().unwrap()[i].stop();
            ctx.event(format!("{name} stopped"));
            ctx.sleep(rng.millis(300, 2000)).await;
            let node = Upstream::start_on(name, addrs[i]).await;
            // The old node (already stopped) is dropped here.
            nodes.lock().unwrap()[i] = node;
            ctx.event(format!("{name} restarted"));
            ctx.restarts.fetch_add(1, Ordering::SeqCst);
        } else {
            nodes.lock().unwrap()[i].set_healthy(false);
            ctx.event(format!("{name} health failing"));
            ctx.flaps.fetch_add(1, Ordering::SeqCst);
            ctx.sleep(rng.millis(500, 3000)).await;
            nodes.lock().unwrap()[i].set_healthy(true);
            ctx.event(format!("{name} health passing"));
        }
        // Time for envgate's checks to see the node back (rise 1, every 200 ms) before
        // another one is touched.
        ctx.sleep(rng.millis(1000, 3000)).await;
    }
}

fn topology(port: u16, addrs: &[SocketAddr], generation: u64) -> String {
    let extra = std::env::var("SOAK_DEFAULTS").unwrap_or_default();
    let weights: [u32; 3] = if generation % 2 == 0 {
        [1, 2, 3]
    } else {
        [3, 2, 1]
    };
    let mut t = format!(
        "version: 1\nlisteners: [ {{ name: http, bind: \"127.0.0.1:{port}\" }} ]\ndefaults:\n  health: {{ interval: 200ms, timeout: 150ms, fall: 2, rise: 1 }}\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        t.push_str(&format!("  {}\n", line.trim()));
    }
    t.push_str("nodes:\n");
    for ((name, addr), w) in NODES.iter().zip(addrs).zip(weights) {
        t.push_str(&format!(
            "  {name}: {{ address: \"{addr}\", weight: {w} }}\n"
        ));
    }
    t.push_str(&format!(
        "environments:\n  production: {{ entries: [\":{port}\"], nodes: [{}] }}\n",
        NODES.join(", ")
    ));
    t
}

/// Replaces the file at once (a reload never reads half of it).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn signal(sig: &str, pid: u32) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Every `RELOAD_EVERY`: the other weights, then SIGHUP.
async fn reloads(ctx: Arc<Ctx>, conf: PathBuf, port: u16, addrs: Vec<SocketAddr>, pid: u32) {
    let mut generation = 0;
    loop {
        ctx.sleep(RELOAD_EVERY).await;
        if ctx.done() {
            return;
        }
        generation += 1;
        write_atomic(&conf, &topology(port, &addrs, generation));
        if signal("-HUP", pid) {
            ctx.reloads.fetch_add(1, Ordering::SeqCst);
        } else {
            ctx.unexpected("reload", "kill -HUP failed");
        }
    }
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for SOAK_SECS (default 600 s): cargo test --release --test soak -- --ignored --nocapture"]
async fn soak() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .map(|s| s.parse().expect("SOAK_SECS is a number of seconds"))
        .unwrap_or(600);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("SOAK_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("soak: {secs} s, seed {seed}");

    let mut upstreams = Vec::new();
    for name in NODES {
        upstreams.push(Upstream::start(name).await);
    }
    let addrs: Vec<SocketAddr> = upstreams.iter().map(|u| u.addr).collect();
    let nodes = Arc::new(Mutex::new(upstreams));

    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("envgate.yaml");
    write_atomic(&conf, &topology(port, &addrs, 0));
    let log = dir.path().join("envgate.log");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_envgate"))
            .args(["run", "--workers", "2", "--config"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let up = eventually(Duration::from_secs(15), || async {
        match h1_connect(port).await {
            Ok(mut tx) => {
                let o =
                    exchange(
                        async move { tx.send_request(get("/")).await.map_err(|e| e.to_string()) },
                    )
                    .await;
                matches!(o, Outcome::Answer { status, .. } if status == StatusCode::OK)
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(up, "envgate does not serve:\n{}", read_log());

    let start = Instant::now();
    let ctx = Arc::new(Ctx {
        start,
        end: start + Duration::from_secs(secs),
        done: AtomicBool::new(false),
        counts: Mutex::default(),
        allowed: Mutex::default(),
        unexpected: Mutex::default(),
        stops: Mutex::default(),
        events: Mutex::default(),
        flaps: AtomicU64::new(0),
        restarts: AtomicU64::new(0),
        reloads: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for _ in 0..2 {
        tasks.push(tokio::spawn(keepalive_gets(ctx.clone(), port)));
    }
    tasks.push(tokio::spawn(fresh_gets(ctx.clone(), port)));
    tasks.push(tokio::spawn(h2_gets(ctx.clone(), port)));
    tasks.push(tokio::spawn(echo_posts(
        ctx.clone(),
        port,
        seed.rotate_left(17),
    )));
    tasks.push(tokio::spawn(chaos(
        ctx.clone(),
        nodes.clone(),
        addrs.clone(),
        seed,
    )));
    tasks.push(tokio::spawn(reloads(
        ctx.clone(),
        conf.clone(),
        port,
        addrs.clone(),
        pid,
    )));

    // Memory and liveness, every RSS_EVERY until the end.
    let mut rss: Vec<(u64, u64)> = Vec::new(); // (seconds since start, KiB)
    rss.push((0, rss_kib(pid).unwrap_or(0)));
    let mut exited = None;
    while !ctx.done() {
        let next = Instant::now() + RSS_EVERY;
        while Instant::now() < next && !ctx.done() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            exited = Some(status);
            ctx.unexpected("envgate", format!("exited: {status}"));
            ctx.done.store(true, Ordering::SeqCst);
            break;
        }
        if let Some(kib) = rss_kib(pid) {
            rss.push((start.elapsed().as_secs(), kib));
        }
    }
    ctx.done.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let ran = start.elapsed();
    {
        let nodes = nodes.lock().unwrap();
        for n in nodes.iter() {
            n.set_healthy(true);
        }
    }
    // A last reload may be in progress: give the log a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // envgate stops cleanly on SIGTERM.
    let mut stop_status = None;
    if exited.is_none() && signal("-TERM", pid) {
        let deadline = Instant::now() + Duration::from_secs(35);
        while Instant::now() < deadline {
            if let Some(s) = child.0.try_wait().unwrap() {
                stop_status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let text = read_log();
    let kept = std::env::temp_dir().join("envgate-soak.log");
    if std::fs::write(&kept, &text).is_ok() {
        println!("envgate log: {}", kept.display());
    }
    let applied = text.matches("topology applied").count() as u64;
    let refused = text.matches("topology refused").count();
    let panics = text.matches("panicked").count();
    let reloads_sent = ctx.reloads.load(Ordering::SeqCst);

    // Summary.
    println!(
        "\n=== soak summary: {:.0} s, seed {seed} ===",
        ran.as_secs_f64()
    );
    println!("requests by kind and outcome:");
    let counts = ctx.counts.lock().unwrap().clone();
    let mut total = 0;
    for ((kind, outcome), n) in &counts {
        println!("  {kind:<20} {outcome:<24} {n}");
        total += n;
    }
    println!(
        "  total {total} ({:.0}/s)",
        total as f64 / ran.as_secs_f64()
    );
    let allowed = ctx.allowed.lock().unwrap().clone();
    println!("allowed failures: {allowed:?}");
    println!(
        "chaos: {} health flaps, {} stop/restarts; reloads: {reloads_sent} sent, {applied} applied, {refused} refused",
        ctx.flaps.load(Ordering::SeqCst),
        ctx.restarts.load(Ordering::SeqCst),
    );
    let kib: Vec<u64> = rss.iter().map(|(_, k)| *k).collect();
    println!(
        "envgate RSS (KiB): first {}, max {}, last {}; samples {:?}",
        kib.first().unwrap_or(&0),
        kib.iter().max().unwrap_or(&0),
        kib.last().unwrap_or(&0),
        rss
    );
    println!("envgate exit on SIGTERM: {stop_status:?}");
    let unexpected = ctx.unexpected.lock().unwrap().clone();
    println!("unexpected errors: {}", unexpected.len());
    // Grouped by kind and what happened: count, first and last time.
    let mut groups: BTreeMap<(&str, &str), (usize, f64, f64)> = BTreeMap::new();
    for (t, kind, what) in &unexpected {
        let g = groups.entry((kind, what)).or_insert((0, *t, *t));
        g.0 += 1;
        g.2 = *t;
    }
    for ((kind, what), (n, first, last)) in groups.iter().take(40) {
        println!("  {n:>6} x {kind}: {what} (t={first:.3}s..{last:.3}s)");
    }
    if !unexpected.is_empty() {
        // When they happened, beside what the chaos task was doing.
        let mut bursts: Vec<(f64, f64, usize)> = Vec::new();
        for (t, _, _) in &unexpected {
            match bursts.last_mut() {
                Some(b) if *t - b.1 < 1.0 => {
                    b.1 = *t;
                    b.2 += 1;
                }
                _ => bursts.push((*t, *t, 1)),
            }
        }
        println!("unexpected errors in bursts (t from..to: count):");
        for (from, to, n) in &bursts {
            println!("  {from:.3}s..{to:.3}s: {n}");
        }
        println!("chaos events:");
        for (t, e) in ctx.events.lock().unwrap().iter() {
            println!("  t={t:.3}s {e}");
        }
    }

    // Verdicts.
    if !unexpected.is_empty() {
        let (t, kind, what) = &unexpected[0];
        panic!(
            "{} unexpected errors (first: t={t:.3}s {kind}: {what})\nenvgate log (tail):\n{}",
            unexpected.len(),
            tail(&text, 60)
        );
    }
    assert_eq!(panics, 0, "envgate panicked:\n{}", tail(&text, 60));
    for kind in [
        "GET keep-alive",
        "GET new-connection",
        "GET HTTP/2",
        "POST /echo",
    ] {
        assert!(
            counts.get(&(kind, "200".to_string())).copied().unwrap_or(0) > 0,
            "no successful {kind}"
        );
    }
    assert_eq!(refused, 0, "a reload was refused:\n{}", tail(&text, 60));
    // The last SIGHUP may still be in flight when the run ends.
    assert!(
        applied + 1 >= reloads_sent && applied <= reloads_sent,
        "{reloads_sent} reloads sent, {applied} applied"
    );
    assert!(
        stop_status.is_some_and(|s| s.success()),
        "envgate did not stop cleanly on SIGTERM: {stop_status:?}\n{}",
        tail(&text, 30)
    );
    // Flat memory: after a warm-up (a fifth of the run, at least 10 s), the last third's
    // peak stays within 20% (or 4 MiB) of the first third's.
    let warm = (secs / 5).max(10);
    let steady: Vec<u64> = rss
        .iter()
        .filter(|(t, _)| *t >= warm)
        .map(|(_, k)| *k)
        .collect();
    if steady.len() >= 2 {
        let k = (steady.len() / 3).max(1);
        let first = *steady[..k].iter().max().unwrap();
        let last = *steady[steady.len() - k..].iter().max().unwrap();
        let slack = (first / 5).max(4 * 1024);
        assert!(
            last <= first + slack,
            "envgate's RSS grew from {first} KiB to {last} KiB (samples {rss:?})"
        );
    } else {
        println!("too few RSS samples after warm-up to judge memory");
    }
}
