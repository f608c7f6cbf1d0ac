//! The fetch stack's configuration: a raw serde struct with defaults, and a validation that
//! reports every bad key at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The user agent sent with every request unless configured otherwise.
pub const DEFAULT_USER_AGENT: &str =
    "HomeostatBot/0.1 (+https://github.com/homeostat/homeostat; crawler@homeostat.invalid)";

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// The `User-Agent` header of every request.
    pub user_agent: String,
    /// Product token matched against robots.txt `User-agent` lines; `None` means the user
    /// agent's first token before `/` (`HomeostatBot`).
    pub robots_token: Option<String>,
    pub connect_timeout_ms: u64,
    /// Timeout of one request, from sending it to the end of its body.
    pub total_timeout_ms: u64,
    pub max_redirects: u32,
    /// Cap on a body's wire bytes, and again on its decompressed bytes.
    pub max_body_bytes: usize,
    /// Cap on the extracted text of a page, in characters.
    pub max_text_chars: usize,
    /// Cap on the links reported for one page.
    pub max_links: usize,
    /// Requests per second per host.
    pub per_host_rate: f64,
    pub per_host_burst: u32,
    /// Requests in flight per host.
    pub per_host_concurrency: u32,
    /// Addresses (CIDRs) that may be fetched although they are not globally routable.
    pub allow_addresses: Vec<ipnet::IpNet>,
    /// Host name (exact, or a suffix such as `.test`) -> address, consulted before DNS. The
    /// address's port is used unless the URL names one.
    pub resolve: BTreeMap<String, SocketAddr>,
    pub robots_cache_secs: u64,
    /// Cap on an honoured `Retry-After`.
    pub max_retry_after_secs: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            user_agent: DEFAULT_USER_AGENT.to_string(),
            robots_token: None,
            connect_timeout_ms: 5_000,
            total_timeout_ms: 20_000,
            max_redirects: 5,
            max_body_bytes: 2 * 1024 * 1024,
            max_text_chars: 100_000,
            max_links: 1_000,
            per_host_rate: 2.0,
            per_host_burst: 1,
            per_host_concurrency: 2,
            allow_addresses: Vec::new(),
            resolve: BTreeMap::new(),
            robots_cache_secs: 3_600,
            max_retry_after_secs: 300,
        }
    }
}

/// Upper bounds that keep a typo from configuring something absurd.
const MAX_REDIRECTS_LIMIT: u32 = 20;
const MAX_BODY_BYTES_LIMIT: usize = 1 << 30;
const MAX_RATE: f64 = 10_000.0;
/// The slowest rate accepted: one request an hour.
const MIN_RATE: f64 = 1.0 / 3_600.0;

impl FetchConfig {
    /// The product token used to match robots.txt groups.
    pub fn effective_robots_token(&self) -> String {
        match &self.robots_token {
            Some(token) => token.clone(),
            None => self
                .user_agent
                .split(['/', ' '])
                .next()
                .unwrap_or_default()
                .to_string(),
        }
    }

    /// Check every field, reporting each bad one as `(key, reason)`.
    pub fn validate(&self) -> Result<(), Vec<(String, String)>> {
        let mut errors: Vec<(String, String)> = Vec::new();
        let mut bad = |key: &str, reason: String| errors.push((key.to_string(), reason));

        if self.user_agent.trim().is_empty() {
            bad("user_agent", "must not be empty".into());
        } else if http::HeaderValue::from_str(&self.user_agent).is_err() {
            bad(
                "user_agent",
                "must be visible ASCII usable as a header value".into(),
            );
        }
        let token = self.effective_robots_token();
        if token.is_empty()
            || !token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            let key = if self.robots_token.is_some() {
                "robots_token"
            } else {
                "user_agent"
            };
            bad(
                key,
                format!("robots product token {token:?} must be non-empty and only letters, digits, '-' or '_' (RFC 9309)"),
            );
        }
        if self.connect_timeout_ms == 0 {
            bad("connect_timeout_ms", "must be greater than 0".into());
        }
        if self.total_timeout_ms == 0 {
            bad("total_timeout_ms", "must be greater than 0".into());
        }
        if self.connect_timeout_ms > self.total_timeout_ms {
            bad(
                "connect_timeout_ms",
                format!(
                    "{} is longer than total_timeout_ms ({})",
                    self.connect_timeout_ms, self.total_timeout_ms
                ),
            );
        }
        if self.max_redirects > MAX_REDIRECTS_LIMIT {
            bad(
                "max_redirects",
                format!("must be at most {MAX_REDIRECTS_LIMIT}"),
            );
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            bad(
                "max_body_bytes",
                format!("must be between 1 and {MAX_BODY_BYTES_LIMIT}"),
            );
        }
        if self.max_text_chars == 0 {
            bad("max_text_chars", "must be greater than 0".into());
        }
        if !self.per_host_rate.is_finite() || !(MIN_RATE..=MAX_RATE).contains(&self.per_host_rate) {
            bad(
                "per_host_rate",
                format!(
                    "must be a number of requests per second between {MIN_RATE:.6} and {MAX_RATE}"
                ),
            );
        }
        if self.per_host_burst == 0 {
            bad("per_host_burst", "must be at least 1".into());
        }
        if self.per_host_concurrency == 0 {
            bad("per_host_concurrency", "must be at least 1".into());
        }
        for name in self.resolve.keys() {
            let trimmed = name.trim_start_matches('.');
            if trimmed.is_empty()
                || name.contains(|c: char| c.is_whitespace() || c == '/' || c == ':')
            {
                bad("resolve", format!("{name:?} is not a host name or suffix"));
            }
        }
        if self.robots_cache_secs == 0 {
            bad("robots_cache_secs", "must be greater than 0".into());
        }
        if self.max_retry_after_secs == 0 {
            bad("max_retry_after_secs", "must be greater than 0".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_token_comes_from_the_user_agent() {
        let cfg = FetchConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.effective_robots_token(), "HomeostatBot");
        let cfg = FetchConfig {
            robots_token: Some("OtherBot".into()),
            ..FetchConfig::default()
        };
        assert_eq!(cfg.effective_robots_token(), "OtherBot");
    }

    #[test]
    fn every_bad_key_is_reported() {
        let cfg = FetchConfig {
            user_agent: String::new(),
            connect_timeout_ms: 0,
            total_timeout_ms: 0,
            max_redirects: 1000,
            max_body_bytes: 0,
            per_host_rate: f64::NAN,
            per_host_burst: 0,
            per_host_concurrency: 0,
            robots_cache_secs: 0,
            resolve: [("bad name".to_string(), "127.0.0.1:1".parse().expect("addr"))].into(),
            ..FetchConfig::default()
        };
        let errors = cfg.validate().expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            "user_agent",
            "connect_timeout_ms",
            "total_timeout_ms",
            "max_redirects",
            "max_body_bytes",
            "per_host_rate",
            "per_host_burst",
            "per_host_concurrency",
            "robots_cache_secs",
            "resolve",
        ] {
            assert!(keys.contains(&key), "{key} missing from {errors:?}");
        }
    }

    #[test]
    fn connect_timeout_is_checked_against_total() {
        let cfg = FetchConfig {
            connect_timeout_ms: 30_000,
            total_timeout_ms: 1_000,
            ..FetchConfig::default()
        };
        let errors = cfg.validate().expect_err("invalid");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "connect_timeout_ms");
    }

    #[test]
    fn deserializes_with_defaults_and_refuses_unknown_keys() {
        let cfg: FetchConfig = serde_json::from_str(
            r#"{"per_host_rate": 5.0, "allow_addresses": ["127.0.0.1/32"], "resolve": {".test": "127.0.0.1:8080"}}"#,
        )
        .expect("parses");
        assert_eq!(cfg.per_host_rate, 5.0);
        assert_eq!(cfg.max_redirects, 5);
        assert_eq!(cfg.allow_addresses.len(), 1);
        assert!(serde_json::from_str::<FetchConfig>(r#"{"per_host_rat": 5.0}"#).is_err());
    }
}
