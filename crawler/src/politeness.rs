//! Politeness per host: the minimum gap between two requests' starts (`max(1 / per_host_rate,
//! Crawl-delay)`), a cap on requests in flight, and a back-off set by `429`/`503` +
//! `Retry-After`, behind one trait, [`HostGate`], with two implementations:
//!
//! - [`Politeness`], in this process: a rate limiter (governor) and a semaphore per host. For a
//!   crawler alone (without an api) and the fetch stack's own tests.
//! - [`crate::ledger::LedgerGate`]: the organism's host ledger, kept by the store and reached
//!   through the api (`POST /internal/permits`); whatever the number of crawler cells, the host
//!   sees the configured limits once.
//!
//! Either way a request waits for its host at most the gate's horizon; beyond it the gate
//! answers [`NotNow`] and the job is handed back to the queue without spending a delivery.
//!
//! Hosts are independent: each has its own state, and nothing here waits on another host. The
//! map of hosts forgets hosts that have been idle for a while, so it does not grow without
//! bound.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// A host untouched for this long is forgotten (its limiter would be full again anyway).
pub(crate) const HOST_IDLE_EVICTION: Duration = Duration::from_secs(600);
/// Beyond this many hosts, the least recently used idle ones are forgotten early.
pub(crate) const MAX_HOSTS: usize = 50_000;
/// If a request would queue longer than this behind its host's politeness, the crawl is
/// handed back (deferred) instead of holding a worker: the default horizon.
pub(crate) const MAX_POLITENESS_WAIT: Duration = Duration::from_secs(60);
/// `Crawl-delay` values above this are capped: a crawler that took one page an hour from a
/// host would never finish it.
pub(crate) const MAX_CRAWL_DELAY: Duration = Duration::from_secs(60);

/// Lock a std mutex, ignoring poisoning: every critical section here leaves consistent state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a request may not go to its host now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotNow {
    /// The host asked us to back off (`Retry-After`), for this much longer.
    BackingOff(Duration),
    /// The host is not due within the horizon; try again after about this long.
    Busy(Duration),
    /// The gate itself cannot be asked right now (no api answers); try again after this long.
    Unavailable(Duration),
}

/// A turn at a host, held while the request is in flight; dropping it ends the turn.
pub struct HostPermit {
    _held: Box<dyn Send + Sync>,
}

impl HostPermit {
    pub(crate) fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

/// Per-host politeness, wherever it is kept.
#[async_trait::async_trait]
pub trait HostGate: Send + Sync + 'static {
    /// Wait for a turn at `host`, its start at least `gap` after the host's previous start (the
    /// caller's `max(1 / rate, Crawl-delay)`). `NotNow` when the host is not due within the
    /// gate's horizon, or backs off.
    async fn acquire(&self, host: &str, gap: Duration) -> Result<HostPermit, NotNow>;
    /// The host told us to go away for `wait` (429/503 + Retry-After).
    fn back_off(&self, host: &str, wait: Duration);
    /// How long `host` is still backing off, as far as this cell knows.
    fn backoff_left(&self, host: &str) -> Option<Duration>;
}

/// The in-process [`HostGate`]: this cell's requests only.
pub struct Politeness {
    hosts: Mutex<HostMap>,
    base_period: Duration,
    burst: NonZeroU32,
    concurrency: usize,
    idle_eviction: Duration,
    max_hosts: usize,
    horizon: Duration,
}

struct HostMap {
    hosts: HashMap<String, Arc<HostState>>,
    last_sweep: Instant,
}

struct HostState {
    in_flight: Arc<Semaphore>,
    limiter: Mutex<LimiterSlot>,
    backoff_until: Mutex<Option<Instant>>,
    last_used: Mutex<Instant>,
    /// Requests waiting for this host's semaphore or limiter.
    waiting: AtomicUsize,
}

struct LimiterSlot {
    limiter: Arc<DefaultDirectRateLimiter>,
    period: Duration,
}

/// Held while a request to a host is in flight; dropping it frees the slot.
struct LocalPermit {
    _permit: OwnedSemaphorePermit,
    host: Arc<HostState>,
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        *lock(&self.host.last_used) = Instant::now();
    }
}

struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn limiter(period: Duration, burst: NonZeroU32) -> Arc<DefaultDirectRateLimiter> {
    // `period` is never zero: it comes from a validated rate or a positive crawl delay.
    let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("a non-zero period")
        .allow_burst(burst);
    Arc::new(RateLimiter::direct(quota))
}

impl Politeness {
    pub fn new(rate_per_sec: f64, burst: u32, concurrency: u32) -> Self {
        Self::with_limits(
            rate_per_sec,
            burst,
            concurrency,
            HOST_IDLE_EVICTION,
            MAX_HOSTS,
        )
    }

    pub(crate) fn with_limits(
        rate_per_sec: f64,
        burst: u32,
        concurrency: u32,
        idle_eviction: Duration,
        max_hosts: usize,
    ) -> Self {
        let base_period = Duration::try_from_secs_f64(1.0 / rate_per_sec)
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_micros(1));
        Self {
            hosts: Mutex::new(HostMap {
                hosts: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            base_period,
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            concurrency: usize::try_from(concurrency).unwrap_or(1).max(1),
            idle_eviction,
            max_hosts,
            horizon: MAX_POLITENESS_WAIT,
        }
    }

    /// The longest a request waits for its host before the gate answers `Busy`.
    pub fn with_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    #[cfg(test)]
    pub(crate) fn tracked_hosts(&self) -> usize {
        lock(&self.hosts).hosts.len()
    }

    fn host(&self, host: &str) -> Arc<HostState> {
        let now = Instant::now();
        let mut map = lock(&self.hosts);
        if now.duration_since(map.last_sweep) >= self.idle_eviction / 4
            || map.hosts.len() >= self.max_hosts
        {
            map.last_sweep = now;
            self.sweep(&mut map.hosts, now);
        }
        let state = map
            .hosts
            .entry(host.to_string())
            .or_insert_with(|| {
                Arc::new(HostState {
                    in_flight: Arc::new(Semaphore::new(self.concurrency)),
                    limiter: Mutex::new(LimiterSlot {
                        limiter: limiter(self.base_period, self.burst),
                        period: self.base_period,
                    }),
                    backoff_until: Mutex::new(None),
                    last_used: Mutex::new(now),
                    waiting: AtomicUsize::new(0),
                })
            })
            .clone();
        *lock(&state.last_used) = now;
        metrics::gauge!("crawler_politeness_hosts").set(map.hosts.len() as f64);
        state
    }

    /// Forget hosts nobody holds that are idle and not backing off; if still too many, forget
    /// the least recently used of those not in use.
    fn sweep(&self, hosts: &mut HashMap<String, Arc<HostState>>, now: Instant) {
        let forgettable = |h: &Arc<HostState>| {
            Arc::strong_count(h) == 1 && lock(&h.backoff_until).is_none_or(|until| until <= now)
        };
        hosts.retain(|_, h| {
            !(forgettable(h) && now.duration_since(*lock(&h.last_used)) >= self.idle_eviction)
        });
        if hosts.len() >= self.max_hosts {
            let mut unused: Vec<(Instant, String)> = hosts
                .iter()
                .filter(|(_, h)| forgettable(h))
                .map(|(k, h)| (*lock(&h.last_used), k.clone()))
                .collect();
            unused.sort();
            let excess = hosts.len() + 1 - (self.max_hosts * 9 / 10).max(1).min(hosts.len() + 1);
            for (_, key) in unused.into_iter().take(excess) {
                hosts.remove(&key);
            }
        }
    }

    /// Wait for this host's turn: a free in-flight slot, then the rate limiter.
    async fn acquire_local(&self, host: &str) -> Result<LocalPermit, NotNow> {
        let state = self.host(host);
        if let Some(left) = state.backoff_left(Instant::now()) {
            return Err(NotNow::BackingOff(left));
        }
        let ahead = state.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaitingGuard(&state.waiting);
        let period = lock(&state.limiter).period;
        let queue_estimate = period.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
        if queue_estimate > self.horizon {
            return Err(NotNow::Busy(queue_estimate));
        }
        let permit = state
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the host semaphore is never closed");
        // Take the limiter after the slot: the limiter's gaps are then the gaps on the wire.
        let rate = lock(&state.limiter).limiter.clone();
        rate.until_ready().await;
        if let Some(left) = state.backoff_left(Instant::now()) {
            return Err(NotNow::BackingOff(left));
        }
        Ok(LocalPermit {
            _permit: permit,
            host: state.clone(),
        })
    }

    /// The host told us to go away for `wait` (429/503 + Retry-After).
    fn back_off_local(&self, host: &str, wait: Duration) {
        let state = self.host(host);
        let until = Instant::now() + wait;
        let mut current = lock(&state.backoff_until);
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
        }
        tracing::debug!(host, wait_ms = wait.as_millis() as u64, "host backing off");
        metrics::counter!("crawler_host_backoffs_total").increment(1);
    }

    /// How long `host` is still backing off, if it is.
    fn backoff_left_local(&self, host: &str) -> Option<Duration> {
        let state = lock(&self.hosts).hosts.get(host).cloned()?;
        state.backoff_left(Instant::now())
    }

    /// Apply a robots.txt `Crawl-delay` (capped): the host's period becomes the slower of the
    /// configured rate and the delay.
    fn set_crawl_delay(&self, host: &str, delay: Option<Duration>) {
        let state = self.host(host);
        let delay = delay.map(|d| d.min(MAX_CRAWL_DELAY));
        let (period, burst) = match delay {
            Some(d) if d > self.base_period => (d, NonZeroU32::MIN),
            _ => (self.base_period, self.burst),
        };
        let mut slot = lock(&state.limiter);
        if slot.period != period {
            let fresh = limiter(period, burst);
            // The robots.txt fetch that revealed the delay was just made: count it.
            let _ = fresh.check();
            *slot = LimiterSlot {
                limiter: fresh,
                period,
            };
            tracing::debug!(
                host,
                period_ms = period.as_millis() as u64,
                "host rate changed"
            );
        }
    }
}

#[async_trait::async_trait]
impl HostGate for Politeness {
    async fn acquire(&self, host: &str, gap: Duration) -> Result<HostPermit, NotNow> {
        self.set_crawl_delay(host, (gap > self.base_period).then_some(gap));
        self.acquire_local(host).await.map(HostPermit::new)
    }

    fn back_off(&self, host: &str, wait: Duration) {
        self.back_off_local(host, wait)
    }

    fn backoff_left(&self, host: &str) -> Option<Duration> {
        self.backoff_left_local(host)
    }
}

impl HostState {
    fn backoff_left(&self, now: Instant) -> Option<Duration> {
        let until = (*lock(&self.backoff_until))?;
        (until > now).then(|| until - now)
    }
}

/// Parse a `Retry-After` value: delay-seconds or an HTTP date, relative to `now`, capped.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime, cap: Duration) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = httpdate::parse_http_date(value).ok()?;
        when.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let cap = Duration::from_secs(300);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("7", now, cap),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after(" 99999 ", now, cap), Some(cap));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(
            parse_retry_after(&later, now, cap),
            Some(Duration::from_secs(42))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(42));
        assert_eq!(parse_retry_after(&earlier, now, cap), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now, cap), None);
        assert_eq!(parse_retry_after("-5", now, cap), None);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_blocks_the_host_until_it_expires() {
        let p = Politeness::new(1000.0, 1, 2);
        p.back_off_local("a.test", Duration::from_secs(5));
        assert!(
            matches!(p.acquire_local("a.test").await, Err(NotNow::BackingOff(d)) if d == Duration::from_secs(5))
        );
        assert!(
            p.acquire_local("b.test").await.is_ok(),
            "other hosts are not affected"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(p.acquire_local("a.test").await.is_ok());
        assert_eq!(p.backoff_left_local("a.test"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_hosts_are_forgotten() {
        let p = Politeness::with_limits(1000.0, 1, 2, Duration::from_secs(600), 1_000);
        for i in 0..10 {
            drop(
                p.acquire_local(&format!("h{i}.test"))
                    .await
                    .expect("permit"),
            );
        }
        let held = p.acquire_local("held.test").await.expect("permit");
        p.back_off_local("slow.test", Duration::from_secs(3_600));
        assert_eq!(p.tracked_hosts(), 12);
        tokio::time::advance(Duration::from_secs(601)).await;
        drop(p.acquire_local("new.test").await.expect("permit"));
        // The held host and the backing-off one survive; the idle ones are gone.
        assert_eq!(p.tracked_hosts(), 3);
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_is_capped() {
        let p = Politeness::with_limits(1000.0, 1, 2, Duration::from_secs(600), 100);
        for i in 0..1_000 {
            drop(
                p.acquire_local(&format!("h{i}.test"))
                    .await
                    .expect("permit"),
            );
        }
        assert!(p.tracked_hosts() <= 100, "{}", p.tracked_hosts());
    }

    #[tokio::test]
    async fn a_queue_too_long_is_refused_as_busy() {
        // One request a minute: the second request in line would wait a whole period.
        let p = Politeness::new(1.0 / 120.0, 1, 1);
        let first = p.acquire_local("a.test").await.expect("first is immediate");
        let p = Arc::new(p);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.acquire_local("a.test").await.map(drop) })
        };
        // Wait until the second request is queued behind the first.
        while p.host("a.test").waiting.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            p.acquire_local("a.test").await,
            Err(NotNow::Busy(_))
        ));
        waiter.abort();
        drop(first);
    }
}
