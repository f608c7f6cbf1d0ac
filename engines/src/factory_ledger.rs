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

/// The [`FactoryLedger`] of a ledger type whose `pool` is a sqlx pool of either engine (`$row` is
/// that engine's row type): the statements are the same on SQLite and PostgreSQL, so they are
/// written once.
macro_rules! factory_ledger_on {
    ($ledger:ty, $row:ty) => {
        fn claim_of(row: &$row) -> $crate::Result<$crate::factory_ledger::Claim> {
            use sqlx::Row as _;
            Ok($crate::factory_ledger::Claim {
                request_key: row.try_get("request_key")?,
                role: row.try_get("role")?,
                factory: row.try_get("factory")?,
                cell_id: row.try_get("cell_id")?,
                claimed_at_ms: row.try_get("claimed_at_ms")?,
                started_at_ms: row.try_get("started_at_ms")?,
            })
        }

        #[async_trait::async_trait]
        impl $crate::factory_ledger::FactoryLedger for $ledger {
            async fn claim(
                &self,
                claim: &$crate::factory_ledger::Claim,
                expire_before_ms: i64,
            ) -> $crate::Result<$crate::factory_ledger::ClaimOutcome> {
                // A claim that vanishes between the insert and the read (it expired and a third party
                // removed it) is claimed again.
                for _ in 0..3 {
                    sqlx::query("DELETE FROM factory_claims WHERE request_key = $1 AND claimed_at_ms < $2")
                        .bind(&claim.request_key)
                        .bind(expire_before_ms)
                        .execute(&self.pool)
                        .await?;
                    let inserted = sqlx::query(
                        "INSERT INTO factory_claims \
                         (request_key, role, factory, cell_id, claimed_at_ms, started_at_ms) \
                         VALUES ($1, $2, $3, $4, $5, NULL) ON CONFLICT (request_key) DO NOTHING",
                    )
                    .bind(&claim.request_key)
                    .bind(&claim.role)
                    .bind(&claim.factory)
                    .bind(&claim.cell_id)
                    .bind(claim.claimed_at_ms)
                    .execute(&self.pool)
                    .await?;
                    if inserted.rows_affected() == 1 {
                        return Ok($crate::factory_ledger::ClaimOutcome::Claimed);
                    }
                    let held = sqlx::query("SELECT * FROM factory_claims WHERE request_key = $1")
                        .bind(&claim.request_key)
                        .fetch_optional(&self.pool)
                        .await?;
                    if let Some(row) = held {
                        return Ok($crate::factory_ledger::ClaimOutcome::Held(claim_of(&row)?));
                    }
                }
                Err($crate::EngineError::Unavailable(format!(
                    "the claim on {:?} keeps changing hands",
                    claim.request_key
                )))
            }

            async fn mark_started(&self, request_key: &str, factory: &str, at_ms: i64) -> $crate::Result<()> {
                sqlx::query(
                    "UPDATE factory_claims SET started_at_ms = $1 WHERE request_key = $2 AND factory = $3",
                )
                .bind(at_ms)
                .bind(request_key)
                .bind(factory)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn release(&self, request_key: &str, factory: &str) -> $crate::Result<bool> {
                let done = sqlx::query(
                    "DELETE FROM factory_claims \
                     WHERE request_key = $1 AND factory = $2 AND started_at_ms IS NULL",
                )
                .bind(request_key)
                .bind(factory)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn claims_of_role(&self, role: &str, since_ms: i64) -> $crate::Result<Vec<$crate::factory_ledger::Claim>> {
                let rows = sqlx::query(
                    "SELECT * FROM factory_claims WHERE role = $1 AND claimed_at_ms >= $2 \
                     ORDER BY claimed_at_ms, request_key",
                )
                .bind(role)
                .bind(since_ms)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(claim_of).collect()
            }

            async fn forget_before(&self, before_ms: i64) -> $crate::Result<u64> {
                let done = sqlx::query("DELETE FROM factory_claims WHERE claimed_at_ms < $1")
                    .bind(before_ms)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(crate) use factory_ledger_on;
