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
//! Implemented by [`crate::sqlite::SqliteStore`] and [`crate::postgres::PgStore`] over the
//! `idempotency_keys` table of their store migrations (`0002_idempotency.sql`).

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
