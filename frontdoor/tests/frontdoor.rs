//! The frontdoor against real HTTP servers on 127.0.0.1:0: fake api cells and a fake health
//! checker. Each fake server runs on its own runtime in its own thread, so that killing it
//! closes every socket it had, pooled keep-alive connections included (as a dead process would).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::{Json, Router};
use control::{ClusterKey, Signer, Verifier, SIGNATURE_HEADER};
use frontdoor::{AppState, Backend, FrontdoorConfig, BACKEND_HEADER};
use protocol::control::{CellRecord, CellState, CellsResponse, WeightRequest};
use protocol::ErrorBody;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// A server on its own runtime; dropping or killing it closes all its connections.
struct FakeServer {
    base: String,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    fn start(router: Router) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let base = format!("http://{}", std_listener.local_addr().expect("addr"));
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                tokio::spawn(async move { axum::serve(listener, router).await });
                let _ = killed.await;
            });
            // Dropping the runtime drops every connection task: the sockets close.
            drop(rt);
        });
        Self {
            base,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("server thread");
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
struct FakeApi {
    name: &'static str,
    hits: Arc<AtomicUsize>,
    /// Status of every `/search` answer (200: a normal answer).
    search_status: StatusCode,
    delay: Duration,
}

async fn fake_search(State(api): State<FakeApi>, RawQuery(q): RawQuery) -> impl IntoResponse {
    api.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(api.delay).await;
    if api.search_status != StatusCode::OK {
        return (
            api.search_status,
            Json(ErrorBody {
                error: format!("{} says {}", api.name, api.search_status.as_u16()),
            }),
        )
            .into_response();
    }
    Json(serde_json::json!({ "api": api.name, "query": q })).into_response()
}

async fn fake_crawl(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    api.hits.fetch_add(1, Ordering::SeqCst);
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    (
        StatusCode::ACCEPTED,
        [("content-type", format!("{ct}; echoed-by={}", api.name))],
        body,
    )
}

async fn fake_stats(State(api): State<FakeApi>) -> impl IntoResponse {
    api.hits.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::IM_A_TEAPOT,
        [("content-type", "text/x-stats")],
        format!("stats of {}", api.name),
    )
}

struct Api {
    name: &'static str,
    hits: Arc<AtomicUsize>,
    server: FakeServer,
}

impl Api {
    fn start(name: &'static str, search_status: StatusCode, delay: Duration) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let state = FakeApi {
            name,
            hits: hits.clone(),
            search_status,
            delay,
        };
        let router = Router::new()
            .route("/search", get(fake_search))
            .route("/crawl", any(fake_crawl))
            .route("/stats", get(fake_stats))
            .with_state(state);
        Self {
            name,
            hits,
            server: FakeServer::start(router),
        }
    }

    fn healthy(name: &'static str) -> Self {
        Self::start(name, StatusCode::OK, Duration::ZERO)
    }

    fn backend(&self) -> Backend {
        Backend::new(self.name, self.server.base.clone())
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn key() -> ClusterKey {
    ClusterKey::new(b"frontdoor tests' cluster key, 32b".to_vec())
}

fn verifier() -> Arc<Verifier> {
    Arc::new(Verifier::new(key(), Duration::from_secs(30)))
}

fn test_config() -> FrontdoorConfig {
    FrontdoorConfig {
        listen: "127.0.0.1:0".into(),
        attempt_timeout_ms: 2000,
        eject_for_ms: 60_000,
        ..FrontdoorConfig::default()
    }
}

struct Door {
    base: String,
    state: AppState,
    feed: watch::Sender<Vec<Backend>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), frontdoor::RunError>>,
}

async fn serve(
    state: AppState,
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), frontdoor::RunError>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let ctx = lifecycle::CellContext::detached(
        lifecycle::CellSpec::alone("frontdoor", "frontdoor-test"),
        listener.local_addr().expect("addr"),
    );
    let task = tokio::spawn(frontdoor::run(ctx, state, listener, shutdown.clone()));
    (base, shutdown, task)
}

async fn door(backends: Vec<Backend>, cfg: FrontdoorConfig) -> Door {
    let (feed, rx) = watch::channel(backends);
    let state = AppState::with_backends(cfg, verifier(), rx)
        .expect("state")
        .with_seed(42);
    let (base, shutdown, task) = serve(state.clone()).await;
    Door {
        base,
        state,
        feed,
        shutdown,
        task,
    }
}

impl Door {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("joins").expect("run ends cleanly");
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

async fn fetch(url: &str) -> reqwest::Response {
    client()
        .get(url)
        .send()
        .await
        .expect("the frontdoor answers")
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_healthy_apis_and_answers_come_back_unchanged() {
    let a = Api::healthy("api-a");
    let b = Api::healthy("api-b");
    let door = door(vec![a.backend(), b.backend()], test_config()).await;
    let http = client();

    let mut answered_by = std::collections::BTreeMap::new();
    for i in 0..100 {
        let resp = http
            .get(format!("{}/search?q=rust&limit={i}", door.base))
            .send()
            .await
            .expect("answers");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let backend = resp.headers()[BACKEND_HEADER]
            .to_str()
            .expect("ascii")
            .to_string();
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(
            body["api"],
            backend.as_str(),
            "the header names who answered"
        );
        assert_eq!(body["query"], format!("q=rust&limit={i}"));
        *answered_by.entry(backend).or_insert(0) += 1;
    }
    assert!(a.hits() >= 25 && b.hits() >= 25, "{answered_by:?}");
    assert_eq!(a.hits() + b.hits(), 100);

    // A POST body and its content type go through; status, content type and body come back.
    let resp = http
        .post(format!("{}/crawl", door.base))
        .header("content-type", "application/json")
        .body(r#"{"seeds":["http://a.test/"]}"#)
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let ct = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(ct.starts_with("application/json; echoed-by=api-"), "{ct}");
    assert_eq!(
        resp.text().await.expect("body"),
        r#"{"seeds":["http://a.test/"]}"#
    );

    // A public route, with whatever status the api chose.
    let resp = fetch(&format!("{}/stats", door.base)).await;
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(resp.headers()["content-type"], "text/x-stats");
    assert!(resp
        .text()
        .await
        .expect("body")
        .starts_with("stats of api-"));

    // Not public: 404 at the door, whatever is under a public prefix.
    let stats_hits = a.hits() + b.hits();
    for path in ["/internal/ingest", "/stats/hosts", "/search/x"] {
        let resp = fetch(&format!("{}{path}", door.base)).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(a.hits() + b.hits(), stats_hits, "no api saw them");
    // The frontdoor's own routes.
    let resp = fetch(&format!("{}/readyz", door.base)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(door.state.counters.retries(), 0);
    door.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_api_costs_clients_nothing_and_is_ejected() {
    let a = Api::healthy("api-a");
    let mut b = Api::healthy("api-b");
    let door = door(vec![a.backend(), b.backend()], test_config()).await;
    // Warm up: both have pooled connections from the frontdoor.
    for _ in 0..20 {
        assert_eq!(
            fetch(&format!("{}/search?q=x", door.base)).await.status(),
            200
        );
    }
    assert!(b.hits() > 0);
    b.server.kill();

    let http = client();
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let http = http.clone();
        let base = door.base.clone();
        load.spawn(async move {
            let mut failures = Vec::new();
            for i in 0..25 {
                let resp = http
                    .get(format!("{base}/search?q=w{worker}i{i}"))
                    .send()
                    .await
                    .expect("the frontdoor answers");
                if resp.status() != StatusCode::OK {
                    failures.push(format!(
                        "{}: {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    ));
                } else {
                    assert_eq!(resp.headers()[BACKEND_HEADER], "api-a");
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = load.join_next().await {
        failures.extend(done.expect("load task"));
    }
    assert_eq!(failures, Vec::<String>::new(), "no client saw the death");
    assert!(
        door.state.balancer.status("api-b").ejected,
        "the dead api is ejected"
    );
    assert!(door.state.counters.ejections() >= 1);
    let retries = door.state.counters.retries();
    assert!(
        (3..=30).contains(&retries),
        "a few retries until the ejection, then none: {retries}"
    );
    door.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_retried_elsewhere_and_a_4xx_is_returned_as_is() {
    let broken = Api::start("api-500", StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO);
    let good = Api::healthy("api-ok");
    let cfg = FrontdoorConfig {
        // Keep the broken one in rotation so that every request may meet it.
        eject_after_failures: 1000,
        ..test_config()
    };
    let door = door(vec![broken.backend(), good.backend()], cfg).await;
    for _ in 0..40 {
        let resp = fetch(&format!("{}/search?q=x", door.base)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[BACKEND_HEADER], "api-ok");
    }
    assert!(broken.hits() >= 10, "{}", broken.hits());
    assert_eq!(
        door.state.counters.retries(),
        broken.hits() as u64,
        "every 500 was retried once, on the other api"
    );
    door.stop().await;

    // Both 4xx: each request is answered by the first api it meets, never retried.
    let x = Api::start("api-x", StatusCode::BAD_REQUEST, Duration::ZERO);
    let y = Api::start("api-y", StatusCode::BAD_REQUEST, Duration::ZERO);
    let door2 = self::door(vec![x.backend(), y.backend()], test_config()).await;
    for _ in 0..20 {
        let resp = fetch(&format!("{}/search?q=", door2.base)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let who = resp.headers()[BACKEND_HEADER]
            .to_str()
            .expect("ascii")
            .to_string();
        let body: ErrorBody = resp.json().await.expect("the api's own error body");
        assert_eq!(body.error, format!("{who} says 400"));
    }
    assert_eq!(x.hits() + y.hits(), 20);
    assert_eq!(door2.state.counters.retries(), 0);
    door2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_attempt_fails_the_answer_names_the_last_error() {
    let one = Api::start("api-1", StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO);
    let two = Api::start("api-2", StatusCode::INTERNAL_SERVER_ERROR, Duration::ZERO);
    let door = door(vec![one.backend(), two.backend()], test_config()).await;
    let resp = fetch(&format!("{}/search?q=x", door.base)).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: ErrorBody = resp.json().await.expect("json");
    assert!(body.error.contains("2 attempts"), "{}", body.error);
    assert!(body.error.contains("500"), "{}", body.error);
    assert_eq!(one.hits() + two.hits(), 2, "one attempt each, no more");
    door.stop().await;

    // A slow api: the attempt times out (504 when it was the last failure).
    let slow = Api::start("api-slow", StatusCode::OK, Duration::from_secs(3));
    let cfg = FrontdoorConfig {
        attempt_timeout_ms: 200,
        ..test_config()
    };
    let door = self::door(vec![slow.backend()], cfg).await;
    let resp = fetch(&format!("{}/search?q=x", door.base)).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let body: ErrorBody = resp.json().await.expect("json");
    assert!(
        body.error.contains("api-slow") && body.error.contains("200 ms"),
        "{}",
        body.error
    );
    door.shutdown.cancel();
    let _ = door.task.await;
}

#[tokio::test]
async fn no_live_api_is_a_clear_503() {
    let (_feed, rx) = watch::channel(Vec::new());
    let state = AppState::with_backends(test_config(), verifier(), rx).expect("state");
    let resp = frontdoor::app(state)
        .oneshot(
            http::Request::get("/search?q=x")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let body: ErrorBody = serde_json::from_slice(&bytes).expect("an ErrorBody");
    assert!(body.error.contains("no api cell is live"), "{}", body.error);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_before_any_api_sees_it() {
    let api = Api::healthy("api-a");
    let (_feed, rx) = watch::channel(vec![api.backend()]);
    let cfg = FrontdoorConfig {
        max_body_bytes: 1024,
        ..test_config()
    };
    let state = AppState::with_backends(cfg, verifier(), rx).expect("state");
    let resp = frontdoor::app(state)
        .oneshot(
            http::Request::post("/crawl")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(vec![b' '; 4096]))
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let body: ErrorBody = serde_json::from_slice(&bytes).expect("an ErrorBody");
    assert!(body.error.contains("request body"), "{}", body.error);
    assert_eq!(api.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_api_gets_no_traffic() {
    let serving = Api::healthy("api-serving");
    let draining = Api::healthy("api-draining");
    let throttling = Api::healthy("api-throttling");
    let mut d = draining.backend();
    d.state = CellState::Draining;
    let mut t = throttling.backend();
    t.state = CellState::Throttling;
    let door = door(vec![serving.backend(), d.clone(), t], test_config()).await;
    for _ in 0..60 {
        assert_eq!(
            fetch(&format!("{}/search?q=x", door.base)).await.status(),
            200
        );
    }
    assert_eq!(draining.hits(), 0);
    assert!(serving.hits() > 0 && throttling.hits() > 0);

    // Only a draining api left: as good as none.
    door.feed.send_replace(vec![d]);
    let resp = fetch(&format!("{}/search?q=x", door.base)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(draining.hits(), 0);
    door.stop().await;
}

async fn send_weight(
    base: &str,
    signer: Option<&Signer>,
    signature_override: Option<&str>,
    request: &WeightRequest,
) -> reqwest::Response {
    let mut post = client()
        .post(format!("{base}/control/weight"))
        .header("content-type", "application/json");
    match signer {
        Some(signer) => {
            let sealed = signer.seal(WeightRequest::KIND, request);
            let signature = signature_override.unwrap_or(&sealed.signature).to_string();
            post = post.header(SIGNATURE_HEADER, signature).body(sealed.bytes);
        }
        None => post = post.body(serde_json::to_vec(request).expect("json")),
    }
    post.send().await.expect("answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_weight_requests_move_traffic_and_forged_ones_change_nothing() {
    let a = Api::healthy("api-a");
    let b = Api::healthy("api-b");
    let door = door(vec![a.backend(), b.backend()], test_config()).await;
    let zero_a = WeightRequest {
        cell_id: "api-a".into(),
        weight: 0.0,
        reason: "pressure 1.4 over the high water mark".into(),
    };

    // Unsigned, forged (another key), tampered: 401, counted, nothing changes.
    let resp = send_weight(&door.base, None, None, &zero_a).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let intruder = Signer::new(
        ClusterKey::new(b"not the cluster key at all!!".to_vec()),
        "x",
    );
    let resp = send_weight(&door.base, Some(&intruder), None, &zero_a).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: ErrorBody = resp.json().await.expect("json");
    assert!(body.error.contains("signature"), "{}", body.error);
    let insider = Signer::new(key(), "api-a");
    let resp = send_weight(&door.base, Some(&insider), Some("00ff"), &zero_a).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(door.state.counters.control_rejected(), 3);
    assert_eq!(door.state.counters.weights_applied(), 0);
    assert_eq!(door.state.balancer.status("api-a").base_weight, 1.0);
    for _ in 0..40 {
        fetch(&format!("{}/search?q=x", door.base)).await;
    }
    assert!(a.hits() > 5, "a still gets traffic: {}", a.hits());

    // A signed one with an impossible weight: 400, nothing changes.
    let bad = WeightRequest {
        weight: 2.0,
        ..zero_a.clone()
    };
    let resp = send_weight(&door.base, Some(&insider), None, &bad).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(door.state.balancer.status("api-a").base_weight, 1.0);

    // Signed by api-b, about api-a: an api speaks only for itself. 403, counted, no change.
    let rejected = door.state.counters.control_rejected();
    let sibling = Signer::new(key(), "api-b");
    let resp = send_weight(&door.base, Some(&sibling), None, &zero_a).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: ErrorBody = resp.json().await.expect("json");
    assert!(
        body.error.contains("only from the api it concerns"),
        "{}",
        body.error
    );
    assert_eq!(door.state.counters.control_rejected(), rejected + 1);
    assert_eq!(door.state.balancer.status("api-a").base_weight, 1.0);

    // Signed, weight 0: all traffic goes to b.
    let resp = send_weight(&door.base, Some(&insider), None, &zero_a).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(door.state.counters.weights_applied(), 1);
    let before = a.hits();
    for _ in 0..100 {
        let resp = fetch(&format!("{}/search?q=x", door.base)).await;
        assert_eq!(resp.headers()[BACKEND_HEADER], "api-b");
    }
    assert_eq!(a.hits(), before);

    // Restored: a gets traffic again.
    let restore = WeightRequest {
        weight: 1.0,
        reason: "back to normal".into(),
        ..zero_a
    };
    let resp = send_weight(&door.base, Some(&insider), None, &restore).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    for _ in 0..40 {
        fetch(&format!("{}/search?q=x", door.base)).await;
    }
    assert!(a.hits() > before, "a is back in rotation");
    door.stop().await;
}

fn record(id: &str, addr: &str, state: CellState) -> CellRecord {
    CellRecord {
        cell_id: id.into(),
        role: "api".into(),
        addr: addr.into(),
        state,
        pressure: 0.2,
        parent: None,
        age_ms: 5000,
        last_seen_ms: 100,
        phi: 0.1,
        pid: None,
        version: String::new(),
        build: String::new(),
        wire: Vec::new(),
    }
}

fn cells(records: Vec<CellRecord>) -> CellsResponse {
    let mut view = CellsResponse::default();
    view.roles.insert("api".into(), records);
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_poller_follows_the_health_checkers() {
    let api = Api::healthy("api-c");
    let view = Arc::new(Mutex::new(cells(vec![record(
        "api-a",
        "http://127.0.0.1:9",
        CellState::Serving,
    )])));
    let served = view.clone();
    let mut hc = FakeServer::start(Router::new().route(
        "/cells",
        get(move || {
            let view = served.clone();
            async move { Json(protocol::Versioned::new(view.lock().expect("view").clone())) }
        }),
    ));
    // A second health checker that never answers is skipped.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
    drop(silent);

    let cfg = FrontdoorConfig {
        healthcheckers: vec![hc.base.clone(), silent_url],
        registry_poll_ms: 20,
        ..test_config()
    };
    assert_eq!(cfg.problems(), Vec::new());
    let state = AppState::new(cfg, verifier()).expect("state").with_seed(1);
    let (base, shutdown, task) = serve(state.clone()).await;
    let ids =
        |s: &AppState| -> Vec<String> { s.backends().into_iter().map(|b| b.cell_id).collect() };

    wait_until("api-a is picked up", || ids(&state) == ["api-a"]).await;

    // api-a disappears, api-b drains, api-c serves.
    *view.lock().expect("view") = cells(vec![
        record("api-b", "http://127.0.0.1:9", CellState::Draining),
        record("api-c", &api.server.base, CellState::Serving),
    ]);
    wait_until("api-a is dropped and api-c picked up", || {
        ids(&state) == ["api-c"]
    })
    .await;
    let resp = fetch(&format!("{base}/search?q=via+registry")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[BACKEND_HEADER], "api-c");
    assert_eq!(state.backends()[0].pressure, 0.2);

    // The health checker dies: its last good view is kept.
    hc.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ids(&state), ["api-c"]);
    assert_eq!(
        fetch(&format!("{base}/search?q=x")).await.status(),
        StatusCode::OK
    );

    shutdown.cancel();
    task.await.expect("joins").expect("run ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let slow = Api::start("api-slow", StatusCode::OK, Duration::from_millis(400));
    let door = door(vec![slow.backend()], test_config()).await;
    let base = door.base.clone();
    let in_flight = tokio::spawn(async move { fetch(&format!("{base}/search?q=slow")).await });
    wait_until("the request reached the api", || slow.hits() == 1).await;
    assert!(door.state.ready.get());
    door.shutdown.cancel();
    let resp = in_flight.await.expect("joins");
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the request in flight was finished"
    );
    door.task.await.expect("joins").expect("run ends cleanly");
    assert!(!door.state.ready.get());
    let refused = client()
        .get(format!("{}/search?q=x", door.base))
        .send()
        .await;
    assert!(refused.is_err(), "no longer accepting");
}

/// Send `method target` to `base` over a raw socket, the request target exactly as written (an
/// HTTP client would resolve the dot segments before sending). Returns the status and body.
async fn raw_request(base: &str, method: &str, target: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// Every path trick aimed at an api's internal endpoints, sent to a front door whose api
/// answers anything it receives: each is refused at the door (404 naming the path, or 400 for a
/// target no HTTP server takes) and the api sees none of them. The public routes, however
/// spelled, reach the api as their own literal path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_a_path_reaches_an_internal_endpoint() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let server = FakeServer::start(Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri| {
            let log = log.clone();
            async move {
                log.lock().expect("log").push(format!("{method} {uri}"));
                (StatusCode::OK, "the api took it")
            }
        },
    ));
    let door = door(
        vec![Backend::new("api-a", server.base.clone())],
        test_config(),
    )
    .await;
    let batch = r#"{"v":1,"results":[{"url":"http://a.test/","depth":0,"outcome":{"failed":{"reason":"x"}}}]}"#;
    let attacks = [
        "/internal/ingest",
        "/crawl/../internal/ingest",
        "/crawl/%2e%2e/internal/ingest",
        "/crawl/%2E%2E/internal/ingest",
        "/crawl/.%2e/internal/ingest",
        "/crawl/%2e./internal/ingest",
        "/crawl/..%2finternal/ingest",
        "/crawl/..%2Finternal%2Fingest",
        "/crawl/%2e%2e%2finternal%2fingest",
        "/crawl/..%5cinternal%5cingest",
        "/crawl/..\\internal\\ingest",
        "/crawl\\..\\internal\\ingest",
        "/crawl//../internal/ingest",
        "//internal/ingest",
        "///internal//ingest",
        "/crawl/./../internal/./ingest",
        "/crawl/x/../../internal/ingest",
        "/search/../../../internal/ingest",
        "/crawl/%252e%252e/internal/ingest",
        "/crawl/%00/../../internal/ingest",
        "/crawl/%c0%ae%c0%ae/internal/ingest",
        "/crawl;/../internal/ingest",
        "/%69nternal/ingest",
        "/internal/ingest/",
        "/internal/ingest?x=/crawl",
        "/crawl/../control/weight",
        "/crawl/../control/heartbeat",
        "/crawl/../control/replace",
        "/stats/../metrics",
        "/crawl/../cells",
        "http://evil.test/internal/ingest",
    ];
    for target in attacks {
        let (status, body) = raw_request(&door.base, "POST", target, batch).await;
        assert!(status == 404 || status == 400, "{target}: {status} {body}");
        if status == 404 {
            let error: ErrorBody = serde_json::from_str(&body).expect("a JSON error");
            assert!(
                error.error.contains("no route for"),
                "{target}: {}",
                error.error
            );
        }
    }
    assert_eq!(
        *seen.lock().expect("log"),
        Vec::<String>::new(),
        "no attack reached the api"
    );

    // The public routes, however spelled, go through as their own literal path.
    for (method, target, forwarded) in [
        ("POST", "/crawl", "POST /crawl"),
        ("POST", "/x/../crawl", "POST /crawl"),
        ("POST", "/internal/../crawl/", "POST /crawl"),
        ("POST", "/%63rawl", "POST /crawl"),
        ("GET", "//search?q=a/../b", "GET /search?q=a/../b"),
        ("GET", "/stats/.", "GET /stats"),
        // A fragment is no part of the path: the server drops it.
        ("POST", "/crawl#/../../internal/ingest", "POST /crawl"),
    ] {
        let (status, body) = raw_request(&door.base, method, target, "{}").await;
        assert_eq!(status, 200, "{target}: {body}");
        let last = seen.lock().expect("log").pop();
        assert_eq!(last.as_deref(), Some(forwarded), "{target}");
    }
    // A public route with another method: 405 at the door, naming what is served.
    let (status, body) = raw_request(&door.base, "DELETE", "/crawl", "").await;
    assert_eq!(status, 405, "{body}");
    assert!(seen.lock().expect("log").is_empty());
    door.stop().await;
}

/// `POST /crawl` is retried on another api only under an Idempotency-Key: the client's, or
/// one the front door adds, the same on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crawl_is_retried_under_one_idempotency_key() {
    let keys: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let fake = |name: &'static str, status: StatusCode| {
        let keys = keys.clone();
        FakeServer::start(Router::new().route(
            "/crawl",
            any(move |headers: HeaderMap| {
                let keys = keys.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_string();
                    keys.lock().expect("keys").push((name.to_string(), key));
                    (status, Json(serde_json::json!({ "by": name })))
                }
            }),
        ))
    };
    let failing = fake("api-a", StatusCode::SERVICE_UNAVAILABLE);
    let good = fake("api-b", StatusCode::ACCEPTED);
    let cfg = FrontdoorConfig {
        // One failure must not eject: every request tries api-a first or second.
        eject_after_failures: 100,
        ..test_config()
    };
    let door = door(
        vec![
            Backend::new("api-a", failing.base.clone()),
            Backend::new("api-b", good.base.clone()),
        ],
        cfg,
    )
    .await;
    for client_key in [None, Some("client-key-1")] {
        for _ in 0..8 {
            keys.lock().expect("keys").clear();
            let mut post = client()
                .post(format!("{}/crawl", door.base))
                .header("content-type", "application/json")
                .body(r#"{"seeds":["http://a.test/"]}"#);
            if let Some(k) = client_key {
                post = post.header("idempotency-key", k);
            }
            let resp = post.send().await.expect("answers");
            assert_eq!(
                resp.status(),
                StatusCode::ACCEPTED,
                "api-b answers in the end"
            );
            let seen = keys.lock().expect("keys").clone();
            let distinct: std::collections::BTreeSet<&str> =
                seen.iter().map(|(_, k)| k.as_str()).collect();
            assert_eq!(distinct.len(), 1, "one key on every attempt: {seen:?}");
            let key = *distinct.first().expect("a key");
            match client_key {
                Some(k) => assert_eq!(key, k),
                None => assert!(key.starts_with("frontdoor-"), "{key}"),
            }
        }
    }
    assert!(
        door.state.counters.retries() > 0,
        "api-a was tried and failed over"
    );
    door.stop().await;
}
