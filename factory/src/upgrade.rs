//! Live upgrade: a new build replaces the old one cell by cell while the organism serves.
//!
//! A factory asked to upgrade (`POST /control/upgrade`, signed [`UpgradeRequest`]; `cell
//! upgrade --to PATH_OR_VERSION` sends it) installs the new executable as the organism's release
//! (the file [`RELEASE_FILE`] in the data directory: every factory starts every cell from it,
//! replacements and growth included, and `cell up` restarts its factories from it), then walks
//! the roles in an order that keeps the loop whole ([`ORDER`]: crawlers, apis, front doors,
//! health checkers; the factories last). For each cell of a role that runs another build, oldest
//! first, it is mitosis then apoptosis:
//!
//! 1. start one cell of the role from the new executable (a fixed-address role gets the old
//!    cell's address: the new cell takes over its listening socket, see `cell`'s `handover`, so
//!    both accept from one queue and no connection is refused or reset);
//! 2. wait until the new cell heartbeats with the new build, says `serving` and answers
//!    `/readyz`;
//! 3. ask the old cell to retire (a signed `RetireRequest` to the health checkers, the same door
//!    as surplus retirement): it says `draining`, the front doors route elsewhere, it finishes
//!    what it does, and leaves;
//! 4. wait until it has left the registry.
//!
//! One cell at a time, and a new cell is started only while its role has at most its maximum
//! of cells (draining ones included): a role never exceeds its maximum plus one. A start that
//! fails (no ready line in time, no heartbeat with the new build, not ready) is stopped and
//! counted; after `failures_before_rollback` failures the upgrade stops and the organism returns
//! to the build it ran by the same path (the old executable is installed again and every cell
//! of the new build is replaced by one of the old).
//!
//! The status is kept in [`STATUS_FILE`] in the data directory, so any factory answers `GET
//! /upgrade`, a second request while one runs is answered with its status, and the status
//! survives the factories' own replacement.
//!
//! Cells of the pool's roles are replaced the same way, a machine at a time: the new cell is a
//! pool machine the purse admits, which joins running the release (`cell boot` fetches it, see
//! [`crate::release`]); once the old cell has left, its machine is powered off. When the purse
//! has no room for one more machine (the cap, or no server off), the old cell retires first and
//! its machine is powered off before the new one is asked for: the role is one cell short for a
//! moment, and the spend never passes the cap.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use control::build::digest;
use control::{ClusterKey, ControlClient, Signer};
use protocol::control::{
    CellRecord, CellState, ReplaceRequest, RetireRequest, UpgradePhase, UpgradeRequest,
    UpgradeStatus,
};
use serde::{Deserialize, Serialize};

use crate::pool::PoolAnswer;
use crate::role::FactoryState;
use engines::factory_ledger::{Claim, ClaimOutcome};

/// The file (in the data directory) naming the organism's current release: one path.
pub const RELEASE_FILE: &str = "release";
/// The file (in the data directory) holding the latest upgrade's status.
pub const STATUS_FILE: &str = "upgrade.json";
/// Where `--to VERSION` is looked up: `DATA_DIR/releases/VERSION/cell`.
pub const RELEASES_DIR: &str = "releases";
/// The order roles are upgraded in: the loop's consumers first (a new crawler works for old
/// apis), then the apis, the clients' doors, the health checkers; the factories last.
pub const ORDER: [&str; 4] = ["crawler", "api", "frontdoor", "healthchecker"];

/// How long a new cell may take to become ready, by default.
pub const READY: Duration = Duration::from_secs(30);
/// Failed starts of a new build before it is rolled back, by default.
pub const FAILURES: u32 = 2;
/// A cell that has not named its build after this long runs a build older than builds in
/// heartbeats: it is upgraded like any other.
const UNNAMED_AFTER_MS: u64 = 10_000;
/// How long an old cell has to drain and leave before it is sent SIGTERM (a cell's default
/// grace period and a margin).
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// Why an upgrade was refused (answered 400 or 409, naming the problem).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("no release {to:?}: neither a file nor {looked:?}")]
    NoRelease { to: String, looked: PathBuf },
    #[error("the release {0:?} is not an executable file")]
    NotExecutable(PathBuf),
    #[error("reading the release {path:?}: {error}")]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("this factory has no data directory to keep releases in")]
    NoDataDir,
    #[error("an upgrade to {0} is under way")]
    Busy(String),
}

/// The status file: the status, and who runs the upgrade.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    status: UpgradeStatus,
    /// The pid of the factory running it (on this machine).
    #[serde(default)]
    by_pid: Option<u32>,
}

/// What an upgrade installs and what it returns to.
#[derive(Debug, Clone)]
struct Plan {
    from_exe: PathBuf,
    from_build: String,
    to_exe: PathBuf,
    to_build: String,
    ready: Duration,
    failures: u32,
}

/// Where `to` names a release: a path, or a version in the releases directory.
pub fn resolve(data_dir: &Path, to: &str) -> Result<PathBuf, UpgradeError> {
    let direct = PathBuf::from(to);
    let path = if direct.is_file() {
        direct
    } else {
        let looked = data_dir.join(RELEASES_DIR).join(to).join("cell");
        if !looked.is_file() || to.contains('/') {
            return Err(UpgradeError::NoRelease {
                to: to.to_string(),
                looked,
            });
        }
        looked
    };
    let path = path.canonicalize().map_err(|error| UpgradeError::Read {
        path: path.clone(),
        error,
    })?;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path)
        .map_err(|error| UpgradeError::Read {
            path: path.clone(),
            error,
        })?
        .permissions()
        .mode();
    if mode & 0o111 == 0 {
        return Err(UpgradeError::NotExecutable(path));
    }
    Ok(path)
}

/// The first line of an upgrade's log (also how a repeat of the request is recognised).
fn started_line(to: &str, exe: &Path) -> String {
    format!("upgrade to {to} ({})", exe.display())
}

/// Write `bytes` to `path` at once (a temporary file renamed over it).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

impl FactoryState {
    fn data_dir(&self) -> Option<PathBuf> {
        self.provider
            .release_file
            .as_ref()
            .and_then(|f| f.parent().map(Path::to_path_buf))
    }

    fn read_record(&self) -> Record {
        self.data_dir()
            .and_then(|d| std::fs::read(d.join(STATUS_FILE)).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The latest upgrade's status (from the data directory: any factory answers).
    pub fn upgrade_status(&self) -> UpgradeStatus {
        self.read_record().status
    }

    fn update(&self, change: impl FnOnce(&mut UpgradeStatus)) {
        let mut rec = self.read_record();
        change(&mut rec.status);
        rec.by_pid = Some(std::process::id());
        if let Some(dir) = self.data_dir() {
            let bytes = serde_json::to_vec_pretty(&rec).expect("the status always serializes");
            if let Err(e) = write_atomically(&dir.join(STATUS_FILE), &bytes) {
                tracing::warn!(error = %e, "recording the upgrade's status failed");
            }
        }
    }

    fn note(&self, line: String) {
        tracing::info!(upgrade = %line);
        self.update(|s| s.log.push(line));
    }

    fn install(&self, exe: &Path) -> std::io::Result<()> {
        let file = self
            .provider
            .release_file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no release file"))?;
        write_atomically(file, exe.to_string_lossy().as_bytes())
    }

    /// Begin an upgrade to `req.to` in the background and answer its status; a request while
    /// one runs (here or in a sibling factory) answers that one's status, or refuses a
    /// different target.
    pub async fn upgrade(
        self: &Arc<Self>,
        req: &UpgradeRequest,
    ) -> Result<UpgradeStatus, UpgradeError> {
        let data_dir = self.data_dir().ok_or(UpgradeError::NoDataDir)?;
        let to_exe = resolve(&data_dir, &req.to)?;
        let _guard = self.upgrading.lock().await;
        let rec = self.read_record();
        let running = matches!(
            rec.status.phase,
            UpgradePhase::Running | UpgradePhase::RollingBack
        ) && rec.by_pid.is_some_and(alive);
        if running {
            if rec.status.log.first() == Some(&started_line(&req.to, &to_exe)) {
                return Ok(rec.status);
            }
            return Err(UpgradeError::Busy(rec.status.to));
        }
        let from_exe = self.provider.current_exe();
        // The builds are digests of executables of hundreds of megabytes: named in the
        // background, after the answer.
        let plan = Plan {
            from_exe,
            from_build: String::new(),
            to_exe: to_exe.clone(),
            to_build: String::new(),
            ready: req.ready_secs.map_or(READY, Duration::from_secs),
            failures: req.failures_before_rollback.unwrap_or(FAILURES).max(1),
        };
        let status = UpgradeStatus {
            phase: UpgradePhase::Running,
            to: to_exe.display().to_string(),
            log: vec![started_line(&req.to, &to_exe)],
            ..UpgradeStatus::default()
        };
        self.update(|s| *s = status.clone());
        let me = self.clone();
        tokio::spawn(async move { me.orchestrate(plan).await });
        Ok(status)
    }

    async fn orchestrate(self: Arc<Self>, mut plan: Plan) {
        let (from, to) = (plan.from_exe.clone(), plan.to_exe.clone());
        let builds = tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>((
                control::build::of_file(&from)?,
                control::build::of_file(&to)?,
            ))
        })
        .await;
        match builds {
            Ok(Ok((from, to))) => {
                plan.from_build = from;
                plan.to_build = to;
            }
            Ok(Err(e)) => {
                self.update(|s| {
                    s.phase = UpgradePhase::Failed;
                    s.reason = Some(format!("reading the executables: {e}"));
                });
                return;
            }
            Err(e) => {
                self.update(|s| {
                    s.phase = UpgradePhase::Failed;
                    s.reason = Some(format!("naming the builds: {e}"));
                });
                return;
            }
        }
        self.update(|s| {
            s.from = plan.from_build.clone();
            s.to = plan.to_build.clone();
        });
        let client = match ClusterKey::from_env() {
            Ok(key) => ControlClient::new(Signer::new(key, self.organism.factory_id.clone())),
            Err(e) => {
                self.update(|s| {
                    s.phase = UpgradePhase::Failed;
                    s.reason = Some(format!("no cluster key to sign with: {e}"));
                });
                return;
            }
        };
        if let Err(e) = self.install(&plan.to_exe) {
            self.update(|s| {
                s.phase = UpgradePhase::Failed;
                s.reason = Some(format!("installing the release: {e}"));
            });
            return;
        }
        metrics::counter!("factory_upgrades_total", "outcome" => "started").increment(1);
        let outcome = self
            .roll(&client, &plan.to_exe, &plan.to_build, &plan)
            .await;
        let outcome = match outcome {
            Ok(()) => self.upgrade_factories(&client, &plan).await,
            Err(e) => Err(e),
        };
        let Err(reason) = outcome else {
            self.note(format!(
                "every cell runs {}; this factory leaves for its successor",
                plan.to_build
            ));
            self.update(|s| {
                s.phase = UpgradePhase::Done;
                s.role = None;
            });
            metrics::counter!("factory_upgrades_total", "outcome" => "done").increment(1);
            // The last old cell: `cell up` restarts this factory from the release.
            if digest(&plan.from_build) != digest(&plan.to_build) {
                self.leave.cancel();
            }
            return;
        };
        tracing::warn!(%reason, "the new build failed: rolling back");
        self.update(|s| {
            s.phase = UpgradePhase::RollingBack;
            s.reason = Some(reason.clone());
            s.replaced = 0;
        });
        self.note(format!("rolling back to {}: {reason}", plan.from_build));
        if let Err(e) = self.install(&plan.from_exe) {
            tracing::error!(error = %e, "installing the old release again failed");
        }
        // The old build ran until now: a failed start of it is more likely the machine's
        // trouble than the build's, so it is tried longer before the organism is left mixed.
        let back = Plan {
            failures: 5,
            ..plan.clone()
        };
        match self
            .roll(&client, &plan.from_exe, &plan.from_build, &back)
            .await
        {
            Ok(()) => {
                self.note(format!("every cell runs {} again", plan.from_build));
                self.update(|s| {
                    s.phase = UpgradePhase::RolledBack;
                    s.role = None;
                });
                metrics::counter!("factory_upgrades_total", "outcome" => "rolled_back")
                    .increment(1);
            }
            Err(e) => {
                self.update(|s| {
                    s.phase = UpgradePhase::Failed;
                    s.reason = Some(format!("{reason}; then the rollback: {e}"));
                });
                metrics::counter!("factory_upgrades_total", "outcome" => "failed").increment(1);
            }
        }
    }

    /// Replace every cell of another build than `build` with one started from `exe`, role by
    /// role; `Err` once `plan.failures` starts failed.
    async fn roll(
        self: &Arc<Self>,
        client: &ControlClient,
        exe: &Path,
        build: &str,
        plan: &Plan,
    ) -> Result<(), String> {
        let mut failures = 0u32;
        for pass in 0..3 {
            for role in ORDER {
                self.update(|s| s.role = Some(role.to_string()));
                if pass == 0 && self.pool_serves(role) {
                    self.note(format!(
                        "{role}: its cells are pool machines, which join running the release"
                    ));
                }
                while let Some(old) = self.next_old(role, build).await {
                    let step = if self.pool_serves(role) {
                        self.replace_on_pool(client, role, &old, build, plan).await
                    } else {
                        self.replace_one(client, role, &old, exe, build, plan).await
                    };
                    match step {
                        Ok(Some(new)) => {
                            self.note(format!("{role}: {} replaced by {new}", old.cell_id));
                            self.update(|s| s.replaced += 1);
                        }
                        Ok(None) => {
                            tracing::info!(cell = %old.cell_id, "left before it was replaced");
                        }
                        Err(e) => {
                            failures += 1;
                            self.note(format!("{role}: replacing {} failed: {e}", old.cell_id));
                            self.update(|s| s.failures = failures);
                            if failures >= plan.failures {
                                return Err(format!(
                                    "{failures} starts of {build} failed; the last: {e}"
                                ));
                            }
                        }
                    }
                }
            }
            if self.all_on(build).await {
                return Ok(());
            }
        }
        Err(format!("cells of another build than {build} remain"))
    }

    /// The factories last: each sibling of another build is asked to leave (its supervisor,
    /// `cell up`, starts its successor from the release) and must come back with the new build
    /// before the next; this factory leaves last, once the upgrade is recorded as done.
    async fn upgrade_factories(&self, client: &ControlClient, plan: &Plan) -> Result<(), String> {
        self.update(|s| s.role = Some("factory".into()));
        let me = self.organism.factory_id.clone();
        let build = &plan.to_build;
        let others: Vec<CellRecord> = self
            .registry_view()
            .await
            .and_then(|v| v.roles.get("factory").cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.cell_id != me && digest(&c.build) != digest(build))
            .collect();
        for old in others {
            let order = protocol::control::StopRequest {
                cell_id: old.cell_id.clone(),
                reason: format!("upgrade to {build}"),
            };
            client
                .ask(&old.addr, &order)
                .await
                .map_err(|e| format!("asking factory {} to leave: {e}", old.cell_id))?;
            let deadline = tokio::time::Instant::now() + plan.ready + Duration::from_secs(10);
            loop {
                let view = self.registry_view().await;
                let cells = view
                    .as_ref()
                    .and_then(|v| v.roles.get("factory"))
                    .cloned()
                    .unwrap_or_default();
                let successor = cells.iter().find(|c| {
                    c.cell_id != me
                        && c.addr == old.addr
                        && digest(&c.build) == digest(build)
                        && c.state == CellState::Serving
                });
                if let Some(new) = successor {
                    if !cells.iter().any(|c| c.cell_id == old.cell_id) {
                        self.note(format!(
                            "factory: {} replaced by {}",
                            old.cell_id, new.cell_id
                        ));
                        self.update(|s| s.replaced += 1);
                        break;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(format!(
                        "factory {} left and no factory of {build} took its place at {} within {:?}",
                        old.cell_id,
                        old.addr,
                        plan.ready + Duration::from_secs(10)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The oldest cell of `role` that runs another build than `build`, once every cell of the
    /// role has named its build (bounded wait); `None` when there is none.
    async fn next_old(&self, role: &str, build: &str) -> Option<CellRecord> {
        for _ in 0..100 {
            let Some(view) = self.registry_view().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let cells: Vec<CellRecord> = view
                .roles
                .get(role)
                .into_iter()
                .flatten()
                .filter(|c| !matches!(c.state, CellState::Draining | CellState::Retired))
                .cloned()
                .collect();
            if cells
                .iter()
                .any(|c| c.build.is_empty() && c.age_ms < UNNAMED_AFTER_MS)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            return cells
                .into_iter()
                .filter(|c| digest(&c.build) != digest(build))
                .max_by_key(|c| c.age_ms);
        }
        None
    }

    /// Whether every live cell of the upgraded roles names `build`.
    async fn all_on(&self, build: &str) -> bool {
        let Some(view) = self.registry_view().await else {
            return false;
        };
        ORDER
            .iter()
            .flat_map(|r| view.roles.get(*r).into_iter().flatten())
            .filter(|c| c.state != CellState::Draining)
            .all(|c| digest(&c.build) == digest(build))
    }

    /// Mitosis then apoptosis for one cell: a new cell of `role` from `exe`, serving with
    /// `build`, then the old one retired. Answers the new cell's id (none when the old cell
    /// left by itself meanwhile).
    async fn replace_one(
        self: &Arc<Self>,
        client: &ControlClient,
        role: &str,
        old: &CellRecord,
        exe: &Path,
        build: &str,
        plan: &Plan,
    ) -> Result<Option<String>, String> {
        if !self.room_for_one_more(role, old, plan).await? {
            // It left (or is leaving) by itself: nothing to replace.
            return Ok(None);
        }
        let n = self.next_number();
        let cell_id = format!("{role}-{}-{n}", std::process::id());
        let req = ReplaceRequest {
            request_key: format!("upgrade:{}:{}", digest(build), old.cell_id),
            role: role.to_string(),
            reason: format!("upgrade to {build}"),
            parent: Some(old.cell_id.clone()),
        };
        let listen = self
            .fixed
            .contains_key(role)
            .then(|| old.addr.trim_start_matches("http://").to_string());
        let claimed = self.claim_upgrade_start(&req, &cell_id).await;
        let started = match self
            .start_from(&cell_id, &req, exe, listen, plan.ready)
            .await
        {
            Ok(()) => self.wait_serving(&cell_id, build, plan.ready, true).await,
            Err(e) => {
                self.end_upgrade_start(&req, claimed, false).await;
                return Err(format!("starting {cell_id}: {e}"));
            }
        };
        if let Err(e) = started {
            self.stop(&cell_id).await;
            self.end_upgrade_start(&req, claimed, false).await;
            return Err(format!("{cell_id}: {e}"));
        }
        self.end_upgrade_start(&req, claimed, true).await;
        self.retire(
            client,
            role,
            old,
            &format!("upgraded: replaced by {cell_id} ({build})"),
        )
        .await;
        Ok(Some(cell_id))
    }

    /// Wait while `role` has more than its maximum of cells (draining ones included): at most
    /// one cell above the maximum. False when `old` left (or began to) meanwhile.
    async fn room_for_one_more(
        &self,
        role: &str,
        old: &CellRecord,
        plan: &Plan,
    ) -> Result<bool, String> {
        let max = self.organism.maxima.get(role).copied();
        let deadline = tokio::time::Instant::now() + plan.ready + Duration::from_secs(30);
        loop {
            let view = self.registry_view().await;
            let cells = view
                .as_ref()
                .map(|v| v.roles.get(role).cloned().unwrap_or_default());
            if let Some(cells) = &cells {
                let still = cells
                    .iter()
                    .any(|c| c.cell_id == old.cell_id && c.state != CellState::Draining);
                if !still {
                    return Ok(false);
                }
            }
            match (cells.map(|c| c.len()), max) {
                (Some(n), Some(max)) if n as u64 > u64::from(max) => {}
                (Some(_), _) => return Ok(true),
                (None, _) => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("{role} stayed above its maximum of {max:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Apoptosis: `old` drains and retires, told through the health checkers (the same door as
    /// surplus retirement); it is stopped if it has not left within [`DRAIN_WAIT`]. A cell on a
    /// pool machine has its machine powered off once it has left.
    async fn retire(&self, client: &ControlClient, role: &str, old: &CellRecord, reason: &str) {
        let order = RetireRequest {
            cell_id: old.cell_id.clone(),
            reason: reason.to_string(),
        };
        let mut told = false;
        for hc in &self.organism.healthcheckers {
            match client.ask(hc, &order).await {
                Ok(_) => told = true,
                Err(e) => {
                    tracing::warn!(healthchecker = %hc, error = %e, "asking a cell to retire failed")
                }
            }
        }
        if !told && !self.stop(&old.cell_id).await {
            tracing::warn!(cell = %old.cell_id, "could not ask the old cell to retire");
        }
        let gone_by = tokio::time::Instant::now() + DRAIN_WAIT;
        let mut gone = false;
        while tokio::time::Instant::now() < gone_by {
            gone = self.registry_view().await.is_some_and(|v| {
                !v.roles
                    .get(role)
                    .is_some_and(|cells| cells.iter().any(|c| c.cell_id == old.cell_id))
            });
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !gone {
            tracing::warn!(cell = %old.cell_id, "the old cell did not leave in time; stopping it");
            self.terminate(&old.cell_id).await;
        }
        if let Some(pool) = self.pool.get() {
            pool.fence_cell(&old.cell_id).await;
        }
    }

    /// Mitosis then apoptosis for a cell of a pool role: a machine the purse admits joins
    /// running the release (`build`), then the old cell retires and its machine is powered off.
    /// Without room in the purse for one more machine, the old cell retires first.
    async fn replace_on_pool(
        self: &Arc<Self>,
        client: &ControlClient,
        role: &str,
        old: &CellRecord,
        build: &str,
        plan: &Plan,
    ) -> Result<Option<String>, String> {
        let pool = self.pool.get().cloned().ok_or("no pool")?;
        if !self.room_for_one_more(role, old, plan).await? {
            return Ok(None);
        }
        let req = ReplaceRequest {
            request_key: format!("upgrade:{}:{}", digest(build), old.cell_id),
            role: role.to_string(),
            reason: format!("upgrade to {build}"),
            parent: Some(old.cell_id.clone()),
        };
        let before: Vec<String> = self
            .registry_view()
            .await
            .and_then(|v| v.roles.get(role).cloned())
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.cell_id)
            .collect();
        let claim_id = format!("{role}-pool-{}-{}", std::process::id(), self.next_number());
        let claimed = self.claim_upgrade_start(&req, &claim_id).await;
        let limit = pool.boot_timeout() + plan.ready;
        let deadline = tokio::time::Instant::now() + limit;
        let mut retired_first = false;
        let refused = loop {
            match pool
                .request(role, &req.request_key, req.parent.clone())
                .await
            {
                Ok(PoolAnswer::Admitted(_) | PoolAnswer::Already(_)) => break None,
                Ok(PoolAnswer::Refused(r)) if !retired_first => {
                    self.note(format!(
                        "{role}: no machine for one more cell ({}); {} retires first",
                        r.reason, old.cell_id
                    ));
                    self.retire(client, role, old, &format!("upgrade to {build}: retiring first, the purse has no room for one more machine"))
                        .await;
                    retired_first = true;
                }
                Ok(PoolAnswer::Refused(r)) => {
                    // The role was one cell short: the health checkers' minimum-keeping may
                    // have taken the machine for a cell of its own, which joins running the
                    // release as well.
                    if let Some(new) = self.new_cell_since(role, &before, build).await {
                        self.end_upgrade_start(&req, claimed, false).await;
                        self.note(format!(
                            "{role}: {new}, started to keep the role's minimum, runs {build}"
                        ));
                        return Ok(Some(new));
                    }
                    if tokio::time::Instant::now() > deadline {
                        break Some(r.reason);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => break Some(format!("asking the pool: {e}")),
            }
        };
        if let Some(reason) = refused {
            self.end_upgrade_start(&req, claimed, false).await;
            return Err(format!("no machine for {role}: {reason}"));
        }
        // The machine that holds the request (a quarantined one's successor included), its
        // cell once it has joined, and that cell serving the release.
        let mut last = "no machine joined".to_string();
        let mut holder = None;
        while tokio::time::Instant::now() < deadline {
            let row = pool.ledger.servers().await.ok().and_then(|rows| {
                rows.into_iter().find(|r| {
                    r.state.spends() && r.request_key.as_deref() == Some(&req.request_key)
                })
            });
            if let Some(row) = row {
                holder = Some(row.name.clone());
                if let Some(cell_id) = row.cell_id {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self.wait_serving(&cell_id, build, left, false).await {
                        Ok(()) => {
                            // Live in the registry under its own id from now on: the claim
                            // (under a stand-in id) must not count it a second time.
                            self.end_upgrade_start(&req, claimed, false).await;
                            if !retired_first {
                                let reason = format!(
                                    "upgraded: replaced by {cell_id} on {} ({build})",
                                    row.name
                                );
                                self.retire(client, role, old, &reason).await;
                            }
                            return Ok(Some(cell_id));
                        }
                        Err(e) => last = format!("{cell_id} on {}: {e}", row.name),
                    }
                } else {
                    last = format!("{} is {}", row.name, row.state.as_str());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(server) = holder {
            if let Err(e) = pool
                .power_off(
                    &server,
                    &format!("upgrade to {build}: its cell never served"),
                )
                .await
            {
                tracing::warn!(server, error = %e, "powering off a failed upgrade's machine failed");
            }
        }
        self.end_upgrade_start(&req, claimed, false).await;
        Err(format!(
            "{role} on a pool machine: not serving with {build} within {limit:?} ({last})"
        ))
    }

    /// Claim the start of `cell_id` in the factories' shared ledger, as every other start is:
    /// while it is under way, another factory's maximum check counts it as starting (the
    /// upgrade's one extra cell must not make room for a grow elsewhere). Whether this factory
    /// holds the claim (a failure to record it is logged: the upgrade goes on).
    pub async fn claim_upgrade_start(&self, req: &ReplaceRequest, cell_id: &str) -> bool {
        let now = crate::pool::now_ms();
        let claim = Claim {
            request_key: req.request_key.clone(),
            role: req.role.clone(),
            factory: self.organism.factory_id.clone(),
            cell_id: cell_id.to_string(),
            claimed_at_ms: now,
            started_at_ms: None,
        };
        let ledger = &self.organism.ledger;
        let memory = crate::role::KEY_MEMORY.as_millis() as i64;
        match ledger.claim(&claim, now - memory).await {
            Ok(ClaimOutcome::Claimed) => true,
            // A repeat of this replacement (an earlier attempt's claim, not yet forgotten):
            // the role's count already includes it.
            Ok(ClaimOutcome::Held(_)) => false,
            Err(e) => {
                tracing::warn!(error = %e, cell_id, "claiming an upgrade's start failed");
                false
            }
        }
    }

    /// The claim's end: a cell that serves is marked started (it is live in the registry from
    /// now on); a start that failed no longer counts against the role's maximum.
    pub async fn end_upgrade_start(&self, req: &ReplaceRequest, claimed: bool, serving: bool) {
        if !claimed {
            return;
        }
        let (ledger, factory) = (&self.organism.ledger, &self.organism.factory_id);
        let recorded = if serving {
            ledger
                .mark_started(&req.request_key, factory, crate::pool::now_ms())
                .await
        } else {
            ledger.release(&req.request_key, factory).await.map(|_| ())
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, key = %req.request_key, "recording an upgrade's start failed");
        }
    }

    /// A cell of `role` not among `before` that serves with `build`, if there is one.
    async fn new_cell_since(&self, role: &str, before: &[String], build: &str) -> Option<String> {
        let view = self.registry_view().await?;
        view.roles
            .get(role)?
            .iter()
            .find(|c| {
                !before.contains(&c.cell_id)
                    && digest(&c.build) == digest(build)
                    && matches!(c.state, CellState::Serving | CellState::Throttling)
            })
            .map(|c| c.cell_id.clone())
    }

    /// Wait until `cell_id` heartbeats with `build`, serving, and answers `/readyz`; a cell this
    /// factory started (`local`) fails at once when its process exits.
    async fn wait_serving(
        &self,
        cell_id: &str,
        build: &str,
        limit: Duration,
        local: bool,
    ) -> Result<(), String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = "no heartbeat".to_string();
        while tokio::time::Instant::now() < deadline {
            if local && !self.children().await.iter().any(|c| c.cell_id == cell_id) {
                return Err("exited".into());
            }
            let found = self.registry_view().await.and_then(|v| {
                v.roles
                    .values()
                    .flatten()
                    .find(|c| c.cell_id == cell_id)
                    .cloned()
            });
            if let Some(c) = found {
                if digest(&c.build) != digest(build) {
                    last = format!("heartbeats name build {:?}", c.build);
                } else if !matches!(c.state, CellState::Serving | CellState::Throttling) {
                    last = format!("state {:?}", c.state);
                } else {
                    match http.get(format!("{}/readyz", c.addr)).send().await {
                        Ok(r) if r.status().is_success() => return Ok(()),
                        Ok(r) => last = format!("/readyz answers {}", r.status()),
                        Err(e) => last = format!("/readyz: {e}"),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "not serving with {build} within {limit:?} ({last})"
        ))
    }

    fn next_number(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::SeqCst) + 1
    }
}
