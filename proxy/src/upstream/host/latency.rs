//! A host's response-time estimate for the peak-EWMA policy (`super::super::lb::peak_ewma`):
//! peak-sensitive, decaying towards zero while the host gets no answers. The router feeds it;
//! the policy reads it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A host's response-time average, in nanoseconds, and when it was last updated (lock-free:
/// two concurrent updates may lose one, which only delays the estimate by a response).
#[derive(Debug, Default)]
pub struct Latency {
    /// `f64` nanoseconds as bits; 0 until the first response.
    nanos: AtomicU64,
    updated_micros: AtomicU64,
}

impl Latency {
    /// The average as of `now`: decayed towards zero since the last update; `None` before the
    /// first response.
    pub fn estimate(&self, now_micros: u64, decay: Duration) -> Option<f64> {
        let nanos = f64::from_bits(self.nanos.load(Ordering::Relaxed));
        if nanos == 0.0 {
            return None;
        }
        let since = now_micros.saturating_sub(self.updated_micros.load(Ordering::Relaxed));
        Some(nanos * decay_factor(since, decay))
    }

    /// Takes in one response time.
    pub fn observe(&self, rtt: Duration, now_micros: u64, decay: Duration) {
        let sample = (rtt.as_nanos() as f64).max(1.0);
        let stored = f64::from_bits(self.nanos.load(Ordering::Relaxed));
        let since = now_micros.saturating_sub(self.updated_micros.load(Ordering::Relaxed));
        let kept = decay_factor(since, decay);
        let next = if stored == 0.0 || sample > stored * kept {
            // A peak (or the first sample): take it whole.
            sample
        } else {
            // Weight the sample by how long it has been since the last one.
            stored * kept + sample * (1.0 - kept)
        };
        self.nanos.store(next.to_bits(), Ordering::Relaxed);
        self.updated_micros.store(now_micros, Ordering::Relaxed);
    }
}

/// The share of an average that remains after `micros` with time constant `decay`.
fn decay_factor(micros: u64, decay: Duration) -> f64 {
    (-(micros as f64) / decay.as_micros().max(1) as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);

    #[test]
    fn a_slow_response_is_taken_at_once_and_fast_ones_pull_down_gradually() {
        let latency = Latency::default();
        assert_eq!(latency.estimate(0, DECAY), None);
        latency.observe(Duration::from_millis(1), 0, DECAY);
        latency.observe(Duration::from_millis(20), 1_000, DECAY);
        let peak = latency.estimate(1_000, DECAY).unwrap();
        assert!((peak - 20e6).abs() < 1.0, "{peak}");
        // A second later a 1 ms response moves it by about a tenth of the way (1 s of 10 s).
        latency.observe(Duration::from_millis(1), 1_001_000, DECAY);
        let after = latency.estimate(1_001_000, DECAY).unwrap();
        assert!((17.0e6..19.0e6).contains(&after), "{after}");
        // Without answers it decays towards zero: after 30 s, about e^-3 of it.
        let idle = latency.estimate(31_001_000, DECAY).unwrap();
        assert!((after * 0.04..after * 0.06).contains(&idle), "{idle}");
    }
}
