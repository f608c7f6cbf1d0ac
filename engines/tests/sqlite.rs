//! The conformance suite on the embedded engines.

mod conformance;
mod support;

use std::sync::Arc;
use std::time::Duration;

use engines::sqlite::{SqliteQueue, SqliteStore};
use engines::Store;

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let (dir, _, store) = support::sqlite_store().await;
    (dir, store)
}

#[tokio::test]
async fn frontier_invariant() {
    let (_d, s) = store().await;
    conformance::frontier_invariant(&s).await;
}

#[tokio::test]
async fn idempotent_ingest() {
    let (_d, s) = store().await;
    conformance::idempotent_ingest(&s).await;
}

#[tokio::test]
async fn limits() {
    let (_d, s) = store().await;
    conformance::limits(&s).await;
}

#[tokio::test]
async fn search_ranking_and_snippets() {
    let (_d, s) = store().await;
    conformance::search_ranking_and_snippets(&s).await;
}

#[tokio::test]
async fn totals_above_the_bound_are_estimated() {
    let (_d, s) = store().await;
    conformance::totals_above_the_bound_are_estimated(&s).await;
}

/// Ingest throughput, checked and printed (`HOMEOSTAT_INGEST_PAGES=5000 cargo test --workspace
/// --test sqlite -- --nocapture ingest_throughput` for the benchmark's size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_throughput() {
    let (_d, s) = store().await;
    conformance::ingest_throughput(&s, conformance::ingest_pages()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers() {
    let (_d, s) = store().await;
    conformance::concurrent_writers(Arc::new(s)).await;
}

#[tokio::test]
async fn deferred_links_are_kept_and_offered_once() {
    let (_d, s) = store().await;
    conformance::deferred::deferred_links_are_kept_and_offered_once(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_crawl_is_exact() {
    let (_d, s) = store().await;
    conformance::deferred::deferred_crawl_is_exact(Arc::new(s)).await;
}

#[tokio::test]
async fn idempotency_keys() {
    let (_d, s) = store().await;
    conformance::idempotency_keys(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_one_holder() {
    let (_d, s) = store().await;
    conformance::idempotency_one_holder(Arc::new(s)).await;
}

#[tokio::test]
async fn queue_basics() {
    let (_d, q) = support::sqlite_queue().await;
    conformance::queue_basics(&q).await;
}

#[tokio::test]
async fn lease_expiry_redelivers() {
    let (_d, q) = support::sqlite_queue().await;
    conformance::lease_expiry_redelivers(&q).await;
}

#[tokio::test]
async fn dead_letters_after_limit() {
    let (_d, q) = support::sqlite_queue().await;
    conformance::dead_letters_after_limit(&q).await;
}

#[tokio::test]
async fn retry_redelivers() {
    let (_d, q) = support::sqlite_queue().await;
    conformance::retry_redelivers(&q).await;
}

/// The queue survives its process: a reopened file still holds its jobs.
#[tokio::test]
async fn queue_is_durable_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.db");
    let path = path.to_str().expect("utf-8");
    {
        let q = SqliteQueue::open(path, Duration::from_secs(60), 3)
            .await
            .expect("open");
        engines::JobQueue::publish(&q, &[protocol::CrawlJob::new("http://x.test/", 0, "r")])
            .await
            .expect("publish");
    }
    let q = SqliteQueue::open(path, Duration::from_secs(60), 3)
        .await
        .expect("reopen");
    let got = engines::JobQueue::lease(&q, 10).await.expect("lease");
    assert_eq!(got.len(), 1);
}

// The host ledger, the publisher's claims and deferred jobs
// (engines/tests/conformance/politeness.rs).

#[tokio::test]
async fn ledger_spacing_concurrency_and_blocks() {
    let (_d, s) = store().await;
    conformance::politeness::ledger_spacing_concurrency_and_blocks(&s).await;
}

#[tokio::test]
async fn ledger_leases_take_lanes() {
    let (_d, s) = store().await;
    conformance::politeness::ledger_leases_take_lanes(&s).await;
}

#[tokio::test]
async fn ledger_permits_lapse() {
    let (_d, s) = store().await;
    conformance::politeness::ledger_permits_lapse(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_concurrent_askers() {
    // Three stores on one file: three api cells of one machine.
    let (_dir, path, a) = support::sqlite_store().await;
    let b = SqliteStore::open(&path).await.expect("open b");
    let c = SqliteStore::open(&path).await.expect("open c");
    conformance::politeness::ledger_concurrent_askers(vec![Arc::new(a), Arc::new(b), Arc::new(c)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publisher_claims_do_not_overlap_and_expire() {
    let (_dir, path, a) = support::sqlite_store().await;
    let b: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.expect("open b"));
    let a: Arc<dyn Store> = Arc::new(a);
    conformance::politeness::publisher_claims_do_not_overlap(a.clone(), b.clone()).await;
    let mut side = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite:{path}"))
        .await
        .expect("side connection");
    conformance::politeness::expired_claims_are_taken_over(a, b, || async {
        sqlx::query("UPDATE frontier SET claimed_until_ms = claimed_until_ms - ?")
            .bind(engines::PUBLISH_CLAIM.as_millis() as i64 + 1)
            .execute(&mut side)
            .await
            .expect("age the claim");
    })
    .await;
}

#[tokio::test]
async fn defer_spends_no_delivery() {
    let (_d, q) = support::sqlite_queue().await;
    conformance::politeness::defer_spends_no_delivery(&q).await;
}

#[tokio::test]
async fn kept_counts_agree_with_the_rows() {
    let (_d, s) = store().await;
    conformance::counts::kept_counts_agree_with_the_rows(&s).await;
}

/// Text with NUL characters and a page of megabytes travel whole through the batched writes.
#[tokio::test]
async fn hostile_page_text() {
    let (_d, store) = store().await;
    let crawl = store
        .create_crawl(conformance::UNLIMITED)
        .await
        .expect("crawl");
    let urls = ["http://n.test/nul", "http://n.test/big"];
    store
        .admit_seeds(crawl, &urls.map(conformance::cand), 1_000_000)
        .await
        .expect("admit");
    let huge: String = (0..400_000).map(|i| format!("w{i} ")).collect();
    let r = store
        .ingest(
            &[
                conformance::page(urls[0], "nul\0title", "a nul\0byte ocelot", &[]),
                conformance::page(urls[1], "big", &format!("ocelot {huge} lynx"), &[]),
            ],
            1_000_000,
            engines::frontier::Links::Admit,
        )
        .await
        .expect("ingest");
    assert_eq!((r.stored, r.pages_indexed), (2, 2));
    for (term, n) in [("ocelot", 2), ("byte", 1), ("lynx", 1)] {
        let res = store
            .search(&engines::SearchQuery {
                terms: vec![term.into()],
                limit: 10,
                offset: 0,
            })
            .await
            .expect("search");
        assert_eq!(res.total, n, "{term}: {res:?}");
    }
}

/// A term on more pages than the ranking cap (here every page): the total, estimated, is right,
/// pages of hits do not
/// overlap, and the best page among the newest ones comes first.
#[tokio::test]
async fn a_common_term_is_ranked_among_a_bounded_set() {
    let (_d, store) = store().await;
    let crawl = store
        .create_crawl(conformance::UNLIMITED)
        .await
        .expect("crawl");
    let n = 1_100;
    let urls: Vec<String> = (0..n)
        .map(|i| format!("http://c{}.test/{i}", i % 7))
        .collect();
    let cands: Vec<_> = urls.iter().map(|u| conformance::cand(u)).collect();
    store
        .admit_seeds(crawl, &cands, u64::MAX)
        .await
        .expect("admit");
    let items: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| {
            // The newest page says the word most often.
            let text = if i == n - 1 {
                "common common common common page".to_string()
            } else {
                format!("common page number {i} with filler words to dilute it")
            };
            conformance::page(u, "t", &text, &[])
        })
        .collect();
    for chunk in items.chunks(100) {
        store
            .ingest(chunk, u64::MAX, engines::frontier::Links::Admit)
            .await
            .expect("ingest");
    }
    let search = |offset: u64| {
        let store = &store;
        async move {
            store
                .search(&engines::SearchQuery {
                    terms: vec!["common".into()],
                    limit: 10,
                    offset,
                })
                .await
                .expect("search")
        }
    };
    let first = search(0).await;
    assert_eq!(first.total, n as u64);
    assert_eq!(first.hits.len(), 10);
    assert_eq!(first.hits[0].url, urls[n - 1], "{:?}", first.hits[0]);
    let second = search(10).await;
    assert_eq!(second.hits.len(), 10);
    assert!(second
        .hits
        .iter()
        .all(|h| first.hits.iter().all(|f| f.url != h.url)));
    // Deep pages rank further down: beyond the cap, the set grows to reach them.
    let deep = search(1_095).await;
    assert_eq!(deep.hits.len(), 5);
}

/// Two stores on one file are two api cells: a commit by either moves the other's generation;
/// reads (searches, stats) leave it as it was.
#[tokio::test]
async fn search_generation_moves_with_another_cells_commit() {
    let (_dir, path, a) = support::sqlite_store().await;
    let b = SqliteStore::open(&path).await.expect("open b");
    conformance::search_generation_moves_with_another_cells_commit(&a, &b).await;
    let g = a.search_generation().await.expect("read");
    let query = engines::SearchQuery {
        terms: vec!["quagga".into()],
        limit: 10,
        offset: 0,
    };
    assert_eq!(b.search(&query).await.expect("search").total, 1);
    b.stats(10).await.expect("stats");
    assert_eq!(a.search_generation().await.expect("read"), g);
}

/// A store a newer build has migrated further (a migration this build does not know) opens and
/// works: a build rolled back after an upgrade keeps running on its successor's schema.
#[tokio::test]
async fn a_store_a_newer_build_migrated_opens() {
    let (_dir, path, store) = support::sqlite_store().await;
    drop(store);
    let (_m, newer) = support::newer_migrator(
        "sqlite_store",
        "ALTER TABLE pages ADD COLUMN language TEXT NOT NULL DEFAULT '';\n\
         CREATE TABLE newer_things (id INTEGER PRIMARY KEY);\n",
    )
    .await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{path}"))
        .await
        .expect("pool");
    newer.run(&pool).await.expect("the newer build migrates");
    pool.close().await;
    let store = SqliteStore::open(&path)
        .await
        .expect("this build opens the newer build's store");
    conformance::frontier_invariant(&store).await;
}
