//! The embedded durable job queue, stored in SQLite.
//!
//! A lease moves a job's `visible_ms` into the future and counts the delivery; an ack deletes it;
//! a lease that runs out makes the job deliverable again (at-least-once). A job delivered
//! `max_deliveries` times without an ack is moved to the dead-letter table at the next lease.
//! `defer` hands a job back and takes back the delivery its lease counted.

use std::time::Duration;

use async_trait::async_trait;
use protocol::CrawlJob;
use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use super::{json_keys, now_ms, open_pool, WriteTx};
use crate::{Delivery, DeliveryTag, JobQueue, QueueDepth, Result};

static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    crate::accepting_newer(sqlx::migrate!("./migrations/sqlite_queue"))
});

pub struct SqliteQueue {
    pool: SqlitePool,
    gate: super::WriteGate,
    lease: Duration,
    max_deliveries: u32,
}

impl SqliteQueue {
    /// Open or create the queue at a path or `sqlite:` URL. `lease` is how long a delivered job
    /// stays invisible before it is delivered again; `max_deliveries` when it is dead-lettered.
    pub async fn open(url_or_path: &str, lease: Duration, max_deliveries: u32) -> Result<Self> {
        let pool = open_pool(url_or_path, 4).await?;
        crate::migrate_with_retries("queue", &MIGRATOR, &pool).await?;
        Ok(Self {
            pool,
            gate: super::write_gate(url_or_path)?,
            lease,
            max_deliveries: max_deliveries.max(1),
        })
    }
}

fn delivery(id: i64, body: &[u8], deliveries: i64) -> Delivery {
    Delivery {
        tag: DeliveryTag(id as u64),
        job: CrawlJob::decode(body).map_err(|e| e.to_string()),
        deliveries: deliveries as u32,
    }
}

/// Delivery tags as one JSON array of ids.
fn tag_array(tags: &[DeliveryTag]) -> String {
    json_keys(&tags.iter().map(|t| t.0 as i64).collect::<Vec<_>>())
}

#[async_trait]
impl JobQueue for SqliteQueue {
    async fn publish(&self, jobs: &[CrawlJob]) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        // One statement for the batch: each job's JSON as one string of a JSON array, stored
        // as the bytes it is.
        let bodies: Vec<String> = jobs
            .iter()
            .map(|job| String::from_utf8(job.encode()).expect("JSON is UTF-8"))
            .collect();
        let mut tx = WriteTx::begin(&self.pool, &self.gate).await?;
        sqlx::query(
            "INSERT INTO jobs (body, visible_ms) SELECT CAST(value AS BLOB), ? FROM json_each(?)",
        )
        .bind(now)
        .bind(json_keys(&bodies))
        .execute(&mut **tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn lease(&self, max: usize) -> Result<Vec<Delivery>> {
        let now = now_ms();
        // A read first (no writer's turn, no write lock): an idle crawler polls an empty queue
        // several times a second, and each poll taking the writer's turn made the publisher's
        // and the acknowledgements' writes wait behind it. Every job the write below could
        // touch (due, poison or not) is due.
        let due: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM jobs WHERE visible_ms <= ?)")
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
        if !due {
            return Ok(Vec::new());
        }
        let mut tx = WriteTx::begin(&self.pool, &self.gate).await?;
        // Jobs whose last allowed delivery expired unacknowledged are poison: dead-letter them.
        let limit = i64::from(self.max_deliveries);
        sqlx::query(
            "INSERT INTO dead (id, body, deliveries, reason) \
             SELECT id, body, deliveries, 'delivered ' || deliveries || ' times without an acknowledgement' \
             FROM jobs WHERE +visible_ms <= ? AND deliveries >= ?",
        )
        .bind(now)
        .bind(limit)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM jobs WHERE +visible_ms <= ? AND deliveries >= ?")
            .bind(now)
            .bind(limit)
            .execute(&mut **tx)
            .await?;
        let rows = sqlx::query(
            "UPDATE jobs SET deliveries = deliveries + 1, visible_ms = ?, leased = 1 \
             WHERE id IN (SELECT id FROM jobs WHERE visible_ms <= ? ORDER BY visible_ms, id LIMIT ?) \
             RETURNING id, body, deliveries",
        )
        .bind(now + self.lease.as_millis() as i64)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&mut **tx)
        .await?;
        tx.commit().await?;
        let mut out: Vec<Delivery> = rows
            .iter()
            .map(|r| delivery(r.get(0), &r.get::<Vec<u8>, _>(1), r.get(2)))
            .collect();
        out.sort_by_key(|d| d.tag.0);
        Ok(out)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let _gate = self.gate.enter().await?;
        sqlx::query("DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?))")
            .bind(tag_array(tags))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn retry(&self, tag: DeliveryTag, after: Duration) -> Result<()> {
        let _gate = self.gate.enter().await?;
        sqlx::query("UPDATE jobs SET visible_ms = ?, leased = 0 WHERE id = ?")
            .bind(now_ms() + after.as_millis() as i64)
            .bind(tag.0 as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn defer(&self, tag: DeliveryTag, after: Duration) -> Result<()> {
        // The lease counted this delivery; taking it back makes the wait free.
        let _gate = self.gate.enter().await?;
        sqlx::query(
            "UPDATE jobs SET visible_ms = ?, leased = 0, deliveries = max(deliveries - 1, 0) \
             WHERE id = ? AND leased = 1",
        )
        .bind(now_ms() + after.as_millis().min(i64::MAX as u128) as i64)
        .bind(tag.0 as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn dead_letter(&self, tag: DeliveryTag, reason: &str) -> Result<()> {
        let mut tx = WriteTx::begin(&self.pool, &self.gate).await?;
        sqlx::query(
            "INSERT OR IGNORE INTO dead (id, body, deliveries, reason) \
             SELECT id, body, deliveries, ? FROM jobs WHERE id = ?",
        )
        .bind(reason)
        .bind(tag.0 as i64)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM jobs WHERE id = ?")
            .bind(tag.0 as i64)
            .execute(&mut **tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn lease_dead(&self, max: usize) -> Result<Vec<(Delivery, String)>> {
        let now = now_ms();
        let _gate = self.gate.enter().await?;
        let rows = sqlx::query(
            "UPDATE dead SET taken_ms = ? \
             WHERE id IN (SELECT id FROM dead WHERE taken_ms <= ? ORDER BY id LIMIT ?) \
             RETURNING id, body, deliveries, reason",
        )
        .bind(now + self.lease.as_millis() as i64)
        .bind(now)
        .bind(max as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    delivery(r.get(0), &r.get::<Vec<u8>, _>(1), r.get(2)),
                    r.get::<String, _>(3),
                )
            })
            .collect())
    }

    async fn ack_dead(&self, tags: &[DeliveryTag]) -> Result<()> {
        let _gate = self.gate.enter().await?;
        sqlx::query("DELETE FROM dead WHERE id IN (SELECT value FROM json_each(?))")
            .bind(tag_array(tags))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth> {
        let now = now_ms();
        let row = sqlx::query(
            "SELECT coalesce(sum(visible_ms <= ?), 0), coalesce(sum(visible_ms > ?), 0) FROM jobs",
        )
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead")
            .fetch_one(&self.pool)
            .await?;
        Ok(QueueDepth {
            ready: row.get::<i64, _>(0) as u64,
            leased: row.get::<i64, _>(1) as u64,
            dead: dead as u64,
        })
    }
}
