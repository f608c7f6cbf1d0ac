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
/// Connection timeout asked for when the URL names none, in milliseconds.
const CONNECTION_TIMEOUT_MS: u64 = 5_000;

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
    publisher: Channel,
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

/// A wait queue unused for this long is deleted by the broker (its messages have long gone back:
/// the longest wait is 5 minutes). It is declared again before use after [`WAIT_REDECLARE`].
const WAIT_EXPIRES_MS: i64 = 60 * 60 * 1000;
const WAIT_REDECLARE: Duration = Duration::from_secs(600);

pub(super) struct Consuming {
    channel: Channel,
    pub(super) consumer: Consumer,
}

impl Consuming {
    /// Close the consumer's channel: the broker takes back every job it delivered on it.
    pub(super) async fn close(self) -> Result<()> {
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
        let conn = Connection::connect_uri(shared.uri.clone(), properties).await?;
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
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let dead = conn.create_channel().await?;
        let mut session = Session {
            generation: 0,
            conn,
            publisher,
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

    pub(super) fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    pub(super) fn healthy(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
            && self.conn.status().connected()
            && self.publisher.status().connected()
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
        Ok(Consuming { channel, consumer })
    }

    /// Publish one message (persistent, mandatory) and wait for the broker's confirm.
    pub(super) async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> Result<()> {
        let _one_batch = self.publish_lock.lock().await;
        let confirm = self
            .publisher
            .basic_publish("", routing_key, mandatory(), body, properties(headers))
            .await?;
        check_confirms(routing_key, 1, vec![confirm.await?])
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
                self.publisher
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
        check_confirms(routing_key, bodies.len(), confirmed)
    }

    /// The wait queue of `queue` for a delay of `ms`, declared if this connection has not done
    /// so lately: a classic durable queue whose messages go back to `queue` after `ms`.
    pub(super) async fn wait_queue(&self, queue: &str, ms: u64) -> Result<String> {
        let name = format!("{queue}.wait.{ms}");
        let fresh = {
            let waits = self.waits.lock().unwrap_or_else(|e| e.into_inner());
            waits
                .get(&ms)
                .is_some_and(|at| at.elapsed() < WAIT_REDECLARE)
        };
        if fresh {
            return Ok(name);
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
        args.insert("x-expires".into(), AMQPValue::LongLongInt(WAIT_EXPIRES_MS));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        // A quorum queue with at-least-once dead-lettering: a classic queue dead-letters at most
        // once, so a copy whose wait ended while the job queue had no leader yet (just after a
        // broker restart) was dropped, and its URL stayed in flight for good.
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        // A refused declare closes its channel: use a throwaway one.
        let channel = self.conn.create_channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel.queue_declare(&name, durable, args).await?;
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

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        immediate: false,
    }
}

fn properties(headers: FieldTable) -> BasicProperties {
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
