//! The event log: every transition in a cell's life, numbered from 1 in the order this health
//! checker recorded it, kept in a bounded ring and streamed live (`GET /events`, Server-Sent
//! Events, `?since=N` or `Last-Event-ID` to replay what came after event N).
//!
//! A reader that falls further behind than the ring holds is told how many events it missed (an
//! SSE event `lagged`) and continues with the oldest one still kept; the writer never waits for
//! readers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Mutex;

use axum::response::sse::Event;
use futures::stream::{self, Stream, StreamExt};
use protocol::control::CellEvent;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Events kept for replay by default.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Events sent to one reader per wake-up at most.
const BATCH: usize = 256;

pub struct EventLog {
    ring: Mutex<Ring>,
    /// The number of the last event recorded; readers wait on it.
    latest: watch::Sender<u64>,
}

struct Ring {
    capacity: usize,
    /// The number the next event gets.
    next: u64,
    events: VecDeque<(u64, CellEvent)>,
}

/// What a reader gets after event `after`.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// Events dropped from the ring before the reader got them.
    pub missed: u64,
    pub events: Vec<(u64, CellEvent)>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring {
                capacity: capacity.max(1),
                next: 1,
                events: VecDeque::new(),
            }),
            latest: watch::Sender::new(0),
        }
    }

    /// Record an event; returns its number.
    pub fn push(&self, event: CellEvent) -> u64 {
        let number = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let number = ring.next;
            ring.next += 1;
            if ring.events.len() >= ring.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back((number, event));
            number
        };
        self.latest.send_replace(number);
        number
    }

    /// The number of the last event recorded (0 before any).
    pub fn latest(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Up to `max` events numbered above `after`, oldest first.
    pub fn after(&self, after: u64, max: usize) -> Replay {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let first = ring.events.front().map_or(ring.next, |(n, _)| *n);
        let missed = first.saturating_sub(after.saturating_add(1));
        // Numbers are consecutive, so the position of `after + 1` is arithmetic.
        let skip = after.saturating_add(1).saturating_sub(first) as usize;
        let events = ring.events.iter().skip(skip).take(max).cloned().collect();
        Replay { missed, events }
    }

    /// Everything numbered above `after`, then every new event as it is recorded, as SSE events
    /// (`id` = the event number, `event` = its kind, `data` = the [`CellEvent`] as JSON). Ends when
    /// `shutdown` is cancelled.
    pub fn stream(
        self: std::sync::Arc<Self>,
        after: u64,
        shutdown: CancellationToken,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        let rx = self.latest.subscribe();
        stream::unfold(
            (self, after, rx, shutdown),
            |(log, mut after, mut rx, shutdown)| async move {
                loop {
                    let replay = log.after(after, BATCH);
                    if replay.missed > 0 || !replay.events.is_empty() {
                        let mut out = Vec::with_capacity(replay.events.len() + 1);
                        if replay.missed > 0 {
                            out.push(
                                Event::default()
                                    .event("lagged")
                                    .data(format!("{{\"missed\":{}}}", replay.missed)),
                            );
                        }
                        for (number, event) in replay.events {
                            after = number;
                            out.push(sse_event(number, &event));
                        }
                        return Some((out, (log, after, rx, shutdown)));
                    }
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                        }
                        () = shutdown.cancelled() => return None,
                    }
                }
            },
        )
        .flat_map(|batch| stream::iter(batch.into_iter().map(Ok)))
    }
}

fn sse_event(number: u64, event: &CellEvent) -> Event {
    let kind = serde_json::to_value(event.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "cell".into());
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Event::default()
        .id(number.to_string())
        .event(kind)
        .data(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::control::EventKind;

    fn event(id: &str) -> CellEvent {
        CellEvent {
            kind: EventKind::Born,
            cell_id: id.into(),
            role: "api".into(),
            at_ms: 0,
            reason: String::new(),
            parent: None,
        }
    }

    #[test]
    fn ring_replays_by_number_and_reports_what_it_dropped() {
        let log = EventLog::new(3);
        assert_eq!(log.after(0, 10).events, vec![]);
        for id in ["a", "b", "c", "d", "e"] {
            log.push(event(id));
        }
        assert_eq!(log.latest(), 5);
        let r = log.after(0, 10);
        assert_eq!(r.missed, 2);
        let ids: Vec<u64> = r.events.iter().map(|(n, _)| *n).collect();
        assert_eq!(ids, [3, 4, 5]);
        let r = log.after(3, 10);
        assert_eq!((r.missed, r.events.len()), (0, 2));
        assert_eq!(r.events[0].1.cell_id, "d");
        assert_eq!(log.after(4, 1).events.len(), 1);
        assert_eq!(log.after(5, 10).events.len(), 0);
        assert_eq!(log.after(99, 10).events.len(), 0);
    }
}
