//! Every cell's vital signs: `/healthz` (the process answers), `/readyz` (it can do its job
//! now), `/metrics` (Prometheus text), `/openapi.json` (the organism's public API, when the
//! binary published it), and the one-line `READY` announcement a supervisor reads.
//!
//! Metrics: every histogram is rendered as a Prometheus histogram with the buckets of
//! [`SECONDS_BUCKETS`] (not a summary), so that latencies aggregate across cells; [`instrument`]
//! counts every HTTP request by route, method and status; a role registers [`on_scrape`]
//! collectors for the gauges whose figures live elsewhere (the store, the registry, the purse),
//! read when `/metrics` is scraped rather than measured again.
//!
//! Architecture Invariant: nothing here knows about roles. A role builds its own `Router` and
//! merges [`router`] into it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

mod signals;
pub use signals::cancel_on_signals;

/// The buckets of every histogram (seconds; the same everywhere, so series from different
/// cells and roles add up): 1 ms to 30 s, about three per decade.
pub const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&SECONDS_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
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

/// `/healthz`, `/readyz`, `/metrics` and `/openapi.json` for a cell of `role`.
pub fn router(role: &'static str, ready: Readiness) -> Router {
    let metrics = metrics_handle();
    metrics::gauge!("cell_info", "role" => role).set(1.0);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .with_state(VitalState {
            role,
            ready,
            metrics,
        })
}

/// A collector: sets gauges from figures kept elsewhere, just before `/metrics` renders.
type Collector = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn collectors() -> &'static Mutex<Vec<Collector>> {
    static COLLECTORS: OnceLock<Mutex<Vec<Collector>>> = OnceLock::new();
    COLLECTORS.get_or_init(|| Mutex::new(Vec::new()))
}

/// How long one collector may take before the scrape goes on without it.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Run `collect` every time `/metrics` is scraped, before rendering (bounded by
/// [`COLLECT_TIMEOUT`]; one that fails leaves its gauges as they were).
pub fn on_scrape<F, Fut>(collect: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let collector: Collector = Arc::new(move || Box::pin(collect()));
    collectors()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(collector);
}

/// Count and time every request `router` serves: `http_requests_total` and
/// `http_request_duration_seconds` by `route` (the matched route pattern, or one of
/// `fallback_routes` when the fallback served that exact path, else `other`: never the raw
/// path, so the label set stays bounded), `method` and `status`. Apply it last, after merging
/// [`router`], so the vitals are counted too.
pub fn instrument(router: Router, fallback_routes: &'static [&'static str]) -> Router {
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            let route: &'static str = match req.extensions().get::<MatchedPath>() {
                Some(m) => intern(m.as_str()),
                None => fallback_routes
                    .iter()
                    .find(|r| **r == req.uri().path())
                    .copied()
                    .unwrap_or("other"),
            };
            let method = method_label(req.method());
            let started = Instant::now();
            let resp: Response = next.run(req).await;
            let status = resp.status().as_u16().to_string();
            metrics::counter!("http_requests_total", "route" => route, "method" => method, "status" => status.clone())
                .increment(1);
            metrics::histogram!("http_request_duration_seconds", "route" => route, "method" => method, "status" => status)
                .record(started.elapsed().as_secs_f64());
            resp
        },
    ))
}

/// Route patterns are few and fixed (the router's own): keep one `'static` copy of each.
fn intern(route: &str) -> &'static str {
    static ROUTES: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let mut routes = ROUTES
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(r) = routes.iter().find(|r| **r == route) {
        return r;
    }
    if routes.len() >= 64 {
        return "other";
    }
    let r: &'static str = Box::leak(route.to_string().into_boxed_str());
    routes.push(r);
    r
}

fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The organism's public API as OpenAPI 3 (the binary composes it from the roles' handlers and
/// publishes it once at start); every cell serves it at `/openapi.json`.
pub fn publish_openapi(doc: serde_json::Value) {
    if OPENAPI.set(doc).is_err() {
        tracing::debug!("the OpenAPI description was already published");
    }
}

static OPENAPI: OnceLock<serde_json::Value> = OnceLock::new();

async fn openapi() -> Response {
    match OPENAPI.get() {
        Some(doc) => Json(doc.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": "this cell has no OpenAPI description (it is published by the `cell` binary)" })),
        )
            .into_response(),
    }
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
    let pending: Vec<Collector> = collectors()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let runs = pending.iter().map(|collect| async move {
        if tokio::time::timeout(COLLECT_TIMEOUT, collect())
            .await
            .is_err()
        {
            metrics::counter!("metrics_collect_timeouts_total").increment(1);
        }
    });
    futures::future::join_all(runs).await;
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
