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

use std::io::{self, Read, Write};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long a request may be at a node before the client's socket is registered to watch
/// for the client leaving.
const UNWATCHED: Duration = Duration::from_millis(2);

/// The client's socket: plain until something must wait on it, then tokio's.
pub struct Client {
    raw: Option<std::net::TcpStream>,
    io: Option<TcpStream>,
}

impl Client {
    /// A socket just accepted, not registered (it must be in non-blocking mode).
    pub fn raw(s: std::net::TcpStream) -> Self {
        Client {
            raw: Some(s),
            io: None,
        }
    }

    /// Whether the socket is still unknown to the reactor.
    #[inline]
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
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

    /// The registered socket, for hyper.
    pub fn into_io(mut self) -> io::Result<TcpStream> {
        self.io()?;
        self.io
            .take()
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
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
        let _ = match (&self.raw, &self.io) {
            (Some(s), _) => s.set_nodelay(true),
            (None, Some(s)) => s.set_nodelay(true),
            (None, None) => Ok(()),
        };
    }

    /// Writes `data` whole: straight to the socket while it takes it, through the reactor
    /// from the first write that would block.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
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
