//! The api role's handlers, through `oneshot` on the router: no socket.

use std::sync::Arc;
use std::time::Duration;

use api::{app, ApiConfig, AppState};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use engines::sqlite::{SqliteQueue, SqliteStore};
use protocol::{CrawlResult, FetchedPage, IngestBatch, Outcome, WIRE_VERSION};
use tower::ServiceExt;

async fn state() -> (tempfile::TempDir, AppState) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("s.db").to_str().expect("utf-8"))
        .await
        .expect("store");
    let queue = SqliteQueue::open(
        dir.path().join("q.db").to_str().expect("utf-8"),
        Duration::from_secs(30),
        3,
    )
    .await
    .expect("queue");
    let st = AppState::new(ApiConfig::default(), Arc::new(store), Arc::new(queue));
    (dir, st)
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
            post("/internal/ingest", r#"{"v": 1, "results": [{"url": 3}]}"#),
            "malformed JSON",
        ),
        (
            post("/internal/ingest", r#"{"v": 99, "results": []}"#),
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

#[tokio::test]
async fn ingest_is_idempotent_and_searchable() {
    let (_d, st) = state().await;
    call(&st, post("/crawl", r#"{"seeds": ["http://a.test/"]}"#)).await;
    let batch = IngestBatch {
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
    };
    let body = serde_json::to_string(&batch).expect("json");
    let (status, first) = call(&st, post("/internal/ingest", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["stored"], 1);
    assert_eq!(first["admitted_links"], 1);
    let (_, stats1) = call(&st, get("/stats")).await;
    let (_, second) = call(&st, post("/internal/ingest", body)).await;
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
