//! A cell's pressure, measured by its role and reported in its heartbeats.
//!
//! The role gives a sampler (pressure, 1.0 = at capacity, and the signals behind it, by name);
//! [`report`] samples it every heartbeat interval, puts it in the cell's [`Vital`] (which the
//! heartbeat loop sends) and publishes the pressure on a `watch` channel, which the role's own
//! policy may follow (the api's overload controller does). The homeostasis controller will
//! follow the same channel.

use std::time::Duration;

use control::heartbeat::Vital;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A monotonically growing counter turned into a rate: each call gives the events per second
/// since the previous call (0 on the first). For roles whose load is a request rate (a front
/// door's requests, a health checker's heartbeats).
#[derive(Debug, Default)]
pub struct Rate(std::sync::Mutex<Option<(std::time::Instant, u64)>>);

impl Rate {
    pub fn per_sec(&self, total: u64) -> f64 {
        let now = std::time::Instant::now();
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = match *last {
            Some((at, before)) => {
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    total.saturating_sub(before) as f64 / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        *last = Some((now, total));
        rate
    }
}

/// Sample every `every` until `stop`; the returned receiver follows the pressure.
pub(crate) fn report(
    vital: watch::Sender<Vital>,
    every: Duration,
    stop: CancellationToken,
    sample: impl Fn() -> (f64, Vec<(&'static str, f64)>) + Send + 'static,
) -> watch::Receiver<f64> {
    let (tx, rx) = watch::channel(0.0);
    tokio::spawn(async move {
        loop {
            let (pressure, signals) = sample();
            // The same figures for Prometheus (signal names are the roles' constants: bounded).
            metrics::gauge!("cell_pressure_ratio").set(pressure);
            for (name, value) in &signals {
                metrics::gauge!("cell_pressure_signal", "signal" => *name).set(*value);
            }
            vital.send_modify(|v| {
                v.pressure = pressure;
                v.signals = signals.iter().map(|(k, x)| (k.to_string(), *x)).collect();
            });
            tx.send_replace(pressure);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::{CellContext, CellSpec};

    #[tokio::test(start_paused = true)]
    async fn sampled_pressure_reaches_the_heartbeat_and_the_watchers() {
        let spec = CellSpec {
            role: "crawler".into(),
            cell_id: "crawler-1".into(),
            parent: None,
            healthcheckers: Vec::new(),
            factories: Vec::new(),
            heartbeat: Duration::from_millis(100),
            grace: Duration::from_secs(1),
            homeostasis: None,
        };
        let ctx = CellContext::detached(spec, "127.0.0.1:1".parse().expect("addr"));
        let level = Arc::new(AtomicU64::new(0));
        let sampled = level.clone();
        let mut rx = ctx.report_pressure(move || {
            let p = sampled.load(Ordering::SeqCst) as f64 / 10.0;
            (p, vec![("slots", p)])
        });
        level.store(15, Ordering::SeqCst);
        rx.changed().await.expect("sampled");
        while *rx.borrow_and_update() < 1.5 {
            rx.changed().await.expect("sampled again");
        }
        let vital = ctx.0.vital.borrow().clone();
        assert_eq!(vital.pressure, 1.5);
        assert_eq!(vital.signals.get("slots"), Some(&1.5));
    }
}
