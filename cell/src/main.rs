//! `cell`: the stem-cell binary. Parses arguments, sets up tracing, and becomes what it is told:
//! a whole organism on this machine (`cell up`), one role (`cell run ROLE`), or a reporter
//! (`cell status`). The roles themselves live in their library crates.

mod assemble;
mod boot;
mod engines_setup;
mod handover;
mod openapi;
mod pool_setup;
mod run;
mod status;
mod up;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cell",
    version,
    about = "Homeostat: a search crawler that runs itself"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole organism on this machine and keep it alive until Ctrl-C.
    Up(up::UpArgs),
    /// Become one role in this process.
    Run(run::RunArgs),
    /// A blank pool machine: join the organism with a one-time token, then become the role it
    /// is given.
    Boot(boot::BootArgs),
    /// Show the cells of the organism started by `cell up` and how they are.
    Status(status::StatusArgs),
    /// Replace the organism's cells, one by one, with a new build while it serves; roll back
    /// to the old build if the new one fails.
    Upgrade(upgrade::UpgradeArgs),
}

/// glibc's allocator gives each thread that allocates an arena of its own (up to eight per
/// core), and memory freed in one arena is not reused by another: an api's threads (the
/// runtime's workers, SQLite's connection threads, blocking tasks) held 64-65 MB at their peak
/// on a 50,000-page crawl, 40 MB with two arenas, at the same speed (BENCHMARKS.md). Two arenas
/// unless the operator says otherwise (`MALLOC_ARENA_MAX`). Before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no thread has started yet.
        #[allow(unsafe_code)] // glibc's mallopt has no safe wrapper in nix
        unsafe {
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // This executable's build (a digest of its bytes) is named in every heartbeat.
    control::build::start();
    openapi::publish();
    // The recorder first: what the roles register while they are assembled is kept.
    vitals::metrics_handle();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOMEOSTAT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off")),
        )
        .with_writer(std::io::stderr)
        // A cell outlives the factory that started it, and with it the pipe its stderr goes to:
        // a log line that cannot be written is dropped, never reported with eprintln! (which
        // panics on a closed pipe, killing whatever task logged).
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cell: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::up(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Boot(args) => boot::boot(args).await,
            Command::Status(args) => status::status(args).await,
            Command::Upgrade(args) => upgrade::upgrade(args).await,
        }
    });
    // A blocking read of stdin (the supervisor's pipe) never returns by itself: do not wait
    // for it, or any other straggler, once the role has drained.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(cfg) = e.downcast_ref::<infra::ConfigError>() {
                eprintln!("cell: {cfg}");
                return ExitCode::from(infra::EXIT_BAD_CONFIG as u8);
            }
            eprintln!("cell: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Load the organism's configuration, or the embedded default.
pub(crate) fn load_config(path: Option<&PathBuf>) -> anyhow::Result<infra::Config> {
    Ok(infra::Config::load(path.map(PathBuf::as_path))?)
}

/// Cancel a token on SIGINT or SIGTERM (the one copy is in `vitals`).
pub(crate) use vitals::cancel_on_signals;
