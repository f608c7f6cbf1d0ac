//! Delayed jobs without broker-side expiry: a deferred job waits in a delay queue
//! `<name>.delay.<ms>` (durable; a quorum queue where the broker has them) carrying the time it is
//! due, and the consuming cells move it back to the job queue once that time has come.
//!
//! Why not a per-queue message TTL dead-lettering back to the job queue (what this replaced):
//! a classic wait queue dead-letters at most once, so a copy whose wait ended while the job
//! queue had no leader (just after a broker restart) was dropped; and a quorum wait queue with
//! at-least-once dead-lettering stopped forwarding after its leader moved to another node
//! (RabbitMQ 3.10: every expired job stayed in the wait queue, unready, for good). Moving the
//! jobs ourselves uses only what survives a node loss: consumers, publisher confirms and
//! acknowledgements.
//!
//! Every consuming queue runs one mover per delay bucket, on its own channel: it consumes the
//! bucket's queue (a few hundred unacknowledged at most), waits until the head is due, publishes
//! every due job to the job queue with confirms, then acknowledges them. A mover that dies (its
//! cell, its connection) leaves its unacknowledged jobs to the broker, which hands them to
//! another mover: a job can be moved twice, never lost. A bucket holds one delay, so its jobs
//! fall due in the order they arrive.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::task::JoinHandle;

use super::session::{mandatory, properties};
use super::WAIT_BUCKETS_MS;
use crate::sqlite::now_ms;
use crate::Result;

/// Header of a delayed job: when it is due, in milliseconds since the Unix epoch.
pub(super) const DUE_HEADER: &str = "x-homeostat-due-ms";

/// Jobs of one bucket a mover holds unacknowledged at once.
const MOVER_PREFETCH: u16 = 256;

/// A delay queue unused (no consumer, not declared) for this long is deleted by the broker.
const DELAY_EXPIRES_MS: i64 = 60 * 60 * 1000;

/// After a failed move (a refused or unroutable publish), wait this long before trying again.
const MOVE_RETRY: Duration = Duration::from_secs(1);

/// The delay queue of `queue` for bucket `ms`.
pub(super) fn delay_queue_name(queue: &str, ms: u64) -> String {
    format!("{queue}.delay.{ms}")
}

/// Declare the delay queue of `queue` for bucket `ms` on `channel`.
pub(super) async fn declare(channel: &Channel, queue: &str, ms: u64, quorum: bool) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(DELAY_EXPIRES_MS));
    if quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(&delay_queue_name(queue, ms), durable, args)
        .await?;
    Ok(())
}

/// The movers of one consuming session, one per bucket.
pub(super) struct Movers {
    queue: String,
    quorum: bool,
    /// Each bucket's mover; a finished one is started again by [`Movers::revive`].
    tasks: Vec<(u64, JoinHandle<()>)>,
}

impl Movers {
    /// Declare every bucket's delay queue and start moving their due jobs to `queue`.
    pub(super) async fn start(conn: &Connection, queue: &str, quorum: bool) -> Result<Movers> {
        let mut movers = Movers {
            queue: queue.to_string(),
            quorum,
            tasks: Vec::new(),
        };
        for ms in WAIT_BUCKETS_MS {
            match start_one(conn, queue, ms, quorum).await {
                Ok(task) => movers.tasks.push((ms, task)),
                Err(e) => {
                    movers.close();
                    return Err(e);
                }
            }
        }
        Ok(movers)
    }

    /// Start again the movers that stopped (after a refusal: on a new channel).
    pub(super) async fn revive(&mut self, conn: &Connection) -> Result<()> {
        for (ms, task) in &mut self.tasks {
            if task.is_finished() {
                *task = start_one(conn, &self.queue, *ms, self.quorum).await?;
            }
        }
        Ok(())
    }

    /// Stop moving. Each mover's channel closes when its task is dropped, which gives every
    /// job it held back to its delay queue.
    pub(super) fn close(&self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Movers {
    fn drop(&mut self) {
        self.close();
    }
}

/// Open a channel for bucket `ms`, declare its delay queue, consume it and move its jobs.
async fn start_one(
    conn: &Connection,
    queue: &str,
    ms: u64,
    quorum: bool,
) -> Result<JoinHandle<()>> {
    let channel = conn.create_channel().await?;
    declare(&channel, queue, ms, quorum).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .basic_qos(MOVER_PREFETCH, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            &delay_queue_name(queue, ms),
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(run(channel, consumer, queue.to_string(), ms)))
}

/// When a delayed job is due (ms since the epoch), read from its header; a job without one (or
/// with a time further ahead than its bucket allows, from a skewed clock) is due at once or
/// after one bucket.
fn due_ms(delivery: &Delivery, bucket_ms: u64, now: u64) -> u64 {
    let due = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| super::header_u64(Some(h), DUE_HEADER))
        .unwrap_or(now);
    due.min(now.saturating_add(bucket_ms))
}

/// [`now_ms`] as the unsigned figure due times are compared with.
fn now() -> u64 {
    now_ms().max(0).unsigned_abs()
}

/// Move one bucket's due jobs to `queue` until the channel ends or a move is refused. The
/// channel closes when this returns (its last handle is dropped).
async fn run(channel: Channel, mut consumer: lapin::Consumer, queue: String, bucket_ms: u64) {
    let mut next: Option<Delivery> = None;
    loop {
        let first = match next.take() {
            Some(d) => d,
            None => match consumer.next().await {
                Some(Ok(d)) => d,
                // The channel or connection ended: the broker has the held jobs back.
                _ => return,
            },
        };
        let start = now();
        let wait = due_ms(&first, bucket_ms, start).saturating_sub(start);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        // Every job already here and due goes in the same batch.
        let mut batch = vec![first];
        let at = now();
        while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
            if due_ms(&d, bucket_ms, at) <= at {
                batch.push(d);
            } else {
                next = Some(d);
                break;
            }
        }
        match move_batch(&channel, &queue, &batch).await {
            Ok(true) => {}
            Ok(false) => {
                // A quorum queue can go on refusing a channel it refused once (RabbitMQ 3.10
                // after a node loss): this channel ends (its jobs go back to the delay queue)
                // and the next lease starts the mover again on a new one.
                tracing::warn!(%queue, bucket_ms, jobs = batch.len(), "the job queue refused delayed jobs; moving them again shortly");
                tokio::time::sleep(MOVE_RETRY).await;
                return;
            }
            Err(e) => {
                tracing::debug!(%queue, bucket_ms, error = %e, "a delay mover stopped");
                return;
            }
        }
    }
}

/// Publish `batch` to `queue` with confirms, then acknowledge it. `Ok(false)`: some copy was
/// refused or unroutable, nothing acknowledged (the batch is tried again; copies that did
/// arrive arrive twice, which the crawl tolerates).
async fn move_batch(channel: &Channel, queue: &str, batch: &[Delivery]) -> Result<bool> {
    let mut confirms = Vec::with_capacity(batch.len());
    for d in batch {
        // Only the deliveries so far travel on: the broker's own headers (a redelivery's
        // x-delivery-count from the delay queue) would be read as the job queue's.
        let mut headers = FieldTable::default();
        if let Some(n) = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| super::header_u64(Some(h), super::DELIVERIES_HEADER))
        {
            headers.insert(
                super::DELIVERIES_HEADER.into(),
                AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            );
        }
        confirms.push(
            channel
                .basic_publish("", queue, mandatory(), &d.data, properties(headers))
                .await?,
        );
    }
    let mut all = true;
    for c in confirms {
        if !matches!(c.await?, Confirmation::Ack(None)) {
            all = false;
        }
    }
    if !all {
        return Ok(false);
    }
    for d in batch {
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(true)
}
