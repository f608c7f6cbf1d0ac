//! The server pool (`infra/pool.toml`) and the purse (`infra/budget.toml`).
//!
//! `pool.toml` declares the machines the factory may power on, one `[[server]]` table each
//! ([`factory::power::ServerSpec`]); `budget.toml` caps what they may cost per hour and per
//! month. Both are checked like the organism's file: every problem is reported at once with the
//! file, the server and the key, and the caller exits 64.

use std::collections::BTreeSet;
use std::path::Path;

use factory::power::{ProviderKind, ServerSpec};
use serde::{Deserialize, Serialize};

use crate::{parse_toml, read_file as read, ConfigError, Problem};

pub use engines::pool::{to_micros, Caps, Micros};

/// `pool.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    #[serde(default, rename = "server")]
    pub servers: Vec<ServerSpec>,
}

/// `budget.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    /// For messages only (`USD`, `EUR`, ...).
    #[serde(default = "usd")]
    pub currency: String,
    /// The most the powered-on (and powering-on) machines may cost per hour together.
    pub per_hour: f64,
    /// The most a calendar month (UTC) may cost: spent this month plus what running machines
    /// have reserved.
    pub per_month: f64,
}

fn usd() -> String {
    "USD".into()
}

impl BudgetFile {
    /// The caps in [`Micros`] (millionths of the currency: exact sums in the ledger).
    pub fn caps(&self) -> Caps {
        Caps {
            per_hour: to_micros(self.per_hour),
            per_month: to_micros(self.per_month),
        }
    }
}

impl PoolFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (name, text) = read(path)?;
        Self::parse(&text, &name)
    }

    /// Parse and check: names unique and usable as host names, costs finite and not negative,
    /// capacity at least 1, and each provider's keys present and well formed.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let pool: PoolFile = parse_toml(text, file)?;
        let mut problems = Vec::new();
        let mut names = BTreeSet::new();
        for (i, s) in pool.servers.iter().enumerate() {
            let who = if s.name.is_empty() {
                format!("server[{i}]")
            } else {
                format!("server {:?}", s.name)
            };
            let mut push = |key: &str, reason: String| {
                problems.push(Problem {
                    key: format!("{who}: {key}"),
                    reason,
                })
            };
            if !is_host_name(&s.name) {
                push(
                    "name",
                    "must be a host name: letters, digits and '-', 1 to 63 characters".into(),
                );
            } else if !names.insert(s.name.clone()) {
                push("name", "is declared twice".into());
            }
            if !(s.hourly_cost.is_finite() && s.hourly_cost >= 0.0) {
                push("hourly_cost", "must be a number, 0 or more".into());
            }
            if s.capacity == 0 {
                push("capacity", "must be at least 1".into());
            }
            if let Some(mac) = &s.mac {
                if parse_mac(mac).is_none() {
                    push(
                        "mac",
                        format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                    );
                }
            }
            if let Some(c) = &s.credentials {
                if !(c.starts_with("env:") && c.len() > 4 || c.starts_with("file:") && c.len() > 5)
                {
                    push(
                        "credentials",
                        "must name where the secret is, env:NAME or file:/path, never the secret"
                            .into(),
                    );
                }
            }
            let needs = |key: &str, present: bool, push: &mut dyn FnMut(&str, String)| {
                if !present {
                    push(
                        key,
                        format!("is required for provider {}", s.provider.as_str()),
                    );
                }
            };
            match s.provider {
                ProviderKind::Local => {}
                ProviderKind::Ipmi => {
                    needs("bmc", s.bmc.is_some(), &mut push);
                    needs("credentials", s.credentials.is_some(), &mut push);
                    if let Some(bmc) = &s.bmc {
                        if !is_host_port(bmc, true) {
                            push("bmc", format!("{bmc:?} is not host or host:port"));
                        }
                    }
                }
                ProviderKind::Wol => {
                    needs("mac", s.mac.is_some(), &mut push);
                    if let Some(b) = &s.broadcast {
                        if b.parse::<std::net::SocketAddr>().is_err() {
                            push("broadcast", format!("{b:?} is not an ip:port address"));
                        }
                    }
                }
                ProviderKind::Ec2 => {
                    needs("region", s.region.is_some(), &mut push);
                    needs("credentials", s.credentials.is_some(), &mut push);
                    if s.instance_id.is_none() && s.image_id.is_none() {
                        push(
                            "image_id",
                            "is required for provider ec2 unless instance_id names an instance"
                                .into(),
                        );
                    }
                    if let Some(e) = &s.endpoint {
                        match url::Url::parse(e) {
                            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                            _ => push("endpoint", format!("{e:?} is not an http(s) URL")),
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(pool)
        } else {
            Err(ConfigError {
                file: file.to_string(),
                problems,
            })
        }
    }
}

impl BudgetFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (name, text) = read(path)?;
        Self::parse(&text, &name)
    }

    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let budget: BudgetFile = parse_toml(text, file)?;
        let mut problems = Vec::new();
        for (key, v) in [
            ("per_hour", budget.per_hour),
            ("per_month", budget.per_month),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                problems.push(Problem {
                    key: key.into(),
                    reason: "must be a number, 0 or more".into(),
                });
            }
        }
        if budget.per_month < budget.per_hour {
            problems.push(Problem {
                key: "per_month".into(),
                reason: format!(
                    "({}) is below per_hour ({}): no machine could run a whole hour",
                    budget.per_month, budget.per_hour
                ),
            });
        }
        if budget.currency.trim().is_empty() {
            problems.push(Problem {
                key: "currency".into(),
                reason: "must not be empty".into(),
            });
        }
        if problems.is_empty() {
            Ok(budget)
        } else {
            Err(ConfigError {
                file: file.to_string(),
                problems,
            })
        }
    }
}

fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn is_host_port(value: &str, port_optional: bool) -> bool {
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let (host, port) = match value.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (value, None),
    };
    let host_ok = host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    let port_ok = match port {
        Some(p) => p.parse::<u16>().is_ok_and(|p| p > 0),
        None => port_optional,
    };
    host_ok && port_ok
}

/// `aa:bb:cc:dd:ee:ff` (or with '-') to its six bytes.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_POOL: &str = include_str!("../pool.toml");
    const EXAMPLE_BUDGET: &str = include_str!("../budget.toml");

    #[test]
    fn the_example_files_are_valid() {
        let pool = PoolFile::parse(EXAMPLE_POOL, "infra/pool.toml").expect("ok");
        let kinds: BTreeSet<&str> = pool.servers.iter().map(|s| s.provider.as_str()).collect();
        assert_eq!(
            kinds,
            ["ec2", "ipmi", "local", "wol"].into_iter().collect(),
            "an example for each provider"
        );
        let budget = BudgetFile::parse(EXAMPLE_BUDGET, "infra/budget.toml").expect("ok");
        assert!(budget.caps().per_hour > 0);
    }

    #[test]
    fn every_problem_names_the_file_the_server_and_the_key() {
        let text = r#"
[[server]]
name = "rack-a"
provider = "ipmi"
hourly_cost = 0.5

[[server]]
name = "rack-a"
provider = "wol"
hourly_cost = -1
mac = "zz:00"
credentials = "hunter2"

[[server]]
name = "cloud_1"
provider = "ec2"
hourly_cost = 0.1
capacity = 0
"#;
        let err = PoolFile::parse(text, "pool.toml").expect_err("refused");
        let shown = err.to_string();
        for expected in [
            "bad configuration in pool.toml",
            "server \"rack-a\": bmc: is required for provider ipmi",
            "server \"rack-a\": credentials: is required for provider ipmi",
            "server \"rack-a\": name: is declared twice",
            "server \"rack-a\": hourly_cost: must be a number",
            "server \"rack-a\": mac: \"zz:00\" is not a MAC address",
            "server \"rack-a\": credentials: must name where the secret is",
            "server \"cloud_1\": name: must be a host name",
            "server \"cloud_1\": capacity: must be at least 1",
            "server \"cloud_1\": region: is required for provider ec2",
            "server \"cloud_1\": image_id: is required for provider ec2",
        ] {
            assert!(
                shown.contains(expected),
                "{expected:?} missing from:\n{shown}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_providers_name_the_line() {
        let err = PoolFile::parse(
            "[[server]]\nname = \"a\"\nprovider = \"pxe\"\nhourly_cost = 1\n",
            "pool.toml",
        )
        .expect_err("refused");
        assert!(err.to_string().contains("(line 3)"), "{err}");
        let err = BudgetFile::parse("per_hour = 1\nper_month = 10\nper_day = 2\n", "budget.toml")
            .expect_err("refused");
        assert!(err.to_string().contains("per_day"), "{err}");
    }

    #[test]
    fn budget_caps_are_checked_and_exact() {
        let b = BudgetFile::parse("per_hour = 10.01\nper_month = 720\n", "b").expect("ok");
        assert_eq!(
            b.caps(),
            Caps {
                per_hour: 10_010_000,
                per_month: 720_000_000
            }
        );
        let err = BudgetFile::parse("per_hour = 5\nper_month = 1\n", "b").expect_err("refused");
        assert!(err.to_string().contains("per_month"), "{err}");
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        assert_eq!(
            parse_mac("52-54-00-ab-cd-01"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 1])
        );
        assert_eq!(parse_mac("52:54:00:ab:cd"), None);
        assert_eq!(parse_mac("52:54:00:ab:cd:1"), None);
    }
}
