//! The healthchecker role's configuration (`[healthchecker]` in the organism file).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::detector::PhiParams;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthcheckerConfig {
    /// Declare a cell dead when the failure detector's suspicion rises above this (phi; 8 means
    /// a one in 10^8 chance that the heartbeat is merely late).
    pub phi_threshold: f64,
    /// Heartbeat inter-arrival samples kept per cell.
    pub window: usize,
    /// Floor of the inter-arrival standard deviation, milliseconds (the floor used is also at
    /// least a quarter of the cell's promised interval).
    pub min_std_dev_ms: u64,
    /// A silence this long beyond the mean interval is not suspicious at all, milliseconds.
    pub acceptable_pause_ms: u64,
    /// How often the detector looks at every cell, milliseconds.
    pub sweep_ms: u64,
    /// A cell the detector gives up on is first probed (`GET /healthz` on its own address): no
    /// HTTP answer within this long (refused, reset, frozen) confirms the death; an answer means
    /// it is slow or starved, and its clock restarts. 0 declares deaths on the detector alone.
    /// Milliseconds.
    pub probe_timeout_ms: u64,
    /// A cell whose heartbeats stay away this long is dead even though it answers probes (its
    /// heartbeats are not getting through), milliseconds.
    pub refute_limit_ms: u64,
    /// The heartbeats per second one health checker is sized for: its pressure is its rate
    /// against this (reported in its own heartbeats).
    pub target_heartbeats_per_s: u32,
    /// How often roles are compared with their minimums, milliseconds.
    pub reconcile_ms: u64,
    /// A replacement the factory accepted but whose cell has not heartbeated after this long is
    /// asked for again, under a new key, milliseconds.
    pub request_timeout_ms: u64,
    /// No replacement is asked for during this long after start, so that the cells of a running
    /// organism have beaten at least once and are not mistaken for a shortfall, milliseconds.
    pub startup_grace_ms: u64,
    /// Signed control messages older (or further in the future) than this are refused as stale,
    /// milliseconds; also how long a message's nonce is remembered against replays.
    pub message_window_ms: u64,
    /// Base URLs of the factories, tried in order until one answers.
    pub factories: Vec<String>,
    /// Fewest live cells per role; a shortfall is filled by asking the factory. Not read from
    /// the organism file: `infra` fills it from `[roles.*].min`, the one setting (and refuses a
    /// file that still sets `[healthchecker.minimums]`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub minimums: BTreeMap<String, u32>,
    /// Roles whose cells regulate their own number (`[homeostasis].roles`): their surplus is
    /// theirs to retire, not the leader's. Filled by `infra`, never read from a file.
    #[serde(skip)]
    pub regulated: std::collections::BTreeSet<String>,
}

impl Default for HealthcheckerConfig {
    fn default() -> Self {
        let phi = PhiParams::default();
        Self {
            phi_threshold: phi.threshold,
            window: phi.window,
            min_std_dev_ms: phi.min_std_dev.as_millis() as u64,
            acceptable_pause_ms: phi.acceptable_pause.as_millis() as u64,
            sweep_ms: 20,
            probe_timeout_ms: 500,
            refute_limit_ms: 5_000,
            target_heartbeats_per_s: 20_000,
            reconcile_ms: 100,
            request_timeout_ms: 10_000,
            startup_grace_ms: 600,
            message_window_ms: 30_000,
            factories: Vec::new(),
            minimums: BTreeMap::new(),
            regulated: Default::default(),
        }
    }
}

impl HealthcheckerConfig {
    /// Every problem, as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            out.push((
                "phi_threshold".into(),
                format!("{} is not a positive number", self.phi_threshold),
            ));
        }
        for (key, value) in [
            ("window", self.window as u64),
            ("min_std_dev_ms", self.min_std_dev_ms),
            ("sweep_ms", self.sweep_ms),
            (
                "target_heartbeats_per_s",
                u64::from(self.target_heartbeats_per_s),
            ),
            ("reconcile_ms", self.reconcile_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("message_window_ms", self.message_window_ms),
        ] {
            if value == 0 {
                out.push((key.into(), "must be at least 1".into()));
            }
        }
        if self.window > 100_000 {
            out.push(("window".into(), "must be at most 100000 samples".into()));
        }
        for (i, url) in self.factories.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                out.push((
                    format!("factories[{i}]"),
                    format!("{url:?} is not a base URL like http://127.0.0.1:7090"),
                ));
            }
        }
        if self.factories.is_empty() && self.minimums.values().any(|&m| m > 0) {
            out.push((
                "factories".into(),
                "minimums are set but no factory is named to ask for cells".into(),
            ));
        }
        for role in self.minimums.keys() {
            if role.is_empty() {
                out.push(("minimums".into(), "a role name is empty".into()));
            }
        }
        out
    }

    /// The failure detector's parameters.
    /// How suspicions are confirmed; `None` when probes are off.
    pub fn probe_params(&self) -> Option<crate::registry::ProbeParams> {
        (self.probe_timeout_ms > 0).then(|| crate::registry::ProbeParams {
            timeout: Duration::from_millis(self.probe_timeout_ms),
            refute_limit: Duration::from_millis(self.refute_limit_ms.max(self.probe_timeout_ms)),
        })
    }

    pub fn phi_params(&self) -> PhiParams {
        PhiParams {
            threshold: self.phi_threshold,
            window: self.window.max(1),
            min_std_dev: Duration::from_millis(self.min_std_dev_ms),
            acceptable_pause: Duration::from_millis(self.acceptable_pause_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_refused() {
        assert!(HealthcheckerConfig::default().problems().is_empty());
        let cfg: HealthcheckerConfig = toml::from_str(
            "phi_threshold = 10.0\nfactories = [\"http://127.0.0.1:1\"]\n[minimums]\napi = 2\n",
        )
        .expect("parses");
        assert_eq!(cfg.minimums["api"], 2);
        assert_eq!(cfg.sweep_ms, 20);
        assert!(toml::from_str::<HealthcheckerConfig>("phi = 1.0").is_err());
    }

    #[test]
    fn problems_name_every_bad_key() {
        let cfg = HealthcheckerConfig {
            phi_threshold: f64::NAN,
            sweep_ms: 0,
            factories: vec!["127.0.0.1:1".into()],
            ..HealthcheckerConfig::default()
        };
        let keys: Vec<String> = cfg.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["phi_threshold", "sweep_ms", "factories[0]"]);
        let no_factory = HealthcheckerConfig {
            minimums: [("api".to_string(), 2)].into(),
            ..HealthcheckerConfig::default()
        };
        assert_eq!(no_factory.problems()[0].0, "factories");
    }
}
