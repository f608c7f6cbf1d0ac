//! The crawler cell's loop: lease jobs, crawl them host by host, send results to the API that
//! published them, and acknowledge each job only after the API stored its result.
//!
//! Jobs are spread over hosts so one slow or rate-limited host never holds every fetch slot: a
//! host gets at most `per_host_concurrency` slots, the rest go to other hosts. A transient
//! failure goes back to the queue with a delay until its deliveries run out, then it is recorded
//! as failed. Results wait in a bounded buffer while no API answers; leasing stops meanwhile.
//!
//! Waiting for a host never spends a delivery and never outlives a lease: a job whose host is
//! not due within the politeness gate's horizon is deferred (`JobQueue::defer`), and so are the
//! host's other jobs waiting here; a job that waited here for a slot longer than a quarter of
//! its lease is deferred too, to be leased again when there is room.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use engines::{Delivery, DeliveryTag, JobQueue};
use protocol::{CrawlJob, CrawlResult, IngestBatch, IngestReply, Outcome, WIRE_VERSION};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{CrawlAttempt, Fetcher};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Fetches in flight in one crawler cell.
    pub concurrency: usize,
    /// Jobs taken from the queue at a time.
    pub lease_batch: usize,
    /// Results sent to the API in one request.
    pub ingest_batch: usize,
    /// Longest a result waits for its batch to fill, milliseconds.
    pub ingest_flush_ms: u64,
    /// Results held while no API answers before leasing stops.
    pub max_pending_results: usize,
    /// Ready jobs in the queue per live crawler at which a crawler's pressure is 1.0.
    pub backlog_full: usize,
    /// The share of the machine's CPU (0 to 1) from which the queue's backlog no longer asks
    /// for another crawler on this machine: on a saturated machine one more crawler only takes
    /// CPU from the crawlers and apis already there (BENCHMARKS.md, "where the crawl's time
    /// goes"). Measured only where new crawlers start on this machine (no pool serves the
    /// role); above 1.0 the backlog always counts.
    pub machine_busy_full: f64,
    /// The CPU this crawler's process uses, in cores, from which the queue's backlog asks for
    /// another crawler: below it the crawler is not its own limit (it waits on the apis, the
    /// store or the hosts' politeness, which the organism shares) and another one would only
    /// wait beside it. 0 counts the backlog whatever the crawler's CPU.
    pub own_cpu_full: f64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            lease_batch: 64,
            ingest_batch: 32,
            ingest_flush_ms: 20,
            max_pending_results: 1024,
            backlog_full: 256,
            machine_busy_full: 0.9,
            own_cpu_full: 0.8,
        }
    }
}

impl WorkerConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, v) in [
            ("concurrency", self.concurrency),
            ("lease_batch", self.lease_batch),
            ("ingest_batch", self.ingest_batch),
            ("max_pending_results", self.max_pending_results),
            ("backlog_full", self.backlog_full),
        ] {
            if v == 0 {
                out.push((key.to_string(), "must be at least 1".to_string()));
            }
        }
        if !(self.machine_busy_full.is_finite() && self.machine_busy_full > 0.0) {
            out.push((
                "machine_busy_full".to_string(),
                format!(
                    "must be a share of the CPU above 0 (above 1 never holds), not {}",
                    self.machine_busy_full
                ),
            ));
        }
        if !(self.own_cpu_full.is_finite() && self.own_cpu_full >= 0.0) {
            out.push((
                "own_cpu_full".to_string(),
                format!(
                    "must be a number of cores, 0 or more, not {}",
                    self.own_cpu_full
                ),
            ));
        }
        out
    }
}

/// What the loop is doing right now, for the cell's heartbeat (its pressure signals).
#[derive(Debug)]
pub struct WorkerGauges {
    /// Fetches in flight.
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Jobs leased and waiting for a fetch slot.
    pub buffered: std::sync::atomic::AtomicUsize,
    /// Results not yet taken by an api.
    pub unsent: std::sync::atomic::AtomicUsize,
    /// The queue's ready jobs per live crawler, as last measured ([`WorkerGauges::backlog`]).
    pub backlog_per_crawler: std::sync::atomic::AtomicUsize,
    /// The machine's CPU in use, per mille, smoothed ([`crate::machine`]); [`UNMEASURED`]
    /// where it is not measured (new crawlers start elsewhere).
    pub machine_busy_permille: std::sync::atomic::AtomicUsize,
    /// The CPU this process uses, in thousandths of a core, smoothed; [`UNMEASURED`] before
    /// the first measure.
    pub own_cpu_millicores: std::sync::atomic::AtomicUsize,
}

/// [`WorkerGauges::machine_busy_permille`] before (or without) a measure.
pub const UNMEASURED: usize = usize::MAX;

impl Default for WorkerGauges {
    fn default() -> Self {
        Self {
            in_flight: Default::default(),
            buffered: Default::default(),
            unsent: Default::default(),
            backlog_per_crawler: Default::default(),
            machine_busy_permille: std::sync::atomic::AtomicUsize::new(UNMEASURED),
            own_cpu_millicores: std::sync::atomic::AtomicUsize::new(UNMEASURED),
        }
    }
}

impl WorkerGauges {
    /// Signals by name, and the pressure they make, 1.0 = full: the busiest of the fetch
    /// slots, the result buffer and the queue's backlog per crawler, the last two held at
    /// `held` where another crawler would not help (results the apis have not taken; a backlog
    /// while this crawler waits or its machine is saturated). `held` is the controller's
    /// target (`[homeostasis] target`), between its idle and overloaded marks, so the role
    /// neither grows for such a signal nor retires cells that still have the work.
    pub fn signals(&self, cfg: &WorkerConfig, held: f64) -> (f64, Vec<(&'static str, f64)>) {
        use std::sync::atomic::Ordering::Relaxed;
        let in_flight = self.in_flight.load(Relaxed) as f64;
        let buffered = self.buffered.load(Relaxed) as f64;
        let unsent = self.unsent.load(Relaxed) as f64;
        let slots = in_flight / cfg.concurrency.max(1) as f64;
        let unsent_share = unsent / cfg.max_pending_results.max(1) as f64;
        // The queue's backlog, shared by the live crawlers: full when each has `backlog_full`
        // jobs waiting (the role needs more crawlers to drain it in good time).
        let per_crawler = self.backlog_per_crawler.load(Relaxed) as f64;
        let mut queue = per_crawler / cfg.backlog_full.max(1) as f64;
        let mut signals = vec![
            ("fetches_in_flight", in_flight),
            ("jobs_buffered", buffered),
            ("results_unsent", unsent),
            ("queue_backlog_per_crawler", per_crawler),
        ];
        // The backlog asks for another crawler only where one would get work done: this one
        // is busy on its own CPU, and the machine a new one would start on has CPU to give.
        let own = self.own_cpu_millicores.load(Relaxed);
        if own != UNMEASURED {
            let cores = own as f64 / 1000.0;
            signals.push(("own_cpu_cores", cores));
            if cores < cfg.own_cpu_full {
                queue = queue.min(held);
            }
        }
        let busy = self.machine_busy_permille.load(Relaxed);
        if busy != UNMEASURED {
            let busy = busy as f64 / 1000.0;
            signals.push(("machine_cpu_busy", busy));
            if busy >= cfg.machine_busy_full {
                queue = queue.min(held);
            }
        }
        (slots.max(unsent_share.min(held)).max(queue), signals)
    }
}

/// How many jobs to lease now, if any, with `free` of `room` places for jobs (waiting or
/// fetching): in batches, when half a batch is free or when there is nothing to do (a lease per
/// finished fetch would make the queue's write lock the bottleneck). A batch is at most the
/// room: with a batch larger than the room (few slots), half a batch would never be free, and
/// the crawler would lease only once it had run dry, its slots emptying between leases.
fn lease_size(free: usize, room: usize, lease_batch: usize, idle: bool) -> Option<usize> {
    let batch = lease_batch.min(room).max(1);
    (free > 0 && (free >= batch.div_ceil(2) || idle)).then(|| batch.min(free))
}

/// Everything the loop needs besides its configuration.
pub struct Worker {
    pub cfg: WorkerConfig,
    pub fetcher: Arc<Fetcher>,
    pub queue: Arc<dyn JobQueue>,
    /// API base URLs to fall back on when a job's `reply_to` does not answer (kept current from
    /// the registry when the organism has health checkers).
    pub apis: tokio::sync::watch::Receiver<Vec<String>>,
    /// Slots one host may hold at once (fetches started, waiting for the host or parsing).
    pub per_host_concurrency: usize,
    /// The queue's delivery limit: the last delivery of a transient failure records it as failed.
    pub max_deliveries: u32,
    /// The queue's lease: a job waits here for a fetch slot at most a quarter of it.
    pub lease: Duration,
    /// Updated every turn of the loop.
    pub gauges: Arc<WorkerGauges>,
    /// Sends results to the apis, signed.
    pub ingest: Arc<IngestSender>,
}

/// How results reach an api: in a control envelope signed with the cluster key and addressed
/// to that api (its `/internal/ingest` takes nothing else), and only to an api the registry
/// lists as live: a job's `reply_to` is text from the queue, not an address to trust.
pub struct IngestSender {
    client: control::ControlClient,
    /// `Worker::apis` is the registry's list of live apis (the cell follows health checkers):
    /// a `reply_to` not in it is not contacted. False: `reply_to` is trusted as today.
    registry: bool,
}

impl IngestSender {
    /// Signs as `cell_id` with `key`; `registry` as in [`IngestSender::registry`].
    pub fn new(key: control::ClusterKey, cell_id: impl Into<String>, registry: bool) -> Self {
        // Ingest batches are large and the api stores them before it answers: the timeout of
        // a result batch, not of a heartbeat.
        let client = control::ControlClient::with_timeout(
            control::Signer::new(key, cell_id),
            Duration::from_secs(30),
        );
        Self { client, registry }
    }
}

/// A host whose permit is refused for at most this long keeps a few of its jobs here and
/// pauses, rather than sending them all back to the queue to be leased again: the host with the
/// most work is the one whose permits are most often all out.
const HOLD_HOST_WAIT: Duration = Duration::from_secs(1);
/// A host whose permits are all out is asked again after this long at most, or as soon as one
/// of this crawler's own requests to it ends (which frees a permit): the ledger's "not before"
/// for a busy host (`engines::politeness::BUSY_RETRY_MS`) is when to ask again, not a politeness
/// limit, and at tens of requests a second per host its 100 ms left the host idle.
const BUSY_HOST_PAUSE: Duration = Duration::from_millis(20);

/// How long a host pauses here after a "not before" of `after`.
fn host_pause(after: Duration) -> Duration {
    let busy_retry = Duration::from_millis(engines::politeness::BUSY_RETRY_MS.unsigned_abs());
    if after <= busy_retry {
        after.min(BUSY_HOST_PAUSE)
    } else {
        after
    }
}

/// The hosts a crawler may start a fetch for, the one with the most jobs waiting first (ties by
/// name): not paused, with a job waiting and a slot free.
fn start_order<J, P>(
    waiting: &HashMap<String, VecDeque<J>>,
    active: &HashMap<String, usize>,
    paused: &HashMap<String, P>,
    per_host: usize,
) -> Vec<String> {
    let mut ready: Vec<(usize, &String)> = waiting
        .iter()
        .filter(|(host, q)| {
            !q.is_empty()
                && active.get(*host).copied().unwrap_or(0) < per_host
                && !paused.contains_key(*host)
        })
        .map(|(host, q)| (q.len(), host))
        .collect();
    ready.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ready.into_iter().map(|(_, host)| host.clone()).collect()
}

struct Pending {
    tag: DeliveryTag,
    reply_to: String,
    result: CrawlResult,
}

struct Job {
    tag: DeliveryTag,
    job: CrawlJob,
    deliveries: u32,
    leased_at: tokio::time::Instant,
}

enum Done {
    Result(Pending),
    Retry {
        tag: DeliveryTag,
        after: Duration,
    },
    /// Not attempted (the host is not due): held here for a short wait, otherwise back to the
    /// queue without spending the delivery.
    Defer {
        job: Job,
        after: Duration,
    },
}

impl Worker {
    /// Run until `shutdown`, then drain: no new leases, finish fetches, send results, ack.
    pub async fn run(self, shutdown: CancellationToken) {
        let client = self.ingest.clone();
        let per_host = self.per_host_concurrency.max(1);
        let mut waiting: HashMap<String, VecDeque<Job>> = HashMap::new();
        let mut active: HashMap<String, usize> = HashMap::new();
        // Hosts whose jobs wait here for a short while (see `HOLD_HOST_WAIT`), until when.
        let mut paused: HashMap<String, tokio::time::Instant> = HashMap::new();
        let mut buffered = 0usize;
        let mut fetches: JoinSet<(String, Done)> = JoinSet::new();
        let mut results: Vec<Pending> = Vec::new();
        let mut sends: JoinSet<(Vec<Pending>, Result<(), SendError>)> = JoinSet::new();
        let mut idle = Duration::from_millis(5);
        let mut send_backoff = Duration::from_millis(50);
        let mut send_blocked_until = tokio::time::Instant::now();
        let mut first_result_at: Option<tokio::time::Instant> = None;
        let mut draining = false;

        loop {
            // 1. Lease when there is room and results are not piling up.
            let unsent = results.len() + sends.len() * self.cfg.ingest_batch;
            let room = 2 * self.cfg.concurrency;
            let free = room.saturating_sub(buffered + fetches.len());
            let idle_now = buffered == 0 && fetches.is_empty();
            let mut leased_any = false;
            let lease = lease_size(free, room, self.cfg.lease_batch, idle_now);
            if let (false, Some(want), true) =
                (draining, lease, unsent < self.cfg.max_pending_results)
            {
                match self.queue.lease(want).await {
                    Ok(deliveries) => {
                        leased_any = !deliveries.is_empty();
                        for d in deliveries {
                            if let Some((host, job)) = self.accept(d).await {
                                waiting.entry(host).or_default().push_back(job);
                                buffered += 1;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "leasing jobs failed");
                        metrics::counter!("crawler_lease_errors_total").increment(1);
                    }
                }
            }

            // 2a. Jobs that waited here too long for a slot go back, free of charge.
            let max_buffered = self.lease / 4;
            if buffered > 0 && !draining {
                let now = tokio::time::Instant::now();
                let mut stale = Vec::new();
                for q in waiting.values_mut() {
                    while q
                        .front()
                        .is_some_and(|j| now.duration_since(j.leased_at) >= max_buffered)
                    {
                        stale.extend(q.pop_front().map(|j| j.tag));
                    }
                }
                waiting.retain(|_, q| !q.is_empty());
                buffered -= stale.len();
                for tag in stale {
                    metrics::counter!("crawler_jobs_deferred_total", "why" => "buffered")
                        .increment(1);
                    if let Err(e) = self.queue.defer(tag, Duration::ZERO).await {
                        tracing::warn!(error = %e, "deferring a job failed; its lease will expire");
                    }
                }
            }

            // 2. Start fetches: the host with the most jobs waiting first, among hosts with a
            //    free slot that are not paused. A crawl ends when its largest host ends, and a
            //    host's rate is its slots over a request's round trip: round-robin gave every
            //    host the same few slots while the largest waited its turn.
            let now = tokio::time::Instant::now();
            paused.retain(|_, until| *until > now);
            if fetches.len() < self.cfg.concurrency {
                let ready = start_order(&waiting, &active, &paused, per_host);
                'fill: while fetches.len() < self.cfg.concurrency && !ready.is_empty() {
                    let mut started = false;
                    for host in &ready {
                        if fetches.len() >= self.cfg.concurrency {
                            break 'fill;
                        }
                        let slots = active.entry(host.clone()).or_default();
                        if *slots >= per_host {
                            continue;
                        }
                        let Some(job) = waiting.get_mut(host).and_then(VecDeque::pop_front) else {
                            continue;
                        };
                        *slots += 1;
                        buffered -= 1;
                        started = true;
                        let fetcher = self.fetcher.clone();
                        let max_deliveries = self.max_deliveries;
                        let host = host.clone();
                        fetches.spawn(async move {
                            let done = crawl_one(&fetcher, job, max_deliveries).await;
                            (host, done)
                        });
                    }
                    if !started {
                        break;
                    }
                }
                waiting.retain(|_, q| !q.is_empty());
            }

            // 3. Send results when a batch is full or has waited long enough, or at once when
            //    no batch is on its way (group commit: a result does not wait for company while
            //    the api is idle, and batches grow while it is busy; each page's links reach
            //    the frontier one flush sooner, on every level of the crawl).
            let flush_due = first_result_at
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.cfg.ingest_flush_ms));
            let can_send = tokio::time::Instant::now() >= send_blocked_until && sends.len() < 4;
            if can_send
                && !results.is_empty()
                && (results.len() >= self.cfg.ingest_batch
                    || flush_due
                    || sends.is_empty()
                    || draining)
            {
                let take = results.len().min(self.cfg.ingest_batch);
                let batch: Vec<Pending> = results.drain(..take).collect();
                first_result_at = if results.is_empty() {
                    None
                } else {
                    Some(tokio::time::Instant::now())
                };
                let client = client.clone();
                let queue = self.queue.clone();
                let apis = self.apis.borrow().clone();
                sends.spawn(async move {
                    let outcome = send_and_ack(&client, &apis, queue.as_ref(), &batch).await;
                    (batch, outcome)
                });
            }

            if draining && fetches.is_empty() && results.is_empty() && sends.is_empty() {
                return;
            }

            {
                use std::sync::atomic::Ordering::Relaxed;
                self.gauges.in_flight.store(fetches.len(), Relaxed);
                self.gauges.buffered.store(buffered, Relaxed);
                self.gauges
                    .unsent
                    .store(results.len() + sends.len() * self.cfg.ingest_batch, Relaxed);
            }

            // 4. Wait for something to happen.
            let nothing_to_do = !leased_any && fetches.is_empty() && sends.is_empty();
            let mut wait = if nothing_to_do {
                idle = (idle * 2).min(Duration::from_millis(100));
                idle
            } else {
                idle = Duration::from_millis(5);
                Duration::from_millis(self.cfg.ingest_flush_ms.max(1))
            };
            // A paused host's jobs start when its pause ends.
            if let Some(until) = paused.values().min() {
                wait = wait.min(until.saturating_duration_since(tokio::time::Instant::now()));
            }
            tokio::select! {
                Some(joined) = fetches.join_next(), if !fetches.is_empty() => {
                    // Take every fetch that has finished, not just the first.
                    let mut finished = vec![joined];
                    while let Some(more) = fetches.try_join_next() {
                        finished.push(more);
                    }
                    for joined in finished {
                        match joined {
                            Ok((host, done)) => {
                                if !matches!(done, Done::Defer { .. }) {
                                    // A permit of the host's is free now.
                                    paused.remove(&host);
                                }
                                if let Some(n) = active.get_mut(&host) {
                                    *n = n.saturating_sub(1);
                                    if *n == 0 {
                                        active.remove(&host);
                                    }
                                }
                                match done {
                                    Done::Result(p) => {
                                        if results.is_empty() {
                                            first_result_at = Some(tokio::time::Instant::now());
                                        }
                                        results.push(p);
                                    }
                                    Done::Retry { tag, after } => {
                                        if let Err(e) = self.queue.retry(tag, after).await {
                                            tracing::warn!(error = %e, "returning a job to the queue failed; its lease will expire");
                                        }
                                    }
                                    Done::Defer { job, after } => {
                                        let q = waiting.entry(host.clone()).or_default();
                                        let mut back = Vec::new();
                                        if after <= HOLD_HOST_WAIT && !draining {
                                            // A short wait (the host's permits are all out, or
                                            // its next start is near): the host pauses here and
                                            // keeps a few of its jobs; the rest go back so they
                                            // do not crowd other hosts out of this crawler.
                                            paused.insert(host.clone(), tokio::time::Instant::now() + host_pause(after));
                                            q.push_front(job);
                                            buffered += 1;
                                            let keep = 8 * per_host;
                                            while q.len() > keep {
                                                back.extend(q.pop_back());
                                            }
                                            buffered -= back.len();
                                        } else {
                                            // The host's other waiting jobs would hear the same.
                                            buffered -= q.len();
                                            back.push(job);
                                            back.extend(q.drain(..));
                                        }
                                        if q.is_empty() {
                                            waiting.remove(&host);
                                        }
                                        if !back.is_empty() {
                                            metrics::counter!("crawler_jobs_deferred_total", "why" => "host").increment(back.len() as u64);
                                        }
                                        for job in back {
                                            if let Err(e) = self.queue.defer(job.tag, after).await {
                                                tracing::warn!(error = %e, "deferring a job failed; its lease will expire");
                                            }
                                        }
                                    }
                                }
                            }
                            Err(e) => {
                                // A panic inside a fetch: the job's lease expires and it is redelivered.
                                tracing::error!(error = %e, "a fetch task failed");
                                metrics::counter!("crawler_task_failures_total").increment(1);
                            }
                        }
                    }
                }
                Some(joined) = sends.join_next(), if !sends.is_empty() => {
                    match joined {
                        Ok((_, Ok(()))) => send_backoff = Duration::from_millis(50),
                        Ok((batch, Err(e))) => {
                            tracing::warn!(error = %e, n = batch.len(), ?send_backoff, "no API took the results; holding them");
                            metrics::counter!("crawler_ingest_errors_total").increment(1);
                            if results.is_empty() {
                                first_result_at = Some(tokio::time::Instant::now());
                            }
                            results.extend(batch);
                            send_blocked_until = tokio::time::Instant::now() + send_backoff;
                            send_backoff = (send_backoff * 2).min(Duration::from_secs(2));
                        }
                        Err(e) => tracing::error!(error = %e, "a send task failed"),
                    }
                }
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    tracing::info!(buffered, in_flight = fetches.len(), "draining");
                    // Jobs not started go straight back so another crawler can take them now.
                    for (_, q) in waiting.drain() {
                        for job in q {
                            if let Err(e) = self.queue.defer(job.tag, Duration::ZERO).await {
                                tracing::warn!(error = %e, "releasing a job failed; its lease will expire");
                            }
                        }
                    }
                    buffered = 0;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Decode a delivery; a malformed one goes to the dead-letter queue.
    async fn accept(&self, d: Delivery) -> Option<(String, Job)> {
        let job = match d.job {
            Ok(job) => job,
            Err(reason) => {
                tracing::warn!(%reason, "dead-lettering a malformed job");
                metrics::counter!("crawler_malformed_jobs_total").increment(1);
                if let Err(e) = self.queue.dead_letter(d.tag, &reason).await {
                    tracing::warn!(error = %e, "dead-lettering failed");
                }
                return None;
            }
        };
        let host = url::Url::parse(&job.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        Some((
            host,
            Job {
                tag: d.tag,
                job,
                deliveries: d.deliveries,
                leased_at: tokio::time::Instant::now(),
            },
        ))
    }
}

async fn crawl_one(fetcher: &Fetcher, job: Job, max_deliveries: u32) -> Done {
    let outcome = match fetcher.crawl(&job.job.url).await {
        CrawlAttempt::Done(outcome) => outcome,
        CrawlAttempt::Defer { after, .. } => return Done::Defer { job, after },
        CrawlAttempt::Retry { reason, after } => {
            if job.deliveries >= max_deliveries {
                Outcome::Failed {
                    reason: format!("gave up after {} attempts: {reason}", job.deliveries),
                }
            } else {
                metrics::counter!("crawler_retries_total").increment(1);
                return Done::Retry {
                    tag: job.tag,
                    after,
                };
            }
        }
    };
    Done::Result(Pending {
        tag: job.tag,
        reply_to: job.job.reply_to,
        result: CrawlResult {
            url: job.job.url,
            depth: job.job.depth,
            outcome,
        },
    })
}

/// Send a batch to the API named in its jobs (falling back to the others), then ack the jobs.
async fn send_and_ack(
    client: &IngestSender,
    apis: &[String],
    queue: &dyn JobQueue,
    batch: &[Pending],
) -> Result<(), SendError> {
    // Results are grouped by the API that asked for them.
    let mut by_api: HashMap<&str, Vec<&Pending>> = HashMap::new();
    for p in batch {
        by_api.entry(p.reply_to.as_str()).or_default().push(p);
    }
    let mut acked = Vec::new();
    let mut last_err = None;
    for (reply_to, group) in by_api {
        let body = IngestBatch {
            v: WIRE_VERSION,
            results: group.iter().map(|p| p.result.clone()).collect(),
        };
        let mut targets: Vec<&str> = Vec::new();
        if !client.registry || is_live(apis, reply_to) {
            targets.push(reply_to);
        } else {
            metrics::counter!("crawler_reply_to_refused_total").increment(1);
            tracing::warn!(%reply_to, "a job's reply_to is not a live api: not contacted");
        }
        targets.extend(apis.iter().map(String::as_str).filter(|a| *a != reply_to));
        if targets.is_empty() {
            last_err = Some(SendError::NoLiveApi(reply_to.to_string()));
        }
        let mut sent = false;
        for target in targets {
            match post_ingest(client, target, &body).await {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => last_err = Some(SendError::Ingest(e)),
            }
        }
        if sent {
            acked.extend(group.iter().map(|p| p.tag));
            metrics::counter!("crawler_results_sent_total").increment(group.len() as u64);
        }
    }
    if !acked.is_empty() {
        // An ack that fails leaves the job to be redelivered; ingest is idempotent.
        if let Err(e) = queue.ack(&acked).await {
            tracing::warn!(error = %e, "acknowledging jobs failed; they will be redelivered");
        }
    }
    match last_err {
        Some(e) if acked.len() < batch.len() => Err(e),
        _ => Ok(()),
    }
}

/// Whether `addr` is among the live apis (compared as normalized base URLs).
fn is_live(apis: &[String], addr: &str) -> bool {
    let addr = control::normalize_address(addr);
    apis.iter().any(|a| control::normalize_address(a) == addr)
}

async fn post_ingest(
    client: &IngestSender,
    api: &str,
    body: &IngestBatch,
) -> Result<IngestReply, control::SendError> {
    client.client.ask(api, body).await
}

/// Why a batch of results was not stored (its jobs stay leased and are sent again).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("no live api to send results to ({0} is not one)")]
    NoLiveApi(String),
    #[error("sending results: {0}")]
    Ingest(#[source] control::SendError),
}

#[cfg(test)]
mod ingest_tests {
    use super::is_live;

    #[test]
    fn reply_to_is_live_only_when_the_registry_lists_it() {
        let apis = vec!["http://127.0.0.1:7001".to_string()];
        assert!(is_live(&apis, "http://127.0.0.1:7001/"));
        assert!(!is_live(&apis, "http://127.0.0.1:7002"));
        assert!(!is_live(&apis, "http://attacker.example:7001"));
        assert!(!is_live(&[], "http://127.0.0.1:7001"));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;

    /// The controller's default target, as `[homeostasis] target` gives it.
    const HELD: f64 = 0.6;

    /// A crawler busy on its own CPU (a whole core), with this backlog and machine.
    fn gauges(backlog_per_crawler: usize, busy_permille: usize) -> WorkerGauges {
        let g = WorkerGauges::default();
        g.backlog_per_crawler.store(backlog_per_crawler, Relaxed);
        g.machine_busy_permille.store(busy_permille, Relaxed);
        g.own_cpu_millicores.store(1000, Relaxed);
        g
    }

    #[test]
    fn a_crawler_waiting_on_others_does_not_ask_for_more_crawlers() {
        let cfg = WorkerConfig::default();
        // A quarter of a core: the crawler waits (on the apis, the store, politeness).
        let g = gauges(768, 500);
        g.own_cpu_millicores.store(250, Relaxed);
        let (pressure, signals) = g.signals(&cfg, HELD);
        assert_eq!(pressure, HELD);
        assert!(signals.contains(&("own_cpu_cores", 0.25)), "{signals:?}");
        // Not yet measured: the backlog counts whole.
        g.own_cpu_millicores.store(UNMEASURED, Relaxed);
        assert_eq!(g.signals(&cfg, HELD).0, 3.0);
        // 0 turns the check off.
        g.own_cpu_millicores.store(250, Relaxed);
        let off = WorkerConfig {
            own_cpu_full: 0.0,
            ..WorkerConfig::default()
        };
        assert_eq!(g.signals(&off, HELD).0, 3.0);
    }

    #[test]
    fn a_backlog_asks_for_crawlers_while_the_machine_has_room() {
        let cfg = WorkerConfig::default();
        // Three times the backlog one crawler is sized for: pressure 3.
        let (pressure, signals) = gauges(768, 500).signals(&cfg, HELD);
        assert_eq!(pressure, 3.0);
        assert!(signals.contains(&("machine_cpu_busy", 0.5)), "{signals:?}");
        // Not measured (a pool serves the role): the backlog counts whole, and no CPU signal.
        let (pressure, signals) = gauges(768, UNMEASURED).signals(&cfg, HELD);
        assert_eq!(pressure, 3.0);
        assert!(signals.iter().all(|(name, _)| *name != "machine_cpu_busy"));
    }

    #[test]
    fn a_saturated_machine_holds_the_backlog_at_the_target() {
        let cfg = WorkerConfig::default();
        let (pressure, _) = gauges(768, 950).signals(&cfg, HELD);
        assert_eq!(pressure, HELD);
        // A backlog below the hold is not raised by it.
        let (pressure, _) = gauges(64, 950).signals(&cfg, HELD);
        assert_eq!(pressure, 0.25);
        // Above 1.0 the machine never holds it.
        let never = WorkerConfig {
            machine_busy_full: 1.5,
            ..WorkerConfig::default()
        };
        assert_eq!(gauges(768, 1000).signals(&never, HELD).0, 3.0);
    }

    #[test]
    fn results_the_apis_do_not_take_never_ask_for_more_crawlers() {
        let cfg = WorkerConfig::default();
        let g = gauges(0, 100);
        g.unsent.store(cfg.max_pending_results, Relaxed);
        // The buffer is full: busy enough not to retire, not a reason to divide.
        assert_eq!(g.signals(&cfg, HELD).0, HELD);
    }

    /// The largest host goes first; a host at its slots, paused or with nothing waiting does
    /// not go at all.
    #[test]
    fn the_host_with_the_most_jobs_waiting_starts_first() {
        let waiting: HashMap<String, VecDeque<u8>> = [
            ("small.test", 1),
            ("big.test", 9),
            ("mid.test", 4),
            ("full.test", 20),
            ("paused.test", 30),
            ("empty.test", 0),
            ("also-mid.test", 4),
        ]
        .into_iter()
        .map(|(h, n)| (h.to_string(), vec![0u8; n].into()))
        .collect();
        let active: HashMap<String, usize> =
            [("full.test".to_string(), 2), ("mid.test".to_string(), 1)].into();
        let paused: HashMap<String, ()> = [("paused.test".to_string(), ())].into();
        assert_eq!(
            start_order(&waiting, &active, &paused, 2),
            vec!["big.test", "also-mid.test", "mid.test", "small.test"]
        );
    }

    /// A busy host (the ledger's short "not before") is asked again within 20 ms; a longer wait
    /// (a Crawl-delay's next start, no api answering) is waited whole.
    #[test]
    fn a_busy_host_pauses_briefly_and_a_late_one_for_its_wait() {
        assert_eq!(host_pause(Duration::from_millis(100)), BUSY_HOST_PAUSE);
        assert_eq!(
            host_pause(Duration::from_millis(5)),
            Duration::from_millis(5)
        );
        assert_eq!(
            host_pause(Duration::from_millis(700)),
            Duration::from_millis(700)
        );
    }

    #[test]
    fn a_crawler_with_few_slots_leases_before_it_runs_dry() {
        // 8 slots (room 16), the default batch of 64: half the room free is enough.
        assert_eq!(lease_size(8, 16, 64, false), Some(8));
        assert_eq!(lease_size(7, 16, 64, false), None);
        assert_eq!(lease_size(16, 16, 64, true), Some(16));
        // Many slots: half a batch.
        assert_eq!(lease_size(40, 256, 64, false), Some(40));
        assert_eq!(lease_size(31, 256, 64, false), None);
        assert_eq!(lease_size(5, 256, 64, true), Some(5));
        assert_eq!(lease_size(0, 16, 64, true), None);
    }

    #[test]
    fn a_nonsensical_cpu_share_is_refused_by_name() {
        let machine = |v| WorkerConfig {
            machine_busy_full: v,
            ..WorkerConfig::default()
        };
        let own = |v| WorkerConfig {
            own_cpu_full: v,
            ..WorkerConfig::default()
        };
        let cases = [0.0, -1.0, f64::NAN, f64::INFINITY]
            .map(|v| ("machine_busy_full", machine(v)))
            .into_iter()
            .chain([-0.5, f64::NAN, f64::INFINITY].map(|v| ("own_cpu_full", own(v))));
        for (key, cfg) in cases {
            let problems = cfg.problems();
            assert!(
                problems.iter().any(|(k, _)| k == key),
                "{cfg:?}: {problems:?}"
            );
        }
        assert!(WorkerConfig::default().problems().is_empty());
    }
}
