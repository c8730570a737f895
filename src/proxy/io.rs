//! Write-stall bounds for the sockets envgate writes to.
//!
//! A peer that stops reading makes every write wait; without a bound, the task writing to
//! it (and whatever it holds: the other side's connection, an in-flight slot) waits
//! forever. `WriteStall` turns a write that cannot proceed for `idle` into a `TimedOut`
//! error. Its timer is armed only once a write blocks, and re-armed only when it fires
//! early, so a socket that keeps up costs nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

pub struct WriteStall {
    idle: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    waiting_since: Option<Instant>,
    what: &'static str,
}

impl WriteStall {
    pub fn new(idle: Duration, what: &'static str) -> Self {
        WriteStall {
            idle,
            stall: None,
            waiting_since: None,
            what,
        }
    }

    /// Passes a write's result on, unless it has been pending for `idle`.
    #[inline]
    pub fn check<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.blocked(cx),
            r => {
                self.waiting_since = None;
                r
            }
        }
    }

    #[cold]
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let now = Instant::now();
        let since = *self.waiting_since.get_or_insert(now);
        let idle = self.idle;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + idle)));
        loop {
            if stall.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = since + idle;
            if due > Instant::now() {
                stall.as_mut().reset(due);
                continue;
            }
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, self.what)));
        }
    }
}

/// A connection to a node: a node that reads nothing of what envgate writes (a request
/// body) for the body idle time loses the connection, which ends its task and frees the
/// client side too.
pub struct NodeIo {
    inner: TcpStream,
    stall: WriteStall,
}

impl NodeIo {
    pub fn new(inner: TcpStream, write_idle: Duration) -> Self {
        NodeIo {
            inner,
            stall: WriteStall::new(
                write_idle,
                "the node read nothing for the body idle timeout",
            ),
        }
    }
}

impl AsyncRead for NodeIo {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeIo {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stall.check(r, cx)
    }
    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stall.check(r, cx)
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.stall.check(r, cx)
    }
    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
