//! [`LedgerGate`]: per-host politeness kept by the organism's host ledger
//! (`engines::politeness`), reached through the api's `POST /internal/permits`, signed with the
//! cluster key. Crawlers never open the store.
//!
//! Every request to a host (robots.txt included) first asks the ledger for a permit: granted
//! with a wait (sleep it, then send the request) or "not before" (the job goes back to the
//! queue, deferred). Asks are batched: one background task sends every ask waiting at that
//! moment in one request, with the releases of finished requests and the hosts that asked for a
//! back-off since the last one. A release wakes that task too: with at most [`MAX_SENDS`]
//! requests in flight, whatever finishes while they travel goes together in the next. A permit is released when its request is done (its
//! [`HostPermit`] is dropped); a crawler that dies holds nothing for long, its permits lapse.
//!
//! Leases: for a fast host (a gap under [`WINDOW_FROM`]) the gate asks for a lane of the host's
//! lattice for [`LEASE`] rather than for one start (see `engines::politeness`), and starts its
//! requests to the host on the lane's ticks without asking again: a request then costs no trip
//! to the ledger, where a one-shot permit was held for two trips and the request, and the host's
//! concurrency limit divided by that hold capped its rate. A lane no request has used for
//! [`LEASE_IDLE`] is released, so another crawler may take it; a lane whose ticks are spent is
//! released at once.
//!
//! Arrival jitter: the ledger spaces the starts it grants, but a crawler's request reaches the
//! host a little later than its start (the answer's trip, a late timer). So that two arrivals
//! are never closer than the gap, a permit is used only inside a window after its start, and
//! the ledger is asked for the gap plus that window. The last quarter of the window is left to
//! the request's own trip after the check (the fetch stack, a new connection, the host's
//! accept): the host sees arrivals, not checks, and two requests' trips differ (a CI run saw
//! two arrivals 199.5 ms apart under a 200 ms Crawl-delay when a permit was used at the very end
//! of its window). A crawler that misses its window releases the permit unused and asks again.
//! Gaps under [`WINDOW_FROM`] (rates above 20 per second) get no window: there the jitter is of
//! the order of the gap itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use engines::politeness::{HostBlock, PermitAnswer, PermitAsk, PermitReply, PermitRequest};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::politeness::{HostGate, HostPermit, NotNow};

/// The api's endpoint and the envelope kind (as `api::permits` names them).
pub const PERMITS_PATH: &str = "/internal/permits";
pub const PERMITS_KIND: &str = "permits";
/// Gaps at least this long get an arrival window.
pub const WINDOW_FROM: Duration = Duration::from_millis(50);
/// The longest arrival window.
const MAX_WINDOW: Duration = Duration::from_millis(100);
/// Permit requests in flight at once from one crawler.
const MAX_SENDS: usize = 4;
/// A release not sent with a request (one that failed) is sent again within this long.
const RELEASE_FLUSH: Duration = Duration::from_millis(100);
/// A missed window is asked again at most this many times before the job is deferred.
const MAX_MISSES: u32 = 3;
/// When no api answers, asks are refused for this long.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);
/// How long a lease asks to hold a lane.
pub const LEASE: Duration = Duration::from_millis(500);
/// A leased lane no request has used for this long is released.
pub const LEASE_IDLE: Duration = Duration::from_millis(50);
/// Longest a request waits for one of this cell's busy lanes before asking for another.
const LANE_WAIT: Duration = Duration::from_millis(30);
/// Longest the gate's last request (what it holds, given back as it stops) may take.
const FINAL_RELEASE_WAIT: Duration = Duration::from_secs(1);

/// What the gate needs to know of the fetch stack's limits.
#[derive(Debug, Clone)]
pub struct LedgerLimits {
    /// Requests in flight per host, for the whole organism.
    pub concurrency: u32,
    /// Longest wait for a host's turn before the job is deferred.
    pub horizon: Duration,
    /// A permit lapses this long after its start if not released (request timeout + margin).
    pub hold: Duration,
}

/// The width of the arrival window for a gap (see the module docs).
pub fn window_for(gap: Duration) -> Option<Duration> {
    (gap >= WINDOW_FROM).then(|| (gap / 5).min(MAX_WINDOW))
}

/// The part of an arrival window a permit may be used in: the rest is left to the request's
/// trip after the check (see the module docs).
fn usable(window: Duration) -> Duration {
    window - window / 4
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Ask {
    host: String,
    gap_ms: i64,
    lease_ms: i64,
    reply: oneshot::Sender<Result<(PermitAnswer, Instant), NotNow>>,
}

struct Shared {
    limits: LedgerLimits,
    /// Permits to release with the next request.
    releases: Mutex<Vec<i64>>,
    blocks: Mutex<Vec<HostBlock>>,
    /// Back-offs this cell learnt itself, so it does not even ask while they last.
    backoffs: Mutex<HashMap<String, Instant>>,
    /// The lanes this cell leases, per host.
    leases: Mutex<HashMap<String, HostLanes>>,
    wake: tokio::sync::Notify,
}

/// A leased lane: one request at a time, each on a tick `first + k * every` up to `last`.
struct Lane {
    id: i64,
    /// The next tick not yet used.
    next: Instant,
    every: Duration,
    last: Instant,
    busy: bool,
    idle_since: Instant,
}

impl Lane {
    /// The lane's first tick at or after `now`, if it has one left.
    fn tick_from(&self, now: Instant) -> Option<Instant> {
        let tick = if self.next >= now || self.every.is_zero() {
            self.next.max(now)
        } else {
            let behind = (now - self.next).as_nanos();
            let every = self.every.as_nanos();
            let periods = u32::try_from(behind.div_ceil(every)).unwrap_or(u32::MAX);
            self.next + self.every.saturating_mul(periods)
        };
        (tick <= self.last).then_some(tick)
    }
}

/// A host's leased lanes, and the signal a request waiting for one of them hears.
#[derive(Default)]
struct HostLanes {
    lanes: Vec<Lane>,
    freed: Arc<tokio::sync::Notify>,
}

impl HostLanes {
    /// Drop the lanes `gone`, to be released; `true` when none is left (the entry goes, and
    /// whoever waits for a lane of it asks the ledger instead).
    fn drop_lanes(&mut self, gone: &[i64], releases: &Mutex<Vec<i64>>) -> bool {
        self.lanes.retain(|l| !gone.contains(&l.id));
        lock(releases).extend_from_slice(gone);
        let empty = self.lanes.is_empty();
        if empty {
            self.freed.notify_waiters();
        }
        empty
    }
}

impl Shared {
    /// Take the free lane of `host` whose next tick comes first: its id and tick, or `None`
    /// when no lane is free. Lanes found spent are released.
    fn take_lane(&self, host: &str) -> Option<(i64, Instant)> {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        let entry = leases.get_mut(host)?;
        let mut best: Option<(Instant, usize)> = None;
        let mut spent = Vec::new();
        for (i, lane) in entry.lanes.iter().enumerate().filter(|(_, l)| !l.busy) {
            match lane.tick_from(now) {
                Some(tick) if best.is_none_or(|(t, _)| tick < t) => best = Some((tick, i)),
                Some(_) => {}
                None => spent.push(lane.id),
            }
        }
        let taken = best.map(|(tick, i)| {
            let lane = &mut entry.lanes[i];
            lane.busy = true;
            lane.next = tick + lane.every;
            (lane.id, tick)
        });
        if !spent.is_empty() {
            if entry.drop_lanes(&spent, &self.releases) {
                leases.remove(host);
            }
            self.wake.notify_one();
        }
        taken
    }

    /// What a request for `host` may wait on for one of this cell's lanes to come free, if the
    /// cell holds any.
    fn lane_freed(&self, host: &str) -> Option<Arc<tokio::sync::Notify>> {
        lock(&self.leases).get(host).map(|e| e.freed.clone())
    }

    /// A request on a lane ended: the lane is free again (a request waiting for one hears it),
    /// or released if its ticks are spent or the host asked to be left alone.
    fn free_lane(&self, host: &str, id: i64) {
        let now = Instant::now();
        let backing_off = lock(&self.backoffs).get(host).is_some_and(|t| *t > now);
        let mut leases = lock(&self.leases);
        let Some(entry) = leases.get_mut(host) else {
            return;
        };
        let Some(lane) = entry.lanes.iter_mut().find(|l| l.id == id) else {
            return;
        };
        lane.busy = false;
        lane.idle_since = now;
        if backing_off || lane.next > lane.last {
            if entry.drop_lanes(&[id], &self.releases) {
                leases.remove(host);
            }
            self.wake.notify_one();
        } else {
            entry.freed.notify_one();
        }
    }

    /// Release every lane idle for [`LEASE_IDLE`] (or spent): they go with the next request.
    fn sweep_lanes(&self) {
        let now = Instant::now();
        lock(&self.leases).retain(|_, entry| {
            let gone: Vec<i64> = entry
                .lanes
                .iter()
                .filter(|l| !l.busy && (now >= l.idle_since + LEASE_IDLE || l.next > l.last))
                .map(|l| l.id)
                .collect();
            gone.is_empty() || !entry.drop_lanes(&gone, &self.releases)
        });
    }
}

/// A request on a leased lane; frees the lane when dropped.
struct LaneUse {
    host: String,
    id: i64,
    shared: Arc<Shared>,
}

impl Drop for LaneUse {
    fn drop(&mut self) {
        self.shared.free_lane(&self.host, self.id);
    }
}

/// The [`HostGate`] of a crawler in an organism.
pub struct LedgerGate {
    shared: Arc<Shared>,
    asks: mpsc::UnboundedSender<Ask>,
    stop: CancellationToken,
}

impl Drop for LedgerGate {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Releases its permit (with the gate's next request) when dropped.
struct LedgerPermit {
    id: i64,
    shared: Arc<Shared>,
}

impl Drop for LedgerPermit {
    fn drop(&mut self) {
        // Travels with the next request, which leaves as soon as a send slot is free: a permit
        // held after its fetch is a place another fetch of the host waits for (at 16 in flight
        // per host, a 100 ms late release alone capped a host at 160 requests a second).
        lock(&self.shared.releases).push(self.id);
        self.shared.wake.notify_one();
    }
}

impl LedgerGate {
    /// A gate asking the apis in `apis` (kept current by the caller), signing with `client`'s
    /// signer. Starts its batching task on the current runtime.
    pub fn new(
        apis: watch::Receiver<Vec<String>>,
        client: Arc<control::ControlClient>,
        limits: LedgerLimits,
    ) -> Self {
        let shared = Arc::new(Shared {
            limits,
            releases: Mutex::new(Vec::new()),
            blocks: Mutex::new(Vec::new()),
            backoffs: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        tokio::spawn(batch(shared.clone(), rx, apis, client, http, stop.clone()));
        Self {
            shared,
            asks: tx,
            stop,
        }
    }

    async fn ask_once(
        &self,
        host: &str,
        gap_ms: i64,
        lease_ms: i64,
    ) -> Result<(PermitAnswer, Instant), NotNow> {
        let (reply, answer) = oneshot::channel();
        self.asks
            .send(Ask {
                host: host.to_string(),
                gap_ms,
                lease_ms,
                reply,
            })
            .map_err(|_| NotNow::Unavailable(UNAVAILABLE_RETRY))?;
        answer
            .await
            .map_err(|_| NotNow::Unavailable(UNAVAILABLE_RETRY))?
    }
}

#[async_trait::async_trait]
impl HostGate for LedgerGate {
    async fn acquire(&self, host: &str, gap: Duration) -> Result<HostPermit, NotNow> {
        if let Some(left) = self.backoff_left(host) {
            return Err(NotNow::BackingOff(left));
        }
        let window = window_for(gap);
        // A fast host's requests go on leased lanes: one free already is used at its next tick.
        let lease_ms = if window.is_none() { ms(LEASE) } else { 0 };
        if lease_ms > 0 {
            // While this cell holds lanes of the host and all are busy, wait a little for one
            // to come free (a request ends within about a lane's period) before asking the
            // ledger for another: the worker runs more requests per host than it has lanes, so
            // that a lane's next request is ready when its tick comes.
            let deadline = Instant::now() + LANE_WAIT;
            loop {
                let freed = self.shared.lane_freed(host);
                let notified = freed.as_ref().map(|n| n.notified());
                tokio::pin!(notified);
                if let Some(n) = notified.as_mut().as_pin_mut() {
                    n.enable();
                }
                if let Some((id, tick)) = self.shared.take_lane(host) {
                    tokio::time::sleep_until(tick).await;
                    metrics::counter!("crawler_permits_total", "answer" => "lane").increment(1);
                    return Ok(HostPermit::new(LaneUse {
                        host: host.to_string(),
                        id,
                        shared: self.shared.clone(),
                    }));
                }
                let Some(n) = notified.as_mut().as_pin_mut() else {
                    break;
                };
                if Instant::now() >= deadline {
                    break;
                }
                tokio::select! {
                    _ = n => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
        }
        let asked_gap = gap + window.unwrap_or(Duration::ZERO);
        let gap_ms = i64::try_from(asked_gap.as_millis()).unwrap_or(i64::MAX);
        for _ in 0..MAX_MISSES {
            let sent = Instant::now();
            let (answer, received) = self.ask_once(host, gap_ms, lease_ms).await?;
            let (id, wait, every, span) = match answer {
                PermitAnswer::NotBefore { wait_ms } => {
                    let wait = Duration::from_millis(wait_ms.max(1).unsigned_abs());
                    metrics::counter!("crawler_permits_total", "answer" => "not_before")
                        .increment(1);
                    return Err(NotNow::Busy(wait));
                }
                PermitAnswer::Granted {
                    permit,
                    wait_ms,
                    every_ms,
                    for_ms,
                } => (
                    permit,
                    duration(wait_ms),
                    duration(every_ms),
                    duration(for_ms),
                ),
            };
            if lease_ms > 0 && !span.is_zero() {
                // A lane: its first tick is this request's start, the rest are kept here.
                let first = received + wait;
                lock(&self.shared.leases)
                    .entry(host.to_string())
                    .or_default()
                    .lanes
                    .push(Lane {
                        id,
                        next: first + every,
                        every,
                        last: first + span,
                        busy: true,
                        idle_since: first,
                    });
                let lane = LaneUse {
                    host: host.to_string(),
                    id,
                    shared: self.shared.clone(),
                };
                tokio::time::sleep_until(first).await;
                metrics::counter!("crawler_permits_total", "answer" => "leased").increment(1);
                return Ok(HostPermit::new(lane));
            }
            let permit = LedgerPermit {
                id,
                shared: self.shared.clone(),
            };
            // Not before the start (as seen from when the answer arrived), not after the window
            // (as seen from when the ask left: the answer's trip counts against the window).
            tokio::time::sleep_until(received + wait).await;
            if let Some(window) = window {
                if Instant::now() > sent + wait + usable(window) {
                    metrics::counter!("crawler_permits_total", "answer" => "missed").increment(1);
                    drop(permit);
                    continue;
                }
            }
            metrics::counter!("crawler_permits_total", "answer" => "granted").increment(1);
            return Ok(HostPermit::new(permit));
        }
        Err(NotNow::Busy(asked_gap))
    }

    fn back_off(&self, host: &str, wait: Duration) {
        let until = Instant::now() + wait;
        {
            let mut backoffs = lock(&self.shared.backoffs);
            let now = Instant::now();
            backoffs.retain(|_, t| *t > now);
            let entry = backoffs.entry(host.to_string()).or_insert(until);
            *entry = (*entry).max(until);
        }
        // The host's free lanes go back now; a busy one when its request ends.
        {
            let mut leases = lock(&self.shared.leases);
            if let Some(entry) = leases.get_mut(host) {
                let free: Vec<i64> = entry
                    .lanes
                    .iter()
                    .filter(|l| !l.busy)
                    .map(|l| l.id)
                    .collect();
                if entry.drop_lanes(&free, &self.shared.releases) {
                    leases.remove(host);
                }
            }
        }
        lock(&self.shared.blocks).push(HostBlock {
            host: host.to_string(),
            for_ms: i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
        });
        self.shared.wake.notify_one();
        metrics::counter!("crawler_host_backoffs_total").increment(1);
    }

    fn backoff_left(&self, host: &str) -> Option<Duration> {
        let until = *lock(&self.shared.backoffs).get(host)?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }
}

/// The batching task: one request carries every ask waiting, the releases and the blocks.
async fn batch(
    shared: Arc<Shared>,
    mut asks: mpsc::UnboundedReceiver<Ask>,
    apis: watch::Receiver<Vec<String>>,
    client: Arc<control::ControlClient>,
    http: reqwest::Client,
    stop: CancellationToken,
) {
    let sends = Arc::new(tokio::sync::Semaphore::new(MAX_SENDS));
    let next_api = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // When the gate goes (its crawler stops), every lane and permit it still holds goes back in
    // one last request, so that the host's other crawlers need not wait for them to lapse.
    let last_word = async {
        let mut releases = std::mem::take(&mut *lock(&shared.releases));
        for (_, entry) in lock(&shared.leases).drain() {
            releases.extend(entry.lanes.iter().map(|l| l.id));
        }
        if releases.is_empty() {
            return;
        }
        let request = PermitRequest {
            releases,
            ..PermitRequest::default()
        };
        let targets = apis.borrow().clone();
        let _ = tokio::time::timeout(
            FINAL_RELEASE_WAIT,
            send(&client, &http, &targets, &next_api, &request),
        )
        .await;
    };
    tokio::pin!(last_word);
    loop {
        let mut batch: Vec<Ask> = Vec::new();
        tokio::select! {
            _ = stop.cancelled() => return last_word.await,
            first = asks.recv() => match first {
                Some(a) => batch.push(a),
                None => return last_word.await,
            },
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(RELEASE_FLUSH) => {}
        }
        // Wait for a free send slot first: asks that arrive meanwhile travel together.
        let slot = tokio::select! {
            _ = stop.cancelled() => return last_word.await,
            s = sends.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        while let Ok(a) = asks.try_recv() {
            batch.push(a);
        }
        shared.sweep_lanes();
        let releases = std::mem::take(&mut *lock(&shared.releases));
        let blocks = std::mem::take(&mut *lock(&shared.blocks));
        if batch.is_empty() && releases.is_empty() && blocks.is_empty() {
            continue;
        }
        let limits = &shared.limits;
        let request = PermitRequest {
            releases,
            blocks,
            asks: batch
                .iter()
                .map(|a| PermitAsk {
                    host: a.host.clone(),
                    gap_ms: a.gap_ms,
                    concurrency: limits.concurrency,
                    horizon_ms: ms(limits.horizon),
                    hold_ms: ms(limits.hold),
                    lease_ms: a.lease_ms,
                })
                .collect(),
        };
        let targets = apis.borrow().clone();
        let (shared, client, http, next_api) = (
            shared.clone(),
            client.clone(),
            http.clone(),
            next_api.clone(),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let answered = send(&client, &http, &targets, &next_api, &request).await;
            let received = Instant::now();
            match answered {
                Some(reply) if reply.answers.len() == batch.len() => {
                    for (ask, answer) in batch.into_iter().zip(reply.answers) {
                        if ask.reply.send(Ok((answer, received))).is_err() {
                            // The asker is gone: its permit is released unused.
                            if let PermitAnswer::Granted { permit, .. } = answer {
                                lock(&shared.releases).push(permit);
                            }
                        }
                    }
                }
                other => {
                    if other.is_some() {
                        tracing::warn!("an api answered a permit request with the wrong count");
                    }
                    // Releases and blocks go with the next request (a repeat is harmless).
                    lock(&shared.releases).extend(request.releases);
                    lock(&shared.blocks).extend(request.blocks);
                    for ask in batch {
                        let _ = ask.reply.send(Err(NotNow::Unavailable(UNAVAILABLE_RETRY)));
                    }
                }
            }
        });
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A duration from the ledger's milliseconds (a negative one is none).
fn duration(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0).unsigned_abs())
}

/// Send one permit request, signed, to the apis in turn until one answers.
async fn send(
    client: &control::ControlClient,
    http: &reqwest::Client,
    apis: &[String],
    next_api: &std::sync::atomic::AtomicUsize,
    request: &PermitRequest,
) -> Option<PermitReply> {
    if apis.is_empty() {
        tracing::debug!("no api to ask for permits");
        return None;
    }
    let first = next_api.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for i in 0..apis.len() {
        let api = &apis[(first + i) % apis.len()];
        let sealed = client.signer().seal_to(PERMITS_KIND, api, request);
        let url = format!("{}{PERMITS_PATH}", api.trim_end_matches('/'));
        let sent = http
            .post(&url)
            .header(control::SIGNATURE_HEADER, &sealed.signature)
            .header("content-type", "application/json")
            .body(sealed.bytes)
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => match resp.json::<PermitReply>().await {
                Ok(reply) => return Some(reply),
                Err(e) => tracing::warn!(%url, error = %e, "unreadable permit answer"),
            },
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                tracing::warn!(%url, %status, %text, "permit request refused");
            }
            Err(e) => tracing::debug!(%url, error = %e, "permit request failed"),
        }
        metrics::counter!("crawler_permit_request_errors_total").increment(1);
    }
    None
}
