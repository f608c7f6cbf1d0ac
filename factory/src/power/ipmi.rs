//! The `ipmi` provider: chassis power of a pool machine through its BMC, over IPMI v2.0 LAN
//! (RMCP+, what `ipmitool -I lanplus` speaks).
//!
//! Each call opens one RMCP+ session (Open Session, RAKP 1-4 with RAKP-HMAC-SHA1; cipher suite 3:
//! integrity HMAC-SHA1-96, confidentiality AES-CBC-128) as an Administrator or else Operator
//! user, sends one command and closes the session: `Get Chassis Status` (netfn 0x00, cmd 0x01) at the
//! User privilege a session starts with, or `Set Session Privilege Level` (Operator) and then
//! `Chassis Control` (netfn 0x00, cmd 0x02: power up / power down). No session is kept between calls: BMCs drop idle sessions
//! after about a minute and allow only a few at once, and the factory asks seldom.
//!
//! The protocol is the [`ipmi`](::ipmi) crate's (it verifies every integrity code before
//! decrypting), its blocking client on tokio's blocking pool: the crate's async client makes
//! futures that are not `Send`. Each request is sent up to [`IpmiProvider::attempts`] times,
//! waiting [`IpmiProvider::timeout`] for each answer; a resent `Chassis Control` is harmless
//! (powering up a machine that is up does nothing).
//!
//! Errors: a refused login (a RAKP status, an authentication code that does not verify, a
//! privilege the user lacks) is [`PowerError::Auth`], never retried; a timeout, a refused or
//! unreachable port, or a malformed answer is [`PowerError::Transient`]; a missing or bad `bmc`
//! or credentials, or a BMC that offers no cipher suite we speak, is [`PowerError::Config`].
//!
//! Known limit (the crate's): when a BMC refuses cipher suite 3 the crate falls back to suite 2
//! (integrity, no confidentiality) and then 1 (authentication only), and does not say which it
//! got. On a management LAN of our own that is tolerable; a BMC that can do suite 3 gets suite 3.
//!
//! A BMC cannot hand the machine its [`JoinData`]: a machine powered on through IPMI reads its
//! join URL and token from its own boot configuration or DNS TXT records.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{read_credentials, JoinData, PowerError, PowerProvider, PowerState, ServerSpec};

/// The standard RMCP port.
pub const DEFAULT_PORT: u16 = 623;

/// Chassis power control through a BMC.
#[derive(Debug, Clone)]
pub struct IpmiProvider {
    timeout: Duration,
    attempts: u32,
}

impl Default for IpmiProvider {
    fn default() -> Self {
        Self::new()
    }
}

/// What a provider call asks of the BMC.
#[derive(Debug, Clone, Copy)]
enum Operation {
    PowerUp,
    PowerDown,
    Status,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::PowerUp => "chassis power on",
            Operation::PowerDown => "chassis power off",
            Operation::Status => "chassis power status",
        }
    }
}

impl IpmiProvider {
    /// One second per answer, three sends per request (ipmitool's defaults are alike).
    pub fn new() -> Self {
        Self::with_timing(Duration::from_secs(1), 3)
    }

    /// `timeout` for each answer; each request is sent at most `attempts` times (at least once).
    pub fn with_timing(timeout: Duration, attempts: u32) -> Self {
        Self {
            timeout,
            attempts: attempts.max(1),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    async fn run(
        &self,
        server: &ServerSpec,
        operation: Operation,
    ) -> Result<Option<PowerState>, PowerError> {
        let target = bmc_address(server).await?;
        let (user, password) = user_and_password(server)?;
        let (timeout, attempts) = (self.timeout, self.attempts);
        let started = Instant::now();
        // The exchange blocks (a few round trips, each bounded by timeout x attempts), so it runs
        // on tokio's blocking pool. Dropping this future does not stop an exchange under way.
        let task = tokio::task::spawn_blocking(move || {
            exchange(target, &user, &password, timeout, attempts, operation)
        });
        let outcome = task
            .await
            .map_err(|e| PowerError::Transient {
                server: server.name.clone(),
                detail: format!("bmc {target}: the IPMI exchange did not finish: {e}"),
            })?
            .map_err(|(doing, e)| classify(server, target, doing, e))?;
        tracing::debug!(
            server = %server.name,
            bmc = %target,
            operation = operation.name(),
            state = ?outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ipmi: done"
        );
        Ok(outcome)
    }
}

/// One session: open, one command, close. The error names the step that failed.
fn exchange(
    target: SocketAddr,
    user: &str,
    password: &str,
    timeout: Duration,
    attempts: u32,
    operation: Operation,
) -> Result<Option<PowerState>, (&'static str, ::ipmi::Error)> {
    // RAKP 1 asks for a privilege by "name and privilege" lookup, which a strict BMC (ipmi_sim)
    // answers only for the user's own level: Administrator first (the usual power account), then
    // Operator (the least that Chassis Control needs). A wrong password fails on the first try.
    let open = |privilege| {
        ::ipmi::BlockingClient::builder(target)
            .username(user)
            .password(password)
            .privilege_level(privilege)
            .timeout(timeout)
            .retries(attempts)
            .build()
    };
    let client = match open(::ipmi::PrivilegeLevel::Administrator) {
        Err(::ipmi::Error::AuthenticationFailed(RAKP2_REFUSED)) => {
            open(::ipmi::PrivilegeLevel::Operator)
        }
        other => other,
    }
    .map_err(|e| ("opening an RMCP+ session", e))?;
    let result = operate(&client, operation);
    // Best effort: the BMC times the session out anyway; a failed close changes nothing.
    if let Err(e) = client.close_session() {
        tracing::debug!(bmc = %target, error = %e, "ipmi: closing the session failed");
    }
    result
}

fn operate(
    client: &::ipmi::BlockingClient,
    operation: Operation,
) -> Result<Option<PowerState>, (&'static str, ::ipmi::Error)> {
    if matches!(operation, Operation::PowerUp | Operation::PowerDown) {
        // A session starts at User privilege; Chassis Control needs Operator.
        let response = client
            .send_raw(NETFN_APP, CMD_SET_SESSION_PRIVILEGE, &[PRIVILEGE_OPERATOR])
            .map_err(|e| ("raising the session to Operator privilege", e))?;
        if response.completion_code != 0 {
            return Err((
                "raising the session to Operator privilege",
                ::ipmi::Error::CompletionCode {
                    completion_code: response.completion_code,
                },
            ));
        }
    }
    let result = match operation {
        Operation::PowerUp => client
            .chassis_control(::ipmi::ChassisControl::PowerUp)
            .map(|()| None),
        Operation::PowerDown => client
            .chassis_control(::ipmi::ChassisControl::PowerDown)
            .map(|()| None),
        Operation::Status => client.get_chassis_status().map(|status| {
            Some(if status.system_power_on {
                PowerState::On
            } else {
                PowerState::Off
            })
        }),
    };
    result.map_err(|e| (operation.name(), e))
}

/// What the `ipmi` crate says when RAKP message 2 carries an error status (an unknown user, or
/// no such user at the requested privilege).
const RAKP2_REFUSED: &str = "RAKP message 2 status != 0";
const NETFN_APP: u8 = 0x06;
/// `Set Session Privilege Level` (App, 0x3B).
const CMD_SET_SESSION_PRIVILEGE: u8 = 0x3B;
const PRIVILEGE_OPERATOR: u8 = 0x03;

#[async_trait::async_trait]
impl PowerProvider for IpmiProvider {
    /// `Chassis Control: power up`. The join data stays unused: a BMC cannot pass it on.
    async fn power_on(&self, server: &ServerSpec, _join: &JoinData) -> Result<(), PowerError> {
        self.run(server, Operation::PowerUp).await.map(|_| ())
    }

    /// `Chassis Control: power down` (hard off; the cell is drained before the factory asks).
    async fn power_off(&self, server: &ServerSpec) -> Result<(), PowerError> {
        self.run(server, Operation::PowerDown).await.map(|_| ())
    }

    /// `Get Chassis Status`: on or off.
    async fn status(&self, server: &ServerSpec) -> Result<PowerState, PowerError> {
        self.run(server, Operation::Status)
            .await?
            .ok_or_else(|| PowerError::Transient {
                server: server.name.clone(),
                detail: "chassis status: no answer decoded".to_string(),
            })
    }
}

/// The BMC's address from `bmc` (`host` or `host:port`, `[v6]:port`; port 623 when omitted).
async fn bmc_address(server: &ServerSpec) -> Result<SocketAddr, PowerError> {
    let config = |detail: String| PowerError::Config {
        server: server.name.clone(),
        detail,
    };
    let bmc = server
        .bmc
        .as_deref()
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| config("bmc: missing (the BMC's host or host:port)".to_string()))?;
    let (host, port) = split_host_port(bmc).map_err(|e| config(format!("bmc {bmc:?}: {e}")))?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addresses =
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| PowerError::Transient {
                server: server.name.clone(),
                detail: format!("bmc {bmc:?}: resolving {host}: {e}"),
            })?;
    addresses.next().ok_or_else(|| PowerError::Transient {
        server: server.name.clone(),
        detail: format!("bmc {bmc:?}: {host} resolves to no address"),
    })
}

/// `host`, `host:port`, `v6addr`, `[v6addr]` or `[v6addr]:port`.
fn split_host_port(bmc: &str) -> Result<(&str, u16), String> {
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))
    };
    if let Some(rest) = bmc.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "an opening '[' without its ']'".to_string())?;
        return match after {
            "" => Ok((host, DEFAULT_PORT)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, parse_port(port)?)),
                None => Err(format!("{after:?} after ']' is not :PORT")),
            },
        };
    }
    match bmc.matches(':').count() {
        0 => Ok((bmc, DEFAULT_PORT)),
        1 => {
            let (host, port) = bmc.split_once(':').expect("one colon was counted");
            if host.is_empty() {
                return Err("no host before ':'".to_string());
            }
            Ok((host, parse_port(port)?))
        }
        // A bare IPv6 address.
        _ => Ok((bmc, DEFAULT_PORT)),
    }
}

/// `user:password` from the credentials reference (the password may hold ':').
fn user_and_password(server: &ServerSpec) -> Result<(String, String), PowerError> {
    let config = |detail: &str| PowerError::Config {
        server: server.name.clone(),
        detail: detail.to_string(),
    };
    let secret = read_credentials(server)?.ok_or_else(|| {
        config("credentials: missing (env:NAME or file:/path holding user:password)")
    })?;
    let (user, password) = secret
        .split_once(':')
        .ok_or_else(|| config("credentials: not of the form user:password"))?;
    if user.is_empty() {
        return Err(config("credentials: the user name is empty"));
    }
    if user.len() > 16 {
        return Err(config("credentials: IPMI user names are at most 16 bytes"));
    }
    if password.len() > 20 {
        return Err(config(
            "credentials: IPMI v2.0 passwords are at most 20 bytes",
        ));
    }
    Ok((user.to_string(), password.to_string()))
}

/// IPMI completion code: the user's privilege is too low for the command.
const CC_INSUFFICIENT_PRIVILEGE: u8 = 0xD4;
/// `Set Session Privilege Level`: the level is not available to this user.
const CC_PRIVILEGE_NOT_AVAILABLE: u8 = 0x80;
/// `Set Session Privilege Level`: the level exceeds the user's or the channel's limit.
const CC_PRIVILEGE_OVER_LIMIT: u8 = 0x81;

fn classify(server: &ServerSpec, bmc: SocketAddr, doing: &str, error: ::ipmi::Error) -> PowerError {
    let server = server.name.clone();
    let detail = format!("bmc {bmc}: {doing}: {error}");
    match error {
        ::ipmi::Error::AuthenticationFailed(_)
        | ::ipmi::Error::CompletionCode {
            completion_code:
                CC_INSUFFICIENT_PRIVILEGE | CC_PRIVILEGE_NOT_AVAILABLE | CC_PRIVILEGE_OVER_LIMIT,
        } => PowerError::Auth { server, detail },
        ::ipmi::Error::Unsupported(_) | ::ipmi::Error::InvalidArgument(_) => {
            PowerError::Config { server, detail }
        }
        ::ipmi::Error::Io(_)
        | ::ipmi::Error::Timeout
        | ::ipmi::Error::Protocol(_)
        | ::ipmi::Error::ProtocolOwned(_)
        | ::ipmi::Error::Crypto(_)
        | ::ipmi::Error::CompletionCode { .. } => PowerError::Transient { server, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_forms() {
        assert_eq!(split_host_port("10.0.0.5"), Ok(("10.0.0.5", 623)));
        assert_eq!(split_host_port("bmc-7:6230"), Ok(("bmc-7", 6230)));
        assert_eq!(split_host_port("fe80::1"), Ok(("fe80::1", 623)));
        assert_eq!(split_host_port("[fe80::1]"), Ok(("fe80::1", 623)));
        assert_eq!(split_host_port("[fe80::1]:624"), Ok(("fe80::1", 624)));
        assert!(split_host_port("bmc:0").is_err());
        assert!(split_host_port("bmc:http").is_err());
        assert!(split_host_port(":623").is_err());
        assert!(split_host_port("[fe80::1").is_err());
        assert!(split_host_port("[fe80::1]x").is_err());
    }

    #[test]
    fn errors_are_classified_for_retry() {
        let server = ServerSpec {
            name: "s1".to_string(),
            provider: super::super::ProviderKind::Ipmi,
            mac: None,
            bmc: Some("127.0.0.1".to_string()),
            credentials: None,
            hourly_cost: 0.0,
            capacity: 1,
            broadcast: None,
            endpoint: None,
            region: None,
            image_id: None,
            instance_type: None,
            instance_id: None,
        };
        let bmc: SocketAddr = "127.0.0.1:623".parse().expect("literal address");
        let auth = classify(
            &server,
            bmc,
            "x",
            ::ipmi::Error::AuthenticationFailed("bad"),
        );
        assert!(matches!(auth, PowerError::Auth { .. }) && !auth.retryable());
        let privilege = classify(
            &server,
            bmc,
            "x",
            ::ipmi::Error::CompletionCode {
                completion_code: 0xD4,
            },
        );
        assert!(matches!(privilege, PowerError::Auth { .. }));
        let timeout = classify(&server, bmc, "x", ::ipmi::Error::Timeout);
        assert!(timeout.retryable());
        let busy = classify(
            &server,
            bmc,
            "x",
            ::ipmi::Error::CompletionCode {
                completion_code: 0xC0,
            },
        );
        assert!(busy.retryable());
        let suite = classify(&server, bmc, "x", ::ipmi::Error::Unsupported("suite"));
        assert!(matches!(suite, PowerError::Config { .. }));
    }
}
