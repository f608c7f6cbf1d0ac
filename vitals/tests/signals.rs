//! A stop signal that comes the moment `cancel_on_signals` returns is a drain, not a death: the
//! signals are listened for before it returns, not in the task it spawns. On a one-thread
//! runtime that task cannot run before the signal is raised here, so a listener installed there
//! would leave SIGTERM's default action (this test process dies).

use std::time::Duration;

use nix::sys::signal::{raise, Signal};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "current_thread")]
async fn a_sigterm_right_after_listening_cancels_the_token() {
    let token = CancellationToken::new();
    vitals::cancel_on_signals(token.clone());
    raise(Signal::SIGTERM).expect("raise SIGTERM");
    tokio::time::timeout(Duration::from_secs(60), token.cancelled())
        .await
        .expect("the token is cancelled");
}
