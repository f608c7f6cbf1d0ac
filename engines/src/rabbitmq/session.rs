//! One AMQP connection and its channels: a confirm-mode channel for publishing, a channel for
//! the dead-letter queue, and (once `lease` is called) a consumer's channel.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::Mutex;

use super::Shared;
use crate::{EngineError, Result};

/// Heartbeat asked for when the URL names none, so a silently dead broker is noticed in seconds.
const HEARTBEAT_SECS: u16 = 10;
/// Attempts at a single message RabbitMQ refuses, and the pause after the first refusal
/// (tripled after each): 0.1 + 0.3 + 0.9 s in all.
const REFUSED_ATTEMPTS: u32 = 4;
const REFUSED_BACKOFF: Duration = Duration::from_millis(100);

/// Connection timeout asked for when the URL names none, in milliseconds.
const CONNECTION_TIMEOUT_MS: u64 = 5_000;

/// Parse one `amqp://` URL or a comma-separated list of them (the nodes of one RabbitMQ
/// cluster, tried in turn), adding a heartbeat and a connection timeout where none is named.
pub(super) fn parse_uris(urls: &str) -> Result<Vec<AMQPUri>> {
    let uris = urls
        .split(',')
        .map(str::trim)
        .map(|url| {
            if url.is_empty() {
                Err(EngineError::Config(
                    "bad AMQP URL list: an empty entry between commas".into(),
                ))
            } else {
                parse_uri(url)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(uris)
}

/// Parse an `amqp://` URL, adding a heartbeat and a connection timeout when it has none.
pub(super) fn parse_uri(url: &str) -> Result<AMQPUri> {
    let mut uri =
        AMQPUri::from_str(url).map_err(|e| EngineError::Config(format!("bad AMQP URL: {e}")))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECS);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(CONNECTION_TIMEOUT_MS);
    }
    Ok(uri)
}

pub(super) struct Session {
    pub(super) generation: u64,
    conn: Connection,
    /// The confirm-mode channel jobs are published on; replaced after a refusal (see
    /// [`Session::renew_publisher`]).
    publisher: std::sync::Mutex<Channel>,
    /// One publish batch at a time, so a returned (unroutable) message is attributed to its batch.
    publish_lock: Mutex<()>,
    /// For `basic.get` on the dead-letter queue.
    pub(super) dead: Mutex<Channel>,
    dead_status: Channel,
    pub(super) consumer: Mutex<Option<Consuming>>,
    /// The queues are quorum queues (the broker counts deliveries and dead-letters).
    pub(super) quorum: bool,
    broken: AtomicBool,
    /// Wait queues declared on this connection, by delay, and when.
    waits: std::sync::Mutex<HashMap<u64, Instant>>,
}

/// A channel in confirm mode.
async fn confirm_channel(conn: &Connection) -> Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// A delay queue is declared again before use after this long (the broker deletes one unused
/// for an hour).
const WAIT_REDECLARE: Duration = Duration::from_secs(600);

pub(super) struct Consuming {
    channel: Channel,
    pub(super) consumer: Consumer,
    /// Delayed jobs are moved back by the cells that consume.
    pub(super) movers: super::delay::Movers,
}

impl Consuming {
    /// Close the consumer's channel: the broker takes back every job it delivered on it (and
    /// every delayed job the movers held).
    pub(super) async fn close(self) -> Result<()> {
        self.movers.close();
        if self.channel.status().connected() {
            self.channel.close(200, "leases abandoned").await?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum QueueKind {
    /// Quorum queues with at-least-once dead-lettering (RabbitMQ 3.10+).
    QuorumAtLeastOnce,
    /// Quorum queues with the default (at-most-once) dead-lettering.
    Quorum,
    Classic,
}

impl Session {
    pub(super) async fn open(shared: &Shared) -> Result<Session> {
        let properties = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current())
            .with_connection_name(format!("homeostat {}", shared.queue).into());
        let conn = shared.connect_any(properties).await?;
        let mut events = conn.events_listener();
        let wake = shared.wake.clone();
        let queue = shared.queue.clone();
        tokio::spawn(async move {
            // Ends when the connection is dropped.
            while let Some(event) = events.next().await {
                match event {
                    lapin::Event::Error(e) => {
                        tracing::debug!(error = %e, %queue, "AMQP connection error");
                        wake.notify_one();
                    }
                    lapin::Event::ConnectionBlocked(reason) => {
                        tracing::warn!(%reason, %queue, "RabbitMQ blocked publishing");
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(%queue, "RabbitMQ unblocked publishing");
                    }
                    _ => {}
                }
            }
        });
        let quorum = declare(&conn, shared).await?;
        let publisher = confirm_channel(&conn).await?;
        let dead = conn.create_channel().await?;
        let mut session = Session {
            generation: 0,
            conn,
            publisher: std::sync::Mutex::new(publisher),
            publish_lock: Mutex::new(()),
            dead_status: dead.clone(),
            dead: Mutex::new(dead),
            consumer: Mutex::new(None),
            quorum,
            broken: AtomicBool::new(false),
            waits: std::sync::Mutex::new(HashMap::new()),
        };
        if shared.consuming.load(Ordering::SeqCst) {
            let consuming = session
                .start_consumer(&shared.queue, shared.options.prefetch)
                .await?;
            session.consumer = Mutex::new(Some(consuming));
        }
        Ok(session)
    }

    pub(super) fn connection(&self) -> &Connection {
        &self.conn
    }

    fn publisher(&self) -> Channel {
        self.publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publish on a new channel from now on. A quorum queue that refused a channel's message
    /// (it could not reach its leader) may go on refusing that channel after the leader is back
    /// (RabbitMQ 3.10 after a node loss: every later publish refused); a new channel registers
    /// with the queue afresh. Called with the publish lock held.
    async fn renew_publisher(&self) {
        match confirm_channel(&self.conn).await {
            Ok(fresh) => {
                let old = std::mem::replace(
                    &mut *self.publisher.lock().unwrap_or_else(|e| e.into_inner()),
                    fresh,
                );
                tokio::spawn(async move {
                    let _ = old.close(200, "renewed after a refusal").await;
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not open a new publishing channel");
                self.mark_broken();
            }
        }
    }

    pub(super) fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    pub(super) fn healthy(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
            && self.conn.status().connected()
            && self.publisher().status().connected()
            && self.dead_status.status().connected()
    }

    pub(super) fn mark_broken(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    pub(super) async fn close(&self) {
        if self.conn.status().connected() {
            let _ = self.conn.close(200, "closing").await;
        }
    }

    pub(super) async fn start_consumer(&self, queue: &str, prefetch: u16) -> Result<Consuming> {
        let channel = self.conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let movers = match super::delay::Movers::start(&self.conn, queue, self.quorum).await {
            Ok(m) => m,
            Err(e) => {
                let _ = channel.close(200, "movers failed").await;
                return Err(e);
            }
        };
        Ok(Consuming {
            channel,
            consumer,
            movers,
        })
    }

    /// Publish one message (persistent, mandatory) and wait for the broker's confirm. A refusal
    /// (a nack) is tried again a few times first: a quorum queue refuses while it cannot reach
    /// its leader (just declared, or re-electing after a node loss), and that passes.
    pub(super) async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<()> {
        let _one_batch = self.publish_lock.lock().await;
        let mut backoff = REFUSED_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let confirm = self
                .publisher()
                .basic_publish(
                    "",
                    routing_key,
                    mandatory(),
                    body,
                    properties(headers.clone()),
                )
                .await?
                .await?;
            if !matches!(confirm, Confirmation::Nack(_)) || attempt >= REFUSED_ATTEMPTS {
                return check_confirms(routing_key, 1, vec![confirm]);
            }
            tracing::debug!(queue = %routing_key, attempt, "RabbitMQ refused a message; trying again");
            tokio::time::sleep(backoff).await;
            self.renew_publisher().await;
            backoff *= 3;
        }
    }

    /// Publish messages (persistent, mandatory) and wait up to `timeout` for every confirm.
    pub(super) async fn publish_batch(
        &self,
        routing_key: &str,
        bodies: &[Vec<u8>],
        timeout: Duration,
    ) -> Result<()> {
        let _one_batch = self.publish_lock.lock().await;
        let mut pending = Vec::with_capacity(bodies.len());
        for body in bodies {
            pending.push(
                self.publisher()
                    .basic_publish(
                        "",
                        routing_key,
                        mandatory(),
                        body,
                        properties(FieldTable::default()),
                    )
                    .await?,
            );
        }
        let confirmed = tokio::time::timeout(timeout, async {
            let mut out = Vec::with_capacity(pending.len());
            for confirm in pending {
                out.push(confirm.await?);
            }
            Ok::<_, lapin::Error>(out)
        })
        .await
        .map_err(|_| {
            EngineError::Unavailable(format!(
                "RabbitMQ did not confirm {} job(s) within {timeout:?}",
                bodies.len()
            ))
        })??;
        if confirmed.iter().any(|c| matches!(c, Confirmation::Nack(_))) {
            self.renew_publisher().await;
        }
        check_confirms(routing_key, bodies.len(), confirmed)
    }

    /// The delay queue of `queue` for bucket `ms` (see [`super::delay`]), declared if this
    /// connection has not done so lately.
    pub(super) async fn delay_queue(&self, queue: &str, ms: u64) -> Result<String> {
        let name = super::delay::delay_queue_name(queue, ms);
        let fresh = {
            let waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
            waits
                .get(&ms)
                .is_some_and(|at| at.elapsed() < WAIT_REDECLARE)
        };
        if fresh {
            return Ok(name);
        }
        // A refused declare closes its channel: use a throwaway one.
        let channel = self.conn.create_channel().await?;
        super::delay::declare(&channel, queue, ms, self.quorum).await?;
        let _ = channel.close(200, "declared").await;
        self.waits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ms, Instant::now());
        Ok(name)
    }

    /// Ready messages in the job queue and in its dead-letter queue.
    pub(super) async fn message_counts(&self, queue: &str, dead: &str) -> Result<(u64, u64)> {
        // A passive declare of a missing queue closes its channel: use a throwaway one.
        let channel = self.conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let main = channel
            .queue_declare(queue, passive, FieldTable::default())
            .await?;
        let dead = channel
            .queue_declare(dead, passive, FieldTable::default())
            .await?;
        let _ = channel.close(200, "counted").await;
        Ok((
            u64::from(main.message_count()),
            u64::from(dead.message_count()),
        ))
    }
}

pub(super) fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        immediate: false,
    }
}

pub(super) fn properties(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2) // persistent
        .with_content_type("application/json".into())
        .with_headers(headers)
}

fn check_confirms(routing_key: &str, sent: usize, confirms: Vec<Confirmation>) -> Result<()> {
    let mut unroutable = 0;
    let mut refused = 0;
    for c in confirms {
        match c {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(_)) => unroutable += 1,
            Confirmation::Nack(_) => refused += 1,
        }
    }
    if unroutable > 0 {
        return Err(EngineError::Queue(format!(
            "{unroutable} of {sent} message(s) were returned unroutable: \
             no queue named {routing_key:?} exists"
        )));
    }
    if refused > 0 {
        return Err(EngineError::Queue(format!(
            "RabbitMQ refused {refused} of {sent} message(s) for queue {routing_key:?}"
        )));
    }
    Ok(())
}

/// Declare the dead-letter queue and the job queue; true when they are quorum queues.
async fn declare(conn: &Connection, shared: &Shared) -> Result<bool> {
    let kinds: &[QueueKind] = if shared.options.quorum {
        &[
            QueueKind::QuorumAtLeastOnce,
            QueueKind::Quorum,
            QueueKind::Classic,
        ]
    } else {
        &[QueueKind::Classic]
    };
    let mut last_error = None;
    for &kind in kinds {
        // A refused declare closes its channel: one channel per attempt.
        let channel = conn.create_channel().await?;
        match declare_kind(&channel, shared, kind).await {
            Ok(()) => {
                let _ = channel.close(200, "declared").await;
                if kind == QueueKind::Classic && shared.options.quorum {
                    tracing::warn!(
                        queue = %shared.queue,
                        "RabbitMQ refused quorum queues; using classic durable queues"
                    );
                }
                return Ok(kind != QueueKind::Classic);
            }
            Err(e) => {
                tracing::debug!(queue = %shared.queue, ?kind, error = %e, "queue declaration refused");
                last_error = Some(e);
            }
        }
    }
    // The queues exist with other arguments (declared by another version or by hand): use them
    // as they are, counting deliveries and dead-lettering here.
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let existing = async {
        channel
            .queue_declare(&shared.dead_queue, passive, FieldTable::default())
            .await?;
        channel
            .queue_declare(&shared.queue, passive, FieldTable::default())
            .await
    };
    match existing.await {
        Ok(_) => {
            tracing::warn!(
                queue = %shared.queue,
                error = ?last_error,
                "queues exist with other arguments; using them as they are"
            );
            let _ = channel.close(200, "declared").await;
            Ok(false)
        }
        Err(e) => Err(last_error.map(EngineError::from).unwrap_or(e.into())),
    }
}

async fn declare_kind(channel: &Channel, shared: &Shared, kind: QueueKind) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut dead_args = FieldTable::default();
    let mut args = FieldTable::default();
    if kind != QueueKind::Classic {
        dead_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        // The broker dead-letters a message returned more than this many times: with
        // max_deliveries - 1 returns it was delivered max_deliveries times.
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(shared.options.max_deliveries.saturating_sub(1))),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(shared.dead_queue.as_str().into()),
        );
        if kind == QueueKind::QuorumAtLeastOnce {
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
    }
    channel
        .queue_declare(&shared.dead_queue, durable, dead_args)
        .await?;
    channel.queue_declare(&shared.queue, durable, args).await?;
    Ok(())
}
