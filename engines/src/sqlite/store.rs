//! Pages, frontier and FTS5 index in one SQLite database.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{SearchHit, Stats};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

use super::{json_keys, now_ms, open_pool};
use crate::counts::KeptCounts;
use crate::frontier::{self, DeferredBatch, Entry, Links, NewEntry, State, View};
use crate::snippet::{render_snippet, MARK_CLOSE, MARK_OPEN};
use crate::{
    Admission, Candidate, CrawlSpec, EngineError, Expanded, IngestItem, IngestReport, Result,
    SearchQuery, SearchResults, Store, Unpublished,
};

/// Most matches ranked for one query (see `search`).
const RANK_CAP: i64 = 1_000;

static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    crate::accepting_newer(sqlx::migrate!("./migrations/sqlite_store"))
});
static LEDGER_MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| {
        crate::accepting_newer(sqlx::migrate!("./migrations/sqlite_ledger"))
    });

/// Where the host ledger lives: a database file of its own beside the store's
/// (`<store>-ledger.db`), so that permit requests never queue behind ingest batches for one
/// write lock; a store in memory keeps it in its own tables.
pub(super) struct Ledger {
    pub(super) pool: SqlitePool,
    pub(super) gate: super::WriteGate,
}

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    /// Every write transaction and write statement goes through it.
    pub(super) gate: super::WriteGate,
    pub(super) ledger: Ledger,
    /// What [`Store::search_generation`] reads.
    data_version: super::DataVersion,
}

/// Bring the store's schema up to date. Several cells (apis, factories) may open the same file
/// at once; a lost migration race is retried.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    crate::migrate_with_retries("store", &MIGRATOR, pool).await
}

impl SqliteStore {
    /// Open or create the store at a path or `sqlite:` URL, and bring its schema up to date.
    pub async fn open(url_or_path: &str) -> Result<Self> {
        let pool = open_pool(url_or_path, 8).await?;
        migrate(&pool).await?;
        let ledger = match super::sibling_file(url_or_path, "ledger")? {
            Some(path) => {
                let path = path.to_string_lossy();
                // Soft state (a permit lapses, a ledger row only spaces requests): a crash of the
                // machine may lose the last writes, so nothing waits for the disk.
                let options = super::connect_options(&path)?
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Off);
                let pool = super::open_pool_with(options, 2).await?;
                crate::migrate_with_retries("ledger", &LEDGER_MIGRATOR, &pool).await?;
                Ledger {
                    pool,
                    gate: super::write_gate(&path)?,
                }
            }
            None => Ledger {
                pool: pool.clone(),
                gate: super::write_gate(url_or_path)?,
            },
        };
        Ok(Self {
            pool,
            gate: super::write_gate(url_or_path)?,
            ledger,
            data_version: super::DataVersion::new(url_or_path)?,
        })
    }

    pub(super) async fn begin_write(&self) -> Result<super::WriteTx<'_>> {
        super::WriteTx::begin(&self.pool, &self.gate).await
    }
}

/// Read the rows a plan needs ([`frontier::View`]): one query per table, each taking its keys as
/// one JSON array (no limit on the number of keys, one prepared statement).
async fn read_entries(
    tx: &mut Transaction<'_, Sqlite>,
    urls: &[&str],
) -> Result<HashMap<String, Entry>> {
    let rows = sqlx::query(
        "SELECT url, crawl_id, depth, state, reason FROM frontier \
         WHERE url IN (SELECT value FROM json_each(?))",
    )
    .bind(json_keys(urls))
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|r| {
            let entry = Entry {
                crawl_id: r.get(1),
                depth: r.get::<i64, _>(2).clamp(0, i64::from(u32::MAX)) as u32,
                state: State::from_column(r.get(3))?,
                reason: r.get(4),
            };
            Ok((r.get(0), entry))
        })
        .collect()
}

async fn read_crawls(
    tx: &mut Transaction<'_, Sqlite>,
    ids: &[i64],
) -> Result<HashMap<i64, frontier::Crawl>> {
    let rows = sqlx::query(
        "SELECT id, max_depth, max_pages, admitted FROM crawls \
         WHERE id IN (SELECT value FROM json_each(?))",
    )
    .bind(json_keys(ids))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let crawl = frontier::Crawl {
                max_depth: r
                    .get::<Option<i64>, _>(1)
                    .map(|d| d.clamp(0, i64::from(u32::MAX)) as u32),
                max_pages: r.get::<Option<i64>, _>(2).map(|p| p.max(0) as u64),
                admitted: r.get::<i64, _>(3).max(0) as u64,
            };
            (r.get(0), crawl)
        })
        .collect())
}

async fn read_hosts(
    tx: &mut Transaction<'_, Sqlite>,
    hosts: &[&str],
) -> Result<HashMap<String, u64>> {
    if hosts.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query(
        "SELECT host, admitted FROM host_budget WHERE host IN (SELECT value FROM json_each(?))",
    )
    .bind(json_keys(hosts))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get::<i64, _>(1).max(0) as u64))
        .collect())
}

/// Create the plan's new frontier rows, in one statement. The write lock is held since the
/// look-up, so each is new.
async fn insert_entries(
    tx: &mut Transaction<'_, Sqlite>,
    entries: &[NewEntry<'_>],
    now: i64,
) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let rows: Vec<(&str, &str, i64, u32, &str)> = entries
        .iter()
        .map(|e| (e.url, e.host, e.crawl_id, e.depth, e.state.as_str()))
        .collect();
    // `WHERE true` tells SQLite's parser that ON CONFLICT belongs to the INSERT.
    let done = sqlx::query(
        "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, ? \
         FROM json_each(?) WHERE true ON CONFLICT (url) DO NOTHING",
    )
    .bind(now)
    .bind(json_keys(&rows))
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != entries.len() as u64 {
        return Err(EngineError::Conflict(
            "a URL of this batch is in the frontier already".into(),
        ));
    }
    Ok(())
}

/// Add the plan's counts to the crawls' and hosts' admitted counts, one statement each.
async fn add_counts(tx: &mut Transaction<'_, Sqlite>, counts: &frontier::Counts<'_>) -> Result<()> {
    if !counts.crawls.is_empty() {
        sqlx::query(
            "UPDATE crawls SET admitted = admitted + v.n \
             FROM (SELECT value->>0 AS id, value->>1 AS n FROM json_each(?)) AS v \
             WHERE crawls.id = v.id",
        )
        .bind(json_keys(&counts.crawls))
        .execute(&mut **tx)
        .await?;
    }
    if !counts.hosts.is_empty() {
        sqlx::query(
            "INSERT INTO host_budget (host, admitted) \
             SELECT value->>0, value->>1 FROM json_each(?) WHERE true \
             ON CONFLICT (host) DO UPDATE SET admitted = admitted + excluded.admitted",
        )
        .bind(json_keys(&counts.hosts))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Execute a plan's writes (the write lock is held since its view was read), a fixed number of
/// statements whatever the batch's size (each list travels as one JSON array); returns how many
/// pages were added or changed.
async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    plan: &frontier::IngestPlan<'_>,
    now: i64,
) -> Result<usize> {
    insert_entries(tx, &plan.inserts, now).await?;
    if !plan.changes.is_empty() {
        let rows: Vec<_> = plan
            .changes
            .iter()
            .map(|c| {
                (
                    c.url,
                    c.before.crawl_id,
                    c.before.depth,
                    c.before.state.as_str(),
                    c.after.depth,
                    c.after.state.as_str(),
                    c.after.reason.as_deref(),
                )
            })
            .collect();
        let done = sqlx::query(
            "UPDATE frontier SET depth = v.d, state = v.s, reason = v.r, updated_ms = ? \
             FROM (SELECT value->>0 AS u, value->>1 AS c, value->>2 AS bd, value->>3 AS bs, \
                          value->>4 AS d, value->>5 AS s, value->>6 AS r FROM json_each(?)) AS v \
             WHERE frontier.url = v.u AND frontier.crawl_id = v.c AND frontier.depth = v.bd \
               AND frontier.state = v.bs",
        )
        .bind(now)
        .bind(json_keys(&rows))
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() != plan.changes.len() as u64 {
            return Err(EngineError::Conflict(
                "a frontier entry changed since it was read".into(),
            ));
        }
    }
    let mut pages_indexed = 0;
    if !plan.pages.is_empty() {
        // Text with a NUL byte stays whole through JSON (`\u0000`) and `->>`.
        let rows: Vec<_> = plan
            .pages
            .iter()
            .map(|p| (p.url, p.host, p.title, p.body))
            .collect();
        let done = sqlx::query(
            "INSERT INTO pages (url, host, title, body, fetched_ms) \
             SELECT value->>0, value->>1, value->>2, value->>3, ? FROM json_each(?) WHERE true \
             ON CONFLICT (url) DO UPDATE SET title = excluded.title, body = excluded.body, \
             fetched_ms = excluded.fetched_ms \
             WHERE pages.title != excluded.title OR pages.body != excluded.body",
        )
        .bind(now)
        .bind(json_keys(&rows))
        .execute(&mut **tx)
        .await?;
        pages_indexed = done.rows_affected() as usize;
    }
    if !plan.deferred.is_empty() {
        let rows: Vec<_> = plan
            .deferred
            .iter()
            .map(|d| {
                (
                    d.crawl_id,
                    d.depth,
                    frontier::encode_links(d.links),
                    d.links.len(),
                )
            })
            .collect();
        sqlx::query(
            "INSERT INTO deferred_links (crawl_id, depth, links, n, created_ms) \
             SELECT value->>0, value->>1, value->>2, value->>3, ? FROM json_each(?)",
        )
        .bind(now)
        .bind(json_keys(&rows))
        .execute(&mut **tx)
        .await?;
    }
    add_counts(tx, &plan.counts).await?;
    Ok(pages_indexed)
}

/// Turn the user's words into an FTS5 query: each term quoted (so no FTS syntax gets through),
/// all required.
pub(crate) fn fts_query(terms: &[String]) -> String {
    terms
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_crawl(&self, spec: CrawlSpec) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO crawls (created_ms, max_depth, max_pages) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(now_ms())
        .bind(spec.max_depth.map(i64::from))
        .bind(spec.max_pages.map(|p| p.min(i64::MAX as u64) as i64))
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    async fn admit_seeds(
        &self,
        crawl_id: i64,
        seeds: &[Candidate],
        host_budget: u64,
    ) -> Result<Vec<Admission>> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let urls: Vec<&str> = seeds.iter().map(|s| s.url.as_str()).collect();
        let mut view = View {
            entries: read_entries(&mut tx, &urls).await?,
            crawls: read_crawls(&mut tx, &[crawl_id]).await?,
            ..View::default()
        };
        view.hosts = read_hosts(&mut tx, &view.hosts_to_admit(seeds)).await?;
        let plan = frontier::plan_seeds(&view, crawl_id, seeds, host_budget);
        insert_entries(&mut tx, &plan.inserts, now).await?;
        add_counts(&mut tx, &plan.counts).await?;
        tx.commit().await?;
        Ok(plan.admissions)
    }

    async fn ingest(
        &self,
        items: &[IngestItem],
        host_budget: u64,
        links: Links,
    ) -> Result<IngestReport> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut view = View {
            entries: read_entries(&mut tx, &frontier::ingest_urls(items, links)).await?,
            ..View::default()
        };
        let crawl_ids = view.crawl_ids(frontier::item_urls(items));
        view.crawls = read_crawls(&mut tx, &crawl_ids).await?;
        let admit = view.hosts_to_admit(frontier::ingest_links(items, links));
        view.hosts = read_hosts(&mut tx, &admit).await?;
        let plan = frontier::plan_ingest(&view, items, host_budget, links);
        let pages_indexed = apply(&mut tx, &plan, now).await?;
        tx.commit().await?;
        Ok(plan.report(pages_indexed))
    }

    async fn expand_deferred(&self, pages: u32, host_budget: u64) -> Result<Expanded> {
        // Asked often by every api: nothing kept costs a read, not the write lock.
        let any: Option<i64> = sqlx::query_scalar("SELECT id FROM deferred_links LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        if any.is_none() {
            return Ok(Expanded::default());
        }
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "SELECT id, crawl_id, depth, links FROM deferred_links ORDER BY id LIMIT ?",
        )
        .bind(i64::from(pages))
        .fetch_all(&mut **tx)
        .await?;
        if rows.is_empty() {
            return Ok(Expanded::default());
        }
        let batches = rows
            .iter()
            .map(|r| DeferredBatch::read(r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect::<Result<Vec<_>>>()?;
        let mut view = View {
            entries: read_entries(&mut tx, &frontier::deferred_urls(&batches)).await?,
            crawls: read_crawls(&mut tx, &frontier::deferred_crawl_ids(&batches)).await?,
            ..View::default()
        };
        let admit = view.hosts_to_admit(batches.iter().flat_map(|b| &b.links));
        view.hosts = read_hosts(&mut tx, &admit).await?;
        let plan = frontier::plan_deferred(&view, &batches, host_budget);
        apply(&mut tx, &plan, now).await?;
        let ids: Vec<i64> = batches.iter().map(|b| b.id).collect();
        sqlx::query("DELETE FROM deferred_links WHERE id IN (SELECT value FROM json_each(?))")
            .bind(json_keys(&ids))
            .execute(&mut **tx)
            .await?;
        tx.commit().await?;
        Ok(Expanded {
            pages: batches.len(),
            links_admitted: plan.links_admitted,
        })
    }

    async fn unpublished(&self, limit: u32) -> Result<Vec<Unpublished>> {
        // A claim: the entries are this caller's to publish until the claim runs out.
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "UPDATE frontier SET claimed_until_ms = ? WHERE url IN (\
                 SELECT url FROM frontier WHERE state = 'pending' AND claimed_until_ms <= ? \
                 ORDER BY updated_ms LIMIT ?) \
             RETURNING url, depth, updated_ms",
        )
        .bind(now + crate::PUBLISH_CLAIM.as_millis() as i64)
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut **tx)
        .await?;
        tx.commit().await?;
        let mut rows: Vec<(i64, Unpublished)> = rows
            .into_iter()
            .map(|r| {
                (
                    r.get::<i64, _>(2),
                    Unpublished {
                        url: r.get(0),
                        depth: r.get::<i64, _>(1) as u32,
                    },
                )
            })
            .collect();
        rows.sort_by_key(|(updated, _)| *updated);
        Ok(rows.into_iter().map(|(_, u)| u).collect())
    }

    async fn mark_published(&self, urls: &[String]) -> Result<()> {
        if urls.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let _gate = self.gate.enter().await?;
        sqlx::query(
            "UPDATE frontier SET state = 'queued', updated_ms = ? \
             WHERE url IN (SELECT value FROM json_each(?)) AND state = 'pending'",
        )
        .bind(now)
        .bind(json_keys(urls))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn requeue_stale(&self, age: Duration) -> Result<u64> {
        let cutoff = now_ms() - age.as_millis() as i64;
        let _gate = self.gate.enter().await?;
        let done = sqlx::query(
            "UPDATE frontier SET state = 'pending', updated_ms = ? WHERE state = 'queued' AND updated_ms < ?",
        )
        .bind(now_ms())
        .bind(cutoff)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchResults> {
        let fts = fts_query(&query.terms);
        let offset = query.offset.min(i64::MAX as u64) as i64;
        // Bounded top-k: a query matching more pages than the cap is ranked among the newest
        // `cap` of them (bm25 for each, and a sort), and its total is estimated from how densely
        // they lie among the newest pages ([`crate::estimated_total`]): a common term costs a
        // walk of `cap` entries of its posting list (newest first), not of all of it. Below the
        // cap everything is exact.
        let cap = RANK_CAP.max(offset.saturating_add(i64::from(query.limit)));
        let (seen, from_rowid): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(rowid) FROM \
             (SELECT rowid FROM pages_fts WHERE pages_fts MATCH ? ORDER BY rowid DESC LIMIT ?)",
        )
        .bind(&fts)
        .bind(cap.saturating_add(1))
        .fetch_one(&self.pool)
        .await?;
        let (total, total_exact, from_rowid) = match from_rowid {
            Some(from) if seen > cap => {
                let span = sqlx::query_as(crate::PAGE_ID_SPAN)
                    .fetch_one(&self.pool)
                    .await?;
                (crate::estimated_total(seen as u64, from, span), false, from)
            }
            _ => (seen.max(0) as u64, true, i64::MIN),
        };
        if total == 0 || query.limit == 0 {
            return Ok(SearchResults {
                total,
                total_exact,
                hits: Vec::new(),
            });
        }
        // Ranked first, snippets after: snippet() re-reads and tokenizes a page's text, and
        // SQLite computes a sorted query's columns for every row before it sorts, so a
        // snippet in the ranking query would cost one per candidate, not one per hit.
        let rows = sqlx::query(
            "WITH top AS ( \
                 SELECT rowid AS id, bm25(pages_fts, 4.0, 1.0) AS rank FROM pages_fts \
                 WHERE pages_fts MATCH ?3 AND rowid >= ?4 \
                 ORDER BY rank, rowid LIMIT ?5 OFFSET ?6) \
             SELECT p.url, p.title, snippet(pages_fts, -1, ?1, ?2, '…', 24) AS snip, top.rank \
             FROM top CROSS JOIN pages_fts ON pages_fts.rowid = top.id \
                      JOIN pages p ON p.id = top.id \
             WHERE pages_fts MATCH ?3 \
             ORDER BY top.rank, top.id",
        )
        .bind(MARK_OPEN)
        .bind(MARK_CLOSE)
        .bind(&fts)
        .bind(from_rowid)
        .bind(i64::from(query.limit))
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let hits = rows
            .into_iter()
            .map(|r| SearchHit {
                url: r.get(0),
                title: r.get(1),
                snippet: render_snippet(&r.get::<String, _>(2)),
                // bm25() is lower-is-better and negative; flip it so higher is better.
                score: -r.get::<f64, _>(3),
            })
            .collect();
        Ok(SearchResults {
            total,
            total_exact,
            hits,
        })
    }

    async fn search_generation(&self) -> Result<Option<String>> {
        Ok(Some(self.data_version.read().await?))
    }

    async fn stats(&self, top_hosts: u32) -> Result<Stats> {
        // Kept counts (migration 0007), read in one snapshot.
        let mut tx = self.pool.begin().await?;
        let frontier = sqlx::query_as("SELECT host, state, n FROM frontier_counts WHERE n != 0")
            .fetch_all(&mut *tx)
            .await?;
        let mut kept = KeptCounts {
            frontier,
            ..KeptCounts::default()
        };
        for (name, n) in sqlx::query_as::<_, (String, i64)>("SELECT name, n FROM store_counts")
            .fetch_all(&mut *tx)
            .await?
        {
            match name.as_str() {
                "pages" => kept.pages = n,
                "deferred" => kept.deferred = n,
                _ => {}
            }
        }
        tx.commit().await?;
        Ok(kept.stats(top_hosts))
    }

    async fn frontier_state(&self, url: &str) -> Result<Option<(String, Option<String>)>> {
        let row = sqlx::query("SELECT state, reason FROM frontier WHERE url = ?")
            .bind(url)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn indexed_urls(&self) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT url FROM pages ORDER BY url")
            .fetch_all(&self.pool)
            .await?)
    }
}
