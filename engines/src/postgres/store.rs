//! [`Store`] on PostgreSQL.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{SearchHit, Stats};
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use super::PgOptions;
use crate::counts::KeptCounts;
use crate::frontier::{self, DeferredBatch, Entry, Links, NewEntry, State, View};
use crate::snippet::{render_snippet, MARK_CLOSE, MARK_OPEN};
use crate::sqlite::now_ms;
use crate::{
    Admission, Candidate, CrawlSpec, EngineError, Expanded, IngestItem, IngestOutcome,
    IngestReport, Result, SearchQuery, SearchResults, Store, Unpublished,
};

static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    crate::accepting_newer(sqlx::migrate!("./migrations/postgres_store"))
});

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
    follower: Option<std::sync::Arc<super::multihost::Follower>>,
}

impl PgStore {
    /// Connect with default pool settings and bring the schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connect to `postgres://` `url` and bring the schema up to date. Several cells may do this
    /// at once: sqlx's migrator holds a PostgreSQL advisory lock while it migrates.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self> {
        let (pool, follower) = super::multihost::connect_pool(url, options).await?;
        crate::migrate_with_retries("store", &MIGRATOR, &pool).await?;
        Ok(Self { pool, follower })
    }

    /// The task following the primary of a replicated database (kept alive by every holder of
    /// the pool).
    pub(super) fn follower(&self) -> Option<std::sync::Arc<super::multihost::Follower>> {
        self.follower.clone()
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
        let mut tx = self.pool.begin().await?;
        // Lock order: crawls, then frontier rows, then (last, in add_counts) host budgets.
        let mut view = View {
            crawls: lock_crawls(&mut tx, &[crawl_id]).await?,
            ..View::default()
        };
        let urls: Vec<&str> = seeds.iter().map(|s| s.url.as_str()).collect();
        view.entries = read_entries(&mut tx, &urls, false).await?;
        view.hosts = read_hosts(&mut tx, &view.hosts_to_admit(seeds)).await?;
        let plan = frontier::plan_seeds(&view, crawl_id, seeds, host_budget);
        insert_entries(&mut tx, &plan.inserts, now).await?;
        add_counts(&mut tx, &plan.counts, host_budget).await?;
        tx.commit().await?;
        Ok(plan.admissions)
    }

    async fn ingest_once(
        &self,
        items: &[IngestItem],
        host_budget: u64,
        links: Links,
    ) -> Result<IngestReport> {
        let now = now_ms();
        let item_urls = frontier::item_urls(items);
        let mut tx = self.pool.begin().await?;
        // Lock order: crawls, then the results' own frontier rows, then (last, in add_counts)
        // host budgets. The other rows the batch names (redirect targets, links) and the budgets
        // are read unlocked; a change to one of them is checked when it is written.
        let crawl_ids: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT crawl_id FROM frontier WHERE url = ANY($1) ORDER BY crawl_id",
        )
        .bind(&item_urls)
        .fetch_all(&mut *tx)
        .await?;
        let mut view = View {
            crawls: lock_crawls(&mut tx, &crawl_ids).await?,
            entries: read_entries(&mut tx, &item_urls, true).await?,
            ..View::default()
        };
        let others: Vec<&str> = frontier::ingest_urls(items, links)
            .into_iter()
            .filter(|u| !view.entries.contains_key(*u))
            .collect();
        view.entries
            .extend(read_entries(&mut tx, &others, false).await?);
        let admit = view.hosts_to_admit(frontier::ingest_links(items, links));
        view.hosts = read_hosts(&mut tx, &admit).await?;
        let plan = frontier::plan_ingest(&view, items, host_budget, links);

        let pages_indexed = apply(&mut tx, &plan, host_budget, now).await?;
        tx.commit().await?;
        Ok(plan.report(pages_indexed))
    }

    async fn expand_once(&self, pages: u32, host_budget: u64) -> Result<Expanded> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Rows another api is offering right now are skipped, not waited for. Lock order after
        // them as in ingest: crawls, then (last) host budgets; the links' frontier rows and the
        // budgets are read unlocked and checked when written.
        let rows = sqlx::query(
            "SELECT id, crawl_id, depth::int8, links FROM deferred_links ORDER BY id LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(pages))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(Expanded::default());
        }
        let batches = rows
            .iter()
            .map(|r| DeferredBatch::read(r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect::<Result<Vec<_>>>()?;
        let mut view = View {
            crawls: lock_crawls(&mut tx, &frontier::deferred_crawl_ids(&batches)).await?,
            ..View::default()
        };
        view.entries = read_entries(&mut tx, &frontier::deferred_urls(&batches), false).await?;
        let admit = view.hosts_to_admit(batches.iter().flat_map(|b| &b.links));
        view.hosts = read_hosts(&mut tx, &admit).await?;
        let plan = frontier::plan_deferred(&view, &batches, host_budget);
        apply(&mut tx, &plan, host_budget, now).await?;
        let ids: Vec<i64> = batches.iter().map(|b| b.id).collect();
        sqlx::query("DELETE FROM deferred_links WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Expanded {
            pages: batches.len(),
            links_admitted: plan.links_admitted,
        })
    }
}

/// Execute a plan's writes in its transaction; returns how many pages were added or changed.
/// A row found otherwise than the plan expects is a lost race ([`EngineError::Conflict`]).
async fn apply(
    tx: &mut PgConnection,
    plan: &frontier::IngestPlan<'_>,
    host_budget: u64,
    now: i64,
) -> Result<usize> {
    insert_entries(tx, &plan.inserts, now).await?;
    if !plan.changes.is_empty() {
        let changes = &plan.changes;
        let urls: Vec<&str> = changes.iter().map(|c| c.url).collect();
        let crawls: Vec<i64> = changes.iter().map(|c| c.before.crawl_id).collect();
        let depths_before: Vec<i32> = changes.iter().map(|c| pg_depth(c.before.depth)).collect();
        let states_before: Vec<&str> = changes.iter().map(|c| c.before.state.as_str()).collect();
        let depths: Vec<i32> = changes.iter().map(|c| pg_depth(c.after.depth)).collect();
        let states: Vec<&str> = changes.iter().map(|c| c.after.state.as_str()).collect();
        let reasons: Vec<Option<String>> = changes
            .iter()
            .map(|c| c.after.reason.as_deref().map(|r| pg_text(r).into_owned()))
            .collect();
        let done = sqlx::query(
            "UPDATE frontier f SET depth = v.d, state = v.s, reason = v.r, updated_ms = $8 \
                 FROM unnest($1::text[], $2::int8[], $3::int4[], $4::text[], $5::int4[], \
                             $6::text[], $7::text[]) AS v(u, c, bd, bs, d, s, r) \
                 WHERE f.url = v.u AND f.crawl_id = v.c AND f.depth = v.bd AND f.state = v.bs",
        )
        .bind(&urls)
        .bind(&crawls)
        .bind(&depths_before)
        .bind(&states_before)
        .bind(&depths)
        .bind(&states)
        .bind(&reasons)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != changes.len() as u64 {
            return Err(EngineError::Conflict(
                "a frontier entry changed since it was read".into(),
            ));
        }
    }
    let mut pages_indexed = 0;
    if !plan.pages.is_empty() {
        let pages = &plan.pages;
        let urls: Vec<&str> = pages.iter().map(|p| p.url).collect();
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
        pages_indexed = done.rows_affected() as usize;
    }
    if !plan.deferred.is_empty() {
        let crawls: Vec<i64> = plan.deferred.iter().map(|d| d.crawl_id).collect();
        let depths: Vec<i32> = plan.deferred.iter().map(|d| pg_depth(d.depth)).collect();
        let links: Vec<String> = plan
            .deferred
            .iter()
            .map(|d| frontier::encode_links(d.links))
            .collect();
        let counts: Vec<i32> = plan
            .deferred
            .iter()
            .map(|d| d.links.len().min(i32::MAX as usize) as i32)
            .collect();
        sqlx::query(
            "INSERT INTO deferred_links (crawl_id, depth, links, n, created_ms) \
             SELECT c, d, l, n, $5 \
             FROM unnest($1::int8[], $2::int4[], $3::text[], $4::int4[]) AS v(c, d, l, n)",
        )
        .bind(&crawls)
        .bind(&depths)
        .bind(&links)
        .bind(&counts)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    add_counts(tx, &plan.counts, host_budget).await?;
    Ok(pages_indexed)
}

/// Frontier rows of these URLs ([`frontier::View::entries`]), locked (in URL order) when `lock`.
async fn read_entries(
    tx: &mut PgConnection,
    urls: &[&str],
    lock: bool,
) -> Result<HashMap<String, Entry>> {
    if urls.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = if lock {
        "SELECT url, crawl_id, depth, state, reason FROM frontier WHERE url = ANY($1) \
         ORDER BY url FOR UPDATE"
    } else {
        "SELECT url, crawl_id, depth, state, reason FROM frontier WHERE url = ANY($1)"
    };
    let rows = sqlx::query(sql).bind(urls).fetch_all(&mut *tx).await?;
    rows.into_iter()
        .map(|r| {
            let entry = Entry {
                crawl_id: r.get(1),
                depth: r.get::<i32, _>(2).max(0) as u32,
                state: State::from_column(r.get(3))?,
                reason: r.get(4),
            };
            Ok((r.get(0), entry))
        })
        .collect()
}

/// Read the crawl rows; lock (sorted, so concurrent transactions cannot deadlock here) only those
/// with a page limit, whose count a plan may change. A crawl without a page limit keeps no count:
/// every api's ingest would otherwise queue on its one row.
async fn lock_crawls(tx: &mut PgConnection, ids: &[i64]) -> Result<HashMap<i64, frontier::Crawl>> {
    let mut crawls = HashMap::new();
    if ids.is_empty() {
        return Ok(crawls);
    }
    let limited: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM crawls WHERE id = ANY($1) AND max_pages IS NOT NULL ORDER BY id",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let unlimited =
        sqlx::query("SELECT id, max_depth, max_pages, admitted FROM crawls WHERE id = ANY($1) AND max_pages IS NULL")
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
    let locked = if limited.is_empty() {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT id, max_depth, max_pages, admitted FROM crawls WHERE id = ANY($1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(&limited)
        .fetch_all(&mut *tx)
        .await?
    };
    for row in unlimited.into_iter().chain(locked) {
        let crawl = frontier::Crawl {
            max_depth: row
                .get::<Option<i64>, _>(1)
                .map(|d| d.clamp(0, i64::from(u32::MAX)) as u32),
            max_pages: row.get::<Option<i64>, _>(2).map(|p| p.max(0) as u64),
            admitted: row.get::<i64, _>(3).max(0) as u64,
        };
        crawls.insert(row.get(0), crawl);
    }
    Ok(crawls)
}

/// Read the budget rows of these hosts (absent: nothing admitted yet), unlocked: the plan's
/// admissions are charged to them last, in [`add_counts`], which refuses a plan that another
/// api's admissions since this read have made exceed the budget.
async fn read_hosts(tx: &mut PgConnection, hosts: &[&str]) -> Result<HashMap<String, u64>> {
    if hosts.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query("SELECT host, admitted FROM host_budget WHERE host = ANY($1)")
        .bind(hosts)
        .fetch_all(&mut *tx)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get::<i64, _>(1).max(0) as u64))
        .collect())
}

/// Create the plan's new frontier rows in one statement. A row another cell created since the
/// look-up is a lost race: the plan is stale, and the transaction is run again.
async fn insert_entries(tx: &mut PgConnection, entries: &[NewEntry<'_>], now: i64) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let urls: Vec<&str> = entries.iter().map(|e| e.url).collect();
    let hosts: Vec<&str> = entries.iter().map(|e| e.host).collect();
    let crawls: Vec<i64> = entries.iter().map(|e| e.crawl_id).collect();
    let depths: Vec<i32> = entries.iter().map(|e| pg_depth(e.depth)).collect();
    let states: Vec<&str> = entries.iter().map(|e| e.state.as_str()).collect();
    let done = sqlx::query(
        "INSERT INTO frontier (url, host, crawl_id, depth, state, updated_ms) \
         SELECT u, h, c, d, s, $6 \
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::int4[], $5::text[]) AS v(u, h, c, d, s) \
         ON CONFLICT (url) DO NOTHING",
    )
    .bind(&urls)
    .bind(&hosts)
    .bind(&crawls)
    .bind(&depths)
    .bind(&states)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != entries.len() as u64 {
        return Err(EngineError::Conflict(
            "another cell admitted a URL of this batch first".into(),
        ));
    }
    Ok(())
}

/// Add the plan's counts to the (locked) crawl rows and to the host budget rows. The host rows
/// are written last in the transaction, in host order, so an ingest holds them only for its
/// commit and two ingests never wait on each other in a cycle through them. A host the plan
/// charged past `host_budget` (its read was older than another api's admissions) makes the plan
/// stale: [`EngineError::Conflict`], and the transaction is run again on fresh counts.
async fn add_counts(
    tx: &mut PgConnection,
    counts: &frontier::Counts<'_>,
    host_budget: u64,
) -> Result<()> {
    if !counts.crawls.is_empty() {
        let (ids, deltas): (Vec<i64>, Vec<i64>) =
            counts.crawls.iter().map(|&(id, n)| (id, n as i64)).unzip();
        sqlx::query(
            "UPDATE crawls c SET admitted = c.admitted + v.d \
             FROM unnest($1::int8[], $2::int8[]) AS v(id, d) WHERE c.id = v.id",
        )
        .bind(&ids)
        .bind(&deltas)
        .execute(&mut *tx)
        .await?;
    }
    let mut hosts: Vec<(&str, i64)> = counts
        .hosts
        .iter()
        .filter(|&&(_, n)| n > 0)
        .map(|&(h, n)| (h, i64::try_from(n).unwrap_or(i64::MAX)))
        .collect();
    if hosts.is_empty() {
        return Ok(());
    }
    hosts.sort_unstable();
    let (names, deltas): (Vec<&str>, Vec<i64>) = hosts.into_iter().unzip();
    let over: Option<String> = sqlx::query_scalar(
        "WITH charged AS ( \
             INSERT INTO host_budget (host, admitted) \
             SELECT h, d FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS v(h, d, i) \
             ORDER BY i \
             ON CONFLICT (host) DO UPDATE SET admitted = host_budget.admitted + excluded.admitted \
             RETURNING host, admitted) \
         SELECT min(host) FROM charged WHERE admitted > $3",
    )
    .bind(&names)
    .bind(&deltas)
    .bind(i64::try_from(host_budget).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await?;
    match over {
        Some(host) => Err(EngineError::Conflict(format!(
            "host {host}'s budget was spent by another api since it was read"
        ))),
        None => Ok(()),
    }
}

/// Depths are `integer` columns.
fn pg_depth(depth: u32) -> i32 {
    i32::try_from(depth).unwrap_or(i32::MAX)
}

/// The results with every URL and host as PostgreSQL text can hold them (see [`pg_url`]); a copy
/// only when one needs it.
fn pg_items(items: &[IngestItem]) -> Cow<'_, [IngestItem]> {
    let nul = |s: &str| s.contains('\0');
    let dirty = items.iter().any(|i| {
        nul(&i.url)
            || match &i.outcome {
                IngestOutcome::Page {
                    final_url,
                    final_host,
                    links,
                    ..
                } => {
                    nul(final_url)
                        || nul(final_host)
                        || links.iter().any(|l| nul(&l.url) || nul(&l.host))
                }
                IngestOutcome::Failed { .. } => false,
            }
    });
    if !dirty {
        return Cow::Borrowed(items);
    }
    Cow::Owned(
        items
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.url = pg_url(&i.url).into_owned();
                if let IngestOutcome::Page {
                    final_url,
                    final_host,
                    links,
                    ..
                } = &mut i.outcome
                {
                    *final_url = pg_url(final_url).into_owned();
                    *final_host = pg_text(final_host).into_owned();
                    links.iter_mut().for_each(pg_candidate);
                }
                i
            })
            .collect(),
    )
}

fn pg_candidate(c: &mut Candidate) {
    if c.url.contains('\0') || c.host.contains('\0') {
        c.url = pg_url(&c.url).into_owned();
        c.host = pg_text(&c.host).into_owned();
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
            Err(e) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, what, "transaction conflict; retrying");
                let jitter = u64::from(now_ms().unsigned_abs() as u32 % 7);
                tokio::time::sleep(Duration::from_millis((2 << attempt.min(6)) + jitter)).await;
            }
            other => return other,
        }
    }
}

/// A deadlock or serialization failure PostgreSQL broke, or a plan gone stale
/// ([`EngineError::Conflict`]): the transaction had no effect and may be run again.
fn is_conflict(e: &EngineError) -> bool {
    match e {
        EngineError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        EngineError::Conflict(_) => true,
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
        let mut seeds = seeds.to_vec();
        seeds.iter_mut().for_each(pg_candidate);
        let seeds = &seeds;
        retry_conflicts("admit seeds", || {
            self.admit_seeds_once(crawl_id, seeds, host_budget)
        })
        .await
    }

    async fn ingest(
        &self,
        items: &[IngestItem],
        host_budget: u64,
        links: Links,
    ) -> Result<IngestReport> {
        if items.is_empty() {
            return Ok(IngestReport::default());
        }
        let items = pg_items(items);
        retry_conflicts("ingest", || self.ingest_once(&items, host_budget, links)).await
    }

    async fn expand_deferred(&self, pages: u32, host_budget: u64) -> Result<Expanded> {
        retry_conflicts("expand deferred links", || {
            self.expand_once(pages, host_budget)
        })
        .await
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
            // Rows locked in URL order, as an ingest locks them: an UPDATE locks in the order
            // its plan finds the rows, and two orders meeting were a deadlock (a 1 s stall, the
            // server's deadlock_timeout, then a retry).
            sqlx::query(
                "UPDATE frontier SET state = 'queued', updated_ms = $2 \
                 WHERE state = 'pending' AND url IN (\
                     SELECT url FROM frontier WHERE url = ANY($1) AND state = 'pending' \
                     ORDER BY url FOR UPDATE)",
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
        // Bounded top-k: rank the newest `cap` matches (all of them when there are fewer, so
        // the answer is then exact), then build headlines only for the page of hits. Ranking
        // reads each candidate's tsvector: a common term must not make it read them all. Above
        // the cap the total is estimated from how densely the newest matches lie among the
        // newest pages ([`crate::estimated_total`]): an exact count(*) of a common term reads
        // every matching row (30-190 ms on 50,000 pages), the newest cap+1 a few ms.
        let offset = query.offset.min(i64::MAX as u64) as i64;
        let cap = RANK_CAP.max(offset.saturating_add(i64::from(query.limit)));
        let (seen, from_id): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(id) FROM ( \
                 SELECT p.id FROM pages p WHERE p.search @@ plainto_tsquery($1::regconfig, $2) \
                 ORDER BY p.id DESC LIMIT $3) m",
        )
        // Planned for its words every time: a prepared statement's generic plan does not know
        // whether the words are common (walk the newest pages backwards, 6 ms on 50,000) or
        // rare (the text index, 2 ms), and the one it picks costs 55 ms for a common word.
        .persistent(false)
        .bind(TS_CONFIG)
        .bind(&words)
        .bind(cap.saturating_add(1))
        .fetch_one(&self.pool)
        .await?;
        let (total, total_exact) = match from_id {
            Some(from) if seen > cap => {
                let span = sqlx::query_as(crate::PAGE_ID_SPAN)
                    .fetch_one(&self.pool)
                    .await?;
                (crate::estimated_total(seen as u64, from, span), false)
            }
            _ => (seen.max(0) as u64, true),
        };
        if total == 0 || query.limit == 0 {
            return Ok(SearchResults {
                total,
                total_exact,
                hits: Vec::new(),
            });
        }
        let rows = sqlx::query(
            "SELECT h.url, h.title, \
                    ts_headline($1::regconfig, left(h.body, 100000), q, $5) AS body_snip, \
                    ts_headline($1::regconfig, h.title, q, $5) AS title_snip, \
                    h.rank \
             FROM ( \
                 SELECT c.id, c.url, c.title, c.body, \
                        ts_rank_cd(c.search, q, 1)::float8 AS rank \
                 FROM ( \
                     SELECT p.id, p.url, p.title, p.body, p.search \
                     FROM pages p, plainto_tsquery($1::regconfig, $2) q \
                     WHERE p.search @@ q ORDER BY p.id DESC LIMIT $6 \
                 ) c, plainto_tsquery($1::regconfig, $2) q \
                 ORDER BY rank DESC, c.id LIMIT $3 OFFSET $4 \
             ) h, plainto_tsquery($1::regconfig, $2) q \
             ORDER BY h.rank DESC, h.id",
        )
        .bind(TS_CONFIG)
        .bind(&words)
        .bind(i64::from(query.limit))
        .bind(offset)
        .bind(headline_options())
        .bind(cap)
        .persistent(false)
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
            total,
            total_exact,
            hits,
        })
    }

    async fn search_generation(&self) -> Result<Option<String>> {
        // The set of committed transactions (xmin, xmax and those in progress): equal snapshots
        // see equal data. With the server's start time, so a promoted standby never repeats a
        // token its old primary gave out.
        let token: String = sqlx::query_scalar(
            "SELECT pg_current_snapshot()::text || '@' || pg_postmaster_start_time()::text",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(token))
    }

    async fn stats(&self, top_hosts: u32) -> Result<Stats> {
        // Kept counts (migration 0007): append-only deltas, summed here in one snapshot, and
        // folded into one row per key once they have grown.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT host, state, sum(n)::int8, count(*) FROM frontier_counts GROUP BY host, state",
        )
        .fetch_all(&mut *tx)
        .await?;
        let store: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT name, sum(n)::int8, count(*) FROM store_counts GROUP BY name")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let deltas: i64 =
            rows.iter().map(|r| r.3).sum::<i64>() + store.iter().map(|r| r.2).sum::<i64>();
        let keys = (rows.len() + store.len()) as i64;
        if deltas > FOLD_AT + 2 * keys {
            fold_counts(&self.pool).await?;
        }
        let mut kept = KeptCounts {
            frontier: rows
                .into_iter()
                .map(|(host, state, n, _)| (host, state, n))
                .collect(),
            ..KeptCounts::default()
        };
        for (name, n, _) in store {
            match name.as_str() {
                "pages" => kept.pages = n,
                "deferred" => kept.deferred = n,
                _ => {}
            }
        }
        Ok(kept.stats(top_hosts))
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

/// Most matches ranked for one query (see `search`).
const RANK_CAP: i64 = 1_000;

/// Kept-count deltas beyond one row per key that make `/stats` fold them.
const FOLD_AT: i64 = 2_000;

/// Fold the kept-count deltas into one row per key. The DELETE sees the deltas committed before
/// it began and the INSERT adds back their sums in the same statement: a delta committed
/// meanwhile is left for the next fold, and two folds at once each fold what they deleted.
async fn fold_counts(pool: &sqlx::PgPool) -> Result<()> {
    sqlx::query(
        "WITH gone AS (DELETE FROM frontier_counts RETURNING host, state, n) \
         INSERT INTO frontier_counts (host, state, n) \
         SELECT host, state, sum(n) FROM gone GROUP BY host, state HAVING sum(n) <> 0",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "WITH gone AS (DELETE FROM store_counts RETURNING name, n) \
         INSERT INTO store_counts (name, n) SELECT name, sum(n) FROM gone GROUP BY name",
    )
    .execute(pool)
    .await?;
    Ok(())
}
