//! OpenIPMI's BMC simulator (`ipmi_sim`) on loopback.
//!
//! Each simulator gets its own temporary directory with a configuration written from
//! `fixtures/ipmi/lan.conf`: a LAN channel on a free loopback UDP port, one admin user, and a
//! chassis whose power-on runs `machine.sh` (it writes its process id, then runs the machine's
//! program) and whose power-off kills it.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use factory::power::ipmi::IpmiProvider;
use factory::power::{PowerError, PowerProvider, PowerState, ProviderKind, ServerSpec};

use super::{fixture, require_tool, PATIENCE};

pub const USER: &str = "admin";
pub const PASSWORD: &str = "s3cret-Pa55";

pub fn free_udp_port() -> u16 {
    // Outside the ephemeral range: ipmi_sim binds it later (see `factory::ports`).
    factory::ports::fixed_udp([127, 0, 0, 1].into())
        .expect("a free UDP port")
        .port()
}

fn free_tcp_port() -> u16 {
    factory::ports::fixed_tcp([127, 0, 0, 1].into())
        .expect("a free TCP port")
        .port()
}

/// A running `ipmi_sim`; killed with its process group (and the machine it started) on drop.
pub struct SimBmc {
    pub dir: tempfile::TempDir,
    child: Child,
    pub lan_port: u16,
}

impl SimBmc {
    /// A BMC whose machine sleeps.
    pub async fn start() -> SimBmc {
        Self::start_running(&[]).await
    }

    /// A BMC whose machine runs `program` (empty: a long sleep). The simulator's environment,
    /// and so the machine's, is this process's.
    pub async fn start_running(program: &[String]) -> SimBmc {
        let ipmi_sim = require_tool("ipmi_sim", "openipmi");
        require_tool("ipmitool", "ipmitool");
        let dir = tempfile::tempdir().expect("temporary directory");
        let lan_port = free_udp_port();
        let serial_port = free_tcp_port();
        let mut start_command = format!(
            "{} {}",
            fixture("ipmi/machine.sh").display(),
            dir.path().join("machine.pid").display()
        );
        for word in program {
            assert!(
                !word.contains([' ', '"', '\'', '\\']),
                "ipmi_sim's startcmd is split on spaces: {word:?}"
            );
            start_command.push(' ');
            start_command.push_str(word);
        }
        let config = std::fs::read_to_string(fixture("ipmi/lan.conf"))
            .expect("read the lan.conf fixture")
            .replace("@LAN_PORT@", &lan_port.to_string())
            .replace("@SERIAL_PORT@", &serial_port.to_string())
            .replace("@START_COMMAND@", &start_command)
            .replace("@USER@", USER)
            .replace("@PASSWORD@", PASSWORD);
        let config_path = dir.path().join("lan.conf");
        std::fs::write(&config_path, config).expect("write lan.conf");
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).expect("create the state directory");
        let log = std::fs::File::create(dir.path().join("ipmi_sim.log")).expect("create the log");
        let child = {
            use std::os::unix::process::CommandExt;
            std::process::Command::new(&ipmi_sim)
                .arg("-c")
                .arg(&config_path)
                .arg("-f")
                .arg(fixture("ipmi/sim.emu"))
                .arg("-s")
                .arg(&state_dir)
                .args(["-n", "-p"])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone the log handle"))
                .stderr(log)
                .process_group(0)
                .spawn()
                .expect("start ipmi_sim")
        };
        let mut sim = SimBmc {
            dir,
            child,
            lan_port,
        };
        sim.await_ready().await;
        sim
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.lan_port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipmi_sim.log")).unwrap_or_default()
    }

    /// A file holding `user:password`, as a server's `credentials = "file:..."` names it.
    pub fn credentials_file(&self, user: &str, password: &str) -> std::path::PathBuf {
        let credentials = self
            .dir
            .path()
            .join(format!("credentials-{user}-{password}"));
        std::fs::write(&credentials, format!("{user}:{password}\n")).expect("write credentials");
        credentials
    }

    /// A server whose credentials file holds `user:password`.
    pub fn server(&self, user: &str, password: &str) -> ServerSpec {
        let credentials = self.credentials_file(user, password);
        ServerSpec {
            name: "pool-ipmi-1".to_string(),
            provider: ProviderKind::Ipmi,
            mac: None,
            bmc: Some(self.address().to_string()),
            credentials: Some(format!("file:{}", credentials.display())),
            hourly_cost: 0.25,
            capacity: 1,
            broadcast: None,
            endpoint: None,
            region: None,
            image_id: None,
            instance_type: None,
            instance_id: None,
        }
    }

    /// Until the simulator answers a status request (or dies: then fail with its log).
    async fn await_ready(&mut self) {
        let probe = IpmiProvider::with_timing(Duration::from_millis(200), 1);
        let server = self.server(USER, PASSWORD);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll ipmi_sim") {
                panic!(
                    "ipmi_sim exited ({status}) before answering:\n{}",
                    self.log()
                );
            }
            match probe.status(&server).await {
                Ok(_) => return,
                Err(PowerError::Transient { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("ipmi_sim does not answer: {e}\n{}", self.log()),
            }
        }
    }

    /// The machine's process id, once its start command has written it.
    pub fn machine_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("machine.pid"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// `ipmitool -I lanplus ... chassis power status`.
    pub async fn ipmitool_status(&self) -> PowerState {
        let output = self.ipmitool(&["chassis", "power", "status"]).await;
        if output.contains("Chassis Power is on") {
            PowerState::On
        } else if output.contains("Chassis Power is off") {
            PowerState::Off
        } else {
            panic!("ipmitool's power status is neither on nor off: {output:?}");
        }
    }

    pub async fn ipmitool(&self, command: &[&str]) -> String {
        let port = self.lan_port.to_string();
        let mut ipmitool = tokio::process::Command::new("ipmitool");
        ipmitool
            // Cipher suite 3 (what our provider negotiates); naming it spares ipmitool a probe the
            // simulator does not answer.
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", &port])
            .args(["-U", USER, "-P", PASSWORD])
            .args(command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(PATIENCE, ipmitool.output())
            .await
            .expect("ipmitool finishes")
            .expect("run ipmitool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "ipmitool {command:?} failed ({}): {text}",
            output.status
        );
        text
    }
}

impl Drop for SimBmc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}
