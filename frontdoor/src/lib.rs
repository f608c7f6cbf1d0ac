//! The frontdoor role: the clients' entry point. It forwards its public routes only (`GET
//! /search`, `GET /stats`, `POST /crawl`, matched after normalizing the path: `paths`) to a live
//! api cell chosen by weight and pressure, retries on another api cell when one does not answer
//! (a `POST /crawl` only under an `Idempotency-Key`, which it adds when the client sent none),
//! ejects cells that keep failing, and answers a clear 503 when no api cell is live. Anything
//! else is 404 at the door: no spelling of a path reaches the api's internal endpoints.
//!
//! Entry points: [`app`] builds the axum `Router` (tested without a socket); [`run`] serves it
//! on a bound listener until a shutdown signal, with the [`backends::BackendPoller`] beside it.
//!
//! - [`backends`]: the live api cells, from the health checkers' `GET /cells`, as a `watch`
//!   channel (the seam where tests feed a list by hand);
//! - [`balancer`]: the weighted choice and the outlier detector;
//! - `paths`: path normalization and the public routes;
//! - `proxy`: forwarding, retries, the error answers;
//! - `weights`: `POST /control/weight`, signed weight requests from api cells.
//!
//! Architecture Invariant: the frontdoor holds no data of its own. Everything it knows (the
//! live cells, weights, ejections) is rebuilt from the registry and the cells within seconds,
//! so any number of frontdoors can run side by side and one may die at any time.

pub mod backends;
pub mod balancer;
pub mod config;
pub mod paths;
mod proxy;
mod weights;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler as _;
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use backends::{Backend, BackendPoller};
pub use balancer::{BackendStatus, Balancer};
pub use config::FrontdoorConfig;
pub use proxy::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

/// The response header naming the api cell (its cell id) that answered.
pub const BACKEND_HEADER: &str = "x-homeostat-backend";

/// Largest signed control message accepted.
const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// What happened, counted for tests and operators (the same events go to `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
    weights_applied: AtomicU64,
    control_rejected: AtomicU64,
}

impl Counters {
    /// Client requests answered, whatever the outcome.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Attempts beyond the first.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    /// Times an api cell was ejected.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }
    /// Weight requests applied.
    pub fn weights_applied(&self) -> u64 {
        self.weights_applied.load(Ordering::Relaxed)
    }
    /// Control messages refused (unsigned, forged, stale, replayed, malformed, invalid).
    pub fn control_rejected(&self) -> u64 {
        self.control_rejected.load(Ordering::Relaxed)
    }
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<FrontdoorConfig>,
    pub ready: vitals::Readiness,
    pub balancer: Arc<Balancer>,
    pub counters: Arc<Counters>,
    /// The live api cells.
    backends: watch::Receiver<Vec<Backend>>,
    /// Set when this state feeds `backends` itself by polling the configured health checkers.
    feed: Option<watch::Sender<Vec<Backend>>>,
    /// One pooled client for every attempt and every registry poll.
    client: reqwest::Client,
    verifier: Arc<control::Verifier>,
}

impl AppState {
    /// A frontdoor that learns the live api cells from `cfg.healthcheckers` (polled by [`run`])
    /// and accepts weight requests that `verifier` opens.
    pub fn new(cfg: FrontdoorConfig, verifier: Arc<control::Verifier>) -> Result<Self, SetupError> {
        let (feed, backends) = watch::channel(Vec::new());
        let mut state = Self::with_backends(cfg, verifier, backends)?;
        state.feed = Some(feed);
        Ok(state)
    }

    /// A frontdoor whose live api cells come from `backends`, fed by the caller (no polling).
    pub fn with_backends(
        cfg: FrontdoorConfig,
        verifier: Arc<control::Verifier>,
        backends: watch::Receiver<Vec<Backend>>,
    ) -> Result<Self, SetupError> {
        let attempt = Duration::from_millis(cfg.attempt_timeout_ms);
        let client = reqwest::Client::builder()
            // Cells talk to each other directly, whatever proxy the environment names.
            .no_proxy()
            .connect_timeout(attempt.min(Duration::from_secs(2)))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .map_err(SetupError::Client)?;
        let balancer = Balancer::new(
            rand::random(),
            cfg.eject_after_failures,
            Duration::from_millis(cfg.eject_for_ms),
        );
        Ok(Self {
            cfg: Arc::new(cfg),
            ready: vitals::Readiness::default(),
            balancer: Arc::new(balancer),
            counters: Arc::new(Counters::default()),
            backends,
            feed: None,
            client,
            verifier,
        })
    }

    /// Replace the routing random generator's seed (deterministic tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.balancer = Arc::new(Balancer::new(
            seed,
            self.cfg.eject_after_failures,
            Duration::from_millis(self.cfg.eject_for_ms),
        ));
        self
    }

    /// The live api cells as the frontdoor sees them now.
    pub fn backends(&self) -> Vec<Backend> {
        self.backends.borrow().clone()
    }

    /// A receiver of the live api cells, for whoever wants to watch them change.
    pub fn subscribe(&self) -> watch::Receiver<Vec<Backend>> {
        self.backends.clone()
    }
}

/// The frontdoor's routes, vitals included.
pub fn app(state: AppState) -> Router {
    let vitals = vitals::router("frontdoor", state.ready.clone());
    let limit = DefaultBodyLimit::max(state.cfg.max_body_bytes);
    // Public routes are matched by `proxy::forward` on the normalized path, not by the router
    // on the raw one: `/x/../search` is `/search`, `/crawl/%2e%2e/internal/ingest` is refused.
    let router = Router::new()
        .route(
            "/control/weight",
            post(weights::receive).layer(DefaultBodyLimit::max(MAX_CONTROL_BYTES)),
        )
        .fallback(proxy::forward.layer(limit))
        .with_state(state)
        .merge(vitals);
    // The proxied routes are served by the fallback: named by their literal path.
    vitals::instrument(router, &["/search", "/stats", "/crawl"])
}

/// Why a frontdoor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("building the frontdoor's HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why the frontdoor role stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the frontdoor failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Serve the frontdoor on `listener` until `shutdown` is cancelled, then stop accepting and
/// finish the requests in flight. Polls the health checkers meanwhile when the state was built
/// with [`AppState::new`]. `ctx` is the cell's life, as every role gets it.
pub async fn run(
    ctx: lifecycle::CellContext,
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    tracing::info!(addr = %ctx.addr(), cell_id = %ctx.cell_id(), "front door serving");
    {
        let (counters, rate) = (state.counters.clone(), lifecycle::pressure::Rate::default());
        let target = f64::from(state.cfg.target_requests_per_s.max(1));
        ctx.report_pressure(move || {
            let r = rate.per_sec(counters.requests());
            (r / target, vec![("requests_per_s", r)])
        });
    }
    // The registry keeps being read while in-flight requests retry, so it stops after serving.
    let background = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(feed) = state.feed.clone() {
        let registry = protocol::client::CellsClient::with_http(
            state.client.clone(),
            state.cfg.healthcheckers.clone(),
            Some(state.verifier.read_authorization()),
        );
        let poller =
            BackendPoller::new(registry, Duration::from_millis(state.cfg.registry_poll_ms));
        tasks.spawn(poller.run(feed, background.clone()));
    }
    tasks.spawn(forget_departed(state.clone(), background.clone()));
    if state.feed.is_some() {
        // A replacement front door must not answer "no api is live" before its first look at
        // the registry: hold new connections (they wait in the listen backlog) until it knows
        // an api, or for a bounded moment when there is none yet.
        let mut backends = state.subscribe();
        let first = tokio::time::timeout(Duration::from_secs(1), async {
            while backends.borrow_and_update().is_empty() {
                if backends.changed().await.is_err() {
                    return;
                }
            }
        });
        let _ = first.await;
    }
    state.ready.set(true);
    let stop = shutdown.clone();
    // Once draining, every answer closes its connection: clients leave this cell between
    // requests (to its successor on the same socket, or the other door), so none is caught on
    // a keep-alive connection when it stops.
    let draining = ctx.draining();
    let router = app(state.clone()).layer(axum::middleware::map_response(
        move |mut resp: axum::response::Response| {
            let draining = draining.is_cancelled();
            async move {
                if draining {
                    resp.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                resp
            }
        },
    ));
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    state.ready.set(false);
    background.cancel();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a frontdoor background task failed");
        }
    }
    served.map_err(RunError::Serve)
}

/// Trim the balancer's memory of cells that left the registry, whenever it changes.
async fn forget_departed(state: AppState, stop: CancellationToken) {
    let mut backends = state.subscribe();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = backends.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let live = backends.borrow_and_update().clone();
        state.balancer.forget_departed(&live);
    }
}
