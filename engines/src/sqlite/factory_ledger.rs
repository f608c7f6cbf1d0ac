//! The factories' ledger in the store's SQLite database (see [`crate::factory_ledger`]).

use sqlx::sqlite::SqlitePool;

use super::open_pool;
use crate::Result;

/// The ledger's table lives in the store's database (its migrations are the store's), so the
/// factories of one machine share it with each other through WAL.
pub struct SqliteFactoryLedger {
    pool: SqlitePool,
}

impl SqliteFactoryLedger {
    /// Open or create the store's database at a path or `sqlite:` URL and bring its schema up
    /// to date.
    pub async fn open(url_or_path: &str) -> Result<Self> {
        let pool = open_pool(url_or_path, 2).await?;
        super::store::migrate(&pool).await?;
        Ok(Self { pool })
    }
}

crate::factory_ledger::factory_ledger_on!(SqliteFactoryLedger, sqlx::sqlite::SqliteRow);
