//! Seeing the organism, through the real `cell up`: the health checkers' dashboard in headless
//! Chromium shows every live cell, then a SIGKILLed cell dead and its replacement (and saves a
//! screenshot); every role's `/metrics` parses as Prometheus text and carries the series an
//! operator needs; `/openapi.json` describes exactly the public routes that answer.
//!
//! The browser is Debian's `chromium` (`scripts/browser.sh` installs it; `HOMEOSTAT_CHROMIUM`
//! names another), driven over the DevTools protocol by `chromiumoxide`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use futures::StreamExt as _;
use protocol::control::CellsResponse;
use support::{reading_client, sigkill, Organism};
use synthweb::WebSpec;

/// The organism of the browser test: the demo web, small; cells do not regulate their number
/// (the test counts them).
fn demo_infra(dir: &std::path::Path) -> String {
    format!(
        r#"
[organism]
data_dir = "{data}"

[api]
listen = "127.0.0.1:0"

[frontdoor]
listen = "127.0.0.1:0"

[demo]
pages = 300
hosts = 6

[homeostasis]
roles = []
"#,
        data = dir.join("data").display(),
    )
}

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("HOMEOSTAT_CHROMIUM") {
        return PathBuf::from(path);
    }
    let debian = PathBuf::from("/usr/bin/chromium");
    assert!(
        debian.exists(),
        "no /usr/bin/chromium: run scripts/browser.sh (installs Debian's chromium) or set HOMEOSTAT_CHROMIUM"
    );
    debian
}

/// Headless Chromium, its DevTools handler driven on a task; killed when dropped.
async fn launch_browser(profile: &std::path::Path) -> (Browser, tokio::task::JoinHandle<()>) {
    let config = BrowserConfig::builder()
        .chrome_executable(chromium())
        .new_headless_mode()
        // As root (CI) Chromium refuses to start sandboxed.
        .no_sandbox()
        .user_data_dir(profile)
        .window_size(1400, 1100)
        .arg("--disable-gpu")
        .arg("--disable-dev-shm-usage")
        .launch_timeout(Duration::from_secs(60))
        .build()
        .expect("browser configuration");
    let (browser, mut handler) = Browser::launch(config)
        .await
        .expect("headless chromium starts");
    // Drive the connection until the browser goes; a message this client cannot read (a newer
    // Chromium's) is an error item, not the end.
    let driver = tokio::spawn(async move { while handler.next().await.is_some() {} });
    (browser, driver)
}

/// The registry's live cells, by id, with their role.
async fn registry(org: &Organism) -> BTreeMap<String, String> {
    let client = reading_client();
    for hc in &org.healthcheckers {
        let Ok(resp) = client.get(format!("{hc}/cells")).send().await else {
            continue;
        };
        if let Ok(cells) = resp.json::<CellsResponse>().await {
            return cells
                .roles
                .into_values()
                .flatten()
                .map(|c| (c.cell_id, c.role))
                .collect();
        }
    }
    panic!("no health checker answers /cells");
}

/// What the page shows: its rows of live cells, and its rows and events of dead ones.
#[derive(Debug, Default, serde::Deserialize)]
struct Shown {
    live: Vec<String>,
    dead_rows: Vec<String>,
    dead_events: Vec<String>,
    link: String,
}

async fn shown(page: &Page) -> Shown {
    let js = r#"JSON.stringify({
        live: [...document.querySelectorAll('#cells tr[data-live="true"]')].map(r => r.dataset.cell),
        dead_rows: [...document.querySelectorAll('#cells tr[data-state="dead"]')].map(r => r.dataset.cell),
        dead_events: [...document.querySelectorAll('#events li[data-kind="dead"]')].map(r => r.dataset.cell),
        link: document.getElementById('link').dataset.link,
    })"#;
    match page.evaluate(js).await {
        Ok(result) => result
            .into_value::<String>()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        Err(_) => Shown::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_cell_then_a_killed_one_dead_and_its_replacement() {
    let dir = tempfile::tempdir().expect("tempdir");
    let infra = demo_infra(dir.path());
    let org = Organism::up_with(&infra, dir, &["--demo"]).await;
    let profile = tempfile::tempdir().expect("browser profile");
    let (mut browser, driver) = launch_browser(profile.path()).await;
    let page = browser
        .new_page(format!("{}/dashboard", org.healthcheckers[0]))
        .await
        .expect("the dashboard opens");

    // Every live cell is on the page (the registry is steady: nothing regulates its size).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let cells = registry(&org).await;
        let on_page = shown(&page).await;
        let ids: BTreeSet<String> = on_page.live.iter().cloned().collect();
        if on_page.link == "live" && ids == cells.keys().cloned().collect::<BTreeSet<_>>() {
            break cells;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page shows {ids:?}, the registry {:?}",
            cells.keys()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for role in ["api", "crawler", "frontdoor", "healthchecker", "factory"] {
        assert!(
            before.values().any(|r| r == role),
            "a {role} cell is shown: {before:?}"
        );
    }

    // SIGKILL an api cell: the page shows it dead (its row and a `dead` event) and a new api
    // cell appears, the one the registry lists in its place.
    let victim = org.cells_of("api").await[0].clone();
    sigkill(victim.pid.expect("an api cell has a pid"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let replacement = loop {
        let on_page = shown(&page).await;
        let fresh: Vec<String> = on_page
            .live
            .iter()
            .filter(|id| !before.contains_key(*id))
            .cloned()
            .collect();
        let dead = on_page.dead_rows.contains(&victim.cell_id)
            && on_page.dead_events.contains(&victim.cell_id);
        let replaced_in_registry = registry(&org).await;
        if dead && !on_page.live.contains(&victim.cell_id) {
            if let Some(new) = fresh
                .iter()
                .find(|id| replaced_in_registry.get(*id).map(String::as_str) == Some("api"))
            {
                break new.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "within 30 s the page shows {} dead and a new api cell: {on_page:?}",
            victim.cell_id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The lineage names the dead cell as the replacement's parent.
    let parent = page
        .evaluate(format!(
            "(() => {{ const li = document.querySelector('#lineage li[data-lineage=\"{replacement}\"]'); \
               const up = li && li.parentElement.closest('li'); return up ? up.dataset.lineage : ''; }})()"
        ))
        .await
        .expect("evaluate")
        .into_value::<String>()
        .expect("a string");
    assert_eq!(
        parent, victim.cell_id,
        "the replacement hangs under the dead cell"
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let png = page
        .save_screenshot(ScreenshotParams::builder().full_page(true).build(), &shot)
        .await
        .expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    println!(
        "dashboard screenshot: {} ({} bytes); {} dead, {} replaced it",
        shot.display(),
        png.len(),
        victim.cell_id,
        replacement
    );

    browser.close().await.expect("the browser closes");
    let _ = browser.wait().await;
    driver.abort();
    org.stop().await;
}

/// One cell's `/metrics`, parsed: every line must be a comment, a type, a help text or a sample
/// (the parser skips what it cannot read, so that is checked line by line first).
fn parse_metrics(cell: &str, text: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::LineInfo;
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Empty | LineInfo::Doc { .. } | LineInfo::Type { .. } => {}
            LineInfo::Sample { value, .. } => {
                let v = value.to_ascii_lowercase();
                assert!(
                    v.parse::<f64>().is_ok() || v == "nan",
                    "{cell}: a sample's value is not a number: {line}"
                );
            }
            _ => panic!("{cell}: not Prometheus text: {line:?}"),
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{cell}: /metrics does not parse: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_prometheus_metrics_and_openapi_describes_the_routes_that_answer() {
    let spec = WebSpec {
        seed: 13,
        pages: 150,
        hosts: 4,
        latency: Duration::ZERO,
    };
    let (web, org) = support::crawled(spec, "").await;
    let (word, _) = web.web.rare_words(1).into_iter().next().expect("a word");
    assert_eq!(org.search(&word, 5).await.query, word);

    // --- /metrics of every cell of every role.
    let client = reading_client();
    // Every front door has proxied a request (the first one served the crawl).
    for front in &org.frontdoors {
        let status = client
            .get(format!("{front}/stats"))
            .send()
            .await
            .expect("GET /stats")
            .status();
        assert!(status.is_success(), "{front}/stats: {status}");
    }
    let cells = registry(&org).await;
    let mut all = client
        .get(format!("{}/cells", org.healthcheckers[0]))
        .send()
        .await
        .expect("cells")
        .json::<CellsResponse>()
        .await
        .expect("cells json");
    let mut roles_seen = BTreeSet::new();
    for (role, records) in std::mem::take(&mut all.roles) {
        for c in records {
            // The first scrape is an HTTP request like any: the second shows it counted.
            client
                .get(format!("{}/metrics", c.addr))
                .send()
                .await
                .expect("GET /metrics");
            let text = client
                .get(format!("{}/metrics", c.addr))
                .send()
                .await
                .expect("GET /metrics")
                .text()
                .await
                .expect("text");
            let scrape = parse_metrics(&c.cell_id, &text);
            let mut names: BTreeMap<String, Vec<&prometheus_parse::Sample>> = BTreeMap::new();
            for s in &scrape.samples {
                assert!(
                    !matches!(s.value, prometheus_parse::Value::Summary(_)),
                    "{}: {} is a summary; histograms are histograms",
                    c.cell_id,
                    s.metric
                );
                // Bounded label sets: no URL, no host of the web as a label value.
                for value in s.labels.values() {
                    assert!(
                        !value.contains("://") && !value.contains(web.web.host_suffix()),
                        "{}: {} has an unbounded label value {value:?}",
                        c.cell_id,
                        s.metric
                    );
                }
                names.entry(s.metric.clone()).or_default().push(s);
            }
            let has = |name: &str| names.contains_key(name);
            let histogram = |name: &str| {
                names.get(name).is_some_and(|v| {
                    v.iter()
                        .any(|s| matches!(s.value, prometheus_parse::Value::Histogram(_)))
                })
            };
            let labelled = |name: &str, label: &str| {
                names
                    .get(name)
                    .is_some_and(|v| v.iter().all(|s| s.labels.get(label).is_some()))
            };
            let mut missing = Vec::new();
            let mut want = |ok: bool, what: &str| {
                if !ok {
                    missing.push(what.to_string());
                }
            };
            // Every cell: its HTTP requests by route and status (the first scrape included),
            // latency as a histogram, control messages rejected by reason, its role.
            want(
                labelled("http_requests_total", "route")
                    && labelled("http_requests_total", "status"),
                "http_requests_total{route,status}",
            );
            want(
                histogram("http_request_duration_seconds"),
                "http_request_duration_seconds histogram",
            );
            // A crawler takes no control message (it serves only its vitals).
            if role != "crawler" {
                want(
                    labelled("control_rejected_total", "reason"),
                    "control_rejected_total{reason}",
                );
            }
            want(has("cell_info"), "cell_info");
            if role != "factory" {
                want(has("cell_pressure_ratio"), "cell_pressure_ratio");
                want(
                    labelled("cell_pressure_signal", "signal"),
                    "cell_pressure_signal{signal}",
                );
            }
            match role.as_str() {
                "api" => {
                    want(labelled("queue_jobs", "state"), "queue_jobs{state}");
                    want(
                        labelled("api_frontier_urls", "state")
                            && names["api_frontier_urls"].len() == 4,
                        "api_frontier_urls{state} x4",
                    );
                    want(has("api_pages_indexed_total"), "api_pages_indexed_total");
                }
                "crawler" => {
                    want(
                        labelled("crawler_fetches_total", "outcome"),
                        "crawler_fetches_total{outcome}",
                    );
                    want(
                        has("crawler_robots_refusals_total"),
                        "crawler_robots_refusals_total",
                    );
                    want(
                        has("crawler_host_backoffs_total"),
                        "crawler_host_backoffs_total",
                    );
                    want(labelled("queue_jobs", "state"), "queue_jobs{state}");
                }
                "healthchecker" => {
                    want(
                        labelled("healthchecker_cells", "role")
                            && labelled("healthchecker_cells", "state"),
                        "healthchecker_cells{role,state}",
                    );
                    want(
                        labelled("healthchecker_heartbeat_age_max_seconds", "role"),
                        "healthchecker_heartbeat_age_max_seconds{role}",
                    );
                    want(
                        labelled("healthchecker_events_total", "kind"),
                        "healthchecker_events_total{kind}",
                    );
                }
                "factory" => {
                    want(
                        has("factory_spend_committed_per_hour"),
                        "factory_spend_committed_per_hour",
                    );
                    want(
                        has("factory_spend_cap_per_hour"),
                        "factory_spend_cap_per_hour",
                    );
                }
                "frontdoor" => {
                    want(
                        labelled("frontdoor_requests_total", "outcome"),
                        "frontdoor_requests_total{outcome}",
                    );
                    want(
                        histogram("frontdoor_request_duration_seconds"),
                        "frontdoor_request_duration_seconds histogram",
                    );
                }
                other => panic!("unknown role {other}"),
            }
            assert!(
                missing.is_empty(),
                "{} ({role}) lacks {missing:?} in:\n{text}",
                c.cell_id
            );
            roles_seen.insert(role.clone());
        }
    }
    assert_eq!(
        roles_seen.into_iter().collect::<Vec<_>>(),
        ["api", "crawler", "factory", "frontdoor", "healthchecker"]
    );
    // The searches the api cells served are in their latency histograms, and the healthchecker
    // counts the api cells that the registry lists as serving.
    let mut searches = 0.0;
    for (id, role) in &cells {
        if role != "api" {
            continue;
        }
        let addr = org
            .cells_of("api")
            .await
            .into_iter()
            .find(|c| &c.cell_id == id)
            .expect("still live")
            .addr;
        let text = client
            .get(format!("{addr}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        for s in parse_metrics(id, &text).samples {
            if s.metric == "api_search_seconds_count" {
                if let prometheus_parse::Value::Counter(n) | prometheus_parse::Value::Untyped(n) =
                    s.value
                {
                    searches += n;
                }
            }
        }
    }
    assert!(searches >= 1.0, "the search was measured");

    // --- /openapi.json: the front door's, and the routes it describes answer.
    let doc: serde_json::Value = client
        .get(format!("{}/openapi.json", org.api))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("json");
    let from_checker: serde_json::Value = client
        .get(format!("{}/openapi.json", org.healthcheckers[0]))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("json");
    assert_eq!(doc, from_checker, "every cell serves the one document");
    let mut described = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            described.insert((method.to_uppercase(), path.clone()));
        }
    }
    let expected: BTreeSet<(String, String)> = [
        ("GET", "/search"),
        ("GET", "/stats"),
        ("POST", "/crawl"),
        ("GET", "/cells"),
        ("GET", "/events"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(described, expected);
    for (method, path) in &described {
        let base = if path == "/cells" || path == "/events" {
            &org.healthcheckers[0]
        } else {
            &org.api
        };
        let url = format!("{base}{path}");
        let resp = match (method.as_str(), path.as_str()) {
            ("GET", "/search") => client.get(&url).query(&[("q", word.as_str())]).send(),
            ("POST", "/crawl") => client
                .post(&url)
                .json(&serde_json::json!({ "seeds": [format!("http://x.{}/", web.web.host_suffix())] }))
                .send(),
            ("GET", _) => client.get(&url).send(),
            _ => panic!("a method the test does not know: {method} {path}"),
        }
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let documented = &doc["paths"][path][method.to_lowercase()]["responses"];
        assert!(
            documented[status.to_string()].is_object(),
            "{method} {path} answered {status}, which the document does not describe: {documented}"
        );
        assert!(
            resp.status().is_success(),
            "{method} {path} answers: {status}"
        );
    }
    // What the document does not describe is not served at the door.
    for path in ["/internal/ingest", "/control/heartbeat", "/nope"] {
        let status = client
            .get(format!("{}{path}", org.api))
            .send()
            .await
            .expect("answer")
            .status();
        assert_eq!(status, 404, "{path} at the front door");
    }
    org.stop().await;
}
