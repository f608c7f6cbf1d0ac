//! Starts the real `cell` binary as a whole organism against a synthetic web served by the test.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engines::Store;
use protocol::control::{CellRecord, CellsResponse};
use synthweb::{ServedLog, SyntheticWeb, WebSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Three machines of the `local` provider at 0.50 an hour each (a process group each, with a
/// disk of its own under the organism's data directory).
pub const THREE_LOCAL_MACHINES: &str = r#"
[[server]]
name = "box-1"
provider = "local"
hourly_cost = 0.50

[[server]]
name = "box-2"
provider = "local"
hourly_cost = 0.50

[[server]]
name = "box-3"
provider = "local"
hourly_cost = 0.50
"#;

/// The synthetic web a test's organism crawls, served until dropped.
pub type Web = synthweb::Serving;

/// Serve the web `spec` generates on loopback, keeping every request in its log.
pub async fn serve_web(spec: WebSpec) -> Web {
    synthweb::Serving::start(Arc::new(SyntheticWeb::generate(&spec)), ServedLog::new())
        .await
        .expect("serve the synthetic web")
}

/// The organisms of one test binary run one after the other. Each is a dozen processes whose
/// subject is often how a failure detector judges silence; two booting at once on a two-core
/// machine starve each other's heartbeats (a false death that is the machine's, not the code's),
/// and `cargo test` runs the binaries themselves one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Organism {
    pub child: Child,
    pub dir: tempfile::TempDir,
    /// The first front door: where clients go.
    pub api: String,
    pub frontdoors: Vec<String>,
    pub healthcheckers: Vec<String>,
    pub client: reqwest::Client,
    /// Held while this organism lives (see [`ONE_AT_A_TIME`]); released when it is dropped,
    /// also when its test panics.
    _alone: tokio::sync::MutexGuard<'static, ()>,
}

/// The `cell` binary as the tests run it: with the support's cluster key, logging at
/// `HOMEOSTAT_TEST_LOG` (default `warn`) to the test's stderr, stdout piped, killed on drop.
pub fn cell_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cell"));
    command
        .env(
            "HOMEOSTAT_LOG",
            std::env::var("HOMEOSTAT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env(control::KEY_ENV, test_key().to_hex())
        .env_remove(control::KEY_FILE_ENV)
        // The test's infra file names the engines; the environment must not redirect them.
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

/// An organism on a web `spec` generates, configured with `extra`, that has crawled the web's
/// seeds to the end.
pub async fn crawled(spec: WebSpec, extra: &str) -> (Web, Organism) {
    let web = serve_web(spec).await;
    let org = Organism::on(&web, 200.0, extra).await;
    org.crawl(&web.web.seeds()).await;
    org.wait_drained(Duration::from_secs(120), |_| {}).await;
    (web, org)
}

/// The organism's configuration for a test: everything on loopback, short leases. Cells do
/// not regulate their own number (a test of another subject counts its cells) unless `extra`
/// has a `[homeostasis]` section.
pub fn infra_toml(dir: &std::path::Path, web: &Web, per_host_rate: f64, extra: &str) -> String {
    let homeostasis = if extra.contains("[homeostasis]") {
        ""
    } else {
        "[homeostasis]\nroles = []\n"
    };
    format!(
        r#"
[organism]
data_dir = "{data}"

[queue]
lease_secs = 3
max_deliveries = 5

[api]
listen = "127.0.0.1:0"

[frontdoor]
listen = "127.0.0.1:0"

[crawler.fetch]
per_host_rate = {per_host_rate:.1}
per_host_concurrency = 4
allow_addresses = ["127.0.0.1/32"]
connect_timeout_ms = 2000
total_timeout_ms = 5000

[crawler.fetch.resolve]
"{suffix}" = "{addr}"

{homeostasis}
{extra}
"#,
        data = dir.join("data").display(),
        suffix = web.web.host_suffix(),
        addr = web.addr,
    )
}

/// The cluster key the test organisms run with (given to `cell up` in its environment), so the
/// tests can sign as a cell would and read the registry with the read token in cluster mode.
pub fn test_key() -> control::ClusterKey {
    control::ClusterKey::new(b"homeostat cell tests' cluster key".to_vec())
}

/// A client that presents the organism's read token.
pub fn reading_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&test_key().read_authorization())
            .expect("hex is a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

impl Organism {
    /// An organism crawling `web` (at `per_host_rate`), configured by [`infra_toml`] with
    /// `extra`, in a temporary directory of its own.
    pub async fn on(web: &Web, per_host_rate: f64, extra: &str) -> Organism {
        let dir = tempfile::tempdir().expect("tempdir");
        Organism::up(&infra_toml(dir.path(), web, per_host_rate, extra), dir).await
    }

    /// `cell up --infra FILE` and wait for its cells.
    pub async fn up(infra: &str, dir: tempfile::TempDir) -> Organism {
        Organism::up_with(infra, dir, &[]).await
    }

    /// `cell up --infra FILE ARGS...` (e.g. `--demo`) and wait for its cells.
    pub async fn up_with(infra: &str, dir: tempfile::TempDir, args: &[&str]) -> Organism {
        let alone = ONE_AT_A_TIME.lock().await;
        let path = dir.path().join("organism.toml");
        std::fs::write(&path, infra).expect("write infra");
        let mut child = cell_command()
            .arg("up")
            .arg("--infra")
            .arg(&path)
            .arg("--grace-secs")
            .arg("5")
            // A test killed outright (SIGTERM, SIGKILL: no Drop runs) takes its organism along.
            .arg("--die-with-parent")
            .args(args)
            .spawn()
            .expect("start cell up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            // `cell up` says where everything is in one line of versioned JSON, for tools.
            while let Ok(Some(line)) = lines.next_line().await {
                let ready = protocol::OrganismReady::parse(&line)
                    .unwrap_or_else(|e| panic!("cell up printed a bad ready line: {e}: {line}"));
                if let Some(ready) = ready {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(ready);
                    }
                }
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(120), rx)
            .await
            .expect("organism up within 120 s")
            .expect("cell up printed its ready line");
        let (frontdoors, healthcheckers) = (ready.frontdoors, ready.healthcheckers);
        Organism {
            child,
            dir,
            api: frontdoors[0].clone(),
            frontdoors,
            healthcheckers,
            client: reading_client(),
            _alone: alone,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub async fn crawl(&self, seeds: &[String]) -> serde_json::Value {
        let resp = self
            .client
            .post(format!("{}/crawl", self.api))
            .json(&serde_json::json!({ "seeds": seeds }))
            .send()
            .await
            .expect("POST /crawl");
        assert_eq!(resp.status(), 202);
        resp.json().await.expect("json")
    }

    pub async fn stats(&self) -> protocol::Stats {
        self.client
            .get(format!("{}/stats", self.api))
            .send()
            .await
            .expect("GET /stats")
            .json()
            .await
            .expect("stats json")
    }

    /// Wait until every accepted URL has ended, calling `during` with each stats snapshot.
    pub async fn wait_drained(
        &self,
        limit: Duration,
        mut during: impl FnMut(&protocol::Stats),
    ) -> protocol::Stats {
        let started = tokio::time::Instant::now();
        let mut drained_twice = 0;
        // The last figures read, and when the crawled count last moved: a timeout says both.
        let mut last: Option<protocol::Stats> = None;
        let mut moved = started;
        loop {
            if let Ok(resp) = self.client.get(format!("{}/stats", self.api)).send().await {
                if let Ok(stats) = resp.json::<protocol::Stats>().await {
                    if last
                        .as_ref()
                        .is_none_or(|l| l.frontier.crawled != stats.frontier.crawled)
                    {
                        moved = tokio::time::Instant::now();
                    }
                    last = Some(stats.clone());
                    during(&stats);
                    if stats.frontier.drained() && stats.frontier.crawled > 0 {
                        drained_twice += 1;
                        if drained_twice >= 2 {
                            return stats;
                        }
                    } else {
                        drained_twice = 0;
                    }
                }
            }
            assert!(
                started.elapsed() < limit,
                "frontier did not drain within {limit:?}; the crawled count last moved {:?} \
                 after the start; last /stats: {last:?}",
                moved.duration_since(started)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn search(&self, q: &str, limit: u32) -> protocol::SearchResponse {
        self.client
            .get(format!("{}/search", self.api))
            .query(&[("q", q), ("limit", &limit.to_string())])
            .send()
            .await
            .expect("GET /search")
            .json()
            .await
            .expect("search json")
    }

    pub async fn indexed(&self) -> BTreeSet<String> {
        let path = self.data_dir().join("store.db");
        let store = engines::sqlite::SqliteStore::open(path.to_str().expect("utf-8"))
            .await
            .expect("open the organism's store");
        store
            .indexed_urls()
            .await
            .expect("indexed urls")
            .into_iter()
            .collect()
    }

    /// The indexed set of an organism whose store is PostgreSQL at `url`.
    pub async fn indexed_pg(&self, url: &str) -> BTreeSet<String> {
        let store = engines::postgres::PgStore::connect(url)
            .await
            .expect("connect to the organism's PostgreSQL store");
        store
            .indexed_urls()
            .await
            .expect("indexed urls")
            .into_iter()
            .collect()
    }

    /// The events the first health checker holds (`GET /events?since=0`: its ring, replayed),
    /// read for half a second.
    pub async fn events(&self) -> Vec<protocol::control::CellEvent> {
        use protocol::events::{interpret, SseParser, StreamItem};
        let url = format!("{}/events?since=0", self.healthcheckers[0]);
        let mut resp = self.client.get(&url).send().await.expect("GET /events");
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, resp.chunk()).await {
            for msg in parser.feed(&chunk) {
                if let StreamItem::Cell(e) = interpret(&msg) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// The live cells of `role`, from the first health checker that answers.
    pub async fn cells_of(&self, role: &str) -> Vec<CellRecord> {
        for hc in &self.healthcheckers {
            let Ok(resp) = self.client.get(format!("{hc}/cells")).send().await else {
                continue;
            };
            if let Ok(cells) = resp.json::<CellsResponse>().await {
                return cells.roles.get(role).cloned().unwrap_or_default();
            }
        }
        Vec::new()
    }

    /// Wait until `role` has at least `n` live cells.
    pub async fn wait_cells(&self, role: &str, n: usize, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.cells_of(role).await.len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} {role} cells within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `role` has `n` live cells none of which is in `gone`.
    pub async fn wait_replaced(
        &self,
        role: &str,
        n: usize,
        gone: &[String],
        limit: Duration,
    ) -> Vec<CellRecord> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let cells = self.cells_of(role).await;
            if cells.len() >= n && cells.iter().all(|c| !gone.contains(&c.cell_id)) {
                return cells;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{role} not back to {n} cells without {gone:?} within {limit:?}: {cells:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM `cell up` and wait for it to drain and exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("cell up stops within 30 s")
            .expect("wait");
        assert!(status.success(), "cell up exited with {status}");
    }
}

pub fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
}

/// Compare the indexed set with the oracle's, printing the difference when they differ.
pub fn assert_exact(web: &SyntheticWeb, indexed: &BTreeSet<String>, expected: &BTreeSet<String>) {
    if indexed == expected {
        return;
    }
    let missing: Vec<_> = expected.difference(indexed).take(10).collect();
    let extra: Vec<_> = indexed.difference(expected).take(10).collect();
    let describe = |u: &&String| format!("{u} ({})", web.describe(u));
    panic!(
        "indexed {} pages, oracle expects {}.\nmissing: {:#?}\nextra: {:#?}",
        indexed.len(),
        expected.len(),
        missing.iter().map(describe).collect::<Vec<_>>(),
        extra.iter().map(describe).collect::<Vec<_>>()
    );
}

/// The PostgreSQL server the cluster tests create their databases on.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The RabbitMQ broker of the cluster tests.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh database for one organism, named `{prefix}_{pid}_{n}`: its name and URL. Dropped by
/// [`drop_database`].
pub async fn fresh_database(prefix: &str) -> (String, String) {
    use sqlx::Connection as _;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("PostgreSQL answers (run scripts/engines.sh start)");
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.expect(&sql);
    }
    let mut url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    (name, url.to_string())
}

pub async fn drop_database(name: &str) {
    use sqlx::Connection as _;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

/// Delete queue `name` on the broker at `url` with its dead-letter and delay queues: a test
/// organism's queues are never used again, and every quorum queue left behind holds file handles
/// on the broker (a broker out of them stops accepting connections).
pub async fn delete_queues(url: &str, name: &str) {
    if let Err(e) = engines::rabbitmq::delete_queues(url, name).await {
        panic!(
            "deleting the test's queues {name} on {}: {e}",
            infra::redact(url)
        );
    }
}

/// `toml` with its queue named `name` (a queue of its own on a shared broker).
pub fn with_queue_name(toml: &str, name: &str) -> String {
    toml.replacen(
        "[queue]\n",
        &format!("[queue]\nname = \"{name}\"\nprefetch = 32\n"),
        1,
    )
}
