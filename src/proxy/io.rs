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
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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

/// While draining, a lingering close ends at the latest after this long.
pub const LINGER_DRAINING: Duration = Duration::from_secs(1);

/// `linger` bounded as the worker's state asks: `LINGER_TIME` while serving,
/// `LINGER_DRAINING` once a drain began (before or during the wait).
pub async fn linger_until<R: AsyncRead + Unpin>(
    r: &mut R,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) {
    if *shutdown.borrow_and_update() {
        return linger(r, LINGER_DRAINING).await;
    }
    let discard = linger(r, LINGER_TIME);
    tokio::pin!(discard);
    tokio::select! {
        () = &mut discard => {}
        Ok(()) = shutdown.changed() => {
            let _ = tokio::time::timeout(LINGER_DRAINING, discard).await;
        }
    }
}

/// Whether an HTTP/1 connection served by hyper ends with a lingering close
/// (`ConnInfo::unread`), and the socket to linger on once hyper let go of it. Shared by the
/// connection's task (`Send`: hyper's client IO holds it).
#[derive(Default)]
pub struct Unread {
    state: AtomicU8,
    socket: Mutex<Option<std::net::TcpStream>>,
}

impl Unread {
    const NONE: u8 = 0;
    /// A request's body may not have been read whole: linger if the client's bytes are
    /// waiting when the connection ends.
    const BODY: u8 = 1;
    /// hyper refused a head: what the client still sends is waited out whatever is on
    /// the socket at the end (hyper may have read all that came so far).
    const REFUSED: u8 = 2;

    /// A request begins (`body`: with a body).
    #[inline]
    pub fn request(&self, body: bool) {
        let state = if body { Self::BODY } else { Self::NONE };
        self.state.store(state, Ordering::Relaxed);
    }

    /// The request's body was read to its end, or its client stopped sending.
    #[inline]
    pub fn body_over(&self) {
        self.state.store(Self::NONE, Ordering::Relaxed);
    }

    pub fn refused(&self) {
        self.state.store(Self::REFUSED, Ordering::Relaxed);
    }

    /// Called as hyper drops the connection's socket: keeps a second descriptor of it when
    /// the connection is to linger. `tcp` has had its sending side shut by hyper, or not.
    pub fn keep(&self, tcp: &TcpStream) {
        let state = self.state.load(Ordering::Relaxed);
        if state == Self::NONE {
            return;
        }
        let Ok(fd) = std::os::fd::AsFd::as_fd(tcp).try_clone_to_owned() else {
            return;
        };
        let s = std::net::TcpStream::from(fd);
        // After a body: only while the client's bytes are coming. A connection that went on
        // after hyper drained a short body and later ended idle has nothing to wait for.
        let mut b = [0u8; 1];
        if state == Self::BODY && !matches!(s.peek(&mut b), Ok(1..)) {
            return;
        }
        // A FIN, if hyper did not shut it (it does when its answer went out).
        let _ = s.shutdown(std::net::Shutdown::Write);
        if let Ok(mut slot) = self.socket.lock() {
            *slot = Some(s);
        }
    }

    /// The socket `keep` left, registered with the reactor.
    pub fn take(&self) -> Option<TcpStream> {
        let s = self.socket.lock().ok()?.take()?;
        TcpStream::from_std(s).ok()
    }
}

/// The time now, read once and only if asked for: the steps of one poll share one clock
/// read (a clock read costs about as much as a small lock here).
#[derive(Default)]
pub struct LazyNow(std::cell::Cell<Option<Instant>>);

impl LazyNow {
    #[inline]
    pub fn get(&self) -> Instant {
        if let Some(t) = self.0.get() {
            return t;
        }
        let t = Instant::now();
        self.0.set(Some(t));
        t
    }
}

/// `tokio::time::timeout_at` without a timer for a future that is ready at its first poll
/// (a write that goes out at once, data already read). A tokio timer clones the runtime's
/// handle when it is made and takes the time driver's lock when it is dropped, even if it
/// never waited: locked instructions on every request otherwise.
pub async fn timeout_at_unless_ready<F: Future>(
    due: Instant,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    match first_poll(fut.as_mut()).await {
        Some(out) => Ok(out),
        None => tokio::time::timeout_at(due, fut).await,
    }
}

/// `tokio::time::timeout` as `timeout_at_unless_ready`: neither a timer nor a clock read
/// for a future that is ready at its first poll.
pub async fn timeout_unless_ready<F: Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    match first_poll(fut.as_mut()).await {
        Some(out) => Ok(out),
        None => tokio::time::timeout(limit, fut).await,
    }
}

/// `fut` polled once: its output if it was ready, `None` if it waits (its waker is then
/// registered, and the caller goes on polling it).
async fn first_poll<F: Future>(mut fut: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match fut.as_mut().poll(cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        })
    })
    .await
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
