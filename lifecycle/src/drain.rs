//! How a cell stops: the drain notice and the drain bounded by the grace period.
//!
//! On a stop signal, or when a health checker asks the cell to retire, the cell says "draining"
//! first, gives the front doors time to route elsewhere (the notice), then tells the role to
//! drain. When a health checker says the cell was buried (fenced), the role stops taking work at
//! once, with no notice (it was replaced; nothing routes to it any more): what it is doing
//! finishes within the grace period, so no client request is cut, and a crawler acknowledges
//! nothing (its queue asks the cell's standing), so jobs that moved to another crawler are not
//! touched.

use std::time::Duration;

use protocol::control::CellState;
use tokio_util::sync::CancellationToken;

use crate::CellContext;

/// A role's drain rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Front doors route to the cell (api, frontdoor): draining is announced for three heartbeats
    /// (and 300 ms) before the role stops taking work; the drain is bounded by the grace period.
    Routed,
    /// Nothing routes to the cell: the role stops taking work as soon as it drains; the drain is
    /// bounded by the grace period.
    Immediate,
    /// As [`Drain::Immediate`], but the role bounds its own drain with the grace period (the
    /// factory, which stops its cells and must not be cut before it kills the laggards).
    SelfBounded,
}

impl Drain {
    /// How long a draining cell keeps serving so that front doors notice it is draining.
    pub fn notice(self, heartbeat: Duration) -> Duration {
        match self {
            Drain::Routed => 3 * heartbeat + Duration::from_millis(300),
            Drain::Immediate | Drain::SelfBounded => Duration::ZERO,
        }
    }

    pub(crate) fn bounded(self) -> bool {
        !matches!(self, Drain::SelfBounded)
    }
}

/// The token the role stops on: cancelled `notice` after `signal` (or a retire request), at once
/// when the cell is fenced. `has_beats`: without heartbeats nobody routes by the cell's state,
/// so there is no notice to give.
pub(crate) fn after_notice(
    ctx: &CellContext,
    has_beats: bool,
    signal: CancellationToken,
    notice: Duration,
) -> CancellationToken {
    let role_stop = CancellationToken::new();
    let stop = role_stop.clone();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let standing = ctx.standing().clone();
        let fenced_now = tokio::select! {
            _ = signal.cancelled() => false,
            _ = standing.retire_requested().cancelled() => {
                tracing::info!(reason = ?standing.reason(), "retiring on a health checker's request");
                false
            }
            _ = standing.fenced().cancelled() => true,
        };
        ctx.set_state(CellState::Draining);
        ctx.0.draining.cancel();
        if fenced_now {
            tracing::error!(
                reason = ?standing.reason(),
                "fenced: the registry declared this cell dead and replaced it; stopping now"
            );
            stop.cancel();
            return;
        }
        if has_beats {
            tokio::select! {
                _ = tokio::time::sleep(notice) => {}
                _ = standing.fenced().cancelled() => {
                    tracing::error!(reason = ?standing.reason(), "fenced while draining; stopping now");
                }
            }
        }
        stop.cancel();
    });
    role_stop
}

/// Run `work` to its end; once `shutdown` is cancelled, give it at most `grace` more.
pub async fn bounded<E>(
    shutdown: &CancellationToken,
    grace: Duration,
    work: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), E> {
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => return r,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, work).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(?grace, "drain did not finish in time; exiting");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CellSpec, Lifecycle};

    fn spec() -> CellSpec {
        CellSpec {
            role: "api".into(),
            cell_id: "api-1".into(),
            parent: None,
            healthcheckers: Vec::new(),
            factories: Vec::new(),
            heartbeat: Duration::from_millis(100),
            grace: Duration::from_secs(5),
            homeostasis: None,
        }
    }

    #[test]
    fn only_routed_roles_get_a_notice() {
        let hb = Duration::from_millis(100);
        assert_eq!(Drain::Routed.notice(hb), Duration::from_millis(600));
        assert_eq!(Drain::Immediate.notice(hb), Duration::ZERO);
        assert!(!Drain::SelfBounded.bounded());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_overruns_the_grace_period_is_cut() {
        let stop = CancellationToken::new();
        stop.cancel();
        let forever = std::future::pending::<Result<(), ()>>();
        let started = tokio::time::Instant::now();
        bounded(&stop, Duration::from_secs(3), forever)
            .await
            .expect("cut, not failed");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn the_role_stops_on_the_signal_and_the_cell_retires() {
        let life = Lifecycle::begin(spec(), None, "127.0.0.1:1".parse().expect("addr"))
            .expect("no heartbeats, no key needed");
        let ctx = life.context();
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let result: Result<(), ()> = life
            .live(shutdown, Drain::Routed, |stop| async move {
                signal.cancel();
                stop.cancelled().await;
                Ok(())
            })
            .await;
        result.expect("the role returned");
        assert!(ctx.0.retired.is_cancelled());
        assert_eq!(ctx.0.vital.borrow().state, CellState::Retired);
    }
}
