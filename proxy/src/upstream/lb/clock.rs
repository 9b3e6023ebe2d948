//! The balancers' clock: monotonic microseconds since the process first asked, cheap to store
//! in an atomic (host states keep when they became usable; response-time estimates keep when
//! they were last updated).

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the clock's epoch.
pub fn now_micros() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}
