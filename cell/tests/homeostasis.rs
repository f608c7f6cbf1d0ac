//! Homeostasis end to end, on the local provider: the cells find their own number. No central
//! autoscaler: every api and crawler cell runs the controller on its own pressure and its
//! siblings' (`lifecycle::homeostasis`), asks the factory for siblings when its role is
//! overloaded and retires itself when it is idle, within `[roles.ROLE]` min and max.
//!
//! - A step of client search load grows the api cells; dropping it shrinks them to the minimum;
//!   no client request fails meanwhile.
//! - A large crawl seeded at once grows the crawlers with the backlog and shrinks them when it
//!   drains; the crawl is exact against the oracle and no host sees two requests closer than
//!   its politeness gap while the crawlers come and go.
//!
//! The controller's windows are shortened for the tests (seconds, not tens of seconds); the
//! decisions travel in heartbeats and come back as `divided` and `retiring` events.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::control::EventKind;
use support::{assert_exact, infra_toml, serve_web, Organism};
use synthweb::WebSpec;

/// Short windows, so a test sees growth and shrinking within seconds.
const QUICK: &str = r#"
[homeostasis]
roles = ["api", "crawler"]
grow_confirm_secs = 1.0
shrink_confirm_secs = 2.0
grow_cooldown_secs = 1.0
shrink_cooldown_secs = 2.0
shrink_after_grow_secs = 4.0
"#;

/// Poll the registry until `role` has a count satisfying `done`; returns the counts seen.
async fn wait_count(
    org: &Organism,
    role: &str,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(usize) -> bool,
) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let cells = org.cells_of(role).await;
        let serving = cells
            .iter()
            .filter(|c| c.state != protocol::control::CellState::Draining)
            .count();
        if done(serving) {
            return serving;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{role}: {what} within {limit:?}; now {serving}: {cells:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The events a health checker holds, as (kind, cell, reason).
async fn events(org: &Organism) -> Vec<(EventKind, String, String)> {
    org.events()
        .await
        .into_iter()
        .map(|e| (e.kind, e.cell_id, e.reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_of_search_load_grows_the_apis_and_they_shrink_back() {
    // A crawl runs through the step: about five seconds at 10 requests/s on each of 4 hosts.
    let web = serve_web(WebSpec {
        seed: 61,
        pages: 200,
        hosts: 4,
        latency: Duration::from_millis(20),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra =
        format!("[roles.api]\nmin = 1\nmax = 3\n\n[roles.crawler]\nmin = 1\nmax = 1\n{QUICK}");
    let toml = infra_toml(dir.path(), &web, 10.0, &extra).replacen(
        "[api]\nlisten = \"127.0.0.1:0\"\n",
        "[api]\nlisten = \"127.0.0.1:0\"\ntarget_in_flight = 1\ntarget_latency_ms = 2000\n",
        1,
    );
    let org = Organism::up(&toml, dir).await;
    assert_eq!(
        wait_count(&org, "api", Duration::from_secs(30), "one api", |n| n == 1).await,
        1
    );

    // The step: eight clients searching back to back through the front doors.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let words = [
        "page", "web", "host", "link", "title", "text", "home", "site",
    ];
    let mut clients = Vec::new();
    for (i, word) in words.into_iter().enumerate() {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let door = org.frontdoors[i % org.frontdoors.len()].clone();
        let http = reqwest::Client::new();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let resp = http
                    .get(format!("{door}/search"))
                    .query(&[("q", word), ("limit", "10")])
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::SeqCst),
                    Ok(r) => {
                        eprintln!("search failed: {}", r.status());
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                    Err(e) => {
                        eprintln!("search failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let step = tokio::time::Instant::now();
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    // While the load holds, an overloaded api keeps the links of the pages it ingests aside
    // (seed 003: throttle before dividing); `/stats` counts them.
    let most_deferred = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (most, stop, client) = (most_deferred.clone(), stop.clone(), org.client.clone());
        let url = format!("{}/stats", org.api);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(r) = client.get(&url).send().await {
                    if let Ok(s) = r.json::<protocol::Stats>().await {
                        most.fetch_max(s.frontier.deferred, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let grown = wait_count(&org, "api", Duration::from_secs(60), "growth", |n| n >= 2).await;
    let to_growth = step.elapsed();
    // Hold the load a little while the role settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = org.cells_of("api").await.len();
    assert!(peak <= 3, "never above max: {peak}");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    watcher.await.expect("stats watcher");
    let ended = tokio::time::Instant::now();
    wait_count(
        &org,
        "api",
        Duration::from_secs(90),
        "back to the minimum",
        |n| n == 1,
    )
    .await;
    let to_min = ended.elapsed();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!(
        "homeostasis (api): {grown} apis {:.1} s after the step, peak {peak}; back to 1 api {:.1} s \
         after the load ended; {ok} searches, {failed} failed",
        to_growth.as_secs_f64(),
        to_min.as_secs_f64()
    );
    assert_eq!(failed, 0, "no client request fails");
    // The links kept during the load were offered once it fell: the crawl is exact.
    let most_deferred = most_deferred.load(Ordering::SeqCst);
    let stats = org.wait_drained(Duration::from_secs(120), |_| {}).await;
    eprintln!(
        "homeostasis (api): at most {most_deferred} links kept aside during the load; crawl of \
         {} pages drained",
        stats.frontier.crawled
    );
    assert!(
        most_deferred > 0,
        "an overloaded api keeps links aside before it divides"
    );
    assert_exact(
        &web.web,
        &org.indexed().await,
        &web.web.expect(&seeds, None),
    );
    let events = events(&org).await;
    assert!(
        events
            .iter()
            .any(|(k, _, r)| *k == EventKind::Throttled && r.starts_with("throttle:")),
        "a throttled event with its reason: {events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|(k, _, r)| *k == EventKind::Divided && r.starts_with("divide:")),
        "a divided event with its reason: {events:#?}"
    );
    assert!(
        events.iter().any(|(k, _, _)| *k == EventKind::Retiring),
        "a retiring event: {events:#?}"
    );
    org.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawlers_grow_with_a_large_crawl_and_shrink_when_it_drains() {
    const RATE: f64 = 5.0;
    let web = serve_web(WebSpec {
        seed: 62,
        pages: 800,
        hosts: 40,
        latency: Duration::from_millis(100),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra =
        format!("[roles.crawler]\nmin = 1\nmax = 4\n\n[crawler.worker]\nconcurrency = 8\n{QUICK}");
    let org = Organism::up(&infra_toml(dir.path(), &web, RATE, &extra), dir).await;
    assert_eq!(
        wait_count(
            &org,
            "crawler",
            Duration::from_secs(30),
            "one crawler",
            |n| n == 1
        )
        .await,
        1
    );
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    let started = tokio::time::Instant::now();
    let stats = org.wait_drained(Duration::from_secs(300), |_| {}).await;
    let crawl_time = started.elapsed();
    // Every crawler born after the first divided from another, and says so.
    let events = events(&org).await;
    let born = events
        .iter()
        .filter(|(k, c, _)| *k == EventKind::Born && c.starts_with("crawler"))
        .count();
    let divided = events
        .iter()
        .filter(|(k, _, _)| *k == EventKind::Divided)
        .count();
    assert!(
        born >= 2 && divided >= 1,
        "the crawlers divided with the backlog: {events:#?}"
    );
    let drained = tokio::time::Instant::now();
    wait_count(
        &org,
        "crawler",
        Duration::from_secs(90),
        "back to the minimum",
        |n| n == 1,
    )
    .await;
    eprintln!(
        "homeostasis (crawler): {born} crawlers born, {divided} divisions; back to 1 crawler \
         {:.1} s after the crawl drained ({} pages in {:.1} s)",
        drained.elapsed().as_secs_f64(),
        stats.frontier.crawled,
        crawl_time.as_secs_f64()
    );

    // Exact against the oracle.
    let expected = web.web.expect(&seeds, None);
    assert_exact(&web.web, &org.indexed().await, &expected);

    // No host saw two requests closer than its politeness gap (1 / per_host_rate), measured
    // on the server's answers (its latency is constant), with a tolerance for the timers of a
    // loaded machine (a broken limit shows as requests together, or a fraction of the gap apart).
    let gap = Duration::from_secs_f64(1.0 / RATE);
    let tolerance = Duration::from_millis(50);
    let mut by_host: BTreeMap<String, Vec<std::time::Instant>> = BTreeMap::new();
    for s in web.log.snapshot() {
        by_host.entry(s.host.clone()).or_default().push(s.at);
    }
    for (host, mut times) in by_host {
        times.sort();
        for w in times.windows(2) {
            let between = w[1] - w[0];
            assert!(
                between + tolerance >= gap,
                "{host}: two requests {between:?} apart, politeness gap {gap:?}"
            );
        }
    }
    org.stop().await;
}
