//! The factory's server pool, from `[pool]` in the organism's configuration: the pool and budget
//! files, the ledger in the store's database, one provider per kind the pool uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use factory::pool::{IsLive, JoinConfig, PoolFactory, PoolSettings};
use factory::power::{PowerProvider, ProviderKind};
use infra::{Config, EngineUrl};

/// The pool factory, when the configuration names a pool; its servers are declared in the
/// inventory.
pub async fn pool_factory(
    cfg: &Config,
    factory_id: String,
    join_url: String,
    cell_args: Vec<String>,
    healthcheckers: Vec<String>,
) -> anyhow::Result<Option<Arc<PoolFactory>>> {
    let Some((pool_file, budget)) = cfg.pool_files()? else {
        return Ok(None);
    };
    let ledger = match cfg.database() {
        EngineUrl::Sqlite(path) => {
            let path = path.to_string_lossy().to_string();
            engines::pool::PoolLedger::open_sqlite(&path)
                .await
                .with_context(|| format!("opening the pool's inventory at {path}"))?
        }
        EngineUrl::Postgres(url) => engines::pool::PoolLedger::connect_postgres(&url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", infra::redact(&url)))?,
        other => anyhow::bail!("engines.database {other:?} is not a store engine"),
    };
    let section = &cfg.raw.pool;
    let exe = std::env::current_exe().context("locating the cell executable")?;
    let mut providers: HashMap<ProviderKind, Arc<dyn PowerProvider>> = HashMap::new();
    let lease: Vec<(String, String)> = std::env::var(factory::lease::LEASE_ENV)
        .ok()
        .map(|v| vec![(factory::lease::LEASE_ENV.to_string(), v)])
        .unwrap_or_default();
    for kind in pool_file.servers.iter().map(|s| s.provider) {
        if providers.contains_key(&kind) {
            continue;
        }
        let provider: Arc<dyn PowerProvider> = match kind {
            ProviderKind::Local => Arc::new(factory::power::local::LocalMachines::new(
                exe.clone(),
                lease.clone(),
                Duration::from_secs(20),
                Some(cfg.raw.organism.data_dir.join("machines")),
            )),
            ProviderKind::Wol => Arc::new(factory::power::wol::WolProvider::new(Arc::new(
                factory::pool::RetireThroughHealthcheckers {
                    ledger: ledger.clone(),
                    client: control::ControlClient::new(control::Signer::new(
                        control::ClusterKey::from_env()?,
                        factory_id.clone(),
                    )),
                    healthcheckers: healthcheckers.clone(),
                },
            ))),
            other => providers_for(other)?,
        };
        providers.insert(kind, provider);
    }
    let key = control::ClusterKey::from_env()?;
    let reader = protocol::client::CellsClient::with_http(
        reqwest::Client::builder()
            .default_headers(control::read_headers_from_env())
            .build()?,
        healthcheckers,
        None,
    );
    let is_live: IsLive = Arc::new(move |cell_id: String| {
        let reader = reader.clone();
        Box::pin(async move {
            reader.read().await.is_ok_and(|cells| {
                cells.roles.values().flatten().any(|c| {
                    c.cell_id == cell_id && c.state != protocol::control::CellState::Retired
                })
            })
        })
    });
    let settings = PoolSettings {
        boot_timeout: Duration::from_secs(section.boot_timeout_secs),
        max_attempts: section.max_attempts,
        backoff: Duration::from_secs_f64(section.backoff_secs),
        power_ons_per_minute: section.power_ons_per_minute,
        power_offs_per_minute: section.power_offs_per_minute,
        token_ttl: Duration::from_secs(section.token_ttl_secs),
        boot_dir: cfg.pool_path(&section.boot_dir),
        ..PoolSettings::default()
    };
    let pool = PoolFactory::new(
        ledger,
        section.roles.clone(),
        pool_file.servers,
        providers,
        budget.caps(),
        factory_id,
        join_url,
        JoinConfig {
            infra_toml: cfg.to_toml(),
            cluster_key_hex: key.to_hex(),
            cell_args,
        },
        settings,
        is_live,
    );
    pool.declare()
        .await
        .context("declaring the pool's servers")?;
    Ok(Some(pool))
}

/// The providers that talk to hardware or a cloud.
fn providers_for(kind: ProviderKind) -> anyhow::Result<Arc<dyn PowerProvider>> {
    match kind {
        ProviderKind::Ec2 => Ok(Arc::new(
            factory::power::ec2::Ec2Provider::new().context("building the EC2 client")?,
        )),
        ProviderKind::Ipmi => Ok(Arc::new(factory::power::ipmi::IpmiProvider::new())),
        other => anyhow::bail!(
            "the {} provider is not built into this cell yet",
            other.as_str()
        ),
    }
}
