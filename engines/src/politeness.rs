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
    /// Start the request `wait_ms` from now, then release `permit`.
    Granted { permit: i64, wait_ms: i64 },
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
    /// Start of the latest request granted (ms since the epoch; 0: never).
    pub last_start_ms: i64,
    pub blocked_until_ms: i64,
    /// Expiry times of the permits in flight.
    pub in_flight: Vec<i64>,
}

/// What [`decide`] concluded for one ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Grant a permit starting at `start_ms`, lapsing at `expires_ms`.
    Grant {
        start_ms: i64,
        expires_ms: i64,
    },
    NotBefore {
        at_ms: i64,
    },
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
    slot.in_flight.retain(|&expiry| expiry > now_ms);
    // A host never granted (last start 0) is due now.
    let after_last = match slot.last_start_ms {
        0 => now_ms,
        last => last.saturating_add(ask.gap_ms),
    };
    let due = now_ms.max(after_last).max(slot.blocked_until_ms);
    if slot.in_flight.len() >= ask.concurrency as usize {
        let first_free = slot.in_flight.iter().copied().min().unwrap_or(now_ms);
        let retry = first_free.min(now_ms + BUSY_RETRY_MS.max(ask.gap_ms.min(1_000)));
        return Decision::NotBefore {
            at_ms: retry.max(due).max(now_ms + 1),
        };
    }
    if due > now_ms + ask.horizon_ms {
        return Decision::NotBefore { at_ms: due };
    }
    let expires_ms = due + ask.hold_ms;
    slot.last_start_ms = due;
    slot.in_flight.push(expires_ms);
    Decision::Grant {
        start_ms: due,
        expires_ms,
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
        Decision::Grant { start_ms, .. } => PermitAnswer::Granted {
            permit,
            wait_ms: (start_ms - now_ms).max(0),
        },
        Decision::NotBefore { at_ms } => PermitAnswer::NotBefore {
            wait_ms: (at_ms - now_ms).max(1),
        },
    }
}

/// The grants among a walk's decisions, as (host, expiry) in the asks' order: the permits an
/// engine records.
pub fn grants<'a>(request: &'a PermitRequest, decisions: &[Decision]) -> Vec<(&'a str, i64)> {
    request
        .asks
        .iter()
        .zip(decisions)
        .filter_map(|(ask, d)| match d {
            Decision::Grant { expires_ms, .. } => Some((ask.host.as_str(), *expires_ms)),
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
                expires_ms: 35_000
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
        };
        assert_eq!(
            decide(&mut slot, &bad, 0),
            Decision::Grant {
                start_ms: 0,
                expires_ms: MAX_HOLD_MS
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
                };
                let before = slot.last_start_ms;
                match decide(&mut slot, &a, now) {
                    Decision::Grant {
                        start_ms,
                        expires_ms,
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
                    expires_ms: now + 5_000
                },
                Decision::Grant {
                    start_ms: now + 500,
                    expires_ms: now + 5_500
                },
                Decision::NotBefore {
                    at_ms: now + 60_000
                },
            ]
        );
        assert_eq!(slots["c.test"].last_start_ms, now + 500);
        assert_eq!(slots["c.test"].in_flight, vec![now + 5_000, now + 5_500]);
    }
}
