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

/// The line a cell prints on stdout once it listens, for the process that started it
/// (`HOMEOSTAT_READY {json}`, versioned like every message between cells).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyLine {
    /// The wire version ([`protocol::WIRE_VERSION`]); 0 when absent.
    #[serde(default)]
    pub v: u32,
    pub role: String,
    pub addr: String,
    pub pid: u32,
}

impl ReadyLine {
    pub const PREFIX: &'static str = "HOMEOSTAT_READY ";

    /// The ready line of this build for a cell of `role` listening on `addr`.
    pub fn new(role: impl Into<String>, addr: impl Into<String>, pid: u32) -> Self {
        Self {
            v: protocol::WIRE_VERSION,
            role: role.into(),
            addr: addr.into(),
            pid,
        }
    }

    pub fn render(&self) -> String {
        format!(
            "{}{}",
            Self::PREFIX,
            serde_json::to_string(self).expect("a ReadyLine always serializes")
        )
    }

    /// Parse a stdout line: `Ok(None)` when it is not a ready line; an error naming what is
    /// wrong with a ready line this build cannot read (malformed, unversioned, too new).
    pub fn parse(line: &str) -> Result<Option<Self>, protocol::WireError> {
        let Some(json) = line.trim_end().strip_prefix(Self::PREFIX) else {
            return Ok(None);
        };
        let ready: Self = serde_json::from_str(json).map_err(protocol::WireError::Malformed)?;
        match ready.v {
            0 => Err(protocol::WireError::MissingVersion),
            v if v > protocol::WIRE_VERSION => Err(protocol::WireError::UnknownVersion(v)),
            _ => Ok(Some(ready)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        let line = ReadyLine::new("api", "127.0.0.1:1", 7);
        assert_eq!(
            ReadyLine::parse(&line.render()).expect("parses"),
            Some(line)
        );
        assert_eq!(
            ReadyLine::parse("some log line").expect("not a ready line"),
            None
        );
    }

    #[test]
    fn a_ready_line_without_a_known_version_is_a_named_error() {
        let unversioned = r#"HOMEOSTAT_READY {"role":"api","addr":"127.0.0.1:1","pid":7}"#;
        let err = ReadyLine::parse(unversioned).expect_err("no version");
        assert!(err.to_string().contains("no version"), "{err}");
        let future = r#"HOMEOSTAT_READY {"v":2,"role":"api","addr":"127.0.0.1:1","pid":7}"#;
        let err = ReadyLine::parse(future).expect_err("too new");
        assert!(err.to_string().contains("version 2"), "{err}");
        let err = ReadyLine::parse("HOMEOSTAT_READY {").expect_err("malformed");
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}
