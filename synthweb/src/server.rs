//! The HTTP server of the synthetic web: one fallback handler that dispatches by `Host`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use tokio::sync::oneshot;

use super::SyntheticWeb;

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The `Host` header without its port, lowercased.
    pub host: String,
    /// Path and query as requested.
    pub path: String,
    /// When the answer was ready (after the configured latency).
    pub at: Instant,
    pub status: u16,
}

/// Every request the server answered (robots.txt, redirects and 404s included), in order.
/// Cloning shares the log.
#[derive(Debug, Clone)]
pub struct ServedLog(Arc<LogInner>);

#[derive(Debug)]
struct LogInner {
    /// `false`: only count (a long-running server must not grow without bound).
    keep: bool,
    count: AtomicUsize,
    entries: Mutex<Vec<Served>>,
}

impl Default for ServedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl ServedLog {
    /// A log that keeps every request.
    pub fn new() -> Self {
        Self::with_keep(true)
    }

    /// A log that only counts requests: `snapshot` stays empty, `len` counts.
    pub fn counting() -> Self {
        Self::with_keep(false)
    }

    fn with_keep(keep: bool) -> Self {
        Self(Arc::new(LogInner {
            keep,
            count: AtomicUsize::new(0),
            entries: Mutex::new(Vec::new()),
        }))
    }

    /// The requests logged so far, in the order they were answered.
    pub fn snapshot(&self) -> Vec<Served> {
        self.lock().clone()
    }

    /// Requests answered so far.
    pub fn len(&self) -> usize {
        self.0.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget everything logged so far.
    pub fn clear(&self) {
        let mut entries = self.lock();
        entries.clear();
        self.0.count.store(0, Ordering::Relaxed);
    }

    fn push(&self, served: Served) {
        if self.0.keep {
            let mut entries = self.lock();
            entries.push(served);
            self.0.count.store(entries.len(), Ordering::Relaxed);
        } else {
            self.0.count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Served>> {
        // A panic while holding the lock cannot leave a Vec half-pushed; keep serving.
        self.0
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Clone)]
struct AppState {
    web: Arc<SyntheticWeb>,
    log: ServedLog,
    hostile: Arc<crate::hostile::Hostile>,
}

/// The router serving `web` and recording every request in `log`.
pub fn app(web: Arc<SyntheticWeb>, log: ServedLog) -> Router {
    Router::new().fallback(answer).with_state(AppState {
        web,
        log,
        hostile: Arc::default(),
    })
}

/// Serve `web` on `listener` until `shutdown` completes, recording every request in `log`.
pub async fn serve(
    web: Arc<SyntheticWeb>,
    listener: tokio::net::TcpListener,
    log: ServedLog,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(web, log))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A synthetic web served on a loopback port by a background task, until this is dropped.
pub struct Serving {
    pub web: Arc<SyntheticWeb>,
    /// The requests answered.
    pub log: ServedLog,
    /// Where it answers (`127.0.0.1:N`); crawlers resolve every host of the web here.
    pub addr: SocketAddr,
    /// Dropping it (with this handle) stops the server.
    _stop: oneshot::Sender<()>,
}

impl Serving {
    /// Bind `127.0.0.1:0` and serve `web` there, recording every request in `log`. An error
    /// of the server afterwards is logged (the web is gone; its users notice).
    pub async fn start(web: Arc<SyntheticWeb>, log: ServedLog) -> std::io::Result<Serving> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (served, served_log) = (web.clone(), log.clone());
        tokio::spawn(async move {
            // The sender is never used: its drop ends the wait.
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = serve(served, listener, served_log, shutdown).await {
                tracing::error!(error = %e, "the synthetic web stopped");
            }
        });
        Ok(Serving {
            web,
            log,
            addr,
            _stop: stop,
        })
    }
}

async fn answer(State(state): State<AppState>, request: Request) -> Response {
    let latency = state.web.spec.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host())
        .map(host_without_port)
        .unwrap_or_default();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if crate::hostile::is_hostile(&host) {
        let response = state.hostile.answer(&host, &path).await;
        state.log.push(Served {
            host,
            path,
            at: Instant::now(),
            status: response.status().as_u16(),
        });
        return response;
    }
    let answer = state.web.answer(&host, &path);
    state.log.push(Served {
        host,
        path,
        at: Instant::now(),
        status: answer.status,
    });
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(answer.content_type),
    );
    if let Some(location) = answer.location {
        if let Ok(value) = HeaderValue::from_str(&location) {
            headers.insert(header::LOCATION, value);
        }
    }
    response
}

/// `www.h1-amber.test:8081` -> `www.h1-amber.test` (and `[::1]:80` -> `[::1]`), lowercased.
fn host_without_port(host: &str) -> String {
    let host = host.trim();
    let host = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}
