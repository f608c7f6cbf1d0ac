//! `cell status`: the cells `cell up` recorded, and whether each answers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use factory::local::CellInfo;

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
    let path = dir.join(crate::up::CELLS_FILE);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: is an organism running here (`cell up`)?",
            path.display()
        )
    })?;
    let cells: Vec<CellInfo> =
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    println!(
        "{:<12} {:<8} {:>8} {:<22} {:<6} STATE",
        "CELL", "ROLE", "PID", "ADDRESS", "GEN"
    );
    let mut api = None;
    for c in &cells {
        let state = match client.get(format!("http://{}/readyz", c.addr)).send().await {
            Ok(r) if r.status().is_success() => "ready",
            Ok(_) => "not ready",
            Err(_) => "not answering",
        };
        if c.role == "api" && state == "ready" && api.is_none() {
            api = Some(c.addr.clone());
        }
        println!(
            "{:<12} {:<8} {:>8} {:<22} {:<6} {state}",
            c.name, c.role, c.pid, c.addr, c.generation
        );
    }
    if let Some(addr) = api {
        if let Ok(resp) = client.get(format!("http://{addr}/stats")).send().await {
            if let Ok(stats) = resp.json::<protocol::Stats>().await {
                let f = &stats.frontier;
                println!(
                    "pages indexed {}; frontier pending {}, in flight {}, crawled {}, failed {}",
                    stats.pages_indexed, f.pending, f.in_flight, f.crawled, f.failed
                );
            }
        }
    }
    Ok(())
}
