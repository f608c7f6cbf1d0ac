//! `cell upgrade --to PATH_OR_VERSION`: ask the organism `cell up` started here to replace its
//! cells, one by one, with a new build (`factory::upgrade` does the work), and follow it until
//! every cell runs the new build or the organism has rolled back to the old one.
//!
//! The request is a signed control message, so this needs the organism's cluster key in the
//! environment (`HOMEOSTAT_CLUSTER_KEY[_FILE]`, as `cell up` was given it).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use control::{ClusterKey, ControlClient, Signer};
use protocol::control::{UpgradePhase, UpgradeRequest, UpgradeStatus};

use crate::up::{OrganismFile, ORGANISM_FILE};

#[derive(Args)]
pub struct UpgradeArgs {
    /// The new executable: a path on this machine, or a version name found at
    /// DATA_DIR/releases/VERSION/cell.
    #[arg(long)]
    to: String,
    /// The organism's configuration file (default: the embedded one).
    #[arg(long)]
    infra: Option<PathBuf>,
    /// The data directory `cell up` used (overrides organism.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seconds a new cell has to become ready before its start counts as failed.
    #[arg(long, default_value_t = 30)]
    ready_secs: u64,
    /// Failed starts of the new build before the organism rolls back to the old one.
    #[arg(long, default_value_t = 2)]
    failures: u32,
    /// Ask, print the first status and return without following the upgrade.
    #[arg(long)]
    no_wait: bool,
    /// Give up following after this many seconds (the upgrade goes on).
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
}

pub async fn upgrade(args: UpgradeArgs) -> anyhow::Result<()> {
    let cfg = crate::load_config(args.infra.as_ref())?;
    let dir = args.data_dir.unwrap_or(cfg.raw.organism.data_dir);
    let path = dir.join(ORGANISM_FILE);
    let organism: OrganismFile =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| {
            format!(
                "reading {}: is an organism running here (`cell up`)?",
                path.display()
            )
        })?)
        .with_context(|| format!("reading {}", path.display()))?;
    let key = ClusterKey::from_env()
        .context("an upgrade is a signed control message: give the organism's cluster key")?;
    // A path is sent as an absolute one: the factories may not share this directory.
    let to = match std::fs::canonicalize(&args.to) {
        Ok(p) if p.is_file() => p.to_string_lossy().to_string(),
        _ => args.to.clone(),
    };
    let request = UpgradeRequest {
        to,
        ready_secs: Some(args.ready_secs),
        failures_before_rollback: Some(args.failures),
    };
    let client = ControlClient::new(Signer::new(key.clone(), "cell-upgrade"));
    let mut first = None;
    let mut errors = Vec::new();
    for factory in &organism.factories {
        match client.ask(factory, &request).await {
            Ok(status) => {
                first = Some(status);
                break;
            }
            Err(e) => errors.push(format!("{factory}: {e:#}")),
        }
    }
    let Some(status) = first else {
        anyhow::bail!("no factory took the upgrade: {}", errors.join("; "));
    };
    println!("upgrading to {}", status.to);
    if args.no_wait {
        return Ok(());
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let auth = key.read_authorization();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut printed = 0;
    loop {
        if let Some(status) = read_status(&http, &organism.factories, &auth).await {
            for line in status.log.iter().skip(printed) {
                println!("  {line}");
            }
            printed = printed.max(status.log.len());
            if status.phase.finished() {
                return finish(&status);
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the upgrade had not finished after {} s", args.timeout_secs);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn read_status(
    http: &reqwest::Client,
    factories: &[String],
    auth: &str,
) -> Option<UpgradeStatus> {
    for f in factories {
        let url = format!("{f}/upgrade");
        if let Ok(s) =
            protocol::client::get_versioned::<UpgradeStatus>(http, &url, Some(auth), None).await
        {
            return Some(s);
        }
    }
    None
}

fn finish(status: &UpgradeStatus) -> anyhow::Result<()> {
    match status.phase {
        UpgradePhase::Done => {
            println!("every cell runs {}", status.to);
            Ok(())
        }
        UpgradePhase::RolledBack => anyhow::bail!(
            "the upgrade to {} failed and the organism runs {} again: {}",
            status.to,
            status.from,
            status.reason.as_deref().unwrap_or("?")
        ),
        _ => anyhow::bail!(
            "the upgrade to {} failed: {}",
            status.to,
            status.reason.as_deref().unwrap_or("?")
        ),
    }
}
