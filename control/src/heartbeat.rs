//! The heartbeat every cell pushes straight to every health checker (never through the queue,
//! so a broker outage is not mistaken for mass death).

use std::sync::Arc;
use std::time::Duration;

use protocol::control::{CellState, Heartbeat};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ControlClient;

/// What a cell says about itself; the beater fills in `seq`.
#[derive(Debug, Clone)]
pub struct Vital {
    pub state: CellState,
    pub pressure: f64,
    pub signals: std::collections::BTreeMap<String, f64>,
}

/// Who the cell is, for every heartbeat.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cell_id: String,
    pub role: String,
    pub addr: String,
    pub parent: Option<String>,
}

/// Beat every `interval` to every health checker until `shutdown`; then send one last heartbeat
/// with the state the cell is in then (draining or retired). `vital` is read at each beat.
pub fn spawn(
    client: Arc<ControlClient>,
    healthcheckers: Vec<String>,
    identity: Identity,
    interval: Duration,
    vital: watch::Receiver<Vital>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = ticker.tick() => false,
                _ = shutdown.cancelled() => true,
            };
            seq += 1;
            let v = vital.borrow().clone();
            let beat = Heartbeat {
                cell_id: identity.cell_id.clone(),
                role: identity.role.clone(),
                addr: identity.addr.clone(),
                state: v.state,
                pressure: v.pressure,
                signals: v.signals,
                version: env!("CARGO_PKG_VERSION").to_string(),
                parent: identity.parent.clone(),
                seq,
                interval_ms: interval.as_millis() as u64,
                pid: Some(std::process::id()),
            };
            let sends = healthcheckers.iter().map(|hc| {
                let client = client.clone();
                let beat = beat.clone();
                async move {
                    let r: anyhow::Result<()> = client
                        .send(hc, "/control/heartbeat", Heartbeat::KIND, &beat)
                        .await;
                    if let Err(e) = r {
                        metrics::counter!("cell_heartbeat_errors_total").increment(1);
                        tracing::debug!(error = %e, "heartbeat not delivered");
                    }
                }
            });
            futures::future::join_all(sends).await;
            if last {
                return;
            }
        }
    })
}
