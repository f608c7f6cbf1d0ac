//! The cluster store: pages, frontier and full-text index in PostgreSQL (through sqlx), shared by
//! every API cell of an organism.
//!
//! Same tables and the same meaning as the SQLite store; what differs is concurrency. SQLite takes
//! one write lock per transaction; here several API cells write at once, so a transaction locks
//! what it counts on, always in the same order (crawl rows, then the results' frontier rows, then
//! host budget rows, each sorted), and a deadlock or serialization failure that slips through is
//! retried. The frontier's decisions are [`crate::frontier`]'s, as on SQLite; rows a plan writes
//! that this transaction did not lock (redirect targets, re-expanded links, new URLs) are checked
//! as they are written, and a plan gone stale ([`crate::EngineError::Conflict`]) is retried too. Statements are batched (`unnest` arrays), so an ingest costs a fixed number of round
//! trips whatever the number of links.
//!
//! The URL may name several hosts, libpq-style (`postgres://u@h1:p1,h2:p2/db?target_session_attrs=
//! read-write`): the store then writes to whichever is the primary and follows it through a
//! failover ([`multihost`]).

mod factory_ledger;
pub mod multihost;
mod politeness;
mod store;

use std::time::Duration;

pub use factory_ledger::PgFactoryLedger;
pub use store::PgStore;

crate::idempotency::idempotency_store_on!(PgStore);

/// Connection pool settings for [`PgStore::connect_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// Most connections this store opens (per process).
    pub max_connections: u32,
    /// How long a call waits for a connection (for example while the server restarts) before it
    /// fails.
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}
