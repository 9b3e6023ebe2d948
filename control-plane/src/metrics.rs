//! Control-plane metrics in Prometheus text format: connected proxies, pushes, ACKs, NACKs and a
//! histogram of push latency (config commit → proxy ACK).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the push-latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Metrics {
    pub pushes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub writes: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Records one ACK of a push whose config was committed `latency` ago.
    pub fn observe_ack(&self, latency: Duration) {
        self.acks.fetch_add(1, Ordering::Relaxed);
        let seconds = latency.as_secs_f64();
        if let Some(index) = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.latency_buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// The exposition text; `connected` is the number of open xDS streams.
    pub fn render(&self, connected: usize, config_version: u64) -> String {
        let mut text = String::new();
        let counter = |text: &mut String, name: &str, help: &str, value: u64, kind: &str| {
            let _ = writeln!(
                text,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        counter(
            &mut text,
            "remora_cp_connected_proxies",
            "Open xDS streams.",
            connected as u64,
            "gauge",
        );
        counter(
            &mut text,
            "remora_cp_config_version",
            "Current global config version.",
            config_version,
            "gauge",
        );
        counter(
            &mut text,
            "remora_cp_config_writes_total",
            "Config writes committed through this replica.",
            self.writes.load(Ordering::Relaxed),
            "counter",
        );
        counter(
            &mut text,
            "remora_cp_pushes_total",
            "xDS responses sent.",
            self.pushes.load(Ordering::Relaxed),
            "counter",
        );
        counter(
            &mut text,
            "remora_cp_acks_total",
            "xDS responses ACKed.",
            self.acks.load(Ordering::Relaxed),
            "counter",
        );
        counter(
            &mut text,
            "remora_cp_nacks_total",
            "xDS responses NACKed.",
            self.nacks.load(Ordering::Relaxed),
            "counter",
        );
        let name = "remora_cp_push_latency_seconds";
        let _ = writeln!(
            text,
            "# HELP {name} Time from a config commit to a proxy's ACK of it.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(text, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(text, "{name}_sum {sum}\n{name}_count {count}");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_ack(Duration::from_millis(3));
        metrics.observe_ack(Duration::from_millis(300));
        let text = metrics.render(2, 7);
        assert!(text.contains("remora_cp_connected_proxies 2"));
        assert!(text.contains("remora_cp_push_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("remora_cp_push_latency_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("remora_cp_push_latency_seconds_count 2"));
        assert!(text.contains("remora_cp_acks_total 2"));
    }
}
