//! Accepting and serving downstream connections on one worker.
//!
//! Each connection is HTTP/1.1 unless its first bytes are the HTTP/2 connection preface
//! (cleartext HTTP/2 with prior knowledge). The bytes read to decide are handed back to
//! hyper through `Prefixed`, so the check costs no extra system call in the common case
//! where the request is already in the socket buffer. The first read is bounded by the
//! client header timeout; hyper's header-read timeout bounds the rest.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::handler::{handle, ConnInfo};
use super::worker::Worker;
use crate::server::Tracker;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a worker knows about one listener.
pub struct ListenerMeta {
    pub name: String,
    pub port: u16,
}

pub async fn accept_loop(
    worker: Rc<Worker>,
    listener: TcpListener,
    meta: Rc<ListenerMeta>,
    mut shutdown: watch::Receiver<bool>,
    tracker: Rc<Tracker>,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let guard = tracker.enter();
                    let worker = worker.clone();
                    let meta = meta.clone();
                    let shutdown = shutdown.clone();
                    tokio::task::spawn_local(async move {
                        serve(worker, stream, peer, &meta, shutdown).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %meta.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve(
    worker: Rc<Worker>,
    stream: TcpStream,
    peer: SocketAddr,
    meta: &ListenerMeta,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let topo = worker.shared.topology.load();
    let header_timeout = topo.defaults.timeouts.client_header;
    let trusted = topo
        .defaults
        .trusted_proxies
        .iter()
        .any(|c| c.contains(peer.ip()));
    drop(topo);

    let (first, h2) = match tokio::time::timeout(header_timeout, sniff(&stream)).await {
        Ok(Ok(Some(v))) => v,
        _ => return, // closed, failed or silent: nothing to answer
    };
    let ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(peer.ip()),
        ip => ip,
    };
    let info = Rc::new(ConnInfo {
        peer,
        local_port: meta.port,
        peer_value: peer_value(&worker, ip),
        trusted,
        proto: HeaderValue::from_static("http"),
    });
    let io = TokioIo::new(Prefixed {
        prefix: first,
        pos: 0,
        inner: stream,
    });
    let svc = {
        let worker = worker.clone();
        service_fn(move |req| handle(worker.clone(), info.clone(), req))
    };
    // Serve until the connection ends; on shutdown, ask it to finish what it has (HTTP/1:
    // close after the response in flight; HTTP/2: GOAWAY) and wait for that.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }};
    }
    if h2 {
        drive!(worker.http2.serve_connection(io, svc));
    } else {
        drive!(worker.http1.serve_connection(io, svc).with_upgrades());
    }
}

/// The client's address as an `X-Forwarded-For` value, formatted without allocating.
fn peer_value(worker: &Worker, ip: std::net::IpAddr) -> HeaderValue {
    use std::io::Write;
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IP address is at most 45 characters, and always a valid header value.
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    worker
        .values
        .value(&buf[..len])
        .expect("an IP address is a header value")
}

/// Reads the first bytes of a connection and tells whether it speaks HTTP/2 with prior
/// knowledge. `None` when the peer closed before sending anything.
async fn sniff(stream: &TcpStream) -> io::Result<Option<(Vec<u8>, bool)>> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        match stream.try_read(&mut buf[len..]) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                len += n;
                let seen = &buf[..len.min(H2_PREFACE.len())];
                if !H2_PREFACE.starts_with(seen) {
                    buf.truncate(len);
                    return Ok(Some((buf, false)));
                }
                if len >= H2_PREFACE.len() {
                    buf.truncate(len);
                    return Ok(Some((buf, true)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
            Err(e) => return Err(e),
        }
    }
}

/// A stream whose first bytes were already read: they are replayed before the rest.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
