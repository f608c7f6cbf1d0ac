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

use crate::engines_setup::{open_queue, open_store};

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
    /// Crawler: how many crawler cells share the per-host politeness limits.
    #[arg(long, default_value_t = 1)]
    crawler_share: u32,
    /// Exit when standard input closes (set by the local provider).
    #[arg(long)]
    supervised: bool,
    /// How long a drain may take before the cell exits anyway, seconds.
    #[arg(long, default_value_t = 20)]
    grace_secs: u64,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cfg = crate::load_config(args.infra.as_ref())?;
    let shutdown = CancellationToken::new();
    crate::cancel_on_signals(shutdown.clone());
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
        other if infra::ROLES.contains(&other) => anyhow::bail!(
            "role {other:?} is not built yet; this build runs the api and crawler roles"
        ),
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
    let store = open_store(cfg).await?;
    let queue = open_queue(cfg).await?;
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the api to {listen}"))?;
    let addr = listener.local_addr()?;
    let advertise = format!("http://{addr}");
    let state = api::AppState::new(cfg.raw.api.clone(), store, queue);
    tracing::info!(%advertise, "api cell serving");
    announce("api", addr);
    bounded_drain(
        &shutdown,
        grace,
        api::run(state, listener, advertise, shutdown.clone()),
    )
    .await
}

async fn run_crawler(
    cfg: &infra::Config,
    args: &RunArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let share = args.crawler_share.max(1);
    let mut fetch = cfg.raw.crawler.fetch.clone();
    // The configured per-host limits are the organism's; each crawler cell takes its share.
    fetch.per_host_rate /= f64::from(share);
    fetch.per_host_concurrency = fetch.per_host_concurrency.div_ceil(share).max(1);
    let per_host = fetch.per_host_concurrency as usize;
    let fetcher = Arc::new(crawler::Fetcher::new(fetch).context("building the fetcher")?);
    let queue = open_queue(cfg).await?;
    let listen = args.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding the crawler's vitals to {listen}"))?;
    let addr = listener.local_addr()?;
    let ready = vitals::Readiness::default();
    let vitals_router = vitals::router("crawler", ready.clone());
    let vitals_stop = shutdown.clone();
    let vitals_task = tokio::spawn(async move {
        let _ = axum::serve(listener, vitals_router)
            .with_graceful_shutdown(async move { vitals_stop.cancelled().await })
            .await;
    });
    let worker = crawler::Worker {
        cfg: cfg.raw.crawler.worker.clone(),
        fetcher,
        queue,
        apis: args.apis.clone(),
        per_host_concurrency: per_host,
        max_deliveries: cfg.raw.queue.max_deliveries,
    };
    ready.set(true);
    tracing::info!(%addr, share, "crawler cell working");
    announce("crawler", addr);
    let result = bounded_drain(&shutdown, grace, worker.run(shutdown.clone())).await;
    ready.set(false);
    vitals_task.abort();
    result
}
