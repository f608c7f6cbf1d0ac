//! Machines from the pool: admission by the purse, power-on with retries, joining, quarantine
//! and power-off.
//!
//! A request for a cell that the pool serves goes: admission ([`PoolLedger::admit`]: the
//! cheapest server that is off, if the caps allow its hour, counting every server still powering
//! on) → a one-time join token → power-on through the server's provider (a provider error is
//! retried with backoff, an authentication error is not) → `booting` → the blank machine runs
//! `cell boot`, redeems the token at a factory's `POST /join` and receives its role, its parent's
//! configuration and the cluster key → the cell heartbeats → `joined`. A server that has not
//! produced a live cell within the boot timeout is powered off and tried again with backoff, a
//! bounded number of times; then it is quarantined (powered off first, so no orphan keeps
//! spending) and the request goes to the next server. Power-ons and power-offs are limited per
//! minute, for the whole factory (Slurm's `ResumeRate` / `SuspendRate`).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use engines::pool::{
    AdmitOutcome, AdmitRequest, Caps, NewToken, PoolLedger, Redeemed, Refusal, ServerRow,
    ServerState, SpendSummary, TokenRefusal,
};
use futures::future::BoxFuture;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

use crate::power::{JoinData, PowerError, PowerProvider, PowerState, ProviderKind, ServerSpec};

/// How the pool's machines are brought up and down.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// From power-on to a live cell.
    pub boot_timeout: Duration,
    /// Power-on attempts per server before it is quarantined.
    pub max_attempts: u32,
    /// The first pause between attempts (doubled each time).
    pub backoff: Duration,
    /// Retries of a provider call that failed with a transient error.
    pub provider_retries: u32,
    pub power_ons_per_minute: u32,
    pub power_offs_per_minute: u32,
    /// How long a join token lives.
    pub token_ttl: Duration,
    /// How long a power-off has to be confirmed by the provider's status.
    pub off_timeout: Duration,
    /// Where a booting machine without user data finds its join data (`<server>.join`, mode
    /// 0600): a boot volume the machines share with the factory, like a PXE tree.
    pub boot_dir: Option<PathBuf>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            boot_timeout: Duration::from_secs(300),
            max_attempts: 3,
            backoff: Duration::from_secs(5),
            provider_retries: 3,
            power_ons_per_minute: 20,
            power_offs_per_minute: 20,
            token_ttl: Duration::from_secs(900),
            off_timeout: Duration::from_secs(120),
            boot_dir: None,
        }
    }
}

/// What a machine receives when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReply {
    pub v: u32,
    pub cell_id: String,
    pub role: String,
    pub parent: Option<String>,
    /// The server it runs on.
    pub server: Option<String>,
    /// Its parent's organism configuration (TOML).
    pub infra_toml: String,
    /// The cluster key, hex.
    pub cluster_key: String,
    /// Arguments for `cell run` (health checkers, factories, ...).
    pub args: Vec<String>,
    /// The organism's release: a machine whose own `cell` differs fetches and runs it (absent
    /// from an older factory: the machine runs the `cell` it booted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<crate::release::ReleaseRef>,
}

/// What a blank machine sends to join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub v: u32,
    /// `id.secret`.
    pub token: String,
    /// The machine's host name, for the record.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("join token refused: {0}")]
    Token(#[from] TokenRefusal),
    #[error("malformed join token: expected ID.SECRET")]
    Malformed,
    #[error("the pool's database failed: {0}")]
    Engine(#[from] engines::EngineError),
}

/// What the organism gives every joining cell.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    pub infra_toml: String,
    pub cluster_key_hex: String,
    pub cell_args: Vec<String>,
}

/// Whether a cell id is live in the registry.
pub type IsLive = Arc<dyn Fn(String) -> BoxFuture<'static, bool> + Send + Sync>;

/// The answer to a pool request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolAnswer {
    /// This server is powering on for the request.
    Admitted(String),
    /// The request's key already holds this server.
    Already(String),
    Refused(Refusal),
}

pub struct PoolFactory {
    pub ledger: PoolLedger,
    /// The roles whose cells the pool serves.
    pub roles: Vec<String>,
    pub servers: BTreeMap<String, ServerSpec>,
    providers: HashMap<ProviderKind, Arc<dyn PowerProvider>>,
    pub caps: Caps,
    factory_id: String,
    join_url: String,
    join: JoinConfig,
    settings: PoolSettings,
    is_live: IsLive,
    power_ons: DefaultDirectRateLimiter,
    power_offs: DefaultDirectRateLimiter,
}

fn per_minute(n: u32) -> DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_minute(
        NonZeroU32::new(n.max(1)).expect("at least one"),
    ))
}

pub use control::now_ms;

/// The first millisecond of the current UTC month.
pub fn month_start_ms(now_ms: i64) -> i64 {
    let t = time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    match t.replace_day(1) {
        Ok(d) => d.replace_time(time::Time::MIDNIGHT).unix_timestamp() * 1000,
        Err(_) => 0,
    }
}

impl PoolFactory {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ledger: PoolLedger,
        roles: Vec<String>,
        servers: Vec<ServerSpec>,
        providers: HashMap<ProviderKind, Arc<dyn PowerProvider>>,
        caps: Caps,
        factory_id: String,
        join_url: String,
        join: JoinConfig,
        settings: PoolSettings,
        is_live: IsLive,
    ) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            roles,
            servers: servers.into_iter().map(|s| (s.name.clone(), s)).collect(),
            providers,
            caps,
            factory_id,
            join_url,
            join,
            power_ons: per_minute(settings.power_ons_per_minute),
            power_offs: per_minute(settings.power_offs_per_minute),
            settings,
            is_live,
        })
    }

    /// The URL machines join at (this factory's).
    pub fn join_url(&self) -> &str {
        &self.join_url
    }

    /// From power-on to a live cell, at most.
    pub fn boot_timeout(&self) -> Duration {
        self.settings.boot_timeout
    }

    /// Put the declared servers in the inventory (new ones `off`).
    pub async fn declare(&self) -> Result<(), engines::EngineError> {
        let declared: Vec<engines::pool::DeclaredServer> = self
            .servers
            .values()
            .map(|s| engines::pool::DeclaredServer {
                name: s.name.clone(),
                provider: s.provider.as_str().into(),
                hourly_cost_micros: engines::pool::to_micros(s.hourly_cost),
                capacity: s.capacity as i32,
            })
            .collect();
        self.ledger.declare(&declared, now_ms()).await
    }

    /// Ask the pool for a machine for a cell of `role`. Admitted machines are brought up in the
    /// background; the answer comes as soon as the purse has decided.
    pub async fn request(
        self: &Arc<Self>,
        role: &str,
        request_key: &str,
        parent: Option<String>,
    ) -> Result<PoolAnswer, engines::EngineError> {
        let now = now_ms();
        let req = AdmitRequest {
            request_key: request_key.to_string(),
            role: role.to_string(),
            factory: self.factory_id.clone(),
            now_ms: now,
            month_start_ms: month_start_ms(now),
        };
        Ok(match self.ledger.admit(self.caps, &req).await? {
            AdmitOutcome::Admitted(server) => {
                metrics::counter!("factory_pool_admitted_total").increment(1);
                let name = server.name.clone();
                let me = self.clone();
                let (role, key) = (role.to_string(), request_key.to_string());
                tokio::spawn(async move { me.bring_up(server, role, key, parent).await });
                PoolAnswer::Admitted(name)
            }
            AdmitOutcome::Already(server) => PoolAnswer::Already(server.name),
            AdmitOutcome::Refused(r) => {
                metrics::counter!("factory_pool_refused_total").increment(1);
                PoolAnswer::Refused(r)
            }
        })
    }

    fn provider(&self, spec: &ServerSpec) -> Result<&Arc<dyn PowerProvider>, PowerError> {
        self.providers
            .get(&spec.provider)
            .ok_or_else(|| PowerError::Config {
                server: spec.name.clone(),
                detail: format!("no {} provider in this factory", spec.provider.as_str()),
            })
    }

    /// A provider call, retried with backoff while its error is transient.
    async fn with_retries<'a, T>(
        &'a self,
        what: &str,
        server: &str,
        mut call: impl FnMut() -> BoxFuture<'a, Result<T, PowerError>>,
    ) -> Result<T, PowerError> {
        let mut pause = self.settings.backoff / 4;
        let mut tries = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && tries < self.settings.provider_retries => {
                    tries += 1;
                    tracing::warn!(server, error = %e, tries, "{what} failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn new_token(
        &self,
        server: &str,
        role: &str,
        key: &str,
        parent: &Option<String>,
    ) -> Result<JoinData, engines::EngineError> {
        let (id, secret) = {
            let mut rng = rand::rng();
            (
                Alphanumeric.sample_string(&mut rng, 6).to_ascii_lowercase(),
                Alphanumeric
                    .sample_string(&mut rng, 16)
                    .to_ascii_lowercase(),
            )
        };
        let now = now_ms();
        self.ledger
            .issue_token(&NewToken {
                id: id.clone(),
                secret: secret.clone(),
                role: role.to_string(),
                server: Some(server.to_string()),
                parent: parent.clone(),
                request_key: Some(key.to_string()),
                issued_at_ms: now,
                expires_at_ms: now + self.settings.token_ttl.as_millis() as i64,
            })
            .await?;
        let join = JoinData {
            join_url: self.join_url.clone(),
            token: format!("{id}.{secret}"),
        };
        if let Some(dir) = &self.settings.boot_dir {
            write_boot_file(dir, server, &join);
        }
        Ok(join)
    }

    /// Power a server on until its cell is live, or quarantine it and ask for the next one.
    /// (Boxed: it asks [`Self::request`] again, which spawns it.)
    fn bring_up(
        self: Arc<Self>,
        server: ServerRow,
        role: String,
        key: String,
        parent: Option<String>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let name = server.name.clone();
            let Some(spec) = self.servers.get(&name).cloned() else {
                let _ = self
                    .ledger
                    .transition(
                        &name,
                        &[ServerState::PoweringOn],
                        ServerState::Quarantined,
                        "not declared in this factory's pool file",
                        now_ms(),
                        None,
                    )
                    .await;
                return;
            };
            let mut pause = self.settings.backoff;
            let mut why = String::new();
            for attempt in 1..=self.settings.max_attempts {
                if attempt > 1 {
                    let _ = self.ledger.count_attempt(&name).await;
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    let _ = self
                        .ledger
                        .transition(
                            &name,
                            &[ServerState::Booting, ServerState::PoweringOn],
                            ServerState::PoweringOn,
                            &format!("attempt {attempt}: {why}"),
                            now_ms(),
                            None,
                        )
                        .await;
                }
                match self.attempt(&spec, &role, &key, &parent).await {
                    Ok(cell_id) => {
                        let _ = self
                            .ledger
                            .transition(
                                &name,
                                &[ServerState::Booting, ServerState::PoweringOn],
                                ServerState::Joined,
                                &format!("cell {cell_id} is live as {role}"),
                                now_ms(),
                                Some(&cell_id),
                            )
                            .await;
                        tracing::info!(server = %name, cell_id, role, "pool machine joined");
                        return;
                    }
                    Err(Attempt::Auth(e)) => {
                        why = e.to_string();
                        break;
                    }
                    Err(Attempt::Abandoned(why)) => {
                        tracing::info!(server = %name, role, reason = %why, "bring-up abandoned");
                        return;
                    }
                    Err(Attempt::Failed(e)) => {
                        why = e;
                        tracing::warn!(server = %name, attempt, reason = %why, "power-on produced no cell");
                        // The machine may be half up: off before the next try.
                        let _ = self.off(&spec).await;
                    }
                }
            }
            // Quarantine: powered off first (no orphan keeps spending), then the next server.
            let _ = self.ledger.revoke_tokens_of(&name, now_ms()).await;
            let _ = self
                .ledger
                .transition(
                    &name,
                    &[ServerState::PoweringOn, ServerState::Booting],
                    ServerState::PoweringOff,
                    &format!("quarantining: {why}"),
                    now_ms(),
                    None,
                )
                .await;
            match self.off(&spec).await {
                Ok(()) => {
                    let _ = self
                        .ledger
                        .transition(
                            &name,
                            &[ServerState::PoweringOff],
                            ServerState::Quarantined,
                            &format!("powered off and quarantined: {why}"),
                            now_ms(),
                            None,
                        )
                        .await;
                }
                Err(e) => {
                    tracing::error!(server = %name, error = %e, "a quarantined server could not be powered off; it stays powering-off and keeps counting against the caps");
                }
            }
            metrics::counter!("factory_pool_quarantined_total").increment(1);
            tracing::warn!(server = %name, reason = %why, "server quarantined; asking the pool for the next one");
            if let Err(e) = self.request(&role, &key, parent).await {
                tracing::warn!(error = %e, "asking for the next server failed");
            }
        })
    }

    /// One power-on: provider call, then wait for the cell to be live.
    async fn attempt(
        &self,
        spec: &ServerSpec,
        role: &str,
        key: &str,
        parent: &Option<String>,
    ) -> Result<String, Attempt> {
        let join = self
            .new_token(&spec.name, role, key, parent)
            .await
            .map_err(|e| Attempt::Failed(format!("issuing a join token: {e}")))?;
        let provider = self.provider(spec).map_err(Attempt::Auth)?.clone();
        self.power_ons.until_ready().await;
        let on = self
            .with_retries("power-on", &spec.name, || {
                let (p, s, j) = (provider.clone(), spec.clone(), join.clone());
                Box::pin(async move { p.power_on(&s, &j).await })
            })
            .await;
        match on {
            Ok(()) => {}
            Err(e) if e.retryable() => return Err(Attempt::Failed(e.to_string())),
            Err(e) => return Err(Attempt::Auth(e)),
        }
        metrics::counter!("factory_pool_power_ons_total").increment(1);
        let _ = self
            .ledger
            .transition(
                &spec.name,
                &[ServerState::PoweringOn],
                ServerState::Booting,
                &format!("power-on accepted by {}", spec.provider.as_str()),
                now_ms(),
                None,
            )
            .await;
        // Wait for the join (the cell id lands in the inventory) and the cell's heartbeat.
        let deadline = tokio::time::Instant::now() + self.settings.boot_timeout;
        let mut tick = Duration::from_millis(50);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(row)) = self.ledger.server(&spec.name).await {
                // Taken out from under this bring-up (a live upgrade gave up on the machine
                // and powered it off): nothing more to do here.
                let ours = row.request_key.as_deref() == Some(key)
                    && matches!(row.state, ServerState::PoweringOn | ServerState::Booting);
                if !ours {
                    return Err(Attempt::Abandoned(format!(
                        "the server is {} for {:?} now",
                        row.state.as_str(),
                        row.request_key
                    )));
                }
                if let Some(cell) = row.cell_id.clone() {
                    if (self.is_live)(cell.clone()).await {
                        return Ok(cell);
                    }
                }
            }
            tokio::time::sleep(tick).await;
            tick = (tick * 2).min(Duration::from_millis(500));
        }
        Err(Attempt::Failed(format!(
            "no live cell within {:?} of power-on",
            self.settings.boot_timeout
        )))
    }

    /// Power a server off and wait until its provider confirms (or, for a provider that cannot
    /// tell, until the call returned).
    async fn off(&self, spec: &ServerSpec) -> Result<(), PowerError> {
        let provider = self.provider(spec)?.clone();
        self.power_offs.until_ready().await;
        self.with_retries("power-off", &spec.name, || {
            let (p, s) = (provider.clone(), spec.clone());
            Box::pin(async move { p.power_off(&s).await })
        })
        .await?;
        metrics::counter!("factory_pool_power_offs_total").increment(1);
        let deadline = tokio::time::Instant::now() + self.settings.off_timeout;
        loop {
            match provider.status(spec).await {
                Ok(PowerState::Off) => return Ok(()),
                // The provider cannot tell (Wake-on-LAN): the machine is off once its cell's
                // heartbeats have ended.
                Ok(PowerState::Unknown) => {
                    let cell = match self.ledger.server(&spec.name).await {
                        Ok(row) => row.and_then(|r| r.cell_id),
                        Err(_) => None,
                    };
                    let live = match cell {
                        Some(cell) => (self.is_live)(cell).await,
                        None => false,
                    };
                    if !live {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(PowerError::Transient {
                            server: spec.name.clone(),
                            detail: format!(
                                "its cell still heartbeats {:?} after it was asked to shut down",
                                self.settings.off_timeout
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(PowerState::On) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(PowerState::On) => {
                    return Err(PowerError::Transient {
                        server: spec.name.clone(),
                        detail: format!("still on {:?} after power-off", self.settings.off_timeout),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Take a joined (or stuck) server out: its cell is asked to drain by the caller; here the
    /// machine is powered off and its spend closed once the provider confirms.
    pub async fn power_off(&self, name: &str, reason: &str) -> Result<(), PowerError> {
        let spec = self
            .servers
            .get(name)
            .cloned()
            .ok_or_else(|| PowerError::Config {
                server: name.to_string(),
                detail: "not in this factory's pool".into(),
            })?;
        let _ = self
            .ledger
            .transition(
                name,
                &[
                    ServerState::Joined,
                    ServerState::Draining,
                    ServerState::Booting,
                    ServerState::PoweringOn,
                ],
                ServerState::PoweringOff,
                reason,
                now_ms(),
                None,
            )
            .await;
        self.off(&spec).await?;
        let _ = self
            .ledger
            .transition(
                name,
                &[ServerState::PoweringOff],
                ServerState::Off,
                &format!("power-off confirmed: {reason}"),
                now_ms(),
                None,
            )
            .await;
        Ok(())
    }

    /// Fence a replaced cell by powering its machine off (a frozen machine cannot come back).
    /// True when the cell ran on a pool server.
    pub async fn fence_cell(&self, cell_id: &str) -> bool {
        let Ok(rows) = self.ledger.servers().await else {
            return false;
        };
        let Some(row) = rows
            .into_iter()
            .find(|r| r.state.spends() && r.cell_id.as_deref() == Some(cell_id))
        else {
            return false;
        };
        if let Err(e) = self
            .power_off(
                &row.name,
                &format!("fencing: cell {cell_id} is being replaced"),
            )
            .await
        {
            tracing::warn!(server = %row.name, error = %e, "fencing a pool machine failed");
        }
        true
    }

    /// Every `every`, power off the joined machines of this factory whose cell is no longer
    /// live (it retired as surplus, or died and was replaced): a machine without a cell only
    /// spends. Machines of a factory that is itself no longer live are adopted: their joined
    /// machines are watched the same way, and a bring-up it left half done (powering on or
    /// booting for longer than the boot timeout, with nobody waiting for it) is powered off.
    pub fn watch(self: &Arc<Self>, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            // Three misses in a row: a health checker that just restarted lists nobody yet.
            let mut misses: HashMap<String, u32> = HashMap::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let Ok(rows) = me.ledger.servers().await else {
                    continue;
                };
                let mut owners = HashMap::new();
                for row in rows.into_iter().filter(|r| r.state.spends()) {
                    let owner = row.factory.clone().unwrap_or_default();
                    let adopted = owner != me.factory_id;
                    if adopted && !me.owner_gone(&owner, &mut owners).await {
                        continue;
                    }
                    let (subject, reason) = match (row.state, row.cell_id.clone()) {
                        (ServerState::Joined, Some(cell)) => {
                            if (me.is_live)(cell.clone()).await {
                                misses.remove(&row.name);
                                continue;
                            }
                            (row.name.clone(), format!("cell {cell} is no longer live"))
                        }
                        (ServerState::PoweringOn | ServerState::Booting, _) if adopted => {
                            let stuck =
                                now_ms() - row.state_since_ms > bring_up_budget_ms(&me.settings);
                            if !stuck {
                                continue;
                            }
                            (
                                row.name.clone(),
                                format!(
                                    "adopted from factory {owner}, which is gone: its bring-up \
                                     produced no cell"
                                ),
                            )
                        }
                        _ => continue,
                    };
                    let n = misses.entry(subject.clone()).or_default();
                    *n += 1;
                    if *n < 3 {
                        continue;
                    }
                    misses.remove(&subject);
                    tracing::info!(server = %subject, adopted, reason, "powering the machine off");
                    if let Err(e) = me.power_off(&subject, &reason).await {
                        tracing::warn!(server = %subject, error = %e, "power-off failed");
                    }
                }
            }
        });
    }

    /// Whether the factory `owner` (a server row's) is no longer live; each owner is asked once
    /// per pass over the inventory (`asked`). A row without an owner has none live.
    async fn owner_gone(&self, owner: &str, asked: &mut HashMap<String, bool>) -> bool {
        if let Some(live) = asked.get(owner) {
            return !live;
        }
        let live = !owner.is_empty() && (self.is_live)(owner.to_string()).await;
        asked.insert(owner.to_string(), live);
        !live
    }

    /// Power off every spending server this factory admitted, and those of factories that are
    /// gone (a predecessor replaced by a live upgrade): it is stopping with its organism.
    pub async fn power_off_all(&self, reason: &str) {
        let Ok(rows) = self.ledger.servers().await else {
            return;
        };
        let mut mine = Vec::new();
        let mut owners = HashMap::new();
        for row in rows.into_iter().filter(|r| r.state.spends()) {
            let owner = row.factory.clone().unwrap_or_default();
            if owner == self.factory_id || self.owner_gone(&owner, &mut owners).await {
                mine.push(row);
            }
        }
        for row in mine {
            if let Err(e) = self.power_off(&row.name, reason).await {
                tracing::warn!(server = %row.name, error = %e, "power-off failed");
            }
        }
    }

    /// Redeem a join token: the machine learns its role, configuration and the cluster key.
    pub async fn join(&self, req: &JoinRequest) -> Result<JoinReply, JoinError> {
        let (id, secret) = req.token.split_once('.').ok_or(JoinError::Malformed)?;
        if id.is_empty() || secret.is_empty() || !req.token.is_ascii() {
            return Err(JoinError::Malformed);
        }
        let now = now_ms();
        let suffix = Alphanumeric
            .sample_string(&mut rand::rng(), 4)
            .to_ascii_lowercase();
        // The role is known only once the token is redeemed; the id names the server.
        let provisional = format!("pool-{id}-{suffix}");
        let redeemed: Redeemed = self
            .ledger
            .redeem_token(id, secret, &provisional, now)
            .await??;
        let cell_id = provisional;
        if let Some(server) = &redeemed.server {
            let _ = self
                .ledger
                .transition(
                    server,
                    &[ServerState::Booting, ServerState::PoweringOn],
                    ServerState::Booting,
                    &format!(
                        "joined as cell {cell_id} ({}) from host {}",
                        redeemed.role,
                        req.hostname.as_deref().unwrap_or("?")
                    ),
                    now,
                    Some(&cell_id),
                )
                .await;
        }
        metrics::counter!("factory_pool_joins_total").increment(1);
        Ok(JoinReply {
            v: 1,
            cell_id,
            role: redeemed.role,
            parent: redeemed.parent,
            server: redeemed.server,
            infra_toml: self.join.infra_toml.clone(),
            cluster_key: self.join.cluster_key_hex.clone(),
            args: self.join.cell_args.clone(),
            release: None,
        })
    }

    pub async fn spend(&self) -> Result<SpendSummary, engines::EngineError> {
        let now = now_ms();
        self.ledger.spend(self.caps, now, month_start_ms(now)).await
    }
}

/// Wake-on-LAN's power-off: a magic packet cannot turn a machine off, so the factory orders its
/// cell to retire through the health checkers (the order travels in the cell's next heartbeat
/// answer); the cell drains and exits, and its machine's boot unit powers the machine off
/// (`infra/cell-boot.service`). Whether it is off is learnt from the end of its heartbeats.
pub struct RetireThroughHealthcheckers {
    pub ledger: PoolLedger,
    pub client: control::ControlClient,
    pub healthcheckers: Vec<String>,
}

#[async_trait::async_trait]
impl crate::power::wol::ShutdownAsker for RetireThroughHealthcheckers {
    async fn ask(&self, server: &ServerSpec) -> Result<(), PowerError> {
        let transient = |detail: String| PowerError::Transient {
            server: server.name.clone(),
            detail,
        };
        let row = self
            .ledger
            .server(&server.name)
            .await
            .map_err(|e| transient(format!("reading the inventory: {e}")))?;
        let Some(cell_id) = row.and_then(|r| r.cell_id) else {
            tracing::warn!(server = %server.name, "no cell joined from this machine: nothing can ask it to shut down");
            return Ok(());
        };
        let order = protocol::control::RetireRequest {
            cell_id: cell_id.clone(),
            reason: format!("the factory takes machine {} out of service", server.name),
        };
        let mut told = 0;
        let mut last = String::from("no health checkers");
        for hc in &self.healthcheckers {
            match self.client.ask(hc, &order).await {
                Ok(_) => told += 1,
                Err(e) => last = e.to_string(),
            }
        }
        if told == 0 {
            return Err(transient(format!(
                "no health checker took the order to retire cell {cell_id}: {last}"
            )));
        }
        Ok(())
    }
}

/// How long a bring-up may take before an adopting factory gives up on it: every attempt's boot
/// timeout and backoff.
fn bring_up_budget_ms(settings: &PoolSettings) -> i64 {
    let attempts = settings.max_attempts.max(1);
    let backoff = settings.backoff.as_millis() as i64 * (1i64 << attempts.min(16));
    settings.boot_timeout.as_millis() as i64 * attempts as i64 + backoff
}

enum Attempt {
    /// Not worth retrying on this server (authentication, configuration).
    Auth(PowerError),
    Failed(String),
    /// The server was taken out of this bring-up's hands (powered off by its requester).
    Abandoned(String),
}

fn write_boot_file(dir: &std::path::Path, server: &str, join: &JoinData) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(format!("{server}.join"));
    let _ = std::fs::create_dir_all(dir);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            writeln!(f, "HOMEOSTAT_JOIN={}", join.join_url)?;
            writeln!(f, "HOMEOSTAT_TOKEN={}", join.token)
        });
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "writing a machine's join file failed");
    }
}

/// The purse and the pool as gauges, read from the ledger when `/metrics` is scraped (the
/// figures `GET /pool` shows). Money in the budget's currency units (`infra/budget.toml`).
/// Without a pool nothing is spent and there is no cap: spend 0, caps `+Inf`.
pub fn spend_gauges(state: &Arc<crate::role::FactoryState>) {
    let state = state.clone();
    vitals::on_scrape(move || {
        let state = state.clone();
        async move {
            let units = |m: engines::pool::Micros| m as f64 / 1_000_000.0;
            let Some(pool) = state.pool.get() else {
                metrics::gauge!("factory_spend_committed_per_hour").set(0.0);
                metrics::gauge!("factory_spend_month").set(0.0);
                metrics::gauge!("factory_spend_cap_per_hour").set(f64::INFINITY);
                metrics::gauge!("factory_spend_cap_month").set(f64::INFINITY);
                return;
            };
            if let Ok(spend) = pool.spend().await {
                metrics::gauge!("factory_spend_committed_per_hour")
                    .set(units(spend.committed_per_hour));
                metrics::gauge!("factory_spend_month").set(units(spend.spent_month));
                metrics::gauge!("factory_spend_committed_month").set(units(spend.committed_month));
                metrics::gauge!("factory_spend_cap_per_hour").set(units(spend.caps.per_hour));
                metrics::gauge!("factory_spend_cap_month").set(units(spend.caps.per_month));
                metrics::gauge!("factory_pool_servers_spending").set(spend.spending_servers as f64);
            }
            if let Ok(servers) = pool.ledger.servers().await {
                let mut by: BTreeMap<(&'static str, String), u64> = BTreeMap::new();
                for s in &servers {
                    *by.entry((s.state.as_str(), s.provider.clone()))
                        .or_default() += 1;
                }
                for ((st, provider), n) in by {
                    metrics::gauge!("factory_pool_servers", "state" => st, "provider" => provider)
                        .set(n as f64);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_on_the_first_at_midnight_utc() {
        // 2026-11-26T01:02:03Z
        let now = 1_795_654_923_000;
        let start = month_start_ms(now);
        let t = time::OffsetDateTime::from_unix_timestamp(start / 1000).expect("ok");
        assert_eq!(
            (t.year(), t.month() as u8, t.day(), t.hour()),
            (2026, 11, 1, 0)
        );
        assert!(start <= now);
    }
}
