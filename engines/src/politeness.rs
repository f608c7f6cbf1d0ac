//! The host ledger: politeness per host for the whole organism, whatever the number of crawlers.
//!
//! The model is the URL Frontier API's (crawler-commons/url-frontier): a host's next request is
//! handed out only when the host is due, and a host that said "go away" (`Retry-After`, 429,
//! 503) is blocked until a time (`BlockQueueUntil`). Per host the ledger keeps the start of the
//! latest request it granted, a blocked-until, and the permits in flight, each with an expiry so
//! the permit of a crawler that died lapses.
//!
//! A crawler asks for a permit before every request to a host (robots.txt included), naming the
//! minimum gap between two starts it needs (`max(1 / per_host_rate, Crawl-delay)`, computed by the
//! crawler from the robots group that applies), the host's concurrency limit and how far ahead it
//! may wait. The ledger answers with a start time (the crawler waits until then, then fetches) or
//! "not before T". Whatever crawler asks, two starts granted for one host are at least the
//! asker's gap apart, and no more than the concurrency limit of permits are live at once.
//!
//! **Leases.** At tens of requests a second per host, a round trip to the ledger for every
//! request costs more than the request: a permit is held from its grant until its release
//! reaches the ledger, and with the concurrency limit that hold caps the host's rate. So an ask
//! may name a `lease_ms`: the answer is then a lane of the host's *lattice* for that long. A
//! host's lattice has one lane per permit its concurrency allows, lane `i` owning the starts
//! `base + i * gap + k * lanes * gap`: two lanes' starts are at least a gap apart, and a lane
//! held by one crawler at a time carries one request at a time. The crawler starts requests on
//! its lane's ticks without asking again, and releases the lane when it has no more work for the
//! host or its lease ends. One-shot asks (no lease) are spaced after the last tick any lease
//! reserved; a lattice of another shape (another gap or concurrency) is drawn only once every
//! tick of the old one has passed.
//!
//! [`decide`] is the arithmetic, a pure function of the host's state, the ask and the time; the
//! engines run it inside one transaction per request, with the host's row locked.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::Result;

/// When the concurrency limit is reached, the asker is told to come back after this long (or
/// when the first permit in flight expires, if sooner).
pub const BUSY_RETRY_MS: i64 = 100;
/// Longest a permit may be held (a typo in a request must not lock a host for a day).
pub const MAX_HOLD_MS: i64 = 10 * 60 * 1000;
/// Longest a host may be blocked by one report.
pub const MAX_BLOCK_MS: i64 = 60 * 60 * 1000;
/// Longest gap between two starts one ask may demand.
pub const MAX_GAP_MS: i64 = 60 * 60 * 1000;
/// Longest lease one ask may take.
pub const MAX_LEASE_MS: i64 = 10 * 1000;

/// One crawler's ask for a request to `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermitAsk {
    pub host: String,
    /// Minimum time between this request's start and the host's previous start, ms.
    pub gap_ms: i64,
    /// Permits in flight the host allows (at least 1).
    pub concurrency: u32,
    /// The asker waits for a start at most this far ahead; beyond it the answer is "not before".
    pub horizon_ms: i64,
    /// How long after its start a permit lapses if it is not released, ms.
    pub hold_ms: i64,
    /// Ask for a lane of the host's lattice for this long, ms (see the module docs); 0 (and
    /// what an older crawler sends): one start.
    #[serde(default)]
    pub lease_ms: i64,
}

/// A host that asked to be left alone for `for_ms` (Retry-After, 429, 503).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBlock {
    pub host: String,
    pub for_ms: i64,
}

/// One batch from one crawler: permits to release first, then blocks, then asks in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermitRequest {
    #[serde(default)]
    pub releases: Vec<i64>,
    #[serde(default)]
    pub blocks: Vec<HostBlock>,
    #[serde(default)]
    pub asks: Vec<PermitAsk>,
}

/// The answer to one ask. Times are relative to when the ledger decided, so that the asker's
/// clock does not need to agree with the ledger's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum PermitAnswer {
    /// Start the request `wait_ms` from now, then release `permit`. A lease (`for_ms` > 0) may
    /// start one request at a time at `wait_ms + k * every_ms` up to `wait_ms + for_ms`
    /// (`every_ms` 0: at any time in that span). An older ledger sends neither: one start.
    Granted {
        permit: i64,
        wait_ms: i64,
        #[serde(default)]
        every_ms: i64,
        #[serde(default)]
        for_ms: i64,
    },
    /// The host is not due within the horizon: ask again (or hand the job back) in `wait_ms`.
    NotBefore { wait_ms: i64 },
}

/// The answers, one per ask, in the order of the asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermitReply {
    pub answers: Vec<PermitAnswer>,
}

/// A host's row in the ledger, as [`decide`] sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSlot {
    /// Start of the latest one-shot request granted (ms since the epoch; 0: never).
    pub last_start_ms: i64,
    pub blocked_until_ms: i64,
    /// The host's lattice of leased lanes (all zero: never drawn).
    pub lattice: Lattice,
    /// The permits in flight.
    pub in_flight: Vec<InFlight>,
}

/// A host's lattice: lane `i` owns the starts `base_ms + i * gap_ms + k * lanes * gap_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lattice {
    pub base_ms: i64,
    pub gap_ms: i64,
    pub lanes: u32,
    /// The latest tick any lease on it was given (0: none).
    pub until_ms: i64,
}

/// A permit in flight: when it lapses, and the lane it leases (none: a one-shot permit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub expires_ms: i64,
    pub lane: Option<u32>,
}

impl InFlight {
    /// A one-shot permit.
    pub fn once(expires_ms: i64) -> Self {
        Self {
            expires_ms,
            lane: None,
        }
    }
}

/// What [`decide`] concluded for one ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Grant a permit starting at `start_ms`, lapsing at `expires_ms`; a lease of `lane` also
    /// starts every `every_ms` up to `start_ms + for_ms`.
    Grant {
        start_ms: i64,
        expires_ms: i64,
        lease: Option<Lease>,
    },
    NotBefore {
        at_ms: i64,
    },
}

/// What a granted lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub lane: u32,
    pub every_ms: i64,
    pub for_ms: i64,
}

impl PermitAsk {
    /// The ask with every number brought into range: nothing a crawler sends can wedge a host.
    pub fn clamped(&self) -> PermitAsk {
        PermitAsk {
            host: self.host.clone(),
            gap_ms: self.gap_ms.clamp(0, MAX_GAP_MS),
            concurrency: self.concurrency.max(1),
            horizon_ms: self.horizon_ms.clamp(0, MAX_HOLD_MS),
            hold_ms: self.hold_ms.clamp(1, MAX_HOLD_MS),
            lease_ms: self.lease_ms.clamp(0, MAX_LEASE_MS),
        }
    }
}

/// Clamp a block's duration.
pub fn block_ms(for_ms: i64) -> i64 {
    for_ms.clamp(0, MAX_BLOCK_MS)
}

/// The ledger's arithmetic for one ask at `now_ms`: updates `slot` when it grants.
pub fn decide(slot: &mut HostSlot, ask: &PermitAsk, now_ms: i64) -> Decision {
    let ask = ask.clamped();
    slot.in_flight.retain(|p| p.expires_ms > now_ms);
    if slot.in_flight.len() >= ask.concurrency as usize {
        let due = now_ms.max(slot.blocked_until_ms);
        let first_free = slot
            .in_flight
            .iter()
            .map(|p| p.expires_ms)
            .min()
            .unwrap_or(now_ms);
        let retry = first_free.min(now_ms + BUSY_RETRY_MS.max(ask.gap_ms.min(1_000)));
        return Decision::NotBefore {
            at_ms: retry.max(due).max(now_ms + 1),
        };
    }
    if ask.lease_ms > 0 {
        return lease(slot, &ask, now_ms);
    }
    // A host never granted (last start 0) is due now; no start comes near a leased tick.
    let after = |start: i64| match start {
        0 => now_ms,
        last => last.saturating_add(ask.gap_ms),
    };
    let due = now_ms
        .max(after(slot.last_start_ms))
        .max(after(slot.lattice.until_ms))
        .max(slot.blocked_until_ms);
    if due > now_ms + ask.horizon_ms {
        return Decision::NotBefore { at_ms: due };
    }
    let expires_ms = due + ask.hold_ms;
    slot.last_start_ms = due;
    slot.in_flight.push(InFlight::once(expires_ms));
    Decision::Grant {
        start_ms: due,
        expires_ms,
        lease: None,
    }
}

/// [`decide`] for a lease: the free lane of the host's lattice whose next tick comes first.
fn lease(slot: &mut HostSlot, ask: &PermitAsk, now_ms: i64) -> Decision {
    let lanes = ask.concurrency;
    let every = ask.gap_ms.saturating_mul(i64::from(lanes));
    let after_once = match slot.last_start_ms {
        0 => now_ms,
        last => last.saturating_add(ask.gap_ms),
    };
    let earliest = now_ms.max(after_once).max(slot.blocked_until_ms);
    let shaped = slot.lattice.lanes == lanes && slot.lattice.gap_ms == ask.gap_ms;
    if !shaped {
        // A new lattice, once every tick of the old one has passed.
        let base = match slot.lattice.until_ms {
            0 => earliest,
            until => earliest.max(until.saturating_add(ask.gap_ms.max(slot.lattice.gap_ms))),
        };
        if base > now_ms + ask.horizon_ms {
            return Decision::NotBefore { at_ms: base };
        }
        slot.lattice = Lattice {
            base_ms: base,
            gap_ms: ask.gap_ms,
            lanes,
            until_ms: 0,
        };
    }
    let lattice = slot.lattice;
    let held: Vec<u32> = slot.in_flight.iter().filter_map(|p| p.lane).collect();
    let next_tick = |lane: u32| {
        let first = lattice.base_ms + i64::from(lane) * lattice.gap_ms;
        if every == 0 || earliest <= first {
            first.max(earliest)
        } else {
            let periods = (earliest - first + every - 1) / every;
            first + periods * every
        }
    };
    let Some((start, lane)) = (0..lanes)
        .filter(|lane| !held.contains(lane))
        .map(|lane| (next_tick(lane), lane))
        .min()
    else {
        // Every lane is held by a permit of an older lattice: as busy as busy gets.
        return Decision::NotBefore {
            at_ms: now_ms + BUSY_RETRY_MS,
        };
    };
    if start > now_ms + ask.horizon_ms {
        return Decision::NotBefore { at_ms: start };
    }
    let for_ms = if every == 0 {
        ask.lease_ms
    } else {
        ask.lease_ms / every * every
    };
    let last_tick = start + for_ms;
    let expires_ms = last_tick + ask.hold_ms;
    slot.lattice.until_ms = slot.lattice.until_ms.max(last_tick);
    slot.in_flight.push(InFlight {
        expires_ms,
        lane: Some(lane),
    });
    Decision::Grant {
        start_ms: start,
        expires_ms,
        lease: Some(Lease {
            lane,
            every_ms: every,
            for_ms,
        }),
    }
}

/// The hosts a request names (its blocks' and its asks'), sorted and distinct: the ledger rows an
/// engine loads (and locks) for [`walk`].
pub fn hosts(request: &PermitRequest) -> Vec<&str> {
    let mut hosts: Vec<&str> = request
        .blocks
        .iter()
        .map(|b| b.host.as_str())
        .chain(request.asks.iter().map(|a| a.host.as_str()))
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts
}

/// One request's walk over the ledger rows of the hosts it names ([`hosts`], loaded with their
/// permits in flight; a host missing counts as never seen): its blocks first (a block only ever
/// extends), then its asks in order, each [`decide`]d on the slot the previous ones left. Returns
/// each ask's decision; `slots` is left as the engine must write it back (and each grant is a
/// permit to record). Written once for every engine.
pub fn walk(
    slots: &mut HashMap<String, HostSlot>,
    request: &PermitRequest,
    now_ms: i64,
) -> Vec<Decision> {
    for block in &request.blocks {
        let until = now_ms.saturating_add(block_ms(block.for_ms));
        let slot = slots.entry(block.host.clone()).or_default();
        slot.blocked_until_ms = slot.blocked_until_ms.max(until);
    }
    request
        .asks
        .iter()
        .map(|ask| decide(slots.entry(ask.host.clone()).or_default(), ask, now_ms))
        .collect()
}

/// The answer to send for a decision taken at `now_ms`, with the permit id the engine gave it.
pub fn answer(decision: Decision, permit: i64, now_ms: i64) -> PermitAnswer {
    match decision {
        Decision::Grant {
            start_ms, lease, ..
        } => PermitAnswer::Granted {
            permit,
            wait_ms: (start_ms - now_ms).max(0),
            every_ms: lease.map_or(0, |l| l.every_ms),
            for_ms: lease.map_or(0, |l| l.for_ms),
        },
        Decision::NotBefore { at_ms } => PermitAnswer::NotBefore {
            wait_ms: (at_ms - now_ms).max(1),
        },
    }
}

/// The grants among a walk's decisions, as (host, expiry, leased lane) in the asks' order: the
/// permits an engine records.
pub fn grants<'a>(
    request: &'a PermitRequest,
    decisions: &[Decision],
) -> Vec<(&'a str, i64, Option<u32>)> {
    request
        .asks
        .iter()
        .zip(decisions)
        .filter_map(|(ask, d)| match d {
            Decision::Grant {
                expires_ms, lease, ..
            } => Some((ask.host.as_str(), *expires_ms, lease.map(|l| l.lane))),
            Decision::NotBefore { .. } => None,
        })
        .collect()
}

/// Every decision's answer at `now_ms`, the grants given the recorded permits' `ids` in order.
pub fn answers(
    decisions: Vec<Decision>,
    ids: impl IntoIterator<Item = i64>,
    now_ms: i64,
) -> Vec<PermitAnswer> {
    let mut ids = ids.into_iter();
    decisions
        .into_iter()
        .map(|decision| {
            let permit = match decision {
                Decision::Grant { .. } => ids.next().unwrap_or(0),
                Decision::NotBefore { .. } => 0,
            };
            answer(decision, permit, now_ms)
        })
        .collect()
}

/// Where the organism's politeness lives: one ledger of hosts, shared by every crawler.
#[async_trait]
pub trait HostLedger: Send + Sync + 'static {
    /// Release permits, record blocks, then answer the asks in order, atomically per host.
    async fn permits(&self, request: &PermitRequest) -> Result<PermitReply>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn ask(gap_ms: i64, concurrency: u32, horizon_ms: i64) -> PermitAsk {
        PermitAsk {
            host: "a.test".into(),
            gap_ms,
            concurrency,
            horizon_ms,
            hold_ms: 5_000,
            lease_ms: 0,
        }
    }

    #[test]
    fn starts_are_spaced_by_the_gap_and_the_horizon_bounds_the_wait() {
        let mut slot = HostSlot::default();
        let a = ask(200, 10, 1_000);
        let mut starts = Vec::new();
        for _ in 0..6 {
            match decide(&mut slot, &a, 10_000) {
                Decision::Grant { start_ms, .. } => starts.push(start_ms),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(starts, vec![10_000, 10_200, 10_400, 10_600, 10_800, 11_000]);
        assert_eq!(
            decide(&mut slot, &a, 10_000),
            Decision::NotBefore { at_ms: 11_200 },
            "the seventh start is beyond the horizon"
        );
        assert_eq!(slot.last_start_ms, 11_000, "a refusal changes nothing");
    }

    #[test]
    fn concurrency_is_capped_and_expired_permits_lapse() {
        let mut slot = HostSlot::default();
        let a = ask(0, 2, 1_000);
        assert!(matches!(decide(&mut slot, &a, 0), Decision::Grant { .. }));
        assert!(matches!(decide(&mut slot, &a, 0), Decision::Grant { .. }));
        assert_eq!(
            decide(&mut slot, &a, 0),
            Decision::NotBefore { at_ms: 100 },
            "full: come back soon"
        );
        // A released permit frees its slot (the engine removes it).
        slot.in_flight.pop();
        assert!(matches!(decide(&mut slot, &a, 1), Decision::Grant { .. }));
        // Permits held by a dead crawler lapse at their expiry.
        assert!(matches!(
            decide(&mut slot, &a, 4_999),
            Decision::NotBefore { .. }
        ));
        assert!(matches!(
            decide(&mut slot, &a, 5_001),
            Decision::Grant { .. }
        ));
    }

    #[test]
    fn a_block_holds_the_host_until_it_ends() {
        let mut slot = HostSlot {
            blocked_until_ms: 30_000,
            ..HostSlot::default()
        };
        assert_eq!(
            decide(&mut slot, &ask(0, 1, 1_000), 10_000),
            Decision::NotBefore { at_ms: 30_000 }
        );
        assert_eq!(
            decide(&mut slot, &ask(0, 1, 1_000), 29_500),
            Decision::Grant {
                start_ms: 30_000,
                expires_ms: 35_000,
                lease: None
            }
        );
    }

    #[test]
    fn each_ask_keeps_its_own_gap_from_the_latest_start() {
        // robots.txt fetched at the base rate, then pages at the slower Crawl-delay.
        let mut slot = HostSlot::default();
        assert!(matches!(
            decide(&mut slot, &ask(10, 4, 5_000), 50_000),
            Decision::Grant {
                start_ms: 50_000,
                ..
            }
        ));
        assert!(matches!(
            decide(&mut slot, &ask(1_000, 4, 5_000), 50_000),
            Decision::Grant {
                start_ms: 51_000,
                ..
            }
        ));
    }

    #[test]
    fn hostile_numbers_are_clamped() {
        let mut slot = HostSlot::default();
        let bad = PermitAsk {
            host: "a.test".into(),
            gap_ms: -5,
            concurrency: 0,
            horizon_ms: i64::MAX,
            hold_ms: i64::MAX,
            lease_ms: 0,
        };
        assert_eq!(
            decide(&mut slot, &bad, 0),
            Decision::Grant {
                start_ms: 0,
                expires_ms: MAX_HOLD_MS,
                lease: None
            }
        );
        assert!(matches!(
            decide(&mut slot, &bad, 0),
            Decision::NotBefore { .. }
        ));
    }

    /// Random asks from many askers with random gaps, concurrency and clocks moving forward:
    /// granted starts keep every asker's gap from the previous start, live permits never exceed
    /// the limit, and a refusal's time is in the future.
    #[test]
    fn seeded_random_asks_keep_the_invariants() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let mut slot = HostSlot::default();
            let concurrency = rng.random_range(1..4);
            let mut now = 1_000_000i64;
            let mut grants = 0;
            for _ in 0..300 {
                now += rng.random_range(0..50);
                if !slot.in_flight.is_empty() && rng.random_bool(0.3) {
                    let i = rng.random_range(0..slot.in_flight.len());
                    slot.in_flight.swap_remove(i);
                }
                let a = PermitAsk {
                    host: "h".into(),
                    gap_ms: rng.random_range(0..300),
                    concurrency,
                    horizon_ms: rng.random_range(0..2_000),
                    hold_ms: rng.random_range(1..3_000),
                    lease_ms: 0,
                };
                let before = slot.last_start_ms;
                match decide(&mut slot, &a, now) {
                    Decision::Grant {
                        start_ms,
                        expires_ms,
                        ..
                    } => {
                        assert!(start_ms >= now && start_ms <= now + a.horizon_ms);
                        assert!(start_ms >= before + a.gap_ms);
                        assert_eq!(expires_ms, start_ms + a.hold_ms);
                        assert!(slot.in_flight.len() <= concurrency as usize);
                        grants += 1;
                    }
                    Decision::NotBefore { at_ms } => assert!(at_ms > now),
                }
            }
            assert!(grants > 0);
        }
    }

    fn lease_ask(gap_ms: i64, concurrency: u32, lease_ms: i64) -> PermitAsk {
        PermitAsk {
            lease_ms,
            ..ask(gap_ms, concurrency, 1_000)
        }
    }

    #[test]
    fn leases_take_the_lanes_of_a_lattice() {
        let mut slot = HostSlot::default();
        let a = lease_ask(10, 4, 100);
        let now = 50_000;
        let mut got = Vec::new();
        for _ in 0..4 {
            match decide(&mut slot, &a, now) {
                Decision::Grant {
                    start_ms,
                    lease: Some(lease),
                    ..
                } => got.push((start_ms, lease.lane, lease.every_ms, lease.for_ms)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            got,
            vec![
                (now, 0, 40, 80),
                (now + 10, 1, 40, 80),
                (now + 20, 2, 40, 80),
                (now + 30, 3, 40, 80)
            ]
        );
        assert!(matches!(
            decide(&mut slot, &a, now),
            Decision::NotBefore { .. }
        ));
        // Lane 1 released at now + 25: its next lease starts on lane 1's next tick.
        slot.in_flight.retain(|p| p.lane != Some(1));
        assert!(matches!(
            decide(&mut slot, &a, now + 25),
            Decision::Grant {
                start_ms: 50_050,
                lease: Some(Lease { lane: 1, .. }),
                ..
            }
        ));
        // A one-shot ask waits for the last tick any lease was given.
        slot.in_flight.clear();
        assert_eq!(
            decide(&mut slot, &ask(10, 4, 1_000), now + 30),
            Decision::Grant {
                start_ms: now + 50 + 80 + 10,
                expires_ms: now + 140 + 5_000,
                lease: None
            }
        );
        // A lattice of another shape is drawn after the old one's ticks, then used.
        match decide(&mut slot, &lease_ask(5, 2, 100), now + 40) {
            Decision::Grant {
                start_ms,
                lease: Some(lease),
                ..
            } => {
                assert_eq!(start_ms, now + 140 + 5);
                assert_eq!((lease.lane, lease.every_ms), (0, 10));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Random one-shot asks and leases of random shapes, released at random or left to lapse:
    /// every start a crawler may use (a lease's ticks before its release) is at least the smaller
    /// of the two askers' gaps from the next, live permits never exceed the limit, and no lane is
    /// held twice.
    #[test]
    fn seeded_random_leases_keep_the_invariants() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..200 {
            let mut slot = HostSlot::default();
            // (permit, its ticks, its gap); and every start used, with its gap.
            let mut live: Vec<(InFlight, Vec<i64>, i64)> = Vec::new();
            let mut used: Vec<(i64, i64)> = Vec::new();
            let mut now = 1_000_000i64;
            let mut leases = 0;
            for _ in 0..300 {
                now += rng.random_range(0..20);
                let (lapsed, kept): (Vec<_>, Vec<_>) =
                    live.drain(..).partition(|p| p.0.expires_ms <= now);
                live = kept;
                for (_, ticks, gap) in lapsed {
                    used.extend(ticks.into_iter().map(|t| (t, gap)));
                }
                if !live.is_empty() && rng.random_bool(0.3) {
                    let (permit, ticks, gap) = live.swap_remove(rng.random_range(0..live.len()));
                    let at = slot
                        .in_flight
                        .iter()
                        .position(|p| *p == permit)
                        .expect("a live permit is in flight");
                    slot.in_flight.remove(at);
                    used.extend(ticks.into_iter().filter(|t| *t < now).map(|t| (t, gap)));
                }
                let concurrency = rng.random_range(1..4);
                let a = PermitAsk {
                    host: "h".into(),
                    gap_ms: [0, 5, 10][rng.random_range(0..3)],
                    concurrency,
                    horizon_ms: rng.random_range(0..500),
                    hold_ms: rng.random_range(50..300),
                    lease_ms: if rng.random_bool(0.7) {
                        rng.random_range(0..200)
                    } else {
                        0
                    },
                };
                match decide(&mut slot, &a, now) {
                    Decision::Grant {
                        start_ms,
                        expires_ms,
                        lease,
                    } => {
                        assert!(start_ms >= now && start_ms <= now + a.horizon_ms);
                        assert!(slot.in_flight.len() <= concurrency as usize);
                        let mut lanes: Vec<u32> =
                            slot.in_flight.iter().filter_map(|p| p.lane).collect();
                        lanes.sort_unstable();
                        lanes.dedup();
                        assert_eq!(
                            lanes.len(),
                            slot.in_flight.iter().filter(|p| p.lane.is_some()).count()
                        );
                        let ticks: Vec<i64> = match lease {
                            Some(l) if l.every_ms > 0 => (0..=l.for_ms / l.every_ms)
                                .map(|k| start_ms + k * l.every_ms)
                                .collect(),
                            _ => vec![start_ms],
                        };
                        leases += usize::from(lease.is_some());
                        let permit = *slot.in_flight.last().expect("a grant is in flight");
                        assert_eq!(permit.expires_ms, expires_ms);
                        live.push((permit, ticks, a.gap_ms));
                    }
                    Decision::NotBefore { at_ms } => assert!(at_ms > now),
                }
            }
            for (_, ticks, gap) in live {
                used.extend(ticks.into_iter().map(|t| (t, gap)));
            }
            used.sort_unstable();
            for pair in used.windows(2) {
                let ((a, ga), (b, gb)) = (pair[0], pair[1]);
                assert!(
                    b - a >= ga.min(gb),
                    "starts {a} and {b} closer than {}",
                    ga.min(gb)
                );
            }
            assert!(leases > 0);
        }
    }

    /// A request's walk: blocks first and only ever longer, then asks in order on what the earlier
    /// ones left; a host never seen starts empty.
    #[test]
    fn walk_applies_blocks_then_asks_in_order() {
        let now = 1_000_000;
        let mut slots: HashMap<String, HostSlot> = HashMap::new();
        slots.insert(
            "a.test".into(),
            HostSlot {
                blocked_until_ms: now + 60_000,
                ..HostSlot::default()
            },
        );
        let request = PermitRequest {
            releases: Vec::new(),
            blocks: vec![
                HostBlock {
                    host: "a.test".into(),
                    for_ms: 1_000,
                },
                HostBlock {
                    host: "b.test".into(),
                    for_ms: 2_000,
                },
            ],
            asks: vec![
                PermitAsk {
                    host: "c.test".into(),
                    ..ask(500, 2, 10_000)
                },
                PermitAsk {
                    host: "c.test".into(),
                    ..ask(500, 2, 10_000)
                },
                ask(0, 1, 0),
            ],
        };
        assert_eq!(hosts(&request), vec!["a.test", "b.test", "c.test"]);
        let decisions = walk(&mut slots, &request, now);
        assert_eq!(
            slots["a.test"].blocked_until_ms,
            now + 60_000,
            "a block only extends"
        );
        assert_eq!(slots["b.test"].blocked_until_ms, now + 2_000);
        assert_eq!(
            decisions,
            vec![
                Decision::Grant {
                    start_ms: now,
                    expires_ms: now + 5_000,
                    lease: None
                },
                Decision::Grant {
                    start_ms: now + 500,
                    expires_ms: now + 5_500,
                    lease: None
                },
                Decision::NotBefore {
                    at_ms: now + 60_000
                },
            ]
        );
        assert_eq!(slots["c.test"].last_start_ms, now + 500);
        assert_eq!(
            slots["c.test"].in_flight,
            vec![InFlight::once(now + 5_000), InFlight::once(now + 5_500)]
        );
    }
}
