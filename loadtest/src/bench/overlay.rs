//! The benchmark's own keys, laid over a base organism configuration.
//!
//! The base is read as a plain [`toml::Table`] (not as `infra::RawConfig`), so keys the
//! benchmark does not know pass through untouched; the merged text is validated by
//! `infra::Config::parse` before any cell starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use toml::{Table, Value};

/// The loopback network the synthetic web is served on.
pub const WEB_NETWORK: &str = "127.0.0.1/32";

/// Merge `over` into `base`: tables are merged key by key, recursively; any other value of
/// `over` (arrays included) replaces the one in `base`.
pub fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(mine)), Value::Table(theirs)) => merge(mine, theirs),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// What the benchmark sets on every organism it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOverlay {
    /// `organism.data_dir`: a fresh directory per run.
    pub data_dir: PathBuf,
    /// The synthetic web's host suffix (`.test`) and where it is served.
    pub web_suffix: String,
    pub web_addr: SocketAddr,
    /// `crawler.fetch.per_host_rate`.
    pub per_host_rate: f64,
    /// `crawler.fetch.per_host_concurrency`.
    pub per_host_concurrency: u32,
    /// `crawler.worker.concurrency`.
    pub worker_concurrency: usize,
    /// `roles.crawler.min` (and `max`, if it is lower), when given.
    pub crawlers: Option<u32>,
    /// `queue.name`, when given (a unique name per run on a broker).
    pub queue_name: Option<String>,
    /// `engines.database = "sqlite"`: keep the store in the fresh data directory.
    pub sqlite_database: bool,
    /// `engines.queue = "sqlite"`: keep the queue in the fresh data directory.
    pub sqlite_queue: bool,
}

impl BenchOverlay {
    /// Lay the benchmark's keys over `base`. `api.listen` and `frontdoor.listen` are always
    /// `127.0.0.1:0` (free ports, so runs never collide with anything listening); the web's
    /// network is appended to `crawler.fetch.allow_addresses` (what the base allows stays
    /// allowed) and its suffix added to `crawler.fetch.resolve`.
    pub fn apply(&self, base: &mut Table) {
        let mut allow = base
            .get("crawler")
            .and_then(|c| c.get("fetch"))
            .and_then(|f| f.get("allow_addresses"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !allow.iter().any(|v| v.as_str() == Some(WEB_NETWORK)) {
            allow.push(Value::from(WEB_NETWORK));
        }
        let crawler_max = base
            .get("roles")
            .and_then(|r| r.get("crawler"))
            .and_then(|c| c.get("max"))
            .and_then(Value::as_integer);

        let mut over = Table::new();
        set(
            &mut over,
            &["organism", "data_dir"],
            Value::from(self.data_dir.to_string_lossy().to_string()),
        );
        set(&mut over, &["api", "listen"], Value::from("127.0.0.1:0"));
        set(
            &mut over,
            &["frontdoor", "listen"],
            Value::from("127.0.0.1:0"),
        );
        set(
            &mut over,
            &["crawler", "fetch", "resolve", &self.web_suffix],
            Value::from(self.web_addr.to_string()),
        );
        set(
            &mut over,
            &["crawler", "fetch", "allow_addresses"],
            Value::Array(allow),
        );
        set(
            &mut over,
            &["crawler", "fetch", "per_host_rate"],
            Value::from(self.per_host_rate),
        );
        set(
            &mut over,
            &["crawler", "fetch", "per_host_concurrency"],
            Value::from(i64::from(self.per_host_concurrency)),
        );
        set(
            &mut over,
            &["crawler", "worker", "concurrency"],
            Value::from(i64::try_from(self.worker_concurrency).unwrap_or(i64::MAX)),
        );
        if let Some(n) = self.crawlers {
            let n = i64::from(n);
            set(&mut over, &["roles", "crawler", "min"], Value::from(n));
            // The infra defaults fill a missing max with 8.
            let max = crawler_max.unwrap_or(8).max(n);
            set(&mut over, &["roles", "crawler", "max"], Value::from(max));
        }
        if let Some(name) = &self.queue_name {
            set(&mut over, &["queue", "name"], Value::from(name.as_str()));
        }
        if self.sqlite_database {
            set(&mut over, &["engines", "database"], Value::from("sqlite"));
        }
        if self.sqlite_queue {
            set(&mut over, &["engines", "queue"], Value::from("sqlite"));
        }
        merge(base, over);
    }
}

/// Parse `text` (named `source` in errors) as TOML, lay `overlay` over it, and render it.
pub fn apply_to_text(text: &str, source: &str, overlay: &BenchOverlay) -> anyhow::Result<String> {
    let mut table: Table = text
        .parse()
        .with_context(|| format!("reading {source} as TOML"))?;
    overlay.apply(&mut table);
    toml::to_string(&table).with_context(|| format!("rendering {source} with the bench's keys"))
}

/// The string value at `path` (e.g. `["engines", "database"]`), if any.
pub fn get_str<'a>(table: &'a Table, path: &[&str]) -> Option<&'a str> {
    let (last, parents) = path.split_last()?;
    let mut here = table;
    for key in parents {
        here = here.get(*key)?.as_table()?;
    }
    here.get(*last)?.as_str()
}

/// Set `path` in `table`, creating intermediate tables (and replacing non-tables on the way).
fn set(table: &mut Table, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut here = table;
    for key in parents {
        let entry = here
            .entry((*key).to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(next) = entry else {
            return; // replaced by a table just above
        };
        here = next;
    }
    here.insert((*last).to_string(), value);
}
