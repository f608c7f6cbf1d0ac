//! Opening the engines a configuration names.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use engines::factory_ledger::FactoryLedger;
use engines::idempotency::IdempotencyStore;
use engines::sqlite::{SqliteQueue, SqliteStore};
use engines::{JobQueue, Store};
use infra::{redact, Config, EngineUrl};

/// The store, and the same database as the keeper of `POST /crawl`'s idempotency keys.
pub async fn open_store_and_keys(
    cfg: &Config,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn IdempotencyStore>)> {
    match cfg.database() {
        EngineUrl::Sqlite(path) => {
            let path = path.to_string_lossy().to_string();
            let store = Arc::new(
                SqliteStore::open(&path)
                    .await
                    .with_context(|| format!("opening the store at {path}"))?,
            );
            Ok((store.clone(), store))
        }
        EngineUrl::Postgres(url) => {
            let store = Arc::new(
                engines::postgres::PgStore::connect(&url)
                    .await
                    .with_context(|| format!("connecting to PostgreSQL at {}", redact(&url)))?,
            );
            Ok((store.clone(), store))
        }
        other => anyhow::bail!("engines.database {other:?} is not a store engine"),
    }
}

pub async fn open_queue(cfg: &Config) -> anyhow::Result<Arc<dyn JobQueue>> {
    let q = &cfg.raw.queue;
    match cfg.queue() {
        EngineUrl::Sqlite(path) => {
            let path = path.to_string_lossy().to_string();
            let queue =
                SqliteQueue::open(&path, Duration::from_secs(q.lease_secs), q.max_deliveries)
                    .await
                    .with_context(|| format!("opening the queue at {path}"))?;
            Ok(Arc::new(queue))
        }
        EngineUrl::Amqp(url) => {
            // A leased job not acknowledged within `[queue].lease_secs` goes back to the broker,
            // as on the embedded queue.
            let options = engines::rabbitmq::AmqpOptions {
                lease: Some(Duration::from_secs(q.lease_secs)),
                ..engines::rabbitmq::AmqpOptions::new(q.prefetch, q.max_deliveries)
            };
            let queue = engines::rabbitmq::AmqpQueue::connect_with(&url, &q.name, options)
                .await
                .with_context(|| format!("connecting to RabbitMQ at {}", redact(&url)))?;
            Ok(Arc::new(queue))
        }
        other => anyhow::bail!("engines.queue {other:?} is not a queue engine"),
    }
}

/// The factories' shared ledger of request keys, in the store's database.
pub async fn open_factory_ledger(cfg: &Config) -> anyhow::Result<Arc<dyn FactoryLedger>> {
    match cfg.database() {
        EngineUrl::Sqlite(path) => {
            let path = path.to_string_lossy().to_string();
            let ledger = engines::sqlite::SqliteFactoryLedger::open(&path)
                .await
                .with_context(|| format!("opening the factory ledger at {path}"))?;
            Ok(Arc::new(ledger))
        }
        EngineUrl::Postgres(url) => {
            let ledger = engines::postgres::PgFactoryLedger::connect(&url)
                .await
                .with_context(|| format!("connecting to PostgreSQL at {}", redact(&url)))?;
            Ok(Arc::new(ledger))
        }
        other => anyhow::bail!("engines.database {other:?} is not a store engine"),
    }
}
