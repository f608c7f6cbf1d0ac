//! The hostile synthetic web (`synthweb::hostile`), crawled by a whole organism: every hostile
//! URL ends with the outcome its oracle expects (indexed under its title, or failed with a
//! named reason), the calendar trap ends at the per-host budget, the crawl-delay and the 429's
//! Retry-After are honoured, no cell crashes, and no crawler's memory passes its cap.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::Row;
use support::{infra_toml, serve_web, Organism};
use synthweb::hostile::{self, Expect};
use synthweb::WebSpec;

/// The per-host budget of this organism: the calendar trap stops there.
const HOST_BUDGET: u64 = 40;
/// Peak resident memory no crawler may pass while it eats the hostile web (a debug build; the
/// bombs alone would be 64 MiB each if decoded whole, the huge page 32 MiB).
const CRAWLER_RSS_CAP_KIB: u64 = 192 * 1024;
/// How much shorter than asked a gap may look at the test's server (see the politeness checks).
const ARRIVAL_SLACK: Duration = Duration::from_millis(300);

/// Peak resident memory of a process, KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_page_ends_as_the_oracle_expects() {
    let web = serve_web(WebSpec {
        seed: 66,
        pages: 20,
        hosts: 2,
        latency: Duration::ZERO,
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A lease well beyond a fetch's 2 s: a slow-loris page holds its job for the whole timeout,
    // and on a loaded machine its result's trip to the api and back could outlast a 3 s lease
    // (the job then comes back as undelivered, not as timed out).
    let toml = infra_toml(dir.path(), &web, 20.0, "")
        .replacen("lease_secs = 3", "lease_secs = 10", 1)
        .replacen("max_deliveries = 5", "max_deliveries = 2", 1)
        .replacen(
            "total_timeout_ms = 5000",
            "total_timeout_ms = 2000\nmax_body_bytes = 4194304",
            1,
        )
        .replacen(
            "[api]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[api]\nlisten = \"127.0.0.1:0\"\nhost_budget = {HOST_BUDGET}\n"),
            1,
        );
    let org = Organism::up(&toml, dir).await;
    let crawlers: Vec<u32> = org
        .cells_of("crawler")
        .await
        .iter()
        .filter_map(|c| c.pid)
        .collect();
    assert!(!crawlers.is_empty(), "the organism has crawlers");

    let cases = hostile::cases();
    let mut seeds: Vec<String> = cases.iter().map(|c| c.url.to_string()).collect();
    seeds.push(hostile::CALENDAR_SEED.to_string());
    org.crawl(&seeds).await;
    let stats = org.wait_drained(Duration::from_secs(180), |_| {}).await;

    // Every hostile URL: indexed under its title, or failed with its reason.
    let store = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        org.data_dir().join("store.db").display()
    ))
    .await
    .expect("open the organism's store");
    let mut wrong = Vec::new();
    for case in &cases {
        let row = sqlx::query("SELECT state, reason FROM frontier WHERE url = ?")
            .bind(case.url)
            .fetch_optional(&store)
            .await
            .expect("frontier row");
        let (state, reason): (String, Option<String>) = match row {
            Some(r) => (r.get(0), r.get(1)),
            None => ("absent".into(), None),
        };
        let title: Option<String> = sqlx::query_scalar("SELECT title FROM pages WHERE url = ?")
            .bind(case.url)
            .fetch_optional(&store)
            .await
            .expect("page row");
        let ok = match &case.expect {
            Expect::Indexed { title: want } => {
                state == "crawled" && title.as_deref() == Some(*want)
            }
            Expect::Failed { reason: want } => {
                state == "failed" && reason.as_deref().is_some_and(|r| r.contains(want))
            }
        };
        eprintln!(
            "{:45} {state:8} {}",
            case.url,
            reason.as_deref().or(title.as_deref()).unwrap_or("")
        );
        if !ok {
            wrong.push(format!(
                "{}: expected {:?}, got {state} (reason {reason:?}, title {title:?})",
                case.url, case.expect
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "outcomes the oracle does not expect:\n{}",
        wrong.join("\n")
    );

    // The calendar trap ends at the host's budget.
    let calendar: i64 = sqlx::query_scalar("SELECT count(*) FROM frontier WHERE host = ?")
        .bind(hostile::CALENDAR_HOST)
        .fetch_one(&store)
        .await
        .expect("count");
    assert_eq!(
        calendar as u64, HOST_BUDGET,
        "the calendar stops at the budget"
    );

    // Nothing was ever fetched from an internal address, and the robots.txt that answers 503
    // kept its host's page unfetched.
    let log = web.log.snapshot();
    let mut by_path: BTreeMap<(String, String), Vec<std::time::Instant>> = BTreeMap::new();
    for s in &log {
        by_path
            .entry((s.host.clone(), s.path.clone()))
            .or_default()
            .push(s.at);
    }
    assert!(
        !by_path.contains_key(&("robots5xx-hostile.test".into(), "/page".into())),
        "a page behind a failing robots.txt is not fetched"
    );
    assert!(
        !by_path.contains_key(&("robotsbom-hostile.test".into(), "/secret/page".into())),
        "robots.txt with a byte-order mark is obeyed"
    );
    // The 429's Retry-After and the crawl delay are honoured. The gaps are read where this
    // test's server saw the requests arrive, which carries both processes' scheduling delays on
    // a loaded two-core machine (one late first arrival shortens the gap): hence the slack. A
    // crawler that ignored them would come back within its per-host gap, tens of milliseconds.
    let busy = &by_path[&("hostile.test".to_string(), "/busy".to_string())];
    assert_eq!(busy.len(), 2, "one 429, then the page: {busy:?}");
    let waited = busy[1] - busy[0];
    assert!(
        waited + ARRIVAL_SLACK >= Duration::from_secs(hostile::RETRY_AFTER_SECS),
        "Retry-After honoured: {waited:?}"
    );
    let seen: Vec<(String, std::time::Instant)> = log
        .iter()
        .filter(|s| s.host == hostile::CRAWL_DELAY_HOST)
        .map(|s| (s.path.clone(), s.at))
        .collect();
    let robots = seen
        .iter()
        .find(|(path, _)| path == "/robots.txt")
        .map(|(_, at)| *at)
        .expect("robots.txt fetched first");
    let mut pages: Vec<std::time::Instant> = seen
        .iter()
        .filter(|(path, _)| path != "/robots.txt")
        .map(|(_, at)| *at)
        .collect();
    pages.sort();
    assert_eq!(pages.len(), 2, "{seen:?}");
    // Read cumulatively from robots.txt: a late arrival of one page cannot make the next look
    // early, and a crawler that ignored the delay would have fetched both right after it.
    for (i, at) in pages.iter().enumerate() {
        let delay = Duration::from_secs(hostile::CRAWL_DELAY_SECS) * (i as u32 + 1);
        assert!(
            at.duration_since(robots) + ARRIVAL_SLACK >= delay,
            "Crawl-delay honoured: page {} came {:?} after robots.txt ({seen:?})",
            i + 1,
            at.duration_since(robots)
        );
    }

    // No cell crashed: the registry lists no death, and every crawler's peak memory stayed
    // under the cap.
    let events = org.events().await;
    assert!(
        !events
            .iter()
            .any(|e| e.kind == protocol::control::EventKind::Dead),
        "no cell died: {events:#?}"
    );
    for pid in crawlers {
        let peak = peak_rss_kib(pid).expect("the crawler is alive");
        eprintln!("crawler {pid}: peak RSS {} MiB", peak / 1024);
        assert!(
            peak < CRAWLER_RSS_CAP_KIB,
            "crawler {pid} peaked at {peak} KiB, cap {CRAWLER_RSS_CAP_KIB} KiB"
        );
    }
    eprintln!(
        "hostile web: {} crawled, {} failed",
        stats.frontier.crawled, stats.frontier.failed
    );
    org.stop().await;
}

/// A cell told to stop while it is still assembling (its queue's broker accepts the connection
/// and never answers the AMQP handshake) exits within its grace period and the stop margin,
/// before its connection attempt would have given up, and says why.
#[tokio::test]
async fn a_cell_stuck_assembling_exits_when_told_to_stop() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let infra = dir.path().join("organism.toml");
    std::fs::write(
        &infra,
        format!(
            "[organism]\ndata_dir = \"{}\"\n\n[engines]\nqueue = \"amqp://guest:guest@127.0.0.1:{port}/%2f\"\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write infra");
    let mut child = support::cell_command()
        .args([
            "run",
            "crawler",
            "--grace-secs",
            "0",
            "--listen",
            "127.0.0.1:0",
            "--infra",
        ])
        .arg(&infra)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cell run crawler");
    // The crawler is assembling once the broker has its connection; the broker never answers.
    let (held, _) = tokio::time::timeout(Duration::from_secs(60), silent.accept())
        .await
        .expect("the crawler connects to its broker within 60 s")
        .expect("accept");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().expect("pid") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut said = String::new();
    let (status, _) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(child.wait(), async {
            use tokio::io::AsyncReadExt as _;
            stderr.read_to_string(&mut said).await
        })
    })
    .await
    .expect("the cell exits");
    drop(held);
    let status = status.expect("wait");
    assert!(!status.success(), "{status}: {said}");
    assert!(
        said.contains("did not stop within 5s of being told to"),
        "the cell stopped for another reason: {said}"
    );
}
