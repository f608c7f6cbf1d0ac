//! The connection layers' failover, over the real servers (PostgreSQL at `DATABASE_URL`, RabbitMQ
//! at `AMQP_URL`) reached through loopback TCP proxies the test kills: a URL naming several
//! hosts skips the dead ones, and a store or queue whose server is lost moves to the next one
//! (the PostgreSQL store to the next host that takes writes, the queue to the next node of the
//! list) and carries on. The replicated engines themselves (a pg_auto_failover promotion, a
//! RabbitMQ cluster) are exercised end to end by cell/tests/stable_storage.rs.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use engines::postgres::{PgOptions, PgStore};
use engines::rabbitmq::{AmqpOptions, AmqpQueue};
use engines::JobQueue;
use protocol::CrawlJob;
use support::PgDb;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP proxy on an ephemeral loopback port to `target`; dropping it (or [`Proxy::kill`])
/// closes the listener and every connection through it, as a server's death would.
struct Proxy {
    port: u16,
    tasks: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let tasks = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            tasks: Some(tasks),
        }
    }

    /// Close the listener and every connection (the JoinSet of connections is dropped with the
    /// accepting task, which aborts them).
    async fn kill(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }
}

/// A port nothing listens on (bound, then released).
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// `scheme://userinfo@host:port/rest` -> (`scheme://userinfo@`, `host:port`, `/rest`).
fn split_url(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let default_port = if scheme.starts_with("amqp") {
        5672
    } else {
        5432
    };
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    };
    (format!("{scheme}://{userinfo}"), host, tail.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_skips_dead_hosts_and_follows_the_primary() {
    let db = PgDb::create().await;
    let (prefix, server, tail) = split_url(&db.url);
    let mut first = Proxy::start(server.clone()).await;
    let second = Proxy::start(server.clone()).await;
    let dead = dead_port().await;
    // A dead host first: skipped. Then the first proxy, where the pool goes.
    let url = format!(
        "{prefix}127.0.0.1:{dead},127.0.0.1:{},127.0.0.1:{}{tail}?target_session_attrs=read-write",
        first.port, second.port
    );
    let store = PgStore::connect_with(
        &url,
        PgOptions {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .expect("connect through the host list");
    let port_of = |store: &PgStore| store.pool().connect_options().get_port();
    assert_eq!(port_of(&store), first.port, "the first live host is used");
    let crawl = engines::Store::create_crawl(&store, SPEC)
        .await
        .expect("write through the first host");

    // The first host dies: the store moves to the next one and writes again.
    first.kill().await;
    let lost = Instant::now();
    let deadline = lost + Duration::from_secs(20);
    loop {
        match engines::Store::stats(&store, 1).await {
            Ok(_) if port_of(&store) == second.port => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the store did not move to the second host"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("store moved to the second host in {:?}", lost.elapsed());
    let again = engines::Store::create_crawl(&store, SPEC)
        .await
        .expect("write through the second host");
    assert!(
        again > crawl,
        "the same database, reached through another host"
    );
    store.pool().close().await;
    drop(second);
    db.drop_db().await;
}

#[tokio::test]
async fn postgres_host_lists_with_no_live_host_fail_clearly() {
    let (a, b) = (dead_port().await, dead_port().await);
    let url = format!("postgres://postgres@127.0.0.1:{a},127.0.0.1:{b}/test");
    let started = Instant::now();
    let err = PgStore::connect(&url)
        .await
        .err()
        .expect("no host answers")
        .to_string();
    assert!(
        err.contains("no writable PostgreSQL primary among 2 host(s)"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

const SPEC: engines::CrawlSpec = engines::CrawlSpec {
    max_depth: None,
    max_pages: None,
};

static NEXT_QUEUE: AtomicU32 = AtomicU32::new(0);

fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queue_skips_dead_nodes_and_moves_to_the_next() {
    let (prefix, server, tail) = split_url(&amqp_url());
    let mut first = Proxy::start(server.clone()).await;
    let second = Proxy::start(server.clone()).await;
    let dead = dead_port().await;
    let node = |port: u16| format!("{prefix}127.0.0.1:{port}{tail}");
    let urls = [node(dead), node(first.port), node(second.port)].join(",");
    let name = format!(
        "homeostat_failover_{}_{}",
        std::process::id(),
        NEXT_QUEUE.fetch_add(1, Ordering::SeqCst)
    );
    let options = AmqpOptions {
        lease: Some(Duration::from_secs(30)),
        max_backoff: Duration::from_millis(200),
        ..AmqpOptions::new(16, 3)
    };
    let queue = AmqpQueue::connect_with(&urls, &name, options)
        .await
        .expect("connect through the node list");
    queue
        .publish(&[CrawlJob::new(
            "http://failover.test/1",
            0,
            "http://127.0.0.1:1",
        )])
        .await
        .expect("publish through the first live node");

    first.kill().await;
    let lost = Instant::now();
    // A publish caught on the dying connection fails (the api's publisher offers the batch
    // again on its next turn, as here); the queue reconnects to the next node meanwhile.
    let retry_until = Instant::now() + Duration::from_secs(15);
    loop {
        let sent = queue
            .publish(&[CrawlJob::new(
                "http://failover.test/2",
                0,
                "http://127.0.0.1:1",
            )])
            .await;
        match sent {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < retry_until,
                    "publish through the next node: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!("queue moved to the next node in {:?}", lost.elapsed());
    // At least once: a publish that failed on the dying connection may still have arrived.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "jobs not delivered: {seen:?}");
        match queue.lease(4).await {
            Ok(ds) => {
                let tags: Vec<_> = ds.iter().map(|d| d.tag).collect();
                seen.extend(ds.into_iter().map(|d| d.job.expect("a job").url));
                queue.ack(&tags).await.expect("ack");
            }
            Err(e) => eprintln!("lease while reconnecting: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen: Vec<String> = seen.into_iter().collect();
    assert_eq!(seen, ["http://failover.test/1", "http://failover.test/2"]);
    queue.close().await;
    engines::rabbitmq::delete_queues(&amqp_url(), &name)
        .await
        .expect("deleting the test's queues");
    drop(second);
}

#[tokio::test]
async fn rabbitmq_lists_with_no_live_node_fail_clearly() {
    let (prefix, _, tail) = split_url(&amqp_url());
    let (a, b) = (dead_port().await, dead_port().await);
    let urls = format!("{prefix}127.0.0.1:{a}{tail},{prefix}127.0.0.1:{b}{tail}");
    let err = AmqpQueue::connect(&urls, "homeostat_failover_nowhere", 4, 3)
        .await
        .err()
        .expect("no node answers")
        .to_string();
    assert!(err.contains("no RabbitMQ node answered"), "{err}");
    let err = AmqpQueue::connect(&format!("{urls},"), "homeostat_failover_nowhere", 4, 3)
        .await
        .err()
        .expect("an empty entry")
        .to_string();
    assert!(err.contains("empty entry"), "{err}");
}
