//! `loadtest bench heal`: how fast the organism heals. It starts an organism (`cell up`) on a
//! small synthetic web served in this process, seeds the crawl, keeps a client search load on
//! both front doors, follows the health checkers' event streams, and then kills cells with
//! SIGKILL, role after role, one at a time: for each kill it measures how long the health
//! checkers took to declare the death (detection) and how long until a replacement, a new cell
//! of the role whose `parent` is the dead cell, was serving; and it counts the client requests
//! that failed meanwhile.
//!
//! Times are wall-clock milliseconds since the Unix epoch on this machine: the kill instant is
//! read just before the signal, the checkers stamp their events with the same clock.
//!
//! Architecture Invariant: like `bench crawl`, this drives the organism only from outside, as
//! an operator would: a configuration file, `cell up`, HTTP, and signals to the cells' pids.

mod killer;
pub mod load;
pub mod matching;
pub mod report;
mod watch;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;
use synthweb::{ServedLog, Serving, SyntheticWeb, WebSpec};
use tokio_util::sync::CancellationToken;

use crate::organism::{Launch, Organism};
use killer::Killer;
use load::ClientRecord;
use matching::EventBook;
use report::{KillRecord, Phase, RoleRow};
use watch::{watch_events, Watch};

/// The roles this benchmark kills, in its default order.
pub const ROLES: &[&str] = &["api", "crawler", "frontdoor", "healthchecker"];

#[derive(Args, Debug, Clone)]
pub struct HealArgs {
    /// Kills per role [default: 20; 3 with --quick].
    #[arg(long)]
    pub kills: Option<usize>,
    /// Roles to kill, in order, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "api,crawler,frontdoor,healthchecker"
    )]
    pub roles: Vec<String>,
    /// A smoke run: 3 kills per role (an explicit --kills wins).
    #[arg(long)]
    pub quick: bool,
    /// Print JSON lines (each kill, each role, each failed request) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The `cell` executable [default: `cell` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub cell: Option<PathBuf>,
    /// HTML pages of the synthetic web.
    #[arg(long, default_value_t = 500)]
    pub pages: usize,
    /// Host names of the synthetic web.
    #[arg(long, default_value_t = 10)]
    pub hosts: usize,
    /// Generation seed of the synthetic web.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Concurrent search clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Pause of each client between two searches, ms.
    #[arg(long, default_value_t = 10)]
    pub client_pause_ms: u64,
    /// Timeout of one client request (one attempt), ms.
    #[arg(long, default_value_t = 2000)]
    pub request_timeout_ms: u64,
    /// Client load (and crawling) before the first kill, seconds: a baseline for the failure
    /// counts, and front doors that know their api cells.
    #[arg(long, default_value_t = 3)]
    pub warmup_secs: u64,
    /// Pause after a role is back at its minimum, before the next kill, ms.
    #[arg(long, default_value_t = 500)]
    pub settle_ms: u64,
    /// Longest wait for a death to be declared and its replacement to serve, seconds.
    #[arg(long, default_value_t = 30)]
    pub replace_timeout_secs: u64,
    /// Write every client request (time, front door, outcome, retry) as JSON lines here.
    #[arg(long, value_name = "FILE")]
    pub requests_log: Option<PathBuf>,
    /// How long each cell may drain when the organism stops, seconds.
    #[arg(long, default_value_t = 5)]
    pub grace_secs: u64,
    /// Keep the run's directory (configuration, `cell up` log, engines).
    #[arg(long)]
    pub keep_dir: bool,
}

impl HealArgs {
    pub fn effective_kills(&self) -> usize {
        self.kills.unwrap_or(if self.quick { 3 } else { 20 })
    }
}

/// Milliseconds since the Unix epoch, as the health checkers stamp their events.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// `loadtest bench heal`.
pub async fn heal_command(args: &HealArgs) -> anyhow::Result<()> {
    let kills = args.effective_kills();
    for role in &args.roles {
        if !ROLES.contains(&role.as_str()) {
            bail!(
                "--roles: {role:?} is not a role this benchmark kills (roles: {})",
                ROLES.join(", ")
            );
        }
    }
    if args.roles.is_empty() || kills == 0 {
        bail!("nothing to kill: give --roles and --kills of at least 1");
    }
    if args.hosts == 0 || args.pages < args.hosts {
        bail!("--pages must be at least --hosts, and --hosts at least 1");
    }
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let cell = crate::bench::locate_cell(args.cell.as_deref())?;
    let dir = tempfile::Builder::new()
        .prefix("homeostat-heal-")
        .tempdir()
        .context("creating a temporary directory")?;
    let web = Arc::new(SyntheticWeb::generate(&WebSpec {
        seed: args.seed,
        pages: args.pages,
        hosts: args.hosts,
        latency: Duration::ZERO,
    }));
    // Served until the benchmark ends, however it ends.
    let server = Serving::start(web.clone(), ServedLog::counting())
        .await
        .context("serving the synthetic web")?;
    let text = infra_toml(&dir.path().join("data"), web.host_suffix(), server.addr);
    let cfg = infra::Config::parse(&text, "the heal benchmark's configuration")?;
    let infra_path = dir.path().join("organism.toml");
    std::fs::write(&infra_path, &text)
        .with_context(|| format!("writing {}", infra_path.display()))?;
    let minimums: Vec<(String, u32)> = ROLES
        .iter()
        .map(|r| (r.to_string(), cfg.bounds(r).min))
        .collect();

    let interrupt = CancellationToken::new();
    // SIGINT/SIGTERM stop the organism of the run rather than orphan it (a supervisor killed
    // by a signal could not stop its cells).
    vitals::cancel_on_signals(interrupt.clone());
    eprintln!(
        "heal: starting {} up ({} pages on {} hosts; minimums {})",
        cell.display(),
        web.page_count(),
        web.hosts().len(),
        minimums
            .iter()
            .map(|(r, m)| format!("{r} {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let launch = Launch::bench(
        cell,
        infra_path,
        dir.path(),
        Duration::from_secs(args.grace_secs),
    );
    let mut up = Organism::start(&launch, &interrupt).await?;
    eprintln!(
        "heal: up; front doors {}; health checkers {}",
        up.frontdoors.join(" "),
        up.healthcheckers.join(" ")
    );
    let bench = Bench {
        args,
        kills,
        minimums,
        web: &web,
        interrupt: interrupt.clone(),
    };
    let result = bench.run(&mut up).await;
    eprintln!("heal: stopping the organism (SIGTERM to cell up)");
    let stopped = up.stop().await;
    drop(server);
    if args.keep_dir {
        let kept = dir.keep();
        eprintln!("heal: kept the run's files in {}", kept.display());
    }
    result?;
    stopped
}

/// The organism's configuration: the synthetic web resolved on loopback, api and crawler at
/// two cells each, front doors and health checkers at their default two.
pub fn infra_toml(data_dir: &Path, suffix: &str, web: std::net::SocketAddr) -> String {
    format!(
        r#"# Written by loadtest bench heal.
[organism]
data_dir = "{data}"

[roles.api]
min = 2
max = 4

[roles.crawler]
min = 2
max = 8

[engines]
database = "sqlite"
queue = "sqlite"

[queue]
lease_secs = 5
max_deliveries = 5

[api]
listen = "127.0.0.1:0"

[frontdoor]
listen = "127.0.0.1:0"

[crawler.fetch]
per_host_rate = 200.0
per_host_concurrency = 8
allow_addresses = ["127.0.0.1/32"]
connect_timeout_ms = 2000
total_timeout_ms = 5000

[crawler.fetch.resolve]
"{suffix}" = "{web}"
"#,
        data = data_dir.display().to_string().replace('\\', "\\\\"),
    )
}

struct Bench<'a> {
    args: &'a HealArgs,
    kills: usize,
    minimums: Vec<(String, u32)>,
    web: &'a SyntheticWeb,
    interrupt: CancellationToken,
}

/// JSON lines of `--json`.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum JsonLine<'a> {
    Kill(&'a KillRecord),
    Role(&'a RoleRow),
    Failure {
        role: &'a str,
        #[serde(flatten)]
        request: &'a ClientRecord,
        description: String,
    },
}

fn print_json(line: &JsonLine<'_>) {
    crate::json_lines::print("heal", line);
}

impl Bench<'_> {
    async fn run(&self, up: &mut Organism) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .no_proxy()
            // In cluster mode `/cells` and `/events` take the read token.
            .default_headers(control::read_headers_from_env())
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        let hcs = up.healthcheckers.clone();
        let doors = up.frontdoors.clone();
        if hcs.len() < 2 || doors.is_empty() {
            bail!("cell up reported health checkers {hcs:?} and front doors {doors:?}: need two health checkers and a front door");
        }
        let stop = CancellationToken::new();
        let _stop_guard = stop.clone().drop_guard();
        let watch = Arc::new(Watch {
            book: Mutex::new(EventBook::default()),
            connected: hcs.iter().map(|_| AtomicBool::new(false)).collect(),
        });
        for (i, hc) in hcs.iter().enumerate() {
            tokio::spawn(watch_events(i, hc.clone(), watch.clone(), stop.clone()));
        }

        // Seed the crawl through the first front door.
        let resp = http
            .post(format!("{}/crawl", doors[0]))
            .json(&protocol::CrawlRequest {
                seeds: self.web.seeds(),
                max_depth: None,
                max_pages: None,
            })
            .send()
            .await
            .context("seeding the crawl (POST /crawl)")?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("POST /crawl answered {status}: {body}");
        }
        let mut words: Vec<String> = self
            .web
            .rare_words(40)
            .into_iter()
            .map(|(w, _)| w)
            .filter(|w| w.chars().all(|c| c.is_ascii_alphanumeric()))
            .collect();
        if words.is_empty() {
            words.push("homeostat".into());
        }
        let load_stop = CancellationToken::new();
        let clients = load::start(
            load::LoadSpec {
                clients: self.args.clients,
                frontdoors: doors.clone(),
                words,
                pause: Duration::from_millis(self.args.client_pause_ms),
                timeout: Duration::from_millis(self.args.request_timeout_ms),
            },
            load_stop.clone(),
        )?;
        eprintln!(
            "heal: crawl seeded; {} clients searching through {}",
            self.args.clients,
            doors.join(" and ")
        );

        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(self.args.warmup_secs)) => {}
            _ = self.interrupt.cancelled() => {}
        }

        let killer = Killer {
            bench: self,
            http: &http,
            hcs: &hcs,
            watch: &watch,
        };
        let mut kills: Vec<KillRecord> = Vec::new();
        let mut phases: Vec<Phase> = Vec::new();
        let mut failure: Option<anyhow::Error> = None;
        'roles: for role in &self.args.roles {
            let start_ms = unix_ms();
            for index in 1..=self.kills {
                if self.interrupt.is_cancelled() {
                    failure = Some(anyhow::anyhow!("interrupted"));
                    break;
                }
                if let Some(status) = up.exited() {
                    failure = Some(anyhow::anyhow!(
                        "cell up exited ({status}) during the benchmark{}",
                        up.log_tail()
                    ));
                    break;
                }
                match killer.kill_one(role, index).await {
                    Ok(record) => {
                        if self.args.json {
                            print_json(&JsonLine::Kill(&record));
                        }
                        eprintln!("heal: {}", report::describe_kill(&record, self.kills));
                        kills.push(record);
                    }
                    Err(e) => {
                        failure = Some(e.context(format!("{role} kill {index}")));
                        break;
                    }
                }
            }
            phases.push(Phase {
                role: role.clone(),
                start_ms,
                end_ms: unix_ms(),
            });
            if failure.is_some() {
                break 'roles;
            }
        }

        load_stop.cancel();
        let mut records: Vec<ClientRecord> = Vec::new();
        for c in clients {
            records.extend(c.await.unwrap_or_default());
        }
        records.sort_by_key(|r| r.start_ms);
        stop.cancel();
        let (missed, unknown, events) = {
            let book = watch.book();
            (book.missed, book.unknown, book.len())
        };
        if let Some(path) = &self.args.requests_log {
            write_requests(path, &records)?;
        }

        let rows = report::rows(&phases, &kills, &records, &doors);
        if self.args.json {
            for row in &rows {
                print_json(&JsonLine::Role(row));
            }
            for r in &records {
                if r.first.is_ok() {
                    continue;
                }
                let role = phases
                    .iter()
                    .find(|p| r.start_ms >= p.start_ms && r.start_ms < p.end_ms)
                    .map_or("-", |p| p.role.as_str());
                print_json(&JsonLine::Failure {
                    role,
                    request: r,
                    description: report::describe_failure(r, &kills, &doors),
                });
            }
        } else {
            let mut out = report::render_table(&rows);
            out.push_str(&report::render_failures(
                &rows, &records, &phases, &kills, &doors, 2,
            ));
            print!("{out}");
            let _ = std::io::stdout().flush();
        }
        for row in &rows {
            role_figures(row).print(self.args.json);
        }
        eprintln!(
            "heal: {} client requests; {events} events from the health checkers ({missed} missed, {unknown} not understood)",
            records.len()
        );
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A role's row as the benchmarks' figures (`crate::figures`), printed after the table.
fn role_figures(row: &RoleRow) -> crate::figures::Figures {
    let mut f = crate::figures::Figures::new("heal", format!("kills of {}", row.role));
    let n = |v: usize| Some(v as f64);
    f.add("kills", n(row.kills), "");
    f.add("deaths declared", n(row.detected), "");
    f.add("replacements serving", n(row.replaced), "");
    for (name, p) in [
        ("detection", &row.detection_ms),
        ("replacement serving", &row.replacement_serving_ms),
    ] {
        f.add(
            &format!("{name} p50"),
            p.as_ref().map(|p| p.p50 as f64),
            "ms",
        );
        f.add(
            &format!("{name} p99"),
            p.as_ref().map(|p| p.p99 as f64),
            "ms",
        );
        f.add(
            &format!("{name} max"),
            p.as_ref().map(|p| p.max as f64),
            "ms",
        );
    }
    f.add("client requests", Some(row.load.requests as f64), "");
    f.add("failed (after retry)", Some(row.load.failed as f64), "");
    f.add(
        "failed first attempts",
        Some(row.load.failed_first as f64),
        "",
    );
    f
}

fn write_requests(path: &Path, records: &[ClientRecord]) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        writeln!(out)?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_is_valid_with_the_minimums_asked() {
        let text = infra_toml(
            Path::new("/tmp/heal/data"),
            "web.test",
            "127.0.0.1:9".parse().expect("addr"),
        );
        let cfg = infra::Config::parse(&text, "test").expect("valid");
        assert_eq!(cfg.bounds("api").min, 2);
        assert_eq!(cfg.bounds("crawler").min, 2);
        assert_eq!(cfg.bounds("frontdoor").min, 2);
        assert_eq!(cfg.bounds("healthchecker").min, 2);
        assert_eq!(cfg.raw.frontdoor.listen, "127.0.0.1:0");
        assert_eq!(cfg.raw.api.listen, "127.0.0.1:0");
    }

    #[test]
    fn kills_default_to_twenty_or_three_quick() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            heal: HealArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("heal").chain(args.iter().copied()))
                .expect("parses")
                .heal
        };
        assert_eq!(parse(&[]).effective_kills(), 20);
        assert_eq!(parse(&["--quick"]).effective_kills(), 3);
        assert_eq!(parse(&["--quick", "--kills", "5"]).effective_kills(), 5);
        assert_eq!(parse(&[]).roles, ROLES);
        assert_eq!(
            parse(&["--roles", "api,frontdoor"]).roles,
            ["api", "frontdoor"]
        );
    }
}
