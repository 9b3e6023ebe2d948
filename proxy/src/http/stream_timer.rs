//! The timer of one stream: the route deadline, the stream's and the per-try idle timeouts and
//! `max_stream_duration` in one tokio sleep, set to the earliest bound.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::error::ResponseFlag;
use crate::stats::Stat;

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

    /// Polls for a timeout (counting it when it fires), as a body does between frames.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<StreamTimeout> {
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

/// The smaller of two optional bounds (either alone if the other is absent).
fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
