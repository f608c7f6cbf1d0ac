//! `loadtest bench`: benchmarks of the whole organism.
//!
//! `loadtest bench crawl` starts real organisms (`cell up`) against the synthetic web served in
//! this process, crawls it from its seeds, and reports per (engine, latency) how fast the
//! frontier drained, how much of the oracle's set was indexed, and what each cell cost in
//! memory and CPU. Every latency runs the embedded default and each `--infra` file, so their
//! throughputs are compared under the same conditions.
//!
//! Architecture Invariant: the benchmark drives the organism only from outside, as an operator
//! would: a configuration file, `cell up`, HTTP (`POST /crawl`, `GET /stats`), `/proc`, and the
//! store read after the crawl. It changes nothing in the cells it measures.

pub mod engines_per_run;
pub mod overlay;
pub mod procfs;
pub mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::organism::{Launch, Organism};
use engines_per_run::{effective, Engine, FreshDatabase, StoreAt};
use overlay::BenchOverlay;
use report::{CellUsage, Completeness, Ratio, Row, EMBEDDED};
use synthweb::{ServedLog, Serving, SyntheticWeb, WebSpec};

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Crawl the synthetic web with whole organisms (`cell up`) and report throughput,
    /// completeness against the oracle, and each cell's peak memory and CPU.
    Crawl(CrawlArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CrawlArgs {
    /// HTML pages of the synthetic web [default: 5000; 500 with --quick].
    #[arg(long)]
    pub pages: Option<usize>,
    /// Host names of the synthetic web.
    #[arg(long, default_value_t = 40)]
    pub hosts: usize,
    /// Generation seed of the synthetic web.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The web's delay before each answer, ms; one run per value, comma-separated
    /// [default: 0,10,20; 0 with --quick].
    #[arg(long, value_delimiter = ',', value_name = "MS")]
    pub latency_ms: Vec<u64>,
    /// A base organism configuration (e.g. cluster engines) to run as well as the embedded
    /// default; the bench overlays its own keys (data dir, listen, resolve, politeness).
    /// Repeatable.
    #[arg(long = "infra", value_name = "FILE")]
    pub infra: Vec<PathBuf>,
    /// The `cell` executable [default: `cell` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub cell: Option<PathBuf>,
    /// Longest one crawl may take to drain, seconds [default: 600, or 4 ms per page when
    /// that is longer: a million pages ran 947 s on a slow day].
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Print the rows (and ratios) as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A smoke run: 500 pages, latency 0 (explicit --pages / --latency-ms still win).
    #[arg(long)]
    pub quick: bool,
    /// crawler.fetch.per_host_rate: requests per second per host, for the whole organism.
    #[arg(long, default_value_t = 1000.0)]
    pub per_host_rate: f64,
    /// crawler.fetch.per_host_concurrency: requests in flight per host.
    #[arg(long, default_value_t = 16)]
    pub per_host_concurrency: u32,
    /// crawler.worker.concurrency: fetches in flight per crawler cell.
    #[arg(long, default_value_t = 128)]
    pub worker_concurrency: usize,
    /// Crawler cells (roles.crawler.min) [default: the configuration's].
    #[arg(long)]
    pub crawlers: Option<u32>,
    /// How long each cell may drain when the organism stops, seconds.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Keep each run's directory (configuration, `cell up` log, SQLite engines) instead of
    /// deleting it.
    #[arg(long)]
    pub keep_dirs: bool,
}

impl CrawlArgs {
    /// Pages of the synthetic web.
    pub fn effective_pages(&self) -> usize {
        self.pages.unwrap_or(if self.quick { 500 } else { 5000 })
    }

    /// How long one crawl may take to drain.
    pub fn effective_timeout(&self) -> Duration {
        let scaled = u64::try_from(self.effective_pages()).unwrap_or(u64::MAX) / 250;
        Duration::from_secs(self.timeout_secs.unwrap_or(scaled.max(600)))
    }

    /// Latencies to run at, ms, in order, without repeats.
    pub fn effective_latencies(&self) -> Vec<u64> {
        let mut latencies = if !self.latency_ms.is_empty() {
            self.latency_ms.clone()
        } else if self.quick {
            vec![0]
        } else {
            vec![0, 10, 20]
        };
        let mut seen = BTreeSet::new();
        latencies.retain(|l| seen.insert(*l));
        latencies
    }
}

/// Run a `loadtest bench` command, printing its results on stdout.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Crawl(args) => crawl_command(&args).await,
    }
}

/// `loadtest bench crawl`: run, print the table (or JSON lines) and the ratios; fail if any run
/// failed (after printing the others).
pub async fn crawl_command(args: &CrawlArgs) -> anyhow::Result<()> {
    let json = args.json;
    let outcome = crawl(args, |row| {
        if json {
            print_json(&JsonLine::Run(row));
        }
    })
    .await?;
    let ratios = report::ratios(&outcome.rows);
    if json {
        for ratio in &ratios {
            print_json(&JsonLine::Ratio(ratio));
        }
    } else if !outcome.rows.is_empty() {
        let mut out = report::render_table(&outcome.rows);
        if !ratios.is_empty() {
            out.push('\n');
            out.push_str(&report::render_ratios(&ratios));
        }
        print!("{out}");
        let _ = std::io::stdout().flush();
    }
    for row in &outcome.rows {
        row_figures(row).print(json);
    }
    if !outcome.notes.is_empty() {
        eprintln!();
        for note in &outcome.notes {
            eprintln!("note: {note}");
        }
    }
    if !outcome.failures.is_empty() {
        let mut msg = format!(
            "{} of {} runs failed:",
            outcome.failures.len(),
            outcome.failures.len() + outcome.rows.len()
        );
        for f in &outcome.failures {
            msg.push_str(&format!(
                "\n  {} at {} ms: {}",
                f.engine, f.latency_ms, f.error
            ));
        }
        bail!(msg);
    }
    Ok(())
}

/// A run's row as the benchmarks' figures (`crate::figures`), printed after the table.
fn row_figures(row: &Row) -> crate::figures::Figures {
    let mut f = crate::figures::Figures::new(
        "crawl",
        format!("{} at {} ms server latency", row.engine, row.latency_ms),
    );
    f.add("pages indexed", Some(row.pages as f64), "");
    f.add("pages expected", Some(row.expected as f64), "");
    f.add("complete", Some(row.completeness_pct), "%");
    f.add("crawl time", Some(row.seconds), "s");
    f.add("throughput", Some(row.pages_per_sec), "pages/s");
    f.add("frontier failed", Some(row.failed as f64), "urls");
    f
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum JsonLine<'a> {
    Run(&'a Row),
    Ratio(&'a Ratio),
}

fn print_json(line: &JsonLine<'_>) {
    crate::json_lines::print("bench", line);
}

/// What a whole benchmark gave.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub failures: Vec<Failure>,
    /// Things the user should know (e.g. engines that could not be made fresh).
    pub notes: Vec<String>,
}

#[derive(Debug)]
pub struct Failure {
    pub engine: String,
    pub latency_ms: u64,
    pub error: String,
}

/// One base configuration: the embedded default or an `--infra` file.
struct BaseConfig {
    label: String,
    /// For messages: the file's path, or the embedded default's name.
    source: String,
    text: String,
    /// Do `DATABASE_URL` / `AMQP_URL` apply (as they do to `cell up --infra FILE`)? Not for
    /// the embedded default: it is the single-machine column, whatever the environment says.
    consult_env: bool,
}

/// The library entry of `loadtest bench crawl`: every latency × every configuration, in that
/// order; `on_row` sees each row as soon as its run ends. A run that fails is recorded in
/// [`Outcome::failures`] and the others go on; Ctrl-C stops the organism of the current run,
/// records it as failed and skips the rest; bad arguments fail the whole call.
pub async fn crawl(args: &CrawlArgs, mut on_row: impl FnMut(&Row)) -> anyhow::Result<Outcome> {
    let cell = locate_cell(args.cell.as_deref())?;
    let pages = args.effective_pages();
    let latencies = args.effective_latencies();
    if args.hosts == 0 || pages < args.hosts {
        bail!(
            "--pages ({pages}) must be at least --hosts ({}), and --hosts at least 1",
            args.hosts
        );
    }
    let configs = base_configs(&args.infra)?;
    let interrupt = CancellationToken::new();
    // SIGINT/SIGTERM stop the organism of the run rather than orphan it (a supervisor killed
    // by a signal could not stop its cells).
    vitals::cancel_on_signals(interrupt.clone());
    let mut outcome = Outcome::default();
    // Printed once, at the end (`crawl_command`).
    let note = |outcome: &mut Outcome, text: String| {
        if !outcome.notes.contains(&text) {
            outcome.notes.push(text);
        }
    };
    let mut run_index = 0u32;
    'runs: for latency_ms in latencies {
        let spec = WebSpec {
            seed: args.seed,
            pages,
            hosts: args.hosts,
            latency: Duration::from_millis(latency_ms),
        };
        let web = Arc::new(SyntheticWeb::generate(&spec));
        let seeds = web.seeds();
        let expected = web.expect(&seeds, None);
        for config in &configs {
            if interrupt.is_cancelled() {
                break 'runs;
            }
            run_index += 1;
            eprintln!(
                "bench: {} at {latency_ms} ms latency: {} pages on {} hosts, {} expected",
                config.label,
                web.page_count(),
                web.hosts().len(),
                expected.len()
            );
            let run = Run {
                args,
                cell: &cell,
                config,
                web: web.clone(),
                seeds: &seeds,
                expected: &expected,
                tag: run_tag(run_index),
                interrupt: &interrupt,
            };
            let mut notes = Vec::new();
            match run.run(&mut notes).await {
                Ok(row) => {
                    eprintln!(
                        "bench: {} at {latency_ms} ms: {} pages, {:.1}% complete, {:.2} s, {:.0} pages/s",
                        row.engine, row.pages, row.completeness_pct, row.seconds, row.pages_per_sec
                    );
                    on_row(&row);
                    outcome.rows.push(row);
                }
                Err(e) => {
                    eprintln!("bench: {} at {latency_ms} ms failed: {e:#}", config.label);
                    outcome.failures.push(Failure {
                        engine: config.label.clone(),
                        latency_ms,
                        error: format!("{e:#}"),
                    });
                }
            }
            for text in notes {
                note(&mut outcome, text);
            }
            if interrupt.is_cancelled() {
                break 'runs;
            }
        }
    }
    Ok(outcome)
}

/// The `cell` executable: `--cell`, or `cell` next to this executable.
pub fn locate_cell(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .context("locating this executable's directory")?
            .join("cell"),
    };
    if !path.is_file() {
        bail!(
            "no cell executable at {}: build it with cargo build --release -p cell \
             (or pass --cell PATH)",
            path.display()
        );
    }
    Ok(path)
}

fn base_configs(files: &[PathBuf]) -> anyhow::Result<Vec<BaseConfig>> {
    let mut configs = vec![BaseConfig {
        label: EMBEDDED.to_string(),
        source: infra::DEFAULT_NAME.to_string(),
        text: infra::DEFAULT_ORGANISM.to_string(),
        consult_env: false,
    }];
    for path in files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --infra {}", path.display()))?;
        // Checked as it is first, so a mistake is reported with the file's own line numbers
        // before any run starts.
        infra::Config::parse(&text, &path.display().to_string())?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| path.display().to_string());
        let mut label = stem.clone();
        let mut n = 2;
        while configs.iter().any(|c| c.label == label) {
            label = format!("{stem}#{n}");
            n += 1;
        }
        configs.push(BaseConfig {
            label,
            source: path.display().to_string(),
            text,
            consult_env: true,
        });
    }
    Ok(configs)
}

/// A name part unique to this run: time, process and run number.
fn run_tag(run_index: u32) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{secs}_{}_{run_index}", std::process::id())
}

/// One run: one configuration at one latency.
struct Run<'a> {
    args: &'a CrawlArgs,
    cell: &'a Path,
    config: &'a BaseConfig,
    web: Arc<SyntheticWeb>,
    seeds: &'a [String],
    expected: &'a BTreeSet<String>,
    tag: String,
    interrupt: &'a CancellationToken,
}

impl Run<'_> {
    async fn run(&self, notes: &mut Vec<String>) -> anyhow::Result<Row> {
        let dir = tempfile::Builder::new()
            .prefix("homeostat-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        let data_dir = dir.path().join("data");
        // Served until the run ends, however it ends.
        let web = Serving::start(self.web.clone(), ServedLog::counting())
            .await
            .context("serving the synthetic web")?;

        let base: toml::Table = self
            .config
            .text
            .parse()
            .with_context(|| format!("reading {} as TOML", self.config.source))?;
        let env_of = |key: &str| {
            self.config
                .consult_env
                .then(|| std::env::var(key).ok())
                .flatten()
        };
        let database = effective(
            overlay::get_str(&base, &["engines", "database"]),
            env_of("DATABASE_URL"),
        );
        let queue = effective(
            overlay::get_str(&base, &["engines", "queue"]),
            env_of("AMQP_URL"),
        );
        let mut env: Vec<(String, Option<String>)> = Vec::new();
        if std::env::var_os("HOMEOSTAT_LOG").is_none() {
            env.push(("HOMEOSTAT_LOG".into(), Some("warn".into())));
        }
        let queue_name = match &queue {
            Engine::Amqp(url) => {
                let name = format!("homeostat.bench.{}", self.tag);
                env.push(("AMQP_URL".into(), Some(url.clone())));
                Some(name)
            }
            _ => {
                env.push(("AMQP_URL".into(), None));
                None
            }
        };
        let overlay = BenchOverlay {
            data_dir: data_dir.clone(),
            web_suffix: self.web.host_suffix().to_string(),
            web_addr: web.addr,
            per_host_rate: self.args.per_host_rate,
            per_host_concurrency: self.args.per_host_concurrency,
            worker_concurrency: self.args.worker_concurrency,
            crawlers: self.args.crawlers,
            queue_name: queue_name.clone(),
            sqlite_database: database == Engine::Sqlite,
            sqlite_queue: queue == Engine::Sqlite,
        };
        let text = overlay::apply_to_text(&self.config.text, &self.config.source, &overlay)?;
        let checked = format!("{} with the bench's keys", self.config.source);
        infra::Config::parse(&text, &checked)?;
        let infra_path = dir.path().join("organism.toml");
        std::fs::write(&infra_path, &text)
            .with_context(|| format!("writing {}", infra_path.display()))?;

        // Created last, so nothing above can fail and leave it behind.
        let mut fresh_db = None;
        let store = match &database {
            Engine::Postgres(url) => {
                let name = format!("homeostat_bench_{}", self.tag);
                match FreshDatabase::create(url, &name).await {
                    Ok(db) => {
                        env.push(("DATABASE_URL".into(), Some(db.url.clone())));
                        let store = StoreAt::Postgres(db.url.clone());
                        fresh_db = Some(db);
                        store
                    }
                    Err(e) => {
                        notes.push(format!(
                            "{}: could not create a database per run ({e:#}); the runs use {} \
                             as it is: it should be fresh (empty), or the frontier finds the \
                             web's URLs already known",
                            self.config.label,
                            infra::redact(url)
                        ));
                        env.push(("DATABASE_URL".into(), Some(url.clone())));
                        StoreAt::Postgres(url.clone())
                    }
                }
            }
            _ => {
                env.push(("DATABASE_URL".into(), None));
                StoreAt::of(&database, &data_dir)
            }
        };

        let launch = Launch {
            cell: self.cell.to_path_buf(),
            infra: infra_path,
            log: dir.path().join("cell-up.log"),
            env,
            grace: Duration::from_secs(self.args.grace_secs),
            ready_timeout: Duration::from_secs(120),
            args: Vec::new(),
        };
        let result = match Organism::start(&launch, self.interrupt).await {
            Ok(mut organism) => {
                let measured = self.measure(&mut organism, &web, &store).await;
                let stopped = organism.stop().await;
                match (measured, stopped) {
                    (Ok(row), Ok(())) => Ok(row),
                    (Ok(row), Err(e)) => {
                        notes.push(format!(
                            "{} at {} ms: measured, but stopping failed: {e:#}",
                            self.config.label,
                            self.web.spec().latency.as_millis()
                        ));
                        Ok(row)
                    }
                    (Err(e), _) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        drop(web);
        // The run's queues are never used again, and a quorum queue holds file handles on the
        // broker until it is deleted.
        if let (Engine::Amqp(url), Some(name)) = (&queue, &queue_name) {
            if let Err(e) = engines::rabbitmq::delete_queues(url, name).await {
                notes.push(format!(
                    "could not delete the run's queue {name} on {}: {e}",
                    infra::redact(url)
                ));
            }
        }
        if let Some(db) = fresh_db {
            let name = db.name.clone();
            if let Err(e) = db.drop_database().await {
                notes.push(format!("could not drop the database {name}: {e:#}"));
            }
        }
        if self.args.keep_dirs {
            let kept = dir.keep();
            notes.push(format!(
                "{} at {} ms: kept the run's files in {}",
                self.config.label,
                self.web.spec().latency.as_millis(),
                kept.display()
            ));
        }
        result
    }

    /// Seed the crawl, wait for the frontier to drain, and measure.
    async fn measure(
        &self,
        organism: &mut Organism,
        web: &Serving,
        store: &StoreAt,
    ) -> anyhow::Result<Row> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        // The cells alive when the crawl starts.
        let wait = Instant::now();
        let at_start = loop {
            match organism.refresh().await {
                Some(cells) if !cells.is_empty() => break cells,
                _ if wait.elapsed() > Duration::from_secs(5) => {
                    bail!(
                        "cannot list the organism's cells (no registry answer, no \
                         HOMEOSTAT_CELL line){}",
                        organism.log_tail()
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let at_start: BTreeSet<u32> = at_start.iter().map(|c| c.pid).collect();
        let mut usage = Usage::default();
        usage.sample(organism.seen().keys());
        let bench_cpu_start = procfs::own_cpu_seconds();
        let cpu_window = Instant::now();

        let started = Instant::now();
        let resp = client
            .post(format!("{}/crawl", organism.front))
            .json(&serde_json::json!({ "seeds": self.seeds }))
            .send()
            .await
            .context("POST /crawl")?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("POST /crawl answered {status}: {body}");
        }
        let timeout = self.args.effective_timeout();
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drained_at: Option<Instant> = None;
        let mut last: protocol::Stats;
        let mut ticks = 0u64;
        let elapsed = loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.interrupt.cancelled() => bail!("interrupted"),
            }
            if let Some(status) = organism.exited() {
                bail!(
                    "cell up exited ({status}) during the crawl{}",
                    organism.log_tail()
                );
            }
            // The registry twice a second (cells come and go rarely); /proc every tick.
            ticks += 1;
            if ticks % 5 == 0 {
                organism.refresh().await;
            }
            usage.sample(organism.seen().keys());
            let stats = match get_stats(&client, &organism.front).await {
                Ok(stats) => stats,
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "GET /stats");
                    continue;
                }
            };
            let ended = stats.frontier.crawled + stats.frontier.failed;
            if stats.frontier.drained() && ended > 0 {
                // Drained twice in a row: the second look confirms the first.
                match drained_at {
                    Some(at) => {
                        last = stats;
                        break at - started;
                    }
                    None => drained_at = Some(Instant::now()),
                }
            } else {
                drained_at = None;
            }
            last = stats;
            if started.elapsed() > timeout {
                let f = &last.frontier;
                bail!(
                    "the frontier did not drain within {timeout:?} (pending {}, in flight {}, \
                     crawled {}, failed {})",
                    f.pending,
                    f.in_flight,
                    f.crawled,
                    f.failed
                );
            }
        };
        let seconds = elapsed.as_secs_f64();
        let at_end: BTreeSet<u32> = organism
            .refresh()
            .await
            .map(|cells| cells.iter().map(|c| c.pid).collect())
            .unwrap_or_else(|| organism.seen().keys().copied().collect());
        usage.sample(organism.seen().keys());
        // CPU over the window between the first and the last sample (the crawl and its
        // confirmation poll).
        let window = cpu_window.elapsed().as_secs_f64();
        let cpu = usage.cpu_percent(window);
        let bench_cpu = match (bench_cpu_start, procfs::own_cpu_seconds()) {
            (Some(a), Some(b)) if window > 0.0 => Some(100.0 * (b - a) / window),
            _ => None,
        };
        let served = web.log.len();

        let indexed = store.indexed().await?;
        let completeness = Completeness::of(&indexed, self.expected);
        // Just before stopping: the peak of every cell still alive.
        usage.sample(organism.seen().keys());
        let cells = organism
            .seen()
            .values()
            .map(|c| CellUsage {
                name: c.name.clone(),
                role: c.role.clone(),
                pid: c.pid,
                generation: c.generation,
                changed: !at_start.contains(&c.pid) || !at_end.contains(&c.pid),
                peak_rss_mb: usage
                    .peak
                    .get(&c.pid)
                    .map(|b| *b as f64 / (1024.0 * 1024.0)),
                peak_own_mb: usage
                    .peak_anon
                    .get(&c.pid)
                    .map(|b| *b as f64 / (1024.0 * 1024.0)),
                cpu_percent: cpu.get(&c.pid).copied(),
            })
            .collect();
        Ok(Row {
            engine: self.config.label.clone(),
            latency_ms: u64::try_from(self.web.spec().latency.as_millis()).unwrap_or(u64::MAX),
            pages: completeness.indexed,
            expected: completeness.expected,
            found: completeness.found,
            completeness_pct: completeness.percent(),
            extra: completeness.extra,
            seconds,
            pages_per_sec: report::per_second(completeness.indexed as u64, seconds),
            served,
            crawled: last.frontier.crawled,
            failed: last.frontier.failed,
            cells,
            bench_cpu_percent: bench_cpu,
        })
    }
}

async fn get_stats(client: &reqwest::Client, api: &str) -> anyhow::Result<protocol::Stats> {
    client
        .get(format!("{api}/stats"))
        .send()
        .await
        .context("GET /stats")?
        .error_for_status()
        .context("GET /stats")?
        .json()
        .await
        .context("decoding /stats")
}

/// Peak memory and CPU time of every process seen, by pid.
#[derive(Default)]
struct Usage {
    /// Highest `VmHWM` read, bytes.
    peak: HashMap<u32, u64>,
    /// Highest `RssAnon` sampled, bytes.
    peak_anon: HashMap<u32, u64>,
    /// CPU seconds when first seen, and when last seen.
    cpu: BTreeMap<u32, (f64, f64)>,
}

impl Usage {
    fn sample<'a>(&mut self, pids: impl Iterator<Item = &'a u32>) {
        for &pid in pids {
            if let Some(status) = procfs::status(pid) {
                for (peaks, bytes) in [
                    (&mut self.peak, procfs::parse_vm_hwm(&status)),
                    (&mut self.peak_anon, procfs::parse_rss_anon(&status)),
                ] {
                    if let Some(bytes) = bytes {
                        let peak = peaks.entry(pid).or_default();
                        *peak = (*peak).max(bytes);
                    }
                }
            }
            if let Some(secs) = procfs::cpu_seconds(pid) {
                self.cpu
                    .entry(pid)
                    .and_modify(|(_, last)| *last = secs)
                    .or_insert((secs, secs));
            }
        }
    }

    /// CPU used between first and last sight, in percent of one core over `seconds` (the
    /// wall time between the first and the last sample).
    fn cpu_percent(&self, seconds: f64) -> HashMap<u32, f64> {
        if seconds <= 0.0 {
            return HashMap::new();
        }
        self.cpu
            .iter()
            .map(|(pid, (first, last))| (*pid, 100.0 * (last - first) / seconds))
            .collect()
    }
}
