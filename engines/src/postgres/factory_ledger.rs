//! The factories' ledger in the organism's PostgreSQL database (see [`crate::factory_ledger`]).

use sqlx::postgres::PgPool;

use super::{PgOptions, PgStore};
use crate::Result;

pub struct PgFactoryLedger {
    pool: PgPool,
    _follower: Option<std::sync::Arc<super::multihost::Follower>>,
}

impl PgFactoryLedger {
    /// Connect to `postgres://` `url` with a small pool and bring the store's schema (which holds
    /// the ledger's table) up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let store = PgStore::connect_with(
            url,
            PgOptions {
                max_connections: 2,
                ..PgOptions::default()
            },
        )
        .await?;
        Ok(Self {
            pool: store.pool().clone(),
            _follower: store.follower(),
        })
    }

    /// The ledger on the pool of an open store.
    pub fn from_store(store: &PgStore) -> Self {
        Self {
            pool: store.pool().clone(),
            _follower: store.follower(),
        }
    }
}

crate::factory_ledger::factory_ledger_on!(PgFactoryLedger, sqlx::postgres::PgRow);
