//! The pool providers' real peers, started by the tests that need them: OpenIPMI's BMC simulator
//! (`ipmi_sim`, cross-checked with `ipmitool`) and the `moto` EC2 server. Shared by the
//! factory's provider tests and the cell's round trips (`cell/tests/pool_providers.rs` includes
//! this module by path). Each peer runs in its own process group, killed whole when its guard is
//! dropped, even by a panic.
#![allow(dead_code)] // each test file uses a different part

pub mod bmc;
pub mod moto;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long anything a peer does may take before the test gives up.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The factory's test fixtures (`factory/tests/fixtures`).
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../factory/tests/fixtures")
        .join(path)
}

/// Fail (not skip) when a tool is missing, saying how to get it.
pub fn require_tool(command: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{command}` is not installed: this test needs it. Run scripts/pool-tools.sh \
                 (as root) or `apt-get install {package}`."
            )
        })
}

/// Poll `check` until it gives a value, for at most [`PATIENCE`].
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
