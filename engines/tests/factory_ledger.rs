//! The factories' ledger conformance suite on both store engines: SQLite (embedded) and
//! PostgreSQL (each test in a database of its own, created from `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, dropped at the end).

#[path = "conformance/factory_ledger.rs"]
mod suite;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use engines::factory_ledger::FactoryLedger;
use engines::postgres::PgFactoryLedger;
use engines::sqlite::SqliteFactoryLedger;
use sqlx::{Connection, PgConnection};

async fn sqlite() -> (tempfile::TempDir, SqliteFactoryLedger) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger =
        SqliteFactoryLedger::open(dir.path().join("store.db").to_str().expect("utf-8 path"))
            .await
            .expect("open ledger");
    (dir, ledger)
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A database of its own for one test, dropped when the test ends.
struct PgDb {
    name: String,
    ledger: Option<PgFactoryLedger>,
}

impl PgDb {
    async fn create() -> Self {
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable ({e}); run `scripts/engines.sh start`")
            });
        let name = format!(
            "homeostat_ledger_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        let ledger = PgFactoryLedger::connect(url.as_str())
            .await
            .expect("connect ledger");
        Self {
            name,
            ledger: Some(ledger),
        }
    }

    fn ledger(&self) -> &PgFactoryLedger {
        self.ledger.as_ref().expect("open until dropped")
    }

    async fn drop_db(mut self) {
        drop(self.ledger.take());
        let mut admin = PgConnection::connect(&admin_url()).await.expect("admin");
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await;
    }
}

#[tokio::test]
async fn sqlite_second_factory_gets_the_first_cell() {
    let (_d, l) = sqlite().await;
    suite::second_factory_gets_the_first_cell(&l).await;
}

#[tokio::test]
async fn sqlite_release() {
    let (_d, l) = sqlite().await;
    suite::release_frees_only_an_unstarted_claim_of_its_owner(&l).await;
}

#[tokio::test]
async fn sqlite_expiry() {
    let (_d, l) = sqlite().await;
    suite::expired_claims_are_replaced(&l).await;
}

#[tokio::test]
async fn sqlite_roles_and_forgetting() {
    let (_d, l) = sqlite().await;
    suite::claims_by_role_and_forgetting(&l).await;
}

#[tokio::test]
async fn sqlite_concurrent_claims() {
    let (_d, l) = sqlite().await;
    suite::concurrent_claims_have_one_winner(Arc::new(l)).await;
}

/// Two processes' worth of ledgers on one file (two factories on one machine) agree.
#[tokio::test]
async fn sqlite_two_handles_share_claims() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.db");
    let path = path.to_str().expect("utf-8 path");
    let a = SqliteFactoryLedger::open(path).await.expect("open a");
    let b = SqliteFactoryLedger::open(path).await.expect("open b");
    a.claim(&suite::claim("k", "api", "factory-1", "api-a", 1), 0)
        .await
        .expect("claim");
    match b
        .claim(&suite::claim("k", "api", "factory-2", "api-b", 2), 0)
        .await
        .expect("claim")
    {
        engines::factory_ledger::ClaimOutcome::Held(h) => assert_eq!(h.cell_id, "api-a"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn postgres_second_factory_gets_the_first_cell() {
    let db = PgDb::create().await;
    suite::second_factory_gets_the_first_cell(db.ledger()).await;
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_release() {
    let db = PgDb::create().await;
    suite::release_frees_only_an_unstarted_claim_of_its_owner(db.ledger()).await;
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_expiry() {
    let db = PgDb::create().await;
    suite::expired_claims_are_replaced(db.ledger()).await;
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_roles_and_forgetting() {
    let db = PgDb::create().await;
    suite::claims_by_role_and_forgetting(db.ledger()).await;
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_concurrent_claims() {
    let mut db = PgDb::create().await;
    let ledger: Arc<dyn FactoryLedger> = Arc::new(db.ledger.take().expect("ledger"));
    suite::concurrent_claims_have_one_winner(ledger).await;
    db.drop_db().await;
}
