//! The server pool's inventory, the purse and the join tokens, shared by every factory.
//!
//! - **Inventory**: one row per server declared in `infra/pool.toml`, with its state (`off`,
//!   `powering-on`, `booting`, `joined`, `draining`, `powering-off`, `quarantined`); every
//!   transition is recorded with its time and reason.
//! - **Purse**: a server accrues its hourly cost from admission (the money is reserved before it
//!   is powered on) until its power-off is confirmed; one row per powered-on period. Admission
//!   checks the caps counting every server that is powering on, booting, joined, draining or
//!   powering off, inside one write transaction that every factory serializes on
//!   (`pool_admission_lock`), so several factories together never overshoot.
//! - **Join tokens**: one-time bootstrap tokens (public id + secret, short TTL, single use); only
//!   the secret's SHA-256 is stored. Redeeming one records the lineage (parent -> child).
//!
//! The decisions are pure functions ([`decide_admission`], [`accrue`], [`check_token`]); the SQL
//! is written once and runs on SQLite and PostgreSQL alike (`$n` parameters, no dialect-only
//! syntax). Times are passed in by callers: tests need no clock.

use sha2::{Digest, Sha256};
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use crate::Result;

/// Money in millionths of the budget's currency.
pub type Micros = i64;

const HOUR_MS: i64 = 3_600_000;

/// A server's state in the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerState {
    Off,
    PoweringOn,
    Booting,
    Joined,
    Draining,
    PoweringOff,
    Quarantined,
}

impl ServerState {
    pub const ALL: [ServerState; 7] = [
        ServerState::Off,
        ServerState::PoweringOn,
        ServerState::Booting,
        ServerState::Joined,
        ServerState::Draining,
        ServerState::PoweringOff,
        ServerState::Quarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Off => "off",
            ServerState::PoweringOn => "powering-on",
            ServerState::Booting => "booting",
            ServerState::Joined => "joined",
            ServerState::Draining => "draining",
            ServerState::PoweringOff => "powering-off",
            ServerState::Quarantined => "quarantined",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a server in this state is (or may be) powered on, and so costs money.
    pub fn spends(self) -> bool {
        !matches!(self, ServerState::Off | ServerState::Quarantined)
    }
}

/// A server as `pool.toml` declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredServer {
    pub name: String,
    pub provider: String,
    pub hourly_cost_micros: Micros,
    pub capacity: i32,
}

/// A server's row in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerRow {
    pub name: String,
    pub provider: String,
    pub hourly_cost_micros: Micros,
    pub capacity: i32,
    pub state: ServerState,
    pub role: Option<String>,
    pub cell_id: Option<String>,
    pub request_key: Option<String>,
    pub factory: Option<String>,
    pub attempts: i32,
    pub state_since_ms: i64,
    pub declared: bool,
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Transition {
    pub server: String,
    pub from: String,
    pub to: String,
    pub at_ms: i64,
    pub reason: String,
}

/// The purse's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// The most the spending servers may cost per hour together.
    pub per_hour: Micros,
    /// The most a calendar month may cost: spent plus one reserved hour per spending server.
    pub per_month: Micros,
}

/// A factory asking for a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitRequest {
    pub request_key: String,
    pub role: String,
    pub factory: String,
    pub now_ms: i64,
    /// The start of the current month (UTC), milliseconds since the epoch.
    pub month_start_ms: i64,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    pub reason: String,
    /// What the spending servers cost per hour, before this request.
    pub committed_per_hour: Micros,
    /// Spent this month plus the reserved hours, before this request.
    pub committed_month: Micros,
}

/// What [`PoolLedger::admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitOutcome {
    /// This server is now `powering-on` for the request; its money is reserved.
    Admitted(ServerRow),
    /// The request's key already holds this server (a repeated request).
    Already(ServerRow),
    Refused(Refusal),
}

/// Spend, commitments and caps, for `cell status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpendSummary {
    /// Spent this month: closed periods plus what open ones have accrued until now.
    pub spent_month: Micros,
    /// What the spending servers cost per hour.
    pub committed_per_hour: Micros,
    /// Spent this month plus one reserved hour per spending server.
    pub committed_month: Micros,
    /// Every closed period's amount, ever (the ledger's total).
    pub ledger_total: Micros,
    pub spending_servers: usize,
    pub caps: Caps,
}

/// An open or closed powered-on period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    pub server: String,
    pub hourly_cost_micros: Micros,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub amount_micros: Option<Micros>,
}

/// Whole units (a TOML number such as `0.12`) to [`Micros`], rounded to the nearest micro.
pub fn to_micros(units: f64) -> Micros {
    (units * 1_000_000.0).round() as Micros
}

/// What `cost_per_hour` accrues over `[start, end)`, rounded to the nearest micro.
pub fn accrue(cost_per_hour: Micros, start_ms: i64, end_ms: i64) -> Micros {
    let ms = i128::from((end_ms - start_ms).max(0));
    let micros = (i128::from(cost_per_hour) * ms + i128::from(HOUR_MS / 2)) / i128::from(HOUR_MS);
    micros as Micros
}

/// Money for people: `1.234567` units shown to the cent.
pub fn show(m: Micros) -> String {
    let cents = (i128::from(m) + 5_000).div_euclid(10_000);
    format!("{}.{:02}", cents.div_euclid(100), cents.rem_euclid(100))
}

/// The admission decision over the whole inventory. The cheapest declared server that is off
/// is taken when the caps allow its hour; a request whose key already holds a spending server
/// gets that server again.
pub fn decide_admission(
    servers: &[ServerRow],
    caps: Caps,
    spent_month: Micros,
    req: &AdmitRequest,
) -> AdmitOutcome {
    if let Some(held) = servers
        .iter()
        .find(|s| s.state.spends() && s.request_key.as_deref() == Some(req.request_key.as_str()))
    {
        return AdmitOutcome::Already(held.clone());
    }
    let spending: Vec<&ServerRow> = servers.iter().filter(|s| s.state.spends()).collect();
    let committed_per_hour: Micros = spending.iter().map(|s| s.hourly_cost_micros).sum();
    let committed_month = spent_month + committed_per_hour;
    let refuse = |reason: String| {
        AdmitOutcome::Refused(Refusal {
            reason,
            committed_per_hour,
            committed_month,
        })
    };
    let mut off: Vec<&ServerRow> = servers
        .iter()
        .filter(|s| s.declared && s.state == ServerState::Off)
        .collect();
    off.sort_by(|a, b| (a.hourly_cost_micros, &a.name).cmp(&(b.hourly_cost_micros, &b.name)));
    let Some(candidate) = off.first() else {
        let quarantined = servers
            .iter()
            .filter(|s| s.state == ServerState::Quarantined)
            .count();
        return refuse(format!(
            "no server of the pool is off: {} spending, {quarantined} quarantined, {} declared",
            spending.len(),
            servers.iter().filter(|s| s.declared).count()
        ));
    };
    let cost = candidate.hourly_cost_micros;
    if committed_per_hour + cost > caps.per_hour {
        return refuse(format!(
            "the hourly cap would be passed: {} committed per hour + {} for {} > cap {}",
            show(committed_per_hour),
            show(cost),
            candidate.name,
            show(caps.per_hour)
        ));
    }
    if committed_month + cost > caps.per_month {
        return refuse(format!(
            "the monthly cap would be passed: {} spent and reserved this month + {} for {} > cap {}",
            show(committed_month),
            show(cost),
            candidate.name,
            show(caps.per_month)
        ));
    }
    let mut admitted = (*candidate).clone();
    admitted.state = ServerState::PoweringOn;
    admitted.role = Some(req.role.clone());
    admitted.request_key = Some(req.request_key.clone());
    admitted.factory = Some(req.factory.clone());
    admitted.cell_id = None;
    admitted.attempts += 1;
    admitted.state_since_ms = req.now_ms;
    AdmitOutcome::Admitted(admitted)
}

/// What month-to-date spend the rows add up to at `now_ms`.
pub fn spent_since(rows: &[SpendRow], month_start_ms: i64, now_ms: i64) -> Micros {
    rows.iter()
        .map(|r| match (r.ended_at_ms, r.amount_micros) {
            (Some(end), Some(amount)) if end >= month_start_ms => amount,
            (Some(_), _) => 0,
            (None, _) => accrue(r.hourly_cost_micros, r.started_at_ms, now_ms),
        })
        .sum()
}

/// A new one-time join token (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub id: String,
    pub secret: String,
    pub role: String,
    pub server: Option<String>,
    pub parent: Option<String>,
    pub request_key: Option<String>,
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A join token's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub secret_sha256: String,
    pub role: String,
    pub server: Option<String>,
    pub parent: Option<String>,
    pub request_key: Option<String>,
    pub expires_at_ms: i64,
    pub used_at_ms: Option<i64>,
}

/// What a redeemed token grants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Redeemed {
    pub role: String,
    pub server: Option<String>,
    pub parent: Option<String>,
    pub request_key: Option<String>,
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("no such join token")]
    Unknown,
    #[error("the join token's secret is wrong")]
    Forged,
    #[error("the join token has expired")]
    Expired,
    #[error("the join token was already used")]
    Used,
}

pub fn secret_sha256(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` redeems `row` at `now_ms`. The hash comparison takes the same time wherever
/// the first difference is.
pub fn check_token(row: &TokenRow, secret: &str, now_ms: i64) -> Result<(), TokenRefusal> {
    let given = secret_sha256(secret);
    let same = given.len() == row.secret_sha256.len()
        && given
            .bytes()
            .zip(row.secret_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(TokenRefusal::Forged);
    }
    if row.used_at_ms.is_some() {
        return Err(TokenRefusal::Used);
    }
    if now_ms >= row.expires_at_ms {
        return Err(TokenRefusal::Expired);
    }
    Ok(())
}

/// A parent -> child record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LineageRow {
    pub child: String,
    pub parent: Option<String>,
    pub server: Option<String>,
    pub role: String,
    pub at_ms: i64,
}

/// The database the pool lives in: the store's.
#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The inventory, the purse and the join tokens in the store's database.
#[derive(Clone)]
pub struct PoolLedger {
    db: Db,
}

/// Run `$body` in a write transaction on whichever database: the same SQL text for both.
/// The first statement takes the pool's write lock (a row lock on PostgreSQL, the database's
/// write lock on SQLite), so every pool write of every factory is serialized.
macro_rules! write_tx {
    ($db:expr, |$tx:ident| $body:block) => {
        match $db {
            Db::Sqlite(pool) => {
                #[allow(unused_mut)]
                let mut $tx = pool.begin().await?;
                sqlx::query(LOCK).execute(&mut *$tx).await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
            Db::Postgres(pool) => {
                #[allow(unused_mut)]
                let mut $tx = pool.begin().await?;
                sqlx::query(LOCK).execute(&mut *$tx).await?;
                let out = $body;
                $tx.commit().await?;
                out
            }
        }
    };
}

/// Run `$body` with a plain connection from whichever pool.
macro_rules! read {
    ($db:expr, |$conn:ident| $body:block) => {
        match $db {
            Db::Sqlite(pool) => {
                let $conn = pool;
                $body
            }
            Db::Postgres(pool) => {
                let $conn = pool;
                $body
            }
        }
    };
}

const LOCK: &str = "UPDATE pool_admission_lock SET admissions = admissions + 1 WHERE id = 1";

macro_rules! server_of {
    ($row:expr) => {{
        let row = $row;
        let state: String = row.try_get("state")?;
        ServerRow {
            name: row.try_get("name")?,
            provider: row.try_get("provider")?,
            hourly_cost_micros: row.try_get("hourly_cost_micros")?,
            capacity: row.try_get("capacity")?,
            state: ServerState::parse(&state).ok_or_else(|| {
                crate::EngineError::Config(format!(
                    "unknown server state {state:?} in pool_servers"
                ))
            })?,
            role: row.try_get("role")?,
            cell_id: row.try_get("cell_id")?,
            request_key: row.try_get("request_key")?,
            factory: row.try_get("factory")?,
            attempts: row.try_get("attempts")?,
            state_since_ms: row.try_get("state_since_ms")?,
            declared: row.try_get::<i32, _>("declared")? != 0,
        }
    }};
}

macro_rules! spend_of {
    ($row:expr) => {{
        let row = $row;
        SpendRow {
            server: row.try_get("server")?,
            hourly_cost_micros: row.try_get("hourly_cost_micros")?,
            started_at_ms: row.try_get("started_at_ms")?,
            ended_at_ms: row.try_get("ended_at_ms")?,
            amount_micros: row.try_get("amount_micros")?,
        }
    }};
}

const SERVER_COLUMNS: &str = "name, provider, hourly_cost_micros, capacity, state, role, cell_id, \
     request_key, factory, attempts, state_since_ms, declared";

impl PoolLedger {
    /// Open the pool in the SQLite store's database at a path or `sqlite:` URL.
    pub async fn open_sqlite(url_or_path: &str) -> Result<Self> {
        Ok(Self::sqlite(
            crate::sqlite::open_store_database(url_or_path, 2).await?,
        ))
    }

    /// Connect to the pool in the PostgreSQL store's database (bringing its schema up to date).
    pub async fn connect_postgres(url: &str) -> Result<Self> {
        let store = crate::postgres::PgStore::connect_with(
            url,
            crate::postgres::PgOptions {
                max_connections: 4,
                ..crate::postgres::PgOptions::default()
            },
        )
        .await?;
        Ok(Self::postgres(store.pool().clone()))
    }

    /// The pool in an open SQLite store's database (its migrations created the tables).
    pub fn sqlite(pool: SqlitePool) -> Self {
        Self {
            db: Db::Sqlite(pool),
        }
    }

    /// The pool in an open PostgreSQL store's database.
    pub fn postgres(pool: PgPool) -> Self {
        Self {
            db: Db::Postgres(pool),
        }
    }

    /// Make the inventory match `pool.toml`: new servers are added `off`; known ones keep their
    /// state and take the file's cost and capacity; servers no longer declared are kept (with
    /// their history) but never admitted again.
    pub async fn declare(&self, servers: &[DeclaredServer], now_ms: i64) -> Result<()> {
        write_tx!(&self.db, |tx| {
            sqlx::query("UPDATE pool_servers SET declared = 0")
                .execute(&mut *tx)
                .await?;
            for s in servers {
                sqlx::query(
                    "INSERT INTO pool_servers (name, provider, hourly_cost_micros, capacity, state, \
                     attempts, state_since_ms, declared) VALUES ($1, $2, $3, $4, 'off', 0, $5, 1) \
                     ON CONFLICT (name) DO UPDATE SET provider = excluded.provider, \
                     hourly_cost_micros = excluded.hourly_cost_micros, \
                     capacity = excluded.capacity, declared = 1",
                )
                .bind(&s.name)
                .bind(&s.provider)
                .bind(s.hourly_cost_micros)
                .bind(s.capacity)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            }
        });
        Ok(())
    }

    /// Admit a request: in one transaction that every factory serializes on, read the
    /// inventory and the month's spend, decide ([`decide_admission`]), and when admitted move
    /// the server to `powering-on`, record the transition and open its spend.
    pub async fn admit(&self, caps: Caps, req: &AdmitRequest) -> Result<AdmitOutcome> {
        let outcome = write_tx!(&self.db, |tx| {
            let servers = sqlx::query(&format!("SELECT {SERVER_COLUMNS} FROM pool_servers"))
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| Ok(server_of!(r)))
                .collect::<Result<Vec<_>>>()?;
            let spend = sqlx::query(
                "SELECT server, hourly_cost_micros, started_at_ms, ended_at_ms, amount_micros \
                 FROM pool_spend WHERE ended_at_ms IS NULL OR ended_at_ms >= $1",
            )
            .bind(req.month_start_ms)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| Ok(spend_of!(r)))
            .collect::<Result<Vec<_>>>()?;
            let spent = spent_since(&spend, req.month_start_ms, req.now_ms);
            let outcome = decide_admission(&servers, caps, spent, req);
            if let AdmitOutcome::Admitted(s) = &outcome {
                sqlx::query(
                    "UPDATE pool_servers SET state = $1, role = $2, request_key = $3, factory = $4, \
                     cell_id = NULL, attempts = $5, state_since_ms = $6 \
                     WHERE name = $7 AND state = 'off'",
                )
                .bind(s.state.as_str())
                .bind(&s.role)
                .bind(&s.request_key)
                .bind(&s.factory)
                .bind(s.attempts)
                .bind(req.now_ms)
                .bind(&s.name)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO pool_transitions (server, from_state, to_state, at_ms, reason) \
                     VALUES ($1, 'off', 'powering-on', $2, $3)",
                )
                .bind(&s.name)
                .bind(req.now_ms)
                .bind(format!(
                    "admitted for {} ({}) by {}",
                    req.role, req.request_key, req.factory
                ))
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO pool_spend (server, hourly_cost_micros, started_at_ms) \
                     VALUES ($1, $2, $3)",
                )
                .bind(&s.name)
                .bind(s.hourly_cost_micros)
                .bind(req.now_ms)
                .execute(&mut *tx)
                .await?;
            }
            outcome
        });
        Ok(outcome)
    }

    /// Move `name` from one of `from` to `to`, recording why; `cell_id` is set when given.
    /// False when the server was not in one of `from` (another factory moved it first).
    /// Leaving a spending state for `off` or `quarantined` closes its spend: call it only once
    /// the provider confirmed the power is off.
    pub async fn transition(
        &self,
        name: &str,
        from: &[ServerState],
        to: ServerState,
        reason: &str,
        now_ms: i64,
        cell_id: Option<&str>,
    ) -> Result<bool> {
        let moved = write_tx!(&self.db, |tx| {
            let row = sqlx::query(&format!(
                "SELECT {SERVER_COLUMNS} FROM pool_servers WHERE name = $1"
            ))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok(false);
            };
            let current = server_of!(&row);
            if !from.contains(&current.state) {
                false
            } else {
                let attempts = if to == ServerState::Off {
                    0
                } else {
                    current.attempts
                };
                sqlx::query(
                    "UPDATE pool_servers SET state = $1, state_since_ms = $2, attempts = $3, \
                     cell_id = COALESCE($4, cell_id) WHERE name = $5",
                )
                .bind(to.as_str())
                .bind(now_ms)
                .bind(attempts)
                .bind(cell_id)
                .bind(name)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO pool_transitions (server, from_state, to_state, at_ms, reason) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(name)
                .bind(current.state.as_str())
                .bind(to.as_str())
                .bind(now_ms)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
                if current.state.spends() && !to.spends() {
                    let open = sqlx::query(
                        "SELECT server, hourly_cost_micros, started_at_ms, ended_at_ms, \
                         amount_micros FROM pool_spend WHERE server = $1 AND ended_at_ms IS NULL",
                    )
                    .bind(name)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|r| Ok(spend_of!(r)))
                    .collect::<Result<Vec<_>>>()?;
                    for o in open {
                        sqlx::query(
                            "UPDATE pool_spend SET ended_at_ms = $1, amount_micros = $2 \
                             WHERE server = $3 AND started_at_ms = $4 AND ended_at_ms IS NULL",
                        )
                        .bind(now_ms)
                        .bind(accrue(o.hourly_cost_micros, o.started_at_ms, now_ms))
                        .bind(name)
                        .bind(o.started_at_ms)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                true
            }
        });
        Ok(moved)
    }

    /// Another power-on attempt for a server that is `powering-on` or `booting`.
    pub async fn count_attempt(&self, name: &str) -> Result<i32> {
        let attempts = write_tx!(&self.db, |tx| {
            sqlx::query("UPDATE pool_servers SET attempts = attempts + 1 WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query("SELECT attempts FROM pool_servers WHERE name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            row.try_get::<i32, _>("attempts")?
        });
        Ok(attempts)
    }

    pub async fn servers(&self) -> Result<Vec<ServerRow>> {
        read!(&self.db, |pool| {
            sqlx::query(&format!(
                "SELECT {SERVER_COLUMNS} FROM pool_servers ORDER BY name"
            ))
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok(server_of!(r)))
            .collect()
        })
    }

    pub async fn server(&self, name: &str) -> Result<Option<ServerRow>> {
        read!(&self.db, |pool| {
            match sqlx::query(&format!(
                "SELECT {SERVER_COLUMNS} FROM pool_servers WHERE name = $1"
            ))
            .bind(name)
            .fetch_optional(pool)
            .await?
            {
                Some(r) => Ok(Some(server_of!(&r))),
                None => Ok(None),
            }
        })
    }

    /// A server's transitions, oldest first.
    pub async fn transitions(&self, name: &str) -> Result<Vec<Transition>> {
        read!(&self.db, |pool| {
            sqlx::query(
                "SELECT server, from_state, to_state, at_ms, reason FROM pool_transitions \
                 WHERE server = $1 ORDER BY seq",
            )
            .bind(name)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| {
                Ok(Transition {
                    server: r.try_get("server")?,
                    from: r.try_get("from_state")?,
                    to: r.try_get("to_state")?,
                    at_ms: r.try_get("at_ms")?,
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
        })
    }

    /// Every powered-on period, oldest first.
    pub async fn spend_rows(&self) -> Result<Vec<SpendRow>> {
        read!(&self.db, |pool| {
            sqlx::query(
                "SELECT server, hourly_cost_micros, started_at_ms, ended_at_ms, amount_micros \
                 FROM pool_spend ORDER BY seq",
            )
            .fetch_all(pool)
            .await?
            .iter()
            .map(|r| Ok(spend_of!(r)))
            .collect()
        })
    }

    /// Spend, commitments and caps at `now_ms`.
    pub async fn spend(
        &self,
        caps: Caps,
        now_ms: i64,
        month_start_ms: i64,
    ) -> Result<SpendSummary> {
        let rows = self.spend_rows().await?;
        let servers = self.servers().await?;
        let spending: Vec<&ServerRow> = servers.iter().filter(|s| s.state.spends()).collect();
        let committed_per_hour: Micros = spending.iter().map(|s| s.hourly_cost_micros).sum();
        let spent_month = spent_since(&rows, month_start_ms, now_ms);
        Ok(SpendSummary {
            spent_month,
            committed_per_hour,
            committed_month: spent_month + committed_per_hour,
            ledger_total: rows.iter().filter_map(|r| r.amount_micros).sum(),
            spending_servers: spending.len(),
            caps,
        })
    }

    /// Record a new join token (its secret's hash only).
    pub async fn issue_token(&self, token: &NewToken) -> Result<()> {
        write_tx!(&self.db, |tx| {
            sqlx::query(
                "INSERT INTO join_tokens (id, secret_sha256, role, server, parent, request_key, \
                 issued_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&token.id)
            .bind(secret_sha256(&token.secret))
            .bind(&token.role)
            .bind(&token.server)
            .bind(&token.parent)
            .bind(&token.request_key)
            .bind(token.issued_at_ms)
            .bind(token.expires_at_ms)
            .execute(&mut *tx)
            .await?;
        });
        Ok(())
    }

    /// Redeem a join token for `cell_id`: checked, marked used and the lineage recorded in one
    /// transaction, so a token is redeemed once however many machines present it at once.
    pub async fn redeem_token(
        &self,
        id: &str,
        secret: &str,
        cell_id: &str,
        now_ms: i64,
    ) -> Result<Result<Redeemed, TokenRefusal>> {
        let outcome = write_tx!(&self.db, |tx| {
            let row = sqlx::query(
                "SELECT id, secret_sha256, role, server, parent, request_key, expires_at_ms, \
                 used_at_ms FROM join_tokens WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => Err(TokenRefusal::Unknown),
                Some(r) => {
                    let token = TokenRow {
                        id: r.try_get("id")?,
                        secret_sha256: r.try_get("secret_sha256")?,
                        role: r.try_get("role")?,
                        server: r.try_get("server")?,
                        parent: r.try_get("parent")?,
                        request_key: r.try_get("request_key")?,
                        expires_at_ms: r.try_get("expires_at_ms")?,
                        used_at_ms: r.try_get("used_at_ms")?,
                    };
                    match check_token(&token, secret, now_ms) {
                        Err(e) => Err(e),
                        Ok(()) => {
                            sqlx::query(
                                "UPDATE join_tokens SET used_at_ms = $1, cell_id = $2 \
                                 WHERE id = $3 AND used_at_ms IS NULL",
                            )
                            .bind(now_ms)
                            .bind(cell_id)
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                            sqlx::query(
                                "INSERT INTO lineage (child, parent, server, role, at_ms) \
                                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (child) DO NOTHING",
                            )
                            .bind(cell_id)
                            .bind(&token.parent)
                            .bind(&token.server)
                            .bind(&token.role)
                            .bind(now_ms)
                            .execute(&mut *tx)
                            .await?;
                            Ok(Redeemed {
                                role: token.role,
                                server: token.server,
                                parent: token.parent,
                                request_key: token.request_key,
                            })
                        }
                    }
                }
            }
        });
        Ok(outcome)
    }

    /// Revoke every unused token of a server (its power-on was abandoned).
    pub async fn revoke_tokens_of(&self, server: &str, now_ms: i64) -> Result<u64> {
        let n = write_tx!(&self.db, |tx| {
            sqlx::query(
                "UPDATE join_tokens SET expires_at_ms = $1 WHERE server = $2 \
                 AND used_at_ms IS NULL AND expires_at_ms > $1",
            )
            .bind(now_ms)
            .bind(server)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        });
        Ok(n)
    }

    pub async fn lineage(&self) -> Result<Vec<LineageRow>> {
        read!(&self.db, |pool| {
            sqlx::query("SELECT child, parent, server, role, at_ms FROM lineage ORDER BY at_ms")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok(LineageRow {
                        child: r.try_get("child")?,
                        parent: r.try_get("parent")?,
                        server: r.try_get("server")?,
                        role: r.try_get("role")?,
                        at_ms: r.try_get("at_ms")?,
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, cost: Micros, state: ServerState) -> ServerRow {
        ServerRow {
            name: name.into(),
            provider: "local".into(),
            hourly_cost_micros: cost,
            capacity: 1,
            state,
            role: None,
            cell_id: None,
            request_key: None,
            factory: None,
            attempts: 0,
            state_since_ms: 0,
            declared: true,
        }
    }

    fn req(key: &str) -> AdmitRequest {
        AdmitRequest {
            request_key: key.into(),
            role: "crawler".into(),
            factory: "f1".into(),
            now_ms: 1_000,
            month_start_ms: 0,
        }
    }

    const CAPS: Caps = Caps {
        per_hour: 2_000_000,
        per_month: 100_000_000,
    };

    #[test]
    fn the_cheapest_off_server_is_admitted_within_the_caps() {
        let servers = vec![
            server("b", 1_000_000, ServerState::Off),
            server("a", 500_000, ServerState::Off),
            server("c", 100_000, ServerState::Quarantined),
        ];
        let AdmitOutcome::Admitted(s) = decide_admission(&servers, CAPS, 0, &req("k")) else {
            panic!()
        };
        assert_eq!((s.name.as_str(), s.state), ("a", ServerState::PoweringOn));
        assert_eq!(s.request_key.as_deref(), Some("k"));
        assert_eq!(s.attempts, 1);
    }

    #[test]
    fn machines_still_powering_on_count_against_the_hourly_cap() {
        let mut servers = vec![
            server("a", 1_000_000, ServerState::PoweringOn),
            server("b", 1_000_000, ServerState::Booting),
            server("c", 1_000_000, ServerState::Off),
        ];
        let AdmitOutcome::Refused(r) = decide_admission(&servers, CAPS, 0, &req("k")) else {
            panic!()
        };
        assert_eq!(r.committed_per_hour, 2_000_000);
        assert!(r.reason.contains("hourly cap"), "{}", r.reason);
        assert!(r.reason.contains("2.00 committed"), "{}", r.reason);
        // Exactly at the cap is allowed.
        servers[1].state = ServerState::Off;
        assert!(matches!(
            decide_admission(&servers, CAPS, 0, &req("k")),
            AdmitOutcome::Admitted(_)
        ));
    }

    #[test]
    fn the_monthly_cap_counts_spend_and_reserved_hours() {
        let servers = vec![
            server("a", 1_000_000, ServerState::Joined),
            server("b", 1_000_000, ServerState::Off),
        ];
        let caps = Caps {
            per_hour: 10_000_000,
            per_month: 10_000_000,
        };
        assert!(matches!(
            decide_admission(&servers, caps, 8_000_000, &req("k")),
            AdmitOutcome::Admitted(_)
        ));
        let AdmitOutcome::Refused(r) = decide_admission(&servers, caps, 8_000_001, &req("k"))
        else {
            panic!()
        };
        assert!(r.reason.contains("monthly cap"), "{}", r.reason);
        assert_eq!(r.committed_month, 9_000_001);
    }

    #[test]
    fn a_repeated_key_gets_its_server_and_an_empty_pool_says_so() {
        let mut held = server("a", 1, ServerState::Booting);
        held.request_key = Some("k".into());
        let servers = vec![held, server("q", 1, ServerState::Quarantined)];
        assert!(matches!(
            decide_admission(&servers, CAPS, 0, &req("k")),
            AdmitOutcome::Already(s) if s.name == "a"
        ));
        let AdmitOutcome::Refused(r) = decide_admission(&servers, CAPS, 0, &req("other")) else {
            panic!()
        };
        assert!(r.reason.contains("1 quarantined"), "{}", r.reason);
        // A server no longer declared is never admitted.
        let mut gone = server("z", 1, ServerState::Off);
        gone.declared = false;
        assert!(matches!(
            decide_admission(&[gone], CAPS, 0, &req("x")),
            AdmitOutcome::Refused(_)
        ));
    }

    #[test]
    fn accrual_is_exact_to_the_micro() {
        assert_eq!(accrue(1_000_000, 0, HOUR_MS), 1_000_000);
        assert_eq!(accrue(1_000_000, 0, HOUR_MS / 2), 500_000);
        assert_eq!(accrue(3, 0, HOUR_MS / 2), 2, "half up");
        assert_eq!(accrue(1_000_000, 10, 5), 0, "never negative");
        assert_eq!(show(1_234_567), "1.23");
        assert_eq!(show(1_235_000), "1.24");
        let rows = vec![
            SpendRow {
                server: "a".into(),
                hourly_cost_micros: 1_000_000,
                started_at_ms: 0,
                ended_at_ms: Some(HOUR_MS),
                amount_micros: Some(1_000_000),
            },
            SpendRow {
                server: "b".into(),
                hourly_cost_micros: 2_000_000,
                started_at_ms: HOUR_MS,
                ended_at_ms: None,
                amount_micros: None,
            },
        ];
        assert_eq!(spent_since(&rows, 0, 2 * HOUR_MS), 3_000_000);
        assert_eq!(spent_since(&rows, HOUR_MS + 1, 2 * HOUR_MS), 2_000_000);
    }

    #[test]
    fn tokens_are_single_use_unexpired_and_unforgeable() {
        let row = TokenRow {
            id: "abc123".into(),
            secret_sha256: secret_sha256("s3cret"),
            role: "crawler".into(),
            server: None,
            parent: None,
            request_key: None,
            expires_at_ms: 100,
            used_at_ms: None,
        };
        assert_eq!(check_token(&row, "s3cret", 99), Ok(()));
        assert_eq!(check_token(&row, "s3cres", 99), Err(TokenRefusal::Forged));
        assert_eq!(check_token(&row, "s3cret", 100), Err(TokenRefusal::Expired));
        let used = TokenRow {
            used_at_ms: Some(50),
            ..row
        };
        assert_eq!(check_token(&used, "s3cret", 60), Err(TokenRefusal::Used));
    }
}
