//! What the organism says about itself while the load runs, read from outside as `cell status`
//! reads it: the registry (`GET /cells` on a health checker: cells by role, state, pressure),
//! the purse (`GET /pool` on a factory: spend against the caps; a 404 means no pool, nothing
//! spent), and the life events (`GET /events` on every health checker, server-sent).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use protocol::control::{CellEvent, CellState, CellsResponse, EventKind};
use protocol::events::{SseParser, StreamItem};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// One role in the registry at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleSample {
    /// Live cells (every state but draining).
    pub cells: u32,
    pub draining: u32,
    pub pressure_mean: f64,
    pub pressure_max: f64,
}

/// The purse, from a factory's `/pool` (micros: millionths of the currency).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spend {
    pub committed_per_hour_micros: i64,
    pub cap_per_hour_micros: i64,
    pub spent_month_micros: i64,
    pub committed_month_micros: i64,
    pub cap_per_month_micros: i64,
    pub spending_servers: u64,
}

/// The organism at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OrganismSample {
    /// The registry answered.
    pub registry: bool,
    pub roles: BTreeMap<String, RoleSample>,
    /// None: no pool (nothing is spent) or no factory answered.
    pub spend: Option<Spend>,
}

/// A registry answer, reduced.
pub fn sample_of(view: &CellsResponse) -> BTreeMap<String, RoleSample> {
    view.roles
        .iter()
        .map(|(role, cells)| {
            let live: Vec<f64> = cells
                .iter()
                .filter(|c| c.state != CellState::Draining)
                .map(|c| c.pressure)
                .collect();
            let draining = (cells.len() - live.len()) as u32;
            let mean = if live.is_empty() {
                0.0
            } else {
                live.iter().sum::<f64>() / live.len() as f64
            };
            let max = live.iter().copied().fold(0.0, f64::max);
            (
                role.clone(),
                RoleSample {
                    cells: live.len() as u32,
                    draining,
                    pressure_mean: mean,
                    pressure_max: max,
                },
            )
        })
        .collect()
}

/// Reads the registry and the purse.
pub struct Sampler {
    pub registry: protocol::client::CellsClient,
    pub factories: Vec<String>,
    pub client: reqwest::Client,
    /// A factory said this organism has no pool: stop asking.
    no_pool: bool,
}

impl Sampler {
    pub fn new(healthcheckers: Vec<String>, factories: Vec<String>) -> anyhow::Result<Sampler> {
        let client = reqwest::Client::builder()
            .no_proxy()
            // In cluster mode `/cells`, `/events` and `/pool` take the read token.
            .default_headers(control::read_headers_from_env())
            .timeout(Duration::from_millis(800))
            .build()?;
        Ok(Sampler {
            registry: protocol::client::CellsClient::with_http(
                client.clone(),
                healthcheckers,
                None,
            ),
            factories,
            client,
            no_pool: false,
        })
    }

    /// The registry's cells now (for chaos), if a checker answers.
    pub async fn cells(&self) -> Option<CellsResponse> {
        if self.registry.healthcheckers().is_empty() {
            return None;
        }
        self.registry.read().await.ok()
    }

    pub async fn sample(&mut self) -> OrganismSample {
        let view = self.cells().await;
        let spend = self.spend().await;
        OrganismSample {
            registry: view.is_some(),
            roles: view.as_ref().map(sample_of).unwrap_or_default(),
            spend,
        }
    }

    async fn spend(&mut self) -> Option<Spend> {
        if self.no_pool {
            return None;
        }
        for f in &self.factories {
            let Ok(resp) = self.client.get(format!("{f}/pool")).send().await else {
                continue;
            };
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                self.no_pool = true;
                return None;
            }
            let Ok(pool) = resp.json::<serde_json::Value>().await else {
                continue;
            };
            let s = &pool["spend"];
            let m = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
            return Some(Spend {
                committed_per_hour_micros: m(&s["committed_per_hour"]),
                cap_per_hour_micros: m(&s["caps"]["per_hour"]),
                spent_month_micros: m(&s["spent_month"]),
                committed_month_micros: m(&s["committed_month"]),
                cap_per_month_micros: m(&s["caps"]["per_month"]),
                spending_servers: s["spending_servers"].as_u64().unwrap_or(0),
            });
        }
        None
    }

    pub fn has_pool(&self) -> bool {
        !self.no_pool
    }
}

/// A life event as the timeline keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifeEvent {
    /// Milliseconds after the run's start (negative: before it).
    pub t_ms: i64,
    pub kind: String,
    pub role: String,
    pub cell_id: String,
    #[serde(default)]
    pub parent: Option<String>,
    pub reason: String,
    /// Who told: `registry` (the health checkers) or `chaos` (the harness).
    pub source: String,
}

/// The events kept: each transition once, whichever checker told it first (every checker
/// records what it sees; the second checker's record of the same transition, within a few
/// seconds, is a repeat).
#[derive(Debug, Default)]
pub struct EventLog {
    events: Vec<LifeEvent>,
    last: HashMap<(String, String), i64>,
    pub repeats: u64,
    /// Events the checkers dropped before this reader got them (`lagged`).
    pub missed: u64,
}

/// Two records of one transition by two checkers fall within this.
const SAME_TRANSITION_MS: i64 = 5_000;

impl EventLog {
    /// Keep `event` (stamped on the checkers' clock, ms since the epoch) unless it is a repeat
    /// or came before the run; `start_ms` is the run's start on the same clock.
    pub fn push(&mut self, event: &CellEvent, start_ms: i64) -> bool {
        if event.at_ms < start_ms || event.kind == EventKind::Unknown {
            return false;
        }
        let kind = event.kind.as_str().to_string();
        let key = (kind.clone(), event.cell_id.clone());
        if let Some(prev) = self.last.get(&key) {
            if (event.at_ms - prev).abs() < SAME_TRANSITION_MS {
                self.repeats += 1;
                return false;
            }
        }
        self.last.insert(key, event.at_ms);
        self.events.push(LifeEvent {
            t_ms: event.at_ms - start_ms,
            kind,
            role: event.role.clone(),
            cell_id: event.cell_id.clone(),
            parent: event.parent.clone(),
            reason: event.reason.clone(),
            source: "registry".into(),
        });
        true
    }

    pub fn push_chaos(&mut self, event: LifeEvent) {
        self.events.push(event);
    }

    /// Every event kept, by time.
    pub fn events(&self) -> Vec<LifeEvent> {
        let mut v = self.events.clone();
        v.sort_by_key(|e| e.t_ms);
        v
    }
}

/// Follow every health checker's event stream until `stop`, reconnecting when one ends.
pub fn follow_events(
    healthcheckers: &[String],
    log: Arc<Mutex<EventLog>>,
    start_ms: i64,
    stop: CancellationToken,
) {
    for hc in healthcheckers {
        let (url, log, stop) = (hc.clone(), log.clone(), stop.clone());
        tokio::spawn(async move { follow(url, log, start_ms, stop).await });
    }
}

async fn follow(url: String, log: Arc<Mutex<EventLog>>, start_ms: i64, stop: CancellationToken) {
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .default_headers(control::read_headers_from_env())
        .connect_timeout(Duration::from_secs(1))
        .build()
    else {
        return;
    };
    while !stop.is_cancelled() {
        let sent = client
            .get(format!("{url}/events?since=0"))
            .header("accept", "text/event-stream")
            .send()
            .await;
        if let Ok(resp) = sent {
            if resp.status().is_success() {
                let mut body = resp.bytes_stream();
                let mut parser = SseParser::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = body.next() => chunk,
                        () = stop.cancelled() => None,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    let messages = parser.feed(&chunk);
                    if messages.is_empty() {
                        continue;
                    }
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    for msg in messages {
                        match protocol::events::interpret(&msg) {
                            StreamItem::Cell(event) => {
                                log.push(&event, start_ms);
                            }
                            StreamItem::Lagged(n) => log.missed += n,
                            StreamItem::Unknown => {}
                        }
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, cell: &str, at_ms: i64) -> CellEvent {
        CellEvent {
            kind,
            cell_id: cell.into(),
            role: "api".into(),
            at_ms,
            reason: "why".into(),
            parent: None,
        }
    }

    #[test]
    fn a_transition_told_by_two_checkers_is_kept_once() {
        let mut log = EventLog::default();
        assert!(
            !log.push(&event(EventKind::Born, "a", 900), 1000),
            "before the run"
        );
        assert!(log.push(&event(EventKind::Born, "a", 1100), 1000));
        assert!(!log.push(&event(EventKind::Born, "a", 1150), 1000));
        assert!(log.push(&event(EventKind::Dead, "a", 1200), 1000));
        // The same kind much later is another transition (a second division).
        assert!(log.push(&event(EventKind::Born, "a", 9000), 1000));
        let events = log.events();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].t_ms, 100);
        assert_eq!(events[1].kind, "dead");
        assert_eq!(log.repeats, 1);
    }

    #[test]
    fn the_registry_is_reduced_per_role() {
        let view: CellsResponse = serde_json::from_value(serde_json::json!({
            "roles": {"api": [
                {"cell_id": "a", "role": "api", "addr": "x", "state": "serving", "pressure": 0.5,
                 "age_ms": 1, "last_seen_ms": 1, "phi": 0.1},
                {"cell_id": "b", "role": "api", "addr": "y", "state": "serving", "pressure": 1.5,
                 "age_ms": 1, "last_seen_ms": 1, "phi": 0.1},
                {"cell_id": "c", "role": "api", "addr": "z", "state": "draining", "pressure": 0.0,
                 "age_ms": 1, "last_seen_ms": 1, "phi": 0.1}
            ]}
        }))
        .expect("registry");
        let s = sample_of(&view);
        assert_eq!(
            s["api"],
            RoleSample {
                cells: 2,
                draining: 1,
                pressure_mean: 1.0,
                pressure_max: 1.5
            }
        );
    }
}
