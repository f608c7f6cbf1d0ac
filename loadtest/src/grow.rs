//! `loadtest bench grow`: how the organism finds its size. Two parts:
//!
//! 1. **The simulation at 10,000 cells** (`lifecycle::sim`, the same controller code in virtual
//!    time): a load step from nine cells' worth of work to ten thousand, seeded; time from the
//!    step to the first division, to capacity, reversals, time back to the minimum.
//! 2. **A real organism on the local provider** (`cell up`, embedded engines): after a warm-up
//!    crawl of the synthetic web, a step of client search load through the front doors; from
//!    the health checkers' event stream and registry: the time from the step to the first
//!    `divided` decision and to the new api cell in the registry, the decisions that reverse direction
//!    while the load holds steady, and the time back to the role's minimum after it ends; and
//!    the client requests that failed.
//!
//! Figures are printed, not asserted (the machine is shared and noisy).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use protocol::control::{CellEvent, CellState, EventKind};
use protocol::events::{interpret, SseParser, StreamItem};
use synthweb::{ServedLog, Serving, SyntheticWeb, WebSpec};
use tokio_util::sync::CancellationToken;

use crate::figures::Figures;
use crate::organism::{Launch, Organism};

#[derive(Args, Debug, Clone)]
pub struct GrowArgs {
    /// Clients searching back to back during the step.
    #[arg(long, default_value_t = 12)]
    pub clients: usize,
    /// How long the load holds after the step, seconds [default: 600; 40 with --quick].
    #[arg(long)]
    pub steady_secs: Option<u64>,
    /// A short run: 40 s of steady load, one simulation seed.
    #[arg(long)]
    pub quick: bool,
    /// The requests in flight one api cell is sized for (`[api] target_in_flight`).
    #[arg(long, default_value_t = 2)]
    pub target_in_flight: u32,
    /// The api role's most cells.
    #[arg(long, default_value_t = 4)]
    pub max_apis: u32,
    /// Simulation seeds at 10,000 cells [default: 3; 1 with --quick]; 0 skips the simulation.
    #[arg(long)]
    pub sim_seeds: Option<u64>,
    /// Skip the real organism (the simulation only).
    #[arg(long)]
    pub sim_only: bool,
    /// The `cell` executable [default: `cell` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub cell: Option<std::path::PathBuf>,
    /// One JSON line of figures per block instead of the blocks for people.
    #[arg(long)]
    pub json: bool,
}

pub async fn grow_command(args: &GrowArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        args.max_apis >= 2,
        "--max-apis must be at least 2 (min is 1)"
    );
    let seeds = args.sim_seeds.unwrap_or(if args.quick { 1 } else { 3 });
    for seed in 0..seeds {
        let started = Instant::now();
        let report = lifecycle::sim::run(&lifecycle::sim::Scenario::ten_thousand_step(seed));
        sim_figures(&report, seed, started.elapsed()).print(args.json);
    }
    if args.sim_only {
        return Ok(());
    }
    let steady = Duration::from_secs(
        args.steady_secs
            .unwrap_or(if args.quick { 40 } else { 600 }),
    );
    organism_run(args, steady).await
}

/// The simulation's figures, one block (roles after one another).
fn sim_figures(report: &lifecycle::sim::Report, seed: u64, took: Duration) -> Figures {
    let mut f = Figures::new("grow", "simulation, 10,000 cells")
        .condition("seed", seed)
        .condition("wall time ms", took.as_millis());
    let secs = |ms: Option<u64>| ms.map(|v| v as f64 / 1000.0);
    for r in &report.roles {
        let name = |what: &str| format!("{} {what}", r.role);
        f.add(
            &name("step to first division"),
            secs(r.first_divide_ms),
            "s",
        );
        f.add(&name("step to capacity"), secs(r.capacity_ms), "s");
        f.add(&name("reversals"), Some(f64::from(r.reversals)), "");
        f.add(&name("load end to minimum"), secs(r.back_to_min_ms), "s");
        f.add(&name("peak cells"), Some(f64::from(r.peak_cells)), "");
        f.add(&name("over max"), Some(f64::from(r.over_max)), "cells");
        f.add(&name("divisions"), Some(f64::from(r.divisions)), "");
        f.add(&name("retirements"), Some(f64::from(r.retirements)), "");
        f.add(&name("deaths"), Some(f64::from(r.deaths)), "");
    }
    f.add("peak spend", Some(report.peak_spend), "/h");
    f.add("over cap", Some(report.over_cap), "/h");
    f.add("factory started", Some(f64::from(report.started)), "cells");
    f.add("factory repeats", Some(f64::from(report.repeats)), "");
    f.add("factory refused", Some(f64::from(report.refused)), "");
    f
}

/// What the event stream told, stamped with the bench's clock.
#[derive(Default)]
struct Seen {
    events: Vec<(Instant, CellEvent)>,
}

fn follow_events(url: String, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .default_headers(control::read_headers_from_env())
            .build()
            .unwrap_or_default();
        while !stop.is_cancelled() {
            let Ok(mut resp) = client.get(format!("{url}/events")).send().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut parser = SseParser::new();
            loop {
                let chunk = tokio::select! {
                    c = resp.chunk() => c,
                    () = stop.cancelled() => return,
                };
                let Ok(Some(chunk)) = chunk else { break };
                for msg in parser.feed(&chunk) {
                    if let StreamItem::Cell(e) = interpret(&msg) {
                        lock(&seen).events.push((Instant::now(), e));
                    }
                }
            }
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn organism_run(args: &GrowArgs, steady: Duration) -> anyhow::Result<()> {
    let cell = crate::bench::locate_cell(args.cell.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("homeostat-grow-")
        .tempdir()
        .context("creating a temporary directory")?;
    let web = Arc::new(SyntheticWeb::generate(&WebSpec {
        seed: 11,
        pages: 400,
        hosts: 8,
        latency: Duration::ZERO,
    }));
    let server = Serving::start(web.clone(), ServedLog::counting())
        .await
        .context("serving the synthetic web")?;
    let text = crate::heal::infra_toml(&dir.path().join("data"), web.host_suffix(), server.addr)
        .replace(
            "[roles.api]\nmin = 2\nmax = 4\n",
            &format!("[roles.api]\nmin = 1\nmax = {}\n", args.max_apis),
        )
        .replace(
            "[api]\nlisten = \"127.0.0.1:0\"\n",
            &format!(
                "[api]\nlisten = \"127.0.0.1:0\"\ntarget_in_flight = {}\ntarget_latency_ms = 1000\n",
                args.target_in_flight
            ),
        );
    infra::Config::parse(&text, "the grow benchmark's configuration")?;
    let infra_path = dir.path().join("organism.toml");
    std::fs::write(&infra_path, &text)?;
    let interrupt = CancellationToken::new();
    vitals::cancel_on_signals(interrupt.clone());
    let launch = Launch::bench(cell, infra_path, dir.path(), Duration::from_secs(5));
    let mut up = Organism::start(&launch, &interrupt).await?;
    let result = measure(args, steady, &mut up, &web, &interrupt).await;
    let stopped = up.stop().await;
    drop(server);
    result?;
    stopped
}

async fn api_cells(client: &reqwest::Client, hcs: &[String]) -> Option<Vec<(String, CellState)>> {
    let reader = protocol::client::CellsClient::with_http(client.clone(), hcs.to_vec(), None);
    let cells = reader.read().await.ok()?;
    Some(
        cells
            .roles
            .get("api")
            .map(|v| v.iter().map(|c| (c.cell_id.clone(), c.state)).collect())
            .unwrap_or_default(),
    )
}

async fn measure(
    args: &GrowArgs,
    steady: Duration,
    up: &mut Organism,
    web: &SyntheticWeb,
    interrupt: &CancellationToken,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .default_headers(control::read_headers_from_env())
        .timeout(Duration::from_secs(5))
        .build()?;
    // Warm-up: a crawl, so that searches find pages; then wait for the api role at its minimum.
    let seeds = web.seeds();
    client
        .post(format!("{}/crawl", up.front))
        .json(&serde_json::json!({ "seeds": seeds }))
        .send()
        .await
        .context("POST /crawl")?;
    let warm = Instant::now();
    loop {
        anyhow::ensure!(!interrupt.is_cancelled(), "interrupted");
        let stats: Option<protocol::Stats> =
            match client.get(format!("{}/stats", up.front)).send().await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
        let apis = api_cells(&client, &up.healthcheckers)
            .await
            .unwrap_or_default();
        if stats.is_some_and(|s| s.frontier.drained() && s.frontier.crawled > 0) && apis.len() == 1
        {
            break;
        }
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(300),
            "the warm-up crawl did not drain to one api within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "grow: warm ({:.1} s); the step: {} clients",
        warm.elapsed().as_secs_f64(),
        args.clients
    );

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop_events = CancellationToken::new();
    for hc in up.healthcheckers.iter().take(1) {
        follow_events(hc.clone(), seen.clone(), stop_events.clone());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let words: Vec<String> = [
        "page", "web", "link", "home", "title", "text", "site", "host",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    let before: Vec<String> = api_cells(&client, &up.healthcheckers)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop_load = CancellationToken::new();
    let step = Instant::now();
    let step_ms = control::now_ms();
    let mut clients = Vec::new();
    for n in 0..args.clients {
        let (client, door, words) = (
            client.clone(),
            up.frontdoors[n % up.frontdoors.len()].clone(),
            words.clone(),
        );
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop_load.clone());
        clients.push(tokio::spawn(async move {
            let mut i = n;
            while !stop.is_cancelled() {
                i += 1;
                let word = &words[i % words.len()];
                let r = client
                    .get(format!("{door}/search"))
                    .query(&[("q", word.as_str()), ("limit", "10")])
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // The load holds for `steady`; the role's peak is followed meanwhile.
    let mut peak = 1;
    while step.elapsed() < steady && !interrupt.is_cancelled() {
        if let Some(apis) = api_cells(&client, &up.healthcheckers).await {
            peak = peak.max(apis.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_load.cancel();
    for c in clients {
        let _ = c.await;
    }
    let ended = Instant::now();
    let mut back_to_min = None;
    while ended.elapsed() < Duration::from_secs(180) && !interrupt.is_cancelled() {
        if let Some(apis) = api_cells(&client, &up.healthcheckers).await {
            if apis
                .iter()
                .filter(|(_, s)| *s != CellState::Draining)
                .count()
                == 1
            {
                back_to_min = Some(ended.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_events.cancel();

    let seen = lock(&seen);
    let decisions: Vec<(Instant, EventKind)> = seen
        .events
        .iter()
        .filter(|(_, e)| {
            e.role == "api" && matches!(e.kind, EventKind::Divided | EventKind::Retiring)
        })
        .map(|(at, e)| (*at, e.kind))
        .collect();
    // On the health checker's clock (its event times): the division, and the first new api
    // serving after it.
    let divided_ms = seen
        .events
        .iter()
        .find(|(at, e)| e.role == "api" && e.kind == EventKind::Divided && *at >= step)
        .map(|(_, e)| e.at_ms);
    let first_divide =
        divided_ms.map(|ms| Duration::from_millis(ms.saturating_sub(step_ms) as u64));
    let serving_ms = divided_ms.and_then(|d| {
        seen.events
            .iter()
            .find(|(_, e)| {
                e.role == "api"
                    && matches!(e.kind, EventKind::Born | EventKind::Serving)
                    && e.at_ms >= d
                    && !before.contains(&e.cell_id)
            })
            .map(|(_, e)| e.at_ms - d)
    });
    // Reversals while the load held: a retirement after a division (or the reverse) once the
    // role had settled (the first half-minute after the step is its growth).
    let settle = step + Duration::from_secs(30).min(steady / 2);
    let mut reversals = 0;
    let mut last: Option<EventKind> = None;
    for (at, k) in decisions
        .iter()
        .filter(|(at, _)| *at >= settle && *at < ended)
    {
        let _ = at;
        if last.is_some_and(|l| l != *k) {
            reversals += 1;
        }
        last = Some(*k);
    }
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let to_serving = serving_ms.map(|ms| Duration::from_millis(ms as u64));
    let mut f = Figures::new("grow", "local provider, api")
        .condition("clients", args.clients)
        .condition("steady s", steady.as_secs())
        .condition("target_in_flight", args.target_in_flight)
        .condition("max apis", args.max_apis);
    f.add("step to division decided", secs(first_divide), "s");
    f.add("decision to new api in the registry", secs(to_serving), "s");
    f.add("peak apis", Some(peak as f64), "");
    f.add(
        "decisions in the steady phase",
        Some(
            decisions
                .iter()
                .filter(|(at, _)| *at >= settle && *at < ended)
                .count() as f64,
        ),
        "",
    );
    f.add("reversals", Some(f64::from(reversals)), "");
    f.add("load end to 1 api", secs(back_to_min), "s");
    f.add("searches", Some(ok.load(Ordering::Relaxed) as f64), "");
    f.add("failed", Some(failed.load(Ordering::Relaxed) as f64), "");
    f.print(args.json);
    Ok(())
}
