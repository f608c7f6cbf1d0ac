//! The `local` power provider: a "machine" is an OS process group on this host running a blank
//! `cell boot --join URL --token TOKEN`. Power-on starts it, power-off ends the whole group
//! (SIGTERM, then SIGKILL after a grace period), status says whether it still runs. Each machine
//! has a disk of its own that outlives its power-offs (`DISKS/<server>`, its `cell boot
//! --state-dir`: where it keeps the organism's release it downloaded). It lets the pool, the
//! purse, the join and a live upgrade be used and tested without hardware.

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{JoinData, PowerError, PowerProvider, PowerState, ServerSpec};

pub struct LocalMachines {
    /// The `cell` executable a machine boots.
    pub exe: PathBuf,
    /// Environment every machine gets (e.g. the organism's lease, so no machine outlives it).
    pub env: Vec<(String, String)>,
    /// How long a machine has to stop after SIGTERM before it is killed.
    pub grace: Duration,
    /// Where the machines' disks are (one directory per server), if they have any.
    pub disks: Option<PathBuf>,
    running: Mutex<HashMap<String, Child>>,
}

impl LocalMachines {
    pub fn new(
        exe: PathBuf,
        env: Vec<(String, String)>,
        grace: Duration,
        disks: Option<PathBuf>,
    ) -> Self {
        Self {
            exe,
            env,
            grace,
            disks,
            running: Mutex::new(HashMap::new()),
        }
    }
}

/// The file on a machine's disk naming the process group it runs as (written at power-on): a
/// factory that did not power the machine on (its successor after an upgrade, a sibling
/// adopting it) can still power it off, as a BMC answers whoever asks.
const GROUP_FILE: &str = "power-group";

impl LocalMachines {
    fn disk(&self, server: &str) -> Option<PathBuf> {
        self.disks.as_ref().map(|d| d.join(server))
    }

    /// The running process group of a machine another factory powered on: the group its disk
    /// names, if its leader still runs this machine (its command line names the disk).
    fn group_on_disk(&self, server: &str) -> Option<Pid> {
        let disk = self.disk(server)?;
        let pgid: i32 = std::fs::read_to_string(disk.join(GROUP_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pgid}/cmdline")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pgid}/stat")).ok()?;
        // Fields after the command's closing parenthesis: state, ppid, pgrp, ...
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let (state, pgrp) = (*fields.first()?, fields.get(2)?.parse::<i32>().ok()?);
        let disk = disk.to_string_lossy();
        let mine = String::from_utf8_lossy(&cmdline).contains(disk.as_ref());
        (pgrp == pgid && mine && state != "Z").then(|| Pid::from_raw(pgid))
    }
}

#[async_trait::async_trait]
impl PowerProvider for LocalMachines {
    async fn power_on(&self, server: &ServerSpec, join: &JoinData) -> Result<(), PowerError> {
        let mut running = self.running.lock().await;
        if let Some(child) = running.get_mut(&server.name) {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(()); // already on
            }
        }
        let mut cmd = Command::new(&self.exe);
        cmd.args(["boot", "--join", &join.join_url, "--token", &join.token])
            .arg("--hostname")
            .arg(&server.name);
        if let Some(disks) = &self.disks {
            cmd.arg("--state-dir").arg(disks.join(&server.name));
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Its own process group: power-off reaches the cell the boot starts, too.
        cmd.as_std_mut().process_group(0);
        if let Some(disk) = self.disk(&server.name) {
            std::fs::create_dir_all(&disk).map_err(|e| PowerError::Config {
                server: server.name.clone(),
                detail: format!("creating its disk {}: {e}", disk.display()),
            })?;
        }
        let child = cmd.spawn().map_err(|e| PowerError::Config {
            server: server.name.clone(),
            detail: format!("starting {}: {e}", self.exe.display()),
        })?;
        if let (Some(disk), Some(pid)) = (self.disk(&server.name), child.id()) {
            if let Err(e) = std::fs::write(disk.join(GROUP_FILE), pid.to_string()) {
                tracing::warn!(server = %server.name, error = %e, "recording the machine's process group failed");
            }
        }
        running.insert(server.name.clone(), child);
        Ok(())
    }

    async fn power_off(&self, server: &ServerSpec) -> Result<(), PowerError> {
        let child = self.running.lock().await.remove(&server.name);
        let Some(mut child) = child else {
            // Powered on by another factory: its group, from the machine's disk.
            if let Some(group) = self.group_on_disk(&server.name) {
                let _ = killpg(group, Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + self.grace;
                while self.group_on_disk(&server.name).is_some()
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = killpg(group, Signal::SIGKILL);
            }
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let group = Pid::from_raw(pid as i32);
            let _ = killpg(group, Signal::SIGTERM);
            if tokio::time::timeout(self.grace, child.wait())
                .await
                .is_err()
            {
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.wait().await;
            }
            // Whatever of the group is left (the cell the boot started) goes too.
            let _ = killpg(group, Signal::SIGKILL);
        }
        Ok(())
    }

    async fn status(&self, server: &ServerSpec) -> Result<PowerState, PowerError> {
        let mut running = self.running.lock().await;
        let on = match running.get_mut(&server.name) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => self.group_on_disk(&server.name).is_some(),
        };
        Ok(if on { PowerState::On } else { PowerState::Off })
    }
}
