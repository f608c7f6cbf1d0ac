//! The frontier's decisions, made once for every engine: dedup, the depth limit with re-expansion
//! on a shorter path, the per-crawl page limit, the per-host page budget, and the state
//! transitions (pending → queued → crawled or failed).
//!
//! A store reads the rows a batch concerns into a [`View`] (one look-up per table: the frontier
//! rows of every URL the batch names, the crawls of its results, the budgets of the hosts it may
//! admit), asks [`plan_ingest`] or [`plan_seeds`] what to do, and executes the plan's writes in
//! the same transaction. The planner does no I/O and reads no clock, so it is tested on its own
//! (the table below); the conformance suite checks the engines that execute it.
//!
//! Semantics: the results of a batch are applied in order, each seeing what the previous ones did,
//! exactly as if they had been stored one at a time (a result for a URL an earlier result of the
//! batch finished is a repeat; a link found twice in a batch is admitted once, at its shortest
//! depth). Results for URLs already crawled or failed change nothing, so redelivery is harmless.
//!
//! Concurrency contract: a plan is exact while its view is current. Every insert expects no row
//! and every [`Change`] names the row it expects to find (`before`); a store that finds otherwise
//! when writing has lost a race with another cell and must roll back and plan again
//! ([`crate::EngineError::Conflict`]). SQLite holds the database's write lock from the look-up
//! on, so this never happens there; PostgreSQL locks the results' own rows, the page-limited
//! crawls and the host budgets, and checks the rest (redirect targets, re-expanded links) when it
//! writes them.

use std::collections::{BTreeMap, HashMap};

use crate::{Admission, Candidate, IngestItem, IngestOutcome, IngestReport};

/// What a batch of results does with its pages' links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Links {
    /// Offer them to the frontier now.
    #[default]
    Admit,
    /// Keep them aside, durably and in the same transaction as the results, to be offered later
    /// ([`plan_deferred`]): an api busy with clients sheds this work first (seed 003), and
    /// nothing set aside is lost if it dies, since any api offers what is kept.
    Defer,
}

/// The links of one stored page, kept aside: to be offered under `crawl_id` at `depth` (the
/// page's depth + 1, within the crawl's depth limit when they were kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredLinks<'a> {
    pub crawl_id: i64,
    pub depth: u32,
    pub links: &'a [Candidate],
}

/// Kept links as read back from a store: its row id (to delete once offered) and the links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredBatch {
    pub id: i64,
    pub crawl_id: i64,
    pub depth: u32,
    pub links: Vec<Candidate>,
}

impl DeferredBatch {
    /// A kept row as read from a store (`id, crawl_id, depth, links`).
    pub fn read(id: i64, crawl_id: i64, depth: i64, links: &str) -> crate::Result<Self> {
        Ok(Self {
            id,
            crawl_id,
            depth: depth.clamp(0, i64::from(u32::MAX)) as u32,
            links: decode_links(links)?,
        })
    }
}

/// The column text of kept links: a JSON array of `[url, host]` pairs.
pub fn encode_links(links: &[Candidate]) -> String {
    let pairs: Vec<(&str, &str)> = links
        .iter()
        .map(|c| (c.url.as_str(), c.host.as_str()))
        .collect();
    serde_json::to_string(&pairs).expect("strings serialize")
}

/// The links of a kept row's column text, or a decode error naming what was wrong.
pub fn decode_links(text: &str) -> crate::Result<Vec<Candidate>> {
    let pairs: Vec<(String, String)> = serde_json::from_str(text).map_err(|e| {
        crate::EngineError::Database(sqlx::Error::Decode(
            format!("kept links are not a JSON array of [url, host] pairs: {e}").into(),
        ))
    })?;
    Ok(pairs
        .into_iter()
        .map(|(url, host)| Candidate { url, host })
        .collect())
}

/// Where a URL is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Accepted, not yet handed to the queue.
    Pending,
    /// On the queue or being crawled.
    Queued,
    Crawled,
    /// Failed; the entry's reason says why.
    Failed,
}

impl State {
    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Queued => "queued",
            State::Crawled => "crawled",
            State::Failed => "failed",
        }
    }

    /// The state a `state` column names, if it names one.
    pub fn parse(name: &str) -> Option<State> {
        match name {
            "pending" => Some(State::Pending),
            "queued" => Some(State::Queued),
            "crawled" => Some(State::Crawled),
            "failed" => Some(State::Failed),
            _ => None,
        }
    }

    /// The state a `state` column read from the database names, or a decode error.
    pub(crate) fn from_column(name: &str) -> crate::Result<State> {
        State::parse(name).ok_or_else(|| {
            crate::EngineError::Database(sqlx::Error::Decode(
                format!("frontier state {name:?} is none of pending, queued, crawled, failed")
                    .into(),
            ))
        })
    }

    /// Crawled or failed: a result for it is a repeat.
    pub fn is_done(self) -> bool {
        matches!(self, State::Crawled | State::Failed)
    }
}

/// One frontier row as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub crawl_id: i64,
    pub depth: u32,
    pub state: State,
    pub reason: Option<String>,
}

/// One crawl request's limits and how many URLs it has admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crawl {
    pub max_depth: Option<u32>,
    pub max_pages: Option<u64>,
    pub admitted: u64,
}

/// The rows a batch concerns, as read in the store's transaction.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Frontier rows by URL; a URL not here is not in the frontier.
    pub entries: HashMap<String, Entry>,
    /// Crawls by id; a crawl not here (its row is gone) is unlimited.
    pub crawls: HashMap<i64, Crawl>,
    /// URLs admitted per host; a host not here has admitted none.
    pub hosts: HashMap<String, u64>,
}

impl View {
    /// The distinct crawls of these URLs' entries, sorted (the crawls to read, or lock).
    pub fn crawl_ids<'u>(&self, urls: impl IntoIterator<Item = &'u str>) -> Vec<i64> {
        let mut ids: Vec<i64> = urls
            .into_iter()
            .filter_map(|u| self.entries.get(u).map(|e| e.crawl_id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The hosts of those candidates that are not in the frontier, sorted and distinct: the
    /// budgets a plan may spend (the host budgets to read, or lock).
    pub fn hosts_to_admit<'c>(
        &self,
        candidates: impl IntoIterator<Item = &'c Candidate>,
    ) -> Vec<&'c str> {
        let mut hosts: Vec<&str> = candidates
            .into_iter()
            .filter(|c| !self.entries.contains_key(&c.url))
            .map(|c| c.host.as_str())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        hosts
    }
}

/// The URLs whose frontier rows a batch of results may read or write: the results' own URLs,
/// their final (redirect) URLs and, unless they are kept aside, their links; sorted and distinct.
pub fn ingest_urls(items: &[IngestItem], mode: Links) -> Vec<&str> {
    let mut urls: Vec<&str> = Vec::new();
    for item in items {
        urls.push(&item.url);
        if let IngestOutcome::Page {
            final_url, links, ..
        } = &item.outcome
        {
            urls.push(final_url);
            if mode == Links::Admit {
                urls.extend(links.iter().map(|l| l.url.as_str()));
            }
        }
    }
    urls.sort_unstable();
    urls.dedup();
    urls
}

/// The URLs of kept links, sorted and distinct (the frontier rows their offer reads).
pub fn deferred_urls(batches: &[DeferredBatch]) -> Vec<&str> {
    let mut urls: Vec<&str> = batches
        .iter()
        .flat_map(|b| b.links.iter().map(|l| l.url.as_str()))
        .collect();
    urls.sort_unstable();
    urls.dedup();
    urls
}

/// The distinct crawls of kept links, sorted (the crawls to read, or lock).
pub fn deferred_crawl_ids(batches: &[DeferredBatch]) -> Vec<i64> {
    let mut ids: Vec<i64> = batches.iter().map(|b| b.crawl_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The results' own URLs, sorted and distinct (the rows PostgreSQL locks).
pub fn item_urls(items: &[IngestItem]) -> Vec<&str> {
    let mut urls: Vec<&str> = items.iter().map(|i| i.url.as_str()).collect();
    urls.sort_unstable();
    urls.dedup();
    urls
}

/// The candidates whose host budgets a batch of results may spend: every link, unless the links
/// are kept aside (then none).
pub fn ingest_links(items: &[IngestItem], mode: Links) -> impl Iterator<Item = &Candidate> {
    items
        .iter()
        .filter(move |_| mode == Links::Admit)
        .flat_map(|item| match &item.outcome {
            IngestOutcome::Page { links, .. } => links.as_slice(),
            IngestOutcome::Failed { .. } => &[],
        })
}

/// A row to create: its URL must not be in the frontier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry<'a> {
    pub url: &'a str,
    pub host: &'a str,
    pub crawl_id: i64,
    pub depth: u32,
    pub state: State,
}

/// A row to change from what was read (`before`) to `after` (same crawl; depth, state and reason
/// may change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    pub url: &'a str,
    pub before: Entry,
    pub after: Entry,
}

/// A page to store (insert, or replace when its title or body changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageWrite<'a> {
    pub url: &'a str,
    pub host: &'a str,
    pub title: &'a str,
    pub body: &'a str,
}

/// How many URLs to add to the admitted counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts<'a> {
    /// Per crawl, only for crawls with a page limit (a crawl without one keeps no count, so the
    /// ingests of many apis do not queue on its one row).
    pub crawls: Vec<(i64, u64)>,
    /// Per host.
    pub hosts: Vec<(&'a str, u64)>,
}

/// The writes of one batch of results, each list sorted by URL (or id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestPlan<'a> {
    pub inserts: Vec<NewEntry<'a>>,
    pub changes: Vec<Change<'a>>,
    /// Indexable pages by final URL; a URL stored twice in a batch keeps its last page.
    pub pages: Vec<PageWrite<'a>>,
    pub counts: Counts<'a>,
    /// Links kept aside ([`Links::Defer`]), per stored page that has any.
    pub deferred: Vec<DeferredLinks<'a>>,
    /// Results that changed the frontier.
    pub stored: usize,
    pub links_admitted: usize,
    pub links_deferred: usize,
    /// Results for URLs the frontier does not know.
    pub unknown: usize,
}

impl IngestPlan<'_> {
    /// The report of this plan, given how many pages the store's write added or changed.
    pub fn report(&self, pages_indexed: usize) -> IngestReport {
        IngestReport {
            stored: self.stored,
            pages_indexed,
            links_admitted: self.links_admitted,
            links_deferred: self.links_deferred,
            unknown: self.unknown,
        }
    }
}

/// The writes of one seed admission, and the answer for each seed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedPlan<'a> {
    pub admissions: Vec<Admission>,
    pub inserts: Vec<NewEntry<'a>>,
    pub counts: Counts<'a>,
}

/// A row the walk has looked at: as read, and as it is now.
struct Row<'a> {
    before: Option<Entry>,
    now: Entry,
    /// For rows this batch creates.
    host: &'a str,
}

/// The in-memory frontier of one batch: the view, plus what the batch did so far.
struct Walk<'v, 'a> {
    view: &'v View,
    host_budget: u64,
    rows: HashMap<&'a str, Row<'a>>,
    crawls_added: BTreeMap<i64, u64>,
    hosts_added: BTreeMap<&'a str, u64>,
}

impl<'v, 'a> Walk<'v, 'a> {
    fn new(view: &'v View, host_budget: u64) -> Self {
        Self {
            view,
            host_budget,
            rows: HashMap::new(),
            crawls_added: BTreeMap::new(),
            hosts_added: BTreeMap::new(),
        }
    }

    fn current(&self, url: &str) -> Option<&Entry> {
        match self.rows.get(url) {
            Some(row) => Some(&row.now),
            None => self.view.entries.get(url),
        }
    }

    /// The entry of a known URL, to change.
    fn entry_mut(&mut self, url: &'a str) -> Option<&mut Entry> {
        if !self.rows.contains_key(url) {
            let entry = self.view.entries.get(url)?;
            self.rows.insert(
                url,
                Row {
                    before: Some(entry.clone()),
                    now: entry.clone(),
                    host: "",
                },
            );
        }
        self.rows.get_mut(url).map(|row| &mut row.now)
    }

    fn create(&mut self, url: &'a str, host: &'a str, crawl_id: i64, depth: u32, state: State) {
        let now = Entry {
            crawl_id,
            depth,
            state,
            reason: None,
        };
        self.rows.insert(
            url,
            Row {
                before: None,
                now,
                host,
            },
        );
    }

    fn crawl(&self, id: i64) -> Option<&Crawl> {
        self.view.crawls.get(&id)
    }

    /// Why a new URL of `host` under crawl `id` may not be admitted, if it may not: the crawl's
    /// page limit first, then the host's budget.
    fn refusal(&self, id: i64, host: &str) -> Option<String> {
        if let Some(crawl) = self.crawl(id) {
            if let Some(max) = crawl.max_pages {
                let added = self.crawls_added.get(&id).copied().unwrap_or(0);
                if crawl.admitted.saturating_add(added) >= max {
                    return Some(format!("crawl {id} reached its page limit ({max})"));
                }
            }
        }
        let admitted = self.view.hosts.get(host).copied().unwrap_or(0);
        let added = self.hosts_added.get(host).copied().unwrap_or(0);
        if admitted.saturating_add(added) >= self.host_budget {
            return Some(format!(
                "host {host} reached its page budget ({})",
                self.host_budget
            ));
        }
        None
    }

    /// Admit a new URL: a pending entry, counted against its crawl's limit and host's budget.
    fn admit(&mut self, c: &'a Candidate, crawl_id: i64, depth: u32) {
        self.create(&c.url, &c.host, crawl_id, depth, State::Pending);
        if self.crawl(crawl_id).is_some_and(|c| c.max_pages.is_some()) {
            *self.crawls_added.entry(crawl_id).or_default() += 1;
        }
        *self.hosts_added.entry(&c.host).or_default() += 1;
    }

    /// A known URL of crawl `crawl_id` reached at `depth`: when that is shorter than its entry's
    /// depth, the entry takes it, and a crawled entry is crawled again (its links may now be
    /// within the depth limit).
    fn reexpand(&mut self, url: &'a str, crawl_id: i64, depth: u32) {
        let shorter = self
            .current(url)
            .is_some_and(|e| e.crawl_id == crawl_id && e.depth > depth);
        if let Some(e) = self.entry_mut(url).filter(|_| shorter) {
            e.depth = depth;
            if e.state == State::Crawled {
                e.state = State::Pending;
            }
        }
    }

    /// Offer a stored page's links under `crawl_id` at `depth`: an unknown link is admitted
    /// within the crawl's page limit and its host's budget, a known one under a depth limit is
    /// re-expanded when this path is shorter. Returns how many were admitted.
    fn offer(
        &mut self,
        crawl_id: i64,
        depth: u32,
        max_depth: Option<u32>,
        links: &'a [Candidate],
    ) -> usize {
        let mut admitted = 0;
        for link in links {
            if self.current(&link.url).is_none() {
                // A refused link is not in the frontier: nothing accepted, nothing lost.
                if self.refusal(crawl_id, &link.host).is_none() {
                    self.admit(link, crawl_id, depth);
                    admitted += 1;
                }
            } else if max_depth.is_some() {
                // Under a depth limit, a shorter path to a known URL must re-expand it, or
                // pages within the limit would be missed depending on crawl order.
                self.reexpand(&link.url, crawl_id, depth);
            }
        }
        admitted
    }

    /// Split what the walk did into inserts and changes (sorted by URL), and counts.
    fn finish(self) -> (Vec<NewEntry<'a>>, Vec<Change<'a>>, Counts<'a>) {
        let mut rows: Vec<(&'a str, Row<'a>)> = self.rows.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut inserts = Vec::new();
        let mut changes = Vec::new();
        for (url, row) in rows {
            match row.before {
                None => inserts.push(NewEntry {
                    url,
                    host: row.host,
                    crawl_id: row.now.crawl_id,
                    depth: row.now.depth,
                    state: row.now.state,
                }),
                Some(before) if before != row.now => changes.push(Change {
                    url,
                    before,
                    after: row.now,
                }),
                Some(_) => {}
            }
        }
        let counts = Counts {
            crawls: self.crawls_added.into_iter().collect(),
            hosts: self.hosts_added.into_iter().collect(),
        };
        (inserts, changes, counts)
    }
}

/// Decide what a batch of crawl results does to the frontier and the index.
///
/// For each result in order: a URL the frontier does not know is counted `unknown`; one already
/// crawled or failed is a repeat and changes nothing; otherwise its entry becomes failed (with the
/// reason) or crawled. A page's redirect target becomes crawled too (created, at the result's
/// depth, if unknown; left alone if already crawled or failed). Its links are offered at the
/// result's depth + 1 under its crawl, unless that is beyond the crawl's depth limit: an unknown
/// link is admitted within the crawl's page limit and its host's budget, a known one under a depth
/// limit is re-expanded when this path is shorter. With [`Links::Defer`] the links are kept aside
/// instead (the plan's `deferred`), to be offered by [`plan_deferred`].
pub fn plan_ingest<'a>(
    view: &View,
    items: &'a [IngestItem],
    host_budget: u64,
    mode: Links,
) -> IngestPlan<'a> {
    let mut walk = Walk::new(view, host_budget);
    let mut plan = IngestPlan::default();
    let mut pages: BTreeMap<&'a str, PageWrite<'a>> = BTreeMap::new();
    for item in items {
        let url = item.url.as_str();
        let Some(entry) = walk.current(url) else {
            plan.unknown += 1;
            continue;
        };
        if entry.state.is_done() {
            continue; // a repeat: idempotent
        }
        let (crawl_id, depth) = (entry.crawl_id, entry.depth);
        plan.stored += 1;
        match &item.outcome {
            IngestOutcome::Failed { reason } => {
                if let Some(e) = walk.entry_mut(url) {
                    e.state = State::Failed;
                    e.reason = Some(reason.clone());
                }
            }
            IngestOutcome::Page {
                final_url,
                final_host,
                title,
                text,
                indexable,
                links,
            } => {
                if let Some(e) = walk.entry_mut(url) {
                    e.state = State::Crawled;
                    e.reason = None;
                }
                if final_url != url {
                    // The redirect target is crawled too; a job already queued for it will find
                    // it done.
                    match walk.entry_mut(final_url) {
                        Some(t) => {
                            if !t.state.is_done() {
                                t.state = State::Crawled;
                                t.reason = None;
                            }
                        }
                        None => walk.create(final_url, final_host, crawl_id, depth, State::Crawled),
                    }
                }
                if *indexable {
                    pages.insert(
                        final_url,
                        PageWrite {
                            url: final_url,
                            host: final_host,
                            title,
                            body: text,
                        },
                    );
                }
                let max_depth = walk.crawl(crawl_id).and_then(|c| c.max_depth);
                let child_depth = depth.saturating_add(1);
                if max_depth.is_some_and(|max| child_depth > max) {
                    continue;
                }
                match mode {
                    Links::Admit => {
                        plan.links_admitted += walk.offer(crawl_id, child_depth, max_depth, links);
                    }
                    Links::Defer if !links.is_empty() => {
                        plan.links_deferred += links.len();
                        plan.deferred.push(DeferredLinks {
                            crawl_id,
                            depth: child_depth,
                            links,
                        });
                    }
                    Links::Defer => {}
                }
            }
        }
    }
    let (inserts, changes, counts) = walk.finish();
    plan.inserts = inserts;
    plan.changes = changes;
    plan.counts = counts;
    plan.pages = pages.into_values().collect();
    plan
}

/// Decide what offering kept links does, batch by batch in order, exactly as [`plan_ingest`]
/// would have offered them when their page was stored (each batch sees what the previous did).
pub fn plan_deferred<'a>(
    view: &View,
    batches: &'a [DeferredBatch],
    host_budget: u64,
) -> IngestPlan<'a> {
    let mut walk = Walk::new(view, host_budget);
    let mut plan = IngestPlan::default();
    for b in batches {
        let max_depth = walk.crawl(b.crawl_id).and_then(|c| c.max_depth);
        if max_depth.is_some_and(|max| b.depth > max) {
            continue;
        }
        plan.links_admitted += walk.offer(b.crawl_id, b.depth, max_depth, &b.links);
    }
    let (inserts, changes, counts) = walk.finish();
    plan.inserts = inserts;
    plan.changes = changes;
    plan.counts = counts;
    plan
}

/// Decide what offering `seeds` (depth 0) under `crawl_id` does: each seed, in order, is known
/// (its state; a seed named twice is known the second time), refused (the crawl's page limit or
/// its host's budget), or admitted.
pub fn plan_seeds<'a>(
    view: &View,
    crawl_id: i64,
    seeds: &'a [Candidate],
    host_budget: u64,
) -> SeedPlan<'a> {
    let mut walk = Walk::new(view, host_budget);
    let mut admissions = Vec::with_capacity(seeds.len());
    for seed in seeds {
        if let Some(entry) = walk.current(&seed.url) {
            admissions.push(Admission::Known(entry.state.as_str()));
            continue;
        }
        if let Some(reason) = walk.refusal(crawl_id, &seed.host) {
            admissions.push(Admission::Refused(reason));
            continue;
        }
        walk.admit(seed, crawl_id, 0);
        admissions.push(Admission::Admitted);
    }
    let (inserts, _, counts) = walk.finish();
    SeedPlan {
        admissions,
        inserts,
        counts,
    }
}

#[cfg(test)]
mod tests;
