//! Manual redirects: relative Locations, the hop limit, and robots/SSRF checks on every hop.

use axum::extract::Path;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use crawler::FetchConfig;

use crate::harness::{config, failure, fetcher, page, serve};

/// `/r/{n}/{end}` redirects (relatively) to `/r/{n+1}/{end}` until `n == end`.
async fn chain(Path((n, end)): Path<(u32, u32)>) -> Response {
    if n < end {
        Redirect::temporary(&format!("../{}/{end}", n + 1)).into_response()
    } else {
        Html(format!("<title>end {n}</title>")).into_response()
    }
}

fn site() -> Router {
    Router::new()
        .route(
            "/robots.txt",
            get(|| async { "User-agent: *\nDisallow: /secret\n" }),
        )
        .route("/r/{n}/{end}", get(chain))
        .route("/to-secret", get(|| async { Redirect::to("/secret") }))
        .route("/secret", get(|| async { Html("secret") }))
        .route(
            "/to-b",
            get(|| async { Redirect::permanent("http://b.test/landing#frag") }),
        )
        .route("/landing", get(|| async { Html("<title>landed</title>") }))
        .route(
            "/to-private",
            get(|| async { Redirect::to("http://10.0.0.1/admin") }),
        )
        .route(
            "/to-metadata",
            get(|| async { Redirect::to("http://metadata.test/latest/meta-data/") }),
        )
        .route(
            "/to-ftp",
            get(|| async { Redirect::to("ftp://a.test/file") }),
        )
}

#[tokio::test]
async fn redirects_are_followed_up_to_the_limit() {
    let server = serve(site()).await;
    let f = fetcher(config(&server));
    let p = page(f.crawl("http://a.test/r/0/5").await);
    assert_eq!(p.title, "end 5");
    assert_eq!(p.final_url, "http://a.test/r/5/5");
    assert_eq!(p.status, 200);

    assert_eq!(
        failure(f.crawl("http://a.test/r/0/6").await),
        "redirect limit (5) exceeded"
    );
    assert!(!server.log.paths("a.test").contains(&"/r/6/6".to_string()));

    let strict = fetcher(FetchConfig {
        max_redirects: 0,
        ..config(&server)
    });
    assert_eq!(
        failure(strict.crawl("http://a.test/r/0/1").await),
        "redirect limit (0) exceeded"
    );
}

#[tokio::test]
async fn cross_host_redirects_land_with_their_own_robots() {
    let server = serve(site()).await;
    let f = fetcher(config(&server));
    let p = page(f.crawl("http://a.test/to-b").await);
    assert_eq!(p.final_url, "http://b.test/landing");
    assert_eq!(server.log.paths("b.test"), vec!["/robots.txt", "/landing"]);
}

#[tokio::test]
async fn a_redirect_to_a_disallowed_path_is_not_followed() {
    let server = serve(site()).await;
    let f = fetcher(config(&server));
    assert_eq!(
        failure(f.crawl("http://a.test/to-secret").await),
        "robots.txt disallows"
    );
    assert!(!server.log.paths("a.test").contains(&"/secret".to_string()));
}

#[tokio::test]
async fn a_redirect_to_an_internal_address_is_refused() {
    let server = serve(site()).await;
    let mut cfg = config(&server);
    cfg.resolve.insert(
        "metadata.test".into(),
        "169.254.169.254:80".parse().expect("addr"),
    );
    let f = fetcher(cfg);
    assert_eq!(
        failure(f.crawl("http://a.test/to-private").await),
        "refused: address 10.0.0.1 is not allowed (private)"
    );
    assert_eq!(
        failure(f.crawl("http://a.test/to-metadata").await),
        "refused: address 169.254.169.254 is not allowed (cloud metadata)"
    );
    let reason = failure(f.crawl("http://a.test/to-ftp").await);
    assert!(reason.starts_with("bad redirect"), "{reason}");
}
