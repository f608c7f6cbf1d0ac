//! The frontdoor role's configuration (`[frontdoor]` in the organism file).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontdoorConfig {
    /// Where the frontdoor listens. Port 0 picks a free port.
    pub listen: String,
    /// Base URLs of the health checkers whose `GET /cells` lists the live api cells, e.g.
    /// `http://127.0.0.1:7080`. Empty: the registry is fed some other way (tests, `cell up`).
    pub healthcheckers: Vec<String>,
    /// How often each health checker is asked for its cells, milliseconds.
    pub registry_poll_ms: u64,
    /// How long one attempt on one api cell may take, answer body included, milliseconds.
    pub attempt_timeout_ms: u64,
    /// Most api cells one client request is tried on (the first attempt included).
    pub max_attempts: u32,
    /// Consecutive failures (connect error, timeout, 5xx) that eject an api cell from routing.
    pub eject_after_failures: u32,
    /// How long an ejected api cell gets no traffic, milliseconds.
    pub eject_for_ms: u64,
    /// Largest client request body, bytes (413 above).
    pub max_body_bytes: usize,
    /// Largest api answer body passed back to a client, bytes (502 above).
    pub max_response_bytes: usize,
    /// The client requests per second one front door is sized for: its pressure is its rate
    /// against this (reported in its heartbeats).
    pub target_requests_per_s: u32,
}

impl Default for FrontdoorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7060".into(),
            healthcheckers: Vec::new(),
            registry_poll_ms: 100,
            attempt_timeout_ms: 5000,
            max_attempts: 3,
            eject_after_failures: 3,
            eject_for_ms: 5000,
            // The api accepts `POST /crawl` bodies up to 4 MiB.
            max_body_bytes: 4 * 1024 * 1024,
            max_response_bytes: 16 * 1024 * 1024,
            target_requests_per_s: 4000,
        }
    }
}

impl FrontdoorConfig {
    /// Every problem, as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            out.push((
                "listen".into(),
                format!("{:?} is not an address like 127.0.0.1:7060", self.listen),
            ));
        }
        for (i, hc) in self.healthcheckers.iter().enumerate() {
            let ok = url::Url::parse(hc)
                .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .unwrap_or(false);
            if !ok {
                out.push((
                    format!("healthcheckers[{i}]"),
                    format!("{hc:?} is not a base URL like http://127.0.0.1:7080"),
                ));
            }
        }
        for (key, value) in [
            ("registry_poll_ms", self.registry_poll_ms),
            ("attempt_timeout_ms", self.attempt_timeout_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("eject_after_failures", u64::from(self.eject_after_failures)),
            ("eject_for_ms", self.eject_for_ms),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_response_bytes", self.max_response_bytes as u64),
            (
                "target_requests_per_s",
                u64::from(self.target_requests_per_s),
            ),
        ] {
            if value == 0 {
                out.push((key.into(), "must be at least 1".into()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(FrontdoorConfig::default().problems(), Vec::new());
    }

    #[test]
    fn every_problem_is_named() {
        let cfg = FrontdoorConfig {
            listen: "nowhere".into(),
            healthcheckers: vec!["http://127.0.0.1:1".into(), "ftp://x".into()],
            max_attempts: 0,
            eject_for_ms: 0,
            ..FrontdoorConfig::default()
        };
        let keys: Vec<String> = cfg.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "healthcheckers[1]",
                "max_attempts",
                "eject_for_ms"
            ]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            toml::from_str::<FrontdoorConfig>("listn = \"127.0.0.1:1\"").expect_err("unknown key");
        assert!(err.to_string().contains("listn"), "{err}");
        let cfg: FrontdoorConfig = toml::from_str("max_attempts = 5").expect("parses");
        assert_eq!(cfg.max_attempts, 5);
        assert_eq!(cfg.registry_poll_ms, 100);
    }
}
