//! Stable storage: the living loop on replicated engines — a 3-node RabbitMQ cluster (quorum
//! queues) and a PostgreSQL primary with a synchronous standby under pg_auto_failover — through
//! the real `cell` binary, exact against the oracle through the loss of the RabbitMQ node the
//! cells are connected to, of the PostgreSQL primary (SIGKILL, the standby promoted), and of
//! both one after the other. Meanwhile a client searches through the front doors; failed
//! searches are counted. The engines are started here (`scripts/engines.sh cluster start`, root)
//! and stopped when the test ends, even when it fails.
//!
//! Figures (failover times, pages/s on single-node and replicated engines) are printed; run with
//! `--nocapture` to read them.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{
    amqp_url, assert_exact, delete_queues, drop_database, fresh_database, infra_toml, serve_web,
    with_queue_name, Organism,
};
use synthweb::WebSpec;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/engines.sh");

/// Searches must answer again within this long after a node is killed.
const SEARCH_BOUND: Duration = Duration::from_secs(30);
/// The crawl must progress again within this long after a node is killed.
const CRAWL_BOUND: Duration = Duration::from_secs(45);

fn engines(args: &[&str]) -> String {
    let out = std::process::Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/engines.sh");
    assert!(
        out.status.success(),
        "scripts/engines.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The replicated engines, stopped (and their data deleted) on drop.
struct Cluster {
    database_url: String,
    amqp_url: String,
}

impl Cluster {
    fn start() -> Cluster {
        let out = engines(&["cluster", "start"]);
        let value = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("engines.sh cluster start printed no {key}: {out}"))
                .to_string()
        };
        Cluster {
            database_url: value("DATABASE_URL="),
            amqp_url: value("AMQP_URL="),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(SCRIPT)
            .args(["cluster", "stop"])
            .status();
    }
}

/// A fresh database on the replicated PostgreSQL (created on its primary), and its
/// multi-host URL.
async fn fresh_replicated_database(cluster: &Cluster, name: &str) -> String {
    use sqlx::Connection as _;
    let (admin, url) = {
        let store = engines::postgres::PgStore::connect(&cluster.database_url)
            .await
            .expect("the replicated PostgreSQL answers");
        let admin = store.pool().connect_options();
        let url = cluster
            .database_url
            .replacen("/test?", &format!("/{name}?"), 1);
        (admin, url)
    };
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .expect("connect to the primary");
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&sql).execute(&mut conn).await.expect(&sql);
    }
    url
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Chaos {
    None,
    KillRabbitmq,
    KillPostgres,
    Both,
}

/// What a client searching through the front doors saw.
#[derive(Default)]
struct Searches {
    requests: u64,
    failed_first: u64,
    failed_after_retry: u64,
    /// When each search answered (first try or retry).
    answered: Vec<Instant>,
}

/// Search through the front doors, in turn, until `stop`; a failed search is tried once more.
fn search_client(
    doors: Vec<String>,
    words: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Searches>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Searches::default()));
    let out = seen.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let task = tokio::spawn(async move {
        let mut i = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let door = &doors[i % doors.len()];
            let word = &words[i % words.len()];
            i += 1;
            let once = || async {
                let resp = client
                    .get(format!("{door}/search"))
                    .query(&[("q", word.as_str()), ("limit", "5")])
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("status {}", resp.status()));
                }
                resp.json::<protocol::SearchResponse>()
                    .await
                    .map_err(|e| e.to_string())
            };
            let first = once().await;
            let outcome = match first {
                Ok(_) => (false, false),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    (true, once().await.is_err())
                }
            };
            {
                let mut s = seen.lock().expect("searches");
                s.requests += 1;
                s.failed_first += u64::from(outcome.0);
                s.failed_after_retry += u64::from(outcome.1);
                if !outcome.1 {
                    s.answered.push(Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (out, task)
}

struct Run {
    pages: usize,
    secs: f64,
    /// Per killed node: (what, killed -> crawl progressing again, longest stretch without a
    /// search answer after the kill).
    failovers: Vec<(&'static str, Duration, Duration)>,
    requests: u64,
    failed_first: u64,
    failed_after_retry: u64,
}

async fn crawl(seed: u64, database: Option<(&Cluster, String)>, amqp: &str, chaos: Chaos) -> Run {
    let web = serve_web(WebSpec {
        seed,
        pages: 2000,
        hosts: 20,
        latency: Duration::ZERO,
    })
    .await;
    let (db_url, single_db) = match &database {
        Some((cluster, name)) => (fresh_replicated_database(cluster, name).await, None),
        None => {
            let (name, url) = fresh_database("homeostat_stable").await;
            (url, Some(name))
        }
    };
    let queue_name = format!("homeostat.stable.{}.{seed}", std::process::id());
    let extra = format!("[engines]\ndatabase = \"{db_url}\"\nqueue = \"{amqp}\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = with_queue_name(&infra_toml(dir.path(), &web, 60.0, &extra), &queue_name);
    let org = Organism::up(&toml, dir).await;
    let words: Vec<String> = web.web.rare_words(8).into_iter().map(|(w, _)| w).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (searches, client) = search_client(org.frontdoors.clone(), words, stop.clone());

    let seeds = web.web.seeds();
    let started = Instant::now();
    org.crawl(&seeds).await;
    // Each kill: what, when, the crawled count then, when the crawl had moved on.
    let mut kills: Vec<(&'static str, Instant, u64, Option<Instant>)> = Vec::new();
    let plan: Vec<&'static str> = match chaos {
        Chaos::None => vec![],
        Chaos::KillRabbitmq => vec!["rabbitmq"],
        Chaos::KillPostgres => vec!["postgres"],
        Chaos::Both => vec!["rabbitmq", "postgres"],
    };
    // "Progressing again": this many more pages crawled than when the node was killed.
    const PROGRESS: u64 = 50;
    let stats = org
        .wait_drained(Duration::from_secs(240), |s| {
            let crawled = s.frontier.crawled;
            for kill in kills.iter_mut() {
                if kill.3.is_none() && crawled >= kill.2 + PROGRESS {
                    kill.3 = Some(Instant::now());
                }
            }
            let previous_done = kills.last().is_none_or(|k| k.3.is_some());
            if kills.len() < plan.len() && crawled >= 400 && previous_done {
                let what = plan[kills.len()];
                match what {
                    "rabbitmq" => engines(&["cluster", "kill-rabbitmq", "1"]),
                    _ => engines(&["cluster", "kill-postgres-primary"]),
                };
                eprintln!("killed {what} at {crawled} pages crawled");
                kills.push((what, Instant::now(), crawled, None));
            }
        })
        .await;
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    client.await.expect("search client");
    assert_eq!(
        kills.len(),
        plan.len(),
        "the crawl ended before every kill ({stats:?})"
    );
    assert!(stats.frontier.drained(), "URLs left pending: {stats:?}");

    let expected = web.web.expect(&seeds, None);
    let indexed = org.indexed_pg(&db_url).await;
    assert_exact(&web.web, &indexed, &expected);

    let searches = std::mem::take(&mut *searches.lock().expect("searches"));
    let mut failovers = Vec::new();
    for (i, (what, at, _, progressed)) in kills.iter().enumerate() {
        let progressed = progressed.expect("progress is recorded before the frontier drains");
        // The longest stretch without a search answer after the kill and before the next one
        // (from the kill to the first answer, or between two answers).
        let until = kills.get(i + 1).map(|k| k.1);
        let after: Vec<Instant> = searches
            .answered
            .iter()
            .copied()
            .filter(|t| t > at && until.is_none_or(|u| *t < u))
            .collect();
        let first = *after.first().expect("searches answered after the kill");
        let longest = after
            .windows(2)
            .map(|pair| pair[1].duration_since(pair[0]))
            .fold(first.duration_since(*at), Duration::max);
        let to_crawl = progressed.duration_since(*at);
        let to_search = longest;
        assert!(to_crawl < CRAWL_BOUND, "{what}: crawl stalled {to_crawl:?}");
        assert!(
            longest < SEARCH_BOUND,
            "{what}: search did not answer for {longest:?}"
        );
        failovers.push((*what, to_crawl, to_search));
    }
    let run = Run {
        pages: indexed.len(),
        secs,
        failovers,
        requests: searches.requests,
        failed_first: searches.failed_first,
        failed_after_retry: searches.failed_after_retry,
    };
    org.stop().await;
    if let Some(name) = single_db {
        drop_database(&name).await;
    }
    delete_queues(amqp, &queue_name).await;
    run
}

fn report(label: &str, run: &Run) {
    eprintln!(
        "FIGURES {label}: {} pages in {:.1} s = {:.0} pages/s; searches {} (failed first try {}, \
         failed after one retry {})",
        run.pages,
        run.secs,
        run.pages as f64 / run.secs,
        run.requests,
        run.failed_first,
        run.failed_after_retry
    );
    for (what, crawl, search) in &run.failovers {
        eprintln!(
            "FIGURES {label}: {what} node killed -> crawl progressing again {:.1} s; longest \
             stretch without a search answer {:.1} s",
            crawl.as_secs_f64(),
            search.as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_url_survives_the_loss_of_a_database_or_broker_node() {
    let cluster = Cluster::start();

    // The same crawl on the single-node engines (the system's PostgreSQL and RabbitMQ), for the
    // pages/s comparison.
    let single = crawl(41, None, &amqp_url(), Chaos::None).await;
    report("single-node engines", &single);

    let mut failed_after_retry = 0;
    for (seed, chaos, db) in [
        (41, Chaos::None, "stable_none"),
        (42, Chaos::KillRabbitmq, "stable_mq"),
        (43, Chaos::KillPostgres, "stable_pg"),
        (44, Chaos::Both, "stable_both"),
    ] {
        // Every node back (a killed RabbitMQ node restarted, a killed PostgreSQL primary back
        // as the standby) before the next loss.
        engines(&["cluster", "heal"]);
        let run = crawl(
            seed,
            Some((&cluster, format!("{db}_{}", std::process::id()))),
            &cluster.amqp_url,
            chaos,
        )
        .await;
        report(&format!("replicated engines, {chaos:?}"), &run);
        failed_after_retry += run.failed_after_retry;
    }
    eprintln!("FIGURES searches failed after one retry, all failovers: {failed_after_retry}");
    drop(cluster);
}
