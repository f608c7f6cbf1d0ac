//! Following the health checkers' event streams: one task a checker, reconnecting whenever its
//! stream ends, all writing into one [`EventBook`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use protocol::events::{SseParser, StreamItem};
use tokio_util::sync::CancellationToken;

use super::matching::EventBook;

/// Shared with the event watchers.
pub struct Watch {
    pub book: Mutex<EventBook>,
    /// Per health checker: is its stream connected now?
    pub connected: Vec<AtomicBool>,
}

impl Watch {
    pub fn book(&self) -> std::sync::MutexGuard<'_, EventBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Follow one health checker's `GET /events` until `stop`, reconnecting (to the same address,
/// where its replacement comes up) whenever the stream ends. Each connection replays the
/// checker's whole ring (`since=0`); the book drops the repeats.
pub async fn watch_events(source: usize, url: String, watch: Arc<Watch>, stop: CancellationToken) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        // In cluster mode `/cells` and `/events` take the read token.
        .default_headers(control::read_headers_from_env())
        .connect_timeout(Duration::from_secs(1))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("heal: cannot build the event stream client: {e}");
            return;
        }
    };
    while !stop.is_cancelled() {
        let sent = client
            .get(format!("{url}/events?since=0"))
            .header("accept", "text/event-stream")
            .send()
            .await;
        if let Ok(resp) = sent {
            if resp.status().is_success() {
                watch.connected[source].store(true, Ordering::Relaxed);
                let mut body = resp.bytes_stream();
                let mut parser = SseParser::new();
                loop {
                    let chunk = tokio::select! {
                        chunk = body.next() => chunk,
                        _ = stop.cancelled() => None,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    let messages = parser.feed(&chunk);
                    if messages.is_empty() {
                        continue;
                    }
                    let mut book = watch.book();
                    for msg in messages {
                        match protocol::events::interpret(&msg) {
                            StreamItem::Cell(event) => {
                                book.push(source, event);
                            }
                            StreamItem::Lagged(n) => book.missed += n,
                            StreamItem::Unknown => book.unknown += 1,
                        }
                    }
                }
                watch.connected[source].store(false, Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.cancelled() => {}
        }
    }
}
