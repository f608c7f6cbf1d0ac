//! The heartbeat every cell pushes straight to every health checker (never through the queue,
//! so a broker outage is not mistaken for mass death).
//!
//! Each health checker gets its own loop with its own deadline: a checker that is frozen, slow,
//! or accepts connections but never answers delays nobody's beats to the others (one slow
//! checker once delayed every cell's beat to the healthy one, which then declared them dead).
//!
//! The answers carry the registry's word about the cell ([`Standing`]): **fenced** when a health
//! checker buried it (declared it dead; a replacement was asked for), and **retire** when it is
//! surplus to its role. A cell also doubts itself after it stalled (its own beats came late by
//! more than a detection time, as after a SIGSTOP): until a health checker answers again it must
//! not acknowledge work, since it may have been buried while it was away.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::control::{CellState, Directive, Heartbeat, HeartbeatReply};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ControlClient;

/// What a cell says about itself; the beater fills in `seq`.
#[derive(Debug, Clone)]
pub struct Vital {
    pub state: CellState,
    pub pressure: f64,
    pub signals: std::collections::BTreeMap<String, f64>,
    /// The latest homeostasis decision, told in every heartbeat until a newer one.
    pub decision: Option<protocol::control::DecisionNote>,
}

/// Who the cell is, for every heartbeat.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cell_id: String,
    pub role: String,
    pub addr: String,
    pub parent: Option<String>,
}

/// How long one heartbeat may take before it is given up: twice the interval, within
/// 50 ms ..= 1 s, so it stays well under the detection time (about five intervals).
pub fn deadline(interval: Duration) -> Duration {
    (interval * 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// A pause in the cell's own beating longer than this means the cell itself stalled (frozen,
/// starved): about the time a health checker takes to declare it dead.
pub fn stall_after(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_millis(250))
}

/// The cell's standing with the registry, as the heartbeat answers tell it.
#[derive(Clone)]
pub struct Standing(Arc<StandingInner>);

struct StandingInner {
    fenced: CancellationToken,
    retire: CancellationToken,
    reason: Mutex<Option<String>>,
    /// The last moment any beat loop ran.
    last_tick: Mutex<Instant>,
    /// Raised when the cell noticed it had stalled; lowered by an answer (or by trying long
    /// enough with nobody answering).
    doubt: AtomicBool,
    doubt_since: Mutex<Option<Instant>>,
    stall: Duration,
}

impl Standing {
    /// A standing for a cell that beats every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self(Arc::new(StandingInner {
            fenced: CancellationToken::new(),
            retire: CancellationToken::new(),
            reason: Mutex::new(None),
            last_tick: Mutex::new(Instant::now()),
            doubt: AtomicBool::new(false),
            doubt_since: Mutex::new(None),
            stall: stall_after(interval),
        }))
    }

    /// Cancelled when a health checker says the registry buried this cell.
    pub fn fenced(&self) -> &CancellationToken {
        &self.0.fenced
    }

    /// Cancelled when a health checker asks this cell to drain and retire.
    pub fn retire_requested(&self) -> &CancellationToken {
        &self.0.retire
    }

    /// The cell decided by itself to drain and retire (apoptosis): the same path as a health
    /// checker's request.
    pub fn retire_self(&self, reason: &str) {
        if !self.0.retire.is_cancelled() {
            tracing::info!(reason, "retiring by its own decision");
            lock(&self.0.reason).get_or_insert_with(|| reason.to_string());
            self.0.retire.cancel();
        }
    }

    /// Why the cell was fenced or asked to retire.
    pub fn reason(&self) -> Option<String> {
        lock(&self.0.reason).clone()
    }

    /// Whether the cell may act on work now (acknowledge jobs): not fenced, and not stalled
    /// without a health checker's word since.
    pub fn trusted(&self) -> bool {
        if self.0.fenced.is_cancelled() || self.0.doubt.load(Ordering::SeqCst) {
            return false;
        }
        // Checked at the moment of acting: a cell that thaws may run other tasks before its
        // beat loop notices the pause.
        lock(&self.0.last_tick).elapsed() < self.0.stall
    }

    fn tick(&self, previous: Option<Instant>, now: Instant) {
        if let Some(prev) = previous {
            let gap = now.saturating_duration_since(prev);
            if gap > self.0.stall && !self.0.doubt.swap(true, Ordering::SeqCst) {
                *lock(&self.0.doubt_since) = Some(now);
                metrics::counter!("cell_stalls_total").increment(1);
                tracing::warn!(
                    paused_ms = gap.as_millis() as u64,
                    "this cell stalled; holding acknowledgements until a health checker answers"
                );
            }
        }
        *lock(&self.0.last_tick) = now;
        // Nobody answered for a whole detection time since the doubt arose: no checker can tell
        // us anything; carry on rather than stop the organism's work.
        let since = *lock(&self.0.doubt_since);
        if let Some(since) = since {
            if now.saturating_duration_since(since) > self.0.stall * 4 {
                self.clear_doubt();
            }
        }
    }

    fn clear_doubt(&self) {
        if self.0.doubt.swap(false, Ordering::SeqCst) {
            tracing::info!("a health checker answered after the stall: acting again");
        }
        *lock(&self.0.doubt_since) = None;
    }

    fn answered(&self, reply: Option<HeartbeatReply>) {
        match reply.and_then(|r| r.directive) {
            None => self.clear_doubt(),
            Some(Directive::Fenced { reason }) => {
                if !self.0.fenced.is_cancelled() {
                    tracing::warn!(%reason, "fenced: the registry buried this cell");
                    metrics::counter!("cell_directives_total", "kind" => "fenced").increment(1);
                    *lock(&self.0.reason) = Some(reason);
                    self.0.fenced.cancel();
                }
            }
            Some(Directive::Retire { reason }) => {
                self.clear_doubt();
                if !self.0.retire.is_cancelled() {
                    tracing::info!(%reason, "asked to retire");
                    metrics::counter!("cell_directives_total", "kind" => "retire").increment(1);
                    lock(&self.0.reason).get_or_insert(reason);
                    self.0.retire.cancel();
                }
            }
            Some(Directive::Unknown) => {
                self.clear_doubt();
                metrics::counter!("cell_directives_total", "kind" => "unknown").increment(1);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Beat every `interval` to every health checker, each on its own loop, until `shutdown`; then
/// send one last heartbeat with the state the cell is in then (draining or retired). `vital` is
/// read at each beat. The answers update `standing`.
pub fn spawn(
    client: Arc<ControlClient>,
    healthcheckers: Vec<String>,
    identity: Identity,
    interval: Duration,
    vital: watch::Receiver<Vital>,
    standing: Standing,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    crate::build::start();
    // One sequence for all loops: each loop sends in increasing order, which is all a
    // checker needs.
    let seq = Arc::new(AtomicU64::new(0));
    let identity = Arc::new(identity);
    let loops: Vec<_> = healthcheckers
        .into_iter()
        .map(|hc| {
            let (client, identity, vital, standing, shutdown, seq) = (
                client.clone(),
                identity.clone(),
                vital.clone(),
                standing.clone(),
                shutdown.clone(),
                seq.clone(),
            );
            tokio::spawn(beat_one(
                client, hc, identity, interval, vital, standing, shutdown, seq,
            ))
        })
        .collect();
    tokio::spawn(async move {
        for task in loops {
            let _ = task.await;
        }
    })
}

#[allow(clippy::too_many_arguments)] // one loop's whole context, passed once at spawn
async fn beat_one(
    client: Arc<ControlClient>,
    hc: String,
    identity: Arc<Identity>,
    interval: Duration,
    vital: watch::Receiver<Vital>,
    standing: Standing,
    shutdown: CancellationToken,
    seq: Arc<AtomicU64>,
) {
    let deadline = deadline(interval);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<Instant> = None;
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let now = Instant::now();
        standing.tick(previous, now);
        previous = Some(now);
        let v = vital.borrow().clone();
        let beat = Heartbeat {
            cell_id: identity.cell_id.clone(),
            role: identity.role.clone(),
            addr: identity.addr.clone(),
            state: v.state,
            pressure: v.pressure,
            signals: v.signals,
            version: env!("CARGO_PKG_VERSION").to_string(),
            build: crate::build::current().unwrap_or_default().to_string(),
            wire: crate::build::wire_versions(),
            parent: identity.parent.clone(),
            seq: seq.fetch_add(1, Ordering::SeqCst) + 1,
            interval_ms: interval.as_millis() as u64,
            pid: Some(std::process::id()),
            decision: v.decision,
        };
        let sent = tokio::time::timeout(
            deadline,
            client.send::<_, Option<HeartbeatReply>>(
                &hc,
                "/control/heartbeat",
                Heartbeat::KIND,
                &beat,
            ),
        )
        .await;
        match sent {
            Ok(Ok(reply)) => standing.answered(reply),
            Ok(Err(e)) => {
                metrics::counter!("cell_heartbeat_errors_total", "kind" => "refused").increment(1);
                tracing::debug!(healthchecker = %hc, error = format!("{e:#}"), "heartbeat not delivered");
            }
            Err(_) => {
                metrics::counter!("cell_heartbeat_errors_total", "kind" => "deadline").increment(1);
                tracing::debug!(healthchecker = %hc, ?deadline, "heartbeat not answered in time");
            }
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stall_is_doubted_until_an_answer() {
        let s = Standing::new(Duration::from_millis(100));
        let t0 = Instant::now();
        s.tick(None, t0);
        assert!(s.trusted());
        // Frozen for ten seconds: untrusted at once, before the beat loop runs again.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!s.trusted());
        s.tick(Some(t0), Instant::now());
        assert!(!s.trusted(), "the loop noticed the stall");
        s.answered(None);
        assert!(s.trusted(), "a checker answered: the registry still has us");
    }

    #[tokio::test(start_paused = true)]
    async fn fenced_is_final_and_retire_is_a_request() {
        let s = Standing::new(Duration::from_millis(100));
        s.tick(None, Instant::now());
        s.answered(Some(HeartbeatReply {
            directive: Some(Directive::Retire {
                reason: "surplus".into(),
            }),
        }));
        assert!(s.retire_requested().is_cancelled());
        assert!(s.trusted(), "retiring cells finish their work");
        s.answered(Some(HeartbeatReply {
            directive: Some(Directive::Fenced {
                reason: "declared dead".into(),
            }),
        }));
        assert!(s.fenced().is_cancelled());
        assert!(!s.trusted());
        s.answered(None);
        assert!(!s.trusted(), "nothing unfences a buried cell");
    }

    #[test]
    fn unknown_directives_decode_and_are_ignored() {
        let r: HeartbeatReply =
            serde_json::from_str(r#"{"directive":{"kind":"levitate","height":3}}"#)
                .expect("decodes");
        assert_eq!(r.directive, Some(Directive::Unknown));
        let empty: Option<HeartbeatReply> = serde_json::from_str("null").expect("null");
        assert_eq!(empty, None);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nobody_answering_the_doubt_lifts_after_a_while() {
        let s = Standing::new(Duration::from_millis(100));
        let t0 = Instant::now();
        s.tick(None, t0);
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut prev = Instant::now();
        s.tick(Some(t0), prev);
        assert!(!s.trusted());
        for _ in 0..25 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let now = Instant::now();
            s.tick(Some(prev), now);
            prev = now;
        }
        assert!(s.trusted());
    }
}
