//! Politeness belongs to the host, not to the crawler cell: whatever the number of crawlers (1,
//! 2, 4, 8) and while one is killed, a host whose robots.txt asks for a Crawl-delay sees no two
//! page requests closer than it, and no more requests in flight than the configured concurrency;
//! every page is fetched once. And three api cells share one frontier without duplicating work.
//!
//! Each organism crawls its own small host, served by this test with a log of every request's
//! start and end, so the organisms run side by side.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use support::{
    amqp_url, assert_exact, delete_queues, drop_database, fresh_database, infra_toml, serve_web,
    sigkill, with_queue_name, Organism,
};
use synthweb::WebSpec;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pages of the polite host, its home page included.
const PAGES: usize = 30;
const CRAWL_DELAY: Duration = Duration::from_millis(200);
const CONCURRENCY: usize = 2;
/// Each page takes this long to answer: longer than the Crawl-delay, so that requests overlap
/// and the concurrency limit is what holds them back.
const PAGE_LATENCY: Duration = Duration::from_millis(350);

/// One request the host saw: path, start, end.
type Request = (String, Instant, Option<Instant>);

#[derive(Clone, Default)]
struct HostLog {
    requests: Arc<Mutex<Vec<Request>>>,
}

impl HostLog {
    fn start(&self, path: &str) -> usize {
        let mut r = self.requests.lock().expect("log");
        r.push((path.to_string(), Instant::now(), None));
        r.len() - 1
    }

    fn end(&self, i: usize) {
        self.requests.lock().expect("log")[i].2 = Some(Instant::now());
    }

    /// A request's record, ended when dropped: when the handler returns, or when the server
    /// drops it because its client went away (a killed crawler's request is no longer in flight
    /// once its connection closed).
    fn open(&self, path: &str) -> OpenRequest {
        OpenRequest {
            log: self.clone(),
            i: self.start(path),
        }
    }

    fn snapshot(&self) -> Vec<(String, Instant, Option<Instant>)> {
        self.requests.lock().expect("log").clone()
    }
}

struct OpenRequest {
    log: HostLog,
    i: usize,
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.log.end(self.i);
    }
}

fn page_html(n: usize) -> String {
    // Every page links to the next two and to one further away: a chain nobody can skip.
    let links: String = [(n + 1) % PAGES, (n + 2) % PAGES, (n * 7 + 3) % PAGES]
        .iter()
        .map(|&k| format!(r#"<a href="/p/{k}">page {k}</a> "#))
        .collect();
    format!("<html><head><title>page {n}</title></head><body><p>polite words {n}</p>{links}</body></html>")
}

async fn page(State(log): State<HostLog>, Path(n): Path<usize>) -> impl IntoResponse {
    let open = log.open(&format!("/p/{n}"));
    tokio::time::sleep(PAGE_LATENCY).await;
    drop(open);
    if n >= PAGES {
        return (axum::http::StatusCode::NOT_FOUND, Html(String::new())).into_response();
    }
    Html(page_html(n)).into_response()
}

async fn home(State(log): State<HostLog>) -> impl IntoResponse {
    let open = log.open("/");
    tokio::time::sleep(PAGE_LATENCY).await;
    drop(open);
    Html(page_html(0).replace("page 0", "home"))
}

async fn robots(State(log): State<HostLog>) -> impl IntoResponse {
    let i = log.start("/robots.txt");
    log.end(i);
    format!(
        "User-agent: *\nCrawl-delay: {}\nDisallow: /private/\n",
        CRAWL_DELAY.as_secs_f64()
    )
}

struct PoliteHost {
    log: HostLog,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Drop for PoliteHost {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn polite_host() -> PoliteHost {
    let log = HostLog::default();
    let app = Router::new()
        .route("/", get(home))
        .route("/robots.txt", get(robots))
        .route("/p/{n}", get(page))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await;
    });
    PoliteHost { log, addr, stop }
}

fn polite_infra(dir: &std::path::Path, host: &PoliteHost, crawlers: usize) -> String {
    format!(
        r#"
[organism]
data_dir = "{data}"

[roles.crawler]
min = {crawlers}
max = {crawlers}

[roles.api]
min = 2
max = 2

[queue]
lease_secs = 4
max_deliveries = 5

[api]
listen = "127.0.0.1:0"

[frontdoor]
listen = "127.0.0.1:0"

[crawler.fetch]
per_host_rate = 50.0
per_host_concurrency = {CONCURRENCY}
allow_addresses = ["127.0.0.1/32"]
connect_timeout_ms = 2000
total_timeout_ms = 5000

[crawler.fetch.resolve]
"polite.test" = "{addr}"
"#,
        data = dir.join("data").display(),
        addr = host.addr,
    )
}

/// What the host saw.
#[derive(Debug)]
struct Seen {
    page_requests: usize,
    distinct_pages: usize,
    duplicates: usize,
    min_gap: Duration,
    max_in_flight: usize,
}

fn judge(log: &HostLog) -> Seen {
    let mut pages: Vec<(String, Instant, Option<Instant>)> = log
        .snapshot()
        .into_iter()
        .filter(|(p, _, _)| p != "/robots.txt")
        .collect();
    pages.sort_by_key(|(_, start, _)| *start);
    let min_gap = pages
        .windows(2)
        .map(|w| w[1].1 - w[0].1)
        .min()
        .unwrap_or(Duration::MAX);
    // In flight at each start: earlier requests not yet answered.
    let mut max_in_flight = 0;
    for (i, (_, start, _)) in pages.iter().enumerate() {
        let open = pages[..i]
            .iter()
            .filter(|(_, _, end)| end.is_none_or(|e| e > *start))
            .count();
        max_in_flight = max_in_flight.max(open + 1);
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (p, _, _) in &pages {
        *counts.entry(p.as_str()).or_default() += 1;
    }
    Seen {
        page_requests: pages.len(),
        distinct_pages: counts.len(),
        duplicates: counts.values().map(|n| n - 1).sum(),
        min_gap,
        max_in_flight,
    }
}

/// Crawl the polite host with `crawlers` crawler cells, killing one mid-crawl if `kill`.
async fn crawl_politely(crawlers: usize, kill: bool) -> Seen {
    let host = polite_host().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let org = Organism::up(&polite_infra(dir.path(), &host, crawlers), dir).await;
    org.wait_cells("crawler", crawlers, Duration::from_secs(60))
        .await;
    org.crawl(&["http://polite.test/".to_string()]).await;
    if kill {
        // Kill a crawler once the crawl is well under way.
        while judge(&host.log).page_requests < PAGES / 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let victim = org.cells_of("crawler").await[0].clone();
        sigkill(victim.pid.expect("pid"));
    }
    let stats = org.wait_drained(Duration::from_secs(120), |_| {}).await;
    // The home page and the PAGES pages it leads to.
    assert_eq!(
        stats.frontier.crawled as usize,
        PAGES + 1,
        "{crawlers} crawlers: every page crawled: {stats:?}"
    );
    org.stop().await;
    let seen = judge(&host.log);
    eprintln!("politeness: crawlers={crawlers} kill={kill} {seen:?}");
    assert_eq!(
        seen.distinct_pages,
        PAGES + 1,
        "{crawlers} crawlers: {seen:?}"
    );
    assert!(
        seen.min_gap >= CRAWL_DELAY,
        "{crawlers} crawlers: two page requests {:?} apart, Crawl-delay {CRAWL_DELAY:?}",
        seen.min_gap
    );
    assert!(
        seen.max_in_flight <= CONCURRENCY,
        "{crawlers} crawlers: {} requests in flight at once, limit {CONCURRENCY}",
        seen.max_in_flight
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crawl_delay_and_concurrency_hold_for_any_number_of_crawlers() {
    // One organism at a time: organisms started side by side may pick the same free port for
    // their front doors (chosen by binding and releasing), and a crawl would go to the wrong one.
    let mut runs = Vec::new();
    for n in [1, 2, 4, 8] {
        runs.push((n, crawl_politely(n, false).await));
    }
    for (n, seen) in runs {
        assert_eq!(
            seen.duplicates, 0,
            "{n} crawlers fetched a page twice: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crawl_delay_holds_while_a_crawler_is_killed() {
    let seen = crawl_politely(4, true).await;
    // The killed crawler's jobs are delivered again: at most the requests it had in flight
    // (the host's concurrency) are fetched a second time.
    assert!(seen.duplicates <= CONCURRENCY, "{seen:?}");
}

/// Three api cells publish one frontier: a 2,000-page crawl, exact against the oracle, every
/// page fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_apis_duplicate_nothing_on_sqlite() {
    let web = serve_web(WebSpec {
        seed: 31,
        pages: 2000,
        hosts: 20,
        latency: Duration::ZERO,
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "[roles.api]\nmin = 3\nmax = 3\n";
    // A lease long enough that no job is delivered twice for being slow on a loaded machine:
    // a repeat here can only come from two apis publishing one URL.
    let toml =
        infra_toml(dir.path(), &web, 200.0, extra).replace("lease_secs = 3", "lease_secs = 60");
    let org = Organism::up(&toml, dir).await;
    org.wait_cells("api", 3, Duration::from_secs(60)).await;
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    org.wait_drained(Duration::from_secs(300), |_| {}).await;
    let indexed = org.indexed().await;
    assert_exact(&web.web, &indexed, &web.web.expect(&seeds, None));
    let duplicates = duplicate_fetches(&web);
    eprintln!(
        "three apis (sqlite): {} requests, {duplicates} duplicate fetches",
        web.log.len()
    );
    assert_eq!(
        duplicates, 0,
        "pages fetched more than once with three apis"
    );
    org.stop().await;
}

/// Requests for one URL beyond the first, robots.txt aside, less those a redirect explains: a
/// redirect's target is fetched at the end of the redirect and again as a job of its own when
/// it is also linked (two frontier entries, one page). At most one per redirect served.
fn duplicate_fetches(web: &support::Web) -> usize {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut redirects = std::collections::BTreeSet::new();
    for served in web.log.snapshot() {
        let key = format!("{}{}", served.host, served.path);
        if (300..400).contains(&served.status) {
            redirects.insert(key.clone());
        }
        if served.path != "/robots.txt" {
            *counts.entry(key).or_default() += 1;
        }
    }
    let repeats: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "{} distinct URLs requested, {repeats} repeats, {} redirects",
        counts.len(),
        redirects.len()
    );
    repeats.saturating_sub(redirects.len())
}

/// The same on PostgreSQL + RabbitMQ: a fresh database and queue of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_apis_duplicate_nothing_on_postgres_and_rabbitmq() {
    let web = serve_web(WebSpec {
        seed: 32,
        pages: 2000,
        hosts: 20,
        latency: Duration::ZERO,
    })
    .await;
    let (db_name, db_url) = fresh_database("homeostat_polite").await;
    let queue_name = format!("homeostat.polite.{}", std::process::id());
    let extra = format!(
        "[roles.api]\nmin = 3\nmax = 3\n\n[engines]\ndatabase = \"{db_url}\"\nqueue = \"{}\"\n",
        amqp_url()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = with_queue_name(&infra_toml(dir.path(), &web, 200.0, &extra), &queue_name);
    let org = Organism::up(&toml, dir).await;
    org.wait_cells("api", 3, Duration::from_secs(60)).await;
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    org.wait_drained(Duration::from_secs(420), |_| {}).await;
    let indexed = org.indexed_pg(&db_url).await;
    assert_exact(&web.web, &indexed, &web.web.expect(&seeds, None));
    let duplicates = duplicate_fetches(&web);
    eprintln!(
        "three apis (postgres + rabbitmq): {} requests, {duplicates} duplicate fetches",
        web.log.len()
    );
    assert_eq!(
        duplicates, 0,
        "pages fetched more than once with three apis"
    );
    org.stop().await;
    drop_database(&db_name).await;
    delete_queues(&amqp_url(), &queue_name).await;
}
