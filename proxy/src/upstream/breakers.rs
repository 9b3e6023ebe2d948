//! Circuit breakers: a cluster's limits on requests and retries in flight, one set per routing
//! priority (a route with `priority: HIGH` counts against the HIGH thresholds, as in Envoy),
//! and the `circuit_breakers.{default,high}.*` gauges Envoy shows for them. Connection and
//! pending-request limits live with the connections ([`super::connect`], [`super::pool`]);
//! the gauges read them there.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::config::Thresholds;
use crate::stats::Registry;

/// A count in flight, held by [`Held`] slots.
#[derive(Debug, Default)]
struct InFlight(AtomicU64);

impl InFlight {
    fn try_take(self: &Arc<Self>, max: u64) -> Option<Held> {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Held(self.clone()))
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One request or retry in flight; gives its place back when dropped.
#[derive(Debug)]
pub struct Held(Arc<InFlight>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One priority's request and retry limits.
#[derive(Debug)]
pub struct Limits {
    pub thresholds: Thresholds,
    requests: Arc<InFlight>,
    retries: Arc<InFlight>,
    /// A retry budget was consulted: Envoy's `remaining_retries` shows 0 from then on, since a
    /// budget's room changes with every request.
    budget_consulted: AtomicBool,
}

impl Limits {
    fn new(thresholds: Thresholds) -> Self {
        Limits {
            thresholds,
            requests: Arc::default(),
            retries: Arc::default(),
            budget_consulted: AtomicBool::new(false),
        }
    }

    /// A place under `max_requests`.
    pub fn try_request(&self) -> Option<Held> {
        self.requests
            .try_take(u64::from(self.thresholds.max_requests))
    }

    /// A place for one retry: under the retry budget if there is one (a share of the requests
    /// in flight, `pending` included), else under `max_retries`.
    pub fn try_retry(&self, pending: u64) -> Option<Held> {
        if self.thresholds.retry_budget.is_some() {
            self.budget_consulted.store(true, Ordering::Relaxed);
        }
        self.retries.try_take(self.max_retries(pending))
    }

    /// `remaining_retries` as Envoy shows it.
    fn remaining_retries(&self, pending: u64) -> u64 {
        match self.thresholds.retry_budget {
            Some(_) if self.budget_consulted.load(Ordering::Relaxed) => 0,
            Some(_) => u64::from(self.thresholds.max_retries),
            None => self.max_retries(pending).saturating_sub(self.retries.get()),
        }
    }

    fn max_retries(&self, pending: u64) -> u64 {
        match self.thresholds.retry_budget {
            Some(budget) => budget.allowed(self.requests.get() + pending),
            None => u64::from(self.thresholds.max_retries),
        }
    }
}

/// The cluster's limits for both priorities.
#[derive(Debug)]
pub struct Breakers {
    pub default: Limits,
    pub high: Limits,
}

/// What the connection side of one priority reports for the gauges: (open, max) connections
/// and (pending, max) requests.
pub type ConnectionReadings = dyn Fn() -> Option<((u64, u64), (u64, u64))> + Send + Sync;

impl Breakers {
    pub fn new(default: Thresholds, high: Thresholds) -> Arc<Self> {
        Arc::new(Breakers {
            default: Limits::new(default),
            high: Limits::new(high),
        })
    }

    pub fn for_priority(&self, high: bool) -> &Limits {
        if high { &self.high } else { &self.default }
    }

    /// Registers `cluster.NAME.circuit_breakers.{default,high}.*`: the `*_open` gauges (1 while
    /// a limit is reached) always, the `remaining_*` gauges when `track_remaining` is set, all
    /// read when stats are shown (nothing is kept up to date per request).
    pub fn register_gauges(
        self: &Arc<Self>,
        registry: &Registry,
        cluster: &str,
        connections: [Arc<ConnectionReadings>; 2],
    ) {
        // One set per cluster, both priorities in it: a thousand clusters each hold one name
        // and one closure.
        let prefix = format!(
            "cluster.{}.circuit_breakers",
            crate::stats::stat_name(cluster)
        );
        let breakers: Weak<Breakers> = Arc::downgrade(self);
        let thresholds = [self.default.thresholds, self.high.thresholds];
        let read = move |gauge: &mut dyn FnMut(&'static str, &'static str, u64)| {
            // The request-side gauges read 0 once the breakers are gone.
            let breakers = breakers.upgrade();
            for (high, group) in [(false, "default"), (true, "high")] {
                let thresholds = thresholds[usize::from(high)];
                let mut gauge = |name, value| gauge(group, name, value);
                let open = |at_limit: bool| u64::from(at_limit);
                let readings = connections[usize::from(high)]();
                let pending = readings.map_or(0, |(_, (pending, _))| pending);
                let limits = |read: &dyn Fn(&Limits) -> u64| {
                    breakers.as_ref().map_or(0, |b| read(b.for_priority(high)))
                };
                gauge(
                    "rq_open",
                    limits(&|l| open(l.requests.get() >= u64::from(l.thresholds.max_requests))),
                );
                gauge(
                    "rq_retry_open",
                    limits(&|l| open(l.retries.get() >= l.max_retries(pending))),
                );
                gauge(
                    "cx_open",
                    readings.map_or(0, |((open_cx, max), _)| open(open_cx >= max)),
                );
                gauge(
                    "rq_pending_open",
                    readings.map_or(0, |(_, (pending, max))| open(pending >= max)),
                );
                gauge("cx_pool_open", 0);
                if !thresholds.track_remaining {
                    continue;
                }
                gauge(
                    "remaining_rq",
                    limits(&|l| {
                        u64::from(l.thresholds.max_requests).saturating_sub(l.requests.get())
                    }),
                );
                gauge(
                    "remaining_retries",
                    limits(&|l| l.remaining_retries(pending)),
                );
                gauge(
                    "remaining_cx",
                    readings.map_or(
                        u64::from(thresholds.max_connections),
                        |((open_cx, max), _)| max.saturating_sub(open_cx),
                    ),
                );
                gauge(
                    "remaining_pending",
                    readings.map_or(
                        u64::from(thresholds.max_pending_requests),
                        |(_, (pending, max))| max.saturating_sub(pending),
                    ),
                );
                // `max_connection_pools` is unlimited: Envoy shows the largest counter value.
                gauge("remaining_cx_pools", u64::MAX);
            }
        };
        registry.derived_gauges(prefix, Box::new(read));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryBudget;

    #[test]
    fn limits_admit_up_to_their_maximum_and_free_places_when_dropped() {
        let limits = Limits::new(Thresholds {
            max_requests: 2,
            max_retries: 1,
            ..Thresholds::default()
        });
        let a = limits.try_request().expect("first");
        let _b = limits.try_request().expect("second");
        assert!(limits.try_request().is_none(), "third is over");
        drop(a);
        assert!(limits.try_request().is_some(), "a place came back");
        let _retry = limits.try_retry(0).expect("one retry");
        assert!(limits.try_retry(0).is_none());
    }

    #[test]
    fn a_retry_budget_scales_with_the_requests_in_flight() {
        let limits = Limits::new(Thresholds {
            retry_budget: Some(RetryBudget {
                percent: 25.0,
                min_concurrency: 1,
            }),
            ..Thresholds::default()
        });
        let _requests: Vec<Held> = (0..8).map(|_| limits.try_request().expect("rq")).collect();
        // 25% of 8 in flight (plus 4 pending) = 3.
        let _retries: Vec<Held> = (0..3)
            .map(|_| limits.try_retry(4).expect("retry"))
            .collect();
        assert!(limits.try_retry(4).is_none());
    }
}
