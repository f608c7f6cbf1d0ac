//! The organism's lease: no process of an organism outlives it.
//!
//! `cell up` hands every cell it starts the identity of its own process, `PID:START` (the pid and
//! the kernel's start time of that process, from `/proc/PID/stat`), in [`LEASE_ENV`]. Cells
//! inherit the environment, so the cells a factory starts carry the lease too, and a cell started
//! by a factory does not die with its factory, only with its organism. Each cell looks at the
//! lease holder every [`CHECK_EVERY`]; when that process is gone (or the pid now belongs to
//! another process: the start time differs), the cell drains and exits.
//!
//! Linux only (`/proc`); where there is no `/proc`, [`OrganismLease::current`] is `None` and
//! cells carry no lease.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The environment variable that carries the lease.
pub const LEASE_ENV: &str = "HOMEOSTAT_ORGANISM";

/// How often a cell checks that its organism is alive.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

/// The process an organism's life is tied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrganismLease {
    pub pid: u32,
    /// Clock ticks since boot at which the process started (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{LEASE_ENV}={value:?} is not PID:START (two whole numbers)")]
pub struct BadLease {
    pub value: String,
}

impl OrganismLease {
    /// The lease on this process.
    pub fn current() -> Option<Self> {
        let pid = std::process::id();
        start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// The lease this cell was given, if any.
    pub fn from_env() -> Result<Option<Self>, BadLease> {
        match std::env::var(LEASE_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    pub fn parse(value: &str) -> Result<Self, BadLease> {
        let bad = || BadLease {
            value: value.to_string(),
        };
        let (pid, start) = value.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            pid: pid.parse().map_err(|_| bad())?,
            start_time: start.parse().map_err(|_| bad())?,
        })
    }

    pub fn render(&self) -> String {
        format!("{}:{}", self.pid, self.start_time)
    }

    /// Whether the lease holder still runs (a zombie does not count).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// Cancel `token` once the lease holder is gone.
    pub fn watch(self, token: CancellationToken) {
        tokio::spawn(async move {
            loop {
                if !self.alive() {
                    tracing::warn!(pid = self.pid, "the organism is gone: draining");
                    token.cancel();
                    return;
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                }
            }
        });
    }
}

/// A process's start time, or `None` when it does not run (or is a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses, so split after the last ')'.
    // Field 3 (state) is the first after it; field 22 (starttime) the twentieth.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The command line of a running process (empty for a zombie or a process that is gone).
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| {
            bytes
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_holds_a_live_lease_that_round_trips() {
        let me = OrganismLease::current().expect("/proc is there on Linux");
        assert!(me.alive());
        assert_eq!(OrganismLease::parse(&me.render()).expect("parses"), me);
        let reused = OrganismLease {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !reused.alive(),
            "a pid with another start time is not the organism"
        );
        assert!(OrganismLease::parse("12").is_err());
        assert!(OrganismLease::parse("a:1").is_err());
        assert!(OrganismLease::parse("1:").is_err());
    }

    #[test]
    fn a_reaped_process_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        assert_eq!(start_time(pid), None);
        assert!(cmdline(pid).is_empty());
    }
}
