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
//! Arrival jitter: the ledger spaces the starts it grants, but a crawler's request reaches the
//! host a little later than its start (the answer's trip, a late timer). So that two arrivals
//! are never closer than the gap, a permit is used only inside a window after its start, and
//! the ledger is asked for the gap plus that window. A crawler that misses its window releases
//! the permit unused and asks again. Gaps under [`WINDOW_FROM`] (rates above 20 per second)
//! get no window: there the jitter is of the order of the gap itself.

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Ask {
    host: String,
    gap_ms: i64,
    reply: oneshot::Sender<Result<(PermitAnswer, Instant), NotNow>>,
}

struct Shared {
    limits: LedgerLimits,
    /// Permits to release with the next request.
    releases: Mutex<Vec<i64>>,
    blocks: Mutex<Vec<HostBlock>>,
    /// Back-offs this cell learnt itself, so it does not even ask while they last.
    backoffs: Mutex<HashMap<String, Instant>>,
    wake: tokio::sync::Notify,
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

    async fn ask_once(&self, host: &str, gap_ms: i64) -> Result<(PermitAnswer, Instant), NotNow> {
        let (reply, answer) = oneshot::channel();
        self.asks
            .send(Ask {
                host: host.to_string(),
                gap_ms,
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
        let asked_gap = gap + window.unwrap_or(Duration::ZERO);
        let gap_ms = i64::try_from(asked_gap.as_millis()).unwrap_or(i64::MAX);
        for _ in 0..MAX_MISSES {
            let sent = Instant::now();
            let (answer, received) = self.ask_once(host, gap_ms).await?;
            let (id, wait) = match answer {
                PermitAnswer::NotBefore { wait_ms } => {
                    let wait = Duration::from_millis(wait_ms.max(1).unsigned_abs());
                    metrics::counter!("crawler_permits_total", "answer" => "not_before")
                        .increment(1);
                    return Err(NotNow::Busy(wait));
                }
                PermitAnswer::Granted { permit, wait_ms } => {
                    (permit, Duration::from_millis(wait_ms.max(0).unsigned_abs()))
                }
            };
            let permit = LedgerPermit {
                id,
                shared: self.shared.clone(),
            };
            // Not before the start (as seen from when the answer arrived), not after the window
            // (as seen from when the ask left: the answer's trip counts against the window).
            tokio::time::sleep_until(received + wait).await;
            if let Some(window) = window {
                if Instant::now() > sent + wait + window {
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
    loop {
        let mut batch: Vec<Ask> = Vec::new();
        tokio::select! {
            _ = stop.cancelled() => return,
            first = asks.recv() => match first {
                Some(a) => batch.push(a),
                None => return,
            },
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(RELEASE_FLUSH) => {}
        }
        // Wait for a free send slot first: asks that arrive meanwhile travel together.
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            s = sends.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        while let Ok(a) = asks.try_recv() {
            batch.push(a);
        }
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
