//! The factory role: serves replacement and stop requests over the signed control plane, and
//! starts cells through the local provider.
//!
//! Every organism runs at least two factories, and a health checker asks them in turn. Requests
//! are deduplicated by their key across all of them: before it starts a cell, a factory claims
//! the key in the store's [`FactoryLedger`] (shared by the factories), so the two health checkers
//! that notice the same death both asking with `replace:<dead id>`, or one asking the second
//! factory after the first started a cell and died, start one cell. A key is remembered for
//! [`KEY_MEMORY`], long enough for every repeat of one event, short enough that a later shortfall
//! asking with the same slot key is served again.
//!
//! A factory refuses to start a cell of a role at its maximum (`roles.*.max`): it counts the
//! role's live cells (a health checker's `GET /cells`) plus the starts it and its siblings have
//! claimed and not yet seen live, and answers `started: false` with a `refused` reason naming the
//! role and its maximum, an answer (200), not an error.
//!
//! Before it replaces a dead cell (`replace:` keys, `parent` names the dead cell) that is a
//! process on this machine, a factory SIGKILLs that process if it is stopped or holds a fixed
//! address (fencing by power-off, as a pool provider powers a machine off before replacing it):
//! a frozen cell cannot come back, and a fixed-address replacement can take its predecessor's
//! address. A running cell that merely missed heartbeats is left to retire itself. The process
//! is found by the cell id on its command line, so a reused pid is never killed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use control::Verifier;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protocol::control::{ReplaceReply, ReplaceRequest, StopRequest};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use engines::factory_ledger::{Claim, ClaimOutcome, FactoryLedger};
use protocol::client::CellsClient;
use protocol::control::CellsResponse;

use crate::lease::cmdline;
use crate::local::{CellSpec, LocalProvider};

pub const KEY_MEMORY: Duration = Duration::from_secs(30);

/// Why a factory could not serve a request (answered 503: asking again may succeed).
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// The factories' shared ledger is unreachable.
    #[error("the factory ledger: {0}")]
    Ledger(#[from] engines::EngineError),
    #[error(transparent)]
    Start(#[from] crate::local::StartError),
}

/// Why the factory role stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the factory failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// How long a fenced process has to disappear after its SIGKILL.
pub const FENCE_WAIT: Duration = Duration::from_secs(5);

/// A cell started this recently and not yet in the registry is still counted as starting (it has
/// not heartbeated yet).
pub const UNSEEN_GRACE: Duration = Duration::from_secs(3);

/// What a factory shares with its siblings and knows of its organism.
pub struct Organism {
    /// The request keys of every factory of the organism.
    pub ledger: Arc<dyn FactoryLedger>,
    /// This factory's cell id (recorded with its claims).
    pub factory_id: String,
    /// Most cells per role (`roles.*.max`); a role not named has no maximum.
    pub maxima: BTreeMap<String, u32>,
    /// Health checkers (base URLs), whose `GET /cells` counts a role's live cells.
    pub healthcheckers: Vec<String>,
}

/// The factory's answer to a replacement request: the protocol's reply, plus why it started
/// nothing when it refused (a health checker that does not know the field reads the reply).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FactoryReply {
    #[serde(flatten)]
    pub reply: ReplaceReply,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A cell this factory started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Started {
    pub cell_id: String,
    pub role: String,
    pub pid: u32,
    pub addr: String,
    /// The listen address it was given (fixed for roles with fixed addresses).
    pub listen: String,
}

/// Bring-ups under way at which a factory is at capacity: each waits for a cell to become
/// ready (a local process) or a machine to boot and join (the pool), holding a task and, for
/// the pool, a provider's rate limit.
pub const STARTS_AT_CAPACITY: f64 = 8.0;
/// Requests per second at which a factory is at capacity: each claims a key in the shared
/// ledger (a database transaction) and reads the registry.
pub const REQUESTS_AT_CAPACITY: f64 = 50.0;

/// A factory's own load, measured where it works.
#[derive(Debug, Default)]
pub struct FactoryLoad {
    /// Cell requests answered (replace, divide, grow), ever.
    pub requests: AtomicU64,
    /// Bring-ups under way.
    pub starting: std::sync::atomic::AtomicUsize,
}

impl FactoryLoad {
    /// Pressure (1.0 = at capacity) and its signals, given the request rate.
    pub fn signals(&self, requests_per_s: f64) -> (f64, Vec<(&'static str, f64)>) {
        let starting = self.starting.load(Ordering::Relaxed) as f64;
        let pressure = (starting / STARTS_AT_CAPACITY).max(requests_per_s / REQUESTS_AT_CAPACITY);
        (
            pressure,
            vec![
                ("requests_per_s", requests_per_s),
                ("starts_in_flight", starting),
            ],
        )
    }

    /// Count a bring-up under way until the guard drops.
    fn start(&self) -> Starting<'_> {
        self.starting.fetch_add(1, Ordering::Relaxed);
        Starting(self)
    }
}

struct Starting<'a>(&'a FactoryLoad);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.0.starting.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct FactoryState {
    pub provider: LocalProvider,
    pub verifier: Verifier,
    /// Roles whose cells listen on known addresses (health checkers, front doors): a replacement
    /// takes the address its predecessor left.
    pub fixed: BTreeMap<String, Vec<String>>,
    /// Arguments every cell this factory starts gets (e.g. `--healthchecker URL ...`).
    pub cell_args: Vec<String>,
    pub ready: vitals::Readiness,
    pub organism: Organism,
    registry: CellsClient,
    children: Mutex<HashMap<String, Started>>,
    alive: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    pub(crate) counter: AtomicU64,
    /// Held while an upgrade request is checked and begun (one at a time).
    pub(crate) upgrading: Mutex<()>,
    /// Cancelled when this factory leaves for a successor (an upgrade): it stops serving and
    /// exits, leaving the cells it started running (they outlive it, as when it dies).
    pub(crate) leave: CancellationToken,
    /// Requests answered and bring-ups under way: the factory's own load (its pressure).
    pub load: FactoryLoad,
    /// The server pool, when the organism has one: cells of its roles come from pool machines
    /// (admitted by the purse) instead of processes of this machine.
    pub pool: std::sync::OnceLock<Arc<crate::pool::PoolFactory>>,
    /// The release's SHA-256, as joining machines are told it (`GET /release/{sha256}`).
    pub releases: crate::release::Releases,
}

impl FactoryState {
    pub fn new(
        provider: LocalProvider,
        verifier: Verifier,
        fixed: BTreeMap<String, Vec<String>>,
        cell_args: Vec<String>,
        organism: Organism,
    ) -> Arc<Self> {
        Arc::new(Self {
            provider,
            verifier,
            fixed,
            cell_args,
            ready: vitals::Readiness::default(),
            // In cluster mode `/cells` answers only holders of the read token.
            registry: CellsClient::new(
                organism.healthcheckers.clone(),
                control::ClusterKey::from_env()
                    .ok()
                    .map(|key| key.read_authorization()),
            ),
            organism,
            children: Mutex::new(HashMap::new()),
            alive: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            upgrading: Mutex::new(()),
            leave: CancellationToken::new(),
            load: FactoryLoad::default(),
            pool: std::sync::OnceLock::new(),
            releases: crate::release::Releases::default(),
        })
    }

    /// Start a cell for `req` unless its key was already served (by this factory or a sibling)
    /// or its role is at its maximum.
    pub async fn replace(
        self: &Arc<Self>,
        req: &ReplaceRequest,
    ) -> Result<FactoryReply, FactoryError> {
        self.load.requests.fetch_add(1, Ordering::Relaxed);
        let _starting = self.load.start();
        let now = now_ms();
        let memory = KEY_MEMORY.as_millis() as i64;
        let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        let mine = Claim {
            request_key: req.request_key.clone(),
            role: req.role.clone(),
            factory: self.organism.factory_id.clone(),
            cell_id: format!("{}-{}-{n}", req.role, std::process::id()),
            claimed_at_ms: now,
            started_at_ms: None,
        };
        let ledger = &self.organism.ledger;
        // Now and then, forget what no request will repeat.
        if n % 64 == 1 {
            if let Err(e) = ledger.forget_before(now - 2 * memory).await {
                tracing::warn!(error = %e, "forgetting old request keys failed");
            }
        }
        match ledger.claim(&mine, now - memory).await? {
            ClaimOutcome::Held(held) => {
                metrics::counter!("factory_duplicate_requests_total").increment(1);
                return Ok(FactoryReply {
                    reply: ReplaceReply {
                        request_key: req.request_key.clone(),
                        started: false,
                        cell_id: Some(held.cell_id),
                    },
                    refused: None,
                });
            }
            ClaimOutcome::Claimed => {}
        }
        let outcome = match self.over_maximum(req, &mine).await {
            Err(e) => Err(e),
            Ok(Some(refusal)) => {
                metrics::counter!("factory_refused_total", "role" => req.role.clone()).increment(1);
                tracing::warn!(key = %req.request_key, %refusal, "refusing to start a cell");
                Ok(FactoryReply {
                    reply: ReplaceReply {
                        request_key: req.request_key.clone(),
                        started: false,
                        cell_id: None,
                    },
                    refused: Some(refusal),
                })
            }
            Ok(None) if self.pool_serves(&req.role) => self.start_on_pool_machine(req).await,
            Ok(None) => self.start(&mine.cell_id, req).await.map(|()| FactoryReply {
                reply: ReplaceReply {
                    request_key: req.request_key.clone(),
                    started: true,
                    cell_id: Some(mine.cell_id.clone()),
                },
                refused: None,
            }),
        };
        match &outcome {
            Ok(reply) if reply.reply.started => {
                if let Err(e) = ledger
                    .mark_started(&mine.request_key, &mine.factory, now_ms())
                    .await
                {
                    tracing::warn!(error = %e, "recording a started cell in the ledger failed");
                }
            }
            // Nothing started: let the next request with this key try again.
            _ => {
                if let Err(e) = ledger.release(&mine.request_key, &mine.factory).await {
                    tracing::warn!(error = %e, "releasing a request key failed");
                }
            }
        }
        outcome
    }

    /// Whether cells of `role` come from the pool (roles with fixed addresses stay here).
    pub(crate) fn pool_serves(&self, role: &str) -> bool {
        self.pool
            .get()
            .is_some_and(|p| p.roles.iter().any(|r| r == role) && !self.fixed.contains_key(role))
    }

    /// Ask the pool for a machine: the purse admits or refuses at once; an admitted machine is
    /// brought up in the background and its cell joins by itself.
    async fn start_on_pool_machine(
        &self,
        req: &ReplaceRequest,
    ) -> Result<FactoryReply, FactoryError> {
        let pool = self.pool.get().expect("checked by pool_serves");
        if let (Some(dead), true) = (&req.parent, is_replacement(req)) {
            pool.fence_cell(dead).await;
        }
        let reply =
            |started: bool, cell_id: Option<String>, refused: Option<String>| FactoryReply {
                reply: ReplaceReply {
                    request_key: req.request_key.clone(),
                    started,
                    cell_id,
                },
                refused,
            };
        Ok(
            match pool
                .request(&req.role, &req.request_key, req.parent.clone())
                .await?
            {
                crate::pool::PoolAnswer::Admitted(server) => {
                    tracing::info!(key = %req.request_key, role = %req.role, server, "pool machine admitted");
                    reply(true, Some(format!("server:{server}")), None)
                }
                crate::pool::PoolAnswer::Already(server) => {
                    reply(false, Some(format!("server:{server}")), None)
                }
                crate::pool::PoolAnswer::Refused(r) => {
                    tracing::warn!(key = %req.request_key, reason = %r.reason, "the purse refused a machine");
                    reply(false, None, Some(r.reason))
                }
            },
        )
    }

    /// Why `req` would take its role above its maximum, or `None` when it would not. Counts the
    /// role's live cells and the starts claimed before `mine` whose cells are not live yet.
    async fn over_maximum(
        &self,
        req: &ReplaceRequest,
        mine: &Claim,
    ) -> Result<Option<String>, FactoryError> {
        let Some(&max) = self.organism.maxima.get(&req.role) else {
            return Ok(None);
        };
        let registry = self.registry().await;
        let live: Vec<String> = match &registry {
            Some(cells) => cells
                .roles
                .get(&req.role)
                .map(|v| {
                    v.iter()
                        .filter(|c| c.state != protocol::control::CellState::Retired)
                        // A dead cell being replaced is not counted, even if still listed.
                        .filter(|c| req.parent.as_ref() != Some(&c.cell_id) || !is_replacement(req))
                        .map(|c| c.cell_id.clone())
                        .collect()
                })
                .unwrap_or_default(),
            // No health checker answers (the organism is starting): count what this factory
            // knows it runs.
            None => self
                .children
                .lock()
                .await
                .values()
                .filter(|c| c.role == req.role)
                .map(|c| c.cell_id.clone())
                .collect(),
        };
        let ours: Vec<String> = self.children.lock().await.keys().cloned().collect();
        let now = now_ms();
        let unseen_grace = UNSEEN_GRACE.as_millis() as i64;
        let starting = self
            .organism
            .ledger
            .claims_of_role(&req.role, now - KEY_MEMORY.as_millis() as i64)
            .await?
            .into_iter()
            // Earlier claims only: of two concurrent requests at max - 1, the first proceeds.
            .filter(|c| (c.claimed_at_ms, &c.request_key) < (mine.claimed_at_ms, &mine.request_key))
            .filter(|c| !live.contains(&c.cell_id))
            // A cell of ours that started and exited is neither live nor starting.
            .filter(|c| {
                c.factory != self.organism.factory_id
                    || c.started_at_ms.is_none()
                    || ours.contains(&c.cell_id)
            })
            .filter(|c| c.started_at_ms.is_none_or(|at| now - at < unseen_grace))
            .count();
        let count = live.len() + starting;
        if count as u64 >= u64::from(max) {
            return Ok(Some(format!(
                "role {} is at its maximum of {max} cells (roles.{}.max): {} live, {starting} starting",
                req.role,
                req.role,
                live.len()
            )));
        }
        Ok(None)
    }

    async fn registry(&self) -> Option<CellsResponse> {
        self.registry.read().await.ok()
    }

    /// The registry as every health checker that answers sees it, merged (a cell any of them
    /// lists is listed): a checker that has just replaced another has not heard every cell yet.
    pub(crate) async fn registry_view(&self) -> Option<CellsResponse> {
        let auth = control::ClusterKey::from_env()
            .ok()
            .map(|key| key.read_authorization());
        let mut merged: Option<CellsResponse> = None;
        for hc in &self.organism.healthcheckers {
            let one = CellsClient::new(vec![hc.clone()], auth.clone());
            let Ok(view) = one.read().await else {
                continue;
            };
            let all = merged.get_or_insert_with(CellsResponse::default);
            for (role, cells) in view.roles {
                let known = all.roles.entry(role).or_default();
                for c in cells {
                    if !known.iter().any(|k| k.cell_id == c.cell_id) {
                        known.push(c);
                    }
                }
            }
        }
        merged
    }

    /// SIGTERM the processes on this machine that run cell `cell_id` (it drains and exits).
    pub(crate) async fn terminate(&self, cell_id: &str) -> usize {
        let pids = processes_of_cell(cell_id);
        for pid in &pids {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
        pids.len()
    }

    /// SIGKILL the processes on this machine that run cell `dead`, and wait until they are gone.
    /// Found by `--cell-id DEAD` on their command line (this factory's children and any other),
    /// so a pid the kernel gave to another process since is never killed.
    ///
    /// Only a process that cannot fence itself is powered off: one that is stopped (frozen), or
    /// one of a role with fixed addresses (its replacement needs the address). A running process
    /// that merely missed its heartbeats (a busy or draining cell) is left to learn from the
    /// registry that it was replaced and retire; killing it would cut its in-flight requests.
    pub async fn fence(&self, dead: &str, role: &str) -> usize {
        let fixed = self.fixed.contains_key(role);
        let pids: Vec<u32> = processes_of_cell(dead)
            .into_iter()
            .filter(|pid| {
                let stopped = stopped(*pid);
                if !stopped && !fixed {
                    tracing::info!(
                        cell_id = dead,
                        pid,
                        "not fencing a running cell: it retires itself"
                    );
                }
                stopped || fixed
            })
            .collect();
        for pid in &pids {
            tracing::warn!(
                cell_id = dead,
                pid,
                "fencing: killing the replaced cell's process"
            );
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        if !pids.is_empty() {
            metrics::counter!("factory_fenced_total").increment(pids.len() as u64);
        }
        let deadline = Instant::now() + FENCE_WAIT;
        while Instant::now() < deadline {
            let still = pids.iter().any(|p| runs_cell(*p, dead));
            let ours = self.children.lock().await.contains_key(dead);
            if !still && !ours {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pids.len()
    }

    async fn start(
        self: &Arc<Self>,
        cell_id: &str,
        req: &ReplaceRequest,
    ) -> Result<(), FactoryError> {
        // Power the dead cell off first: then its fixed address (if any) is free, and the
        // replacement takes that same address (clients know the front doors by address).
        let mut predecessor = None;
        if let (Some(dead), true) = (&req.parent, is_replacement(req)) {
            predecessor = self.fixed_address_of(dead, &req.role).await;
            self.fence(dead, &req.role).await;
        }
        let listen = match predecessor {
            Some(addr) if address_frees(&addr).await => addr,
            _ => self.free_address(&req.role, &req.request_key).await,
        };
        let exe = self.provider.current_exe();
        self.launch(
            cell_id,
            req,
            &exe,
            listen,
            self.provider.ready_timeout,
            false,
        )
        .await
    }

    /// Start cell `cell_id` for `req` from `exe`, listening on `listen` (a live cell's own
    /// address, for an upgrade: the new cell takes its listening socket over), when it is ready
    /// within `ready`.
    pub(crate) async fn start_from(
        self: &Arc<Self>,
        cell_id: &str,
        req: &ReplaceRequest,
        exe: &std::path::Path,
        listen: Option<String>,
        ready: Duration,
    ) -> Result<(), FactoryError> {
        // A live cell's own address: the new cell takes its listening socket over, and only
        // then (a taken address is otherwise an error).
        let (listen, take_over) = match listen {
            Some(listen) => (listen, true),
            None => (self.free_address(&req.role, &req.request_key).await, false),
        };
        self.launch(cell_id, req, exe, listen, ready, take_over)
            .await
    }

    async fn launch(
        self: &Arc<Self>,
        cell_id: &str,
        req: &ReplaceRequest,
        exe: &std::path::Path,
        listen: String,
        ready: Duration,
        take_over: bool,
    ) -> Result<(), FactoryError> {
        let mut args = vec![
            "--listen".to_string(),
            listen.clone(),
            "--cell-id".to_string(),
            cell_id.to_string(),
        ];
        if take_over {
            args.push("--take-over".into());
        }
        if let Some(parent) = &req.parent {
            args.push("--parent".into());
            args.push(parent.clone());
        }
        args.extend(self.cell_args.iter().cloned());
        let spec = CellSpec {
            role: req.role.clone(),
            args,
        };
        tracing::info!(cell_id, role = %req.role, key = %req.request_key, reason = %req.reason, "starting a cell");
        let mut started = self.provider.start_exe(exe, ready, cell_id, &spec).await?;
        let info = Started {
            cell_id: cell_id.to_string(),
            role: req.role.clone(),
            pid: started.ready.pid,
            addr: started.ready.addr.clone(),
            listen,
        };
        metrics::counter!("factory_cells_started_total", "role" => req.role.clone()).increment(1);
        self.children.lock().await.insert(cell_id.to_string(), info);
        // Reap the process when it exits, so its address is free again.
        let state = self.clone();
        let id = cell_id.to_string();
        let reaper = tokio::spawn(async move {
            let _ = started.child.wait().await;
            drop(started.stdin.take());
            state.children.lock().await.remove(&id);
            state.alive.lock().await.remove(&id);
        });
        self.alive.lock().await.insert(cell_id.to_string(), reaper);
        Ok(())
    }

    /// The fixed address a (dead) cell of `role` listened on: from this factory's own record,
    /// or from the command line of its process on this machine.
    async fn fixed_address_of(&self, dead: &str, role: &str) -> Option<String> {
        let fixed = self.fixed.get(role)?;
        let ours = self
            .children
            .lock()
            .await
            .get(dead)
            .map(|c| c.listen.clone());
        let listen = ours.or_else(|| {
            processes_of_cell(dead).into_iter().find_map(|pid| {
                cmdline(pid)
                    .windows(2)
                    .find(|w| w[0] == "--listen")
                    .map(|w| w[1].clone())
            })
        })?;
        fixed.contains(&listen).then_some(listen)
    }

    async fn free_address(&self, role: &str, request_key: &str) -> String {
        let Some(fixed) = self.fixed.get(role) else {
            return "127.0.0.1:0".into();
        };
        let children = self.children.lock().await;
        for addr in in_slot_order(fixed, request_key) {
            // Not held by a cell of ours, nor by a cell of a sibling or of a previous factory
            // (a listener there refuses our probe). A process that takes it between the probe and
            // the cell's bind fails the request, which is asked again.
            if !children.values().any(|c| &c.listen == addr)
                && std::net::TcpListener::bind(addr.as_str()).is_ok()
            {
                return addr.clone();
            }
        }
        "127.0.0.1:0".into()
    }

    /// Stop a cell this factory started: a child process is sent SIGTERM (it drains); a cell
    /// on a pool machine has its machine powered off, in the background (the provider's
    /// power-off drains it: a BMC's soft power-off, a retire order for Wake-on-LAN).
    pub async fn stop(&self, cell_id: &str) -> bool {
        {
            let children = self.children.lock().await;
            if let Some(c) = children.get(cell_id) {
                return kill(Pid::from_raw(c.pid as i32), Signal::SIGTERM).is_ok();
            }
        }
        let Some(pool) = self.pool.get() else {
            return false;
        };
        let Ok(rows) = pool.ledger.servers().await else {
            return false;
        };
        let Some(row) = rows
            .into_iter()
            .find(|r| r.state.spends() && r.cell_id.as_deref() == Some(cell_id))
        else {
            return false;
        };
        let (pool, reason) = (pool.clone(), format!("cell {cell_id} was asked to stop"));
        tokio::spawn(async move {
            if let Err(e) = pool.power_off(&row.name, &reason).await {
                tracing::warn!(server = %row.name, error = %e, "powering off a stopped cell's machine failed");
            }
        });
        true
    }

    pub async fn children(&self) -> Vec<Started> {
        let mut v: Vec<Started> = self.children.lock().await.values().cloned().collect();
        v.sort_by(|a, b| a.cell_id.cmp(&b.cell_id));
        v
    }
}

pub fn app(state: Arc<FactoryState>) -> Router {
    let vitals = vitals::router("factory", state.ready.clone());
    let router = Router::new()
        .route("/control/replace", post(replace))
        .route("/control/stop", post(stop))
        .route("/children", get(children))
        .route("/join", post(join))
        .route("/release/{sha256}", get(release))
        .route("/pool", get(pool_status))
        .route("/control/upgrade", post(upgrade))
        .route("/upgrade", get(upgrade_status))
        .fallback(not_found)
        .with_state(state)
        .merge(vitals);
    vitals::instrument(router, &[])
}

async fn replace(
    State(state): State<Arc<FactoryState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: ReplaceRequest =
        match control::receive(&state.verifier, ReplaceRequest::KIND, &headers, &body) {
            Ok((_, req)) => req,
            Err(rejection) => return rejection.into_response(),
        };
    if !infra_role(&req.role) {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Json(protocol::ErrorBody {
                error: format!("unknown role {:?}", req.role),
            }),
        )
            .into_response();
    }
    match state.replace(&req).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, key = %req.request_key, "starting a cell failed");
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                Json(protocol::ErrorBody {
                    error: format!("starting a {} cell failed: {e}", req.role),
                }),
            )
                .into_response()
        }
    }
}

/// Begin a live upgrade (signed): answered with its status at once.
async fn upgrade(
    State(state): State<Arc<FactoryState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use protocol::control::UpgradeRequest;
    let req: UpgradeRequest =
        match control::receive(&state.verifier, UpgradeRequest::KIND, &headers, &body) {
            Ok((_, req)) => req,
            Err(rejection) => return rejection.into_response(),
        };
    match state.upgrade(&req).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => {
            let status = match e {
                crate::upgrade::UpgradeError::Busy(_) => axum::http::StatusCode::CONFLICT,
                _ => axum::http::StatusCode::BAD_REQUEST,
            };
            tracing::warn!(error = %e, to = %req.to, "upgrade refused");
            (
                status,
                Json(protocol::ErrorBody {
                    error: e.to_string(),
                }),
            )
                .into_response()
        }
    }
}

/// The latest upgrade's status (in cluster mode only for a reader with the read token).
async fn upgrade_status(State(state): State<Arc<FactoryState>>, headers: HeaderMap) -> Response {
    if let Err(rejection) = state.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    Json(protocol::Versioned::new(state.upgrade_status())).into_response()
}

/// A request to replace a dead cell (the health checker's `replace:<dead>` keys), as opposed to
/// growth or a parent asking to divide: only those fence their `parent`.
fn is_replacement(req: &ReplaceRequest) -> bool {
    req.parent.is_some() && req.request_key.starts_with("replace:")
}

/// Pids of the processes whose command line says they run cell `cell_id`.
fn processes_of_cell(cell_id: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me && runs_cell(*pid, cell_id))
        .collect()
}

/// Whether process `pid` is stopped (SIGSTOP, or traced): it cannot act, not even to retire.
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|s| s == "T" || s == "t")
        })
        .unwrap_or(false)
}

/// Whether process `pid` runs cell `cell_id` (of this factory's organism, when it has a lease:
/// another organism on the machine may hold a cell of the same name).
fn runs_cell(pid: u32, cell_id: &str) -> bool {
    let args = cmdline(pid);
    let named = args.iter().any(|a| a == "run")
        && args
            .windows(2)
            .any(|w| w[0] == "--cell-id" && w[1] == cell_id);
    if !named {
        return false;
    }
    match std::env::var(crate::lease::LEASE_ENV) {
        Ok(lease) if !lease.is_empty() => {
            let wanted = format!("{}={lease}", crate::lease::LEASE_ENV);
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == wanted.as_bytes()))
                .unwrap_or(false)
        }
        _ => true,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn infra_role(role: &str) -> bool {
    ["api", "crawler", "healthchecker", "frontdoor"].contains(&role)
}

async fn stop(State(state): State<Arc<FactoryState>>, headers: HeaderMap, body: Bytes) -> Response {
    match control::receive::<StopRequest>(&state.verifier, StopRequest::KIND, &headers, &body) {
        // Asked to stop itself (an upgrade replaces the factories last): it leaves, and its
        // supervisor starts its successor from the organism's release.
        Ok((_, req)) if req.cell_id == state.organism.factory_id => {
            tracing::info!(reason = %req.reason, "asked to leave");
            state.leave.cancel();
            Json(serde_json::json!({ "stopped": true })).into_response()
        }
        Ok((_, req)) => {
            Json(serde_json::json!({ "stopped": state.stop(&req.cell_id).await })).into_response()
        }
        Err(rejection) => rejection.into_response(),
    }
}

/// Any other path: 404, naming the routes there are.
async fn not_found(uri: axum::http::Uri) -> Response {
    (
        axum::http::StatusCode::NOT_FOUND,
        Json(protocol::ErrorBody {
            error: format!(
                "no such endpoint {}: see POST /control/replace, POST /control/stop, GET /children",
                uri.path()
            ),
        }),
    )
        .into_response()
}

/// The cells this factory started, with their pids: in cluster mode only for a reader with
/// the organism's read token (`control::Verifier::check_read`).
async fn children(State(state): State<Arc<FactoryState>>, headers: HeaderMap) -> Response {
    if let Err(rejection) = state.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    Json(state.children().await).into_response()
}

/// A blank machine redeems its one-time token and learns its role, its parent's configuration
/// and the cluster key. Not a control message: the token is the authentication.
async fn join(State(state): State<Arc<FactoryState>>, body: Bytes) -> Response {
    use axum::http::StatusCode;
    let error = |status: StatusCode, error: String| {
        (status, Json(protocol::ErrorBody { error })).into_response()
    };
    let Some(pool) = state.pool.get() else {
        return error(
            StatusCode::NOT_FOUND,
            "this organism has no server pool".into(),
        );
    };
    let req: crate::pool::JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad join request: {e}")),
    };
    match pool.join(&req).await {
        Ok(mut reply) => {
            let exe = state.provider.current_exe();
            match state.releases.reference(&exe, pool.join_url()).await {
                Ok(release) => reply.release = Some(release),
                // The machine runs the `cell` it booted: mixed builds work together.
                Err(e) => {
                    tracing::warn!(exe = %exe.display(), error = %e, "naming the release for a joining machine failed")
                }
            }
            Json(reply).into_response()
        }
        Err(e @ (crate::pool::JoinError::Token(_) | crate::pool::JoinError::Malformed)) => {
            tracing::warn!(host = ?req.hostname, error = %e, "join refused");
            error(StatusCode::UNAUTHORIZED, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The organism's release, for a pool machine that joined (see [`crate::release`]): the
/// executable whose SHA-256 is asked, if it is this factory's current release; in cluster mode
/// only for a reader with the read token (which a joined machine has).
async fn release(
    State(state): State<Arc<FactoryState>>,
    axum::extract::Path(sha256): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    use axum::http::{header, StatusCode};
    if let Err(rejection) = state.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    let error = |status: StatusCode, error: String| {
        (status, Json(protocol::ErrorBody { error })).into_response()
    };
    if !crate::release::is_sha256(&sha256) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{sha256:?} is not a SHA-256 in hex (64 digits)"),
        );
    }
    let exe = state.provider.current_exe();
    let have = match state.releases.sha256_of(&exe).await {
        Ok(have) => have,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the release {}: {e}", exe.display()),
            )
        }
    };
    if !have.eq_ignore_ascii_case(&sha256) {
        return error(
            StatusCode::NOT_FOUND,
            format!("the organism's release is {have}, not {sha256}"),
        );
    }
    let file = match tokio::fs::File::open(&exe).await {
        Ok(file) => file,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("opening the release {}: {e}", exe.display()),
            )
        }
    };
    let len = match file.metadata().await {
        Ok(meta) => meta.len(),
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the release {}: {e}", exe.display()),
            )
        }
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response()
}

/// The pool's servers and the purse: in cluster mode only for a reader with the read token.
async fn pool_status(State(state): State<Arc<FactoryState>>, headers: HeaderMap) -> Response {
    if let Err(rejection) = state.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    let Some(pool) = state.pool.get() else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            Json(protocol::ErrorBody {
                error: "this organism has no server pool".into(),
            }),
        )
            .into_response();
    };
    match (pool.ledger.servers().await, pool.spend().await) {
        (Ok(servers), Ok(spend)) => {
            Json(serde_json::json!({ "v": 1, "servers": servers, "spend": spend })).into_response()
        }
        (Err(e), _) | (_, Err(e)) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            Json(protocol::ErrorBody {
                error: format!("reading the pool: {e}"),
            }),
        )
            .into_response(),
    }
}

/// Serve until `shutdown`; then stop every cell this factory started, giving them the cell's
/// grace period (`ctx.grace()`) before killing the laggards.
pub async fn run(
    ctx: lifecycle::CellContext,
    state: Arc<FactoryState>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let grace = ctx.grace();
    {
        let (me, rate) = (state.clone(), lifecycle::pressure::Rate::default());
        ctx.report_pressure(move || {
            me.load
                .signals(rate.per_sec(me.load.requests.load(Ordering::Relaxed)))
        });
    }
    crate::pool::spend_gauges(&state);
    if let Some(pool) = state.pool.get() {
        // Machines whose cell is gone are powered off.
        pool.watch(Duration::from_secs(1), shutdown.clone());
    }
    state.ready.set(true);
    let (stop_serving, leave) = (shutdown.clone(), state.leave.clone());
    axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = stop_serving.cancelled() => {}
                _ = leave.cancelled() => {}
            }
        })
        .await
        .map_err(RunError::Serve)?;
    state.ready.set(false);
    if state.leave.is_cancelled() && !shutdown.is_cancelled() {
        tracing::info!("leaving for a successor; the cells this factory started keep running");
        return Ok(());
    }
    let pids: Vec<u32> = state.children().await.iter().map(|c| c.pid).collect();
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !state.children.lock().await.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in state.children().await {
        let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGKILL);
    }
    // No pool machine keeps spending after its organism: power them off (their spend closes
    // when the provider confirms).
    if let Some(pool) = state.pool.get() {
        pool.power_off_all("the organism is stopping").await;
    }
    Ok(())
}

/// Whether `addr` can be bound within a second (the killed predecessor's socket is released as
/// the kernel reaps it).
/// A role's fixed addresses in the order a request tries them: slot N of the role (a growth
/// key, `grow:ROLE:N` or `grow:ROLE:N:ATTEMPT`) from the N-th address on, so two factories
/// filling two slots at once (an organism's start) do not both probe the same free address and
/// race to bind it; any other request from the first.
fn in_slot_order<'a>(
    fixed: &'a [String],
    request_key: &str,
) -> impl Iterator<Item = &'a String> + 'a {
    let mut parts = request_key.split(':');
    let slot = match (parts.next(), parts.next(), parts.next()) {
        (Some("grow"), Some(_), Some(slot)) => slot.parse::<usize>().ok(),
        _ => None,
    };
    let first = slot.map_or(0, |n| n.saturating_sub(1) % fixed.len().max(1));
    fixed.iter().cycle().skip(first).take(fixed.len())
}

async fn address_frees(addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if std::net::TcpListener::bind(addr).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::in_slot_order;

    #[test]
    fn each_slot_tries_its_own_fixed_address_first() {
        let fixed = vec!["a:1".to_string(), "a:2".to_string()];
        let order = |key: &str| in_slot_order(&fixed, key).cloned().collect::<Vec<_>>();
        assert_eq!(order("grow:frontdoor:1"), ["a:1", "a:2"]);
        assert_eq!(order("grow:frontdoor:2"), ["a:2", "a:1"]);
        assert_eq!(order("grow:frontdoor:2:3"), ["a:2", "a:1"]);
        assert_eq!(order("grow:frontdoor:3"), ["a:1", "a:2"]);
        // Not a growth slot (a replacement, an upgrade): from the first.
        assert_eq!(order("replace:frontdoor-1-4"), ["a:1", "a:2"]);
        assert_eq!(order("grow:frontdoor:x"), ["a:1", "a:2"]);
        assert!(in_slot_order(&[], "grow:frontdoor:2").next().is_none());
    }
}
