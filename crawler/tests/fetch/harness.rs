//! Test servers that log every request, and helpers to read crawl attempts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header::HOST, StatusCode};
use axum::middleware::{self, Next};
use axum::Router;
use crawler::{CrawlAttempt, FetchConfig, Fetcher};
use protocol::{FetchedPage, Outcome};

#[derive(Debug, Clone)]
pub struct Hit {
    pub host: String,
    pub path: String,
    pub at: Instant,
}

#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<Hit>>>);

impl Log {
    pub fn hits(&self) -> Vec<Hit> {
        self.0.lock().expect("log lock").clone()
    }

    pub fn paths(&self, host: &str) -> Vec<String> {
        self.hits()
            .into_iter()
            .filter(|h| h.host == host)
            .map(|h| h.path)
            .collect()
    }

    pub fn count(&self, host: &str, path: &str) -> usize {
        self.paths(host).iter().filter(|p| *p == path).count()
    }

    /// Arrival times of the requests to `host`, in order.
    pub fn times(&self, host: &str) -> Vec<Instant> {
        let mut t: Vec<Instant> = self
            .hits()
            .into_iter()
            .filter(|h| h.host == host)
            .map(|h| h.at)
            .collect();
        t.sort();
        t
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub log: Log,
}

/// Serve `router` (unknown paths, robots.txt included, answer 404) on 127.0.0.1:0.
pub async fn serve(router: Router) -> Server {
    let log = Log::default();
    let recorder = log.clone();
    let app = router
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let recorder = recorder.clone();
            async move {
                let host = req
                    .headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                recorder.0.lock().expect("log lock").push(Hit {
                    host,
                    path: req.uri().path().to_string(),
                    at: Instant::now(),
                });
                next.run(req).await
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("test server");
    });
    Server { addr, log }
}

/// A configuration that reaches `server` for every `*.test` name, fast enough for tests.
pub fn config(server: &Server) -> FetchConfig {
    FetchConfig {
        resolve: [(".test".to_string(), server.addr)].into(),
        allow_addresses: vec!["127.0.0.1/32".parse().expect("cidr")],
        per_host_rate: 1_000.0,
        per_host_burst: 100,
        per_host_concurrency: 16,
        connect_timeout_ms: 5_000,
        total_timeout_ms: 10_000,
        ..FetchConfig::default()
    }
}

pub fn fetcher(cfg: FetchConfig) -> Fetcher {
    Fetcher::new(cfg).expect("valid test configuration")
}

pub fn page(attempt: CrawlAttempt) -> FetchedPage {
    match attempt {
        CrawlAttempt::Done(Outcome::Page(p)) => p,
        other => panic!("expected a page, got {other:?}"),
    }
}

pub fn failure(attempt: CrawlAttempt) -> String {
    match attempt {
        CrawlAttempt::Done(Outcome::Failed { reason }) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

pub fn retry(attempt: CrawlAttempt) -> (String, Duration) {
    match attempt {
        CrawlAttempt::Retry { reason, after } => (reason, after),
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// A port on 127.0.0.1 where nothing listens.
pub async fn dead_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}
