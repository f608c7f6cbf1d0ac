//! `cell up`: a whole organism on this machine. Starts each cell as its own OS process through
//! the factory's local provider, keeps them alive (a dead cell is replaced), and on Ctrl-C asks
//! them all to drain. With `--demo` it also serves the bundled synthetic web and seeds the crawl.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use factory::local::{CellInfo, CellSpec, Event, LocalProvider, Supervisor};
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct UpArgs {
    /// The organism's configuration file (default: the embedded infra/organism.toml).
    #[arg(long)]
    infra: Option<PathBuf>,
    /// Also serve the bundled synthetic web on loopback and crawl it.
    #[arg(long)]
    demo: bool,
    /// Where the engines keep their files (overrides organism.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long each cell may take to drain on shutdown, seconds.
    #[arg(long, default_value_t = 20)]
    grace_secs: u64,
}

/// Where `cell up` records its cells, for `cell status`.
pub const CELLS_FILE: &str = "cells.json";

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut cfg = crate::load_config(args.infra.as_ref())?;
    if let Some(dir) = &args.data_dir {
        cfg.raw.organism.data_dir = dir.clone();
    }
    let data_dir = cfg.raw.organism.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let shutdown = CancellationToken::new();
    crate::cancel_on_signals(shutdown.clone());

    let demo = if args.demo {
        Some(start_demo_web(&mut cfg, shutdown.clone()).await?)
    } else {
        None
    };

    // Children read the effective configuration (demo settings included) from one file.
    let effective = data_dir.join("organism.effective.toml");
    std::fs::write(&effective, cfg.to_toml())
        .with_context(|| format!("writing {}", effective.display()))?;
    let exe = std::env::current_exe().context("locating the cell executable")?;
    let provider = LocalProvider {
        exe,
        common_args: vec!["--infra".into(), effective.to_string_lossy().to_string()],
        ready_timeout: Duration::from_secs(60),
        tie_to_parent: true,
        env: Vec::new(),
    };
    let (mut supervisor, mut events) = Supervisor::new(provider);
    let grace = Duration::from_secs(args.grace_secs);

    let mut cells: Vec<CellInfo> = Vec::new();
    let mut api_urls = Vec::new();
    for i in 0..cfg.bounds("api").min.max(1) {
        // A fixed port, so a replaced api cell answers where its predecessor did.
        let listen = if i == 0 {
            fixed_port(&cfg.raw.api.listen)?
        } else {
            fixed_port("127.0.0.1:0")?
        };
        let info = supervisor
            .add(
                format!("api-{}", i + 1),
                CellSpec {
                    role: "api".into(),
                    args: vec!["--listen".into(), listen],
                },
                shutdown.clone(),
                grace,
            )
            .await?;
        api_urls.push(format!("http://{}", info.addr));
        cells.push(info);
    }
    let crawlers = cfg.bounds("crawler").min.max(1);
    for i in 0..crawlers {
        let mut args = vec!["--crawler-share".into(), crawlers.to_string()];
        for url in &api_urls {
            args.push("--api".into());
            args.push(url.clone());
        }
        let info = supervisor
            .add(
                format!("crawler-{}", i + 1),
                CellSpec {
                    role: "crawler".into(),
                    args,
                },
                shutdown.clone(),
                grace,
            )
            .await?;
        cells.push(info);
    }
    write_cells(&data_dir, &cells);

    let api = api_urls[0].clone();
    println!("homeostat is up: {} cells; api {api}", cells.len());
    println!("  crawl:  curl -X POST {api}/crawl -H 'content-type: application/json' -d '{{\"seeds\":[\"https://example.com/\"]}}'");
    println!("  stats:  curl {api}/stats");
    if let Some(demo) = &demo {
        seed_demo(&api, demo).await?;
        // An ASCII word, so the printed command works as typed.
        let word = demo
            .web
            .rare_words(20)
            .into_iter()
            .map(|(w, _)| w)
            .find(|w| w.chars().all(|c| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "homeostat".into());
        println!(
            "  demo:   crawling {} synthetic pages on {} hosts served at {}",
            demo.web.page_count(),
            demo.web.hosts().len(),
            demo.addr
        );
        println!("  search: curl '{api}/search?q={word}'");
    }
    println!("Ctrl-C drains and stops every cell.");

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(event) = events.recv() => match event {
                Event::Started(info) => {
                    println!("{}", info.render());
                    if let Some(slot) = cells.iter_mut().find(|c| c.name == info.name) {
                        *slot = info;
                    }
                    write_cells(&data_dir, &cells);
                }
                Event::Exited { name, pid, status } => {
                    eprintln!("cell {name} (pid {pid}) exited: {status}; replacing it");
                }
                Event::StartFailed { name, error } => {
                    eprintln!("cell {name} failed to start: {error}");
                }
            },
        }
    }
    eprintln!("draining {} cells…", cells.len());
    supervisor.join().await;
    eprintln!("stopped");
    Ok(())
}

/// Turn `host:0` into `host:N` with a port free right now.
fn fixed_port(listen: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("{listen:?} is not an address"))?;
    if addr.port() != 0 {
        return Ok(listen.to_string());
    }
    let probe = std::net::TcpListener::bind(addr).with_context(|| format!("binding {listen}"))?;
    Ok(probe.local_addr()?.to_string())
}

fn write_cells(dir: &std::path::Path, cells: &[CellInfo]) {
    let path = dir.join(CELLS_FILE);
    match serde_json::to_vec_pretty(cells) {
        Ok(bytes) => {
            if let Err(e) = std::fs::write(&path, bytes) {
                tracing::warn!(error = %e, path = %path.display(), "cannot record the cells");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode the cells"),
    }
}

struct DemoWeb {
    web: Arc<loadtest::web::SyntheticWeb>,
    addr: SocketAddr,
}

/// Serve the synthetic web on loopback and point the crawlers at it.
async fn start_demo_web(
    cfg: &mut infra::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<DemoWeb> {
    let d = &cfg.raw.demo;
    let spec = loadtest::web::WebSpec {
        seed: d.seed,
        pages: d.pages,
        hosts: d.hosts,
        latency: Duration::from_millis(d.latency_ms),
    };
    let web = Arc::new(loadtest::web::SyntheticWeb::generate(&spec));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo web")?;
    let addr = listener.local_addr()?;
    let log = loadtest::web::ServedLog::counting();
    let served = web.clone();
    tokio::spawn(async move {
        let stop = async move { shutdown.cancelled().await };
        if let Err(e) = loadtest::web::serve(served, listener, log, stop).await {
            tracing::error!(error = %e, "the demo web stopped");
        }
    });
    let fetch = &mut cfg.raw.crawler.fetch;
    fetch.resolve.insert(web.host_suffix().to_string(), addr);
    // The demo's web is on loopback: allow exactly that, nothing else internal.
    fetch
        .allow_addresses
        .push("127.0.0.1/32".parse().expect("a valid CIDR"));
    fetch.per_host_rate = cfg.raw.demo.per_host_rate;
    fetch.per_host_concurrency = cfg.raw.demo.per_host_concurrency;
    Ok(DemoWeb { web, addr })
}

async fn seed_demo(api: &str, demo: &DemoWeb) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{api}/crawl"))
        .json(&protocol::CrawlRequest {
            seeds: demo.web.seeds(),
            max_depth: None,
            max_pages: None,
        })
        .send()
        .await
        .context("seeding the demo crawl")?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("seeding the demo crawl: {status} {body}");
    }
    let accepted = body["accepted"].as_array().map(Vec::len).unwrap_or(0);
    println!("  seeded: {accepted} seed URLs accepted");
    Ok(())
}
