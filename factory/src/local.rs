//! The local provider: each cell is an OS process running `cell run ROLE ...`.
//!
//! A started cell announces itself with one [`vitals::ReadyLine`] on stdout; everything else it
//! prints is forwarded to this process's stderr, prefixed with the cell's name. A cell that does
//! not announce itself within the ready timeout is killed. A supervised cell's stdin is a pipe
//! from here: when this process dies, even by SIGKILL, the pipe closes and the cell drains and
//! exits. Cells the factory role starts are not tied to the factory that way (they outlive it);
//! they carry the organism's lease instead ([`crate::lease`]).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use vitals::ReadyLine;

/// What to run: a role and its extra arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellSpec {
    pub role: String,
    pub args: Vec<String>,
}

/// A running cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellInfo {
    /// `role-N`, stable across restarts of the same slot.
    pub name: String,
    pub role: String,
    pub pid: u32,
    pub addr: String,
    /// How many times this slot has been started.
    pub generation: u32,
}

impl CellInfo {
    pub const PREFIX: &'static str = "HOMEOSTAT_CELL ";

    pub fn render(&self) -> String {
        format!(
            "{}{}",
            Self::PREFIX,
            serde_json::to_string(self).expect("CellInfo always serializes")
        )
    }

    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.strip_prefix(Self::PREFIX)?).ok()
    }
}

pub struct LocalProvider {
    /// The `cell` executable.
    pub exe: PathBuf,
    /// Arguments every cell gets (e.g. `--infra FILE`).
    pub common_args: Vec<String>,
    /// How long a starting cell has to print its ready line.
    pub ready_timeout: Duration,
    /// Tie each cell's life to this process (its stdin is a pipe from here; when the pipe
    /// closes the cell drains and exits). Off for cells the factory role starts: they must
    /// outlive a factory that dies.
    pub tie_to_parent: bool,
    /// Environment variables every cell gets (e.g. the cluster key); cells also inherit ours.
    pub env: Vec<(String, String)>,
    /// A file naming the executable to start instead of `exe` (one path), when it exists: the
    /// release a live upgrade installed (`cell up` restarts its factories from it).
    pub release_file: Option<PathBuf>,
}

/// A started process.
pub struct Started {
    pub child: Child,
    pub ready: ReadyLine,
    /// Held so the cell's stdin stays open while we live.
    pub stdin: Option<ChildStdin>,
}

/// Why a cell did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting {exe} as {name}: {error}")]
    Spawn {
        exe: String,
        name: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{name}: its {pipe} is not a pipe")]
    NoPipe { name: String, pipe: &'static str },
    #[error("reading {name}'s output: {error}")]
    Read {
        name: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{name}'s ready line {line:?}: {error}")]
    ReadyLine {
        name: String,
        line: String,
        #[source]
        error: protocol::WireError,
    },
    #[error("{name} exited before it was ready")]
    Exited { name: String },
    #[error("{name} was not ready within {after:?}")]
    NotReady { name: String, after: Duration },
}

impl LocalProvider {
    pub async fn start(&self, name: &str, spec: &CellSpec) -> Result<Started, StartError> {
        let exe = self.current_exe();
        self.start_exe(&exe, self.ready_timeout, name, spec).await
    }

    /// The executable cells start from: the organism's current release when `cell up` records
    /// one (a live upgrade installs it, see `factory::upgrade`), else [`LocalProvider::exe`].
    pub fn current_exe(&self) -> PathBuf {
        self.release_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|s| PathBuf::from(s.trim()))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| self.exe.clone())
    }

    /// Start `exe` (rather than [`LocalProvider::exe`]) as cell `name`, waiting `ready_timeout`
    /// for its ready line.
    pub async fn start_exe(
        &self,
        exe: &std::path::Path,
        ready_timeout: Duration,
        name: &str,
        spec: &CellSpec,
    ) -> Result<Started, StartError> {
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .arg(&spec.role)
            .args(&self.common_args)
            .args(&spec.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // A cell of this very file need not read its hundreds of megabytes to name its build.
        match control::build::vouch_for(exe) {
            Some(vouched) => cmd.env(control::build::BUILD_ENV, vouched),
            None => cmd.env_remove(control::build::BUILD_ENV),
        };
        if self.tie_to_parent {
            cmd.arg("--supervised")
                .stdin(Stdio::piped())
                .kill_on_drop(true);
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd.spawn().map_err(|error| StartError::Spawn {
            exe: exe.display().to_string(),
            name: name.to_string(),
            error,
        })?;
        let no_pipe = |pipe| StartError::NoPipe {
            name: name.to_string(),
            pipe,
        };
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| no_pipe("stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| no_pipe("stderr"))?;
        forward(name.to_string(), BufReader::new(stderr));
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(ready_timeout, async {
            while let Some(line) = lines.next_line().await.map_err(|error| StartError::Read {
                name: name.to_string(),
                error,
            })? {
                match ReadyLine::parse(&line) {
                    Ok(Some(ready)) => return Ok(ready),
                    Ok(None) => eprintln!("[{name}] {line}"),
                    Err(error) => {
                        return Err(StartError::ReadyLine {
                            name: name.to_string(),
                            line,
                            error,
                        })
                    }
                }
            }
            Err(StartError::Exited {
                name: name.to_string(),
            })
        })
        .await
        .map_err(|_| StartError::NotReady {
            name: name.to_string(),
            after: ready_timeout,
        })
        .and_then(|r| r);
        let ready = match ready {
            Ok(ready) => ready,
            Err(e) => {
                // A cell that missed its ready timeout is killed, not left running: it may
                // still come up later, unsupervised and uncounted.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(e);
            }
        };
        forward(name.to_string(), lines.into_inner());
        Ok(Started {
            child,
            ready,
            stdin,
        })
    }
}

fn forward<R: tokio::io::AsyncBufRead + Unpin + Send + 'static>(name: String, reader: R) {
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{name}] {line}");
        }
    });
}

/// An event in the life of a supervised cell.
#[derive(Debug, Clone)]
pub enum Event {
    Started(CellInfo),
    Exited {
        name: String,
        pid: u32,
        status: String,
    },
    StartFailed {
        name: String,
        error: String,
    },
}

/// Keeps one process running per slot: restarts a slot's cell when it dies (with back-off when
/// it keeps dying), and on shutdown asks every cell to drain (SIGTERM), then kills stragglers.
pub struct Supervisor {
    provider: Arc<LocalProvider>,
    running: Arc<Mutex<Vec<Option<u32>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    events: mpsc::UnboundedSender<Event>,
}

impl Supervisor {
    pub fn new(provider: LocalProvider) -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                provider: Arc::new(provider),
                running: Arc::new(Mutex::new(Vec::new())),
                tasks: Vec::new(),
                events: tx,
            },
            rx,
        )
    }

    /// Start a slot and wait for its first cell to be ready; keep it alive until `shutdown`.
    pub async fn add(
        &mut self,
        name: String,
        spec: CellSpec,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<CellInfo, StartError> {
        let first = self.provider.start(&name, &spec).await?;
        let slot = {
            let mut running = self.running.lock().await;
            running.push(first.child.id());
            running.len() - 1
        };
        let info = CellInfo {
            name: name.clone(),
            role: spec.role.clone(),
            pid: first.ready.pid,
            addr: first.ready.addr.clone(),
            generation: 1,
        };
        let _ = self.events.send(Event::Started(info.clone()));
        let provider = self.provider.clone();
        let running = self.running.clone();
        let events = self.events.clone();
        self.tasks.push(tokio::spawn(keep_alive(
            provider, name, spec, first, slot, running, events, shutdown, grace,
        )));
        Ok(info)
    }

    /// Wait for every slot to stop (after `shutdown` was cancelled).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[allow(clippy::too_many_arguments)] // one task's whole context, passed once
async fn keep_alive(
    provider: Arc<LocalProvider>,
    name: String,
    spec: CellSpec,
    mut current: Started,
    slot: usize,
    running: Arc<Mutex<Vec<Option<u32>>>>,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut generation = 1;
    let mut backoff = Duration::from_millis(100);
    loop {
        let started_at = tokio::time::Instant::now();
        let pid = current.child.id().unwrap_or_default();
        tokio::select! {
            status = current.child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                tracing::warn!(%name, pid, %status, "cell exited; replacing it");
                let _ = events.send(Event::Exited { name: name.clone(), pid, status });
            }
            _ = shutdown.cancelled() => {
                stop(&mut current.child, grace).await;
                running.lock().await[slot] = None;
                return;
            }
        }
        // A cell that dies right after starting is restarted with growing back-off.
        if started_at.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match provider.start(&name, &spec).await {
                Ok(next) => {
                    generation += 1;
                    running.lock().await[slot] = next.child.id();
                    let _ = events.send(Event::Started(CellInfo {
                        name: name.clone(),
                        role: spec.role.clone(),
                        pid: next.ready.pid,
                        addr: next.ready.addr.clone(),
                        generation,
                    }));
                    current = next;
                    break;
                }
                Err(e) => {
                    let _ = events.send(Event::StartFailed {
                        name: name.clone(),
                        error: format!("{e:#}"),
                    });
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// SIGTERM, wait up to `grace` for the cell to drain, then SIGKILL.
pub async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(pid = child.id(), "cell did not drain in time; killing it");
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
