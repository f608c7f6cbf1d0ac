//! `cell up`: a whole organism on this machine. It starts two factories (supervised: each
//! restarted if it dies) and asks one of them for two health checkers; the health checkers then
//! grow the organism to the minimums in `infra/` through the factories (apis, crawlers, front
//! doors) and replace any cell that dies. With `--demo` it also serves the bundled synthetic web
//! and seeds the crawl with it. Ctrl-C asks every cell to drain.
//!
//! Every cell carries the organism's lease (this process's pid and start time, see
//! [`factory::lease`]) and exits when this process is gone, even by SIGKILL; with
//! `--die-with-parent` this process itself ends when whatever started it does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use control::{ClusterKey, ControlClient, Signer};
use factory::local::{CellSpec, Event, LocalProvider, Supervisor};
use protocol::client::CellsClient;
use protocol::control::{CellsResponse, ReplaceRequest};
use serde::{Deserialize, Serialize};
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
    /// Drain and stop when the process that started `cell up` dies (Linux `PR_SET_PDEATHSIG`;
    /// for test harnesses and scripts: nothing of the organism outlives them).
    #[arg(long)]
    die_with_parent: bool,
}

/// Where `cell up` records the organism's fixed addresses, for `cell status`.
pub const ORGANISM_FILE: &str = "organism.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrganismFile {
    pub factories: Vec<String>,
    pub healthcheckers: Vec<String>,
    pub frontdoors: Vec<String>,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.die_with_parent {
        die_with_parent()?;
    }
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

    // The organism's secret, handed to the cells in the environment: the operator's own
    // (HOMEOSTAT_CLUSTER_KEY[_FILE], so cells elsewhere and `cell status` share it), else one
    // generated for this run.
    let operator_key = std::env::var_os(control::KEY_ENV).is_some()
        || std::env::var_os(control::KEY_FILE_ENV).is_some();
    let key = if operator_key {
        ClusterKey::from_env()?
    } else {
        ClusterKey::generate()
    };
    let factory_addrs = [fixed_port("127.0.0.1:0")?, fixed_port("127.0.0.1:0")?];
    let hcs = [fixed_port("127.0.0.1:0")?, fixed_port("127.0.0.1:0")?];
    let frontdoors = frontdoor_addresses(&cfg.raw.frontdoor.listen)?;
    let file = OrganismFile {
        factories: factory_addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect(),
        healthcheckers: hcs.iter().map(|a| format!("http://{a}")).collect(),
        frontdoors: frontdoors.iter().map(|a| format!("http://{a}")).collect(),
    };
    // The registry's reader, with the organism's read token (in cluster mode `/cells` answers
    // nobody else).
    let registry = CellsClient::new(file.healthcheckers.clone(), Some(key.read_authorization()));
    std::fs::write(
        data_dir.join(ORGANISM_FILE),
        serde_json::to_vec_pretty(&file).expect("the organism file always serializes"),
    )
    .context("recording the organism's addresses")?;

    // This process's build, known before the factories start so that they and every cell they
    // start from this file take it from their environment rather than each reading the file.
    tokio::task::spawn_blocking(control::build::current_blocking)
        .await
        .context("naming this build")?;
    let provider = LocalProvider {
        exe: std::env::current_exe().context("locating the cell executable")?,
        common_args: vec!["--infra".into(), effective.to_string_lossy().to_string()],
        ready_timeout: Duration::from_secs(60),
        tie_to_parent: true,
        env: vec![(control::KEY_ENV.to_string(), key.to_hex())],
        // A live upgrade installs its release here; a factory restarts from it.
        release_file: Some(data_dir.join(factory::upgrade::RELEASE_FILE)),
    };
    let mut provider = provider;
    if let Some(lease) = factory::lease::OrganismLease::current() {
        provider
            .env
            .push((factory::lease::LEASE_ENV.to_string(), lease.render()));
    }
    let (mut supervisor, mut events) = Supervisor::new(provider);
    let grace = Duration::from_secs(args.grace_secs);
    // Two factories, each told of the other (the cells they start learn both addresses).
    for (i, addr) in factory_addrs.iter().enumerate() {
        let name = format!("factory-{}", i + 1);
        let mut factory_args = vec![
            // No --cell-id: each generation of a factory is a new cell (factory-PID), so the
            // registry never mistakes a restarted factory for its buried predecessor.
            "--listen".to_string(),
            addr.clone(),
            "--fixed".into(),
            format!("healthchecker={}", hcs.join(",")),
            "--fixed".into(),
            format!("frontdoor={}", frontdoors.join(",")),
            "--grace-secs".into(),
            args.grace_secs.to_string(),
        ];
        for hc in &file.healthcheckers {
            factory_args.push("--healthchecker".into());
            factory_args.push(hc.clone());
        }
        for (j, sibling) in file.factories.iter().enumerate() {
            if j != i {
                factory_args.push("--factory".into());
                factory_args.push(sibling.clone());
            }
        }
        supervisor
            .add(
                name,
                CellSpec {
                    role: "factory".into(),
                    args: factory_args,
                },
                shutdown.clone(),
                grace,
            )
            .await?;
    }

    // Two health checkers; they grow the rest.
    let me = ControlClient::new(Signer::new(key.clone(), "cell-up"));
    for i in 1..=2 {
        let request = ReplaceRequest {
            request_key: format!("grow:healthchecker:{i}"),
            role: "healthchecker".into(),
            reason: "organism start".into(),
            parent: None,
        };
        // Either factory will do: they share their request keys.
        let mut last = None;
        for factory in &file.factories {
            match me.ask(factory, &request).await {
                Ok(reply) => {
                    tracing::debug!(?reply, "health checker requested");
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(anyhow::Error::new(e).context("asking the factories for a health checker"));
        }
    }
    let minimums: BTreeMap<String, u32> = cfg
        .healthchecker()
        .minimums
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    let view = wait_for_minimums(&registry, &minimums, &shutdown).await?;
    for front in &file.frontdoors {
        wait_routable(front).await?;
    }
    let total: usize = view.roles.values().map(Vec::len).sum();
    let front = file.frontdoors[0].clone();
    println!(
        "homeostat is up: {total} cells; frontdoor {}",
        file.frontdoors.join(" ")
    );
    println!("  healthcheckers {}", file.healthcheckers.join(" "));
    println!("  factories {}", file.factories.join(" "));
    println!("  crawl:  curl -X POST {front}/crawl -H 'content-type: application/json' -d '{{\"seeds\":[\"https://example.com/\"]}}'");
    println!("  stats:  curl {front}/stats");
    println!("  cells:  curl {}/cells", file.healthcheckers[0]);
    if let Some(demo) = &demo {
        seed_demo(&front, demo).await?;
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
        println!("  search: curl '{front}/search?q={word}'");
    }
    println!("Ctrl-C drains and stops every cell.");
    // The same, for tools and tests: one line of versioned JSON.
    println!(
        "{}",
        protocol::OrganismReady {
            v: protocol::WIRE_VERSION,
            frontdoors: file.frontdoors.clone(),
            healthcheckers: file.healthcheckers.clone(),
            factories: file.factories.clone(),
            cells: total,
        }
        .render()
    );

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(event) = events.recv() => match event {
                Event::Started(info) if info.generation > 1 => {
                    eprintln!("{} restarted (pid {})", info.name, info.pid);
                }
                Event::Started(_) => {}
                Event::Exited { name, pid, status } => {
                    eprintln!("{name} (pid {pid}) exited: {status}; restarting it");
                }
                Event::StartFailed { name, error } => {
                    eprintln!("{name} failed to start: {error}");
                }
            },
        }
    }
    eprintln!("draining the organism…");
    // Cells a previous factory started are not the current factory's children: stop them too.
    let orphans = registry_pids(&registry).await;
    supervisor.join().await;
    for pid in &orphans {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = tokio::time::Instant::now() + grace;
    while orphans.iter().any(|p| alive(*p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("stopped");
    Ok(())
}

/// Ask the kernel to SIGTERM this process when its parent dies (then it drains the organism as
/// on Ctrl-C; a SIGKILL of this process is covered by the cells' lease).
fn die_with_parent() -> anyhow::Result<()> {
    let parent = nix::unistd::getppid();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("asking to die with the parent process (PR_SET_PDEATHSIG)")?;
    // The parent may have died before the request took effect.
    if nix::unistd::getppid() != parent {
        anyhow::bail!("the parent process is already gone");
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

async fn registry_pids(registry: &CellsClient) -> Vec<u32> {
    registry
        .read()
        .await
        .map(|c| {
            c.roles
                .values()
                .flatten()
                .filter(|r| r.role != "factory")
                .filter_map(|r| r.pid)
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for_minimums(
    registry: &CellsClient,
    minimums: &BTreeMap<String, u32>,
    shutdown: &CancellationToken,
) -> anyhow::Result<CellsResponse> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = None;
    loop {
        if let Ok(view) = registry.read().await {
            let short: Vec<String> = minimums
                .iter()
                .filter(|(role, min)| {
                    view.roles.get(*role).map(Vec::len).unwrap_or(0) < **min as usize
                })
                .map(|(role, min)| format!("{role} (min {min})"))
                .collect();
            if short.is_empty() {
                return Ok(view);
            }
            last = Some(short);
        }
        if shutdown.is_cancelled() {
            anyhow::bail!("interrupted while the organism was growing");
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the organism did not reach its minimums in 120 s; short of: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until a front door routes to an api (it learns them from the registry by polling; an
/// api is ready once its engines answer, which on replicated engines just after a failover can
/// take a while): as long as the organism's growth to its minimums may take.
async fn wait_routable(front: &str) -> anyhow::Result<()> {
    const LIMIT: Duration = Duration::from_secs(120);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut last: String;
    loop {
        match client.get(format!("{front}/stats")).send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                last = format!("{status} {}", body.chars().take(300).collect::<String>());
            }
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the front door {front} routes to no api after {} s; it last answered: {last}",
                LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The front doors' addresses: the configured one and the next port, or two free ports.
fn frontdoor_addresses(listen: &str) -> anyhow::Result<[String; 2]> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("frontdoor.listen {listen:?} is not an address"))?;
    if addr.port() == 0 {
        return Ok([fixed_port(listen)?, fixed_port(listen)?]);
    }
    let second = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1));
    Ok([addr.to_string(), second.to_string()])
}

/// Turn `host:0` into `host:N` with a port free right now, chosen outside the kernel's
/// ephemeral range: the cell that binds it starts later, and a port the kernel hands out may be
/// taken by any process's next connection in between (`factory::ports`).
fn fixed_port(listen: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("{listen:?} is not an address"))?;
    if addr.port() != 0 {
        return Ok(listen.to_string());
    }
    let chosen =
        factory::ports::fixed_tcp(addr.ip()).with_context(|| format!("binding {listen}"))?;
    Ok(chosen.to_string())
}

struct DemoWeb {
    web: Arc<synthweb::SyntheticWeb>,
    addr: SocketAddr,
}

/// Serve the synthetic web on loopback and point the crawlers at it.
async fn start_demo_web(
    cfg: &mut infra::Config,
    shutdown: CancellationToken,
) -> anyhow::Result<DemoWeb> {
    let d = &cfg.raw.demo;
    let spec = synthweb::WebSpec {
        seed: d.seed,
        pages: d.pages,
        hosts: d.hosts,
        latency: Duration::from_millis(d.latency_ms),
    };
    let web = Arc::new(synthweb::SyntheticWeb::generate(&spec));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo web")?;
    let addr = listener.local_addr()?;
    let log = synthweb::ServedLog::counting();
    let served = web.clone();
    tokio::spawn(async move {
        let stop = async move { shutdown.cancelled().await };
        if let Err(e) = synthweb::serve(served, listener, log, stop).await {
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

async fn seed_demo(front: &str, demo: &DemoWeb) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{front}/crawl"))
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
