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
use crate::upstream::breakers::Held;
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
                let sent = data.as_ref().map_or(0, |d| d.len() as u64);
                if let Some(log) = slots.log.as_mut() {
                    log.entry.bytes_sent = sent;
                }
                if let Some(trace) = slots.trace.as_mut() {
                    trace.add_sent(sent);
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
    /// The request's `max_requests` place, `upstream_rq_active` and the host's `rq_active`.
    _active: (Held, GaugeGuard, HostGauge),
    downstream: Option<DownstreamSlots>,
    /// The HTTP/1.1 connection the body arrives on, back to its pool once the body is in.
    lease: Option<Lease>,
    /// HTTP filters looking at the body (usually none).
    filters: Vec<Box<dyn BodyFilter>>,
    /// The cluster's `upstream_rq_time` and when the request went out, recorded at the end.
    rq_time: Option<(Arc<crate::stats::Histogram>, Instant)>,
    ended: bool,
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
    /// A sampled request's spans, finished when this is dropped.
    pub trace: Option<crate::http::tracing::Completion>,
    /// The connection manager's `downstream_rq_time` and when the request began.
    pub rq_time: (Arc<crate::stats::Histogram>, Instant),
}

impl Drop for DownstreamSlots {
    fn drop(&mut self) {
        self.rq_time.0.record_duration(self.rq_time.1.elapsed());
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
        active: (Held, GaugeGuard, HostGauge),
        lease: Option<Lease>,
    ) -> Self {
        UpstreamBody {
            inner,
            timer,
            _active: active,
            downstream: None,
            lease,
            filters: Vec::new(),
            rq_time: None,
            ended: false,
        }
    }

    /// Records `upstream_rq_time` (from `sent`) when the body ends.
    pub fn with_rq_time(mut self, histogram: &Arc<crate::stats::Histogram>, sent: Instant) -> Self {
        self.rq_time = Some((histogram.clone(), sent));
        self
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(timer) = &mut self.timer {
                    timer.touch();
                }
                filter_frame(&mut self.filters, &mut frame);
                if let Some(downstream) = self.downstream.as_mut()
                    && let Some(data) = frame.data_ref()
                {
                    if let Some(log) = downstream.log.as_mut() {
                        log.entry.bytes_sent += data.len() as u64;
                    }
                    if let Some(trace) = downstream.trace.as_mut() {
                        trace.add_sent(data.len() as u64);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.ended = true;
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
                            log.entry.flags.insert(timeout.flag());
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
        if let Some((histogram, sent)) = &self.rq_time
            && (self.ended || self.inner.is_end_stream())
        {
            histogram.record_duration(sent.elapsed());
        }
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
    /// The retry policy's per-try idle timeout (`upstream_rq_per_try_idle_timeout`, flag UT).
    #[error("upstream per try idle timeout")]
    PerTryIdle,
    /// The stream's `max_stream_duration` (`downstream_rq_max_duration_reached`, flag DT).
    #[error("downstream duration timeout")]
    MaxDuration,
}

impl StreamTimeout {
    pub fn flag(self) -> ResponseFlag {
        match self {
            StreamTimeout::Route | StreamTimeout::PerTryIdle => {
                ResponseFlag::UpstreamRequestTimeout
            }
            StreamTimeout::Idle => ResponseFlag::StreamIdleTimeout,
            StreamTimeout::MaxDuration => ResponseFlag::DurationTimeout,
        }
    }
}

/// The route deadline and the idle timeouts of one request (the stream's, and the retry
/// policy's per-try idle timeout), as one timer that bounds the wait for response headers and
/// then moves into the body: it is set to the earliest and pushed out on every frame
/// (extending a tokio timer is an atomic store, no re-registration).
#[derive(Debug)]
pub struct StreamTimer {
    sleep: Pin<Box<Sleep>>,
    deadline: Option<Instant>,
    idle: Option<Duration>,
    route_timeouts: Arc<Stat>,
    idle_timeouts: Arc<Stat>,
    /// The per-try idle timeout and its counter, once the attempt that got headers runs on.
    per_try_idle: Option<(Duration, Arc<Stat>)>,
    /// The end of the stream's `max_stream_duration`, and its counter.
    max_duration: Option<(Instant, Arc<Stat>)>,
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
            per_try_idle: None,
            max_duration: None,
        })
    }

    /// A timer with no bound yet, first due at `first`: the caller adds the one it needs.
    fn without_bounds(
        first: Instant,
        (route_timeouts, idle_timeouts): (&Arc<Stat>, &Arc<Stat>),
    ) -> StreamTimer {
        StreamTimer {
            sleep: Box::pin(tokio::time::sleep_until(first)),
            deadline: None,
            idle: None,
            route_timeouts: route_timeouts.clone(),
            idle_timeouts: idle_timeouts.clone(),
            per_try_idle: None,
            max_duration: None,
        }
    }

    /// Bounds the stream by `max_stream_duration`, making a timer for it if the request had
    /// none.
    pub fn add_max_duration(
        timer: Option<StreamTimer>,
        end: Instant,
        counter: &Arc<Stat>,
        (route_timeouts, idle_timeouts): (&Arc<Stat>, &Arc<Stat>),
    ) -> StreamTimer {
        let mut timer =
            timer.unwrap_or_else(|| Self::without_bounds(end, (route_timeouts, idle_timeouts)));
        timer.max_duration = Some((end, counter.clone()));
        timer.reset();
        timer
    }

    /// The earliest of the route deadline and the stream's end.
    fn hard_deadline(&self) -> Option<Instant> {
        earliest(
            self.deadline,
            self.max_duration.as_ref().map(|(end, _)| *end),
        )
    }

    fn reset(&mut self) {
        if let Some(next) = Self::next(self.hard_deadline(), self.idle()) {
            self.sleep.as_mut().reset(next);
        }
    }

    fn next(deadline: Option<Instant>, idle: Option<Duration>) -> Option<Instant> {
        earliest(deadline, idle.map(|i| Instant::now() + i))
    }

    /// The idle timeout in force: the shorter of the stream's and the per-try one.
    fn idle(&self) -> Option<Duration> {
        earliest(self.idle, self.per_try_idle.as_ref().map(|(idle, _)| *idle))
    }

    /// Adds the retry policy's per-try idle timeout for the body of the attempt that won,
    /// making a timer for it if the request had none.
    pub fn add_per_try_idle(
        timer: Option<StreamTimer>,
        idle: Duration,
        counter: &Arc<Stat>,
        (route_timeouts, idle_timeouts): (&Arc<Stat>, &Arc<Stat>),
    ) -> StreamTimer {
        let mut timer = timer.unwrap_or_else(|| {
            Self::without_bounds(Instant::now() + idle, (route_timeouts, idle_timeouts))
        });
        timer.per_try_idle = Some((idle, counter.clone()));
        timer.touch();
        timer
    }

    /// Starts the route timeout now (it starts once the downstream request has ended).
    pub fn start_route(&mut self, timeout: Duration) {
        self.deadline = Some(Instant::now() + timeout);
        self.reset();
    }

    /// Restarts the idle timeout: something moved.
    pub fn touch(&mut self) {
        if self.idle().is_some() {
            self.reset();
        }
    }

    /// Resolves when a timeout fires (and counts it).
    pub fn expired(&mut self) -> impl Future<Output = StreamTimeout> + '_ {
        std::future::poll_fn(|cx| self.poll_expired(cx))
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<StreamTimeout> {
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The timer holds the earliest deadline, so it is the stream's or the route's iff it
        // reached it.
        let fired = self.sleep.deadline();
        if let Some((end, counter)) = &self.max_duration
            && fired >= *end
        {
            counter.inc();
            return Poll::Ready(StreamTimeout::MaxDuration);
        }
        if self.deadline.is_some_and(|d| fired >= d) {
            self.route_timeouts.inc();
            return Poll::Ready(StreamTimeout::Route);
        }
        match &self.per_try_idle {
            Some((per_try, counter)) if self.idle.is_none_or(|idle| *per_try < idle) => {
                counter.inc();
                Poll::Ready(StreamTimeout::PerTryIdle)
            }
            _ => {
                self.idle_timeouts.inc();
                Poll::Ready(StreamTimeout::Idle)
            }
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

/// What an upstream request carries: the downstream body itself, one reader of a body that
/// retries and mirrors share, or nothing.
#[derive(Debug)]
pub enum OutgoingBody {
    Direct(RequestBody),
    Shared(crate::http::replay::SharedReader),
    Empty,
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutgoingBody::Direct(body) => Pin::new(body).poll_frame(cx),
            OutgoingBody::Shared(reader) => Pin::new(reader).poll_frame(cx),
            OutgoingBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutgoingBody::Direct(body) => body.is_end_stream(),
            OutgoingBody::Shared(reader) => reader.is_end_stream(),
            OutgoingBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutgoingBody::Direct(body) => body.size_hint(),
            OutgoingBody::Shared(reader) => reader.size_hint(),
            OutgoingBody::Empty => SizeHint::with_exact(0),
        }
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

/// The smaller of two optional bounds (either alone if the other is absent).
fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
