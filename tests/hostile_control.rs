//! Hostile probes of the control plane: the control endpoint as an attacker or a clumsy
//! token holder would use it, the topology file as a clumsy operator or file system would
//! leave it: lost updates, stalls of the control thread (which also runs the health
//! checkers), patches that grow without bound, write-backs over symlinks and over an
//! operator's edit, tokens, entity tags, history bounds and the file watch's edges.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use envgate::control::{watch, Outcome, Source};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "s3cret-token";
/// Nesting depth of the slow document (about 2 s of libyaml in a debug build).
const DEPTH: usize = 16_000;

struct Setup {
    eg: Envgate,
    api: u16,
    token_file: PathBuf,
    _a: Upstream,
    _b: Upstream,
    _tokdir: tempfile::TempDir,
    base: String,
}

impl Setup {
    fn path(&self) -> PathBuf {
        self.eg.dir.path().join("envgate.yaml")
    }
    fn doc(&self) -> String {
        self.eg.server().control().document().to_string()
    }
    /// The running document with the canary weight set to `w` (a valid, different one).
    fn weight(&self, w: u32) -> String {
        let d = self.base.clone();
        assert!(d.contains("weight: 0,"));
        d.replace("weight: 0,", &format!("weight: {w},"))
    }
    fn generation(&self) -> u64 {
        self.eg.server().topology().generation
    }
}

async fn setup() -> Setup {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let api = free_port();
    let tokdir = tempfile::tempdir().unwrap();
    let token_file = tokdir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let yaml = Topo::new()
        .defaults("health: { interval: 100ms, timeout: 100ms, rise: 1, fall: 1 }")
        .node("a", a.addr)
        .node("b", b.addr)
        .env(
            "blue",
            &["company.com"],
            "nodes: [a], canary: { environment: green, weight: 0, header: X-Canary, cookie: c }",
        )
        .env("green", &[], "nodes: [b]")
        .yaml()
        + &format!(
            "control: {{ bind: \"127.0.0.1:{api}\", token_file: \"{}\" }}\n",
            token_file.display()
        );
    let eg = Envgate::start(&yaml);
    let base = eg.server().control().document().to_string();
    Setup {
        base,
        eg,
        api,
        token_file,
        _a: a,
        _b: b,
        _tokdir: tokdir,
    }
}

/// One raw request on a fresh connection (`Connection: close`): (status, head, body).
async fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    read_answer(&mut s).await
}

async fn read_answer(s: &mut TcpStream) -> (u16, String, String) {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn auth() -> (&'static str, String) {
    ("authorization", format!("Bearer {TOKEN}"))
}

async fn put(port: u16, path: &str, body: &str) -> (u16, String, String) {
    let (k, v) = auth();
    call(port, "PUT", path, &[(k, &v)], body.as_bytes()).await
}

async fn patch(port: u16, body: &str) -> (u16, String, String) {
    let (k, v) = auth();
    call(
        port,
        "PATCH",
        "/api/v1/topology",
        &[(k, &v)],
        body.as_bytes(),
    )
    .await
}

async fn etag(port: u16) -> String {
    let (st, head, _) = call(port, "GET", "/api/v1/topology", &[], b"").await;
    assert_eq!(st, 200);
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("etag:")
                .then(|| l[5..].trim().to_string())
        })
        .unwrap()
}

/// The longest a `/healthz` answer took (the control thread's responsiveness, which is
/// also the health checkers' runtime) while `work` runs.
async fn max_healthz_latency<F: std::future::Future>(port: u16, work: F) -> (Duration, F::Output) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let (st, _, _) = call(port, "GET", "/healthz", &[], b"").await;
                assert_eq!(st, 200);
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            worst
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = work.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (probe.await.unwrap(), out)
}

/// Longest a `/healthz` answer may take while a slow apply runs: a stall of the control
/// thread lasts as long as the apply (seconds to minutes before it was moved off the
/// runtime); this bound only separates that from scheduling noise on a busy machine.
const STALL: Duration = Duration::from_secs(2);

/// Deeply nested flow YAML (libyaml is quadratic on it) that still starts like a topology.
fn nested(depth: usize) -> String {
    format!(
        "version: 1\nx: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

// ---------------------------------------------------------------------------------------
// Findings (these fail today).
// ---------------------------------------------------------------------------------------

/// Two writers holding the same ETag: `If-Match` is checked again under the apply lock,
/// so exactly one wins and the other gets 412 (no lost update).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_with_the_same_if_match_exactly_one_wins() {
    let s = setup().await;
    let tag = etag(s.api).await;
    let mut conns = Vec::new();
    for w in [10, 20] {
        let body = s.weight(w);
        let mut c = TcpStream::connect(("127.0.0.1", s.api)).await.unwrap();
        let head = format!(
            "PUT /api/v1/topology HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {TOKEN}\r\nif-match: {tag}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        c.write_all(head.as_bytes()).await.unwrap();
        conns.push((c, body));
    }
    // Both heads are in (and checked) before either body arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut statuses = Vec::new();
    for (mut c, body) in conns {
        c.write_all(body.as_bytes()).await.unwrap();
        statuses.push(read_answer(&mut c).await.0);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        vec![200, 412],
        "both conditional writers won (generation now {})",
        s.generation()
    );
}

/// A token holder's PUT of a deeply nested document does not stall the control thread
/// (health checks, other requests): nesting is bounded before the YAML parser sees it, and
/// applies run off the control runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_put_does_not_stall_the_control_thread() {
    let s = setup().await;
    let body = nested(DEPTH);
    let api = s.api;
    let (worst, (st, _, b)) = max_healthz_latency(api, async move {
        let t = Instant::now();
        let r = put(api, "/api/v1/topology", &body).await;
        eprintln!(
            "nested PUT ({} bytes) answered {} in {:?}",
            body.len(),
            r.0,
            t.elapsed()
        );
        r
    })
    .await;
    eprintln!("worst /healthz latency during the PUT: {worst:?}");
    assert!(st == 400 || st == 422, "{st} {b}");
    assert!(
        worst < STALL,
        "the control thread (health checkers included) stalled for {worst:?}"
    );
}

/// While the file watch applies a slow file, readers of the endpoint are not parked:
/// parsing happens outside the apply lock, and the current document is read without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_file_apply_does_not_freeze_the_control_thread_for_readers() {
    let s = setup().await;
    let path = s.path();
    let _watch = watch::spawn(s.eg.server().control().clone(), &path).unwrap();
    std::fs::write(&path, nested(DEPTH)).unwrap();
    let api = s.api;
    let (worst, _) = max_healthz_latency(api, async move {
        let end = Instant::now() + Duration::from_secs(6);
        let mut slowest = Duration::ZERO;
        while Instant::now() < end {
            let t = Instant::now();
            call(api, "GET", "/api/v1/topology", &[], b"").await;
            slowest = slowest.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("slowest GET /api/v1/topology: {slowest:?}");
    })
    .await;
    eprintln!("worst /healthz latency: {worst:?}");
    assert!(
        worst < STALL,
        "unauthenticated reads parked the control runtime for {worst:?}"
    );
}

/// A patch whose `copy` operations double the document is stopped at the body limit
/// (413), checked as it grows, before it can take the process's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doubling_patch_is_bounded() {
    let s = setup().await;
    let ops: Vec<String> = (0..30)
        .map(|i| format!(r#"{{"op":"copy","from":"","path":"/x{i}"}}"#))
        .collect();
    let body = format!("[{}]", ops.join(","));
    let api = s.api;
    let (worst, (st, _, b)) = max_healthz_latency(api, async move {
        let t = Instant::now();
        let r = patch(api, &body).await;
        eprintln!(
            "doubling PATCH ({} bytes) answered {} in {:?}",
            body.len(),
            r.0,
            t.elapsed()
        );
        r
    })
    .await;
    eprintln!("worst /healthz latency: {worst:?}");
    assert_eq!(st, 413, "{}", &b[..b.len().min(300)]);
    assert!(worst < STALL, "stalled {worst:?}");
}

/// The auth scheme is case-insensitive (RFC 9110 11.1): `bearer TOKEN` is a valid
/// credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = setup().await;
    let v = format!("bearer {TOKEN}");
    let (st, _, b) = call(
        s.api,
        "PUT",
        "/api/v1/topology?dry_run=true",
        &[("authorization", &v)],
        s.weight(5).as_bytes(),
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

/// `If-Match`/`If-None-Match` take lists of tags (RFC 9110 13.1.1-2); If-None-Match
/// compares weakly (`W/"tag"` matches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etag_lists_and_weak_tags() {
    let s = setup().await;
    let tag = etag(s.api).await;
    let weak = format!("W/{tag}");
    let (st, _, _) = call(
        s.api,
        "GET",
        "/api/v1/topology",
        &[("if-none-match", &weak)],
        b"",
    )
    .await;
    assert_eq!(st, 304, "If-None-Match: W/tag");
    let list = format!("\"g0-0000000000000000\", {tag}");
    let (st, _, _) = call(
        s.api,
        "GET",
        "/api/v1/topology",
        &[("if-none-match", &list)],
        b"",
    )
    .await;
    assert_eq!(st, 304, "If-None-Match with a list");
    let (k, v) = auth();
    let (st, _, b) = call(
        s.api,
        "PUT",
        "/api/v1/topology?dry_run=true",
        &[(k, &v), ("if-match", &list)],
        s.weight(5).as_bytes(),
    )
    .await;
    assert_eq!(st, 200, "If-Match with a list holding the current tag: {b}");
}

/// A write-back that fails (here the topology path became a directory) answers
/// "written": false and leaves no temporary file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_back_leaves_no_temporary_file() {
    let s = setup().await;
    let path = s.path();
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), "x").unwrap();
    let (st, _, b) = put(s.api, "/api/v1/topology", &s.weight(10)).await;
    assert_eq!(st, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["written"], false, "{b}");
    let tmp = s.eg.dir.path().join(".envgate.yaml.envgate-tmp");
    assert!(
        !tmp.exists(),
        "the temporary file was left behind: {}",
        tmp.display()
    );
}

/// The write-back follows a symlinked topology file (the ConfigMap layout, or a file under
/// version control) to the file it names, and keeps that file's mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_keeps_a_symlink_and_the_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup().await;
    let path = s.path();
    let real_dir = s.eg.dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("envgate.yaml");
    std::fs::write(&real, s.doc()).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    let new = s.weight(10);
    let (st, _, b) = put(s.api, "/api/v1/topology", &new).await;
    assert_eq!(st, 200, "{b}");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        meta.file_type().is_symlink(),
        "the symlinked topology file was replaced by a regular file"
    );
    assert_eq!(std::fs::read_to_string(&real).unwrap(), new);
    assert_eq!(
        std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// An operator's edit of the file that lands just before an API write is not overwritten
/// by the write-back (which answers "written": false), and the watch then applies it: the
/// edit is never lost silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_edit_racing_an_api_write_is_not_lost_silently() {
    let s = setup().await;
    let path = s.path();
    let control = s.eg.server().control().clone();
    let _watch = watch::spawn(control.clone(), &path).unwrap();
    let operator = s.weight(30);
    let api = s.weight(40);
    std::fs::write(&path, &operator).unwrap();
    let (st, _, b) = put(s.api, "/api/v1/topology", &api).await;
    // Let the watch settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let operator_seen = control.history().iter().any(|r| r.source == Source::File);
    assert!(
        st != 200 || operator_seen || b.contains("warning"),
        "the operator's edit vanished without a trace: API answered {st} {b}, file now {}",
        if std::fs::read_to_string(&path).unwrap() == api {
            "the API's document"
        } else {
            "other"
        }
    );
}

/// Holds: the watched directory removed and created again (a redeploy, a remount): the
/// new file is still picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_survives_its_directory_being_recreated() {
    let s = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let path = conf.join("envgate.yaml");
    std::fs::write(&path, s.doc()).unwrap();
    let control = s.eg.server().control().clone();
    let _watch = watch::spawn(control.clone(), &path).unwrap();
    std::fs::remove_dir_all(&conf).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::create_dir(&conf).unwrap();
    let new = s.weight(25);
    std::fs::write(&path, &new).unwrap();
    let applied = eventually(Duration::from_secs(4), || {
        let c = control.clone();
        let new = new.clone();
        async move { *c.document() == *new }
    })
    .await;
    assert!(applied, "the watch died with its directory");
}

/// Holds: hyper's `header_read_timeout` (10 s) closes both a connection that never sends a
/// byte and an idle keep-alive one (slowloris on the head). Note there is still no cap on
/// concurrent control connections and no body read timeout for a token holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_control_connections_are_closed() {
    let s = setup().await;
    let mut idle = TcpStream::connect(("127.0.0.1", s.api)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut silent = TcpStream::connect(("127.0.0.1", s.api)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let closed = |r: Result<std::io::Result<usize>, _>| matches!(r, Ok(Ok(0)) | Ok(Err(_)));
    let silent_closed =
        closed(tokio::time::timeout(Duration::from_millis(200), silent.read(&mut buf)).await);
    let idle_closed =
        closed(tokio::time::timeout(Duration::from_millis(200), idle.read(&mut buf)).await);
    assert!(
        silent_closed && idle_closed,
        "after 12 s: a connection that never sent a byte closed: {silent_closed}, an idle keep-alive closed: {idle_closed}"
    );
}

// ---------------------------------------------------------------------------------------
// Probes that hold (regression tests).
// ---------------------------------------------------------------------------------------

/// Token edges: trailing newline in the file is trimmed; wrong, padded, missing, or
/// prefix tokens are 401; an empty / whitespace-only / missing token file refuses writes
/// with 503 (never "anything goes").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_edges() {
    let s = setup().await;
    let body = s.weight(5);
    let dry = "/api/v1/topology?dry_run=true";
    for (hdr, want) in [
        (format!("Bearer {TOKEN}"), 200),
        // (hyper trims trailing whitespace of a header value: this one is the token)
        (format!("Bearer {TOKEN} "), 200),
        (format!("Bearer {TOKEN}x"), 401),
        ("Bearer s3cret".to_string(), 401),
        ("Bearer ".to_string(), 401),
        // RFC 9110 11.4: one or more spaces after the scheme.
        (format!("Bearer  {TOKEN}"), 200),
        (format!("Basic {TOKEN}"), 401),
        (TOKEN.to_string(), 401),
    ] {
        let (st, _, b) = call(
            s.api,
            "PUT",
            dry,
            &[("authorization", &hdr)],
            body.as_bytes(),
        )
        .await;
        assert_eq!(st, want, "{hdr:?}: {b}");
    }
    let (st, _, _) = call(s.api, "PUT", dry, &[], body.as_bytes()).await;
    assert_eq!(st, 401);
    for content in ["", " \n\t\n"] {
        std::fs::write(&s.token_file, content).unwrap();
        let (st, _, _) = put(s.api, dry, &body).await;
        assert_eq!(st, 503, "token file {content:?}");
        // An empty presented token does not match an empty token file either.
        let (st, _, _) = call(
            s.api,
            "PUT",
            dry,
            &[("authorization", "Bearer ")],
            body.as_bytes(),
        )
        .await;
        assert_eq!(st, 503);
    }
    std::fs::remove_file(&s.token_file).unwrap();
    assert_eq!(put(s.api, dry, &body).await.0, 503);
    std::fs::write(&s.token_file, format!("  {TOKEN}  \r\n")).unwrap();
    assert_eq!(put(s.api, dry, &body).await.0, 200);
    assert_eq!(s.generation(), 1);
}

/// Bodies that are not documents: non-UTF-8, JSON (accepted: YAML takes it), JSON Patch
/// abuse (deep nesting, not an array, bad pointer, ~0/~1 escapes, a failing `test`), and an
/// unauthenticated 17 MiB body (401 before any body is read). Nothing panics; the
/// generation only moves for the valid writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_patches() {
    let s = setup().await;
    let (k, v) = auth();
    let (st, _, _) = call(
        s.api,
        "PUT",
        "/api/v1/topology",
        &[(k, &v)],
        b"version: 1\n\xff\xfe",
    )
    .await;
    assert_eq!(st, 400);
    // The document as JSON.
    let yaml: serde_norway::Value = serde_norway::from_str(&s.weight(7)).unwrap();
    let json = serde_json::to_string(&serde_json::to_value(&yaml).unwrap()).unwrap();
    let (st, _, b) = put(s.api, "/api/v1/topology", &json).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(s.generation(), 2);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for (p, want) in [
        (deep.as_str(), 400),
        ("{}", 400),
        ("[{\"op\":\"nope\",\"path\":\"/a\"}]", 400),
        ("[{\"op\":\"remove\",\"path\":\"/nodes/~2\"}]", 400),
        ("[{\"op\":\"remove\",\"path\":\"nodes\"}]", 400),
        ("[{\"op\":\"add\",\"path\":\"/nodes/a~1b~0c\",\"value\":{\"address\":\"127.0.0.1:1\"}}]", 422),
        ("[{\"op\":\"test\",\"path\":\"/version\",\"value\":2}]", 422),
        ("[{\"op\":\"replace\",\"path\":\"\",\"value\":null}]", 400),
        ("[{\"op\":\"replace\",\"path\":\"\",\"value\":[1,2]}]", 400),
        ("[{\"op\":\"add\",\"path\":\"/version\",\"value\":1e400}]", 400),
    ] {
        let (st, _, b) = patch(s.api, p).await;
        assert_eq!(st, want, "{}: {b}", &p[..p.len().min(80)]);
    }
    // (~1/~0 decode to "a/b~c", which validation refuses by name)
    assert_eq!(s.generation(), 2);
    // Unauthenticated and huge: refused without reading 17 MiB.
    let big = vec![b'#'; 17 * 1024 * 1024];
    let mut c = TcpStream::connect(("127.0.0.1", s.api)).await.unwrap();
    c.write_all(
        format!(
            "PUT /api/v1/topology HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let _ = c.write_all(&big[..1024]).await;
    let (st, _, _) = read_answer(&mut c).await;
    // Answered after 1 KiB of the 17 MiB announced: the body was never waited for.
    assert_eq!(st, 401);
}

/// A refused document (a listener renamed onto the address the old name still holds, so
/// it cannot be bound; a document that does not validate) changes no
/// node state (drain set at run time, trust, health), no generation, no document, and no
/// file; a dry run of a valid one neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_touch_nothing() {
    let s = setup().await;
    let port = s.eg.port("http");
    assert!(
        eventually(Duration::from_secs(3), || async {
            get(port, "company.com", "/").await.status == 200
        })
        .await
    );
    s.eg.server().set_drained("b", true).unwrap();
    let state = |n: &str| {
        let t = s.eg.server().topology();
        let st = t
            .nodes
            .iter()
            .find(|x| &*x.name == n)
            .unwrap()
            .state
            .clone();
        (st.is_drained(), st.trusts_unknown(), st.health() as u8)
    };
    let before = (
        state("a"),
        state("b"),
        s.doc(),
        std::fs::read_to_string(s.path()).unwrap(),
    );
    // A listener on a port another program holds (bound without SO_REUSEPORT).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad_listener = s.doc().replacen(
        "listeners: [ ",
        &format!(
            "listeners: [ {{ name: other, bind: \"{}\" }}, ",
            held.local_addr().unwrap()
        ),
        1,
    );
    let untrusting = s
        .weight(5)
        .replace("rise: 1, fall: 1", "rise: 1, fall: 1, trust_unknown: true")
        .replace("nodes: [b]", "nodes: [b, ghost]");
    for (doc, want) in [(bad_listener, 422), (untrusting.clone(), 422)] {
        let (st, _, b) = put(s.api, "/api/v1/topology", &doc).await;
        assert_eq!(st, want, "{b}");
    }
    let (st, _, _) = put(s.api, "/api/v1/topology?dry_run=1", &s.weight(9)).await;
    assert_eq!(st, 200);
    let after = (
        state("a"),
        state("b"),
        s.doc(),
        std::fs::read_to_string(s.path()).unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(s.generation(), 1);
    let h = s.eg.server().control().history();
    assert_eq!(
        h.iter().filter(|r| r.result == Outcome::Rejected).count(),
        2
    );
    assert!(h.iter().all(|r| r.generation == 1));
}

/// History stays bounded at 64; rollback to a generation that fell out is 404, to one that
/// is kept re-applies it as a new generation, rollback of the running one is "unchanged",
/// and `to=` garbage is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bound_and_rollback() {
    let s = setup().await;
    let control = s.eg.server().control().clone();
    for w in 1..=70u32 {
        control
            .apply(Source::Api, &s.weight(w % 100), false)
            .unwrap();
    }
    assert_eq!(control.history().len(), 64);
    assert_eq!(s.generation(), 71);
    let (k, v) = auth();
    let post = |to: &str| {
        let p = format!("/api/v1/rollback?to={to}");
        let v = v.clone();
        async move { call(s.api, "POST", &p, &[(k, &v)], b"").await }
    };
    assert_eq!(post("1").await.0, 404);
    assert_eq!(post("-1").await.0, 400);
    assert_eq!(post("18446744073709551616").await.0, 400);
    let (st, _, b) = post("71").await;
    assert_eq!(st, 200, "{b}");
    assert!(b.contains("\"unchanged\":true"), "{b}");
    let (st, _, b) = post("60").await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(s.generation(), 72);
    assert_eq!(
        *control.document(),
        *s.eg.server().control().history()[63]
            .document
            .clone()
            .unwrap()
    );
    // Unauthenticated rollback.
    assert_eq!(
        call(s.api, "POST", "/api/v1/rollback?to=60", &[], b"")
            .await
            .0,
        401
    );
}

/// `explain` takes arbitrary query strings without panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_garbage_does_not_panic() {
    let s = setup().await;
    for q in [
        "",
        "host=",
        "host=%",
        "host=%zz&port=99999",
        "path=%2e%2e%2f%2e%2e",
        "path=..%2F..%2Fetc",
        "path=%00",
        "path=%ff%fe",
        "method=%20",
        "header=%3A",
        "header=X:%0d%0a",
        "cookie=%0a",
        "client=999.1.1.1",
        "path=",
        "path=?",
        "path=//////",
        "host=company.com&path=/%25",
        "host=%E2%80%AE.com&port=0",
        "port=-1",
        "&&&&=&=",
    ] {
        let (st, _, _) = call(s.api, "GET", &format!("/api/v1/explain?{q}"), &[], b"").await;
        assert!(st == 200 || st == 400, "{q}: {st}");
    }
    assert_eq!(call(s.api, "GET", "/healthz", &[], b"").await.0, 200);
}

/// The write-back is not taken for a change by the watch (no extra generation, no "file"
/// record), and a file that flips quickly between two documents settles on the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_write_back_is_not_a_change_and_flapping_settles() {
    let s = setup().await;
    let path = s.path();
    let control = s.eg.server().control().clone();
    let _watch = watch::spawn(control.clone(), &path).unwrap();
    let (st, _, b) = put(s.api, "/api/v1/topology", &s.weight(11)).await;
    assert_eq!(st, 200, "{b}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.generation(), 2);
    assert!(control.history().iter().all(|r| r.source != Source::File));
    let (x, y) = (s.weight(12), s.weight(13));
    for i in 0..40 {
        std::fs::write(&path, if i % 2 == 0 { &x } else { &y }).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            *control.document() == *y
        })
        .await
    );
    // Deleted file and a directory in its place: the running topology stays.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(*control.document(), *y);
    assert_eq!(get(s.eg.port("http"), "company.com", "/").await.status, 200);
}
