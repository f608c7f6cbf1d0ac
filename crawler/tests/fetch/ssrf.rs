//! The SSRF guard with the default (empty) allowlist: nothing internal is ever contacted.

use axum::response::Html;
use axum::routing::get;
use axum::Router;
use crawler::FetchConfig;

use crate::harness::{config, failure, fetcher, page, serve};

#[tokio::test]
async fn internal_addresses_are_refused_by_default() {
    let server =
        serve(Router::new().route("/", get(|| async { Html("<title>internal</title>") }))).await;
    let port = server.addr.port();
    let f = fetcher(FetchConfig {
        resolve: [
            ("loopback.test".to_string(), server.addr),
            (
                "metadata.test".to_string(),
                "169.254.169.254:80".parse().expect("addr"),
            ),
            ("ten.test".to_string(), "10.1.2.3:80".parse().expect("addr")),
            (
                "ula.test".to_string(),
                "[fd00::1]:80".parse().expect("addr"),
            ),
        ]
        .into(),
        ..FetchConfig::default()
    });
    let cases = [
        (
            format!("http://127.0.0.1:{port}/"),
            "refused: address 127.0.0.1 is not allowed (loopback)",
        ),
        (
            format!("http://[::1]:{port}/"),
            "refused: address ::1 is not allowed (loopback)",
        ),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "refused: address ::ffff:127.0.0.1 is not allowed (loopback)",
        ),
        (
            "http://loopback.test/".to_string(),
            "refused: address 127.0.0.1 is not allowed (loopback)",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "refused: address 169.254.169.254 is not allowed (cloud metadata)",
        ),
        (
            "http://metadata.test/".to_string(),
            "refused: address 169.254.169.254 is not allowed (cloud metadata)",
        ),
        (
            "http://10.1.2.3/".to_string(),
            "refused: address 10.1.2.3 is not allowed (private)",
        ),
        (
            "http://ten.test/".to_string(),
            "refused: address 10.1.2.3 is not allowed (private)",
        ),
        (
            "http://ula.test/".to_string(),
            "refused: address fd00::1 is not allowed (unique local (ULA))",
        ),
        (
            "http://0.0.0.0/".to_string(),
            "refused: address 0.0.0.0 is not allowed (unspecified)",
        ),
        (
            "http://100.64.0.1/".to_string(),
            "refused: address 100.64.0.1 is not allowed (shared address space (CGNAT))",
        ),
    ];
    for (url, want) in cases {
        assert_eq!(failure(f.crawl(&url).await), want, "{url}");
    }
    // The system resolver's answer for localhost is judged the same way.
    let reason = failure(f.crawl(&format!("http://localhost:{port}/")).await);
    assert!(
        reason.starts_with("refused: ") && reason.contains("loopback"),
        "{reason}"
    );

    assert!(
        server.log.hits().is_empty(),
        "the server was contacted: {:?}",
        server.log.hits()
    );
}

#[tokio::test]
async fn allowlisted_addresses_are_fetched() {
    let server =
        serve(Router::new().route("/", get(|| async { Html("<title>allowed</title>") }))).await;
    let f = fetcher(config(&server));
    let p = page(
        f.crawl(&format!("http://127.0.0.1:{}/", server.addr.port()))
            .await,
    );
    assert_eq!(p.title, "allowed");
}
