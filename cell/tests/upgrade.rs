//! Live upgrade, through the real `cell up` and `cell upgrade`: while clients search through
//! the front doors and a crawl runs, every cell is replaced, one at a time, by a cell of a
//! second build of the binary (mitosis before apoptosis), with no failed client request, the
//! crawl exact against the oracle, and no role ever above its maximum plus one. A build that
//! never becomes ready is rolled back with the same guarantees. The upgrade runs on the
//! embedded engines and on PostgreSQL and RabbitMQ, and over crawlers that are pool machines
//! (which join running the release they download), within the purse's cap.
//!
//! The second build is a genuinely different artifact: a copy of the `cell` executable with
//! bytes appended (an ELF loader ignores trailing data), so its digest, and the build its cells
//! name in their heartbeats, differ. The broken build is a script that never prints a ready
//! line nor heartbeats: the factory's start of it times out, twice, and the organism returns
//! to the build it ran.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::control::{CellRecord, CellsResponse};
use support::{
    amqp_url, assert_exact, cell_command, delete_queues, drop_database, fresh_database, infra_toml,
    serve_web, with_queue_name, Organism, Web, THREE_LOCAL_MACHINES,
};
use synthweb::WebSpec;

/// The organisms of this file run one after the other (two on two cores starve each other).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every role's maximum; the upgrade may take a role one above it, never more.
const EXTRA: &str = r#"
[roles.api]
min = 2
max = 2

[roles.crawler]
min = 2
max = 2

[roles.frontdoor]
min = 2
max = 2

[roles.healthchecker]
min = 2
max = 2
"#;

const MAXIMUM: u64 = 2;

fn web_spec(seed: u64, pages: usize) -> WebSpec {
    WebSpec {
        seed,
        pages,
        hosts: 6,
        latency: Duration::from_millis(2),
    }
}

/// A second build of `cell`: a copy with bytes appended, at `DATA/releases/VERSION/cell`.
fn second_build(data: &Path, version: &str) -> PathBuf {
    let dir = data.join("releases").join(version);
    std::fs::create_dir_all(&dir).expect("releases dir");
    let path = dir.join("cell");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_cell")).expect("read cell");
    bytes.extend_from_slice(format!("\nhomeostat test release {version}\n").as_bytes());
    std::fs::write(&path, bytes).expect("write the second build");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// A build that never becomes ready: it prints nothing and never heartbeats.
fn broken_build(dir: &Path) -> PathBuf {
    let path = dir.join("broken-cell");
    std::fs::write(&path, "#!/bin/sh\nexec sleep 600\n").expect("write the broken build");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// Clients searching through both front doors, back to back, until stopped; every failure
/// (a status other than 200, or no answer) is kept.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(org: &Organism, web: &Web) -> Load {
        let words: Vec<String> = web.web.rare_words(8).into_iter().map(|(w, _)| w).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let door = org.frontdoors[i % org.frontdoors.len()].clone();
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            let words = words.clone();
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let mut n = i;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let word = &words[n % words.len()];
                    let sent = http
                        .get(format!("{door}/search"))
                        .query(&[("q", word.as_str()), ("limit", "5")])
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().is_success() => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let body = r.text().await.unwrap_or_default();
                            failures
                                .lock()
                                .expect("lock")
                                .push(format!("{door}: {status} {body}"));
                        }
                        Err(e) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("{door}: {e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Stop, and answer (requests answered, failures).
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("load task");
        }
        let failures = self.failures.lock().expect("lock").clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

/// Reads the registry every 50 ms until stopped: the most cells each role had at once
/// (draining ones included), counting processes, not entries: the cells both health checkers
/// list, deduplicated, whose process is running. A cell that has just exited stays listed by a
/// health checker until its failure detector notices (a fraction of a second); a count of
/// entries would take it for one more cell.
struct Census {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<String, usize>>,
}

impl Census {
    fn start(org: &Organism) -> Census {
        let stop = Arc::new(AtomicBool::new(false));
        let (hcs, client, flag) = (org.healthcheckers.clone(), org.client.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut most: BTreeMap<String, usize> = BTreeMap::new();
            while !flag.load(Ordering::SeqCst) {
                let mut listed: BTreeMap<String, CellRecord> = BTreeMap::new();
                for hc in &hcs {
                    let Ok(resp) = client.get(format!("{hc}/cells")).send().await else {
                        continue;
                    };
                    if let Ok(view) = resp.json::<CellsResponse>().await {
                        for cell in view.roles.into_values().flatten() {
                            listed.insert(cell.cell_id.clone(), cell);
                        }
                    }
                }
                let mut now: BTreeMap<String, usize> = BTreeMap::new();
                for cell in listed.into_values().filter(runs) {
                    *now.entry(cell.role).or_default() += 1;
                }
                for (role, n) in now {
                    let most = most.entry(role).or_default();
                    *most = (*most).max(n);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            most
        });
        Census { stop, task }
    }

    async fn finish(self) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("census")
    }
}

/// Whether `cell`'s process is running: its pid's command line names the cell (a reused pid
/// or an exited, unreaped process does not). A cell that reports no pid counts.
fn runs(cell: &CellRecord) -> bool {
    let Some(pid) = cell.pid else {
        return true;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let id = cell.cell_id.as_bytes();
    cmdline.windows(id.len()).any(|w| w == id)
}

/// Every cell of the organism by role, with the build it names.
async fn builds(org: &Organism) -> Vec<(String, String, String)> {
    for hc in &org.healthcheckers {
        let Ok(resp) = org.client.get(format!("{hc}/cells")).send().await else {
            continue;
        };
        if let Ok(view) = resp.json::<CellsResponse>().await {
            return view
                .roles
                .into_values()
                .flatten()
                .map(|c| (c.role, c.cell_id, c.build))
                .collect();
        }
    }
    Vec::new()
}

/// Wait until every cell (factories included) names `build`.
async fn wait_all_on(org: &Organism, build: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let cells = builds(org).await;
        let roles: std::collections::BTreeSet<&str> =
            cells.iter().map(|(r, _, _)| r.as_str()).collect();
        if roles.len() == 5 && cells.iter().all(|(_, _, b)| b == build) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every cell on {build} within {limit:?}: {cells:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cell upgrade --to TO` against the organism: its exit status and output.
async fn cell_upgrade(org: &Organism, to: &str, ready_secs: u64) -> (bool, String) {
    cell_upgrade_within(org, to, ready_secs, 150).await
}

async fn cell_upgrade_within(
    org: &Organism,
    to: &str,
    ready_secs: u64,
    timeout_secs: u64,
) -> (bool, String) {
    let out = cell_command()
        .arg("upgrade")
        .arg("--to")
        .arg(to)
        .arg("--infra")
        .arg(org.dir.path().join("organism.toml"))
        .arg("--ready-secs")
        .arg(ready_secs.to_string())
        .arg("--timeout-secs")
        .arg(timeout_secs.to_string())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .expect("run cell upgrade");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("cell upgrade --to {to}:\n{text}");
    (out.status.success(), text)
}

fn assert_within_maximum_plus_one(most: &BTreeMap<String, usize>) {
    for role in ["api", "crawler", "frontdoor", "healthchecker"] {
        let n = most.get(role).copied().unwrap_or(0) as u64;
        assert!(n >= MAXIMUM, "{role}: the census saw {n} cells");
        assert!(
            n <= MAXIMUM + 1,
            "{role} had {n} cells at once, above its maximum ({MAXIMUM}) plus one"
        );
    }
}

/// Upgrade a running organism to a second build while clients search and a crawl runs: on the
/// embedded engines, or (`cluster`) on PostgreSQL and RabbitMQ, which the old and the new cells
/// share throughout.
async fn upgrade_under_load(seed: u64, cluster: bool) {
    let _one = ONE_AT_A_TIME.lock().await;
    let web = serve_web(web_spec(seed, 500)).await;
    let database = if cluster {
        Some(fresh_database("homeostat_upgrade").await)
    } else {
        None
    };
    let queue = database
        .as_ref()
        .map(|(name, _)| format!("homeostat.upgrade.{}.{name}", std::process::id()));
    let org = match (&database, &queue) {
        (Some((_, url)), Some(queue)) => {
            let engines = format!(
                "{EXTRA}\n[engines]\ndatabase = \"{url}\"\nqueue = \"{amqp}\"\n",
                amqp = amqp_url()
            );
            let dir = tempfile::tempdir().expect("tempdir");
            let toml = with_queue_name(&infra_toml(dir.path(), &web, 4.0, &engines), queue);
            Organism::up(&toml, dir).await
        }
        _ => Organism::on(&web, 4.0, EXTRA).await,
    };
    let old = control::build::of_file(Path::new(env!("CARGO_BIN_EXE_cell"))).expect("old build");
    let new_exe = second_build(&org.data_dir(), "2");
    let new = control::build::of_file(&new_exe).expect("new build");
    assert_ne!(old, new, "the second build is another artifact");
    wait_all_on(&org, &old, Duration::from_secs(30)).await;

    let census = Census::start(&org);
    let load = Load::start(&org, &web);
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    // `--to 2`: the version, found in the data directory's releases.
    let started = tokio::time::Instant::now();
    let (ok, output) = cell_upgrade(&org, "2", 30).await;
    assert!(ok, "the upgrade succeeded:\n{output}");
    wait_all_on(&org, &new, Duration::from_secs(60)).await;
    let took = started.elapsed();
    org.wait_drained(Duration::from_secs(120), |_| {}).await;
    let (answered, failures) = load.finish().await;
    let most = census.finish().await;
    eprintln!("upgraded in {took:?}; {answered} searches answered; most cells at once: {most:?}");

    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(answered > 100, "the load ran ({answered} answered)");
    assert_within_maximum_plus_one(&most);
    let expected = web.web.expect(&seeds, None);
    let indexed = match &database {
        None => org.indexed().await,
        Some((_, url)) => org.indexed_pg(url).await,
    };
    assert_exact(&web.web, &indexed, &expected);
    org.stop().await;
    if let Some((name, _)) = database {
        drop_database(&name).await;
    }
    if let Some(queue) = queue {
        delete_queues(&amqp_url(), &queue).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_replaces_every_cell_with_no_failed_request() {
    upgrade_under_load(71, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_on_postgres_and_rabbitmq_replaces_every_cell_with_no_failed_request() {
    upgrade_under_load(72, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_never_becomes_ready_is_rolled_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let web = serve_web(web_spec(73, 300)).await;
    let org = Organism::on(&web, 6.0, EXTRA).await;
    let old = control::build::of_file(Path::new(env!("CARGO_BIN_EXE_cell"))).expect("old build");
    let broken = broken_build(org.dir.path());
    wait_all_on(&org, &old, Duration::from_secs(30)).await;

    let census = Census::start(&org);
    let load = Load::start(&org, &web);
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    let (ok, output) = cell_upgrade(&org, broken.to_str().expect("utf-8"), 3).await;
    assert!(!ok, "the broken upgrade reports its failure:\n{output}");
    assert!(
        output.contains("runs") && output.contains("again"),
        "{output}"
    );
    // Still (again) one build everywhere, and new cells start from it.
    wait_all_on(&org, &old, Duration::from_secs(30)).await;
    let release = std::fs::read_to_string(org.data_dir().join("release")).expect("release file");
    assert_eq!(
        control::build::of_file(Path::new(release.trim())).expect("release build"),
        old,
        "the old build is the release again"
    );
    org.wait_drained(Duration::from_secs(120), |_| {}).await;
    let (answered, failures) = load.finish().await;
    let most = census.finish().await;
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(answered > 50, "the load ran ({answered} answered)");
    assert_within_maximum_plus_one(&most);
    let expected = web.web.expect(&seeds, None);
    assert_exact(&web.web, &org.indexed().await, &expected);
    org.stop().await;
}

/// Reads the pool's inventory every 50 ms until stopped: the most machines spending at once.
struct Machines {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl Machines {
    fn start(ledger: engines::pool::PoolLedger) -> Machines {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut most = 0;
            while !flag.load(Ordering::SeqCst) {
                if let Ok(servers) = ledger.servers().await {
                    most = most.max(servers.iter().filter(|s| s.state.spends()).count());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            most
        });
        Machines { stop, task }
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("machines")
    }
}

/// Upgrade an organism whose crawlers are pool machines (booted from the old `cell`) while a
/// crawl runs and clients search: each new crawler is a machine the purse admits, which joins,
/// downloads the release from the factory, checks it and runs it; each old one retires and its
/// machine is powered off. `per_hour` is the cap: room for a third machine (mitosis first) or
/// for two only (the old cell retires first). The spend never passes the cap.
async fn upgrade_on_pool(seed: u64, per_hour: &str, cap_machines: usize) {
    let _one = ONE_AT_A_TIME.lock().await;
    let web = serve_web(web_spec(seed, 300)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pool.toml"), THREE_LOCAL_MACHINES).expect("pool.toml");
    std::fs::write(
        dir.path().join("budget.toml"),
        format!("per_hour = {per_hour}\nper_month = 100.00\n"),
    )
    .expect("budget.toml");
    let extra = format!(
        "{EXTRA}\n[pool]\nfile = \"pool.toml\"\nbudget = \"budget.toml\"\nroles = [\"crawler\"]\n\
         boot_timeout_secs = 60\nbackoff_secs = 0.5\n"
    );
    let mut org = Organism::up(&infra_toml(dir.path(), &web, 4.0, &extra), dir).await;
    let ledger = engines::pool::PoolLedger::open_sqlite(
        org.data_dir().join("store.db").to_str().expect("utf-8"),
    )
    .await
    .expect("the organism's pool inventory");
    let old = control::build::of_file(Path::new(env!("CARGO_BIN_EXE_cell"))).expect("old build");
    let new_exe = second_build(&org.data_dir(), "2");
    let new = control::build::of_file(&new_exe).expect("new build");
    wait_all_on(&org, &old, Duration::from_secs(90)).await;
    let crawlers = org.cells_of("crawler").await;
    assert!(
        crawlers.iter().all(|c| c.cell_id.starts_with("pool-")),
        "the crawlers are pool machines: {crawlers:?}"
    );

    let machines = Machines::start(ledger.clone());
    let census = Census::start(&org);
    let load = Load::start(&org, &web);
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    let (ok, output) = cell_upgrade_within(&org, "2", 30, 400).await;
    assert!(ok, "the upgrade succeeded:\n{output}");
    if cap_machines == 2 {
        assert!(output.contains("retires first"), "{output}");
    } else {
        assert!(!output.contains("retires first"), "{output}");
    }
    wait_all_on(&org, &new, Duration::from_secs(60)).await;
    org.wait_drained(Duration::from_secs(120), |_| {}).await;
    let (answered, failures) = load.finish().await;
    let most = census.finish().await;
    let most_machines = machines.finish().await;
    eprintln!("{answered} searches answered; most cells at once: {most:?}; most machines spending at once: {most_machines}");

    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert_within_maximum_plus_one(&most);
    assert!(
        most_machines <= cap_machines,
        "{most_machines} machines spent at once; the cap allows {cap_machines}"
    );
    // The new crawlers are pool machines that run the release they downloaded and checked.
    let crawlers = org.cells_of("crawler").await;
    let servers = ledger.servers().await.expect("servers");
    for c in &crawlers {
        assert_eq!(c.build, new, "{c:?}");
        let server = servers
            .iter()
            .find(|s| s.cell_id.as_deref() == Some(&c.cell_id) && s.state.spends())
            .unwrap_or_else(|| panic!("{} runs on no pool machine: {servers:#?}", c.cell_id));
        let kept = org
            .data_dir()
            .join("machines")
            .join(&server.name)
            .join(format!("cell-{}", control::build::digest(&new)));
        assert!(
            kept.is_file(),
            "{} holds no release at {kept:?}",
            server.name
        );
    }
    // The old crawlers' machines are off: only the new ones spend.
    assert_eq!(
        servers.iter().filter(|s| s.state.spends()).count(),
        2,
        "{servers:#?}"
    );
    let expected = web.web.expect(&seeds, None);
    assert_exact(&web.web, &org.indexed().await, &expected);
    let _kept = std::mem::replace(&mut org.dir, tempfile::tempdir().expect("tempdir"));
    org.stop().await;
    let servers = ledger.servers().await.expect("servers");
    assert!(
        servers.iter().all(|s| !s.state.spends()),
        "machines still spending after the organism stopped: {servers:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_machines_are_upgraded_a_machine_at_a_time_within_the_cap() {
    upgrade_on_pool(74, "1.50", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_room_for_one_more_machine_an_old_pool_cell_retires_first() {
    upgrade_on_pool(75, "1.00", 2).await;
}
