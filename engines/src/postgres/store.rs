//! [`Store`] on PostgreSQL.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{FrontierCounts, HostStats, SearchHit, Stats};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, Row};

use super::PgOptions;
use crate::snippet::{render_snippet, MARK_CLOSE, MARK_OPEN};
use crate::sqlite::now_ms;
use crate::{
    Admission, Candidate, CrawlSpec, EngineError, IngestItem, IngestOutcome, IngestReport, Result,
    SearchQuery, SearchResults, Store, Unpublished,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres_store");

/// The text search configuration of the `pages.search` column (see the migration).
const TS_CONFIG: &str = "simple";

/// `ts_headline` options: the markers are the ones [`render_snippet`] turns into `<mark>`.
fn headline_options() -> String {
    format!(
        "StartSel=\"{MARK_OPEN}\", StopSel=\"{MARK_CLOSE}\", MaxWords=24, MinWords=10, \
         MaxFragments=2, FragmentDelimiter=\" … \""
    )
}

/// How many times a transaction that lost a deadlock or serialization conflict is run again.
const CONFLICT_RETRIES: u32 = 8;

pub struct PgStore {
    pub(super) pool: PgPool,
}

impl PgStore {
    /// Connect with default pool settings and bring the schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connect to `postgres://` `url` and bring the schema up to date. Several cells may do this
    /// at once: sqlx's migrator holds a PostgreSQL advisory lock while it migrates.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| EngineError::Config(format!("bad PostgreSQL URL: {e}")))?
            .application_name("homeostat");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            // A pooled connection is checked before use, so after a server restart the dead ones
            // are replaced instead of failing the calls that draw them.
            .test_before_acquire(true)
            .connect_with(connect)
            .await?;
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "store migration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Self { pool })
    }

    /// The connection pool (for diagnostics and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn admit_seeds_once(
        &self,
        crawl_id: i64,
        seeds: &[Candidate],
        host_budget: u64,
    ) -> Result<Vec<Admission>> {
        let now = now_ms();
        let seeds: Vec<(String, String)> = seeds
            .iter()
            .map(|s| (pg_url(&s.url).into_owned(), pg_text(&s.host).into_owned()))
            .collect();
        let mut tx = self.pool.begin().await?;
        let mut budgets = Budgets::new(host_budget);
        budgets.lock_crawls(&mut tx, &[crawl_id]).await?;
        let urls: Vec<&str> = seeds.iter().map(|(u, _)| u.as_str()).collect();
        let known: HashMap<String, String> =
            sqlx::query("SELECT url, state FROM frontier WHERE url = ANY($1)")
                .bind(&urls)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        let hosts: Vec<&str> = seeds
            .iter()
            .filter(|(u, _)| !known.contains_key(u))
            .map(|(_, h)| h.as_str())
            .collect();
        budgets.lock_hosts(&mut tx, &hosts).await?;

        let mut out = Vec::with_capacity(seeds.len());
        let mut admitted: Vec<usize> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for (i, (url, host)) in seeds.iter().enumerate() {
            if let Some(state) = known.get(url) {
                out.push(Admission::Known(state_name(state)));
                continue;
            }
            if !seen.insert(url) {
                out.push(Admission::Known("pending"));
                continue;
            }
            if let Some(reason) = budgets.refusal(crawl_id, host) {
                out.push(Admission::Refused(reason));
                continue;
            }
            budgets.count(crawl_id, host, 1);
            admitted.push(i);
            out.push(Admission::Admitted);
        }
        let offers: Vec<NewEntry<'_>> = admitted
            .iter()
            .map(|&i| NewEntry {
                url: &seeds[i].0,
                host: &seeds[i].1,
                crawl_id,
                depth: 0,
            })
            .collect();
        let inserted = insert_pending(&mut tx, &offers, now).await?;
        for &i in &admitted {
            if !inserted.contains(seeds[i].0.as_str()) {
                // Another cell admitted it between our look-up and our insert.
                budgets.count(crawl_id, &seeds[i].1, -1);
                out[i] = Admission::Known("pending");
            }
        }
        budgets.write_back(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    async fn ingest_once(&self, items: &[IngestItem], host_budget: u64) -> Result<IngestReport> {
        let now = now_ms();
        let mut report = IngestReport::default();
        if items.is_empty() {
            return Ok(report);
        }
        let mut item_urls: Vec<String> =
            items.iter().map(|i| pg_url(&i.url).into_owned()).collect();
        item_urls.sort_unstable();
        item_urls.dedup();

        let mut tx = self.pool.begin().await?;
        let mut budgets = Budgets::new(host_budget);
        // Lock order: crawls, then the results' own frontier rows, then host budgets.
        let crawl_ids: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT crawl_id FROM frontier WHERE url = ANY($1) ORDER BY crawl_id",
        )
        .bind(&item_urls)
        .fetch_all(&mut *tx)
        .await?;
        budgets.lock_crawls(&mut tx, &crawl_ids).await?;
        let mut rows: HashMap<String, ItemRow> = sqlx::query(
            "SELECT url, crawl_id, depth, state FROM frontier WHERE url = ANY($1) \
             ORDER BY url FOR UPDATE",
        )
        .bind(&item_urls)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                ItemRow {
                    crawl_id: r.get(1),
                    depth: r.get(2),
                    state: state_name(&r.get::<String, _>(3)),
                },
            )
        })
        .collect();

        // Walk the results in order over an in-memory view of their rows, exactly as the SQLite
        // store walks them one statement at a time; then write everything in batches.
        let mut failed: Vec<(String, String)> = Vec::new();
        let mut crawled: Vec<String> = Vec::new();
        let mut redirects: Vec<(String, &str, i64, i32)> = Vec::new();
        let mut redirect_seen: HashSet<String> = HashSet::new();
        let mut pages: Vec<PageRow<'_>> = Vec::new();
        let mut page_index: HashMap<String, usize> = HashMap::new();
        let mut offers: Vec<LinkOffer> = Vec::new();
        for item in items {
            let url = pg_url(&item.url).into_owned();
            let Some(row) = rows.get_mut(&url) else {
                report.unknown += 1;
                continue;
            };
            if row.state == "crawled" || row.state == "failed" {
                continue; // a repeat: idempotent
            }
            report.stored += 1;
            let (crawl_id, depth) = (row.crawl_id, row.depth);
            match &item.outcome {
                IngestOutcome::Failed { reason } => {
                    row.state = "failed";
                    failed.push((url, pg_text(reason).into_owned()));
                }
                IngestOutcome::Page {
                    final_url,
                    final_host,
                    title,
                    text,
                    indexable,
                    links,
                } => {
                    row.state = "crawled";
                    let final_url = pg_url(final_url).into_owned();
                    if final_url != url {
                        // The redirect target is crawled too; a job already queued for it will
                        // find it done.
                        if let Some(target) = rows.get_mut(&final_url) {
                            if target.state == "pending" || target.state == "queued" {
                                target.state = "crawled";
                            }
                        }
                        if redirect_seen.insert(final_url.clone()) {
                            redirects.push((final_url.clone(), final_host, crawl_id, depth));
                        }
                    }
                    crawled.push(url);
                    if *indexable {
                        let page = PageRow {
                            url: final_url.clone(),
                            host: final_host,
                            title,
                            body: text,
                        };
                        match page_index.get(&final_url) {
                            Some(&i) => pages[i] = page,
                            None => {
                                page_index.insert(final_url, pages.len());
                                pages.push(page);
                            }
                        }
                    }
                    let limits = budgets.limits(crawl_id);
                    let child_depth = depth + 1;
                    if limits
                        .max_depth
                        .is_some_and(|max| i64::from(child_depth) > max)
                    {
                        continue;
                    }
                    offers.extend(links.iter().map(|l| LinkOffer {
                        url: pg_url(&l.url).into_owned(),
                        host: pg_text(&l.host).into_owned(),
                        crawl_id,
                        depth: child_depth,
                        depth_limited: limits.max_depth.is_some(),
                    }));
                }
            }
        }

        if !failed.is_empty() {
            let (urls, reasons): (Vec<String>, Vec<String>) = failed.into_iter().unzip();
            sqlx::query(
                "UPDATE frontier f SET state = 'failed', reason = v.reason, updated_ms = $3 \
                 FROM unnest($1::text[], $2::text[]) AS v(url, reason) WHERE f.url = v.url",
            )
            .bind(&urls)
            .bind(&reasons)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !crawled.is_empty() {
            sqlx::query(
                "UPDATE frontier SET state = 'crawled', reason = NULL, updated_ms = $2 \
                 WHERE url = ANY($1)",
            )
            .bind(&crawled)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !redirects.is_empty() {
            redirects.sort_unstable();
            let urls: Vec<&str> = redirects.iter().map(|r| r.0.as_str()).collect();
            let hosts: Vec<Cow<'_, str>> = redirects.iter().map(|r| pg_text(r.1)).collect();
            let hosts: Vec<&str> = hosts.iter().map(|h| h.as_ref()).collect();
            let crawls: Vec<i64> = redirects.iter().map(|r| r.2).collect();
            let depths: Vec<i32> = redirects.iter().map(|r| r.3).collect();
            sqlx::query(
                "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
                 SELECT u, h, c, d, 'crawled', $5 \
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[]) AS v(u, h, c, d) \
                 ON CONFLICT (url) DO UPDATE SET state = 'crawled', reason = NULL, \
                 updated_ms = excluded.updated_ms \
                 WHERE frontier.state IN ('pending', 'queued')",
            )
            .bind(&urls)
            .bind(&hosts)
            .bind(&crawls)
            .bind(&depths)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        if !pages.is_empty() {
            pages.sort_by(|a, b| a.url.cmp(&b.url));
            let urls: Vec<&str> = pages.iter().map(|p| p.url.as_str()).collect();
            let hosts: Vec<Cow<'_, str>> = pages.iter().map(|p| pg_text(p.host)).collect();
            let titles: Vec<Cow<'_, str>> = pages.iter().map(|p| pg_text(p.title)).collect();
            let bodies: Vec<Cow<'_, str>> = pages.iter().map(|p| pg_text(p.body)).collect();
            let hosts: Vec<&str> = hosts.iter().map(|c| c.as_ref()).collect();
            let titles: Vec<&str> = titles.iter().map(|c| c.as_ref()).collect();
            let bodies: Vec<&str> = bodies.iter().map(|c| c.as_ref()).collect();
            let done = sqlx::query(
                "INSERT INTO pages (url, host, title, body, fetched_ms) \
                 SELECT u, h, t, b, $5 \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS v(u, h, t, b) \
                 ON CONFLICT (url) DO UPDATE SET title = excluded.title, body = excluded.body, \
                 fetched_ms = excluded.fetched_ms \
                 WHERE pages.title <> excluded.title OR pages.body <> excluded.body",
            )
            .bind(&urls)
            .bind(&hosts)
            .bind(&titles)
            .bind(&bodies)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            report.pages_indexed = done.rows_affected() as usize;
        }
        if !offers.is_empty() {
            report.links_admitted = admit_links(&mut tx, &mut budgets, &offers, now).await?;
        }
        budgets.write_back(&mut tx).await?;
        tx.commit().await?;
        Ok(report)
    }
}

/// Offer new links to the frontier: admit the unknown ones within budget (one insert for all),
/// and re-expand known ones reached by a shorter path under a depth limit. Returns how many were
/// admitted.
async fn admit_links(
    tx: &mut PgConnection,
    budgets: &mut Budgets,
    offers: &[LinkOffer],
    now: i64,
) -> Result<usize> {
    let mut unique: Vec<&str> = offers.iter().map(|o| o.url.as_str()).collect();
    unique.sort_unstable();
    unique.dedup();
    let known: HashSet<String> = sqlx::query_scalar("SELECT url FROM frontier WHERE url = ANY($1)")
        .bind(&unique)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let hosts: Vec<&str> = offers
        .iter()
        .filter(|o| !known.contains(&o.url))
        .map(|o| o.host.as_str())
        .collect();
    budgets.lock_hosts(tx, &hosts).await?;

    // Walk the offers in order, as the SQLite store does one insert at a time.
    let mut admitted: Vec<NewEntry<'_>> = Vec::new();
    let mut admitted_at: HashMap<&str, usize> = HashMap::new();
    let mut reexpand: HashMap<(&str, i64), i32> = HashMap::new();
    for o in offers {
        if !known.contains(&o.url) {
            if let Some(&i) = admitted_at.get(o.url.as_str()) {
                // Admitted earlier in this batch: a shorter path lowers its depth.
                let first = &mut admitted[i];
                if o.depth_limited && first.crawl_id == o.crawl_id && first.depth > o.depth {
                    first.depth = o.depth;
                }
                continue;
            }
            if budgets.refusal(o.crawl_id, &o.host).is_none() {
                budgets.count(o.crawl_id, &o.host, 1);
                admitted_at.insert(&o.url, admitted.len());
                admitted.push(NewEntry {
                    url: &o.url,
                    host: &o.host,
                    crawl_id: o.crawl_id,
                    depth: o.depth,
                });
                continue;
            }
        }
        if o.depth_limited {
            // Under a depth limit, a shorter path to a known URL must re-expand it, or pages
            // within the limit would be missed depending on crawl order.
            let d = reexpand.entry((&o.url, o.crawl_id)).or_insert(o.depth);
            *d = (*d).min(o.depth);
        }
    }
    let inserted = insert_pending(tx, &admitted, now).await?;
    let mut count = 0;
    for entry in &admitted {
        if inserted.contains(entry.url) {
            count += 1;
        } else {
            // Another cell inserted it between our look-up and our insert: it is known.
            budgets.count(entry.crawl_id, entry.host, -1);
            let d = reexpand
                .entry((entry.url, entry.crawl_id))
                .or_insert(entry.depth);
            *d = (*d).min(entry.depth);
        }
    }
    if !reexpand.is_empty() {
        let mut rows: Vec<((&str, i64), i32)> = reexpand.into_iter().collect();
        rows.sort_unstable();
        let urls: Vec<&str> = rows.iter().map(|((u, _), _)| *u).collect();
        let crawls: Vec<i64> = rows.iter().map(|((_, c), _)| *c).collect();
        let depths: Vec<i32> = rows.iter().map(|(_, d)| *d).collect();
        sqlx::query(
            "UPDATE frontier f SET depth = v.d, updated_ms = $4, \
             state = CASE WHEN f.state = 'crawled' THEN 'pending' ELSE f.state END \
             FROM unnest($1::text[], $2::int8[], $3::int4[]) AS v(u, c, d) \
             WHERE f.url = v.u AND f.crawl_id = v.c AND f.depth > v.d",
        )
        .bind(&urls)
        .bind(&crawls)
        .bind(&depths)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(count)
}

/// Insert new pending frontier entries in one statement; returns the URLs that were new.
async fn insert_pending(
    tx: &mut PgConnection,
    entries: &[NewEntry<'_>],
    now: i64,
) -> Result<HashSet<String>> {
    if entries.is_empty() {
        return Ok(HashSet::new());
    }
    let mut sorted: Vec<&NewEntry<'_>> = entries.iter().collect();
    sorted.sort_by(|a, b| a.url.cmp(b.url));
    let urls: Vec<&str> = sorted.iter().map(|e| e.url).collect();
    let hosts: Vec<&str> = sorted.iter().map(|e| e.host).collect();
    let crawls: Vec<i64> = sorted.iter().map(|e| e.crawl_id).collect();
    let depths: Vec<i32> = sorted.iter().map(|e| e.depth).collect();
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
         SELECT u, h, c, d, 'pending', $5 \
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[]) AS v(u, h, c, d) \
         ON CONFLICT (url) DO NOTHING RETURNING url",
    )
    .bind(&urls)
    .bind(&hosts)
    .bind(&crawls)
    .bind(&depths)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    Ok(inserted.into_iter().collect())
}

struct ItemRow {
    crawl_id: i64,
    depth: i32,
    state: &'static str,
}

struct NewEntry<'a> {
    url: &'a str,
    host: &'a str,
    crawl_id: i64,
    depth: i32,
}

struct PageRow<'a> {
    url: String,
    host: &'a str,
    title: &'a str,
    body: &'a str,
}

struct LinkOffer {
    url: String,
    host: String,
    crawl_id: i64,
    depth: i32,
    depth_limited: bool,
}

/// The limits a new URL must pass, read under row locks for the length of one transaction.
struct Budgets {
    crawls: HashMap<i64, CrawlLimits>,
    hosts: HashMap<String, Counter>,
    host_budget: u64,
}

#[derive(Clone, Copy)]
struct CrawlLimits {
    max_depth: Option<i64>,
    max_pages: Option<i64>,
    counter: Counter,
}

#[derive(Clone, Copy, Default)]
struct Counter {
    admitted: i64,
    added: i64,
}

/// A frontier entry whose crawl row is gone: unlimited.
const UNLIMITED: CrawlLimits = CrawlLimits {
    max_depth: None,
    max_pages: None,
    counter: Counter {
        admitted: 0,
        added: 0,
    },
};

impl Budgets {
    fn new(host_budget: u64) -> Self {
        Self {
            crawls: HashMap::new(),
            hosts: HashMap::new(),
            host_budget,
        }
    }

    /// Read the crawl rows; lock (sorted, so concurrent transactions cannot deadlock here) only
    /// those with a page limit, whose count this transaction may change. A crawl without a page
    /// limit keeps no count: every api's ingest would otherwise queue on its one row.
    async fn lock_crawls(&mut self, tx: &mut PgConnection, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let limited: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM crawls WHERE id = ANY($1) AND max_pages IS NOT NULL ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let unlimited = sqlx::query(
            "SELECT id, max_depth FROM crawls WHERE id = ANY($1) AND max_pages IS NULL",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        for row in unlimited {
            self.crawls.insert(
                row.get(0),
                CrawlLimits {
                    max_depth: row.get(1),
                    max_pages: None,
                    counter: Counter::default(),
                },
            );
        }
        if limited.is_empty() {
            return Ok(());
        }
        let rows = sqlx::query(
            "SELECT id, max_depth, max_pages, admitted FROM crawls WHERE id = ANY($1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(&limited)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            self.crawls.insert(
                row.get(0),
                CrawlLimits {
                    max_depth: row.get(1),
                    max_pages: row.get(2),
                    counter: Counter {
                        admitted: row.get(3),
                        added: 0,
                    },
                },
            );
        }
        Ok(())
    }

    /// Create (at zero) and lock the budget rows of these hosts, in sorted order.
    async fn lock_hosts(&mut self, tx: &mut PgConnection, hosts: &[&str]) -> Result<()> {
        let mut hosts: Vec<&str> = hosts
            .iter()
            .copied()
            .filter(|h| !self.hosts.contains_key(*h))
            .collect();
        if hosts.is_empty() {
            return Ok(());
        }
        hosts.sort_unstable();
        hosts.dedup();
        sqlx::query(
            "INSERT INTO host_budget (host, admitted) \
             SELECT h, 0 FROM unnest($1::text[]) AS h ORDER BY h ON CONFLICT (host) DO NOTHING",
        )
        .bind(&hosts)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT host, admitted FROM host_budget WHERE host = ANY($1) ORDER BY host FOR UPDATE",
        )
        .bind(&hosts)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            self.hosts.insert(
                row.get(0),
                Counter {
                    admitted: row.get(1),
                    added: 0,
                },
            );
        }
        Ok(())
    }

    fn limits(&self, crawl_id: i64) -> CrawlLimits {
        self.crawls.get(&crawl_id).copied().unwrap_or(UNLIMITED)
    }

    /// Why a new URL of `host` under crawl `id` may not be admitted, if it may not.
    fn refusal(&self, id: i64, host: &str) -> Option<String> {
        let crawl = self.limits(id);
        if let Some(max) = crawl.max_pages {
            if crawl.counter.admitted + crawl.counter.added >= max {
                return Some(format!("crawl {id} reached its page limit ({max})"));
            }
        }
        let host_count = self
            .hosts
            .get(host)
            .map(|c| c.admitted + c.added)
            .unwrap_or(0);
        if host_count.max(0) as u64 >= self.host_budget {
            return Some(format!(
                "host {host} reached its page budget ({})",
                self.host_budget
            ));
        }
        None
    }

    fn count(&mut self, id: i64, host: &str, n: i64) {
        if let Some(c) = self.crawls.get_mut(&id).filter(|c| c.max_pages.is_some()) {
            c.counter.added += n;
        }
        self.hosts.entry(host.to_string()).or_default().added += n;
    }

    async fn write_back(self, tx: &mut PgConnection) -> Result<()> {
        let (ids, deltas): (Vec<i64>, Vec<i64>) = self
            .crawls
            .iter()
            .filter(|(_, c)| c.counter.added != 0)
            .map(|(id, c)| (*id, c.counter.added))
            .unzip();
        if !ids.is_empty() {
            sqlx::query(
                "UPDATE crawls c SET admitted = c.admitted + v.d \
                 FROM unnest($1::int8[], $2::int8[]) AS v(id, d) WHERE c.id = v.id",
            )
            .bind(&ids)
            .bind(&deltas)
            .execute(&mut *tx)
            .await?;
        }
        let (hosts, deltas): (Vec<&str>, Vec<i64>) = self
            .hosts
            .iter()
            .filter(|(_, c)| c.added != 0)
            .map(|(h, c)| (h.as_str(), c.added))
            .unzip();
        if !hosts.is_empty() {
            // The rows exist and are locked (lock_hosts), so an increment is exact.
            sqlx::query(
                "INSERT INTO host_budget (host, admitted) \
                 SELECT h, d FROM unnest($1::text[], $2::int8[]) AS v(h, d) \
                 ON CONFLICT (host) DO UPDATE SET admitted = host_budget.admitted + excluded.admitted",
            )
            .bind(&hosts)
            .bind(&deltas)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// PostgreSQL text cannot hold NUL characters; text from the web can.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', ""))
    } else {
        Cow::Borrowed(s)
    }
}

/// A URL with a raw NUL (normalization percent-encodes them, so this is a guard): encoded the
/// same way everywhere, so look-ups find what ingest stored.
fn pg_url(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "%00"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Run a write transaction again when PostgreSQL aborted it to break a deadlock or a
/// serialization conflict with another cell; the transaction had no effect.
pub(super) async fn retry_conflicts<T, F, Fut>(what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(EngineError::Database(e)) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, what, "transaction conflict; retrying");
                let jitter = u64::from(now_ms().unsigned_abs() as u32 % 7);
                tokio::time::sleep(Duration::from_millis((2 << attempt.min(6)) + jitter)).await;
            }
            other => return other,
        }
    }
}

fn is_conflict(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("40P01" | "40001")),
        _ => false,
    }
}

#[async_trait]
impl Store for PgStore {
    async fn create_crawl(&self, spec: CrawlSpec) -> Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO crawls (created_ms, max_depth, max_pages) VALUES ($1, $2, $3) RETURNING id",
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
        if seeds.is_empty() {
            return Ok(Vec::new());
        }
        retry_conflicts("admit seeds", || {
            self.admit_seeds_once(crawl_id, seeds, host_budget)
        })
        .await
    }

    async fn ingest(&self, items: &[IngestItem], host_budget: u64) -> Result<IngestReport> {
        retry_conflicts("ingest", || self.ingest_once(items, host_budget)).await
    }

    async fn unpublished(&self, limit: u32) -> Result<Vec<Unpublished>> {
        // A claim: rows another api is claiming right now are skipped, not waited for, and the
        // claim keeps them this caller's until it runs out.
        retry_conflicts("claim unpublished", || async move {
            let now = now_ms();
            let rows = sqlx::query(
                "UPDATE frontier f SET claimed_until_ms = $1 FROM (\
                     SELECT url FROM frontier \
                     WHERE state = 'pending' AND claimed_until_ms <= $2 \
                     ORDER BY updated_ms LIMIT $3 FOR UPDATE SKIP LOCKED) c \
                 WHERE f.url = c.url RETURNING f.url, f.depth, f.updated_ms",
            )
            .bind(now + crate::PUBLISH_CLAIM.as_millis() as i64)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            let mut rows: Vec<(i64, Unpublished)> = rows
                .into_iter()
                .map(|r| {
                    (
                        r.get::<i64, _>(2),
                        Unpublished {
                            url: r.get(0),
                            depth: r.get::<i32, _>(1).max(0) as u32,
                        },
                    )
                })
                .collect();
            rows.sort_by_key(|(updated, _)| *updated);
            Ok(rows.into_iter().map(|(_, u)| u).collect())
        })
        .await
    }

    async fn mark_published(&self, urls: &[String]) -> Result<()> {
        if urls.is_empty() {
            return Ok(());
        }
        let mut urls: Vec<String> = urls.iter().map(|u| pg_url(u).into_owned()).collect();
        urls.sort_unstable();
        let urls = &urls;
        retry_conflicts("mark published", || async move {
            sqlx::query(
                "UPDATE frontier SET state = 'queued', updated_ms = $2 \
                 WHERE url = ANY($1) AND state = 'pending'",
            )
            .bind(urls)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    async fn requeue_stale(&self, age: Duration) -> Result<u64> {
        retry_conflicts("requeue stale", || async move {
            let now = now_ms();
            let cutoff = now - age.as_millis().min(i64::MAX as u128) as i64;
            let done = sqlx::query(
                "UPDATE frontier SET state = 'pending', updated_ms = $1 \
                 WHERE state = 'queued' AND updated_ms < $2",
            )
            .bind(now)
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchResults> {
        // plainto_tsquery ANDs the words it finds and parses no operators, so nothing the user
        // typed reaches the query parser as syntax.
        let words = pg_text(&query.terms.join(" ")).into_owned();
        let total: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pages WHERE search @@ plainto_tsquery($1::regconfig, $2)",
        )
        .bind(TS_CONFIG)
        .bind(&words)
        .fetch_one(&self.pool)
        .await?;
        if total == 0 || query.limit == 0 {
            return Ok(SearchResults {
                total: total as u64,
                hits: Vec::new(),
            });
        }
        // Rank everything that matches, then build headlines only for the page of hits.
        let rows = sqlx::query(
            "SELECT h.url, h.title, \
                    ts_headline($1::regconfig, left(h.body, 100000), q, $5) AS body_snip, \
                    ts_headline($1::regconfig, h.title, q, $5) AS title_snip, \
                    h.rank \
             FROM ( \
                 SELECT p.id, p.url, p.title, p.body, \
                        ts_rank_cd(p.search, q, 1)::float8 AS rank \
                 FROM pages p, plainto_tsquery($1::regconfig, $2) q \
                 WHERE p.search @@ q \
                 ORDER BY rank DESC, p.id LIMIT $3 OFFSET $4 \
             ) h, plainto_tsquery($1::regconfig, $2) q \
             ORDER BY h.rank DESC, h.id",
        )
        .bind(TS_CONFIG)
        .bind(&words)
        .bind(i64::from(query.limit))
        .bind(query.offset.min(i64::MAX as u64) as i64)
        .bind(headline_options())
        .fetch_all(&self.pool)
        .await?;
        let hits = rows
            .into_iter()
            .map(|r| {
                let body: String = r.get(2);
                let title: String = r.get(3);
                // Like FTS5's snippet() over both columns: the body, unless only the title matched.
                let raw = if !body.contains(MARK_OPEN) && title.contains(MARK_OPEN) {
                    title
                } else {
                    body
                };
                SearchHit {
                    url: r.get(0),
                    title: r.get(1),
                    snippet: render_snippet(&raw),
                    score: r.get(4),
                }
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
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE state = 'pending'), \
                    count(*) FILTER (WHERE state = 'queued'), \
                    count(*) FILTER (WHERE state = 'crawled'), \
                    count(*) FILTER (WHERE state = 'failed') \
             FROM frontier",
        )
        .fetch_one(&self.pool)
        .await?;
        let frontier = FrontierCounts {
            pending: row.get::<i64, _>(0) as u64,
            in_flight: row.get::<i64, _>(1) as u64,
            crawled: row.get::<i64, _>(2) as u64,
            failed: row.get::<i64, _>(3) as u64,
        };
        let hosts = if top_hosts == 0 {
            Vec::new()
        } else {
            sqlx::query(
                "SELECT host, \
                        count(*) FILTER (WHERE state = 'pending'), \
                        count(*) FILTER (WHERE state = 'queued'), \
                        count(*) FILTER (WHERE state = 'crawled'), \
                        count(*) FILTER (WHERE state = 'failed') \
                 FROM frontier GROUP BY host \
                 ORDER BY count(*) DESC, host COLLATE \"C\" LIMIT $1",
            )
            .bind(i64::from(top_hosts))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| HostStats {
                host: r.get(0),
                pending: r.get::<i64, _>(1) as u64,
                in_flight: r.get::<i64, _>(2) as u64,
                crawled: r.get::<i64, _>(3) as u64,
                failed: r.get::<i64, _>(4) as u64,
            })
            .collect()
        };
        Ok(Stats {
            pages_indexed: pages as u64,
            frontier,
            hosts,
        })
    }

    async fn frontier_state(&self, url: &str) -> Result<Option<(String, Option<String>)>> {
        let row = sqlx::query("SELECT state, reason FROM frontier WHERE url = $1")
            .bind(pg_url(url).as_ref())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn indexed_urls(&self) -> Result<Vec<String>> {
        // Byte order, like SQLite's, whatever the database's collation.
        Ok(
            sqlx::query_scalar("SELECT url FROM pages ORDER BY url COLLATE \"C\"")
                .fetch_all(&self.pool)
                .await?,
        )
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
