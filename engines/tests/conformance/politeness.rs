//! The host ledger, the publisher's claims and deferred jobs: the same suite on every engine.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use engines::politeness::{HostBlock, HostLedger, PermitAnswer, PermitAsk, PermitRequest};
use engines::{JobQueue, Store};
use protocol::CrawlJob;

use super::cand;

fn ask(host: &str, gap_ms: i64, concurrency: u32, horizon_ms: i64, hold_ms: i64) -> PermitAsk {
    PermitAsk {
        host: host.into(),
        gap_ms,
        concurrency,
        horizon_ms,
        hold_ms,
        lease_ms: 0,
    }
}

fn asks(list: Vec<PermitAsk>) -> PermitRequest {
    PermitRequest {
        asks: list,
        ..PermitRequest::default()
    }
}

fn granted(a: &PermitAnswer) -> Option<(i64, i64)> {
    match a {
        PermitAnswer::Granted {
            permit, wait_ms, ..
        } => Some((*permit, *wait_ms)),
        PermitAnswer::NotBefore { .. } => None,
    }
}

/// Starts granted in one request are spaced by the gap; the horizon, the concurrency limit and a
/// block refuse with a time; a release frees a slot; hosts are independent.
pub async fn ledger_spacing_concurrency_and_blocks(ledger: &dyn HostLedger) {
    let reply = ledger
        .permits(&asks(vec![
            ask("a.test", 1_000, 3, 10_000, 60_000),
            ask("a.test", 1_000, 3, 10_000, 60_000),
            ask("a.test", 1_000, 3, 10_000, 60_000),
            ask("a.test", 1_000, 3, 10_000, 60_000),
            ask("b.test", 1_000, 3, 10_000, 60_000),
        ]))
        .await
        .expect("permits");
    let a: Vec<Option<(i64, i64)>> = reply.answers.iter().map(granted).collect();
    let waits: Vec<i64> = a[..3].iter().map(|g| g.expect("granted").1).collect();
    assert_eq!(waits, vec![0, 1_000, 2_000], "{reply:?}");
    assert!(a[3].is_none(), "a fourth permit is over the concurrency");
    assert_eq!(a[4].map(|g| g.1), Some(0), "another host is not held back");
    let ids: HashSet<i64> = a.iter().flatten().map(|g| g.0).collect();
    assert_eq!(ids.len(), 4, "every permit has its own id");

    // Releasing one frees a slot; the new start keeps the gap from the latest.
    let reply = ledger
        .permits(&PermitRequest {
            releases: vec![a[0].expect("granted").0],
            asks: vec![ask("a.test", 1_000, 3, 10_000, 60_000)],
            ..PermitRequest::default()
        })
        .await
        .expect("permits");
    let (_, wait) = granted(&reply.answers[0]).expect("a slot was freed");
    assert!((2_500..=3_000).contains(&wait), "{wait}");

    // Beyond the horizon: not before the host is due.
    let reply = ledger
        .permits(&asks(vec![ask("b.test", 5_000, 3, 1_000, 60_000)]))
        .await
        .expect("permits");
    match reply.answers[0] {
        PermitAnswer::NotBefore { wait_ms } => assert!((4_000..=5_000).contains(&wait_ms)),
        other => panic!("{other:?}"),
    }

    // A block (Retry-After) holds the host whatever the ask.
    let reply = ledger
        .permits(&PermitRequest {
            blocks: vec![HostBlock {
                host: "c.test".into(),
                for_ms: 5_000,
            }],
            asks: vec![ask("c.test", 0, 3, 1_000, 60_000)],
            ..PermitRequest::default()
        })
        .await
        .expect("permits");
    match reply.answers[0] {
        PermitAnswer::NotBefore { wait_ms } => assert!((4_000..=5_000).contains(&wait_ms)),
        other => panic!("{other:?}"),
    }
}

/// A permit not released by its expiry (its crawler died) lapses.
pub async fn ledger_permits_lapse(ledger: &dyn HostLedger) {
    let one = || asks(vec![ask("lapse.test", 0, 1, 0, 200)]);
    let first = ledger.permits(&one()).await.expect("permits");
    assert!(granted(&first.answers[0]).is_some());
    let second = ledger.permits(&one()).await.expect("permits");
    assert!(
        granted(&second.answers[0]).is_none(),
        "the only slot is held"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = ledger.permits(&one()).await.expect("permits");
    assert!(
        granted(&third.answers[0]).is_some(),
        "the held permit lapsed"
    );
}

/// Leases take the lanes of a host's lattice: starts a gap apart, a lane each, no more lanes than
/// the concurrency; a released lane is leased again on its own ticks; a one-shot ask waits for
/// the last tick leased; what was leased survives into the next request (it is kept, not
/// recomputed).
pub async fn ledger_leases_take_lanes(ledger: &dyn HostLedger) {
    let lease = |host: &str| PermitAsk {
        lease_ms: 2_000,
        ..ask(host, 100, 3, 10_000, 60_000)
    };
    let reply = ledger
        .permits(&asks(vec![
            lease("lease.test"),
            lease("lease.test"),
            lease("lease.test"),
            lease("lease.test"),
        ]))
        .await
        .expect("permits");
    let mut got = Vec::new();
    for a in &reply.answers[..3] {
        match *a {
            PermitAnswer::Granted {
                permit,
                wait_ms,
                every_ms,
                for_ms,
            } => got.push((permit, wait_ms, every_ms, for_ms)),
            other => panic!("{other:?}"),
        }
    }
    let shape: Vec<(i64, i64, i64)> = got.iter().map(|g| (g.1, g.2, g.3)).collect();
    assert_eq!(
        shape,
        vec![(0, 300, 1_800), (100, 300, 1_800), (200, 300, 1_800)]
    );
    assert!(
        matches!(reply.answers[3], PermitAnswer::NotBefore { .. }),
        "three lanes: {reply:?}"
    );
    // The middle lane released: the next lease is on it, at its next tick.
    let reply = ledger
        .permits(&PermitRequest {
            releases: vec![got[1].0],
            asks: vec![lease("lease.test")],
            ..PermitRequest::default()
        })
        .await
        .expect("permits");
    match reply.answers[0] {
        PermitAnswer::Granted {
            wait_ms, every_ms, ..
        } => {
            assert_eq!(every_ms, 300);
            // Lane 1's ticks are 100, 400, 700 ... ms after the first lease's start.
            assert!((0..=400).contains(&wait_ms), "{wait_ms}");
        }
        other => panic!("{other:?}"),
    }
    // A one-shot ask waits for the last tick leased (about 2 s away), beyond a 1 s horizon.
    let reply = ledger
        .permits(&PermitRequest {
            releases: vec![got[0].0],
            asks: vec![ask("lease.test", 100, 3, 1_000, 60_000)],
            ..PermitRequest::default()
        })
        .await
        .expect("permits");
    match reply.answers[0] {
        PermitAnswer::NotBefore { wait_ms } => {
            assert!((1_000..=2_300).contains(&wait_ms), "{wait_ms}")
        }
        other => panic!("{other:?}"),
    }
}

/// Many askers at once (as many crawler cells through several apis): never more permits than
/// the concurrency, never more starts inside the horizon than the gap allows.
pub async fn ledger_concurrent_askers(ledgers: Vec<Arc<dyn HostLedger>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, ledger) in ledgers.iter().cycle().take(16).enumerate() {
        let ledger = ledger.clone();
        tasks.spawn(async move {
            let mut grants = (0, 0);
            for _ in 0..5 {
                let reply = ledger
                    .permits(&asks(vec![
                        // Concurrency 2, no gap, held for a minute.
                        ask("busy.test", 0, 2, 60_000, 60_000),
                        // A 10 s gap inside a 25 s horizon: three starts at most.
                        ask("slow.test", 10_000, 100, 25_000, 60_000),
                    ]))
                    .await
                    .unwrap_or_else(|e| panic!("asker {i}: {e}"));
                grants.0 += usize::from(granted(&reply.answers[0]).is_some());
                grants.1 += usize::from(granted(&reply.answers[1]).is_some());
            }
            grants
        });
    }
    let (mut busy, mut slow) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (b, s) = done.expect("asker");
        busy += b;
        slow += s;
    }
    assert_eq!(busy, 2, "permits over the concurrency limit");
    assert_eq!(slow, 3, "starts closer than the gap");
}

/// Two publishers claim disjoint entries; together they claim every pending entry once.
pub async fn publisher_claims_do_not_overlap(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let crawl = a.create_crawl(super::UNLIMITED).await.expect("crawl");
    let seeds: Vec<_> = (0..200)
        .map(|i| cand(&format!("http://claim{}.test/{i}", i % 7)))
        .collect();
    a.admit_seeds(crawl, &seeds, 1_000).await.expect("seeds");
    let mut seen: Vec<String> = Vec::new();
    loop {
        let (x, y) = tokio::join!(a.unpublished(30), b.unpublished(30));
        let (x, y) = (x.expect("claim a"), y.expect("claim b"));
        if x.is_empty() && y.is_empty() {
            break;
        }
        seen.extend(x.into_iter().map(|u| u.url));
        seen.extend(y.into_iter().map(|u| u.url));
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 200, "an entry was claimed twice or never");
    assert_eq!(unique.len(), 200);
    // Claimed and not marked: nobody else takes them while the claims last.
    assert!(a.unpublished(1_000).await.expect("claim").is_empty());
    a.mark_published(&seen).await.expect("mark");
}

/// Jobs for the deferral suite.
fn job(i: usize) -> CrawlJob {
    CrawlJob::new(format!("http://defer.test/{i}"), 0, "http://127.0.0.1:1")
}

/// A deferred job comes back not before its time, without its delivery counted: deferred more
/// often than the delivery limit (3 on the queue under test), it is still not dead-lettered.
pub async fn defer_spends_no_delivery(queue: &dyn JobQueue) {
    queue.publish(&[job(1)]).await.expect("publish");
    let mut d = super::wait_lease_pub(queue).await;
    assert_eq!(d.deliveries, 1);
    for round in 0..5 {
        queue
            .defer(d.tag, Duration::from_millis(300))
            .await
            .expect("defer");
        let started = tokio::time::Instant::now();
        assert!(
            queue.lease(10).await.expect("lease").is_empty(),
            "round {round}: delivered before its time"
        );
        d = super::wait_lease_pub(queue).await;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "round {round}: back after {:?}",
            started.elapsed()
        );
        assert_eq!(d.deliveries, 1, "round {round}: the wait spent a delivery");
        assert_eq!(d.job.as_ref().expect("job").url, "http://defer.test/1");
    }
    // At once, too.
    queue.defer(d.tag, Duration::ZERO).await.expect("defer");
    let d = super::wait_lease_pub(queue).await;
    assert_eq!(d.deliveries, 1);
    // A retry still counts.
    queue
        .retry(d.tag, Duration::from_millis(10))
        .await
        .expect("retry");
    let d = super::wait_lease_pub(queue).await;
    assert_eq!(d.deliveries, 2);
    queue.ack(&[d.tag]).await.expect("ack");
    assert_eq!(queue.lease_dead(10).await.expect("dead").len(), 0);
}

/// A claim whose api died (claimed, never marked) is taken over by another api once it expires:
/// `age` moves the claims back by [`engines::PUBLISH_CLAIM`].
pub async fn expired_claims_are_taken_over<F, Fut>(a: Arc<dyn Store>, b: Arc<dyn Store>, age: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let crawl = a.create_crawl(super::UNLIMITED).await.expect("crawl");
    a.admit_seeds(crawl, &[cand("http://died.test/")], 10)
        .await
        .expect("seed");
    assert_eq!(a.unpublished(10).await.expect("claim").len(), 1);
    assert!(b.unpublished(10).await.expect("claim").is_empty());
    age().await;
    let taken = b.unpublished(10).await.expect("claim");
    assert_eq!(taken.len(), 1, "the expired claim is taken over");
    assert_eq!(taken[0].url, "http://died.test/");
}
