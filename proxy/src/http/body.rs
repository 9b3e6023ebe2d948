//! Bodies on the proxy path: upstream bodies stream through untouched; local replies carry a
//! fixed buffer; request bodies carry the HCM's `request_timeout` deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A response body: streamed from upstream or generated locally.
#[derive(Debug)]
pub enum ResponseBody {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody::Full(if bytes.is_empty() { None } else { Some(bytes) })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// Error when the downstream took longer than `request_timeout` to send its request.
#[derive(Debug, thiserror::Error)]
#[error("downstream request timeout")]
pub struct RequestTimeout;

/// A downstream request body forwarded upstream, with an optional receive deadline.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        deadline: Option<tokio::time::Instant>,
        timed_out: Option<Arc<AtomicBool>>,
    ) -> Self {
        let deadline = if inner.is_end_stream() {
            None
        } else {
            deadline.map(|d| Box::pin(tokio::time::sleep_until(d)))
        };
        RequestBody {
            inner,
            deadline,
            timed_out,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() || this.inner.is_end_stream() {
                this.deadline = None;
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            if let Some(flag) = &this.timed_out {
                flag.store(true, Ordering::Release);
            }
            return Poll::Ready(Some(Err(Box::new(RequestTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;
