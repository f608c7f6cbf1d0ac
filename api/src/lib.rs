//! The api role: the search API, the ingest endpoint crawlers answer to, and the owner of the
//! frontier (what is accepted, at what depth, under which budget) and of publishing it as jobs.
//!
//! Entry points: [`app`] builds the axum `Router` (tested with `oneshot`, no socket); [`run`]
//! serves it on a bound listener until a shutdown signal and runs the [`publisher`] beside it.

pub mod config;
pub mod frontier;
mod http;
pub mod publisher;
pub mod query;

use std::sync::Arc;

use engines::{JobQueue, Store};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::ApiConfig;
pub use http::app;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<ApiConfig>,
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn JobQueue>,
    /// Wakes the publisher when the frontier grows.
    pub frontier_grew: Arc<Notify>,
    pub ready: vitals::Readiness,
}

impl AppState {
    pub fn new(cfg: ApiConfig, store: Arc<dyn Store>, queue: Arc<dyn JobQueue>) -> Self {
        Self {
            cfg: Arc::new(cfg),
            store,
            queue,
            frontier_grew: Arc::new(Notify::new()),
            ready: vitals::Readiness::default(),
        }
    }
}

/// Serve the api role on `listener` until `shutdown` is cancelled, publishing the frontier as
/// jobs that name `advertise` (this cell's base URL) as the place to send results.
pub async fn run(
    state: AppState,
    listener: TcpListener,
    advertise: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let publisher = tokio::spawn(publisher::run(state.clone(), advertise, shutdown.clone()));
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
    served.map_err(|e| anyhow::anyhow!("serving the api failed: {e}"))
}
