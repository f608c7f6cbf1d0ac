//! The organism's configuration: the TOML files in `infra/` and their validation.
//!
//! Two layers: [`RawConfig`] is what serde reads (every key optional, unknown keys refused),
//! [`Config::from_raw`] checks fields against each other and reports every problem with its file
//! and key before failing. Secrets are never read from these files: engine URLs may be given by
//! the environment (`DATABASE_URL`, `AMQP_URL`), and credentials live there.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod pool;

/// The embedded default organism (`infra/organism.toml`).
pub const DEFAULT_ORGANISM: &str = include_str!("../organism.toml");
pub const DEFAULT_NAME: &str = "<embedded infra/organism.toml>";

/// The exit code for bad configuration (EX_CONFIG is 78; sysexits' EX_USAGE 64 is what the house
/// style asks for, and what scripts here test for).
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub organism: Organism,
    pub roles: BTreeMap<String, RoleBounds>,
    pub engines: Engines,
    pub queue: QueueSettings,
    pub api: api::ApiConfig,
    pub crawler: CrawlerSettings,
    pub healthchecker: healthchecker::HealthcheckerConfig,
    pub frontdoor: frontdoor::FrontdoorConfig,
    pub demo: Demo,
    pub pool: PoolSection,
    pub homeostasis: HomeostasisSection,
}

/// `[pool]`: where the server pool and the purse are, and how machines are brought up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSection {
    /// The pool file (`infra/pool.toml`); empty: no pool, every cell is a process of this
    /// machine. Relative to the organism file's directory.
    pub file: String,
    /// The budget file (`infra/budget.toml`); required with `file`.
    pub budget: String,
    /// The roles whose cells come from pool machines (fixed-address roles never do).
    pub roles: Vec<String>,
    /// From power-on to a live cell, seconds.
    pub boot_timeout_secs: u64,
    /// Power-on attempts per server before it is quarantined.
    pub max_attempts: u32,
    /// The first pause between attempts, seconds (doubled each time).
    pub backoff_secs: f64,
    pub power_ons_per_minute: u32,
    pub power_offs_per_minute: u32,
    /// How long a join token lives, seconds.
    pub token_ttl_secs: u64,
    /// Where machines without user data find their join data (`<server>.join`); empty: none.
    pub boot_dir: String,
}

impl Default for PoolSection {
    fn default() -> Self {
        Self {
            file: String::new(),
            budget: String::new(),
            roles: vec!["api".into(), "crawler".into()],
            boot_timeout_secs: 300,
            max_attempts: 3,
            backoff_secs: 5.0,
            power_ons_per_minute: 20,
            power_offs_per_minute: 20,
            token_ttl_secs: 900,
            boot_dir: String::new(),
        }
    }
}

/// How cells regulate their own number (`lifecycle::homeostasis`): every cell of these roles
/// watches its pressure and its siblings', divides when the role is overloaded and retires when
/// it is idle, within `[roles.ROLE]` min and max.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HomeostasisSection {
    /// The roles whose cells regulate themselves (the health checkers' surplus retirement
    /// leaves them alone). Empty: none; the health checkers keep minimums and retire surplus.
    pub roles: Vec<String>,
    /// Above this mean pressure (1.0 = at capacity) a role is overloaded.
    pub high: f64,
    /// Below this pressure a cell is idle.
    pub low: f64,
    /// The pressure a role is sized for: between low and high.
    pub target: f64,
    /// How long an overload must hold before a cell divides, seconds.
    pub grow_confirm_secs: f64,
    /// How long a cell must stay idle before it retires, seconds.
    pub shrink_confirm_secs: f64,
    /// Least time between two divisions asked by one cell, seconds.
    pub grow_cooldown_secs: f64,
    /// Least time between two retirement rounds of a role, seconds.
    pub shrink_cooldown_secs: f64,
    /// No retirement while the role's youngest cell is younger than this, seconds.
    pub shrink_after_grow_secs: f64,
    /// Cells asked per division at least (a division asks up to doubling the role).
    pub grow_step: u32,
    /// An overloaded api first sheds optional work (it keeps the links of the pages it ingests
    /// aside, offered once the load falls) and divides only if the overload holds (seed 003).
    pub throttle_first: bool,
    /// Fatigue: a cell whose own processing time grows on the same work divides before it
    /// fails, and asks for its replacement if it stays sick.
    pub fatigue: FatigueSection,
}

/// `[homeostasis.fatigue]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FatigueSection {
    /// The roles that measure their processing time per unit of work (crawler: per page
    /// parsed). Empty: no cell acts on fatigue.
    pub roles: Vec<String>,
    /// Sick when the recent processing time is this many times the cell's own baseline.
    pub ratio: f64,
    /// How long the sickness must hold before the cell divides, seconds.
    pub window_secs: f64,
    /// How long it must hold before the cell asks for its replacement and retires, seconds.
    pub replace_after_secs: f64,
}

impl Default for FatigueSection {
    fn default() -> Self {
        Self {
            roles: vec!["crawler".into()],
            ratio: 3.0,
            window_secs: 15.0,
            replace_after_secs: 60.0,
        }
    }
}

impl Default for HomeostasisSection {
    fn default() -> Self {
        Self {
            roles: vec!["api".into(), "crawler".into()],
            high: 0.8,
            low: 0.3,
            target: 0.6,
            grow_confirm_secs: 1.5,
            shrink_confirm_secs: 10.0,
            grow_cooldown_secs: 3.0,
            shrink_cooldown_secs: 5.0,
            shrink_after_grow_secs: 30.0,
            grow_step: 4,
            throttle_first: true,
            fatigue: FatigueSection::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Organism {
    pub name: String,
    pub data_dir: PathBuf,
}

impl Default for Organism {
    fn default() -> Self {
        Self {
            name: "homeostat".into(),
            data_dir: PathBuf::from("homeostat-data"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBounds {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Engines {
    pub database: String,
    pub queue: String,
}

impl Default for Engines {
    fn default() -> Self {
        Self {
            database: "sqlite".into(),
            queue: "sqlite".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    pub lease_secs: u64,
    pub max_deliveries: u32,
    /// The queue's name on a broker.
    pub name: String,
    /// Unacknowledged jobs a broker hands one crawler at once.
    pub prefetch: u16,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease_secs: 60,
            max_deliveries: 5,
            name: "homeostat.crawl".into(),
            prefetch: 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CrawlerSettings {
    pub fetch: crawler::FetchConfig,
    pub worker: crawler::WorkerConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Demo {
    pub seed: u64,
    pub pages: usize,
    pub hosts: usize,
    pub latency_ms: u64,
    pub per_host_rate: f64,
    pub per_host_concurrency: u32,
}

impl Default for Demo {
    fn default() -> Self {
        Self {
            seed: 7,
            pages: 5000,
            hosts: 40,
            latency_ms: 0,
            per_host_rate: 200.0,
            per_host_concurrency: 8,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub raw: RawConfig,
    /// Where it came from, for messages.
    pub source: String,
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad configuration in {}:", self.file)?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.key, p.reason)?;
        }
        Ok(())
    }
}

/// What an engine setting resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineUrl {
    /// A SQLite file path.
    Sqlite(PathBuf),
    Postgres(String),
    Amqp(String),
}

impl Config {
    /// The embedded default.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_ORGANISM, DEFAULT_NAME)
    }

    /// Read and validate a file (or the embedded default when `path` is None).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::embedded(),
            Some(path) => {
                let (name, text) = read_file(path)?;
                let mut cfg = Self::parse(&text, &name)?;
                // The pool's files are relative to this file: made absolute now, so a copy of
                // the configuration (what `cell up` gives its cells) still finds them.
                let pool = &mut cfg.raw.pool;
                for value in [&mut pool.file, &mut pool.budget, &mut pool.boot_dir] {
                    if !value.is_empty() && Path::new(value.as_str()).is_relative() {
                        let dir = path.parent().unwrap_or(Path::new(""));
                        *value = std::path::absolute(dir.join(&*value))
                            .unwrap_or_else(|_| dir.join(&*value))
                            .to_string_lossy()
                            .into_owned();
                    }
                }
                Ok(cfg)
            }
        }
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_toml(text, file)?;
        Self::from_raw(raw, file)
    }

    /// Check everything; report every problem at once.
    pub fn from_raw(mut raw: RawConfig, file: &str) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut push = |key: String, reason: String| problems.push(Problem { key, reason });
        // Roles: the two the loop needs must be there; the defaults fill them.
        // Two apis: a client request passes through an api, so one dying costs no request.
        raw.roles
            .entry("api".into())
            .or_insert(RoleBounds { min: 2, max: 4 });
        raw.roles
            .entry("crawler".into())
            .or_insert(RoleBounds { min: 2, max: 8 });
        raw.roles
            .entry("healthchecker".into())
            .or_insert(RoleBounds { min: 2, max: 2 });
        raw.roles
            .entry("frontdoor".into())
            .or_insert(RoleBounds { min: 2, max: 4 });
        for (name, b) in &raw.roles {
            if !ROLES.contains(&name.as_str()) {
                push(
                    format!("roles.{name}"),
                    format!("unknown role; roles are {}", ROLES.join(", ")),
                );
            }
            if b.min > b.max {
                push(
                    format!("roles.{name}.min"),
                    format!("min ({}) is above max ({})", b.min, b.max),
                );
            }
        }
        for needed in ["api", "crawler"] {
            if raw.roles.get(needed).is_some_and(|b| b.min == 0) {
                push(
                    format!("roles.{needed}.min"),
                    "must be at least 1: the crawl loop needs this role".into(),
                );
            }
        }
        if raw.organism.name.trim().is_empty() {
            push("organism.name".into(), "must not be empty".into());
        }
        if raw.organism.data_dir.as_os_str().is_empty() {
            push("organism.data_dir".into(), "must not be empty".into());
        }
        for (key, value) in [
            ("engines.database", &raw.engines.database),
            ("engines.queue", &raw.engines.queue),
        ] {
            if let Err(reason) = classify(value, key) {
                push(key.into(), reason);
            }
        }
        // The environment overrides the engines: checked like the file, named by variable.
        for (var, key) in [
            ("DATABASE_URL", "engines.database"),
            ("AMQP_URL", "engines.queue"),
        ] {
            if let Some(value) = std::env::var_os(var) {
                match value.into_string() {
                    Ok(v) if v.is_empty() => {}
                    Ok(v) => {
                        if let Err(reason) = classify(&v, key) {
                            push(format!("{var} (environment, overrides {key})"), reason);
                        }
                    }
                    Err(_) => push(
                        format!("{var} (environment, overrides {key})"),
                        "is not valid UTF-8".into(),
                    ),
                }
            }
        }
        if !raw.healthchecker.minimums.is_empty() {
            let moved: Vec<String> = raw
                .healthchecker
                .minimums
                .iter()
                .map(|(role, n)| format!("[roles.{role}] min = {n}"))
                .collect();
            push(
                "healthchecker.minimums".into(),
                format!(
                    "is no longer read: a role's minimum is one setting, [roles.ROLE].min \
                     (write {} instead)",
                    moved.join(", ")
                ),
            );
        }
        if raw.queue.lease_secs == 0 {
            push("queue.lease_secs".into(), "must be at least 1".into());
        }
        if raw.queue.max_deliveries == 0 {
            push("queue.max_deliveries".into(), "must be at least 1".into());
        }
        if raw.queue.prefetch == 0 {
            push("queue.prefetch".into(), "must be at least 1".into());
        }
        for (k, r) in raw.api.problems() {
            push(format!("api.{k}"), r);
        }
        if let Err(list) = raw.crawler.fetch.validate() {
            for (k, r) in list {
                push(format!("crawler.fetch.{k}"), r);
            }
        }
        for (k, r) in raw.crawler.worker.problems() {
            push(format!("crawler.worker.{k}"), r);
        }
        for (k, r) in raw.healthchecker.problems() {
            push(format!("healthchecker.{k}"), r);
        }
        for (k, r) in raw.frontdoor.problems() {
            push(format!("frontdoor.{k}"), r);
        }
        if raw.demo.pages == 0 || raw.demo.hosts == 0 {
            push(
                "demo.pages".into(),
                "pages and hosts must be at least 1".into(),
            );
        }
        if !(raw.demo.per_host_rate.is_finite() && raw.demo.per_host_rate > 0.0) {
            push(
                "demo.per_host_rate".into(),
                "must be a positive number".into(),
            );
        }
        {
            let p = &raw.pool;
            if !p.file.is_empty() && p.budget.is_empty() {
                push(
                    "pool.budget".into(),
                    "is required with pool.file: no machine is powered on without a cap".into(),
                );
            }
            for role in &p.roles {
                if !["api", "crawler"].contains(&role.as_str()) {
                    push(
                        "pool.roles".into(),
                        format!("{role:?}: only api and crawler cells come from the pool"),
                    );
                }
            }
            for (key, zero) in [
                ("pool.boot_timeout_secs", p.boot_timeout_secs == 0),
                ("pool.max_attempts", p.max_attempts == 0),
                ("pool.power_ons_per_minute", p.power_ons_per_minute == 0),
                ("pool.power_offs_per_minute", p.power_offs_per_minute == 0),
                ("pool.token_ttl_secs", p.token_ttl_secs == 0),
            ] {
                if zero {
                    push(key.into(), "must be at least 1".into());
                }
            }
            if !(p.backoff_secs.is_finite() && p.backoff_secs >= 0.0) {
                push(
                    "pool.backoff_secs".into(),
                    "must be a number, 0 or more".into(),
                );
            }
        }
        let h = &raw.homeostasis;
        for role in &h.roles {
            if !["api", "crawler"].contains(&role.as_str()) {
                push(
                    "homeostasis.roles".into(),
                    format!("{role:?}: only api and crawler cells regulate their number"),
                );
            }
        }
        if !(h.low > 0.0 && h.low < h.target && h.target < h.high && h.high.is_finite()) {
            push(
                "homeostasis".into(),
                format!(
                    "the marks must satisfy 0 < low < target < high: low {}, target {}, high {}",
                    h.low, h.target, h.high
                ),
            );
        }
        for (key, secs) in [
            ("homeostasis.grow_confirm_secs", h.grow_confirm_secs),
            ("homeostasis.shrink_confirm_secs", h.shrink_confirm_secs),
            ("homeostasis.grow_cooldown_secs", h.grow_cooldown_secs),
            ("homeostasis.shrink_cooldown_secs", h.shrink_cooldown_secs),
            (
                "homeostasis.shrink_after_grow_secs",
                h.shrink_after_grow_secs,
            ),
        ] {
            if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
                push(
                    key.into(),
                    "must be a number of seconds from 0 to 86400".into(),
                );
            }
        }
        if h.grow_step == 0 {
            push("homeostasis.grow_step".into(), "must be at least 1".into());
        }
        let f = &h.fatigue;
        for role in &f.roles {
            if role != "crawler" {
                push(
                    "homeostasis.fatigue.roles".into(),
                    format!("{role:?}: only crawler cells measure their processing time"),
                );
            }
        }
        if !(f.ratio.is_finite() && f.ratio > 1.0) {
            push(
                "homeostasis.fatigue.ratio".into(),
                format!(
                    "must be a number above 1 (times the baseline); got {}",
                    f.ratio
                ),
            );
        }
        for (key, secs) in [
            ("homeostasis.fatigue.window_secs", f.window_secs),
            (
                "homeostasis.fatigue.replace_after_secs",
                f.replace_after_secs,
            ),
        ] {
            if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
                push(
                    key.into(),
                    "must be a number of seconds from 0 to 86400".into(),
                );
            }
        }
        if f.replace_after_secs < f.window_secs {
            push(
                "homeostasis.fatigue.replace_after_secs".into(),
                format!(
                    "must be at least window_secs ({}): a cell divides before it is replaced",
                    f.window_secs
                ),
            );
        }
        if problems.is_empty() {
            Ok(Self {
                raw,
                source: file.to_string(),
            })
        } else {
            Err(ConfigError {
                file: file.to_string(),
                problems,
            })
        }
    }

    /// A path from `[pool]` (made absolute by [`Config::load`], relative to the organism file).
    pub fn pool_path(&self, value: &str) -> Option<PathBuf> {
        (!value.is_empty()).then(|| PathBuf::from(value))
    }

    /// The pool and budget files, loaded and checked, when `[pool] file` is set.
    pub fn pool_files(&self) -> Result<Option<(pool::PoolFile, pool::BudgetFile)>, ConfigError> {
        let Some(file) = self.pool_path(&self.raw.pool.file) else {
            return Ok(None);
        };
        let budget = self
            .pool_path(&self.raw.pool.budget)
            .unwrap_or_else(|| PathBuf::from("budget.toml"));
        Ok(Some((
            pool::PoolFile::load(&file)?,
            pool::BudgetFile::load(&budget)?,
        )))
    }

    /// The store engine, with `DATABASE_URL` taking precedence.
    pub fn database(&self) -> EngineUrl {
        let value = std::env::var("DATABASE_URL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.raw.engines.database.clone());
        self.resolve_engine(&value, "store.db")
    }

    /// The queue engine, with `AMQP_URL` taking precedence.
    pub fn queue(&self) -> EngineUrl {
        let value = std::env::var("AMQP_URL")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.raw.engines.queue.clone());
        self.resolve_engine(&value, "queue.db")
    }

    fn resolve_engine(&self, value: &str, file: &str) -> EngineUrl {
        if value == "sqlite" {
            return EngineUrl::Sqlite(self.raw.organism.data_dir.join(file));
        }
        if let Some(path) = value.strip_prefix("sqlite://") {
            return EngineUrl::Sqlite(PathBuf::from(path));
        }
        if let Some(path) = value.strip_prefix("sqlite:") {
            return EngineUrl::Sqlite(PathBuf::from(path));
        }
        if value.starts_with("amqp") {
            return EngineUrl::Amqp(value.to_string());
        }
        EngineUrl::Postgres(value.to_string())
    }

    /// The configuration as TOML, to hand to child cells.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.raw).expect("a validated configuration always serializes")
    }

    /// The health checker's settings, with the minimums it keeps: `[roles.*].min`.
    pub fn healthchecker(&self) -> healthchecker::HealthcheckerConfig {
        let mut hc = self.raw.healthchecker.clone();
        hc.minimums = self
            .raw
            .roles
            .iter()
            .map(|(role, b)| (role.clone(), b.min))
            .collect();
        hc.regulated = self.raw.homeostasis.roles.iter().cloned().collect();
        hc
    }

    /// Most cells per role (`[roles.*].max`).
    pub fn maxima(&self) -> BTreeMap<String, u32> {
        self.raw
            .roles
            .iter()
            .map(|(role, b)| (role.clone(), b.max))
            .collect()
    }

    pub fn bounds(&self, role: &str) -> RoleBounds {
        self.raw
            .roles
            .get(role)
            .copied()
            .unwrap_or(RoleBounds { min: 0, max: 0 })
    }
}

/// The roles a cell can take.
pub const ROLES: &[&str] = &["api", "crawler", "healthchecker", "frontdoor", "factory"];

fn classify(value: &str, key: &str) -> Result<(), String> {
    let shown = redact(value);
    let wanted = if key == "engines.database" {
        "\"sqlite\", a sqlite: path or a postgres:// URL"
    } else {
        "\"sqlite\", a sqlite: path or an amqp:// URL"
    };
    if value == "sqlite" {
        return Ok(());
    }
    if let Some(path) = value.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        return if path.is_empty() {
            Err(format!("{shown:?} names no file: {wanted}"))
        } else {
            Ok(())
        };
    }
    let schemes: &[&str] = if key == "engines.database" {
        &["postgres", "postgresql"]
    } else {
        &["amqp", "amqps"]
    };
    // Replicated engines: the nodes of a RabbitMQ cluster as a comma-separated list of URLs,
    // the servers of a PostgreSQL cluster as a libpq host list (`postgres://u@h1:p1,h2:p2/db`).
    if key == "engines.queue" && value.contains(',') {
        return value
            .split(',')
            .try_for_each(|one| classify(one.trim(), key));
    }
    if key == "engines.database" {
        if let Some((scheme, rest)) = value.split_once("://") {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let (userinfo, hosts) = match authority.rfind('@') {
                Some(at) => authority.split_at(at + 1),
                None => ("", authority),
            };
            if hosts.contains(',') {
                return hosts.split(',').try_for_each(|host| {
                    if host.is_empty() {
                        Err(format!(
                            "{shown:?} has an empty host in its host list: {wanted}"
                        ))
                    } else {
                        classify(&format!("{scheme}://{userinfo}{host}{tail}"), key)
                    }
                });
            }
        }
    }
    let url =
        url::Url::parse(value).map_err(|e| format!("{shown:?} is not a URL ({e}): {wanted}"))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!("{shown:?} is not {wanted}"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown:?} names no host: {wanted}"));
    }
    Ok(())
}

/// A URL (or a comma-separated list of URLs) with its passwords hidden, for messages.
pub fn redact(value: &str) -> String {
    if value.contains(',') && value.split(',').all(|one| one.contains("://")) {
        return value.split(',').map(redact).collect::<Vec<_>>().join(",");
    }
    if let Ok(mut u) = url::Url::parse(value) {
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
            return u.to_string();
        }
        if u.has_host() || !value.contains('@') {
            return value.to_string();
        }
    }
    // Not a URL with a host, yet something@: hide what comes before the '@'.
    match value.rfind('@') {
        Some(at) => {
            let start = value.find("://").map(|s| s + 3).unwrap_or(0).min(at);
            format!("{}***{}", &value[..start], &value[at..])
        }
        None => value.to_string(),
    }
}

/// A configuration file's text and the name messages give it.
pub(crate) fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: name.clone(),
        problems: vec![Problem {
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        }],
    })?;
    Ok((name, text))
}

/// Serde's reading of a TOML file, its error named by line.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_string(),
        problems: vec![Problem {
            key: e
                .span()
                .map(|s| format!("(line {})", line_of(text, s.start)))
                .unwrap_or_else(|| "(toml)".into()),
            reason: e.message().to_string(),
        }],
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid() {
        let cfg = Config::embedded().expect("valid");
        assert_eq!(cfg.bounds("crawler").min, 2);
        assert!(
            matches!(cfg.database(), EngineUrl::Sqlite(_)) || std::env::var("DATABASE_URL").is_ok()
        );
        // It round-trips through the TOML handed to child cells.
        let again = Config::parse(&cfg.to_toml(), "again").expect("round trip");
        assert_eq!(again.raw, cfg.raw);
    }

    #[test]
    fn every_problem_is_named_with_file_and_key() {
        let text = r#"
[roles.api]
min = 3
max = 1
[roles.wizard]
min = 1
max = 1
[engines]
database = "mysql://nope"
[queue]
lease_secs = 0
[api]
listen = "everywhere"
"#;
        let err = Config::parse(text, "bad.toml").expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "bad.toml",
            "roles.api.min",
            "roles.wizard",
            "engines.database",
            "queue.lease_secs",
            "api.listen",
        ] {
            assert!(msg.contains(needle), "{needle} missing from: {msg}");
        }
    }

    #[test]
    fn the_old_minimums_key_is_refused_with_the_way_to_the_new_one() {
        let err =
            Config::parse("[healthchecker.minimums]\napi = 3\n", "old.toml").expect_err("old key");
        let msg = err.to_string();
        assert!(
            msg.contains("healthchecker.minimums") && msg.contains("[roles.api] min = 3"),
            "{msg}"
        );
        let cfg = Config::parse("[roles.api]\nmin = 3\nmax = 5\n", "new.toml").expect("valid");
        assert_eq!(cfg.healthchecker().minimums["api"], 3);
        assert_eq!(cfg.healthchecker().minimums["crawler"], 2);
        assert_eq!(cfg.maxima()["api"], 5);
        // The effective file handed to cells does not write the old key back.
        assert!(!cfg.to_toml().contains("minimums"), "{}", cfg.to_toml());
    }

    #[test]
    fn the_replicated_engines_file_names_every_node() {
        let cfg = Config::parse(include_str!("../cluster-ha.toml"), "cluster-ha.toml")
            .expect("infra/cluster-ha.toml is valid");
        assert_eq!(
            cfg.raw.engines.database.matches("127.0.0.1:600").count(),
            2,
            "a primary and a standby"
        );
        assert_eq!(
            cfg.raw.engines.queue.split(',').count(),
            3,
            "three RabbitMQ nodes"
        );
    }

    #[test]
    fn engine_urls_are_checked_and_secrets_hidden() {
        for (value, key) in [
            ("sqlite", "engines.database"),
            ("sqlite:///tmp/x.db", "engines.database"),
            ("postgres://u:p@db.example:5432/x", "engines.database"),
            ("amqps://u:p@mq.example/%2f", "engines.queue"),
            (
                "postgres://u:p@h1:5001,h2:5002/x?target_session_attrs=read-write",
                "engines.database",
            ),
            (
                "amqp://u:p@h1:5681/%2f,amqp://u:p@h2:5682/%2f",
                "engines.queue",
            ),
        ] {
            assert_eq!(classify(value, key), Ok(()), "{value}");
        }
        for (value, key) in [
            ("mysql://u:hunter2@db/x", "engines.database"),
            ("postgres://", "engines.database"),
            ("amqp://u:hunter2@", "engines.queue"),
            ("postgres://u:hunter2@db/x", "engines.queue"),
            ("sqlite:", "engines.database"),
            ("not a url", "engines.database"),
            ("postgres://u:hunter2@h1:1,,h2:2/x", "engines.database"),
            ("amqp://u:hunter2@h1/%2f,postgres://h2/x", "engines.queue"),
            ("amqp://u:hunter2@h1/%2f,", "engines.queue"),
        ] {
            let reason = classify(value, key).expect_err(value);
            assert!(!reason.contains("hunter2"), "secret in {reason:?}");
        }
        assert_eq!(redact("postgres://u:hunter2@db/x"), "postgres://u:***@db/x");
        assert!(!redact("u:hunter2@db").contains("hunter2"));
        assert_eq!(
            redact("amqp://u:hunter2@a/%2f,amqp://v:hunter2@b/%2f"),
            "amqp://u:***@a/%2f,amqp://v:***@b/%2f"
        );
        assert!(!redact("postgres://u:hunter2@h1:1,h2:2/x").contains("hunter2"));
        assert!(!redact("amqp://u:hunter2@").contains("hunter2"));
    }

    #[test]
    fn unknown_keys_and_syntax_errors_name_the_line() {
        let err = Config::parse("[api]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n", "x.toml")
            .expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("bogus") && msg.contains("line 3"), "{msg}");
        let err = Config::parse("[api\n", "y.toml").expect_err("syntax");
        assert!(err.to_string().contains("y.toml"), "{err}");
    }
}
