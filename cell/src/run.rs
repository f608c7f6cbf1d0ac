//! `cell run ROLE`: one role in this process, until SIGTERM/SIGINT (or, when supervised, until
//! the supervisor's pipe closes), then a drain bounded by a grace period.
//!
//! This is a table from role name to that role's `run`: each row binds the role's listener,
//! begins the cell's life (`lifecycle`: heartbeats, standing, pressure, drain notice, ready
//! line), assembles the role's state from the configuration ([`crate::assemble`]) and lives the
//! role under its drain rules. Policy lives in the role crates, the cell's life in `lifecycle`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use lifecycle::{CellSpec, Drain, Lifecycle};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::assemble;

#[derive(Args)]
pub struct RunArgs {
    /// The role: api, crawler, factory, healthchecker or frontdoor.
    role: String,
    /// The organism's configuration file (default: the embedded one).
    #[arg(long)]
    pub infra: Option<PathBuf>,
    /// Listen address (api: overrides `api.listen`; crawler: its vitals endpoint).
    #[arg(long)]
    listen: Option<String>,
    /// Crawler: API base URLs to send results to when a job's own API does not answer.
    #[arg(long = "api")]
    pub apis: Vec<String>,
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
    pub healthcheckers: Vec<String>,
    /// Factories (base URLs), for roles that ask for cells.
    #[arg(long = "factory")]
    pub factories: Vec<String>,
    /// Heartbeat interval, milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Factory: a role whose cells listen on fixed addresses, as ROLE=ADDR,ADDR.
    #[arg(long = "fixed")]
    pub fixed: Vec<String>,
    /// Front door, health checker: when the listen address is taken, take its listening
    /// socket over from the cell that offers it (a live upgrade's successor). Without it a
    /// taken address is an error, as two cells given one address must not share it.
    #[arg(long)]
    take_over: bool,
}

impl RunArgs {
    fn spec(&self, role: &str, cfg: &infra::Config) -> CellSpec {
        CellSpec {
            role: role.to_string(),
            cell_id: self
                .cell_id
                .clone()
                .unwrap_or_else(|| format!("{role}-{}", std::process::id())),
            parent: self.parent.clone(),
            healthcheckers: self.healthcheckers.clone(),
            factories: self.factories.clone(),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            grace: Duration::from_secs(self.grace_secs),
            homeostasis: homeostasis(role, cfg),
        }
    }
}

/// The controller's settings for a cell of `role`, when its role regulates itself.
fn homeostasis(role: &str, cfg: &infra::Config) -> Option<lifecycle::regulate::Homeostasis> {
    use lifecycle::homeostasis::{Bounds, FatigueParams, Params};
    let h = &cfg.raw.homeostasis;
    if !h.roles.iter().any(|r| r == role) {
        return None;
    }
    let secs = Duration::from_secs_f64;
    let bounds = cfg.bounds(role);
    let f = &h.fatigue;
    let fatigue = f.roles.iter().any(|r| r == role).then(|| FatigueParams {
        ratio: f.ratio,
        window: secs(f.window_secs),
        replace_after: secs(f.replace_after_secs),
        ..FatigueParams::default()
    });
    Some(lifecycle::regulate::Homeostasis {
        params: Params {
            high: h.high,
            low: h.low,
            target: h.target,
            grow_confirm: secs(h.grow_confirm_secs),
            shrink_confirm: secs(h.shrink_confirm_secs),
            grow_cooldown: secs(h.grow_cooldown_secs),
            shrink_cooldown: secs(h.shrink_cooldown_secs),
            shrink_after_grow: secs(h.shrink_after_grow_secs),
            grow_step: h.grow_step,
            // Only an api has optional work to shed (link expansion).
            throttle_first: h.throttle_first && role == "api",
            fatigue,
            ..Params::default()
        },
        bounds: Bounds {
            min: bounds.min,
            max: bounds.max,
        },
    })
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
        exit_with_supervisor(shutdown.clone());
    }
    // Whatever the role is doing when the cell is told to stop (assembling its state included:
    // a broker that accepts connections and never answers would hold it there), the cell is
    // gone within its grace period and a margin: a cell never outlives its organism.
    let backstop = Duration::from_secs(args.grace_secs) + STOP_MARGIN;
    let role = live_role(args, cfg, shutdown.clone());
    tokio::pin!(role);
    tokio::select! {
        lived = &mut role => lived,
        _ = shutdown.cancelled() => match tokio::time::timeout(backstop, role).await {
            Ok(lived) => lived,
            Err(_) => anyhow::bail!("the cell did not stop within {backstop:?} of being told to"),
        },
    }
}

/// What a cell's drain may take beyond its grace period before the cell exits regardless.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Assemble the role's state and live it until `shutdown` (and its drain) ends it.
async fn live_role(
    args: RunArgs,
    cfg: infra::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Every role signs or checks control messages with the organism's key.
    let key = control::ClusterKey::from_env()?;
    let role = args.role.as_str();
    let spec = args.spec(role, &cfg);
    let any_port = "127.0.0.1:0".to_string();
    match role {
        "api" => {
            // Ingest takes only batches signed with the cluster key; the verifiers exist before
            // the listener, so nothing sealed before this cell started is accepted.
            let verifiers = assemble::ApiVerifiers::new(&key);
            let listener = bind(role, args.listen.as_ref().unwrap_or(&cfg.raw.api.listen)).await?;
            let state = assemble::api(&cfg, verifiers, listener.local_addr()?).await?;
            let (life, ctx) = begin(spec, key, &listener)?;
            let run = |stop| api::run(ctx, state, listener, stop);
            life.live(shutdown, Drain::Routed, run).await?;
        }
        "crawler" => {
            let listener = bind(role, args.listen.as_ref().unwrap_or(&any_port)).await?;
            let state = assemble::crawler(&cfg, &args, key.clone()).await?;
            let (life, ctx) = begin(spec, key, &listener)?;
            let run = |stop| crawler::run(ctx, state, listener, stop);
            life.live(shutdown, Drain::Immediate, run).await?;
        }
        "factory" => {
            let listener = bind(role, args.listen.as_ref().unwrap_or(&any_port)).await?;
            let state = assemble::factory(&cfg, &args, &spec, &key, listener.local_addr()?).await?;
            let (life, ctx) = begin(spec, key, &listener)?;
            let run = |stop| factory::role::run(ctx, state, listener, stop);
            life.live(shutdown, Drain::SelfBounded, run).await?;
        }
        "healthchecker" => {
            let listen = args.listen.as_ref().unwrap_or(&any_port);
            let dir = handover_dir(&cfg);
            let listener = crate::handover::bind(role, listen, &dir, args.take_over).await?;
            let state = assemble::healthchecker(&cfg, &args, &spec, &key, listener.local_addr()?);
            let (life, ctx) = begin(spec, key, &listener)?;
            let run = |stop| healthchecker::run(ctx, state, listener, stop);
            life.live(shutdown, Drain::Immediate, run).await?;
        }
        "frontdoor" => {
            let listen = args.listen.as_ref().unwrap_or(&cfg.raw.frontdoor.listen);
            let dir = handover_dir(&cfg);
            let listener = crate::handover::bind(role, listen, &dir, args.take_over).await?;
            let state = assemble::frontdoor(&cfg, &args, &key, listener.local_addr()?)?;
            let (life, ctx) = begin(spec, key, &listener)?;
            let run = |stop| frontdoor::run(ctx, state, listener, stop);
            life.live(shutdown, Drain::Routed, run).await?;
        }
        other => anyhow::bail!(
            "unknown role {other:?}; roles are {}",
            infra::ROLES.join(", ")
        ),
    }
    Ok(())
}

/// Where cells of fixed-address roles offer their listening sockets to a successor.
fn handover_dir(cfg: &infra::Config) -> PathBuf {
    cfg.raw.organism.data_dir.join("handover")
}

async fn bind(role: &str, listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the {role} to {listen}"))
}

/// Begin the cell's life on `listener`'s address: its heartbeats start.
fn begin(
    spec: CellSpec,
    key: control::ClusterKey,
    listener: &TcpListener,
) -> anyhow::Result<(Lifecycle, lifecycle::CellContext)> {
    let life = Lifecycle::begin(spec, Some(key), listener.local_addr()?)?;
    let ctx = life.context();
    Ok((life, ctx))
}

/// Drain when standard input closes: the supervisor that started this cell is gone.
fn exit_with_supervisor(shutdown: CancellationToken) {
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
        shutdown.cancel();
    });
}
