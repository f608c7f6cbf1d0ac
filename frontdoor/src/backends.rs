//! The front door's backends: which api cells are live, from the health checkers' `GET /cells`
//! (read with `protocol::client::CellsClient`), polled and merged into a `watch` channel of
//! [`Backend`]s that the router reads on every request.
//!
//! The channel is the seam: [`BackendPoller`] feeds it in a running cell, a test feeds it by
//! hand (`AppState::with_backends`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use protocol::client::CellsClient;
use protocol::control::{CellRecord, CellState, CellsResponse};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The role whose cells the frontdoor routes to.
pub const API_ROLE: &str = "api";

/// One api cell the frontdoor may route to.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub cell_id: String,
    /// Base URL, e.g. `http://127.0.0.1:7070`.
    pub addr: String,
    pub state: CellState,
    /// The cell's own pressure figure (1.0 = at capacity).
    pub pressure: f64,
}

impl Backend {
    /// A serving backend at no pressure.
    pub fn new(cell_id: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            cell_id: cell_id.into(),
            addr: addr.into(),
            state: CellState::Serving,
            pressure: 0.0,
        }
    }

    /// True for the states in which an api cell takes client traffic. A dividing cell keeps
    /// serving while its child starts; joining, draining, retired and dead cells get nothing.
    pub fn routable(state: CellState) -> bool {
        matches!(
            state,
            CellState::Serving | CellState::Throttling | CellState::Dividing
        )
    }
}

/// The routable api cells in the union of several health checkers' views. A cell listed by
/// more than one is taken from the view that heard from it last.
pub fn live_apis<'a>(views: impl IntoIterator<Item = &'a CellsResponse>) -> Vec<Backend> {
    let mut freshest: BTreeMap<&str, &CellRecord> = BTreeMap::new();
    for view in views {
        for cell in view.roles.get(API_ROLE).into_iter().flatten() {
            if cell.role != API_ROLE {
                continue;
            }
            match freshest.get(cell.cell_id.as_str()) {
                Some(known) if known.last_seen_ms <= cell.last_seen_ms => {}
                _ => {
                    freshest.insert(&cell.cell_id, cell);
                }
            }
        }
    }
    freshest
        .into_values()
        .filter(|c| Backend::routable(c.state))
        .map(|c| Backend {
            cell_id: c.cell_id.clone(),
            addr: c.addr.clone(),
            state: c.state,
            pressure: if c.pressure.is_finite() {
                c.pressure
            } else {
                0.0
            },
        })
        .collect()
}

/// Polls every configured health checker, each on its own loop so that a slow one does not
/// hold the others back, and publishes the union of the views of those that answered their
/// last poll. A health checker that does not answer is skipped; when none answers, the last
/// published list stays (a registry outage is not mistaken for the death of every api).
pub struct BackendPoller {
    registry: CellsClient,
    every: Duration,
}

impl BackendPoller {
    /// Poll the health checkers `registry` reads (with the read token it presents) every
    /// `every`.
    pub fn new(registry: CellsClient, every: Duration) -> Self {
        Self { registry, every }
    }

    /// Poll until `shutdown`, publishing into `feed` whenever the live list changes.
    pub async fn run(self, feed: watch::Sender<Vec<Backend>>, shutdown: CancellationToken) {
        let healthcheckers = self.registry.healthcheckers().to_vec();
        if healthcheckers.is_empty() {
            tracing::warn!("no health checker configured: the frontdoor knows no api cell");
            return;
        }
        // Each health checker's last answer; `None` while it does not answer.
        let views: Arc<Mutex<Vec<Option<CellsResponse>>>> =
            Arc::new(Mutex::new(vec![None; healthcheckers.len()]));
        let mut loops = tokio::task::JoinSet::new();
        for (slot, hc) in healthcheckers.into_iter().enumerate() {
            let registry = self.registry.clone();
            let views = views.clone();
            let feed = feed.clone();
            let shutdown = shutdown.clone();
            let every = self.every;
            loops.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut was_down = false;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let answer = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        a = registry.fetch(&hc) => a,
                    };
                    let answer = match answer {
                        Ok(view) => {
                            if was_down {
                                tracing::info!(healthchecker = %hc, "health checker answers again");
                            }
                            was_down = false;
                            Some(view)
                        }
                        Err(e) => {
                            if !was_down {
                                tracing::warn!(healthchecker = %hc, error = %e,
                                    "health checker does not answer; skipping it");
                            }
                            was_down = true;
                            metrics::counter!("frontdoor_registry_poll_failures_total")
                                .increment(1);
                            None
                        }
                    };
                    let merged = {
                        let mut views = views.lock().unwrap_or_else(PoisonError::into_inner);
                        views[slot] = answer;
                        if views.iter().all(Option::is_none) {
                            None
                        } else {
                            Some(live_apis(views.iter().flatten()))
                        }
                    };
                    if let Some(live) = merged {
                        publish(&feed, live);
                    }
                }
            });
        }
        while loops.join_next().await.is_some() {}
    }
}

/// Replace the published list when it changed (pressure changes count: they move weights).
pub fn publish(feed: &watch::Sender<Vec<Backend>>, live: Vec<Backend>) {
    feed.send_if_modified(|current| {
        if *current == live {
            return false;
        }
        let before: Vec<&str> = current.iter().map(|b| b.cell_id.as_str()).collect();
        let after: Vec<&str> = live.iter().map(|b| b.cell_id.as_str()).collect();
        if before != after {
            tracing::info!(apis = ?after, "live api cells changed");
        }
        metrics::gauge!("frontdoor_live_apis").set(live.len() as f64);
        *current = live;
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: CellState, last_seen_ms: u64, pressure: f64) -> CellRecord {
        CellRecord {
            cell_id: id.into(),
            role: API_ROLE.into(),
            addr: format!("http://{id}.test"),
            state,
            pressure,
            parent: None,
            age_ms: 1000,
            last_seen_ms,
            phi: 0.0,
            pid: None,
            version: String::new(),
            build: String::new(),
            wire: Vec::new(),
        }
    }

    fn view(cells: Vec<CellRecord>) -> CellsResponse {
        let mut v = CellsResponse::default();
        v.roles.insert(API_ROLE.into(), cells);
        v
    }

    #[test]
    fn only_routable_api_cells_are_live() {
        let mut v = view(vec![
            record("a", CellState::Serving, 10, 0.5),
            record("b", CellState::Throttling, 10, 1.2),
            record("c", CellState::Draining, 10, 0.0),
            record("d", CellState::Joining, 10, 0.0),
            record("e", CellState::Retired, 10, 0.0),
            record("f", CellState::Dead, 10, 0.0),
            record("g", CellState::Dividing, 10, f64::NAN),
        ]);
        v.roles.insert(
            "crawler".into(),
            vec![CellRecord {
                role: "crawler".into(),
                ..record("x", CellState::Serving, 0, 0.0)
            }],
        );
        let live = live_apis([&v]);
        let ids: Vec<&str> = live.iter().map(|b| b.cell_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "g"]);
        assert_eq!(live[2].pressure, 0.0, "a NaN pressure is read as none");
    }

    #[test]
    fn views_are_merged_by_the_freshest_record() {
        let one = view(vec![
            record("a", CellState::Serving, 50, 0.0),
            record("b", CellState::Serving, 10, 0.0),
        ]);
        let two = view(vec![
            record("a", CellState::Draining, 5, 0.0),
            record("c", CellState::Serving, 10, 0.0),
        ]);
        let ids: Vec<String> = live_apis([&one, &two])
            .into_iter()
            .map(|b| b.cell_id)
            .collect();
        assert_eq!(
            ids,
            ["b", "c"],
            "the second view heard from a later: draining"
        );
    }
}
