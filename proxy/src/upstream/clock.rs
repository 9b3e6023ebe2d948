//! The balancers' clock: monotonic microseconds, cheap to store in an atomic (host states keep
//! when they became usable; response-time estimates keep when they were last updated). It
//! starts at one day rather than at 0, so that a time of 0 is long ago.

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Where the clock starts: one day, in microseconds.
pub const START: u64 = 86_400_000_000;

/// Microseconds on the balancers' clock.
pub fn now_micros() -> u64 {
    START + EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}
