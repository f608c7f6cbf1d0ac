//! The server pool's inventory, purse and join tokens on SQLite and PostgreSQL: admission never
//! overshoots the caps however many factories ask at once, the ledger adds up, and a join token
//! is redeemed once.

use std::sync::atomic::{AtomicU32, Ordering};

use engines::pool::{
    accrue, AdmitOutcome, AdmitRequest, Caps, DeclaredServer, NewToken, PoolLedger, ServerState,
    TokenRefusal,
};
use sqlx::Connection;

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh PostgreSQL database, dropped at the end.
struct PgDb {
    name: String,
    url: String,
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

impl PgDb {
    async fn create() -> Self {
        let mut admin = sqlx::PgConnection::connect(&admin_url())
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable ({e}); run `scripts/engines.sh start`")
            });
        let name = format!(
            "homeostat_pool_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        let mut url = url::Url::parse(&admin_url()).expect("ok");
        url.set_path(&name);
        Self {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::process::Command::new("psql")
            .arg(admin_url())
            .arg("-qc")
            .arg(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .output();
    }
}

fn servers(n: usize, cost: i64) -> Vec<DeclaredServer> {
    (0..n)
        .map(|i| DeclaredServer {
            name: format!("s{i:02}"),
            provider: "local".into(),
            hourly_cost_micros: cost,
            capacity: 1,
        })
        .collect()
}

const T0: i64 = 1_795_000_000_000;

fn req(key: usize, factory: &str, now: i64) -> AdmitRequest {
    AdmitRequest {
        request_key: format!("grow:crawler:{key}"),
        role: "crawler".into(),
        factory: factory.into(),
        now_ms: now,
        month_start_ms: T0 - 1_000,
    }
}

/// 100 concurrent requests through two ledgers (two factories, two connection pools) against a
/// cap that allows 10 machines; then every machine is powered off at its own time and the
/// ledger is checked to the micro.
async fn cap_is_never_overrun(a: PoolLedger, b: PoolLedger) {
    let cost = 1_000_000; // 1.00 an hour
    a.declare(&servers(20, cost), T0).await.expect("ok");
    b.declare(&servers(20, cost), T0).await.expect("ok");
    let caps = Caps {
        per_hour: 10 * cost,
        per_month: 10_000 * cost,
    };
    let mut tasks = Vec::new();
    for i in 0..100 {
        let ledger = if i % 2 == 0 { a.clone() } else { b.clone() };
        let factory = if i % 2 == 0 { "factory-a" } else { "factory-b" };
        tasks.push(tokio::spawn(async move {
            ledger.admit(caps, &req(i, factory, T0 + i as i64)).await
        }));
    }
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("ok").expect("ok") {
            AdmitOutcome::Admitted(s) => admitted.push(s),
            AdmitOutcome::Refused(r) => {
                assert!(r.reason.contains("hourly cap"), "{}", r.reason);
                assert!(r.committed_per_hour <= caps.per_hour);
                refused += 1;
            }
            AdmitOutcome::Already(s) => panic!("distinct keys, yet {s:?}"),
        }
    }
    assert_eq!((admitted.len(), refused), (10, 90));
    let mut names: Vec<&str> = admitted.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 10, "ten distinct servers");
    let spending = a
        .servers()
        .await
        .expect("ok")
        .into_iter()
        .filter(|s| s.state.spends())
        .count();
    assert_eq!(spending, 10);
    // A repeated key gets its server, not another.
    let mut repeat = req(0, "factory-b", T0 + 500);
    repeat.request_key = admitted[0].request_key.clone().expect("ok");
    let again = b.admit(caps, &repeat).await.expect("ok");
    assert!(
        matches!(&again, AdmitOutcome::Already(s) if s.name == admitted[0].name),
        "{again:?}"
    );

    // Power them off at different times: each accrues its own period.
    let mut expected = 0;
    for (i, s) in admitted.iter().enumerate() {
        let off_at = T0 + 1_000 + (i as i64) * 600_000 + 123; // 10 min apart, odd millis
        assert!(a
            .transition(
                &s.name,
                &[ServerState::PoweringOn],
                ServerState::Booting,
                "on",
                T0 + 200,
                None
            )
            .await
            .expect("ok"));
        assert!(a
            .transition(
                &s.name,
                &[ServerState::Booting],
                ServerState::PoweringOff,
                "done",
                off_at - 10,
                None
            )
            .await
            .expect("ok"));
        assert!(b
            .transition(
                &s.name,
                &[ServerState::PoweringOff],
                ServerState::Off,
                "confirmed",
                off_at,
                None
            )
            .await
            .expect("ok"));
        expected += accrue(cost, s.state_since_ms, off_at);
    }
    // Moving a server that is not in the expected state changes nothing.
    assert!(!a
        .transition(
            "s00",
            &[ServerState::Joined],
            ServerState::Off,
            "stale",
            T0,
            None
        )
        .await
        .expect("ok"));
    let summary = a
        .spend(caps, T0 + 10_000_000, T0 - 1_000)
        .await
        .expect("ok");
    assert_eq!(summary.ledger_total, expected);
    assert_eq!(summary.spending_servers, 0);
    let rows = a.spend_rows().await.expect("ok");
    assert_eq!(rows.len(), 10);
    assert!(rows.iter().all(|r| r.ended_at_ms.is_some()));
    // To the cent: the total of the rows' amounts equals the sum of the periods.
    let cents = |m: i64| (m + 5_000) / 10_000;
    assert_eq!(
        cents(rows.iter().map(|r| r.amount_micros.expect("ok")).sum()),
        cents(expected)
    );
    // Every transition was recorded with its reason.
    let history = a.transitions(&admitted[0].name).await.expect("ok");
    let path: Vec<&str> = history.iter().map(|t| t.to.as_str()).collect();
    assert_eq!(path, ["powering-on", "booting", "powering-off", "off"]);
    assert!(history[0].reason.contains("admitted for crawler"));
}

/// A token is redeemed once, however many machines present it at once; expired, forged and
/// unknown tokens are refused; the lineage is recorded.
async fn tokens_are_one_time(ledger: PoolLedger) {
    let token = |id: &str, expires: i64| NewToken {
        id: id.into(),
        secret: "0123456789abcdef".into(),
        role: "crawler".into(),
        server: Some("s01".into()),
        parent: Some("api-1".into()),
        request_key: Some("grow:crawler:1".into()),
        issued_at_ms: T0,
        expires_at_ms: expires,
    };
    ledger
        .issue_token(&token("abc123", T0 + 60_000))
        .await
        .expect("ok");
    ledger
        .issue_token(&token("old000", T0 + 10))
        .await
        .expect("ok");
    let mut tasks = Vec::new();
    for i in 0..10 {
        let l = ledger.clone();
        tasks.push(tokio::spawn(async move {
            l.redeem_token("abc123", "0123456789abcdef", &format!("cell-{i}"), T0 + 100)
                .await
                .expect("ok")
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("ok") {
            Ok(r) => {
                assert_eq!(r.role, "crawler");
                assert_eq!(r.parent.as_deref(), Some("api-1"));
                ok += 1;
            }
            Err(e) => assert_eq!(e, TokenRefusal::Used),
        }
    }
    assert_eq!(ok, 1);
    let r = |id: &'static str, secret: &'static str| {
        let l = ledger.clone();
        async move { l.redeem_token(id, secret, "x", T0 + 100).await.expect("ok") }
    };
    assert_eq!(
        r("old000", "0123456789abcdef").await,
        Err(TokenRefusal::Expired)
    );
    assert_eq!(
        r("abc123", "0123456789abcdeg").await,
        Err(TokenRefusal::Forged)
    );
    assert_eq!(
        r("nope00", "0123456789abcdef").await,
        Err(TokenRefusal::Unknown)
    );
    let lineage = ledger.lineage().await.expect("ok");
    assert_eq!(lineage.len(), 1);
    assert_eq!(lineage[0].parent.as_deref(), Some("api-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cap_is_never_overrun_by_two_factories() {
    let db = PgDb::create().await;
    let a = PoolLedger::connect_postgres(&db.url).await.expect("ok");
    let b = PoolLedger::connect_postgres(&db.url).await.expect("ok");
    cap_is_never_overrun(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_cap_is_never_overrun_by_two_factories() {
    let dir = tempfile::tempdir().expect("ok");
    let path = dir.path().join("store.db").to_string_lossy().to_string();
    let a = PoolLedger::open_sqlite(&path).await.expect("ok");
    let b = PoolLedger::open_sqlite(&path).await.expect("ok");
    cap_is_never_overrun(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_join_tokens_are_one_time() {
    let db = PgDb::create().await;
    tokens_are_one_time(PoolLedger::connect_postgres(&db.url).await.expect("ok")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_join_tokens_are_one_time() {
    let dir = tempfile::tempdir().expect("ok");
    let path = dir.path().join("store.db").to_string_lossy().to_string();
    tokens_are_one_time(PoolLedger::open_sqlite(&path).await.expect("ok")).await;
}
