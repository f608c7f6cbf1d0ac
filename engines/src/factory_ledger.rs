//! The factories' shared ledger of request keys.
//!
//! Every organism runs at least two factories, and a health checker asks them in turn. A factory
//! claims a request key here before it starts a cell (`INSERT ... ON CONFLICT DO NOTHING`,
//! recording who claimed it, the cell id it starts and when), so a key asked of the second
//! factory after the first one started a cell (and died) is answered with the first factory's
//! cell, never with a second one. The claims of a role that are still starting are what the
//! factories count, besides the live cells, against the role's maximum.
//!
//! The ledger holds no clock: callers pass the times, so tests need no sleeps.

use async_trait::async_trait;

use crate::Result;

/// One factory's claim on a request key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub request_key: String,
    pub role: String,
    /// The claiming factory's cell id.
    pub factory: String,
    /// The cell it starts for this key.
    pub cell_id: String,
    /// Milliseconds since the Unix epoch.
    pub claimed_at_ms: i64,
    /// When the cell announced it was ready; `None` while the start is in flight.
    pub started_at_ms: Option<i64>,
}

/// What [`FactoryLedger::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is ours: start the cell.
    Claimed,
    /// Another claim (by this factory or a sibling) holds the key: answer with its cell.
    Held(Claim),
}

#[async_trait]
pub trait FactoryLedger: Send + Sync {
    /// Claim `claim.request_key` for `claim.factory`. A claim on the same key made before
    /// `expire_before_ms` no longer counts and is replaced; any later claim holds the key.
    async fn claim(&self, claim: &Claim, expire_before_ms: i64) -> Result<ClaimOutcome>;

    /// The cell started for `request_key` is ready (only the claiming factory's claim changes).
    async fn mark_started(&self, request_key: &str, factory: &str, at_ms: i64) -> Result<()>;

    /// Starting the cell failed: give the key up so the next request with it starts again.
    /// Only a claim of `factory` that has not started is released; true when one was.
    async fn release(&self, request_key: &str, factory: &str) -> Result<bool>;

    /// Claims of `role` made at or after `since_ms`, oldest first.
    async fn claims_of_role(&self, role: &str, since_ms: i64) -> Result<Vec<Claim>>;

    /// Drop claims made before `before_ms`; how many were dropped.
    async fn forget_before(&self, before_ms: i64) -> Result<u64>;
}
