//! What a cell does about its role's pressure: the homeostasis controller.
//!
//! There is no central autoscaler. Every cell runs one [`Controller`] on what it sees: its own
//! pressure (fresh) and its siblings' (the registry's `GET /cells`, possibly stale), and each
//! heartbeat it gets one [`Decision`]: hold, throttle, divide (ask the factory for cells),
//! retire itself (apoptosis), or ask for its own replacement (fatigue). The same code serves every
//! role, and the deterministic simulation in [`crate::sim`] runs exactly this code.
//!
//! How siblings agree without talking to each other:
//! - **Growth keys are positions, not askers.** The role needs `desired = ceil(load / target)`
//!   cells (`load` = the sum of the serving cells' pressure, in cells' worth of work, capped at
//!   `max`). With `c` cells counted and `p` pending, the missing cells are the slots
//!   `c+p+1 ..= desired`, asked with the keys `grow:<role>:<slot>` (attempt `k > 1` appends
//!   `:k`). Siblings that read the same registry compute the same slots, and the factory starts
//!   one cell per key, so ten overloaded siblings ask for what the load needs, not ten
//!   machines. The namespace is the health checkers' own (`healthchecker/src/reconcile.rs`), so
//!   a checker filling the minimum and a cell dividing for load collapse on the same slot too.
//!   The factory forgets a key after `KEY_MEMORY` (30 s), which is what lets a later need for
//!   the same slot be served; within that memory, a key whose cell is already gone is reported
//!   with [`Controller::spent`] and the slot's next attempt is used.
//! - **Only the elders ask.** The `askers` oldest serving cells (ties by cell id) send the
//!   requests; the others hold. More than one, so a frozen elder does not stall growth; not all
//!   of them, so ten thousand cells do not send ten thousand copies of each request.
//! - **Retirement is chosen, not raced.** A cell retires only if it is among the `k` youngest
//!   idle cells (ties by cell id) of the view, `k` the surplus the load leaves (at most
//!   `shrink_ratio` of the role per round), so on one view two siblings never both pick the same
//!   surplus, and the youngest (least warm state) goes first, as in the health checker's
//!   `surplus.rs`.
//!
//! What keeps steady load from flapping (Kubernetes HPA's tolerance and stabilisation windows,
//! here as a band): growth needs the role's mean above `high` for `grow_confirm`, shrinking
//! needs this cell below `low` for `shrink_confirm` and the role's load to fit in the cells that
//! stay at or below `target` (between the two marks, so the cells that stay are not pushed back
//! over `high`); the role must not have grown lately (its youngest cell is older than
//! `shrink_after_grow`), no growth may be pending, no retirement round may be under way (no
//! draining sibling for `shrink_cooldown`), and the view must be fresh, with no gap longer
//! than `read_gap` between registry reads for `shrink_cooldown` (a cell that missed the last
//! round's draining cells would otherwise start the next round alone, and each such trickle
//! restarts everyone's cooldown: found by the simulation at ten thousand cells with 5% of
//! reads lost). The caller builds a new [`RoleView`] on every successful registry read.
//!
//! Seed 003 (throttle before dividing): with `throttle_first`, a cell over `high` first says
//! [`Action::Throttle`] (an api defers link expansion) and divides only once the tendency holds.
//!
//! Pure and time-injected: no I/O, no async; the caller's loop (every heartbeat) builds a
//! [`RoleView`] from the registry, calls [`Controller::tick`], and acts on the decision.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use protocol::control::{CellRecord, CellState};
use serde::Serialize;

/// The thresholds and windows, the same for every role unless the role's configuration says
/// otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Above this mean pressure the role is overloaded.
    pub high: f64,
    /// Below this pressure a cell is idle.
    pub low: f64,
    /// The pressure a role is sized for (`desired = ceil(load / target)`); between low and high.
    pub target: f64,
    /// How long the role must stay overloaded before a cell divides.
    pub grow_confirm: Duration,
    /// How long this cell must stay idle before it retires.
    pub shrink_confirm: Duration,
    /// Least time between two divisions asked by this cell.
    pub grow_cooldown: Duration,
    /// Least time after a retirement round ended (the first registry read that no longer
    /// lists a draining sibling) before the next one.
    pub shrink_cooldown: Duration,
    /// No retirement while the role's youngest cell is younger than this (no reversal right
    /// after growth).
    pub shrink_after_grow: Duration,
    /// Cells asked per decision: at most `max(grow_step, ceil(cells * grow_ratio))`.
    pub grow_step: u32,
    pub grow_ratio: f64,
    /// Cells retired per round: at most `max(1, floor(cells * shrink_ratio))`.
    pub shrink_ratio: f64,
    /// How many of the oldest serving cells send growth requests (0: every cell).
    pub askers: u32,
    /// A slot asked for counts as pending this long, or until the role has that many cells.
    pub pending_timeout: Duration,
    /// A view older than this (a frozen or unreachable registry) is not acted on.
    pub stale_after: Duration,
    /// A longer gap between two registry reads may have hidden a retirement round: no
    /// retirement until the reads have been regular again for `shrink_cooldown`.
    pub read_gap: Duration,
    /// Say [`Action::Throttle`] while over `high` before the growth is confirmed (seed 003).
    pub throttle_first: bool,
    /// Divide and then ask for replacement when this cell's own processing time degrades.
    pub fatigue: Option<FatigueParams>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            high: 0.8,
            low: 0.3,
            target: 0.6,
            grow_confirm: Duration::from_millis(1500),
            shrink_confirm: Duration::from_secs(10),
            grow_cooldown: Duration::from_secs(3),
            shrink_cooldown: Duration::from_secs(5),
            shrink_after_grow: Duration::from_secs(30),
            grow_step: 4,
            grow_ratio: 1.0,
            shrink_ratio: 0.75,
            askers: 3,
            pending_timeout: Duration::from_secs(60),
            stale_after: Duration::from_secs(5),
            read_gap: Duration::from_secs(2),
            throttle_first: false,
            fatigue: None,
        }
    }
}

/// Fatigue: a cell whose processing time grows on the same work is wearing out (a leak, a full
/// disk, a noisy neighbour). It divides before it dies, and asks for its own replacement if it
/// stays sick.
#[derive(Debug, Clone, PartialEq)]
pub struct FatigueParams {
    /// Sick when the recent average is this many times the baseline.
    pub ratio: f64,
    /// How long the sickness must hold before the cell divides.
    pub window: Duration,
    /// How long the sickness must hold before the cell asks for its replacement and retires.
    pub replace_after: Duration,
    /// Weight of a new sample in the recent average (EWMA).
    pub fast_alpha: f64,
    /// Weight of a new sample in the baseline (EWMA), learnt only while healthy.
    pub slow_alpha: f64,
    /// Samples before the baseline is trusted.
    pub warmup: u32,
}

impl Default for FatigueParams {
    fn default() -> Self {
        Self {
            ratio: 1.5,
            window: Duration::from_secs(10),
            replace_after: Duration::from_secs(60),
            fast_alpha: 0.3,
            slow_alpha: 0.05,
            warmup: 10,
        }
    }
}

/// A role's size limits (`[roles.ROLE] min/max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// One row of the registry, as the controller needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sibling<'a> {
    pub cell_id: &'a str,
    pub state: CellState,
    pub pressure: f64,
    /// Since the registry first heard of the cell.
    pub age: Duration,
}

impl<'a> From<&'a CellRecord> for Sibling<'a> {
    fn from(r: &'a CellRecord) -> Self {
        Self {
            cell_id: &r.cell_id,
            state: r.state,
            pressure: r.pressure,
            age: Duration::from_millis(r.age_ms),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Member {
    counted: bool,
    serving: bool,
    pressure: f64,
    /// Position among the idle serving cells, youngest first.
    idle_rank: Option<u32>,
    /// Position among the serving cells, oldest first.
    elder_rank: Option<u32>,
}

/// One read of the registry for one role, digested once and shared by every tick that uses it
/// (the simulation hands the same view to thousands of cells).
#[derive(Debug, Clone)]
pub struct RoleView {
    /// When the registry answered.
    pub at: Instant,
    counted: u32,
    serving: u32,
    draining: u32,
    load: f64,
    youngest: Option<Duration>,
    /// Ages of the counted cells, youngest first.
    ages: Vec<Duration>,
    members: HashMap<String, Member>,
}

impl RoleView {
    /// Digest the rows of one role read at `at`; `params.low` decides which cells are idle.
    pub fn new<'a>(
        at: Instant,
        params: &Params,
        rows: impl IntoIterator<Item = Sibling<'a>>,
    ) -> Self {
        let rows: Vec<Sibling<'a>> = rows.into_iter().collect();
        let mut members = HashMap::with_capacity(rows.len());
        let (mut counted, mut serving, mut draining, mut load) = (0, 0, 0, 0.0);
        let mut ages = Vec::new();
        let mut idle: Vec<&Sibling<'a>> = Vec::new();
        let mut elders: Vec<&Sibling<'a>> = Vec::new();
        for r in &rows {
            let is_counted = counts(r.state);
            let is_serving = serves(r.state);
            let pressure = clean(r.pressure);
            if is_counted {
                counted += 1;
                ages.push(r.age);
            }
            if r.state == CellState::Draining {
                draining += 1;
            }
            if is_serving {
                serving += 1;
                load += pressure;
                elders.push(r);
                if pressure < params.low {
                    idle.push(r);
                }
            }
            members.insert(
                r.cell_id.to_string(),
                Member {
                    counted: is_counted,
                    serving: is_serving,
                    pressure,
                    idle_rank: None,
                    elder_rank: None,
                },
            );
        }
        ages.sort_unstable();
        idle.sort_by(|a, b| a.age.cmp(&b.age).then(a.cell_id.cmp(b.cell_id)));
        elders.sort_by(|a, b| b.age.cmp(&a.age).then(a.cell_id.cmp(b.cell_id)));
        for (i, r) in idle.iter().enumerate() {
            if let Some(m) = members.get_mut(r.cell_id) {
                m.idle_rank = Some(i as u32);
            }
        }
        for (i, r) in elders.iter().enumerate() {
            if let Some(m) = members.get_mut(r.cell_id) {
                m.elder_rank = Some(i as u32);
            }
        }
        Self {
            at,
            counted,
            serving,
            draining,
            load,
            youngest: ages.first().copied(),
            ages,
            members,
        }
    }

    /// The rows of `role` in a `GET /cells` answer.
    pub fn from_records(at: Instant, params: &Params, records: &[CellRecord]) -> Self {
        Self::new(at, params, records.iter().map(Sibling::from))
    }

    /// Cells that count toward the role's size (not draining, retired or dead).
    pub fn counted(&self) -> u32 {
        self.counted
    }

    /// Sum of the serving cells' pressure: the load in cells' worth of work.
    pub fn load(&self) -> f64 {
        self.load
    }

    /// Counted cells the registry first heard of after `t`.
    pub fn appeared_since(&self, t: Instant) -> u32 {
        let Some(window) = self.at.checked_duration_since(t) else {
            return 0;
        };
        self.ages.partition_point(|a| *a < window) as u32
    }
}

/// What the cell knows of itself this tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Own {
    /// Its pressure, measured now (1.0 = at capacity).
    pub pressure: f64,
    /// Its processing time per unit of work (a page), when the role measures it (fatigue).
    pub processing: Option<f64>,
    /// Cells of the role the caller knows are asked for and not yet in the registry (0 if
    /// unknown; the controller also remembers its own requests).
    pub pending: u32,
}

/// What to do, why, and the figures behind it (for the event the caller records).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reason: Cow<'static, str>,
    pub figures: Figures,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Hold,
    /// Shed optional work (an api defers link expansion) until [`Action::Unthrottle`].
    Throttle,
    Unthrottle,
    /// Ask the factory for `want` cells, one request per key.
    Divide {
        want: u32,
        keys: Vec<String>,
    },
    /// Drain and retire this cell.
    Retire,
    /// Ask the factory for this cell's replacement with `key`, then drain and retire.
    Replace {
        key: String,
    },
}

impl Action {
    /// A short name for events and counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::Throttle => "throttle",
            Action::Unthrottle => "unthrottle",
            Action::Divide { .. } => "divide",
            Action::Retire => "retire",
            Action::Replace { .. } => "replace",
        }
    }
}

/// The figures a decision was taken on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Cells counted (this one included).
    pub n: u32,
    pub serving: u32,
    /// Cells asked for and not yet seen.
    pub pending: u32,
    pub sum_pressure: f64,
    pub mean: f64,
    pub own: f64,
    /// Cells the load needs at `target`, within the bounds.
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    /// How long the tendency behind the decision has held.
    pub window_ms: u64,
    /// Recent over baseline processing time, when measured.
    pub fatigue_ratio: Option<f64>,
}

#[derive(Debug, Clone, Default)]
struct Fatigue {
    fast: f64,
    base: f64,
    samples: u32,
    /// When the last measure came: an idle cell measures nothing, and an old ratio is no
    /// evidence of sickness.
    last: Option<Instant>,
    sick_since: Option<Instant>,
    divided: bool,
}

impl Fatigue {
    /// Take a sample; the ratio once the baseline is trusted.
    fn sample(&mut self, p: &FatigueParams, x: f64) -> Option<f64> {
        if !x.is_finite() || x <= 0.0 {
            return self.ratio(p);
        }
        if self.samples == 0 {
            self.fast = x;
            self.base = x;
        } else {
            self.fast += p.fast_alpha * (x - self.fast);
            // The baseline learns only while healthy, so a slow decline is not learnt as normal.
            if self.ratio(p).is_none_or(|r| r < p.ratio) {
                self.base += p.slow_alpha * (x - self.base);
            }
        }
        self.samples = self.samples.saturating_add(1);
        self.ratio(p)
    }

    fn ratio(&self, p: &FatigueParams) -> Option<f64> {
        (self.samples >= p.warmup && self.base > 0.0).then(|| self.fast / self.base)
    }
}

/// One cell's controller. Lives as long as the cell; call [`Controller::tick`] every heartbeat.
#[derive(Debug, Clone)]
pub struct Controller {
    params: Params,
    bounds: Bounds,
    role: String,
    cell_id: String,
    over_since: Option<Instant>,
    under_since: Option<Instant>,
    last_divide: Option<Instant>,
    /// Whether the last read listed draining cells, and when the last round ended.
    saw_draining: bool,
    round_end: Option<Instant>,
    /// The registry time of the view of the previous tick, and since when every tick had a
    /// new one (no read missed).
    last_view_at: Option<Instant>,
    in_touch_since: Option<Instant>,
    throttled: bool,
    /// Slots this cell asked for, and when.
    asked: BTreeMap<u32, Instant>,
    /// Next attempt per slot, after a key was spent.
    attempts: HashMap<u32, u32>,
    fatigue: Fatigue,
    /// Retire or Replace was decided: nothing more.
    done: bool,
}

impl Controller {
    pub fn new(
        params: Params,
        bounds: Bounds,
        role: impl Into<String>,
        cell_id: impl Into<String>,
    ) -> Self {
        Self {
            params,
            bounds,
            role: role.into(),
            cell_id: cell_id.into(),
            over_since: None,
            under_since: None,
            last_divide: None,
            saw_draining: false,
            round_end: None,
            last_view_at: None,
            in_touch_since: None,
            throttled: false,
            asked: BTreeMap::new(),
            attempts: HashMap::new(),
            fatigue: Fatigue::default(),
            done: false,
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn cell_id(&self) -> &str {
        &self.cell_id
    }

    /// Whether this cell last said [`Action::Throttle`].
    pub fn throttled(&self) -> bool {
        self.throttled
    }

    /// The factory answered `key` with a cell that is already gone or already counted (the key
    /// is remembered from an earlier need): nothing is coming for it, and the slot's next
    /// request uses the next attempt.
    pub fn spent(&mut self, key: &str) {
        let prefix = format!("grow:{}:", self.role);
        let Some(rest) = key.strip_prefix(&prefix) else {
            return;
        };
        let mut parts = rest.split(':');
        let Some(Ok(slot)) = parts.next().map(str::parse::<u32>) else {
            return;
        };
        let attempt = parts
            .next()
            .and_then(|a| a.parse::<u32>().ok())
            .unwrap_or(1);
        let next = self.attempts.entry(slot).or_insert(1);
        *next = (*next).max(attempt + 1);
        self.asked.remove(&slot);
    }

    /// Decide, at `now`, on this cell's own figures and the latest view of its role.
    pub fn tick(&mut self, now: Instant, own: Own, view: &RoleView) -> Decision {
        let p = &self.params.clone();
        let own_pressure = clean(own.pressure);
        // This cell as the view sees it; its fresh pressure replaces the reported one.
        let me = view.members.get(&self.cell_id).copied();
        let (mut n, mut serving, mut load) = (view.counted, view.serving, view.load);
        match me {
            Some(m) if m.serving => load += own_pressure - m.pressure,
            Some(m) => {
                // Listed but not serving (joining): it serves now.
                n += u32::from(!m.counted);
                serving += 1;
                load += own_pressure;
            }
            None => {
                n += 1;
                serving += 1;
                load += own_pressure;
            }
        }
        let load = load.max(0.0);
        let mean = load / f64::from(serving.max(1));
        // What this cell asked for is pending until as many cells appeared since (whoever asked
        // for them: a sibling's identical key, a checker's replacement), or for too long.
        // Counting arrivals rather than matching slots to the count keeps deaths meanwhile
        // from holding a slot pending forever.
        let timeout = p.pending_timeout;
        self.asked
            .retain(|_, at| now.saturating_duration_since(*at) < timeout);
        let since = self.asked.values().min().copied();
        let arrived = since.map_or(0, |t| view.appeared_since(t));
        if arrived as usize >= self.asked.len() {
            self.asked.clear();
        }
        let pending = (self.asked.len() as u32)
            .saturating_sub(arrived)
            .max(own.pending);
        let needed = (load / p.target).ceil() as u32;
        let desired = needed.clamp(self.bounds.min, self.bounds.max.max(self.bounds.min));
        let fatigue_ratio = match (&p.fatigue, own.processing) {
            (Some(fp), Some(x)) => {
                self.fatigue.last = Some(now);
                self.fatigue.sample(fp, x)
            }
            (Some(fp), None) => self
                .fatigue
                .last
                .filter(|t| now.saturating_duration_since(*t) < p.stale_after)
                .and_then(|_| self.fatigue.ratio(fp)),
            _ => None,
        };
        let mut figures = Figures {
            n,
            serving,
            pending,
            sum_pressure: load,
            mean,
            own: own_pressure,
            desired,
            min: self.bounds.min,
            max: self.bounds.max,
            window_ms: 0,
            fatigue_ratio,
        };
        if self.done {
            return hold("retiring", figures);
        }
        // Tendencies.
        if mean > p.high {
            self.over_since.get_or_insert(now);
        } else {
            self.over_since = None;
        }
        if own_pressure < p.low {
            self.under_since.get_or_insert(now);
        } else {
            self.under_since = None;
        }
        // Stamped with the registry's time, not this cell's: siblings whose reads of the
        // registry failed or lagged then still agree on when the round ended, so the next
        // round starts for all of them together rather than as a trickle of the few who saw
        // it end first (each trickle restarting everyone's cooldown).
        // On each new registry read: a gap longer than `read_gap` may have hidden a
        // retirement round (draining cells are listed only for a drain's length), so the cell
        // is out of touch until it has read without such a gap for a cooldown. A round ends at
        // the first read that lists no draining cell after one that did, stamped with the
        // registry's time: a cell that missed a read only learns of the end later, never
        // earlier, so no cell starts the next round ahead of its siblings (a trickle of early
        // retirements would restart everyone's cooldown; found by the simulation at ten
        // thousand cells with 5% of reads lost).
        if self.last_view_at != Some(view.at) {
            let gap = self.last_view_at.map_or(Duration::ZERO, |last| {
                view.at.saturating_duration_since(last)
            });
            if gap > p.read_gap || self.in_touch_since.is_none() {
                self.in_touch_since = Some(view.at);
            }
            self.last_view_at = Some(view.at);
            if view.draining > 0 {
                self.saw_draining = true;
                self.round_end = None;
            } else if self.saw_draining {
                self.saw_draining = false;
                self.round_end = Some(view.at);
            }
        } else if now.saturating_duration_since(view.at) > p.read_gap {
            self.in_touch_since = None;
        }
        let held = |since: Option<Instant>| since.map(|s| now.saturating_duration_since(s));

        if let Some(d) = self.fatigue_decision(now, fatigue_ratio, n + pending, &mut figures) {
            return d;
        }
        let stale = now.saturating_duration_since(view.at) > p.stale_after;

        // Seed 003: throttle first, divide once the tendency holds.
        if p.throttle_first && own_pressure > p.high && !self.throttled {
            self.throttled = true;
            return decide(
                Action::Throttle,
                format!(
                    "own pressure {own_pressure:.2} above the high-water mark {:.2}: shedding optional work first",
                    p.high
                ),
                figures,
            );
        }
        if self.throttled && own_pressure < p.target {
            self.throttled = false;
            return decide(
                Action::Unthrottle,
                format!(
                    "own pressure {own_pressure:.2} back under the target {:.2}",
                    p.target
                ),
                figures,
            );
        }

        // Growth.
        if let Some(over) = held(self.over_since) {
            figures.window_ms = over.as_millis() as u64;
            let capacity = n + pending;
            if over < p.grow_confirm {
                return hold("overloaded, not yet confirmed", figures);
            }
            if capacity >= desired {
                return hold(
                    if capacity >= self.bounds.max {
                        "overloaded at the maximum"
                    } else {
                        "overloaded, the cells asked for are coming"
                    },
                    figures,
                );
            }
            if stale {
                return hold("overloaded, but the view is stale", figures);
            }
            if self
                .last_divide
                .is_some_and(|t| now.saturating_duration_since(t) < p.grow_cooldown)
            {
                return hold("overloaded, cooling down after a division", figures);
            }
            let elder = me.and_then(|m| m.elder_rank);
            if p.askers > 0 && elder.is_none_or(|r| r >= p.askers) {
                return hold("overloaded, the elders ask", figures);
            }
            let step = p
                .grow_step
                .max((f64::from(capacity) * p.grow_ratio).ceil() as u32)
                .max(1);
            let want = (desired - capacity).min(step);
            let keys = (capacity + 1..=capacity + want)
                .map(|slot| {
                    self.asked.insert(slot, now);
                    grow_key(
                        &self.role,
                        slot,
                        self.attempts.get(&slot).copied().unwrap_or(1),
                    )
                })
                .collect();
            self.last_divide = Some(now);
            figures.pending = pending + want;
            let reason = format!(
                "{} mean pressure {mean:.2} above {:.2} for {} ms: load {load:.2} needs {desired} cells at {:.2}, {n} counted and {pending} pending, asking for {want}",
                self.role,
                p.high,
                over.as_millis(),
                p.target
            );
            return decide(Action::Divide { want, keys }, reason, figures);
        }

        // Shrinking: this cell retires if it is one of the surplus idle cells.
        let Some(under) = held(self.under_since) else {
            return hold("within the band", figures);
        };
        figures.window_ms = under.as_millis() as u64;
        if under < p.shrink_confirm {
            return hold("idle, not yet confirmed", figures);
        }
        let keep = needed.max(self.bounds.min);
        if n <= keep {
            return hold("idle, but the role needs its cells", figures);
        }
        if pending > 0 {
            return hold("idle, but cells are coming", figures);
        }
        if stale {
            return hold("idle, but the view is stale", figures);
        }
        if view.youngest.is_some_and(|y| y < p.shrink_after_grow) {
            return hold("idle, but the role grew lately", figures);
        }
        if self.saw_draining
            || self
                .round_end
                .is_some_and(|t| now.saturating_duration_since(t) < p.shrink_cooldown)
        {
            return hold("idle, a retirement round is under way", figures);
        }
        if self
            .in_touch_since
            .is_none_or(|t| now.saturating_duration_since(t) < p.shrink_cooldown)
        {
            return hold("idle, but registry reads were missed lately", figures);
        }
        let round = ((f64::from(n) * p.shrink_ratio).floor() as u32).max(1);
        let k = (n - keep).min(round);
        let rank = me.and_then(|m| m.idle_rank);
        if rank.is_none_or(|r| r >= k) {
            return hold("idle, another cell retires", figures);
        }
        self.done = true;
        let reason = format!(
            "{} has {n} cells, above the {keep} its load {load:.2} needs at {:.2} (minimum {}); this cell has been under {:.2} for {} ms and is one of the {k} youngest idle cells",
            self.role,
            p.target,
            self.bounds.min,
            p.low,
            under.as_millis()
        );
        decide(Action::Retire, reason, figures)
    }

    fn fatigue_decision(
        &mut self,
        now: Instant,
        ratio: Option<f64>,
        capacity: u32,
        figures: &mut Figures,
    ) -> Option<Decision> {
        let fp = self.params.fatigue.as_ref()?;
        let sick = ratio.is_some_and(|r| r > fp.ratio);
        if !sick {
            self.fatigue.sick_since = None;
            self.fatigue.divided = false;
            return None;
        }
        let since = *self.fatigue.sick_since.get_or_insert(now);
        let held = now.saturating_duration_since(since);
        figures.window_ms = held.as_millis() as u64;
        let r = ratio.unwrap_or_default();
        if held >= fp.replace_after {
            self.done = true;
            return Some(decide(
                Action::Replace {
                    key: format!("replace:{}", self.cell_id),
                },
                format!(
                    "fatigue: processing time {r:.2}x its baseline for {} ms: asking for a replacement, then retiring",
                    held.as_millis()
                ),
                *figures,
            ));
        }
        if held >= fp.window && !self.fatigue.divided && capacity < self.bounds.max {
            self.fatigue.divided = true;
            return Some(decide(
                Action::Divide {
                    want: 1,
                    keys: vec![format!("fatigue:{}", self.cell_id)],
                },
                format!(
                    "fatigue: processing time {r:.2}x its baseline for {} ms: dividing before it fails",
                    held.as_millis()
                ),
                *figures,
            ));
        }
        None
    }
}

/// The factory key for growth slot `slot` of `role`, attempt `attempt` (from 1).
pub fn grow_key(role: &str, slot: u32, attempt: u32) -> String {
    if attempt <= 1 {
        format!("grow:{role}:{slot}")
    } else {
        format!("grow:{role}:{slot}:{attempt}")
    }
}

/// Counted toward the role's size (as the health checkers' registry counts).
fn counts(state: CellState) -> bool {
    !matches!(
        state,
        CellState::Draining | CellState::Retired | CellState::Dead
    )
}

/// Takes work and reports a meaningful pressure.
fn serves(state: CellState) -> bool {
    matches!(
        state,
        CellState::Serving | CellState::Throttling | CellState::Dividing
    )
}

/// A pressure reading as the controller trusts it: not negative, not absurd, not NaN.
fn clean(p: f64) -> f64 {
    if p.is_finite() {
        p.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

fn hold(reason: &'static str, figures: Figures) -> Decision {
    Decision {
        action: Action::Hold,
        reason: Cow::Borrowed(reason),
        figures,
    }
}

fn decide(action: Action, reason: String, figures: Figures) -> Decision {
    Decision {
        action,
        reason: Cow::Owned(reason),
        figures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: Duration = Duration::from_secs(3600);

    /// `(id, state, pressure, age)` rows.
    fn view(at: Instant, p: &Params, rows: &[(&str, CellState, f64, Duration)]) -> RoleView {
        RoleView::new(
            at,
            p,
            rows.iter().map(|(id, state, pressure, age)| Sibling {
                cell_id: id,
                state: *state,
                pressure: *pressure,
                age: *age,
            }),
        )
    }

    fn serving(
        ids_pressures: &[(&'static str, f64)],
    ) -> Vec<(&'static str, CellState, f64, Duration)> {
        ids_pressures
            .iter()
            .enumerate()
            .map(|(i, (id, p))| {
                (
                    *id,
                    CellState::Serving,
                    *p,
                    OLD - Duration::from_secs(i as u64),
                )
            })
            .collect()
    }

    fn own(pressure: f64) -> Own {
        Own {
            pressure,
            ..Own::default()
        }
    }

    /// Tick `c` every 250 ms from `t0` for `secs` on a view refreshed at each tick; the
    /// non-hold decisions.
    fn run(
        c: &mut Controller,
        t0: Instant,
        secs: u64,
        pressure: f64,
        rows: &[(&str, CellState, f64, Duration)],
    ) -> Vec<(u64, Decision)> {
        let mut out = Vec::new();
        for k in 0..=(secs * 4) {
            let now = t0 + Duration::from_millis(k * 250);
            let v = view(now, c.params(), rows);
            let d = c.tick(now, own(pressure), &v);
            if d.action != Action::Hold {
                out.push((k * 250, d));
            }
        }
        out
    }

    fn bounds(min: u32, max: u32) -> Bounds {
        Bounds { min, max }
    }

    #[test]
    fn table_of_single_decisions_after_the_windows() {
        // (case, own id, own pressure, rows, bounds, expected action kind, expected reason part)
        type Case = (
            &'static str,
            &'static str,
            f64,
            Vec<(&'static str, CellState, f64, Duration)>,
            Bounds,
            &'static str,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "steady in the band holds",
                "a",
                0.6,
                serving(&[("a", 0.6), ("b", 0.55), ("c", 0.65)]),
                bounds(2, 10),
                "hold",
                "within the band",
            ),
            (
                "overloaded elder divides",
                "a",
                0.95,
                serving(&[("a", 0.95), ("b", 0.9), ("c", 0.95)]),
                bounds(2, 10),
                "divide",
                "asking for",
            ),
            (
                "overloaded at the maximum holds",
                "a",
                0.95,
                serving(&[("a", 0.95), ("b", 0.9), ("c", 0.95)]),
                bounds(2, 3),
                "hold",
                "at the maximum",
            ),
            (
                "idle youngest retires",
                "c",
                0.05,
                serving(&[("a", 0.1), ("b", 0.1), ("c", 0.05)]),
                bounds(1, 10),
                "retire",
                "youngest idle",
            ),
            (
                "idle but the minimum holds",
                "c",
                0.05,
                serving(&[("a", 0.1), ("b", 0.1), ("c", 0.05)]),
                bounds(3, 10),
                "hold",
                "needs its cells",
            ),
            (
                "idle elder leaves it to the youngest",
                "a",
                0.05,
                serving(&[("a", 0.1), ("b", 0.1), ("c", 0.05)]),
                bounds(2, 10),
                "hold",
                "another cell retires",
            ),
            (
                "a young sibling means the role grew lately",
                "c",
                0.05,
                vec![
                    ("a", CellState::Serving, 0.1, OLD),
                    ("b", CellState::Serving, 0.1, OLD),
                    ("c", CellState::Serving, 0.05, Duration::from_secs(5)),
                ],
                bounds(1, 10),
                "hold",
                "grew lately",
            ),
        ];
        for (name, id, pressure, rows, b, kind, reason) in cases {
            let t0 = Instant::now();
            let mut c = Controller::new(Params::default(), b, "api", id);
            let mut last = None;
            for k in 0..=(15 * 4) {
                let now = t0 + Duration::from_millis(k * 250);
                let v = view(now, c.params(), &rows);
                let d = c.tick(now, own(pressure), &v);
                let stop = d.action != Action::Hold;
                last = Some(d);
                if stop {
                    break;
                }
            }
            let d = last.expect("ticked");
            assert_eq!(d.action.kind(), kind, "{name}: {d:?}");
            assert!(d.reason.contains(reason), "{name}: {}", d.reason);
        }
    }

    #[test]
    fn siblings_that_see_the_same_registry_ask_with_the_same_keys() {
        let t0 = Instant::now();
        let rows = serving(&[("a", 1.2), ("b", 1.2), ("c", 1.2), ("d", 1.2)]);
        let mut got = Vec::new();
        for id in ["a", "b", "c"] {
            let mut c = Controller::new(Params::default(), bounds(2, 100), "crawler", id);
            let ds = run(&mut c, t0, 3, 1.2, &rows);
            let (at, d) = ds.first().expect("divides");
            assert_eq!(*at, 1500, "after the 1.5 s confirmation");
            got.push(d.action.clone());
        }
        // Load 4.8 at target 0.6 needs 8 cells: slots 5..=8, the same for all three elders.
        let want = Action::Divide {
            want: 4,
            keys: (5..=8).map(|s| grow_key("crawler", s, 1)).collect(),
        };
        assert!(got.iter().all(|a| *a == want), "{got:?}");
        // The fourth (youngest) is not an elder: it leaves the asking to them.
        let mut d = Controller::new(Params::default(), bounds(2, 100), "crawler", "d");
        assert!(run(&mut d, t0, 5, 1.2, &rows).is_empty());
    }

    #[test]
    fn pending_slots_are_not_asked_twice_and_a_spent_key_moves_to_the_next_attempt() {
        let t0 = Instant::now();
        let p = Params::default();
        let rows = serving(&[("a", 0.9), ("b", 0.9)]);
        let mut c = Controller::new(p.clone(), bounds(1, 100), "api", "a");
        let ds = run(&mut c, t0, 20, 0.9, &rows);
        // 1.8 at 0.6 needs 3: one division for slot 3, then holding while it boots.
        assert_eq!(ds.len(), 1, "{ds:?}");
        assert_eq!(
            ds[0].1.action,
            Action::Divide {
                want: 1,
                keys: vec!["grow:api:3".into()]
            }
        );
        // The factory says slot 3's key is held by a cell that is gone.
        c.spent("grow:api:3");
        let t1 = t0 + Duration::from_secs(30);
        let ds = run(&mut c, t1, 5, 0.9, &rows);
        assert_eq!(
            ds[0].1.action,
            Action::Divide {
                want: 1,
                keys: vec!["grow:api:3:2".into()]
            }
        );
        // The cell appears: nothing pending, nothing more to ask (0.6 each at 3 cells).
        let three = serving(&[("a", 0.6), ("b", 0.6), ("c", 0.6)]);
        assert!(run(&mut c, t1 + Duration::from_secs(10), 30, 0.6, &three).is_empty());
    }

    #[test]
    fn steps_are_bounded_and_the_maximum_holds() {
        let t0 = Instant::now();
        // Ten cells at 3.0 each: the load needs 50; one step adds at most 100% (10).
        let ids: Vec<String> = (0..10).map(|i| format!("c{i:02}")).collect();
        let rows: Vec<_> = ids
            .iter()
            .map(|id| (id.as_str(), CellState::Serving, 3.0, OLD))
            .collect();
        let mut c = Controller::new(Params::default(), bounds(2, 15), "crawler", "c00");
        let ds = run(&mut c, t0, 3, 3.0, &rows);
        match &ds[0].1.action {
            Action::Divide { want, keys } => {
                assert_eq!(*want, 5, "capped at max 15");
                assert_eq!(keys.last().map(String::as_str), Some("grow:crawler:15"));
            }
            other => panic!("expected a division, got {other:?}"),
        }
        let mut c = Controller::new(Params::default(), bounds(2, 1000), "crawler", "c00");
        let ds = run(&mut c, t0, 3, 3.0, &rows);
        assert_eq!(ds[0].1.action.kind(), "divide");
        assert_eq!(ds[0].1.figures.desired, 50);
        assert!(matches!(ds[0].1.action, Action::Divide { want: 10, .. }));
    }

    #[test]
    fn a_dip_or_a_burst_is_not_a_trend() {
        let t0 = Instant::now();
        let mut c = Controller::new(Params::default(), bounds(1, 100), "api", "b");
        let busy = serving(&[("a", 0.95), ("b", 0.95)]);
        let idle = serving(&[("a", 0.05), ("b", 0.05)]);
        // Alternating every second: neither window (2 s, 10 s) ever completes.
        for s in 0..60u64 {
            let (rows, pressure) = if s % 2 == 0 {
                (&busy, 0.95)
            } else {
                (&idle, 0.05)
            };
            let ds = run(&mut c, t0 + Duration::from_secs(s), 0, pressure, rows);
            assert!(ds.is_empty(), "at {s} s: {ds:?}");
        }
    }

    #[test]
    fn surplus_retires_in_rounds_of_the_youngest_and_never_below_the_need() {
        let t0 = Instant::now();
        // Eight cells, load 1.0 in all: needs 2 at 0.6; minimum 1; rounds of half the role: at
        // most 4.
        let halves = Params {
            shrink_ratio: 0.5,
            ..Params::default()
        };
        let ids: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
        let rows: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    id.as_str(),
                    CellState::Serving,
                    0.125,
                    OLD - Duration::from_secs(i as u64),
                )
            })
            .collect();
        let mut retired = Vec::new();
        for id in &ids {
            let mut c = Controller::new(halves.clone(), bounds(1, 100), "crawler", id.as_str());
            let ds = run(&mut c, t0, 12, 0.125, &rows);
            if ds.iter().any(|(_, d)| d.action == Action::Retire) {
                retired.push(id.clone());
            }
        }
        assert_eq!(retired, ["c4", "c5", "c6", "c7"], "the four youngest");
        // Once they drain, the rest wait for the cooldown, then the next round: 4 -> 2.
        let rest: Vec<_> = rows[..4]
            .iter()
            .map(|(id, s, _, a)| (*id, *s, 0.25, *a))
            .chain(
                rows[4..]
                    .iter()
                    .map(|(id, _, _, a)| (*id, CellState::Draining, 0.0, *a)),
            )
            .collect();
        let mut c3 = Controller::new(halves.clone(), bounds(1, 100), "crawler", "c3");
        let ds = run(&mut c3, t0, 12, 0.25, &rest);
        assert!(ds.is_empty(), "a round is under way: {ds:?}");
        let mut c3 = Controller::new(halves.clone(), bounds(1, 100), "crawler", "c3");
        let ds = run(&mut c3, t0, 12, 0.25, &rest[..4]);
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].1.action, Action::Retire);
        assert_eq!(ds[0].1.figures.desired, 2);
    }

    #[test]
    fn the_next_round_waits_for_the_end_of_the_last_and_a_gap_in_reads_puts_a_cell_out_of_touch() {
        let t0 = Instant::now();
        let idle = serving(&[("a", 0.05), ("b", 0.05), ("c", 0.05), ("d", 0.05)]);
        let mut with_draining = idle.clone();
        with_draining.push(("e", CellState::Draining, 0.0, OLD));
        // (case, the reads: from ms, to ms, every ms, rows listing a draining cell?)
        type Reads = &'static [(u64, u64, bool)];
        let cases: [(&str, Reads, u64); 3] = [
            ("regular reads, no round", &[(0, 20_000, false)], 10_000),
            // A round is listed from 8 s to 11 s: the next may start 5 s after the first read
            // without it (11 s).
            (
                "a round under way",
                &[
                    (0, 8_000, false),
                    (8_000, 11_000, true),
                    (11_000, 20_000, false),
                ],
                16_000,
            ),
            // No read from 8 s to 11 s (the round, if any, was missed): out of touch until
            // 5 s of regular reads, the same moment as the siblings that saw the round end.
            (
                "a gap in reads",
                &[(0, 8_000, false), (11_000, 20_000, false)],
                16_000,
            ),
        ];
        for (name, reads, retire_at) in cases {
            let mut c = Controller::new(Params::default(), bounds(1, 10), "crawler", "d");
            let mut view_now = None;
            let mut got = None;
            for k in 0..=80u64 {
                let ms = k * 250;
                let now = t0 + Duration::from_millis(ms);
                if let Some((_, _, draining)) = reads
                    .iter()
                    .find(|(from, to, _)| (*from..*to).contains(&ms))
                {
                    let rows = if *draining { &with_draining } else { &idle };
                    view_now = Some(view(now, c.params(), rows));
                }
                let v = view_now.as_ref().expect("a first read at 0");
                let d = c.tick(now, own(0.05), v);
                if d.action == Action::Retire {
                    got = Some(ms);
                    break;
                }
            }
            assert_eq!(got, Some(retire_at), "{name}");
        }
    }

    #[test]
    fn throttle_comes_before_division_and_lifts_under_the_target() {
        let t0 = Instant::now();
        let p = Params {
            throttle_first: true,
            ..Params::default()
        };
        let mut c = Controller::new(p, bounds(1, 10), "api", "a");
        let hot = serving(&[("a", 0.9), ("b", 0.9)]);
        let ds = run(&mut c, t0, 3, 0.9, &hot);
        let kinds: Vec<(u64, &str)> = ds.iter().map(|(t, d)| (*t, d.action.kind())).collect();
        assert_eq!(kinds, [(0, "throttle"), (1500, "divide")]);
        assert!(c.throttled());
        let calm = serving(&[("a", 0.5), ("b", 0.5)]);
        let ds = run(&mut c, t0 + Duration::from_secs(4), 1, 0.5, &calm);
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].1.action, Action::Unthrottle);
    }

    #[test]
    fn a_stale_view_is_not_acted_on() {
        let t0 = Instant::now();
        let p = Params::default();
        let rows = serving(&[("a", 1.5), ("b", 1.5)]);
        let frozen = view(t0, &p, &rows);
        let mut c = Controller::new(p, bounds(1, 10), "api", "a");
        let mut last = None;
        // The registry answered last 6 s ago and not since (a frozen health checker).
        for k in 0..40u64 {
            let now = t0 + Duration::from_millis(6000 + k * 250);
            let d = c.tick(now, own(1.5), &frozen);
            assert_eq!(d.action, Action::Hold, "at {k}: {d:?}");
            last = Some(d);
        }
        assert_eq!(
            last.map(|d| d.reason),
            Some(Cow::Borrowed("overloaded, but the view is stale"))
        );
    }

    #[test]
    fn fatigue_divides_first_then_asks_for_a_replacement() {
        let t0 = Instant::now();
        let p = Params {
            fatigue: Some(FatigueParams::default()),
            ..Params::default()
        };
        let rows = serving(&[("a", 0.5), ("b", 0.5)]);
        let mut c = Controller::new(p, bounds(1, 10), "crawler", "a");
        let mut got = Vec::new();
        // 1 s heartbeats: 30 s healthy at 0.1 s per page, then 0.3 s per page.
        for s in 0..200u64 {
            let now = t0 + Duration::from_secs(s);
            let processing = if s < 30 { 0.1 } else { 0.3 };
            let d = c.tick(
                now,
                Own {
                    pressure: 0.5,
                    processing: Some(processing),
                    pending: 0,
                },
                &view(now, c.params(), &rows),
            );
            if d.action != Action::Hold {
                got.push((s, d));
            }
        }
        let kinds: Vec<(u64, &str)> = got.iter().map(|(s, d)| (*s, d.action.kind())).collect();
        // Sick from the first slow sample (30 s, recent average 1.6x): divides 10 s later, asks
        // for its replacement 60 s later.
        assert_eq!(kinds, [(40, "divide"), (90, "replace")], "{got:?}");
        assert_eq!(
            got[1].1.action,
            Action::Replace {
                key: "replace:a".into()
            }
        );
        assert!(got[0].1.reason.starts_with("fatigue"));
    }

    #[test]
    fn a_cell_that_recovers_is_not_replaced() {
        let t0 = Instant::now();
        let p = Params {
            fatigue: Some(FatigueParams::default()),
            ..Params::default()
        };
        let rows = serving(&[("a", 0.5), ("b", 0.5)]);
        let mut c = Controller::new(p, bounds(1, 10), "crawler", "a");
        for s in 0..300u64 {
            let now = t0 + Duration::from_secs(s);
            // Slow for 5 s every 30 s: never sick for the 10 s window.
            let processing = if s > 30 && s % 30 < 5 { 0.4 } else { 0.1 };
            let d = c.tick(
                now,
                Own {
                    pressure: 0.5,
                    processing: Some(processing),
                    pending: 0,
                },
                &view(now, c.params(), &rows),
            );
            assert_eq!(d.action, Action::Hold, "at {s} s: {d:?}");
        }
    }

    #[test]
    fn a_cell_that_stops_measuring_is_not_judged_on_its_last_ratio() {
        let t0 = Instant::now();
        let p = Params {
            fatigue: Some(FatigueParams::default()),
            ..Params::default()
        };
        let rows = serving(&[("a", 0.5), ("b", 0.5)]);
        let mut c = Controller::new(p, bounds(1, 10), "crawler", "a");
        for s in 0..300u64 {
            let now = t0 + Duration::from_secs(s);
            // Healthy for 30 s, slow for 5 s, then idle (no work, no measure) for good.
            let processing = match s {
                0..30 => Some(0.1),
                30..35 => Some(0.5),
                _ => None,
            };
            let d = c.tick(
                now,
                Own {
                    pressure: 0.5,
                    processing,
                    pending: 0,
                },
                &view(now, c.params(), &rows),
            );
            assert_eq!(d.action, Action::Hold, "at {s} s: {d:?}");
        }
    }
}
