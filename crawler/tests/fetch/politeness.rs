//! Politeness: spacing per host, in-flight caps, independent hosts, Retry-After back-off.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::http::{header::RETRY_AFTER, StatusCode};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use crawler::FetchConfig;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::harness::{config, fetcher, page, retry, serve};

/// The reason and delay of a deferred crawl (never attempted: its host was not due).
fn deferred(attempt: crawler::CrawlAttempt) -> (String, Duration) {
    match attempt {
        crawler::CrawlAttempt::Defer { reason, after } => (reason, after),
        other => panic!("expected a deferral, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_host_are_spaced_and_hosts_progress_together() {
    let server = serve(Router::new().route("/p/{n}", get(|| async { Html("<p>page</p>") }))).await;
    let f = fetcher(FetchConfig {
        per_host_rate: 20.0,
        per_host_burst: 1,
        per_host_concurrency: 2,
        ..config(&server)
    });
    let mut tasks = JoinSet::new();
    for host in ["a.test", "b.test"] {
        for i in 0..12 {
            let f = f.clone();
            tasks.spawn(async move { f.crawl(&format!("http://{host}/p/{i}")).await });
        }
    }
    while let Some(done) = tasks.join_next().await {
        page(done.expect("crawl task"));
    }
    let period = Duration::from_millis(50);
    // Arrival gaps can shrink by the jitter of two sends, never by much.
    let tolerance = Duration::from_millis(20);
    let mut spans = Vec::new();
    for host in ["a.test", "b.test"] {
        let times = server.log.times(host);
        assert_eq!(times.len(), 13, "robots.txt and 12 pages on {host}");
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= period - tolerance,
                "{host}: requests {gap:?} apart at 20/s"
            );
        }
        let span = times[12] - times[0];
        assert!(
            span >= period * 12 - tolerance,
            "{host}: 13 requests in {span:?}"
        );
        spans.push((times[0], times[12]));
    }
    // Each host has its own limiter: their request spans overlap instead of following each other.
    let ((a_first, a_last), (b_first, b_last)) = (spans[0], spans[1]);
    assert!(
        a_first < b_last && b_first < a_last,
        "hosts were served one after the other"
    );
}

/// A page that holds its request until the test releases it.
#[derive(Clone)]
struct Gate {
    arrived: Arc<watch::Sender<usize>>,
    release: Arc<Semaphore>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Gate {
    fn new() -> Self {
        Self {
            arrived: Arc::new(watch::channel(0).0),
            release: Arc::new(Semaphore::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    async fn hold(&self) -> Html<&'static str> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.arrived.send_modify(|n| *n += 1);
        self.release.acquire().await.expect("gate open").forget();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Html("<title>slow</title>")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_host_does_not_stall_others_and_in_flight_is_capped() {
    let gate = Gate::new();
    let held = gate.clone();
    let server = serve(
        Router::new()
            .route(
                "/slow",
                get(move || {
                    let held = held.clone();
                    async move { held.hold().await }
                }),
            )
            .route("/fast/{n}", get(|| async { Html("<title>fast</title>") })),
    )
    .await;
    let f = fetcher(FetchConfig {
        per_host_concurrency: 2,
        ..config(&server)
    });
    let mut slow = JoinSet::new();
    for _ in 0..4 {
        let f = f.clone();
        slow.spawn(async move { f.crawl("http://a.test/slow").await });
    }
    let mut arrived = gate.arrived.subscribe();
    arrived
        .wait_for(|n| *n >= 2)
        .await
        .expect("two slow requests arrive");

    // a.test has both its slots taken; b.test is served all the same.
    for i in 0..5 {
        assert_eq!(
            page(f.crawl(&format!("http://b.test/fast/{i}")).await).title,
            "fast"
        );
    }
    assert_eq!(
        *gate.arrived.borrow(),
        2,
        "only two requests in flight to a.test"
    );

    gate.release.add_permits(4);
    while let Some(done) = slow.join_next().await {
        page(done.expect("crawl task"));
    }
    assert_eq!(*gate.arrived.borrow(), 4);
    assert_eq!(gate.max_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retry_after_backs_the_whole_host_off() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = serve(
        Router::new()
            .route(
                "/busy",
                get(move || {
                    let counter = counter.clone();
                    async move {
                        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                            (
                                StatusCode::TOO_MANY_REQUESTS,
                                [(RETRY_AFTER, "1")],
                                "slow down",
                            )
                                .into_response()
                        } else {
                            Html("<title>ok</title>").into_response()
                        }
                    }
                }),
            )
            .route("/other", get(|| async { Html("<title>other</title>") })),
    )
    .await;
    let f = fetcher(config(&server));
    let (reason, after) = retry(f.crawl("http://a.test/busy").await);
    assert!(reason.contains("429"), "{reason}");
    assert_eq!(after, Duration::from_secs(1));

    // The whole host waits, without a request being sent; other hosts do not. The job was never
    // attempted: it is deferred (handed back without spending a delivery), not retried.
    let (reason, left) = deferred(f.crawl("http://a.test/other").await);
    assert!(reason.contains("backing off"), "{reason}");
    assert!(
        left <= Duration::from_secs(1) && left > Duration::ZERO,
        "{left:?}"
    );
    assert!(!server.log.paths("a.test").contains(&"/other".to_string()));
    page(f.crawl("http://b.test/other").await);

    tokio::time::sleep(left).await;
    assert_eq!(page(f.crawl("http://a.test/other").await).title, "other");
    assert_eq!(page(f.crawl("http://a.test/busy").await).title, "ok");
}

#[tokio::test]
async fn retry_after_dates_are_honoured_and_capped() {
    let server = serve(Router::new().route(
        "/unavailable",
        get(|| async {
            let in_an_hour =
                httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3_600));
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(RETRY_AFTER, in_an_hour)],
                "maintenance",
            )
        }),
    ))
    .await;
    let f = fetcher(FetchConfig {
        max_retry_after_secs: 2,
        ..config(&server)
    });
    let (reason, after) = retry(f.crawl("http://a.test/unavailable").await);
    assert!(reason.contains("503"), "{reason}");
    assert_eq!(
        after,
        Duration::from_secs(2),
        "capped by max_retry_after_secs"
    );
}

/// An api cell with a SQLite store, serving `/internal/permits` with `key`.
async fn ledger_api(key: &control::ClusterKey) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        engines::sqlite::SqliteStore::open(dir.path().join("store.db").to_str().expect("utf-8"))
            .await
            .expect("store");
    let queue = engines::sqlite::SqliteQueue::open(
        dir.path().join("queue.db").to_str().expect("utf-8"),
        Duration::from_secs(30),
        3,
    )
    .await
    .expect("queue");
    let store = Arc::new(store);
    let verifier = Arc::new(control::Verifier::new(key.clone(), Duration::from_secs(30)));
    let mut state = api::AppState::new(
        api::ApiConfig::default(),
        store.clone(),
        store,
        Arc::new(queue),
        verifier.clone(),
    );
    state.permits_verifier = Some(verifier);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind api");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, api::app(state)).await;
    });
    (dir, format!("http://{addr}"))
}

/// One number from the ledger of [`ledger_api`]'s `dir`.
async fn ledger_count(dir: &std::path::Path, sql: &str) -> i64 {
    let url = format!("sqlite://{}?mode=ro", dir.join("store-ledger.db").display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("open the ledger");
    sqlx::query_scalar(sql)
        .fetch_one(&mut conn)
        .await
        .expect("read the ledger")
}

/// How many permits the ledger has granted (its permit id counter).
async fn permits_granted(dir: &std::path::Path) -> i64 {
    ledger_count(
        dir,
        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'host_permits'",
    )
    .await
}

fn ledger_fetcher(
    cfg: FetchConfig,
    api: &str,
    key: &control::ClusterKey,
    id: &str,
) -> crawler::Fetcher {
    // The receiver keeps the last list after the sender is gone.
    let (_, apis) = watch::channel(vec![api.to_string()]);
    let client = Arc::new(control::ControlClient::new(control::Signer::new(
        key.clone(),
        id,
    )));
    let limits = crawler::LedgerLimits {
        concurrency: cfg.per_host_concurrency,
        horizon: Duration::from_secs(10),
        hold: Duration::from_secs(10),
    };
    let gate = crawler::LedgerGate::new(apis, client, limits);
    crawler::Fetcher::with_gate(cfg, Arc::new(gate)).expect("fetcher")
}

/// Two crawlers (two fetch stacks) on one host, through the api's host ledger: the host's
/// Crawl-delay holds between them, as if there were one crawler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_crawlers_share_a_hosts_crawl_delay_through_the_ledger() {
    let server = serve(
        Router::new()
            .route(
                "/robots.txt",
                get(|| async { "User-agent: *\nCrawl-delay: 0.3\n" }),
            )
            .route("/p/{n}", get(|| async { Html("<p>page</p>") })),
    )
    .await;
    let key = control::ClusterKey::generate();
    let (_dir, api) = ledger_api(&key).await;
    let cfg = FetchConfig {
        per_host_rate: 100.0,
        per_host_concurrency: 4,
        ..config(&server)
    };
    let a = ledger_fetcher(cfg.clone(), &api, &key, "crawler-a");
    let b = ledger_fetcher(cfg, &api, &key, "crawler-b");
    let mut tasks = JoinSet::new();
    for i in 0..8 {
        let f = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.spawn(async move {
            loop {
                match f.crawl(&format!("http://a.test/p/{i}")).await {
                    crawler::CrawlAttempt::Defer { after, .. } => tokio::time::sleep(after).await,
                    other => return other,
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        page(done.expect("crawl task"));
    }
    let hits = server.log.hits();
    let mut pages: Vec<Instant> = hits
        .iter()
        .filter(|h| h.host == "a.test" && h.path.starts_with("/p/"))
        .map(|h| h.at)
        .collect();
    pages.sort();
    assert_eq!(pages.len(), 8, "each page fetched once");
    for pair in pages.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(300),
            "two page requests {gap:?} apart from two crawlers; Crawl-delay 0.3 s"
        );
    }
}

/// Two crawlers on a fast host (a 10 ms gap) through the ledger: each leases lanes of the host
/// and starts its requests on their ticks without asking again, so the ledger grants far fewer
/// permits than there are requests; the host's rate and concurrency still hold for the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_lanes_carry_many_requests_and_keep_the_hosts_limits() {
    const PAGES: usize = 60;
    const CONCURRENCY: usize = 4;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (now, peak) = (in_flight.clone(), most.clone());
    let server = serve(Router::new().route(
        "/p/{n}",
        get(move || {
            let (now, peak) = (now.clone(), peak.clone());
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Html("<p>page</p>")
            }
        }),
    ))
    .await;
    let key = control::ClusterKey::generate();
    let (dir, api) = ledger_api(&key).await;
    let cfg = FetchConfig {
        per_host_rate: 100.0,
        per_host_concurrency: CONCURRENCY as u32,
        ..config(&server)
    };
    let a = ledger_fetcher(cfg.clone(), &api, &key, "crawler-a");
    let b = ledger_fetcher(cfg, &api, &key, "crawler-b");
    // Each crawler runs at most the host's concurrency of requests at once, as its worker does.
    let slots = [
        Arc::new(Semaphore::new(CONCURRENCY)),
        Arc::new(Semaphore::new(CONCURRENCY)),
    ];
    let mut tasks = JoinSet::new();
    for i in 0..PAGES {
        let f = if i % 2 == 0 { a.clone() } else { b.clone() };
        let slots = slots[i % 2].clone();
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("open");
            loop {
                match f.crawl(&format!("http://a.test/p/{i}")).await {
                    crawler::CrawlAttempt::Defer { after, .. } => {
                        tokio::time::sleep(after.min(Duration::from_millis(20))).await
                    }
                    other => return other,
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        page(done.expect("crawl task"));
    }
    let mut starts: Vec<Instant> = server
        .log
        .hits()
        .iter()
        .filter(|h| h.path.starts_with("/p/"))
        .map(|h| h.at)
        .collect();
    starts.sort();
    assert_eq!(starts.len(), PAGES, "each page fetched once");
    assert!(
        most.load(Ordering::SeqCst) <= CONCURRENCY,
        "{} requests in flight at once, limit {CONCURRENCY}",
        most.load(Ordering::SeqCst)
    );
    // 100 requests a second: 59 gaps of 10 ms at the least (a little less for late timers).
    let span = *starts.last().expect("pages") - starts[0];
    assert!(
        span >= Duration::from_millis(500),
        "{PAGES} requests in {span:?}"
    );
    // One permit a request would be 61 (robots.txt too); a lane carries about a dozen.
    let granted = permits_granted(dir.path()).await;
    assert!(
        granted * 3 <= PAGES as i64,
        "{granted} permits for {PAGES} pages: the lanes were not reused"
    );
}

/// A crawler that stops gives back the lanes it holds, in one last request: the host's other
/// crawlers need not wait for them to lapse (10 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_crawler_gives_its_lanes_back() {
    let server = serve(Router::new().route("/p/{n}", get(|| async { Html("<p>page</p>") }))).await;
    let key = control::ClusterKey::generate();
    let (dir, api) = ledger_api(&key).await;
    let cfg = FetchConfig {
        per_host_rate: 100.0,
        per_host_concurrency: 4,
        ..config(&server)
    };
    let a = ledger_fetcher(cfg, &api, &key, "crawler-a");
    for i in 0..4 {
        page(a.crawl(&format!("http://a.test/p/{i}")).await);
    }
    // Dropped at once, before its lanes have been idle long enough to be released anyway.
    drop(a);
    let held = "SELECT count(*) FROM host_permits";
    let deadline = Instant::now() + Duration::from_secs(5);
    while ledger_count(dir.path(), held).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the stopped crawler's lanes are still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The permits endpoint refuses unsigned and forged requests.
#[tokio::test]
async fn the_permits_endpoint_refuses_unsigned_requests() {
    let key = control::ClusterKey::generate();
    let (_dir, api) = ledger_api(&key).await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({"asks": [{"host": "a.test", "gap_ms": 0, "concurrency": 1, "horizon_ms": 0, "hold_ms": 1000}]});
    let unsigned = http
        .post(format!("{api}/internal/permits"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(unsigned.status(), 401);
    let forged =
        control::Signer::new(control::ClusterKey::generate(), "intruder").seal("permits", &body);
    let forged = http
        .post(format!("{api}/internal/permits"))
        .header(control::SIGNATURE_HEADER, forged.signature)
        .body(forged.bytes)
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), 401);
}
