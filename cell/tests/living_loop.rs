//! The living loop on one machine, end to end through the real `cell` binary: crawl a synthetic
//! web of 2,000+ pages and index exactly the oracle's set, never fetching what robots.txt
//! disallows, never exceeding a host's rate, and losing nothing when a crawler is killed.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{assert_exact, serve_web, sigkill, Organism};
use synthweb::WebSpec;

const RATE: f64 = 100.0;

fn spec() -> WebSpec {
    WebSpec {
        seed: 11,
        pages: 2000,
        hosts: 20,
        latency: Duration::ZERO,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawls_exactly_the_oracle_set_politely() {
    let web = serve_web(spec()).await;
    let org = Organism::on(&web, RATE, "").await;
    let seeds = web.web.seeds();
    let accepted = org.crawl(&seeds).await;
    assert_eq!(
        accepted["accepted"].as_array().map(Vec::len),
        Some(seeds.len())
    );
    org.wait_drained(Duration::from_secs(240), |_| {}).await;

    // Exactly the oracle's set.
    let expected = web.web.expect(&seeds, None);
    assert!(
        expected.len() >= 1500,
        "the oracle expects {}",
        expected.len()
    );
    assert_exact(&web.web, &org.indexed().await, &expected);

    // Nothing robots.txt disallows was fetched.
    let served = web.log.snapshot();
    assert!(served.len() >= expected.len());
    for s in &served {
        let url = format!("http://{}{}", s.host, s.path);
        assert!(!web.web.disallowed(&url), "fetched a disallowed URL: {url}");
    }

    // No host saw more than its rate: in any one-second window, each of the two crawler cells
    // may send at most floor(RATE/2) + 1 (its burst), so the host sees at most RATE + 2.
    let mut by_host: BTreeMap<&str, Vec<tokio::time::Instant>> = BTreeMap::new();
    for s in &served {
        by_host
            .entry(s.host.as_str())
            .or_default()
            .push(s.at.into());
    }
    let ceiling = RATE as usize + 2;
    for (host, mut times) in by_host {
        times.sort();
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] - times[start] >= Duration::from_secs(1) {
                start += 1;
            }
            let n = end - start + 1;
            assert!(
                n <= ceiling,
                "{host}: {n} requests within one second (limit {RATE}/s)"
            );
        }
    }

    // A word the generator placed on known pages finds exactly those pages first.
    let rare = web.web.rare_words(5);
    assert!(!rare.is_empty());
    for (word, pages) in rare {
        let expected_pages: std::collections::BTreeSet<String> =
            pages.into_iter().filter(|p| expected.contains(p)).collect();
        if expected_pages.is_empty() {
            continue;
        }
        let res = org.search(&word, 20).await;
        let top: std::collections::BTreeSet<String> = res
            .hits
            .iter()
            .take(expected_pages.len())
            .map(|h| h.url.clone())
            .collect();
        assert_eq!(top, expected_pages, "search for {word:?}");
        assert!(res.hits[0].snippet.to_lowercase().contains("<mark>"));
    }
    org.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crawler_killed_mid_crawl_loses_nothing() {
    let web = serve_web(WebSpec { seed: 12, ..spec() }).await;
    // Slower hosts, so the crawl is surely still running when the crawler dies.
    let org = Organism::on(&web, 40.0, "").await;
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    let victim = org.cells_of("crawler").await[0].clone();
    let mut killed = false;
    let kill_after = 300;
    let stats = org
        .wait_drained(Duration::from_secs(300), |s| {
            if !killed && s.frontier.crawled >= kill_after {
                sigkill(victim.pid.expect("the registry knows the pid"));
                killed = true;
            }
        })
        .await;
    assert!(killed, "the crawl ended before the kill ({stats:?})");
    // The health checkers had the dead crawler replaced.
    let now = org
        .wait_replaced(
            "crawler",
            2,
            std::slice::from_ref(&victim.cell_id),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        now.iter().any(|c| c.parent.is_some()),
        "the replacement names its parent: {now:?}"
    );
    let expected = web.web.expect(&seeds, None);
    assert_exact(&web.web, &org.indexed().await, &expected);
    org.stop().await;
}
