//! The operator's stop: SIGINT (Ctrl-C) or SIGTERM cancels one token, which every binary of the
//! workspace (`cell`, `cell up`, `loadtest bench`) drains under.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancel `token` on SIGINT or SIGTERM, logging which came. Both are listened for before this
/// returns (not in the task it spawns, which a loaded machine may not run for a while): a signal
/// that comes the moment after is a drain, never the default action's silent death. If a signal
/// cannot be listened for, the error is logged and the other still cancels.
pub fn cancel_on_signals(token: CancellationToken) {
    let listen = |kind: SignalKind, name: &str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for {name}");
            None
        }
    };
    let int = listen(SignalKind::interrupt(), "SIGINT");
    let term = listen(SignalKind::terminate(), "SIGTERM");
    tokio::spawn(async move {
        async fn recv(s: Option<Signal>) {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(int) => tracing::info!("interrupted: draining"),
            _ = recv(term) => tracing::info!("terminated: draining"),
        }
        token.cancel();
    });
}
