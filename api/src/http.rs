//! HTTP handlers and the one mapping from error to status.

use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engines::{Admission, CrawlSpec, IngestItem, IngestOutcome};
use protocol::{
    CrawlAccepted, CrawlRequest, ErrorBody, IngestBatch, IngestReply, Outcome, Rejection,
    SearchResponse, WIRE_VERSION,
};

use crate::query::{self, SearchParams};
use crate::{frontier, AppState};

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client sent something wrong; the message names it.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    /// An engine is unreachable or busy: try again.
    #[error("storage unavailable: {0}")]
    Unavailable(#[from] engines::EngineError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(e) => {
                tracing::warn!(error = %e, "request failed on the storage engine");
                metrics::counter!("api_engine_errors_total").increment(1);
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        if status == StatusCode::SERVICE_UNAVAILABLE {
            (status, [("retry-after", "1")], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}

fn json_error(e: JsonRejection) -> ApiError {
    match e {
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("request body too large: {}", b.body_text()))
        }
        other => ApiError::BadRequest(format!("malformed JSON body: {}", other.body_text())),
    }
}

/// The api role's routes, vitals included.
pub fn app(state: AppState) -> Router {
    let vitals = vitals::router("api", state.ready.clone());
    Router::new()
        .route("/search", get(search))
        .route("/stats", get(stats))
        .route(
            "/crawl",
            post(crawl).layer(DefaultBodyLimit::max(4 * 1024 * 1024)),
        )
        .route(
            "/internal/ingest",
            post(ingest).layer(DefaultBodyLimit::max(256 * 1024 * 1024)),
        )
        .route(crate::permits::PATH, post(crate::permits::permits))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        .with_state(state)
        .merge(vitals)
}

/// Count requests in flight and their latency, for the cell's pressure.
async fn measure(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    state.load.in_flight.fetch_add(1, Relaxed);
    let resp = next.run(req).await;
    state.load.in_flight.fetch_sub(1, Relaxed);
    state.load.record(started.elapsed());
    resp
}

async fn not_found() -> ApiError {
    ApiError::BadRequest("no such endpoint: see GET /search, POST /crawl, GET /stats".into())
}

async fn search(
    State(state): State<AppState>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let started = Instant::now();
    let Query(params) =
        params.map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())))?;
    let q = query::parse(&params, &state.cfg).map_err(ApiError::BadRequest)?;
    let results = state.store.search(&q).await?;
    let took = started.elapsed();
    metrics::histogram!("api_search_seconds").record(took.as_secs_f64());
    Ok(Json(SearchResponse {
        query: params.q.unwrap_or_default(),
        total: results.total,
        limit: q.limit,
        offset: q.offset,
        took_ms: took.as_secs_f64() * 1000.0,
        hits: results.hits,
    }))
}

async fn stats(State(state): State<AppState>) -> Result<Json<protocol::Stats>, ApiError> {
    Ok(Json(state.store.stats(50).await?))
}

async fn crawl(
    State(state): State<AppState>,
    body: Result<Json<CrawlRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CrawlAccepted>), ApiError> {
    let Json(req) = body.map_err(json_error)?;
    let cfg = &state.cfg;
    if req.seeds.is_empty() {
        return Err(ApiError::BadRequest(
            "seeds: at least one seed URL is required".into(),
        ));
    }
    if req.seeds.len() > cfg.max_seeds {
        return Err(ApiError::BadRequest(format!(
            "seeds: {} seeds is more than the {} allowed in one request",
            req.seeds.len(),
            cfg.max_seeds
        )));
    }
    if req.max_pages == Some(0) {
        return Err(ApiError::BadRequest("max_pages: must be at least 1".into()));
    }
    let max_depth = match (req.max_depth, cfg.max_depth) {
        (Some(asked), Some(ceiling)) if asked > ceiling => {
            return Err(ApiError::BadRequest(format!(
                "max_depth: {asked} is above this organism's ceiling of {ceiling}"
            )))
        }
        (Some(asked), _) => Some(asked),
        (None, ceiling) => ceiling,
    };
    let mut rejected = Vec::new();
    let mut candidates = Vec::new();
    for seed in &req.seeds {
        match frontier::candidate(seed, cfg) {
            Ok(c) => {
                if !candidates
                    .iter()
                    .any(|k: &engines::Candidate| k.url == c.url)
                {
                    candidates.push(c);
                }
            }
            Err(reason) => rejected.push(Rejection {
                url: seed.clone(),
                reason,
            }),
        }
    }
    let crawl_id = state
        .store
        .create_crawl(CrawlSpec {
            max_depth,
            max_pages: req.max_pages,
        })
        .await?;
    let admissions = state
        .store
        .admit_seeds(crawl_id, &candidates, cfg.host_budget)
        .await?;
    let mut accepted = Vec::new();
    for (c, a) in candidates.into_iter().zip(admissions) {
        match a {
            Admission::Admitted => accepted.push(c.url),
            Admission::Known(state) => rejected.push(Rejection {
                url: c.url,
                reason: format!("already in the frontier ({state})"),
            }),
            Admission::Refused(reason) => rejected.push(Rejection { url: c.url, reason }),
        }
    }
    metrics::counter!("api_seeds_accepted_total").increment(accepted.len() as u64);
    state.frontier_grew.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(CrawlAccepted {
            crawl_id,
            accepted,
            rejected,
        }),
    ))
}

async fn ingest(
    State(state): State<AppState>,
    body: Result<Json<IngestBatch>, JsonRejection>,
) -> Result<Json<IngestReply>, ApiError> {
    let Json(batch) = body.map_err(json_error)?;
    if batch.v > WIRE_VERSION {
        metrics::counter!("api_ingest_rejected_total", "reason" => "version").increment(1);
        return Err(ApiError::BadRequest(format!(
            "ingest batch version {} is newer than this cell understands ({WIRE_VERSION})",
            batch.v
        )));
    }
    let cfg = &state.cfg;
    let mut items = Vec::with_capacity(batch.results.len());
    let mut links_refused = 0u64;
    for result in batch.results {
        let outcome = match result.outcome {
            Outcome::Failed { reason } => IngestOutcome::Failed { reason },
            Outcome::Page(page) => match frontier::candidate(&page.final_url, cfg) {
                Err(reason) => IngestOutcome::Failed {
                    reason: format!("final URL refused: {reason}"),
                },
                Ok(final_c) => {
                    let mut links = Vec::with_capacity(page.links.len());
                    for link in &page.links {
                        match frontier::candidate(link, cfg) {
                            Ok(c) => links.push(c),
                            Err(_) => links_refused += 1,
                        }
                    }
                    IngestOutcome::Page {
                        final_url: final_c.url,
                        final_host: final_c.host,
                        title: page.title,
                        text: page.text,
                        indexable: page.indexable,
                        links,
                    }
                }
            },
        };
        items.push(IngestItem {
            url: result.url,
            outcome,
        });
    }
    let report = state.store.ingest(&items, cfg.host_budget).await?;
    metrics::counter!("api_ingested_results_total").increment(report.stored as u64);
    metrics::counter!("api_pages_indexed_total").increment(report.pages_indexed as u64);
    metrics::counter!("api_links_admitted_total").increment(report.links_admitted as u64);
    metrics::counter!("api_links_refused_total").increment(links_refused);
    if report.unknown > 0 {
        metrics::counter!("api_ingest_unknown_total").increment(report.unknown as u64);
    }
    if report.links_admitted > 0 {
        state.frontier_grew.notify_one();
    }
    Ok(Json(IngestReply {
        v: WIRE_VERSION,
        stored: report.stored,
        admitted_links: report.links_admitted,
    }))
}
