//! `loadtest`: the bundled harness. `loadtest web` serves the synthetic web or prints its oracle;
//! `loadtest run` loads an organism following a profile and records its timeline; `loadtest
//! report` draws it;
//! `loadtest bench crawl` benchmarks whole organisms against it; `loadtest bench heal` measures
//! how fast one heals; `loadtest bench grow` how it finds its size.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use synthweb::{ServedLog, SyntheticWeb, WebSpec};

#[derive(Parser)]
#[command(name = "loadtest", about = "The organism's bundled load-test harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the deterministic synthetic web on one port, or print the URLs a correct crawler
    /// indexes (--expect).
    Web(WebArgs),
    /// Client search load on an organism following a profile (open model), with optional
    /// crawl seeding and chaos; a live view; a timeline per second and its report in --out.
    Run(loadtest::run::RunArgs),
    /// Draw a run's timeline (from `loadtest run --out DIR`) as PNG and SVG plots and one
    /// self-contained HTML report, in that directory.
    Report {
        /// The run's --out directory.
        dir: std::path::PathBuf,
    },
    /// Benchmarks of whole organisms.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// `loadtest bench`: the commands of [`loadtest::bench`] (`crawl`) and `heal`.
#[derive(Subcommand)]
enum BenchCommand {
    #[command(flatten)]
    Bench(loadtest::bench::BenchCommand),
    /// Kill cells of each role with SIGKILL under a client search load and report how fast the
    /// organism declares each death and serves a replacement, and the client requests that
    /// failed.
    Heal(loadtest::heal::HealArgs),
    /// How the organism finds its size: the homeostasis simulation at 10,000 cells, then a step
    /// of search load on a real organism (time to decide, to serve, reversals, back to minimum).
    Grow(loadtest::grow::GrowArgs),
    /// Search latency and throughput under open-model load at each of several rates, on
    /// `cell up --demo` after its crawl (or on --target).
    Search(loadtest::bench_search::SearchArgs),
}

#[derive(Args)]
struct WebArgs {
    /// Generation seed: the same seed gives the same web everywhere.
    #[arg(long, default_value_t = WebSpec::default().seed)]
    seed: u64,
    /// HTML pages, home pages included.
    #[arg(long, default_value_t = WebSpec::default().pages)]
    pages: usize,
    /// Host names.
    #[arg(long, default_value_t = WebSpec::default().hosts)]
    hosts: usize,
    /// Delay before answering each request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Address to serve on (loopback).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Print the expected indexed URLs, one per line, and exit without serving.
    #[arg(long)]
    expect: bool,
    /// With --expect: explore links only up to this depth (seeds are depth 0).
    #[arg(long, requires = "expect")]
    max_depth: Option<u32>,
    /// Print the web's feature counts and exit without serving.
    #[arg(long, conflicts_with = "expect")]
    stats: bool,
    /// Describe what these URLs answer and why, and exit without serving.
    #[arg(long, conflicts_with_all = ["expect", "stats"])]
    describe: bool,
    /// Print N rare words (on 1 to 5 indexed pages) with their pages, and exit without serving.
    #[arg(long, value_name = "N", conflicts_with_all = ["expect", "stats", "describe"])]
    rare: Option<usize>,
    /// With --expect: seed URLs (default: the web's own seeds). With --describe: the URLs.
    #[arg(value_name = "URL")]
    urls: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // sqlx reports every query slower than a second, and PostgreSQL's notices, at
                // info: noise in a benchmark's output.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Web(args) => web_command(args).await,
        Command::Run(args) => loadtest::run::run_command(&args).await,
        Command::Report { dir } => loadtest::report::report_command(&dir),
        Command::Bench(BenchCommand::Bench(command)) => loadtest::bench::run(command).await,
        Command::Bench(BenchCommand::Heal(args)) => loadtest::heal::heal_command(&args).await,
        Command::Bench(BenchCommand::Grow(args)) => loadtest::grow::grow_command(&args).await,
        Command::Bench(BenchCommand::Search(args)) => {
            loadtest::bench_search::search_command(&args).await
        }
    };
    match result {
        // `loadtest web --expect | head` is not an error.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn web_command(args: WebArgs) -> anyhow::Result<()> {
    let spec = WebSpec {
        seed: args.seed,
        pages: args.pages,
        hosts: args.hosts,
        latency: Duration::from_millis(args.latency_ms),
    };
    let web = SyntheticWeb::generate(&spec);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.expect {
        let seeds = if args.urls.is_empty() {
            web.seeds()
        } else {
            for url in &args.urls {
                if synthweb::normalize(url).is_none() {
                    bail!("seed {url:?} is not an absolute http URL");
                }
            }
            args.urls
        };
        for url in web.expect(&seeds, args.max_depth) {
            writeln!(out, "{url}")?;
        }
        out.flush()?;
        return Ok(());
    }
    if args.stats {
        writeln!(out, "{:#?}", web.stats())?;
        let expected = web.expect(&web.seeds(), None).len();
        writeln!(out, "expected from seeds(): {expected}")?;
        out.flush()?;
        return Ok(());
    }
    if args.describe {
        for url in &args.urls {
            writeln!(out, "{}", web.describe(url))?;
        }
        out.flush()?;
        return Ok(());
    }
    if let Some(n) = args.rare {
        for (word, urls) in web.rare_words(n) {
            writeln!(out, "{word} {}", urls.join(" "))?;
        }
        out.flush()?;
        return Ok(());
    }
    if !args.listen.ip().is_loopback() {
        bail!("--listen {} is not a loopback address", args.listen);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    writeln!(
        out,
        "addr={addr} suffix={} hosts={} pages={} seed={}",
        web.host_suffix(),
        web.hosts().len(),
        web.page_count(),
        spec.seed
    )?;
    for seed in web.seeds() {
        writeln!(out, "{seed}")?;
    }
    out.flush()?;
    drop(out);
    let shutdown = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c; serving until killed");
            std::future::pending::<()>().await;
        }
    };
    synthweb::serve(Arc::new(web), listener, ServedLog::counting(), shutdown)
        .await
        .context("serving the synthetic web")
}
