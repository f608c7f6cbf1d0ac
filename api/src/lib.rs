//! The api role: the search API, the ingest endpoint crawlers answer to, and the owner of the
//! frontier (what is accepted, at what depth, under which budget) and of publishing it as jobs.
//!
//! `POST /internal/ingest` takes only a control envelope signed with the cluster key (kind
//! `ingest`, addressed to this cell, fresh, never seen): anything else is refused and counted,
//! and nothing is stored. `POST /crawl` with an `Idempotency-Key` is exactly-once across api
//! cells: the first answer is kept in the store and given to every repeat.
//!
//! Entry points: [`app`] builds the axum `Router` (tested with `oneshot`, no socket); [`run`]
//! serves it on a bound listener until a shutdown signal and runs the [`publisher`] beside it,
//! with the cell's pressure reported in its heartbeats and followed by the [`overload`]
//! controller.
//!
//! Code map: [`url_guard`] (normalization and trap guards before a URL reaches the store),
//! [`query`] (search parameters to a checked query), `http` (handlers and the one error-to-status
//! mapping, [`ApiError`]), [`permits`] (the host ledger's door), [`publisher`] (frontier to
//! queue, dead letters to failed), [`overload`] (weight requests to the front doors).

pub mod config;
mod http;
pub mod overload;
pub mod permits;
pub mod publisher;
pub mod query;
pub mod search_cache;
pub mod url_guard;

use std::sync::Arc;

use engines::idempotency::IdempotencyStore;
use engines::{JobQueue, Store};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::ApiConfig;
pub use http::{app, ApiDoc, ApiError};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<ApiConfig>,
    pub store: Arc<dyn Store>,
    /// Idempotency keys of `POST /crawl` (the same database as `store`).
    pub keys: Arc<dyn IdempotencyStore>,
    pub queue: Arc<dyn JobQueue>,
    /// Opens the crawlers' signed ingest batches.
    pub verifier: Arc<control::Verifier>,
    /// Wakes the publisher when the frontier grows.
    pub frontier_grew: Arc<Notify>,
    pub ready: vitals::Readiness,
    /// Requests being served, and the recent latency: the cell's pressure signals.
    pub load: Arc<Load>,
    /// Checks crawlers' signed permit requests ([`permits`]); `None`: no cluster key, refused.
    pub permits_verifier: Option<Arc<control::Verifier>>,
    /// True while the cell sheds optional work (its controller said throttle, seed 003): the
    /// links of ingested pages are kept aside in the store instead of offered to the frontier,
    /// and offered by the [`publisher`] once the load falls.
    pub defer_links: Arc<std::sync::atomic::AtomicBool>,
    /// Answers to repeated searches while the index is unchanged ([`search_cache`]).
    pub search_cache: Arc<search_cache::SearchCache>,
}

/// The api cell's own load, measured by a middleware around every request.
#[derive(Debug, Default)]
pub struct Load {
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Exponentially weighted mean latency, microseconds.
    pub latency_ewma_us: std::sync::atomic::AtomicU64,
    /// Requests recorded, and the count at the last sample: a cell that served nothing since
    /// lets its latency figure decay (an idle cell is not a slow one).
    pub recorded: std::sync::atomic::AtomicU64,
    pub sampled: std::sync::atomic::AtomicU64,
    /// Requests in flight integrated over time since the last sample: their mean over the
    /// sample interval, steadier than a count taken at one instant.
    area: std::sync::Mutex<Area>,
}

/// The integral of the in-flight count over time.
#[derive(Debug, Default)]
struct Area {
    /// Start of the current sample window, and the last change of the count.
    window: Option<std::time::Instant>,
    last_change: Option<std::time::Instant>,
    count: usize,
    /// Request-microseconds in this window.
    integral: f64,
}

impl Area {
    fn advance(&mut self, now: std::time::Instant) {
        if let Some(last) = self.last_change {
            self.integral +=
                self.count as f64 * now.saturating_duration_since(last).as_micros() as f64;
        }
        self.last_change = Some(now);
        self.window.get_or_insert(now);
    }
}

impl Load {
    /// Count a request in flight until the returned guard is dropped: when the request is
    /// answered, and also when it is cancelled (the client went away, a timeout fired).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.count(1);
        InFlight(self.clone())
    }

    fn count(&self, delta: isize) {
        let mut area = self
            .area
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        area.advance(std::time::Instant::now());
        area.count = area.count.saturating_add_signed(delta);
    }

    pub fn record(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let sample = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.latency_ewma_us.load(Relaxed);
        // alpha = 1/8: smooth enough for a 100 ms heartbeat, quick to follow a change.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.latency_ewma_us.store(new, Relaxed);
        self.recorded.fetch_add(1, Relaxed);
    }

    /// The mean number of requests in flight since the last call.
    fn mean_in_flight(&self) -> f64 {
        let now = std::time::Instant::now();
        let mut area = self
            .area
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        area.advance(now);
        let window = area
            .window
            .map_or(0.0, |w| now.saturating_duration_since(w).as_micros() as f64);
        let mean = if window > 0.0 {
            area.integral / window
        } else {
            area.count as f64
        };
        area.integral = 0.0;
        area.window = Some(now);
        mean
    }

    /// Pressure (1.0 = at the configured targets) and the signals behind it.
    pub fn signals(&self, cfg: &ApiConfig) -> (f64, Vec<(&'static str, f64)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let in_flight = self.in_flight.load(Relaxed) as f64;
        let recorded = self.recorded.load(Relaxed);
        if self.sampled.swap(recorded, Relaxed) == recorded && in_flight == 0.0 {
            let old = self.latency_ewma_us.load(Relaxed);
            self.latency_ewma_us.store(old - old / 4, Relaxed);
        }
        let latency_ms = self.latency_ewma_us.load(Relaxed) as f64 / 1000.0;
        let mean = self.mean_in_flight();
        let p = (mean / f64::from(cfg.target_in_flight.max(1)))
            .max(latency_ms / f64::from(cfg.target_latency_ms.max(1)));
        (
            p,
            vec![
                ("requests_in_flight", in_flight),
                ("requests_in_flight_mean", mean),
                ("latency_ms", latency_ms),
            ],
        )
    }
}

/// One request in flight; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<Load>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.count(-1);
    }
}

impl AppState {
    /// `verifier` opens ingest batches: build it before binding the listener, and tell it the
    /// address this cell advertises ([`control::Verifier::answer_to`]).
    pub fn new(
        cfg: ApiConfig,
        store: Arc<dyn Store>,
        keys: Arc<dyn IdempotencyStore>,
        queue: Arc<dyn JobQueue>,
        verifier: Arc<control::Verifier>,
    ) -> Self {
        let search_cache = Arc::new(search_cache::SearchCache::new(
            cfg.search_cache_mb.saturating_mul(1 << 20),
        ));
        Self {
            search_cache,
            cfg: Arc::new(cfg),
            store,
            keys,
            queue,
            verifier,
            frontier_grew: Arc::new(Notify::new()),
            ready: vitals::Readiness::default(),
            load: Arc::new(Load::default()),
            permits_verifier: None,
            defer_links: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }
}

/// The frontier by state and the queue's depth as gauges, read from the engines when `/metrics`
/// is scraped (the figures `GET /stats` shows; not counted twice). Series the operators' checks
/// look for exist from the start, at zero.
fn metrics_on_scrape(state: &AppState) {
    let (store, queue) = (state.store.clone(), state.queue.clone());
    vitals::on_scrape(move || {
        let (store, queue) = (store.clone(), queue.clone());
        async move {
            if let Ok(stats) = store.stats(0).await {
                let f = &stats.frontier;
                for (s, n) in [
                    ("pending", f.pending),
                    ("in_flight", f.in_flight),
                    ("crawled", f.crawled),
                    ("failed", f.failed),
                ] {
                    metrics::gauge!("api_frontier_urls", "state" => s).set(n as f64);
                }
                metrics::gauge!("api_pages_indexed").set(stats.pages_indexed as f64);
            }
            if let Ok(depth) = queue.depth().await {
                for (s, n) in [
                    ("ready", depth.ready),
                    ("leased", depth.leased),
                    ("dead", depth.dead),
                ] {
                    metrics::gauge!("queue_jobs", "state" => s).set(n as f64);
                }
            }
        }
    });
    metrics::counter!("api_pages_indexed_total").increment(0);
    metrics::counter!("api_ingested_results_total").increment(0);
}

/// Why the api role stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the api failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Serve the api role on `listener` until `shutdown` is cancelled, publishing the frontier as
/// jobs that name this cell (`ctx.advertise()`) as the place to send results. The cell's load
/// is its pressure; in an organism an overloaded cell asks the front doors for less traffic.
pub async fn run(
    ctx: lifecycle::CellContext,
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    metrics_on_scrape(&state);
    let load = state.load.clone();
    let cfg = state.cfg.clone();
    let pressure = ctx.report_pressure(move || load.signals(&cfg));
    if let Some(client) = ctx.client() {
        let controller =
            overload::WeightController::new(client, ctx.cell_id().to_string(), ctx.registry());
        tokio::spawn(controller.run(pressure, shutdown.clone()));
    }
    follow_throttle(ctx.throttled(), state.defer_links.clone(), shutdown.clone());
    tracing::info!(advertise = %ctx.advertise(), cell_id = %ctx.cell_id(), "api cell serving");
    let publisher = tokio::spawn(publisher::run(
        state.clone(),
        ctx.advertise(),
        shutdown.clone(),
    ));
    state.ready.set(true);
    let router = app(state.clone());
    let stop = shutdown.clone();
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
        })
        .await;
    state.ready.set(false);
    shutdown.cancel();
    if let Err(e) = publisher.await {
        tracing::error!(error = %e, "publisher task failed");
    }
    served.map_err(RunError::Serve)
}

/// Keep `defer` equal to what the cell's controller says (throttled or not) until shutdown.
fn follow_throttle(
    mut throttled: tokio::sync::watch::Receiver<bool>,
    defer: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            let now = *throttled.borrow_and_update();
            if defer.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                tracing::info!(
                    deferring = now,
                    "link expansion {}",
                    if now {
                        "deferred: clients first"
                    } else {
                        "resumed"
                    }
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = throttled.changed() => if changed.is_err() { return },
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_follows_in_flight_and_latency() {
        let cfg = ApiConfig {
            target_in_flight: 10,
            target_latency_ms: 100,
            ..ApiConfig::default()
        };
        let load = Arc::new(Load::default());
        assert_eq!(load.signals(&cfg).0, 0.0);
        // Five requests held open for the whole window: a mean of five in flight.
        let held: Vec<InFlight> = (0..5).map(|_| load.enter()).collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (p, _) = load.signals(&cfg);
        assert!((p - 0.5).abs() < 0.05, "five of ten in flight: {p}");
        drop(held);
        for _ in 0..100 {
            load.record(std::time::Duration::from_millis(200));
        }
        let (p, signals) = load.signals(&cfg);
        assert!(p > 1.9 && p <= 2.0, "latency twice the target: {p}");
        assert!(signals
            .iter()
            .any(|(k, v)| *k == "latency_ms" && *v > 190.0));
    }
}
