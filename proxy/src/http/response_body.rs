//! Response bodies: an upstream body on its way downstream, holding the request's slots until
//! it ends, or a local reply's fixed buffer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::BoxError;
use crate::body::filter::{BodyFilter, filter_frame, finish_all};
use crate::http::access_log::PendingLine;
use crate::http::stream_timer::StreamTimer;
use crate::stats::responses::ResponseTime;
use crate::stats::{GaugeGuard, HttpStats};
use crate::upstream::HostGauge;
use crate::upstream::breakers::Held;
use crate::upstream::pool::Lease;

/// A response body: streamed from upstream or generated locally.
#[derive(Debug)]
pub enum ResponseBody {
    /// Boxed: a response moves several times on its way out (router, connection manager,
    /// hyper), and copying the upstream body's 376 bytes each time cost more than the
    /// allocation does (about 1,000 instructions per request against some 100).
    Upstream(Box<UpstreamBody>),
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
                body.reshaping = filters.iter().any(|f| f.reshapes());
                body.filters = filters;
            }
            ResponseBody::Full(data) => {
                for filter in &mut filters {
                    if let Some(data) = data.as_mut() {
                        filter.on_data(data);
                    }
                }
                if let Some(tail) = finish_all(&mut filters) {
                    *data = Some(match data.take() {
                        Some(head) => [head, tail].concat().into(),
                        None => tail,
                    });
                }
                for filter in &mut filters {
                    filter.on_end();
                }
                slots.ending.complete();
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
            ResponseBody::Upstream(body) => {
                body.inner.is_end_stream() && !body.reshaping && !body.ending
            }
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) if body.reshaping => SizeHint::default(),
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
    /// A filter changes the body's length: no size is known, and the filters' last bytes
    /// ([`finish_all`]) go out before the trailers or the end.
    reshaping: bool,
    /// The trailers, held while the filters' last bytes go out first.
    held_trailers: Option<Frame<Bytes>>,
    /// The upstream body is over and the filters' last bytes went out: the end comes next.
    ending: bool,
    /// Where `upstream_rq_time` goes (with the router's dynamic stats) and when the request
    /// went out, recorded at the end.
    rq_time: (Option<ResponseTime>, Instant),
    /// When the last frame came: the one clock read for the pool's idle time and both
    /// request-time histograms.
    ended_at: Option<Instant>,
}

/// Work that waits for a downstream stream to end (the filter chain's completion phase); a
/// trait so that bodies need nothing from the filter chain.
pub trait StreamEnd: Send + std::fmt::Debug {
    fn stream_ended(self: Box<Self>);
}

/// A request until its response has gone out whole. Dropped before that, its stream was
/// reset, which Envoy counts as `downstream_rq_rx_reset` whichever side reset it (the client
/// closed the connection or reset the stream, or the proxy cut the response), and again as
/// `downstream_rq_tx_reset` when the proxy cut it: its upstream body failed or timed out.
#[derive(Debug)]
pub struct StreamEnding {
    stats: Arc<HttpStats>,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Open,
    Complete,
    Cut,
}

impl StreamEnding {
    pub fn new(stats: &Arc<HttpStats>) -> Self {
        StreamEnding {
            stats: stats.clone(),
            outcome: Outcome::Open,
        }
    }

    /// The response went out whole.
    pub fn complete(&mut self) {
        self.outcome = Outcome::Complete;
    }

    /// The proxy cut the response: its upstream body failed or a timer ran out.
    fn cut(&mut self) {
        self.outcome = Outcome::Cut;
    }
}

impl Drop for StreamEnding {
    fn drop(&mut self) {
        if self.outcome == Outcome::Complete {
            return;
        }
        self.stats.downstream_rq_rx_reset.inc();
        if self.outcome == Outcome::Cut {
            self.stats.downstream_rq_tx_reset.inc();
        }
    }
}

/// What a downstream request holds until its response ends: its place in
/// `downstream_rq_active` and in the connection's in-flight count (the idle timeout's), its
/// access log line, and its filters' completion phase.
#[derive(Debug)]
pub struct DownstreamSlots {
    pub active: GaugeGuard,
    pub in_flight: GaugeGuard,
    /// Whether the response went out whole, or its stream was reset; its stats are the
    /// connection manager's, `downstream_rq_time` among them.
    pub ending: StreamEnding,
    /// The access log line, written when this is dropped (its record is boxed: only logged
    /// requests pay for it).
    pub log: Option<PendingLine>,
    /// The filters' completion phase, run when this is dropped.
    pub completion: Option<Box<dyn StreamEnd>>,
    /// A sampled request's spans, finished when this is dropped.
    pub trace: Option<crate::http::tracing::Completion>,
    /// When the request began, for the connection manager's `downstream_rq_time`.
    pub started: Instant,
    /// When the response ended, if the upstream body read the clock then; else it is read here.
    pub ended_at: Option<Instant>,
}

impl Drop for DownstreamSlots {
    fn drop(&mut self) {
        // One clock read (at most) for the histogram and the log line (dropped after this).
        let took = self
            .ended_at
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.started);
        self.ending.stats.downstream_rq_time.record_duration(took);
        if let Some(log) = self.log.as_mut() {
            log.entry.took = Some(took);
        }
        if let Some(completion) = self.completion.take() {
            completion.stream_ended();
        }
    }
}

impl UpstreamBody {
    /// `rq_time`: where `upstream_rq_time` goes (none without dynamic stats) and when the
    /// request went out.
    pub fn new(
        inner: Incoming,
        timer: Option<StreamTimer>,
        active: (Held, GaugeGuard, HostGauge),
        lease: Option<Lease>,
        rq_time: (Option<ResponseTime>, Instant),
    ) -> Self {
        UpstreamBody {
            inner,
            timer,
            _active: active,
            downstream: None,
            lease,
            filters: Vec::new(),
            reshaping: false,
            held_trailers: None,
            ending: false,
            rq_time,
            ended_at: None,
        }
    }

    /// The filters' last bytes as a data frame, once, when a filter reshapes the body.
    fn finish_frame(&mut self) -> Option<Frame<Bytes>> {
        if !self.reshaping {
            return None;
        }
        self.reshaping = false;
        let mut frame = Frame::data(finish_all(&mut self.filters)?);
        self.account(&mut frame);
        Some(frame)
    }

    /// Counts a frame going downstream: trailers for the log, bytes for the log and the span.
    fn account(&mut self, frame: &mut Frame<Bytes>) {
        if let Some(trailers) = frame.trailers_ref()
            && let Some(log) = self.downstream.as_mut().and_then(|d| d.log.as_mut())
        {
            log.entry.capture_trailers(trailers);
        }
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
    }

    /// The body is over: the filters' end, the connection back to its pool.
    fn end(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let now = Instant::now();
        self.ended_at = Some(now);
        for filter in &mut self.filters {
            filter.on_end();
        }
        if let Some(lease) = self.lease.take() {
            lease.release(now.into_std());
        }
        Poll::Ready(None)
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(trailers) = self.held_trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        if self.ending {
            return self.end();
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                // A frame is activity for the idle timeouts, unless it was the last one (as
                // with most bodies of known length): then nothing is waited for any more.
                if let Some(timer) = &mut self.timer
                    && !self.inner.is_end_stream()
                {
                    timer.touch();
                }
                filter_frame(&mut self.filters, &mut frame);
                if frame.is_trailers()
                    && let Some(tail) = self.finish_frame()
                {
                    self.account(&mut frame);
                    self.held_trailers = Some(frame);
                    return Poll::Ready(Some(Ok(tail)));
                }
                self.account(&mut frame);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => match self.finish_frame() {
                Some(tail) => {
                    self.ending = true;
                    Poll::Ready(Some(Ok(tail)))
                }
                None => self.end(),
            },
            Poll::Ready(Some(Err(error))) => {
                if let Some(downstream) = self.downstream.as_mut() {
                    downstream.ending.cut();
                }
                if let Some(lease) = self.lease.as_mut() {
                    lease.failed(&error);
                }
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Pending => match &mut self.timer {
                Some(timer) => match timer.poll_expired(cx) {
                    Poll::Ready(timeout) => {
                        // The access log shows why the body was cut, as Envoy's does.
                        if let Some(downstream) = self.downstream.as_mut() {
                            downstream.ending.cut();
                            if let Some(log) = downstream.log.as_mut() {
                                log.entry.flags.insert(timeout.flag());
                            }
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
        // A body that was complete from the start (no content) is never polled: it ends now.
        let ended_at = self
            .ended_at
            .or_else(|| self.inner.is_end_stream().then(Instant::now));
        if let (Some(at), (Some(time), sent)) = (ended_at, &self.rq_time) {
            time.record(at.saturating_duration_since(*sent));
        }
        if let Some(downstream) = self.downstream.as_mut() {
            downstream.ended_at = ended_at;
            if ended_at.is_some() {
                downstream.ending.complete();
            }
        }
        // One dropped part-way leaves its connection mid-response, so that connection closes
        // instead of going back to its pool.
        if let (Some(lease), Some(at)) = (self.lease.take(), ended_at) {
            lease.release(at.into_std());
        }
    }
}
