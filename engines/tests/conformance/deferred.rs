//! Links kept aside while an api is busy with clients (seed 003): stored with their page in one
//! transaction, counted in the frontier's figures, offered later exactly as an immediate ingest
//! would have offered them, by any caller, never twice.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use engines::frontier::Links;
use engines::{CrawlSpec, IngestItem, Store};

use super::{cand, page, BUDGET};

/// One page's kept links: counted, not in the frontier, offered once, at the right depth.
pub async fn deferred_links_are_kept_and_offered_once(store: &dyn Store) {
    let crawl = store
        .create_crawl(CrawlSpec {
            max_depth: Some(1),
            max_pages: None,
        })
        .await
        .expect("crawl");
    store
        .admit_seeds(crawl, &[cand("http://k.test/")], BUDGET)
        .await
        .expect("admit");
    let home = page(
        "http://k.test/",
        "kept",
        "kept links",
        &["http://k.test/a", "http://k.test/b"],
    );
    let report = store
        .ingest(std::slice::from_ref(&home), BUDGET, Links::Defer)
        .await
        .expect("ingest");
    assert_eq!(
        (report.stored, report.links_admitted, report.links_deferred),
        (1, 0, 2)
    );
    let stats = store.stats(10).await.expect("stats");
    assert_eq!(stats.frontier.deferred, 2, "{stats:?}");
    assert_eq!(stats.pages_indexed, 1, "the page is searchable at once");
    assert!(
        !stats.frontier.drained(),
        "kept links are work left: {stats:?}"
    );
    assert_eq!(
        store
            .frontier_state("http://k.test/a")
            .await
            .expect("state"),
        None
    );
    // The same result again (a redelivery) keeps nothing more.
    let again = store
        .ingest(&[home], BUDGET, Links::Defer)
        .await
        .expect("again");
    assert_eq!((again.stored, again.links_deferred), (0, 0));
    assert_eq!(store.stats(10).await.expect("stats").frontier.deferred, 2);

    let offered = store.expand_deferred(64, BUDGET).await.expect("expand");
    assert_eq!((offered.pages, offered.links_admitted), (1, 2));
    let stats = store.stats(10).await.expect("stats");
    assert_eq!(stats.frontier.deferred, 0, "{stats:?}");
    assert_eq!(stats.frontier.pending, 2, "{stats:?}");
    let none = store.expand_deferred(64, BUDGET).await.expect("expand");
    assert_eq!((none.pages, none.links_admitted), (0, 0));

    // A page at the depth limit keeps nothing: its links would be beyond it.
    let todo = store.unpublished(10).await.expect("unpublished");
    assert_eq!(todo.len(), 2);
    assert!(todo.iter().all(|u| u.depth == 1), "{todo:?}");
    let deep = page("http://k.test/a", "a", "deep", &["http://k.test/c"]);
    let report = store
        .ingest(&[deep], BUDGET, Links::Defer)
        .await
        .expect("deep");
    assert_eq!((report.stored, report.links_deferred), (1, 0));
    assert_eq!(store.stats(10).await.expect("stats").frontier.deferred, 0);
}

/// The links of page `i` of an `n`-page web on five hosts.
fn links_of(i: usize, n: usize) -> Vec<String> {
    [(i * 7 + 1) % n, (i * 13 + 5) % n, (i + 1) % n]
        .iter()
        .map(|j| url(*j))
        .collect()
}

fn url(i: usize) -> String {
    format!("http://d{}.test/{i}", i % 5)
}

/// A crawl under a depth limit driven to its end while most batches keep their links aside and
/// two callers offer kept links at once: the pages crawled are exactly those within the depth
/// limit (breadth-first from the seed), none crawled twice, nothing left kept.
pub async fn deferred_crawl_is_exact(store: Arc<dyn Store>) {
    const N: usize = 400;
    const MAX_DEPTH: u32 = 5;
    let mut expected = BTreeSet::new();
    let mut depth: HashMap<usize, u32> = HashMap::from([(0, 0)]);
    let mut todo = VecDeque::from([0usize]);
    while let Some(i) = todo.pop_front() {
        expected.insert(url(i));
        let d = depth[&i];
        if d == MAX_DEPTH {
            continue;
        }
        for j in [(i * 7 + 1) % N, (i * 13 + 5) % N, (i + 1) % N] {
            if let std::collections::hash_map::Entry::Vacant(e) = depth.entry(j) {
                e.insert(d + 1);
                todo.push_back(j);
            }
        }
    }
    let crawl = store
        .create_crawl(CrawlSpec {
            max_depth: Some(MAX_DEPTH),
            max_pages: None,
        })
        .await
        .expect("crawl");
    store
        .admit_seeds(crawl, &[cand(&url(0))], BUDGET)
        .await
        .expect("admit");
    // A second api offering kept links all along.
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut offered = 0;
            while !stop.load(Ordering::Relaxed) {
                offered += store
                    .expand_deferred(3, BUDGET)
                    .await
                    .expect("expand")
                    .pages;
                tokio::task::yield_now().await;
            }
            offered
        })
    };
    let mut crawled = Vec::new();
    let mut round = 0u32;
    loop {
        round += 1;
        assert!(round < 20_000, "the crawl did not end");
        let batch = store.unpublished(16).await.expect("unpublished");
        if batch.is_empty() {
            let offered = store.expand_deferred(8, BUDGET).await.expect("expand");
            let stats = store.stats(0).await.expect("stats");
            if offered.pages == 0 && stats.frontier.drained() {
                break;
            }
            tokio::task::yield_now().await;
            continue;
        }
        let urls: Vec<String> = batch.iter().map(|u| u.url.clone()).collect();
        store.mark_published(&urls).await.expect("mark");
        let items: Vec<IngestItem> = urls
            .iter()
            .map(|u| {
                let i: usize = u
                    .rsplit('/')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("n");
                let links = links_of(i, N);
                let links: Vec<&str> = links.iter().map(String::as_str).collect();
                page(u, "d", "deferred", &links)
            })
            .collect();
        // Two batches in three keep their links.
        let mode = if round % 3 == 0 {
            Links::Admit
        } else {
            Links::Defer
        };
        let report = store.ingest(&items, BUDGET, mode).await.expect("ingest");
        assert_eq!(report.stored, items.len(), "a job was crawled twice");
        crawled.extend(urls);
    }
    stop.store(true, Ordering::Relaxed);
    let offered_by_other = other.await.expect("the other api");
    let stats = store.stats(0).await.expect("stats");
    assert_eq!(stats.frontier.deferred, 0, "{stats:?}");
    let crawled_set: BTreeSet<String> = crawled.iter().cloned().collect();
    assert_eq!(
        crawled_set, expected,
        "crawled exactly the pages within the depth limit"
    );
    // Under a depth limit a page reached again on a shorter path is crawled again; never more
    // than once per depth.
    assert!(crawled.len() <= expected.len() * (MAX_DEPTH as usize + 1));
    eprintln!(
        "{} pages crawled ({} results), {offered_by_other} pages' links offered by the other caller",
        crawled_set.len(),
        crawled.len()
    );
}
