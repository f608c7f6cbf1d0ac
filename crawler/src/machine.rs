//! The share of this machine's CPU in use, for a crawler's pressure: a backlog asks for more
//! crawlers only while the machine they would start on has CPU to give them
//! ([`crate::worker::WorkerConfig::machine_busy_full`]).
//!
//! `sysinfo` reads the kernel's counters (`/proc/stat` on Linux) and turns two readings into a
//! share; a reading every second is smoothed so one quiet second does not undo the hold (the
//! controller confirms growth over 1.5 s).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::worker::WorkerGauges;

/// How often the CPU is read.
const EVERY: Duration = Duration::from_secs(1);
/// The weight of the newest reading in the smoothed share.
const ALPHA: f64 = 0.5;

/// The smoothed share after `reading`, from `previous` (none before the first).
pub fn smooth(previous: Option<f64>, reading: f64) -> f64 {
    let reading = reading.clamp(0.0, 1.0);
    match previous {
        Some(p) => p + ALPHA * (reading - p),
        None => reading,
    }
}

/// Measure the machine's CPU into `gauges` every second until `shutdown`.
pub fn measure(gauges: Arc<WorkerGauges>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut system = sysinfo::System::new();
        // The first refresh only sets the baseline the next one is measured against.
        system.refresh_cpu_usage();
        let mut smoothed = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            system.refresh_cpu_usage();
            let share = smooth(smoothed, f64::from(system.global_cpu_usage()) / 100.0);
            smoothed = Some(share);
            gauges
                .machine_busy_permille
                .store((share * 1000.0).round() as usize, Relaxed);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_quiet_second_does_not_undo_a_saturated_machine() {
        let busy = smooth(Some(smooth(None, 1.0)), 1.0);
        assert_eq!(busy, 1.0);
        // A second at 20 %: still above the default mark's neighbourhood, not back to 0.2.
        let after = smooth(Some(busy), 0.2);
        assert!((after - 0.6).abs() < 1e-9, "{after}");
        // Readings outside 0..1 (a counter's glitch) are clamped.
        assert_eq!(smooth(None, 1.7), 1.0);
        assert_eq!(smooth(None, -0.1), 0.0);
    }

    #[tokio::test]
    async fn the_machine_is_measured_into_the_gauges() {
        let gauges = Arc::new(WorkerGauges::default());
        let stop = CancellationToken::new();
        tokio::time::pause();
        measure(gauges.clone(), stop.clone());
        // Let the task take its baseline, then pass the second it waits.
        tokio::task::yield_now().await;
        tokio::time::advance(EVERY + Duration::from_millis(1)).await;
        for _ in 0..100 {
            if gauges.machine_busy_permille.load(Relaxed) != crate::worker::UNMEASURED {
                break;
            }
            tokio::task::yield_now().await;
        }
        let permille = gauges.machine_busy_permille.load(Relaxed);
        assert!(permille <= 1000, "measured {permille} per mille");
        stop.cancel();
    }
}
