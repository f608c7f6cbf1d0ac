//! The `wol` provider against a [`WakeListener`] on loopback standing for a pool machine's
//! network card, cross-checked with Debian's `wakeonlan` as a second sender.
//!
//! The "machine" a wake starts is `tests/fixtures/ipmi/machine.sh` (it writes its process id and
//! sleeps). Power-off goes through a [`ShutdownAsker`] that talks over TCP to a small agent
//! standing for the machine's cell, which shuts the machine down.
//!
//! Needs `wakeonlan` (Debian `wakeonlan`): `scripts/pool-tools.sh` installs it. The test fails,
//! naming what to install, when it is missing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use factory::power::wol::{
    magic_packet, Mac, MachineCommand, ShutdownAsker, WakeCounts, WakeListener, WakeState,
    WolProvider,
};
use factory::power::{JoinData, PowerError, PowerProvider, PowerState, ProviderKind, ServerSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

mod peers;

use peers::{eventually, require_tool};

const MAC: Mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];
const MAC_TEXT: &str = "52:54:00:ab:cd:01";
const PATIENCE: Duration = Duration::from_secs(30);

/// The machine a wake starts: writes its pid into `dir/machine.pid`, then sleeps.
fn machine(dir: &Path) -> MachineCommand {
    let script = peers::fixture("ipmi/machine.sh");
    let pid_file = dir.join("machine.pid");
    Box::new(move || {
        let mut command = tokio::process::Command::new(&script);
        command.arg(&pid_file);
        command
    })
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("machine.pid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie waiting to be reaped is dead too.
    !stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

async fn settle(
    listener: &WakeListener,
    what: &str,
    done: impl FnMut(&WakeState) -> bool,
) -> WakeState {
    tokio::time::timeout(PATIENCE, listener.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}: {:?}", listener.state()))
}

fn server(broadcast: SocketAddr, credentials: Option<&Path>) -> ServerSpec {
    ServerSpec {
        name: "pool-wol-1".to_string(),
        provider: ProviderKind::Wol,
        mac: Some(MAC_TEXT.to_string()),
        bmc: None,
        credentials: credentials.map(|p| format!("file:{}", p.display())),
        hourly_cost: 0.1,
        capacity: 1,
        broadcast: Some(broadcast.to_string()),
        endpoint: None,
        region: None,
        image_id: None,
        instance_type: None,
        instance_id: None,
    }
}

fn join_data() -> JoinData {
    JoinData {
        join_url: "http://127.0.0.1:1/join".to_string(),
        token: "abcdef.0123456789abcdef".to_string(),
    }
}

/// Stands for the machine's cell: on `shutdown NAME` it shuts the machine down and says `ok`.
async fn start_agent(listener: Arc<WakeListener>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the agent");
    let address = socket.local_addr().expect("agent address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                continue;
            }
            let answer = match line.trim().strip_prefix("shutdown ") {
                Some(_) => match listener.shut_down_machine(Duration::from_secs(5)).await {
                    Ok(Some(_)) => "ok\n".to_string(),
                    Ok(None) => "not running\n".to_string(),
                    Err(e) => format!("error {e}\n"),
                },
                None => format!("unknown request {line:?}\n"),
            };
            let _ = write.write_all(answer.as_bytes()).await;
        }
    });
    (address, task)
}

/// The test's [`ShutdownAsker`]: a request over TCP to the agent.
struct AgentAsker {
    agent: SocketAddr,
}

#[async_trait::async_trait]
impl ShutdownAsker for AgentAsker {
    async fn ask(&self, server: &ServerSpec) -> Result<(), PowerError> {
        let transient = |detail: String| PowerError::Transient {
            server: server.name.clone(),
            detail,
        };
        let stream = tokio::net::TcpStream::connect(self.agent)
            .await
            .map_err(|e| transient(format!("connecting to the cell: {e}")))?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("shutdown {}\n", server.name).as_bytes())
            .await
            .map_err(|e| transient(format!("asking the cell: {e}")))?;
        let mut answer = String::new();
        BufReader::new(read)
            .read_line(&mut answer)
            .await
            .map_err(|e| transient(format!("reading the cell's answer: {e}")))?;
        match answer.trim() {
            "ok" => Ok(()),
            other => Err(transient(format!("the cell answered {other:?}"))),
        }
    }
}

#[tokio::test]
async fn wake_on_lan_round_trip_with_a_second_sender() {
    let wakeonlan = require_tool("wakeonlan", "wakeonlan");
    let dir = tempfile::tempdir().expect("temporary directory");
    let listener = Arc::new(
        WakeListener::bind(
            "127.0.0.1:0".parse().expect("address"),
            MAC,
            None,
            machine(dir.path()),
        )
        .await
        .expect("bind the wake listener"),
    );
    let (agent, agent_task) = start_agent(listener.clone()).await;
    let provider = WolProvider::new(Arc::new(AgentAsker { agent }));
    let server = server(listener.local_addr(), None);

    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Unknown
    );

    let asked = Instant::now();
    provider
        .power_on(&server, &join_data())
        .await
        .expect("power on");
    let woken = settle(&listener, "the wake", |s| s.machine.is_some()).await;
    let pid = eventually("the machine to write its pid", async || {
        read_pid(dir.path())
    })
    .await;
    eprintln!(
        "wol round trip: machine running {} ms after the power-on request",
        asked.elapsed().as_millis()
    );
    assert_eq!(
        woken.machine,
        u32::try_from(pid).ok(),
        "the listener's machine is the one running"
    );
    assert!(alive(pid));
    assert_eq!(woken.counts.woken, 1);
    // Wake-on-LAN cannot tell power: still Unknown with the machine running.
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Unknown
    );

    // A second packet while it runs changes nothing.
    provider
        .power_on(&server, &join_data())
        .await
        .expect("power on");
    let state = settle(&listener, "the duplicate", |s| s.counts.already_awake == 1).await;
    assert_eq!(state.machine, u32::try_from(pid).ok());

    provider
        .power_off(&server)
        .await
        .expect("power off through the cell");
    let state = settle(&listener, "the machine to stop", |s| s.machine.is_none()).await;
    assert_eq!(state.counts.stopped, 1);
    assert!(!alive(pid), "machine {pid} is gone");
    // Asking again finds no machine: the cell is gone, the asker says so.
    let error = provider
        .power_off(&server)
        .await
        .expect_err("nothing to shut down");
    assert!(error.retryable(), "{error}");

    // Debian's wakeonlan as the second sender.
    std::fs::remove_file(dir.path().join("machine.pid")).expect("forget the first machine");
    let port = listener.local_addr().port().to_string();
    let output = tokio::process::Command::new(&wakeonlan)
        .args(["-i", "127.0.0.1", "-p", &port, MAC_TEXT])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run wakeonlan");
    assert!(output.status.success(), "wakeonlan failed: {output:?}");
    let state = settle(&listener, "wakeonlan's wake", |s| s.counts.woken == 2).await;
    let second = eventually("the second machine's pid", async || read_pid(dir.path())).await;
    assert_ne!(second, pid);
    assert_eq!(state.machine, u32::try_from(second).ok());
    assert_eq!(state.counts.ignored(), 0, "{:?}", state.counts);

    // The listener takes its machine down with it.
    agent_task.abort();
    let _ = agent_task.await;
    drop(Arc::into_inner(listener).expect("the agent released the listener"));
    eventually("the machine to die with the listener", async || {
        (!alive(second)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_the_right_mac_and_secure_on_password_wake_the_machine() {
    let wakeonlan = require_tool("wakeonlan", "wakeonlan");
    let dir = tempfile::tempdir().expect("temporary directory");
    let password = [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f];
    let listener = WakeListener::bind(
        "127.0.0.1:0".parse().expect("address"),
        MAC,
        Some(password),
        machine(dir.path()),
    )
    .await
    .expect("bind the wake listener");
    let target = listener.local_addr();
    let provider = WolProvider::new(Arc::new(AgentAsker {
        agent: "127.0.0.1:9".parse().expect("address"),
    }));
    let sender = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut expected = WakeCounts::default();

    // Garbage of every kind: nothing starts, nothing breaks.
    let mut truncated = magic_packet(&MAC, Some(&password));
    truncated.truncate(80);
    let mut corrupted = magic_packet(&MAC, Some(&password));
    corrupted[40] ^= 0x80;
    for datagram in [
        Vec::new(),
        b"wake up".to_vec(),
        vec![0u8; 1400],
        truncated,
        corrupted,
    ] {
        sender.send_to(&datagram, target).await.expect("send");
        expected.garbage += 1;
        settle(&listener, "garbage counted", |s| s.counts == expected).await;
    }

    // Another machine's packet.
    let other: Mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x02];
    sender
        .send_to(&magic_packet(&other, Some(&password)), target)
        .await
        .expect("send");
    expected.other_mac += 1;
    settle(&listener, "another MAC counted", |s| s.counts == expected).await;

    // No password (Debian's wakeonlan sends none) and a wrong one (through the provider).
    let output = tokio::process::Command::new(&wakeonlan)
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &target.port().to_string(),
            MAC_TEXT,
        ])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run wakeonlan");
    assert!(output.status.success(), "wakeonlan failed: {output:?}");
    expected.bad_password += 1;
    settle(&listener, "no password counted", |s| s.counts == expected).await;
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "0a:1b:2c:3d:4e:00\n").expect("write credentials");
    provider
        .power_on(&server(target, Some(&wrong)), &join_data())
        .await
        .expect("the packet is sent");
    expected.bad_password += 1;
    let state = settle(&listener, "a wrong password counted", |s| {
        s.counts == expected
    })
    .await;
    assert_eq!(state.machine, None);
    assert_eq!(read_pid(dir.path()), None, "no machine started");

    // The right password wakes it.
    let right = dir.path().join("password");
    std::fs::write(&right, "0a:1b:2c:3d:4e:5f\n").expect("write credentials");
    provider
        .power_on(&server(target, Some(&right)), &join_data())
        .await
        .expect("power on");
    expected.woken += 1;
    let state = settle(&listener, "the wake", |s| s.counts == expected).await;
    let pid = eventually("the machine's pid", async || read_pid(dir.path())).await;
    assert_eq!(state.machine, u32::try_from(pid).ok());
    assert!(alive(pid));
    // Five kinds of garbage, another MAC, no password and a wrong one.
    assert_eq!(state.counts.ignored(), 8);

    drop(listener);
    eventually("the machine to die with the listener", async || {
        (!alive(pid)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_wol_server_without_a_good_mac_password_or_address_is_misconfigured() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let bad_password = dir.path().join("bad-password");
    std::fs::write(&bad_password, "letmein").expect("write credentials");
    let provider = WolProvider::new(Arc::new(AgentAsker {
        agent: "127.0.0.1:9".parse().expect("address"),
    }));
    let base = server("127.0.0.1:9".parse().expect("address"), None);
    let cases = [
        (
            ServerSpec {
                mac: None,
                ..base.clone()
            },
            "mac: missing",
        ),
        (
            ServerSpec {
                mac: Some("52:54:00:ab:cd".to_string()),
                ..base.clone()
            },
            "mac:",
        ),
        (
            ServerSpec {
                credentials: Some(format!("file:{}", bad_password.display())),
                ..base.clone()
            },
            "SecureOn password",
        ),
        (
            ServerSpec {
                broadcast: Some("127.0.0.1".to_string()),
                ..base.clone()
            },
            "broadcast",
        ),
        (
            ServerSpec {
                broadcast: Some("127.0.0.1:discard".to_string()),
                ..base.clone()
            },
            "broadcast",
        ),
    ];
    for (server, says) in cases {
        let error = provider
            .power_on(&server, &join_data())
            .await
            .expect_err("misconfigured");
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
