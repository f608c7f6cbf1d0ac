//! Power providers: how the factory turns a pool machine on and off and asks whether it is on.
//!
//! One trait, [`PowerProvider`], chosen per server by [`ServerSpec::provider`]:
//! - `local`: a machine is an OS process on this host (the [`crate::local`] provider);
//! - `ipmi`: IPMI v2.0 over LAN (RMCP+, "lanplus") chassis power control of a BMC;
//! - `wol`: Wake-on-LAN magic packets; power-off asks the machine's cell to drain and shut down;
//! - `ec2`: the EC2 API (RunInstances / StartInstances / StopInstances / TerminateInstances /
//!   DescribeInstances, SigV4), against AWS or any EC2-compatible endpoint.
//!
//! A machine that powers on boots a blank `cell boot --join URL --token TOKEN`; [`JoinData`] is
//! what the provider can hand it (EC2 passes it as user data; a BMC or a magic packet cannot, so
//! such a machine reads it from its own boot configuration or DNS TXT records).

pub mod ec2;
pub mod ipmi;
pub mod local;
pub mod wol;

use serde::{Deserialize, Serialize};

/// Which provider powers a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Ipmi,
    Wol,
    Ec2,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Ipmi => "ipmi",
            ProviderKind::Wol => "wol",
            ProviderKind::Ec2 => "ec2",
        }
    }
}

/// One server of the pool, as `infra/pool.toml` declares it (`[[server]]`). Which fields a
/// provider needs is checked when the file is loaded (`infra::pool`), naming the file, the
/// server and the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Unique in the pool; also the machine's host name for DNS TXT configuration.
    pub name: String,
    pub provider: ProviderKind,
    /// The machine's MAC address (`aa:bb:cc:dd:ee:ff`): required for `wol`.
    #[serde(default)]
    pub mac: Option<String>,
    /// `ipmi`: the BMC's `host:port` (port 623 when omitted).
    #[serde(default)]
    pub bmc: Option<String>,
    /// Where the secret lives, never the secret itself: `env:NAME` or `file:/path`.
    /// `ipmi`: `user:password`; `ec2`: `access_key_id:secret_access_key`; `wol`: the optional
    /// SecureOn password (6 bytes as `aa:bb:cc:dd:ee:ff`).
    #[serde(default)]
    pub credentials: Option<String>,
    /// What the server costs per hour while powered on, in the budget's currency.
    pub hourly_cost: f64,
    /// How many cells it can hold.
    #[serde(default = "one")]
    pub capacity: u32,
    /// `wol`: where magic packets go (`255.255.255.255:9` when omitted).
    #[serde(default)]
    pub broadcast: Option<String>,
    /// `ec2`: the endpoint (`https://ec2.REGION.amazonaws.com` when omitted).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `ec2`: the region (required).
    #[serde(default)]
    pub region: Option<String>,
    /// `ec2`: the AMI a new instance runs (required unless `instance_id` names a stopped one).
    #[serde(default)]
    pub image_id: Option<String>,
    /// `ec2`: the instance type (`t3.micro` when omitted).
    #[serde(default)]
    pub instance_type: Option<String>,
    /// `ec2`: an existing instance this server is (started and stopped, never terminated).
    /// Without it every power-on runs a new instance and power-off terminates it.
    #[serde(default)]
    pub instance_id: Option<String>,
}

fn one() -> u32 {
    1
}

/// A server's power as its provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
    /// The provider cannot tell (Wake-on-LAN): the factory learns it from heartbeats.
    Unknown,
}

/// What a booting machine needs to join the organism.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinData {
    /// A factory's join endpoint.
    pub join_url: String,
    /// The one-time bootstrap token (`id.secret`).
    pub token: String,
}

impl JoinData {
    /// The command a blank machine runs.
    pub fn command(&self) -> String {
        format!("cell boot --join {} --token {}", self.join_url, self.token)
    }
}

/// Why a provider could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// The BMC or cloud refused our credentials: retrying cannot help.
    #[error("server {server}: authentication refused: {detail}")]
    Auth { server: String, detail: String },
    /// The server's configuration cannot work (a missing key, a bad address): not retried.
    #[error("server {server}: misconfigured: {detail}")]
    Config { server: String, detail: String },
    /// Anything that may pass (a timeout, a refused connection, a 5xx): retried with backoff.
    #[error("server {server}: {detail}")]
    Transient { server: String, detail: String },
}

impl PowerError {
    pub fn retryable(&self) -> bool {
        matches!(self, PowerError::Transient { .. })
    }
}

/// Turns pool machines on and off.
#[async_trait::async_trait]
pub trait PowerProvider: Send + Sync {
    /// Power the server on (a new EC2 instance, a started one, a BMC's chassis power on, a magic
    /// packet). Returns once the provider accepted the request; the machine is joined only when
    /// its cell heartbeats.
    async fn power_on(&self, server: &ServerSpec, join: &JoinData) -> Result<(), PowerError>;
    /// Power the server off (for `wol`: ask its cell to drain and shut its machine down).
    async fn power_off(&self, server: &ServerSpec) -> Result<(), PowerError>;
    /// What the provider says of the server's power.
    async fn status(&self, server: &ServerSpec) -> Result<PowerState, PowerError>;
}

/// Read a credentials reference (`env:NAME` or `file:/path`) into the secret it names.
pub fn read_credentials(server: &ServerSpec) -> Result<Option<String>, PowerError> {
    let Some(reference) = &server.credentials else {
        return Ok(None);
    };
    let config = |detail: String| PowerError::Config {
        server: server.name.clone(),
        detail,
    };
    if let Some(name) = reference.strip_prefix("env:") {
        std::env::var(name)
            .map(|v| Some(v.trim().to_string()))
            .map_err(|_| {
                config(format!(
                    "credentials: environment variable {name} is not set"
                ))
            })
    } else if let Some(path) = reference.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|v| Some(v.trim().to_string()))
            .map_err(|e| config(format!("credentials: reading {path}: {e}")))
    } else {
        Err(config(format!(
            "credentials: {reference:?} is neither env:NAME nor file:/path"
        )))
    }
}
