//! The living loop on the cluster engines (PostgreSQL + RabbitMQ), through the real `cell`
//! binary: exact against the oracle, and still exact when RabbitMQ or PostgreSQL restarts
//! mid-crawl, with no cell restarted by hand. Needs both engines: `scripts/engines.sh start`.

mod support;

use std::time::Duration;

use support::{
    amqp_url, assert_exact, delete_queues, drop_database, fresh_database, infra_toml, serve_web,
    with_queue_name, Organism,
};
use synthweb::WebSpec;

/// Restarting a shared engine must not overlap another test of this file.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn engines_script(cmd: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/engines.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(cmd)
        .status()
        .expect("run scripts/engines.sh");
    assert!(status.success(), "scripts/engines.sh {cmd} failed");
}

enum Chaos {
    None,
    RestartRabbitmq,
    RestartPostgres,
}

async fn crawl_on_cluster(seed: u64, chaos: Chaos) {
    let _serial = SERIAL.lock().await;
    let web = serve_web(WebSpec {
        seed,
        pages: 2000,
        hosts: 20,
        latency: Duration::ZERO,
    })
    .await;
    let (db_name, db_url) = fresh_database("homeostat_e2e").await;
    let queue_name = format!("homeostat.e2e.{}.{db_name}", std::process::id());
    let extra = format!(
        r#"
[engines]
database = "{db_url}"
queue = "{amqp}"
"#,
        amqp = amqp_url()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = with_queue_name(&infra_toml(dir.path(), &web, 60.0, &extra), &queue_name);
    let org = Organism::up(&toml, dir).await;
    let mut before: Vec<String> = Vec::new();
    for role in ["api", "crawler"] {
        before.extend(org.cells_of(role).await.into_iter().map(|c| c.cell_id));
    }
    before.sort();
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    let mut chaos_done = matches!(chaos, Chaos::None);
    let stats = org
        .wait_drained(Duration::from_secs(420), |s| {
            if !chaos_done && s.frontier.crawled >= 400 {
                chaos_done = true;
                match chaos {
                    Chaos::RestartRabbitmq => engines_script("restart-rabbitmq"),
                    Chaos::RestartPostgres => engines_script("restart-postgres"),
                    Chaos::None => {}
                }
            }
        })
        .await;
    assert!(chaos_done, "the crawl ended before the restart ({stats:?})");
    let expected = web.web.expect(&seeds, None);
    assert_exact(&web.web, &org.indexed_pg(&db_url).await, &expected);
    // No cell needed a restart: the same api and crawler cells as before.
    let mut after: Vec<String> = Vec::new();
    for role in ["api", "crawler"] {
        after.extend(org.cells_of(role).await.into_iter().map(|c| c.cell_id));
    }
    after.sort();
    assert_eq!(before, after, "every cell recovered by itself");
    org.stop().await;
    drop_database(&db_name).await;
    delete_queues(&amqp_url(), &queue_name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawls_exactly_on_postgres_and_rabbitmq() {
    crawl_on_cluster(21, Chaos::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_rabbitmq_restart_mid_crawl() {
    crawl_on_cluster(22, Chaos::RestartRabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_postgres_restart_mid_crawl() {
    crawl_on_cluster(23, Chaos::RestartPostgres).await;
}
