//! The downstream request body forwarded upstream: a receive deadline (`request_timeout`),
//! byte counts for the access log, and the signal that starts the route timeout when it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::BoxError;
use super::filter::{BodyFilter, filter_frame};

/// Error when the downstream took longer than `request_timeout` to send its request.
#[derive(Debug, thiserror::Error)]
#[error("downstream request timeout")]
pub struct RequestTimeout;

/// Signals that a downstream request body has been forwarded in full: Envoy's route timeout
/// starts then, so a slow upload does not eat into it. Made [`RequestEnd::timed`], it also
/// keeps when, for the access log's `%REQUEST_DURATION%`.
#[derive(Debug, Default)]
pub struct RequestEnd {
    ended: AtomicBool,
    notify: tokio::sync::Notify,
    /// Whether to read the clock at the end (only an access log asks).
    timed: bool,
    at: std::sync::OnceLock<std::time::Instant>,
}

impl RequestEnd {
    /// One that records when the body ended.
    pub fn timed(timed: bool) -> Self {
        RequestEnd {
            timed,
            ..RequestEnd::default()
        }
    }

    fn signal(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            if self.timed {
                let _ = self.at.set(std::time::Instant::now());
            }
            self.notify.notify_one();
        }
    }

    /// When the body ended, if it has.
    pub fn ended_at(&self) -> Option<std::time::Instant> {
        self.at.get().copied()
    }

    /// Resolves once the body has ended.
    pub async fn ended(&self) {
        while !self.ended.load(Ordering::Acquire) {
            self.notify.notified().await;
        }
    }
}

/// A downstream request body forwarded upstream, with an optional receive deadline.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Option<Arc<AtomicBool>>,
    end: Option<Arc<RequestEnd>>,
    /// Set when the downstream sent a malformed body (broken chunked framing, a reset): the
    /// failure is the client's, not the upstream's.
    failed: Option<Arc<AtomicBool>>,
    /// Body bytes received, for the access log's `%BYTES_RECEIVED%`.
    received: Option<Arc<AtomicU64>>,
    /// HTTP filters looking at the body (usually none).
    filters: Vec<Box<dyn BodyFilter>>,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        deadline: Option<tokio::time::Instant>,
        timed_out: Option<Arc<AtomicBool>>,
        end: Option<Arc<RequestEnd>>,
        failed: Option<Arc<AtomicBool>>,
        received: Option<Arc<AtomicU64>>,
        filters: Vec<Box<dyn BodyFilter>>,
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
            end,
            failed,
            received,
            filters,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(mut frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            match &mut frame {
                Some(Ok(frame)) => {
                    if let (Some(received), Some(data)) = (&this.received, frame.data_ref()) {
                        received.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    filter_frame(&mut this.filters, frame);
                }
                Some(Err(_)) => {
                    if let Some(failed) = &this.failed {
                        failed.store(true, Ordering::Release);
                    }
                }
                None => {}
            }
            if frame.is_none() || this.inner.is_end_stream() {
                this.deadline = None;
                for filter in &mut this.filters {
                    filter.on_end();
                }
                if let Some(end) = this.end.take() {
                    end.signal();
                }
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
