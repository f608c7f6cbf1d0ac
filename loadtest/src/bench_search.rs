//! `loadtest bench search`: search latency and throughput of a whole organism under open-model
//! load. It starts `cell up --demo` (or loads `--target`), waits for the demo crawl to drain,
//! then holds each rate of `--rates` for `--secs` seconds with [`crate::run`]'s load generator
//! and reports, per rate, the achieved rate, the latency from the intended send (p50, p99,
//! p99.9, max: queueing included) and the failures, as [`crate::figures`].

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::figures::Figures;
use crate::run::live::Mode;
use crate::run::profile::{Phase, Profile, SearchSpec, Terms};
use crate::run::{execute, up_demo, Endpoints, RunPlan};

#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// Rates to hold, searches per second, comma-separated [default: 50,100,200,400; 50,200
    /// with --quick].
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// How long each rate holds, seconds [default: 20; 5 with --quick].
    #[arg(long)]
    pub secs: Option<f64>,
    /// A short run.
    #[arg(long)]
    pub quick: bool,
    /// Which words, each measured at every rate, comma-separated: `common` (as often as pages
    /// carry them) and `rare` (on at most 1% of the pages).
    #[arg(long, value_delimiter = ',', default_value = "common,rare")]
    pub terms: Vec<Terms>,
    /// Each search asks one of result pages 1 to N evenly (pagination).
    #[arg(long, default_value_t = 1)]
    pub pages_deep: u32,
    /// Load this front door instead of starting `cell up --demo` (its words come from the
    /// embedded demo web unless the web options say otherwise).
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// The demo web: pages and hosts (the words searched for come from it).
    #[arg(long, default_value_t = 2000)]
    pub pages: usize,
    #[arg(long, default_value_t = 20)]
    pub hosts: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The `cell` executable [default: `cell` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub cell: Option<std::path::PathBuf>,
    /// One JSON line per rate instead of the blocks for people.
    #[arg(long)]
    pub json: bool,
    /// Keep each rate's timeline, requests and report here (rate-N-TERMS/ under it).
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
}

pub async fn search_command(args: &SearchArgs) -> anyhow::Result<()> {
    let rates = if !args.rates.is_empty() {
        args.rates.clone()
    } else if args.quick {
        vec![50.0, 200.0]
    } else {
        vec![50.0, 100.0, 200.0, 400.0]
    };
    let secs = args.secs.unwrap_or(if args.quick { 5.0 } else { 20.0 });
    anyhow::ensure!(secs > 0.0, "--secs must be positive");
    let kept = args.out.clone();
    let scratch = tempfile::Builder::new()
        .prefix("homeostat-bench-search-")
        .tempdir()
        .context("creating a temporary directory")?;
    let base = kept.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&base)?;
    let interrupt = CancellationToken::new();
    vitals::cancel_on_signals(interrupt.clone());
    let search = SearchSpec {
        web_seed: args.seed,
        web_pages: args.pages,
        web_hosts: args.hosts,
        ..SearchSpec::default()
    };
    let (endpoints, organism) = match &args.target {
        Some(url) => (
            Endpoints {
                frontdoors: vec![url.trim_end_matches('/').to_string()],
                ..Endpoints::default()
            },
            None,
        ),
        None => {
            let cell = crate::bench::locate_cell(args.cell.as_deref())?;
            let infra = base.join("demo.toml");
            std::fs::write(
                &infra,
                format!(
                    "[demo]\nseed = {}\npages = {}\nhosts = {}\n",
                    args.seed, args.pages, args.hosts
                ),
            )?;
            let up = up_demo(&cell, Some(&infra), &base, &interrupt).await?;
            (
                Endpoints {
                    frontdoors: up.frontdoors.clone(),
                    healthcheckers: up.healthcheckers.clone(),
                    factories: up.factories.clone(),
                },
                Some(up),
            )
        }
    };
    let result = measure(args, &rates, secs, &search, &endpoints, &base, &interrupt).await;
    if let Some(up) = organism {
        let stopped = up.stop().await;
        result?;
        stopped?;
    } else {
        result?;
    }
    if let Some(dir) = kept {
        eprintln!(
            "bench search: each rate's timeline and report are in {}",
            dir.display()
        );
    }
    Ok(())
}

async fn measure(
    args: &SearchArgs,
    rates: &[f64],
    secs: f64,
    search: &SearchSpec,
    endpoints: &Endpoints,
    base: &std::path::Path,
    interrupt: &CancellationToken,
) -> anyhow::Result<()> {
    // Searches are measured on a crawled web: wait for the demo crawl to drain.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let waited = Instant::now();
    loop {
        anyhow::ensure!(!interrupt.is_cancelled(), "interrupted");
        let stats: Option<protocol::Stats> = match client
            .get(format!("{}/stats", endpoints.frontdoors[0]))
            .send()
            .await
        {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        if let Some(s) = stats.filter(|s| s.frontier.drained() && s.frontier.crawled > 0) {
            eprintln!(
                "bench search: {} pages indexed after {:.1} s",
                s.pages_indexed,
                waited.elapsed().as_secs_f64()
            );
            break;
        }
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(600),
            "the crawl did not drain within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (&rate, &terms) in rates
        .iter()
        .flat_map(|r| args.terms.iter().map(move |t| (r, t)))
    {
        let search = SearchSpec {
            terms,
            pages_deep: args.pages_deep,
            ..search.clone()
        };
        let profile = Profile {
            name: format!("search-{rate}-{terms}"),
            description: format!("{rate} searches/s for {secs} s, {terms} terms"),
            search: search.clone(),
            crawl: None,
            chaos: None,
            phases: vec![Phase::Hold { rate, secs }],
        };
        let problems = profile.validate();
        anyhow::ensure!(
            problems.is_empty(),
            "--rates {rate}: {}",
            problems.join("; ")
        );
        let out = base.join(format!("rate-{rate}-{terms}"));
        let t = execute(
            RunPlan {
                profile,
                endpoints: endpoints.clone(),
                out: out.clone(),
                max_outstanding: 10_000,
                timeout: Duration::from_secs(10),
                chaos: false,
                requests_log: args.out.is_some(),
                live: Mode::Quiet,
            },
            interrupt.clone(),
        )
        .await?;
        if args.out.is_some() {
            crate::report::render(&t, &out)?;
        }
        let s = &t.summary;
        let mut f = Figures::new("search", format!("{rate}/s for {secs} s, {terms} terms"))
            .condition("web pages", args.pages)
            .condition("result pages asked", format!("1 to {}", args.pages_deep))
            .condition("target", endpoints.frontdoors.join(" "));
        f.add("offered", Some(s.offered_rate), "req/s");
        f.add("achieved", Some(s.achieved_rate), "req/s");
        f.add("latency p50", s.latency_ms.p50, "ms");
        f.add("latency p99", s.latency_ms.p99, "ms");
        f.add("latency p99.9", s.latency_ms.p999, "ms");
        f.add("latency max", s.latency_ms.max, "ms");
        f.add("service p99", s.service_ms.p99, "ms");
        f.add(
            "failed",
            Some(s.totals.errors.values().sum::<u64>() as f64),
            "requests",
        );
        for (role, n) in &s.peak_cells {
            f.add(&format!("peak {role} cells"), Some(f64::from(*n)), "");
        }
        f.print(args.json);
    }
    Ok(())
}
