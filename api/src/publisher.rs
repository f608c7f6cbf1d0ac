//! Hands the frontier to the queue, and brings dead letters back to the frontier as failures.
//!
//! Claim, publish, mark: `Store::unpublished` claims the entries it returns for
//! `engines::PUBLISH_CLAIM`, so several api cells publishing one frontier never publish the same
//! entry (each claims its own). Publish first, mark second: a crash between the two publishes a
//! job twice once the claim lapses, which idempotent ingest absorbs; the other order could lose a
//! URL. While the queue is down nothing is marked, so the frontier keeps what was not yet
//! published, and its claims lapse for whichever api publishes next.

use std::time::Duration;

use engines::frontier::Links;
use engines::{IngestItem, IngestOutcome};
use protocol::CrawlJob;
use tokio_util::sync::CancellationToken;

use crate::AppState;

const TICK: Duration = Duration::from_millis(200);
const DEAD_LETTER_EVERY: Duration = Duration::from_secs(2);
const STALE_EVERY: Duration = Duration::from_secs(60);
/// Pages whose kept links are offered in one transaction, and transactions per turn (the queue
/// is fed between turns).
const KEPT_PAGES: u32 = 64;
const KEPT_ROUNDS: u32 = 16;

pub async fn run(state: AppState, reply_to: String, shutdown: CancellationToken) {
    let mut last_dead = tokio::time::Instant::now();
    let mut last_stale = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.frontier_grew.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        if let Err(e) = offer_kept_links(&state, &shutdown).await {
            tracing::warn!(error = %e, "offering kept links to the frontier failed; will retry");
            metrics::counter!("api_publish_errors_total").increment(1);
        }
        match publish_all(&state, &reply_to, &shutdown).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "publishing the frontier failed; will retry");
                metrics::counter!("api_publish_errors_total").increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if last_dead.elapsed() >= DEAD_LETTER_EVERY {
            last_dead = tokio::time::Instant::now();
            if let Err(e) = drain_dead_letters(&state).await {
                tracing::warn!(error = %e, "draining dead letters failed");
            }
        }
        if last_stale.elapsed() >= STALE_EVERY {
            last_stale = tokio::time::Instant::now();
            let age = Duration::from_secs(state.cfg.stale_in_flight_secs);
            match state.store.requeue_stale(age).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(n, "re-published in-flight URLs whose jobs were lost"),
                Err(e) => tracing::warn!(error = %e, "re-publishing stale in-flight URLs failed"),
            }
        }
    }
}

async fn publish_all(
    state: &AppState,
    reply_to: &str,
    shutdown: &CancellationToken,
) -> engines::Result<()> {
    while !shutdown.is_cancelled() {
        let batch = state.store.unpublished(state.cfg.publish_batch).await?;
        if batch.is_empty() {
            return Ok(());
        }
        let jobs: Vec<CrawlJob> = batch
            .iter()
            .map(|u| CrawlJob::new(u.url.clone(), u.depth, reply_to))
            .collect();
        state.queue.publish(&jobs).await?;
        let urls: Vec<String> = batch.into_iter().map(|u| u.url).collect();
        state.store.mark_published(&urls).await?;
        metrics::counter!("api_jobs_published_total").increment(urls.len() as u64);
    }
    Ok(())
}

/// Jobs the queue gave up on become failed frontier entries with the reason.
async fn drain_dead_letters(state: &AppState) -> engines::Result<()> {
    loop {
        let dead = state.queue.lease_dead(100).await?;
        if dead.is_empty() {
            return Ok(());
        }
        let mut items = Vec::new();
        let mut tags = Vec::new();
        for (delivery, reason) in dead {
            tags.push(delivery.tag);
            match delivery.job {
                Ok(job) => items.push(IngestItem {
                    url: job.url,
                    outcome: IngestOutcome::Failed {
                        reason: format!("dead-lettered: {reason}"),
                    },
                }),
                Err(e) => {
                    // Not a job at all: nothing in the frontier refers to it.
                    tracing::warn!(error = %e, "dropping a malformed dead-lettered message");
                    metrics::counter!("api_malformed_dead_letters_total").increment(1);
                }
            }
        }
        state
            .store
            .ingest(&items, state.cfg.host_budget, Links::Admit)
            .await?;
        state.queue.ack_dead(&tags).await?;
        metrics::counter!("api_dead_letters_total").increment(tags.len() as u64);
    }
}

/// Unless this cell is deferring link expansion itself, offer links kept aside (by any api,
/// this one included, and by apis since dead) to the frontier, a bounded amount per turn.
async fn offer_kept_links(state: &AppState, shutdown: &CancellationToken) -> engines::Result<()> {
    for _ in 0..KEPT_ROUNDS {
        if shutdown.is_cancelled() || state.defer_links.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let done = state
            .store
            .expand_deferred(KEPT_PAGES, state.cfg.host_budget)
            .await?;
        if done.pages == 0 {
            return Ok(());
        }
        metrics::counter!("api_kept_links_admitted_total").increment(done.links_admitted as u64);
        tracing::debug!(
            pages = done.pages,
            admitted = done.links_admitted,
            "offered kept links"
        );
    }
    Ok(())
}
