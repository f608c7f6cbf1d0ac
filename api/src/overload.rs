//! The api cell's overload controller: an overloaded api asks the front doors for a smaller
//! share of traffic, and for its full share back when the load passes, rather than failing
//! requests. Weight = 1/pressure above pressure 1 (floor 0.1), else 1. A request is sent when
//! the weight moves by more than 0.1, at most once a second, to every front door the registry
//! lists, signed as this cell.
//!
//! The pressure it follows is the one the cell reports in its heartbeats ([`crate::Load`],
//! sampled by `lifecycle::CellContext::report_pressure`).

use std::sync::Arc;
use std::time::Duration;

use protocol::client::CellsClient;
use protocol::control::WeightRequest;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct WeightController {
    client: Arc<control::ControlClient>,
    cell_id: String,
    registry: CellsClient,
    sent: f64,
    last_sent: Option<tokio::time::Instant>,
}

impl WeightController {
    /// Ask, as `cell_id` through `client`, the front doors `registry` lists.
    pub fn new(
        client: Arc<control::ControlClient>,
        cell_id: String,
        registry: CellsClient,
    ) -> Self {
        Self {
            client,
            cell_id,
            registry,
            sent: 1.0,
            last_sent: None,
        }
    }

    /// The share of traffic an api at `pressure` asks for.
    pub fn weight_for(pressure: f64) -> f64 {
        if pressure > 1.0 {
            (1.0 / pressure).max(0.1)
        } else {
            1.0
        }
    }

    /// Follow the pressure until `stop`.
    pub async fn run(mut self, mut pressure: watch::Receiver<f64>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = pressure.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let p = *pressure.borrow_and_update();
            self.update(p).await;
        }
    }

    async fn update(&mut self, pressure: f64) {
        let weight = Self::weight_for(pressure);
        if (weight - self.sent).abs() <= 0.1 && !(weight == 1.0 && self.sent < 1.0) {
            return;
        }
        if self
            .last_sent
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_sent = Some(tokio::time::Instant::now());
        let frontdoors = match self.registry.addrs("frontdoor").await {
            Ok(frontdoors) => frontdoors,
            Err(e) => {
                tracing::debug!(error = %e, "no registry to find the front doors in");
                return;
            }
        };
        let request = WeightRequest {
            cell_id: self.cell_id.clone(),
            weight,
            reason: format!("pressure {pressure:.2}"),
        };
        let mut delivered = false;
        for fd in frontdoors {
            match self.client.ask(&fd, &request).await {
                Ok(()) => delivered = true,
                Err(e) => tracing::debug!(error = %e, "weight request not delivered"),
            }
        }
        if delivered {
            tracing::info!(weight, pressure, "asked the front doors for a new weight");
            self.sent = weight;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WeightController;

    #[test]
    fn weight_follows_pressure_above_capacity_only() {
        assert_eq!(WeightController::weight_for(0.0), 1.0);
        assert_eq!(WeightController::weight_for(1.0), 1.0);
        assert!((WeightController::weight_for(2.0) - 0.5).abs() < 1e-9);
        assert_eq!(WeightController::weight_for(100.0), 0.1);
    }
}
