//! robots.txt (RFC 9309): one fetch per origin (scheme, host, port), cached; concurrent first
//! requests for an origin wait for the same fetch.
//!
//! The fetch itself lives in `fetch.rs` (it goes through the SSRF guard and politeness like any
//! request); this module holds the verdicts, the cache, and the body -> rules step.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use texting_robots::Robot;
use tokio::time::Instant;

use crate::politeness::NotNow;

/// RFC 9309 asks crawlers to parse at least 500 KiB; the rest is ignored.
pub(crate) const ROBOTS_MAX_BYTES: usize = 500 * 1024;
/// Redirects followed when fetching robots.txt (RFC 9309: at least five).
pub(crate) const ROBOTS_MAX_REDIRECTS: u32 = 5;
/// How long an unreachable robots.txt (5xx, timeout, refused) is remembered before retrying.
pub(crate) const ROBOTS_UNAVAILABLE_TTL: Duration = Duration::from_secs(60);
/// Beyond this many origins, the least recently used idle ones are forgotten early.
pub(crate) const MAX_ROBOTS_ORIGINS: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What an origin's robots.txt says.
#[derive(Debug)]
pub(crate) enum RobotsVerdict {
    /// 2xx: these rules.
    Rules(Robot),
    /// 4xx, or too many redirects: no restrictions (RFC 9309 2.3.1.3).
    AllowAll,
    /// Fetched, but the rules could not be built: nothing may be crawled.
    DisallowAll(String),
    /// 5xx, 429, timeout, unreachable: complete disallow for now (RFC 9309 2.3.1.4).
    Unavailable(String),
    /// The origin itself is refused by the SSRF guard.
    Refused(String),
}

impl RobotsVerdict {
    fn ttl(&self, cache: Duration) -> Duration {
        match self {
            RobotsVerdict::Rules(_) | RobotsVerdict::AllowAll | RobotsVerdict::DisallowAll(_) => {
                cache
            }
            RobotsVerdict::Unavailable(_) | RobotsVerdict::Refused(_) => {
                cache.min(ROBOTS_UNAVAILABLE_TTL)
            }
        }
    }

    /// Build the verdict for a 2xx body. Runs the parser on a blocking thread: it is CPU work on
    /// up to 500 KiB, and a parser panic must not take the task down.
    pub(crate) async fn from_body(token: &str, mut body: Vec<u8>) -> RobotsVerdict {
        if body.len() >= ROBOTS_MAX_BYTES {
            // Cut at the last full line: a cut Allow rule could allow more than it says.
            body.truncate(ROBOTS_MAX_BYTES);
            let keep = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            body.truncate(keep);
        }
        let token = token.to_string();
        match tokio::task::spawn_blocking(move || Robot::new(&token, &body)).await {
            Ok(Ok(robot)) => RobotsVerdict::Rules(robot),
            Ok(Err(e)) => RobotsVerdict::DisallowAll(format!("unparseable robots.txt: {e}")),
            Err(e) => RobotsVerdict::DisallowAll(format!("robots.txt parser failed: {e}")),
        }
    }
}

struct Cached {
    verdict: Arc<RobotsVerdict>,
    expires: Instant,
}

struct Slot {
    state: tokio::sync::Mutex<Option<Cached>>,
    last_used: Mutex<Instant>,
}

struct SlotMap {
    slots: HashMap<String, Arc<Slot>>,
    last_sweep: Instant,
}

pub(crate) struct RobotsCache {
    map: Mutex<SlotMap>,
    ttl: Duration,
    max_origins: usize,
}

impl RobotsCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self::with_limit(ttl, MAX_ROBOTS_ORIGINS)
    }

    pub(crate) fn with_limit(ttl: Duration, max_origins: usize) -> Self {
        Self {
            map: Mutex::new(SlotMap {
                slots: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            ttl,
            max_origins,
        }
    }

    #[cfg(test)]
    pub(crate) fn origins(&self) -> usize {
        lock(&self.map).slots.len()
    }

    fn slot(&self, origin: &str) -> Arc<Slot> {
        let now = Instant::now();
        let mut map = lock(&self.map);
        if now.duration_since(map.last_sweep) >= self.ttl.min(ROBOTS_UNAVAILABLE_TTL)
            || map.slots.len() >= self.max_origins
        {
            map.last_sweep = now;
            self.sweep(&mut map.slots, now);
        }
        let slot = map
            .slots
            .entry(origin.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(None),
                    last_used: Mutex::new(now),
                })
            })
            .clone();
        *lock(&slot.last_used) = now;
        metrics::gauge!("crawler_robots_origins").set(map.slots.len() as f64);
        slot
    }

    /// Drop unused slots whose entry expired (or never came); if still too many, the least
    /// recently used unused ones.
    fn sweep(&self, slots: &mut HashMap<String, Arc<Slot>>, now: Instant) {
        let expired = |s: &Arc<Slot>| {
            Arc::strong_count(s) == 1
                && s.state
                    .try_lock()
                    .is_ok_and(|c| c.as_ref().is_none_or(|c| c.expires <= now))
        };
        slots.retain(|_, s| !expired(s));
        if slots.len() >= self.max_origins {
            let mut unused: Vec<(Instant, String)> = slots
                .iter()
                .filter(|(_, s)| Arc::strong_count(s) == 1)
                .map(|(k, s)| (*lock(&s.last_used), k.clone()))
                .collect();
            unused.sort();
            let target = (self.max_origins * 9 / 10).max(1);
            let excess = (slots.len() + 1).saturating_sub(target);
            for (_, key) in unused.into_iter().take(excess) {
                slots.remove(&key);
            }
        }
    }

    /// The cached verdict for `origin`, or the result of `fetch` (run once for all concurrent
    /// callers). A `NotNow` from `fetch` is passed on and not cached.
    pub(crate) async fn verdict<F, Fut>(
        &self,
        origin: &str,
        fetch: F,
    ) -> Result<Arc<RobotsVerdict>, NotNow>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<RobotsVerdict, NotNow>>,
    {
        let slot = self.slot(origin);
        // Holding the slot's lock during the fetch is what makes concurrent callers share it.
        let mut cached = slot.state.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.expires > Instant::now()) {
            return Ok(c.verdict.clone());
        }
        metrics::counter!("crawler_robots_fetches_total").increment(1);
        let verdict = Arc::new(fetch().await?);
        tracing::debug!(origin, verdict = ?verdict, "robots.txt fetched");
        *cached = Some(Cached {
            verdict: verdict.clone(),
            expires: Instant::now() + verdict.ttl(self.ttl),
        });
        Ok(verdict)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_share_one_fetch_and_entries_expire() {
        let cache = Arc::new(RobotsCache::new(Duration::from_secs(3_600)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cache, fetches, gate) = (cache.clone(), fetches.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .verdict("http://a.test", || async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(RobotsVerdict::AllowAll)
                    })
                    .await
                    .map(|v| matches!(*v, RobotsVerdict::AllowAll))
            }));
        }
        while fetches.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(true));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // An hour later the entry has expired and is fetched again.
        tokio::time::advance(Duration::from_secs(3_601)).await;
        let again = cache
            .verdict("http://a.test", || async {
                Ok(RobotsVerdict::Unavailable("http 500".into()))
            })
            .await
            .expect("verdict");
        assert!(matches!(*again, RobotsVerdict::Unavailable(_)));
        // Unavailable is remembered only briefly.
        tokio::time::advance(ROBOTS_UNAVAILABLE_TTL).await;
        let third = cache
            .verdict("http://a.test", || async { Ok(RobotsVerdict::AllowAll) })
            .await
            .expect("verdict");
        assert!(matches!(*third, RobotsVerdict::AllowAll));
    }

    #[tokio::test(start_paused = true)]
    async fn not_now_is_not_cached_and_the_map_is_bounded() {
        let cache = RobotsCache::with_limit(Duration::from_secs(3_600), 50);
        let r = cache
            .verdict("http://a.test", || async {
                Err(NotNow::BackingOff(Duration::from_secs(1)))
            })
            .await;
        assert!(r.is_err());
        let r = cache
            .verdict("http://a.test", || async { Ok(RobotsVerdict::AllowAll) })
            .await;
        assert!(r.is_ok());
        for i in 0..500 {
            let _ = cache
                .verdict(&format!("http://h{i}.test"), || async {
                    Ok(RobotsVerdict::AllowAll)
                })
                .await;
        }
        assert!(cache.origins() <= 50, "{}", cache.origins());
    }

    #[tokio::test]
    async fn bodies_become_rules_and_oversized_ones_are_cut_at_a_line() {
        let v = RobotsVerdict::from_body(
            "HomeostatBot",
            b"User-agent: *\nDisallow: /private\nCrawl-delay: 2".to_vec(),
        )
        .await;
        let RobotsVerdict::Rules(robot) = v else {
            panic!("rules expected, got {v:?}")
        };
        assert!(!robot.allowed("http://a.test/private/x"));
        assert!(robot.allowed("http://a.test/public"));
        assert_eq!(robot.delay, Some(2.0));

        // A huge file cut at the cap inside a line: that half line is dropped, so
        // `Allow: /private-page` does not become `Allow: /pri`.
        let mut body = b"User-agent: *\nDisallow: /\n".to_vec();
        let filler = ROBOTS_MAX_BYTES - 11 - body.len() - 1;
        body.push(b'#');
        body.extend(std::iter::repeat_n(b'x', filler - 1));
        body.push(b'\n');
        body.extend_from_slice(b"Allow: /private-page\n");
        assert_eq!(
            &body[ROBOTS_MAX_BYTES - 11..ROBOTS_MAX_BYTES],
            b"Allow: /pri"
        );
        let v = RobotsVerdict::from_body("HomeostatBot", body).await;
        let RobotsVerdict::Rules(robot) = v else {
            panic!("rules expected, got {v:?}")
        };
        assert!(
            !robot.allowed("http://a.test/print"),
            "a cut rule must not widen what is allowed"
        );
        assert!(
            !robot.allowed("http://a.test/private-page"),
            "the rule past the cap is ignored"
        );
    }
}
