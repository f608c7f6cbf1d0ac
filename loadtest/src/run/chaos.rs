//! Chaos during a run: every few seconds a random live cell of a role is killed (SIGKILL),
//! frozen (SIGSTOP, SIGCONT later) or slowed (a SIGSTOP/SIGCONT duty cycle). The victims come
//! from the registry, which carries each cell's pid.
//!
//! Only cells of this machine are touched: a cell whose address is not loopback, or whose pid
//! is not a `cell` process here, is never signalled (a pid from another machine would name an
//! unrelated local process). Every process stopped is continued when the run ends, however it
//! ends.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use rand::seq::IndexedRandom as _;
use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::organism_view::{EventLog, LifeEvent, Sampler};
use super::profile::{ChaosAction, ChaosSpec};
use crate::organism::signal;

/// Processes chaos has stopped and not yet continued.
#[derive(Default)]
pub struct Stopped(Mutex<BTreeSet<u32>>);

impl Stopped {
    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self, pid: u32) {
        self.set().insert(pid);
        signal(pid, Signal::SIGSTOP);
    }

    fn cont(&self, pid: u32) {
        signal(pid, Signal::SIGCONT);
        self.set().remove(&pid);
    }

    /// Continue every process still stopped.
    pub fn continue_all(&self) {
        let pids: Vec<u32> = std::mem::take(&mut *self.set()).into_iter().collect();
        for pid in pids {
            signal(pid, Signal::SIGCONT);
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.continue_all();
    }
}

/// Is `pid` a `cell` process of this machine?
pub fn is_local_cell(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let exe = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let exe = String::from_utf8_lossy(exe);
    std::path::Path::new(exe.as_ref())
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with("cell"))
}

fn is_loopback(addr: &str) -> bool {
    let host = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let host = host.split('/').next().unwrap_or(host);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Act as `spec` says until its stop time or `stop`, recording each action in `log`.
pub async fn run(
    spec: ChaosSpec,
    end: Duration,
    sampler: Arc<tokio::sync::Mutex<Sampler>>,
    log: Arc<Mutex<EventLog>>,
    stopped: Arc<Stopped>,
    start: Instant,
    stop: CancellationToken,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let every = Duration::from_secs_f64(spec.every_secs);
    let first = Duration::from_secs_f64(spec.start_secs.unwrap_or(spec.every_secs));
    let last = spec.stop_secs.map_or(end, Duration::from_secs_f64).min(end);
    let mut at = first;
    let mut turn = 0usize;
    while at <= last {
        tokio::select! {
            () = tokio::time::sleep_until(start + at) => {}
            () = stop.cancelled() => return,
        }
        let role = &spec.roles[turn % spec.roles.len()];
        turn += 1;
        at += every;
        let view = sampler.lock().await.cells().await;
        let t_ms = start.elapsed().as_millis() as i64;
        let note = |cell_id: String, reason: String| {
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_chaos(LifeEvent {
                    t_ms,
                    kind: format!("chaos_{}", spec.action.name()),
                    role: role.clone(),
                    cell_id,
                    parent: None,
                    reason,
                    source: "chaos".into(),
                });
        };
        let Some(view) = view else {
            note(String::new(), "skipped: no health checker answered".into());
            continue;
        };
        let candidates: Vec<(String, u32)> = view
            .roles
            .get(role)
            .into_iter()
            .flatten()
            .filter(|c| c.state == protocol::control::CellState::Serving && is_loopback(&c.addr))
            .filter_map(|c| Some((c.cell_id.clone(), c.pid?)))
            .filter(|(_, pid)| is_local_cell(*pid))
            .collect();
        let Some((cell_id, pid)) = candidates.choose(&mut rng).cloned() else {
            note(
                String::new(),
                format!("skipped: no serving {role} cell of this machine"),
            );
            continue;
        };
        let hold = Duration::from_secs_f64(spec.for_secs);
        match spec.action {
            ChaosAction::Kill => {
                signal(pid, Signal::SIGKILL);
                note(cell_id, format!("SIGKILL pid {pid}"));
            }
            ChaosAction::Freeze => {
                stopped.stop(pid);
                note(
                    cell_id,
                    format!(
                        "SIGSTOP pid {pid}, SIGCONT after {:.1} s",
                        hold.as_secs_f64()
                    ),
                );
                let (stopped, stop) = (stopped.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(hold) => {}
                        () = stop.cancelled() => {}
                    }
                    stopped.cont(pid);
                });
            }
            ChaosAction::Slow => {
                let (stop_ms, period_ms) = (spec.slow_stop_ms, spec.slow_period_ms);
                note(
                    cell_id,
                    format!(
                        "pid {pid} stopped {stop_ms} ms of every {period_ms} ms for {:.1} s",
                        hold.as_secs_f64()
                    ),
                );
                let (stopped, stop) = (stopped.clone(), stop.clone());
                tokio::spawn(async move {
                    let until = Instant::now() + hold;
                    while Instant::now() < until && !stop.is_cancelled() {
                        stopped.stop(pid);
                        tokio::time::sleep(Duration::from_millis(stop_ms)).await;
                        stopped.cont(pid);
                        tokio::time::sleep(Duration::from_millis(period_ms - stop_ms)).await;
                    }
                    stopped.cont(pid);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_cells_of_this_machine_are_victims() {
        assert!(is_loopback("http://127.0.0.1:7070"));
        assert!(is_loopback("http://[::1]:80"));
        assert!(is_loopback("localhost:1"));
        assert!(!is_loopback("http://10.0.0.5:7070"));
        assert!(!is_loopback("http://example.com"));
        // This test process is not a `cell`, and pid 0 is nobody's.
        assert!(!is_local_cell(std::process::id()));
        assert!(!is_local_cell(0));
    }
}
