//! tollgate: an edge gateway (module map to come).
pub mod auth;
pub mod config;
pub mod credential;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod refusal;
pub mod store;
