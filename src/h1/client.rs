//! A client's socket for the own codec, registered with the reactor only when something
//! must wait on it.
//!
//! A connection whose request is already in its socket buffer when it is accepted, and
//! whose answer fits the socket's send buffer, is served without the reactor ever knowing
//! it: one read right after the accept, one write, a close. That saves the epoll
//! registration and its removal (two system calls and the reactor's bookkeeping) on every
//! new connection that is served at once, which is most of them under load. The first
//! wait (a head that is not whole yet, a write that would block, the next request of a
//! kept-alive connection) registers the socket, once; from then on it is tokio's.
//!
//! A client that leaves while its request is at a node is noticed once the socket is
//! registered: the watch starts `UNWATCHED` after the request went to the node, so that
//! a node that answers at once costs no registration.
//!
//! A TLS connection (its handshake done by the listener) is registered from the start;
//! reads and writes go through its session, and each write is flushed.

use std::io::{self, Read, Write};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proxy::listener::ClientStream;

type Tls = Box<tokio_rustls::server::TlsStream<TcpStream>>;

/// How long a request may be at a node before the client's socket is registered to watch
/// for the client leaving.
const UNWATCHED: Duration = Duration::from_millis(2);

/// The content type of a TLS alert record.
const TLS_ALERT: u8 = 0x15;

/// How long a TLS connection's close (its close_notify) may take.
const TLS_CLOSE: Duration = Duration::from_secs(1);

/// The client's socket: plain until something must wait on it, then tokio's.
pub struct Client {
    raw: Option<std::net::TcpStream>,
    io: Option<TcpStream>,
    tls: Option<Tls>,
}

impl Client {
    /// A socket just accepted, not registered (it must be in non-blocking mode).
    pub fn raw(s: std::net::TcpStream) -> Self {
        Client {
            raw: Some(s),
            io: None,
            tls: None,
        }
    }

    /// A TLS connection, its handshake done.
    pub fn tls(s: Tls) -> Self {
        Client {
            raw: None,
            io: None,
            tls: Some(s),
        }
    }

    /// The socket, registered with the reactor (done once, the first time it is asked
    /// for). An error (the reactor could not take it) loses the connection.
    #[inline]
    pub fn io(&mut self) -> io::Result<&mut TcpStream> {
        if let Some(s) = self.raw.take() {
            self.io = Some(TcpStream::from_std(s)?);
        }
        self.io
            .as_mut()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// The connection, for hyper (registered).
    pub fn into_stream(mut self) -> io::Result<ClientStream> {
        if let Some(t) = self.tls.take() {
            return Ok(ClientStream::Tls(t));
        }
        self.io()?;
        self.io
            .take()
            .map(ClientStream::Plain)
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// The registered socket of a cleartext connection, for hyper.
    pub fn into_io(self) -> io::Result<TcpStream> {
        match self.into_stream()? {
            ClientStream::Plain(s) => Ok(s),
            ClientStream::Tls(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Reads what comes into `buf` (through the reactor; 0 at the end).
    #[inline]
    pub async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match &mut self.tls {
            Some(t) => t.read_buf(buf).await,
            None => self.io()?.read_buf(buf).await,
        }
    }

    /// One read into `buf` (which must be initialized memory: the plain socket reads into
    /// a slice) while the socket is not registered; `WouldBlock` when nothing is there.
    pub fn try_read_raw(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.raw {
            Some(s) => loop {
                match (&*s).read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    r => return r,
                }
            },
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    pub fn set_nodelay(&self) {
        let _ = match (&self.raw, &self.io, &self.tls) {
            (Some(s), _, _) => s.set_nodelay(true),
            (None, Some(s), _) => s.set_nodelay(true),
            (None, None, Some(t)) => t.get_ref().0.set_nodelay(true),
            (None, None, None) => Ok(()),
        };
    }

    /// Ends the connection: a TLS session says close_notify first (within `TLS_CLOSE`),
    /// as hyper's connections do.
    pub async fn close(mut self) {
        if let Some(t) = &mut self.tls {
            let _ = tokio::time::timeout(TLS_CLOSE, t.shutdown()).await;
        }
    }

    /// Ends the connection after an answer sent while the client was still sending a body
    /// that is not read (`io::linger`): the sending side is shut (close_notify then a FIN
    /// over TLS, a FIN in clear), then what the client still sends is read and dropped.
    /// Draining (or once `shutdown` changes) it ends sooner.
    pub async fn linger(mut self, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        if let Some(t) = &mut self.tls {
            if let Ok(Ok(())) = tokio::time::timeout(TLS_CLOSE, t.shutdown()).await {
                crate::proxy::io::linger_until(t, shutdown).await;
            }
            return;
        }
        let Ok(io) = self.io() else { return };
        if io.shutdown().await.is_ok() {
            crate::proxy::io::linger_until(io, shutdown).await;
        }
    }

    /// Writes `data` whole: straight to the socket while it takes it, through the reactor
    /// from the first write that would block.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        if let Some(t) = &mut self.tls {
            t.write_all(data).await?;
            return t.flush().await;
        }
        if let Some(s) = &self.raw {
            while !data.is_empty() {
                match (&*s).write(data) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => data = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if data.is_empty() {
                return Ok(());
            }
        }
        self.io()?.write_all(data).await
    }

    /// Ends when the client closed its connection (or it failed). Pipelined bytes of a
    /// next request do not count: then it never ends. A plain socket is registered after
    /// `UNWATCHED`.
    pub async fn gone(&mut self) {
        if self.raw.is_some() {
            tokio::time::sleep(UNWATCHED).await;
        }
        if let Some(t) = &self.tls {
            // The socket under the session: records of a next request are data too, but
            // an alert (close_notify first of all) says the client is done.
            let mut b = [0u8; 1];
            if let Ok(1..) = t.get_ref().0.peek(&mut b).await {
                if b[0] != TLS_ALERT {
                    std::future::pending::<()>().await;
                }
            }
            return;
        }
        let Ok(io) = self.io() else {
            // The reactor could not take the socket: the connection is lost.
            return;
        };
        let mut b = [0u8; 1];
        if let Ok(1..) = io.peek(&mut b).await {
            std::future::pending::<()>().await;
        }
    }
}
