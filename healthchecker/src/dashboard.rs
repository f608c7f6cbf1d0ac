//! The organism, seen: a live web dashboard served by every health checker (`GET /dashboard`).
//!
//! The page (plain HTML, CSS and JavaScript compiled into the binary with `include_str!`; no
//! build step, nothing from a CDN) opens one Server-Sent Events stream, `GET /dashboard/live`:
//! the checker's life events (`born`, `dead`, `replaced`, `divided`, ... numbered as in
//! `GET /events`, replayed from the start of the ring so the lineage is whole) interleaved with a
//! `snapshot` every second: the registry's live cells, the server pool and the purse (a
//! factory's `GET /pool`, as `cell status` reads it), and the organism's figures (pages indexed
//! and the crawl rate from an api's `GET /stats`; search latency from the api cells' own
//! `api_search_seconds` histograms, their bucket counts added across cells). The page keeps the
//! last ten minutes of snapshots for its charts.
//!
//! Those figures are gathered by one task, only while someone watches (a stream is open or a
//! snapshot was asked for in the last ten seconds), at most once a second.
//!
//! In cluster mode the dashboard's data answers only the read token, as `/cells` does; a browser
//! cannot set a header on an `EventSource`, so it may also come as `?token=` (the page passes on
//! its own `?token=`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::stream;
use protocol::control::CellRecord;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::HealthcheckerState;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// How often the page gets a snapshot.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Api cells whose metrics are read for the search latency, at most.
const MAX_SCRAPED_APIS: usize = 16;
/// How long figures are gathered after the last snapshot was asked for.
const WATCHED_FOR: Duration = Duration::from_secs(10);

/// The dashboard's routes (merged into the checker's app).
pub fn routes() -> Router<HealthcheckerState> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/style.css", get(style_css))
        .route("/dashboard/snapshot", get(snapshot))
        .route("/dashboard/live", get(live))
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct ReadQuery {
    /// The read token, for a reader that cannot send `Authorization` (an `EventSource`).
    token: Option<String>,
    /// Replay the life events numbered above this one (default: the whole ring).
    since: Option<u64>,
}

/// The request's headers, with `?token=` turned into the `Authorization` it stands for.
fn read_headers(headers: &HeaderMap, q: &ReadQuery) -> HeaderMap {
    let mut headers = headers.clone();
    if let Some(token) = &q.token {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            headers.insert(header::AUTHORIZATION, v);
        }
    }
    headers
}

/// One look at the organism, as the page draws it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Snapshot {
    pub v: u32,
    /// The checker that answered.
    pub checker: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Live cells (in any state), every role.
    pub cells: Vec<CellRecord>,
    pub figures: Figures,
}

/// What the checker gathers from other cells for the dashboard.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Figures {
    /// A factory's `GET /pool` (servers and the purse), as it answered; `None` without a pool.
    pub pool: Option<serde_json::Value>,
    /// Why there is no pool figure (no pool; no factory answered).
    pub pool_note: Option<String>,
    pub pages_indexed: Option<u64>,
    /// Pages indexed per second since the previous look.
    pub crawl_rate_per_s: Option<f64>,
    /// Mean search latency since the previous look, milliseconds (`None`: no search then).
    pub search_mean_ms: Option<f64>,
    /// The bucket bound under which 95% of those searches finished, milliseconds.
    pub search_p95_ms: Option<f64>,
    /// Searches since the previous look.
    pub searches: Option<f64>,
}

/// What the dashboard keeps between looks.
pub(crate) struct Dashboard {
    figures: Mutex<Figures>,
    watchers: AtomicUsize,
    last_asked: Mutex<Option<Instant>>,
    previous: Mutex<Previous>,
    http: reqwest::Client,
}

#[derive(Default)]
struct Previous {
    indexed: Option<(Instant, u64)>,
    /// Per api cell: its search histogram's cumulative buckets, sum and count.
    searches: HashMap<String, SearchHistogram>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct SearchHistogram {
    /// (upper bound in seconds, cumulative count), in bound order.
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Dashboard {
    pub(crate) fn new() -> Self {
        Self {
            figures: Mutex::new(Figures::default()),
            watchers: AtomicUsize::new(0),
            last_asked: Mutex::new(None),
            previous: Mutex::new(Previous::default()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    fn watched(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
            || lock(&self.last_asked).is_some_and(|at| at.elapsed() < WATCHED_FOR)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl HealthcheckerState {
    /// The organism as the dashboard shows it now.
    pub fn snapshot(&self) -> Snapshot {
        let cells = self.cells().roles.into_values().flatten().collect();
        Snapshot {
            v: protocol::WIRE_VERSION,
            checker: self.0.client.signer().sender().to_string(),
            at_ms: crate::now().unix_ms,
            cells,
            figures: lock(&self.0.dashboard.figures).clone(),
        }
    }

    /// Gather the dashboard's figures once: the pool from the first factory that answers, the
    /// crawl totals from the first api that answers, the search histograms of the api cells.
    pub async fn gather_figures(&self) {
        let d = &self.0.dashboard;
        let cells = self.cells();
        let auth = self.0.verifier.read_authorization();
        let mut figures = Figures::default();

        let mut pool_note = Some("no factory answered".to_string());
        for factory in &self.0.cfg.factories {
            let resp = d
                .http
                .get(format!("{}/pool", factory.trim_end_matches('/')))
                .header(header::AUTHORIZATION, &auth)
                .send()
                .await;
            match resp {
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                    pool_note = Some("no server pool: cells are processes on this machine".into());
                    break;
                }
                Ok(r) if r.status().is_success() => {
                    if let Ok(pool) = r.json::<serde_json::Value>().await {
                        figures.pool = Some(pool);
                        pool_note = None;
                        break;
                    }
                }
                _ => {}
            }
        }
        figures.pool_note = pool_note;

        let apis: Vec<&CellRecord> = cells
            .roles
            .get("api")
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        for api in &apis {
            let url = format!("{}/stats", api.addr.trim_end_matches('/'));
            if let Ok(stats) =
                protocol::client::get_versioned::<protocol::Stats>(&d.http, &url, None, None).await
            {
                figures.pages_indexed = Some(stats.pages_indexed);
                break;
            }
        }
        let mut scraped = HashMap::new();
        for api in apis.iter().take(MAX_SCRAPED_APIS) {
            let url = format!("{}/metrics", api.addr.trim_end_matches('/'));
            let Ok(resp) = d.http.get(&url).send().await else {
                continue;
            };
            let Ok(text) = resp.text().await else {
                continue;
            };
            if let Some(h) = search_histogram(&text) {
                scraped.insert(api.cell_id.clone(), h);
            }
        }

        let now = Instant::now();
        {
            let mut prev = lock(&d.previous);
            if let Some(indexed) = figures.pages_indexed {
                if let Some((at, before)) = prev.indexed {
                    let secs = now.saturating_duration_since(at).as_secs_f64();
                    if secs > 0.0 {
                        figures.crawl_rate_per_s =
                            Some(indexed.saturating_sub(before) as f64 / secs);
                    }
                }
                prev.indexed = Some((now, indexed));
            }
            let delta = searches_since(&prev.searches, &scraped);
            if delta.count > 0.0 {
                figures.search_mean_ms = Some(delta.sum / delta.count * 1000.0);
                figures.search_p95_ms = quantile_bound(&delta, 0.95).map(|s| s * 1000.0);
            }
            figures.searches = Some(delta.count);
            prev.searches = scraped;
        }
        *lock(&d.figures) = figures;
    }
}

/// The `api_search_seconds` histogram in a cell's Prometheus text, read with a real parser.
fn search_histogram(text: &str) -> Option<SearchHistogram> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).ok()?;
    let mut h = SearchHistogram::default();
    let mut found = false;
    for sample in scrape.samples {
        match (sample.metric.as_str(), sample.value) {
            ("api_search_seconds", prometheus_parse::Value::Histogram(buckets)) => {
                found = true;
                h.buckets = buckets.iter().map(|b| (b.less_than, b.count)).collect();
                h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            ("api_search_seconds_sum", v) => h.sum = value_of(&v),
            ("api_search_seconds_count", v) => h.count = value_of(&v),
            _ => {}
        }
    }
    found.then_some(h)
}

fn value_of(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x)
        | prometheus_parse::Value::Gauge(x)
        | prometheus_parse::Value::Untyped(x) => *x,
        _ => 0.0,
    }
}

/// The searches between two looks, added across cells: per cell, the difference of its
/// cumulative figures (a cell seen once, or whose counters went back, counts from zero: it is
/// new or restarted).
fn searches_since(
    before: &HashMap<String, SearchHistogram>,
    now: &HashMap<String, SearchHistogram>,
) -> SearchHistogram {
    let mut total = SearchHistogram::default();
    for (cell, h) in now {
        let base = before
            .get(cell)
            .filter(|b| b.count <= h.count && b.buckets.len() == h.buckets.len());
        let (sum, count) = match base {
            Some(b) => (h.sum - b.sum, h.count - b.count),
            None => (h.sum, h.count),
        };
        total.sum += sum;
        total.count += count;
        for (i, (bound, c)) in h.buckets.iter().enumerate() {
            let c = c - base.map_or(0.0, |b| b.buckets[i].1);
            match total.buckets.iter_mut().find(|(b, _)| b == bound) {
                Some((_, t)) => *t += c,
                None => total.buckets.push((*bound, c)),
            }
        }
    }
    total.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    total
}

/// The smallest bucket bound under which a `q` share of the observations fall.
fn quantile_bound(h: &SearchHistogram, q: f64) -> Option<f64> {
    let want = h.count * q;
    h.buckets
        .iter()
        .find(|(_, c)| *c >= want && *c > 0.0)
        .map(|(b, _)| *b)
}

/// Gather figures every [`SNAPSHOT_EVERY`] while the dashboard is watched, until `stop`.
pub(crate) async fn gather_while_watched(state: HealthcheckerState, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if !state.0.dashboard.watched() {
            continue;
        }
        tokio::select! {
            () = state.gather_figures() => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn snapshot(
    State(state): State<HealthcheckerState>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(rejection) = state.0.verifier.check_read(&read_headers(&headers, &q)) {
        return rejection.into_response();
    }
    *lock(&state.0.dashboard.last_asked) = Some(Instant::now());
    Json(state.snapshot()).into_response()
}

/// Decrements the watcher count when the stream is dropped (the page went away).
struct Watching(HealthcheckerState);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0 .0.dashboard.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The page's one stream: life events (replayed from `?since=`, `Last-Event-ID`, or the start
/// of the ring) and a `snapshot` every second.
async fn live(
    State(state): State<HealthcheckerState>,
    Query(q): Query<ReadQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(rejection) = state.0.verifier.check_read(&read_headers(&headers, &q)) {
        return rejection.into_response();
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let log = state.events().clone();
    let after = match resume.or(q.since) {
        Some(n) if n <= log.latest() => n,
        _ => 0,
    };
    state.0.dashboard.watchers.fetch_add(1, Ordering::Relaxed);
    let watching = Arc::new(Watching(state.clone()));
    let stop = state.0.streams.clone();
    let events = log.stream(after, stop.clone());
    let snapshots = stream::unfold(
        (state.clone(), stop, watching, true),
        |(state, stop, watching, first)| async move {
            if !first {
                tokio::select! {
                    () = tokio::time::sleep(SNAPSHOT_EVERY) => {}
                    () = stop.cancelled() => return None,
                }
            }
            let data = serde_json::to_string(&state.snapshot()).unwrap_or_else(|_| "{}".into());
            let event: Result<Event, Infallible> =
                Ok(Event::default().event("snapshot").data(data));
            Some((event, (state, stop, watching, false)))
        },
    );
    Sse::new(stream::select(events, snapshots))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use control::ClusterKey;
    use protocol::control::{CellState, Heartbeat};
    use tower::ServiceExt as _;

    async fn get(app: &Router, uri: &str) -> (u16, String, String) {
        let resp = app
            .clone()
            .oneshot(
                axum::http::Request::get(uri)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("answer");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .expect("body");
        (status, ctype, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_page_its_assets_and_a_snapshot_are_served_from_the_binary() {
        let key = ClusterKey::generate();
        let state =
            HealthcheckerState::new(crate::HealthcheckerConfig::default(), key.clone(), "hc");
        state
            .heartbeat(
                Heartbeat {
                    cell_id: "api-1".into(),
                    role: "api".into(),
                    addr: "http://127.0.0.1:1".into(),
                    state: CellState::Serving,
                    pressure: 0.4,
                    signals: Default::default(),
                    version: "t".into(),
                    build: String::new(),
                    wire: Vec::new(),
                    parent: Some("api-0".into()),
                    seq: 1,
                    interval_ms: 100,
                    pid: Some(9),
                    decision: None,
                },
                crate::now(),
            )
            .expect("taken");
        let app = crate::app(state.clone());
        let (status, ctype, html) = get(&app, "/dashboard").await;
        assert_eq!((status, ctype.as_str()), (200, "text/html; charset=utf-8"));
        // Everything the page loads comes from this cell: no other origin, no CDN.
        assert!(html.contains("/dashboard/app.js") && html.contains("/dashboard/style.css"));
        for asset in [INDEX_HTML, APP_JS, STYLE_CSS] {
            assert!(!asset.contains("http://") && !asset.contains("https://"));
        }
        let (status, ctype, js) = get(&app, "/dashboard/app.js").await;
        assert_eq!(
            (status, ctype.as_str()),
            (200, "text/javascript; charset=utf-8")
        );
        assert!(js.contains("/dashboard/live"));
        let (status, _, _) = get(&app, "/dashboard/style.css").await;
        assert_eq!(status, 200);
        let (status, _, body) = get(&app, "/dashboard/snapshot").await;
        assert_eq!(status, 200);
        let snap: Snapshot = serde_json::from_str(&body).expect("a snapshot");
        assert_eq!(snap.checker, "hc");
        assert_eq!(snap.cells.len(), 1);
        assert_eq!(snap.cells[0].parent.as_deref(), Some("api-0"));

        // Cluster mode: the data takes the read token, as a header or as `?token=`.
        state.verifier().guard_reads(true);
        assert_eq!(get(&app, "/dashboard/snapshot").await.0, 401);
        assert_eq!(get(&app, "/dashboard/live").await.0, 401);
        let token = key.read_authorization();
        let token = token.trim_start_matches("Bearer ");
        assert_eq!(
            get(&app, &format!("/dashboard/snapshot?token={token}"))
                .await
                .0,
            200
        );
        assert_eq!(get(&app, "/dashboard/snapshot?token=wrong").await.0, 401);
        // The page itself shows nothing of the organism: it is open.
        assert_eq!(get(&app, "/dashboard").await.0, 200);
    }

    fn histogram(buckets: &[(f64, f64)], sum: f64, count: f64) -> SearchHistogram {
        SearchHistogram {
            buckets: buckets.to_vec(),
            sum,
            count,
        }
    }

    #[tokio::test]
    async fn the_live_stream_replays_the_events_and_sends_snapshots() {
        let state = HealthcheckerState::new(
            crate::HealthcheckerConfig::default(),
            ClusterKey::generate(),
            "hc",
        );
        state.events().push(protocol::control::CellEvent {
            kind: protocol::control::EventKind::Dead,
            cell_id: "api-7".into(),
            role: "api".into(),
            at_ms: 1,
            reason: "silent".into(),
            parent: None,
        });
        let resp = crate::app(state.clone())
            .oneshot(
                axum::http::Request::get("/dashboard/live")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("answer");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body().into_data_stream();
        let mut parser = protocol::events::SseParser::new();
        let mut kinds = Vec::new();
        while kinds.len() < 2 {
            let chunk = futures::StreamExt::next(&mut body)
                .await
                .expect("the stream goes on")
                .expect("a chunk");
            for msg in parser.feed(&chunk) {
                if msg.event == "snapshot" {
                    let snap: Snapshot = serde_json::from_str(&msg.data).expect("a snapshot");
                    assert_eq!(snap.checker, "hc");
                } else {
                    assert_eq!(msg.id.as_deref(), Some("1"));
                }
                kinds.push(msg.event);
            }
        }
        kinds.sort();
        assert_eq!(kinds, ["dead", "snapshot"]);
        state.0.streams.cancel();
    }

    #[test]
    fn the_search_histogram_is_read_from_prometheus_text() {
        let text = "# TYPE api_search_seconds histogram\n\
            api_search_seconds_bucket{le=\"0.001\"} 1\n\
            api_search_seconds_bucket{le=\"0.01\"} 3\n\
            api_search_seconds_bucket{le=\"+Inf\"} 4\n\
            api_search_seconds_sum 0.52\n\
            api_search_seconds_count 4\n\
            # TYPE api_pages_indexed_total counter\n\
            api_pages_indexed_total 9\n";
        let h = search_histogram(text).expect("found");
        assert_eq!(h.count, 4.0);
        assert_eq!(h.sum, 0.52);
        assert_eq!(h.buckets[0], (0.001, 1.0));
        assert_eq!(h.buckets[2].1, 4.0);
        assert!(h.buckets[2].0.is_infinite());
        assert_eq!(search_histogram("api_other 1\n"), None);
    }

    #[test]
    fn searches_add_up_across_cells_and_a_restarted_cell_counts_from_zero() {
        let b = |a: f64, c: f64, inf: f64| vec![(0.001, a), (0.01, c), (f64::INFINITY, inf)];
        let before = HashMap::from([
            ("a".to_string(), histogram(&b(1.0, 2.0, 2.0), 0.01, 2.0)),
            ("b".to_string(), histogram(&b(0.0, 5.0, 9.0), 3.0, 9.0)),
        ]);
        let now = HashMap::from([
            // 3 more searches, all under 1 ms.
            ("a".to_string(), histogram(&b(4.0, 5.0, 5.0), 0.013, 5.0)),
            // Restarted: its counters went back; all it has counts.
            ("b".to_string(), histogram(&b(0.0, 0.0, 1.0), 0.5, 1.0)),
            // New.
            ("c".to_string(), histogram(&b(0.0, 1.0, 1.0), 0.005, 1.0)),
        ]);
        let d = searches_since(&before, &now);
        assert_eq!(d.count, 5.0);
        assert!((d.sum - 0.508).abs() < 1e-9, "{}", d.sum);
        assert_eq!(d.buckets, b(3.0, 4.0, 5.0));
        assert_eq!(quantile_bound(&d, 0.5), Some(0.001));
        assert_eq!(quantile_bound(&d, 0.95), Some(f64::INFINITY));
        assert_eq!(quantile_bound(&SearchHistogram::default(), 0.95), None);
    }
}
