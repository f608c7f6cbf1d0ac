//! The purse across two factory processes on PostgreSQL: an organism on the cluster engines runs
//! its two factories (separate `cell` processes sharing the inventory and the ledger); 100
//! requests for a pool machine arrive at once, half at each factory, against an hourly cap that
//! allows 10 machines. Admission reserves the money in one transaction, so together they never
//! overshoot: at most 10 machines spend at any moment (sampled while it happens, and replayed
//! from the inventory's transitions afterwards), every request is either admitted or refused
//! saying which cap, and once the organism stops every period is closed and the ledger adds up
//! to the micro.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engines::pool::{PoolLedger, ServerState};
use support::{
    amqp_url, delete_queues, drop_database, fresh_database, infra_toml, serve_web, with_queue_name,
    Organism,
};
use synthweb::WebSpec;

const SERVERS: usize = 14;
const CAP_MACHINES: usize = 10;
const REQUESTS: usize = 100;

fn pool_toml() -> String {
    (1..=SERVERS)
        .map(|n| {
            format!("[[server]]\nname = \"box-{n:02}\"\nprovider = \"local\"\nhourly_cost = 1.00\n")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replay the transitions: the most servers in a spending state at once.
fn peak_from_history(history: &[engines::pool::Transition]) -> usize {
    let mut ordered: Vec<_> = history.iter().collect();
    ordered.sort_by_key(|t| t.at_ms);
    let mut state: BTreeMap<&str, bool> = BTreeMap::new();
    let mut peak = 0;
    for t in ordered {
        let spends = ServerState::parse(&t.to).is_some_and(|s| s.spends());
        state.insert(t.server.as_str(), spends);
        peak = peak.max(state.values().filter(|s| **s).count());
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_factories_never_overshoot_the_cap() {
    let web = serve_web(WebSpec {
        seed: 5,
        pages: 20,
        hosts: 2,
        latency: Duration::ZERO,
    })
    .await;
    let (db_name, db_url) = fresh_database("homeostat_cap").await;
    let queue_name = format!("homeostat.cap.{}.{db_name}", std::process::id());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pool.toml"), pool_toml()).expect("pool.toml");
    std::fs::write(
        dir.path().join("budget.toml"),
        format!("per_hour = {CAP_MACHINES}.00\nper_month = 100000.00\n"),
    )
    .expect("budget.toml");
    let extra = format!(
        r#"
[engines]
database = "{db_url}"
queue = "{amqp}"

[roles.crawler]
min = 1
max = 200

[pool]
file = "pool.toml"
budget = "budget.toml"
roles = ["crawler"]
boot_timeout_secs = 120
"#,
        amqp = amqp_url()
    );
    let toml = with_queue_name(&infra_toml(dir.path(), &web, 60.0, &extra), &queue_name);
    let mut org = Organism::up(&toml, dir).await;
    let ledger = PoolLedger::connect_postgres(&db_url)
        .await
        .expect("the pool's inventory on PostgreSQL");
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(org.data_dir().join("organism.json")).expect("organism.json"),
    )
    .expect("organism.json is JSON");
    let factories: Vec<String> = file["factories"]
        .as_array()
        .expect("factories")
        .iter()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    assert_eq!(factories.len(), 2, "two factory processes: {factories:?}");
    let spending_before = ledger
        .servers()
        .await
        .expect("servers")
        .iter()
        .filter(|s| s.state.spends())
        .count();

    // Sample the inventory while the requests land.
    let peak_seen = Arc::new(AtomicUsize::new(0));
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (ledger, peak, stop) = (ledger.clone(), peak_seen.clone(), stop_sampling.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(rows) = ledger.servers().await {
                    let n = rows.iter().filter(|s| s.state.spends()).count();
                    peak.fetch_max(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // The subject is the cap, not latency: a hundred asks at once on a small shared machine may
    // take longer than a cell's one-second control deadline to be answered.
    let client = Arc::new(control::ControlClient::with_timeout(
        control::Signer::new(support::test_key(), "test"),
        Duration::from_secs(20),
    ));
    let asks = (0..REQUESTS).map(|n| {
        let (client, factory) = (client.clone(), factories[n % 2].clone());
        async move {
            let reply: serde_json::Value = client
                .send(
                    &factory,
                    "/control/replace",
                    protocol::control::ReplaceRequest::KIND,
                    &protocol::control::ReplaceRequest {
                        request_key: format!("grow:crawler:cap-test-{n}"),
                        role: "crawler".into(),
                        reason: "the cap test".into(),
                        parent: None,
                    },
                )
                .await
                .expect("the factory answers");
            reply
        }
    });
    let replies = futures::future::join_all(asks).await;
    let admitted = replies.iter().filter(|r| r["started"] == true).count();
    let refused: Vec<&str> = replies
        .iter()
        .filter_map(|r| r["refused"].as_str())
        .collect();
    assert_eq!(admitted + refused.len(), REQUESTS, "{replies:#?}");
    assert_eq!(
        admitted + spending_before,
        CAP_MACHINES,
        "the cap allows {CAP_MACHINES} machines ({spending_before} spent before): {replies:#?}"
    );
    assert!(
        refused.iter().all(|r| r.contains("hourly cap")),
        "every refusal names the cap: {refused:?}"
    );

    // Let the admitted machines boot and join while the sampler watches.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rows = ledger.servers().await.expect("servers");
        let joined = rows
            .iter()
            .filter(|s| s.state == ServerState::Joined)
            .count();
        if joined >= CAP_MACHINES.min(SERVERS) - 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the admitted machines did not join: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_sampling.cancel();
    sampler.await.expect("sampler");

    // The organism stops: both factories power their machines off and close their spend.
    let _kept = std::mem::replace(&mut org.dir, tempfile::tempdir().expect("tempdir"));
    org.stop().await;
    let rows = ledger.servers().await.expect("servers");
    assert!(
        rows.iter().all(|s| !s.state.spends()),
        "machines still spending after the organism stopped: {rows:#?}"
    );
    let mut history = Vec::new();
    for s in &rows {
        history.extend(ledger.transitions(&s.name).await.expect("history"));
    }
    let peak_replayed = peak_from_history(&history);
    let peak_sampled = peak_seen.load(Ordering::SeqCst);
    let spend = ledger.spend_rows().await.expect("spend rows");
    let mut total = 0;
    for r in &spend {
        let end = r.ended_at_ms.expect("every period is closed");
        let amount = engines::pool::accrue(r.hourly_cost_micros, r.started_at_ms, end);
        assert_eq!(r.amount_micros, Some(amount), "{r:?}");
        total += amount;
    }
    let now = control::now_ms();
    let summary = ledger
        .spend(
            engines::pool::Caps {
                per_hour: engines::pool::to_micros(CAP_MACHINES as f64),
                per_month: engines::pool::to_micros(100_000.0),
            },
            now,
            0,
        )
        .await
        .expect("spend summary");
    assert_eq!(summary.ledger_total, total, "the ledger adds up");
    eprintln!(
        "cap test: {REQUESTS} requests over 2 factories, {admitted} admitted, {} refused, \
         {spending_before} machine(s) before; peak spending machines: {peak_sampled} sampled, \
         {peak_replayed} replayed; {} periods, ledger total {} micros",
        refused.len(),
        spend.len(),
        summary.ledger_total
    );
    assert!(peak_sampled <= CAP_MACHINES, "peak {peak_sampled} sampled");
    assert!(
        peak_replayed <= CAP_MACHINES,
        "peak {peak_replayed} replayed"
    );
    assert_eq!(peak_replayed, CAP_MACHINES, "the cap was reached");
    drop_database(&db_name).await;
    delete_queues(&amqp_url(), &queue_name).await;
}
