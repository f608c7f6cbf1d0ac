//! The `ipmi` provider against OpenIPMI's BMC simulator (`ipmi_sim`) on loopback, cross-checked
//! with `ipmitool -I lanplus` as a second client.
//!
//! Each test writes an `ipmi_sim` configuration (tests/fixtures/ipmi/) into its own temporary
//! directory: a LAN channel on a free loopback UDP port, one admin user, and a chassis whose
//! power-on runs `machine.sh` (it writes its process id and sleeps) and whose power-off kills it.
//! The simulator runs in its own process group, killed whole when the test ends, even by a panic.
//!
//! Needs `ipmi_sim` (Debian `openipmi`) and `ipmitool`: `scripts/pool-tools.sh` installs them. A
//! test fails, naming what to install, when one is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use factory::power::ipmi::IpmiProvider;
use factory::power::{JoinData, PowerError, PowerProvider, PowerState, ProviderKind, ServerSpec};

const USER: &str = "admin";
const PASSWORD: &str = "s3cret-Pa55";
/// How long anything the simulator does may take before the test gives up.
const PATIENCE: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ipmi")
        .join(name)
}

/// Fail (not skip) when a tool is missing, saying how to get it.
fn require_tool(command: &str, package: &str) -> PathBuf {
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

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral UDP port")
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind an ephemeral TCP port")
        .port()
}

/// A running `ipmi_sim`; killed with its process group (and the machine it started) on drop.
struct SimBmc {
    dir: tempfile::TempDir,
    child: Child,
    lan_port: u16,
}

impl SimBmc {
    async fn start() -> SimBmc {
        let ipmi_sim = require_tool("ipmi_sim", "openipmi");
        require_tool("ipmitool", "ipmitool");
        let dir = tempfile::tempdir().expect("temporary directory");
        let lan_port = free_udp_port();
        let serial_port = free_tcp_port();
        let machine = fixture("machine.sh");
        let start_command = format!(
            "{} {}",
            machine.display(),
            dir.path().join("machine.pid").display()
        );
        let config = std::fs::read_to_string(fixture("lan.conf"))
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
                .arg(fixture("sim.emu"))
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

    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.lan_port))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ipmi_sim.log")).unwrap_or_default()
    }

    /// A server whose credentials file holds `user:password`.
    fn server(&self, user: &str, password: &str) -> ServerSpec {
        let credentials = self
            .dir
            .path()
            .join(format!("credentials-{user}-{password}"));
        std::fs::write(&credentials, format!("{user}:{password}\n")).expect("write credentials");
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
    fn machine_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("machine.pid"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// `ipmitool -I lanplus ... chassis power status`.
    async fn ipmitool_status(&self) -> PowerState {
        let output = self.ipmitool(&["chassis", "power", "status"]).await;
        if output.contains("Chassis Power is on") {
            PowerState::On
        } else if output.contains("Chassis Power is off") {
            PowerState::Off
        } else {
            panic!("ipmitool's power status is neither on nor off: {output:?}");
        }
    }

    async fn ipmitool(&self, command: &[&str]) -> String {
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

fn alive(pid: i32) -> bool {
    // Reaped processes are gone; ipmi_sim reaps its machine as soon as it ends.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn join_data() -> JoinData {
    JoinData {
        join_url: "http://127.0.0.1:1/join".to_string(),
        token: "abcdef.0123456789abcdef".to_string(),
    }
}

#[tokio::test]
async fn chassis_power_round_trip_through_the_simulated_bmc() {
    let sim = SimBmc::start().await;
    let provider = IpmiProvider::new();
    let server = sim.server(USER, PASSWORD);

    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Off
    );
    assert_eq!(sim.ipmitool_status().await, PowerState::Off);
    assert_eq!(sim.machine_pid(), None, "nothing runs before power-on");

    let asked = Instant::now();
    provider
        .power_on(&server, &join_data())
        .await
        .expect("power on");
    let accepted = asked.elapsed();
    let pid = eventually("the machine's start command to run", async || {
        sim.machine_pid()
    })
    .await;
    let running = asked.elapsed();
    eprintln!(
        "ipmi round trip: power-on accepted after {} ms, machine running after {} ms",
        accepted.as_millis(),
        running.as_millis()
    );
    assert!(alive(pid), "the machine process {pid} runs");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read its command line");
    assert!(
        String::from_utf8_lossy(&cmdline).starts_with("sleep"),
        "process {pid} is the machine: {cmdline:?}"
    );
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::On
    );
    assert_eq!(sim.ipmitool_status().await, PowerState::On);

    provider.power_off(&server).await.expect("power off");
    eventually("the machine to be killed", async || {
        (!alive(pid)).then_some(())
    })
    .await;
    let state = eventually("the chassis to report off", async || {
        let state = provider.status(&server).await.expect("status");
        (state == PowerState::Off).then_some(state)
    })
    .await;
    assert_eq!(state, PowerState::Off);
    assert_eq!(sim.ipmitool_status().await, PowerState::Off);

    // The other way round: ipmitool powers on, our provider sees it and powers off.
    std::fs::remove_file(sim.dir.path().join("machine.pid")).expect("forget the first machine");
    sim.ipmitool(&["chassis", "power", "on"]).await;
    let second = eventually("the machine ipmitool started", async || sim.machine_pid()).await;
    assert_ne!(second, pid, "a new machine process");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::On
    );
    provider.power_off(&server).await.expect("power off");
    eventually("the second machine to be killed", async || {
        (!alive(second)).then_some(())
    })
    .await;
    eventually("the chassis to report off again", async || {
        (sim.ipmitool_status().await == PowerState::Off).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_wrong_password_or_user_is_refused_as_auth_and_powers_nothing() {
    let sim = SimBmc::start().await;
    let provider = IpmiProvider::new();

    let wrong_password = sim.server(USER, "not-the-password");
    let error = provider
        .power_on(&wrong_password, &join_data())
        .await
        .expect_err("a wrong password is refused");
    assert!(
        matches!(error, PowerError::Auth { .. }) && !error.retryable(),
        "{error}"
    );
    let error = provider
        .status(&wrong_password)
        .await
        .expect_err("a wrong password is refused");
    assert!(matches!(error, PowerError::Auth { .. }), "{error}");

    let unknown_user = sim.server("mallory", PASSWORD);
    let error = provider
        .power_on(&unknown_user, &join_data())
        .await
        .expect_err("an unknown user is refused");
    assert!(matches!(error, PowerError::Auth { .. }), "{error}");

    // Nothing was powered on: the chassis is off and no machine started.
    let good = sim.server(USER, PASSWORD);
    assert_eq!(
        provider.status(&good).await.expect("status"),
        PowerState::Off
    );
    assert_eq!(sim.ipmitool_status().await, PowerState::Off);
    assert_eq!(sim.machine_pid(), None);
}

#[tokio::test]
async fn a_bmc_that_does_not_answer_is_transient() {
    // A bound socket that never answers: every request times out.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let credentials = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(credentials.path(), "admin:secret").expect("write credentials");
    let server = ServerSpec {
        name: "silent".to_string(),
        provider: ProviderKind::Ipmi,
        mac: None,
        bmc: Some(silent.local_addr().expect("address").to_string()),
        credentials: Some(format!("file:{}", credentials.path().display())),
        hourly_cost: 0.0,
        capacity: 1,
        broadcast: None,
        endpoint: None,
        region: None,
        image_id: None,
        instance_type: None,
        instance_id: None,
    };
    let provider = IpmiProvider::with_timing(Duration::from_millis(100), 2);
    let error = provider
        .power_on(&server, &join_data())
        .await
        .expect_err("no answer");
    assert!(
        matches!(error, PowerError::Transient { .. }) && error.retryable(),
        "{error}"
    );
    assert!(error.to_string().contains("timeout"), "{error}");
}

#[tokio::test]
async fn a_server_without_bmc_or_credentials_is_misconfigured() {
    let credentials = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(credentials.path(), "no-colon-here").expect("write credentials");
    let base = ServerSpec {
        name: "broken".to_string(),
        provider: ProviderKind::Ipmi,
        mac: None,
        bmc: Some("127.0.0.1:6230".to_string()),
        credentials: Some(format!("file:{}", credentials.path().display())),
        hourly_cost: 0.0,
        capacity: 1,
        broadcast: None,
        endpoint: None,
        region: None,
        image_id: None,
        instance_type: None,
        instance_id: None,
    };
    let provider = IpmiProvider::new();
    let cases = [
        (
            ServerSpec {
                bmc: None,
                ..base.clone()
            },
            "bmc: missing",
        ),
        (
            ServerSpec {
                bmc: Some("127.0.0.1:http".to_string()),
                ..base.clone()
            },
            "is not a number",
        ),
        (
            ServerSpec {
                credentials: None,
                ..base.clone()
            },
            "credentials: missing",
        ),
        (base.clone(), "user:password"),
    ];
    for (server, says) in cases {
        let error = provider.status(&server).await.expect_err("misconfigured");
        assert!(
            matches!(error, PowerError::Config { .. }) && !error.retryable(),
            "{error}"
        );
        assert!(
            error.to_string().contains(says),
            "{error} should say {says:?}"
        );
    }
}
