//! The conformance suite on the embedded engines.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use engines::sqlite::{SqliteQueue, SqliteStore};

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("store.db").to_str().expect("utf-8 path"))
        .await
        .expect("open store");
    (dir, store)
}

async fn queue() -> (tempfile::TempDir, SqliteQueue) {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(
        dir.path().join("queue.db").to_str().expect("utf-8 path"),
        Duration::from_millis(200),
        3,
    )
    .await
    .expect("open queue");
    (dir, queue)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers() {
    let (_d, s) = store().await;
    conformance::concurrent_writers(Arc::new(s)).await;
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
    let (_d, q) = queue().await;
    conformance::queue_basics(&q).await;
}

#[tokio::test]
async fn lease_expiry_redelivers() {
    let (_d, q) = queue().await;
    conformance::lease_expiry_redelivers(&q).await;
}

#[tokio::test]
async fn dead_letters_after_limit() {
    let (_d, q) = queue().await;
    conformance::dead_letters_after_limit(&q).await;
}

#[tokio::test]
async fn retry_redelivers() {
    let (_d, q) = queue().await;
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
async fn ledger_permits_lapse() {
    let (_d, s) = store().await;
    conformance::politeness::ledger_permits_lapse(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_concurrent_askers() {
    // Three stores on one file: three api cells of one machine.
    let (dir, a) = store().await;
    let path = dir.path().join("store.db");
    let path = path.to_str().expect("utf-8");
    let b = SqliteStore::open(path).await.expect("open b");
    let c = SqliteStore::open(path).await.expect("open c");
    conformance::politeness::ledger_concurrent_askers(vec![Arc::new(a), Arc::new(b), Arc::new(c)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publisher_claims_do_not_overlap_and_expire() {
    use engines::{CrawlSpec, Store};
    let (dir, a) = store().await;
    let path = dir.path().join("store.db");
    let path = path.to_str().expect("utf-8");
    let b: Arc<dyn Store> = Arc::new(SqliteStore::open(path).await.expect("open b"));
    let a: Arc<dyn Store> = Arc::new(a);
    conformance::politeness::publisher_claims_do_not_overlap(a.clone(), b.clone()).await;
    // A claim whose api died: claimed, never marked; once it expires another api takes it.
    let crawl = a
        .create_crawl(CrawlSpec {
            max_depth: None,
            max_pages: None,
        })
        .await
        .expect("crawl");
    a.admit_seeds(crawl, &[conformance::cand("http://died.test/")], 10)
        .await
        .expect("seed");
    assert_eq!(a.unpublished(10).await.expect("claim").len(), 1);
    assert!(b.unpublished(10).await.expect("claim").is_empty());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite:{path}"))
        .await
        .expect("side connection");
    sqlx::query("UPDATE frontier SET claimed_until_ms = claimed_until_ms - ?")
        .bind(engines::PUBLISH_CLAIM.as_millis() as i64 + 1)
        .execute(&mut conn)
        .await
        .expect("age the claim");
    let taken = b.unpublished(10).await.expect("claim");
    assert_eq!(taken.len(), 1, "the expired claim is taken over");
    assert_eq!(taken[0].url, "http://died.test/");
}

#[tokio::test]
async fn defer_spends_no_delivery() {
    let (_d, q) = queue().await;
    conformance::politeness::defer_spends_no_delivery(&q).await;
}
