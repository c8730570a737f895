//! The response body envgate sends downstream: either its own small JSON answer or the
//! node's body, streamed frame by frame.
//!
//! An upstream body carries the pooled connection it came on; the connection goes back to
//! its pool only once the body has ended (an HTTP/1 connection is busy until then), and is
//! dropped, closing it, if the body fails or the client goes away first. The body also
//! holds the environment's in-flight slot, so the limit counts whole exchanges.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use super::pool::ConnPool;
use crate::topology::InFlight;

pub struct ProxyBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Upstream),
}

struct Upstream {
    body: Incoming,
    /// The connection to give back once `body` has ended.
    conn: Option<(Rc<ConnPool>, SendRequest<UpBody>)>,
    slot: Option<InFlight>,
}

impl Upstream {
    fn finish(&mut self) {
        if let Some((pool, conn)) = self.conn.take() {
            pool.put(conn);
        }
        self.slot = None;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // A body that ended without being polled to `None` (or one with nothing in it)
        // leaves the connection reusable; any other drop abandons it.
        if self.body.is_end_stream() {
            self.finish();
        }
    }
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(bytes)),
        }
    }

    pub fn empty() -> Self {
        ProxyBody {
            kind: Kind::Full(None),
        }
    }

    pub fn upstream(
        body: Incoming,
        conn: Option<(Rc<ConnPool>, SendRequest<UpBody>)>,
        slot: Option<InFlight>,
    ) -> Self {
        ProxyBody {
            kind: Kind::Upstream(Upstream { body, conn, slot }),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Kind::Upstream(u) => match Pin::new(&mut u.body).poll_frame(cx) {
                Poll::Ready(None) => {
                    u.finish();
                    Poll::Ready(None)
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if u.body.is_end_stream() {
                        u.finish();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    // The connection's state is unknown: close it rather than reuse it.
                    u.conn = None;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Kind::Upstream(u) => u.body.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(u) => u.body.size_hint(),
        }
    }
}

/// The body envgate sends to a node: the client's, streamed, or none at all. A request
/// without a body is `Empty`, which lets it be copied for a retry.
pub enum UpBody {
    Empty,
    Stream(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Empty => Poll::Ready(None),
            UpBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Empty => true,
            UpBody::Stream(b) => b.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Empty => SizeHint::with_exact(0),
            UpBody::Stream(b) => b.size_hint(),
        }
    }
}
