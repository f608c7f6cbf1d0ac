//! Set-up shared by the engines' test binaries: stores on temporary SQLite files, PostgreSQL
//! databases of their own, and restarts of the servers (`scripts/engines.sh`).
#![allow(dead_code)] // each test binary uses part of it, but rustc checks per binary

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use engines::sqlite::{SqliteFactoryLedger, SqliteQueue, SqliteStore};
use sqlx::{Connection, PgConnection};

/// A file `name` in a new temporary directory (removed when the directory is dropped).
pub fn temp_file(name: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    let path = path.to_str().expect("utf-8 path").to_string();
    (dir, path)
}

/// A SQLite store on a temporary file; the path for more handles on the same file.
pub async fn sqlite_store() -> (tempfile::TempDir, String, SqliteStore) {
    let (dir, path) = temp_file("store.db");
    let store = SqliteStore::open(&path).await.expect("open store");
    (dir, path, store)
}

/// The migrations of a newer build: this build's `migrations/<set>` and one more, `extra` (in a
/// temporary directory that lives as long as the returned one).
pub async fn newer_migrator(
    set: &str,
    extra: &str,
) -> (tempfile::TempDir, sqlx::migrate::Migrator) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(set);
    for entry in std::fs::read_dir(&ours).expect("this build's migrations") {
        let entry = entry.expect("migration file");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy migration");
    }
    std::fs::write(dir.path().join("9000_from_a_newer_build.sql"), extra).expect("write migration");
    let migrator = sqlx::migrate::Migrator::new(dir.path())
        .await
        .expect("the newer build's migrations");
    (dir, migrator)
}

/// A SQLite queue on a temporary file: 3 deliveries, a 200 ms lease (the conformance suite's).
pub async fn sqlite_queue() -> (tempfile::TempDir, SqliteQueue) {
    let (dir, path) = temp_file("queue.db");
    let queue = SqliteQueue::open(&path, Duration::from_millis(200), 3)
        .await
        .expect("open queue");
    (dir, queue)
}

/// The factories' ledger in a SQLite store on a temporary file.
pub async fn sqlite_ledger() -> (tempfile::TempDir, String, SqliteFactoryLedger) {
    let (dir, path) = temp_file("store.db");
    let ledger = SqliteFactoryLedger::open(&path).await.expect("open ledger");
    (dir, path, ledger)
}

/// The admin connection's URL: `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`.
pub fn pg_admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

async fn pg_admin() -> PgConnection {
    match PgConnection::connect(&pg_admin_url()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at DATABASE_URL or the default \
             postgres://postgres@127.0.0.1:5432/test ({e}); run `scripts/engines.sh start`"
        ),
    }
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A PostgreSQL database of its own for one test (`homeostat_test_<pid>_<n>`), created from the
/// admin connection; [`PgDb::drop_db`] drops it, and databases left by crashed runs are dropped
/// by the next run.
pub struct PgDb {
    pub name: String,
    pub url: String,
}

impl PgDb {
    pub async fn create() -> Self {
        let mut admin = pg_admin().await;
        drop_stale_databases(&mut admin).await;
        let name = format!(
            "homeostat_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        let mut attempt = 0;
        loop {
            // Concurrent CREATE DATABASE from one template can collide; try again.
            match sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                .execute(&mut admin)
                .await
            {
                Ok(_) => break,
                Err(e) if attempt < 10 => {
                    attempt += 1;
                    eprintln!("CREATE DATABASE {name} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => panic!("CREATE DATABASE {name}: {e}"),
            }
        }
        let mut url = url::Url::parse(&pg_admin_url()).expect("DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Self {
            name,
            url: url.to_string(),
        }
    }

    /// Drop the database (and every connection still open to it).
    pub async fn drop_db(self) {
        let mut admin = pg_admin().await;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("drop test database");
    }
}

/// Drop test databases whose process is gone (a failed test does not drop its own).
async fn drop_stale_databases(admin: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'homeostat_test_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name.split('_').nth(2).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// Run `scripts/engines.sh <command>` (e.g. `restart-postgres`).
pub async fn engines_script(command: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/engines.sh");
    let command = command.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg(script).arg(&command).output()
    })
    .await
    .expect("join")
    .expect("run scripts/engines.sh");
    assert!(
        out.status.success(),
        "scripts/engines.sh failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Call `op` until it succeeds (every 200 ms, at most `limit` since `started`); the value and how
/// many calls failed first.
pub async fn until_ok<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    started: Instant,
    limit: Duration,
    mut op: F,
) -> (T, u32)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut failures = 0;
    loop {
        match op().await {
            Ok(v) => return (v, failures),
            Err(e) => {
                failures += 1;
                assert!(started.elapsed() < limit, "{what}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
