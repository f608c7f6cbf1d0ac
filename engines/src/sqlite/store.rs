//! Pages, frontier and FTS5 index in one SQLite database.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{FrontierCounts, HostStats, SearchHit, Stats};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

use super::{now_ms, open_pool};
use crate::frontier::{self, Entry, NewEntry, State, View};
use crate::snippet::{render_snippet, MARK_CLOSE, MARK_OPEN};
use crate::{
    Admission, Candidate, CrawlSpec, EngineError, IngestItem, IngestReport, Result, SearchQuery,
    SearchResults, Store, Unpublished,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite_store");

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
}

/// Bring the store's schema up to date. Several cells (apis, factories) may open the same file
/// at once; a lost migration race is retried.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    crate::migrate_with_retries("store", || MIGRATOR.run(pool)).await
}

impl SqliteStore {
    /// Open or create the store at a path or `sqlite:` URL, and bring its schema up to date.
    pub async fn open(url_or_path: &str) -> Result<Self> {
        let pool = open_pool(url_or_path, 8).await?;
        migrate(&pool).await?;
        Ok(Self { pool })
    }

    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
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

fn json_keys<T: serde::Serialize>(keys: &[T]) -> String {
    serde_json::to_string(keys).expect("strings and integers serialize")
}

/// Create the plan's new frontier rows. The write lock is held since the look-up, so each is new.
async fn insert_entries(
    tx: &mut Transaction<'_, Sqlite>,
    entries: &[NewEntry<'_>],
    now: i64,
) -> Result<()> {
    for e in entries {
        let done = sqlx::query(
            "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (url) DO NOTHING",
        )
        .bind(e.url)
        .bind(e.host)
        .bind(e.crawl_id)
        .bind(i64::from(e.depth))
        .bind(e.state.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(EngineError::Conflict(format!(
                "{} is in the frontier already",
                e.url
            )));
        }
    }
    Ok(())
}

/// Add the plan's counts to the crawls' and hosts' admitted counts.
async fn add_counts(tx: &mut Transaction<'_, Sqlite>, counts: &frontier::Counts<'_>) -> Result<()> {
    for (id, n) in &counts.crawls {
        sqlx::query("UPDATE crawls SET admitted = admitted + ? WHERE id = ?")
            .bind(*n as i64)
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    for (host, n) in &counts.hosts {
        sqlx::query(
            "INSERT INTO host_budget (host, admitted) VALUES (?, ?) \
             ON CONFLICT (host) DO UPDATE SET admitted = admitted + excluded.admitted",
        )
        .bind(host)
        .bind(*n as i64)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
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

    async fn ingest(&self, items: &[IngestItem], host_budget: u64) -> Result<IngestReport> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut view = View {
            entries: read_entries(&mut tx, &frontier::ingest_urls(items)).await?,
            ..View::default()
        };
        let crawl_ids = view.crawl_ids(frontier::item_urls(items));
        view.crawls = read_crawls(&mut tx, &crawl_ids).await?;
        view.hosts =
            read_hosts(&mut tx, &view.hosts_to_admit(frontier::ingest_links(items))).await?;
        let plan = frontier::plan_ingest(&view, items, host_budget);

        insert_entries(&mut tx, &plan.inserts, now).await?;
        for c in &plan.changes {
            let done = sqlx::query(
                "UPDATE frontier SET depth = ?, state = ?, reason = ?, updated_ms = ? \
                 WHERE url = ? AND crawl_id = ? AND depth = ? AND state = ?",
            )
            .bind(i64::from(c.after.depth))
            .bind(c.after.state.as_str())
            .bind(c.after.reason.as_deref())
            .bind(now)
            .bind(c.url)
            .bind(c.before.crawl_id)
            .bind(i64::from(c.before.depth))
            .bind(c.before.state.as_str())
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(EngineError::Conflict(format!("{} changed", c.url)));
            }
        }
        let mut pages_indexed = 0;
        for p in &plan.pages {
            let done = sqlx::query(
                "INSERT INTO pages (url, host, title, body, fetched_ms) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (url) DO UPDATE SET title = excluded.title, body = excluded.body, \
                 fetched_ms = excluded.fetched_ms \
                 WHERE pages.title != excluded.title OR pages.body != excluded.body",
            )
            .bind(p.url)
            .bind(p.host)
            .bind(p.title)
            .bind(p.body)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            pages_indexed += done.rows_affected() as usize;
        }
        add_counts(&mut tx, &plan.counts).await?;
        tx.commit().await?;
        Ok(plan.report(pages_indexed))
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
        .fetch_all(&mut *tx)
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
        let mut tx = self.begin_write().await?;
        for url in urls {
            sqlx::query(
                "UPDATE frontier SET state = 'queued', updated_ms = ? WHERE url = ? AND state = 'pending'",
            )
            .bind(now)
            .bind(url)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn requeue_stale(&self, age: Duration) -> Result<u64> {
        let cutoff = now_ms() - age.as_millis() as i64;
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
        let total: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pages_fts WHERE pages_fts MATCH ?")
                .bind(&fts)
                .fetch_one(&self.pool)
                .await?;
        let rows = sqlx::query(
            "SELECT p.url, p.title, \
                    snippet(pages_fts, -1, ?, ?, '…', 24) AS snip, \
                    bm25(pages_fts, 4.0, 1.0) AS rank \
             FROM pages_fts JOIN pages p ON p.id = pages_fts.rowid \
             WHERE pages_fts MATCH ? ORDER BY rank, p.id LIMIT ? OFFSET ?",
        )
        .bind(MARK_OPEN)
        .bind(MARK_CLOSE)
        .bind(&fts)
        .bind(i64::from(query.limit))
        .bind(query.offset.min(i64::MAX as u64) as i64)
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
            total: total as u64,
            hits,
        })
    }

    async fn stats(&self, top_hosts: u32) -> Result<Stats> {
        let pages: i64 = sqlx::query_scalar("SELECT count(*) FROM pages")
            .fetch_one(&self.pool)
            .await?;
        let mut frontier = FrontierCounts::default();
        for row in sqlx::query("SELECT state, count(*) FROM frontier GROUP BY state")
            .fetch_all(&self.pool)
            .await?
        {
            let n = row.get::<i64, _>(1) as u64;
            add_state(&mut frontier, &row.get::<String, _>(0), n);
        }
        let mut hosts: HashMap<String, HostStats> = HashMap::new();
        for row in sqlx::query("SELECT host, state, count(*) FROM frontier GROUP BY host, state")
            .fetch_all(&self.pool)
            .await?
        {
            let host: String = row.get(0);
            let entry = hosts.entry(host.clone()).or_insert_with(|| HostStats {
                host,
                ..HostStats::default()
            });
            let n = row.get::<i64, _>(2) as u64;
            let mut c = FrontierCounts {
                pending: entry.pending,
                in_flight: entry.in_flight,
                crawled: entry.crawled,
                failed: entry.failed,
            };
            add_state(&mut c, &row.get::<String, _>(1), n);
            entry.pending = c.pending;
            entry.in_flight = c.in_flight;
            entry.crawled = c.crawled;
            entry.failed = c.failed;
        }
        let mut hosts: Vec<HostStats> = hosts.into_values().collect();
        hosts.sort_by(|a, b| {
            let total = |h: &HostStats| h.pending + h.in_flight + h.crawled + h.failed;
            total(b).cmp(&total(a)).then_with(|| a.host.cmp(&b.host))
        });
        hosts.truncate(top_hosts as usize);
        Ok(Stats {
            pages_indexed: pages as u64,
            frontier,
            hosts,
        })
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

fn add_state(c: &mut FrontierCounts, state: &str, n: u64) {
    match state {
        "pending" => c.pending += n,
        "queued" => c.in_flight += n,
        "crawled" => c.crawled += n,
        "failed" => c.failed += n,
        _ => {}
    }
}
