//! Load benchmark and criterion benches (to come).
fn main() {}
