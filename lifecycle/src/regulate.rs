//! The homeostasis controller at work in a live cell: every heartbeat interval (at most four
//! times a second), read the registry, hand the controller this cell's fresh pressure and its
//! role's view, and act on the decision.
//!
//! - **Divide**: one signed `ReplaceRequest` per key to the factories (the first that answers),
//!   with this cell as the parent, so the child joins with the organism's configuration and the
//!   lineage is recorded. A key whose cell the registry already counts is reported spent.
//! - **Retire** (apoptosis): the cell's own retirement, the same path as a health checker's
//!   `retire` directive: it stops taking work, finishes what is in flight, says `draining` (the
//!   front doors route elsewhere first), and leaves. A pool machine whose cell is gone is powered
//!   off by its factory (`factory::pool`'s watch).
//! - **Replace** (fatigue): ask for a replacement with this cell as its parent, then retire.
//! - **Throttle / Unthrottle**: the cell's state says `throttling`, and the role follows
//!   [`crate::CellContext::throttled`] (an api defers optional work).
//!
//! Every decision but a hold is logged with its reason and figures, counted, and carried in the
//! cell's heartbeats ([`protocol::control::DecisionNote`]) until the next one, so the health
//! checkers record it once as an event.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use protocol::control::{CellState, DecisionNote, ReplaceRequest};

use crate::homeostasis::{Action, Bounds, Controller, Decision, Own, Params, RoleView};
use crate::CellContext;

/// The shortest pause between two registry reads of one cell's controller.
const READ_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// What a cell of a self-regulating role needs to regulate: the controller's parameters and its
/// role's bounds (`[homeostasis]` and `[roles.ROLE]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Homeostasis {
    pub params: Params,
    pub bounds: Bounds,
}

/// Run the controller for `ctx` until the cell retires, following `pressure`.
pub(crate) fn spawn(ctx: CellContext, h: Homeostasis, pressure: tokio::sync::watch::Receiver<f64>) {
    tokio::spawn(async move {
        let Some(client) = ctx.client() else {
            return;
        };
        let mut controller = Controller::new(
            h.params.clone(),
            h.bounds,
            ctx.role().to_string(),
            ctx.cell_id().to_string(),
        );
        let registry = ctx.registry();
        let retired = ctx.0.retired.clone();
        let standing = ctx.standing().clone();
        let mut view: Option<RoleView> = None;
        let mut known: BTreeSet<String> = BTreeSet::new();
        let mut decisions = 0u64;
        // Every heartbeat, but no more than four registry reads a second per cell: the
        // controller's windows are seconds long, and every read costs a health checker.
        let mut every = tokio::time::interval(ctx.heartbeat_interval().max(READ_EVERY));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = retired.cancelled() => return,
                _ = standing.retire_requested().cancelled() => return,
                _ = standing.fenced().cancelled() => return,
                _ = every.tick() => {}
            }
            if let Ok(cells) = registry.read().await {
                let rows = cells.roles.get(ctx.role()).cloned().unwrap_or_default();
                known = rows.iter().map(|c| c.cell_id.clone()).collect();
                view = Some(RoleView::from_records(Instant::now(), &h.params, &rows));
            }
            let Some(view) = &view else {
                continue;
            };
            let own = Own {
                pressure: *pressure.borrow(),
                processing: ctx.take_processing(),
                pending: 0,
            };
            let decision = controller.tick(Instant::now(), own, view);
            if decision.action == Action::Hold {
                continue;
            }
            decisions += 1;
            record(&ctx, &decision, decisions);
            match &decision.action {
                Action::Hold => {}
                Action::Throttle => {
                    ctx.0.throttled.send_replace(true);
                    ctx.set_state(CellState::Throttling);
                }
                Action::Unthrottle => {
                    ctx.0.throttled.send_replace(false);
                    ctx.set_state(CellState::Serving);
                }
                Action::Divide { keys, .. } => {
                    for key in keys {
                        if ask(&ctx, &client, key, &decision.reason, &known).await {
                            controller.spent(key);
                        }
                    }
                }
                Action::Replace { key } => {
                    ask(&ctx, &client, key, &decision.reason, &known).await;
                    standing.retire_self(&decision.reason);
                    return;
                }
                Action::Retire => {
                    standing.retire_self(&decision.reason);
                    return;
                }
            }
        }
    });
}

/// Ask the factories (the first that answers) for a cell of this role under `key`. True when
/// the key is spent: the factory had already started it for a cell the registry counts.
async fn ask(
    ctx: &CellContext,
    client: &control::ControlClient,
    key: &str,
    reason: &str,
    known: &BTreeSet<String>,
) -> bool {
    let req = ReplaceRequest {
        request_key: key.to_string(),
        role: ctx.role().to_string(),
        reason: reason.to_string(),
        parent: Some(ctx.cell_id().to_string()),
    };
    for factory in ctx.factories() {
        match client.ask(factory, &req).await {
            Ok(reply) => {
                return !reply.started && reply.cell_id.is_some_and(|c| known.contains(&c));
            }
            Err(e) => tracing::warn!(factory, key, error = %e, "asking for a sibling failed"),
        }
    }
    false
}

/// Log, count and publish a decision (it travels in the next heartbeats).
fn record(ctx: &CellContext, d: &Decision, n: u64) {
    let kind = d.action.kind();
    let figures: BTreeMap<String, f64> = match serde_json::to_value(d.figures) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_f64()?)))
            .collect(),
        _ => BTreeMap::new(),
    };
    tracing::info!(action = kind, reason = %d.reason, ?figures, "homeostasis decision");
    metrics::counter!("homeostasis_decisions_total", "action" => kind).increment(1);
    ctx.0.vital.send_modify(|v| {
        v.decision = Some(DecisionNote {
            n,
            at_ms: control::now_ms(),
            action: kind.to_string(),
            reason: d.reason.to_string(),
            figures,
        });
    });
}
