//! `loadtest run --profile FILE --target URL --out DIR`: client load on an organism, following a
//! profile, in the open model (see [`open_model`]), with optional crawl seeding and chaos; a
//! live view while it runs ([`live`]); and a timeline recorded per second ([`timeline`]) that
//! `loadtest report DIR` draws.
//!
//! Architecture Invariant: like the benchmarks, the run drives the organism only from outside,
//! as an operator would: HTTP on the front doors, the health checkers' registry and event
//! stream, a factory's `/pool`, and (chaos) signals to the pids the registry names.

pub mod chaos;
pub mod live;
pub mod open_model;
pub mod organism_view;
pub mod profile;
pub mod queries;
pub mod timeline;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::organism::{Launch, Organism};
use open_model::{Recorder, Target};
use organism_view::{EventLog, Sampler};
use profile::Profile;
use queries::{Queries, Vocabulary};
use timeline::{SecondRow, Timeline};

/// The organism's roles, in the order the timeline shows them.
pub const ROLES: &[&str] = &["api", "crawler", "frontdoor", "healthchecker", "factory"];

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The load profile (TOML; see infra/profiles/).
    #[arg(long, value_name = "FILE")]
    pub profile: PathBuf,
    /// A front door to load (repeatable: requests go to each in turn).
    #[arg(long = "target", value_name = "URL")]
    pub targets: Vec<String>,
    /// A health checker, for the registry and the life events (repeatable).
    #[arg(long = "healthchecker", value_name = "URL")]
    pub healthcheckers: Vec<String>,
    /// A factory, for the purse (repeatable).
    #[arg(long = "factory", value_name = "URL")]
    pub factories: Vec<String>,
    /// The organism `cell up` runs here: its data directory (or its organism.json), which names
    /// its front doors, health checkers and factories.
    #[arg(long, value_name = "DIR|FILE")]
    pub organism: Option<PathBuf>,
    /// Start an organism for the run (`cell up --demo`, in a directory of its own under --out)
    /// and stop it afterwards.
    #[arg(long, conflicts_with_all = ["targets", "organism"])]
    pub up_demo: bool,
    /// With --up-demo: the `cell` executable [default: `cell` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub cell: Option<PathBuf>,
    /// With --up-demo: the organism's configuration [default: the embedded one].
    #[arg(long, value_name = "FILE")]
    pub infra: Option<PathBuf>,
    /// Where the timeline, the request log and the report go (created).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Multiply every rate of the profile.
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// Requests outstanding at once, at most; a request due beyond it is not sent and counts
    /// as the error `over_outstanding_bound`.
    #[arg(long, default_value_t = 10_000)]
    pub max_outstanding: usize,
    /// Timeout of one request, ms.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Leave chaos out even if the profile has some.
    #[arg(long)]
    pub no_chaos: bool,
    /// Do not write every request to requests.csv.
    #[arg(long)]
    pub no_requests_log: bool,
    /// Do not draw the report at the end (`loadtest report DIR` draws it later).
    #[arg(long)]
    pub no_report: bool,
}

/// Where a run sends its load and reads the organism.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub frontdoors: Vec<String>,
    pub healthcheckers: Vec<String>,
    pub factories: Vec<String>,
}

/// How a run is made, for [`execute`] (the command's arguments, resolved).
pub struct RunPlan {
    pub profile: Profile,
    pub endpoints: Endpoints,
    pub out: PathBuf,
    pub max_outstanding: usize,
    pub timeout: Duration,
    pub chaos: bool,
    pub requests_log: bool,
    /// Show the live view (on a terminal) or plain lines.
    pub live: live::Mode,
}

/// `loadtest run`.
pub async fn run_command(args: &RunArgs) -> anyhow::Result<()> {
    let mut profile = Profile::load(&args.profile)?;
    if args.rate_scale != 1.0 {
        anyhow::ensure!(
            args.rate_scale.is_finite() && args.rate_scale > 0.0,
            "--rate-scale must be a positive number"
        );
        profile.scale_rates(args.rate_scale);
        let problems = profile.validate();
        if !problems.is_empty() {
            bail!("--rate-scale {}: {}", args.rate_scale, problems.join("; "));
        }
    }
    anyhow::ensure!(
        args.max_outstanding > 0,
        "--max-outstanding must be at least 1"
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut plan = RunPlan {
        profile,
        endpoints: Endpoints::default(),
        out: args.out.clone(),
        max_outstanding: args.max_outstanding,
        timeout: Duration::from_millis(args.timeout_ms),
        chaos: !args.no_chaos,
        requests_log: !args.no_requests_log,
        live: live::Mode::detect(),
    };
    let interrupt = CancellationToken::new();
    vitals::cancel_on_signals(interrupt.clone());
    let result = if args.up_demo {
        let cell = crate::bench::locate_cell(args.cell.as_deref())?;
        let up = up_demo(&cell, args.infra.as_deref(), &args.out, &interrupt).await?;
        plan.endpoints = Endpoints {
            frontdoors: up.frontdoors.clone(),
            healthcheckers: up.healthcheckers.clone(),
            factories: up.factories.clone(),
        };
        let result = execute(plan, interrupt.clone()).await;
        eprintln!("loadtest: stopping the organism");
        let stopped = up.stop().await;
        result.and_then(|t| stopped.map(|()| t))
    } else {
        plan.endpoints = endpoints(args)?;
        execute(plan, interrupt.clone()).await
    };
    let timeline = result?;
    if !args.no_report {
        let files = crate::report::render(&timeline, &args.out)?;
        println!("report: {}", files.html.display());
    }
    Ok(())
}

/// Start `cell up --demo` for a run, its files in `out/organism/`.
pub async fn up_demo(
    cell: &Path,
    infra: Option<&Path>,
    out: &Path,
    interrupt: &CancellationToken,
) -> anyhow::Result<Organism> {
    let dir = out.join("organism");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = match infra {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --infra {}", path.display()))?,
        None => infra::DEFAULT_ORGANISM.to_string(),
    };
    let mut table: toml::Table = text.parse().context("reading the organism configuration")?;
    // Its own data directory and ports: nothing shared with an organism already running here.
    let over: toml::Table = format!(
        "[organism]\ndata_dir = {}\n[frontdoor]\nlisten = \"127.0.0.1:0\"\n",
        toml::Value::String(dir.join("data").display().to_string())
    )
    .parse()
    .context("the run's configuration overlay")?;
    crate::bench::overlay::merge(&mut table, over);
    let text = toml::to_string(&table)?;
    infra::Config::parse(&text, "the run's organism configuration")?;
    let path = dir.join("organism.toml");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let mut launch = Launch::bench(cell.to_path_buf(), path, &dir, Duration::from_secs(5));
    launch.args = vec!["--demo".into()];
    eprintln!("loadtest: starting {} up --demo", cell.display());
    let up = Organism::start(&launch, interrupt).await?;
    eprintln!(
        "loadtest: up; front doors {}; health checkers {}",
        up.frontdoors.join(" "),
        up.healthcheckers.join(" ")
    );
    Ok(up)
}

/// The endpoints the arguments name.
fn endpoints(args: &RunArgs) -> anyhow::Result<Endpoints> {
    let mut e = Endpoints {
        frontdoors: args.targets.clone(),
        healthcheckers: args.healthcheckers.clone(),
        factories: args.factories.clone(),
    };
    if let Some(path) = &args.organism {
        let file = if path.is_dir() {
            path.join("organism.json")
        } else {
            path.clone()
        };
        let bytes = std::fs::read(&file).with_context(|| {
            format!(
                "reading {}: is `cell up` running with this data directory?",
                file.display()
            )
        })?;
        let o: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", file.display()))?;
        let list = |key: &str| -> Vec<String> {
            o[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        };
        if e.frontdoors.is_empty() {
            e.frontdoors = list("frontdoors");
        }
        if e.healthcheckers.is_empty() {
            e.healthcheckers = list("healthcheckers");
        }
        if e.factories.is_empty() {
            e.factories = list("factories");
        }
    }
    if e.frontdoors.is_empty() {
        bail!("nothing to load: give --target URL (a front door), --organism DIR, or --up-demo");
    }
    for url in e
        .frontdoors
        .iter()
        .chain(&e.healthcheckers)
        .chain(&e.factories)
    {
        let parsed = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
        anyhow::ensure!(
            matches!(parsed.scheme(), "http" | "https"),
            "{url:?} is not an http(s) URL"
        );
    }
    for list in [&mut e.frontdoors, &mut e.healthcheckers, &mut e.factories] {
        for url in list.iter_mut() {
            *url = url.trim_end_matches('/').to_string();
        }
    }
    Ok(e)
}

/// Milliseconds since the Unix epoch (the health checkers stamp their events so).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Run `plan` until its profile ends (or `interrupt`), write the timeline, and return it.
pub async fn execute(plan: RunPlan, interrupt: CancellationToken) -> anyhow::Result<Timeline> {
    let RunPlan {
        profile,
        endpoints,
        out,
        max_outstanding,
        timeout,
        chaos,
        requests_log,
        live,
    } = plan;
    anyhow::ensure!(!endpoints.frontdoors.is_empty(), "no front door to load");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let vocabulary = Vocabulary::of_spec(&profile.search);
    let queries = Queries::new(&vocabulary, &profile.search)?;
    let requests_file = if requests_log {
        let path = out.join(timeline::REQUESTS_CSV);
        Some(std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?)
    } else {
        None
    };
    let recorder = Arc::new(Recorder::new(requests_file)?);
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(max_outstanding.min(1024))
        .build()?;
    let target = Arc::new(Target {
        urls: endpoints.frontdoors.clone(),
        client: client.clone(),
        limit: profile.search.limit,
        max_outstanding,
    });
    let sampler = Arc::new(tokio::sync::Mutex::new(Sampler::new(
        endpoints.healthcheckers.clone(),
        endpoints.factories.clone(),
    )?));
    let log = Arc::new(Mutex::new(EventLog::default()));
    let stopped = Arc::new(chaos::Stopped::default());
    let duration = profile.duration();
    let stop = CancellationToken::new();
    // Every task of the run ends with it, however it ends.
    let _stop_guard = stop.clone().drop_guard();
    let start = Instant::now();
    let start_ms = unix_ms();
    organism_view::follow_events(
        &endpoints.healthcheckers,
        log.clone(),
        start_ms,
        stop.clone(),
    );
    if let (true, Some(spec)) = (chaos, profile.chaos.clone()) {
        tokio::spawn(chaos::run(
            spec,
            duration,
            sampler.clone(),
            log.clone(),
            stopped.clone(),
            start,
            stop.clone(),
        ));
    }
    if let Some(crawl) = profile.crawl.clone() {
        let (client, front, log, stop) = (
            client.clone(),
            endpoints.frontdoors[0].clone(),
            log.clone(),
            stop.clone(),
        );
        let seeds = if crawl.seeds.is_empty() {
            synthweb::SyntheticWeb::generate(&synthweb::WebSpec {
                seed: profile.search.web_seed,
                pages: profile.search.web_pages,
                hosts: profile.search.web_hosts,
                latency: Duration::ZERO,
            })
            .seeds()
        } else {
            crawl.seeds.clone()
        };
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(start + Duration::from_secs_f64(crawl.at_secs)) => {}
                () = stop.cancelled() => return,
            }
            let answer = seed_crawl(&client, &front, seeds, &crawl).await;
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_chaos(organism_view::LifeEvent {
                    t_ms: start.elapsed().as_millis() as i64,
                    kind: "crawl_seeded".into(),
                    role: "client".into(),
                    cell_id: String::new(),
                    parent: None,
                    reason: answer,
                    source: "harness".into(),
                });
        });
    }

    // Each second: the organism's sample, the load's closed seconds, the live view.
    let samples: Arc<Mutex<Vec<Option<organism_view::OrganismSample>>>> = Arc::default();
    let view = live::View::start(live, &profile, duration);
    let ticker = {
        let (sampler, samples, recorder, stop, view, log) = (
            sampler.clone(),
            samples.clone(),
            recorder.clone(),
            stop.clone(),
            view.clone(),
            log.clone(),
        );
        tokio::spawn(async move {
            let mut second = 0u64;
            loop {
                let sample = sampler.lock().await.sample().await;
                {
                    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
                    let at = start.elapsed().as_secs() as usize;
                    while s.len() <= at {
                        s.push(None);
                    }
                    s[at] = Some(sample.clone());
                }
                second += 1;
                tokio::select! {
                    () = tokio::time::sleep_until(start + Duration::from_secs(second)) => {}
                    () = stop.cancelled() => return,
                }
                // Answers still arriving for the second just ended are kept one more second.
                let closed = recorder.close_before(second.saturating_sub(1));
                let events = log.lock().unwrap_or_else(|p| p.into_inner()).events().len();
                view.tick(second, &closed, &recorder.totals(), &sample, events);
            }
        })
    };

    open_model::drive(
        &profile,
        target,
        queries,
        recorder.clone(),
        start,
        interrupt.clone(),
        timeout + Duration::from_secs(1),
    )
    .await;
    let interrupted = interrupt.is_cancelled();
    let end = start.elapsed().as_secs() + 1;
    // The last registry read, then everything stops.
    stop.cancel();
    let _ = ticker.await;
    stopped.continue_all();
    view.finish();
    recorder.close_before(end);
    recorder.flush().context("writing requests.csv")?;

    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let seconds: Vec<SecondRow> = recorder
        .closed()
        .into_iter()
        .enumerate()
        .map(|(t, load)| SecondRow {
            t: t as u64,
            profile_rate: profile.rate_at(t as f64 + 0.5),
            load,
            organism: samples.get(t).cloned().flatten(),
        })
        .collect();
    let (events, missed) = {
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        (log.events(), log.missed)
    };
    let (corrected, service) = recorder.histograms();
    let summary = timeline::summarize(
        &seconds,
        &events,
        recorder.totals(),
        &corrected,
        &service,
        duration.as_secs_f64(),
        missed,
    );
    let timeline = Timeline {
        v: timeline::TIMELINE_VERSION,
        profile,
        targets: endpoints.frontdoors,
        started_at_ms: start_ms,
        duration_secs: duration.as_secs_f64(),
        seconds,
        events,
        summary,
    };
    timeline.write(&out)?;
    for (name, h) in [("latency.hgrm", &corrected), ("service.hgrm", &service)] {
        let path = out.join(name);
        std::fs::write(&path, open_model::percentile_distribution(h))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if live != live::Mode::Quiet {
        println!("{}", live::summary_text(&timeline));
        println!("timeline: {}", out.join(timeline::TIMELINE_JSON).display());
    }
    if interrupted {
        bail!("interrupted: the timeline so far is in {}", out.display());
    }
    Ok(timeline)
}

async fn seed_crawl(
    client: &reqwest::Client,
    front: &str,
    seeds: Vec<String>,
    crawl: &profile::CrawlSpec,
) -> String {
    let sent = client
        .post(format!("{front}/crawl"))
        .json(&protocol::CrawlRequest {
            seeds,
            max_depth: crawl.max_depth,
            max_pages: crawl.max_pages,
        })
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let accepted = body["accepted"].as_array().map_or(0, Vec::len);
            format!("POST /crawl: {status}, {accepted} seeds accepted")
        }
        Err(e) => format!("POST /crawl failed: {e}"),
    }
}
