//! More than one of everything, through the real `cell up`: two factories sharing their request
//! keys (a factory's death loses no request and starts nothing twice), a frozen cell fenced by
//! power-off before it is replaced (a fixed-address role takes its predecessor's address), no
//! process of an organism outliving it (SIGKILL of `cell up` itself, or of whatever started it
//! with `--die-with-parent`), and bad engine URLs in the environment refused with exit 64.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use engines::factory_ledger::FactoryLedger;
use protocol::control::CellsResponse;
use support::{infra_toml, serve_web, sigkill, Organism, Web};
use synthweb::WebSpec;

async fn web() -> Web {
    serve_web(WebSpec {
        seed: 77,
        pages: 300,
        hosts: 6,
        latency: Duration::from_millis(2),
    })
    .await
}

/// Every pid of the organism: its live cells (factories included) from the registry.
async fn all_pids(org: &Organism) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for role in ["api", "crawler", "frontdoor", "healthchecker", "factory"] {
        for c in org.cells_of(role).await {
            pids.extend(c.pid);
        }
    }
    pids
}

/// Poll until none of `pids` runs any more (zombies count as gone), up to `limit`.
async fn wait_all_gone(pids: &BTreeSet<u32>, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|p| factory::lease::start_time(*p).is_some())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "processes of the organism still run after {limit:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `role` has exactly `n` live cells.
async fn wait_count(org: &Organism, role: &str, n: usize, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let cells = org.cells_of(role).await;
        if cells.len() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{role}: {} cells, expected {n} within {limit:?}",
            cells.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL one factory under a crawling organism, then kill a crawler: the crawl is exact, the
/// crawler is replaced exactly once (one claim in the shared ledger, one child of the dead one),
/// and `cell up` restarts the factory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_factory_loses_nothing_and_starts_nothing_twice() {
    let web = web().await;
    let org = Organism::on(&web, 200.0, "").await;
    wait_count(&org, "factory", 2, Duration::from_secs(10)).await;
    let factories = org.cells_of("factory").await;
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;

    let dead_factory = factories[0].clone();
    sigkill(dead_factory.pid.expect("factory pid"));
    let victim = org.cells_of("crawler").await[0].clone();
    sigkill(victim.pid.expect("crawler pid"));
    let crawlers = org
        .wait_replaced(
            "crawler",
            2,
            std::slice::from_ref(&victim.cell_id),
            Duration::from_secs(30),
        )
        .await;
    let children: Vec<_> = crawlers
        .iter()
        .filter(|c| c.parent.as_deref() == Some(victim.cell_id.as_str()))
        .collect();
    assert_eq!(
        children.len(),
        1,
        "one replacement for one death: {crawlers:?}"
    );

    org.wait_drained(Duration::from_secs(120), |_| {}).await;
    let expected = web.web.expect(&seeds, None);
    support::assert_exact(&web.web, &org.indexed().await, &expected);

    // Exactly one claim for the death, in the ledger both factories share.
    let ledger = engines::sqlite::SqliteFactoryLedger::open(
        org.data_dir().join("store.db").to_str().expect("utf-8"),
    )
    .await
    .expect("ledger");
    let claims: Vec<_> = ledger
        .claims_of_role("crawler", 0)
        .await
        .expect("claims")
        .into_iter()
        .filter(|c| {
            c.request_key
                .starts_with(&format!("replace:{}", victim.cell_id))
        })
        .collect();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(crawlers.len(), 2, "no surplus crawler: {crawlers:?}");
    // The killed factory is back (supervised by `cell up`).
    org.wait_replaced(
        "factory",
        2,
        std::slice::from_ref(&dead_factory.cell_id),
        Duration::from_secs(30),
    )
    .await;
    org.stop().await;
}

/// A frozen front door is declared dead; the factory kills its process before replacing it, and
/// the replacement takes the same fixed address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_cell_is_fenced_and_its_address_reused() {
    let web = web().await;
    let org = Organism::on(&web, 200.0, "").await;
    let before: BTreeSet<String> = org
        .cells_of("frontdoor")
        .await
        .into_iter()
        .map(|c| c.addr)
        .collect();
    let frozen = org
        .cells_of("frontdoor")
        .await
        .into_iter()
        .find(|c| c.addr != org.api)
        .expect("a second front door");
    let pid = frozen.pid.expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    let now = org
        .wait_replaced(
            "frontdoor",
            2,
            std::slice::from_ref(&frozen.cell_id),
            Duration::from_secs(30),
        )
        .await;
    // Fenced: the frozen process is gone (it could never have ended by itself while stopped).
    wait_all_gone(&[pid].into(), Duration::from_secs(10)).await;
    let after: BTreeSet<String> = now.into_iter().map(|c| c.addr).collect();
    assert_eq!(
        after, before,
        "the replacement took its predecessor's address"
    );
    org.stop().await;
}

/// SIGKILL `cell up` itself: every process of its organism (cells a factory started included)
/// is gone within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_cell_up_leaves_no_process_behind() {
    let web = web().await;
    let org = Organism::on(&web, 200.0, "").await;
    wait_count(&org, "factory", 2, Duration::from_secs(10)).await;
    let pids = all_pids(&org).await;
    assert!(pids.len() >= 10, "the whole organism: {pids:?}");
    sigkill(org.child.id().expect("cell up runs"));
    wait_all_gone(&pids, Duration::from_secs(30)).await;
}

/// `cell up --die-with-parent` under a harness that is SIGKILLed: nothing of it remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_harness_leaves_no_process_behind() {
    let web = web().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let infra = dir.path().join("organism.toml");
    std::fs::write(&infra, infra_toml(dir.path(), &web, 200.0, "")).expect("write infra");
    // The "harness": a shell that starts `cell up` and waits for it.
    let mut harness = std::process::Command::new("sh")
        .arg("-c")
        .arg("\"$0\" up --infra \"$1\" --grace-secs 5 --die-with-parent >/dev/null & wait")
        .arg(env!("CARGO_BIN_EXE_cell"))
        .arg(&infra)
        .env("HOMEOSTAT_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .spawn()
        .expect("start the harness");
    // Find the organism through the file `cell up` writes, then its registry.
    let organism_file = dir.path().join("data").join("organism.json");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let pids = loop {
        let mut pids = BTreeSet::new();
        if let Ok(bytes) = std::fs::read(&organism_file) {
            let file: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            if let Some(hc) = file["healthcheckers"][0].as_str() {
                if let Ok(resp) = client.get(format!("{hc}/cells")).send().await {
                    if let Ok(cells) = resp.json::<CellsResponse>().await {
                        let n = |r: &str| cells.roles.get(r).map(Vec::len).unwrap_or(0);
                        if n("api") >= 2
                            && n("crawler") >= 2
                            && n("frontdoor") >= 2
                            && n("factory") >= 2
                        {
                            pids.extend(cells.roles.values().flatten().filter_map(|c| c.pid));
                        }
                    }
                }
            }
        }
        if !pids.is_empty() {
            break pids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "organism not up in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    harness.kill().expect("SIGKILL the harness");
    let _ = harness.wait();
    wait_all_gone(&pids, Duration::from_secs(30)).await;
}

/// `DATABASE_URL` and `AMQP_URL` are checked like the file: exit 64, the variable named, the
/// password hidden.
#[test]
fn bad_engine_urls_in_the_environment_exit_64() {
    for (var, value) in [
        ("DATABASE_URL", "mysql://user:hunter2@db.example/x"),
        ("AMQP_URL", "postgres://user:hunter2@mq.example/"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell"))
            .args(["status"])
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .env(var, value)
            .output()
            .expect("run cell");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
        assert!(!stderr.contains("hunter2"), "secret in {stderr}");
    }
}
