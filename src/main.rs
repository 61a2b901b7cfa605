//! The `tollgate` binary (CLI to come).
fn main() {}
