//! Keeping every role at its minimum: compare the cells that count (live, not draining) plus the
//! replacements already asked for with the minimum, and ask the factory for the difference.
//!
//! Several health checkers run side by side and must not multiply replacements, so a request's
//! key is a function of what they all see, and the factory starts one cell per key:
//! - `replace:<dead cell id>` when a death can be named. Deaths of the role seen in the last
//!   [`DEATH_KEEP`] and not yet replaced are named in cell-id order, so two checkers that saw
//!   the same deaths (in any order) name the same ones.
//! - `grow:<role>:<n>` for the rest, `n` the slot being filled: with `c` cells counted and `o`
//!   requests outstanding, the slots `c+o+1 ..= min`.
//! - Attempt `k > 1` of a key appends `:k`. A key is used up when its cell appeared (its
//!   heartbeat names the key or the dead cell as `parent`, or it is the cell the factory said it
//!   started), when the factory answers with a cell this checker already saw, or when its cell
//!   has not appeared [`ReconcileParams::request_timeout`] after the factory answered; the next
//!   request for the same death or slot then uses the next attempt. Checkers that went through
//!   the same history use the same attempts; one that restarted may ask an old key once and
//!   learn from the answer (or the timeout) that it is used up.
//!
//! An outstanding request counts toward its role until it is used up. While no factory answers,
//! requests are sent at most once per back-off step (doubling up to [`MAX_BACKOFF`]); a request
//! that reached no factory is not used up and is asked again, same key, at the next step.
//!
//! [`Reconciler`] is pure and time-injected; the async loop that sends is in the crate root.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use protocol::control::{ReplaceReply, ReplaceRequest};

/// How long a death stays available to name in a `replace:` key.
pub const DEATH_KEEP: Duration = Duration::from_secs(60);
/// First back-off step after no factory answered.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest back-off step.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileParams {
    pub minimums: BTreeMap<String, u32>,
    pub request_timeout: Duration,
    /// No request before this long after the reconciler was made.
    pub startup_grace: Duration,
}

/// What the registry shows, as far as reconciling needs.
pub trait View {
    /// Cells of `role` that count toward its minimum.
    fn counted(&self, role: &str) -> u32;
    /// Whether this checker has seen the cell (live, or gone recently).
    fn seen(&self, cell_id: &str) -> bool;
}

impl View for crate::registry::Registry {
    fn counted(&self, role: &str) -> u32 {
        self.counted_in(role)
    }
    fn seen(&self, cell_id: &str) -> bool {
        self.is_live(cell_id) || self.is_gone(cell_id)
    }
}

#[derive(Debug, Clone)]
struct Death {
    role: String,
    at: Instant,
    reason: String,
}

#[derive(Debug, Clone)]
struct Outstanding {
    key: String,
    role: String,
    /// The dead cell, for a `replace:` request.
    dead: Option<String>,
    /// When the factory answered (the timeout runs from then); `None` while in flight.
    answered_at: Option<Instant>,
    /// The cell the factory started for the key.
    cell_id: Option<String>,
}

/// What an answer from the factory meant.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    pub request: ReplaceRequest,
    pub reply: ReplaceReply,
    /// True on the first answer for this key (the moment to record a `replaced` event).
    pub first: bool,
}

pub struct Reconciler {
    params: ReconcileParams,
    born: Instant,
    /// Unreplaced deaths, by cell id (ordered: names are chosen smallest first).
    deaths: BTreeMap<String, Death>,
    /// Outstanding requests by base key (without the attempt suffix).
    outstanding: BTreeMap<String, Outstanding>,
    /// The attempt the next request for a base key uses (absent: 1).
    next_attempt: HashMap<String, u32>,
    /// While set, requests wait for this moment, and then only one goes (a probe).
    backoff: Option<(Instant, Duration)>,
    requested_total: u64,
}

impl Reconciler {
    pub fn new(params: ReconcileParams, now: Instant) -> Self {
        Self {
            params,
            born: now,
            deaths: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            next_attempt: HashMap::new(),
            backoff: None,
            requested_total: 0,
        }
    }

    /// A cell of `role` died. Only roles with a minimum are tracked.
    pub fn cell_died(&mut self, cell_id: &str, role: &str, reason: &str, now: Instant) {
        if self.params.minimums.contains_key(role) {
            self.deaths.insert(
                cell_id.to_string(),
                Death {
                    role: role.to_string(),
                    at: now,
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// A cell heartbeated for the first time (or came back). It is no longer a death to
    /// replace, and it fulfils any request naming it, its parent key, or its parent cell.
    pub fn cell_appeared(&mut self, cell_id: &str, parent: Option<&str>) {
        self.deaths.remove(cell_id);
        if let Some(parent) = parent {
            if self.deaths.remove(parent).is_some() {
                self.next_attempt.remove(&replace_base(parent));
            }
        }
        let fulfilled: Vec<String> = self
            .outstanding
            .iter()
            .filter(|(_, o)| {
                o.cell_id.as_deref() == Some(cell_id)
                    || parent.is_some_and(|p| o.key == p || o.dead.as_deref() == Some(p))
            })
            .map(|(base, _)| base.clone())
            .collect();
        for base in fulfilled {
            self.use_up(&base);
        }
    }

    /// Requests to send now. Each returned request is outstanding until [`Self::answered`] or
    /// [`Self::unreachable`] is called for it.
    pub fn plan(&mut self, now: Instant, view: &impl View) -> Vec<ReplaceRequest> {
        self.expire(now);
        if now.saturating_duration_since(self.born) < self.params.startup_grace {
            return Vec::new();
        }
        let probe_only = match self.backoff {
            Some((until, _)) if now < until => return Vec::new(),
            Some(_) => true,
            None => false,
        };
        let mut out = Vec::new();
        let minimums: Vec<(String, u32)> = self
            .params
            .minimums
            .iter()
            .map(|(r, m)| (r.clone(), *m))
            .collect();
        for (role, min) in minimums {
            let before = out.len();
            let counted = view.counted(&role);
            let outstanding = self.outstanding.values().filter(|o| o.role == role).count() as u32;
            let mut filled = counted + outstanding;
            if filled >= min {
                continue;
            }
            let named: Vec<(String, String)> = self
                .deaths
                .iter()
                .filter(|(id, d)| {
                    d.role == role && !self.outstanding.contains_key(&replace_base(id))
                })
                .take((min - filled) as usize)
                .map(|(id, d)| (id.clone(), d.reason.clone()))
                .collect();
            for (dead, why) in named {
                filled += 1;
                let reason = format!("{role} below its minimum of {min}: {dead} died ({why})");
                out.push(self.open(replace_base(&dead), &role, Some(dead), reason));
            }
            // Grow slots are numbered above the cells counted and the deaths being replaced,
            // skipping slots already asked for.
            let replacing = self
                .outstanding
                .values()
                .filter(|o| o.role == role && o.dead.is_some())
                .count() as u32;
            let mut slot = counted + replacing + (out.len() - before) as u32;
            while filled < min {
                slot += 1;
                let base = format!("grow:{role}:{slot}");
                if self.outstanding.contains_key(&base) {
                    continue;
                }
                filled += 1;
                let reason = format!("{role} below its minimum of {min}: filling slot {slot}");
                out.push(self.open(base, &role, None, reason));
            }
        }
        if probe_only && out.len() > 1 {
            // Only one request per back-off step: the rest are not outstanding after all.
            for req in out.split_off(1) {
                if let Some(base) = self.base_of(&req.request_key) {
                    self.outstanding.remove(&base);
                }
            }
        }
        self.requested_total += out.len() as u64;
        out
    }

    /// A factory answered `request`.
    pub fn answered(
        &mut self,
        request: &ReplaceRequest,
        reply: ReplaceReply,
        now: Instant,
        view: &impl View,
    ) -> Option<Answered> {
        self.backoff = None;
        let base = self.base_of(&request.request_key)?;
        let o = self.outstanding.get_mut(&base)?;
        let first = o.answered_at.is_none();
        o.answered_at.get_or_insert(now);
        if reply.cell_id.is_some() {
            o.cell_id.clone_from(&reply.cell_id);
        }
        // A cell this checker already saw: either it is here (counted already) or it came and
        // went (its own death is its own event). Either way this key is used up.
        if let Some(cell) = &reply.cell_id {
            if view.seen(cell) {
                if let Some(dead) = &o.dead {
                    self.deaths.remove(dead);
                }
                self.use_up(&base);
            }
        }
        Some(Answered {
            request: request.clone(),
            reply,
            first,
        })
    }

    /// No factory answered `request`: it is not outstanding any more (same key next time), and
    /// requests wait for the next back-off step (the step grows once per failed round, not
    /// once per request of the round).
    pub fn unreachable(&mut self, request: &ReplaceRequest, now: Instant) {
        if let Some(base) = self.base_of(&request.request_key) {
            if self
                .outstanding
                .get(&base)
                .is_some_and(|o| o.answered_at.is_none())
            {
                self.outstanding.remove(&base);
            }
        }
        self.backoff = match self.backoff {
            Some((until, step)) if now < until => Some((until, step)),
            Some((_, step)) => {
                let step = (step * 2).min(MAX_BACKOFF);
                Some((now + step, step))
            }
            None => Some((now + FIRST_BACKOFF, FIRST_BACKOFF)),
        };
    }

    /// Whether requests are waiting for a back-off step.
    pub fn backing_off(&self) -> bool {
        self.backoff.is_some()
    }

    /// Requests handed out by [`Self::plan`] so far.
    pub fn requested_total(&self) -> u64 {
        self.requested_total
    }

    /// Keys of the outstanding requests.
    pub fn outstanding_keys(&self) -> Vec<String> {
        self.outstanding.values().map(|o| o.key.clone()).collect()
    }

    fn open(
        &mut self,
        base: String,
        role: &str,
        dead: Option<String>,
        reason: String,
    ) -> ReplaceRequest {
        let attempt = self.next_attempt.get(&base).copied().unwrap_or(1);
        let key = if attempt <= 1 {
            base.clone()
        } else {
            format!("{base}:{attempt}")
        };
        self.outstanding.insert(
            base,
            Outstanding {
                key: key.clone(),
                role: role.to_string(),
                dead: dead.clone(),
                answered_at: None,
                cell_id: None,
            },
        );
        ReplaceRequest {
            request_key: key,
            role: role.to_string(),
            reason,
            parent: dead,
        }
    }

    /// The base key of an outstanding request's key.
    fn base_of(&self, key: &str) -> Option<String> {
        self.outstanding
            .iter()
            .find(|(_, o)| o.key == key)
            .map(|(base, _)| base.clone())
    }

    fn use_up(&mut self, base: &str) {
        if let Some(o) = self.outstanding.remove(base) {
            let attempt = self.next_attempt.get(base).copied().unwrap_or(1);
            self.next_attempt.insert(base.to_string(), attempt + 1);
            if let Some(dead) = o.dead {
                if !self.deaths.contains_key(&dead) {
                    self.next_attempt.remove(base);
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let timeout = self.params.request_timeout;
        let expired: Vec<String> = self
            .outstanding
            .iter()
            .filter(|(_, o)| {
                o.answered_at
                    .is_some_and(|at| now.saturating_duration_since(at) >= timeout)
            })
            .map(|(base, _)| base.clone())
            .collect();
        for base in expired {
            self.use_up(&base);
        }
        let outstanding = &self.outstanding;
        let before = self.deaths.len();
        self.deaths.retain(|id, d| {
            now.saturating_duration_since(d.at) < DEATH_KEEP
                || outstanding.contains_key(&replace_base(id))
        });
        if self.deaths.len() != before {
            let deaths = &self.deaths;
            self.next_attempt.retain(|base, _| {
                base.strip_prefix("replace:")
                    .is_none_or(|id| deaths.contains_key(id))
            });
        }
    }
}

fn replace_base(dead: &str) -> String {
    format!("replace:{dead}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[derive(Default)]
    struct FakeView {
        counted: BTreeMap<String, u32>,
        seen: BTreeSet<String>,
    }

    impl View for FakeView {
        fn counted(&self, role: &str) -> u32 {
            self.counted.get(role).copied().unwrap_or(0)
        }
        fn seen(&self, cell_id: &str) -> bool {
            self.seen.contains(cell_id)
        }
    }

    fn params(minimums: &[(&str, u32)]) -> ReconcileParams {
        ReconcileParams {
            minimums: minimums.iter().map(|(r, m)| (r.to_string(), *m)).collect(),
            request_timeout: Duration::from_secs(10),
            startup_grace: Duration::ZERO,
        }
    }

    fn keys(reqs: &[ReplaceRequest]) -> Vec<&str> {
        reqs.iter().map(|r| r.request_key.as_str()).collect()
    }

    fn view(counted: &[(&str, u32)]) -> FakeView {
        FakeView {
            counted: counted.iter().map(|(r, c)| (r.to_string(), *c)).collect(),
            seen: BTreeSet::new(),
        }
    }

    fn reply(key: &str, cell: Option<&str>) -> ReplaceReply {
        ReplaceReply {
            request_key: key.into(),
            started: true,
            cell_id: cell.map(str::to_owned),
        }
    }

    #[test]
    fn two_checkers_with_the_same_view_ask_with_the_same_keys() {
        let t0 = Instant::now();
        let p = params(&[("api", 3), ("crawler", 2), ("frontdoor", 1)]);
        let mut one = Reconciler::new(p.clone(), t0);
        let mut two = Reconciler::new(p, t0);
        // They learn of the same deaths in a different order and at slightly different times.
        one.cell_died("api-b", "api", "silent", t0);
        one.cell_died("api-a", "api", "silent", t0);
        two.cell_died("api-a", "api", "silent", t0 + Duration::from_millis(30));
        two.cell_died("api-b", "api", "silent", t0 + Duration::from_millis(40));
        // Three api deaths known, but only two are needed: both name the same two.
        one.cell_died("api-c", "api", "silent", t0);
        two.cell_died("api-c", "api", "silent", t0);
        let v = view(&[("api", 1), ("crawler", 0)]);
        let a = one.plan(t0 + Duration::from_millis(50), &v);
        let b = two.plan(t0 + Duration::from_millis(60), &v);
        assert_eq!(keys(&a), keys(&b));
        assert_eq!(
            keys(&a),
            [
                "replace:api-a",
                "replace:api-b",
                "grow:crawler:1",
                "grow:crawler:2",
                "grow:frontdoor:1"
            ]
        );
        assert_eq!(a[0].parent.as_deref(), Some("api-a"));
        // Outstanding requests count: nothing more is asked.
        assert!(one.plan(t0 + Duration::from_millis(200), &v).is_empty());
    }

    #[test]
    fn grow_slots_start_above_what_exists() {
        let t0 = Instant::now();
        let mut r = Reconciler::new(params(&[("api", 4)]), t0);
        let got = r.plan(t0, &view(&[("api", 2)]));
        assert_eq!(keys(&got), ["grow:api:3", "grow:api:4"]);
        // The two cells counted then drain away (no death to name): the free slots are 1 and 2.
        let more = r.plan(t0, &view(&[("api", 0)]));
        assert_eq!(keys(&more), ["grow:api:1", "grow:api:2"]);
    }

    #[test]
    fn a_request_counts_until_its_cell_appears_then_the_key_is_used_up() {
        let t0 = Instant::now();
        let mut r = Reconciler::new(params(&[("api", 2)]), t0);
        let reqs = r.plan(t0, &view(&[("api", 1)]));
        assert_eq!(keys(&reqs), ["grow:api:2"]);
        let answer = r
            .answered(&reqs[0], reply("grow:api:2", Some("n1")), t0, &view(&[]))
            .expect("known request");
        assert!(answer.first);
        assert!(r
            .plan(t0 + Duration::from_secs(5), &view(&[("api", 1)]))
            .is_empty());
        r.cell_appeared("n1", Some("grow:api:2"));
        assert!(r.outstanding_keys().is_empty());
        assert!(r
            .plan(t0 + Duration::from_secs(5), &view(&[("api", 2)]))
            .is_empty());
        // Later the same slot is short again (a cell retired): a fresh key, not a repeat.
        let again = r.plan(t0 + Duration::from_secs(6), &view(&[("api", 1)]));
        assert_eq!(keys(&again), ["grow:api:2:2"]);
    }

    #[test]
    fn a_replacement_that_never_appears_is_asked_again_under_a_new_key() {
        let t0 = Instant::now();
        let mut r = Reconciler::new(params(&[("api", 1)]), t0);
        r.cell_died("x", "api", "silent", t0);
        let v = view(&[]);
        let reqs = r.plan(t0, &v);
        assert_eq!(keys(&reqs), ["replace:x"]);
        r.answered(&reqs[0], reply("replace:x", None), t0, &v);
        assert!(r.plan(t0 + Duration::from_secs(9), &v).is_empty());
        let retry = r.plan(t0 + Duration::from_secs(10), &v);
        assert_eq!(keys(&retry), ["replace:x:2"]);
        assert_eq!(retry[0].parent.as_deref(), Some("x"));
        // Its cell appears naming the dead cell as parent: done, nothing more.
        r.cell_appeared("y", Some("x"));
        assert!(r
            .plan(t0 + Duration::from_secs(30), &view(&[("api", 1)]))
            .is_empty());
    }

    #[test]
    fn an_answer_naming_a_cell_already_seen_uses_the_key_up() {
        let t0 = Instant::now();
        let mut r = Reconciler::new(params(&[("api", 2)]), t0);
        let mut v = view(&[("api", 1)]);
        v.seen.insert("old".into());
        let reqs = r.plan(t0, &v);
        let repeat = ReplaceReply {
            request_key: "grow:api:2".into(),
            started: false,
            cell_id: Some("old".into()),
        };
        r.answered(&reqs[0], repeat, t0, &v);
        assert_eq!(keys(&r.plan(t0, &v)), ["grow:api:2:2"]);
    }

    #[test]
    fn an_unreachable_factory_is_asked_once_per_backoff_step() {
        let t0 = Instant::now();
        let mut r = Reconciler::new(params(&[("api", 3)]), t0);
        let v = view(&[]);
        let mut sent = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(10) {
            for req in r.plan(t, &v) {
                sent.push((t, req.request_key.clone()));
                r.unreachable(&req, t);
            }
            t += Duration::from_millis(100);
        }
        // The first round sends three, then one probe per step: 0.2, 0.4, 0.8, 1.6, 3.2 s.
        let times: Vec<u128> = sent.iter().map(|(t, _)| (*t - t0).as_millis()).collect();
        assert_eq!(times, [0, 0, 0, 200, 600, 1400, 3000, 6200]);
        assert!(
            sent.iter().all(|(_, k)| k.starts_with("grow:api:")),
            "same keys: never answered"
        );
        // When it answers again, the rest follow at once.
        let probe = r.plan(t0 + Duration::from_secs(20), &v);
        assert_eq!(keys(&probe), ["grow:api:1"]);
        r.answered(
            &probe[0],
            reply("grow:api:1", None),
            t0 + Duration::from_secs(20),
            &v,
        );
        let rest = r.plan(t0 + Duration::from_secs(20), &v);
        assert_eq!(keys(&rest), ["grow:api:2", "grow:api:3"]);
    }

    #[test]
    fn startup_grace_and_a_cell_coming_back_cancel_a_replacement() {
        let t0 = Instant::now();
        let mut p = params(&[("api", 1)]);
        p.startup_grace = Duration::from_secs(1);
        let mut r = Reconciler::new(p, t0);
        assert!(r.plan(t0, &view(&[])).is_empty());
        r.cell_died("x", "api", "silent", t0);
        r.cell_appeared("x", None);
        assert!(r
            .plan(t0 + Duration::from_secs(1), &view(&[("api", 1)]))
            .is_empty());
    }
}
