//! The embedded engines: SQLite (through sqlx) for pages, frontier, full-text index (FTS5) and a
//! durable job queue. Each lives in its own database file so the queue's writers and the store's
//! writers do not take the same lock. WAL mode lets the cells of one machine share the files.

mod factory_ledger;
mod gate;
mod politeness;
mod queue;
mod store;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::SqliteSynchronous;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Connection as _;

pub use factory_ledger::SqliteFactoryLedger;
pub use queue::SqliteQueue;
pub use store::SqliteStore;

crate::idempotency::idempotency_store_on!(SqliteStore);

use crate::{EngineError, Result};
pub(crate) use gate::WriteGate;

/// A write transaction begun behind the database's [`WriteGate`]: the gate is held until the
/// transaction commits or is dropped.
pub(crate) struct WriteTx<'g> {
    // Dropped first: its rollback is queued before the next writer may begin.
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    _gate: gate::GateGuard<'g>,
}

impl<'g> WriteTx<'g> {
    /// Take the gate, then begin an immediate (write-locking) transaction.
    pub(crate) async fn begin(pool: &SqlitePool, gate: &'g WriteGate) -> Result<Self> {
        let guard = gate.enter().await?;
        Ok(Self {
            tx: pool.begin_with("BEGIN IMMEDIATE").await?,
            _gate: guard,
        })
    }

    pub(crate) async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx<'_> {
    type Target = sqlx::Transaction<'static, sqlx::Sqlite>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// The file of the database `url_or_path` names (`None` in memory).
fn database_file(url_or_path: &str) -> Result<Option<std::path::PathBuf>> {
    let options = connect_options(url_or_path)?;
    let file = options.get_filename();
    let in_memory = file.as_os_str().is_empty() || file.to_string_lossy().contains(":memory:");
    Ok((!in_memory).then(|| file.to_path_buf()))
}

/// The gate of the database `url_or_path` names (without a file in memory).
pub(crate) fn write_gate(url_or_path: &str) -> Result<WriteGate> {
    Ok(WriteGate::new(database_file(url_or_path)?.as_deref()))
}

/// A database file beside the one `url_or_path` names: `store.db` -> `store-NAME.db` (`None`
/// for a database in memory).
pub(crate) fn sibling_file(url_or_path: &str, name: &str) -> Result<Option<std::path::PathBuf>> {
    Ok(database_file(url_or_path)?.map(|file| {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        file.with_file_name(format!("{stem}-{name}.db"))
    }))
}

/// Connection options for a SQLite database shared by several processes (its directory made
/// if missing).
pub(crate) fn connect_options(url_or_path: &str) -> Result<SqliteConnectOptions> {
    let options = if url_or_path.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url_or_path)
            .map_err(|e| EngineError::Config(format!("bad sqlite URL {url_or_path:?}: {e}")))?
    } else {
        SqliteConnectOptions::new().filename(Path::new(url_or_path))
    };
    if let Some(parent) = Path::new(options.get_filename()).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| {
                EngineError::Config(format!("cannot create directory {}: {e}", parent.display()))
            })?;
        }
    }
    Ok(options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL in WAL mode is durable against process crashes (what kill -9 tests), which is
        // what the loop's invariant needs; power loss may drop the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(false)
        .pragma("temp_store", "memory")
        // 16 MiB of pages per connection: at a million URLs 4 MiB made the crawl 40% slower (the
        // frontier's index no longer fits), though it kept an api's memory lower.
        .pragma("cache_size", "-16000"))
}

/// Open (creating if needed) a SQLite database for concurrent use by several processes.
pub(crate) async fn open_pool(url_or_path: &str, max_connections: u32) -> Result<SqlitePool> {
    open_pool_with(connect_options(url_or_path)?, max_connections).await
}

/// [`open_pool`] with options of the caller's.
pub(crate) async fn open_pool_with(
    options: SqliteConnectOptions,
    max_connections: u32,
) -> Result<SqlitePool> {
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        // A connection that sqlx still counts as inside a transaction refuses every later
        // BEGIN ("begin_with at non-zero transaction depth"), for good: seen on an api under
        // CPU starvation, where every permit request then failed on that connection. The pool
        // pings a connection on release, which runs a dropped transaction's rollback, so one
        // still inside a transaction when it is handed out again is closed and another taken.
        .before_acquire(|conn, _meta| {
            Box::pin(async move {
                let stuck = conn.is_in_transaction();
                if stuck {
                    tracing::warn!(
                        "a pooled SQLite connection was left inside a transaction; closing it"
                    );
                }
                Ok(!stuck)
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Whether anything was committed to a database file since the last look, by any connection of
/// any process: `PRAGMA data_version` on a connection of its own that never writes (its value
/// changes when another connection commits, and only then). A new connection starts its count
/// again, so the token carries which connection read it.
pub(crate) struct DataVersion {
    options: SqliteConnectOptions,
    conn: tokio::sync::Mutex<(Option<sqlx::SqliteConnection>, u64)>,
}

impl DataVersion {
    pub(crate) fn new(url_or_path: &str) -> Result<Self> {
        Ok(Self {
            options: connect_options(url_or_path)?,
            conn: tokio::sync::Mutex::new((None, 0)),
        })
    }

    /// `CONNECTION:VERSION`; a failed read drops the connection (the next opens another).
    pub(crate) async fn read(&self) -> Result<String> {
        let mut held = self.conn.lock().await;
        let (conn, opened) = &mut *held;
        let c = match conn {
            Some(c) => c,
            None => {
                *opened += 1;
                conn.insert(sqlx::SqliteConnection::connect_with(&self.options).await?)
            }
        };
        match sqlx::query_scalar::<_, i64>("PRAGMA data_version")
            .fetch_one(&mut *c)
            .await
        {
            Ok(v) => Ok(format!("{opened}:{v}")),
            Err(e) => {
                *conn = None;
                Err(e.into())
            }
        }
    }
}

/// A list as one JSON array, for a statement that reads it with `json_each` (a batch in one
/// statement, whatever its size).
pub(crate) fn json_keys<T: serde::Serialize>(keys: &[T]) -> String {
    serde_json::to_string(keys).expect("strings and integers serialize")
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A small pool on the store's database with its schema up to date (for the tables that live
/// beside the store's: the factories' ledger, the server pool).
pub async fn open_store_database(url_or_path: &str, max_connections: u32) -> Result<SqlitePool> {
    let pool = open_pool(url_or_path, max_connections).await?;
    store::migrate(&pool).await?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use sqlx::Connection as _;

    /// A connection returned to the pool while sqlx still counts it inside a transaction (here:
    /// a transaction forgotten, so its rollback never ran) is not handed out again: the next
    /// write transaction gets a connection that can begin.
    #[tokio::test]
    async fn a_connection_left_inside_a_transaction_is_not_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let pool = super::open_pool(path.to_str().expect("utf-8"), 1)
            .await
            .expect("open");
        {
            let mut conn = pool.acquire().await.expect("acquire");
            let tx = conn.begin().await.expect("begin");
            std::mem::forget(tx);
            assert!(conn.is_in_transaction());
        }
        let mut tx = pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .expect("a fresh connection begins");
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&mut *tx)
            .await
            .expect("write");
        tx.commit().await.expect("commit");
    }
}
