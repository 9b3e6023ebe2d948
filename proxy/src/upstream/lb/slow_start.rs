//! Slow start, as Envoy ramps a new host up: during `window` after it became usable, a host's
//! weight is scaled by `max(min_weight, (time in window / window)^(1 / aggression))`.

use crate::config::SlowStart;
use crate::upstream::host::{Health, Host};

/// The share of its weight `host` gets now (1 outside its window, or when it is not healthy,
/// as in Envoy).
pub fn factor(config: &SlowStart, host: &Host, now_micros: u64) -> f64 {
    if host.health() != Health::Healthy {
        return 1.0;
    }
    ramp(config, now_micros.saturating_sub(host.state.usable_since()))
}

/// The factor `elapsed_micros` into the window (in whole milliseconds, as Envoy counts).
pub fn ramp(config: &SlowStart, elapsed_micros: u64) -> f64 {
    let window = config.window.as_millis() as u64;
    let elapsed = elapsed_micros / 1000;
    if elapsed >= window {
        return 1.0;
    }
    // At least a millisecond.
    let time = elapsed.max(1) as f64 / window as f64;
    let shaped = if config.aggression == 1.0 {
        time
    } else {
        time.powf(1.0 / config.aggression)
    };
    shaped.max(config.min_weight)
}

/// Whether any of `hosts` is still in its window.
pub fn any_in_window(config: &SlowStart, hosts: &[std::sync::Arc<Host>], now_micros: u64) -> bool {
    hosts
        .iter()
        .any(|host| factor(config, host, now_micros) < 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_ramp_follows_envoys_formula() {
        let linear = SlowStart {
            window: Duration::from_secs(10),
            aggression: 1.0,
            min_weight: 0.1,
        };
        assert_eq!(ramp(&linear, 0), 0.1, "the minimum weight first");
        assert!((ramp(&linear, 5_000_000) - 0.5).abs() < 1e-9);
        assert_eq!(ramp(&linear, 10_000_000), 1.0);
        let steep = SlowStart {
            aggression: 2.0,
            min_weight: 0.0,
            ..linear
        };
        assert!((ramp(&steep, 2_500_000) - 0.5).abs() < 1e-9, "(1/4)^(1/2)");
        assert!(
            (ramp(&steep, 0) - (0.0001f64).sqrt()).abs() < 1e-9,
            "at least 1 ms"
        );
        let tiny = SlowStart {
            window: Duration::from_micros(900),
            ..linear
        };
        assert_eq!(ramp(&tiny, 0), 1.0, "a window under a millisecond is none");
    }
}
