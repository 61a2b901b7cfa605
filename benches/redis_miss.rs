//! Latency of a key-cache miss served from Redis: `KeyCache::get` for keys not yet cached, each
//! one store read (`lookup_key`: the hash index, then key, account and sites in one MULTI).
//! Starts its own `redis-server` on a free port; prints p50, p90, p99 and max.
//!
//! `cargo bench --bench redis_miss`

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/records.rs"]
mod records;

use tollgate::auth::cache::Lookup;
use tollgate::credential::{self, Kind};
use tollgate::metering::{Meter, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::redis::RedisStore;
use tollgate::store::SharedStore;

const KEYS: usize = 5_000;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let _server = Server(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let url = format!("redis://127.0.0.1:{port}");
        let mut store = None;
        for _ in 0..100 {
            if let Ok(s) = RedisStore::connect(&url).await {
                store = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let store: SharedStore = Arc::new(store.expect("redis up"));
        let account = records::account("acc_bench");
        store.create_account(&account).await.expect("account");
        let mut hashes = Vec::with_capacity(KEYS);
        for i in 0..KEYS {
            let raw = credential::generate(Kind::Secret);
            let key = records::secret_key(i, &account.id, &raw);
            store.create_key(&key).await.expect("key");
            hashes.push(key.hash);
        }
        let meter = Arc::new(Meter::new(WallClock::System));
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let cache = records::cache(&store, &meter, &metrics, KEYS);
        let mut times = Vec::with_capacity(KEYS);
        for hash in &hashes {
            let started = Instant::now();
            assert!(matches!(cache.get(hash).await, Lookup::Found(_)));
            times.push(started.elapsed());
        }
        times.sort_unstable();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        println!(
            "key-cache miss from Redis, {KEYS} keys: p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            at(0.50),
            at(0.90),
            at(0.99),
            times[times.len() - 1]
        );
    });
}
