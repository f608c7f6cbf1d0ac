//! [`IdempotencyStore`] on the SQLite store (table `idempotency_keys`, migration 0002).

use async_trait::async_trait;

use super::SqliteStore;
use crate::idempotency::{ms, Claim, IdempotencyStore, KeyClaim};
use crate::Result;

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn claim(&self, c: &KeyClaim<'_>) -> Result<Claim> {
        // One statement takes a free key, an expired one, or a same-request claim whose holder
        // let its lease run out; anything else is left alone and read back below. A row that
        // expires between the two statements is simply claimed on the next turn.
        for _ in 0..3 {
            let taken = sqlx::query(
                "INSERT INTO idempotency_keys
                     (scope, key, fingerprint, holder, status, body, locked_until_ms, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4, NULL, NULL, ?5 + ?6, ?5 + ?7)
                 ON CONFLICT (scope, key) DO UPDATE SET
                     fingerprint = excluded.fingerprint, holder = excluded.holder,
                     status = NULL, body = NULL,
                     locked_until_ms = excluded.locked_until_ms,
                     expires_at_ms = excluded.expires_at_ms
                 WHERE idempotency_keys.expires_at_ms <= ?5
                    OR (idempotency_keys.status IS NULL
                        AND idempotency_keys.locked_until_ms <= ?5
                        AND idempotency_keys.fingerprint = excluded.fingerprint)",
            )
            .bind(c.scope)
            .bind(c.key)
            .bind(c.fingerprint)
            .bind(c.holder)
            .bind(c.now_ms)
            .bind(ms(c.lease))
            .bind(ms(c.ttl))
            .execute(&self.pool)
            .await?;
            if taken.rows_affected() == 1 {
                return Ok(Claim::Serve);
            }
            let row: Option<(String, Option<i64>, Option<String>)> = sqlx::query_as(
                "SELECT fingerprint, status, body FROM idempotency_keys
                 WHERE scope = ?1 AND key = ?2 AND expires_at_ms > ?3",
            )
            .bind(c.scope)
            .bind(c.key)
            .bind(c.now_ms)
            .fetch_optional(&self.pool)
            .await?;
            match row {
                Some((fingerprint, Some(status), body)) => {
                    return Ok(Claim::Answered {
                        fingerprint,
                        status: u16::try_from(status).unwrap_or(500),
                        body: body.unwrap_or_default(),
                    })
                }
                Some((fingerprint, None, _)) => return Ok(Claim::InProgress { fingerprint }),
                None => continue,
            }
        }
        Err(crate::EngineError::Unavailable(
            "an idempotency key kept changing hands; try again".into(),
        ))
    }

    async fn complete(
        &self,
        scope: &str,
        key: &str,
        holder: &str,
        status: u16,
        body: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE idempotency_keys SET status = ?4, body = ?5
             WHERE scope = ?1 AND key = ?2 AND holder = ?3 AND status IS NULL",
        )
        .bind(scope)
        .bind(key)
        .bind(holder)
        .bind(i64::from(status))
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, scope: &str, key: &str, holder: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys
             WHERE scope = ?1 AND key = ?2 AND holder = ?3 AND status IS NULL",
        )
        .bind(scope)
        .bind(key)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64> {
        let gone = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms <= ?1")
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(gone.rows_affected())
    }
}
