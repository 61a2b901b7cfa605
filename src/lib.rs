//! tollgate: an edge gateway. It lets a request through to an upstream only with a valid API
//! key, enforces per-key limits and network policy, forwards the caller's identity, and counts
//! every request into usage buckets.
//!
//! # Layout
//!
//! Five layers; a module imports only its own layer or a lower one, and the two edges never
//! import each other. `tests/layers.rs` checks this on every `cargo test`, from this table:
//!
//! Layer 0, pure (no I/O, no tokio): [`credential`] (the token format), [`policy`] (CIDR,
//! origin, method and scope decisions), [`target`] (the request target checked first: method,
//! host, the path in normal form).
//!
//! Layer 1, foundations: [`config`] (settings, parsed and validated once), [`store`] (the only
//! module that touches disk or network: six role traits — records, OAuth clients, audit log,
//! usage, limit buckets, fleet — each backend one file per role; its `audit_chain` is pure), [`tls`] (a
//! listener's certificate and key, checked and reloadable), [`metrics`], [`silence`] (the one
//! rule for a peer that says nothing for too long: bodies, writes to clients, tunnels, HTTP/2
//! streams), [`tasks`] (a group of background tasks ended within a bound at shutdown).
//!
//! Layer 2, state: [`limits`] (per-key GCRA buckets), [`auth`] (the key cache and the one
//! decision, [`auth::authorize`]), [`metering`] (per-key minute counters, their flusher, and
//! the durable mode's write-ahead log; its `bucket` maths is pure), [`refusal`] (every error
//! code and its status; pure, but it names a limit window).
//!
//! Layer 3, edges: [`proxy`] (the request path) and [`admin`] (the admin API); they never
//! import each other. [`listener`] serves HTTP on a bound socket for both.
//!
//! Layer 4, wiring: [`app`] (settings → running gateway), [`cli`], [`shutdown`].
//!
//! # A request's path
//!
//! `listener` accepts → `proxy::Proxy::handle` checks the target ([`target`]: method, one
//! host, the normalised path) and matches a route on it → `auth::extract` finds the
//! credential → `credential::parse` checks its checksum → `auth::cache::KeyCache` finds the key
//! (memory — a stale entry too, re-read in the background — else one store read with a 50 ms
//! deadline behind a circuit breaker) → `auth::authorize` checks state, network, scope and limits →
//! `proxy::forward` streams it upstream with identity headers, bodies bounded in size and in
//! silence → the response streams back with limit headers → `proxy::record` counts it once,
//! refused at any step or forwarded, whatever the client does, into the key's
//! `metering::KeyState`; `metering::flusher` writes the counts in batches.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod credential;
pub mod credits;
pub mod limits;
pub mod listener;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod refusal;
pub mod shutdown;
pub mod silence;
pub mod store;
pub mod target;
pub mod tasks;
pub mod tls;
