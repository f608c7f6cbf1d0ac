//! Google's robots.txt reference cases (`robots_cases.rs`) through the whole fetch stack: each
//! row gets its own origin serving its robots.txt, and a crawl of its URL must either request
//! the page or refuse it with "robots.txt disallows" without the server ever seeing the path.
//!
//! Rows a crawl cannot express are left to the robots module's unit tests, which run them all:
//! agents that are not a valid product token (the configuration refuses them), and URLs that
//! are empty or not yet percent-encoded (the `url` crate encodes them before matching).

use axum::extract::Request;
use axum::http::header::HOST;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use crawler::{CrawlAttempt, FetchConfig};
use protocol::Outcome;
use std::collections::HashMap;
use std::sync::Arc;
use url::Url;

use crate::harness::{config, fetcher, serve};
use crate::robots_cases::cases;

fn crawlable(agent: &str, url: &str) -> bool {
    let valid_token = !agent.is_empty()
        && agent
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    valid_token && url.is_ascii() && Url::parse(url).is_ok()
}

#[tokio::test]
async fn reference_cases_through_the_fetch_stack() {
    let rows: Vec<_> = cases()
        .into_iter()
        .filter(|c| crawlable(c.agent, &c.url))
        .collect();
    let bodies: Arc<HashMap<String, Vec<u8>>> = Arc::new(
        rows.iter()
            .enumerate()
            .map(|(i, c)| (format!("c{i}.test"), c.robots.clone()))
            .collect(),
    );
    let robots = move |req: Request| {
        let bodies = bodies.clone();
        async move {
            let host = req
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.split(':').next())
                .unwrap_or_default();
            bodies.get(host).cloned().unwrap_or_default()
        }
    };
    let server = serve(
        Router::new()
            .route("/robots.txt", get(robots))
            .route("/", get(|| async { Html("<title>page</title>") }))
            .route("/{*rest}", get(|| async { Html("<title>page</title>") })),
    )
    .await;

    let mut wrong = Vec::new();
    for (i, c) in rows.iter().enumerate() {
        let host = format!("c{i}.test");
        let mut url = Url::parse(&c.url).expect("crawlable rows parse");
        url.set_host(Some(&host)).expect("test host");
        let f = fetcher(FetchConfig {
            robots_token: Some(c.agent.to_string()),
            ..config(&server)
        });
        let attempt = f.crawl(url.as_str()).await;
        // Requests for the page itself (the robots.txt fetch aside).
        let page_hits = server
            .log
            .paths(&host)
            .iter()
            .skip(1)
            .filter(|p| **p == url.path())
            .count();
        let refused = matches!(
            &attempt,
            CrawlAttempt::Done(Outcome::Failed { reason }) if reason == "robots.txt disallows"
        );
        let ok = if c.allowed {
            !refused && page_hits == 1
        } else {
            refused && page_hits == 0
        };
        if !ok {
            wrong.push(format!(
                "[{}] agent {:?} url {:.80} should be {}",
                c.source,
                c.agent,
                c.url,
                if c.allowed { "allowed" } else { "disallowed" }
            ));
        }
    }
    assert!(rows.len() >= 160, "only {} crawlable rows", rows.len());
    assert!(
        wrong.is_empty(),
        "{} of {} rows wrong through the fetch stack:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n")
    );
}
