//! Every cell's vital signs: `/healthz` (the process answers), `/readyz` (it can do its job
//! now), `/metrics` (Prometheus text), and the one-line `READY` announcement a supervisor reads.
//!
//! Architecture Invariant: nothing here knows about roles. A role builds its own `Router` and
//! merges [`router`] into it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

mod signals;
pub use signals::cancel_on_signals;

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding several roles);
            // then this handle renders nothing, which is harmless.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::debug!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// Readiness, flipped by the role: false while starting and while draining.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct VitalState {
    role: &'static str,
    ready: Readiness,
    metrics: PrometheusHandle,
}

/// `/healthz`, `/readyz` and `/metrics` for a cell of `role`.
pub fn router(role: &'static str, ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(VitalState {
            role,
            ready,
            metrics: metrics_handle(),
        })
}

async fn healthz(State(s): State<VitalState>) -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok", "role": s.role }))
}

async fn readyz(State(s): State<VitalState>) -> impl IntoResponse {
    if s.ready.get() {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "ready": true, "role": s.role })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "role": s.role })),
        )
    }
}

async fn render_metrics(State(s): State<VitalState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// The line a cell prints on stdout once it listens, for the process that started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyLine {
    pub role: String,
    pub addr: String,
    pub pid: u32,
}

impl ReadyLine {
    pub const PREFIX: &'static str = "HOMEOSTAT_READY ";

    pub fn render(&self) -> String {
        format!(
            "{}{}",
            Self::PREFIX,
            serde_json::to_string(self).expect("a ReadyLine always serializes")
        )
    }

    /// Parse a stdout line; `None` when it is not a ready line.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.strip_prefix(Self::PREFIX)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let line = ReadyLine {
            role: "api".into(),
            addr: "127.0.0.1:1".into(),
            pid: 7,
        };
        assert_eq!(ReadyLine::parse(&line.render()), Some(line));
        assert_eq!(ReadyLine::parse("some log line"), None);
    }
}
