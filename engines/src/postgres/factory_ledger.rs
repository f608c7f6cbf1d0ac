//! The factories' ledger in the organism's PostgreSQL database (see [`crate::factory_ledger`]).

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use sqlx::Row;

use super::{PgOptions, PgStore};
use crate::factory_ledger::{Claim, ClaimOutcome, FactoryLedger};
use crate::Result;

pub struct PgFactoryLedger {
    pool: PgPool,
}

impl PgFactoryLedger {
    /// Connect to `postgres://` `url` with a small pool and bring the store's schema (which holds
    /// the ledger's table) up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let store = PgStore::connect_with(
            url,
            PgOptions {
                max_connections: 2,
                ..PgOptions::default()
            },
        )
        .await?;
        Ok(Self {
            pool: store.pool().clone(),
        })
    }

    /// The ledger on the pool of an open store.
    pub fn from_store(store: &PgStore) -> Self {
        Self {
            pool: store.pool().clone(),
        }
    }
}

fn claim_of(row: &sqlx::postgres::PgRow) -> Result<Claim> {
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
impl FactoryLedger for PgFactoryLedger {
    async fn claim(&self, claim: &Claim, expire_before_ms: i64) -> Result<ClaimOutcome> {
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
                return Ok(ClaimOutcome::Claimed);
            }
            let held = sqlx::query("SELECT * FROM factory_claims WHERE request_key = $1")
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
            "UPDATE factory_claims SET started_at_ms = $1 WHERE request_key = $2 AND factory = $3",
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
             WHERE request_key = $1 AND factory = $2 AND started_at_ms IS NULL",
        )
        .bind(request_key)
        .bind(factory)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn claims_of_role(&self, role: &str, since_ms: i64) -> Result<Vec<Claim>> {
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

    async fn forget_before(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM factory_claims WHERE claimed_at_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
