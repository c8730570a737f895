//! The floor: a relay with none of envgate's features, to measure what proxying alone costs
//! on a machine, with the same runtime (tokio, one current_thread worker), parser (httparse)
//! and HTTP/2 and TLS stacks (h2, rustls) as envgate.
//!
//! It follows `benches/compare`'s contract for `--ours` (LISTEN, UPSTREAMS, TLS_LISTEN,
//! TLS_CERT, TLS_KEY), for the `small-ka` and `h2` scenarios only:
//!
//! ```sh
//! cargo build --release --manifest-path benches/floor/Cargo.toml
//! benches/compare/compare --ours "exec $PWD/benches/floor/target/release/envgate-floor" \
//!     --only nginx,haproxy,ours --scenarios small-ka,h2
//! ```
//!
//! What it leaves out is the point: no routing, no timeouts, no limits, no retries, no
//! health, no access log, no metrics, no header rewriting; a request is a GET whose head is
//! passed on as it came, and an answer has a Content-Length. Each client connection keeps
//! one connection per node and takes the nodes in turn (as nginx's keep-alive pool does,
//! two reads and two writes per request). Nothing else should use it.
//!
//! HTTP/2 over TLS: `FLOOR_H2=h2` (default) serves streams on the h2 crate directly,
//! `FLOOR_H2=hyper` through hyper's HTTP/2 server; `FLOOR_UPSTREAM=raw` (default) sends to
//! the nodes by hand, `FLOOR_UPSTREAM=hyper` with hyper's HTTP/1.1 client. The four
//! combinations split what an HTTP/2 request costs between the layers.

use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_FIELDS: usize = 64;

fn main() {
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:18095".into());
    let nodes: Vec<String> = std::env::var("UPSTREAMS")
        .unwrap_or_else(|_| "127.0.0.1:18081,127.0.0.1:18082,127.0.0.1:18083".into())
        .split(',')
        .map(String::from)
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let nodes = Rc::new(Nodes::new(nodes));
        if let (Ok(at), Ok(cert), Ok(key)) = (
            std::env::var("TLS_LISTEN"),
            std::env::var("TLS_CERT"),
            std::env::var("TLS_KEY"),
        ) {
            tokio::task::spawn_local(serve_tls(at, cert, key, nodes.clone()));
        }
        let listener = TcpListener::bind(&listen).await.expect("bind LISTEN");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let nodes = nodes.clone();
            tokio::task::spawn_local(async move {
                let _ = relay_h1(client, &nodes).await;
            });
        }
    });
}

/// The nodes, taken in turn, with idle connections for the HTTP/2 side's requests.
struct Nodes {
    addrs: Vec<String>,
    next: Cell<usize>,
    idle: RefCell<Vec<Vec<TcpStream>>>,
    idle_hyper: RefCell<Vec<Vec<HyperSender>>>,
}

type HyperSender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

impl Nodes {
    fn new(addrs: Vec<String>) -> Self {
        let n = addrs.len();
        Nodes {
            addrs,
            next: Cell::new(0),
            idle: RefCell::new((0..n).map(|_| Vec::new()).collect()),
            idle_hyper: RefCell::new((0..n).map(|_| Vec::new()).collect()),
        }
    }

    fn pick(&self) -> usize {
        let i = self.next.get();
        self.next.set((i + 1) % self.addrs.len());
        i
    }

    async fn connect(&self, i: usize) -> io::Result<TcpStream> {
        let s = TcpStream::connect(self.addrs[i].as_str()).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// The length of a whole request head at the start of `buf`.
fn request_head(buf: &[u8]) -> io::Result<Option<usize>> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    match httparse::Request::new(&mut fields).parse(buf) {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    }
}

/// Reads a node's answer into `buf` (from its start): status, head length, body length.
async fn read_answer<S: AsyncRead + Unpin>(
    node: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<(u16, usize, usize)> {
    let mut have = 0;
    let (status, head, body) = loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = node.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut r = httparse::Response::new(&mut fields);
        match r.parse(&buf[..have]) {
            Ok(httparse::Status::Complete(head)) => {
                let length = r
                    .headers
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|f| std::str::from_utf8(f.value).ok()?.trim().parse().ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no length"))?;
                break (r.code.unwrap_or(502), head, length);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    };
    let total = head + body;
    if total > buf.len() {
        buf.resize(total, 0);
    }
    while have < total {
        let n = node.read(&mut buf[have..total]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok((status, head, body))
}

/// HTTP/1.1 keep-alive: each request head goes to the next node as it came, each answer
/// back as it came.
async fn relay_h1(mut client: TcpStream, nodes: &Nodes) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut up: Vec<Option<TcpStream>> = nodes.addrs.iter().map(|_| None).collect();
    let mut buf = vec![0u8; 8192];
    let mut have = 0;
    let mut answer = vec![0u8; 16384];
    loop {
        let n = loop {
            if let Some(n) = request_head(&buf[..have])? {
                break n;
            }
            if have == buf.len() {
                return Ok(());
            }
            let r = client.read(&mut buf[have..]).await?;
            if r == 0 {
                return Ok(());
            }
            have += r;
        };
        let i = nodes.pick();
        if up[i].is_none() {
            up[i] = Some(nodes.connect(i).await?);
        }
        let node = up[i].as_mut().expect("connected");
        node.write_all(&buf[..n]).await?;
        buf.copy_within(n..have, 0);
        have -= n;
        let (_, head, body) = read_answer(node, &mut answer).await?;
        client.write_all(&answer[..head + body]).await?;
    }
}

/// A GET to the next node, by hand: (status, body).
async fn fetch_raw(nodes: &Nodes, path: &str) -> io::Result<(u16, Bytes)> {
    let i = nodes.pick();
    let pooled = nodes.idle.borrow_mut()[i].pop();
    let mut node = match pooled {
        Some(c) => c,
        None => nodes.connect(i).await?,
    };
    let mut req = Vec::with_capacity(64 + path.len());
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(path.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\n\r\n");
    node.write_all(&req).await?;
    let mut buf = vec![0u8; 16384];
    let (status, head, body) = read_answer(&mut node, &mut buf).await?;
    nodes.idle.borrow_mut()[i].push(node);
    Ok((status, Bytes::copy_from_slice(&buf[head..head + body])))
}

/// A GET to the next node with hyper's HTTP/1.1 client: (status, body).
async fn fetch_hyper(nodes: &Nodes, path: &str) -> io::Result<(u16, Bytes)> {
    use http_body_util::BodyExt;
    let i = nodes.pick();
    let pooled = nodes.idle_hyper.borrow_mut()[i].pop();
    let mut sender = match pooled {
        Some(s) => s,
        None => {
            let io = hyper_util::rt::TokioIo::new(nodes.connect(i).await?);
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(io::Error::other)?;
            tokio::task::spawn_local(conn);
            s
        }
    };
    let req = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::new())
        .map_err(io::Error::other)?;
    let resp = sender.send_request(req).await.map_err(io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(io::Error::other)?
        .to_bytes();
    nodes.idle_hyper.borrow_mut()[i].push(sender);
    Ok((status, body))
}

async fn fetch(nodes: &Nodes, path: &str, hyper_client: bool) -> (u16, Bytes) {
    let r = if hyper_client {
        fetch_hyper(nodes, path).await
    } else {
        fetch_raw(nodes, path).await
    };
    r.unwrap_or((502, Bytes::new()))
}

fn answer(status: u16, body: &Bytes) -> http::response::Builder {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_LENGTH, body.len())
}

/// HTTP/2 over TLS (ALPN h2): each stream a GET to the next node.
async fn serve_tls(at: String, cert: String, key: String, nodes: Rc<Nodes>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .expect("TLS_CERT")
        .map(|c| c.expect("TLS_CERT"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).expect("TLS_KEY");
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let hyper_server = std::env::var("FLOOR_H2").is_ok_and(|v| v == "hyper");
    let hyper_client = std::env::var("FLOOR_UPSTREAM").is_ok_and(|v| v == "hyper");
    let listener = TcpListener::bind(&at).await.expect("bind TLS_LISTEN");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, nodes) = (acceptor.clone(), nodes.clone());
        tokio::task::spawn_local(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            if hyper_server {
                serve_hyper_h2(tls, nodes, hyper_client).await;
            } else {
                serve_h2(tls, nodes, hyper_client).await;
            }
        });
    }
}

async fn serve_h2<T: AsyncRead + AsyncWrite + Unpin + 'static>(
    io: T,
    nodes: Rc<Nodes>,
    hyper_client: bool,
) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        let nodes = nodes.clone();
        tokio::task::spawn_local(async move {
            let (status, body) = fetch(&nodes, req.uri().path(), hyper_client).await;
            let Ok(head) = answer(status, &body).body(()) else {
                return;
            };
            let end = body.is_empty();
            if let Ok(mut stream) = respond.send_response(head, end) {
                if !end {
                    let _ = stream.send_data(body, true);
                }
            }
        });
    }
}

async fn serve_hyper_h2<T: AsyncRead + AsyncWrite + Unpin + 'static>(
    io: T,
    nodes: Rc<Nodes>,
    hyper_client: bool,
) {
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let nodes = nodes.clone();
        async move {
            let (status, body) = fetch(&nodes, req.uri().path(), hyper_client).await;
            answer(status, &body).body(http_body_util::Full::new(body))
        }
    });
    let _ = hyper::server::conn::http2::Builder::new(Local)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// hyper's executor: a task on this thread.
#[derive(Clone, Copy)]
struct Local;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for Local {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
