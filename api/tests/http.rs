//! The api role's handlers, through `oneshot` on the router: no socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use api::{app, ApiConfig, AppState};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use control::{ClusterKey, Signer, Verifier, SIGNATURE_HEADER};
use engines::sqlite::{SqliteQueue, SqliteStore};
use protocol::{CrawlResult, FetchedPage, IngestBatch, Outcome, WIRE_VERSION};
use tower::ServiceExt;

/// The api cell's address in these tests: what ingest envelopes are addressed to.
const ADDR: &str = "http://127.0.0.1:7401";

fn key() -> ClusterKey {
    ClusterKey::new(b"the api tests' cluster key, 32 b".to_vec())
}

/// An api cell on `dir`'s store and queue (several cells may share them).
async fn cell(dir: &std::path::Path) -> AppState {
    let store = Arc::new(
        SqliteStore::open(dir.join("s.db").to_str().expect("utf-8"))
            .await
            .expect("store"),
    );
    let queue = SqliteQueue::open(
        dir.join("q.db").to_str().expect("utf-8"),
        Duration::from_secs(30),
        3,
    )
    .await
    .expect("queue");
    let verifier = Arc::new(Verifier::new(key(), Duration::from_secs(30)).answering_to([ADDR]));
    AppState::new(
        ApiConfig::default(),
        store.clone(),
        store,
        Arc::new(queue),
        verifier,
    )
}

async fn state() -> (tempfile::TempDir, AppState) {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = cell(dir.path()).await;
    (dir, st)
}

/// A crawler's signed ingest request for `batch`.
fn signed_ingest(
    signer: &Signer,
    to: &str,
    kind: &str,
    batch: &impl serde::Serialize,
) -> Request<Body> {
    let sealed = signer.seal_to(kind, to, batch);
    Request::post("/internal/ingest")
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, sealed.signature)
        .body(Body::from(sealed.bytes))
        .expect("request")
}

fn crawler() -> Signer {
    Signer::new(key(), "crawler-1")
}

fn quokka_batch() -> IngestBatch {
    IngestBatch {
        v: WIRE_VERSION,
        results: vec![CrawlResult {
            url: "http://a.test/".into(),
            depth: 0,
            outcome: Outcome::Page(FetchedPage {
                final_url: "http://a.test/".into(),
                status: 200,
                title: "Quokka habitat".into(),
                text: "the quokka lives on an island".into(),
                indexable: true,
                canonical: None,
                links: vec!["http://a.test/b".into(), "mailto:x@a.test".into()],
            }),
        }],
    }
}

async fn call(st: &AppState, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app(st.clone()).oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .expect("request")
}

#[tokio::test]
async fn bad_input_is_a_named_4xx_never_5xx() {
    let (_d, st) = state().await;
    let cases: Vec<(Request<Body>, &str)> = vec![
        (get("/search"), "q:"),
        (get("/search?q="), "q:"),
        (get("/search?q=%21%21"), "no searchable words"),
        (get(&format!("/search?q={}", "a".repeat(600))), "longer"),
        (get("/search?q=a&limit=0"), "limit:"),
        (get("/search?q=a&limit=1000"), "limit:"),
        (get("/search?q=a&limit=ten"), "limit:"),
        (get("/search?q=a&offset=-3"), "offset:"),
        (post("/crawl", "{not json"), "malformed JSON"),
        (
            post("/crawl", r#"{"seeds": "http://a.test/"}"#),
            "malformed JSON",
        ),
        (post("/crawl", r#"{"seeds": [], "max_depth": 1}"#), "seeds:"),
        (
            post("/crawl", r#"{"seeds": ["http://a.test/"], "bogus": 1}"#),
            "bogus",
        ),
        (
            post("/crawl", r#"{"seeds": ["http://a.test/"], "max_pages": 0}"#),
            "max_pages",
        ),
        (
            signed_ingest(
                &crawler(),
                ADDR,
                IngestBatch::KIND,
                &serde_json::json!({"v": 1, "results": [{"url": 3}]}),
            ),
            "malformed",
        ),
        (
            signed_ingest(
                &crawler(),
                ADDR,
                IngestBatch::KIND,
                &serde_json::json!({"v": 99, "results": []}),
            ),
            "version",
        ),
        (get("/nope"), "no such endpoint"),
    ];
    for (req, needle) in cases {
        let uri = req.uri().to_string();
        let (status, body) = call(&st, req).await;
        assert!(status.is_client_error(), "{uri}: {status}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{uri}: {msg:?} should mention {needle:?}"
        );
    }
}

#[tokio::test]
async fn crawl_accepts_and_rejects_with_reasons() {
    let (_d, st) = state().await;
    let (status, body) = call(
        &st,
        post(
            "/crawl",
            r#"{"seeds": ["http://a.test/", "HTTP://A.TEST/#x", "ftp://a.test/", "not a url", "javascript:alert(1)"]}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], serde_json::json!(["http://a.test/"]));
    let rejected = body["rejected"].as_array().expect("rejected");
    assert_eq!(rejected.len(), 3, "{body}");
    assert!(rejected
        .iter()
        .all(|r| !r["reason"].as_str().unwrap_or("").is_empty()));
    // The same seed again is already known.
    let (_, body) = call(&st, post("/crawl", r#"{"seeds": ["http://a.test/"]}"#)).await;
    assert!(body["rejected"][0]["reason"]
        .as_str()
        .expect("reason")
        .contains("already in the frontier"));
    let (status, stats) = call(&st, get("/stats")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["frontier"]["pending"], 1);
}

/// A misconfigured cell says so with a 500 (asking again will not help), never a 503.
#[tokio::test]
async fn a_misconfiguration_is_a_500_not_a_503() {
    let (_d, st) = state().await;
    assert!(st.permits_verifier.is_none(), "this api has no permit key");
    let sealed = crawler().seal_to(api::permits::KIND, ADDR, &serde_json::json!({}));
    let req = Request::post(api::permits::PATH)
        .header("content-type", "application/json")
        .header(SIGNATURE_HEADER, sealed.signature)
        .body(Body::from(sealed.bytes))
        .expect("request");
    let (status, body) = call(&st, req).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no cluster key"),
        "{body}"
    );
}

/// `GET /stats` is read by other cells: it carries the wire version, and decodes checked.
#[tokio::test]
async fn stats_are_versioned() {
    let (_d, st) = state().await;
    let resp = app(st.clone())
        .oneshot(get("/stats"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(value["v"], WIRE_VERSION);
    let stats = protocol::Versioned::<protocol::Stats>::decode(&bytes).expect("versioned");
    assert_eq!(stats.pages_indexed, 0);
}

#[tokio::test]
async fn a_404_is_a_404() {
    let (_d, st) = state().await;
    for req in [
        get("/nope"),
        post("/internal/nope", "{}"),
        get("/search/extra"),
        get("/internal/ingest/../x"),
    ] {
        let uri = req.uri().to_string();
        let (status, body) = call(&st, req).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("no such endpoint"),
            "{uri}: {body}"
        );
    }
}

#[tokio::test]
async fn ingest_is_idempotent_and_searchable() {
    let (_d, st) = state().await;
    call(&st, post("/crawl", r#"{"seeds": ["http://a.test/"]}"#)).await;
    let batch = quokka_batch();
    let signer = crawler();
    let (status, first) = call(&st, signed_ingest(&signer, ADDR, IngestBatch::KIND, &batch)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["stored"], 1);
    assert_eq!(first["admitted_links"], 1);
    let (_, stats1) = call(&st, get("/stats")).await;
    // The same results again (a redelivered job), in a new envelope: stored once.
    let (_, second) = call(&st, signed_ingest(&signer, ADDR, IngestBatch::KIND, &batch)).await;
    assert_eq!(second["stored"], 0);
    let (_, stats2) = call(&st, get("/stats")).await;
    assert_eq!(stats1, stats2);
    let (status, res) = call(&st, get("/search?q=Quokka&limit=5")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(res["total"], 1);
    assert_eq!(res["hits"][0]["url"], "http://a.test/");
    assert!(res["hits"][0]["snippet"]
        .as_str()
        .expect("snippet")
        .to_lowercase()
        .contains("<mark>quokka</mark>"));
    assert!(res["took_ms"].as_f64().is_some());
}

#[tokio::test]
async fn vitals_answer() {
    let (_d, st) = state().await;
    st.ready.set(true);
    let (status, body) = call(&st, get("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["role"], "api");
    let (status, _) = call(&st, get("/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    st.ready.set(false);
    let (status, _) = call(&st, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

/// Every way to write into the index without the cluster key, or with a message meant for
/// someone else or captured earlier, is refused with the envelope's status and stores nothing.
#[tokio::test]
async fn unsigned_forged_replayed_and_misdirected_ingest_stores_nothing() {
    let (dir, st) = state().await;
    call(&st, post("/crawl", r#"{"seeds": ["http://a.test/"]}"#)).await;
    let batch = quokka_batch();
    let json = serde_json::to_string(&batch).expect("json");
    let signer = crawler();
    let intruder = Signer::new(ClusterKey::generate(), "crawler-1");
    // Captured from the wire before the api cell restarted (sealed a second before its
    // verifier existed) and never delivered to it.
    let captured = signer.seal_to(IngestBatch::KIND, ADDR, &batch);
    tokio::time::sleep(Duration::from_millis(300) + control::START_ALLOWANCE).await;
    let restarted = cell(dir.path()).await;
    // One delivered legitimately to the old incarnation, replayed byte for byte.
    let delivered = signer.seal_to(
        IngestBatch::KIND,
        ADDR,
        &quokka_batch_for("http://a.test/other"),
    );

    let with_sig = |sig: &str, bytes: Vec<u8>| {
        Request::post("/internal/ingest")
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, sig)
            .body(Body::from(bytes))
            .expect("request")
    };
    let mut tampered = signer.seal_to(IngestBatch::KIND, ADDR, &batch);
    let text = String::from_utf8(tampered.bytes.clone()).expect("utf-8");
    tampered.bytes = text.replace("quokka lives", "spam lives").into_bytes();
    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "unsigned batch",
            post("/internal/ingest", json.clone()),
            StatusCode::UNAUTHORIZED,
            "unsigned",
        ),
        (
            "signature header, garbage",
            with_sig("00ff", json.clone().into_bytes()),
            StatusCode::UNAUTHORIZED,
            "signature",
        ),
        (
            "signed with another key",
            signed_ingest(&intruder, ADDR, IngestBatch::KIND, &batch),
            StatusCode::UNAUTHORIZED,
            "signature",
        ),
        (
            "signed, then the page text changed",
            with_sig(&tampered.signature, tampered.bytes.clone()),
            StatusCode::UNAUTHORIZED,
            "signature",
        ),
        (
            "addressed to another api cell",
            signed_ingest(&signer, "http://127.0.0.1:7402", IngestBatch::KIND, &batch),
            StatusCode::MISDIRECTED_REQUEST,
            "addressed",
        ),
        (
            "addressed to no one",
            {
                let sealed = signer.seal(IngestBatch::KIND, &batch);
                with_sig(&sealed.signature, sealed.bytes)
            },
            StatusCode::MISDIRECTED_REQUEST,
            "addressed",
        ),
        (
            "a heartbeat's envelope",
            signed_ingest(&signer, ADDR, "heartbeat", &batch),
            StatusCode::ACCEPTED,
            "unknown kind",
        ),
        (
            "captured before the restart",
            with_sig(&captured.signature, captured.bytes.clone()),
            StatusCode::UNAUTHORIZED,
            "before this cell started",
        ),
    ];
    for (what, req, want, needle) in cases {
        let (status, body) = call(&restarted, req).await;
        assert_eq!(status, want, "{what}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{what}: {msg:?} should mention {needle:?}"
        );
    }
    // Replay: the first delivery is taken, the same bytes again are refused.
    let (status, _) = call(
        &restarted,
        with_sig(&delivered.signature, delivered.bytes.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(
        &restarted,
        with_sig(&delivered.signature, delivered.bytes.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // Nothing of the refused batches was stored: a.test/ is still pending, nothing indexed.
    let (_, stats) = call(&restarted, get("/stats")).await;
    assert_eq!(stats["pages_indexed"], 0, "{stats}");
    assert_eq!(stats["frontier"]["pending"], 1, "{stats}");
    let (_, res) = call(&restarted, get("/search?q=quokka")).await;
    assert_eq!(res["total"], 0, "{res}");
    // The captured one was good before the restart: the old incarnation would have taken it.
    let (status, _) = call(&st, with_sig(&captured.signature, captured.bytes)).await;
    assert_eq!(status, StatusCode::OK);
}

fn quokka_batch_for(url: &str) -> IngestBatch {
    let mut batch = quokka_batch();
    batch.results[0].url = url.into();
    batch
}

/// A request cancelled mid-flight (its client went away while the body was still coming)
/// leaves the in-flight count: the cell's pressure does not creep up with every disconnect.
#[tokio::test]
async fn a_cancelled_request_leaves_the_in_flight_count() {
    let (_d, st) = state().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(1);
    let body = Body::from_stream(tokio_stream_from(rx));
    let req = Request::post("/crawl")
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    let app = app(st.clone());
    let pending = tokio::spawn(async move { app.oneshot(req).await });
    tx.send(Ok(axum::body::Bytes::from_static(b"{\"seeds\": [")))
        .await
        .expect("send");
    while st.load.in_flight.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(st.load.in_flight.load(Ordering::SeqCst), 1);
    pending.abort();
    assert!(pending.await.expect_err("aborted").is_cancelled());
    assert_eq!(
        st.load.in_flight.load(Ordering::SeqCst),
        0,
        "the guard gave it back"
    );
    drop(tx);
    // And a request that completes gives its count back too.
    call(&st, get("/stats")).await;
    assert_eq!(st.load.in_flight.load(Ordering::SeqCst), 0);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn keyed(key: &str, body: &str) -> Request<Body> {
    Request::post("/crawl")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .expect("request")
}

async fn call_raw(st: &AppState, req: Request<Body>) -> (StatusCode, Option<String>, Vec<u8>) {
    let resp = app(st.clone()).oneshot(req).await.expect("infallible");
    let status = resp.status();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, replayed, bytes.to_vec())
}

/// `POST /crawl` with an Idempotency-Key: every repeat, on any api cell of the organism, gets
/// the first answer byte for byte and the seeds are admitted once; the key with another body is
/// a 422; a bad key is a 400 that does not spend it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crawl_with_an_idempotency_key_is_exactly_once_across_cells() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = cell(dir.path()).await;
    let two = cell(dir.path()).await;
    let body = r#"{"seeds": ["http://a.test/", "http://b.test/"]}"#;
    let (status, replayed, first) = call_raw(&one, keyed("order-1", body)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(replayed, None);
    let first_json: serde_json::Value = serde_json::from_slice(&first).expect("json");
    assert_eq!(first_json["accepted"].as_array().map(Vec::len), Some(2));
    // The same JSON spelled differently is the same request.
    let respelled = r#"{ "seeds" : ["http://a.test/","http://b.test/"] }"#;
    for (st, b) in [(&one, body), (&two, body), (&two, respelled)] {
        let (status, replayed, again) = call_raw(st, keyed("order-1", b)).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(replayed.as_deref(), Some("true"));
        assert_eq!(again, first, "the first answer, byte for byte");
    }
    // Another body under the same key: 422 naming the conflict.
    let (status, _, conflict) =
        call_raw(&two, keyed("order-1", r#"{"seeds": ["http://c.test/"]}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = String::from_utf8_lossy(&conflict);
    assert!(
        msg.contains("order-1") && msg.contains("another request"),
        "{msg}"
    );
    // Bad keys: 400, nothing admitted.
    for bad in ["", &"k".repeat(256), "with space", "caf\u{e9}"] {
        let req = Request::post("/crawl")
            .header("content-type", "application/json")
            .header("idempotency-key", bad.as_bytes())
            .body(Body::from(r#"{"seeds": ["http://d.test/"]}"#))
            .expect("request");
        let (status, body) = call(&one, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
        assert!(body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Idempotency-Key"));
    }
    // A request that fails validation does not spend its key.
    let (status, _, _) = call_raw(&one, keyed("order-2", r#"{"seeds": []}"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, replayed, _) =
        call_raw(&one, keyed("order-2", r#"{"seeds": ["http://e.test/"]}"#)).await;
    assert_eq!((status, replayed), (StatusCode::ACCEPTED, None));

    // Many repeats at once on two cells: one admission, one answer.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let st = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.spawn(async move {
            call_raw(&st, keyed("order-3", r#"{"seeds": ["http://f.test/"]}"#)).await
        });
    }
    let mut answers = std::collections::BTreeSet::new();
    while let Some(done) = tasks.join_next().await {
        let (status, _, body) = done.expect("task");
        assert_eq!(status, StatusCode::ACCEPTED);
        answers.insert(body);
    }
    assert_eq!(answers.len(), 1, "one answer for every repeat");
    let only: serde_json::Value =
        serde_json::from_slice(answers.first().expect("one")).expect("json");
    assert_eq!(only["accepted"], serde_json::json!(["http://f.test/"]));

    let (_, stats) = call(&one, get("/stats")).await;
    // a, b, e, f: each admitted once.
    assert_eq!(stats["frontier"]["pending"], 4, "{stats}");
}

/// Under client load (throttled) an api keeps the links of what it ingests aside: the page is
/// searchable at once, the links wait in the store (`/stats` counts them, the crawl is not
/// drained). The cell then dies; another api on the same store offers them and the queue gets
/// their jobs: nothing kept is lost.
#[tokio::test]
async fn links_kept_under_load_are_offered_by_any_api_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = cell(dir.path()).await;
    busy.defer_links.store(true, Ordering::Relaxed);
    call(&busy, post("/crawl", r#"{"seeds": ["http://a.test/"]}"#)).await;
    // The seed goes to the queue as a job first, as a crawler would have taken it.
    let published = busy.store.unpublished(10).await.expect("unpublished");
    let urls: Vec<String> = published.iter().map(|u| u.url.clone()).collect();
    busy.store.mark_published(&urls).await.expect("mark");
    let (status, reply) = call(
        &busy,
        signed_ingest(&crawler(), ADDR, IngestBatch::KIND, &quokka_batch()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(
        (reply["stored"].clone(), reply["admitted_links"].clone()),
        (1.into(), 0.into())
    );
    let (_, stats) = call(&busy, get("/stats")).await;
    assert_eq!(stats["frontier"]["deferred"], 1, "{stats}");
    assert_eq!(stats["frontier"]["pending"], 0, "{stats}");
    let (_, res) = call(&busy, get("/search?q=quokka")).await;
    assert_eq!(
        res["total"], 1,
        "the page is searchable while its links wait"
    );
    drop(busy);

    let calm = cell(dir.path()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(api::publisher::run(calm.clone(), ADDR.into(), stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let job = loop {
        let jobs = calm.queue.lease(10).await.expect("lease");
        if let Some(d) = jobs.into_iter().next() {
            break d.job.expect("a job");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the kept link was never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((job.url.as_str(), job.depth), ("http://a.test/b", 1));
    let (_, stats) = call(&calm, get("/stats")).await;
    assert_eq!(stats["frontier"]["deferred"], 0, "{stats}");
    stop.cancel();
    publisher.await.expect("publisher");
}
