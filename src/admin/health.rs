//! `GET /healthz`, `GET /readyz`, `GET /metrics`: no credential, for probes and Prometheus.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::AdminState;

/// A store that has not answered a ping by then counts as unavailable: a probe must not hang.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// `GET /healthz`: the process is alive.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the store answers. A failing store is counted on every probe and logged once
/// per outage, like every store failure.
pub(crate) async fn readyz(State(state): State<AdminState>) -> (StatusCode, Json<Value>) {
    const IMPACT: &str = "/readyz answers 503";
    match tokio::time::timeout(PING_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => {
            state.pings.succeeded();
            (StatusCode::OK, Json(json!({ "status": "ready" })))
        }
        Ok(Err(e)) => {
            state.pings.failed(&e, IMPACT);
            unavailable()
        }
        Err(_) => {
            state
                .pings
                .failed(&"no answer to a ping within 2 s", IMPACT);
            unavailable()
        }
    }
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
}

fn unavailable() -> (StatusCode, Json<Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "unavailable" })),
    )
}
