//! Bodies on the proxy path: upstream bodies stream through with the route timeout and stream
//! idle timeout still running (Envoy's route timeout spans the whole response); local replies
//! carry a fixed buffer; request bodies carry the HCM's `request_timeout` deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::ResponseFlag;
use crate::http::access_log::PendingLine;
use crate::http::filter::{BodyFilter, FilterChain, FilterState};
use crate::stats::{GaugeGuard, Stat};
use crate::upstream::HostGauge;
use crate::upstream::pool::Lease;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: streamed from upstream or generated locally.
// Unboxed on purpose: the upstream body is the common case, and a box would cost an allocation
// per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ResponseBody {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
    /// Keeps the downstream request's slots until the body ends; a local reply is complete
    /// already, so they go now. Body filters see the body on its way.
    pub fn hold(&mut self, mut slots: DownstreamSlots, mut filters: Vec<Box<dyn BodyFilter>>) {
        match self {
            ResponseBody::Upstream(body) => {
                body.downstream = Some(slots);
                body.filters = filters;
            }
            ResponseBody::Full(data) => {
                for filter in &mut filters {
                    if let Some(data) = data.as_mut() {
                        filter.on_data(data);
                    }
                    filter.on_end();
                }
                if let Some(log) = slots.log.as_mut() {
                    log.entry.bytes_sent = data.as_ref().map_or(0, |d| d.len() as u64);
                }
            }
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ResponseBody::Full(if bytes.is_empty() { None } else { Some(bytes) })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this {
            ResponseBody::Upstream(body) => {
                let polled = body.poll_frame(cx);
                // Done or failed: drop the upstream stream and the active-request slot now.
                if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                    *this = ResponseBody::Full(None);
                }
                polled
            }
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.inner.is_end_stream(),
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.inner.size_hint(),
            ResponseBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// An upstream response body on its way downstream. It holds the cluster's `upstream_rq_active`
/// slot until it ends (as Envoy counts a request until its response is complete) and fails the
/// stream when a [`StreamTimer`] fires, which resets it downstream (HTTP/2 RST_STREAM, HTTP/1.1
/// connection closed mid-body), as Envoy does once headers are sent.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    timer: Option<StreamTimer>,
    _active: (GaugeGuard, HostGauge),
    downstream: Option<DownstreamSlots>,
    /// The HTTP/1.1 connection the body arrives on, back to its pool once the body is in.
    lease: Option<Lease>,
    /// HTTP filters looking at the body (usually none).
    filters: Vec<Box<dyn BodyFilter>>,
}

/// What a downstream request holds until its response ends: its place in
/// `downstream_rq_active` and in the connection's in-flight count (the idle timeout's), its
/// access log line, and its filters' completion phase.
#[derive(Debug)]
pub struct DownstreamSlots {
    pub active: GaugeGuard,
    pub in_flight: GaugeGuard,
    /// The access log line, written when this is dropped (boxed: only logged requests pay).
    pub log: Option<Box<PendingLine>>,
    /// The filters and their stream state, told when this is dropped.
    pub completion: Option<Box<(FilterChain, FilterState)>>,
}

impl Drop for DownstreamSlots {
    fn drop(&mut self) {
        if let Some(completion) = self.completion.take() {
            let (chain, state) = *completion;
            chain.on_complete(&state);
        }
    }
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        timer: Option<StreamTimer>,
        active: (GaugeGuard, HostGauge),
        lease: Option<Lease>,
    ) -> Self {
        UpstreamBody {
            inner,
            timer,
            _active: active,
            downstream: None,
            lease,
            filters: Vec::new(),
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(timer) = &mut self.timer {
                    timer.touch();
                }
                filter_frame(&mut self.filters, &mut frame);
                if let Some(log) = self.downstream.as_mut().and_then(|d| d.log.as_mut())
                    && let Some(data) = frame.data_ref()
                {
                    log.entry.bytes_sent += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                for filter in &mut self.filters {
                    filter.on_end();
                }
                if let Some(lease) = self.lease.take() {
                    lease.release();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Pending => match &mut self.timer {
                Some(timer) => match timer.poll_expired(cx) {
                    Poll::Ready(timeout) => {
                        // The access log shows why the body was cut, as Envoy's does.
                        if let Some(log) = self.downstream.as_mut().and_then(|d| d.log.as_mut()) {
                            log.entry.flag = Some(
                                match timeout {
                                    StreamTimeout::Route => ResponseFlag::UpstreamRequestTimeout,
                                    StreamTimeout::Idle => ResponseFlag::StreamIdleTimeout,
                                }
                                .code(),
                            );
                        }
                        Poll::Ready(Some(Err(Box::new(timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                },
                None => Poll::Pending,
            },
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body that was complete from the start (no content) is never polled; one dropped
        // part-way leaves its connection mid-response, so that connection closes instead.
        if let Some(lease) = self.lease.take()
            && self.inner.is_end_stream()
        {
            lease.release();
        }
    }
}

/// Which timeout cut a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamTimeout {
    /// The route timeout (`upstream_rq_timeout`, flag UT).
    #[error("upstream request timeout")]
    Route,
    /// The stream idle timeout (`downstream_rq_idle_timeout`, flag SI).
    #[error("stream timeout")]
    Idle,
}

/// The route deadline and the stream idle timeout of one request, as one timer that bounds the
/// wait for response headers and then moves into the body: it is set to the earlier of the two
/// and pushed out on every frame (extending a tokio timer is an atomic store, no
/// re-registration).
#[derive(Debug)]
pub struct StreamTimer {
    sleep: Pin<Box<Sleep>>,
    deadline: Option<Instant>,
    idle: Option<Duration>,
    route_timeouts: Arc<Stat>,
    idle_timeouts: Arc<Stat>,
}

impl StreamTimer {
    /// `None` when neither timeout is set (no timer at all).
    pub fn new(
        deadline: Option<Instant>,
        idle: Option<Duration>,
        route_timeouts: &Arc<Stat>,
        idle_timeouts: &Arc<Stat>,
    ) -> Option<Self> {
        let next = Self::next(deadline, idle)?;
        Some(StreamTimer {
            sleep: Box::pin(tokio::time::sleep_until(next)),
            deadline,
            idle,
            route_timeouts: route_timeouts.clone(),
            idle_timeouts: idle_timeouts.clone(),
        })
    }

    fn next(deadline: Option<Instant>, idle: Option<Duration>) -> Option<Instant> {
        match (deadline, idle.map(|i| Instant::now() + i)) {
            (Some(d), Some(i)) => Some(d.min(i)),
            (d, i) => d.or(i),
        }
    }

    /// Starts the route timeout now (it starts once the downstream request has ended).
    pub fn start_route(&mut self, timeout: Duration) {
        self.deadline = Some(Instant::now() + timeout);
        if let Some(next) = Self::next(self.deadline, self.idle) {
            self.sleep.as_mut().reset(next);
        }
    }

    /// Restarts the idle timeout: something moved.
    pub fn touch(&mut self) {
        if self.idle.is_some()
            && let Some(next) = Self::next(self.deadline, self.idle)
        {
            self.sleep.as_mut().reset(next);
        }
    }

    /// Resolves when either timeout fires (and counts it).
    pub fn expired(&mut self) -> impl Future<Output = StreamTimeout> + '_ {
        std::future::poll_fn(|cx| self.poll_expired(cx))
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<StreamTimeout> {
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The timer holds the earlier deadline, so it is the route's iff it reached it.
        if self.deadline.is_some_and(|d| self.sleep.deadline() >= d) {
            self.route_timeouts.inc();
            Poll::Ready(StreamTimeout::Route)
        } else {
            self.idle_timeouts.inc();
            Poll::Ready(StreamTimeout::Idle)
        }
    }
}

/// Error when the downstream took longer than `request_timeout` to send its request.
#[derive(Debug, thiserror::Error)]
#[error("downstream request timeout")]
pub struct RequestTimeout;

/// Signals that a downstream request body has been forwarded in full: Envoy's route timeout
/// starts then, so a slow upload does not eat into it.
#[derive(Debug, Default)]
pub struct RequestEnd {
    ended: AtomicBool,
    notify: tokio::sync::Notify,
}

impl RequestEnd {
    fn signal(&self) {
        if !self.ended.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
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
    failed: Arc<AtomicBool>,
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
        failed: Arc<AtomicBool>,
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
                Some(Err(_)) => this.failed.store(true, Ordering::Release),
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

/// Shows a data or trailers frame to the body filters, in order.
fn filter_frame(filters: &mut [Box<dyn BodyFilter>], frame: &mut Frame<Bytes>) {
    if filters.is_empty() {
        return;
    }
    if let Some(data) = frame.data_mut() {
        for filter in filters.iter_mut() {
            filter.on_data(data);
        }
    } else if let Some(trailers) = frame.trailers_mut() {
        for filter in filters.iter_mut() {
            filter.on_trailers(trailers);
        }
    }
}
