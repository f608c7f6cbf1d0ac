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
pub mod detector;
pub mod events;
mod http;
pub mod reconcile;
pub mod registry;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::{ClusterKey, ControlClient, Signer, Verifier};
use protocol::control::{
    CellEvent, CellsResponse, EventKind, Heartbeat, ReplaceReply, ReplaceRequest,
};
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

pub use config::HealthcheckerConfig;
pub use http::app;

use events::EventLog;
use reconcile::{ReconcileParams, Reconciler};
use registry::{Departure, Ignored, Now, Registry};

/// The factory's endpoint for [`ReplaceRequest`]s.
pub const REPLACE_PATH: &str = "/control/replace";
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
}

/// The registry and the reconciler change together, under one lock.
struct Core {
    registry: Registry,
    reconciler: Reconciler,
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
                registry: Registry::new(cfg.phi_params()),
                reconciler,
            }),
            cfg,
            events: Arc::new(EventLog::new(events::DEFAULT_CAPACITY)),
            verifier,
            client,
            ready: vitals::Readiness::default(),
            streams: CancellationToken::new(),
            counters: Counters::default(),
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

    /// Take a heartbeat (already authenticated) received at `now`.
    pub fn heartbeat(&self, hb: Heartbeat, now: Now) -> Result<(), Ignored> {
        let mut core = self.core();
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
        self.record(events);
        Ok(())
    }

    /// Let the detector look at every cell at `now`; returns who left.
    pub fn sweep(&self, now: Now) -> Vec<Departure> {
        let mut core = self.core();
        let departures = core.registry.sweep(now);
        for d in &departures {
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
        self.record(departures.iter().map(|d| d.event.clone()).collect());
        departures
    }

    /// One round of keeping roles at their minimum: plan, ask the factories, take the answers.
    pub async fn reconcile_once(&self) {
        let planned = {
            let mut core = self.core();
            let Core {
                registry,
                reconciler,
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
            let answer: anyhow::Result<ReplaceReply> = self
                .0
                .client
                .send(factory, REPLACE_PATH, ReplaceRequest::KIND, request)
                .await;
            match answer {
                Ok(reply) => return Some(reply),
                Err(e) => {
                    metrics::counter!("healthchecker_factory_errors_total").increment(1);
                    tracing::debug!(factory = %factory, error = format!("{e:#}"), "factory did not answer");
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
            self.0.events.push(event);
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        // A panic while holding the lock cannot leave the registry half-changed in a way that
        // matters more than stopping would: keep serving.
        self.0.core.lock().unwrap_or_else(|p| p.into_inner())
    }
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

/// Serve the healthchecker role on `listener` until `shutdown` is cancelled, with the detector
/// sweeping every `sweep_ms` and the reconcile loop every `reconcile_ms`.
pub async fn run(
    state: HealthcheckerState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sweep_every = Duration::from_millis(state.0.cfg.sweep_ms.max(1));
    let reconcile_every = Duration::from_millis(state.0.cfg.reconcile_ms.max(1));
    let sweeper = {
        let (state, stop) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => { state.sweep(now()); }
                    () = stop.cancelled() => return,
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
    for (name, task) in [("sweep", sweeper), ("reconcile", reconciler)] {
        if let Err(e) = task.await {
            tracing::error!(task = name, error = %e, "healthchecker task failed");
        }
    }
    served.map_err(|e| anyhow::anyhow!("serving the healthchecker failed: {e}"))
}
