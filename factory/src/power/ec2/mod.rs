//! The `ec2` provider: pool servers are EC2 instances, driven through the EC2 Query API
//! (`Version=2016-11-15`, form-encoded POSTs signed with SigV4) at the server's `endpoint`
//! (`https://ec2.REGION.amazonaws.com` when omitted), so any EC2-compatible endpoint works.
//!
//! Two kinds of server:
//! - **with `instance_id`**: an existing instance that is started (`StartInstances`) and stopped
//!   (`StopInstances`), never terminated. It reads its join data from its own boot
//!   configuration, as a BMC-powered machine does.
//! - **without**: every power-on runs a new instance (`RunInstances`: `image_id`,
//!   `instance_type` (`t3.micro` when omitted), tagged `homeostat-server=NAME`, shutting itself
//!   down terminates it) whose user data is a shell script that cloud-init runs at first boot:
//!   `cell boot --join URL --token TOKEN` ([`user_data`]). Power-off terminates every
//!   instance tagged with the server's name that is not terminated yet.
//!
//! A power-on never runs two instances for one server: an instance of the server that is
//! already pending or running is kept (whatever join data it was given: to boot with new join
//! data, power off first), and `RunInstances` carries a client token derived from the server's
//! name and the join token ([`client_token`]), so EC2 answers a retried request (after a
//! timeout, from a second factory) with the instance the first one ran. Some EC2-compatible
//! endpoints ignore client tokens (moto keeps but does not check them); the tag lookup
//! covers them except for two requests that race.
//!
//! Status: pending/running are [`PowerState::On`]; stopping, stopped, shutting-down,
//! terminated or no instance are [`PowerState::Off`].
//!
//! Errors: refused credentials (`AuthFailure`, `UnauthorizedOperation`, ...) are
//! [`PowerError::Auth`]; throttling, 5xx, timeouts, lost connections and an instance caught
//! between states (`IncorrectInstanceState`) are [`PowerError::Transient`]; any other error the service names (a bad AMI, an unknown
//! instance) is [`PowerError::Config`] with its code and message. Secrets, user data and join
//! tokens are never logged nor put in an error.

pub mod query;
pub mod sigv4;

use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use self::query::{DescribeInstances, ErrorClass, Instance, QueryClient, QueryError, Reservation};
use self::sigv4::Credentials;
use super::{read_credentials, JoinData, PowerError, PowerProvider, PowerState, ServerSpec};

/// The EC2 API version spoken.
pub const API_VERSION: &str = "2016-11-15";
/// The tag that names an instance's server.
pub const SERVER_TAG: &str = "homeostat-server";
/// The instance type when a server names none.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";

/// Instance states in which an instance is (or is about to be) powered on.
const ON_STATES: &[&str] = &["pending", "running"];
/// Instance states in which an instance still exists and may cost money.
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];

/// Powers servers through the EC2 API. Holds only an HTTP connection pool: every call reads the
/// server's spec and credentials afresh.
#[derive(Debug, Clone)]
pub struct Ec2Provider {
    http: reqwest::Client,
}

impl Ec2Provider {
    /// Calls time out after 30 s.
    pub fn new() -> Result<Self, reqwest::Error> {
        Self::with_timeout(Duration::from_secs(30))
    }

    pub fn with_timeout(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()?;
        Ok(Ec2Provider { http })
    }

    /// A signed EC2 client for `server`, from its endpoint, region and credentials.
    pub fn client(&self, server: &ServerSpec) -> Result<QueryClient, PowerError> {
        let config = |detail: String| PowerError::Config {
            server: server.name.clone(),
            detail,
        };
        let region = server
            .region
            .as_deref()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| config("region: required for an ec2 server".into()))?;
        let endpoint = match &server.endpoint {
            Some(e) => e.clone(),
            None => format!("https://ec2.{region}.amazonaws.com"),
        };
        let endpoint = url::Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| config(format!("endpoint: {endpoint:?} is not an http(s) URL")))?;
        let secret = read_credentials(server)?
            .ok_or_else(|| config("credentials: required for an ec2 server".into()))?;
        let credentials = match secret.split_once(':') {
            Some((id, key)) if !id.is_empty() && !key.is_empty() => Credentials::new(id, key),
            // The value itself is a secret: it is not repeated.
            _ => {
                return Err(config(
                    "credentials: expected access_key_id:secret_access_key".into(),
                ))
            }
        };
        Ok(QueryClient::with_http(
            self.http.clone(),
            endpoint,
            region,
            "ec2",
            API_VERSION,
            credentials,
        ))
    }

    /// The instances tagged with `server`'s name in one of `states`.
    async fn tagged_instances(
        &self,
        client: &QueryClient,
        server: &ServerSpec,
        states: &[&str],
    ) -> Result<Vec<Instance>, PowerError> {
        let mut params = vec![
            ("Filter.1.Name".to_string(), format!("tag:{SERVER_TAG}")),
            ("Filter.1.Value.1".to_string(), server.name.clone()),
            (
                "Filter.2.Name".to_string(),
                "instance-state-name".to_string(),
            ),
        ];
        for (i, state) in states.iter().enumerate() {
            params.push((format!("Filter.2.Value.{}", i + 1), state.to_string()));
        }
        describe(client, server, params).await
    }

    async fn instance(
        &self,
        client: &QueryClient,
        server: &ServerSpec,
        instance_id: &str,
    ) -> Result<Instance, PowerError> {
        let params = vec![("InstanceId.1".to_string(), instance_id.to_string())];
        describe(client, server, params)
            .await?
            .into_iter()
            .find(|i| i.instance_id == instance_id)
            .ok_or_else(|| PowerError::Config {
                server: server.name.clone(),
                detail: format!("instance {instance_id} does not exist"),
            })
    }

    async fn run_instance(
        &self,
        client: &QueryClient,
        server: &ServerSpec,
        join: &JoinData,
    ) -> Result<(), PowerError> {
        let image_id = server
            .image_id
            .as_deref()
            .filter(|i| !i.is_empty())
            .ok_or_else(|| PowerError::Config {
                server: server.name.clone(),
                detail: "image_id: required for an ec2 server without instance_id".into(),
            })?;
        let running = self.tagged_instances(client, server, ON_STATES).await?;
        if let Some(instance) = running.first() {
            tracing::info!(
                server = %server.name,
                instance = %instance.instance_id,
                state = %instance.state.name,
                "ec2: already on; keeping its instance"
            );
            return Ok(());
        }
        let instance_type = server
            .instance_type
            .as_deref()
            .unwrap_or(DEFAULT_INSTANCE_TYPE);
        let params: Vec<(String, String)> = [
            ("ImageId", image_id),
            ("InstanceType", instance_type),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", &client_token(server, join)),
            ("UserData", &user_data(join)),
            ("InstanceInitiatedShutdownBehavior", "terminate"),
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", SERVER_TAG),
            ("TagSpecification.1.Tag.1.Value", &server.name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let reservation: Reservation = client
            .call_as("RunInstances", &params)
            .await
            .map_err(|e| power_error(server, e))?;
        let ids: Vec<&str> = reservation
            .instances
            .item
            .iter()
            .map(|i| i.instance_id.as_str())
            .collect();
        tracing::info!(server = %server.name, instances = ?ids, "ec2: ran an instance");
        Ok(())
    }
}

/// `DescribeInstances` with `params`, every page.
async fn describe(
    client: &QueryClient,
    server: &ServerSpec,
    params: Vec<(String, String)>,
) -> Result<Vec<Instance>, PowerError> {
    let mut instances = Vec::new();
    let mut next: Option<String> = None;
    // A bound on pages, so a looping endpoint cannot hold a power request forever.
    for _ in 0..100 {
        let mut page = params.clone();
        if let Some(token) = next.take() {
            page.push(("NextToken".to_string(), token));
        }
        let answer: DescribeInstances = client
            .call_as("DescribeInstances", &page)
            .await
            .map_err(|e| power_error(server, e))?;
        for reservation in answer.reservations.item {
            instances.extend(reservation.instances.item);
        }
        match answer.next_token.filter(|t| !t.is_empty()) {
            Some(token) => next = Some(token),
            None => return Ok(instances),
        }
    }
    Err(PowerError::Transient {
        server: server.name.clone(),
        detail: "DescribeInstances: more than 100 pages".into(),
    })
}

/// A query error as the provider trait reports it.
fn power_error(server: &ServerSpec, error: QueryError) -> PowerError {
    let server = server.name.clone();
    let detail = format!("ec2 {error}");
    match error.class() {
        ErrorClass::Auth => PowerError::Auth { server, detail },
        ErrorClass::Transient => PowerError::Transient { server, detail },
        ErrorClass::Config => PowerError::Config { server, detail },
    }
}

/// The `RunInstances` client token of a power-on: the same server and join token always give
/// the same one (so a retried request runs no second instance); a new join token, a new one.
/// A SHA-256 in hex: 64 characters, EC2's limit, and the join token cannot be read back from it.
pub fn client_token(server: &ServerSpec, join: &JoinData) -> String {
    let mut hash = Sha256::new();
    hash.update(b"homeostat ec2 client token\0");
    hash.update(server.name.as_bytes());
    hash.update(b"\0");
    hash.update(join.token.as_bytes());
    hex::encode(hash.finalize())
}

/// The user data of a new instance, base64-encoded: a shell script (cloud-init runs a user
/// data that starts with `#!` once, at first boot) that runs [`JoinData::command`], each
/// argument quoted for the shell.
pub fn user_data(join: &JoinData) -> String {
    let script = format!(
        "#!/bin/sh\n\
         # Homeostat: a blank machine joins the organism.\n\
         exec cell boot --join {} --token {}\n",
        shell_quote(&join.join_url),
        shell_quote(&join.token)
    );
    base64::engine::general_purpose::STANDARD.encode(script)
}

/// `value` in single quotes, its own single quotes written `'\''`.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[async_trait::async_trait]
impl PowerProvider for Ec2Provider {
    async fn power_on(&self, server: &ServerSpec, join: &JoinData) -> Result<(), PowerError> {
        let client = self.client(server)?;
        match &server.instance_id {
            Some(id) => {
                client
                    .call("StartInstances", &[("InstanceId.1".into(), id.clone())])
                    .await
                    .map_err(|e| power_error(server, e))?;
                tracing::info!(server = %server.name, instance = %id, "ec2: started");
                Ok(())
            }
            None => self.run_instance(&client, server, join).await,
        }
    }

    async fn power_off(&self, server: &ServerSpec) -> Result<(), PowerError> {
        let client = self.client(server)?;
        if let Some(id) = &server.instance_id {
            client
                .call("StopInstances", &[("InstanceId.1".into(), id.clone())])
                .await
                .map_err(|e| power_error(server, e))?;
            tracing::info!(server = %server.name, instance = %id, "ec2: stopped");
            return Ok(());
        }
        let live = self.tagged_instances(&client, server, LIVE_STATES).await?;
        if live.is_empty() {
            return Ok(());
        }
        let params: Vec<(String, String)> = live
            .iter()
            .enumerate()
            .map(|(i, instance)| {
                (
                    format!("InstanceId.{}", i + 1),
                    instance.instance_id.clone(),
                )
            })
            .collect();
        client
            .call("TerminateInstances", &params)
            .await
            .map_err(|e| power_error(server, e))?;
        let ids: Vec<&str> = live.iter().map(|i| i.instance_id.as_str()).collect();
        tracing::info!(server = %server.name, instances = ?ids, "ec2: terminated");
        Ok(())
    }

    async fn status(&self, server: &ServerSpec) -> Result<PowerState, PowerError> {
        let client = self.client(server)?;
        let on = match &server.instance_id {
            Some(id) => {
                let instance = self.instance(&client, server, id).await?;
                ON_STATES.contains(&instance.state.name.as_str())
            }
            None => !self
                .tagged_instances(&client, server, ON_STATES)
                .await?
                .is_empty(),
        };
        Ok(if on { PowerState::On } else { PowerState::Off })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::ProviderKind;

    fn spec() -> ServerSpec {
        ServerSpec {
            name: "ec2-a".into(),
            provider: ProviderKind::Ec2,
            mac: None,
            bmc: None,
            credentials: Some("env:HOMEOSTAT_EC2_UNIT_TEST_KEY".into()),
            hourly_cost: 0.01,
            capacity: 1,
            broadcast: None,
            endpoint: None,
            region: Some("eu-west-1".into()),
            image_id: Some("ami-12345678".into()),
            instance_type: None,
            instance_id: None,
        }
    }

    fn join(token: &str) -> JoinData {
        JoinData {
            join_url: "http://10.0.0.1:7000/join".into(),
            token: token.into(),
        }
    }

    #[test]
    fn client_tokens_are_stable_per_server_and_join_token() {
        let a = client_token(&spec(), &join("abcdef.0123456789abcdef"));
        assert_eq!(a, client_token(&spec(), &join("abcdef.0123456789abcdef")));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("abcdef.0123456789abcdef"));
        assert_ne!(a, client_token(&spec(), &join("ghijkl.0123456789abcdef")));
        let mut other = spec();
        other.name = "ec2-b".into();
        assert_ne!(a, client_token(&other, &join("abcdef.0123456789abcdef")));
    }

    #[test]
    fn user_data_is_a_script_running_the_join_command() {
        let j = join("abcdef.0123456789abcdef");
        let script = base64::engine::general_purpose::STANDARD
            .decode(user_data(&j))
            .expect("base64");
        let script = String::from_utf8(script).expect("utf-8");
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        assert_eq!(
            script.lines().last().map(|l| l.replace('\'', "")),
            Some(format!("exec {}", j.command()))
        );
    }

    #[test]
    fn quoting_survives_shell_metacharacters() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert_eq!(shell_quote("http://h/?a=1&b=$x"), "'http://h/?a=1&b=$x'");
    }

    #[test]
    fn a_spec_missing_what_ec2_needs_is_a_config_error() {
        std::env::set_var("HOMEOSTAT_EC2_UNIT_TEST_KEY", "AKIDEXAMPLE:secret");
        let provider = Ec2Provider::new().expect("client");
        let detail = |s: &ServerSpec| match provider.client(s) {
            Err(PowerError::Config { detail, .. }) => detail,
            other => panic!("expected a config error, got {other:?}"),
        };
        let mut s = spec();
        s.region = None;
        assert!(detail(&s).starts_with("region:"));
        let mut s = spec();
        s.endpoint = Some("ftp://example".into());
        assert!(detail(&s).starts_with("endpoint:"));
        let mut s = spec();
        s.credentials = None;
        assert!(detail(&s).starts_with("credentials:"));
        let mut s = spec();
        s.credentials = Some("env:HOMEOSTAT_EC2_UNIT_TEST_BAD_KEY".into());
        std::env::set_var("HOMEOSTAT_EC2_UNIT_TEST_BAD_KEY", "no-colon-secret");
        let d = detail(&s);
        assert!(
            d.starts_with("credentials:") && !d.contains("no-colon-secret"),
            "{d}"
        );
        assert!(provider.client(&spec()).is_ok());
    }
}
