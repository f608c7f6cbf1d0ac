//! Opening the engines a configuration names.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use engines::idempotency::IdempotencyStore;
use engines::sqlite::{SqliteQueue, SqliteStore};
use engines::{JobQueue, Store};
use infra::{Config, EngineUrl};

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
            let queue =
                engines::rabbitmq::AmqpQueue::connect(&url, &q.name, q.prefetch, q.max_deliveries)
                    .await
                    .with_context(|| format!("connecting to RabbitMQ at {}", redact(&url)))?;
            Ok(Arc::new(queue))
        }
        other => anyhow::bail!("engines.queue {other:?} is not a queue engine"),
    }
}

/// A URL with its password hidden, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
