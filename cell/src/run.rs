//! `cell run ROLE`: one role in this process, until SIGTERM/SIGINT (or, when supervised, until
//! the supervisor's pipe closes), then a drain bounded by a grace period.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vitals::ReadyLine;

use crate::engines_setup::{open_queue, open_store_and_keys};

#[derive(Args)]
pub struct RunArgs {
    /// The role: api or crawler.
    role: String,
    /// The organism's configuration file (default: the embedded one).
    #[arg(long)]
    infra: Option<PathBuf>,
    /// Listen address (api: overrides `api.listen`; crawler: its vitals endpoint).
    #[arg(long)]
    listen: Option<String>,
    /// Crawler: API base URLs to send results to when a job's own API does not answer.
    #[arg(long = "api")]
    apis: Vec<String>,
    /// Exit when standard input closes (set by the local provider).
    #[arg(long)]
    supervised: bool,
    /// How long a drain may take before the cell exits anyway, seconds.
    #[arg(long, default_value_t = 20)]
    grace_secs: u64,
    /// This cell's id (given by the factory; default: role-pid).
    #[arg(long)]
    cell_id: Option<String>,
    /// The cell this one replaces or divided from.
    #[arg(long)]
    parent: Option<String>,
    /// Health checkers to send heartbeats to (base URLs). None: no heartbeats.
    #[arg(long = "healthchecker")]
    healthcheckers: Vec<String>,
    /// Factories (base URLs), for roles that ask for cells.
    #[arg(long = "factory")]
    factories: Vec<String>,
    /// Heartbeat interval, milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Factory: a role whose cells listen on fixed addresses, as ROLE=ADDR,ADDR.
    #[arg(long = "fixed")]
    fixed: Vec<String>,
}

/// The cell's identity and its line to the health checkers.
pub(crate) struct Life {
    pub cell_id: String,
    pub vital: tokio::sync::watch::Sender<control::heartbeat::Vital>,
    /// Signed messages to other cells (present when the organism has health checkers).
    pub client: Option<Arc<control::ControlClient>>,
    /// What the health checkers' answers say of this cell (fenced, asked to retire, in doubt).
    pub standing: control::heartbeat::Standing,
    beats: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Life {
    fn set_state(&self, state: protocol::control::CellState) {
        self.vital.send_modify(|v| v.state = state);
    }

    /// Every heartbeat interval, put the cell's measured pressure and signals into its
    /// heartbeat; the returned receiver follows the pressure.
    fn report_pressure(
        &self,
        args: &RunArgs,
        stop: CancellationToken,
        sample: impl Fn() -> (f64, Vec<(&'static str, f64)>) + Send + 'static,
    ) -> tokio::sync::watch::Receiver<f64> {
        let (tx, rx) = tokio::sync::watch::channel(0.0);
        let vital = self.vital.clone();
        let every = Duration::from_millis(args.heartbeat_ms.max(10));
        tokio::spawn(async move {
            loop {
                let (pressure, signals) = sample();
                vital.send_modify(|v| {
                    v.pressure = pressure;
                    v.signals = signals.iter().map(|(k, x)| (k.to_string(), *x)).collect();
                });
                tx.send_replace(pressure);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
        rx
    }

    /// Say "retired" and stop beating.
    async fn retire(mut self) {
        self.set_state(protocol::control::CellState::Retired);
        if let Some((stop, task)) = self.beats.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

fn cell_id(args: &RunArgs, role: &str) -> String {
    args.cell_id
        .clone()
        .unwrap_or_else(|| format!("{role}-{}", std::process::id()))
}

/// Cluster mode: the organism runs on the cluster engines (PostgreSQL or RabbitMQ), its cells
/// are reachable beyond this machine, and the endpoints that show its topology (`/cells`,
/// `/events`, `/children`) take the read token. On the embedded engines everything is on
/// loopback and they stay open.
fn cluster_mode(cfg: &infra::Config) -> bool {
    !matches!(cfg.database(), infra::EngineUrl::Sqlite(_))
        || !matches!(cfg.queue(), infra::EngineUrl::Sqlite(_))
}

fn start_life(args: &RunArgs, role: &str, addr: std::net::SocketAddr) -> anyhow::Result<Life> {
    let cell_id = cell_id(args, role);
    let (vital, vital_rx) = tokio::sync::watch::channel(control::heartbeat::Vital {
        state: protocol::control::CellState::Serving,
        pressure: 0.0,
        signals: Default::default(),
    });
    let mut life_client = None;
    let interval = Duration::from_millis(args.heartbeat_ms.max(10));
    let standing = control::heartbeat::Standing::new(interval);
    let beats = if args.healthcheckers.is_empty() {
        None
    } else {
        let key = control::ClusterKey::from_env()?;
        let client = Arc::new(control::ControlClient::new(control::Signer::new(
            key,
            cell_id.clone(),
        )));
        life_client = Some(client.clone());
        let stop = CancellationToken::new();
        let task = control::heartbeat::spawn(
            client,
            args.healthcheckers.clone(),
            control::heartbeat::Identity {
                cell_id: cell_id.clone(),
                role: role.to_string(),
                addr: format!("http://{addr}"),
                parent: args.parent.clone(),
            },
            interval,
            vital_rx,
            standing.clone(),
            stop.clone(),
        );
        Some((stop, task))
    };
    Ok(Life {
        cell_id,
        vital,
        client: life_client,
        standing,
        beats,
    })
}

/// On a stop signal, or when a health checker asks this cell to retire: say "draining" first,
/// give the front doors time to route elsewhere, then tell the role to drain. When a health
/// checker says the cell was buried (fenced), the role stops taking work at once, with no notice
/// (it was replaced; nothing routes to it any more): what it is doing finishes within the grace
/// period, so no client request is cut, and a crawler acknowledges nothing (its queue asks the
/// cell's standing), so jobs that moved to another crawler are not touched.
fn drain_after_notice(
    life: &Life,
    signal: CancellationToken,
    notice: Duration,
) -> CancellationToken {
    let role_stop = CancellationToken::new();
    let vital = life.vital.clone();
    let stop = role_stop.clone();
    let has_beats = life.beats.is_some();
    let standing = life.standing.clone();
    tokio::spawn(async move {
        let fenced_now = tokio::select! {
            _ = signal.cancelled() => false,
            _ = standing.retire_requested().cancelled() => {
                tracing::info!(reason = ?standing.reason(), "retiring on a health checker's request");
                false
            }
            _ = standing.fenced().cancelled() => true,
        };
        vital.send_modify(|v| v.state = protocol::control::CellState::Draining);
        if fenced_now {
            tracing::error!(
                reason = ?standing.reason(),
                "fenced: the registry declared this cell dead and replaced it; stopping now"
            );
            stop.cancel();
            return;
        }
        if has_beats {
            tokio::select! {
                _ = tokio::time::sleep(notice) => {}
                _ = standing.fenced().cancelled() => {
                    tracing::error!(reason = ?standing.reason(), "fenced while draining; stopping now");
                }
            }
        }
        stop.cancel();
    });
    role_stop
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = crate::load_config(args.infra.as_ref())?;
    let shutdown = CancellationToken::new();
    crate::cancel_on_signals(shutdown.clone());
    // A cell of an organism ends with it, whoever started the cell.
    if let Some(lease) = factory::lease::OrganismLease::from_env()? {
        lease.watch(shutdown.clone());
    }
    if args.supervised {
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            // EOF (or an error) means the supervisor is gone.
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            tracing::info!("supervisor gone: draining");
            token.cancel();
        });
    }
    let grace = Duration::from_secs(args.grace_secs);
    match args.role.as_str() {
        "api" => run_api(&cfg, &args, shutdown, grace).await,
        "crawler" => run_crawler(&cfg, &args, shutdown, grace).await,
        "factory" => run_factory(&cfg, &args, shutdown, grace).await,
        "healthchecker" => run_healthchecker(&cfg, &args, shutdown, grace).await,
        "frontdoor" => run_frontdoor(&cfg, &args, shutdown, grace).await,
        other => anyhow::bail!(
            "unknown role {other:?}; roles are {}",
            infra::ROLES.join(", ")
        ),
    }
}

fn announce(role: &str, addr: std::net::SocketAddr) {
    println!(
        "{}",
        ReadyLine {
            role: role.to_string(),
            addr: addr.to_string(),
            pid: std::process::id(),
        }
        .render()
    );
}

async fn bounded_drain(
    shutdown: &CancellationToken,
    grace: Duration,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, work).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(?grace, "drain did not finish in time; exiting");
            Ok(())
        }
    }
}

async fn run_api(
    cfg: &infra::Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| cfg.raw.api.listen.clone());
    let (store, keys) = open_store_and_keys(cfg).await?;
    let queue = open_queue(cfg).await?;
    // Ingest takes only batches signed with the cluster key; the verifier exists before the
    // listener, so nothing sealed before this cell started is accepted.
    let key = control::ClusterKey::from_env()?;
    let verifier = Arc::new(control::Verifier::new(key, Duration::from_secs(30)));
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the api to {listen}"))?;
    let addr = listener.local_addr()?;
    let advertise = format!("http://{addr}");
    verifier.answer_to([&advertise]);
    let mut state = api::AppState::new(cfg.raw.api.clone(), store, keys, queue, verifier);
    let life = start_life(args, "api", addr)?;
    // Crawlers' permit requests are signed with the cluster key, like their results, but by
    // another signer of the same cell (its own sequence numbers): a verifier of their own.
    let permits = control::Verifier::new(control::ClusterKey::from_env()?, Duration::from_secs(30));
    permits.answer_to([&advertise]);
    state.permits_verifier = Some(Arc::new(permits));
    let load = state.load.clone();
    let api_cfg = cfg.raw.api.clone();
    let pressure = life.report_pressure(args, shutdown.clone(), move || load.signals(&api_cfg));
    if let Some(client) = life.client.clone() {
        let weights = WeightSender {
            client,
            cell_id: life.cell_id.clone(),
            healthcheckers: args.healthcheckers.clone(),
            sent: 1.0,
            last_sent: None,
        };
        tokio::spawn(weights.run(pressure, shutdown.clone()));
    }
    let stop = drain_after_notice(&life, shutdown, notice(args));
    tracing::info!(%advertise, cell_id = %life.cell_id, "api cell serving");
    announce("api", addr);
    let result = bounded_drain(
        &stop,
        grace,
        api::run(state, listener, advertise, stop.clone()),
    )
    .await;
    life.retire().await;
    result
}

/// How long a draining cell keeps serving so that front doors notice it is draining.
fn notice(args: &RunArgs) -> Duration {
    Duration::from_millis(3 * args.heartbeat_ms.max(10) + 300)
}

/// Keep `tx` current with the api cells the health checkers list.
fn watch_apis(
    healthcheckers: Vec<String>,
    tx: tokio::sync::watch::Sender<Vec<String>>,
    stop: CancellationToken,
) {
    if healthcheckers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let client = crate::registry::client();
        loop {
            if let Some(cells) = crate::registry::read(&client, &healthcheckers).await {
                let apis = crate::registry::addrs(&cells, "api");
                if !apis.is_empty() {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != apis;
                        if changed {
                            cur.clone_from(&apis);
                        }
                        changed
                    });
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
}

async fn run_crawler(
    cfg: &infra::Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let fetch = cfg.raw.crawler.fetch.clone();
    let per_host = fetch.per_host_concurrency as usize;
    let lease = Duration::from_secs(cfg.raw.queue.lease_secs);
    let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the crawler's vitals to {listen}"))?;
    let addr = listener.local_addr()?;
    let life = start_life(args, "crawler", addr)?;
    let queue = crate::fence::FencedQueue::wrap(open_queue(cfg).await?, life.standing.clone());
    let ready = vitals::Readiness::default();
    let vitals_router = vitals::router("crawler", ready.clone());
    let vitals_stop = shutdown.clone();
    let vitals_task = tokio::spawn(async move {
        let _ = axum::serve(listener, vitals_router)
            .with_graceful_shutdown(async move { vitals_stop.cancelled().await })
            .await;
    });
    let (apis_tx, apis) = tokio::sync::watch::channel(args.apis.clone());
    watch_apis(args.healthcheckers.clone(), apis_tx, shutdown.clone());
    let fetcher = Arc::new(crawler_fetcher(
        fetch,
        life.client.clone(),
        apis.clone(),
        lease,
    )?);
    let gauges = Arc::new(crawler::WorkerGauges::default());
    // Results go to the apis signed; a job's reply_to is trusted only when the registry lists
    // it (when this cell follows health checkers).
    let ingest = Arc::new(crawler::worker::IngestSender::new(
        control::ClusterKey::from_env()?,
        cell_id(args, "crawler"),
        !args.healthcheckers.is_empty(),
    ));
    let worker = crawler::Worker {
        cfg: cfg.raw.crawler.worker.clone(),
        fetcher,
        queue,
        apis,
        per_host_concurrency: per_host,
        max_deliveries: cfg.raw.queue.max_deliveries,
        lease,
        gauges: gauges.clone(),
        ingest,
    };
    ready.set(true);
    let worker_cfg = cfg.raw.crawler.worker.clone();
    life.report_pressure(args, shutdown.clone(), move || gauges.signals(&worker_cfg));
    let stop = drain_after_notice(&life, shutdown, Duration::ZERO);
    tracing::info!(%addr, cell_id = %life.cell_id, "crawler cell working");
    announce("crawler", addr);
    let result = bounded_drain(&stop, grace, worker.run(stop.clone())).await;
    ready.set(false);
    life.retire().await;
    vitals_task.abort();
    result
}

/// The fetch stack of a crawler cell: in an organism (a cluster key and apis), per-host
/// politeness is the host ledger's, through the apis, whatever the number of crawlers; alone,
/// it is this process's own.
fn crawler_fetcher(
    fetch: crawler::FetchConfig,
    client: Option<Arc<control::ControlClient>>,
    apis: tokio::sync::watch::Receiver<Vec<String>>,
    lease: Duration,
) -> anyhow::Result<crawler::Fetcher> {
    // A job waits for its host at most a quarter of its lease (and a minute).
    let horizon = (lease / 4).min(Duration::from_secs(60));
    let Some(client) = client else {
        tracing::warn!("no health checkers: per-host politeness is this crawler's alone");
        let gate = crawler::Politeness::new(
            fetch.per_host_rate,
            fetch.per_host_burst,
            fetch.per_host_concurrency,
        )
        .with_horizon(horizon);
        return crawler::Fetcher::with_gate(fetch, Arc::new(gate)).context("building the fetcher");
    };
    let limits = crawler::LedgerLimits {
        concurrency: fetch.per_host_concurrency,
        horizon,
        hold: Duration::from_millis(fetch.total_timeout_ms) + Duration::from_secs(5),
    };
    let gate = crawler::LedgerGate::new(apis, client, limits);
    crawler::Fetcher::with_gate(fetch, Arc::new(gate)).context("building the fetcher")
}

async fn run_factory(
    cfg: &infra::Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let key = control::ClusterKey::from_env()?;
    let verifier = control::Verifier::new(key, Duration::from_secs(30));
    verifier.guard_reads(cluster_mode(cfg));
    let mut fixed = std::collections::BTreeMap::new();
    for spec in &args.fixed {
        let (role, addrs) = spec
            .split_once('=')
            .with_context(|| format!("--fixed {spec:?}: expected ROLE=ADDR,ADDR"))?;
        fixed.insert(
            role.to_string(),
            addrs.split(',').map(str::to_string).collect::<Vec<_>>(),
        );
    }
    let mut cell_args = Vec::new();
    if let Some(infra) = &args.infra {
        cell_args.push("--infra".to_string());
        cell_args.push(infra.to_string_lossy().to_string());
    }
    for hc in &args.healthcheckers {
        cell_args.push("--healthchecker".into());
        cell_args.push(hc.clone());
    }
    let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the factory to {listen}"))?;
    let addr = listener.local_addr()?;
    verifier.answer_to([format!("http://{addr}")]);
    for f in std::iter::once(format!("http://{addr}")).chain(args.factories.iter().cloned()) {
        cell_args.push("--factory".into());
        cell_args.push(f);
    }
    let provider = factory::local::LocalProvider {
        exe: std::env::current_exe().context("locating the cell executable")?,
        common_args: Vec::new(),
        // Under the factory's key memory, so a start in flight never loses its claim.
        ready_timeout: Duration::from_secs(20),
        tie_to_parent: false,
        env: Vec::new(),
    };
    let life = start_life(args, "factory", addr)?;
    let organism = factory::role::Organism {
        ledger: crate::engines_setup::open_factory_ledger(cfg).await?,
        factory_id: life.cell_id.clone(),
        maxima: cfg.maxima(),
        healthcheckers: args.healthcheckers.clone(),
    };
    let pool_args: Vec<String> = cell_args
        .chunks(2)
        .filter(|pair| pair[0] != "--infra")
        .flatten()
        .cloned()
        .collect();
    let pool = crate::pool_setup::pool_factory(
        cfg,
        life.cell_id.clone(),
        format!("http://{addr}"),
        pool_args,
        args.healthcheckers.clone(),
    )
    .await?;
    let state = factory::role::FactoryState::new(provider, verifier, fixed, cell_args, organism);
    if let Some(pool) = pool {
        pool.watch(Duration::from_secs(1), shutdown.clone());
        let _ = state.pool.set(pool);
    }
    announce("factory", addr);
    let stop = drain_after_notice(&life, shutdown, Duration::ZERO);
    let result = factory::role::run(state, listener, stop, grace).await;
    life.retire().await;
    result
}

async fn run_healthchecker(
    cfg: &infra::Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let key = control::ClusterKey::from_env()?;
    // Keeps every configured role at its minimum (`[roles.*].min`).
    let mut hc = cfg.healthchecker();
    hc.factories.extend(args.factories.iter().cloned());
    let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the healthchecker to {listen}"))?;
    let addr = listener.local_addr()?;
    let life = start_life(args, "healthchecker", addr)?;
    let state = healthchecker::HealthcheckerState::new(hc, key, life.cell_id.clone());
    state.verifier().answer_to([format!("http://{addr}")]);
    state.verifier().guard_reads(cluster_mode(cfg));
    announce("healthchecker", addr);
    let stop = drain_after_notice(&life, shutdown, Duration::ZERO);
    let result = bounded_drain(
        &stop,
        grace,
        healthchecker::run(state, listener, stop.clone()),
    )
    .await;
    life.retire().await;
    result
}

async fn run_frontdoor(
    cfg: &infra::Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let key = control::ClusterKey::from_env()?;
    let mut fd = cfg.raw.frontdoor.clone();
    fd.healthcheckers
        .extend(args.healthcheckers.iter().cloned());
    let listen = args.listen.clone().unwrap_or_else(|| fd.listen.clone());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the frontdoor to {listen}"))?;
    let addr = listener.local_addr()?;
    let verifier = Arc::new(control::Verifier::new(key, Duration::from_secs(30)));
    verifier.answer_to([format!("http://{addr}")]);
    let state = frontdoor::AppState::new(fd, verifier)?;
    let life = start_life(args, "frontdoor", addr)?;
    announce("frontdoor", addr);
    let stop = drain_after_notice(&life, shutdown, notice(args));
    let result = bounded_drain(&stop, grace, frontdoor::run(state, listener, stop.clone())).await;
    life.retire().await;
    result
}

/// An overloaded api asks the front doors for a smaller share of traffic, and for its full share
/// back when the load passes. Weight = 1/pressure above pressure 1 (floor 0.1), else 1. A request
/// is sent when the weight moves by more than 0.1, at most once a second.
struct WeightSender {
    client: Arc<control::ControlClient>,
    cell_id: String,
    healthcheckers: Vec<String>,
    sent: f64,
    last_sent: Option<tokio::time::Instant>,
}

impl WeightSender {
    fn weight_for(pressure: f64) -> f64 {
        if pressure > 1.0 {
            (1.0 / pressure).max(0.1)
        } else {
            1.0
        }
    }

    /// Follow the pressure until `stop`.
    async fn run(
        mut self,
        mut pressure: tokio::sync::watch::Receiver<f64>,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = pressure.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let p = *pressure.borrow_and_update();
            self.update(p).await;
        }
    }

    async fn update(&mut self, pressure: f64) {
        let weight = Self::weight_for(pressure);
        if (weight - self.sent).abs() <= 0.1 && !(weight == 1.0 && self.sent < 1.0) {
            return;
        }
        if self
            .last_sent
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_sent = Some(tokio::time::Instant::now());
        let client = crate::registry::client();
        let Some(cells) = crate::registry::read(&client, &self.healthcheckers).await else {
            return;
        };
        let frontdoors = crate::registry::addrs(&cells, "frontdoor");
        let request = protocol::control::WeightRequest {
            cell_id: self.cell_id.clone(),
            weight,
            reason: format!("pressure {pressure:.2}"),
        };
        let mut delivered = false;
        for fd in frontdoors {
            let sent: anyhow::Result<serde_json::Value> = self
                .client
                .send(
                    &fd,
                    "/control/weight",
                    protocol::control::WeightRequest::KIND,
                    &request,
                )
                .await;
            match sent {
                Ok(_) => delivered = true,
                Err(e) => tracing::debug!(error = %e, "weight request not delivered"),
            }
        }
        if delivered {
            tracing::info!(weight, pressure, "asked the front doors for a new weight");
            self.sent = weight;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WeightSender;

    #[test]
    fn weight_follows_pressure_above_capacity_only() {
        assert_eq!(WeightSender::weight_for(0.0), 1.0);
        assert_eq!(WeightSender::weight_for(1.0), 1.0);
        assert!((WeightSender::weight_for(2.0) - 0.5).abs() < 1e-9);
        assert_eq!(WeightSender::weight_for(100.0), 0.1);
    }
}
