//! A host's outlier-detection counters: written on the request path with atomics only, read
//! and reset by the detector (`super::super::health::outlier`) on the main runtime. They live
//! with the host so that the host's state needs nothing from the detector.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Requests and successes of one interval, in one word so the detector takes both at once:
/// the high half counts requests, the low half successes.
#[derive(Debug, Default)]
struct Bucket(AtomicU64);

impl Bucket {
    const ONE_REQUEST: u64 = 1 << 32;

    #[inline]
    fn add(&self, success: bool) {
        self.0
            .fetch_add(Self::ONE_REQUEST | u64::from(success), Ordering::Relaxed);
    }

    /// The interval's (requests, successes), starting a new interval.
    fn take(&self) -> (u64, u64) {
        let word = self.0.swap(0, Ordering::Relaxed);
        (word >> 32, word & 0xffff_ffff)
    }
}

/// The consecutive-error runs after counting one response status; 0 where the run was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
}

/// One of the consecutive-error runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

/// A host's outlier counters and what the detector last computed for it.
#[derive(Debug)]
pub struct OutlierCounters {
    consecutive_5xx: AtomicU32,
    consecutive_gateway_failure: AtomicU32,
    consecutive_local_origin_failure: AtomicU32,
    external: Bucket,
    local: Bucket,
    /// Success rates of the last interval (percent, as `f64` bits; negative: not computed),
    /// for `/clusters`.
    success_rate: AtomicU64,
    local_origin_success_rate: AtomicU64,
    /// Ejection history; only the main runtime locks it.
    record: Mutex<EjectionRecord>,
}

impl Default for OutlierCounters {
    fn default() -> Self {
        OutlierCounters {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway_failure: AtomicU32::new(0),
            consecutive_local_origin_failure: AtomicU32::new(0),
            external: Bucket::default(),
            local: Bucket::default(),
            success_rate: AtomicU64::new(NOT_COMPUTED),
            local_origin_success_rate: AtomicU64::new(NOT_COMPUTED),
            record: Mutex::default(),
        }
    }
}

/// -1 as `f64` bits: no success rate computed for the interval.
const NOT_COMPUTED: u64 = 0xbff0_0000_0000_0000;

/// A host's ejections so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct EjectionRecord {
    pub ejections: u32,
    /// Why it was last ejected, as the event log names it: its `type` when the ejection ends.
    pub last_kind: Option<&'static str>,
    pub last_ejection: Option<Instant>,
    pub last_unejection: Option<Instant>,
    /// Multiplies the base ejection time; grows with each ejection, shrinks while healthy.
    pub backoff: u32,
    pub jitter: Duration,
}

impl OutlierCounters {
    /// Counts a response status (an external result); returns the consecutive runs it leaves.
    #[inline]
    pub fn count_status(&self, status: u16) -> Runs {
        if status < 500 {
            self.external.add(true);
            clear(&self.consecutive_5xx);
            clear(&self.consecutive_gateway_failure);
            return Runs {
                consecutive_5xx: 0,
                consecutive_gateway_failure: 0,
            };
        }
        self.external.add(false);
        let consecutive_gateway_failure = if matches!(status, 502..=504) {
            self.consecutive_gateway_failure
                .fetch_add(1, Ordering::Relaxed)
                + 1
        } else {
            clear(&self.consecutive_gateway_failure);
            0
        };
        Runs {
            consecutive_5xx: self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1,
            consecutive_gateway_failure,
        }
    }

    /// Counts a local-origin success (a connection was made).
    #[inline]
    pub fn count_local_success(&self) {
        self.local.add(true);
        clear(&self.consecutive_local_origin_failure);
    }

    /// Counts a local-origin failure; returns the consecutive run it makes.
    #[inline]
    pub fn count_local_failure(&self) -> u32 {
        self.local.add(false);
        self.consecutive_local_origin_failure
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }

    /// The interval's (requests, successes), external and local origin, starting a new
    /// interval with no success rates computed.
    pub fn take_interval(&self) -> ((u64, u64), (u64, u64)) {
        self.success_rate.store(NOT_COMPUTED, Ordering::Relaxed);
        self.local_origin_success_rate
            .store(NOT_COMPUTED, Ordering::Relaxed);
        (self.external.take(), self.local.take())
    }

    /// Keeps the success rate the detector computed for the interval.
    pub fn set_success_rate(&self, local: bool, percent: f64) {
        let slot = if local {
            &self.local_origin_success_rate
        } else {
            &self.success_rate
        };
        slot.store(percent.to_bits(), Ordering::Relaxed);
    }

    /// The last computed success rates (external, local origin); -1 when not computed.
    pub fn success_rates(&self) -> (f64, f64) {
        (
            f64::from_bits(self.success_rate.load(Ordering::Relaxed)),
            f64::from_bits(self.local_origin_success_rate.load(Ordering::Relaxed)),
        )
    }

    /// Starts one consecutive run again (after it led to an ejection).
    pub fn restart(&self, run: Run) {
        let counter = match run {
            Run::Consecutive5xx => &self.consecutive_5xx,
            Run::ConsecutiveGatewayFailure => &self.consecutive_gateway_failure,
            Run::ConsecutiveLocalOriginFailure => &self.consecutive_local_origin_failure,
        };
        counter.store(0, Ordering::Relaxed);
    }

    /// Starts every consecutive run again (after an ejection ends).
    pub fn reset_consecutive(&self) {
        self.restart(Run::Consecutive5xx);
        self.restart(Run::ConsecutiveGatewayFailure);
        self.restart(Run::ConsecutiveLocalOriginFailure);
    }

    /// The ejection history (a poisoned lock still holds good counts).
    pub fn record(&self) -> MutexGuard<'_, EjectionRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Clears a counter without writing a line other workers read when it is already zero.
#[inline]
fn clear(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_take_requests_and_successes_together() {
        let bucket = Bucket::default();
        bucket.add(true);
        bucket.add(false);
        bucket.add(true);
        assert_eq!(bucket.take(), (3, 2));
        assert_eq!(bucket.take(), (0, 0));
    }

    #[test]
    fn not_computed_is_minus_one() {
        assert_eq!(f64::from_bits(NOT_COMPUTED), -1.0);
        assert_eq!(OutlierCounters::default().success_rates(), (-1.0, -1.0));
    }

    #[test]
    fn a_success_breaks_both_status_runs() {
        let counters = OutlierCounters::default();
        assert_eq!(counters.count_status(503).consecutive_5xx, 1);
        assert_eq!(counters.count_status(502).consecutive_gateway_failure, 2);
        assert_eq!(counters.count_status(500).consecutive_gateway_failure, 0);
        assert_eq!(counters.count_status(500).consecutive_5xx, 4);
        assert_eq!(
            counters.count_status(200),
            Runs {
                consecutive_5xx: 0,
                consecutive_gateway_failure: 0
            }
        );
        assert_eq!(counters.count_status(504).consecutive_5xx, 1);
    }
}
