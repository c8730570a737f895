//! Idle bounds for waits that no request future watches: a body envgate waits on, a socket
//! envgate writes to.
//!
//! `IdleTimer` is the one lazy timer behind them: it is armed only when a wait begins (a
//! poll finds no data, a write blocks), and re-armed only when it fires before the bound,
//! so a wait that ends in time costs one clock read, not a timer reset per poll.
//!
//! `StallIo` bounds writes: a peer that stops reading makes every write wait; without a
//! bound, the task writing to it (and whatever it holds: the other side's connection, an
//! in-flight slot) waits forever. A write that cannot proceed for `idle` fails with
//! `TimedOut`. envgate wraps both the client's connection and its node connections in it.
//!
//! `linger` is the end of a client connection whose answer went out while the client was
//! still sending a body envgate does not read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A lingering close ends at the latest after this long, and after this long without a
/// byte (nginx's `lingering_time` and `lingering_timeout`).
pub const LINGER_TIME: Duration = Duration::from_secs(30);
pub const LINGER_IDLE: Duration = Duration::from_secs(5);

/// The rest of a lingering close, once the answer went out and the sending side is shut:
/// what the client still sends is read and dropped until it closes its side (or fails),
/// for at most `total` and `LINGER_IDLE` without a byte. Closing at once with a client's
/// bytes unread would make the kernel send a reset, which fails the client's writes of
/// its body (most clients then give up without reading the answer) and can destroy the
/// answer before it is read.
pub async fn linger<R: AsyncRead + Unpin>(r: &mut R, total: Duration) {
    use tokio::io::AsyncReadExt;
    let mut scratch = [0u8; 4096];
    let discard = async {
        while let Ok(Ok(1..)) = tokio::time::timeout(LINGER_IDLE, r.read(&mut scratch)).await {}
    };
    let _ = tokio::time::timeout(total, discard).await;
}

/// A wait's idle bound: `poll_idle` is `Ready` once the wait that began at the first
/// pending poll (and has not ended since) has lasted `idle`.
#[derive(Default)]
pub struct IdleTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    since: Option<Instant>,
}

impl IdleTimer {
    /// The wait ended (data came, a write went through).
    #[inline]
    pub fn progress(&mut self) {
        self.since = None;
    }

    /// Called when a poll finds the wait still on. `due(since, now)` is when the wait
    /// that began at `since` times out (usually `since + idle`; it may move later while
    /// someone else is to blame). `Ready` once that moment has passed.
    #[cold]
    pub fn poll_idle(
        &mut self,
        cx: &mut Context<'_>,
        due: impl Fn(Instant, Instant) -> Instant,
    ) -> Poll<()> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due(since, now))));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let at = due(since, now);
            if at > now {
                sleep.as_mut().reset(at);
                continue;
            }
            return Poll::Ready(());
        }
    }
}

/// A connection whose writes fail after `idle` without progress.
pub struct StallIo<T> {
    inner: T,
    idle: Duration,
    timer: IdleTimer,
    what: &'static str,
}

impl<T> StallIo<T> {
    /// `what` is the error's message.
    pub fn new(inner: T, idle: Duration, what: &'static str) -> Self {
        StallIo {
            inner,
            idle,
            timer: IdleTimer::default(),
            what,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    #[inline]
    fn check<R>(&mut self, r: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => {
                let idle = self.idle;
                match self.timer.poll_idle(cx, |since, _| since + idle) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => {
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, self.what)))
                    }
                }
            }
            r => {
                self.timer.progress();
                r
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallIo<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallIo<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(r, cx)
    }
    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(r, cx)
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(r, cx)
    }
    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
