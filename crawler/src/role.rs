//! The crawler cell: its worker loop under the cell's life, its vitals on the listener, its
//! politeness kept by the organism's host ledger (through the apis) when it is in an organism,
//! its queue fenced by its standing, and its pressure reported in its heartbeats.

use std::sync::Arc;
use std::time::Duration;

use engines::JobQueue;
use lifecycle::CellContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fence::FencedQueue;
use crate::worker::IngestSender;
use crate::{
    FetchConfig, Fetcher, FetcherError, LedgerGate, LedgerLimits, Politeness, Worker, WorkerConfig,
    WorkerGauges,
};

/// What a crawler cell is given besides its life.
pub struct CrawlerState {
    pub fetch: FetchConfig,
    pub worker: WorkerConfig,
    pub queue: Arc<dyn JobQueue>,
    /// The queue's lease.
    pub lease: Duration,
    /// The queue's delivery limit.
    pub max_deliveries: u32,
    /// API base URLs to send results to when a job's own api does not answer, until the
    /// registry lists live ones.
    pub apis: Vec<String>,
    /// Results travel signed with it.
    pub key: control::ClusterKey,
    /// Whether a new crawler would start on this machine (no pool serves the role): then the
    /// machine's CPU is measured, and a saturated machine holds the backlog's pressure.
    pub shares_machine: bool,
    /// The controller's target pressure (`[homeostasis] target`): what a signal another
    /// crawler would not relieve says at most ([`WorkerGauges::signals`]).
    pub held_pressure: f64,
}

/// Why the crawler role stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the fetcher: {0}")]
    Fetcher(#[from] FetcherError),
}

/// Crawl until `shutdown`, then drain (finish fetches, send results, acknowledge); serve the
/// cell's vitals on `listener` meanwhile.
pub async fn run(
    ctx: CellContext,
    state: CrawlerState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let per_host = state.fetch.per_host_concurrency as usize;
    let queue = FencedQueue::wrap(state.queue, ctx.standing().clone());
    let ready = vitals::Readiness::default();
    let vitals_router = vitals::instrument(vitals::router("crawler", ready.clone()), &[]);
    // Series the operators' checks look for exist from the start, at zero.
    metrics::counter!("crawler_fetches_total", "outcome" => "page").increment(0);
    metrics::counter!("crawler_robots_refusals_total").increment(0);
    metrics::counter!("crawler_host_backoffs_total").increment(0);
    let vitals_stop = shutdown.clone();
    let vitals_task = tokio::spawn(async move {
        let _ = axum::serve(listener, vitals_router)
            .with_graceful_shutdown(async move { vitals_stop.cancelled().await })
            .await;
    });
    let (apis_tx, apis) = tokio::sync::watch::channel(state.apis);
    crate::live_apis::follow(ctx.registry(), apis_tx, shutdown.clone());
    let fetcher = Arc::new(fetcher(state.fetch, &ctx, apis.clone(), state.lease)?);
    let gauges = Arc::new(WorkerGauges::default());
    // Results go to the apis signed; a job's reply_to is trusted only when the registry lists
    // it (when this cell follows health checkers).
    let ingest = Arc::new(IngestSender::new(
        state.key,
        ctx.cell_id().to_string(),
        ctx.in_organism(),
    ));
    let queue_for_depth = queue.clone();
    let worker = Worker {
        cfg: state.worker.clone(),
        fetcher,
        queue,
        apis,
        // Twice the host's requests in flight: a request's page is parsed after its turn at the
        // host ends, and the next request waits for a lane meanwhile, ready when its tick comes.
        // The gate still caps the requests in flight.
        per_host_concurrency: 2 * per_host,
        max_deliveries: state.max_deliveries,
        lease: state.lease,
        gauges: gauges.clone(),
        ingest,
    };
    ready.set(true);
    let worker_cfg = state.worker;
    let held = state.held_pressure;
    measure_backlog(&ctx, queue_for_depth, gauges.clone(), shutdown.clone());
    crate::machine::measure(gauges.clone(), state.shares_machine, shutdown.clone());
    // Beside the pressure, the time this cell spends parsing per KiB: its own processing time,
    // which the controller watches for fatigue.
    let meter = worker.fetcher.parse_meter();
    let tired = ctx.clone();
    ctx.report_pressure(move || {
        let (pressure, mut signals) = gauges.signals(&worker_cfg, held);
        if let Some(per_kib) = meter.take() {
            tired.report_processing(per_kib);
            signals.push(("parse_us_per_kib", per_kib));
        }
        (pressure, signals)
    });
    tracing::info!(addr = %ctx.addr(), cell_id = %ctx.cell_id(), "crawler cell working");
    worker.run(shutdown).await;
    ready.set(false);
    vitals_task.abort();
    Ok(())
}

/// Every second, the queue's ready jobs per live crawler (the registry's count; 1 alone), for
/// the pressure: a backlog the crawlers cannot drain soon is what makes the role divide.
fn measure_backlog(
    ctx: &CellContext,
    queue: Arc<dyn engines::JobQueue>,
    gauges: Arc<WorkerGauges>,
    shutdown: CancellationToken,
) {
    let registry = ctx.in_organism().then(|| ctx.registry());
    tokio::spawn(async move {
        loop {
            if let Ok(depth) = queue.depth().await {
                metrics::gauge!("queue_jobs", "state" => "ready").set(depth.ready as f64);
                let crawlers = match &registry {
                    Some(r) => r.read().await.ok().map(|cells| {
                        cells
                            .roles
                            .get("crawler")
                            .map(|v| {
                                v.iter()
                                    .filter(|c| c.state != protocol::control::CellState::Draining)
                                    .count()
                            })
                            .unwrap_or(0)
                    }),
                    None => Some(1),
                };
                if let Some(n) = crawlers {
                    let per = depth.ready as usize / n.max(1);
                    gauges
                        .backlog_per_crawler
                        .store(per, std::sync::atomic::Ordering::Relaxed);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    });
}

/// The fetch stack of a crawler cell: in an organism (a signed client and apis), per-host
/// politeness is the host ledger's, through the apis, whatever the number of crawlers; alone,
/// it is this process's own.
fn fetcher(
    fetch: FetchConfig,
    ctx: &CellContext,
    apis: tokio::sync::watch::Receiver<Vec<String>>,
    lease: Duration,
) -> Result<Fetcher, FetcherError> {
    // A job waits for its host at most a quarter of its lease (and a minute).
    let horizon = (lease / 4).min(Duration::from_secs(60));
    let timeout = Duration::from_millis(fetch.total_timeout_ms);
    if horizon + timeout >= lease {
        // Not refused (the job is delivered again, then dead-lettered: nothing is lost), but a
        // slow page would be reported as undelivered instead of timed out.
        tracing::warn!(
            ?lease,
            host_wait = ?horizon,
            ?timeout,
            "a job may wait for its host and then fetch for longer than its lease: a slow page's \
             job may be delivered again while it is fetched; make [queue].lease_secs longer than \
             [crawler.fetch].total_timeout_ms by a third"
        );
    }
    let Some(client) = ctx.client() else {
        tracing::warn!("no health checkers: per-host politeness is this crawler's alone");
        let gate = Politeness::new(
            fetch.per_host_rate,
            fetch.per_host_burst,
            fetch.per_host_concurrency,
        )
        .with_horizon(horizon);
        return Fetcher::with_gate(fetch, Arc::new(gate));
    };
    let limits = LedgerLimits {
        concurrency: fetch.per_host_concurrency,
        horizon,
        hold: Duration::from_millis(fetch.total_timeout_ms) + Duration::from_secs(5),
    };
    let gate = LedgerGate::new(apis, client, limits);
    Fetcher::with_gate(fetch, Arc::new(gate))
}
