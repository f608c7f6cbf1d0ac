//! The cluster queue: crawl jobs in RabbitMQ (through lapin).
//!
//! One durable **quorum** queue per organism (`x-delivery-limit`, dead-lettering to the durable
//! queue `<name>.dead`), persistent messages, publisher confirms with mandatory publishing (an
//! unroutable job is an error, never a silent drop) and manual acknowledgements.
//!
//! How the [`JobQueue`] contract maps onto AMQP:
//! - `lease` drains deliveries already pushed to a consumer (`basic.qos(prefetch)`); the consumer is
//!   only started by the first `lease`, so a cell that only publishes never holds jobs.
//! - A lease ends with `ack`, `retry` (reject with requeue, after the delay), `dead_letter`
//!   (publish to `<name>.dead` with the reason, then ack), or when it runs out
//!   ([`AmqpOptions::lease`]): the queue gives the job back to the broker itself, because RabbitMQ
//!   redelivers an unacknowledged job only when its channel closes (or after the broker's
//!   `consumer_timeout`). [`AmqpQueue::abandon_leases`] closes the consumer's channel, which gives
//!   every job it holds back at once.
//! - `defer` (a job that waited for its host, never attempted) publishes a copy that carries
//!   the deliveries so far minus this one, with confirms, then acks the original: the wait costs
//!   no delivery. RabbitMQ has no delay without plugins, so a delayed copy waits in a delay
//!   queue `<name>.delay.<ms>` with the time it is due, and the consuming cells move it back to
//!   the job queue when that time comes (`delay.rs` says why not a message TTL); the delay is
//!   rounded up to one of [`WAIT_BUCKETS_MS`]. A crawler that dies loses none of them.
//! - `deliveries` is the quorum queue's `x-delivery-count` + 1; a job handed back at its
//!   `max_deliveries`-th delivery is dead-lettered by the queue itself (the broker's delivery
//!   limit is a backstop for a consumer that dies holding it).
//! - A broker that refuses quorum queues gets classic durable queues; the queue then counts
//!   deliveries in its own header and dead-letters by itself.
//!
//! Clusters: the URL may be a comma-separated list of `amqp://` URLs, the nodes of one RabbitMQ
//! cluster (the quorum queues are replicated across them). The queue connects to one node at a
//! time; when that connection is lost it tries the next node first, then the others in turn.
//!
//! Reconnection: a background task owns the connection. When the connection or a channel dies it
//! reconnects with exponential backoff (capped by [`AmqpOptions::max_backoff`]), declares the
//! queues again and restarts the consumer if one was running. Meanwhile calls fail quickly with
//! [`EngineError::Unavailable`], except `publish`, which waits up to
//! [`AmqpOptions::publish_timeout`] for the connection (bounded: nothing is buffered). Delivery
//! tags handed out before a reconnect are stale: acknowledging them is a no-op, and the broker
//! delivers those jobs again.

mod delay;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::acker::Acker;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicRejectOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use protocol::CrawlJob;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::{Delivery, DeliveryTag, EngineError, JobQueue, QueueDepth, Result};
use session::Session;

/// Header the queue writes on dead-lettered jobs: why they died.
const REASON_HEADER: &str = "x-homeostat-reason";
/// Header the queue writes when it re-publishes a job itself (classic queues, dead letters):
/// how many times it was delivered so far.
const DELIVERIES_HEADER: &str = "x-homeostat-deliveries";

/// The delays a deferred job can wait, ms: a defer waits the first bucket at least as long as
/// asked (the last one when asked for more).
pub const WAIT_BUCKETS_MS: [u64; 12] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 120_000, 300_000,
];

/// The wait bucket for a delay: never shorter than asked, unless asked beyond the last bucket.
pub fn wait_bucket(after: Duration) -> u64 {
    let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    WAIT_BUCKETS_MS
        .iter()
        .copied()
        .find(|&b| b >= ms)
        .unwrap_or(WAIT_BUCKETS_MS[WAIT_BUCKETS_MS.len() - 1])
}

/// Longest one node's connection (TCP and the AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of an [`AmqpQueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpOptions {
    /// Deliveries the broker pushes ahead of `lease` (`basic.qos`). Jobs pushed but not yet leased
    /// are also given back when the consumer closes, which counts as a delivery: keep it small.
    pub prefetch: u16,
    /// Deliveries of one job before it is dead-lettered.
    pub max_deliveries: u32,
    /// A leased job not acknowledged within this time is given back to the broker, to be
    /// delivered again (counted). `None`: it stays leased until acknowledged or until the
    /// consumer closes.
    pub lease: Option<Duration>,
    /// How long `lease` waits for the first delivery when none is ready.
    pub lease_wait: Duration,
    /// How long `publish` waits for a connection, and for the broker's confirms.
    pub publish_timeout: Duration,
    /// Cap of the exponential backoff between reconnection attempts.
    pub max_backoff: Duration,
    /// Declare quorum queues (the default). `false` declares classic durable queues, for brokers
    /// without quorum queues; a broker that refuses quorum queues gets them anyway.
    pub quorum: bool,
}

impl AmqpOptions {
    pub fn new(prefetch: u16, max_deliveries: u32) -> Self {
        Self {
            prefetch,
            max_deliveries,
            lease: Some(Duration::from_secs(300)),
            lease_wait: Duration::from_millis(50),
            publish_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
            quorum: true,
        }
    }
}

/// A [`JobQueue`] on RabbitMQ. Cheap to share behind an `Arc`; dropping it stops its background
/// task and closes its connection (jobs it held are delivered again).
pub struct AmqpQueue {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl AmqpQueue {
    /// Connect to `amqp://` `url`, declare `queue_name` (a quorum queue with its dead-letter queue
    /// `<queue_name>.dead`) and start the reconnecting background task. Default lease: 5 minutes.
    pub async fn connect(
        url: &str,
        queue_name: &str,
        prefetch: u16,
        max_deliveries: u32,
    ) -> Result<Self> {
        Self::connect_with(url, queue_name, AmqpOptions::new(prefetch, max_deliveries)).await
    }

    /// [`AmqpQueue::connect`] with every setting.
    pub async fn connect_with(url: &str, queue_name: &str, options: AmqpOptions) -> Result<Self> {
        let uris = session::parse_uris(url)?;
        if queue_name.is_empty() || queue_name.len() > 250 || queue_name.starts_with("amq.") {
            return Err(EngineError::Config(format!(
                "bad AMQP queue name {queue_name:?}: 1 to 250 bytes, not starting with \"amq.\""
            )));
        }
        let options = AmqpOptions {
            prefetch: options.prefetch.max(1),
            max_deliveries: options.max_deliveries.max(1),
            ..options
        };
        let (session_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            uris,
            node: AtomicUsize::new(0),
            queue: queue_name.to_string(),
            dead_queue: dead_queue_name(queue_name),
            options,
            session: session_tx,
            wake: Arc::new(Notify::new()),
            held: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            delayed: Arc::new(AtomicU64::new(0)),
            consuming: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        });
        // The first connection is made here, so a wrong URL or a missing broker is reported to
        // the caller instead of being retried forever in the background.
        let first = Session::open(&shared).await?;
        shared.install(first);
        let stop = CancellationToken::new();
        tokio::spawn(supervise(Arc::downgrade(&shared), stop.clone()));
        Ok(Self { shared, stop })
    }

    /// The queue's name (its dead-letter queue is `<name>.dead`).
    pub fn queue_name(&self) -> &str {
        &self.shared.queue
    }

    /// Give back every job this queue holds (leased, or pushed ahead and not yet leased) by
    /// closing its consumer's channel: the broker delivers them again (counted). Their tags
    /// become stale. A later `lease` starts a new consumer. Crawlers call this on shutdown.
    pub async fn abandon_leases(&self) -> Result<()> {
        self.shared.consuming.store(false, Ordering::SeqCst);
        let session = self.shared.current();
        let consuming = match &session {
            Some(s) => s.consumer.lock().await.take(),
            None => None,
        };
        let dead_leases: Vec<Held> = {
            let mut held = self.shared.held();
            let all: Vec<(u64, Held)> = held.drain().collect();
            all.into_iter()
                .filter(|(_, h)| h.dead)
                .map(|(_, h)| h)
                .collect()
        };
        for h in dead_leases {
            // Dead letters come from basic.get on a shared channel: give them back one by one.
            let _ = h.acker.reject(BasicRejectOptions { requeue: true }).await;
        }
        if let Some(c) = consuming {
            c.close().await?;
        }
        Ok(())
    }

    /// Close the connection now (dropping the queue does it too, without waiting).
    pub async fn close(&self) {
        self.stop.cancel();
        if let Some(s) = self.shared.session.send_replace(None) {
            s.close().await;
        }
    }

    /// Whether the queue is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some()
    }
}

impl Drop for AmqpQueue {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    /// The broker's nodes (one, or the nodes of a cluster); connections go to one at a time.
    uris: Vec<AMQPUri>,
    /// Index in `uris` of the node connected to last (the next connection tries it first).
    node: AtomicUsize,
    queue: String,
    dead_queue: String,
    options: AmqpOptions,
    /// The live session, `None` while reconnecting.
    session: watch::Sender<Option<Arc<Session>>>,
    /// Asks the background task to look at the connection now.
    wake: Arc<Notify>,
    /// Deliveries handed out and not yet settled, by the tag handed out.
    held: Mutex<HashMap<u64, Held>>,
    next_tag: AtomicU64,
    /// Retried jobs waiting for their delay (still unacknowledged on the broker).
    delayed: Arc<AtomicU64>,
    /// Whether a consumer should be running (`lease` was called, `abandon_leases` was not).
    consuming: AtomicBool,
    generation: AtomicU64,
}

/// One delivery handed out by `lease` or `lease_dead`.
struct Held {
    generation: u64,
    acker: Acker,
    deadline: Option<Instant>,
    body: Vec<u8>,
    deliveries: u32,
    /// From the dead-letter queue.
    dead: bool,
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        // A panic while holding this lock leaves the map consistent (plain inserts/removes).
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session if it is healthy.
    fn current(&self) -> Option<Arc<Session>> {
        self.session
            .borrow()
            .as_ref()
            .filter(|s| s.healthy())
            .cloned()
    }

    /// The session, waiting up to `wait` for the background task to (re)connect.
    async fn session_within(&self, wait: Duration) -> Result<Arc<Session>> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        self.wake.notify_one();
        let mut rx = self.session.subscribe();
        let waited = tokio::time::timeout(
            wait,
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.healthy())),
        )
        .await;
        match waited {
            Ok(Ok(s)) => Ok(s.as_ref().cloned().expect("wait_for checked it is Some")),
            _ => Err(EngineError::Unavailable(format!(
                "not connected to RabbitMQ at {}; reconnecting in the background",
                self.node_name(self.node.load(Ordering::SeqCst))
            ))),
        }
    }

    /// `host:port` of node `index`, for messages.
    fn node_name(&self, index: usize) -> String {
        node_name(&self.uris, index)
    }

    /// Connect to the node connected to last, else to the others in turn. After a lost
    /// connection (`session` is `None` then) the next node is tried first: the lost one is
    /// likely down, and every node of a cluster serves the same queues.
    async fn connect_any(
        &self,
        properties: lapin::ConnectionProperties,
    ) -> Result<lapin::Connection> {
        let (index, conn) =
            connect_first(&self.uris, self.node.load(Ordering::SeqCst), properties).await?;
        if self.uris.len() > 1 {
            tracing::info!(queue = %self.queue, node = %node_name(&self.uris, index), "connected to RabbitMQ");
        }
        self.node.store(index, Ordering::SeqCst);
        Ok(conn)
    }

    /// Connect to the next node first from now on (the current one was lost).
    fn rotate(&self) {
        if self.uris.len() > 1 {
            let next = (self.node.load(Ordering::SeqCst) + 1) % self.uris.len();
            self.node.store(next, Ordering::SeqCst);
        }
    }

    fn install(&self, session: Session) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let session = Arc::new(session.with_generation(generation));
        // Deliveries of an older connection are settled by the broker already.
        self.held().retain(|_, h| h.generation == generation);
        self.session.send_replace(Some(session));
    }

    /// Mark the session dead and ask the background task to reconnect.
    fn report_broken(&self, session: &Session) {
        session.mark_broken();
        self.wake.notify_one();
    }

    fn hold(
        &self,
        session: &Session,
        acker: Acker,
        body: &[u8],
        deliveries: u32,
        dead: bool,
    ) -> DeliveryTag {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let deadline = self.options.lease.map(|l| Instant::now() + l);
        self.held().insert(
            tag,
            Held {
                generation: session.generation,
                acker,
                deadline,
                body: body.to_vec(),
                deliveries,
                dead,
            },
        );
        DeliveryTag(tag)
    }

    /// Give back the leases that ran out.
    async fn expire_leases(&self) {
        if self.options.lease.is_none() {
            return;
        }
        let now = Instant::now();
        let expired: Vec<Held> = {
            let mut held = self.held();
            let tags: Vec<u64> = held
                .iter()
                .filter(|(_, h)| h.deadline.is_some_and(|d| d <= now))
                .map(|(t, _)| *t)
                .collect();
            tags.iter().filter_map(|t| held.remove(t)).collect()
        };
        for h in expired {
            if let Err(e) = self.give_back(&h).await {
                tracing::warn!(error = %e, queue = %self.queue, "could not give back an expired lease; the broker will redeliver it when the channel closes");
            }
        }
    }

    /// Return a job to its queue to be delivered again (counted as a delivery).
    async fn give_back(&self, h: &Held) -> Result<()> {
        let Some(session) = self.current() else {
            return Ok(()); // its channel is gone: the broker has it back already
        };
        if h.generation != session.generation || !h.acker.usable() {
            return Ok(());
        }
        if h.dead {
            h.acker.reject(BasicRejectOptions { requeue: true }).await?;
            return Ok(());
        }
        // The last allowed delivery goes to the dead letters from here, published with confirms,
        // on either kind of queue: a quorum queue's own delivery limit is left as a backstop (for
        // a consumer that dies holding the job), because its dead-lettering rests on the broker
        // forwarding, which RabbitMQ 3.10 stopped doing for good after a leader moved.
        if h.deliveries >= self.options.max_deliveries {
            let reason = format!(
                "delivered {} times without an acknowledgement",
                h.deliveries
            );
            return self.send_to_dead(&session, h, &reason).await;
        }
        if session.quorum {
            // Quorum queues count the return in x-delivery-count.
            h.acker.reject(BasicRejectOptions { requeue: true }).await?;
            return Ok(());
        }
        // A classic queue does not count returns: a copy that carries the count is published
        // again, and the original is dropped.
        let mut headers = FieldTable::default();
        headers.insert(
            DELIVERIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(h.deliveries)),
        );
        match session.publish(&self.queue, &h.body, headers).await {
            Ok(()) => {
                h.acker.ack(BasicAckOptions::default()).await?;
            }
            Err(e) => {
                h.acker.reject(BasicRejectOptions { requeue: true }).await?;
                self.wake.notify_one();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Hand a job back without counting its delivery: a copy carrying the deliveries before this
    /// one goes to the job queue (or, with a delay, to a wait queue that dead-letters it back),
    /// confirmed, then the original is acknowledged.
    async fn defer_held(&self, h: &Held, after: Duration) -> Result<()> {
        let Some(session) = self.current() else {
            return Err(EngineError::Unavailable("not connected to RabbitMQ".into()));
        };
        if h.generation != session.generation || !h.acker.usable() {
            return Ok(()); // its channel is gone: the broker has it back already
        }
        let mut headers = FieldTable::default();
        headers.insert(
            DELIVERIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(h.deliveries.saturating_sub(1))),
        );
        let target = if after.is_zero() {
            self.queue.clone()
        } else {
            let bucket = wait_bucket(after);
            headers.insert(
                delay::DUE_HEADER.into(),
                AMQPValue::LongLongInt(
                    crate::sqlite::now_ms()
                        .saturating_add(i64::try_from(bucket).unwrap_or(i64::MAX)),
                ),
            );
            session.delay_queue(&self.queue, bucket).await?
        };
        session.publish(&target, &h.body, headers).await?;
        h.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Publish a copy of a job to the dead-letter queue with its reason, then drop the original.
    async fn send_to_dead(&self, session: &Session, h: &Held, reason: &str) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            DELIVERIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(h.deliveries)),
        );
        session.publish(&self.dead_queue, &h.body, headers).await?;
        h.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// How many times a delivery has been delivered, this one included.
    fn deliveries(&self, props: &lapin::BasicProperties, redelivered: bool, quorum: bool) -> u32 {
        let headers = props.headers().as_ref();
        let broker = header_u64(headers, "x-delivery-count").map(|n| n.saturating_add(1));
        let ours = header_u64(headers, DELIVERIES_HEADER).map(|n| n.saturating_add(1));
        let mut n = broker.unwrap_or(1).max(ours.unwrap_or(1));
        if redelivered && !quorum && broker.is_none() {
            // A classic queue only says "redelivered": count at least one more.
            n = n.max(ours.unwrap_or(1) + 1);
        }
        n.min(u64::from(u32::MAX)) as u32
    }

    /// Why a job in the dead-letter queue died.
    fn dead_reason(&self, props: &lapin::BasicProperties, deliveries: u32) -> String {
        let headers = props.headers().as_ref();
        if let Some(reason) = header_str(headers, REASON_HEADER) {
            return reason;
        }
        let death = headers
            .and_then(|h| h.inner().get("x-death"))
            .and_then(AMQPValue::as_array)
            .and_then(|a| a.as_slice().first())
            .and_then(AMQPValue::as_field_table);
        match death.and_then(|d| header_str(Some(d), "reason")).as_deref() {
            Some("delivery_limit") => format!(
                "delivered {} times without an acknowledgement",
                deliveries.max(self.options.max_deliveries)
            ),
            Some(other) => format!("dead-lettered by the broker ({other})"),
            None => "dead-lettered".to_string(),
        }
    }
}

fn header_u64(headers: Option<&FieldTable>, key: &str) -> Option<u64> {
    let v = headers?.inner().get(key)?;
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => i128::from(*n),
        AMQPValue::ShortShortUInt(n) => i128::from(*n),
        AMQPValue::ShortInt(n) => i128::from(*n),
        AMQPValue::ShortUInt(n) => i128::from(*n),
        AMQPValue::LongInt(n) => i128::from(*n),
        AMQPValue::LongUInt(n) => i128::from(*n),
        AMQPValue::LongLongInt(n) => i128::from(*n),
        AMQPValue::Timestamp(n) => i128::from(*n),
        _ => return None,
    };
    u64::try_from(n).ok()
}

fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The background task: keeps a healthy session installed and expires leases.
async fn supervise(shared: Weak<Shared>, stop: CancellationToken) {
    const TICK: Duration = Duration::from_millis(100);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(s) = shared.upgrade() else { return };
        let wake = s.wake.clone();
        if s.current().is_none() {
            if let Some(old) = s.session.send_replace(None) {
                tracing::warn!(queue = %s.queue, node = %s.node_name(s.node.load(Ordering::SeqCst)), "RabbitMQ connection lost; reconnecting");
                s.rotate();
                tokio::spawn(async move { old.close().await });
            }
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, Session::open(&s)).await;
            match opened {
                Ok(Ok(session)) => {
                    s.install(session);
                    tracing::info!(queue = %s.queue, "RabbitMQ connection re-established");
                    backoff = Duration::from_millis(100);
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "connection attempt timed out".to_string(),
                    };
                    tracing::debug!(queue = %s.queue, %error, ?backoff, "RabbitMQ reconnection failed");
                    let max = s.options.max_backoff;
                    drop(s);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            }
        }
        s.expire_leases().await;
        drop(s);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

#[async_trait]
impl JobQueue for AmqpQueue {
    async fn publish(&self, jobs: &[CrawlJob]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let s = &self.shared;
        let session = s.session_within(s.options.publish_timeout).await?;
        let bodies: Vec<Vec<u8>> = jobs.iter().map(CrawlJob::encode).collect();
        let published = session
            .publish_batch(&s.queue, &bodies, s.options.publish_timeout)
            .await;
        if published.is_err() && !session.healthy() {
            s.wake.notify_one();
        }
        published
    }

    async fn lease(&self, max: usize) -> Result<Vec<Delivery>> {
        let s = &self.shared;
        s.expire_leases().await;
        if max == 0 {
            return Ok(Vec::new());
        }
        s.consuming.store(true, Ordering::SeqCst);
        let session = s.session_within(s.options.lease_wait).await?;
        let mut raw = Vec::new();
        {
            let mut guard = session.consumer.lock().await;
            if guard.is_none() {
                match session.start_consumer(&s.queue, s.options.prefetch).await {
                    Ok(c) => *guard = Some(c),
                    Err(e) => {
                        s.report_broken(&session);
                        return Err(e);
                    }
                }
            }
            let consuming = guard.as_mut().expect("started above");
            if let Err(e) = consuming.movers.revive(session.connection()).await {
                tracing::debug!(error = %e, "could not restart a delay mover");
                s.report_broken(&session);
            }
            let mut broken: Option<EngineError> = None;
            match tokio::time::timeout(s.options.lease_wait, consuming.consumer.next()).await {
                Err(_) => {}
                Ok(Some(Ok(d))) => raw.push(d),
                Ok(Some(Err(e))) => broken = Some(e.into()),
                Ok(None) => {
                    broken = Some(EngineError::Unavailable(
                        "the broker cancelled the consumer".into(),
                    ))
                }
            }
            while broken.is_none() && !raw.is_empty() && raw.len() < max {
                match consuming.consumer.next().now_or_never() {
                    None => break,
                    Some(Some(Ok(d))) => raw.push(d),
                    Some(Some(Err(e))) => broken = Some(e.into()),
                    Some(None) => {
                        broken = Some(EngineError::Unavailable(
                            "the broker cancelled the consumer".into(),
                        ))
                    }
                }
            }
            if let Some(e) = broken {
                *guard = None;
                s.report_broken(&session);
                if raw.is_empty() {
                    return Err(e);
                }
                // Deliveries received before the failure are stale; the broker has them back.
                return Ok(Vec::new());
            }
        }
        let mut out = Vec::with_capacity(raw.len());
        for d in raw {
            let deliveries = s.deliveries(&d.properties, d.redelivered, session.quorum);
            let job = CrawlJob::decode(&d.data).map_err(|e| e.to_string());
            if deliveries > s.options.max_deliveries {
                // Only without a broker-side delivery limit (classic queues): dead-letter here.
                let held = Held {
                    generation: session.generation,
                    acker: d.acker,
                    deadline: None,
                    body: d.data,
                    deliveries: deliveries - 1,
                    dead: false,
                };
                let reason = format!(
                    "delivered {} times without an acknowledgement",
                    deliveries - 1
                );
                if let Err(e) = s.send_to_dead(&session, &held, &reason).await {
                    tracing::warn!(error = %e, "could not dead-letter a job; it will come back");
                    let _ = held
                        .acker
                        .reject(BasicRejectOptions { requeue: true })
                        .await;
                }
                continue;
            }
            let tag = s.hold(&session, d.acker, &d.data, deliveries, false);
            out.push(Delivery {
                tag,
                job,
                deliveries,
            });
        }
        Ok(out)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        settle(&self.shared, tags).await
    }

    async fn retry(&self, tag: DeliveryTag, after: Duration) -> Result<()> {
        let Some(h) = self.shared.held().remove(&tag.0) else {
            return Ok(()); // stale or settled already
        };
        if after.is_zero() {
            return self.shared.give_back(&h).await;
        }
        // The job stays unacknowledged (safe on the broker) until its delay is over.
        let shared = self.shared.clone();
        let delayed = self.shared.delayed.clone();
        delayed.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Err(e) = shared.give_back(&h).await {
                tracing::warn!(error = %e, "could not give back a retried job; the broker will redeliver it when the channel closes");
            }
            delayed.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }

    async fn defer(&self, tag: DeliveryTag, after: Duration) -> Result<()> {
        let s = &self.shared;
        let Some(h) = s.held().remove(&tag.0) else {
            return Ok(()); // stale or settled already
        };
        if let Err(e) = s.defer_held(&h, after).await {
            // Still leased: the caller may try again, or the lease runs out.
            s.held().insert(tag.0, h);
            s.wake.notify_one();
            return Err(e);
        }
        Ok(())
    }

    async fn dead_letter(&self, tag: DeliveryTag, reason: &str) -> Result<()> {
        let s = &self.shared;
        let Some(h) = s.held().remove(&tag.0) else {
            return Ok(()); // stale: the broker delivers it again, and it can be refused again
        };
        let sent = match s.current() {
            Some(session) if session.generation == h.generation => {
                s.send_to_dead(&session, &h, reason).await
            }
            Some(_) => return Ok(()),
            None => Err(EngineError::Unavailable("not connected to RabbitMQ".into())),
        };
        if let Err(e) = sent {
            // Still leased: the caller may try again, or the lease runs out.
            s.held().insert(tag.0, h);
            s.wake.notify_one();
            return Err(e);
        }
        Ok(())
    }

    async fn lease_dead(&self, max: usize) -> Result<Vec<(Delivery, String)>> {
        let s = &self.shared;
        if max == 0 {
            return Ok(Vec::new());
        }
        let session = s.session_within(s.options.lease_wait).await?;
        let mut out = Vec::new();
        let channel = session.dead.lock().await;
        while out.len() < max {
            let got = channel
                .basic_get(&s.dead_queue, BasicGetOptions { no_ack: false })
                .await;
            let msg = match got {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(e) => {
                    drop(channel);
                    s.report_broken(&session);
                    return if out.is_empty() {
                        Err(e.into())
                    } else {
                        Ok(Vec::new())
                    };
                }
            };
            let d = msg.delivery;
            let deliveries = header_u64(d.properties.headers().as_ref(), DELIVERIES_HEADER)
                .or_else(|| header_u64(d.properties.headers().as_ref(), "x-delivery-count"))
                .map(|n| n.min(u64::from(u32::MAX)) as u32)
                .unwrap_or(s.options.max_deliveries);
            let reason = s.dead_reason(&d.properties, deliveries);
            let job = CrawlJob::decode(&d.data).map_err(|e| e.to_string());
            let tag = s.hold(&session, d.acker, &d.data, deliveries, true);
            out.push((
                Delivery {
                    tag,
                    job,
                    deliveries,
                },
                reason,
            ));
        }
        Ok(out)
    }

    async fn ack_dead(&self, tags: &[DeliveryTag]) -> Result<()> {
        settle(&self.shared, tags).await
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let s = &self.shared;
        let session = s.session_within(s.options.lease_wait).await?;
        let (ready, dead) = match session.message_counts(&s.queue, &s.dead_queue).await {
            Ok(counts) => counts,
            Err(e) => {
                s.wake.notify_one();
                return Err(e);
            }
        };
        let leased =
            s.held().values().filter(|h| !h.dead).count() as u64 + s.delayed.load(Ordering::SeqCst);
        Ok(QueueDepth {
            ready,
            leased,
            dead,
        })
    }
}

/// Acknowledge deliveries by the tags handed out; unknown and stale tags are no-ops.
async fn settle(shared: &Shared, tags: &[DeliveryTag]) -> Result<()> {
    let held: Vec<Held> = {
        let mut map = shared.held();
        tags.iter().filter_map(|t| map.remove(&t.0)).collect()
    };
    let mut failed = 0;
    for h in held {
        // An acker whose channel closed does nothing (and says so): the broker redelivers.
        if let Err(e) = h.acker.ack(BasicAckOptions::default()).await {
            tracing::debug!(error = %e, "ack failed");
            failed += 1;
        }
    }
    if failed > 0 {
        shared.wake.notify_one();
        return Err(EngineError::Unavailable(format!(
            "{failed} acknowledgement(s) could not be sent; those jobs will be delivered again"
        )));
    }
    Ok(())
}

/// `host:port` of node `index` of `uris`, for messages.
fn node_name(uris: &[AMQPUri], index: usize) -> String {
    let uri = &uris[index % uris.len()];
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

/// Connect to node `start` of `uris`, else to the others in turn: the index of the node that
/// answered and its connection.
async fn connect_first(
    uris: &[AMQPUri],
    start: usize,
    properties: lapin::ConnectionProperties,
) -> Result<(usize, lapin::Connection)> {
    let count = uris.len();
    let mut errors = Vec::new();
    for step in 0..count {
        let index = (start + step) % count;
        // A broker may accept the TCP connection and never answer the AMQP handshake (seen: a
        // node out of file handles); without a bound the caller would wait for it forever.
        let connect = lapin::Connection::connect_uri(uris[index].clone(), properties.clone());
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(connected) => connected.map_err(EngineError::from),
            Err(_) => Err(EngineError::Unavailable(format!(
                "RabbitMQ at {} did not complete the AMQP handshake within {CONNECT_TIMEOUT:?}",
                node_name(uris, index)
            ))),
        };
        match connected {
            Ok(conn) => return Ok((index, conn)),
            Err(e) if count == 1 => return Err(e),
            Err(e) => errors.push(format!("{}: {e}", node_name(uris, index))),
        }
    }
    Err(EngineError::Unavailable(format!(
        "no RabbitMQ node answered ({})",
        errors.join("; ")
    )))
}

/// The dead-letter queue of `queue_name`.
fn dead_queue_name(queue_name: &str) -> String {
    format!("{queue_name}.dead")
}

/// The names of every queue an [`AmqpQueue`] named `queue_name` declares: the queue, its
/// dead-letter queue and its delay queues.
fn queue_names(queue_name: &str) -> Vec<String> {
    [queue_name.to_string(), dead_queue_name(queue_name)]
        .into_iter()
        .chain(
            WAIT_BUCKETS_MS
                .iter()
                .map(|&ms| delay::delay_queue_name(queue_name, ms)),
        )
        .collect()
}

/// Delete the queue `queue_name` on the broker at `url` with its dead-letter and delay queues,
/// and every job in them; a queue that does not exist is skipped. For an organism that is gone
/// for good (a test's, a benchmark run's): a quorum queue holds file handles on the broker until
/// it is deleted, and a broker out of them stops accepting connections.
pub async fn delete_queues(url: &str, queue_name: &str) -> Result<()> {
    let uris = session::parse_uris(url)?;
    let properties = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current())
        .with_connection_name(format!("homeostat delete {queue_name}").into());
    let (_, conn) = connect_first(&uris, 0, properties).await?;
    for name in queue_names(queue_name) {
        // A failed delete closes its channel: one channel each.
        let channel = conn.create_channel().await?;
        channel
            .queue_delete(&name, QueueDeleteOptions::default())
            .await?;
        let _ = channel.close(200, "deleted").await;
    }
    let _ = conn.close(200, "queues deleted").await;
    Ok(())
}
