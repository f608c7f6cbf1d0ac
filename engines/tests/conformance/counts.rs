//! The kept counts behind `/stats` agree with the rows they count, through every transition a
//! frontier entry makes (admitted, published, requeued, crawled, failed, redirected, kept aside
//! and offered later).

use std::collections::{BTreeMap, BTreeSet};

use engines::frontier::Links;
use engines::{IngestItem, IngestOutcome, Store};
use protocol::{FrontierCounts, Stats};

use super::{cand, page, BUDGET, UNLIMITED};

/// The stats a scan of every URL the test mentioned gives.
async fn scanned(store: &dyn Store, urls: &BTreeSet<String>, deferred: u64) -> Stats {
    let mut frontier = FrontierCounts {
        deferred,
        ..FrontierCounts::default()
    };
    let mut hosts: BTreeMap<String, protocol::HostStats> = BTreeMap::new();
    for url in urls {
        let Some((state, _)) = store.frontier_state(url).await.expect("state") else {
            continue;
        };
        let host = cand(url).host;
        let h = hosts
            .entry(host.clone())
            .or_insert_with(|| protocol::HostStats {
                host,
                ..protocol::HostStats::default()
            });
        let (f, hs) = match state.as_str() {
            "pending" => (&mut frontier.pending, &mut h.pending),
            "queued" => (&mut frontier.in_flight, &mut h.in_flight),
            "crawled" => (&mut frontier.crawled, &mut h.crawled),
            "failed" => (&mut frontier.failed, &mut h.failed),
            other => panic!("unknown state {other}"),
        };
        *f += 1;
        *hs += 1;
    }
    let total = |h: &protocol::HostStats| h.pending + h.in_flight + h.crawled + h.failed;
    let mut hosts: Vec<_> = hosts.into_values().collect();
    hosts.sort_by(|a, b| total(b).cmp(&total(a)).then_with(|| a.host.cmp(&b.host)));
    Stats {
        pages_indexed: store.indexed_urls().await.expect("indexed").len() as u64,
        frontier,
        hosts,
    }
}

fn mention(urls: &mut BTreeSet<String>, u: &str) -> String {
    urls.insert(u.to_string());
    u.to_string()
}

async fn check(store: &dyn Store, urls: &BTreeSet<String>, label: &str, deferred: u64) {
    let kept = store.stats(100).await.expect("stats");
    assert_eq!(kept, scanned(store, urls, deferred).await, "after {label}");
}

pub async fn kept_counts_agree_with_the_rows(store: &dyn Store) {
    let mut urls = BTreeSet::new();
    let crawl = store.create_crawl(UNLIMITED).await.expect("crawl");
    let seeds: Vec<String> = (0..12)
        .map(|i| mention(&mut urls, &format!("http://h{}.test/{i}", i % 3)))
        .collect();
    let cands: Vec<_> = seeds.iter().map(|s| cand(s)).collect();
    store
        .admit_seeds(crawl, &cands, BUDGET)
        .await
        .expect("admit");
    check(store, &urls, "seeds", 0).await;

    // Published (pending -> queued), then some requeued (queued -> pending).
    let out = store.unpublished(8).await.expect("unpublished");
    let published: Vec<String> = out.iter().map(|u| u.url.clone()).collect();
    store.mark_published(&published).await.expect("published");
    check(store, &urls, "publishing", 0).await;
    assert_eq!(
        store
            .requeue_stale(std::time::Duration::ZERO)
            .await
            .expect("requeue"),
        8
    );
    check(store, &urls, "requeueing", 0).await;

    // Pages with links (some new, some known), a failure, a redirect to a new URL.
    let links: Vec<String> = (0..6)
        .map(|i| mention(&mut urls, &format!("http://h{}.test/link{i}", i % 4)))
        .collect();
    let redirected = mention(&mut urls, "http://h3.test/moved");
    let mut items = vec![
        page(&seeds[0], "a", "one", &[&links[0], &links[1], &seeds[5]]),
        page(&seeds[1], "b", "two", &[&links[2], &links[3]]),
        IngestItem {
            url: seeds[2].clone(),
            outcome: IngestOutcome::Failed {
                reason: "http 404".into(),
            },
        },
    ];
    let mut moved = page(&redirected, "c", "three", &[&links[4]]);
    moved.url = seeds[3].clone();
    items.push(moved);
    store
        .ingest(&items, BUDGET, Links::Admit)
        .await
        .expect("ingest");
    check(store, &urls, "ingesting", 0).await;

    // Links kept aside, counted as deferred, then offered.
    let kept = page(&seeds[4], "d", "four", &[&links[5], &seeds[6]]);
    store
        .ingest(&[kept], BUDGET, Links::Defer)
        .await
        .expect("defer");
    let stats = store.stats(100).await.expect("stats");
    assert_eq!(stats.frontier.deferred, 2, "{stats:?}");
    check(store, &urls, "keeping links aside", 2).await;
    store.expand_deferred(10, BUDGET).await.expect("expand");
    check(store, &urls, "offering kept links", 0).await;

    // The same results again change nothing.
    store
        .ingest(&items, BUDGET, Links::Admit)
        .await
        .expect("again");
    check(store, &urls, "a repeated batch", 0).await;
}
