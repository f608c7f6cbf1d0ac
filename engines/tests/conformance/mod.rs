//! One conformance suite for every engine: each backend's test file calls these with its own
//! store and queue. Every function starts from an empty store/queue.
#![allow(dead_code)] // each backend's test binary uses the whole suite, but rustc checks per file

pub mod counts;
pub mod deferred;
mod idempotency;
#[allow(unused_imports)] // the queue-only suite (rabbitmq) uses none of the store checks
pub use idempotency::{idempotency_keys, idempotency_one_holder};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use engines::frontier::Links;
use engines::{
    Admission, Candidate, CrawlSpec, IngestItem, IngestOutcome, JobQueue, SearchQuery, Store,
};
use protocol::CrawlJob;

pub fn cand(url: &str) -> Candidate {
    let host = url::Url::parse(url)
        .expect("test URL")
        .host_str()
        .expect("host")
        .to_string();
    Candidate {
        url: url.to_string(),
        host,
    }
}

pub fn page(url: &str, title: &str, text: &str, links: &[&str]) -> IngestItem {
    IngestItem {
        url: url.to_string(),
        outcome: IngestOutcome::Page {
            final_url: url.to_string(),
            final_host: cand(url).host,
            title: title.to_string(),
            text: text.to_string(),
            indexable: true,
            links: links.iter().map(|l| cand(l)).collect(),
        },
    }
}

pub(crate) const BUDGET: u64 = 1_000_000;

/// A crawl without limits.
pub const UNLIMITED: CrawlSpec = CrawlSpec {
    max_depth: None,
    max_pages: None,
};

/// Every accepted URL ends crawled or failed; nothing is lost or invented.
pub async fn frontier_invariant(store: &dyn Store) {
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let adm = store
        .admit_seeds(
            crawl,
            &[cand("http://a.test/"), cand("http://a.test/")],
            BUDGET,
        )
        .await
        .expect("admit");
    assert_eq!(adm[0], Admission::Admitted);
    assert_eq!(adm[1], Admission::Known("pending"));
    // Drive the frontier to completion like a crawler would.
    let mut rounds = 0;
    loop {
        let todo = store.unpublished(100).await.expect("unpublished");
        if todo.is_empty() {
            break;
        }
        rounds += 1;
        assert!(rounds < 10, "frontier did not drain");
        let urls: Vec<String> = todo.iter().map(|u| u.url.clone()).collect();
        store.mark_published(&urls).await.expect("mark");
        let items: Vec<IngestItem> = urls
            .iter()
            .map(|u| match u.as_str() {
                "http://a.test/" => page(
                    u,
                    "home",
                    "welcome home",
                    &["http://a.test/1", "http://b.test/"],
                ),
                "http://a.test/1" => page(u, "one", "first page", &["http://a.test/"]),
                _ => IngestItem {
                    url: u.clone(),
                    outcome: IngestOutcome::Failed {
                        reason: "http 404".into(),
                    },
                },
            })
            .collect();
        store
            .ingest(&items, BUDGET, Links::Admit)
            .await
            .expect("ingest");
    }
    let stats = store.stats(10).await.expect("stats");
    assert!(stats.frontier.drained(), "{stats:?}");
    assert_eq!(stats.frontier.crawled, 2);
    assert_eq!(stats.frontier.failed, 1);
    assert_eq!(stats.pages_indexed, 2);
    let (state, reason) = store
        .frontier_state("http://b.test/")
        .await
        .expect("state")
        .expect("known");
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("http 404"))
    );
}

/// The same result twice changes nothing.
pub async fn idempotent_ingest(store: &dyn Store) {
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    store
        .admit_seeds(crawl, &[cand("http://i.test/")], BUDGET)
        .await
        .expect("admit");
    let item = page(
        "http://i.test/",
        "idem",
        "potent words",
        &["http://i.test/x"],
    );
    let first = store
        .ingest(std::slice::from_ref(&item), BUDGET, Links::Admit)
        .await
        .expect("first");
    let stats1 = store.stats(10).await.expect("stats");
    let second = store
        .ingest(&[item], BUDGET, Links::Admit)
        .await
        .expect("second");
    let stats2 = store.stats(10).await.expect("stats");
    assert_eq!(first.stored, 1);
    assert_eq!(first.links_admitted, 1);
    assert_eq!(second.stored, 0);
    assert_eq!(second.links_admitted, 0);
    assert_eq!(stats1, stats2);
    // A result for a URL the frontier never accepted is ignored and counted.
    let stray = store
        .ingest(
            &[page("http://nowhere.test/", "t", "t", &[])],
            BUDGET,
            Links::Admit,
        )
        .await
        .expect("stray");
    assert_eq!(stray.unknown, 1);
    assert_eq!(store.stats(10).await.expect("stats"), stats2);
}

/// Depth and page limits; a shorter path under a depth limit re-expands a page.
pub async fn limits(store: &dyn Store) {
    let crawl = store
        .create_crawl(CrawlSpec {
            max_depth: Some(1),
            max_pages: Some(3),
        })
        .await
        .expect("crawl");
    store
        .admit_seeds(crawl, &[cand("http://d.test/")], BUDGET)
        .await
        .expect("admit");
    let r = store
        .ingest(
            &[page(
                "http://d.test/",
                "d",
                "d",
                &["http://d.test/1", "http://d.test/2", "http://d.test/3"],
            )],
            BUDGET,
            Links::Admit,
        )
        .await
        .expect("ingest");
    assert_eq!(
        r.links_admitted, 2,
        "page limit of 3 admits the seed and two links"
    );
    let r = store
        .ingest(
            &[page("http://d.test/1", "d1", "d1", &["http://d.test/1/a"])],
            BUDGET,
            Links::Admit,
        )
        .await
        .expect("ingest");
    assert_eq!(r.links_admitted, 0, "depth 2 is beyond max_depth 1");
    // Host budget.
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let adm = store
        .admit_seeds(
            crawl,
            &[cand("http://h.test/1"), cand("http://h.test/2")],
            1,
        )
        .await
        .expect("admit");
    assert_eq!(adm[0], Admission::Admitted);
    assert!(
        matches!(&adm[1], Admission::Refused(r) if r.contains("budget")),
        "{adm:?}"
    );
}

pub async fn search_ranking_and_snippets(store: &dyn Store) {
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let urls = ["http://s.test/1", "http://s.test/2", "http://s.test/3"];
    store
        .admit_seeds(crawl, &urls.map(cand), BUDGET)
        .await
        .expect("admit");
    store
        .ingest(
            &[
                page(
                    urls[0],
                    "Zebra facts",
                    "zebra zebra zebra stripes and <script>alert(1)</script> grass",
                    &[],
                ),
                page(
                    urls[1],
                    "Savanna",
                    "a zebra was seen once near the river among many other animals",
                    &[],
                ),
                page(urls[2], "Unrelated", "nothing to see here", &[]),
            ],
            BUDGET,
            Links::Admit,
        )
        .await
        .expect("ingest");
    let res = store
        .search(&SearchQuery {
            terms: vec!["zebra".into()],
            limit: 10,
            offset: 0,
        })
        .await
        .expect("search");
    assert_eq!((res.total, res.total_exact), (2, true));
    assert_eq!(
        res.hits[0].url, urls[0],
        "the page about zebras ranks first"
    );
    assert!(res.hits[0].score > res.hits[1].score);
    assert!(
        res.hits.iter().all(|h| h.snippet.contains("<mark>")),
        "{:?}",
        res.hits
    );
    assert!(
        !res.hits[0].snippet.contains("<script>"),
        "page markup is escaped: {}",
        res.hits[0].snippet
    );
    let res = store
        .search(&SearchQuery {
            terms: vec!["zebra".into()],
            limit: 1,
            offset: 1,
        })
        .await
        .expect("search");
    assert_eq!(res.total, 2);
    assert_eq!(res.hits.len(), 1);
    assert_eq!(res.hits[0].url, urls[1]);
    let res = store
        .search(&SearchQuery {
            terms: vec!["zebra".into(), "river".into()],
            limit: 10,
            offset: 0,
        })
        .await
        .expect("search");
    assert_eq!(res.hits.len(), 1, "all terms are required");
    // Query syntax never reaches the engine as syntax.
    let res = store
        .search(&SearchQuery {
            terms: vec!["\"or".into(), "near(".into()],
            limit: 10,
            offset: 0,
        })
        .await
        .expect("hostile terms are plain words");
    assert_eq!(res.total, 0);
}

/// Many writers ingesting at once lose nothing.
pub async fn concurrent_writers(store: Arc<dyn Store>) {
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let seeds: Vec<Candidate> = (0..200)
        .map(|i| cand(&format!("http://c{}.test/{i}", i % 7)))
        .collect();
    store
        .admit_seeds(crawl, &seeds, BUDGET)
        .await
        .expect("admit");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        let mine: Vec<IngestItem> = seeds
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 8 == w)
            .map(|(i, s)| {
                page(
                    &s.url,
                    "c",
                    "concurrent",
                    &[&format!("http://c{}.test/new/{i}", i % 5)],
                )
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            for chunk in mine.chunks(5) {
                store
                    .ingest(chunk, BUDGET, Links::Admit)
                    .await
                    .expect("ingest");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let stats = store.stats(100).await.expect("stats");
    assert_eq!(stats.frontier.crawled, 200);
    assert_eq!(stats.frontier.pending, 200);
    assert_eq!(stats.pages_indexed, 200);
}

/// Ingest `pages` results with 10 new links each in batches of 50, as a crawler sends them, and
/// print the rate (a measurement: nothing here can fail but the calls).
pub async fn ingest_throughput(store: &dyn Store, pages: usize) {
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let seeds: Vec<_> = (0..pages)
        .map(|i| cand(&format!("http://t{}.test/{i}", i % 50)))
        .collect();
    store
        .admit_seeds(crawl, &seeds, u64::MAX)
        .await
        .expect("admit");
    let body: String = (0..300).map(|i| format!("word{} ", i % 97)).collect();
    let items: Vec<IngestItem> = seeds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let links: Vec<String> = (0..10)
                .map(|j| format!("http://t{}.test/{i}/{j}", j * 5))
                .collect();
            let links: Vec<&str> = links.iter().map(String::as_str).collect();
            page(&s.url, "title words", &body, &links)
        })
        .collect();
    let started = std::time::Instant::now();
    for chunk in items.chunks(50) {
        store
            .ingest(chunk, u64::MAX, Links::Admit)
            .await
            .expect("ingest");
    }
    let elapsed = started.elapsed();
    eprintln!(
        "ingested {} pages ({} links) in {elapsed:?}: {:.0} pages/s",
        items.len(),
        items.len() * 10,
        items.len() as f64 / elapsed.as_secs_f64()
    );
    let t = std::time::Instant::now();
    let res = store
        .search(&SearchQuery {
            terms: vec!["word5".into(), "title".into()],
            limit: 10,
            offset: 0,
        })
        .await
        .expect("search");
    eprintln!("search over {} matches took {:?}", res.total, t.elapsed());
    // What was measured is also right: every page crawled and indexed, every link (distinct
    // across pages) pending, and the common term found everywhere.
    let stats = store.stats(0).await.expect("stats");
    assert_eq!(stats.frontier.crawled, pages as u64, "{stats:?}");
    assert_eq!(stats.pages_indexed, pages as u64, "{stats:?}");
    assert_eq!(stats.frontier.pending, (pages * 10) as u64, "{stats:?}");
    assert_eq!(res.total, pages as u64);
    // Reading the counts may fold them (PostgreSQL keeps deltas); they read the same after.
    assert_eq!(store.stats(0).await.expect("stats again"), stats);
}

/// Pages for [`ingest_throughput`]: `HOMEOSTAT_INGEST_PAGES`, or a size the test suite runs in
/// a second or two (the benchmark figures in BENCHMARKS.md use 5000).
pub fn ingest_pages() -> usize {
    std::env::var("HOMEOSTAT_INGEST_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

fn job(i: usize) -> CrawlJob {
    CrawlJob::new(format!("http://q.test/{i}"), 0, "http://127.0.0.1:1")
}

/// Published jobs come out once each while leased, and go away when acknowledged.
pub async fn queue_basics(queue: &dyn JobQueue) {
    let jobs: Vec<CrawlJob> = (0..10).map(job).collect();
    queue.publish(&jobs).await.expect("publish");
    let mut seen = HashSet::new();
    let mut tags = Vec::new();
    for _ in 0..50 {
        for d in queue.lease(4).await.expect("lease") {
            assert_eq!(d.deliveries, 1);
            seen.insert(d.job.expect("decodes").url);
            tags.push(d.tag);
        }
        if seen.len() == 10 {
            break;
        }
    }
    assert_eq!(seen.len(), 10);
    queue.ack(&tags).await.expect("ack");
    assert!(queue.lease(10).await.expect("lease").is_empty());
}

/// A leased job that is never acknowledged is delivered again after its lease, counted.
/// The queue under test must have been opened with a short lease (<= 300 ms).
pub async fn lease_expiry_redelivers(queue: &dyn JobQueue) {
    queue.publish(&[job(1)]).await.expect("publish");
    let first = wait_lease(queue).await;
    assert_eq!(first.deliveries, 1);
    let second = wait_lease(queue).await;
    assert_eq!(second.job.as_ref().expect("job").url, "http://q.test/1");
    assert_eq!(second.deliveries, 2);
    queue.ack(&[second.tag]).await.expect("ack");
}

/// After max_deliveries (the queue under test: 3) unacknowledged deliveries the job is
/// dead-lettered with a reason, and can be taken from the dead-letter queue.
pub async fn dead_letters_after_limit(queue: &dyn JobQueue) {
    queue.publish(&[job(2)]).await.expect("publish");
    for n in 1..=3 {
        let d = wait_lease(queue).await;
        assert_eq!(d.deliveries, n);
    }
    let dead = wait_dead(queue).await;
    assert_eq!(dead.0.job.as_ref().expect("job").url, "http://q.test/2");
    assert!(!dead.1.is_empty());
    queue.ack_dead(&[dead.0.tag]).await.expect("ack dead");
    // An explicit dead-letter (poison) goes there at once.
    queue.publish(&[job(3)]).await.expect("publish");
    let d = wait_lease(queue).await;
    queue
        .dead_letter(d.tag, "poison")
        .await
        .expect("dead letter");
    let dead = wait_dead(queue).await;
    assert_eq!(dead.1, "poison");
    queue.ack_dead(&[dead.0.tag]).await.expect("ack dead");
}

/// A retried job comes back with its delivery counted.
pub async fn retry_redelivers(queue: &dyn JobQueue) {
    queue.publish(&[job(4)]).await.expect("publish");
    let d = wait_lease(queue).await;
    queue
        .retry(d.tag, Duration::from_millis(10))
        .await
        .expect("retry");
    let again = wait_lease(queue).await;
    assert_eq!(again.deliveries, 2);
    queue.ack(&[again.tag]).await.expect("ack");
}

async fn wait_lease(queue: &dyn JobQueue) -> engines::Delivery {
    for _ in 0..400 {
        if let Some(d) = queue.lease(1).await.expect("lease").pop() {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no delivery within 10 s");
}

async fn wait_dead(queue: &dyn JobQueue) -> (engines::Delivery, String) {
    for _ in 0..400 {
        // Leasing is what moves expired poison jobs along on some engines.
        let _ = queue.lease(0).await.expect("lease");
        if let Some(d) = queue.lease_dead(1).await.expect("lease dead").pop() {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing dead-lettered within 10 s");
}

pub mod politeness;

/// [`wait_lease`] for the submodules.
pub async fn wait_lease_pub(queue: &dyn JobQueue) -> engines::Delivery {
    wait_lease(queue).await
}

/// The search generation (what an api keeps search answers under) moves when another cell
/// commits to the store: an answer kept before the commit is not given after it.
pub async fn search_generation_moves_with_another_cells_commit(a: &dyn Store, b: &dyn Store) {
    let crawl = a.create_crawl(UNLIMITED).await.expect("crawl");
    let seed = cand("http://gen.test/1");
    a.admit_seeds(crawl, std::slice::from_ref(&seed), u64::MAX)
        .await
        .expect("admit");
    let before = a
        .search_generation()
        .await
        .expect("read")
        .expect("this engine has a generation");
    b.ingest(
        &[page(&seed.url, "t", "quagga", &[])],
        u64::MAX,
        Links::Admit,
    )
    .await
    .expect("ingest by another cell");
    let after = a
        .search_generation()
        .await
        .expect("read")
        .expect("a generation");
    assert_ne!(
        before, after,
        "a commit by another cell left the generation as it was"
    );
}

/// Above the ranking's bound (1,000 matches) the total is estimated from the newest matches:
/// exact in value when every page matches, close when some do, and said to be an estimate.
pub async fn totals_above_the_bound_are_estimated(store: &dyn Store) {
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let n = 2_400;
    let urls: Vec<String> = (0..n)
        .map(|i| format!("http://e{}.test/{i}", i % 9))
        .collect();
    let cands: Vec<Candidate> = urls.iter().map(|u| cand(u)).collect();
    store
        .admit_seeds(crawl, &cands, u64::MAX)
        .await
        .expect("admit");
    let items: Vec<IngestItem> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| {
            // Every page says "every"; every other page "half"; one page in 100 "few".
            let mut text = String::from("every");
            if i % 2 == 0 {
                text.push_str(" half");
            }
            if i % 100 == 0 {
                text.push_str(" few");
            }
            page(u, "t", &text, &[])
        })
        .collect();
    for chunk in items.chunks(200) {
        store
            .ingest(chunk, u64::MAX, Links::Admit)
            .await
            .expect("ingest");
    }
    let total = |word: &'static str| async move {
        let r = store
            .search(&SearchQuery {
                terms: vec![word.into()],
                limit: 10,
                offset: 0,
            })
            .await
            .expect("search");
        assert_eq!(r.hits.len(), 10.min(r.total as usize), "{word}");
        (r.total, r.total_exact)
    };
    assert_eq!(total("every").await, (n as u64, false));
    let (half, exact) = total("half").await;
    assert!(!exact);
    assert!(
        (1_100..=1_300).contains(&half),
        "half of {n} pages estimated as {half}"
    );
    assert_eq!(total("few").await, (24, true));
}
