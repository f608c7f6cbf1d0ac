//! The pool's round trips through each hardware and cloud provider, end to end: an organism whose
//! crawlers come from the pool asks its factory for one; the purse admits a server; the
//! provider powers it on (a BMC simulator, a magic packet, an EC2 API); the machine runs a blank
//! `cell boot` that redeems its one-time token, becomes a crawler and heartbeats; the inventory
//! says `joined`. Then the factory is asked to stop that cell: the provider powers the machine
//! off (chassis off; a retire order the cell obeys; the instance terminated), the inventory
//! says `off`, its spend is closed, and the provider's own view agrees.
//!
//! The peers are real: OpenIPMI's `ipmi_sim` (cross-checked with `ipmitool`), a
//! [`WakeListener`] standing for a network card, and the `moto` EC2 server, whose instances
//! this test "boots" by running their user data, as a hypervisor would, and shuts down when
//! moto says they stopped. Each prints its round trip (power-on request to a live cell) from the
//! inventory's own transition times.

mod support;

#[path = "../../factory/tests/peers/mod.rs"]
mod peers;

use std::path::{Path, PathBuf};
use std::time::Duration;

use engines::pool::{PoolLedger, ServerState, Transition};
use factory::power::wol::{parse_six_bytes, WakeListener};
use factory::power::PowerState;
use support::{infra_toml, serve_web, Organism};
use synthweb::WebSpec;

/// A pool of one crawler machine; the budget leaves room.
fn pool_extra(boot_timeout_secs: u64) -> String {
    format!(
        r#"
[roles.crawler]
min = 1
max = 2

[pool]
file = "pool.toml"
budget = "budget.toml"
roles = ["crawler"]
boot_dir = "boot"
boot_timeout_secs = {boot_timeout_secs}
backoff_secs = 0.5
"#
    )
}

/// An organism on a small web whose crawlers come from the pool `pool_toml` declares.
async fn organism(dir: tempfile::TempDir, pool_toml: &str) -> (support::Web, Organism) {
    let web = serve_web(WebSpec {
        seed: 33,
        pages: 40,
        hosts: 2,
        latency: Duration::ZERO,
    })
    .await;
    std::fs::write(dir.path().join("pool.toml"), pool_toml).expect("pool.toml");
    std::fs::write(
        dir.path().join("budget.toml"),
        "per_hour = 10.00\nper_month = 1000.00\n",
    )
    .expect("budget.toml");
    let infra = infra_toml(dir.path(), &web, 200.0, &pool_extra(60));
    let org = Organism::up(&infra, dir).await;
    (web, org)
}

async fn ledger(org: &Organism) -> PoolLedger {
    let store = org.data_dir().join("store.db");
    PoolLedger::open_sqlite(store.to_str().expect("utf-8"))
        .await
        .expect("the organism's pool inventory")
}

/// Wait until the inventory's history of `server` satisfies `done`; returns the history.
async fn wait_history(
    ledger: &PoolLedger,
    server: &str,
    what: &str,
    done: impl Fn(&[Transition]) -> bool,
) -> Vec<Transition> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let history = ledger.transitions(server).await.expect("history");
        if done(&history) {
            return history;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{server}: no {what} within 90 s: {history:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(history: &[Transition], to: &str) -> usize {
    history.iter().filter(|t| t.to == to).count()
}

/// The `nth` join of `server` (1-based): checks that its cell is a live crawler, prints and
/// returns the round trip from the power-on request (off → powering-on) to `joined`, as the
/// inventory recorded them.
async fn joined_round_trip(
    org: &Organism,
    ledger: &PoolLedger,
    server: &str,
    nth: usize,
) -> (String, i64) {
    let history = wait_history(ledger, server, "join", |h| count(h, "joined") >= nth).await;
    let joined = history
        .iter()
        .enumerate()
        .filter(|(_, t)| t.to == "joined")
        .nth(nth - 1)
        .map(|(i, _)| i)
        .expect("counted");
    let asked = history[..joined]
        .iter()
        .rev()
        .find(|t| t.to == "powering-on" && t.from == "off")
        .unwrap_or_else(|| panic!("no power-on request before the join: {history:#?}"));
    let round_trip = history[joined].at_ms - asked.at_ms;
    let row = ledger
        .server(server)
        .await
        .expect("inventory")
        .expect("declared");
    let cell = row.cell_id.clone().expect("a joined server names its cell");
    if nth == 1 {
        assert_eq!(row.state, ServerState::Joined, "{history:#?}");
        assert_eq!(row.role.as_deref(), Some("crawler"));
        let crawlers = org.cells_of("crawler").await;
        assert!(
            crawlers.iter().any(|c| c.cell_id == cell),
            "{cell} is not a live crawler: {crawlers:?}"
        );
    }
    eprintln!(
        "{server} ({}): join {nth}: power-on request to a live crawler in {round_trip} ms",
        row.provider
    );
    assert_eq!(ledger.lineage().await.expect("lineage").len(), nth);
    (cell, round_trip)
}

/// Ask the organism's factory to stop `cell`; the factory powers its machine off.
async fn stop_cell(org: &Organism, cell: &str) {
    let file: serde_json::Value = serde_json::from_slice(
        &std::fs::read(org.data_dir().join("organism.json")).expect("organism.json"),
    )
    .expect("organism.json is JSON");
    let factory = file["factories"][0].as_str().expect("a factory");
    let client = control::ControlClient::new(control::Signer::new(support::test_key(), "test"));
    let reply: serde_json::Value = client
        .send(
            factory,
            "/control/stop",
            protocol::control::StopRequest::KIND,
            &protocol::control::StopRequest {
                cell_id: cell.into(),
                reason: "the test takes the machine out".into(),
            },
        )
        .await
        .expect("the factory answers");
    assert_eq!(reply["stopped"], true, "{reply}");
}

/// After the stop: the inventory recorded the power-off as confirmed, and the machine's first
/// spend is closed and adds up. (The crawlers' minimum then asks the pool for a machine again,
/// which powers the same server on anew: the second join the tests also wait for.)
async fn powered_off(ledger: &PoolLedger, server: &str) {
    wait_history(ledger, server, "confirmed power-off after the join", |h| {
        h.iter()
            .skip_while(|t| t.to != "joined")
            .any(|t| t.to == "off")
    })
    .await;
    let rows = ledger.spend_rows().await.expect("spend");
    let first = rows
        .iter()
        .find(|r| r.server == server)
        .unwrap_or_else(|| panic!("no spend for {server}: {rows:#?}"));
    let end = first.ended_at_ms.expect("the first spend is closed");
    assert_eq!(
        first.amount_micros,
        Some(engines::pool::accrue(
            first.hourly_cost_micros,
            first.started_at_ms,
            end
        ))
    );
}

/// The machines' log level: the tests' own (`HOMEOSTAT_TEST_LOG`, default `warn`).
fn machine_log() -> String {
    std::env::var("HOMEOSTAT_TEST_LOG").unwrap_or_else(|_| "warn".into())
}

/// Keep the organism's directory past its stop, so the inventory can be read after it.
fn org_dir_kept(org: &mut Organism) -> tempfile::TempDir {
    std::mem::replace(&mut org.dir, tempfile::tempdir().expect("tempdir"))
}

/// `cell boot` as a pool machine runs it, reading its join data from the boot volume; the
/// engines' environment variables are dropped so that only the organism's configuration counts.
fn boot_program(dir: &Path, server: &str) -> Vec<String> {
    [
        "env",
        "-u",
        "DATABASE_URL",
        "-u",
        "AMQP_URL",
        &format!("HOMEOSTAT_LOG={}", machine_log()),
        env!("CARGO_BIN_EXE_cell"),
        "boot",
        "--token-file",
        &dir.join("boot")
            .join(format!("{server}.join"))
            .to_string_lossy(),
        "--hostname",
        server,
        "--state-dir",
        &dir.join(format!("state-{server}")).to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipmi_machine_boots_joins_and_is_powered_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = peers::bmc::SimBmc::start_running(&boot_program(dir.path(), "box-ipmi")).await;
    let credentials = sim.credentials_file(peers::bmc::USER, peers::bmc::PASSWORD);
    let pool = format!(
        "[[server]]\nname = \"box-ipmi\"\nprovider = \"ipmi\"\nbmc = \"{}\"\ncredentials = \"file:{}\"\nhourly_cost = 0.25\n",
        sim.address(),
        credentials.display()
    );
    let (_web, mut org) = organism(dir, &pool).await;
    let ledger = ledger(&org).await;
    let (cell, _) = joined_round_trip(&org, &ledger, "box-ipmi", 1).await;
    // The factory's view and a second IPMI client's agree: on.
    assert_eq!(sim.ipmitool_status().await, PowerState::On);
    let pid = sim.machine_pid().expect("the machine runs");
    let crawler = org.cells_of("crawler").await;
    assert_eq!(
        crawler
            .iter()
            .find(|c| c.cell_id == cell)
            .and_then(|c| c.pid),
        Some(pid as u32),
        "the crawler is the machine's own process"
    );

    stop_cell(&org, &cell).await;
    powered_off(&ledger, "box-ipmi").await;
    peers::eventually("the first machine's process to end", async || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            .is_err()
            .then_some(())
    })
    .await;
    // The crawlers' minimum powers it on again: a second round trip.
    joined_round_trip(&org, &ledger, "box-ipmi", 2).await;
    assert_eq!(sim.ipmitool_status().await, PowerState::On);

    // The organism stops: the machine is powered off, and ipmitool agrees with the inventory.
    let _kept = org_dir_kept(&mut org);
    org.stop().await;
    let row = ledger
        .server("box-ipmi")
        .await
        .expect("inventory")
        .expect("declared");
    assert_eq!(row.state, ServerState::Off);
    assert_eq!(sim.ipmitool_status().await, PowerState::Off);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_on_lan_machine_boots_joins_and_retires_when_powered_off() {
    const MAC: &str = "52:54:00:ab:cd:42";
    let dir = tempfile::tempdir().expect("tempdir");
    let program = boot_program(dir.path(), "box-wol");
    let machine: factory::power::wol::MachineCommand = Box::new(move || {
        let mut command = tokio::process::Command::new(&program[0]);
        command.args(&program[1..]);
        command
    });
    let card = WakeListener::bind(
        "127.0.0.1:0".parse().expect("addr"),
        parse_six_bytes(MAC).expect("mac"),
        None,
        machine,
    )
    .await
    .expect("bind the wake listener");
    let pool = format!(
        "[[server]]\nname = \"box-wol\"\nprovider = \"wol\"\nmac = \"{MAC}\"\nbroadcast = \"{}\"\nhourly_cost = 0.10\n",
        card.local_addr()
    );
    let (_web, org) = organism(dir, &pool).await;
    let ledger = ledger(&org).await;
    let (cell, _) = joined_round_trip(&org, &ledger, "box-wol", 1).await;
    let woken = card.state();
    assert_eq!(woken.counts.woken, 1, "{:?}", woken.counts);
    assert!(woken.machine.is_some());

    // Power-off: the factory orders the cell to retire; it drains and its machine stops.
    stop_cell(&org, &cell).await;
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        card.wait_for(|s| s.counts.stopped >= 1),
    )
    .await
    .expect("the machine stops after its cell retired");
    assert_eq!(stopped.counts.stopped, 1, "{:?}", stopped.counts);
    powered_off(&ledger, "box-wol").await;
    let history = ledger.transitions("box-wol").await.expect("history");
    assert!(
        !history.iter().any(|t| t.to == "quarantined"),
        "{history:#?}"
    );
    // The crawlers' minimum wakes it again.
    joined_round_trip(&org, &ledger, "box-wol", 2).await;
    assert_eq!(card.counts().woken, 2);
    assert_eq!(card.counts().ignored(), 0);
    org.stop().await;
}

/// Plays the hypervisor for moto, which keeps instances as records only: an instance that is
/// pending or running and has not been booted is booted (its user data run by `sh`, with the
/// `cell` under test on the PATH, in a process group of its own); one that moto says is
/// stopping, stopped, shutting down or terminated has its machine killed.
struct Hypervisor {
    machines: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hypervisor {
    fn start(ec2: factory::power::ec2::query::QueryClient, dir: PathBuf) -> Hypervisor {
        let machines = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
            String,
            u32,
        >::new()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cell"), bin.join("cell"))
            .expect("link cell");
        let running = machines.clone();
        let task = tokio::spawn(async move {
            let mut children: std::collections::BTreeMap<String, tokio::process::Child> =
                Default::default();
            loop {
                for instance in peers::moto::all_instances(&ec2).await {
                    let id = instance.instance_id.clone();
                    let state = instance.state.name.as_str();
                    let up = matches!(state, "pending" | "running");
                    if up && !children.contains_key(&id) {
                        let script = peers::moto::user_data(&ec2, &id).await;
                        let path = dir.join(format!("{id}.user-data"));
                        std::fs::write(&path, script).expect("write user data");
                        let child = tokio::process::Command::new("sh")
                            .arg(&path)
                            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                            .env("TMPDIR", &dir)
                            .env_remove("DATABASE_URL")
                            .env_remove("AMQP_URL")
                            .env("HOMEOSTAT_LOG", machine_log())
                            .process_group(0)
                            .kill_on_drop(true)
                            .spawn()
                            .expect("boot the instance");
                        let pid = child.id().expect("pid");
                        running.lock().expect("lock").insert(id.clone(), pid);
                        children.insert(id, child);
                    } else if !up {
                        if let Some(mut child) = children.remove(&id) {
                            if let Some(pid) = child.id() {
                                let _ = nix::sys::signal::killpg(
                                    nix::unistd::Pid::from_raw(pid as i32),
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                            }
                            let _ = child.wait().await;
                            running.lock().expect("lock").remove(&id);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Hypervisor { machines, task }
    }

    fn running(&self) -> Vec<(String, u32)> {
        let machines = self.machines.lock().expect("lock");
        machines.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.task.abort();
        for (_, pid) in self.running() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_instance_boots_from_user_data_joins_and_is_terminated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (moto, _) = peers::moto::start_moto();
    let (id, secret) = peers::moto::access_key(&moto).await;
    let credentials = dir.path().join("aws-credentials");
    std::fs::write(&credentials, format!("{id}:{secret}\n")).expect("credentials");
    let pool = format!(
        "[[server]]\nname = \"box-ec2\"\nprovider = \"ec2\"\nendpoint = \"{}\"\nregion = \"{}\"\nimage_id = \"ami-12345678\"\ncredentials = \"file:{}\"\nhourly_cost = 0.0104\n",
        moto.endpoint,
        peers::moto::REGION,
        credentials.display()
    );
    let spec = factory::power::ServerSpec {
        name: "box-ec2".into(),
        provider: factory::power::ProviderKind::Ec2,
        mac: None,
        bmc: None,
        credentials: Some(format!("file:{}", credentials.display())),
        hourly_cost: 0.0104,
        capacity: 1,
        broadcast: None,
        endpoint: Some(moto.endpoint.clone()),
        region: Some(peers::moto::REGION.into()),
        image_id: Some("ami-12345678".into()),
        instance_type: None,
        instance_id: None,
    };
    let ec2 = factory::power::ec2::Ec2Provider::new()
        .expect("provider")
        .client(&spec)
        .expect("client");
    let hypervisor = Hypervisor::start(ec2.clone(), dir.path().join("hypervisor"));
    let (_web, mut org) = organism(dir, &pool).await;
    let ledger = ledger(&org).await;
    let (cell, _) = joined_round_trip(&org, &ledger, "box-ec2", 1).await;
    let first = hypervisor.running();
    assert_eq!(first.len(), 1, "{first:?}");

    stop_cell(&org, &cell).await;
    powered_off(&ledger, "box-ec2").await;
    let instances = peers::moto::all_instances(&ec2).await;
    let first_instance = instances
        .iter()
        .find(|i| i.instance_id == first[0].0)
        .expect("moto knows the first instance");
    assert_eq!(first_instance.state.name, "terminated");
    peers::eventually("the first instance's machine to be shut down", async || {
        (!hypervisor.running().iter().any(|(id, _)| *id == first[0].0)).then_some(())
    })
    .await;
    // The crawlers' minimum runs a new instance.
    joined_round_trip(&org, &ledger, "box-ec2", 2).await;

    // The organism stops: its instance is terminated; none is left.
    let _kept = org_dir_kept(&mut org);
    org.stop().await;
    let instances = peers::moto::all_instances(&ec2).await;
    assert!(
        peers::moto::live(&instances).is_empty(),
        "an instance is left: {:?}",
        instances
            .iter()
            .map(|i| (&i.instance_id, &i.state.name))
            .collect::<Vec<_>>()
    );
    let row = ledger
        .server("box-ec2")
        .await
        .expect("inventory")
        .expect("declared");
    assert_eq!(row.state, ServerState::Off);
    peers::eventually("every instance's machine to be shut down", async || {
        hypervisor.running().is_empty().then_some(())
    })
    .await;
}
