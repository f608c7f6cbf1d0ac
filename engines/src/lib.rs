//! Storage and queue engines behind two interfaces, [`Store`] and [`JobQueue`].
//!
//! The embedded default is SQLite for both ([`sqlite::SqliteStore`], [`sqlite::SqliteQueue`]):
//! nothing to install, durable across restarts, shared by the cells of one machine through WAL.
//! The cluster engines (PostgreSQL, RabbitMQ) implement the same traits and pass the same
//! conformance suite.
//!
//! Architecture Invariant: engines hold data and enforce the frontier's arithmetic (dedup, depth,
//! budgets, state transitions) atomically; they do not fetch, parse or decide policy. URL
//! normalization and trap guards happen before a URL reaches an engine. The arithmetic itself is
//! written once, in the pure planner [`frontier`]; each engine reads the rows a batch concerns,
//! asks the planner, and executes its plan in one transaction.

use std::time::Duration;

use async_trait::async_trait;
use protocol::{CrawlJob, Stats};

mod counts;
pub mod factory_ledger;
pub mod frontier;
pub use politeness::HostLedger;

pub mod idempotency;
pub mod politeness;
pub mod pool;
pub mod postgres;
pub mod rabbitmq;
mod snippet;
pub mod sqlite;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("queue error: {0}")]
    Queue(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker or database cannot be reached right now (it is restarting, or the connection
    /// is being re-established in the background): try again later.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// Another cell changed the rows a write was planned on (see [`frontier`]); the transaction
    /// was rolled back and may be run again.
    #[error("write conflict: {0}")]
    Conflict(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// `migrator` accepting a database a newer build has migrated further (the migrations it does
/// not know are ignored): a build rolled back after an upgrade keeps working on the schema its
/// successor left, since a migration only ever adds (tables, columns with defaults). A migration
/// it knows that was applied with other text is still an error.
pub(crate) fn accepting_newer(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// Bring a database's schema up to date with `migrator`, again (up to five times, backing off)
/// when it fails: several cells may open one database at once, and the one that loses a migration
/// race tries again.
pub(crate) async fn migrate_with_retries<'c, A>(
    what: &str,
    migrator: &sqlx::migrate::Migrator,
    conn: A,
) -> Result<()>
where
    A: sqlx::Acquire<'c> + Copy,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    let mut attempt = 0;
    loop {
        match migrator.run(conn).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, what, "migration failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Limits of one crawl request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrawlSpec {
    pub max_depth: Option<u32>,
    pub max_pages: Option<u64>,
}

/// A normalized URL offered to the frontier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub url: String,
    pub host: String,
}

/// What the frontier did with an offered URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Already known; the state it is in.
    Known(&'static str),
    /// Not admitted: the reason (depth, page budget, host budget).
    Refused(String),
}

/// One crawl result, ready for the store: links already normalized and trap-checked.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestItem {
    /// The job URL.
    pub url: String,
    pub outcome: IngestOutcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum IngestOutcome {
    Page {
        final_url: String,
        final_host: String,
        title: String,
        text: String,
        indexable: bool,
        links: Vec<Candidate>,
    },
    Failed {
        reason: String,
    },
}

/// What one [`Store::expand_deferred`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Expanded {
    /// Pages whose kept links were offered (and forgotten).
    pub pages: usize,
    pub links_admitted: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestReport {
    /// Results that changed the store (a repeat of a stored result counts 0).
    pub stored: usize,
    pub pages_indexed: usize,
    pub links_admitted: usize,
    /// Links kept aside to be offered later ([`frontier::Links::Defer`]).
    pub links_deferred: usize,
    /// Results for URLs the frontier does not know (ignored, counted).
    pub unknown: usize,
}

/// How long a publisher's claim on frontier entries lasts ([`Store::unpublished`]).
pub const PUBLISH_CLAIM: Duration = Duration::from_secs(30);

/// A frontier entry ready to be published as a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpublished {
    pub url: String,
    pub depth: u32,
}

/// A search request with its terms already extracted from the user's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    /// Lowercased words; every one must match (AND).
    pub terms: Vec<String>,
    pub limit: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchResults {
    /// Pages matching: exact up to the ranking's bound, estimated above it (`total_exact`).
    pub total: u64,
    pub total_exact: bool,
    pub hits: Vec<protocol::SearchHit>,
}

/// The page ids' span, `(min, max)`, for [`estimated_total`]: each in a query of its own
/// (SQLite reads a lone min() or max() of the rowid from the b-tree's edge, but both in one
/// query scan the table: 9 ms on 50,000 pages).
pub(crate) const PAGE_ID_SPAN: &str =
    "SELECT (SELECT min(id) FROM pages), (SELECT max(id) FROM pages)";

/// The total of a query that matches more pages than its ranking looks at, without walking
/// every match: its `seen` newest matches lie on page ids `from..=max`, and the other ids of
/// `span` ([`PAGE_ID_SPAN`]) are taken to match as densely. Exact when every page matches; at
/// least `seen`. Page ids only grow, so the newest pages are the highest ids; gaps in the ids (a
/// sequence value an upsert used up) are in both spans and cancel out.
pub(crate) fn estimated_total(seen: u64, from: i64, span: (Option<i64>, Option<i64>)) -> u64 {
    let (min_id, max_id) = (span.0.unwrap_or(from), span.1.unwrap_or(from));
    let range = (max_id.saturating_sub(from)).saturating_add(1).max(1) as f64;
    let all = (max_id.saturating_sub(min_id)).saturating_add(1).max(1) as f64;
    ((seen as f64 * all / range).round() as u64).max(seen)
}

/// Pages, frontier and full-text index. Every method is atomic; ingest is idempotent. The store
/// also keeps the organism's [`HostLedger`] (per-host politeness across every crawler).
#[async_trait]
pub trait Store: HostLedger + Send + Sync + 'static {
    /// Record a crawl request; returns its id.
    async fn create_crawl(&self, spec: CrawlSpec) -> Result<i64>;
    /// Offer seeds (depth 0) to the frontier under `crawl_id`.
    async fn admit_seeds(
        &self,
        crawl_id: i64,
        seeds: &[Candidate],
        host_budget: u64,
    ) -> Result<Vec<Admission>>;
    /// Store crawl results: pages, frontier transitions, and new links (depth = parent's + 1,
    /// inside the crawl's depth and page limits and the per-host budget). Results for URLs
    /// already crawled or failed change nothing. With [`frontier::Links::Defer`] the pages'
    /// links are kept aside in the same transaction instead of offered, for
    /// [`Store::expand_deferred`].
    async fn ingest(
        &self,
        items: &[IngestItem],
        host_budget: u64,
        links: frontier::Links,
    ) -> Result<IngestReport>;
    /// Offer the links of up to `pages` pages kept aside, oldest first, to the frontier as
    /// [`Store::ingest`] would have, and forget them, in one transaction. Several apis may do
    /// this at once: each takes rows no other is taking.
    async fn expand_deferred(&self, pages: u32, host_budget: u64) -> Result<Expanded>;
    /// Claim frontier entries accepted but not yet handed to the queue, oldest first: each is
    /// claimed by one caller at a time (several apis publish the same frontier), for
    /// [`PUBLISH_CLAIM`]; a claim not followed by [`Store::mark_published`] in that time (its
    /// api died) lapses and the entry is claimed again.
    async fn unpublished(&self, limit: u32) -> Result<Vec<Unpublished>>;
    /// Mark entries as handed to the queue (only those still pending).
    async fn mark_published(&self, urls: &[String]) -> Result<()>;
    /// Return in-flight entries older than `age` to pending (a safety net for lost jobs).
    async fn requeue_stale(&self, age: Duration) -> Result<u64>;
    async fn search(&self, query: &SearchQuery) -> Result<SearchResults>;
    /// A token that changes whenever anything `search` reads may have changed (a commit by any
    /// cell), read before a search: an answer kept under a token is still the answer while the
    /// token stays the same. `None`: the engine cannot tell (nothing may be kept).
    async fn search_generation(&self) -> Result<Option<String>> {
        Ok(None)
    }
    async fn stats(&self, top_hosts: u32) -> Result<Stats>;
    /// The state and failure reason of one URL, if known.
    async fn frontier_state(&self, url: &str) -> Result<Option<(String, Option<String>)>>;
    /// Every indexed page URL (for tests and the oracle comparison).
    async fn indexed_urls(&self) -> Result<Vec<String>>;
}

/// An opaque handle for acknowledging one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryTag(pub u64);

#[derive(Debug, Clone)]
pub struct Delivery {
    pub tag: DeliveryTag,
    /// The decoded job, or why its bytes could not be decoded.
    pub job: std::result::Result<CrawlJob, String>,
    /// How many times this job has been delivered, this delivery included.
    pub deliveries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    pub ready: u64,
    pub leased: u64,
    pub dead: u64,
}

/// A durable job queue with at-least-once delivery: a leased job that is not acknowledged in time
/// is delivered again; after `max_deliveries` it goes to the dead-letter queue.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn publish(&self, jobs: &[CrawlJob]) -> Result<()>;
    /// Take up to `max` ready jobs. Returns quickly (possibly empty) when none are ready.
    async fn lease(&self, max: usize) -> Result<Vec<Delivery>>;
    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()>;
    /// Give a job back to be delivered again, not before `after`.
    async fn retry(&self, tag: DeliveryTag, after: Duration) -> Result<()>;
    /// Give a job back untouched, to be delivered again not before `after`, without counting
    /// this delivery: for a job that waited for its host and was never attempted.
    async fn defer(&self, tag: DeliveryTag, after: Duration) -> Result<()>;
    /// Move a job to the dead-letter queue now (a poison or malformed message).
    async fn dead_letter(&self, tag: DeliveryTag, reason: &str) -> Result<()>;
    /// Take up to `max` dead-lettered jobs, with the reason they died.
    async fn lease_dead(&self, max: usize) -> Result<Vec<(Delivery, String)>>;
    async fn ack_dead(&self, tags: &[DeliveryTag]) -> Result<()>;
    async fn depth(&self) -> Result<QueueDepth>;
}

#[cfg(test)]
mod estimate_tests {
    use super::estimated_total;

    #[test]
    fn a_total_is_estimated_from_the_density_of_the_newest_matches() {
        // Every page matches: exact.
        assert_eq!(estimated_total(1001, 4000, (Some(1), Some(5000))), 5000);
        // Every other page: the newest 1,001 on 2,002 ids of 10,000.
        assert_eq!(estimated_total(1001, 7999, (Some(1), Some(10_000))), 5000);
        // Never below what was seen, whatever the ids say.
        assert_eq!(estimated_total(1001, 10, (Some(50), Some(5))), 1001);
    }
}
