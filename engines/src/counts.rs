//! `/stats` from kept counts (migration 0007 in both dialects): the frontier per host and state,
//! the stored pages and the links kept aside, maintained by triggers in the transactions that
//! change them. Reading them costs a row per host and state, not a scan of the frontier.

use std::collections::HashMap;

use protocol::{FrontierCounts, HostStats, Stats};

/// Kept counts as the engine read them: `(host, state, n)` rows (several rows per key are
/// summed), and the whole-store counts.
#[derive(Debug, Default)]
pub(crate) struct KeptCounts {
    pub frontier: Vec<(String, String, i64)>,
    pub pages: i64,
    pub deferred: i64,
}

impl KeptCounts {
    /// The stats they give, with the `top_hosts` hosts of most entries (ties by host name, in
    /// byte order).
    pub fn stats(self, top_hosts: u32) -> Stats {
        // Deltas are signed: sum them per key before any is read as a count.
        let mut sums: HashMap<(String, String), i64> = HashMap::new();
        for (host, state, n) in self.frontier {
            *sums.entry((host, state)).or_default() += n;
        }
        let mut hosts: HashMap<String, HostStats> = HashMap::new();
        for ((host, state), n) in sums {
            let entry = hosts.entry(host).or_insert_with_key(|host| HostStats {
                host: host.clone(),
                ..HostStats::default()
            });
            match state.as_str() {
                "pending" => entry.pending += count(n),
                "queued" => entry.in_flight += count(n),
                "crawled" => entry.crawled += count(n),
                "failed" => entry.failed += count(n),
                _ => {}
            }
        }
        // The whole frontier is the sum of its hosts.
        let mut frontier = FrontierCounts {
            deferred: count(self.deferred),
            ..FrontierCounts::default()
        };
        for h in hosts.values() {
            frontier.pending += h.pending;
            frontier.in_flight += h.in_flight;
            frontier.crawled += h.crawled;
            frontier.failed += h.failed;
        }
        let total = |h: &HostStats| h.pending + h.in_flight + h.crawled + h.failed;
        let mut hosts: Vec<HostStats> = hosts.into_values().filter(|h| total(h) > 0).collect();
        hosts.sort_by(|a, b| total(b).cmp(&total(a)).then_with(|| a.host.cmp(&b.host)));
        hosts.truncate(top_hosts as usize);
        Stats {
            pages_indexed: count(self.pages),
            frontier,
            hosts,
        }
    }
}

/// A kept count is never negative once its deltas are summed; clamp rather than wrap if one is.
fn count(n: i64) -> u64 {
    n.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_sum_per_host_and_the_top_hosts_come_first() {
        let row = |h: &str, s: &str, n: i64| (h.to_string(), s.to_string(), n);
        let kept = KeptCounts {
            frontier: vec![
                row("b.test", "pending", 3),
                row("a.test", "crawled", 2),
                row("b.test", "pending", -1),
                row("b.test", "queued", 1),
                row("a.test", "pending", 1),
                row("c.test", "crawled", 1),
                row("c.test", "crawled", -1),
                row("d.test", "failed", 1),
            ],
            pages: 4,
            deferred: 7,
        };
        let stats = kept.stats(2);
        assert_eq!(stats.pages_indexed, 4);
        assert_eq!(
            stats.frontier,
            FrontierCounts {
                pending: 3,
                in_flight: 1,
                crawled: 2,
                failed: 1,
                deferred: 7,
            }
        );
        let hosts: Vec<(&str, u64, u64, u64)> = stats
            .hosts
            .iter()
            .map(|h| (h.host.as_str(), h.pending, h.in_flight, h.crawled))
            .collect();
        // a.test and b.test have 3 each (tie by name); c.test's count went back to 0.
        assert_eq!(hosts, vec![("a.test", 1, 0, 2), ("b.test", 2, 1, 0)]);
    }
}
