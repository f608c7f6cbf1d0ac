//! Each role's state, assembled from the organism's configuration, the engines it names and the
//! cell's arguments: the wiring a binary does, kept apart from the table in [`crate::run`]. No
//! policy here: what a role does with its state is in its crate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lifecycle::CellSpec;

use crate::engines_setup::{open_factory_ledger, open_queue, open_store_and_keys};
use crate::run::RunArgs;

/// How long a signed message stays acceptable.
const WINDOW: Duration = Duration::from_secs(30);

/// Cluster mode: the organism runs on the cluster engines (PostgreSQL or RabbitMQ), its cells
/// are reachable beyond this machine, and the endpoints that show its topology (`/cells`,
/// `/events`, `/children`) take the read token. On the embedded engines everything is on
/// loopback and they stay open.
fn cluster_mode(cfg: &infra::Config) -> bool {
    !matches!(cfg.database(), infra::EngineUrl::Sqlite(_))
        || !matches!(cfg.queue(), infra::EngineUrl::Sqlite(_))
}

/// The api's verifiers, created before its listener is bound: nothing sealed before the cell
/// started is accepted.
pub struct ApiVerifiers {
    /// Opens the crawlers' ingest batches.
    ingest: Arc<control::Verifier>,
    /// Opens the crawlers' permit requests: signed by another signer of the same crawler (its
    /// own sequence numbers), so a verifier of their own.
    permits: control::Verifier,
}

impl ApiVerifiers {
    pub fn new(key: &control::ClusterKey) -> Self {
        Self {
            ingest: Arc::new(control::Verifier::new(key.clone(), WINDOW)),
            permits: control::Verifier::new(key.clone(), WINDOW),
        }
    }
}

pub async fn api(
    cfg: &infra::Config,
    verifiers: ApiVerifiers,
    addr: SocketAddr,
) -> anyhow::Result<api::AppState> {
    let (store, keys) = open_store_and_keys(cfg).await?;
    let queue = open_queue(cfg).await?;
    let advertise = format!("http://{addr}");
    verifiers.ingest.answer_to([&advertise]);
    verifiers.permits.answer_to([&advertise]);
    let mut state = api::AppState::new(cfg.raw.api.clone(), store, keys, queue, verifiers.ingest);
    state.permits_verifier = Some(Arc::new(verifiers.permits));
    Ok(state)
}

pub async fn crawler(
    cfg: &infra::Config,
    args: &RunArgs,
    key: control::ClusterKey,
) -> anyhow::Result<crawler::CrawlerState> {
    Ok(crawler::CrawlerState {
        fetch: cfg.raw.crawler.fetch.clone(),
        worker: cfg.raw.crawler.worker.clone(),
        queue: open_queue(cfg).await?,
        lease: Duration::from_secs(cfg.raw.queue.lease_secs),
        max_deliveries: cfg.raw.queue.max_deliveries,
        apis: args.apis.clone(),
        key,
        // New crawlers start on this machine unless a pool serves the role.
        shares_machine: cfg.raw.pool.file.is_empty()
            || !cfg.raw.pool.roles.iter().any(|r| r == "crawler"),
        held_pressure: cfg.raw.homeostasis.target,
    })
}

pub async fn factory(
    cfg: &infra::Config,
    args: &RunArgs,
    spec: &CellSpec,
    key: &control::ClusterKey,
    addr: SocketAddr,
) -> anyhow::Result<Arc<factory::role::FactoryState>> {
    let verifier = control::Verifier::new(key.clone(), WINDOW);
    verifier.guard_reads(cluster_mode(cfg));
    let mut fixed = BTreeMap::new();
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
        // The release a live upgrade installed, for every cell this factory starts.
        release_file: Some(
            cfg.raw
                .organism
                .data_dir
                .join(factory::upgrade::RELEASE_FILE),
        ),
    };
    let organism = factory::role::Organism {
        ledger: open_factory_ledger(cfg).await?,
        factory_id: spec.cell_id.clone(),
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
        spec.cell_id.clone(),
        format!("http://{addr}"),
        pool_args,
        args.healthcheckers.clone(),
    )
    .await?;
    let state = factory::role::FactoryState::new(provider, verifier, fixed, cell_args, organism);
    if let Some(pool) = pool {
        let _ = state.pool.set(pool);
    }
    Ok(state)
}

pub fn healthchecker(
    cfg: &infra::Config,
    args: &RunArgs,
    spec: &CellSpec,
    key: &control::ClusterKey,
    addr: SocketAddr,
) -> healthchecker::HealthcheckerState {
    // Keeps every configured role at its minimum (`[roles.*].min`).
    let mut hc = cfg.healthchecker();
    hc.factories.extend(args.factories.iter().cloned());
    let state = healthchecker::HealthcheckerState::new(hc, key.clone(), spec.cell_id.clone());
    state.verifier().answer_to([format!("http://{addr}")]);
    state.verifier().guard_reads(cluster_mode(cfg));
    state
}

pub fn frontdoor(
    cfg: &infra::Config,
    args: &RunArgs,
    key: &control::ClusterKey,
    addr: SocketAddr,
) -> anyhow::Result<frontdoor::AppState> {
    let mut fd = cfg.raw.frontdoor.clone();
    fd.healthcheckers
        .extend(args.healthcheckers.iter().cloned());
    let verifier = Arc::new(control::Verifier::new(key.clone(), WINDOW));
    verifier.answer_to([format!("http://{addr}")]);
    Ok(frontdoor::AppState::new(fd, verifier)?)
}
