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

pub mod load;
pub mod matching;
pub mod report;
pub mod sse;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Args;
use futures::StreamExt as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protocol::control::{CellRecord, CellState, CellsResponse};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::web::{ServedLog, SyntheticWeb, WebSpec};
use load::ClientRecord;
use matching::{Death, EventBook};
use report::{KillRecord, Phase, RoleRow};
use sse::{SseParser, StreamItem};

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
    let server = WebServer::start(web.clone()).await?;
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
    cancel_on_signals(interrupt.clone());
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
    let log = dir.path().join("cell-up.log");
    let mut up = Up::start(
        &cell,
        &infra_path,
        &log,
        Duration::from_secs(args.grace_secs),
        &interrupt,
    )
    .await?;
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

/// Shared with the event watchers.
struct Watch {
    book: Mutex<EventBook>,
    /// Per health checker: is its stream connected now?
    connected: Vec<AtomicBool>,
}

impl Watch {
    fn book(&self) -> std::sync::MutexGuard<'_, EventBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
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
    match serde_json::to_string(line) {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
        Err(e) => eprintln!("heal: cannot encode a result as JSON: {e}"),
    }
}

impl Bench<'_> {
    async fn run(&self, up: &mut Up) -> anyhow::Result<()> {
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
                        tail_of(&up.log)
                    ));
                    break;
                }
                match killer.kill_one(role, index).await {
                    Ok(record) => {
                        if self.args.json {
                            print_json(&JsonLine::Kill(&record));
                        }
                        eprintln!("heal: {}", describe_kill(&record, self.kills));
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

fn describe_kill(k: &KillRecord, of: usize) -> String {
    let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    let mut s = format!(
        "{} kill {}/{of}: {} (pid {}, {}): declared dead after {}",
        k.role,
        k.index,
        k.victim,
        k.pid,
        k.victim_addr,
        ms(k.detection_ms)
    );
    match &k.replacement {
        Some(r) => s.push_str(&format!(
            ", replacement {r} requested {}, born {}, serving {}",
            ms(k.requested_ms),
            ms(k.replacement_born_ms),
            ms(k.replacement_serving_ms)
        )),
        None => s.push_str(&format!(
            ", replacement seen in /cells {}",
            ms(k.replacement_in_cells_ms)
        )),
    }
    s.push_str(&format!(", back at minimum {}", ms(k.back_at_minimum_ms)));
    if let Some(note) = &k.note {
        s.push_str(&format!(" [{note}]"));
    }
    s
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

struct Killer<'a> {
    bench: &'a Bench<'a>,
    http: &'a reqwest::Client,
    hcs: &'a [String],
    watch: &'a Watch,
}

/// Cells of `role` that count toward its minimum (as the health checkers count them).
fn counted<'a>(cells: &'a CellsResponse, role: &str) -> Vec<&'a CellRecord> {
    cells
        .roles
        .get(role)
        .map(|v| {
            v.iter()
                .filter(|c| {
                    !matches!(
                        c.state,
                        CellState::Draining | CellState::Retired | CellState::Dead
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Killer<'_> {
    fn min(&self, role: &str) -> usize {
        self.bench
            .minimums
            .iter()
            .find(|(r, _)| r == role)
            .map_or(0, |(_, m)| *m as usize)
    }

    /// `GET /cells` from the first health checker in `order` that answers.
    async fn registry(&self, order: &[usize]) -> Option<(usize, CellsResponse)> {
        for &i in order {
            let Ok(resp) = self.http.get(format!("{}/cells", self.hcs[i])).send().await else {
                continue;
            };
            if let Ok(cells) = resp.json::<CellsResponse>().await {
                return Some((i, cells));
            }
        }
        None
    }

    /// Health checkers with a connected stream first.
    fn order(&self, avoid: Option<usize>) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.hcs.len()).filter(|i| Some(*i) != avoid).collect();
        v.sort_by_key(|i| !self.watch.connected[*i].load(Ordering::Relaxed));
        if let Some(a) = avoid {
            v.push(a);
        }
        v
    }

    /// Wait until every role is at its minimum and the streams that must see the next kill are
    /// connected.
    async fn wait_ready(&self, need_stream: &[usize]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let streams = need_stream
                .iter()
                .all(|i| self.watch.connected[*i].load(Ordering::Relaxed));
            let short = match self.registry(&self.order(None)).await {
                Some((_, cells)) => ROLES
                    .iter()
                    .filter(|r| counted(&cells, r).len() < self.min(r))
                    .map(|r| format!("{r} {}/{}", counted(&cells, r).len(), self.min(r)))
                    .collect::<Vec<_>>(),
                None => vec!["no health checker answered GET /cells".to_string()],
            };
            if streams && short.is_empty() {
                return Ok(());
            }
            if self.bench.interrupt.is_cancelled() {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!(
                    "the organism was not back at its minimums with its event streams within \
                     90 s (short: {short:?}; streams connected: {:?})",
                    self.watch
                        .connected
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kill one cell of `role` and follow its death and replacement.
    async fn kill_one(&self, role: &str, index: usize) -> anyhow::Result<KillRecord> {
        let min = self.min(role);
        // For a health checker: alternate the two, and measure from the other's stream.
        let target_hc = (role == "healthchecker").then(|| (index - 1) % self.hcs.len());
        let need: Vec<usize> = match target_hc {
            Some(t) => (0..self.hcs.len()).filter(|i| *i != t).collect(),
            None => (0..self.hcs.len()).collect(),
        };
        self.wait_ready(&need).await?;
        let (_, cells) = self
            .registry(&self.order(target_hc))
            .await
            .context("no health checker answered GET /cells")?;
        let mut candidates: Vec<&CellRecord> = counted(&cells, role)
            .into_iter()
            .filter(|c| c.pid.is_some() && c.state == CellState::Serving)
            .collect();
        if let Some(t) = target_hc {
            let at: Vec<&CellRecord> = candidates
                .iter()
                .copied()
                .filter(|c| report::same_addr(&c.addr, &self.hcs[t]))
                .collect();
            if !at.is_empty() {
                candidates = at;
            }
        }
        // The oldest: over the kills, every slot's cell is replaced in turn.
        let victim = candidates
            .iter()
            .max_by_key(|c| (c.age_ms, c.cell_id.clone()))
            .copied()
            .cloned()
            .with_context(|| format!("no serving {role} cell with a pid to kill"))?;
        let pid = victim.pid.unwrap_or_default();
        let raw = i32::try_from(pid).context("pid out of range")?;
        let kill_ms = unix_ms();
        kill(Pid::from_raw(raw), Signal::SIGKILL)
            .with_context(|| format!("kill -9 {pid} ({})", victim.cell_id))?;

        let mut record = KillRecord {
            role: role.to_string(),
            index,
            victim: victim.cell_id.clone(),
            pid,
            victim_addr: victim.addr.clone(),
            kill_ms,
            ..KillRecord::default()
        };
        let death = Death {
            victim: &victim.cell_id,
            role,
            kill_ms,
        };
        let deadline = Instant::now() + Duration::from_secs(self.bench.args.replace_timeout_secs);
        let mut next_poll = Instant::now();
        let mut matched;
        loop {
            matched = matching::match_death(&death, self.watch.book().events());
            if Instant::now() >= next_poll {
                next_poll = Instant::now() + Duration::from_millis(50);
                if let Some((_, cells)) = self.registry(&self.order(target_hc)).await {
                    let now = unix_ms();
                    let live = counted(&cells, role);
                    if record.replacement_in_cells_ms.is_none()
                        && live.iter().any(|c| {
                            c.parent.as_deref() == Some(victim.cell_id.as_str())
                                && c.cell_id != victim.cell_id
                        })
                    {
                        record.replacement_in_cells_ms = Some(now - kill_ms);
                    }
                    let back =
                        live.len() >= min && live.iter().all(|c| c.cell_id != victim.cell_id);
                    if back && record.back_at_minimum_ms.is_none() {
                        record.back_at_minimum_ms = Some(now - kill_ms);
                    } else if !back {
                        record.back_at_minimum_ms = None;
                    }
                }
            }
            let serving = matched
                .replacement
                .as_ref()
                .is_some_and(|r| r.serving_at_ms.is_some());
            if matched.dead_at_ms.is_some() && serving && record.back_at_minimum_ms.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let mut missing = Vec::new();
                if matched.dead_at_ms.is_none() {
                    missing.push("no dead event");
                }
                if !serving {
                    missing.push("no serving event of a replacement");
                }
                if record.back_at_minimum_ms.is_none() {
                    missing.push("not back at its minimum");
                }
                record.note = Some(format!(
                    "after {} s: {}",
                    self.bench.args.replace_timeout_secs,
                    missing.join(", ")
                ));
                break;
            }
            if self.bench.interrupt.is_cancelled() {
                record.note = Some("interrupted".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        record.detection_ms = matched.dead_at_ms.map(|t| t - kill_ms);
        record.detected_by = matched.dead_source.and_then(|s| self.hcs.get(s).cloned());
        record.requested_ms = matched.requested_at_ms.map(|t| t - kill_ms);
        if matched.candidates > 1 {
            let note = format!(
                "{} cells name {} as parent",
                matched.candidates, victim.cell_id
            );
            record.note = Some(match record.note.take() {
                Some(n) => format!("{n}; {note}"),
                None => note,
            });
        }
        if let Some(r) = matched.replacement {
            record.replacement_born_ms = r.born_at_ms.map(|t| t - kill_ms);
            record.replacement_serving_ms = r.serving_at_ms.map(|t| t - kill_ms);
            record.replacement = Some(r.cell_id);
        }
        tokio::time::sleep(Duration::from_millis(self.bench.args.settle_ms)).await;
        record.window_end_ms = unix_ms();
        Ok(record)
    }
}

/// Follow one health checker's `GET /events` until `stop`, reconnecting (to the same address,
/// where its replacement comes up) whenever the stream ends. Each connection replays the
/// checker's whole ring (`since=0`); the book drops the repeats.
async fn watch_events(source: usize, url: String, watch: Arc<Watch>, stop: CancellationToken) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        // In cluster mode `/cells` and `/events` take the read token.
        .default_headers(control::read_headers_from_env())
        .connect_timeout(Duration::from_secs(1))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("heal: cannot build the event stream client: {e}");
            return;
        }
    };
    while !stop.is_cancelled() {
        let sent = client
            .get(format!("{url}/events?since=0"))
            .header("accept", "text/event-stream")
            .send()
            .await;
        if let Ok(resp) = sent {
            if resp.status().is_success() {
                watch.connected[source].store(true, Ordering::Relaxed);
                let mut body = resp.bytes_stream();
                let mut parser = SseParser::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = body.next() => chunk,
                        _ = stop.cancelled() => None,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    let messages = parser.feed(&chunk);
                    if messages.is_empty() {
                        continue;
                    }
                    let mut book = watch.book();
                    for msg in messages {
                        match sse::interpret(&msg) {
                            StreamItem::Cell(event) => {
                                book.push(source, event);
                            }
                            StreamItem::Lagged(n) => book.missed += n,
                            StreamItem::Unknown => book.unknown += 1,
                        }
                    }
                }
                watch.connected[source].store(false, Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// The synthetic web, served in this process until dropped.
struct WebServer {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl WebServer {
    async fn start(web: Arc<SyntheticWeb>) -> anyhow::Result<WebServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the synthetic web")?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            let shutdown = async move { until.cancelled().await };
            if let Err(e) = crate::web::serve(web, listener, ServedLog::counting(), shutdown).await
            {
                eprintln!("heal: the synthetic web stopped: {e}");
            }
        });
        Ok(WebServer { addr, stop })
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A running `cell up`.
struct Up {
    child: Child,
    frontdoors: Vec<String>,
    healthcheckers: Vec<String>,
    log: PathBuf,
    grace: Duration,
}

/// `homeostat is up: 9 cells; frontdoor http://a http://b` -> the front doors.
pub fn parse_up_line(line: &str) -> Option<Vec<String>> {
    let rest = line.strip_prefix("homeostat is up: ")?;
    let list = rest.split("frontdoor ").nth(1)?;
    let doors: Vec<String> = list.split_whitespace().map(str::to_string).collect();
    (!doors.is_empty()).then_some(doors)
}

/// `  healthcheckers http://a http://b` -> the health checkers.
pub fn parse_healthcheckers_line(line: &str) -> Option<Vec<String>> {
    let list = line.trim().strip_prefix("healthcheckers ")?;
    let hcs: Vec<String> = list.split_whitespace().map(str::to_string).collect();
    (!hcs.is_empty()).then_some(hcs)
}

impl Up {
    async fn start(
        cell: &Path,
        infra: &Path,
        log: &Path,
        grace: Duration,
        interrupt: &CancellationToken,
    ) -> anyhow::Result<Up> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(cell);
        command
            .arg("up")
            .arg("--infra")
            .arg(infra)
            .arg("--grace-secs")
            .arg(grace.as_secs().max(1).to_string())
            // The configuration names the engines; the environment must not redirect them.
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        if std::env::var_os("HOMEOSTAT_LOG").is_none() {
            command.env("HOMEOSTAT_LOG", "warn");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} up", cell.display()))?;
        let stdout = child.stdout.take().context("taking cell up's stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Read stdout to its end, so `cell up` never blocks on a full pipe.
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut doors = Vec::new();
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(d) = parse_up_line(&line) {
                    doors = d;
                } else if let Some(hcs) = parse_healthcheckers_line(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((doors.clone(), hcs));
                    }
                }
            }
        });
        let limit = Duration::from_secs(150);
        let (frontdoors, healthcheckers) = tokio::select! {
            got = rx => match got {
                Ok(got) => got,
                Err(_) => {
                    let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                    bail!("cell up exited ({status}) before it was up{}", tail_of(log));
                }
            },
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                bail!("cell up exited ({status}) before it was up{}", tail_of(log));
            }
            _ = tokio::time::sleep(limit) => {
                signal(child.id(), Signal::SIGTERM);
                let _ = tokio::time::timeout(grace + Duration::from_secs(10), child.wait()).await;
                bail!("cell up was not up within {limit:?}{}", tail_of(log));
            }
            _ = interrupt.cancelled() => {
                signal(child.id(), Signal::SIGTERM);
                let _ = tokio::time::timeout(grace + Duration::from_secs(10), child.wait()).await;
                bail!("interrupted while the organism was starting");
            }
        };
        if frontdoors.is_empty() {
            signal(child.id(), Signal::SIGTERM);
            bail!("cell up did not print its front doors{}", tail_of(log));
        }
        Ok(Up {
            child,
            frontdoors,
            healthcheckers,
            log: log.to_path_buf(),
            grace,
        })
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// SIGTERM `cell up` and wait for it to drain its cells and exit; if it does not in time,
    /// SIGKILL it and every cell the registry knows.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pids = registry_pids(&self.healthcheckers).await;
        eprintln!("heal: stopping the organism (SIGTERM to cell up)");
        signal(self.child.id(), Signal::SIGTERM);
        let limit = self.grace + Duration::from_secs(20);
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("cell up exited with {status}{}", tail_of(&self.log)),
            Ok(Err(e)) => Err(e).context("waiting for cell up"),
            Err(_) => {
                signal(self.child.id(), Signal::SIGKILL);
                let _ = self.child.wait().await;
                for pid in pids {
                    signal(Some(pid), Signal::SIGKILL);
                }
                bail!("cell up did not stop within {limit:?}; killed it and its cells")
            }
        }
    }
}

async fn registry_pids(hcs: &[String]) -> Vec<u32> {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        // In cluster mode `/cells` and `/events` take the read token.
        .default_headers(control::read_headers_from_env())
        .timeout(Duration::from_secs(1))
        .build()
    else {
        return Vec::new();
    };
    for hc in hcs {
        if let Ok(resp) = client.get(format!("{hc}/cells")).send().await {
            if let Ok(cells) = resp.json::<CellsResponse>().await {
                return cells
                    .roles
                    .values()
                    .flatten()
                    .filter_map(|c| c.pid)
                    .collect();
            }
        }
    }
    Vec::new()
}

fn signal(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // Already gone is fine.
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Cancel `token` on Ctrl-C or SIGTERM, so the organism is stopped rather than orphaned.
fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("heal: interrupted; stopping the organism");
        token.cancel();
    });
}

/// The last lines of a log file, indented, after a colon; empty if there are none.
fn tail_of(path: &Path) -> String {
    const LINES: usize = 25;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(LINES);
    let mut out = format!("; the last lines of {}:", path.display());
    for line in &lines[start..] {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_up_lines_name_front_doors_and_health_checkers() {
        assert_eq!(
            parse_up_line(
                "homeostat is up: 10 cells; frontdoor http://127.0.0.1:1 http://127.0.0.1:2"
            ),
            Some(vec![
                "http://127.0.0.1:1".to_string(),
                "http://127.0.0.1:2".to_string()
            ])
        );
        assert_eq!(
            parse_up_line("homeostat is up: 3 cells; api http://x"),
            None
        );
        assert_eq!(
            parse_healthcheckers_line("  healthcheckers http://127.0.0.1:3 http://127.0.0.1:4"),
            Some(vec![
                "http://127.0.0.1:3".to_string(),
                "http://127.0.0.1:4".to_string()
            ])
        );
        assert_eq!(parse_healthcheckers_line("  stats:  curl x"), None);
    }

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
