//! A deterministic simulation of the organism in virtual time, running the very
//! [`Controller`] the cells run, so its properties (no flapping, reaching capacity, never over
//! the maximum or the purse, back to the minimum) are checked over many seeds and up to ten
//! thousand cells in seconds.
//!
//! The organism as a graph of services with failure models (seed 002): a load per role (offered
//! work per second) spread over the role's serving cells; health checkers that receive
//! heartbeats, detect silence, publish the registry and keep each role at its minimum; a
//! factory that starts one cell per key after a boot delay and refuses past a role's maximum or
//! the budget cap. Failures: cells crash or freeze (a frozen cell is still listed until the
//! checkers notice its silence), links lose heartbeats and registry reads with probability `p`,
//! a health checker freezes (and serves its stale registry meanwhile), the factory slows down,
//! and a role's cells die together in a storm.
//!
//! Each cell ticks its controller every heartbeat on the last registry it managed to read
//! (possibly stale), with its own fresh pressure, and acts: a division asks the factory with
//! the decision's keys, a retirement drains the cell for [`Scenario::drain`] and then it is
//! gone. Simplifications, on purpose: a cell serves as soon as it has booted (no joining
//! phase); throttling is recorded, not modelled as shed work; a cell cut off long enough to be
//! declared dead is fenced (gone), as the real registry buries it.
//!
//! Seeded with `ChaCha8Rng`, iterated in fixed orders (no hash-map iteration decides anything),
//! so a seed always replays the same run: a failing seed is pinned as a regression test (neon's
//! `desim` does the same).

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use protocol::control::CellState;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::homeostasis::{grow_key, Action, Bounds, Controller, Own, Params, RoleView, Sibling};

/// Offered work per second over time.
#[derive(Debug, Clone, PartialEq)]
pub enum Load {
    Steady(f64),
    Step {
        before: f64,
        after: f64,
        at: Duration,
    },
    Ramp {
        from: f64,
        to: f64,
        start: Duration,
        end: Duration,
    },
    Spike {
        base: f64,
        peak: f64,
        at: Duration,
        len: Duration,
    },
    Square {
        low: f64,
        high: f64,
        period: Duration,
    },
}

impl Load {
    pub fn at(&self, t: Duration) -> f64 {
        match *self {
            Load::Steady(x) => x,
            Load::Step { before, after, at } => {
                if t < at {
                    before
                } else {
                    after
                }
            }
            Load::Ramp {
                from,
                to,
                start,
                end,
            } => {
                if t <= start {
                    from
                } else if t >= end {
                    to
                } else {
                    let f = (t - start).as_secs_f64() / (end - start).as_secs_f64();
                    from + (to - from) * f
                }
            }
            Load::Spike {
                base,
                peak,
                at,
                len,
            } => {
                if t >= at && t < at + len {
                    peak
                } else {
                    base
                }
            }
            Load::Square { low, high, period } => {
                let half = period.as_millis().max(2) / 2;
                if (t.as_millis() / half) % 2 == 0 {
                    low
                } else {
                    high
                }
            }
        }
    }
}

/// One role of the simulated organism.
#[derive(Debug, Clone)]
pub struct RoleSpec {
    pub name: String,
    pub bounds: Bounds,
    /// Work per second one cell serves at pressure 1.0.
    pub capacity: f64,
    /// Cells at the start (serving, old).
    pub initial: u32,
    /// Money per cell per hour.
    pub cost: f64,
    pub load: Load,
    /// From then on the offered load is zero.
    pub end: Option<Duration>,
}

impl RoleSpec {
    fn offered(&self, t: Duration) -> f64 {
        match self.end {
            Some(end) if t >= end => 0.0,
            _ => self.load.at(t).max(0.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FactorySpec {
    pub boot: Duration,
    /// A boot takes `boot + uniform(0, jitter)`.
    pub jitter: Duration,
    /// Money per hour the organism may spend (all roles).
    pub cap: f64,
    /// How long a request key is remembered (the real factory's `KEY_MEMORY`).
    pub key_memory: Duration,
}

/// A scheduled fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Storm {
    /// `fraction` of the role's serving cells crash at once.
    Kill {
        at: Duration,
        role: usize,
        fraction: f64,
    },
    /// Health checker `index` stops (no heartbeats, no detection, a stale registry) for `len`.
    FreezeChecker {
        at: Duration,
        index: usize,
        len: Duration,
    },
    /// Boots take `boot` from `at` for `len`.
    SlowFactory {
        at: Duration,
        len: Duration,
        boot: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Faults {
    /// Chance per cell per hour of a crash.
    pub crash_per_hour: f64,
    /// Chance per cell per hour of freezing (silent, listed until detected).
    pub freeze_per_hour: f64,
    /// Chance per cell per hour of fatigue (its processing time triples, for good).
    pub sick_per_hour: f64,
    /// Chance a heartbeat or a registry read is lost.
    pub link_loss: f64,
    pub storms: Vec<Storm>,
}

/// The moments the figures are measured from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Marks {
    /// The load changed: decision latency and time to capacity count from here.
    pub step: Option<Duration>,
    /// Direction reversals are counted inside this window.
    pub steady: Option<(Duration, Duration)>,
    /// The load ended: time back to the minimum counts from here.
    pub load_end: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    /// Virtual tick, also the heartbeat interval.
    pub tick: Duration,
    pub duration: Duration,
    pub roles: Vec<RoleSpec>,
    pub params: Params,
    pub factory: FactorySpec,
    pub faults: Faults,
    pub checkers: usize,
    /// Silence after which a checker declares a cell dead.
    pub detect_after: Duration,
    pub drain: Duration,
    /// Each pressure reading is scaled by `1 + uniform(-noise, noise)`.
    pub noise: f64,
    pub marks: Marks,
    /// Timeline resolution.
    pub sample_every: Duration,
}

impl Scenario {
    /// One role, `initial` cells of capacity 1.0 (so the load is in cells' worth at pressure 1),
    /// two health checkers, a 5 s boot, a cap with room for `max` cells.
    pub fn one_role(seed: u64, name: &str, bounds: Bounds, initial: u32, load: Load) -> Self {
        Self {
            seed,
            tick: Duration::from_millis(250),
            duration: Duration::from_secs(300),
            roles: vec![RoleSpec {
                name: name.to_string(),
                bounds,
                capacity: 1.0,
                initial,
                cost: 1.0,
                load,
                end: None,
            }],
            params: Params::default(),
            factory: FactorySpec {
                boot: Duration::from_secs(5),
                jitter: Duration::from_secs(2),
                cap: f64::from(bounds.max) + 0.5,
                key_memory: Duration::from_secs(30),
            },
            faults: Faults::default(),
            checkers: 2,
            detect_after: Duration::from_secs(3),
            drain: Duration::from_secs(3),
            noise: 0.1,
            marks: Marks::default(),
            sample_every: Duration::from_secs(1),
        }
    }
}

impl Scenario {
    /// The benchmark: one role from 16 cells at 9 cells' worth of work to 6,000 (10,000 cells
    /// at the 0.6 target) at 10 s, the load gone at 130 s, one-second ticks (the heartbeat),
    /// 300 s in all.
    pub fn ten_thousand_step(seed: u64) -> Self {
        let secs = Duration::from_secs;
        let mut sc = Self::one_role(
            seed,
            "crawler",
            Bounds {
                min: 10,
                max: 12_000,
            },
            16,
            Load::Step {
                before: 9.0,
                after: 6_000.0,
                at: secs(10),
            },
        );
        sc.tick = secs(1);
        sc.roles[0].end = Some(secs(130));
        sc.duration = secs(300);
        sc.marks = Marks {
            step: Some(secs(10)),
            steady: Some((secs(80), secs(130))),
            load_end: Some(secs(130)),
        };
        sc
    }
}

/// A point of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    /// Cells counted per role (booting, serving, frozen-not-yet-detected; not draining).
    pub cells: Vec<u32>,
    /// True mean pressure per role (offered over the live serving cells' capacity).
    pub pressure: Vec<f64>,
    /// Money per hour being spent.
    pub spend: f64,
}

/// A decision other than hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub t_ms: u64,
    pub cell_id: String,
    pub role: String,
    pub kind: &'static str,
    pub reason: String,
}

/// Figures per role.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RoleFigures {
    pub role: String,
    /// From the step to the first division for load.
    pub first_divide_ms: Option<u64>,
    /// From the step to the first time the true mean pressure is back at or under high water.
    pub capacity_ms: Option<u64>,
    /// Changes of direction (growth then retirement or back) inside the steady window.
    pub reversals: u32,
    /// From the end of the load to the first time the role is at its minimum.
    pub back_to_min_ms: Option<u64>,
    pub peak_cells: u32,
    /// Most cells counted above the maximum, ever (must be 0).
    pub over_max: u32,
    /// Ticks with fewer cells counted than the minimum.
    pub under_min_ticks: u32,
    pub divisions: u32,
    pub retirements: u32,
    pub replacements: u32,
    pub deaths: u32,
    pub cells_at_end: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub roles: Vec<RoleFigures>,
    pub timeline: Vec<Sample>,
    pub events: Vec<Event>,
    pub peak_spend: f64,
    /// Most money per hour ever spent above the cap (must be 0).
    pub over_cap: f64,
    /// Factory answers: started, repeats of a remembered key, refusals.
    pub started: u32,
    pub repeats: u32,
    pub refused: u32,
    /// Cell-ticks that held, by reason.
    pub holds: BTreeMap<&'static str, u64>,
}

impl Report {
    /// One line per role with the headline figures.
    pub fn summary(&self) -> String {
        let ms =
            |x: Option<u64>| x.map_or("-".to_string(), |v| format!("{:.1} s", v as f64 / 1000.0));
        self.roles
            .iter()
            .map(|r| {
                format!(
                    "{}: first divide {}, capacity {}, reversals {}, back to min {}, peak {} cells, over max {}, divisions {}, retirements {}, deaths {}; peak spend {:.1}/h, over cap {:.1}; factory started {} repeats {} refused {}",
                    r.role,
                    ms(r.first_divide_ms),
                    ms(r.capacity_ms),
                    r.reversals,
                    ms(r.back_to_min_ms),
                    r.peak_cells,
                    r.over_max,
                    r.divisions,
                    r.retirements,
                    r.deaths,
                    self.peak_spend,
                    self.over_cap,
                    self.started,
                    self.repeats,
                    self.refused
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Life {
    Booting {
        until: Duration,
    },
    Serving,
    Draining {
        until: Duration,
    },
    /// Crashed or frozen: silent, still on the factory's books until a checker declares it dead.
    Silent,
    Gone,
}

struct Cell {
    num: u64,
    id: String,
    role: usize,
    life: Life,
    ctrl: Option<Controller>,
    view: Option<Rc<RoleView>>,
    sick: bool,
}

#[derive(Debug, Clone)]
struct Row {
    id: String,
    role: usize,
    state: CellState,
    pressure: f64,
    first_seen: Duration,
    last_seen: Duration,
}

struct Checker {
    frozen_until: Option<Duration>,
    rows: BTreeMap<u64, Row>,
    /// The registry as last published, per role.
    published: Vec<Rc<RoleView>>,
}

enum Answer {
    Started,
    /// The key is remembered; `booting` while its cell has not joined yet (otherwise it is
    /// gone or already counted: nothing more will come of the key).
    Held {
        booting: bool,
    },
    Refused,
}

struct Factory {
    spec: FactorySpec,
    boot: Duration,
    keys: HashMap<String, (Duration, u64)>,
    /// Machines powered on: cell number -> (role, cost).
    books: BTreeMap<u64, (usize, f64)>,
    /// Per role, machines on the books that are not draining.
    counted: Vec<u32>,
    spend: f64,
}

struct World<'a> {
    sc: &'a Scenario,
    t0: Instant,
    now: Duration,
    rng: ChaCha8Rng,
    cells: Vec<Cell>,
    next_num: u64,
    checkers: Vec<Checker>,
    factory: Factory,
    /// The leader's minimum-keeping requests: (role, slot) -> when asked.
    reconcile: BTreeMap<(usize, u32), Duration>,
    reconcile_attempts: HashMap<(usize, u32), u32>,
    report: Report,
}

/// Run `sc` to the end and report.
pub fn run(sc: &Scenario) -> Report {
    let mut w = World::new(sc);
    let ticks = (sc.duration.as_millis() / sc.tick.as_millis().max(1)) as u64;
    let every = (sc.sample_every.as_millis() / sc.tick.as_millis().max(1)).max(1) as u64;
    for k in 1..=ticks {
        w.now = sc.tick * k as u32;
        w.step();
        if k % every == 0 {
            w.sample();
        }
    }
    w.finish()
}

impl<'a> World<'a> {
    fn new(sc: &'a Scenario) -> Self {
        let roles = sc.roles.len();
        let t0 = Instant::now();
        let empty = Rc::new(RoleView::new(
            t0,
            &sc.params,
            std::iter::empty::<Sibling<'_>>(),
        ));
        let mut w = Self {
            sc,
            t0,
            now: Duration::ZERO,
            rng: ChaCha8Rng::seed_from_u64(sc.seed),
            cells: Vec::new(),
            next_num: 0,
            checkers: (0..sc.checkers.max(1))
                .map(|_| Checker {
                    frozen_until: None,
                    rows: BTreeMap::new(),
                    published: vec![empty.clone(); roles],
                })
                .collect(),
            factory: Factory {
                spec: sc.factory.clone(),
                boot: sc.factory.boot,
                keys: HashMap::new(),
                books: BTreeMap::new(),
                counted: vec![0; roles],
                spend: 0.0,
            },
            reconcile: BTreeMap::new(),
            reconcile_attempts: HashMap::new(),
            report: Report {
                seed: sc.seed,
                roles: sc
                    .roles
                    .iter()
                    .map(|r| RoleFigures {
                        role: r.name.clone(),
                        ..RoleFigures::default()
                    })
                    .collect(),
                ..Report::default()
            },
        };
        // The initial cells: serving for an hour already, listed by every checker.
        let old = Duration::from_secs(3600);
        for (role, spec) in sc.roles.iter().enumerate() {
            for _ in 0..spec.initial {
                let num = w.power_on(role);
                let c = w.cells.last_mut().expect("just powered on");
                c.life = Life::Serving;
                c.ctrl = Some(Controller::new(
                    sc.params.clone(),
                    spec.bounds,
                    spec.name.clone(),
                    c.id.clone(),
                ));
                for ch in &mut w.checkers {
                    ch.rows.insert(
                        num,
                        Row {
                            id: c.id.clone(),
                            role,
                            state: CellState::Serving,
                            pressure: 0.0,
                            first_seen: Duration::ZERO,
                            last_seen: Duration::ZERO,
                        },
                    );
                }
            }
        }
        // Ages count from an hour before the start.
        for ch in &mut w.checkers {
            for r in ch.rows.values_mut() {
                r.first_seen = Duration::ZERO;
            }
        }
        w.publish_all(old);
        w
    }

    fn instant(&self) -> Instant {
        self.t0 + self.now
    }

    /// Put a new machine on the books, booting.
    fn power_on(&mut self, role: usize) -> u64 {
        let num = self.next_num;
        self.next_num += 1;
        let spec = &self.sc.roles[role];
        let jitter = self.sc.factory.jitter.as_millis() as u64;
        let extra = if jitter > 0 {
            self.rng.random_range(0..=jitter)
        } else {
            0
        };
        self.cells.push(Cell {
            num,
            id: format!("{}-{num:06}", spec.name),
            role,
            life: Life::Booting {
                until: self.now + self.factory.boot + Duration::from_millis(extra),
            },
            ctrl: None,
            view: None,
            sick: false,
        });
        self.factory.books.insert(num, (role, spec.cost));
        self.factory.counted[role] += 1;
        self.factory.spend += spec.cost;
        num
    }

    fn request(&mut self, key: &str, role: usize) -> Answer {
        if let Some((at, num)) = self.factory.keys.get(key) {
            if self.now.saturating_sub(*at) < self.factory.spec.key_memory {
                self.report.repeats += 1;
                let num = *num;
                let booting = self
                    .cells
                    .binary_search_by_key(&num, |c| c.num)
                    .is_ok_and(|i| matches!(self.cells[i].life, Life::Booting { .. }));
                return Answer::Held { booting };
            }
        }
        let spec = &self.sc.roles[role];
        if self.factory.counted[role] >= spec.bounds.max
            || self.factory.spend + spec.cost > self.factory.spec.cap + 1e-9
        {
            self.report.refused += 1;
            return Answer::Refused;
        }
        self.report.started += 1;
        let num = self.power_on(role);
        self.factory.keys.insert(key.to_string(), (self.now, num));
        Answer::Started
    }

    /// Take a machine off the books; `counted` unless it was draining (already uncounted).
    fn power_off(&mut self, num: u64, counted: bool) {
        if let Some((role, cost)) = self.factory.books.remove(&num) {
            self.factory.spend -= cost;
            if counted {
                self.factory.counted[role] -= 1;
            }
        }
    }

    fn step(&mut self) {
        let now = self.now;
        self.storms();
        // Thawed checkers restart every detector's clock (a slow observer blames itself).
        for ch in &mut self.checkers {
            if ch.frozen_until.is_some_and(|u| now >= u) {
                ch.frozen_until = None;
                for r in ch.rows.values_mut() {
                    r.last_seen = now;
                }
            }
        }
        self.lives();
        let offered: Vec<f64> = self.sc.roles.iter().map(|r| r.offered(now)).collect();
        let live = self.live_serving();
        let pressure: Vec<f64> = (0..self.sc.roles.len())
            .map(|r| true_pressure(offered[r], live[r], self.sc.roles[r].capacity))
            .collect();
        self.heartbeats(&pressure);
        self.detect();
        self.publish_all(Duration::from_secs(3600));
        self.decide(&pressure);
        self.reconcile();
        self.cells.retain(|c| c.life != Life::Gone);
        self.factory
            .keys
            .retain(|_, (at, _)| now.saturating_sub(*at) < self.factory.spec.key_memory);
        self.measure(&pressure);
    }

    fn storms(&mut self) {
        let (now, tick) = (self.now, self.sc.tick);
        for storm in &self.sc.faults.storms {
            match *storm {
                Storm::Kill { at, role, fraction } if at <= now && now < at + tick => {
                    let serving: Vec<usize> = (0..self.cells.len())
                        .filter(|&i| {
                            self.cells[i].role == role && self.cells[i].life == Life::Serving
                        })
                        .collect();
                    let kill = (serving.len() as f64 * fraction).round() as usize;
                    for &i in serving.iter().take(kill) {
                        self.cells[i].life = Life::Silent;
                    }
                    self.report.roles[role].deaths += kill as u32;
                }
                Storm::FreezeChecker { at, index, len } if at <= now && now < at + tick => {
                    if let Some(ch) = self.checkers.get_mut(index) {
                        ch.frozen_until = Some(at + len);
                    }
                }
                Storm::SlowFactory { at, len, boot } => {
                    if at <= now && now < at + tick {
                        self.factory.boot = boot;
                    } else if at + len <= now && now < at + len + tick {
                        self.factory.boot = self.sc.factory.boot;
                    }
                }
                _ => {}
            }
        }
    }

    /// Boots, drains, random crashes, freezes and fatigue.
    fn lives(&mut self) {
        let now = self.now;
        let hours = self.sc.tick.as_secs_f64() / 3600.0;
        let f = &self.sc.faults;
        let (crash, freeze, sick) = (
            f.crash_per_hour * hours,
            f.freeze_per_hour * hours,
            f.sick_per_hour * hours,
        );
        let mut off = Vec::new();
        for c in &mut self.cells {
            match c.life {
                Life::Booting { until } if now >= until => {
                    c.life = Life::Serving;
                    let spec = &self.sc.roles[c.role];
                    c.ctrl = Some(Controller::new(
                        self.sc.params.clone(),
                        spec.bounds,
                        spec.name.clone(),
                        c.id.clone(),
                    ));
                }
                Life::Draining { until } if now >= until => {
                    c.life = Life::Gone;
                    off.push(c.num);
                }
                Life::Serving => {
                    // A crash and a freeze look the same to the organism: silence, until a
                    // checker declares it dead (a thawed cell is fenced, so it never returns).
                    let silent = crash + freeze;
                    if silent > 0.0 && self.rng.random_bool(silent.min(1.0)) {
                        c.life = Life::Silent;
                        self.report.roles[c.role].deaths += 1;
                    } else if sick > 0.0 && !c.sick && self.rng.random_bool(sick.min(1.0)) {
                        c.sick = true;
                    }
                }
                _ => {}
            }
        }
        for num in off {
            // The retired heartbeat removes the row at once.
            for ch in &mut self.checkers {
                ch.rows.remove(&num);
            }
            self.power_off(num, false);
        }
    }

    fn live_serving(&self) -> Vec<u32> {
        let mut live = vec![0; self.sc.roles.len()];
        for c in &self.cells {
            if c.life == Life::Serving {
                live[c.role] += 1;
            }
        }
        live
    }

    fn heartbeats(&mut self, pressure: &[f64]) {
        let now = self.now;
        let loss = self.sc.faults.link_loss;
        let noise = self.sc.noise;
        for c in &self.cells {
            let (state, p) = match c.life {
                Life::Serving => (CellState::Serving, pressure[c.role]),
                Life::Draining { .. } => (CellState::Draining, 0.0),
                Life::Booting { until } if until <= now => continue,
                _ => continue,
            };
            for ch in &mut self.checkers {
                if ch.frozen_until.is_some() || (loss > 0.0 && self.rng.random_bool(loss)) {
                    continue;
                }
                let p = p * (1.0 + noise * self.rng.random_range(-1.0..=1.0));
                let row = ch.rows.entry(c.num).or_insert_with(|| Row {
                    id: c.id.clone(),
                    role: c.role,
                    state,
                    pressure: p,
                    first_seen: now,
                    last_seen: now,
                });
                row.state = state;
                row.pressure = p;
                row.last_seen = now;
            }
        }
    }

    /// Every running checker declares silent cells dead; the factory powers them off (a cell
    /// that was only cut off is fenced: gone as well).
    fn detect(&mut self) {
        let now = self.now;
        let after = self.sc.detect_after;
        let mut dead = Vec::new();
        for ch in &mut self.checkers {
            if ch.frozen_until.is_some() {
                continue;
            }
            ch.rows.retain(|num, r| {
                let silent = now.saturating_sub(r.last_seen) > after;
                if silent {
                    dead.push(*num);
                }
                !silent
            });
        }
        // A machine that went silent before any checker heard of it never joined: the factory
        // takes it back once a detection time has passed (it never will be declared dead).
        for c in &self.cells {
            if c.life == Life::Silent
                && !self.checkers.iter().any(|ch| ch.rows.contains_key(&c.num))
            {
                dead.push(c.num);
            }
        }
        dead.sort_unstable();
        dead.dedup();
        for num in dead {
            let mut counted = true;
            // Cells are kept in the order of their numbers.
            let found = self.cells.binary_search_by_key(&num, |c| c.num).ok();
            if let Some(c) = found.map(|i| &mut self.cells[i]) {
                counted = !matches!(c.life, Life::Draining { .. });
                if c.life != Life::Gone {
                    if c.life == Life::Serving {
                        self.report.roles[c.role].deaths += 1;
                    }
                    c.life = Life::Gone;
                }
            }
            for ch in &mut self.checkers {
                ch.rows.remove(&num);
            }
            self.power_off(num, counted);
        }
    }

    /// Each running checker publishes its registry, per role, aged from `initial_age` for the
    /// initial cells (listed at time zero but an hour old).
    fn publish_all(&mut self, initial_age: Duration) {
        let at = self.instant();
        let now = self.now;
        let roles = self.sc.roles.len();
        for ch in &mut self.checkers {
            if ch.frozen_until.is_some() {
                continue;
            }
            let mut by_role: Vec<Vec<Sibling<'_>>> = vec![Vec::new(); roles];
            for r in ch.rows.values() {
                let age = if r.first_seen.is_zero() {
                    initial_age + now
                } else {
                    now - r.first_seen
                };
                by_role[r.role].push(Sibling {
                    cell_id: &r.id,
                    state: r.state,
                    pressure: r.pressure,
                    age,
                });
            }
            ch.published = by_role
                .into_iter()
                .map(|rows| Rc::new(RoleView::new(at, &self.sc.params, rows)))
                .collect();
        }
    }

    fn decide(&mut self, pressure: &[f64]) {
        let now = self.now;
        let at = self.instant();
        let loss = self.sc.faults.link_loss;
        let noise = self.sc.noise;
        let fatigue = self.sc.params.fatigue.is_some();
        let mut asks: Vec<(usize, usize, String)> = Vec::new();
        let mut acted: Vec<(usize, Action, String)> = Vec::new();
        for i in 0..self.cells.len() {
            if self.cells[i].life != Life::Serving {
                continue;
            }
            if !(loss > 0.0 && self.rng.random_bool(loss)) {
                let k = self.rng.random_range(0..self.checkers.len());
                let role = self.cells[i].role;
                self.cells[i].view = Some(self.checkers[k].published[role].clone());
            }
            let c = &mut self.cells[i];
            let Some(view) = c.view.clone() else {
                continue;
            };
            let own = Own {
                pressure: pressure[c.role] * (1.0 + noise * self.rng.random_range(-1.0..=1.0)),
                processing: fatigue.then(|| {
                    let base = if c.sick { 0.3 } else { 0.1 };
                    base * (1.0 + 0.05 * self.rng.random_range(-1.0..=1.0))
                }),
                pending: 0,
            };
            let Some(ctrl) = c.ctrl.as_mut() else {
                continue;
            };
            let d = ctrl.tick(at, own, &view);
            if d.action == Action::Hold {
                if let std::borrow::Cow::Borrowed(why) = d.reason {
                    *self.report.holds.entry(why).or_default() += 1;
                }
                continue;
            }
            if let Action::Divide { keys, .. } = &d.action {
                for key in keys {
                    asks.push((i, c.role, key.clone()));
                }
            }
            if let Action::Replace { key } = &d.action {
                asks.push((i, c.role, key.clone()));
            }
            acted.push((i, d.action.clone(), d.reason.into_owned()));
        }
        for (i, role, key) in asks {
            if let Answer::Held { booting: false } = self.request(&key, role) {
                if let Some(ctrl) = self.cells[i].ctrl.as_mut() {
                    ctrl.spent(&key);
                }
            }
        }
        for (i, action, reason) in acted {
            let c = &mut self.cells[i];
            let figures = &mut self.report.roles[c.role];
            match &action {
                Action::Divide { keys, .. } if !keys.iter().any(|k| k.starts_with("fatigue:")) => {
                    figures.divisions += 1;
                }
                Action::Retire => figures.retirements += 1,
                Action::Replace { .. } => figures.replacements += 1,
                _ => {}
            }
            if matches!(action, Action::Retire | Action::Replace { .. }) {
                c.life = Life::Draining {
                    until: now + self.sc.drain,
                };
                if self.factory.books.contains_key(&c.num) {
                    self.factory.counted[c.role] -= 1;
                }
            }
            self.report.events.push(Event {
                t_ms: now.as_millis() as u64,
                cell_id: c.id.clone(),
                role: self.sc.roles[c.role].name.clone(),
                kind: action.kind(),
                reason,
            });
        }
    }

    /// The leader (the first running checker) keeps every role at its minimum, with the same
    /// slot keys as the cells (`grow:<role>:<slot>`).
    fn reconcile(&mut self) {
        let now = self.now;
        let Some(leader) = self.checkers.iter().position(|c| c.frozen_until.is_none()) else {
            return;
        };
        // A request whose cell has not joined by a boot and a detection time is asked again
        // (the health checkers' `request_timeout`).
        let timeout = self.factory.boot + self.sc.factory.jitter + self.sc.detect_after;
        for role in 0..self.sc.roles.len() {
            let counted = self.checkers[leader].published[role].counted();
            self.reconcile.retain(|(r, slot), at| {
                *r != role || (*slot > counted && now.saturating_sub(*at) < timeout)
            });
            // The slots above the cells counted, up to the minimum, skipping those asked.
            let min = self.sc.roles[role].bounds.min;
            for slot in counted + 1..=min {
                if self.reconcile.contains_key(&(role, slot)) {
                    continue;
                }
                let attempt = self
                    .reconcile_attempts
                    .get(&(role, slot))
                    .copied()
                    .unwrap_or(1);
                let key = grow_key(&self.sc.roles[role].name, slot, attempt);
                self.reconcile.insert((role, slot), now);
                if let Answer::Held { booting: false } = self.request(&key, role) {
                    self.reconcile_attempts.insert((role, slot), attempt + 1);
                    self.reconcile.remove(&(role, slot));
                }
            }
        }
    }

    fn counted(&self) -> Vec<u32> {
        let mut n = vec![0; self.sc.roles.len()];
        for c in &self.cells {
            if matches!(c.life, Life::Booting { .. } | Life::Serving | Life::Silent) {
                n[c.role] += 1;
            }
        }
        n
    }

    fn measure(&mut self, pressure: &[f64]) {
        let now = self.now;
        let counted = self.counted();
        let marks = &self.sc.marks;
        for (r, spec) in self.sc.roles.iter().enumerate() {
            let f = &mut self.report.roles[r];
            f.peak_cells = f.peak_cells.max(counted[r]);
            f.over_max = f.over_max.max(counted[r].saturating_sub(spec.bounds.max));
            if counted[r] < spec.bounds.min {
                f.under_min_ticks += 1;
            }
            if let Some(step) = marks.step {
                if now >= step && f.capacity_ms.is_none() && pressure[r] <= self.sc.params.high {
                    f.capacity_ms = Some((now - step).as_millis() as u64);
                }
            }
            if let Some(end) = marks.load_end {
                if now >= end && f.back_to_min_ms.is_none() && counted[r] <= spec.bounds.min {
                    f.back_to_min_ms = Some((now - end).as_millis() as u64);
                }
            }
        }
        self.report.peak_spend = self.report.peak_spend.max(self.factory.spend);
        self.report.over_cap = self
            .report
            .over_cap
            .max(self.factory.spend - self.sc.factory.cap)
            .max(0.0);
    }

    fn sample(&mut self) {
        let now = self.now;
        let offered: Vec<f64> = self.sc.roles.iter().map(|r| r.offered(now)).collect();
        let live = self.live_serving();
        let pressure = (0..self.sc.roles.len())
            .map(|r| true_pressure(offered[r], live[r], self.sc.roles[r].capacity))
            .collect();
        let cells = self.counted();
        self.report.timeline.push(Sample {
            t_ms: now.as_millis() as u64,
            cells,
            pressure,
            spend: self.factory.spend,
        });
    }

    fn finish(mut self) -> Report {
        let marks = self.sc.marks.clone();
        let counted = self.counted();
        for (r, spec) in self.sc.roles.iter().enumerate() {
            let role = spec.name.as_str();
            let f = &mut self.report.roles[r];
            f.cells_at_end = counted[r];
            let growth = |e: &Event| e.kind == "divide" && !e.reason.starts_with("fatigue");
            if let Some(step) = marks.step {
                let step = step.as_millis() as u64;
                f.first_divide_ms = self
                    .report
                    .events
                    .iter()
                    .find(|e| e.role == role && e.t_ms >= step && growth(e))
                    .map(|e| e.t_ms - step);
            }
            if let Some((from, to)) = marks.steady {
                let (from, to) = (from.as_millis() as u64, to.as_millis() as u64);
                let mut last: Option<bool> = None;
                for e in self
                    .report
                    .events
                    .iter()
                    .filter(|e| e.role == role && e.t_ms >= from && e.t_ms < to)
                {
                    let up = match e.kind {
                        _ if growth(e) => true,
                        "retire" => false,
                        _ => continue,
                    };
                    if last.is_some_and(|l| l != up) {
                        f.reversals += 1;
                    }
                    last = Some(up);
                }
            }
        }
        self.report
    }
}

fn true_pressure(offered: f64, live: u32, capacity: f64) -> f64 {
    if offered <= 0.0 {
        0.0
    } else if live == 0 {
        10.0
    } else {
        (offered / (f64::from(live) * capacity)).min(10.0)
    }
}
