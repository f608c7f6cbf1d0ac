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

use std::time::{Duration, Instant};

use factory::power::ipmi::IpmiProvider;
use factory::power::{JoinData, PowerError, PowerProvider, PowerState, ProviderKind, ServerSpec};

mod peers;

use peers::bmc::{SimBmc, PASSWORD, USER};
use peers::eventually;

fn alive(pid: i32) -> bool {
    // Reaped processes are gone; ipmi_sim reaps its machine as soon as it ends.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
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
    // The start script records its process id, then becomes the machine (`exec sleep`) under
    // it: a loaded machine may show the script for a moment (a CI run read `/bin/sh` here).
    eventually(
        "the recorded process to become the machine (sleep)",
        async || {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .starts_with("sleep")
                .then_some(())
        },
    )
    .await;
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
