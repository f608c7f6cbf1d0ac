//! What the health checkers' events say about one kill: when the victim was declared dead, and
//! which cell replaced it and when that cell was born and serving.
//!
//! A replacement is recognised by its `parent`: the health checkers ask the factory for it with
//! the key `replace:<dead id>` and `parent: <dead id>`, the factory starts the cell with
//! `--parent <dead id>`, and the cell's heartbeats (hence its `born`/`serving` events) carry it.

use std::collections::HashSet;

use protocol::control::{CellEvent, EventKind};
use serde::Serialize;

/// Every event seen on any health checker's stream, deduplicated (a stream replayed after a
/// reconnect repeats what it already sent).
#[derive(Debug, Default)]
pub struct EventBook {
    events: Vec<Sourced>,
    seen: HashSet<(usize, u8, String, i64)>,
    /// `lagged` notices: events the checkers dropped before this reader got them.
    pub missed: u64,
    /// Messages that were not cell events.
    pub unknown: u64,
}

/// An event and the health checker (by index) that sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sourced {
    pub source: usize,
    pub event: CellEvent,
}

impl EventBook {
    /// Record an event; false if it was a repeat.
    pub fn push(&mut self, source: usize, event: CellEvent) -> bool {
        let key = (source, event.kind as u8, event.cell_id.clone(), event.at_ms);
        if !self.seen.insert(key) {
            return false;
        }
        self.events.push(Sourced { source, event });
        true
    }

    pub fn events(&self) -> &[Sourced] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// A kill to match against the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death<'a> {
    pub victim: &'a str,
    pub role: &'a str,
    /// Wall clock just before the SIGKILL, ms since the Unix epoch.
    pub kill_ms: i64,
}

/// What the events say about a [`Death`], times in ms since the Unix epoch (each the earliest
/// any checker recorded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// The first `dead` event of the victim.
    pub dead_at_ms: Option<i64>,
    /// The checker that declared it first.
    pub dead_source: Option<usize>,
    /// The first `replaced` event naming the victim as parent: the factory accepted a request.
    pub requested_at_ms: Option<i64>,
    pub replacement: Option<Replacement>,
    /// New cells of the role naming the victim as parent (more than one would be a duplicate
    /// replacement).
    pub candidates: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replacement {
    pub cell_id: String,
    pub born_at_ms: Option<i64>,
    pub serving_at_ms: Option<i64>,
}

impl Replacement {
    /// When it was first seen serving, or failing that born (a cell whose first heartbeat says
    /// `serving` gets both events at once).
    pub fn up_at_ms(&self) -> Option<i64> {
        self.serving_at_ms.or(self.born_at_ms)
    }
}

/// Match `death` against `events`: only events at or after the kill count.
pub fn match_death(death: &Death<'_>, events: &[Sourced]) -> Matched {
    let mut out = Matched::default();
    let after = events.iter().filter(|s| s.event.at_ms >= death.kill_ms);
    let earliest = |slot: &mut Option<i64>, at: i64| {
        if slot.is_none_or(|t| at < t) {
            *slot = Some(at);
        }
    };
    // Per candidate replacement: (cell id, born, serving).
    let mut cands: Vec<Replacement> = Vec::new();
    for s in after {
        let e = &s.event;
        match e.kind {
            EventKind::Dead
                if e.cell_id == death.victim && out.dead_at_ms.is_none_or(|t| e.at_ms < t) =>
            {
                out.dead_at_ms = Some(e.at_ms);
                out.dead_source = Some(s.source);
            }
            EventKind::Replaced if e.parent.as_deref() == Some(death.victim) => {
                earliest(&mut out.requested_at_ms, e.at_ms);
            }
            EventKind::Born | EventKind::Serving
                if e.parent.as_deref() == Some(death.victim)
                    && e.role == death.role
                    && e.cell_id != death.victim =>
            {
                let i = match cands.iter().position(|c| c.cell_id == e.cell_id) {
                    Some(i) => i,
                    None => {
                        cands.push(Replacement {
                            cell_id: e.cell_id.clone(),
                            born_at_ms: None,
                            serving_at_ms: None,
                        });
                        cands.len() - 1
                    }
                };
                let c = &mut cands[i];
                if e.kind == EventKind::Born {
                    earliest(&mut c.born_at_ms, e.at_ms);
                } else {
                    earliest(&mut c.serving_at_ms, e.at_ms);
                }
            }
            _ => {}
        }
    }
    out.candidates = cands.len();
    // The first to come up (serving, or born when not yet serving) is the replacement.
    out.replacement = cands.into_iter().min_by_key(|c| {
        (
            c.serving_at_ms.is_none(),
            c.up_at_ms().unwrap_or(i64::MAX),
            c.cell_id.clone(),
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, id: &str, role: &str, at_ms: i64, parent: Option<&str>) -> CellEvent {
        CellEvent {
            kind,
            cell_id: id.into(),
            role: role.into(),
            at_ms,
            reason: String::new(),
            parent: parent.map(str::to_owned),
        }
    }

    fn book(events: &[(usize, CellEvent)]) -> EventBook {
        let mut b = EventBook::default();
        for (s, e) in events {
            b.push(*s, e.clone());
        }
        b
    }

    #[test]
    fn detection_and_replacement_are_the_earliest_any_checker_saw() {
        use EventKind::*;
        let b = book(&[
            // Before the kill: a child of the victim from an earlier division does not count.
            (0, ev(Born, "api-9", "api", 900, Some("api-1"))),
            (0, ev(Dead, "api-1", "api", 1700, None)),
            (1, ev(Dead, "api-1", "api", 1650, None)),
            (1, ev(Replaced, "api-5", "api", 1660, Some("api-1"))),
            // Another role's cell naming the same parent id is not this replacement.
            (1, ev(Born, "crawler-5", "crawler", 1700, Some("api-1"))),
            (0, ev(Born, "api-5", "api", 2400, Some("api-1"))),
            (1, ev(Born, "api-5", "api", 2390, Some("api-1"))),
            (1, ev(Serving, "api-5", "api", 2390, Some("api-1"))),
            (0, ev(Serving, "api-5", "api", 2400, Some("api-1"))),
            // A different death's replacement.
            (0, ev(Serving, "api-6", "api", 2000, Some("api-2"))),
        ]);
        let m = match_death(
            &Death {
                victim: "api-1",
                role: "api",
                kill_ms: 1000,
            },
            b.events(),
        );
        assert_eq!(m.dead_at_ms, Some(1650));
        assert_eq!(m.dead_source, Some(1));
        assert_eq!(m.requested_at_ms, Some(1660));
        assert_eq!(m.candidates, 1);
        let r = m.replacement.expect("replaced");
        assert_eq!(r.cell_id, "api-5");
        assert_eq!((r.born_at_ms, r.serving_at_ms), (Some(2390), Some(2390)));
    }

    #[test]
    fn a_replacement_born_but_not_yet_serving_still_matches_and_serving_wins() {
        use EventKind::*;
        let death = Death {
            victim: "fd-1",
            role: "frontdoor",
            kill_ms: 0,
        };
        let mut b = book(&[(0, ev(Born, "fd-7", "frontdoor", 500, Some("fd-1")))]);
        let m = match_death(&death, b.events());
        assert_eq!(m.dead_at_ms, None);
        let r = m.replacement.expect("born");
        assert_eq!((r.serving_at_ms, r.up_at_ms()), (None, Some(500)));
        // A second candidate that reaches serving is preferred over one only born.
        b.push(0, ev(Born, "fd-8", "frontdoor", 600, Some("fd-1")));
        b.push(0, ev(Serving, "fd-8", "frontdoor", 800, Some("fd-1")));
        let m = match_death(&death, b.events());
        assert_eq!(m.candidates, 2);
        assert_eq!(m.replacement.expect("serving").cell_id, "fd-8");
    }

    #[test]
    fn the_book_drops_replayed_events() {
        let e = ev(EventKind::Dead, "a", "api", 5, None);
        let mut b = EventBook::default();
        assert!(b.push(0, e.clone()));
        assert!(!b.push(0, e.clone()));
        // The same event from the other checker is its own observation.
        assert!(b.push(1, e));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn no_events_no_match() {
        let m = match_death(
            &Death {
                victim: "x",
                role: "api",
                kill_ms: 0,
            },
            &[],
        );
        assert_eq!(m, Matched::default());
    }
}
