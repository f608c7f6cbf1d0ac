//! The CPU this crawler uses and the share of its machine's CPU in use, for the crawler's
//! pressure: the queue's backlog asks for more crawlers only while this one is busy on its own
//! CPU ([`crate::worker::WorkerConfig::own_cpu_full`]) and the machine a new one would start on
//! has CPU to give it ([`crate::worker::WorkerConfig::machine_busy_full`]).
//!
//! `sysinfo` reads the kernel's counters (`/proc/stat` on Linux) and turns two readings into a
//! share, every half second. Each measure is smoothed the way that errs toward not dividing: the
//! machine's share rises at once with a reading (a crawl saturates the machine within a second,
//! and the controller confirms growth over 1.5 s: a slow rise would let the role divide first)
//! and falls smoothed, so one quiet moment does not undo the hold; the crawler's own CPU is an
//! average both ways, so one busy moment does not open it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::worker::WorkerGauges;

/// How often the CPU is read (sysinfo's shortest meaningful interval on Linux is 200 ms).
const EVERY: Duration = Duration::from_millis(500);
/// The weight of the newest reading in a smoothed measure.
const ALPHA: f64 = 0.3;

/// The average after `reading`, from `previous` (none before the first), up and down alike.
pub fn average(previous: Option<f64>, reading: f64) -> f64 {
    let reading = reading.max(0.0);
    match previous {
        Some(p) => p + ALPHA * (reading - p),
        None => reading,
    }
}

/// The measure after `reading`, from `previous` (none before the first): up at once, down
/// smoothed. A negative reading (a counter's glitch) counts as 0.
pub fn smooth(previous: Option<f64>, reading: f64) -> f64 {
    let reading = reading.max(0.0);
    match previous {
        Some(p) if reading < p => p + ALPHA * (reading - p),
        _ => reading,
    }
}

/// Measure this process's CPU, and the machine's where `machine` (new crawlers start on it),
/// into `gauges` every half second until `shutdown`.
pub fn measure(gauges: Arc<WorkerGauges>, machine: bool, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let me = sysinfo::get_current_pid().ok();
        let mut system = sysinfo::System::new();
        let refresh = |system: &mut sysinfo::System| {
            system.refresh_cpu_usage();
            if let Some(me) = me {
                system.refresh_processes_specifics(
                    sysinfo::ProcessesToUpdate::Some(&[me]),
                    true,
                    sysinfo::ProcessRefreshKind::nothing().with_cpu(),
                );
            }
        };
        // The first refresh only sets the baseline the next one is measured against.
        refresh(&mut system);
        let (mut machine_share, mut own_cores) = (None, None);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            refresh(&mut system);
            if machine {
                let reading = (f64::from(system.global_cpu_usage()) / 100.0).min(1.0);
                let share = smooth(machine_share, reading);
                machine_share = Some(share);
                gauges
                    .machine_busy_permille
                    .store((share * 1000.0).round() as usize, Relaxed);
            }
            if let Some(process) = me.and_then(|me| system.process(me)) {
                // In cores (sysinfo: percent of one core).
                let cores = average(own_cores, f64::from(process.cpu_usage()) / 100.0);
                own_cores = Some(cores);
                gauges
                    .own_cpu_millicores
                    .store((cores * 1000.0).round() as usize, Relaxed);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_rises_at_once_and_falls_smoothed() {
        // From an idle machine to a saturated one in one reading.
        let busy = smooth(Some(smooth(None, 0.1)), 1.0);
        assert_eq!(busy, 1.0);
        // One quiet reading (20 %) does not undo it: 1.0 - 0.3 * 0.8.
        let after = smooth(Some(busy), 0.2);
        assert!((after - 0.76).abs() < 1e-9, "{after}");
        // Staying quiet, it comes down.
        let later = (0..10).fold(after, |p, _| smooth(Some(p), 0.2));
        assert!(later < 0.25, "{later}");
        // Cores may be more than one; a negative reading (a counter's glitch) is 0.
        assert_eq!(smooth(Some(0.5), 1.7), 1.7);
        assert_eq!(smooth(None, -0.1), 0.0);
    }

    #[test]
    fn one_busy_moment_does_not_make_a_busy_crawler() {
        // A quarter of a core, then one reading at a core and a half.
        let idle = average(Some(average(None, 0.25)), 0.25);
        let spike = average(Some(idle), 1.5);
        assert!((spike - 0.625).abs() < 1e-9, "{spike}");
        assert!(spike < crate::worker::WorkerConfig::default().own_cpu_full);
        // Sustained, it gets there.
        let busy = (0..6).fold(spike, |p, _| average(Some(p), 1.5));
        assert!(busy > 1.2, "{busy}");
    }

    #[tokio::test]
    async fn the_machine_is_measured_into_the_gauges() {
        let gauges = Arc::new(WorkerGauges::default());
        let stop = CancellationToken::new();
        tokio::time::pause();
        measure(gauges.clone(), true, stop.clone());
        // Let the task take its baseline, then pass the second it waits.
        tokio::task::yield_now().await;
        tokio::time::advance(EVERY + Duration::from_millis(1)).await;
        let measured = || {
            gauges.machine_busy_permille.load(Relaxed) != crate::worker::UNMEASURED
                && gauges.own_cpu_millicores.load(Relaxed) != crate::worker::UNMEASURED
        };
        for _ in 0..100 {
            if measured() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let permille = gauges.machine_busy_permille.load(Relaxed);
        assert!(permille <= 1000, "measured {permille} per mille");
        let millicores = gauges.own_cpu_millicores.load(Relaxed);
        assert!(millicores < 64_000, "measured {millicores} millicores");
        stop.cancel();
    }
}
