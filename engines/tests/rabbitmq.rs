//! The conformance suite on the RabbitMQ queue, over a real broker, plus what only a broker
//! brings: publisher confirms with mandatory routing, malformed bodies from other publishers,
//! consumer shutdown, and a broker restart.
//!
//! Each test declares its own uniquely named queues (`homeostat_test_<pid>_<n>` and its `.dead`)
//! and deletes them at the end. The broker is `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); a missing broker fails the tests: run
//! `scripts/engines.sh start`.

mod conformance;
mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use engines::rabbitmq::{AmqpOptions, AmqpQueue};
use engines::{EngineError, JobQueue};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use protocol::CrawlJob;
use tokio::sync::RwLock;

/// Tests share the broker; the restart test takes it for itself.
static BROKER: RwLock<()> = RwLock::const_new(());
static NEXT_QUEUE: AtomicU32 = AtomicU32::new(0);

fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

fn queue_name() -> String {
    format!(
        "homeostat_test_{}_{}",
        std::process::id(),
        NEXT_QUEUE.fetch_add(1, Ordering::SeqCst)
    )
}

/// The options the conformance suite needs: 3 deliveries, a short lease.
fn options() -> AmqpOptions {
    AmqpOptions {
        lease: Some(Duration::from_millis(200)),
        ..AmqpOptions::new(16, 3)
    }
}

async fn queue_with(name: &str, options: AmqpOptions) -> AmqpQueue {
    match AmqpQueue::connect_with(&amqp_url(), name, options).await {
        Ok(q) => q,
        Err(e) => panic!(
            "RabbitMQ is not reachable at AMQP_URL or the default \
             amqp://guest:guest@127.0.0.1:5672/%2f ({e}); run `scripts/engines.sh start`"
        ),
    }
}

/// A side connection, as another program on the broker.
async fn side_connection() -> Connection {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Connection::connect(&amqp_url(), props)
        .await
        .expect("side connection to RabbitMQ")
}

async fn delete_queues(name: &str) {
    engines::rabbitmq::delete_queues(&amqp_url(), name)
        .await
        .expect("deleting the test's queues");
}

macro_rules! conformance_test {
    ($name:ident, $($test:ident)::+, $options:expr) => {
        #[tokio::test]
        async fn $name() {
            let _broker = BROKER.read().await;
            let name = queue_name();
            let q = queue_with(&name, $options).await;
            conformance::$($test)::+(&q).await;
            q.close().await;
            delete_queues(&name).await;
        }
    };
}

conformance_test!(queue_basics, queue_basics, options());
conformance_test!(lease_expiry_redelivers, lease_expiry_redelivers, options());
conformance_test!(
    dead_letters_after_limit,
    dead_letters_after_limit,
    options()
);
conformance_test!(retry_redelivers, retry_redelivers, options());
conformance_test!(
    defer_spends_no_delivery,
    politeness::defer_spends_no_delivery,
    options()
);
conformance_test!(
    classic_defer_spends_no_delivery,
    politeness::defer_spends_no_delivery,
    classic()
);

/// Classic durable queues (for brokers without quorum queues): the queue counts deliveries and
/// dead-letters by itself, and passes the same suite.
fn classic() -> AmqpOptions {
    AmqpOptions {
        quorum: false,
        ..options()
    }
}
conformance_test!(classic_queue_basics, queue_basics, classic());
conformance_test!(
    classic_lease_expiry_redelivers,
    lease_expiry_redelivers,
    classic()
);
conformance_test!(
    classic_dead_letters_after_limit,
    dead_letters_after_limit,
    classic()
);
conformance_test!(classic_retry_redelivers, retry_redelivers, classic());

fn job(i: usize) -> CrawlJob {
    CrawlJob::new(format!("http://amqp.test/{i}"), 1, "http://127.0.0.1:1")
}

async fn lease_one(q: &AmqpQueue) -> engines::Delivery {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(d) = q.lease(1).await.expect("lease").pop() {
            return d;
        }
        assert!(Instant::now() < deadline, "no delivery within 10 s");
    }
}

/// The AMQP form of lease expiry: without a client-side lease a job stays leased until its
/// consumer goes away; `abandon_leases` (a crawler shutting down) gives it back at once, counted,
/// and its old tag is stale.
/// A delayed job waits in a delay queue that the consuming cells move back when it is due. The
/// cell that deferred it stops before then (its movers were holding it): another cell's movers
/// deliver it, not before the delay, and the wait cost no delivery.
#[tokio::test]
async fn a_delayed_job_outlives_the_cell_that_deferred_it() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let first = queue_with(&name, options()).await;
    first.publish(&[job(1)]).await.expect("publish");
    let d = lease_one(&first).await;
    let deferred_at = Instant::now();
    first
        .defer(d.tag, Duration::from_millis(2_000))
        .await
        .expect("defer");
    // Let this cell's mover take the delayed job and hold it, then stop the cell.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.abandon_leases().await.expect("abandon");
    first.close().await;
    drop(first);

    let second = queue_with(&name, options()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        if let Some(d) = second.lease(1).await.expect("lease").pop() {
            break d;
        }
        assert!(Instant::now() < deadline, "the delayed job never came back");
    };
    assert!(
        deferred_at.elapsed() >= Duration::from_millis(2_000),
        "back after {:?}, before its delay",
        deferred_at.elapsed()
    );
    assert_eq!(again.deliveries, 1, "waiting cost no delivery");
    second.ack(&[again.tag]).await.expect("ack");
    second.close().await;
    delete_queues(&name).await;
}

#[tokio::test]
async fn abandon_leases_redelivers() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let q = queue_with(
        &name,
        AmqpOptions {
            lease: None,
            ..options()
        },
    )
    .await;
    q.publish(&[job(1), job(2)]).await.expect("publish");
    let first = lease_one(&q).await;
    assert_eq!(first.deliveries, 1);
    // Without a lease timeout nothing comes back while it is held.
    let mut others = q.lease(10).await.expect("lease");
    others.extend(q.lease(10).await.expect("lease"));
    assert_eq!(others.len(), 1, "only the other job");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(q.lease(10).await.expect("lease").is_empty());
    assert_eq!(q.depth().await.expect("depth").leased, 2);

    q.abandon_leases().await.expect("abandon");
    q.ack(&[first.tag]).await.expect("a stale ack is a no-op");
    let mut again = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while again.len() < 2 {
        again.extend(q.lease(10).await.expect("lease"));
        assert!(
            Instant::now() < deadline,
            "abandoned jobs did not come back"
        );
    }
    assert!(again.iter().all(|d| d.deliveries == 2), "{again:?}");
    let tags: Vec<_> = again.iter().map(|d| d.tag).collect();
    q.ack(&tags).await.expect("ack");
    let depth = q.depth().await.expect("depth");
    assert_eq!((depth.ready, depth.leased, depth.dead), (0, 0, 0));
    q.close().await;
    delete_queues(&name).await;
}

/// Publishing is confirmed and mandatory: a job the broker cannot route is an error.
#[tokio::test]
async fn publishing_to_a_missing_queue_is_an_error() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let q = queue_with(&name, options()).await;
    q.publish(&[job(1)]).await.expect("confirmed publish");
    assert_eq!(q.depth().await.expect("depth").ready, 1);
    delete_queues(&name).await; // someone deletes the queue under us
    let err = q
        .publish(&[job(2), job(3)])
        .await
        .expect_err("unroutable jobs are refused");
    assert!(
        matches!(&err, EngineError::Queue(m) if m.contains("unroutable")),
        "{err}"
    );
    q.close().await;
    delete_queues(&name).await;
}

/// A publisher-only queue holds no jobs: only `lease` starts a consumer.
#[tokio::test]
async fn publisher_does_not_consume() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let publisher = queue_with(&name, options()).await;
    let crawler = queue_with(&name, options()).await;
    let jobs: Vec<CrawlJob> = (0..5).map(job).collect();
    publisher.publish(&jobs).await.expect("publish");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 5 {
        got.extend(crawler.lease(5).await.expect("lease"));
        assert!(Instant::now() < deadline, "crawler got {} of 5", got.len());
    }
    let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
    crawler.ack(&tags).await.expect("ack");
    publisher.close().await;
    crawler.close().await;
    delete_queues(&name).await;
}

/// Bytes that are not a job (from another program, an older version) come out as a delivery
/// whose job is an error, which the crawler dead-letters; nothing panics.
#[tokio::test]
async fn malformed_body_is_a_delivery_error() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let q = queue_with(&name, options()).await;
    let conn = side_connection().await;
    let channel = conn.create_channel().await.expect("channel");
    for body in [
        &b"{not json"[..],
        &b"\xff\xfe binary"[..],
        &br#"{"v":99,"url":"u","depth":0,"reply_to":""}"#[..],
    ] {
        channel
            .basic_publish(
                "",
                &name,
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("sent");
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 3 {
        got.extend(q.lease(10).await.expect("lease"));
        assert!(Instant::now() < deadline);
    }
    for d in &got {
        let err = d.job.as_ref().expect_err("not a job");
        assert!(!err.is_empty());
        q.dead_letter(d.tag, &format!("malformed job: {err}"))
            .await
            .expect("dead letter");
    }
    let mut dead = Vec::new();
    while dead.len() < 3 {
        dead.extend(q.lease_dead(10).await.expect("lease dead"));
        assert!(Instant::now() < deadline);
    }
    assert!(dead
        .iter()
        .all(|(_, reason)| reason.starts_with("malformed job")));
    let tags: Vec<_> = dead.iter().map(|(d, _)| d.tag).collect();
    q.ack_dead(&tags).await.expect("ack dead");
    let _ = conn.close(200, "done").await;
    q.close().await;
    delete_queues(&name).await;
}

/// `depth` counts ready jobs on the broker, jobs this queue holds, and dead letters.
#[tokio::test]
async fn depth_counts() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let q = queue_with(
        &name,
        AmqpOptions {
            lease: None,
            prefetch: 2,
            ..options()
        },
    )
    .await;
    let jobs: Vec<CrawlJob> = (0..6).map(job).collect();
    q.publish(&jobs).await.expect("publish");
    let mut leased = Vec::new();
    while leased.len() < 2 {
        leased.extend(q.lease(2).await.expect("lease"));
    }
    q.dead_letter(leased[0].tag, "poison")
        .await
        .expect("dead letter");
    let depth = q.depth().await.expect("depth");
    assert_eq!(depth.leased, 1);
    assert_eq!(depth.dead, 1);
    // The broker may have pushed up to `prefetch` more ahead of lease: not ready any more.
    assert!((2..=4).contains(&depth.ready), "{depth:?}");
    q.close().await;
    delete_queues(&name).await;
}

/// The queues are durable quorum queues with a delivery limit and dead-lettering: declaring them
/// again with exactly these arguments is accepted, as a classic queue it is refused.
#[tokio::test]
async fn declares_durable_quorum_queues() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let q = queue_with(&name, options()).await;
    let conn = side_connection().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(2));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert(
        "x-dead-letter-routing-key".into(),
        text(&format!("{name}.dead")),
    );
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(&name, durable, args)
        .await
        .expect("the same quorum queue");
    let mut classic = FieldTable::default();
    classic.insert("x-queue-type".into(), text("classic"));
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(&name, durable, classic)
        .await
        .expect_err("not a classic queue");
    let _ = conn.close(200, "done").await;
    q.close().await;
    delete_queues(&name).await;
}

/// The broker's dead letters say why: delivered too often. `lease` never blocks long.
#[tokio::test]
async fn dead_letter_reason_and_short_lease_wait() {
    let _broker = BROKER.read().await;
    let name = queue_name();
    let q = queue_with(&name, options()).await;
    let started = Instant::now();
    assert!(q.lease(10).await.expect("lease").is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    q.publish(&[job(7)]).await.expect("publish");
    for n in 1..=3 {
        assert_eq!(lease_one(&q).await.deliveries, n);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let (dead, reason) = loop {
        if let Some(d) = q.lease_dead(1).await.expect("lease dead").pop() {
            break d;
        }
        assert!(
            q.lease(1).await.expect("lease").is_empty(),
            "no fourth delivery"
        );
        assert!(Instant::now() < deadline, "nothing dead-lettered");
    };
    assert_eq!(reason, "delivered 3 times without an acknowledgement");
    assert_eq!(dead.job.expect("job").url, "http://amqp.test/7");
    q.ack_dead(&[dead.tag]).await.expect("ack dead");
    q.close().await;
    delete_queues(&name).await;
}

/// Connecting to a broker that is not there fails quickly with an error.
#[tokio::test]
async fn missing_broker_is_an_error() {
    let started = Instant::now();
    let err = AmqpQueue::connect("amqp://guest:guest@127.0.0.1:1/%2f", "nowhere", 4, 3)
        .await
        .err()
        .expect("no broker on port 1");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
}

/// The queue keeps working across a broker restart without being recreated: jobs published
/// before the restart survive it (durable queue, persistent messages), a lease held across it
/// is delivered again, its stale tag acks as a no-op, and publish + lease work afterwards.
#[tokio::test]
async fn survives_a_broker_restart() {
    let _broker = BROKER.write().await;
    let name = queue_name();
    let q = queue_with(
        &name,
        AmqpOptions {
            lease: None,
            ..options()
        },
    )
    .await;
    q.publish(&[job(1), job(2)]).await.expect("publish");
    let held = lease_one(&q).await;

    let q = std::sync::Arc::new(q);
    // A crawler keeps leasing while the broker restarts: every call returns quickly (an answer
    // or an error), none hangs.
    let probing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = {
        let (q, probing) = (q.clone(), probing.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
            while probing.load(Ordering::SeqCst) {
                let t = Instant::now();
                match q.lease(0).await.and(q.depth().await) {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, slowest)
        })
    };
    let started = Instant::now();
    support::engines_script("restart-rabbitmq").await;
    eprintln!("broker restarted in {:?}", started.elapsed());
    probing.store(false, Ordering::SeqCst);
    let (ok, failed, slowest) = probe.await.expect("probe");
    eprintln!("during the restart: {ok} calls answered, {failed} failed, slowest {slowest:?}");
    assert!(failed > 0, "the restart was noticed");
    assert!(
        slowest < Duration::from_secs(2),
        "a call hung for {slowest:?}"
    );
    // Calls fail (or wait, for publish) until the background task has reconnected.
    let again = [job(3)];
    let ((), failures) =
        support::until_ok("no reconnection", started, Duration::from_secs(90), || {
            q.publish(&again)
        })
        .await;
    eprintln!(
        "publishing again {:?} after the restart began ({failures} failed attempt(s))",
        started.elapsed()
    );
    q.ack(&[held.tag])
        .await
        .expect("a stale tag acks as a no-op");
    let mut urls = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while urls.len() < 3 {
        match q.lease(10).await {
            Ok(batch) => {
                for d in batch {
                    urls.push(d.job.expect("job").url);
                    q.ack(&[d.tag]).await.expect("ack");
                }
            }
            Err(e) => eprintln!("lease during reconnection: {e}"),
        }
        assert!(Instant::now() < deadline, "got {urls:?}");
    }
    urls.sort();
    let q = std::sync::Arc::try_unwrap(q).unwrap_or_else(|_| panic!("probe finished"));
    assert_eq!(
        urls,
        vec![
            "http://amqp.test/1".to_string(),
            "http://amqp.test/2".to_string(),
            "http://amqp.test/3".to_string()
        ]
    );
    q.close().await;
    delete_queues(&name).await;
}
