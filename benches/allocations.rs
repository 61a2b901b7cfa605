//! Heap allocations per request on the gateway's thread (issue 27: "heap allocations per keyed
//! request for a cached key: ≤ 2, and 0 of them in tollgate's own code").
//!
//! A whole gateway (`app::start`, embedded store in a temp dir, proxy and admin on port 0) runs on
//! a thread of its own with a current-thread tokio runtime, so that everything the proxy does for
//! a request (hyper's connection, the handler, the upstream client's connection task) happens on
//! that one thread. An upstream (hyper, HTTP/1.1 keep-alive, `200 ok\n`) runs on a second thread
//! and runtime. The bench's main thread creates an account and a key through the admin API, then
//! sends requests over one kept-alive HTTP/1.1 connection from a plain `TcpStream` (a fixed
//! request, one response read by its `Content-Length`) and counts what the gateway's thread
//! allocated meanwhile. The runtime's blocking pool (redb's writes) and the bench's own threads
//! are not counted.
//!
//! The binary uses mimalloc; this bench has its own global allocator, [`Counting`], which wraps
//! `std::alloc::System` and counts allocations, reallocations and the bytes they ask for (an
//! allocation's size, a reallocation's new size) on threads that set [`COUNTED`]. Counts are
//! what tollgate asks of any allocator, not what mimalloc makes of them.
//!
//! Scenarios, each on a fresh gateway: the keyed route with the default `limits.headers` (all
//! three styles), the keyed route with `limits.headers = []`, a public route, each with
//! `metering.flush_interval = "1h"` (no flush during the run; the once-a-second credits task and
//! the sweep still run), then the keyed route as shipped (`flush_interval = "1s"`), whose
//! flushes (the flusher's part on this thread; redb's write is on the blocking pool) are spread
//! over the requests. A row "idle" counts 1.1 s of a gateway with nothing to serve.
//!
//! `cargo bench --bench allocations` (`REQUESTS=10000 WARMUP=1000 KEYED_PATH=/bench`).
//! `ALLOC_TRACE=1` also captures a backtrace for every allocation on the gateway's thread over
//! `TRACE_REQUESTS` (50) requests per scenario and prints the sites, per request: by the
//! innermost frame outside the standard library, by whose code asked (the innermost tollgate,
//! hyper, h2, axum, … frame: `http`, `bytes`, `tokio` and other libraries count for their
//! caller), and by five frames.

// A counting allocator has to implement `GlobalAlloc`, an unsafe trait; it only forwards to
// `System`. The gateway itself has no `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tollgate::app::{self, StartOptions};
use tollgate::config::{self, LimitHeaders};
use tollgate::credential::{self, Kind};
use tollgate::metering::WallClock;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Capture a backtrace for every counted allocation (`ALLOC_TRACE=1`, during the traced run).
static TRACING: AtomicBool = AtomicBool::new(false);
/// The backtraces captured, resolved only once the run is over.
static TRACES: Mutex<Vec<Traced>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on the gateway's thread alone. `const` and without a destructor: reading it neither
    /// allocates nor registers anything, so the allocator may.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
    /// Set while a backtrace is captured (which allocates): those allocations are not counted.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// One traced allocation: what, how many bytes, where.
type Traced = (Op, usize, Backtrace);

/// A `System` allocator that counts what the gateway's thread asks of it.
struct Counting;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Alloc,
    Realloc,
}

/// The counters at one moment; their difference is a run's.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    allocs: u64,
    reallocs: u64,
    bytes: u64,
}

/// What one gateway is started with.
struct Scenario {
    name: &'static str,
    path: &'static str,
    keyed: bool,
    headers: LimitHeaders,
    flush_interval: Duration,
}

/// A gateway on its own thread and runtime, with its account's key.
struct Gateway {
    proxy: SocketAddr,
    key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// One kept-alive HTTP/1.1 connection sending the same request again and again.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

/// One frame of a resolved backtrace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Frame {
    symbol: String,
    location: String,
}

/// Crates whose code decides to allocate; the others (`http`, `bytes`, `tokio`, collections…)
/// allocate for their caller.
const OWNERS: &[&str] = &[
    "tollgate",
    "hyper",
    "hyper_util",
    "h2",
    "axum",
    "tower",
    "rustls",
    "tokio_rustls",
    "redb",
];
/// The standard library and this bench: never a site.
const PLUMBING: &[&str] = &["std", "core", "alloc", "allocations", "backtrace"];

// === impl Counting ===

// SAFETY: every call is passed to `System` unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(Op::Alloc, layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(Op::Alloc, layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted(Op::Realloc, new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Counts an allocation made on a counted thread and, while tracing, captures where it was
/// made. The capture's own allocations pass uncounted.
fn counted(op: Op, size: usize) {
    if !COUNTED.try_with(Cell::get).unwrap_or(false)
        || CAPTURING.try_with(Cell::get).unwrap_or(true)
    {
        return;
    }
    match op {
        Op::Alloc => ALLOCS.fetch_add(1, Ordering::Relaxed),
        Op::Realloc => REALLOCS.fetch_add(1, Ordering::Relaxed),
    };
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
    if TRACING.load(Ordering::Relaxed) {
        CAPTURING.with(|c| c.set(true));
        let trace = Backtrace::force_capture();
        TRACES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((op, size, trace));
        CAPTURING.with(|c| c.set(false));
    }
}

// === impl Counts ===

impl Counts {
    fn now() -> Counts {
        Counts {
            allocs: ALLOCS.load(Ordering::Relaxed),
            reallocs: REALLOCS.load(Ordering::Relaxed),
            bytes: BYTES.load(Ordering::Relaxed),
        }
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            allocs: self.allocs - before.allocs,
            reallocs: self.reallocs - before.reallocs,
            bytes: self.bytes - before.bytes,
        }
    }

    fn row(&self, name: &str, requests: usize) {
        let per = |n: u64| n as f64 / requests as f64;
        println!(
            "| {name} | {requests} | {:.2} | {:.2} | {:.0} | {} / {} / {} |",
            per(self.allocs),
            per(self.reallocs),
            per(self.bytes),
            self.allocs,
            self.reallocs,
            self.bytes,
        );
    }
}

// === impl Gateway ===

impl Gateway {
    /// Starts a gateway for `scenario` in front of `upstream`, with an account whose limits are
    /// never reached and one secret key in it.
    fn start(scenario: &Scenario, upstream: SocketAddr) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let toml = format!(
            r#"[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[store]
backend = "embedded"
path = '{store}'

[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["http://{upstream}"]

[[routes]]
name = "public"
path_prefix = "/public"
upstreams = ["http://{upstream}"]
auth = "public"
"#,
            store = dir.path().join("tollgate.db").display(),
        );
        let mut settings = config::load_from_str(&toml, Path::new("allocations.toml"), Vec::new())
            .expect("the bench config loads");
        settings.limits.headers = scenario.headers;
        settings.metering.flush_interval = scenario.flush_interval;
        // No refresh of the cached key during a run, whatever the store's revision does.
        settings.cache.ttl = Duration::from_secs(3600);
        let master = credential::generate(Kind::Master);
        let options = StartOptions {
            master_key: Some(master.clone()),
            clock: WallClock::System,
        };
        let (ready, addrs) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gateway".into())
            .spawn(move || {
                COUNTED.with(|c| c.set(true));
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(async move {
                    let running = app::start(settings, options)
                        .await
                        .expect("the gateway starts");
                    let _ = ready.send((running.proxy_addr, running.admin_addr));
                    let _ = stopped.await;
                    running.shutdown().await;
                });
            })
            .expect("gateway thread");
        let (proxy, admin) = addrs.recv().expect("the gateway started");
        let key = create_key(admin, &master);
        Gateway {
            proxy,
            key,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// === impl Client ===

impl Client {
    fn connect(proxy: SocketAddr, path: &str, key: Option<&str>) -> Client {
        let stream = TcpStream::connect(proxy).expect("connect to the proxy");
        stream.set_nodelay(true).expect("nodelay");
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let request = format!("GET {path} HTTP/1.1\r\nHost: {proxy}\r\n{auth}\r\n").into_bytes();
        Client {
            stream,
            request,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Sends the request and reads its whole response, which must be a 200 with a
    /// `Content-Length`.
    fn exchange(&mut self) {
        self.stream.write_all(&self.request).expect("send");
        let mut filled = 0;
        let mut total = None;
        loop {
            let n = self.stream.read(&mut self.buf[filled..]).expect("read");
            assert!(n > 0, "the proxy closed the connection");
            filled += n;
            if total.is_none() {
                total = head_and_body_len(&self.buf[..filled]);
            }
            match total {
                Some(t) if filled >= t => {
                    assert_eq!(filled, t, "more than one response");
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Once the head is in: the response's length (head + `Content-Length`).
fn head_and_body_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).expect("a text head");
    assert!(head.starts_with("HTTP/1.1 200 "), "not a 200: {head}");
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().expect("a length"))
        })
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    Some(end + length)
}

// === functions ===

/// `POST /v1/accounts` (limits never reached), then `POST /v1/accounts/{id}/keys`: the raw key.
fn create_key(admin: SocketAddr, master: &str) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let post = |path: String, body: Value| {
            let request = client
                .post(format!("http://{admin}{path}"))
                .bearer_auth(master)
                .json(&body);
            async move {
                let response = request.send().await.expect("admin request");
                assert!(
                    response.status().is_success(),
                    "{path}: {}",
                    response.status()
                );
                response.json::<Value>().await.expect("admin JSON")
            }
        };
        let huge = 4_000_000_000u64;
        let limits = json!({ "per_minute": huge, "per_hour": huge, "per_day": huge });
        let account = post(
            "/v1/accounts".into(),
            json!({ "name": "bench", "rate_limit": limits }),
        )
        .await;
        let id = account["id"].as_str().expect("account id");
        let key = post(
            format!("/v1/accounts/{id}/keys"),
            json!({ "name": "main", "type": "secret" }),
        )
        .await;
        key["key"].as_str().expect("raw key").to_owned()
    })
}

/// An upstream on a thread and runtime of its own: `200 ok\n` to everything, kept alive.
fn start_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let ok = service_fn(|_| async {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"ok\n",
                            ))))
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), ok)
                            .await;
                    });
                }
            });
        })
        .expect("upstream thread");
    addr
}

/// What the gateway's thread allocates over `n` exchanges. The pauses before and after let the
/// previous request's tail (the response body's drop, the connection's return) land before the
/// first reading and this run's last one before the second.
fn measure(client: &mut Client, n: usize) -> Counts {
    settle();
    let before = Counts::now();
    for _ in 0..n {
        client.exchange();
    }
    settle();
    Counts::now().since(before)
}

fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The frames of a backtrace, from its `Display` (symbol lines, each followed by an `at` line).
fn frames(trace: &Backtrace) -> Vec<Frame> {
    let text = trace.to_string();
    let mut frames: Vec<Frame> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(at) = line.strip_prefix("at ") {
            if let Some(last) = frames.last_mut() {
                last.location = short_location(at);
            }
        } else if let Some((index, symbol)) = line.split_once(": ") {
            if index.chars().all(|c| c.is_ascii_digit()) {
                frames.push(Frame {
                    symbol: short_symbol(symbol),
                    location: String::new(),
                });
            }
        }
    }
    frames
}

/// The crate a (demangled) symbol belongs to: `<hyper::…::Conn<…> as …>::poll` is hyper's.
fn crate_of(symbol: &str) -> &str {
    let s = symbol.trim_start_matches(['<', '&', '*']);
    let s = s.strip_prefix("mut ").unwrap_or(s);
    let s = s.strip_prefix("dyn ").unwrap_or(s);
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    let name = &s[..end];
    if name.starts_with("__") || name.is_empty() || name == "unknown" {
        "std"
    } else {
        name
    }
}

/// The symbol without generic arguments (`Conn<I, B, T>` → `Conn`).
fn short_symbol(symbol: &str) -> String {
    let mut out = String::with_capacity(symbol.len());
    let mut depth = 0usize;
    let mut prev = ' ';
    for c in symbol.chars() {
        if depth > 0 {
            match c {
                '<' => depth += 1,
                '>' => depth -= 1,
                _ => {}
            }
        } else if c == '<' && (prev.is_alphanumeric() || prev == '_') {
            depth = 1;
        } else {
            out.push(c);
            prev = c;
        }
    }
    out
}

/// `…/registry/src/index…/hyper-1.12.0/src/x.rs:12:5` → `hyper-1.12.0/src/x.rs:12`.
fn short_location(at: &str) -> String {
    let path = match at.rsplit_once(':') {
        Some((p, col)) if col.chars().all(|c| c.is_ascii_digit()) => p,
        _ => at,
    };
    if let Some(i) = path.find("/registry/src/") {
        let rest = &path[i + "/registry/src/".len()..];
        return rest.split_once('/').map_or(rest, |(_, r)| r).to_owned();
    }
    if let Some(i) = path.find("/library/") {
        return path[i + 1..].to_owned();
    }
    path.trim_start_matches("./").to_owned()
}

fn describe(frame: &Frame) -> String {
    format!("`{}` ({})", frame.symbol, frame.location)
}

/// Prints where the traced allocations were made, per request.
fn report_traces(traces: Vec<Traced>, requests: usize) {
    let per = |n: usize| n as f64 / requests as f64;
    let mut by_owner: HashMap<String, usize> = HashMap::new();
    let mut by_site: HashMap<(String, String, String, String), (usize, usize)> = HashMap::new();
    let mut by_stack: HashMap<Vec<Frame>, usize> = HashMap::new();
    let total = traces.len();
    for (op, size, trace) in traces {
        let frames = frames(&trace);
        let Some(site) = frames
            .iter()
            .position(|f| !PLUMBING.contains(&crate_of(&f.symbol)))
        else {
            continue;
        };
        let owner = frames[site..]
            .iter()
            .find(|f| OWNERS.contains(&crate_of(&f.symbol)))
            .unwrap_or(&frames[site]);
        let owner_crate = crate_of(&owner.symbol).to_owned();
        let nearest_tollgate = frames[site..]
            .iter()
            .find(|f| crate_of(&f.symbol) == "tollgate")
            .map_or("-".to_owned(), describe);
        let kind = if op == Op::Realloc {
            "realloc"
        } else {
            "alloc"
        };
        *by_owner.entry(owner_crate.clone()).or_default() += 1;
        let site_counts = by_site
            .entry((
                owner_crate,
                describe(&frames[site]),
                if owner == &frames[site] {
                    String::from("(same)")
                } else {
                    describe(owner)
                },
                format!("{kind}; nearest tollgate frame: {nearest_tollgate}"),
            ))
            .or_default();
        site_counts.0 += 1;
        site_counts.1 += size;
        let stack: Vec<Frame> = frames[site..]
            .iter()
            .filter(|f| !PLUMBING.contains(&crate_of(&f.symbol)))
            .take(5)
            .cloned()
            .collect();
        *by_stack.entry(stack).or_default() += 1;
    }
    println!(
        "\n{total} allocations traced over {requests} requests ({:.2} per request)",
        per(total)
    );
    println!("\nBy owner (innermost frame of tollgate, hyper, hyper_util, h2, axum, …):");
    let mut owners: Vec<_> = by_owner.into_iter().collect();
    owners.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (owner, n) in owners {
        println!("  {owner}: {:.2} per request", per(n));
    }
    println!("\nBy site (innermost frame outside std) and owner frame:");
    let mut sites: Vec<_> = by_site.into_iter().collect();
    sites.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for ((owner, site, owner_frame, note), (n, bytes)) in sites.iter().take(40) {
        println!(
            "  {:.2}/req, {:.0} B/req [{owner}] {site}",
            per(*n),
            per(*bytes)
        );
        println!("           owner frame: {owner_frame}; {note}");
    }
    println!("\nBy the five innermost frames outside std:");
    let mut stacks: Vec<_> = by_stack.into_iter().collect();
    stacks.sort_by_key(|s| std::cmp::Reverse(s.1));
    for (stack, n) in stacks.iter().take(25) {
        println!("  {:.2}/req", per(*n));
        for frame in stack {
            println!("      {}", describe(frame));
        }
    }
}

/// Starts a gateway for `scenario`, warms it up, measures it, and traces it when asked.
fn run(scenario: &Scenario, upstream: SocketAddr, warmup: usize, requests: usize) -> Counts {
    let gateway = Gateway::start(scenario, upstream);
    let key = scenario.keyed.then_some(gateway.key.as_str());
    // `KEYED_PATH`: another request target for the keyed scenarios (e.g. `/a//b`, which the
    // gateway normalises, so its upstream URI is a copy rather than a slice of the request).
    let keyed_path = std::env::var("KEYED_PATH").unwrap_or_else(|_| scenario.path.to_owned());
    let path = if scenario.keyed {
        keyed_path.as_str()
    } else {
        scenario.path
    };
    let mut client = Client::connect(gateway.proxy, path, key);
    for _ in 0..warmup {
        client.exchange();
    }
    let started = Instant::now();
    let counts = measure(&mut client, requests);
    eprintln!(
        "{}: {requests} requests in {:.2?}",
        scenario.name,
        started.elapsed()
    );
    let traced = env_usize("TRACE_REQUESTS", 50);
    if std::env::var("ALLOC_TRACE").is_ok_and(|v| v == "1") {
        TRACES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        TRACING.store(true, Ordering::SeqCst);
        measure(&mut client, traced);
        TRACING.store(false, Ordering::SeqCst);
        let traces = std::mem::take(&mut *TRACES.lock().unwrap_or_else(PoisonError::into_inner));
        println!("\n### Trace: {}", scenario.name);
        report_traces(traces, traced);
    }
    drop(client);
    drop(gateway);
    counts
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let warmup = env_usize("WARMUP", 1_000);
    let requests = env_usize("REQUESTS", 10_000);
    let upstream = start_upstream();
    let hour = Duration::from_secs(3600);
    let scenarios = [
        Scenario {
            name: "keyed, limits.headers all three (default), flush 1h",
            path: "/bench",
            keyed: true,
            headers: LimitHeaders::ALL,
            flush_interval: hour,
        },
        Scenario {
            name: "keyed, limits.headers = [], flush 1h",
            path: "/bench",
            keyed: true,
            headers: LimitHeaders::NONE,
            flush_interval: hour,
        },
        Scenario {
            name: "public route, flush 1h",
            path: "/public/bench",
            keyed: false,
            headers: LimitHeaders::ALL,
            flush_interval: hour,
        },
        Scenario {
            name: "keyed, limits.headers all three, flush 1s (as shipped)",
            path: "/bench",
            keyed: true,
            headers: LimitHeaders::ALL,
            flush_interval: Duration::from_secs(1),
        },
    ];
    let mut rows = Vec::new();
    for scenario in &scenarios {
        rows.push((scenario.name, run(scenario, upstream, warmup, requests)));
    }
    let idle = {
        let gateway = Gateway::start(&scenarios[0], upstream);
        let mut client = Client::connect(gateway.proxy, scenarios[0].path, Some(&gateway.key));
        for _ in 0..warmup {
            client.exchange();
        }
        settle();
        let before = Counts::now();
        std::thread::sleep(Duration::from_millis(1100));
        Counts::now().since(before)
    };
    println!("\n## Allocations on the gateway's thread ({warmup} warm-up requests, then {requests} counted)\n");
    println!("| scenario | requests | allocs/req | reallocs/req | bytes/req | totals (allocs / reallocs / bytes) |");
    println!("|---|---|---|---|---|---|");
    for (name, counts) in &rows {
        counts.row(name, requests);
    }
    println!(
        "| idle gateway, 1.1 s (background tasks only; totals) | - | - | - | - | {} / {} / {} |",
        idle.allocs, idle.reallocs, idle.bytes
    );
}
