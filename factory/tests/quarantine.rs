//! Failure handling of the pool: a server whose power-on never produces a cell is tried again
//! with backoff, then powered off and quarantined, and the request moves to the next server;
//! when no server is left the request is refused. No machine process is left running, and every
//! powered-on period is closed in the ledger. The "machines" are real processes of the `local`
//! provider running a boot that never joins.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use engines::pool::{Caps, PoolLedger, ServerState};
use factory::pool::{IsLive, JoinConfig, PoolAnswer, PoolFactory, PoolSettings};
use factory::power::local::LocalMachines;
use factory::power::{PowerProvider, ProviderKind, ServerSpec};

/// A machine that powers on but never joins: it records its pid and sleeps.
fn dud_machine(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("dud-machine");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho $$ >> {}/pids\nexec sleep 600\n",
            dir.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn spec(name: &str) -> ServerSpec {
    toml::from_str(&format!(
        "name = \"{name}\"\nprovider = \"local\"\nhourly_cost = 0.25\n"
    ))
    .expect("a server spec")
}

fn alive(pid: u32) -> bool {
    // A zombie is not running: it only waits to be reaped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_joins_is_retried_quarantined_and_the_next_is_tried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = PoolLedger::open_sqlite(&dir.path().join("store.db").to_string_lossy())
        .await
        .expect("ledger");
    let machines = LocalMachines::new(
        dud_machine(dir.path()),
        Vec::new(),
        Duration::from_secs(2),
        None,
    );
    let mut providers: HashMap<ProviderKind, Arc<dyn PowerProvider>> = HashMap::new();
    providers.insert(ProviderKind::Local, Arc::new(machines));
    let never: IsLive = Arc::new(|_| Box::pin(async { false }));
    let pool = PoolFactory::new(
        ledger.clone(),
        vec!["crawler".into()],
        vec![spec("dud-1"), spec("dud-2")],
        providers,
        Caps {
            per_hour: 10_000_000,
            per_month: 1_000_000_000,
        },
        "factory-test".into(),
        "http://127.0.0.1:9".into(),
        JoinConfig {
            infra_toml: String::new(),
            cluster_key_hex: String::new(),
            cell_args: Vec::new(),
        },
        PoolSettings {
            boot_timeout: Duration::from_millis(400),
            max_attempts: 2,
            backoff: Duration::from_millis(100),
            off_timeout: Duration::from_secs(5),
            ..PoolSettings::default()
        },
        never,
    );
    pool.declare().await.expect("declare");
    let first = pool
        .request("crawler", "grow:crawler:1", None)
        .await
        .expect("request");
    assert_eq!(first, PoolAnswer::Admitted("dud-1".into()));

    // Both servers end quarantined, one after the other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let servers = ledger.servers().await.expect("servers");
        if servers.iter().all(|s| s.state == ServerState::Quarantined) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not both quarantined within 30 s: {servers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in ["dud-1", "dud-2"] {
        let history = ledger.transitions(name).await.expect("history");
        let path: Vec<&str> = history.iter().map(|t| t.to.as_str()).collect();
        assert_eq!(
            path,
            [
                "powering-on",
                "booting",
                "powering-on",
                "booting",
                "powering-off",
                "quarantined"
            ],
            "{name}: {history:#?}"
        );
        assert!(
            history[2].reason.contains("no live cell within"),
            "{:?}",
            history[2]
        );
    }
    // Two attempts on each server: four machine processes, none left running.
    let pids: Vec<u32> = std::fs::read_to_string(dir.path().join("pids"))
        .expect("pids")
        .lines()
        .map(|l| l.trim().parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 4, "{pids:?}");
    for pid in pids {
        assert!(!alive(pid), "machine process {pid} still runs");
    }
    // Every powered-on period is closed, and a quarantined pool refuses, saying so.
    let rows = ledger.spend_rows().await.expect("spend");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.amount_micros.is_some()), "{rows:?}");
    match pool
        .request("crawler", "grow:crawler:2", None)
        .await
        .expect("request")
    {
        PoolAnswer::Refused(r) => assert!(r.reason.contains("2 quarantined"), "{}", r.reason),
        other => panic!("{other:?}"),
    }
}

/// A factory that died leaves machines behind: one it was still bringing up (nobody waits for
/// it any more) and one joined whose cell is gone. Another factory adopts both and powers them
/// off; machines of a live factory are left to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_factorys_machines_are_adopted_and_powered_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = PoolLedger::open_sqlite(&dir.path().join("store.db").to_string_lossy())
        .await
        .expect("ledger");
    let machines = LocalMachines::new(
        dud_machine(dir.path()),
        Vec::new(),
        Duration::from_secs(2),
        None,
    );
    let mut providers: HashMap<ProviderKind, Arc<dyn PowerProvider>> = HashMap::new();
    providers.insert(ProviderKind::Local, Arc::new(machines));
    // Live: the surviving factories, and no cell.
    let is_live: IsLive =
        Arc::new(|id: String| Box::pin(async move { id == "factory-b" || id == "factory-alive" }));
    let servers = ["a-stuck", "b-orphan", "c-theirs"];
    let pool = PoolFactory::new(
        ledger.clone(),
        vec!["crawler".into()],
        servers.iter().map(|n| spec(n)).collect(),
        providers,
        Caps {
            per_hour: 10_000_000,
            per_month: 1_000_000_000,
        },
        "factory-b".into(),
        "http://127.0.0.1:9".into(),
        JoinConfig {
            infra_toml: String::new(),
            cluster_key_hex: String::new(),
            cell_args: Vec::new(),
        },
        PoolSettings {
            boot_timeout: Duration::from_millis(200),
            max_attempts: 1,
            backoff: Duration::from_millis(10),
            off_timeout: Duration::from_secs(5),
            ..PoolSettings::default()
        },
        is_live,
    );
    pool.declare().await.expect("declare");
    // What the other factories left in the shared inventory.
    let admit = |key: &str, factory: &str| engines::pool::AdmitRequest {
        request_key: key.into(),
        role: "crawler".into(),
        factory: factory.into(),
        now_ms: factory::pool::now_ms(),
        month_start_ms: 0,
    };
    let caps = pool.caps;
    for (key, factory, server, cell) in [
        ("k-stuck", "factory-a", "a-stuck", None),
        ("k-orphan", "factory-a", "b-orphan", Some("crawler-gone")),
        (
            "k-theirs",
            "factory-alive",
            "c-theirs",
            Some("crawler-gone-too"),
        ),
    ] {
        match ledger
            .admit(caps, &admit(key, factory))
            .await
            .expect("admit")
        {
            engines::pool::AdmitOutcome::Admitted(row) => assert_eq!(row.name, server),
            other => panic!("{other:?}"),
        }
        if let Some(cell) = cell {
            ledger
                .transition(
                    server,
                    &[ServerState::PoweringOn],
                    ServerState::Joined,
                    "joined",
                    factory::pool::now_ms(),
                    Some(cell),
                )
                .await
                .expect("joined");
        }
    }
    let stop = tokio_util::sync::CancellationToken::new();
    pool.watch(Duration::from_millis(50), stop.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = ledger.servers().await.expect("servers");
        let state = |n: &str| {
            rows.iter()
                .find(|r| r.name == n)
                .map(|r| r.state)
                .expect("declared")
        };
        if state("a-stuck") == ServerState::Off && state("b-orphan") == ServerState::Off {
            // The live factory's machine is its own business.
            assert_eq!(state("c-theirs"), ServerState::Joined);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not adopted within 20 s: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let stuck = ledger.transitions("a-stuck").await.expect("history");
    assert!(
        stuck
            .iter()
            .any(|t| t.reason.contains("adopted from factory factory-a")),
        "{stuck:#?}"
    );
    let orphan = ledger.transitions("b-orphan").await.expect("history");
    assert!(
        orphan
            .iter()
            .any(|t| t.reason.contains("crawler-gone is no longer live")),
        "{orphan:#?}"
    );
}
