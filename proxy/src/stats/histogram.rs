//! Histograms under Envoy's names and bucket bounds (`upstream_rq_time`, `downstream_rq_time`,
//! `upstream_cx_connect_ms`, `upstream_cx_length_ms`, `downstream_cx_length_ms`, in
//! milliseconds). Recording is lock-free: each thread counts into a shard of its own (made on
//! its first value), and a read merges the shards. The admin endpoint shows them as Envoy does:
//! a `P0(..) .. P100(..)` line in `/stats`, `computed_quantiles` in JSON, and `_bucket`, `_sum`
//! and `_count` in Prometheus.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Envoy's default bucket bounds (`supported_buckets`).
pub const BOUNDS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The quantiles `/stats` shows, in percent.
pub const QUANTILES: [f64; 10] = [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

/// Shards per histogram: threads beyond this share (still lock-free, just contended).
const SHARDS: usize = 16;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SHARD.with(|shard| {
        let mut index = shard.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            shard.set(index);
        }
        index
    })
}

#[derive(Debug)]
struct Shard {
    /// One count per bound, then the overflow bucket.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    /// The smallest and largest values seen (quantiles 0 and 100 are exact).
    min: AtomicU64,
    max: AtomicU64,
}

impl Shard {
    fn new(bounds: &[f64]) -> Self {
        Shard {
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

/// Where a histogram's values also go as they are recorded (a stats sink's timer lines).
pub type Tap = Box<dyn Fn(u64) + Send + Sync>;

/// One histogram of millisecond values. The shard table is made on the first value: most of a
/// large config's clusters never record one, and an empty table is 256 bytes each.
#[derive(Default)]
pub struct Histogram {
    shards: OnceLock<Box<[OnceLock<Box<Shard>>; SHARDS]>>,
    /// Set once, when a stats sink wants every value.
    tap: OnceLock<Tap>,
    /// `histogram_bucket_settings`' bounds for this histogram, set before its first value;
    /// unset: Envoy's default [`BOUNDS`].
    bounds: OnceLock<&'static [f64]>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("snapshot", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl Histogram {
    /// Counts into buckets with these upper bounds (sorted), not the default ones; only before
    /// the first value, and once.
    pub fn set_bounds(&self, bounds: &'static [f64]) {
        let _ = self.bounds.set(bounds);
    }

    fn bounds(&self) -> &'static [f64] {
        self.bounds.get().copied().unwrap_or(&BOUNDS)
    }

    /// Hands every value recorded from now on to `tap` too; a histogram takes one tap.
    pub fn set_tap(&self, tap: Tap) {
        let _ = self.tap.set(tap);
    }

    /// Records one value (milliseconds).
    pub fn record(&self, value: u64) {
        if let Some(tap) = self.tap.get() {
            tap(value);
        }
        let shards = self
            .shards
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let bounds = self.bounds();
        let shard = shards[shard_index()].get_or_init(|| Box::new(Shard::new(bounds)));
        // Most requests take under a millisecond: bucket 0, nothing to add to the sum.
        let bucket = match value {
            0 => 0,
            _ => bounds.partition_point(|bound| (value as f64) > *bound),
        };
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        if value != 0 {
            shard.sum.fetch_add(value, Ordering::Relaxed);
        }
        // A plain load first: a value that is no new extreme (the common case) then costs no
        // locked read-modify-write.
        if value < shard.min.load(Ordering::Relaxed) {
            shard.min.fetch_min(value, Ordering::Relaxed);
        }
        if value > shard.max.load(Ordering::Relaxed) {
            shard.max.fetch_max(value, Ordering::Relaxed);
        }
    }

    /// Records a duration in milliseconds.
    pub fn record_duration(&self, elapsed: std::time::Duration) {
        self.record(elapsed.as_millis() as u64);
    }

    /// The shards merged.
    pub fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::empty(self.bounds());
        let shards = self.shards.get().map_or(&[][..], |shards| &shards[..]);
        for shard in shards.iter().filter_map(OnceLock::get) {
            for (total, count) in out.counts.iter_mut().zip(&shard.counts) {
                *total += count.load(Ordering::Relaxed);
            }
            out.sum += shard.sum.load(Ordering::Relaxed);
            out.min = out.min.min(shard.min.load(Ordering::Relaxed));
            out.max = out.max.max(shard.max.load(Ordering::Relaxed));
        }
        out
    }
}

/// A histogram's merged counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// One count per bound, then the overflow bucket.
    pub counts: Vec<u64>,
    /// The buckets' upper bounds.
    pub bounds: &'static [f64],
    pub sum: u64,
    pub min: u64,
    pub max: u64,
}

impl Snapshot {
    /// No values, in buckets with these bounds.
    pub fn empty(bounds: &'static [f64]) -> Snapshot {
        Snapshot {
            counts: vec![0; bounds.len() + 1],
            bounds,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Cumulative counts per bound (Prometheus `_bucket`), the last for `+Inf`.
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0, |total, count| {
                *total += count;
                Some(*total)
            })
            .collect()
    }

    /// The value at `percent`: exact at 0 and 100, else interpolated within its bucket
    /// (clamped to the values seen).
    pub fn quantile(&self, percent: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let (min, max) = (self.min as f64, self.max as f64);
        if percent <= 0.0 {
            return Some(min);
        }
        if percent >= 100.0 {
            return Some(max);
        }
        let rank = percent / 100.0 * count as f64;
        let mut below = 0u64;
        for (index, bucket) in self.counts.iter().enumerate() {
            if *bucket == 0 {
                continue;
            }
            if (below + bucket) as f64 >= rank {
                let low = if index == 0 {
                    0.0
                } else {
                    self.bounds[index - 1]
                };
                let high = self.bounds.get(index).copied().unwrap_or(max);
                let low = low.max(min);
                let high = high.min(max).max(low);
                let within = (rank - below as f64) / *bucket as f64;
                return Some(low + (high - low) * within);
            }
            below += bucket;
        }
        Some(max)
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram): Envoy's interval
    /// statistics. The interval's extremes are not kept: its first and last buckets' bounds
    /// stand in for them (within the values ever seen).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
            .map(|(now, before)| now.saturating_sub(*before))
            .collect();
        let first = counts.iter().position(|c| *c > 0);
        let last = counts.iter().rposition(|c| *c > 0);
        let bounds = self.bounds;
        let low = first.map_or(0.0, |i| if i == 0 { 0.0 } else { bounds[i - 1] });
        let high = last.and_then(|i| bounds.get(i).copied());
        Snapshot {
            counts,
            bounds,
            sum: self.sum.saturating_sub(earlier.sum),
            min: (low as u64).max(self.min.min(self.max)),
            max: high.map_or(self.max, |high| (high as u64).min(self.max)),
        }
    }

    /// Envoy's `/stats` line: `P0(interval,cumulative) .. P100(..)`, or `No recorded values`.
    /// Remora keeps no flush intervals: the interval value is the cumulative one.
    pub fn summary(&self) -> String {
        if self.count() == 0 {
            return "No recorded values".into();
        }
        QUANTILES
            .iter()
            .map(|q| {
                let value = format_value(self.quantile(*q).unwrap_or(0.0));
                format!("P{}({value},{value})", format_value(*q))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A number as Envoy prints it: no trailing `.0`, at most a few decimals.
pub fn format_value(value: f64) -> String {
    let rounded = (value * 1000.0).round() / 1000.0;
    if rounded.fract() == 0.0 {
        format!("{}", rounded as i64)
    } else {
        format!("{rounded}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_envoys_buckets_and_merge_across_threads() {
        let histogram = std::sync::Arc::new(Histogram::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let histogram = histogram.clone();
                std::thread::spawn(move || {
                    for value in [0, 1, 7, 25, 26, 4_000_000] {
                        histogram.record(value);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 24);
        // 0 → ≤0.5; 1 → ≤1; 7 → ≤10; 25 → ≤25; 26 → ≤50; 4e6 → +Inf.
        assert_eq!(snapshot.counts[0], 4);
        assert_eq!(snapshot.counts[1], 4);
        assert_eq!(snapshot.counts[3], 4);
        assert_eq!(snapshot.counts[4], 4);
        assert_eq!(snapshot.counts[5], 4);
        assert_eq!(snapshot.counts[19], 4);
        assert_eq!(*snapshot.cumulative().last().unwrap(), 24);
        assert_eq!(snapshot.sum, 4 * (1 + 7 + 25 + 26 + 4_000_000));
        assert_eq!(snapshot.quantile(0.0), Some(0.0));
        assert_eq!(snapshot.quantile(100.0), Some(4_000_000.0));
    }

    #[test]
    fn the_summary_line_is_envoys() {
        let histogram = Histogram::default();
        assert_eq!(histogram.snapshot().summary(), "No recorded values");
        for value in [10, 20] {
            histogram.record(value);
        }
        let summary = histogram.snapshot().summary();
        assert!(summary.starts_with("P0(10,10) P25("), "{summary}");
        assert!(
            summary.ends_with("P99.9(20,20) P100(20,20)") || summary.contains("P100(20,20)"),
            "{summary}"
        );
        assert_eq!(summary.split(' ').count(), 10);
    }
}
