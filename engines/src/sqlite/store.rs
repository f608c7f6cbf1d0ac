//! Pages, frontier and FTS5 index in one SQLite database.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{FrontierCounts, HostStats, SearchHit, Stats};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

use super::{now_ms, open_pool};
use crate::snippet::{render_snippet, MARK_CLOSE, MARK_OPEN};
use crate::{
    Admission, Candidate, CrawlSpec, IngestItem, IngestOutcome, IngestReport, Result, SearchQuery,
    SearchResults, Store, Unpublished,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite_store");

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
}

/// Bring the store's schema up to date. Several cells (apis, factories) may open the same file
/// at once; a lost migration race is retried.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    let mut attempt = 0;
    loop {
        match MIGRATOR.run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "store migration failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
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

/// Per-transaction view of the limits a link must pass.
struct Budgets {
    crawls: HashMap<i64, CrawlLimits>,
    hosts: HashMap<String, u64>,
    host_budget: u64,
}

#[derive(Clone, Copy)]
struct CrawlLimits {
    max_depth: Option<u32>,
    max_pages: Option<u64>,
    admitted: u64,
}

impl Budgets {
    fn new(host_budget: u64) -> Self {
        Self {
            crawls: HashMap::new(),
            hosts: HashMap::new(),
            host_budget,
        }
    }

    async fn crawl(&mut self, tx: &mut Transaction<'_, Sqlite>, id: i64) -> Result<CrawlLimits> {
        if let Some(limits) = self.crawls.get(&id) {
            return Ok(*limits);
        }
        let row = sqlx::query("SELECT max_depth, max_pages, admitted FROM crawls WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        let limits = match row {
            Some(row) => CrawlLimits {
                max_depth: row.get::<Option<i64>, _>(0).map(|d| d as u32),
                max_pages: row.get::<Option<i64>, _>(1).map(|p| p as u64),
                admitted: row.get::<i64, _>(2) as u64,
            },
            // A frontier entry whose crawl row is gone: treat as unlimited.
            None => CrawlLimits {
                max_depth: None,
                max_pages: None,
                admitted: 0,
            },
        };
        self.crawls.insert(id, limits);
        Ok(limits)
    }

    async fn host(&mut self, tx: &mut Transaction<'_, Sqlite>, host: &str) -> Result<u64> {
        if let Some(n) = self.hosts.get(host) {
            return Ok(*n);
        }
        let n: Option<i64> = sqlx::query_scalar("SELECT admitted FROM host_budget WHERE host = ?")
            .bind(host)
            .fetch_optional(&mut **tx)
            .await?;
        let n = n.unwrap_or(0) as u64;
        self.hosts.insert(host.to_string(), n);
        Ok(n)
    }

    /// Why a new URL of `host` under crawl `id` may not be admitted, if it may not.
    async fn refusal(
        &mut self,
        tx: &mut Transaction<'_, Sqlite>,
        id: i64,
        host: &str,
    ) -> Result<Option<String>> {
        let crawl = self.crawl(tx, id).await?;
        if let Some(max) = crawl.max_pages {
            if crawl.admitted >= max {
                return Ok(Some(format!("crawl {id} reached its page limit ({max})")));
            }
        }
        if self.host(tx, host).await? >= self.host_budget {
            return Ok(Some(format!(
                "host {host} reached its page budget ({})",
                self.host_budget
            )));
        }
        Ok(None)
    }

    fn count_admitted(&mut self, id: i64, host: &str) {
        if let Some(c) = self.crawls.get_mut(&id) {
            c.admitted += 1;
        }
        *self.hosts.entry(host.to_string()).or_insert(0) += 1;
    }

    async fn write_back(self, tx: &mut Transaction<'_, Sqlite>) -> Result<()> {
        for (id, limits) in self.crawls {
            sqlx::query("UPDATE crawls SET admitted = ? WHERE id = ?")
                .bind(limits.admitted as i64)
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
        for (host, n) in self.hosts {
            sqlx::query(
                "INSERT INTO host_budget (host, admitted) VALUES (?, ?) \
                 ON CONFLICT (host) DO UPDATE SET admitted = excluded.admitted",
            )
            .bind(host)
            .bind(n as i64)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

/// Insert a new frontier entry; true when it was new.
async fn insert_pending(
    tx: &mut Transaction<'_, Sqlite>,
    c: &Candidate,
    crawl_id: i64,
    depth: u32,
    now: i64,
) -> Result<bool> {
    let done = sqlx::query(
        "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
         VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT (url) DO NOTHING",
    )
    .bind(&c.url)
    .bind(&c.host)
    .bind(crawl_id)
    .bind(depth as i64)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
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
        let mut budgets = Budgets::new(host_budget);
        let mut out = Vec::with_capacity(seeds.len());
        for seed in seeds {
            let known: Option<String> =
                sqlx::query_scalar("SELECT state FROM frontier WHERE url = ?")
                    .bind(&seed.url)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(state) = known {
                out.push(Admission::Known(state_name(&state)));
                continue;
            }
            if let Some(reason) = budgets.refusal(&mut tx, crawl_id, &seed.host).await? {
                out.push(Admission::Refused(reason));
                continue;
            }
            if insert_pending(&mut tx, seed, crawl_id, 0, now).await? {
                budgets.count_admitted(crawl_id, &seed.host);
                out.push(Admission::Admitted);
            } else {
                out.push(Admission::Known("pending"));
            }
        }
        budgets.write_back(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn ingest(&self, items: &[IngestItem], host_budget: u64) -> Result<IngestReport> {
        let now = now_ms();
        let mut report = IngestReport::default();
        let mut tx = self.begin_write().await?;
        let mut budgets = Budgets::new(host_budget);
        for item in items {
            let row = sqlx::query("SELECT crawl_id, depth, state FROM frontier WHERE url = ?")
                .bind(&item.url)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(row) = row else {
                report.unknown += 1;
                continue;
            };
            let crawl_id: i64 = row.get(0);
            let depth = row.get::<i64, _>(1) as u32;
            let state: String = row.get(2);
            if state == "crawled" || state == "failed" {
                continue; // a repeat: idempotent
            }
            report.stored += 1;
            match &item.outcome {
                IngestOutcome::Failed { reason } => {
                    sqlx::query(
                        "UPDATE frontier SET state = 'failed', reason = ?, updated_ms = ? WHERE url = ?",
                    )
                    .bind(reason)
                    .bind(now)
                    .bind(&item.url)
                    .execute(&mut *tx)
                    .await?;
                }
                IngestOutcome::Page {
                    final_url,
                    final_host,
                    title,
                    text,
                    indexable,
                    links,
                } => {
                    sqlx::query(
                        "UPDATE frontier SET state = 'crawled', reason = NULL, updated_ms = ? WHERE url = ?",
                    )
                    .bind(now)
                    .bind(&item.url)
                    .execute(&mut *tx)
                    .await?;
                    if final_url != &item.url {
                        // The redirect target is crawled too; a job already queued for it will
                        // find it done.
                        sqlx::query(
                            "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
                             VALUES (?, ?, ?, ?, 'crawled', ?) \
                             ON CONFLICT (url) DO UPDATE SET state = 'crawled', reason = NULL, \
                             updated_ms = excluded.updated_ms \
                             WHERE frontier.state IN ('pending', 'queued')",
                        )
                        .bind(final_url)
                        .bind(final_host)
                        .bind(crawl_id)
                        .bind(depth as i64)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    }
                    if *indexable {
                        let done = sqlx::query(
                            "INSERT INTO pages (url, host, title, body, fetched_ms) VALUES (?, ?, ?, ?, ?) \
                             ON CONFLICT (url) DO UPDATE SET title = excluded.title, body = excluded.body, \
                             fetched_ms = excluded.fetched_ms \
                             WHERE pages.title != excluded.title OR pages.body != excluded.body",
                        )
                        .bind(final_url)
                        .bind(final_host)
                        .bind(title)
                        .bind(text)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        report.pages_indexed += done.rows_affected() as usize;
                    }
                    let crawl = budgets.crawl(&mut tx, crawl_id).await?;
                    let child_depth = depth + 1;
                    if crawl.max_depth.is_some_and(|max| child_depth > max) {
                        continue;
                    }
                    for link in links {
                        let refused = budgets.refusal(&mut tx, crawl_id, &link.host).await?;
                        // A refused link is not in the frontier: nothing accepted, nothing to lose.
                        if refused.is_none()
                            && insert_pending(&mut tx, link, crawl_id, child_depth, now).await?
                        {
                            budgets.count_admitted(crawl_id, &link.host);
                            report.links_admitted += 1;
                            continue;
                        }
                        if crawl.max_depth.is_some() {
                            // Under a depth limit, a shorter path to a known URL must re-expand it,
                            // or pages within the limit would be missed depending on crawl order.
                            sqlx::query(
                                "UPDATE frontier SET depth = ?, updated_ms = ?, \
                                 state = CASE WHEN state = 'crawled' THEN 'pending' ELSE state END \
                                 WHERE url = ? AND depth > ? AND crawl_id = ?",
                            )
                            .bind(child_depth as i64)
                            .bind(now)
                            .bind(&link.url)
                            .bind(child_depth as i64)
                            .bind(crawl_id)
                            .execute(&mut *tx)
                            .await?;
                        }
                    }
                }
            }
        }
        budgets.write_back(&mut tx).await?;
        tx.commit().await?;
        Ok(report)
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

fn state_name(state: &str) -> &'static str {
    match state {
        "pending" => "pending",
        "queued" => "queued",
        "crawled" => "crawled",
        "failed" => "failed",
        _ => "unknown",
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
