//! The healthchecker role: every cell pushes its heartbeat here (straight, not through the
//! queue); this role detects deaths with a phi accrual failure detector, keeps the registry of
//! live cells (`GET /cells`), records and streams every transition in a cell's life
//! (`GET /events`, Server-Sent Events), and asks the factory for a cell whenever a role falls
//! below its minimum.
//!
//! Entry points: [`app`] builds the axum `Router` (tested with `oneshot`, no socket); [`run`]
//! serves it on a bound listener until a shutdown signal, beside the detector's sweep and the
//! reconcile loop. The pieces are pure and time-injected: [`detector`], [`registry`],
//! [`reconcile`], [`events`]; [`HealthcheckerState`] ties them together under one lock.
//!
//! Architecture Invariant: several health checkers run side by side, each on its own (they do
//! not talk to each other). They agree because they see the same heartbeats and derive the same
//! replacement keys from them; the factory starts one cell per key.

pub mod config;
pub mod dashboard;
pub mod detector;
pub mod events;
mod http;
pub mod reconcile;
pub mod registry;
pub mod surplus;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::{ClusterKey, ControlClient, Signer, Verifier};
use protocol::control::{
    CellEvent, CellsResponse, Directive, EventKind, Heartbeat, HeartbeatReply, ReplaceReply,
    ReplaceRequest,
};
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

pub use config::HealthcheckerConfig;
pub use http::{app, ApiDoc};

use events::EventLog;
use reconcile::{ReconcileParams, Reconciler};
use registry::{Departure, Ignored, Now, Registry};
use surplus::{Member, Surplus};

/// A pause of the checker's own sweeps longer than this means the checker itself was away
/// (frozen, starved); cells beat through shorter ones, since it is under the detection time.
pub const OBSERVER_STALL: Duration = Duration::from_millis(250);

/// The factory's endpoint for [`ReplaceRequest`]s.
pub const REPLACE_PATH: &str = <ReplaceRequest as protocol::control::ControlRequest>::PATH;
/// This role's endpoint for heartbeats.
pub const HEARTBEAT_PATH: &str = "/control/heartbeat";

/// What the handlers and loops share.
#[derive(Clone)]
pub struct HealthcheckerState(Arc<Shared>);

struct Shared {
    cfg: HealthcheckerConfig,
    core: Mutex<Core>,
    events: Arc<EventLog>,
    verifier: Verifier,
    client: ControlClient,
    ready: vitals::Readiness,
    /// Ends the event streams (so a graceful shutdown is not held open by them).
    streams: CancellationToken,
    counters: Counters,
    /// What the dashboard gathered from other cells, and who is watching.
    dashboard: dashboard::Dashboard,
}

/// The registry and the controllers change together, under one lock.
/// How long an ordered retirement waits for a cell this checker has not seen leave.
pub const ORDER_KEEP: Duration = Duration::from_secs(600);

struct Core {
    registry: Registry,
    reconciler: Reconciler,
    surplus: Surplus,
    /// Retirements ordered from outside (the factory, for a machine it cannot power off), by
    /// cell, with their reason and when they were ordered: told to the cell in every heartbeat
    /// answer until it is gone.
    ordered: HashMap<String, (std::time::Instant, String)>,
    /// When this checker last looked at the registry (sweep or heartbeat), to notice its own
    /// stalls.
    last_look: Option<std::time::Instant>,
}

#[derive(Default)]
struct Counters {
    heartbeats: AtomicU64,
    ignored: AtomicU64,
    rejected: AtomicU64,
    deaths: AtomicU64,
    requested: AtomicU64,
    unreachable: AtomicU64,
}

/// Counters since start, for tests and `cell status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Heartbeats accepted (routine or not).
    pub heartbeats: u64,
    /// Heartbeats that opened but changed nothing (stale seq, retired, invalid).
    pub ignored: u64,
    /// Heartbeats refused by the envelope check (unsigned, forged, stale, replayed, ...).
    pub rejected: u64,
    /// Cells declared dead.
    pub deaths: u64,
    /// Replacement requests sent to a factory.
    pub requested: u64,
    /// Rounds in which no factory answered.
    pub unreachable: u64,
}

impl HealthcheckerState {
    /// A health checker that signs as `cell_id` and accepts messages signed with `key`.
    pub fn new(cfg: HealthcheckerConfig, key: ClusterKey, cell_id: impl Into<String>) -> Self {
        let verifier = Verifier::new(key.clone(), Duration::from_millis(cfg.message_window_ms));
        let client = ControlClient::new(Signer::new(key, cell_id));
        let now = tokio::time::Instant::now().into_std();
        let reconciler = Reconciler::new(
            ReconcileParams {
                minimums: cfg.minimums.clone(),
                request_timeout: Duration::from_millis(cfg.request_timeout_ms),
                startup_grace: Duration::from_millis(cfg.startup_grace_ms),
            },
            now,
        );
        Self(Arc::new(Shared {
            core: Mutex::new(Core {
                registry: match cfg.probe_params() {
                    Some(p) => Registry::new(cfg.phi_params()).with_probes(p),
                    None => Registry::new(cfg.phi_params()),
                },
                reconciler,
                // Self-regulating roles retire their own surplus (`lifecycle::homeostasis`).
                surplus: Surplus::new(
                    cfg.minimums
                        .iter()
                        .filter(|(role, _)| !cfg.regulated.contains(*role))
                        .map(|(role, n)| (role.clone(), *n))
                        .collect(),
                ),
                ordered: HashMap::new(),
                last_look: None,
            }),
            cfg,
            events: Arc::new(EventLog::new(events::DEFAULT_CAPACITY)),
            verifier,
            client,
            ready: vitals::Readiness::default(),
            streams: CancellationToken::new(),
            counters: Counters::default(),
            dashboard: dashboard::Dashboard::new(),
        }))
    }

    pub fn config(&self) -> &HealthcheckerConfig {
        &self.0.cfg
    }

    pub fn ready(&self) -> vitals::Readiness {
        self.0.ready.clone()
    }

    /// The event log (numbered, bounded, streamable).
    pub fn events(&self) -> &Arc<EventLog> {
        &self.0.events
    }

    /// Live cells by role, as `GET /cells` shows them.
    pub fn cells(&self) -> CellsResponse {
        self.core().registry.records(now().at)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.0.counters;
        Stats {
            heartbeats: c.heartbeats.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            deaths: c.deaths.load(Ordering::Relaxed),
            requested: c.requested.load(Ordering::Relaxed),
            unreachable: c.unreachable.load(Ordering::Relaxed),
        }
    }

    /// Keys of the replacement requests outstanding.
    pub fn outstanding(&self) -> Vec<String> {
        self.core().reconciler.outstanding_keys()
    }

    /// Take a heartbeat (already authenticated) received at `now`; the reply tells the cell
    /// to retire when it is surplus. A buried cell's heartbeat comes back as
    /// [`Ignored::Buried`]: the handler answers it with a `fenced` directive.
    pub fn heartbeat(&self, hb: Heartbeat, now: Now) -> Result<HeartbeatReply, Ignored> {
        let mut core = self.core();
        self.notice_own_stall(&mut core, now);
        let (cell_id, parent) = (hb.cell_id.clone(), hb.parent.clone());
        let events = match core.registry.observe(hb, now) {
            Ok(events) => events,
            Err(ignored) => {
                drop(core);
                self.0.counters.ignored.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("healthchecker_heartbeats_ignored_total", "reason" => ignored.label())
                    .increment(1);
                return Err(ignored);
            }
        };
        self.0.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("healthchecker_heartbeats_total").increment(1);
        let directive = core
            .surplus
            .asked_of(&cell_id)
            .or_else(|| core.ordered.get(&cell_id).map(|(_, r)| r.as_str()))
            .map(|reason| Directive::Retire {
                reason: reason.to_string(),
            });
        for event in &events {
            match event.kind {
                EventKind::Born => core.reconciler.cell_appeared(&cell_id, parent.as_deref()),
                EventKind::Dead => {
                    core.reconciler
                        .cell_died(&event.cell_id, &event.role, &event.reason, now.at);
                    self.count_death(&event.role);
                }
                _ => {}
            }
        }
        drop(core);
        self.record(events);
        Ok(HeartbeatReply { directive })
    }

    /// Lifeguard's local health, reduced to its core: a checker that did not look at the
    /// registry for longer than [`OBSERVER_STALL`] was itself away (frozen, starved), and the
    /// silence it would now see is its own. Restart every cell's detector clock instead of
    /// declaring the organism dead.
    fn notice_own_stall(&self, core: &mut Core, now: Now) {
        if let Some(last) = core.last_look {
            let away = now.at.saturating_duration_since(last);
            if away > OBSERVER_STALL {
                core.registry.observer_resumed(now.at);
                metrics::counter!("healthchecker_stalls_total").increment(1);
                tracing::warn!(
                    away_ms = away.as_millis() as u64,
                    "this health checker stalled; restarting every detector rather than blaming the cells"
                );
            }
        }
        core.last_look = Some(now.at);
    }

    /// Order `cell_id` to drain and retire: its heartbeat answers say so until it is gone (or
    /// for [`ORDER_KEEP`], for a cell that never beats here). True when the cell is live here.
    pub fn order_retire(&self, cell_id: &str, reason: &str, now: Now) -> bool {
        let mut core = self.core();
        core.ordered
            .retain(|_, (at, _)| now.at.saturating_duration_since(*at) < ORDER_KEEP);
        core.ordered
            .insert(cell_id.to_string(), (now.at, reason.to_string()));
        tracing::info!(cell = cell_id, reason, "retirement ordered");
        core.registry.is_live(cell_id)
    }

    /// Let the detector look at every cell at `now`; returns who left.
    pub fn sweep(&self, now: Now) -> Vec<Departure> {
        let mut core = self.core();
        self.notice_own_stall(&mut core, now);
        let departures = core.registry.sweep(now);
        self.bury(&mut core, &departures, now);
        let retirements = {
            let Core {
                registry, surplus, ..
            } = &mut *core;
            let me = self.0.client.signer().sender();
            let leader = registry
                .members()
                .filter(|(_, role, state, _, _)| {
                    *role == "healthchecker" && registry::counts_toward_minimum(*state)
                })
                .all(|(id, ..)| me <= id);
            surplus.plan(
                now.at,
                leader,
                registry
                    .members()
                    .map(|(cell_id, role, state, pressure, first_seen)| Member {
                        cell_id,
                        role,
                        state,
                        pressure,
                        first_seen,
                    }),
            )
        };
        drop(core);
        let mut events: Vec<CellEvent> = departures.iter().map(|d| d.event.clone()).collect();
        for r in retirements {
            tracing::info!(cell = %r.cell_id, role = %r.role, reason = %r.reason, "retiring a surplus cell");
            metrics::counter!("healthchecker_retirements_total", "role" => r.role.clone())
                .increment(1);
            events.push(CellEvent {
                kind: EventKind::Draining,
                cell_id: r.cell_id,
                role: r.role,
                at_ms: now.unix_ms,
                reason: format!("asked to retire: {}", r.reason),
                parent: None,
            });
        }
        self.record(events);
        departures
    }

    /// The probes the sweeps asked for (see [`registry::Registry::take_probes`]).
    pub fn take_probes(&self) -> Vec<registry::Probe> {
        self.core().registry.take_probes()
    }

    /// What a probe found; a confirmed death is recorded like one the sweep found.
    pub fn probe_result(
        &self,
        probe: &registry::Probe,
        answer: Result<(), String>,
        now: Now,
    ) -> Option<Departure> {
        let answered = answer.is_ok();
        let mut core = self.core();
        let departure = core.registry.probe_result(&probe.cell_id, answer, now);
        let outcome = match (&departure, answered) {
            (Some(_), _) => "confirmed",
            (None, true) => "refuted",
            (None, false) => "moot",
        };
        metrics::counter!("healthchecker_probes_total", "outcome" => outcome).increment(1);
        if answered {
            tracing::info!(cell = %probe.cell_id, role = %probe.role, "a silent cell answered its probe: slow, not dead");
        }
        let departures: Vec<Departure> = departure.into_iter().collect();
        self.bury(&mut core, &departures, now);
        drop(core);
        self.record(departures.iter().map(|d| d.event.clone()).collect());
        departures.into_iter().next()
    }

    /// Book the departures the detector (or a probe) decided.
    fn bury(&self, core: &mut Core, departures: &[Departure], now: Now) {
        for d in departures {
            core.ordered.remove(&d.cell_id);
            if d.dead {
                core.reconciler
                    .cell_died(&d.cell_id, &d.role, &d.event.reason, now.at);
                self.count_death(&d.role);
                metrics::histogram!("healthchecker_detection_seconds")
                    .record(d.silent_for.as_secs_f64());
                tracing::warn!(cell = %d.cell_id, role = %d.role, reason = %d.event.reason, "cell declared dead");
            } else {
                tracing::info!(cell = %d.cell_id, role = %d.role, "cell retired");
            }
        }
    }

    /// One round of keeping roles at their minimum: plan, ask the factories, take the answers.
    pub async fn reconcile_once(&self) {
        let planned = {
            let mut core = self.core();
            let Core {
                registry,
                reconciler,
                ..
            } = &mut *core;
            reconciler.plan(now().at, &*registry)
        };
        let mut reachable = true;
        for request in planned {
            let answer = if reachable {
                self.0.counters.requested.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("healthchecker_replacements_requested_total").increment(1);
                tracing::info!(key = %request.request_key, role = %request.role, reason = %request.reason, "asking the factory for a cell");
                self.ask_factories(&request).await
            } else {
                None
            };
            let mut core = self.core();
            match answer {
                Some(reply) => {
                    let Core {
                        registry,
                        reconciler,
                        ..
                    } = &mut *core;
                    if let Some(answered) =
                        reconciler.answered(&request, reply, now().at, &*registry)
                    {
                        if answered.first {
                            self.record(vec![replaced_event(&answered.request, &answered.reply)]);
                        }
                    }
                }
                None => {
                    if reachable {
                        reachable = false;
                        self.0.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key = %request.request_key, "no factory answered; backing off");
                    }
                    core.reconciler.unreachable(&request, now().at);
                }
            }
        }
    }

    async fn ask_factories(&self, request: &ReplaceRequest) -> Option<ReplaceReply> {
        for factory in &self.0.cfg.factories {
            let answer = self.0.client.ask(factory, request).await;
            match answer {
                Ok(reply) => return Some(reply),
                Err(e) => {
                    metrics::counter!("healthchecker_factory_errors_total").increment(1);
                    tracing::debug!(factory = %factory, error = %e, "factory did not answer");
                }
            }
        }
        None
    }

    fn count_death(&self, role: &str) {
        self.0.counters.deaths.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("healthchecker_deaths_total", "role" => role.to_string()).increment(1);
    }

    fn record(&self, events: Vec<CellEvent>) {
        for event in events {
            metrics::counter!("healthchecker_events_total", "kind" => event.kind.as_str())
                .increment(1);
            self.0.events.push(event);
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        // A panic while holding the lock cannot leave the registry half-changed in a way that
        // matters more than stopping would: keep serving.
        self.0.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Roles as a metric label: the organism's own, anything else (a newer cell's) `other`, so a
/// signed but odd heartbeat cannot grow the label set.
fn role_label(role: &str) -> &'static str {
    match role {
        "api" => "api",
        "crawler" => "crawler",
        "frontdoor" => "frontdoor",
        "healthchecker" => "healthchecker",
        "factory" => "factory",
        _ => "other",
    }
}

/// The registry's figures as gauges, set when `/metrics` is scraped: live cells by role and
/// state, and the oldest heartbeat age by role.
fn registry_gauges(state: &HealthcheckerState) {
    use protocol::control::CellState;
    const ROLES: [&str; 5] = ["api", "crawler", "frontdoor", "healthchecker", "factory"];
    const STATES: [(CellState, &str); 7] = [
        (CellState::Joining, "joining"),
        (CellState::Serving, "serving"),
        (CellState::Throttling, "throttling"),
        (CellState::Dividing, "dividing"),
        (CellState::Draining, "draining"),
        (CellState::Retired, "retired"),
        (CellState::Dead, "dead"),
    ];
    let cells = state.cells();
    let mut counts: HashMap<(&'static str, &'static str), u64> = HashMap::new();
    let mut age: HashMap<&'static str, f64> = HashMap::new();
    for c in cells.roles.values().flatten() {
        let role = role_label(&c.role);
        let st = STATES
            .iter()
            .find(|(s, _)| *s == c.state)
            .map_or("other", |(_, l)| *l);
        *counts.entry((role, st)).or_default() += 1;
        let a = age.entry(role).or_default();
        *a = a.max(c.last_seen_ms as f64 / 1000.0);
    }
    // Every role and state, zeros included, so a role that lost its cells shows 0, not a gap.
    for role in ROLES.iter().copied().chain(["other"]) {
        for (_, st) in STATES {
            let n = counts.get(&(role, st)).copied().unwrap_or(0);
            if n > 0 || role != "other" {
                metrics::gauge!("healthchecker_cells", "role" => role, "state" => st).set(n as f64);
            }
        }
        if role != "other" || age.contains_key(role) {
            metrics::gauge!("healthchecker_heartbeat_age_max_seconds", "role" => role)
                .set(age.get(role).copied().unwrap_or(0.0));
        }
    }
    metrics::gauge!("healthchecker_events_recorded").set(state.events().latest() as f64);
}

fn replaced_event(request: &ReplaceRequest, reply: &ReplaceReply) -> CellEvent {
    let what = match (&reply.cell_id, reply.started) {
        (Some(cell), true) => format!("the factory started {cell}"),
        (Some(cell), false) => format!("the factory had already started {cell}"),
        (None, true) => "the factory is starting a cell".to_string(),
        (None, false) => "the factory is already starting a cell".to_string(),
    };
    CellEvent {
        kind: EventKind::Replaced,
        cell_id: reply
            .cell_id
            .clone()
            .unwrap_or_else(|| request.request_key.clone()),
        role: request.role.clone(),
        at_ms: now().unix_ms,
        reason: format!(
            "{what} for request {}: {}",
            request.request_key, request.reason
        ),
        parent: request.parent.clone(),
    }
}

/// The current moment (tokio's clock, so paused-time tests move it).
pub fn now() -> Now {
    Now::with_wall_clock(tokio::time::Instant::now().into_std())
}

/// Why the healthchecker role stopped other than by its shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the healthchecker failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("the health checker's probe client could not be built: {0}")]
    Client(String),
}

/// Ask a suspected cell's own endpoint whether it lives: any HTTP answer says it does; a
/// refused or reset connection, or no answer in time (a frozen process whose kernel still
/// accepts connections), says it does not.
async fn probe_cell(client: &reqwest::Client, addr: &str, timeout: Duration) -> Result<(), String> {
    let url = format!("{}/healthz", addr.trim_end_matches('/'));
    match client.get(&url).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.is_timeout() => Err(format!(
            "no HTTP answer to its probe within {} ms",
            timeout.as_millis()
        )),
        Err(e) if e.is_connect() => Err(format!("its probe could not connect ({e})")),
        Err(e) => Err(format!("its probe failed ({e})")),
    }
}

/// Serve the healthchecker role on `listener` until `shutdown` is cancelled, with the detector
/// sweeping every `sweep_ms` and the reconcile loop every `reconcile_ms`. The state already
/// carries the cell's id (`HealthcheckerState::new`); `ctx` is the cell's life, as every role
/// gets it.
pub async fn run(
    ctx: lifecycle::CellContext,
    state: HealthcheckerState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    tracing::info!(addr = %ctx.addr(), cell_id = %ctx.cell_id(), "health checker serving");
    {
        let (me, rate) = (state.clone(), lifecycle::pressure::Rate::default());
        let target = f64::from(state.0.cfg.target_heartbeats_per_s.max(1));
        ctx.report_pressure(move || {
            let r = rate.per_sec(me.stats().heartbeats);
            (r / target, vec![("heartbeats_per_s", r)])
        });
    }
    {
        let me = state.clone();
        vitals::on_scrape(move || {
            registry_gauges(&me);
            async {}
        });
    }
    // Series the checks look for exist from the start, at zero.
    for kind in ["born", "dead", "replaced", "divided", "retired"] {
        metrics::counter!("healthchecker_events_total", "kind" => kind).increment(0);
    }
    metrics::counter!("healthchecker_heartbeats_total").increment(0);
    metrics::counter!("healthchecker_deaths_total", "role" => "api").increment(0);
    let dashboard = tokio::spawn(dashboard::gather_while_watched(
        state.clone(),
        shutdown.clone(),
    ));
    let sweep_every = Duration::from_millis(state.0.cfg.sweep_ms.max(1));
    let reconcile_every = Duration::from_millis(state.0.cfg.reconcile_ms.max(1));
    let sweeper = {
        let (state, stop) = (state.clone(), shutdown.clone());
        let probe_timeout = Duration::from_millis(state.0.cfg.probe_timeout_ms.max(1));
        // A fresh connection per probe: a killed cell refuses it at once.
        let prober = reqwest::Client::builder()
            .timeout(probe_timeout)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| RunError::Client(e.to_string()))?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => { state.sweep(now()); }
                    () = stop.cancelled() => return,
                }
                for probe in state.take_probes() {
                    let (state, prober) = (state.clone(), prober.clone());
                    tokio::spawn(async move {
                        let answer = probe_cell(&prober, &probe.addr, probe_timeout).await;
                        state.probe_result(&probe, answer, now());
                    });
                }
            }
        })
    };
    let reconciler = {
        let (state, stop) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(reconcile_every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                tokio::select! {
                    () = state.reconcile_once() => {}
                    () = stop.cancelled() => return,
                }
            }
        })
    };
    state.0.ready.set(true);
    let streams = state.0.streams.clone();
    let stop = shutdown.clone();
    let served = axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            streams.cancel();
        })
        .await;
    state.0.ready.set(false);
    shutdown.cancel();
    state.0.streams.cancel();
    for (name, task) in [
        ("sweep", sweeper),
        ("reconcile", reconciler),
        ("dashboard", dashboard),
    ] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "healthchecker task failed");
        }
    }
    served.map_err(RunError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::control::CellState;
    use std::time::Instant;

    fn beat(id: &str, role: &str, seq: u64, pressure: f64) -> Heartbeat {
        Heartbeat {
            cell_id: id.into(),
            role: role.into(),
            addr: "http://127.0.0.1:1".into(),
            state: CellState::Serving,
            pressure,
            signals: Default::default(),
            version: "t".into(),
            build: String::new(),
            wire: Vec::new(),
            parent: None,
            seq,
            interval_ms: 100,
            pid: None,
            decision: None,
        }
    }

    fn at(t0: Instant, ms: u64) -> Now {
        Now::new(t0 + Duration::from_millis(ms), ms as i64)
    }

    /// Deaths on the detector alone (probes off), as most of these tests judge it.
    fn state(minimums: &[(&str, u32)]) -> HealthcheckerState {
        let cfg = HealthcheckerConfig {
            minimums: minimums.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
            probe_timeout_ms: 0,
            ..HealthcheckerConfig::default()
        };
        HealthcheckerState::new(cfg, ClusterKey::generate(), "hc-a")
    }

    /// A checker with the default settings: suspicions are confirmed by probes.
    fn probing_state() -> HealthcheckerState {
        HealthcheckerState::new(
            HealthcheckerConfig::default(),
            ClusterKey::generate(),
            "hc-a",
        )
    }

    /// Sweep every 20 ms from `from` until a probe is asked for; its time.
    fn until_probe(s: &HealthcheckerState, t0: Instant, from: u64) -> (u64, registry::Probe) {
        let mut t = from;
        loop {
            assert!(
                s.sweep(at(t0, t)).is_empty(),
                "no death without a probe at {t} ms"
            );
            if let Some(p) = s.take_probes().into_iter().next() {
                return (t, p);
            }
            t += 20;
            assert!(t < from + 2_000, "no probe within 2 s");
        }
    }

    #[test]
    fn a_suspect_that_answers_its_probe_lives_and_one_that_does_not_is_dead() {
        let t0 = Instant::now();
        let s = probing_state();
        live(&s, t0, &[("a", "api")], 0, 1_000);
        // Silent (starved): suspected, probed, and its endpoint answers: no death.
        let (t, probe) = until_probe(&s, t0, 1_000);
        assert_eq!((probe.cell_id.as_str(), probe.role.as_str()), ("a", "api"));
        assert!(t < 1_700, "suspected within the detection time, at {t} ms");
        assert!(s.probe_result(&probe, Ok(()), at(t0, t + 5)).is_none());
        // Still silent: suspected and probed again, answers again; then its heartbeats return.
        let (t, probe) = until_probe(&s, t0, t + 20);
        assert!(s.probe_result(&probe, Ok(()), at(t0, t + 5)).is_none());
        let _ = s.heartbeat(beat("a", "api", 100, 0.0), at(t0, t + 20));
        assert_eq!(s.stats().deaths, 0);
        // Later silent again, and its probe finds nobody: dead, the probe's finding in the reason.
        let (t, probe) = until_probe(&s, t0, t + 40);
        let gone = s
            .probe_result(
                &probe,
                Err("its probe could not connect".into()),
                at(t0, t + 2),
            )
            .expect("a confirmed death");
        assert!(gone.dead);
        assert!(
            gone.event.reason.contains("its probe could not connect"),
            "{}",
            gone.event.reason
        );
        assert_eq!(s.stats().deaths, 1);
        // A late answer for a cell already gone changes nothing.
        assert!(s.probe_result(&probe, Ok(()), at(t0, t + 30)).is_none());
    }

    #[test]
    fn a_cell_that_answers_probes_but_never_heartbeats_dies_at_the_refute_limit() {
        let t0 = Instant::now();
        let cfg = HealthcheckerConfig {
            refute_limit_ms: 3_000,
            ..HealthcheckerConfig::default()
        };
        let s = HealthcheckerState::new(cfg, ClusterKey::generate(), "hc-a");
        live(&s, t0, &[("a", "api")], 0, 1_000);
        let mut t = 1_000;
        let gone = loop {
            let d = s.sweep(at(t0, t));
            if let Some(d) = d.into_iter().next() {
                break d;
            }
            for p in s.take_probes() {
                assert!(s.probe_result(&p, Ok(()), at(t0, t)).is_none());
            }
            t += 20;
            assert!(t < 6_000, "never declared dead");
        };
        assert!(
            (3_800..=4_200).contains(&t),
            "dead at {t} ms, the limit is 3 s after the last beat at 900 ms"
        );
        assert!(
            gone.event.reason.contains("answered"),
            "{}",
            gone.event.reason
        );
    }

    #[test]
    fn a_probe_that_never_comes_back_is_a_death() {
        let t0 = Instant::now();
        let s = probing_state();
        live(&s, t0, &[("a", "api")], 0, 1_000);
        let (t, _lost) = until_probe(&s, t0, 1_000);
        let mut u = t + 20;
        let gone = loop {
            if let Some(d) = s.sweep(at(t0, u)).into_iter().next() {
                break d;
            }
            u += 20;
            assert!(u < t + 3_000);
        };
        assert!(
            u >= t + 1_500,
            "the probe had its timeout and slack: {u} ms"
        );
        assert!(
            gone.event.reason.contains("never came back"),
            "{}",
            gone.event.reason
        );
    }

    /// Beats from `ids` every 100 ms with a sweep every 20 ms, from `from` to `to` ms.
    fn live(s: &HealthcheckerState, t0: Instant, ids: &[(&str, &str)], from: u64, to: u64) {
        let mut t = from;
        while t < to {
            if t % 100 == 0 {
                for (id, role) in ids {
                    let _ = s.heartbeat(beat(id, role, t / 100 + 1, 0.0), at(t0, t));
                }
            }
            assert!(s.sweep(at(t0, t)).is_empty(), "nobody dies at {t} ms");
            t += 20;
        }
    }

    #[test]
    fn a_checker_that_was_frozen_blames_nobody_when_it_thaws() {
        let t0 = Instant::now();
        let s = state(&[]);
        let cells = [("a", "api"), ("c", "crawler"), ("f", "frontdoor")];
        live(&s, t0, &cells, 0, 2_000);
        // Frozen for ten seconds: its first sweep after waking declares no death...
        assert!(s.sweep(at(t0, 12_000)).is_empty());
        assert_eq!(s.stats().deaths, 0);
        // ... and the cells, which beat all along, carry on.
        live(&s, t0, &cells, 12_100, 14_000);
        // A real death afterwards is still seen within a second.
        let mut t = 14_000;
        let dead = loop {
            let d = s.sweep(at(t0, t));
            if !d.is_empty() {
                break d;
            }
            t += 20;
            assert!(t < 15_000, "death not seen within a second");
        };
        assert_eq!(dead.len(), 3);
    }

    #[test]
    fn a_buried_cell_is_fenced_when_it_comes_back() {
        let t0 = Instant::now();
        let s = state(&[]);
        live(&s, t0, &[("a", "api")], 0, 1_000);
        // Silent while the checker keeps sweeping: declared dead.
        let mut t = 1_000;
        while s.stats().deaths == 0 {
            s.sweep(at(t0, t));
            t += 20;
            assert!(t < 3_000);
        }
        // It thaws and beats again: buried, fenced.
        let back = s.heartbeat(beat("a", "api", 50, 0.0), at(t0, t + 20));
        assert!(matches!(back, Err(Ignored::Buried(_))), "{back:?}");
        assert!(s.cells().roles.get("api").is_none_or(|v| v.is_empty()));
    }

    #[test]
    fn the_leader_asks_the_youngest_surplus_cell_to_retire_in_its_heartbeat_reply() {
        let t0 = Instant::now();
        let s = state(&[("crawler", 1)]);
        // Two idle crawlers, the second younger; this checker ("hc-a") is the only checker, so
        // it leads.
        live(&s, t0, &[("c1", "crawler")], 0, 200);
        live(&s, t0, &[("c1", "crawler"), ("c2", "crawler")], 200, 4_000);
        let reply = s
            .heartbeat(beat("c2", "crawler", 100, 0.0), at(t0, 4_000))
            .expect("taken");
        assert!(
            matches!(&reply.directive, Some(Directive::Retire { reason }) if reason.contains("minimum of 1")),
            "{reply:?}"
        );
        let other = s
            .heartbeat(beat("c1", "crawler", 100, 0.0), at(t0, 4_000))
            .expect("taken");
        assert_eq!(other.directive, None, "the older cell stays");
    }

    #[test]
    fn a_checker_that_is_not_the_leader_retires_nobody() {
        let t0 = Instant::now();
        let s = state(&[("crawler", 1)]);
        // "hc-0" sorts before "hc-a": it leads.
        live(
            &s,
            t0,
            &[
                ("hc-0", "healthchecker"),
                ("c1", "crawler"),
                ("c2", "crawler"),
            ],
            0,
            6_000,
        );
        let reply = s
            .heartbeat(beat("c2", "crawler", 100, 0.0), at(t0, 6_000))
            .expect("taken");
        assert_eq!(reply.directive, None);
    }
}
