//! `cell status`: the organism `cell up` started here: its live cells from the registry, and the
//! crawl's totals.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::up::{OrganismFile, ORGANISM_FILE};

#[derive(Args)]
pub struct StatusArgs {
    /// The organism's configuration file (default: the embedded one).
    #[arg(long)]
    infra: Option<PathBuf>,
    /// The data directory `cell up` used (overrides organism.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let cfg = crate::load_config(args.infra.as_ref())?;
    let dir = args.data_dir.unwrap_or(cfg.raw.organism.data_dir);
    let path = dir.join(ORGANISM_FILE);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: is an organism running here (`cell up`)?",
            path.display()
        )
    })?;
    let organism: OrganismFile =
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
    // In cluster mode the registry answers only with the read token (from the cluster key in
    // the environment, as every cell of the organism has it).
    let registry = protocol::client::CellsClient::new(
        organism.healthcheckers.clone(),
        control::ClusterKey::from_env()
            .ok()
            .map(|key| key.read_authorization()),
    )
    .with_timeout(Duration::from_secs(2));
    let view = registry
        .read()
        .await
        .context("no health checker answers: is the organism running?")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    println!(
        "{:<28} {:<14} {:>8} {:<24} {:<11} {:>8} {:>9}  {:<20} WIRE",
        "CELL", "ROLE", "PID", "ADDRESS", "STATE", "PRESSURE", "AGE", "BUILD"
    );
    for (role, cells) in &view.roles {
        for c in cells {
            println!(
                "{:<28} {:<14} {:>8} {:<24} {:<11} {:>8.2} {:>8}s  {:<20} {}",
                c.cell_id,
                role,
                c.pid.map(|p| p.to_string()).unwrap_or_default(),
                c.addr.trim_start_matches("http://"),
                format!("{:?}", c.state).to_lowercase(),
                c.pressure,
                c.age_ms / 1000,
                shown_build(c),
                c.wire
                    .iter()
                    .map(|v| format!("v{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    for front in &organism.frontdoors {
        let url = format!("{front}/stats");
        match protocol::client::get_versioned::<protocol::Stats>(&client, &url, None, None).await {
            Ok(stats) => {
                let f = &stats.frontier;
                println!(
                    "pages indexed {}; frontier pending {}, in flight {}, crawled {}, failed {}",
                    stats.pages_indexed, f.pending, f.in_flight, f.crawled, f.failed
                );
                break;
            }
            Err(e) => tracing::debug!(error = %e, "no stats from this front door"),
        }
    }
    pool_status(&client, &organism.factories).await;
    Ok(())
}

/// A cell's build as `cell status` shows it: version+digest, or its version alone from a cell
/// older than builds in heartbeats, or `?` while the cell is still naming it.
fn shown_build(c: &protocol::control::CellRecord) -> String {
    match (c.build.as_str(), c.version.as_str()) {
        ("", "") => "?".into(),
        ("", version) => version.into(),
        (build, _) => build.into(),
    }
}

/// The server pool and the purse, from the first factory that answers (nothing when the
/// organism has no pool).
async fn pool_status(client: &reqwest::Client, factories: &[String]) {
    for f in factories {
        let Ok(resp) = client.get(format!("{f}/pool")).send().await else {
            continue;
        };
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return;
        }
        let Ok(pool) = resp.json::<serde_json::Value>().await else {
            continue;
        };
        let money = |v: &serde_json::Value| engines::pool::show(v.as_i64().unwrap_or(0));
        let spend = &pool["spend"];
        println!(
            "spend this month {} (committed {} with reserved hours, cap {}); per hour: committed {}, cap {}",
            money(&spend["spent_month"]),
            money(&spend["committed_month"]),
            money(&spend["caps"]["per_month"]),
            money(&spend["committed_per_hour"]),
            money(&spend["caps"]["per_hour"]),
        );
        println!(
            "{:<16} {:<9} {:<13} {:<10} {:<28} {:>9}",
            "SERVER", "PROVIDER", "STATE", "ROLE", "CELL", "COST/H"
        );
        let mut by_heartbeat = false;
        for s in pool["servers"].as_array().into_iter().flatten() {
            let provider = s["provider"].as_str().unwrap_or("?");
            let mut state = s["state"].as_str().unwrap_or("?").to_string();
            if provider == "wol" {
                state.push('*');
                by_heartbeat = true;
            }
            println!(
                "{:<16} {:<9} {:<13} {:<10} {:<28} {:>9}",
                s["name"].as_str().unwrap_or("?"),
                provider,
                state,
                s["role"].as_str().unwrap_or("-"),
                s["cell_id"].as_str().unwrap_or("-"),
                money(&s["hourly_cost_micros"]),
            );
        }
        if by_heartbeat {
            println!(
                "* Wake-on-LAN cannot report power: the state is learnt from the cell's heartbeats"
            );
        }
        return;
    }
}
