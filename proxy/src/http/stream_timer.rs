//! The timer of one stream: the route deadline, the stream's and the per-try idle timeouts and
//! `max_stream_duration` in one tokio sleep, set to the earliest bound. A connection keeps the
//! sleeps of its finished streams for its next ones ([`SpareSleeps`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::error::ResponseFlag;
use crate::stats::{ClusterStats, Stat};

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
    /// Envoy's response code details for a request this timeout ended before its response.
    pub fn details(self) -> &'static str {
        match self {
            StreamTimeout::Route => "response_timeout",
            StreamTimeout::Idle => "stream_idle_timeout",
            StreamTimeout::PerTryIdle => "upstream_per_try_idle_timeout",
            StreamTimeout::MaxDuration => "max_duration_timeout",
        }
    }

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

/// The sleeps of a connection's finished streams, still registered with the worker's timer.
/// The connection's next stream takes one and moves its deadline: later than the old one, that
/// is an atomic store in tokio, where a new sleep costs an allocation, an insertion into the
/// timer wheel and a removal when the stream ends (about 800 of a request's 39,000
/// instructions, by callgrind). A connection's streams all run on its worker, so a sleep never
/// changes timers. A spare that fires while kept wakes the task that last used it, once, to no
/// effect.
#[derive(Debug, Default)]
pub struct SpareSleeps(Mutex<Vec<Pin<Box<Sleep>>>>);

/// Spares kept per connection: HTTP/1.1 needs one, HTTP/2 a few for its concurrent streams.
const SPARES_KEPT: usize = 8;

impl SpareSleeps {
    /// A sleep due at `at`: a spare if there is one, else a new one.
    fn take(&self, at: Instant) -> Pin<Box<Sleep>> {
        let spare = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(at);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        }
    }

    fn put(&self, sleep: Pin<Box<Sleep>>) {
        let mut spares = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if spares.len() < SPARES_KEPT {
            spares.push(sleep);
        }
    }
}

/// The route deadline and the idle timeouts of one request (the stream's, and the retry
/// policy's per-try idle timeout), as one timer that bounds the wait for response headers and
/// then moves into the body. It is set to the earliest bound; a frame only notes the time, and
/// when the sleep fires early for an idle timeout that activity since pushed out, it is set
/// again (one reset per idle period, not one per frame).
#[derive(Debug)]
pub struct StreamTimer {
    /// Always present; taken only when the timer is dropped, to go back to `spares`.
    sleep: Option<Pin<Box<Sleep>>>,
    spares: Arc<SpareSleeps>,
    deadline: Option<Instant>,
    idle: Option<Duration>,
    /// When something last moved: the idle timeouts run from here.
    active_at: Instant,
    /// The cluster's stats: `upstream_rq_timeout` and `upstream_rq_per_try_idle_timeout`.
    cluster: Arc<ClusterStats>,
    idle_timeouts: Arc<Stat>,
    /// The per-try idle timeout, once the attempt that got headers runs on.
    per_try_idle: Option<Duration>,
    /// The end of the stream's `max_stream_duration`, and its counter.
    max_duration: Option<(Instant, Arc<Stat>)>,
}

impl StreamTimer {
    /// `None` when neither timeout is set (no timer at all). The idle timeout runs from `now`,
    /// the caller's last clock read (one read serves several uses on the request path).
    pub fn new(
        now: Instant,
        deadline: Option<Instant>,
        idle: Option<Duration>,
        cluster: &Arc<ClusterStats>,
        idle_timeouts: &Arc<Stat>,
        spares: &Arc<SpareSleeps>,
    ) -> Option<Self> {
        let next = earliest(deadline, idle.map(|i| now + i))?;
        let mut timer = Self::without_bounds(now, next, (cluster, idle_timeouts), spares);
        timer.deadline = deadline;
        timer.idle = idle;
        Some(timer)
    }

    /// A timer with no bound yet, first due at `first`: the caller adds the one it needs.
    fn without_bounds(
        now: Instant,
        first: Instant,
        (cluster, idle_timeouts): (&Arc<ClusterStats>, &Arc<Stat>),
        spares: &Arc<SpareSleeps>,
    ) -> StreamTimer {
        StreamTimer {
            sleep: Some(spares.take(first)),
            spares: spares.clone(),
            deadline: None,
            idle: None,
            active_at: now,
            cluster: cluster.clone(),
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
        stats: (&Arc<ClusterStats>, &Arc<Stat>),
        spares: &Arc<SpareSleeps>,
    ) -> StreamTimer {
        let now = Instant::now();
        let mut timer = timer.unwrap_or_else(|| Self::without_bounds(now, end, stats, spares));
        timer.max_duration = Some((end, counter.clone()));
        timer.reset(now);
        timer
    }

    /// The earliest of the route deadline and the stream's end.
    fn hard_deadline(&self) -> Option<Instant> {
        earliest(
            self.deadline,
            self.max_duration.as_ref().map(|(end, _)| *end),
        )
    }

    /// Sets the timer to the earliest bound, the idle timeouts running from `now`.
    fn reset(&mut self, now: Instant) {
        self.active_at = now;
        self.arm();
    }

    /// Sets the sleep to the earliest bound, the idle timeouts running from `active_at`.
    fn arm(&mut self) {
        if let Some(next) = earliest(self.hard_deadline(), self.idle_end()) {
            self.sleep().reset(next);
        }
    }

    /// When the idle timeout in force ends, counted from the last activity.
    fn idle_end(&self) -> Option<Instant> {
        self.idle().map(|idle| self.active_at + idle)
    }

    /// The idle timeout in force: the shorter of the stream's and the per-try one.
    fn idle(&self) -> Option<Duration> {
        earliest(self.idle, self.per_try_idle)
    }

    /// Adds the retry policy's per-try idle timeout for the body of the attempt that won,
    /// making a timer for it if the request had none; it runs from `now`.
    pub fn add_per_try_idle(
        now: Instant,
        timer: Option<StreamTimer>,
        idle: Duration,
        stats: (&Arc<ClusterStats>, &Arc<Stat>),
        spares: &Arc<SpareSleeps>,
    ) -> StreamTimer {
        let mut timer =
            timer.unwrap_or_else(|| Self::without_bounds(now, now + idle, stats, spares));
        timer.per_try_idle = Some(idle);
        // It may be shorter than what the sleep waits for: set it again.
        timer.reset(now);
        timer
    }

    /// Starts the route timeout now (it starts once the downstream request has ended).
    pub fn start_route(&mut self, timeout: Duration) {
        let now = Instant::now();
        self.deadline = Some(now + timeout);
        self.reset(now);
    }

    /// Restarts the idle timeout: something moved.
    pub fn touch(&mut self) {
        // No clock read for a timer with no idle timeout.
        if self.idle().is_some() {
            self.touch_at(Instant::now());
        }
    }

    /// [`StreamTimer::touch`] with the caller's clock read.
    pub fn touch_at(&mut self, now: Instant) {
        self.active_at = now;
    }

    /// Resolves when a timeout fires (and counts it).
    pub fn expired(&mut self) -> impl Future<Output = StreamTimeout> + '_ {
        std::future::poll_fn(|cx| self.poll_expired(cx))
    }

    /// Polls for a timeout (counting it when it fires), as a body does between frames.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<StreamTimeout> {
        let fired = loop {
            let mut sleep = self.sleep();
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let fired = sleep.deadline();
            // Early for an idle timeout that activity since pushed out: catch up.
            let hard_reached = self.hard_deadline().is_some_and(|hard| fired >= hard);
            if !hard_reached && self.idle_end().is_some_and(|end| end > fired) {
                self.arm();
                continue;
            }
            break fired;
        };
        // The timer holds the earliest deadline, so it is the stream's or the route's iff it
        // reached it.
        if let Some((end, counter)) = &self.max_duration
            && fired >= *end
        {
            counter.inc();
            return Poll::Ready(StreamTimeout::MaxDuration);
        }
        if self.deadline.is_some_and(|d| fired >= d) {
            self.cluster.upstream_rq_timeout.inc();
            return Poll::Ready(StreamTimeout::Route);
        }
        match self.per_try_idle {
            Some(per_try) if self.idle.is_none_or(|idle| per_try < idle) => {
                self.cluster.upstream_rq_per_try_idle_timeout.inc();
                Poll::Ready(StreamTimeout::PerTryIdle)
            }
            _ => {
                self.idle_timeouts.inc();
                Poll::Ready(StreamTimeout::Idle)
            }
        }
    }

    fn sleep(&mut self) -> Pin<&mut Sleep> {
        self.sleep
            .as_mut()
            .expect("the sleep is taken only on drop")
            .as_mut()
    }
}

impl Drop for StreamTimer {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            self.spares.put(sleep);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::time::advance;

    /// What a connection and a cluster give a stream's timer.
    #[derive(Default)]
    struct Fixture {
        cluster: Arc<ClusterStats>,
        idle: Arc<Stat>,
        spares: Arc<SpareSleeps>,
    }

    impl Fixture {
        /// A timer starting now, with a route deadline and an idle timeout in milliseconds.
        fn timer(&self, route_ms: Option<u64>, idle_ms: Option<u64>) -> Option<StreamTimer> {
            let now = Instant::now();
            StreamTimer::new(
                now,
                route_ms.map(|ms| now + Duration::from_millis(ms)),
                idle_ms.map(Duration::from_millis),
                &self.cluster,
                &self.idle,
                &self.spares,
            )
        }
    }

    /// Whether the timer has fired by now, and with what.
    async fn fired(timer: &mut StreamTimer) -> Option<StreamTimeout> {
        match poll_fn(|cx| Poll::Ready(timer.poll_expired(cx))).await {
            Poll::Ready(timeout) => Some(timeout),
            Poll::Pending => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn activity_pushes_the_idle_timeout_out_from_the_last_frame() {
        let f = Fixture::default();
        let mut timer = f
            .timer(None, Some(100))
            .expect("an idle timeout makes a timer");
        advance(Duration::from_millis(60)).await;
        timer.touch();
        // The sleep was set for 100 ms: it fires, finds the activity and waits on.
        advance(Duration::from_millis(50)).await;
        assert_eq!(fired(&mut timer).await, None, "60 + 100 ms not reached");
        advance(Duration::from_millis(51)).await;
        assert_eq!(fired(&mut timer).await, Some(StreamTimeout::Idle));
        assert_eq!(f.idle.get(), 1);
        assert_eq!(f.cluster.upstream_rq_timeout.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_route_deadline_is_not_pushed_out_by_activity() {
        let f = Fixture::default();
        let mut timer = f.timer(Some(150), Some(100)).expect("timer");
        // Activity every 50 ms keeps the 100 ms idle timeout away, up to 149 ms...
        for step in [50, 50, 49] {
            advance(Duration::from_millis(step)).await;
            timer.touch();
            assert_eq!(fired(&mut timer).await, None);
        }
        // ...and the 150 ms route deadline comes anyway.
        advance(Duration::from_millis(2)).await;
        assert_eq!(fired(&mut timer).await, Some(StreamTimeout::Route));
        assert_eq!((f.cluster.upstream_rq_timeout.get(), f.idle.get()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spare_sleep_serves_the_next_stream_with_its_own_deadline() {
        let f = Fixture::default();
        drop(f.timer(None, Some(100)));
        assert_eq!(
            f.spares.0.lock().expect("lock").len(),
            1,
            "kept for the next"
        );
        // The next stream's bound is earlier than the spare's: it must still fire on time.
        let mut second = f.timer(Some(20), None).expect("timer");
        assert!(
            f.spares.0.lock().expect("lock").is_empty(),
            "the spare was taken"
        );
        advance(Duration::from_millis(21)).await;
        assert_eq!(fired(&mut second).await, Some(StreamTimeout::Route));
    }
}
