//! The nervous system under fire, through the real `cell up`: a killed api cell costs clients
//! nothing (the front doors retry elsewhere) and is replaced; a killed health checker leaves the
//! other to detect and replace, and is itself replaced; a killed front door leaves the other
//! serving; a draining api finishes what it was doing.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{sigkill, Organism, Web};
use synthweb::WebSpec;

const EXTRA: &str = r#"
[roles.api]
min = 2
max = 4
"#;

async fn organism() -> (Web, Organism) {
    let spec = WebSpec {
        seed: 41,
        pages: 300,
        hosts: 6,
        latency: Duration::ZERO,
    };
    support::crawled(spec, EXTRA).await
}

/// Search continuously through `front` until `stop`; count failures.
fn search_load(
    front: String,
    word: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let mut errors = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match client
                .get(format!("{front}/search"))
                .query(&[("q", word.as_str())])
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                Ok(r) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    errors.push(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ));
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::SeqCst);
                    errors.push(e.to_string());
                }
            }
        }
        errors
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_api_costs_clients_nothing_and_is_replaced() {
    let (web, org) = organism().await;
    let (word, _) = web.web.rare_words(1).into_iter().next().expect("word");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let loads: Vec<_> = (0..4)
        .map(|_| {
            search_load(
                org.api.clone(),
                word.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = org.cells_of("api").await[0].clone();
    sigkill(victim.pid.expect("pid"));
    let now = org
        .wait_replaced(
            "api",
            2,
            std::slice::from_ref(&victim.cell_id),
            Duration::from_secs(10),
        )
        .await;
    // Keep the load on a little longer, through the replacement's first requests.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for l in loads {
        errors.extend(l.await.expect("load task"));
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed requests: {errors:?}"
    );
    assert!(ok.load(Ordering::SeqCst) > 50, "the load ran");
    // The replacement serves.
    let fresh = now
        .iter()
        .find(|c| c.parent.is_some())
        .expect("a replacement with a parent");
    let resp = reqwest::get(format!("{}/search?q={word}", fresh.addr))
        .await
        .expect("the replacement answers");
    assert_eq!(resp.status(), 200);
    org.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_health_checker_is_covered_and_replaced() {
    let (_web, org) = organism().await;
    let hcs = org.cells_of("healthchecker").await;
    assert_eq!(hcs.len(), 2);
    // Kill the health checker the harness does not ask first, so its view stays readable.
    let first_addr = org.healthcheckers[0].clone();
    let victim = hcs
        .iter()
        .find(|c| c.addr != first_addr)
        .expect("the other health checker")
        .clone();
    sigkill(victim.pid.expect("pid"));
    org.wait_replaced(
        "healthchecker",
        2,
        std::slice::from_ref(&victim.cell_id),
        Duration::from_secs(10),
    )
    .await;
    // The survivors keep detecting and replacing.
    let crawler = org.cells_of("crawler").await[0].clone();
    sigkill(crawler.pid.expect("pid"));
    org.wait_replaced(
        "crawler",
        2,
        std::slice::from_ref(&crawler.cell_id),
        Duration::from_secs(10),
    )
    .await;
    org.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_front_door_leaves_the_other_serving() {
    let (web, org) = organism().await;
    let (word, _) = web.web.rare_words(1).into_iter().next().expect("word");
    let fds = org.cells_of("frontdoor").await;
    let victim = fds
        .iter()
        .find(|c| c.addr == org.frontdoors[0])
        .expect("the first front door")
        .clone();
    sigkill(victim.pid.expect("pid"));
    let other = org.frontdoors[1].clone();
    for _ in 0..50 {
        let resp = reqwest::get(format!("{other}/search?q={word}"))
            .await
            .expect("the other front door answers");
        assert_eq!(resp.status(), 200);
    }
    org.wait_replaced(
        "frontdoor",
        2,
        std::slice::from_ref(&victim.cell_id),
        Duration::from_secs(10),
    )
    .await;
    // The replacement took the dead one's address: clients' first front door works again.
    let resp = reqwest::get(format!("{}/search?q={word}", org.frontdoors[0]))
        .await
        .expect("the replaced front door answers");
    assert_eq!(resp.status(), 200);
    org.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_api_finishes_its_requests() {
    let (_web, org) = organism().await;
    let victim = org.cells_of("api").await[0].clone();
    let client = reqwest::Client::new();
    // Requests in flight when the stop arrives: large seed lists take a while to admit (but
    // all four together well within the drain's grace of 5 s, even on a loaded machine).
    let mut inflight = Vec::new();
    for batch in 0..4 {
        let seeds: Vec<String> = (0..1500)
            .map(|i| format!("http://drain{batch}.test/p/{i}.html"))
            .collect();
        let req = client
            .post(format!("{}/crawl", victim.addr))
            .json(&serde_json::json!({ "seeds": seeds }))
            .send();
        inflight.push(tokio::spawn(req));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid.expect("pid") as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    for r in inflight {
        let resp = r.await.expect("task").expect("the draining api answered");
        assert_eq!(resp.status(), 202);
    }
    // It left as retired (not dead), and a new api took its place.
    org.wait_replaced(
        "api",
        2,
        std::slice::from_ref(&victim.cell_id),
        Duration::from_secs(15),
    )
    .await;
    org.stop().await;
}
