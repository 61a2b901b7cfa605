//! Metering at scale on the embedded store, over hours rather than one flush: `KEYS` keys
//! (default 100,000), every one used in every minute, flushed as the flusher sends them
//! (`FLUSHES` batches a minute, default 60: one a second), for `MINUTES` minutes (default 120).
//! The first hour is folds alone; in the second the first hour's rollup into hour and day buckets
//! runs beside them, which is the steady state of a gateway that runs for long.
//!
//! Reports per hour: the wall time and process CPU spent in the store's calls (redb works on the
//! blocking pool, counted with the process), the disk bytes written (`/proc/self/io`) per
//! key-minute, and the slowest flush; at the end the database file's size. The minutes are a day
//! ahead of the wall clock, so that only the minutes counted end an hour, as in a live gateway.
//!
//! `cargo bench --bench usage_hour` (knobs: `KEYS`, `MINUTES`, `FLUSHES`)

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{BatchId, Usage, UsageCounts, UsageDelta};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's CPU time (user + system) and the bytes it has had written to disk.
fn process() -> (Duration, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name, which ends with the last ')': utime and stime are the
    // 12th and 13th of them, in clock ticks (100 a second on Linux).
    let after = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    let written = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes");
    (Duration::from_millis(ticks * 10), written)
}

fn main() {
    let keys = knob("KEYS", 100_000);
    let minutes = knob("MINUTES", 120);
    let flushes = knob("FLUSHES", 60).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hour.redb");
    let store = EmbeddedStore::open(&path).expect("store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ids: Vec<Arc<str>> = (0..keys).map(|i| format!("key_{i:08x}").into()).collect();
    let account: Arc<str> = "acc_hour".into();
    let one = UsageCounts {
        requests: 1,
        success: 1,
        ..UsageCounts::default()
    };
    let now_minute = chrono::Utc::now().timestamp() / 60;
    let first = (now_minute / 60 + 24) * 60;
    // Keys in a scattered order, as rotation hits them.
    let order: Vec<usize> = (0..keys).map(|i| (i * 7_919) % keys).collect();
    let per_flush = keys.div_ceil(flushes);
    println!(
        "{keys} keys, each used every minute; {flushes} flushes a minute of {per_flush} keys; {minutes} minutes"
    );
    println!("| minutes | wall s | CPU s | CPU ms per minute | disk bytes per key-minute | slowest flush ms |");
    println!("|---|---|---|---|---|---|");
    let mut id = BatchId::first();
    let mut hour_start = (Instant::now(), process());
    let mut slowest = Duration::ZERO;
    for minute in 0..minutes {
        for chunk in order.chunks(per_flush) {
            let batch: Vec<UsageDelta> = chunk
                .iter()
                .map(|&i| UsageDelta {
                    key_id: Arc::clone(&ids[i]),
                    account_id: Arc::clone(&account),
                    minute: first + minute as i64,
                    counts: one,
                    last_used_ms: (first + minute as i64) * 60_000,
                })
                .collect();
            let t = Instant::now();
            rt.block_on(store.add_usage(id, &batch)).expect("flush");
            slowest = slowest.max(t.elapsed());
            id = id.next();
        }
        let done = minute + 1;
        if done % 60 == 0 || done == minutes {
            let (t0, (cpu0, written0)) = hour_start;
            let (cpu, written) = process();
            let span = done - (done - 1) / 60 * 60;
            let cpu = cpu.saturating_sub(cpu0);
            println!(
                "| {}–{} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
                (done - 1) / 60 * 60,
                done,
                t0.elapsed().as_secs_f64(),
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1_000.0 / span as f64,
                written.saturating_sub(written0) as f64 / (span * keys) as f64,
                slowest.as_secs_f64() * 1_000.0,
            );
            hour_start = (Instant::now(), process());
            slowest = Duration::ZERO;
        }
    }
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!("database file: {:.1} MB", size as f64 / 1e6);
}
