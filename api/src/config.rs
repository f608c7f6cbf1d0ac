//! The api role's configuration (`[api]` in the organism file).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the api cell listens. Port 0 picks a free port.
    pub listen: String,
    /// Most URLs one host may have in the frontier.
    pub host_budget: u64,
    /// Most seeds in one `POST /crawl`.
    pub max_seeds: usize,
    /// Default and ceiling of `max_depth` in `POST /crawl` (None: unlimited).
    pub max_depth: Option<u32>,
    /// Longest accepted search query, in characters.
    pub max_query_chars: usize,
    /// Most terms in one search query.
    pub max_query_terms: usize,
    /// Largest `limit` in `GET /search`.
    pub max_limit: u32,
    /// Largest `offset` in `GET /search`.
    pub max_offset: u64,
    /// Longest URL admitted to the frontier (trap guard).
    pub max_url_len: usize,
    /// Most times one path segment may repeat in a URL (trap guard).
    pub max_repeated_segments: usize,
    /// Most path segments in a URL (trap guard).
    pub max_path_segments: usize,
    /// Frontier entries handed to the queue per round.
    pub publish_batch: u32,
    /// In-flight entries older than this are published again (lost-job safety net), seconds.
    pub stale_in_flight_secs: u64,
    /// Requests in flight at which this cell is at capacity (pressure 1.0).
    pub target_in_flight: u32,
    /// Mean request latency at which this cell is at capacity (pressure 1.0), milliseconds.
    pub target_latency_ms: u32,
    /// Answers to repeated searches kept while the index is unchanged, at most this many MiB
    /// per api cell; 0 keeps none.
    pub search_cache_mb: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".into(),
            host_budget: 100_000,
            max_seeds: 10_000,
            max_depth: None,
            max_query_chars: 512,
            max_query_terms: 16,
            max_limit: 100,
            max_offset: 10_000,
            max_url_len: 2048,
            max_repeated_segments: 3,
            max_path_segments: 32,
            publish_batch: 1000,
            stale_in_flight_secs: 1800,
            target_in_flight: 128,
            target_latency_ms: 250,
            search_cache_mb: 8,
        }
    }
}

impl ApiConfig {
    /// Every problem, as (key, reason).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            out.push((
                "listen".into(),
                format!("{:?} is not an address like 127.0.0.1:7070", self.listen),
            ));
        }
        for (key, value) in [
            ("host_budget", self.host_budget),
            ("max_seeds", self.max_seeds as u64),
            ("max_query_chars", self.max_query_chars as u64),
            ("max_query_terms", self.max_query_terms as u64),
            ("max_limit", u64::from(self.max_limit)),
            ("max_url_len", self.max_url_len as u64),
            ("max_repeated_segments", self.max_repeated_segments as u64),
            ("max_path_segments", self.max_path_segments as u64),
            ("publish_batch", u64::from(self.publish_batch)),
            ("stale_in_flight_secs", self.stale_in_flight_secs),
            ("target_in_flight", u64::from(self.target_in_flight)),
            ("target_latency_ms", u64::from(self.target_latency_ms)),
        ] {
            if value == 0 {
                out.push((key.into(), "must be at least 1".into()));
            }
        }
        out
    }
}
