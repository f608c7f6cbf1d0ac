//! Returning the organism to its size: after a fault storm (or a burst of load that has passed),
//! a role may have more cells than its minimum and its load need. One health checker, the
//! leader (the live health checker with the smallest cell id, so that two checkers never both
//! retire a cell for the same surplus), asks the youngest surplus cell to drain and retire, one
//! at a time per role.
//!
//! A role is surplus when it has more serving cells than its minimum and its load would fit in
//! one cell fewer below the low-water mark: `sum(pressure) / (n - 1) < LOW_WATER`. The tendency
//! must hold for [`CONFIRM`] (a dip is not a trend), and a role retires at most one cell per
//! [`COOLDOWN`], so the count walks down and never flaps. The answer travels in the cell's next
//! heartbeat reply ([`protocol::control::Directive::Retire`]); a retiring cell drains (its
//! in-flight work finishes), says so, and leaves, and since draining cells do not count toward
//! the minimum while the role stays at or above it, no replacement is asked for.
//!
//! Pure and time-injected; the homeostasis controller will later own the thresholds.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use protocol::control::CellState;

/// Below this pressure per cell (with one cell fewer) a role has a cell to spare.
pub const LOW_WATER: f64 = 0.5;
/// How long the surplus must hold before a cell is retired.
pub const CONFIRM: Duration = Duration::from_secs(3);
/// At most one retirement per role this often.
pub const COOLDOWN: Duration = Duration::from_secs(5);
/// A retirement asked of a cell that is still serving after this long is asked again.
pub const ASK_AGAIN: Duration = Duration::from_secs(30);

/// One live cell as the controller needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member<'a> {
    pub cell_id: &'a str,
    pub role: &'a str,
    pub state: CellState,
    pub pressure: f64,
    pub first_seen: Instant,
}

/// A decision: retire this cell, for this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retirement {
    pub cell_id: String,
    pub role: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Surplus {
    minimums: BTreeMap<String, u32>,
    /// Since when each role has been surplus.
    since: HashMap<String, Instant>,
    last_retired: HashMap<String, Instant>,
    /// Retirements asked for and not yet seen draining, by cell.
    asked: HashMap<String, (Instant, String)>,
}

impl Surplus {
    pub fn new(minimums: BTreeMap<String, u32>) -> Self {
        Self {
            minimums,
            since: HashMap::new(),
            last_retired: HashMap::new(),
            asked: HashMap::new(),
        }
    }

    /// Look at the live cells at `now`; returns the retirements decided now. Only the leader
    /// decides; a checker that is not (or no longer) the leader forgets what it had asked.
    pub fn plan<'a>(
        &mut self,
        now: Instant,
        leader: bool,
        members: impl IntoIterator<Item = Member<'a>>,
    ) -> Vec<Retirement> {
        if !leader {
            self.since.clear();
            self.asked.clear();
            return Vec::new();
        }
        let mut by_role: BTreeMap<&str, Vec<Member<'a>>> = BTreeMap::new();
        for m in members {
            by_role.entry(m.role).or_default().push(m);
        }
        // What was asked is done once the cell drains (or is gone); asked again if ignored.
        self.asked.retain(|id, (at, _)| {
            let serving = by_role
                .values()
                .flatten()
                .any(|m| m.cell_id == id && counts(m.state));
            serving && now.saturating_duration_since(*at) < ASK_AGAIN
        });
        let mut out = Vec::new();
        for (role, min) in &self.minimums {
            let cells: Vec<&Member<'a>> = by_role
                .get(role.as_str())
                .map(|v| {
                    v.iter()
                        .filter(|m| counts(m.state) && !self.asked.contains_key(m.cell_id))
                        .collect()
                })
                .unwrap_or_default();
            let n = cells.len() as u32;
            let load: f64 = cells.iter().map(|m| m.pressure.max(0.0)).sum();
            let surplus = n > *min && n >= 2 && load / f64::from(n - 1) < LOW_WATER;
            if !surplus {
                self.since.remove(role);
                continue;
            }
            let since = *self.since.entry(role.clone()).or_insert(now);
            let cooled = self
                .last_retired
                .get(role)
                .is_none_or(|t| now.saturating_duration_since(*t) >= COOLDOWN);
            if now.saturating_duration_since(since) < CONFIRM || !cooled {
                continue;
            }
            // Youngest first: the newest cell has the least warm state (caches, connections).
            let Some(youngest) = cells.iter().max_by(|a, b| {
                a.first_seen
                    .cmp(&b.first_seen)
                    .then(a.cell_id.cmp(b.cell_id))
            }) else {
                continue;
            };
            let reason = format!(
                "{role} has {n} cells, above its minimum of {min}, and its load ({load:.2}) fits \
                 in {} below the low-water mark {LOW_WATER} for {} s: retiring the youngest",
                n - 1,
                CONFIRM.as_secs()
            );
            self.asked
                .insert(youngest.cell_id.to_string(), (now, reason.clone()));
            self.last_retired.insert(role.clone(), now);
            self.since.remove(role);
            out.push(Retirement {
                cell_id: youngest.cell_id.to_string(),
                role: role.clone(),
                reason,
            });
        }
        out
    }

    /// Whether a retirement was asked of `cell_id`, and why (for its heartbeat reply).
    pub fn asked_of(&self, cell_id: &str) -> Option<&str> {
        self.asked.get(cell_id).map(|(_, r)| r.as_str())
    }
}

fn counts(state: CellState) -> bool {
    crate::registry::counts_toward_minimum(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mins(m: &[(&str, u32)]) -> BTreeMap<String, u32> {
        m.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    struct Cells(Vec<(String, String, CellState, f64, Instant)>);

    impl Cells {
        fn members(&self) -> Vec<Member<'_>> {
            self.0
                .iter()
                .map(|(id, role, state, p, t)| Member {
                    cell_id: id,
                    role,
                    state: *state,
                    pressure: *p,
                    first_seen: *t,
                })
                .collect()
        }
    }

    fn cells(t0: Instant, spec: &[(&str, &str, f64, u64)]) -> Cells {
        Cells(
            spec.iter()
                .map(|(id, role, p, born_ms)| {
                    (
                        id.to_string(),
                        role.to_string(),
                        CellState::Serving,
                        *p,
                        t0 + Duration::from_millis(*born_ms),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn the_youngest_surplus_cell_retires_after_the_confirmation_window_one_at_a_time() {
        let t0 = Instant::now();
        let mut s = Surplus::new(mins(&[("api", 2)]));
        let c = cells(
            t0,
            &[
                ("api-a", "api", 0.1, 0),
                ("api-b", "api", 0.1, 10),
                ("api-c", "api", 0.1, 20),
                ("api-d", "api", 0.1, 30),
            ],
        );
        assert!(
            s.plan(t0, true, c.members()).is_empty(),
            "not yet confirmed"
        );
        let at = t0 + CONFIRM;
        let got = s.plan(at, true, c.members());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].cell_id, "api-d", "youngest first");
        assert_eq!(
            s.asked_of("api-d").map(|r| r.contains("minimum of 2")),
            Some(true)
        );
        // Cooldown: nothing more until it has passed, even though api-c is surplus too.
        assert!(s.plan(at + CONFIRM, true, c.members()).is_empty());
        let later = at + COOLDOWN + CONFIRM;
        let mut c2 = c;
        c2.0.retain(|x| x.0 != "api-d");
        s.plan(at + COOLDOWN, true, c2.members());
        let got = s.plan(later, true, c2.members());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].cell_id, "api-c");
    }

    #[test]
    fn never_below_the_minimum_nor_while_the_load_needs_the_cells() {
        let t0 = Instant::now();
        let mut s = Surplus::new(mins(&[("api", 2), ("crawler", 1)]));
        // At the minimum: nothing.
        let at_min = cells(t0, &[("a", "api", 0.0, 0), ("b", "api", 0.0, 1)]);
        // Busy: three crawlers at 0.6 would be 0.9 each in two: keep them.
        let busy = cells(
            t0,
            &[
                ("c1", "crawler", 0.6, 0),
                ("c2", "crawler", 0.6, 1),
                ("c3", "crawler", 0.6, 2),
            ],
        );
        for k in 0..100u64 {
            let now = t0 + Duration::from_millis(k * 200);
            assert!(s.plan(now, true, at_min.members()).is_empty());
            assert!(s.plan(now, true, busy.members()).is_empty());
        }
    }

    #[test]
    fn a_dip_is_not_a_trend_and_only_the_leader_acts() {
        let t0 = Instant::now();
        let mut s = Surplus::new(mins(&[("crawler", 1)]));
        let idle = cells(t0, &[("c1", "crawler", 0.0, 0), ("c2", "crawler", 0.0, 1)]);
        let busy = cells(t0, &[("c1", "crawler", 0.9, 0), ("c2", "crawler", 0.9, 1)]);
        // Idle, busy, idle, busy... every second: never three seconds of surplus.
        for k in 0..20u64 {
            let now = t0 + Duration::from_secs(k);
            let c = if k % 2 == 0 { &idle } else { &busy };
            assert!(s.plan(now, true, c.members()).is_empty(), "at {k} s");
        }
        let mut follower = Surplus::new(mins(&[("crawler", 1)]));
        for k in 0..20u64 {
            let now = t0 + Duration::from_secs(k);
            assert!(follower.plan(now, false, idle.members()).is_empty());
        }
    }

    #[test]
    fn draining_cells_do_not_count_and_an_ignored_request_is_asked_again() {
        let t0 = Instant::now();
        let mut s = Surplus::new(mins(&[("api", 1)]));
        let mut c = cells(t0, &[("a", "api", 0.0, 0), ("b", "api", 0.0, 5)]);
        s.plan(t0, true, c.members());
        let got = s.plan(t0 + CONFIRM, true, c.members());
        assert_eq!(got[0].cell_id, "b");
        // b drains: the role is at its minimum; nothing else is retired.
        c.0[1].2 = CellState::Draining;
        for k in 0..50u64 {
            let now = t0 + CONFIRM + Duration::from_millis(k * 500);
            assert!(s.plan(now, true, c.members()).is_empty());
        }
        // A cell that ignored the request (still serving) is asked again later.
        c.0[1].2 = CellState::Serving;
        let t = t0 + CONFIRM + ASK_AGAIN;
        s.plan(t, true, c.members());
        assert_eq!(s.plan(t + CONFIRM, true, c.members()).len(), 1);
    }
}
