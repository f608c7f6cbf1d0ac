//! The operator's stop: SIGINT (Ctrl-C) or SIGTERM cancels one token, which every binary of the
//! workspace (`cell`, `cell up`, `loadtest bench`) drains under.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancel `token` on SIGINT or SIGTERM, logging which came. If SIGTERM cannot be listened for,
/// the error is logged and SIGINT still cancels.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: draining"),
            _ = term => tracing::info!("terminated: draining"),
        }
        token.cancel();
    });
}
