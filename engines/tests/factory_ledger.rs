//! The factories' ledger conformance suite on both store engines: SQLite (embedded) and
//! PostgreSQL (each test in a database of its own, [`support::PgDb`], dropped at the end).

#[path = "conformance/factory_ledger.rs"]
mod suite;
mod support;

use std::sync::Arc;

use engines::factory_ledger::FactoryLedger;
use engines::postgres::PgFactoryLedger;
use engines::sqlite::SqliteFactoryLedger;

async fn sqlite() -> (tempfile::TempDir, SqliteFactoryLedger) {
    let (dir, _, ledger) = support::sqlite_ledger().await;
    (dir, ledger)
}

/// A database of its own for one test, dropped when the test ends.
struct PgDb {
    db: support::PgDb,
    ledger: Option<PgFactoryLedger>,
}

impl PgDb {
    async fn create() -> Self {
        let db = support::PgDb::create().await;
        let ledger = PgFactoryLedger::connect(&db.url)
            .await
            .expect("connect ledger");
        Self {
            db,
            ledger: Some(ledger),
        }
    }

    fn ledger(&self) -> &PgFactoryLedger {
        self.ledger.as_ref().expect("open until dropped")
    }

    async fn drop_db(mut self) {
        drop(self.ledger.take());
        self.db.drop_db().await;
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
    let (_dir, path, a) = support::sqlite_ledger().await;
    let b = SqliteFactoryLedger::open(&path).await.expect("open b");
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
