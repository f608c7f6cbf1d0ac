//! Control-plane messages: what cells tell each other about themselves (heartbeats, events)
//! and ask of each other (replacements, stops, routing weights). They travel as the `body` of a
//! signed envelope (see the `control` crate); each has a `KIND` naming it on the wire.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a cell is in its life.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CellState {
    Joining,
    Serving,
    Throttling,
    Dividing,
    Draining,
    Retired,
    Dead,
}

/// A cell's periodic "I am alive", pushed straight to every health checker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Unique for the cell's whole life (a replacement gets a new id).
    pub cell_id: String,
    pub role: String,
    /// Base URL of the cell's HTTP endpoint, e.g. `http://127.0.0.1:7070`.
    pub addr: String,
    pub state: CellState,
    /// 1.0 = at capacity.
    pub pressure: f64,
    /// The signals behind the pressure figure, by name.
    #[serde(default)]
    pub signals: BTreeMap<String, f64>,
    /// The software version the cell runs (the crate's version).
    pub version: String,
    /// The build the cell runs: its version and a digest of its executable's bytes
    /// (`0.1.0+1a2b3c4d5e6f`), so two different artifacts of one version differ. Empty while
    /// the cell is still computing it, and from cells older than this field.
    #[serde(default)]
    pub build: String,
    /// The wire versions (`v`) of the messages this cell reads and writes.
    #[serde(default)]
    pub wire: Vec<u32>,
    /// The cell that asked for this one, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Increases with every heartbeat of this cell.
    pub seq: u64,
    /// Heartbeat interval the cell promises, milliseconds.
    pub interval_ms: u64,
    /// Operating-system process id on its machine (local provider).
    #[serde(default)]
    pub pid: Option<u32>,
    /// The cell's latest homeostasis decision (not a hold), repeated in its heartbeats until a
    /// newer one replaces it; the health checkers record each one once, as an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionNote>,
}

/// A decision of a cell's homeostasis controller: what it did, why, and the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionNote {
    /// Increases with every decision of this cell.
    pub n: u64,
    /// When the cell decided, milliseconds since the Unix epoch (its own clock); 0 if unknown.
    #[serde(default)]
    pub at_ms: i64,
    /// `divide`, `retire`, `replace`, `throttle`, `unthrottle`.
    pub action: String,
    pub reason: String,
    /// The figures it was taken on (cells, pending, load, mean, desired, min, max, ...).
    #[serde(default)]
    pub figures: BTreeMap<String, f64>,
}

impl DecisionNote {
    /// The event kind a decision is recorded as.
    pub fn event_kind(&self) -> EventKind {
        match self.action.as_str() {
            "divide" | "replace" => EventKind::Divided,
            "throttle" | "unthrottle" => EventKind::Throttled,
            "retire" => EventKind::Retiring,
            _ => EventKind::Unknown,
        }
    }
}

impl Heartbeat {
    pub const KIND: &'static str = "heartbeat";
}

/// A health checker's answer to a heartbeat: usually nothing to do; sometimes an order about
/// the cell's life. An older cell that expects an empty answer ignores the body; a directive this
/// cell does not know decodes as [`Directive::Unknown`] and is ignored (and counted).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HeartbeatReply {
    #[serde(default)]
    pub directive: Option<Directive>,
}

/// What a health checker tells a cell through its heartbeat answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Directive {
    /// The registry buried this cell (it was declared dead and replaced): it must never serve or
    /// acknowledge work again, and it stops at once.
    Fenced { reason: String },
    /// The cell is surplus to its role: drain (finish in-flight work) and retire.
    Retire { reason: String },
    /// A directive from a newer health checker that this build does not know.
    #[serde(other)]
    Unknown,
}

/// Ask the factory for a new cell of `role`. The factory does the work once per `request_key`:
/// every repeat (another health checker noticing the same death) is a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceRequest {
    /// E.g. `replace:<dead cell id>` or `grow:<role>:<n>`.
    pub request_key: String,
    pub role: String,
    pub reason: String,
    /// The cell being replaced, or the parent asking to divide.
    #[serde(default)]
    pub parent: Option<String>,
}

impl ReplaceRequest {
    pub const KIND: &'static str = "replace";
}

/// The factory's answer to a [`ReplaceRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceReply {
    pub request_key: String,
    /// True when this request started a cell; false when it was a repeat of a known key.
    pub started: bool,
    /// The cell started for this key (now or by the first request), once known.
    #[serde(default)]
    pub cell_id: Option<String>,
}

/// Ask a cell (or the factory, for a cell it started) to drain and stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopRequest {
    pub cell_id: String,
    pub reason: String,
}

impl StopRequest {
    pub const KIND: &'static str = "stop";
}

/// Ask the health checkers to tell a cell, in its next heartbeat answer, to drain and retire
/// ([`Directive::Retire`]). The factory sends it to take a machine it cannot power off itself
/// (Wake-on-LAN): the cell drains, exits, and its machine's boot unit powers the machine off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireRequest {
    pub cell_id: String,
    pub reason: String,
}

impl RetireRequest {
    pub const KIND: &'static str = "retire";
}

/// A health checker's answer to a [`RetireRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireReply {
    /// Whether this checker knows the cell as live (it tells the cell at its next heartbeat
    /// either way, should one come).
    pub live: bool,
}

/// An api cell asks the front doors for a lower (or restored) share of traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightRequest {
    pub cell_id: String,
    /// 0.0 ..= 1.0 of its normal share.
    pub weight: f64,
    pub reason: String,
}

impl WeightRequest {
    pub const KIND: &'static str = "weight";
}

/// A transition in a cell's life, as the health checkers record and stream it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CellEvent {
    pub kind: EventKind,
    pub cell_id: String,
    pub role: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub reason: String,
    #[serde(default)]
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Born,
    Serving,
    Draining,
    Retired,
    Dead,
    Replaced,
    /// The cell asked the factory for siblings (or for its own replacement, when tired).
    Divided,
    /// The cell started or stopped shedding optional work.
    Throttled,
    /// The cell decided to drain and retire (apoptosis).
    Retiring,
    /// A kind from a newer cell that this build does not know.
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// The kind's name, as it is on the wire (for metric labels and tables).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Born => "born",
            EventKind::Serving => "serving",
            EventKind::Draining => "draining",
            EventKind::Retired => "retired",
            EventKind::Dead => "dead",
            EventKind::Replaced => "replaced",
            EventKind::Divided => "divided",
            EventKind::Throttled => "throttled",
            EventKind::Retiring => "retiring",
            EventKind::Unknown => "unknown",
        }
    }
}

/// One live cell as the registry (`GET /cells`) shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CellRecord {
    pub cell_id: String,
    pub role: String,
    pub addr: String,
    pub state: CellState,
    pub pressure: f64,
    #[serde(default)]
    pub parent: Option<String>,
    /// Milliseconds since the registry first heard of the cell.
    pub age_ms: u64,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms: u64,
    /// Current suspicion level of the failure detector.
    pub phi: f64,
    /// Operating-system process id, from its heartbeat (local provider).
    #[serde(default)]
    pub pid: Option<u32>,
    /// The software version the cell runs (from its heartbeat).
    #[serde(default)]
    pub version: String,
    /// The build it runs: version and a digest of its executable (empty until it reports it).
    #[serde(default)]
    pub build: String,
    /// The wire versions it speaks.
    #[serde(default)]
    pub wire: Vec<u32>,
}

/// `GET /cells` (served as [`crate::Versioned`], read with [`crate::client::CellsClient`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, Default)]
pub struct CellsResponse {
    /// Live cells, by role.
    pub roles: BTreeMap<String, Vec<CellRecord>>,
}

impl CellsResponse {
    /// Base URLs of the live cells of `role`, sorted.
    pub fn addrs(&self, role: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .roles
            .get(role)
            .map(|v| v.iter().map(|c| c.addr.clone()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// A signed request one cell sends another: its envelope kind, the path it is posted to, and
/// the answer it gets. `control::ControlClient::ask` sends any of them, typed.
pub trait ControlRequest: Serialize {
    /// The envelope kind.
    const KIND: &'static str;
    /// Where the receiving cell takes it.
    const PATH: &'static str;
    /// What the receiver answers (`()` for an empty answer).
    type Reply: serde::de::DeserializeOwned;
}

impl ControlRequest for ReplaceRequest {
    const KIND: &'static str = ReplaceRequest::KIND;
    const PATH: &'static str = "/control/replace";
    type Reply = ReplaceReply;
}

impl ControlRequest for StopRequest {
    const KIND: &'static str = StopRequest::KIND;
    const PATH: &'static str = "/control/stop";
    type Reply = serde_json::Value;
}

impl ControlRequest for RetireRequest {
    const KIND: &'static str = RetireRequest::KIND;
    const PATH: &'static str = "/control/retire";
    type Reply = RetireReply;
}

impl ControlRequest for WeightRequest {
    const KIND: &'static str = WeightRequest::KIND;
    const PATH: &'static str = "/control/weight";
    type Reply = ();
}

impl ControlRequest for crate::IngestBatch {
    const KIND: &'static str = crate::IngestBatch::KIND;
    const PATH: &'static str = "/internal/ingest";
    type Reply = crate::IngestReply;
}

/// Ask a factory to upgrade the organism, cell by cell, to the executable `to`: a path on the
/// factory's machine, or a version name looked up in the organism's releases directory
/// (`DATA_DIR/releases/VERSION/cell`). The factory answers with the upgrade's status at once and
/// works in the background; a repeat while it runs (to the same target) is a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub to: String,
    /// How long a new cell has to become ready and heartbeat with the new build before that
    /// start counts as failed (default 30 s).
    #[serde(default)]
    pub ready_secs: Option<u64>,
    /// Failed starts of the new build after which the upgrade stops and the organism returns
    /// to the build it ran (default 2).
    #[serde(default)]
    pub failures_before_rollback: Option<u32>,
}

impl UpgradeRequest {
    pub const KIND: &'static str = "upgrade";
}

impl ControlRequest for UpgradeRequest {
    const KIND: &'static str = UpgradeRequest::KIND;
    const PATH: &'static str = "/control/upgrade";
    type Reply = UpgradeStatus;
}

/// Where an upgrade is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpgradePhase {
    /// No upgrade was asked of this factory.
    #[default]
    Idle,
    /// Replacing cells with the new build, role by role.
    Running,
    /// The new build failed; replacing its cells with the old build.
    RollingBack,
    /// Every cell runs the new build.
    Done,
    /// The new build failed and every cell runs the old build again.
    RolledBack,
    /// Neither the new build nor the rollback could finish (`reason` says why).
    Failed,
    /// A phase from a newer factory that this build does not know.
    #[serde(other)]
    Unknown,
}

impl UpgradePhase {
    /// True once the upgrade has ended, one way or another.
    pub fn finished(self) -> bool {
        matches!(self, Self::Done | Self::RolledBack | Self::Failed)
    }
}

/// A factory's upgrade, as `GET /upgrade` and the answer to an [`UpgradeRequest`] show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UpgradeStatus {
    pub phase: UpgradePhase,
    /// The build the organism ran before.
    #[serde(default)]
    pub from: String,
    /// The build being installed.
    #[serde(default)]
    pub to: String,
    /// The role being replaced now.
    #[serde(default)]
    pub role: Option<String>,
    /// Cells replaced so far (in this phase).
    #[serde(default)]
    pub replaced: u32,
    /// Starts of the new build that failed.
    #[serde(default)]
    pub failures: u32,
    /// Why it rolled back or failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// What it did, one line a step.
    #[serde(default)]
    pub log: Vec<String>,
}
