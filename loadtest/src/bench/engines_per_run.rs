//! Engines per run: which engines a run uses, and starting each run from empty ones.
//!
//! - SQLite (store or queue): kept in the run's fresh data directory.
//! - PostgreSQL: a database of its own per run (`CREATE DATABASE` on the configured server,
//!   dropped after the run). If it cannot be created, the configured database is used as it is
//!   and the user is told it should be fresh: a frontier that already knows the web's URLs
//!   admits none of them again.
//! - RabbitMQ: a queue name of its own per run (`queue.name`); the queue stays on the broker.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use engines::Store as _;
use infra::redact;
use sqlx::Connection as _;

/// What an `engines.database` / `engines.queue` value (or `DATABASE_URL` / `AMQP_URL`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// `sqlite`, `sqlite:PATH` or `sqlite://PATH`.
    Sqlite,
    Postgres(String),
    Amqp(String),
}

impl Engine {
    /// Classify a configured value the way `infra::Config` resolves it.
    pub fn of(value: &str) -> Engine {
        if value == "sqlite" || value.starts_with("sqlite:") {
            Engine::Sqlite
        } else if value.starts_with("amqp") {
            Engine::Amqp(value.to_string())
        } else {
            Engine::Postgres(value.to_string())
        }
    }
}

/// The value in effect: the environment variable (when `env` is consulted and it is set and
/// not empty) wins over the file, as in `infra::Config`.
pub fn effective(file_value: Option<&str>, env_value: Option<String>) -> Engine {
    match env_value.filter(|v| !v.is_empty()) {
        Some(v) => Engine::of(&v),
        None => Engine::of(file_value.unwrap_or("sqlite")),
    }
}

/// A database created for one run.
pub struct FreshDatabase {
    /// Where it was created from (the configured URL).
    server: String,
    pub name: String,
    /// The configured URL with its database replaced by this one.
    pub url: String,
}

impl FreshDatabase {
    /// `CREATE DATABASE name` on the server `url` names (connecting to `url`'s database).
    pub async fn create(url: &str, name: &str) -> anyhow::Result<FreshDatabase> {
        anyhow::ensure!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name:?} is not a plain database name"
        );
        let mut fresh = url::Url::parse(url).context("parsing the PostgreSQL URL")?;
        fresh.set_path(&format!("/{name}"));
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .with_context(|| format!("connecting to {}", redact(url)))?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating the database {name}"))?;
        let _ = conn.close().await;
        Ok(FreshDatabase {
            server: url.to_string(),
            name: name.to_string(),
            url: fresh.to_string(),
        })
    }

    /// `DROP DATABASE` (forcing out any connection left behind).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.server)
            .await
            .with_context(|| format!("connecting to {}", redact(&self.server)))?;
        let name = &self.name;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("dropping the database {name}"))?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// Where a run's indexed pages are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAt {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreAt {
    /// The store of a run whose data directory is `data_dir` and store engine `engine`.
    pub fn of(engine: &Engine, data_dir: &Path) -> StoreAt {
        match engine {
            Engine::Postgres(url) => StoreAt::Postgres(url.clone()),
            _ => StoreAt::Sqlite(data_dir.join("store.db")),
        }
    }

    /// Every indexed page URL.
    pub async fn indexed(&self) -> anyhow::Result<BTreeSet<String>> {
        match self {
            StoreAt::Sqlite(path) => {
                let path = path.to_string_lossy();
                let store = engines::sqlite::SqliteStore::open(&path)
                    .await
                    .with_context(|| format!("opening the store at {path}"))?;
                let urls = store
                    .indexed_urls()
                    .await
                    .context("reading the indexed pages")?;
                Ok(urls.into_iter().collect())
            }
            StoreAt::Postgres(url) => {
                let store = engines::postgres::PgStore::connect(url)
                    .await
                    .with_context(|| format!("connecting to the store at {}", redact(url)))?;
                let urls = store.indexed_urls().await;
                store.pool().close().await;
                Ok(urls
                    .context("reading the indexed pages")?
                    .into_iter()
                    .collect())
            }
        }
    }
}
