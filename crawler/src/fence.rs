//! A crawler's hold on its jobs is only as good as its standing with the registry: a cell that
//! was frozen long enough to be declared dead (and replaced) must not acknowledge the jobs it
//! held when it thaws, since their leases may have passed to another crawler. [`FencedQueue`]
//! asks the cell's [`Standing`] before every lease and acknowledgement: while the cell doubts
//! itself (it stalled and no health checker has answered since) or once it is fenced, it takes
//! no new jobs and acknowledges none; the jobs it holds are delivered again (ingest is
//! idempotent, so nothing is lost and nothing is counted twice).
//!
//! [`Standing`]: control::heartbeat::Standing

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use control::heartbeat::Standing;
use engines::{Delivery, DeliveryTag, EngineError, JobQueue, QueueDepth};
use protocol::CrawlJob;

/// A crawler's queue, asking its standing before every lease and acknowledgement.
pub struct FencedQueue {
    inner: Arc<dyn JobQueue>,
    standing: Standing,
}

impl FencedQueue {
    /// `inner`, guarded by `standing`.
    pub fn wrap(inner: Arc<dyn JobQueue>, standing: Standing) -> Arc<dyn JobQueue> {
        Arc::new(Self { inner, standing })
    }

    fn check(&self, what: &str) -> engines::Result<()> {
        if self.standing.trusted() {
            return Ok(());
        }
        metrics::counter!("crawler_fenced_operations_total").increment(1);
        Err(EngineError::Unavailable(format!(
            "this cell may have been replaced while it was stalled or is fenced: no {what} \
             until a health checker vouches for it"
        )))
    }
}

#[async_trait]
impl JobQueue for FencedQueue {
    async fn publish(&self, jobs: &[CrawlJob]) -> engines::Result<()> {
        self.inner.publish(jobs).await
    }
    async fn lease(&self, max: usize) -> engines::Result<Vec<Delivery>> {
        if !self.standing.trusted() {
            return Ok(Vec::new());
        }
        self.inner.lease(max).await
    }
    async fn ack(&self, tags: &[DeliveryTag]) -> engines::Result<()> {
        self.check("acknowledgement")?;
        self.inner.ack(tags).await
    }
    async fn retry(&self, tag: DeliveryTag, after: Duration) -> engines::Result<()> {
        self.check("retry")?;
        self.inner.retry(tag, after).await
    }
    async fn defer(&self, tag: DeliveryTag, after: Duration) -> engines::Result<()> {
        self.check("deferral")?;
        self.inner.defer(tag, after).await
    }
    async fn dead_letter(&self, tag: DeliveryTag, reason: &str) -> engines::Result<()> {
        self.check("dead-lettering")?;
        self.inner.dead_letter(tag, reason).await
    }
    async fn lease_dead(&self, max: usize) -> engines::Result<Vec<(Delivery, String)>> {
        self.inner.lease_dead(max).await
    }
    async fn ack_dead(&self, tags: &[DeliveryTag]) -> engines::Result<()> {
        self.inner.ack_dead(tags).await
    }
    async fn depth(&self) -> engines::Result<QueueDepth> {
        self.inner.depth().await
    }
}
