//! The `local` power provider: a "machine" is an OS process group on this host running a blank
//! `cell boot --join URL --token TOKEN`. Power-on starts it, power-off ends the whole group
//! (SIGTERM, then SIGKILL after a grace period), status says whether it still runs. It lets the
//! pool, the purse and the join be used and tested without hardware.

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
    running: Mutex<HashMap<String, Child>>,
}

impl LocalMachines {
    pub fn new(exe: PathBuf, env: Vec<(String, String)>, grace: Duration) -> Self {
        Self {
            exe,
            env,
            grace,
            running: Mutex::new(HashMap::new()),
        }
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
            .arg(&server.name)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Its own process group: power-off reaches the cell the boot starts, too.
        cmd.as_std_mut().process_group(0);
        let child = cmd.spawn().map_err(|e| PowerError::Config {
            server: server.name.clone(),
            detail: format!("starting {}: {e}", self.exe.display()),
        })?;
        running.insert(server.name.clone(), child);
        Ok(())
    }

    async fn power_off(&self, server: &ServerSpec) -> Result<(), PowerError> {
        let child = self.running.lock().await.remove(&server.name);
        let Some(mut child) = child else {
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
        let on = running
            .get_mut(&server.name)
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        Ok(if on { PowerState::On } else { PowerState::Off })
    }
}
