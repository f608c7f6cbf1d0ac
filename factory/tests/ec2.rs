//! The `ec2` power provider against moto (PyPI `moto[server]`), an EC2-compatible server on
//! loopback. `scripts/moto.sh` installs moto into a virtual environment when it is missing; a
//! test fails (never skips) when it cannot.
//!
//! Each test starts its own `moto_server` with authentication on: the first three calls
//! (unauthenticated, `INITIAL_NO_AUTH_ACTION_COUNT=3`) create an IAM user, its EC2 policy and
//! its access key; from then on moto recomputes every request's SigV4 signature with botocore
//! and refuses one that differs, so every call below also checks our signer against AWS's
//! reference implementation, and a wrong secret gets moto's real `AuthFailure`.

use std::process::Command;
use std::time::{Duration, Instant};

use factory::power::ec2::query::{ErrorClass, Instance, QueryClient};
use factory::power::ec2::{client_token, Ec2Provider, SERVER_TAG};
use factory::power::{JoinData, PowerError, PowerProvider, PowerState, ProviderKind, ServerSpec};

mod peers;

use peers::moto::{
    access_key, all_instances, credentials_file, live, start_moto, user_data, Moto, REGION,
};

fn server(name: &str, moto: &Moto, credentials: &str) -> ServerSpec {
    ServerSpec {
        name: name.into(),
        provider: ProviderKind::Ec2,
        mac: None,
        bmc: None,
        credentials: Some(credentials.into()),
        hourly_cost: 0.0104,
        capacity: 1,
        broadcast: None,
        endpoint: Some(moto.endpoint.clone()),
        region: Some(REGION.into()),
        image_id: Some("ami-12345678".into()),
        instance_type: None,
        instance_id: None,
    }
}

/// What a machine booting `instance` would run: its user data, run by `sh` with a `cell` on
/// the PATH that prints its arguments one a line.
async fn boot_arguments(ec2: &QueryClient, instance: &str) -> Vec<String> {
    let script = user_data(ec2, instance).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let cell = dir.path().join("cell");
    std::fs::write(
        &cell,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n",
    )
    .expect("write cell");
    std::fs::set_permissions(&cell, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod cell");
    let user_data = dir.path().join("user-data");
    std::fs::write(&user_data, &script).expect("write user data");
    let out = Command::new("sh")
        .arg(&user_data)
        .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
        .output()
        .expect("run the user data with sh");
    assert!(out.status.success(), "user data failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn join(token: &str) -> JoinData {
    JoinData {
        // Shell metacharacters in the URL: the script must pass it through unchanged.
        join_url: "http://127.0.0.1:7000/join?organism=o1&x=$HOME".into(),
        token: token.into(),
    }
}

#[tokio::test]
async fn run_instances_round_trip() {
    let (moto, moto_start) = start_moto();
    let setup = Instant::now();
    let (id, secret) = access_key(&moto).await;
    let setup = setup.elapsed();
    let (_file, reference) = credentials_file(&id, &secret);
    let server = server("pool-ec2-1", &moto, &reference);
    let provider = Ec2Provider::with_timeout(Duration::from_secs(20)).expect("provider");
    let ec2 = provider.client(&server).expect("client");

    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Off
    );

    let first = join("abcdef.0123456789abcdef");
    let asked = Instant::now();
    provider.power_on(&server, &first).await.expect("power on");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::On
    );
    let round_trip = asked.elapsed();
    eprintln!(
        "moto: listening {moto_start:?} after its start, IAM set up in {setup:?}; \
         power-on request to status On: {round_trip:?}"
    );

    let instances = all_instances(&ec2).await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    let instance = &instances[0];
    assert!(["pending", "running"].contains(&instance.state.name.as_str()));
    assert_eq!(instance.tag(SERVER_TAG), Some("pool-ec2-1"));
    assert_eq!(instance.instance_type.as_deref(), Some("t3.micro"));
    assert_eq!(
        instance.client_token.as_deref(),
        Some(client_token(&server, &first).as_str())
    );
    let mut expected: Vec<String> = first
        .command()
        .split(' ')
        .skip(1)
        .map(String::from)
        .collect();
    assert_eq!(boot_arguments(&ec2, &instance.instance_id).await, expected);

    // The same power-on again (a retry after a lost answer): still that one instance.
    provider
        .power_on(&server, &first)
        .await
        .expect("power on again");
    let again = all_instances(&ec2).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].instance_id, instance.instance_id);

    provider.power_off(&server).await.expect("power off");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Off
    );
    let after = all_instances(&ec2).await;
    assert_eq!(after[0].state.name, "terminated", "{after:?}");
    assert!(live(&after).is_empty(), "{after:?}");
    provider
        .power_off(&server)
        .await
        .expect("power off when off");

    // A new join token runs a new instance, with a new client token and its own user data.
    let second = join("ghijkl.0123456789abcdef");
    provider.power_on(&server, &second).await.expect("power on");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::On
    );
    let now = all_instances(&ec2).await;
    let running = live(&now);
    assert_eq!(running.len(), 1, "{now:?}");
    assert_ne!(running[0].instance_id, instance.instance_id);
    assert_eq!(
        running[0].client_token.as_deref(),
        Some(client_token(&server, &second).as_str())
    );
    expected[4] = second.token.clone();
    assert_eq!(
        boot_arguments(&ec2, &running[0].instance_id).await,
        expected
    );
    provider.power_off(&server).await.expect("power off");
    let end = all_instances(&ec2).await;
    assert!(live(&end).is_empty(), "an instance is left: {end:?}");
}

#[tokio::test]
async fn an_existing_instance_is_started_and_stopped_never_terminated() {
    let (moto, _) = start_moto();
    let (id, secret) = access_key(&moto).await;
    let (_file, reference) = credentials_file(&id, &secret);
    let provider = Ec2Provider::with_timeout(Duration::from_secs(20)).expect("provider");
    let mut server = server("pool-ec2-2", &moto, &reference);
    let ec2 = provider.client(&server).expect("client");

    // The instance an operator made for this server.
    let made: factory::power::ec2::query::Reservation = ec2
        .call_as(
            "RunInstances",
            &[
                ("ImageId".into(), "ami-12345678".into()),
                ("MinCount".into(), "1".into()),
                ("MaxCount".into(), "1".into()),
            ],
        )
        .await
        .expect("RunInstances");
    let instance_id = made.instances.item[0].instance_id.clone();
    server.instance_id = Some(instance_id.clone());
    server.image_id = None;
    let state = |instances: Vec<Instance>| {
        instances
            .into_iter()
            .find(|i| i.instance_id == instance_id)
            .map(|i| i.state.name)
            .expect("the instance exists")
    };

    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::On
    );
    provider.power_off(&server).await.expect("power off");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Off
    );
    assert_eq!(state(all_instances(&ec2).await), "stopped");

    provider
        .power_on(&server, &join("abcdef.0123456789abcdef"))
        .await
        .expect("power on");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::On
    );
    assert_eq!(all_instances(&ec2).await.len(), 1, "no new instance is run");

    provider.power_off(&server).await.expect("power off");
    assert_eq!(
        provider.status(&server).await.expect("status"),
        PowerState::Off
    );
    assert_eq!(state(all_instances(&ec2).await), "stopped");

    // An instance that does not exist: moto's InvalidInstanceID.NotFound, not retried.
    server.instance_id = Some("i-0123456789abcdef0".into());
    match provider.status(&server).await {
        Err(e @ PowerError::Config { .. }) => {
            assert!(e.to_string().contains("InvalidInstanceID.NotFound"), "{e}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    // A 500 without an error document (moto's answer to an action it does not know).
    let e = ec2
        .call("NoSuchAction", &[])
        .await
        .expect_err("unknown action");
    assert_eq!(e.class(), ErrorClass::Transient, "{e}");
}

#[tokio::test]
async fn refused_credentials_are_an_auth_error_and_start_nothing() {
    let (moto, _) = start_moto();
    let (id, secret) = access_key(&moto).await;
    let provider = Ec2Provider::with_timeout(Duration::from_secs(20)).expect("provider");

    for (what, key_id, key) in [
        ("a wrong secret", id.as_str(), "not-the-secret"),
        ("an unknown key", "AKIAUNKNOWNKEY000000", secret.as_str()),
    ] {
        let (_file, reference) = credentials_file(key_id, key);
        let server = server("pool-ec2-3", &moto, &reference);
        let on = provider
            .power_on(&server, &join("abcdef.0123456789abcdef"))
            .await;
        match &on {
            Err(e @ PowerError::Auth { .. }) => {
                assert!(!e.retryable());
                assert!(e.to_string().contains("AuthFailure"), "{what}: {e}");
                assert!(
                    !e.to_string().contains(key),
                    "{what}: the secret leaked: {e}"
                );
            }
            other => panic!("{what}: expected an auth error, got {other:?}"),
        }
        assert!(
            matches!(provider.status(&server).await, Err(PowerError::Auth { .. })),
            "{what}"
        );
        assert!(
            matches!(
                provider.power_off(&server).await,
                Err(PowerError::Auth { .. })
            ),
            "{what}"
        );
    }

    let (_file, reference) = credentials_file(&id, &secret);
    let ec2 = provider
        .client(&server("pool-ec2-3", &moto, &reference))
        .expect("client");
    let instances = all_instances(&ec2).await;
    assert!(instances.is_empty(), "refused requests ran {instances:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    std::env::set_var("HOMEOSTAT_EC2_TEST_UNREACHABLE", "AKIDEXAMPLE:secret");
    let spec = ServerSpec {
        name: "pool-ec2-gone".into(),
        provider: ProviderKind::Ec2,
        mac: None,
        bmc: None,
        credentials: Some("env:HOMEOSTAT_EC2_TEST_UNREACHABLE".into()),
        hourly_cost: 0.0,
        capacity: 1,
        broadcast: None,
        endpoint: Some(format!("http://127.0.0.1:{port}/")),
        region: Some(REGION.into()),
        image_id: Some("ami-12345678".into()),
        instance_type: None,
        instance_id: None,
    };
    let provider = Ec2Provider::with_timeout(Duration::from_secs(5)).expect("provider");
    match provider.status(&spec).await {
        Err(e @ PowerError::Transient { .. }) => assert!(e.retryable()),
        other => panic!("expected a transient error, got {other:?}"),
    }
}
