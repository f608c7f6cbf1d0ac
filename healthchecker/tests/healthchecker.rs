//! The healthchecker on real sockets (127.0.0.1:0), with fake cells that send signed heartbeats
//! every 100 ms and a fake factory that checks signatures, starts one (fake) cell per request
//! key, and records every request.
//!
//! Real time: bounds are set in the direction scheduling delays cannot break (a wait is long, a
//! count is an upper bound), except the detector's own figure (a death declared under 1 s after
//! the last heartbeat, as the healthchecker measured it), which is the requirement.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use control::{ClusterKey, ControlClient, Signer, Verifier, SIGNATURE_HEADER};
use futures::{Stream, StreamExt};
use healthchecker::{HealthcheckerConfig, HealthcheckerState, HEARTBEAT_PATH, REPLACE_PATH};
use protocol::control::{
    CellEvent, CellState, CellsResponse, EventKind, Heartbeat, ReplaceReply, ReplaceRequest,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const BEAT: Duration = Duration::from_millis(100);
/// How long a cell the factory starts takes before its first heartbeat: long enough that both
/// checkers notice a death (a sweep, 20 ms, and a reconcile round, 100 ms, apart at most) and
/// ask before the replacement shows up.
const BOOT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------- fake cells

/// A cell that boots for `boot` and then heartbeats to every health checker until aborted (a
/// kill: no last word).
fn spawn_cell(
    key: &ClusterKey,
    healthcheckers: Vec<String>,
    cell_id: &str,
    role: &str,
    parent: Option<String>,
    boot: Duration,
) -> JoinHandle<()> {
    let client = Arc::new(ControlClient::new(Signer::new(key.clone(), cell_id)));
    let (cell_id, role) = (cell_id.to_string(), role.to_string());
    tokio::spawn(async move {
        tokio::time::sleep(boot).await;
        let mut seq = 0;
        let mut tick = tokio::time::interval(BEAT);
        loop {
            tick.tick().await;
            seq += 1;
            let hb = Heartbeat {
                cell_id: cell_id.clone(),
                role: role.clone(),
                addr: "http://127.0.0.1:9".into(),
                state: if seq < 3 {
                    CellState::Joining
                } else {
                    CellState::Serving
                },
                pressure: 0.2,
                signals: BTreeMap::new(),
                version: "test".into(),
                build: String::new(),
                wire: Vec::new(),
                parent: parent.clone(),
                seq,
                interval_ms: BEAT.as_millis() as u64,
                pid: None,
                decision: None,
            };
            let sends = healthcheckers.iter().map(|hc| {
                let (client, hb) = (client.clone(), hb.clone());
                async move {
                    let _: Result<(), control::SendError> =
                        client.send(hc, HEARTBEAT_PATH, Heartbeat::KIND, &hb).await;
                }
            });
            futures::future::join_all(sends).await;
        }
    })
}

// ---------------------------------------------------------------- fake factory

struct Factory {
    key: ClusterKey,
    verifier: Verifier,
    /// Health checkers the cells it starts heartbeat to.
    healthcheckers: Vec<String>,
    /// Every request that opened, with its envelope's sender.
    requests: Mutex<Vec<(String, ReplaceRequest)>>,
    /// Key -> the cell started for it.
    started: Mutex<BTreeMap<String, String>>,
    cells: Mutex<Vec<JoinHandle<()>>>,
}

impl Factory {
    fn keys(&self) -> Vec<String> {
        self.requests
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, r)| r.request_key.clone())
            .collect()
    }
    fn senders(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .requests
            .lock()
            .expect("lock")
            .iter()
            .map(|(s, _)| s.clone())
            .collect();
        s.sort();
        s.dedup();
        s
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        for cell in self.cells.lock().expect("lock").drain(..) {
            cell.abort();
        }
    }
}

async fn replace(State(f): State<Arc<Factory>>, headers: HeaderMap, body: Bytes) -> Response {
    let (envelope, req) = match control::receive::<ReplaceRequest>(
        &f.verifier,
        ReplaceRequest::KIND,
        &headers,
        &body,
    ) {
        Ok(opened) => opened,
        Err(rejection) => return rejection.into_response(),
    };
    f.requests
        .lock()
        .expect("lock")
        .push((envelope.sender, req.clone()));
    let mut started = f.started.lock().expect("lock");
    let (first, cell_id) = match started.get(&req.request_key) {
        Some(cell) => (false, cell.clone()),
        None => {
            let cell = format!("{}-new-{}", req.role, started.len() + 1);
            started.insert(req.request_key.clone(), cell.clone());
            // The new cell names what it replaces, or the key it was started for.
            let parent = req.parent.clone().unwrap_or(req.request_key.clone());
            let handle = spawn_cell(
                &f.key,
                f.healthcheckers.clone(),
                &cell,
                &req.role,
                Some(parent),
                BOOT,
            );
            f.cells.lock().expect("lock").push(handle);
            (true, cell)
        }
    };
    Json(ReplaceReply {
        request_key: req.request_key,
        started: first,
        cell_id: Some(cell_id),
    })
    .into_response()
}

async fn start_factory(key: &ClusterKey, healthcheckers: Vec<String>) -> (String, Arc<Factory>) {
    let factory = Arc::new(Factory {
        key: key.clone(),
        verifier: Verifier::new(key.clone(), Duration::from_secs(30)),
        healthcheckers,
        requests: Mutex::new(Vec::new()),
        started: Mutex::new(BTreeMap::new()),
        cells: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route(REPLACE_PATH, post(replace))
        .with_state(factory.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, factory)
}

// ---------------------------------------------------------------- health checkers

struct Checker {
    state: HealthcheckerState,
    stop: CancellationToken,
    task: JoinHandle<Result<(), healthchecker::RunError>>,
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (listener, url)
}

fn start_checker(
    listener: TcpListener,
    key: &ClusterKey,
    name: &str,
    cfg: HealthcheckerConfig,
) -> Checker {
    let state = HealthcheckerState::new(cfg, key.clone(), name);
    let stop = CancellationToken::new();
    let ctx = lifecycle::CellContext::detached(
        lifecycle::CellSpec::alone("healthchecker", name),
        listener.local_addr().expect("addr"),
    );
    let task = tokio::spawn(healthchecker::run(
        ctx,
        state.clone(),
        listener,
        stop.clone(),
    ));
    Checker { state, stop, task }
}

impl Checker {
    async fn shut_down(self) {
        self.stop.cancel();
        let done = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the healthchecker stops within 5 s, event streams included")
            .expect("task");
        done.expect("run ends cleanly");
    }
}

fn config(factory: &str, minimums: &[(&str, u32)]) -> HealthcheckerConfig {
    HealthcheckerConfig {
        factories: vec![factory.to_string()],
        minimums: minimums.iter().map(|(r, m)| (r.to_string(), *m)).collect(),
        ..HealthcheckerConfig::default()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn cells(url: &str) -> CellsResponse {
    http()
        .get(format!("{url}/cells"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("GET /cells")
        .json()
        .await
        .expect("json")
}

fn ids(cells: &CellsResponse, role: &str) -> Vec<String> {
    cells
        .roles
        .get(role)
        .map(|v| v.iter().map(|c| c.cell_id.clone()).collect())
        .unwrap_or_default()
}

/// Poll `check` every 20 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- SSE reader

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

struct Sse {
    body: ByteStream,
    buf: String,
}

impl Sse {
    async fn connect(url: &str) -> Self {
        let resp = http().get(url).send().await.expect("GET /events");
        assert_eq!(resp.status(), 200);
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Self {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        }
    }

    /// The next event with an id: (number, SSE event name, the cell event). None at the end.
    async fn next(&mut self, within: Duration) -> Option<(u64, String, CellEvent)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut name, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if let Some(id) = id {
                    let event: CellEvent = serde_json::from_str(&data).expect("a cell event");
                    return Some((id, name, event));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()??
                .ok()?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Read until an event of `kind` for `cell`.
    async fn until(&mut self, kind: EventKind, cell: &str, within: Duration) -> (u64, CellEvent) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some((id, name, event)) = self.next(left).await else {
                panic!("no {kind:?} event for {cell} within {within:?}");
            };
            let expected = serde_json::to_value(kind).expect("kind");
            if event.kind == kind && event.cell_id == cell {
                assert_eq!(expected.as_str(), Some(name.as_str()), "SSE event name");
                return (id, event);
            }
        }
    }
}

/// "no heartbeat for N ms, phi X" -> N.
fn silent_ms(reason: &str) -> u64 {
    reason
        .strip_prefix("no heartbeat for ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected death reason {reason:?}"))
}

// ---------------------------------------------------------------- tests

/// A cell heartbeats to two health checkers and appears in both registries; it is killed; both
/// declare it dead under 1 s after its last heartbeat, both ask the factory with the key
/// `replace:<id>`, the factory starts one replacement, and the replacement (whose parent is the
/// dead cell) fulfils both requests. The event stream carries born, serving, dead, replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cell_is_declared_dead_and_replaced_once_by_two_checkers() {
    let key = ClusterKey::generate();
    let (l1, u1) = bind().await;
    let (l2, u2) = bind().await;
    let (factory_url, factory) = start_factory(&key, vec![u1.clone(), u2.clone()]).await;
    let hc1 = start_checker(l1, &key, "hc-1", config(&factory_url, &[("api", 1)]));
    let hc2 = start_checker(l2, &key, "hc-2", config(&factory_url, &[("api", 1)]));

    let mut live = Sse::connect(&format!("{u1}/events")).await;
    let cell = spawn_cell(
        &key,
        vec![u1.clone(), u2.clone()],
        "api-a",
        "api",
        None,
        Duration::ZERO,
    );

    let (born, _) = live
        .until(EventKind::Born, "api-a", Duration::from_secs(5))
        .await;
    live.until(EventKind::Serving, "api-a", Duration::from_secs(5))
        .await;
    for url in [&u1, &u2] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                ids(&cells(url).await, "api") == ["api-a"]
            })
            .await,
            "api-a listed by {url}"
        );
    }
    let record = cells(&u1).await.roles["api"][0].clone();
    assert_eq!(record.state, CellState::Serving);
    assert!(record.phi < 8.0, "a live cell's phi: {}", record.phi);

    // Let the startup grace pass with the cell alive: nothing is asked for.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(
        factory.keys().is_empty(),
        "asked while the role was full: {:?}",
        factory.keys()
    );

    cell.abort();
    let (dead, death) = live
        .until(EventKind::Dead, "api-a", Duration::from_secs(5))
        .await;
    assert!(dead > born);
    let silent = silent_ms(&death.reason);
    println!(
        "killed cell declared dead {silent} ms after its last heartbeat ({})",
        death.reason
    );
    assert!(silent < 1000, "{}", death.reason);
    assert!(
        silent >= 300,
        "not before the acceptable pause: {}",
        death.reason
    );

    let (_, replaced) = live
        .until(EventKind::Replaced, "api-new-1", Duration::from_secs(5))
        .await;
    assert_eq!(replaced.parent.as_deref(), Some("api-a"));
    assert!(
        replaced.reason.contains("replace:api-a"),
        "{}",
        replaced.reason
    );

    // Both checkers asked, with the same key; one cell was started.
    assert!(
        eventually(Duration::from_secs(5), || async {
            factory.senders().len() == 2
        })
        .await,
        "both checkers asked: {:?}",
        factory.requests.lock().expect("lock")
    );
    assert!(
        factory.keys().iter().all(|k| k == "replace:api-a"),
        "{:?}",
        factory.keys()
    );
    assert_eq!(factory.started.lock().expect("lock").len(), 1);

    // The replacement heartbeats to both and fulfils both requests.
    for (url, hc) in [(&u1, &hc1), (&u2, &hc2)] {
        assert!(
            eventually(Duration::from_secs(5), || async {
                ids(&cells(url).await, "api") == ["api-new-1"] && hc.state.outstanding().is_empty()
            })
            .await,
            "{url}: {:?}, outstanding {:?}",
            cells(url).await,
            hc.state.outstanding()
        );
    }
    let born_again = live
        .until(EventKind::Born, "api-new-1", Duration::from_secs(5))
        .await
        .1;
    assert_eq!(born_again.parent.as_deref(), Some("api-a"));
    // No more requests once the role is full again.
    let asked = factory.keys().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(factory.keys().len(), asked, "{:?}", factory.keys());
    assert_eq!(hc1.state.stats().deaths, 1);

    // `?since=` replays the ring in order.
    let mut replay = Sse::connect(&format!("{u1}/events?since=0")).await;
    let mut kinds = Vec::new();
    while let Some((_, _, e)) = replay.next(Duration::from_millis(300)).await {
        if e.cell_id == "api-a" {
            kinds.push(e.kind);
        }
    }
    assert_eq!(
        kinds,
        [EventKind::Born, EventKind::Serving, EventKind::Dead],
        "replayed"
    );
    let mut tail = Sse::connect(&format!("{u1}/events?since={dead}")).await;
    let first = tail
        .next(Duration::from_secs(2))
        .await
        .expect("an event after the death");
    assert_eq!(first.0, dead + 1);
    // A number from an earlier life of the checker (numbers restart with it): everything.
    let mut restarted = Sse::connect(&format!("{u1}/events?since=1000000")).await;
    let first = restarted
        .next(Duration::from_secs(2))
        .await
        .expect("the ring");
    assert_eq!(first.0, 1);

    drop(factory);
    hc1.shut_down().await;
    hc2.shut_down().await;
}

/// With no cells at all, two checkers fill each role's slots with the same `grow:` keys; the
/// factory starts one cell per key, and those cells (whose parent is the key) fulfil the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_checkers_grow_an_empty_role_with_the_same_keys() {
    let key = ClusterKey::generate();
    let (l1, u1) = bind().await;
    let (l2, u2) = bind().await;
    let (factory_url, factory) = start_factory(&key, vec![u1.clone(), u2.clone()]).await;
    let mut cfg = config(&factory_url, &[("crawler", 2)]);
    cfg.startup_grace_ms = 0;
    let hc1 = start_checker(l1, &key, "hc-1", cfg.clone());
    let hc2 = start_checker(l2, &key, "hc-2", cfg);

    for url in [&u1, &u2] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                ids(&cells(url).await, "crawler").len() == 2
            })
            .await,
            "{url}: {:?}",
            cells(url).await
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            hc1.state.outstanding().is_empty() && hc2.state.outstanding().is_empty()
        })
        .await
    );
    let mut keys = factory.keys();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, ["grow:crawler:1", "grow:crawler:2"]);
    assert_eq!(factory.senders(), ["hc-1", "hc-2"], "both asked");
    assert_eq!(factory.started.lock().expect("lock").len(), 2);
    let parents: Vec<Option<String>> = cells(&u1).await.roles["crawler"]
        .iter()
        .map(|c| c.parent.clone())
        .collect();
    assert!(parents
        .iter()
        .all(|p| p.as_deref().is_some_and(|p| p.starts_with("grow:crawler:"))));

    drop(factory);
    hc1.shut_down().await;
    hc2.shut_down().await;
}

/// Forged, unsigned, replayed and garbage heartbeats are refused with a status, counted (by the
/// checker and in `/metrics`), and the server keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_unsigned_and_replayed_heartbeats_are_rejected_and_counted() {
    let key = ClusterKey::generate();
    let (listener, url) = bind().await;
    let hc = start_checker(listener, &key, "hc", HealthcheckerConfig::default());
    let client = http();
    let hb = |seq| Heartbeat {
        cell_id: "api-x".into(),
        role: "api".into(),
        addr: "http://127.0.0.1:9".into(),
        state: CellState::Serving,
        pressure: 0.0,
        signals: BTreeMap::new(),
        version: "test".into(),
        build: String::new(),
        wire: Vec::new(),
        parent: None,
        seq,
        interval_ms: 100,
        pid: None,
        decision: None,
    };
    let post = |bytes: Vec<u8>, sig: Option<String>| {
        let mut req = client
            .post(format!("{url}{HEARTBEAT_PATH}"))
            .timeout(Duration::from_secs(5))
            .body(bytes);
        if let Some(sig) = sig {
            req = req.header(SIGNATURE_HEADER, sig);
        }
        async move { req.send().await.expect("an answer").status().as_u16() }
    };

    let signer = Signer::new(key.clone(), "api-x");
    let good = signer.seal(Heartbeat::KIND, &hb(1));
    assert_eq!(
        post(good.bytes.clone(), Some(good.signature.clone())).await,
        204
    );
    // Replayed: the same sealed bytes again.
    assert_eq!(
        post(good.bytes.clone(), Some(good.signature.clone())).await,
        409
    );
    // Unsigned.
    let fresh = signer.seal(Heartbeat::KIND, &hb(2));
    assert_eq!(post(fresh.bytes.clone(), None).await, 401);
    // Forged: signed with another key, or a valid signature over altered bytes.
    let intruder = Signer::new(ClusterKey::generate(), "api-x").seal(Heartbeat::KIND, &hb(3));
    assert_eq!(post(intruder.bytes, Some(intruder.signature)).await, 401);
    let mut altered = fresh.bytes.clone();
    let n = altered.len();
    altered[n - 3] ^= 0x01;
    assert_eq!(post(altered, Some(fresh.signature.clone())).await, 401);
    // Garbage.
    assert_eq!(
        post(b"\x00\xff not json".to_vec(), Some("zz".into())).await,
        401
    );
    // Still answering: the unsigned one's content, properly signed, is taken.
    let later = signer.seal(Heartbeat::KIND, &hb(4));
    assert_eq!(post(later.bytes, Some(later.signature)).await, 204);
    assert_eq!(ids(&cells(&url).await, "api"), ["api-x"]);

    let stats = hc.state.stats();
    assert_eq!((stats.heartbeats, stats.rejected), (2, 5), "{stats:?}");
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    for reason in ["replayed", "unsigned", "forged"] {
        let line = format!("control_rejected_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(
        metrics.contains("healthchecker_heartbeats_total"),
        "{metrics}"
    );
    let health = client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);

    hc.shut_down().await;
}

/// While no factory answers, a shortfall is asked for at most once per back-off step
/// (0.2, 0.4, 0.8 s ...), not every reconcile round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_factory_is_asked_once_per_backoff_step() {
    let key = ClusterKey::generate();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let (listener, _) = bind().await;
    let mut cfg = config(&closed, &[("api", 3)]);
    cfg.startup_grace_ms = 0;
    let hc = start_checker(listener, &key, "hc", cfg);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let stats = hc.state.stats();
    // Rounds start at about 0, 0.2, 0.6, 1.4 s: at most 4 in 2 s (fewer if slow), one request
    // each; every reconcile round (20 of them) asking 3 would be 60.
    assert!(
        (1..=4).contains(&stats.requested),
        "requests sent while unreachable: {stats:?}"
    );
    assert_eq!(stats.requested, stats.unreachable, "{stats:?}");
    hc.shut_down().await;
}
