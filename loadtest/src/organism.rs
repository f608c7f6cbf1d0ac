//! One `cell up` under a benchmark (`bench crawl` and `bench heal` alike): started with a
//! configuration file, its cells followed, and stopped with SIGTERM.
//!
//! `cell up` prints its machine-readable `HOMEOSTAT_ORGANISM_READY {json}` line
//! ([`protocol::OrganismReady`]: front doors, health checkers, factories) once the organism
//! serves; the words for people beside it are never parsed. The cells are read from the health
//! checkers' registry (`GET /cells`, with each cell's pid), and from `HOMEOSTAT_CELL {json}` lines
//! for versions of `cell up` that print them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use factory::local::CellInfo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protocol::control::CellsResponse;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How to start `cell up`.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `cell` executable.
    pub cell: PathBuf,
    /// The organism's configuration file.
    pub infra: PathBuf,
    /// `cell up`'s stderr (its cells' logs) goes here.
    pub log: PathBuf,
    /// Environment changes: `Some` sets the variable, `None` removes it.
    pub env: Vec<(String, Option<String>)>,
    /// How long each cell may drain on shutdown (`cell up --grace-secs`).
    pub grace: Duration,
    /// How long the organism may take to come up.
    pub ready_timeout: Duration,
    /// More arguments to `cell up` (e.g. `--demo`).
    pub args: Vec<String>,
}

impl Launch {
    /// `cell up` of `infra` for a benchmark run in `dir`: its log in `dir/cell-up.log`, the
    /// engines named by the configuration only (the environment's `DATABASE_URL` / `AMQP_URL`
    /// removed), cells logging at `warn` unless `HOMEOSTAT_LOG` says otherwise.
    pub fn bench(cell: PathBuf, infra: PathBuf, dir: &std::path::Path, grace: Duration) -> Launch {
        let mut env = vec![
            // The configuration names the engines; the environment must not redirect them.
            ("DATABASE_URL".to_string(), None),
            ("AMQP_URL".to_string(), None),
        ];
        if std::env::var_os("HOMEOSTAT_LOG").is_none() {
            env.push(("HOMEOSTAT_LOG".into(), Some("warn".into())));
        }
        Launch {
            cell,
            infra,
            log: dir.join("cell-up.log"),
            env,
            grace,
            ready_timeout: Duration::from_secs(150),
            args: Vec::new(),
        }
    }
}

/// What `cell up` said on stdout.
#[derive(Debug, Default)]
struct Announced {
    /// Where clients go: the front doors (or the api).
    frontdoors: Vec<String>,
    healthcheckers: Vec<String>,
    factories: Vec<String>,
    /// `HOMEOSTAT_CELL` lines, in order.
    cells: Vec<CellInfo>,
}

/// A running `cell up`.
pub struct Organism {
    child: Child,
    /// Where clients send `POST /crawl` and `GET /stats`: `http://ADDR` of the first front door
    /// (or of the api, for versions of `cell up` without front doors).
    pub front: String,
    /// Every front door `cell up` named (the api, for versions without front doors).
    pub frontdoors: Vec<String>,
    /// The health checkers `cell up` named (none, for versions that do not name them).
    pub healthcheckers: Vec<String>,
    /// The factories `cell up` named.
    pub factories: Vec<String>,
    said: Arc<Mutex<Announced>>,
    /// Every cell seen so far, by pid.
    seen: BTreeMap<u32, CellInfo>,
    client: reqwest::Client,
    log: PathBuf,
    grace: Duration,
}

impl Organism {
    /// Start `cell up --infra FILE` and wait until it says it is up. If `interrupt` is
    /// cancelled meanwhile, `cell up` is stopped (it stops its cells) and this fails.
    pub async fn start(launch: &Launch, interrupt: &CancellationToken) -> anyhow::Result<Organism> {
        let log = std::fs::File::create(&launch.log)
            .with_context(|| format!("creating {}", launch.log.display()))?;
        let mut command = Command::new(&launch.cell);
        command
            .arg("up")
            .arg("--infra")
            .arg(&launch.infra)
            .arg("--grace-secs")
            .arg(launch.grace.as_secs().max(1).to_string())
            // A harness killed outright (no signal handler runs) takes its organism along.
            .arg("--die-with-parent")
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (key, value) in &launch.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        // The organism's key: the operator's when the environment names one, else one made
        // here and handed to `cell up` (which would otherwise make its own), so this client can
        // read the registry of a cluster-mode organism (it takes the read token).
        let named = |name: &str| {
            std::env::var_os(name).is_some()
                || launch.env.iter().any(|(k, v)| k == name && v.is_some())
        };
        let read_headers = if named(control::KEY_ENV) || named(control::KEY_FILE_ENV) {
            control::read_headers_from_env()
        } else {
            let key = control::ClusterKey::generate();
            command.env(control::KEY_ENV, key.to_hex());
            let mut headers = reqwest::header::HeaderMap::new();
            if let Ok(value) = reqwest::header::HeaderValue::from_str(&key.read_authorization()) {
                headers.insert(reqwest::header::AUTHORIZATION, value);
            }
            headers
        };
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} up", launch.cell.display()))?;
        let stdout = child.stdout.take().context("taking cell up's stdout")?;
        let said: Arc<Mutex<Announced>> = Arc::default();
        let (up_tx, up_rx) = tokio::sync::oneshot::channel();
        let heard = said.clone();
        // Read stdout to its end, so `cell up` never blocks on a full pipe.
        tokio::spawn(async move {
            let mut up_tx = Some(up_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut said = lock(&heard);
                if let Some(info) = CellInfo::parse(&line) {
                    said.cells.push(info);
                } else if let Ok(Some(ready)) = protocol::OrganismReady::parse(&line) {
                    said.frontdoors = ready.frontdoors;
                    said.healthcheckers = ready.healthcheckers;
                    said.factories = ready.factories;
                    if let Some(tx) = up_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let up = tokio::select! {
            up = up_rx => up.is_ok(),
            _ = child.wait() => false,
            _ = tokio::time::sleep(launch.ready_timeout) => {
                stop_starting(&mut child, launch.grace).await;
                bail!(
                    "cell up was not up within {:?}{}",
                    launch.ready_timeout,
                    tail_of(&launch.log)
                );
            }
            _ = interrupt.cancelled() => {
                stop_starting(&mut child, launch.grace).await;
                bail!("interrupted while the organism was starting");
            }
        };
        if !up {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            bail!(
                "cell up exited ({status}) before it was up{}",
                tail_of(&launch.log)
            );
        }
        // The health checkers' line follows the up line.
        let wait = tokio::time::Instant::now();
        while lock(&said).healthcheckers.is_empty() && wait.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (frontdoors, healthcheckers, factories) = {
            let said = lock(&said);
            (
                said.frontdoors.clone(),
                said.healthcheckers.clone(),
                said.factories.clone(),
            )
        };
        Ok(Organism {
            child,
            front: frontdoors.first().cloned().unwrap_or_default(),
            frontdoors,
            healthcheckers,
            factories,
            said,
            seen: BTreeMap::new(),
            client: reqwest::Client::builder()
                .no_proxy()
                // In cluster mode `/cells` takes the read token.
                .default_headers(read_headers)
                .timeout(Duration::from_secs(2))
                .build()
                .context("building the HTTP client")?,
            log: launch.log.clone(),
            grace: launch.grace,
        })
    }

    /// Ask the registry (and read the `HOMEOSTAT_CELL` lines) for the cells alive now; remember
    /// them. Returns them, or `None` when the registry did not answer (and no line named any).
    pub async fn refresh(&mut self) -> Option<Vec<CellInfo>> {
        let (healthcheckers, mut now) = {
            let said = lock(&self.said);
            (said.healthcheckers.clone(), latest_per_name(&said.cells))
        };
        let mut answered = !now.is_empty();
        let reader =
            protocol::client::CellsClient::with_http(self.client.clone(), Vec::new(), None);
        for hc in &healthcheckers {
            let Ok(view) = reader.fetch(hc).await else {
                continue;
            };
            now.extend(registry_cells(&view));
            answered = true;
            break;
        }
        for cell in &now {
            self.seen.entry(cell.pid).or_insert_with(|| cell.clone());
        }
        answered.then_some(now)
    }

    /// Every cell seen so far (replaced and retired ones included), by pid.
    pub fn seen(&self) -> &BTreeMap<u32, CellInfo> {
        &self.seen
    }

    /// Has `cell up` itself exited?
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The last lines `cell up` and its cells logged, for error messages.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log)
    }

    /// SIGTERM `cell up` and wait for it to drain its cells and exit. If it does not in time,
    /// SIGKILL it and every cell seen (a killed supervisor cannot stop them).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        // Learn the cells alive now, to kill them should `cell up` not stop them.
        self.refresh().await;
        if let Some(pid) = self.child.id() {
            signal(pid, Signal::SIGTERM);
        }
        let limit = self.grace + Duration::from_secs(20);
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("cell up exited with {status}{}", tail_of(&self.log)),
            Ok(Err(e)) => Err(e).context("waiting for cell up"),
            Err(_) => {
                if let Some(pid) = self.child.id() {
                    signal(pid, Signal::SIGKILL);
                }
                let _ = self.child.wait().await;
                for pid in self.seen.keys() {
                    signal(*pid, Signal::SIGKILL);
                }
                bail!("cell up did not stop within {limit:?}; killed it and its cells")
            }
        }
    }
}

/// The registry's live cells that report a pid, as [`CellInfo`] (named by cell id).
pub fn registry_cells(view: &CellsResponse) -> Vec<CellInfo> {
    view.roles
        .values()
        .flatten()
        .filter_map(|r| {
            Some(CellInfo {
                name: r.cell_id.clone(),
                role: r.role.clone(),
                pid: r.pid?,
                addr: r.addr.clone(),
                generation: 1,
            })
        })
        .collect()
}

/// The newest cell of each slot among `HOMEOSTAT_CELL` lines.
fn latest_per_name(cells: &[CellInfo]) -> Vec<CellInfo> {
    let mut latest: BTreeMap<&str, &CellInfo> = BTreeMap::new();
    for cell in cells {
        latest.insert(cell.name.as_str(), cell);
    }
    latest.into_values().cloned().collect()
}

/// SIGTERM a `cell up` that is still starting and give it its grace to stop its cells.
async fn stop_starting(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(grace + Duration::from_secs(10), child.wait()).await;
}

/// Send `signal` to `pid`; a process already gone is fine.
pub fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        // Already gone is fine.
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

fn lock(said: &Mutex<Announced>) -> std::sync::MutexGuard<'_, Announced> {
    // Nothing holding this lock can leave it half-written.
    said.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
