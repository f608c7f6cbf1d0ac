//! Which apis a crawler sends results to: the live api cells the organism's registry lists,
//! followed every half second. A job's `reply_to` is contacted only when it is among them (see
//! [`crate::worker::IngestSender`]); they are also where results go when a job's own api does not
//! answer.

use std::time::Duration;

use protocol::client::CellsClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the registry is read.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Keep `tx` current with the api cells `registry` lists, until `stop`. A registry that does
/// not answer, or lists no api, leaves the last list as it was (an outage is not the death of
/// every api).
pub fn follow(registry: CellsClient, tx: watch::Sender<Vec<String>>, stop: CancellationToken) {
    if registry.healthcheckers().is_empty() {
        return;
    }
    tokio::spawn(async move {
        loop {
            if let Ok(cells) = registry.read().await {
                let apis = cells.addrs("api");
                if !apis.is_empty() {
                    tx.send_if_modified(|cur| {
                        let changed = *cur != apis;
                        if changed {
                            cur.clone_from(&apis);
                        }
                        changed
                    });
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
        }
    });
}
