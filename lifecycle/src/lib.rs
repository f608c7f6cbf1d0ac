//! A cell's life, the same for every role: its identity, its heartbeats to the health checkers
//! (through `control::heartbeat`), the pressure it measures and reports in them, its standing
//! (fenced, asked to retire, in doubt), the drain notice before it stops, its ready line, and its
//! retirement.
//!
//! The binary owns a [`Lifecycle`]: [`Lifecycle::begin`] starts the heartbeats once the cell's
//! listener is bound, and [`Lifecycle::live`] runs the role under the drain rules and retires the
//! cell when the role returns. Every role gets the same small interface, a [`CellContext`], and
//! exposes the same shape: `run(ctx, state, listener, shutdown)` (and, for an HTTP role,
//! `app(state) -> Router`). A role uses the context for what its policy needs (its pressure
//! sampler, its standing, its signed client, the registry reader); the policy itself stays in the
//! role's crate (the api's overload controller in `api`, the crawler's registry follower in
//! `crawler`).
//!
//! Code map:
//! - [`pressure`]: the sampler loop that puts a role's measured pressure into its heartbeats.
//! - [`homeostasis`]: what a cell does about its role's pressure (hold, throttle, divide,
//!   retire, ask for its replacement), decided by each cell on its own pressure and its
//!   siblings' in the registry; pure, fed every heartbeat. [`sim`] runs the same controller in
//!   a seeded, virtual-time organism (factory, health checkers, faults) to check it at scale.
//! - [`regulate`]: the controller at work in a live cell: registry reads, decisions acted on
//!   (divide through the factories, retire, throttle) and published in heartbeats.
//! - [`drain`]: the drain notice (draining first, routed elsewhere, then stopped; at once when
//!   fenced) and the drain bounded by the grace period.
//!
//! Architecture Invariant: nothing here knows a role by name; the binary's table (`cell run`)
//! picks the role, its [`Drain`], and its state.

pub mod drain;
pub mod homeostasis;
pub mod pressure;
pub mod regulate;
pub mod sim;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control::heartbeat::{Standing, Vital};
use control::{ClusterKey, ControlClient, Signer};
use protocol::control::CellState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use drain::Drain;

/// Why a cell could not begin its life.
#[derive(Debug, thiserror::Error)]
pub enum LifeError {
    /// Heartbeats are signed: a cell told of health checkers needs the cluster key.
    #[error("heartbeats need the cluster key: {0}")]
    Key(#[from] control::KeyError),
}

/// What the binary knows of a cell before it starts (its arguments).
#[derive(Debug, Clone)]
pub struct CellSpec {
    pub role: String,
    /// Unique for the cell's whole life (a replacement gets a new one).
    pub cell_id: String,
    /// The cell this one replaces or divided from.
    pub parent: Option<String>,
    /// Health checkers (base URLs) to beat to. None: the cell lives alone, without heartbeats.
    pub healthcheckers: Vec<String>,
    /// Factories (base URLs), for roles that ask for cells.
    pub factories: Vec<String>,
    /// Heartbeat interval (at least 10 ms).
    pub heartbeat: Duration,
    /// How long a drain may take before the cell exits anyway.
    pub grace: Duration,
    /// For a cell of a self-regulating role: its homeostasis controller's settings. The
    /// controller runs once the role reports its pressure, when the cell has health checkers,
    /// factories and the cluster key.
    pub homeostasis: Option<regulate::Homeostasis>,
}

impl CellSpec {
    /// A cell of `role` that lives alone: no health checkers, no factories (a role's own
    /// tests, a role run by hand).
    pub fn alone(role: impl Into<String>, cell_id: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            cell_id: cell_id.into(),
            parent: None,
            healthcheckers: Vec::new(),
            factories: Vec::new(),
            heartbeat: Duration::from_millis(100),
            grace: Duration::from_secs(20),
            homeostasis: None,
        }
    }

    fn interval(&self) -> Duration {
        self.heartbeat.max(Duration::from_millis(10))
    }
}

/// The small interface every role gets: who the cell is, where it listens, and its line to the
/// organism. Cheap to clone.
#[derive(Clone)]
pub struct CellContext(Arc<Inner>);

struct Inner {
    spec: CellSpec,
    addr: SocketAddr,
    vital: watch::Sender<Vital>,
    client: Option<Arc<ControlClient>>,
    /// The organism's read token (`Bearer ...`), when this cell holds the cluster key.
    read_authorization: Option<String>,
    standing: Standing,
    /// Cancelled when the cell retires: ends the context's own tasks (pressure sampling).
    retired: CancellationToken,
    /// Cancelled when the cell begins to drain (its notice starts).
    draining: CancellationToken,
    /// Whether the homeostasis controller asked the role to shed optional work.
    throttled: watch::Sender<bool>,
    /// The role's latest measure of its own processing time per unit of work, not yet read by
    /// the controller (fatigue).
    processing: std::sync::Mutex<Option<f64>>,
}

impl CellContext {
    fn new(
        spec: CellSpec,
        addr: SocketAddr,
        key: Option<&ClusterKey>,
    ) -> (Self, watch::Receiver<Vital>) {
        let (vital, vital_rx) = watch::channel(Vital {
            state: CellState::Serving,
            pressure: 0.0,
            signals: Default::default(),
            decision: None,
        });
        let client = match key {
            Some(key) if !spec.healthcheckers.is_empty() => Some(Arc::new(ControlClient::new(
                Signer::new(key.clone(), spec.cell_id.clone()),
            ))),
            _ => None,
        };
        let standing = Standing::new(spec.interval());
        let ctx = Self(Arc::new(Inner {
            read_authorization: key.map(ClusterKey::read_authorization),
            spec,
            addr,
            vital,
            client,
            standing,
            retired: CancellationToken::new(),
            draining: CancellationToken::new(),
            throttled: watch::channel(false).0,
            processing: std::sync::Mutex::new(None),
        }));
        (ctx, vital_rx)
    }

    /// A context for a role that lives alone (no health checkers: no heartbeats, no signed
    /// client), as in a role's own tests.
    pub fn detached(spec: CellSpec, addr: SocketAddr) -> Self {
        Self::new(spec, addr, None).0
    }

    pub fn cell_id(&self) -> &str {
        &self.0.spec.cell_id
    }

    pub fn role(&self) -> &str {
        &self.0.spec.role
    }

    /// The address the cell's listener is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// The base URL other cells reach this one at (`http://ADDR`).
    pub fn advertise(&self) -> String {
        format!("http://{}", self.0.addr)
    }

    pub fn parent(&self) -> Option<&str> {
        self.0.spec.parent.as_deref()
    }

    pub fn healthcheckers(&self) -> &[String] {
        &self.0.spec.healthcheckers
    }

    pub fn factories(&self) -> &[String] {
        &self.0.spec.factories
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.0.spec.interval()
    }

    pub fn grace(&self) -> Duration {
        self.0.spec.grace
    }

    /// Signed messages to other cells, as this cell (present when it beats to health checkers).
    pub fn client(&self) -> Option<Arc<ControlClient>> {
        self.0.client.clone()
    }

    /// What the health checkers' answers say of this cell.
    pub fn standing(&self) -> &Standing {
        &self.0.standing
    }

    /// True when the cell follows health checkers (and so trusts only what the registry lists).
    pub fn in_organism(&self) -> bool {
        !self.0.spec.healthcheckers.is_empty()
    }

    /// A reader of the organism's registry (`GET /cells`), with the read token when this cell
    /// holds the cluster key.
    pub fn registry(&self) -> protocol::client::CellsClient {
        protocol::client::CellsClient::new(
            self.0.spec.healthcheckers.clone(),
            self.0.read_authorization.clone(),
        )
    }

    /// Every heartbeat interval until the cell retires, put the pressure and signals `sample`
    /// measures into the cell's heartbeat; the returned receiver follows the pressure.
    pub fn report_pressure(
        &self,
        sample: impl Fn() -> (f64, Vec<(&'static str, f64)>) + Send + 'static,
    ) -> watch::Receiver<f64> {
        let rx = pressure::report(
            self.0.vital.clone(),
            self.heartbeat_interval(),
            self.0.retired.clone(),
            sample,
        );
        if let Some(h) = &self.0.spec.homeostasis {
            if self.in_organism() && !self.factories().is_empty() {
                regulate::spawn(self.clone(), h.clone(), rx.clone());
            }
        }
        rx
    }

    /// Hand the controller a measure of this cell's own processing time per unit of work (a
    /// crawler: per KiB of page parsed), taken over the work done since the last one. A cell
    /// that slows down on the same work is tiring (fatigue): it divides before it fails, and is
    /// replaced if it stays sick. Measures that are not finite and positive are ignored.
    pub fn report_processing(&self, per_unit: f64) {
        if per_unit.is_finite() && per_unit > 0.0 {
            *self
                .0
                .processing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(per_unit);
        }
    }

    /// The measure handed since the last call, if any.
    fn take_processing(&self) -> Option<f64> {
        self.0
            .processing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// Cancelled when the cell begins to drain: from then on a routed role tells its clients
    /// to leave (a front door answers `Connection: close`), before it stops taking work.
    pub fn draining(&self) -> CancellationToken {
        self.0.draining.clone()
    }

    /// Follows whether the homeostasis controller asked this cell to shed optional work
    /// (seed 003: throttle before dividing).
    pub fn throttled(&self) -> watch::Receiver<bool> {
        self.0.throttled.subscribe()
    }

    fn set_state(&self, state: CellState) {
        self.0.vital.send_modify(|v| v.state = state);
    }

    /// Print the cell's ready line (`HOMEOSTAT_READY {json}`) for whoever started it.
    fn announce(&self) {
        println!(
            "{}",
            vitals::ReadyLine::new(self.role(), self.0.addr.to_string(), std::process::id())
                .render()
        );
    }
}

/// A cell's life, owned by the binary: its heartbeats run from [`Lifecycle::begin`] until the
/// role returns in [`Lifecycle::live`].
pub struct Lifecycle {
    ctx: CellContext,
    beats: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Lifecycle {
    /// Begin the life of a cell bound at `addr`: when it is told of health checkers, its
    /// heartbeats start now, signed with `key` (required then).
    pub fn begin(
        spec: CellSpec,
        key: Option<ClusterKey>,
        addr: SocketAddr,
    ) -> Result<Self, LifeError> {
        let key = match (key, spec.healthcheckers.is_empty()) {
            (Some(key), _) => Some(key),
            (None, true) => None,
            (None, false) => Some(ClusterKey::from_env()?),
        };
        let (ctx, vital_rx) = CellContext::new(spec, addr, key.as_ref());
        let beats = ctx.client().map(|client| {
            let stop = CancellationToken::new();
            let task = control::heartbeat::spawn(
                client,
                ctx.healthcheckers().to_vec(),
                control::heartbeat::Identity {
                    cell_id: ctx.cell_id().to_string(),
                    role: ctx.role().to_string(),
                    addr: ctx.advertise(),
                    parent: ctx.parent().map(str::to_string),
                },
                ctx.heartbeat_interval(),
                vital_rx,
                ctx.standing().clone(),
                stop.clone(),
            );
            (stop, task)
        });
        Ok(Self { ctx, beats })
    }

    /// The interface the role gets.
    pub fn context(&self) -> CellContext {
        self.ctx.clone()
    }

    /// Live: print the ready line, run the role (`role` gets the token that tells it to stop
    /// taking work) until it returns, under the drain rules of `drain` once `shutdown` is
    /// cancelled or a health checker asks the cell to retire or fences it; then say "retired"
    /// and stop beating.
    pub async fn live<F, Fut, E>(
        self,
        shutdown: CancellationToken,
        drain: Drain,
        role: F,
    ) -> Result<(), E>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let notice = drain.notice(self.ctx.heartbeat_interval());
        let stop = drain::after_notice(&self.ctx, self.beats.is_some(), shutdown, notice);
        self.ctx.announce();
        let work = role(stop.clone());
        let result = if drain.bounded() {
            drain::bounded(&stop, self.ctx.grace(), work).await
        } else {
            work.await
        };
        self.retire().await;
        result
    }

    /// Say "retired" and stop beating.
    async fn retire(mut self) {
        self.ctx.set_state(CellState::Retired);
        self.ctx.0.retired.cancel();
        if let Some((stop, task)) = self.beats.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}
