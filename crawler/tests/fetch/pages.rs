//! Statuses, transient failures, page content through the network, hostile pages.

use std::time::Duration;

use axum::body::Body;
use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{Html, Response};
use axum::routing::get;
use axum::Router;
use crawler::{CrawlAttempt, FetchConfig};
use protocol::Outcome;

use crate::harness::{config, dead_addr, failure, fetcher, page, retry, serve};

#[tokio::test]
async fn statuses_map_to_failures_and_retries() {
    let server = serve(
        Router::new()
            .route("/gone", get(|| async { StatusCode::GONE }))
            .route("/forbidden", get(|| async { StatusCode::FORBIDDEN }))
            .route(
                "/broken",
                get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .route("/bad-gateway", get(|| async { StatusCode::BAD_GATEWAY }))
            .route("/not-modified", get(|| async { StatusCode::NOT_MODIFIED })),
    )
    .await;
    let f = fetcher(config(&server));
    assert_eq!(failure(f.crawl("http://a.test/missing").await), "http 404");
    assert_eq!(failure(f.crawl("http://a.test/gone").await), "http 410");
    assert_eq!(
        failure(f.crawl("http://a.test/forbidden").await),
        "http 403"
    );
    assert!(failure(f.crawl("http://a.test/not-modified").await).starts_with("http 304"));
    let (reason, after) = retry(f.crawl("http://a.test/broken").await);
    assert_eq!(reason, "http 500");
    assert!(after > Duration::ZERO);
    assert_eq!(
        retry(f.crawl("http://a.test/bad-gateway").await).0,
        "http 502"
    );
}

#[tokio::test]
async fn timeouts_and_connection_errors_are_retried() {
    let server = serve(
        Router::new()
            .route("/hang", get(std::future::pending::<Html<&'static str>>))
            .route(
                "/stall-body",
                get(|| async {
                    let first = futures::stream::once(async {
                        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"<html><p>"))
                    });
                    let body = Body::from_stream(futures::StreamExt::chain(
                        first,
                        futures::stream::pending(),
                    ));
                    ([(CONTENT_TYPE, "text/html")], body)
                }),
            ),
    )
    .await;
    let mut cfg = config(&server);
    cfg.total_timeout_ms = 300;
    cfg.connect_timeout_ms = 300;
    cfg.resolve.insert("dead.test".into(), dead_addr().await);
    let f = fetcher(cfg);
    // Let robots.txt be fetched and cached first, so the timeouts below are the page's.
    failure(f.crawl("http://a.test/missing").await);
    let (reason, _) = retry(f.crawl("http://a.test/hang").await);
    assert!(reason.starts_with("timeout"), "{reason}");
    let (reason, _) = retry(f.crawl("http://a.test/stall-body").await);
    assert!(reason.contains("timeout"), "{reason}");
    let (reason, _) = retry(f.crawl("http://dead.test/").await);
    assert!(reason.contains("connection error"), "{reason}");
}

#[tokio::test]
async fn invalid_urls_fail_without_a_request() {
    let server = serve(Router::new()).await;
    let f = fetcher(config(&server));
    for url in [
        "not a url",
        "ftp://a.test/x",
        "http://user:pw@a.test/",
        "",
        "http://",
    ] {
        let reason = failure(f.crawl(url).await);
        assert!(reason.starts_with("invalid url"), "{url}: {reason}");
    }
    assert!(server.log.hits().is_empty());
}

#[tokio::test]
async fn page_content_directives_and_headers() {
    let server = serve(
        Router::new()
            .route(
                "/article",
                get(|| async {
                    Html(
                        r#"<!doctype html><html><head><title>Article</title>
                        <base href="/docs/"><link rel="canonical" href="/article?utm=x">
                        <script>ignored()</script></head>
                        <body><h1>Head line</h1><p>Body text.</p>
                        <a href="one.html">one</a><a href="one.html#again">again</a>
                        <a href="http://b.test/" rel="nofollow">sponsored</a></body></html>"#,
                    )
                }),
            )
            .route(
                "/tagged",
                get(|| async {
                    (
                        [
                            ("x-robots-tag", "otherbot: nofollow"),
                            ("x-robots-tag", "noindex, nofollow"),
                        ],
                        Html(r#"<a href="/x">x</a>"#),
                    )
                }),
            ),
    )
    .await;
    let f = fetcher(config(&server));
    let p = page(f.crawl("http://A.TEST:80/article#top").await);
    assert_eq!(p.final_url, "http://a.test/article");
    assert_eq!(p.title, "Article");
    // Inline elements with nothing between them run together, as a browser shows them.
    assert_eq!(p.text, "Head line Body text. oneagain sponsored");
    assert_eq!(p.canonical.as_deref(), Some("http://a.test/article?utm=x"));
    assert!(!p.indexable);
    assert_eq!(
        p.links,
        vec!["http://a.test/article?utm=x", "http://a.test/docs/one.html"]
    );

    let p = page(f.crawl("http://a.test/tagged").await);
    assert!(!p.indexable);
    assert!(p.links.is_empty());
}

#[tokio::test]
async fn hostile_pages_yield_outcomes() {
    // Deterministic junk: every byte value, in a scrambled order.
    let garbage: Vec<u8> = (0u32..1_500_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let garbage_too = garbage.clone();
    let server = serve(
        Router::new()
            .route("/deep", get(|| async { Html("<div>".repeat(400_000)) }))
            .route(
                "/deep-mixed",
                get(|| async {
                    Html("<table><tr><td><b><i><a href=x><select><option>".repeat(40_000))
                }),
            )
            .route(
                "/huge-attribute",
                get(|| async {
                    Html(format!(
                        "<a href=\"/{}\" title=\"{}\">x</a><p>after</p>",
                        "a".repeat(1_000_000),
                        "\"'<>&".repeat(100_000)
                    ))
                }),
            )
            .route(
                "/garbage",
                get(move || async move { ([(CONTENT_TYPE, "text/html")], garbage) }),
            )
            .route(
                "/garbage-gzip",
                get(move || async move {
                    (
                        [(CONTENT_TYPE, "text/html"), (CONTENT_ENCODING, "gzip")],
                        garbage_too,
                    )
                }),
            )
            .route(
                "/weird-encoding",
                get(|| async {
                    (
                        [
                            (CONTENT_TYPE, "text/html; charset=nonsense"),
                            (CONTENT_ENCODING, "compress"),
                        ],
                        "x",
                    )
                }),
            )
            .route(
                "/nul",
                get(|| async {
                    Response::new(Body::from(b"<html>\0\0\0<title>\0nul\0</title>".to_vec()))
                }),
            ),
    )
    .await;
    let f = fetcher(FetchConfig {
        total_timeout_ms: 30_000,
        ..config(&server)
    });
    for path in [
        "/deep",
        "/deep-mixed",
        "/huge-attribute",
        "/garbage",
        "/nul",
    ] {
        match f.crawl(&format!("http://a.test{path}")).await {
            CrawlAttempt::Done(Outcome::Page(_)) => {}
            other => panic!("{path}: expected a (possibly empty) page, got {other:?}"),
        }
    }
    let reason = failure(f.crawl("http://a.test/garbage-gzip").await);
    assert!(reason.starts_with("corrupt gzip body"), "{reason}");
    let reason = failure(f.crawl("http://a.test/weird-encoding").await);
    assert!(reason.contains("unsupported content-encoding"), "{reason}");
}
