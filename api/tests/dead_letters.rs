//! A job that makes its crawler fail every time (here: taken and never acknowledged, as by a
//! crawler that crashes on it) ends in the dead-letter queue after the configured number of
//! deliveries, and the api records it in the frontier as failed with the reason. On the embedded
//! queue and on RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use api::{ApiConfig, AppState};
use engines::rabbitmq::{AmqpOptions, AmqpQueue};
use engines::sqlite::{SqliteQueue, SqliteStore};
use engines::{CrawlSpec, JobQueue, Store};
use tokio_util::sync::CancellationToken;

const MAX_DELIVERIES: u32 = 3;

async fn poison_job_is_dead_lettered_and_failed(queue: Arc<dyn JobQueue>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Arc::new(
        SqliteStore::open(dir.path().join("s.db").to_str().expect("utf-8"))
            .await
            .expect("store"),
    );
    let store: Arc<dyn Store> = sqlite.clone();
    let url = "http://poison.test/";
    let crawl = store
        .create_crawl(CrawlSpec {
            max_depth: None,
            max_pages: None,
        })
        .await
        .expect("crawl");
    store
        .admit_seeds(
            crawl,
            &[engines::Candidate {
                url: url.into(),
                host: "poison.test".into(),
            }],
            100,
        )
        .await
        .expect("admit");
    let verifier = Arc::new(control::Verifier::new(
        control::ClusterKey::generate(),
        Duration::from_secs(30),
    ));
    let state = AppState::new(
        ApiConfig::default(),
        store.clone(),
        sqlite,
        queue.clone(),
        verifier,
    );
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(api::publisher::run(
        state.clone(),
        "http://127.0.0.1:1".into(),
        stop.clone(),
    ));
    state.frontier_grew.notify_one();

    // The "crawler": takes the job and never acknowledges it, every time.
    let mut deliveries = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for d in queue.lease(1).await.unwrap_or_default() {
            deliveries.push(d.deliveries);
        }
        if let Some((state, reason)) = store.frontier_state(url).await.expect("state") {
            if state == "failed" {
                let reason = reason.unwrap_or_default();
                assert!(reason.contains("dead-lettered"), "{reason}");
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not dead-lettered; deliveries so far {deliveries:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deliveries, (1..=MAX_DELIVERIES).collect::<Vec<_>>());
    let stats = store.stats(10).await.expect("stats");
    assert!(stats.frontier.drained());
    assert_eq!(stats.frontier.failed, 1);
    stop.cancel();
    publisher.await.expect("publisher");
}

#[tokio::test]
async fn on_the_embedded_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = SqliteQueue::open(
        dir.path().join("q.db").to_str().expect("utf-8"),
        Duration::from_millis(200),
        MAX_DELIVERIES,
    )
    .await
    .expect("queue");
    poison_job_is_dead_lettered_and_failed(Arc::new(queue)).await;
}

#[tokio::test]
async fn on_rabbitmq() {
    let url = std::env::var("AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut options = AmqpOptions::new(1, MAX_DELIVERIES);
    options.lease = Some(Duration::from_millis(200));
    let name = format!("homeostat.api-test.poison.{}", std::process::id());
    let queue = AmqpQueue::connect_with(&url, &name, options)
        .await
        .expect("RabbitMQ answers (run scripts/engines.sh start)");
    poison_job_is_dead_lettered_and_failed(Arc::new(queue)).await;
    engines::rabbitmq::delete_queues(&url, &name)
        .await
        .expect("deleting the test's queues");
}
