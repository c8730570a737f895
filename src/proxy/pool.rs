//! One worker's pool of keep-alive HTTP/1.1 connections to one node.
//!
//! A plain stack of ready `SendRequest`s (most recently used on top, so idle ones at the
//! bottom age out): no lock, no background task. A connection is put back by the response
//! body when it ends (see `body.rs`), and a pooled connection idle for longer than the
//! upstream idle timeout is discarded on checkout, so the node never closes first.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::UpBody;
use super::io::StallIo;
use crate::tls::NodeTls;

/// Idle connections kept per node and worker.
const MAX_IDLE: usize = 512;
/// Largest response head a node may send (like the request side): beyond it the answer
/// is malformed, 502, and counts against the node.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub struct ConnPool {
    pub addr: SocketAddr,
    /// Spoken to over TLS.
    pub tls: Option<Arc<NodeTls>>,
    idle: RefCell<Vec<(SendRequest<UpBody>, Instant)>>,
}

/// Why a new connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnPool {
    pub fn new(addr: SocketAddr, tls: Option<Arc<NodeTls>>) -> Self {
        ConnPool {
            addr,
            tls,
            idle: RefCell::new(Vec::new()),
        }
    }

    /// Whether this pool speaks to a node at `addr` spoken to as `tls` says (a reload that
    /// keeps both keeps the pool).
    pub fn serves(&self, addr: SocketAddr, tls: &Option<Arc<NodeTls>>) -> bool {
        self.addr == addr && self.tls == *tls
    }

    /// A pooled connection that is still open and was idle less than `max_idle`.
    #[inline]
    pub fn take(&self, max_idle: Duration) -> Option<SendRequest<UpBody>> {
        let mut idle = self.idle.borrow_mut();
        while let Some((conn, since)) = idle.pop() {
            if conn.is_closed() || since.elapsed() > max_idle {
                continue;
            }
            return Some(conn);
        }
        None
    }

    /// Gives a connection back after its response ended.
    #[inline]
    pub fn put(&self, conn: SendRequest<UpBody>) {
        if conn.is_closed() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    /// Opens a new connection (TCP, then TLS for a node that speaks it, both within
    /// `timeout`) and starts its connection task on this worker. A node that stops reading
    /// what envgate writes for `write_idle` loses the connection.
    pub async fn connect(
        &self,
        timeout: Duration,
        write_idle: Duration,
    ) -> Result<SendRequest<UpBody>, ConnectError> {
        let deadline = Instant::now() + timeout;
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout)??;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => start(stream, write_idle).await,
            Some(tls) => {
                let stream = tokio::time::timeout_at(
                    deadline,
                    tls.connector.connect(tls.server_name.clone(), stream),
                )
                .await
                .map_err(|_| ConnectError::Timeout)?
                .map_err(ConnectError::Tls)?;
                start(stream, write_idle).await
            }
        }
    }
}

/// HTTP/1.1 over an open connection, its task on this worker.
async fn start<S>(stream: S, write_idle: Duration) -> Result<SendRequest<UpBody>, ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::Builder::new()
        .max_header_size(MAX_RESPONSE_HEAD)
        .handshake::<_, UpBody>(TokioIo::new(StallIo::new(
            stream,
            write_idle,
            "the node read nothing for the body idle timeout",
        )))
        .await?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(send)
}
