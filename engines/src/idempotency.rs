//! Exactly-once client requests: the first answer to a request that carries an
//! `Idempotency-Key`, kept in the store (so every api cell sees it) until the key expires, so
//! that a repeat (the client's, or a front door's retry on another api cell) gets that answer
//! instead of doing the work again.
//!
//! The model is Stripe's: a key is claimed by the first request, which does the work and stores
//! its answer; a repeat with the same request gets the stored answer; a repeat with a different
//! request is a conflict the caller reports (422); a repeat while the first is still being
//! served learns that it is in progress. A claim is a lease: when its holder dies before it
//! answers, a repeat of the same request takes the key over after the lease (the work it does
//! again must itself be idempotent, as seed admission is: the frontier deduplicates URLs).
//!
//! Implemented once ([`idempotency_store_on`]) for [`crate::sqlite::SqliteStore`] and
//! [`crate::postgres::PgStore`], over the `idempotency_keys` table of their store migrations
//! (`0002_idempotency.sql`).

use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

/// Longest key accepted, in bytes (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

/// A request offering to take a key.
#[derive(Debug, Clone, Copy)]
pub struct KeyClaim<'a> {
    /// What the key is for (e.g. `POST /crawl`): the same key on another endpoint is another key.
    pub scope: &'a str,
    pub key: &'a str,
    /// A hash of the request: a repeat with another fingerprint is a different request.
    pub fingerprint: &'a str,
    /// Who claims it (random per request); only the holder completes or releases the claim.
    pub holder: &'a str,
    /// Now, milliseconds since the Unix epoch.
    pub now_ms: i64,
    /// How long the holder has to answer before a repeat may take the key over.
    pub lease: Duration,
    /// How long the key and its answer are kept.
    pub ttl: Duration,
}

/// What the store says about a claimed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request holds the key: serve it, then [`IdempotencyStore::complete`].
    Serve,
    /// A request with this key was answered.
    Answered {
        fingerprint: String,
        status: u16,
        body: String,
    },
    /// A request with this key is being served now (by this cell or another).
    InProgress { fingerprint: String },
}

/// The store side of idempotency keys.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// Take `claim.key`, or learn who has it: atomic, whatever the number of api cells.
    async fn claim(&self, claim: &KeyClaim<'_>) -> Result<Claim>;

    /// Store the answer of the request that holds the key. False when it no longer holds it
    /// (its lease ran out and a repeat took the key over, or the key expired).
    async fn complete(
        &self,
        scope: &str,
        key: &str,
        holder: &str,
        status: u16,
        body: &str,
    ) -> Result<bool>;

    /// Give the key up unanswered (the request failed before it changed anything), so that a
    /// repeat does the work.
    async fn release(&self, scope: &str, key: &str, holder: &str) -> Result<()>;

    /// Forget keys expired at `now_ms`; returns how many.
    async fn purge_expired(&self, now_ms: i64) -> Result<u64>;
}

/// Milliseconds of a duration, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The [`IdempotencyStore`] of a store whose `pool` is a sqlx pool of either engine: the
/// statements are the same on SQLite and PostgreSQL (`$n` parameters, `ON CONFLICT ... DO UPDATE
/// ... WHERE`), so they are written once.
macro_rules! idempotency_store_on {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::idempotency::IdempotencyStore for $store {
            async fn claim(
                &self,
                c: &$crate::idempotency::KeyClaim<'_>,
            ) -> $crate::Result<$crate::idempotency::Claim> {
                // One statement takes a free key, an expired one, or a same-request claim whose holder
                // let its lease run out; anything else is left alone and read back below. A row that
                // expires between the two statements is simply claimed on the next turn.
                for _ in 0..3 {
                    let taken = sqlx::query(
                        "INSERT INTO idempotency_keys
                             (scope, key, fingerprint, holder, status, body, locked_until_ms, expires_at_ms)
                         VALUES ($1, $2, $3, $4, NULL, NULL, $5 + $6, $5 + $7)
                         ON CONFLICT (scope, key) DO UPDATE SET
                             fingerprint = excluded.fingerprint, holder = excluded.holder,
                             status = NULL, body = NULL,
                             locked_until_ms = excluded.locked_until_ms,
                             expires_at_ms = excluded.expires_at_ms
                         WHERE idempotency_keys.expires_at_ms <= $5
                            OR (idempotency_keys.status IS NULL
                                AND idempotency_keys.locked_until_ms <= $5
                                AND idempotency_keys.fingerprint = excluded.fingerprint)",
                    )
                    .bind(c.scope)
                    .bind(c.key)
                    .bind(c.fingerprint)
                    .bind(c.holder)
                    .bind(c.now_ms)
                    .bind($crate::idempotency::ms(c.lease))
                    .bind($crate::idempotency::ms(c.ttl))
                    .execute(&self.pool)
                    .await?;
                    if taken.rows_affected() == 1 {
                        return Ok($crate::idempotency::Claim::Serve);
                    }
                    let row: Option<(String, Option<i64>, Option<String>)> = sqlx::query_as(
                        "SELECT fingerprint, status, body FROM idempotency_keys
                         WHERE scope = $1 AND key = $2 AND expires_at_ms > $3",
                    )
                    .bind(c.scope)
                    .bind(c.key)
                    .bind(c.now_ms)
                    .fetch_optional(&self.pool)
                    .await?;
                    match row {
                        Some((fingerprint, Some(status), body)) => {
                            return Ok($crate::idempotency::Claim::Answered {
                                fingerprint,
                                status: u16::try_from(status).unwrap_or(500),
                                body: body.unwrap_or_default(),
                            })
                        }
                        Some((fingerprint, None, _)) => return Ok($crate::idempotency::Claim::InProgress { fingerprint }),
                        None => continue,
                    }
                }
                Err($crate::EngineError::Unavailable(
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
            ) -> $crate::Result<bool> {
                let done = sqlx::query(
                    "UPDATE idempotency_keys SET status = $4, body = $5
                     WHERE scope = $1 AND key = $2 AND holder = $3 AND status IS NULL",
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

            async fn release(&self, scope: &str, key: &str, holder: &str) -> $crate::Result<()> {
                sqlx::query(
                    "DELETE FROM idempotency_keys
                     WHERE scope = $1 AND key = $2 AND holder = $3 AND status IS NULL",
                )
                .bind(scope)
                .bind(key)
                .bind(holder)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn purge_expired(&self, now_ms: i64) -> $crate::Result<u64> {
                let gone = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms <= $1")
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
                Ok(gone.rows_affected())
            }
        }
    };
}
pub(crate) use idempotency_store_on;
