//! The factories' ledger in the store's SQLite database (see [`crate::factory_ledger`]).

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use super::open_pool;
use crate::factory_ledger::{Claim, ClaimOutcome, FactoryLedger};
use crate::Result;

/// The ledger's table lives in the store's database (its migrations are the store's), so the
/// factories of one machine share it with each other through WAL.
pub struct SqliteFactoryLedger {
    pool: SqlitePool,
}

impl SqliteFactoryLedger {
    /// Open or create the store's database at a path or `sqlite:` URL and bring its schema up
    /// to date.
    pub async fn open(url_or_path: &str) -> Result<Self> {
        let pool = open_pool(url_or_path, 2).await?;
        super::store::migrate(&pool).await?;
        Ok(Self { pool })
    }
}

fn claim_of(row: &sqlx::sqlite::SqliteRow) -> Result<Claim> {
    Ok(Claim {
        request_key: row.try_get("request_key")?,
        role: row.try_get("role")?,
        factory: row.try_get("factory")?,
        cell_id: row.try_get("cell_id")?,
        claimed_at_ms: row.try_get("claimed_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
    })
}

#[async_trait]
impl FactoryLedger for SqliteFactoryLedger {
    async fn claim(&self, claim: &Claim, expire_before_ms: i64) -> Result<ClaimOutcome> {
        // A claim that vanishes between the insert and the read (it expired and a third party
        // removed it) is claimed again.
        for _ in 0..3 {
            sqlx::query("DELETE FROM factory_claims WHERE request_key = ? AND claimed_at_ms < ?")
                .bind(&claim.request_key)
                .bind(expire_before_ms)
                .execute(&self.pool)
                .await?;
            let inserted = sqlx::query(
                "INSERT INTO factory_claims \
                 (request_key, role, factory, cell_id, claimed_at_ms, started_at_ms) \
                 VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (request_key) DO NOTHING",
            )
            .bind(&claim.request_key)
            .bind(&claim.role)
            .bind(&claim.factory)
            .bind(&claim.cell_id)
            .bind(claim.claimed_at_ms)
            .execute(&self.pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(ClaimOutcome::Claimed);
            }
            let held = sqlx::query("SELECT * FROM factory_claims WHERE request_key = ?")
                .bind(&claim.request_key)
                .fetch_optional(&self.pool)
                .await?;
            if let Some(row) = held {
                return Ok(ClaimOutcome::Held(claim_of(&row)?));
            }
        }
        Err(crate::EngineError::Unavailable(format!(
            "the claim on {:?} keeps changing hands",
            claim.request_key
        )))
    }

    async fn mark_started(&self, request_key: &str, factory: &str, at_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE factory_claims SET started_at_ms = ? WHERE request_key = ? AND factory = ?",
        )
        .bind(at_ms)
        .bind(request_key)
        .bind(factory)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release(&self, request_key: &str, factory: &str) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM factory_claims \
             WHERE request_key = ? AND factory = ? AND started_at_ms IS NULL",
        )
        .bind(request_key)
        .bind(factory)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn claims_of_role(&self, role: &str, since_ms: i64) -> Result<Vec<Claim>> {
        let rows = sqlx::query(
            "SELECT * FROM factory_claims WHERE role = ? AND claimed_at_ms >= ? \
             ORDER BY claimed_at_ms, request_key",
        )
        .bind(role)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(claim_of).collect()
    }

    async fn forget_before(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM factory_claims WHERE claimed_at_ms < ?")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
