//! `remoractl`: command-line client of the remora-cp config API.

fn main() {}
