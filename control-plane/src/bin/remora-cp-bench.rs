//! `remora-cp-bench`: load tool opening many simulated ADS clients against remora-cp.

fn main() {}
