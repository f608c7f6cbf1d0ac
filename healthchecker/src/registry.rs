//! The registry of live cells: each cell's last heartbeat, its failure detector, and the
//! transitions its heartbeats reveal.
//!
//! Pure and time-injected like the detector: every call takes a [`Now`].
//!
//! Rules:
//! - Heartbeats are ordered by `seq`, per cell. An older or repeated `seq` changes nothing and is
//!   reported as [`Ignored::Stale`] (the handler still answers 204: a repeat is a no-op).
//! - The first heartbeat of an id is a birth; a change of state into serving, draining or
//!   retired is an event; a heartbeat in state `retired` (or `dead`) also removes the cell at
//!   once.
//! - A cell whose detector crosses the threshold leaves the registry: as **dead** (with
//!   "no heartbeat for N ms, phi X"), or as **retired** if it was draining, which is how a cell
//!   ends on purpose.
//! - Cells that left are remembered for a while ([`GONE_KEEP`], at most [`GONE_CAP`]) with their
//!   last `seq`. A late heartbeat with a `seq` not above it (one that was in flight when the cell
//!   died) is ignored. A cell declared **dead** is buried: a heartbeat from it with a newer `seq`
//!   (it was frozen, or cut off, and thawed after its replacement was asked for) is refused as
//!   [`Ignored::Buried`], and the handler answers it with a `fenced` directive, so the cell stops
//!   at once and never serves or acknowledges work again. The registry never takes a buried
//!   cell back, so a replacement is never asked for a cell that is back, and the role returns
//!   to its size when the fenced cell stops.
//! - With probes on ([`Registry::with_probes`]), a silence the detector gives up on is first
//!   confirmed, as SWIM confirms a suspicion with a direct ping: the sweep lists the cell in
//!   [`Registry::take_probes`], its caller asks the cell's own HTTP endpoint, and
//!   [`Registry::probe_result`] either declares it dead (refused, reset, or no HTTP answer in
//!   time: a killed, frozen or half-dead cell) or restarts its clock (it answered: it is slow or
//!   starved, not dead). A cell whose heartbeats stay away beyond [`ProbeParams::refute_limit`]
//!   is dead even if it answers: its heartbeats are not getting through.
//! - A health checker that was itself away (stalled longer than a detection time) does not
//!   blame the cells for its own silence: [`Registry::observer_resumed`] restarts every
//!   detector's clock (memberlist's Lifeguard: a slow observer trusts its suspicions less).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::control::{CellEvent, CellRecord, CellState, CellsResponse, EventKind, Heartbeat};

use crate::detector::{PhiDetector, PhiParams};

/// How long cells that left are remembered.
pub const GONE_KEEP: Duration = Duration::from_secs(600);
/// Most cells remembered as gone.
pub const GONE_CAP: usize = 10_000;
/// Most live cells; heartbeats from further new ids are refused.
pub const MAX_CELLS: usize = 100_000;
/// How long past its timeout a probe's answer is awaited before the probe counts as lost.
pub const PROBE_SLACK: Duration = Duration::from_millis(1_000);
/// Longest heartbeat interval a cell may promise.
pub const MAX_INTERVAL_MS: u64 = 3_600_000;

/// A moment, as the monotonic clock (for the detector) and the wall clock (for events) see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: i64,
}

impl Now {
    pub fn new(at: Instant, unix_ms: i64) -> Self {
        Self { at, unix_ms }
    }

    /// `at` with the system's wall clock.
    pub fn with_wall_clock(at: Instant) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self { at, unix_ms }
    }
}

/// Why a heartbeat changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// Its `seq` is not above the last one seen from the cell (a repeat or a late arrival).
    #[error("sequence number {seq} is not above {last}")]
    Stale { seq: u64, last: u64 },
    /// The cell retired and says it still is.
    #[error("the cell has retired")]
    Retired,
    /// The heartbeat is not usable (empty id, impossible interval, ...).
    #[error("invalid heartbeat: {0}")]
    Invalid(String),
    /// The registry holds [`MAX_CELLS`] already.
    #[error("the registry is full")]
    Full,
    /// The cell was declared dead; it is fenced and must stop.
    #[error("the cell was declared dead and buried: {0}")]
    Buried(String),
}

impl Ignored {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Ignored::Stale { .. } => "stale_seq",
            Ignored::Retired => "retired",
            Ignored::Invalid(_) => "invalid",
            Ignored::Full => "full",
            Ignored::Buried(_) => "buried",
        }
    }
}

/// A cell the detector removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Departure {
    pub cell_id: String,
    pub role: String,
    /// False when the cell was draining: it retired.
    pub dead: bool,
    /// Time since its last heartbeat.
    pub silent_for: Duration,
    pub phi: f64,
    pub event: CellEvent,
}

struct Entry {
    last: Heartbeat,
    first_seen: Instant,
    detector: PhiDetector,
    /// Set while the detector suspects the cell and probes decide (probes on).
    suspect: Option<Suspect>,
}

/// A suspicion being confirmed.
#[derive(Debug, Clone, Copy)]
struct Suspect {
    /// When the silence began (the last heartbeat before it).
    silent_since: Instant,
    /// When the probe under way was asked for; `None` between a refuted probe and the next
    /// suspicion.
    probing: Option<Instant>,
    /// Probes the cell answered during this silence.
    refuted: u32,
}

/// How suspicions are confirmed (see the module's rules).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeParams {
    /// A probe without an HTTP answer after this long says the cell is dead.
    pub timeout: Duration,
    /// A cell silent this long is dead even though it answers probes.
    pub refute_limit: Duration,
}

/// A cell to probe: ask `addr` whether it lives, and give the answer to
/// [`Registry::probe_result`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub cell_id: String,
    pub role: String,
    pub addr: String,
}

struct Gone {
    last_seq: u64,
    at: Instant,
    retired: bool,
    /// Why it was declared dead (for the fenced answer).
    reason: String,
}

pub struct Registry {
    params: PhiParams,
    probes: Option<ProbeParams>,
    to_probe: Vec<Probe>,
    cells: BTreeMap<String, Entry>,
    gone: HashMap<String, Gone>,
    /// Ids in the order they left, for expiry (an id that came back and left again appears
    /// twice; the stale entry is skipped).
    gone_order: VecDeque<(Instant, String)>,
}

impl Registry {
    pub fn new(params: PhiParams) -> Self {
        Self {
            params,
            probes: None,
            to_probe: Vec::new(),
            cells: BTreeMap::new(),
            gone: HashMap::new(),
            gone_order: VecDeque::new(),
        }
    }

    /// Confirm suspicions with probes before declaring deaths.
    pub fn with_probes(mut self, probes: ProbeParams) -> Self {
        self.probes = Some(probes);
        self
    }

    /// The probes the sweeps asked for since the last call.
    pub fn take_probes(&mut self) -> Vec<Probe> {
        std::mem::take(&mut self.to_probe)
    }

    /// What the probe of `cell_id` found: `Ok` (its HTTP endpoint answered) restarts its clock;
    /// `Err(why)` declares it dead now. Nothing when it is no longer suspected (a heartbeat came
    /// meanwhile) or gone.
    pub fn probe_result(
        &mut self,
        cell_id: &str,
        answer: Result<(), String>,
        now: Now,
    ) -> Option<Departure> {
        let entry = self.cells.get_mut(cell_id)?;
        let suspect = entry.suspect.as_mut()?;
        suspect.probing?;
        match answer {
            Ok(()) => {
                suspect.probing = None;
                suspect.refuted += 1;
                entry.detector.resume(now.at);
                None
            }
            Err(why) => {
                let departure = self.depart(cell_id, now, Some(&why));
                self.expire_gone(now.at);
                departure
            }
        }
    }

    /// Take a heartbeat received at `now`; returns the events it causes (none for a routine
    /// heartbeat) or why it was ignored.
    pub fn observe(&mut self, hb: Heartbeat, now: Now) -> Result<Vec<CellEvent>, Ignored> {
        validate(&hb)?;
        let id = hb.cell_id.clone();
        let mut events = Vec::new();
        if let Some(entry) = self.cells.get_mut(&hb.cell_id) {
            if hb.seq <= entry.last.seq {
                return Err(Ignored::Stale {
                    seq: hb.seq,
                    last: entry.last.seq,
                });
            }
            entry.detector.heartbeat(now.at);
            entry.suspect = None;
            if hb.interval_ms != entry.last.interval_ms {
                entry
                    .detector
                    .set_promised(Duration::from_millis(hb.interval_ms));
            }
            if hb.state != entry.last.state {
                if let Some(event) = transition(&hb, now, "state changed") {
                    events.push(event);
                }
            }
            let seen = entry.last.decision.as_ref().map_or(0, |d| d.n);
            if let Some(d) = hb.decision.as_ref().filter(|d| d.n > seen) {
                events.push(decided(&hb, d, now));
            }
            entry.last = hb;
        } else {
            let mut birth = "first heartbeat".to_string();
            if let Some(gone) = self.gone.get(&hb.cell_id) {
                if hb.seq <= gone.last_seq {
                    return Err(Ignored::Stale {
                        seq: hb.seq,
                        last: gone.last_seq,
                    });
                }
                if !gone.retired {
                    let ago = now.at.saturating_duration_since(gone.at).as_millis();
                    return Err(Ignored::Buried(format!(
                        "declared dead {ago} ms ago ({})",
                        gone.reason
                    )));
                }
                if matches!(hb.state, CellState::Retired | CellState::Dead) {
                    return Err(Ignored::Retired);
                }
                let ago = now.at.saturating_duration_since(gone.at).as_millis();
                birth = format!("heartbeat again {ago} ms after it retired");
                self.gone.remove(&hb.cell_id);
            }
            if self.cells.len() >= MAX_CELLS {
                return Err(Ignored::Full);
            }
            events.push(event(EventKind::Born, &hb, now, birth));
            if let Some(event) = transition(&hb, now, "first heartbeat") {
                events.push(event);
            }
            if let Some(d) = &hb.decision {
                events.push(decided(&hb, d, now));
            }
            let mut detector = PhiDetector::new(self.params, Duration::from_millis(hb.interval_ms));
            detector.heartbeat(now.at);
            self.cells.insert(
                hb.cell_id.clone(),
                Entry {
                    last: hb.clone(),
                    first_seen: now.at,
                    detector,
                    suspect: None,
                },
            );
        }
        // A cell that says it is retired (or dead) is done: it leaves now rather than when its
        // heartbeats stop.
        if let Some(entry) = self.cells.get(&id) {
            if matches!(entry.last.state, CellState::Retired | CellState::Dead) {
                let retired = entry.last.state == CellState::Retired;
                let seq = entry.last.seq;
                self.cells.remove(&id);
                let reason = "it reported itself dead".to_string();
                self.remember_gone(id, seq, retired, reason, now.at);
            }
        }
        Ok(events)
    }

    /// Remove every cell the detector gives up on at `now` (with probes on: every cell whose
    /// probe is overdue or whose silence passed the refute limit; the others it suspects are
    /// listed for [`Registry::take_probes`]).
    pub fn sweep(&mut self, now: Now) -> Vec<Departure> {
        let threshold = self.params.threshold;
        let suspected: Vec<String> = self
            .cells
            .iter()
            .filter(|(_, e)| e.detector.phi(now.at) > threshold)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::with_capacity(suspected.len());
        for id in suspected {
            let Some(entry) = self.cells.get_mut(&id) else {
                continue;
            };
            let draining = matches!(entry.last.state, CellState::Draining | CellState::Retired);
            let leave = match self.probes {
                None => Some(None),
                Some(_) if draining => Some(None),
                Some(p) => {
                    let last = entry.detector.last().unwrap_or(now.at);
                    let suspect = entry.suspect.get_or_insert(Suspect {
                        silent_since: last,
                        probing: None,
                        refuted: 0,
                    });
                    let silent = now.at.saturating_duration_since(suspect.silent_since);
                    if silent > p.refute_limit {
                        Some(Some(format!(
                            "its HTTP endpoint answered {} probe(s) but no heartbeat came for {} ms",
                            suspect.refuted,
                            silent.as_millis()
                        )))
                    } else {
                        match suspect.probing {
                            Some(asked)
                                if now.at.saturating_duration_since(asked)
                                    > p.timeout + PROBE_SLACK =>
                            {
                                Some(Some("its probe never came back".to_string()))
                            }
                            Some(_) => None,
                            None => {
                                suspect.probing = Some(now.at);
                                self.to_probe.push(Probe {
                                    cell_id: id.clone(),
                                    role: entry.last.role.clone(),
                                    addr: entry.last.addr.clone(),
                                });
                                None
                            }
                        }
                    }
                }
            };
            if let Some(why) = leave {
                out.extend(self.depart(&id, now, why.as_deref()));
            }
        }
        self.expire_gone(now.at);
        out
    }

    /// Remove `id` as dead (or retired, if it was draining), `why` adding to the reason.
    fn depart(&mut self, id: &str, now: Now, why: Option<&str>) -> Option<Departure> {
        let entry = self.cells.remove(id)?;
        let phi = entry.detector.phi(now.at);
        let since = entry
            .suspect
            .map(|s| s.silent_since)
            .or(entry.detector.last());
        let silent_for = since.map_or(Duration::ZERO, |last| {
            now.at.saturating_duration_since(last)
        });
        let dead = !matches!(entry.last.state, CellState::Draining | CellState::Retired);
        let ms = silent_for.as_millis();
        let event = if dead {
            let mut reason = format!("no heartbeat for {ms} ms, phi {phi:.1}");
            if let Some(why) = why {
                reason.push_str("; ");
                reason.push_str(why);
            }
            event(EventKind::Dead, &entry.last, now, reason)
        } else {
            event(
                EventKind::Retired,
                &entry.last,
                now,
                format!("stopped heartbeating while draining ({ms} ms ago)"),
            )
        };
        self.remember_gone(
            id.to_string(),
            entry.last.seq,
            !dead,
            event.reason.clone(),
            now.at,
        );
        Some(Departure {
            cell_id: id.to_string(),
            role: entry.last.role,
            dead,
            silent_for,
            phi,
            event,
        })
    }

    /// The observer was away until `now`: restart every cell's detector clock from here.
    pub fn observer_resumed(&mut self, now: Instant) {
        for e in self.cells.values_mut() {
            e.detector.resume(now);
        }
    }

    /// Live cells as the surplus controller sees them: (id, role, state, pressure, first seen).
    pub fn members(&self) -> impl Iterator<Item = (&str, &str, CellState, f64, Instant)> {
        self.cells.iter().map(|(id, e)| {
            (
                id.as_str(),
                e.last.role.as_str(),
                e.last.state,
                e.last.pressure,
                e.first_seen,
            )
        })
    }

    /// Live cells (in any state) by role.
    pub fn records(&self, now: Instant) -> CellsResponse {
        let mut roles: BTreeMap<String, Vec<CellRecord>> = BTreeMap::new();
        for (id, e) in &self.cells {
            let last_seen = e
                .detector
                .last()
                .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
            roles
                .entry(e.last.role.clone())
                .or_default()
                .push(CellRecord {
                    cell_id: id.clone(),
                    role: e.last.role.clone(),
                    addr: e.last.addr.clone(),
                    state: e.last.state,
                    pressure: e.last.pressure,
                    parent: e.last.parent.clone(),
                    age_ms: now.saturating_duration_since(e.first_seen).as_millis() as u64,
                    last_seen_ms: last_seen.as_millis() as u64,
                    phi: e.detector.phi(now),
                    pid: e.last.pid,
                    version: e.last.version.clone(),
                    build: e.last.build.clone(),
                    wire: e.last.wire.clone(),
                });
        }
        CellsResponse { roles }
    }

    /// Cells that count toward their role's minimum (live and not draining), by role.
    pub fn counted_by_role(&self) -> BTreeMap<String, u32> {
        let mut out: BTreeMap<String, u32> = BTreeMap::new();
        for e in self.cells.values() {
            if counts_toward_minimum(e.last.state) {
                *out.entry(e.last.role.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Cells of `role` that count toward its minimum.
    pub fn counted_in(&self, role: &str) -> u32 {
        self.cells
            .values()
            .filter(|e| e.last.role == role && counts_toward_minimum(e.last.state))
            .count() as u32
    }

    /// Whether the id is a live cell.
    pub fn is_live(&self, cell_id: &str) -> bool {
        self.cells.contains_key(cell_id)
    }

    /// Whether the id is a cell that left recently.
    pub fn is_gone(&self, cell_id: &str) -> bool {
        self.gone.contains_key(cell_id)
    }

    /// The last heartbeat of a live cell.
    pub fn get(&self, cell_id: &str) -> Option<&Heartbeat> {
        self.cells.get(cell_id).map(|e| &e.last)
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    fn remember_gone(
        &mut self,
        id: String,
        last_seq: u64,
        retired: bool,
        reason: String,
        at: Instant,
    ) {
        self.gone_order.push_back((at, id.clone()));
        self.gone.insert(
            id,
            Gone {
                last_seq,
                at,
                retired,
                reason,
            },
        );
        while self.gone.len() > GONE_CAP {
            let Some((_, old)) = self.gone_order.pop_front() else {
                break;
            };
            self.forget_if_current(&old, None);
        }
    }

    fn expire_gone(&mut self, now: Instant) {
        while let Some((at, _)) = self.gone_order.front() {
            if now.saturating_duration_since(*at) < GONE_KEEP {
                break;
            }
            let Some((at, id)) = self.gone_order.pop_front() else {
                break;
            };
            self.forget_if_current(&id, Some(at));
        }
    }

    /// Forget `id` unless it left again after the queued moment `at` (then a later queue entry
    /// owns it).
    fn forget_if_current(&mut self, id: &str, at: Option<Instant>) {
        if let Some(g) = self.gone.get(id) {
            if at.is_none_or(|at| g.at <= at) {
                self.gone.remove(id);
            }
        }
    }
}

/// Whether a cell in `state` counts toward its role's minimum.
pub fn counts_toward_minimum(state: CellState) -> bool {
    !matches!(
        state,
        CellState::Draining | CellState::Retired | CellState::Dead
    )
}

fn validate(hb: &Heartbeat) -> Result<(), Ignored> {
    let bad = |why: &str| Err(Ignored::Invalid(why.into()));
    if hb.cell_id.is_empty() || hb.cell_id.len() > 256 {
        return bad("cell_id must be 1..=256 bytes");
    }
    if hb.role.is_empty() || hb.role.len() > 64 {
        return bad("role must be 1..=64 bytes");
    }
    if hb.interval_ms == 0 || hb.interval_ms > MAX_INTERVAL_MS {
        return bad("interval_ms must be 1..=3600000");
    }
    if !hb.pressure.is_finite() {
        return bad("pressure must be a finite number");
    }
    if hb.signals.len() > 64 {
        return bad("at most 64 signals");
    }
    if let Some(d) = &hb.decision {
        if d.action.is_empty() || d.action.len() > 32 {
            return bad("decision.action must be 1..=32 bytes");
        }
        if d.reason.len() > 2048 {
            return bad("decision.reason must be at most 2048 bytes");
        }
        if d.figures.len() > 64 {
            return bad("decision.figures: at most 64");
        }
    }
    Ok(())
}

/// The event for a heartbeat's state, if that state is one the event log names.
fn transition(hb: &Heartbeat, now: Now, why: &str) -> Option<CellEvent> {
    let kind = match hb.state {
        CellState::Serving => EventKind::Serving,
        CellState::Draining => EventKind::Draining,
        CellState::Retired => EventKind::Retired,
        CellState::Dead => EventKind::Dead,
        CellState::Joining | CellState::Throttling | CellState::Dividing => return None,
    };
    let reason = match kind {
        EventKind::Dead => "the cell reported itself dead".to_string(),
        _ => format!("{why}: {}", state_name(hb.state)),
    };
    Some(event(kind, hb, now, reason))
}

fn state_name(state: CellState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{state:?}"))
}

/// A cell's homeostasis decision as an event: its reason with the figures behind it.
fn decided(hb: &Heartbeat, d: &protocol::control::DecisionNote, now: Now) -> CellEvent {
    let figures: Vec<String> = d
        .figures
        .iter()
        .map(|(k, v)| format!("{k}={}", (v * 100.0).round() / 100.0))
        .collect();
    let mut e = event(
        d.event_kind(),
        hb,
        now,
        format!("{}: {} [{}]", d.action, d.reason, figures.join(" ")),
    );
    // When the cell decided, not when its heartbeat told it (up to an interval later).
    if d.at_ms > 0 {
        e.at_ms = d.at_ms;
    }
    e
}

fn event(kind: EventKind, hb: &Heartbeat, now: Now, reason: String) -> CellEvent {
    CellEvent {
        kind,
        cell_id: hb.cell_id.clone(),
        role: hb.role.clone(),
        at_ms: now.unix_ms,
        reason,
        parent: hb.parent.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn hb(id: &str, role: &str, seq: u64, state: CellState) -> Heartbeat {
        Heartbeat {
            cell_id: id.into(),
            role: role.into(),
            addr: "http://127.0.0.1:1".into(),
            state,
            pressure: 0.5,
            signals: BTreeMap::new(),
            version: "test".into(),
            build: String::new(),
            wire: Vec::new(),
            parent: None,
            seq,
            interval_ms: 100,
            pid: None,
            decision: None,
        }
    }

    fn at(start: Instant, ms: u64) -> Now {
        Now::new(start + Duration::from_millis(ms), ms as i64)
    }

    fn kinds(events: &[CellEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn heartbeats_are_ordered_by_seq_and_idempotent() {
        let t0 = Instant::now();
        let mut r = Registry::new(PhiParams::default());
        let born = r.observe(hb("a", "api", 5, CellState::Joining), at(t0, 0));
        assert_eq!(kinds(&born.expect("accepted")), [EventKind::Born]);
        // A repeat and an older one change nothing.
        for seq in [5, 3] {
            let got = r.observe(hb("a", "api", seq, CellState::Serving), at(t0, 50));
            assert_eq!(got, Err(Ignored::Stale { seq, last: 5 }));
        }
        assert_eq!(r.get("a").map(|h| h.state), Some(CellState::Joining));
        let serving = r.observe(hb("a", "api", 6, CellState::Serving), at(t0, 100));
        assert_eq!(kinds(&serving.expect("accepted")), [EventKind::Serving]);
        let routine = r.observe(hb("a", "api", 7, CellState::Serving), at(t0, 200));
        assert_eq!(routine, Ok(vec![]));
        // Gaps in seq are fine (a heartbeat lost on the way).
        assert_eq!(
            r.observe(hb("a", "api", 10, CellState::Serving), at(t0, 300)),
            Ok(vec![])
        );
        assert_eq!(r.counted_by_role()["api"], 1);
        let view = r.records(t0 + Duration::from_millis(350));
        let rec = &view.roles["api"][0];
        assert_eq!((rec.age_ms, rec.last_seen_ms), (350, 50));
    }

    #[test]
    fn invalid_heartbeats_are_refused() {
        let t0 = Instant::now();
        let mut r = Registry::new(PhiParams::default());
        let mut h = hb("a", "api", 1, CellState::Serving);
        h.interval_ms = 0;
        assert!(matches!(r.observe(h, at(t0, 0)), Err(Ignored::Invalid(_))));
        let mut h = hb("a", "api", 1, CellState::Serving);
        h.pressure = f64::NAN;
        assert!(matches!(r.observe(h, at(t0, 0)), Err(Ignored::Invalid(_))));
        assert!(matches!(
            r.observe(hb("", "api", 1, CellState::Serving), at(t0, 0)),
            Err(Ignored::Invalid(_))
        ));
        assert!(r.is_empty());
    }

    #[test]
    fn silence_is_death_unless_draining_and_a_dead_cell_stays_buried() {
        let t0 = Instant::now();
        let mut r = Registry::new(PhiParams::default());
        for seq in 1..=10 {
            let t = at(t0, seq * 100);
            r.observe(hb("a", "api", seq, CellState::Serving), t)
                .expect("accepted");
            r.observe(hb("d", "crawler", seq, CellState::Draining), t)
                .expect("accepted");
        }
        assert!(
            r.sweep(at(t0, 1300)).is_empty(),
            "300 ms of silence is fine"
        );
        let gone = r.sweep(at(t0, 2000));
        assert_eq!(gone.len(), 2);
        let a = gone.iter().find(|d| d.cell_id == "a").expect("a left");
        assert!(a.dead);
        assert_eq!(a.event.kind, EventKind::Dead);
        assert!(a.event.reason.starts_with("no heartbeat for 1000 ms, phi "));
        let d = gone.iter().find(|d| d.cell_id == "d").expect("d left");
        assert!(!d.dead);
        assert_eq!(d.event.kind, EventKind::Retired);
        assert!(r.is_empty() && r.is_gone("a"));

        // A heartbeat that was in flight when it died is ignored...
        let late = r.observe(hb("a", "api", 10, CellState::Serving), at(t0, 2010));
        assert_eq!(late, Err(Ignored::Stale { seq: 10, last: 10 }));
        assert!(!r.is_live("a"));
        // ... a newer one (it thawed) is refused: the cell is buried, it must stop.
        let back = r.observe(hb("a", "api", 11, CellState::Serving), at(t0, 2100));
        assert!(
            matches!(&back, Err(Ignored::Buried(why)) if why.contains("no heartbeat for 1000 ms")),
            "{back:?}"
        );
        assert!(!r.is_live("a") && r.is_gone("a"));
    }

    #[test]
    fn an_observer_that_was_away_does_not_blame_the_cells() {
        let t0 = Instant::now();
        let mut r = Registry::new(PhiParams::default());
        for seq in 1..=10 {
            r.observe(hb("a", "api", seq, CellState::Serving), at(t0, seq * 100))
                .expect("accepted");
        }
        // The checker itself was frozen for ten seconds; on waking it restarts the clocks.
        r.observer_resumed(at(t0, 11_000).at);
        assert!(r.sweep(at(t0, 11_100)).is_empty(), "no false death");
        r.observe(hb("a", "api", 11, CellState::Serving), at(t0, 11_050))
            .expect("accepted");
        // The ten seconds were not learnt as a heartbeat gap: a real silence is still seen soon.
        let gone = r.sweep(at(t0, 12_200));
        assert_eq!(gone.len(), 1);
        assert!(gone[0].dead);
    }

    #[test]
    fn a_retired_heartbeat_removes_the_cell_at_once() {
        let t0 = Instant::now();
        let mut r = Registry::new(PhiParams::default());
        r.observe(hb("a", "api", 1, CellState::Serving), at(t0, 0))
            .expect("accepted");
        let drained = r
            .observe(hb("a", "api", 2, CellState::Draining), at(t0, 100))
            .expect("accepted");
        assert_eq!(kinds(&drained), [EventKind::Draining]);
        assert!(
            !r.counted_by_role().contains_key("api"),
            "draining does not count"
        );
        let retired = r
            .observe(hb("a", "api", 3, CellState::Retired), at(t0, 200))
            .expect("accepted");
        assert_eq!(kinds(&retired), [EventKind::Retired]);
        assert!(!r.is_live("a"));
        assert_eq!(
            r.observe(hb("a", "api", 4, CellState::Retired), at(t0, 300)),
            Err(Ignored::Retired)
        );
        assert!(r.sweep(at(t0, 5000)).is_empty(), "no second departure");
    }

    #[test]
    fn the_gone_list_expires() {
        let t0 = Instant::now();
        let mut r = Registry::new(PhiParams::default());
        r.observe(hb("a", "api", 1, CellState::Serving), at(t0, 0))
            .expect("accepted");
        assert_eq!(r.sweep(at(t0, 2000)).len(), 1);
        assert!(r.is_gone("a"));
        r.sweep(Now::new(t0 + GONE_KEEP + Duration::from_secs(3), 0));
        assert!(!r.is_gone("a"));
        // Forgotten: even an old seq is a plain birth now.
        let born = r
            .observe(
                hb("a", "api", 1, CellState::Serving),
                Now::new(t0 + GONE_KEEP + Duration::from_secs(4), 0),
            )
            .expect("accepted");
        assert_eq!(born[0].reason, "first heartbeat");
    }

    #[test]
    fn a_decision_in_a_heartbeat_becomes_one_event_and_a_huge_one_is_refused() {
        let mut r = Registry::new(PhiParams::default());
        let now = |ms: u64| Now {
            at: Instant::now() + Duration::from_millis(ms),
            unix_ms: ms as i64,
        };
        let note = |n: u64, reason: String| protocol::control::DecisionNote {
            n,
            at_ms: 1_000,
            action: "divide".into(),
            reason,
            figures: [("n".to_string(), 1.0)].into_iter().collect(),
        };
        let mut first = hb("api-a", "api", 1, CellState::Serving);
        first.decision = Some(note(1, "load".into()));
        let events = r.observe(first, now(0)).expect("taken");
        let divided: Vec<_> = events
            .iter()
            .filter(|e| e.kind == EventKind::Divided)
            .collect();
        assert_eq!(divided.len(), 1, "{events:?}");
        assert_eq!(divided[0].at_ms, 1_000, "the decision's own time");
        assert!(divided[0].reason.starts_with("divide: load [n=1]"));
        // The same decision repeated in the next heartbeat is not recorded again.
        let mut again = hb("api-a", "api", 2, CellState::Serving);
        again.decision = Some(note(1, "load".into()));
        let events = r.observe(again, now(100)).expect("taken");
        assert!(events.iter().all(|e| e.kind != EventKind::Divided));
        let mut huge = hb("api-a", "api", 3, CellState::Serving);
        huge.decision = Some(note(2, "x".repeat(5000)));
        assert!(matches!(
            r.observe(huge, now(200)),
            Err(Ignored::Invalid(_))
        ));
    }
}
