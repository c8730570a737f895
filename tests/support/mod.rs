//! Test helpers: real upstream servers on 127.0.0.1:0, envgate started in-process on
//! pre-bound listeners, a real HTTP client, and a bounded `eventually` poll.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

pub mod pki;

use envgate::health::NodeRegistry;
use envgate::server::{Options, Server};

/// A free port on 127.0.0.1 (bound, then released), for what envgate binds itself: a
/// control endpoint, a listener added by a reload.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 10 ms until it holds, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A real HTTP/1.1 upstream that names itself in every answer and counts its hits.
///
/// Paths: `/healthz` (200, or 503 once `set_healthy(false)`), `/slow?ms=N`, `/hang`
/// (never answers), `/echo` (streams the request body back), `/consume` (reads the whole
/// request body, then answers its length), `/download?bytes=N`,
/// `/headers` (the request headers, one `name: value` a line; the answer carries
/// hop-by-hop headers that must not reach the client). A request with `Upgrade: echo` is
/// switched to a raw echo of bytes.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<NodeShared>,
    stop: watch::Sender<bool>,
}

/// One connection to an `Upstream`, until it ends or the node stops.
async fn serve_node_conn<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<NodeShared>,
    mut conn_stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            if shared.hanging.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if req.uri().path() != "/healthz" {
                shared.peers.lock().unwrap().insert(peer.port());
            }
            serve(&shared, req).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::select! {
        _ = conn => {}
        _ = conn_stop.changed() => {}
    }
}

/// What an upstream's connections share.
#[derive(Default)]
struct NodeShared {
    name: String,
    hits: AtomicUsize,
    healthy: AtomicBool,
    /// When set, every request (health checks included) waits an hour for its answer.
    hanging: AtomicBool,
    last_headers: Mutex<Option<HeaderMap>>,
    /// Client ports of the connections that carried counted (non-health) requests.
    peers: Mutex<std::collections::HashSet<u16>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts (or restarts) a node on a given address.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        Self::start_with(name, addr, None).await
    }

    /// A node that speaks HTTPS with `tls` (health checks included).
    pub async fn start_tls(name: &str, tls: Arc<rustls::ServerConfig>) -> Upstream {
        Self::start_with(name, "127.0.0.1:0".parse().unwrap(), Some(tls)).await
    }

    async fn start_with(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Upstream {
        let listener = bind_retry(addr).await;
        let addr = listener.local_addr().unwrap();
        let (stop, mut stop_rx) = watch::channel(false);
        let state = Arc::new(NodeShared {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            ..Default::default()
        });
        let shared = state.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = stop_rx.changed() => return,
                };
                let shared = shared.clone();
                let conn_stop = stop_rx.clone();
                match &acceptor {
                    None => {
                        tokio::spawn(serve_node_conn(stream, peer, shared, conn_stop));
                    }
                    Some(a) => {
                        let a = a.clone();
                        tokio::spawn(async move {
                            if let Ok(s) = a.accept(stream).await {
                                serve_node_conn(s, peer, shared, conn_stop).await;
                            }
                        });
                    }
                }
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            state,
            stop,
        }
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// How many connections carried counted requests.
    pub fn connections(&self) -> usize {
        self.state.peers.lock().unwrap().len()
    }

    /// The headers of the last counted request.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.state.last_headers.lock().unwrap().clone()
    }

    pub fn reset_hits(&self) {
        self.state.hits.store(0, Ordering::SeqCst);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn set_hanging(&self, hanging: bool) {
        self.state.hanging.store(hanging, Ordering::SeqCst);
    }

    /// Closes the listener and every open connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

async fn bind_retry(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("cannot bind {addr}");
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn serve(
    shared: &NodeShared,
    mut req: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let name = shared.name.clone();
    let path = req.uri().path().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_default();
    if path == "/healthz" {
        let ok = shared.healthy.load(Ordering::SeqCst);
        let mut r = Response::new(full(if ok { "ok" } else { "sick" }));
        *r.status_mut() = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Ok(r);
    }
    shared.hits.fetch_add(1, Ordering::SeqCst);
    *shared.last_headers.lock().unwrap() = Some(req.headers().clone());
    let mut resp = if req
        .headers()
        .get(http::header::UPGRADE)
        .is_some_and(|v| v == "echo")
    {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("upgrade", "echo".parse().unwrap());
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r
    } else {
        match path.as_str() {
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(500))).await;
                Response::new(full(name.clone()))
            }
            "/hang" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Response::new(full(name.clone()))
            }
            "/echo" => Response::new(req.into_body().boxed()),
            // The head at once, then nothing until the whole upload is in: its length.
            "/late-count" => Response::new(
                LateCount {
                    inner: req.into_body(),
                    n: 0,
                    done: false,
                }
                .boxed(),
            ),
            "/consume" => match req.into_body().collect().await {
                Ok(b) => Response::new(full(b.to_bytes().len().to_string())),
                Err(_) => {
                    let mut r = Response::new(full("broken body"));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            },
            "/download" => Response::new(
                Zeros {
                    left: query(&req, "bytes").unwrap_or(0),
                }
                .map_err(|never: Infallible| match never {})
                .boxed(),
            ),
            "/headers" => {
                let mut text = String::new();
                for (k, v) in req.headers() {
                    text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                }
                let mut r = Response::new(full(text));
                let h = r.headers_mut();
                h.insert("connection", "x-upstream-secret".parse().unwrap());
                h.insert("x-upstream-secret", "1".parse().unwrap());
                h.insert("keep-alive", "timeout=5".parse().unwrap());
                h.insert("proxy-authenticate", "Basic".parse().unwrap());
                r
            }
            _ => Response::new(full(name.clone())),
        }
    };
    resp.headers_mut().insert("x-node", name.parse().unwrap());
    // The request target as the node received it.
    if let Ok(v) = http::HeaderValue::from_str(&target) {
        resp.headers_mut().insert("x-target", v);
    }
    Ok(resp)
}

/// Reads a request body whole, then yields its length as the response body.
struct LateCount {
    inner: Incoming,
    n: usize,
    done: bool,
}

impl Body for LateCount {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        self.n += d.len();
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(self.n.to_string())))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A body of `left` zero bytes, produced 64 KiB at a time.
pub struct Zeros {
    pub left: u64,
}

static ZEROS: [u8; 65536] = [0; 65536];

impl Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(ZEROS.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &ZEROS[..n as usize],
        )))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// envgate running in-process on listeners bound here.
pub struct Envgate {
    server: Option<Server>,
    /// The access log, written to `access.log` in `dir`.
    log: Option<envgate::accesslog::AccessLog>,
    ports: HashMap<String, u16>,
    pub dir: tempfile::TempDir,
    pub registry: Arc<NodeRegistry>,
}

impl Envgate {
    /// Starts envgate with one worker. In `yaml`, `{port:NAME}` stands for the port of
    /// listener NAME, bound here on 127.0.0.1 before the file is written.
    pub fn start(yaml: &str) -> Envgate {
        Self::start_with(yaml, 1)
    }

    /// Starts envgate with `workers` worker threads (production runs one per core).
    pub fn start_with(yaml: &str, workers: usize) -> Envgate {
        Self::start_logged(yaml, workers, envgate::accesslog::Format::Text)
    }

    /// Starts envgate with its access log in `format` (`access_log()` reads it).
    pub fn start_logged(yaml: &str, workers: usize, format: envgate::accesslog::Format) -> Envgate {
        Self::start_log_to(yaml, workers, format, None)
    }

    /// Starts envgate with its access log in `format`, written to `file` (by default
    /// `access.log` in `dir`).
    pub fn start_log_to(
        yaml: &str,
        workers: usize,
        format: envgate::accesslog::Format,
        file: Option<std::path::PathBuf>,
    ) -> Envgate {
        Self::start_codec(
            yaml,
            workers,
            format,
            file,
            envgate::server::Http1::from_env(),
        )
    }

    /// Starts envgate with HTTP/1.1 served by `http1`, whatever `ENVGATE_HTTP1` says.
    pub fn start_codec(
        yaml: &str,
        workers: usize,
        format: envgate::accesslog::Format,
        file: Option<std::path::PathBuf>,
        http1: envgate::server::Http1,
    ) -> Envgate {
        let mut ports = HashMap::new();
        let mut socks = Vec::new();
        let mut text = yaml.to_string();
        while let Some(i) = text.find("{port:") {
            let end = i + text[i..].find('}').unwrap();
            let name = text[i + 6..end].to_string();
            let port = *ports.entry(name.clone()).or_insert_with(|| {
                // As `envgate run` binds (SO_REUSEPORT: each worker gets a socket of its own).
                let l = envgate::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let port = l.local_addr().unwrap().port();
                socks.push((name.clone(), l));
                port
            });
            text.replace_range(i..=end, &port.to_string());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envgate.yaml");
        std::fs::write(&path, &text).unwrap();
        let registry = Arc::new(NodeRegistry::default());
        let log = envgate::accesslog::AccessLog::start(
            envgate::accesslog::Target::File(file.unwrap_or_else(|| dir.path().join("access.log"))),
            format,
        )
        .unwrap();
        let topology = envgate::config::load_file(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let server = envgate::server::start(
            topology,
            registry.clone(),
            socks,
            Options {
                workers,
                document: text.clone(),
                base_dir: dir.path().to_path_buf(),
                file: Some(path.clone()),
                access_log: Some(log.sink()),
                inherited: Vec::new(),
                http1,
            },
        )
        .unwrap();
        Envgate {
            server: Some(server),
            log: Some(log),
            ports,
            dir,
            registry,
        }
    }

    pub fn port(&self, listener: &str) -> u16 {
        self.ports[listener]
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// The access log's lines so far (workers hand theirs on at least every 100 ms).
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Applies `yaml` (with the same `{port:NAME}` ports) through the apply path, as the
    /// control API does; panics when it is refused.
    pub fn apply(&self, yaml: &str) -> u64 {
        let text = self.fill(yaml);
        self.server()
            .control()
            .apply(envgate::control::Source::Api, &text, false)
            .unwrap_or_else(|e| panic!("refused: {e:?}\n{text}"))
            .generation
    }

    /// `yaml` with each `{port:NAME}` replaced by the port of listener NAME.
    pub fn fill(&self, yaml: &str) -> String {
        let mut text = yaml.to_string();
        for (name, port) in &self.ports {
            text = text.replace(&format!("{{port:{name}}}"), &port.to_string());
        }
        text
    }

    /// Graceful shutdown, then the whole access log.
    pub async fn stop_with_log(mut self) -> Vec<String> {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        self.stop().await;
        std::fs::read_to_string(dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Graceful shutdown; returns once envgate has stopped.
    pub async fn stop(mut self) {
        let server = self.server.take().unwrap();
        let log = self.log.take();
        tokio::task::spawn_blocking(move || {
            server.shutdown();
            if let Some(log) = log {
                log.close();
            }
        })
        .await
        .unwrap();
    }
}

impl Drop for Envgate {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
        if let Some(log) = self.log.take() {
            log.close();
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
    pub fn node(&self) -> &str {
        self.headers
            .get("x-node")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// A fresh HTTP/1.1 client connection to 127.0.0.1:`port`.
pub async fn connect<B>(port: u16) -> hyper::client::conn::http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// A fresh HTTP/2 (prior knowledge) client connection, and the task driving it.
pub async fn connect_h2(
    port: u16,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    (tx, tokio::spawn(conn))
}

/// One request on a fresh HTTP/1.1 connection.
pub async fn send(port: u16, req: Request<Full<Bytes>>) -> Reply {
    let mut tx = connect(port).await;
    let resp = tx.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET path` with `Host: host` on an open keep-alive connection.
pub async fn get_on(
    tx: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
) -> Reply {
    tx.ready().await.unwrap();
    let resp = tx
        .send_request(
            Request::get(path)
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `GET path` with `Host: host` on a fresh connection.
pub async fn get(port: u16, host: &str, path: &str) -> Reply {
    send(
        port,
        Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// Writes raw bytes, reads until the peer closes (or 5 s), returns what came back.
pub async fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A child process killed when the test ends, passed or failed (an orphan would keep the
/// test runner's output pipe open).
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node that accepts TCP connections, reads what the client sends and breaks the
/// connection without answering. `requests()` counts the connections that carried bytes
/// (health checks of `type: tcp`, which pass on it, send none).
pub struct Breaker {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Breaker {
    pub async fn start() -> Breaker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf))
                            .await
                    {
                        if n > 0 {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // Linger 0: the close is a reset.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                });
            }
        });
        Breaker { addr, requests }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A misbehaving node on raw TCP: for every connection it reads a request head (and
/// nothing more), writes `answer` as it is, then does what `after` says. `requests()`
/// counts the heads it read. Health checks should be `type: tcp` in front of it.
pub struct RawNode {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Close the connection.
    Close,
    /// Keep it open without another byte, for an hour.
    Hang,
}

impl RawNode {
    pub async fn start(answer: Vec<u8>, after: After) -> RawNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (count, answer) = (count.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.write_all(&answer).await;
                    if after == After::Hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                });
            }
        });
        RawNode { addr, requests }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A raw client connection to envgate.
pub async fn raw_conn(port: u16) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap()
}

/// Reads one response head from `s` (byte by byte: what follows stays in the socket).
pub async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Whether the peer closes `s` (reads until EOF or an error) within `limit`; what was read
/// meanwhile is appended to `out`.
pub async fn closes_within(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
    out: &mut Vec<u8>,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// An HTTP/2 (prior knowledge) client made with the `h2` crate, which sends exactly the
/// fields it is given (several `cookie` fields, a `host` beside `:authority`...).
pub async fn h2_client(port: u16) -> h2::client::SendRequest<Bytes> {
    let tcp = raw_conn(port).await;
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Sends a body-less request on an h2 client and reads the answer whole.
pub async fn h2_send(client: &mut h2::client::SendRequest<Bytes>, req: Request<()>) -> Reply {
    let mut client = client.clone().ready().await.unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    let (parts, mut body) = resp.into_parts();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(bytes),
    }
}

/// A topology with one listener `http`, the nodes given (name, address) and one
/// environment `production` on `company.com` and `*.company.com` using all of them.
/// `defaults` and `env` are extra YAML for the `defaults` map and the environment's map
/// (each `key: value` pairs separated by `, `, or empty).
pub fn topo(nodes: &[(&str, SocketAddr)], defaults: &str, env: &str) -> String {
    let list: Vec<String> = nodes
        .iter()
        .map(|(n, a)| format!("    {n}: {{ address: \"{a}\" }}"))
        .collect();
    let names: Vec<&str> = nodes.iter().map(|(n, _)| *n).collect();
    let env = if env.is_empty() {
        String::new()
    } else {
        format!(", {env}")
    };
    format!(
        r#"version: 1
listeners: [ {{ name: http, bind: "127.0.0.1:{{port:http}}" }} ]
defaults: {{ {defaults} }}
nodes:
{}
environments:
  production: {{ entries: ["company.com:{{port:http}}", "*.company.com:{{port:http}}"], nodes: [{}]{env} }}
"#,
        list.join("\n"),
        names.join(", ")
    )
}

/// A topology of several environments on one listener `http`, built up by parts:
/// `Topo::new().node("a", addr).env("production", &["company.com"], "nodes: [a]").yaml()`.
#[derive(Default)]
pub struct Topo {
    nodes: Vec<(String, SocketAddr)>,
    defaults: String,
    envs: Vec<(String, Vec<String>, String)>,
}

impl Topo {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node(mut self, name: &str, addr: SocketAddr) -> Self {
        self.nodes.push((name.into(), addr));
        self
    }

    /// The content of the `defaults` map (`key: value, ...`).
    pub fn defaults(mut self, yaml: &str) -> Self {
        self.defaults = yaml.into();
        self
    }

    /// An environment on the given hosts (each on listener `http`'s port; `""` for the
    /// whole port), with `body` the rest of its map (`nodes: [a], canary: {...}`).
    pub fn env(mut self, name: &str, hosts: &[&str], body: &str) -> Self {
        let entries = hosts
            .iter()
            .map(|h| format!("\"{h}:{{port:http}}\""))
            .collect();
        self.envs.push((name.into(), entries, body.into()));
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::from(
            "version: 1\nlisteners: [ { name: http, bind: \"127.0.0.1:{port:http}\" } ]\n",
        );
        y.push_str(&format!("defaults: {{ {} }}\nnodes:\n", self.defaults));
        for (n, a) in &self.nodes {
            y.push_str(&format!("  {n}: {{ address: \"{a}\" }}\n"));
        }
        y.push_str("environments:\n");
        for (name, entries, body) in &self.envs {
            y.push_str(&format!(
                "  {name}: {{ entries: [{}], {body} }}\n",
                entries.join(", ")
            ));
        }
        y
    }
}

/// A page's DOM after its scripts ran, as headless Chromium (Debian's `chromium`) dumps
/// it; `None` where Chromium is not installed (outside CI only: in CI that fails).
pub fn rendered(url: &str) -> Option<String> {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output();
    match out {
        Ok(o) => {
            assert!(
                o.status.success(),
                "chromium: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("chromium not run ({e}); install Debian's chromium package");
            None
        }
        Err(e) => panic!("chromium is needed in CI: {e}"),
    }
}

// Metrics, as a scrape of the control endpoint's `/metrics` reads.

/// Samples by `name{labels}`, the labels sorted by name (label values here hold no
/// commas).
pub fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let k = match k.split_once('{') {
                Some((name, labels)) => {
                    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    labels.sort_unstable();
                    format!("{name}{{{}}}", labels.join(","))
                }
                None => k.to_string(),
            };
            (k, v.parse().unwrap_or_else(|_| panic!("bad value {l:?}")))
        })
        .collect()
}

pub async fn scrape(port: u16) -> (String, HashMap<String, f64>) {
    let r = get(port, "localhost", "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.headers["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text().to_string();
    let s = samples(&text);
    (text, s)
}

/// Polls the scrape until `ok` holds (bounded), and returns the last one.
pub async fn until(
    port: u16,
    what: &str,
    ok: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    for _ in 0..400 {
        let (_, s) = scrape(port).await;
        if ok(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (text, _) = scrape(port).await;
    panic!("never: {what}\n{text}");
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
pub fn sum(s: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            k.split_once('{').is_some_and(|(n, l)| {
                n == name
                    && labels
                        .iter()
                        .all(|want| l.trim_end_matches('}').split(',').any(|x| x == *want))
            })
        })
        .map(|(_, v)| v)
        .sum()
}

/// Reads one whole response from a raw connection (Content-Length or chunked framing, or
/// no body for `head`): status line and fields, and the body decoded.
pub async fn read_response(s: &mut tokio::net::TcpStream, head: bool) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    // Informational heads (100 Continue...) come first, kept before the final one.
    let mut interim = String::new();
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..p + 4]).to_lowercase();
            if text.starts_with("http/1.1 1") && !text.starts_with("http/1.1 101") {
                interim.push_str(&text);
                buf.drain(..p + 4);
                continue;
            }
        }
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::io::AsyncReadExt::read(s, &mut tmp).await.unwrap();
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    };
    let head_text = interim + &String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let mut rest = buf[end..].to_vec();
    let last = head_text.rfind("http/1.1 ").unwrap_or(0);
    let status: u16 = head_text[last + 9..last + 12].parse().unwrap();
    if head || status == 204 || status == 304 {
        return (head_text, Vec::new());
    }
    if let Some(cl) = head_text
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let n: usize = cl.trim().parse().unwrap();
        while rest.len() < n {
            more(&mut rest, s).await;
        }
        return (head_text, rest[..n].to_vec());
    }
    assert!(
        head_text.contains("transfer-encoding: chunked"),
        "{head_text}"
    );
    let mut body = Vec::new();
    loop {
        while !rest.windows(2).any(|w| w == b"\r\n") {
            more(&mut rest, s).await;
        }
        let p = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..p]).unwrap(), 16).unwrap();
        while rest.len() < p + 2 + size + 2 {
            more(&mut rest, s).await;
        }
        body.extend_from_slice(&rest[p + 2..p + 2 + size]);
        rest.drain(..p + 2 + size + 2);
        if size == 0 {
            return (head_text, body);
        }
    }
}

pub async fn more(rest: &mut Vec<u8>, s: &mut tokio::net::TcpStream) {
    let mut tmp = [0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(s, &mut tmp).await.unwrap();
    assert!(n > 0, "closed mid-body");
    rest.extend_from_slice(&tmp[..n]);
}
