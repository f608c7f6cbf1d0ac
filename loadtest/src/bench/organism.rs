//! One `cell up` under the benchmark: started with a configuration file, its cells followed
//! through the `HOMEOSTAT_CELL` lines it prints, and stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use factory::local::CellInfo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The line `cell up` prints once every cell is ready.
const UP_PREFIX: &str = "homeostat is up: ";

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
}

/// A running `cell up`.
pub struct Organism {
    child: Child,
    /// `http://ADDR` of the first api cell.
    pub api: String,
    cells: Arc<Mutex<Vec<CellInfo>>>,
    log: PathBuf,
    grace: Duration,
}

impl Organism {
    /// Start `cell up --infra FILE` and wait for its api line.
    pub async fn start(launch: &Launch) -> anyhow::Result<Organism> {
        let log = std::fs::File::create(&launch.log)
            .with_context(|| format!("creating {}", launch.log.display()))?;
        let mut command = Command::new(&launch.cell);
        command
            .arg("up")
            .arg("--infra")
            .arg(&launch.infra)
            .arg("--grace-secs")
            .arg(launch.grace.as_secs().max(1).to_string())
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
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} up", launch.cell.display()))?;
        let stdout = child.stdout.take().context("taking cell up's stdout")?;
        let cells: Arc<Mutex<Vec<CellInfo>>> = Arc::default();
        let (api_tx, api_rx) = tokio::sync::oneshot::channel();
        let seen = cells.clone();
        // Read stdout to its end, so `cell up` never blocks on a full pipe.
        tokio::spawn(async move {
            let mut api_tx = Some(api_tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(info) = CellInfo::parse(&line) {
                    lock(&seen).push(info);
                } else if let Some(api) = parse_up_line(&line) {
                    if let Some(tx) = api_tx.take() {
                        let _ = tx.send(api);
                    }
                }
            }
        });
        let api = tokio::select! {
            api = api_rx => match api {
                Ok(api) => api,
                Err(_) => {
                    let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                    bail!(
                        "cell up exited ({status}) before it was up{}",
                        tail_of(&launch.log)
                    );
                }
            },
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                bail!("cell up exited ({status}) before it was up{}", tail_of(&launch.log));
            }
            _ = tokio::time::sleep(launch.ready_timeout) => {
                bail!(
                    "cell up was not up within {:?}{}",
                    launch.ready_timeout,
                    tail_of(&launch.log)
                );
            }
        };
        Ok(Organism {
            child,
            api,
            cells,
            log: launch.log.clone(),
            grace: launch.grace,
        })
    }

    /// Every cell started so far, in the order they were reported (replacements included).
    pub fn cells(&self) -> Vec<CellInfo> {
        lock(&self.cells).clone()
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
    /// SIGKILL it and every cell it reported (a killed supervisor cannot stop them).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            signal(pid, Signal::SIGTERM);
        }
        let limit = self.grace + Duration::from_secs(15);
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("cell up exited with {status}{}", tail_of(&self.log)),
            Ok(Err(e)) => Err(e).context("waiting for cell up"),
            Err(_) => {
                if let Some(pid) = self.child.id() {
                    signal(pid, Signal::SIGKILL);
                }
                let _ = self.child.wait().await;
                for cell in self.cells() {
                    signal(cell.pid, Signal::SIGKILL);
                }
                bail!("cell up did not stop within {limit:?}; killed it and its cells")
            }
        }
    }
}

/// `homeostat is up: 3 cells; api http://127.0.0.1:7070` -> `http://127.0.0.1:7070`.
pub fn parse_up_line(line: &str) -> Option<String> {
    let rest = line.strip_prefix(UP_PREFIX)?;
    let api = rest.split("api ").nth(1)?.trim();
    (!api.is_empty()).then(|| api.to_string())
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        // Already gone is fine.
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

fn lock(cells: &Mutex<Vec<CellInfo>>) -> std::sync::MutexGuard<'_, Vec<CellInfo>> {
    // Pushing a CellInfo cannot leave the Vec half-written.
    cells
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
