//! The healthchecker's HTTP surface: `POST /control/heartbeat` and `POST /control/retire`
//! (signed), `GET /cells`, `GET /events` (Server-Sent Events), plus the vitals every cell serves.
//!
//! `/cells` and `/events` show the organism's topology (addresses, pids, lineage): in cluster
//! mode ([`control::Verifier::guard_reads`]) they answer only a reader presenting the read token
//! (`Authorization: Bearer`, derived from the cluster key); on loopback they are open.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::control::{Directive, Heartbeat, HeartbeatReply, RetireReply, RetireRequest};
use protocol::ErrorBody;
use serde::Deserialize;

use crate::registry::Ignored;
use crate::{now, HealthcheckerState, HEARTBEAT_PATH};

/// The healthchecker's routes, merged with `/healthz`, `/readyz` and `/metrics`.
pub fn app(state: HealthcheckerState) -> Router {
    let ready = state.ready();
    let router = Router::new()
        .route(HEARTBEAT_PATH, post(heartbeat))
        .route("/control/retire", post(retire))
        .route("/cells", get(cells))
        .route("/events", get(events))
        .merge(crate::dashboard::routes())
        .fallback(not_found)
        .with_state(state)
        .merge(vitals::router("healthchecker", ready));
    vitals::instrument(router, &[])
}

impl HealthcheckerState {
    /// The verifier of this checker's control messages: where the cell tells it the addresses
    /// it answers to and whether reads take the read token.
    pub fn verifier(&self) -> &control::Verifier {
        &self.0.verifier
    }
}

/// 204 when the heartbeat was taken or was a harmless repeat; 200 with a directive when the cell
/// must act (`fenced`: it was buried; `retire`: it is surplus); the envelope's rejection
/// (401/409/400/202) when it did not open; 400 when it opened but makes no sense.
async fn heartbeat(
    State(state): State<HealthcheckerState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hb =
        match control::receive::<Heartbeat>(&state.0.verifier, Heartbeat::KIND, &headers, &body) {
            Ok((_, hb)) => hb,
            Err(rejection) => {
                state
                    .0
                    .counters
                    .rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(reason = %rejection, "heartbeat rejected");
                return rejection.into_response();
            }
        };
    match state.heartbeat(hb, now()) {
        Ok(reply) if reply.directive.is_some() => Json(reply).into_response(),
        Ok(_) | Err(Ignored::Stale { .. } | Ignored::Retired) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Err(Ignored::Buried(reason)) => Json(HeartbeatReply {
            directive: Some(Directive::Fenced { reason }),
        })
        .into_response(),
        Err(e @ (Ignored::Invalid(_) | Ignored::Full)) => {
            let status = match e {
                Ignored::Full => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            (
                status,
                Json(ErrorBody {
                    error: e.to_string(),
                }),
            )
                .into_response()
        }
    }
}

/// A signed order to retire a cell (the factory's, for a machine it cannot power off): 200 with
/// whether the cell is live here; the envelope's rejection when it did not open.
async fn retire(
    State(state): State<HealthcheckerState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match control::receive::<RetireRequest>(&state.0.verifier, RetireRequest::KIND, &headers, &body)
    {
        Ok((_, order)) if order.cell_id.is_empty() => (
            StatusCode::BAD_REQUEST,
            Json(ErrorBody {
                error: "retire: cell_id is empty".into(),
            }),
        )
            .into_response(),
        Ok((_, order)) => Json(RetireReply {
            live: state.order_retire(&order.cell_id, &order.reason, now()),
        })
        .into_response(),
        Err(rejection) => rejection.into_response(),
    }
}

/// Any other path: 404, naming the routes there are.
async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: format!(
                "no such endpoint {}: see POST {HEARTBEAT_PATH}, POST /control/retire, GET /cells, GET /events, GET /dashboard",
                uri.path()
            ),
        }),
    )
        .into_response()
}

/// The health checker's public reads, described from the handlers below and their types.
#[derive(utoipa::OpenApi)]
#[openapi(paths(cells, events))]
pub struct ApiDoc;

/// Versioned: every cell that reads the registry checks `v`.
#[utoipa::path(
    get,
    path = "/cells",
    tag = "cells",
    params(
        ("Authorization" = Option<String>, Header, description = "`Bearer <read token>`, required in cluster mode"),
    ),
    responses(
        (status = 200, description = "live cells by role, with the wire version `v`", body = protocol::Versioned<protocol::control::CellsResponse>),
        (status = 401, description = "cluster mode, and no valid read token"),
    )
)]
async fn cells(State(state): State<HealthcheckerState>, headers: HeaderMap) -> Response {
    if let Err(rejection) = state.0.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    Json(protocol::Versioned::new(state.cells())).into_response()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Replay the events numbered above this one first.
    since: Option<u64>,
}

/// The event stream: with `?since=N` (or a `Last-Event-ID` header, as a reconnecting
/// `EventSource` sends) the ring's events after N first, then live; without, live only. An N
/// above the last event number replays the whole ring (the checker restarted since).
#[utoipa::path(
    get,
    path = "/events",
    tag = "cells",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "as `since`, sent by a reconnecting EventSource"),
        ("Authorization" = Option<String>, Header, description = "`Bearer <read token>`, required in cluster mode"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `id` the event's number, `event` its kind, `data` the event as JSON; `lagged` with `{\"missed\": n}` when the reader fell behind the ring", body = protocol::control::CellEvent, content_type = "text/event-stream"),
        (status = 401, description = "cluster mode, and no valid read token"),
    )
)]
async fn events(
    State(state): State<HealthcheckerState>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(rejection) = state.0.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let log = state.events().clone();
    let latest = log.latest();
    let after = match q.since.or(resume) {
        // Numbers this checker never gave: the reader knew an earlier life of it (numbering
        // restarts with the process), so it gets all of this life's log.
        Some(n) if n > latest => 0,
        Some(n) => n,
        None => latest,
    };
    Sse::new(log.stream(after, state.0.streams.clone()))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HealthcheckerConfig;
    use axum::body::Body;
    use control::{ClusterKey, Signer, SIGNATURE_HEADER};
    use http::Request;
    use protocol::control::{CellState, CellsResponse};
    use std::collections::BTreeMap;
    use tower::ServiceExt;

    fn beat(id: &str, seq: u64) -> Heartbeat {
        Heartbeat {
            cell_id: id.into(),
            role: "api".into(),
            addr: "http://127.0.0.1:1".into(),
            state: CellState::Serving,
            pressure: 0.1,
            signals: BTreeMap::new(),
            version: "t".into(),
            build: String::new(),
            wire: Vec::new(),
            parent: None,
            seq,
            interval_ms: 100,
            pid: Some(7),
            decision: None,
        }
    }

    fn post_sealed(sealed: &control::Sealed) -> Request<Body> {
        Request::post(HEARTBEAT_PATH)
            .header(SIGNATURE_HEADER, &sealed.signature)
            .body(Body::from(sealed.bytes.clone()))
            .expect("request")
    }

    #[tokio::test]
    async fn heartbeats_open_and_rejections_answer_without_panicking() {
        let key = ClusterKey::generate();
        let state = HealthcheckerState::new(HealthcheckerConfig::default(), key.clone(), "hc");
        let app = app(state.clone());
        let signer = Signer::new(key, "api-1");

        let sealed = signer.seal(Heartbeat::KIND, &beat("api-1", 1));
        let resp = app
            .clone()
            .oneshot(post_sealed(&sealed))
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        // The same bytes again: a replay.
        let resp = app
            .clone()
            .oneshot(post_sealed(&sealed))
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        // A new envelope with an old seq: opens, changes nothing, still 204.
        let repeat = signer.seal(Heartbeat::KIND, &beat("api-1", 1));
        let resp = app
            .clone()
            .oneshot(post_sealed(&repeat))
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        // Nonsense inside a valid envelope.
        let mut bad = beat("api-1", 2);
        bad.interval_ms = 0;
        let resp = app
            .clone()
            .oneshot(post_sealed(&signer.seal(Heartbeat::KIND, &bad)))
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        // A body that is not a heartbeat at all.
        let resp = app
            .clone()
            .oneshot(post_sealed(&signer.seal(Heartbeat::KIND, &"hello")))
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        // No signature; garbage bytes.
        let resp = app
            .clone()
            .oneshot(
                Request::post(HEARTBEAT_PATH)
                    .body(Body::from(sealed.bytes.clone()))
                    .expect("request"),
            )
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let resp = app
            .clone()
            .oneshot(
                Request::post(HEARTBEAT_PATH)
                    .header(SIGNATURE_HEADER, "00")
                    .body(Body::from(&b"\xff\xfe{{{"[..]))
                    .expect("request"),
            )
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

        let stats = state.stats();
        assert_eq!(stats.heartbeats, 1);
        assert_eq!(stats.ignored, 2, "the stale seq and the invalid interval");
        assert_eq!(stats.rejected, 4);

        let resp = app
            .clone()
            .oneshot(Request::get("/cells").body(Body::empty()).expect("request"))
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let cells: CellsResponse = protocol::Versioned::decode(&body).expect("versioned json");
        assert_eq!(cells.roles["api"][0].cell_id, "api-1");
        assert_eq!(cells.roles["api"][0].pid, Some(7));

        let resp = app
            .oneshot(
                Request::get("/healthz")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn an_unknown_route_is_a_404_naming_the_routes() {
        let state =
            HealthcheckerState::new(HealthcheckerConfig::default(), ClusterKey::generate(), "hc");
        for (method, path) in [
            ("GET", "/nope"),
            ("POST", "/control/nope"),
            ("GET", "/cells/x"),
        ] {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .expect("request");
            let resp = app(state.clone()).oneshot(req).await.expect("answer");
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            let error: ErrorBody = serde_json::from_slice(&body).expect("an error body");
            assert!(error.error.contains("no such endpoint"), "{}", error.error);
        }
    }

    #[tokio::test]
    async fn topology_takes_the_read_token_in_cluster_mode_only() {
        let key = ClusterKey::generate();
        let state = HealthcheckerState::new(HealthcheckerConfig::default(), key.clone(), "hc");
        let app = app(state.clone());
        let get = |path: &str, auth: Option<String>| {
            let mut req = Request::get(path);
            if let Some(auth) = auth {
                req = req.header(http::header::AUTHORIZATION, auth);
            }
            req.body(Body::empty()).expect("request")
        };
        for path in ["/cells", "/events"] {
            // Embedded mode: open.
            let resp = app.clone().oneshot(get(path, None)).await.expect("answer");
            assert_eq!(resp.status(), StatusCode::OK, "{path} open on loopback");
        }
        state.verifier().guard_reads(true);
        for path in ["/cells", "/events"] {
            let resp = app.clone().oneshot(get(path, None)).await.expect("answer");
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path} anonymous");
            let wrong = ClusterKey::generate().read_authorization();
            let resp = app
                .clone()
                .oneshot(get(path, Some(wrong)))
                .await
                .expect("answer");
            assert_eq!(
                resp.status(),
                StatusCode::UNAUTHORIZED,
                "{path} wrong token"
            );
            let resp = app
                .clone()
                .oneshot(get(path, Some(key.read_authorization())))
                .await
                .expect("answer");
            assert_eq!(resp.status(), StatusCode::OK, "{path} with the token");
        }
        // Vitals stay open: a supervisor probes them without the key.
        let resp = app.oneshot(get("/healthz", None)).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::OK);
    }

    /// The whole life of a cell on paused time: born, serving, declared dead by the sweep and
    /// its probe (refused, as a killed cell's is) between 0.5 and 1 s after its last heartbeat.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_declares_a_silent_cell_dead_on_paused_time() {
        let state =
            HealthcheckerState::new(HealthcheckerConfig::default(), ClusterKey::generate(), "hc");
        let step = std::time::Duration::from_millis(100);
        for seq in 1..=30 {
            state.heartbeat(beat("api-1", seq), now()).expect("taken");
            tokio::time::advance(step).await;
        }
        let last = tokio::time::Instant::now() - step;
        let mut declared = None;
        while declared.is_none() {
            tokio::time::advance(std::time::Duration::from_millis(20)).await;
            assert!(state.sweep(now()).is_empty(), "no death before its probe");
            for probe in state.take_probes() {
                let refused = Err("its probe could not connect".to_string());
                if state.probe_result(&probe, refused, now()).is_some() {
                    declared = Some(tokio::time::Instant::now() - last);
                }
            }
        }
        let after = declared.expect("declared");
        assert!(
            after > std::time::Duration::from_millis(400)
                && after < std::time::Duration::from_secs(1),
            "{after:?}"
        );
        let kinds: Vec<_> = state
            .events()
            .after(0, 10)
            .events
            .into_iter()
            .map(|(_, e)| e.kind)
            .collect();
        use protocol::control::EventKind::*;
        assert_eq!(kinds, [Born, Serving, Dead]);
        assert_eq!(state.stats().deaths, 1);
        assert!(state.cells().roles.is_empty());
    }
}
