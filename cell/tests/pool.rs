//! The server pool end to end with the `local` provider: the health checkers grow the crawlers
//! to their minimum, the factory asks the purse, powers pool machines on, each boots a blank
//! `cell boot` that redeems its one-time token, becomes a crawler and crawls; the cap holds the
//! third machine back; stopping the organism powers every machine off and closes its spend.

mod support;

use std::time::Duration;

use engines::pool::{PoolLedger, ServerState};
use support::{infra_toml, serve_web, Organism, THREE_LOCAL_MACHINES};
use synthweb::WebSpec;

/// Two machines' worth an hour.
const BUDGET: &str = "per_hour = 1.00\nper_month = 100.00\n";

/// The processes on this machine whose command line names a pool cell or a boot.
fn pool_processes(dir: &std::path::Path) -> Vec<u32> {
    let marker = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.contains(" boot ") && cmd.contains("--hostname box-"))
                || (cmd.contains("--cell-id pool-") && cmd.contains(&marker))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_machines_join_crawl_and_are_powered_off_with_the_organism() {
    let web = serve_web(WebSpec {
        seed: 21,
        pages: 120,
        hosts: 4,
        latency: Duration::ZERO,
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pool.toml"), THREE_LOCAL_MACHINES).expect("pool.toml");
    std::fs::write(dir.path().join("budget.toml"), BUDGET).expect("budget.toml");
    let extra = r#"
[roles.crawler]
min = 2
max = 4

[pool]
file = "pool.toml"
budget = "budget.toml"
roles = ["crawler"]
boot_timeout_secs = 60
backoff_secs = 0.5
"#;
    let boot_marker = dir.path().to_path_buf();
    let mut org = Organism::up(&infra_toml(dir.path(), &web, 200.0, extra), dir).await;
    let store = org.data_dir().join("store.db");
    let ledger = PoolLedger::open_sqlite(store.to_str().expect("utf-8"))
        .await
        .expect("the organism's pool inventory");

    // Two machines join as crawlers; the third is held back by the hourly cap.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let joined = loop {
        let servers = ledger.servers().await.expect("servers");
        let joined: Vec<_> = servers
            .iter()
            .filter(|s| s.state == ServerState::Joined)
            .cloned()
            .collect();
        if joined.len() == 2 {
            break joined;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "two pool machines did not join within 90 s: {servers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let servers = ledger.servers().await.expect("servers");
    assert_eq!(
        servers.iter().filter(|s| s.state.spends()).count(),
        2,
        "the cap allows two machines: {servers:#?}"
    );
    let crawlers = org.cells_of("crawler").await;
    for s in &joined {
        assert_eq!(s.role.as_deref(), Some("crawler"));
        let cell = s.cell_id.clone().expect("a joined server names its cell");
        assert!(
            crawlers.iter().any(|c| c.cell_id == cell),
            "{cell} is not a live crawler: {crawlers:?}"
        );
        let history = ledger.transitions(&s.name).await.expect("history");
        let path: Vec<&str> = history.iter().map(|t| t.to.as_str()).collect();
        assert_eq!(path.first(), Some(&"powering-on"), "{history:#?}");
        assert_eq!(path.last(), Some(&"joined"), "{history:#?}");
    }
    let lineage = ledger.lineage().await.expect("lineage");
    assert_eq!(lineage.len(), 2, "{lineage:?}");

    // A third machine would pass the hourly cap: the factory refuses, saying which cap.
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(org.data_dir().join("organism.json")).expect("organism.json"),
    )
    .expect("organism.json is JSON");
    let factory = file["factories"][0]
        .as_str()
        .expect("a factory")
        .to_string();
    let client = control::ControlClient::new(control::Signer::new(support::test_key(), "test"));
    let reply: serde_json::Value = client
        .send(
            &factory,
            "/control/replace",
            protocol::control::ReplaceRequest::KIND,
            &protocol::control::ReplaceRequest {
                request_key: "grow:crawler:test".into(),
                role: "crawler".into(),
                reason: "a test asks for a third machine".into(),
                parent: None,
            },
        )
        .await
        .expect("the factory answers");
    assert_eq!(reply["started"], false, "{reply}");
    let refused = reply["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("hourly cap"), "{reply}");
    assert!(refused.contains("1.00 committed"), "{reply}");

    // A join token already used, or made up, lets nobody in.
    let plain = reqwest::Client::new();
    for token in ["abcdef.0123456789abcdef", "not-a-token", ""] {
        let resp = plain
            .post(format!("{factory}/join"))
            .json(&serde_json::json!({ "v": 1, "token": token }))
            .send()
            .await
            .expect("POST /join");
        assert_eq!(resp.status(), 401, "token {token:?}");
    }

    // The pool crawlers crawl: stop the local ones' share by crawling now; every page ends.
    org.crawl(&web.web.seeds()).await;
    let stats = org.wait_drained(Duration::from_secs(120), |_| {}).await;
    assert!(stats.frontier.crawled > 0);

    // The organism's directory outlives it: the ledger is read after the stop.
    let _kept = std::mem::replace(&mut org.dir, tempfile::tempdir().expect("tempdir"));
    org.stop().await;
    // Every machine is off, its spend closed; no machine process is left.
    let servers = ledger.servers().await.expect("servers");
    assert!(
        servers.iter().all(|s| !s.state.spends()),
        "machines still spending after the organism stopped: {servers:#?}"
    );
    let rows = ledger.spend_rows().await.expect("spend");
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let end = r.ended_at_ms.expect("closed");
        assert_eq!(
            r.amount_micros,
            Some(engines::pool::accrue(
                r.hourly_cost_micros,
                r.started_at_ms,
                end
            ))
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = pool_processes(&boot_marker);
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool machine processes left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
