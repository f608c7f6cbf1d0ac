//! robots.txt: what it disallows is never requested; 4xx allows; 5xx and unreachable disallow
//! for now; Crawl-delay slows the host; one fetch per origin.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::HOST;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, Redirect};
use axum::routing::get;
use axum::Router;
use crawler::{CrawlAttempt, FetchConfig};
use protocol::Outcome;
use tokio::task::JoinSet;

use crate::harness::{config, dead_addr, failure, fetcher, page, retry, serve};

fn site(robots: &'static str) -> Router {
    Router::new()
        .route("/robots.txt", get(move || async move { robots }))
        .route("/public", get(|| async { Html("<title>public</title>") }))
        .route("/private", get(|| async { Html("<title>private</title>") }))
        .route(
            "/private/deeper",
            get(|| async { Html("<title>private</title>") }),
        )
        .route("/only-us", get(|| async { Html("<title>only us</title>") }))
        .route("/p/{n}", get(|| async { Html("<p>page</p>") }))
}

#[tokio::test]
async fn disallowed_paths_are_never_requested() {
    let server = serve(site("User-agent: *\nDisallow: /private\n")).await;
    let f = fetcher(config(&server));
    assert_eq!(
        failure(f.crawl("http://a.test/private").await),
        "robots.txt disallows"
    );
    assert_eq!(
        failure(f.crawl("http://a.test/private/deeper?x=1").await),
        "robots.txt disallows"
    );
    assert_eq!(page(f.crawl("http://a.test/public").await).title, "public");
    let paths = server.log.paths("a.test");
    assert!(
        !paths.iter().any(|p| p.starts_with("/private")),
        "{paths:?}"
    );
    assert_eq!(server.log.count("a.test", "/robots.txt"), 1, "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_fetch_robots_once() {
    let server = serve(site("User-agent: *\nDisallow: /private\n")).await;
    let f = fetcher(config(&server));
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let f = f.clone();
        tasks.spawn(async move { f.crawl(&format!("http://c.test/p/{i}")).await });
    }
    while let Some(done) = tasks.join_next().await {
        page(done.expect("crawl task"));
    }
    assert_eq!(server.log.count("c.test", "/robots.txt"), 1);
    assert_eq!(server.log.paths("c.test").len(), 21);
}

#[tokio::test]
async fn our_group_is_chosen_by_product_token() {
    let robots = "User-agent: SomeoneElse\nDisallow: /public\n\nUser-agent: HomeostatBot\nDisallow: /only-us\n\nUser-agent: *\nDisallow: /\n";
    let server = serve(site(robots)).await;
    let f = fetcher(config(&server));
    page(f.crawl("http://a.test/public").await);
    assert_eq!(
        failure(f.crawl("http://a.test/only-us").await),
        "robots.txt disallows"
    );

    // Another token falls back to the `*` group, which disallows everything.
    let other = fetcher(FetchConfig {
        robots_token: Some("NobodyBot".into()),
        ..config(&server)
    });
    assert_eq!(
        failure(other.crawl("http://b.test/public").await),
        "robots.txt disallows"
    );
    assert!(!server.log.paths("b.test").contains(&"/public".to_string()));
}

#[tokio::test]
async fn missing_robots_allows_everything() {
    // No /robots.txt route: the server answers 404.
    let server =
        serve(Router::new().route("/page", get(|| async { Html("<title>t</title>") }))).await;
    let f = fetcher(config(&server));
    assert_eq!(page(f.crawl("http://a.test/page").await).title, "t");
    assert_eq!(server.log.paths("a.test"), vec!["/robots.txt", "/page"]);
}

#[tokio::test]
async fn server_error_on_robots_disallows_for_now() {
    let server = serve(
        Router::new()
            .route(
                "/robots.txt",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .route("/page", get(|| async { Html("<title>t</title>") })),
    )
    .await;
    let f = fetcher(config(&server));
    let (reason, after) = retry(f.crawl("http://a.test/page").await);
    assert!(
        reason.contains("robots.txt unavailable (http 500)"),
        "{reason}"
    );
    assert!(after >= Duration::from_secs(1), "{after:?}");
    // Remembered briefly: a second crawl neither refetches robots.txt nor the page.
    retry(f.crawl("http://a.test/page").await);
    assert_eq!(server.log.paths("a.test"), vec!["/robots.txt"]);
}

#[tokio::test]
async fn unreachable_robots_disallows_for_now() {
    let dead = dead_addr().await;
    let f = fetcher(FetchConfig {
        resolve: [("down.test".to_string(), dead)].into(),
        allow_addresses: vec!["127.0.0.1/32".parse().expect("cidr")],
        ..FetchConfig::default()
    });
    let (reason, _) = retry(f.crawl("http://down.test/page").await);
    assert!(reason.starts_with("robots.txt unavailable"), "{reason}");
    assert!(reason.contains("connection error"), "{reason}");
}

#[tokio::test]
async fn robots_redirects_are_followed() {
    let server = serve(
        Router::new()
            .route(
                "/robots.txt",
                get(|| async { Redirect::permanent("/real-robots.txt") }),
            )
            .route(
                "/real-robots.txt",
                get(|| async { "User-agent: *\nDisallow: /private\n" }),
            )
            .route("/private", get(|| async { Html("secret") }))
            .route("/public", get(|| async { Html("public") })),
    )
    .await;
    let f = fetcher(config(&server));
    assert_eq!(
        failure(f.crawl("http://a.test/private").await),
        "robots.txt disallows"
    );
    page(f.crawl("http://a.test/public").await);
    assert_eq!(
        server.log.paths("a.test"),
        vec!["/robots.txt", "/real-robots.txt", "/public"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crawl_delay_slows_the_host() {
    let server = serve(site(
        "User-agent: *\nCrawl-delay: 0.25\nDisallow: /private\n",
    ))
    .await;
    let f = fetcher(config(&server));
    let mut tasks = JoinSet::new();
    for i in 0..4 {
        let f = f.clone();
        tasks.spawn(async move { f.crawl(&format!("http://a.test/p/{i}")).await });
    }
    while let Some(done) = tasks.join_next().await {
        page(done.expect("crawl task"));
    }
    let times = server.log.times("a.test");
    assert_eq!(times.len(), 5, "robots.txt and four pages");
    // Arrival gaps can shrink by scheduling jitter, never by much.
    let floor = Duration::from_millis(250 - 25);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= floor, "requests {gap:?} apart, Crawl-delay is 250ms");
    }
}

#[tokio::test]
async fn rules_match_percent_encoded_paths_after_a_byte_order_mark() {
    let robots = b"\xEF\xBB\xBFUser-agent: HomeostatBot/2.0\nDisallow: /caf\xC3\xA9\n".to_vec();
    let server = serve(
        Router::new()
            .route("/robots.txt", get(move || async move { robots }))
            .route("/{*rest}", get(|| async { Html("<title>page</title>") })),
    )
    .await;
    let f = fetcher(config(&server));
    // The URL reaches the matcher as `/caf%C3%A9`, the rule is encoded the same way.
    assert_eq!(
        failure(f.crawl("http://a.test/café").await),
        "robots.txt disallows"
    );
    page(f.crawl("http://a.test/cafe").await);
    assert_eq!(server.log.paths("a.test"), vec!["/robots.txt", "/cafe"]);
}

/// Garbage, huge and pathological files give a decision; none crashes the crawl.
#[tokio::test]
async fn hostile_robots_files_still_give_a_decision() {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut garbage = Vec::new();
    while garbage.len() < 700 * 1024 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        garbage.extend_from_slice(&state.to_le_bytes());
    }
    let stars = format!("User-agent: *\nDisallow: /{}$\n", "*p".repeat(8_000)).into_bytes();
    let long_lines = format!("User-agent: *\nDisallow: /{}\n", "é".repeat(300_000)).into_bytes();
    let bodies: Arc<HashMap<&'static str, Vec<u8>>> = Arc::new(HashMap::from([
        ("garbage.test", garbage),
        ("stars.test", stars),
        ("long.test", long_lines),
    ]));
    let server = serve(
        Router::new()
            .route(
                "/robots.txt",
                get(move |headers: HeaderMap| {
                    let bodies = bodies.clone();
                    async move {
                        let host = headers
                            .get(HOST)
                            .and_then(|h| h.to_str().ok())
                            .and_then(|h| h.split(':').next())
                            .unwrap_or_default()
                            .to_string();
                        bodies.get(host.as_str()).cloned().unwrap_or_default()
                    }
                }),
            )
            .route("/{*rest}", get(|| async { Html("<title>page</title>") })),
    )
    .await;
    let f = fetcher(config(&server));
    for host in ["garbage.test", "stars.test", "long.test"] {
        let attempt = f.crawl(&format!("http://{host}/p/1")).await;
        let decided = match &attempt {
            CrawlAttempt::Done(Outcome::Page(_)) => true,
            CrawlAttempt::Done(Outcome::Failed { reason }) => reason == "robots.txt disallows",
            CrawlAttempt::Retry { .. } | CrawlAttempt::Defer { .. } => false,
        };
        assert!(decided, "{host}: {attempt:?}");
    }
    // 8,000 `*p` pieces need 8,000 `p`s; this path has them, anchored at its end.
    let many_p = format!("http://stars.test/{}", "p".repeat(8_000));
    assert_eq!(failure(f.crawl(&many_p).await), "robots.txt disallows");
}
