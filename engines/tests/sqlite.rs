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
