//! HTTP handlers and the one mapping from error to status.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engines::frontier::Links;
use engines::idempotency::{Claim, KeyClaim, MAX_KEY_LEN};
use engines::{Admission, Candidate, CrawlSpec, IngestItem, IngestOutcome};
use protocol::{
    CrawlAccepted, CrawlRequest, ErrorBody, IngestBatch, IngestReply, Outcome, Rejection,
    SearchResponse, WIRE_VERSION,
};
use sha2::Digest as _;

use crate::query::{self, SearchParams};
use crate::{search_cache, url_guard, AppState};

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The client sent something wrong; the message names it.
    #[error("{0}")]
    BadRequest(String),
    /// No such endpoint or resource.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    /// A signed message that did not open (unsigned, forged, stale, replayed, misdirected...).
    #[error("{0}")]
    Refused(control::Rejection),
    /// A request with this idempotency key is being served now: try again shortly.
    #[error("{0}")]
    InProgress(String),
    /// The idempotency key was used with another request.
    #[error("{0}")]
    KeyReused(String),
    /// An engine is unreachable or busy: try again.
    #[error("storage unavailable: {0}")]
    Unavailable(#[from] engines::EngineError),
    /// This cell is set up wrong (e.g. it has no cluster key): asking again will not help.
    #[error("{0}")]
    Misconfigured(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // The envelope's own statuses (401, 409, 421, 400; 202 for an unknown kind).
            ApiError::Refused(rejection) => return rejection.clone().into_response(),
            ApiError::InProgress(_) => StatusCode::CONFLICT,
            ApiError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(e) => {
                tracing::warn!(error = %e, "request failed on the storage engine");
                metrics::counter!("api_engine_errors_total").increment(1);
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Misconfigured(e) => {
                tracing::error!(error = %e, "misconfigured");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::CONFLICT {
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
    let router = Router::new()
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
        .merge(vitals);
    vitals::instrument(router, &[])
}

/// Count requests in flight and their latency, for the cell's pressure. The count is a drop
/// guard: a request cancelled mid-flight (its client gone) leaves the count too.
async fn measure(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let _in_flight = state.load.enter();
    let resp = next.run(req).await;
    state.load.record(started.elapsed());
    resp
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no such endpoint {}: see GET /search, POST /crawl, GET /stats",
        uri.path()
    ))
}

/// The public api's description, generated from the handlers below and their types.
#[derive(utoipa::OpenApi)]
#[openapi(paths(search, stats, crawl))]
pub struct ApiDoc;

/// Full-text search over the indexed pages, best first.
#[utoipa::path(
    get,
    path = "/search",
    tag = "search",
    params(SearchParams),
    responses(
        (status = 200, description = "ranked hits", body = SearchResponse),
        (status = 400, description = "a parameter is bad (the message names it)", body = ErrorBody),
        (status = 503, description = "the store is unavailable: try again", body = ErrorBody),
    )
)]
async fn search(
    State(state): State<AppState>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let started = Instant::now();
    let Query(params) =
        params.map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())))?;
    let q = query::parse(&params, &state.cfg).map_err(ApiError::BadRequest)?;
    let (results, outcome) = state.search_cache.search(state.store.as_ref(), &q).await?;
    let took = started.elapsed();
    metrics::histogram!("api_search_seconds").record(took.as_secs_f64());
    let kept = match outcome {
        search_cache::Outcome::Kept => "kept",
        search_cache::Outcome::Searched => "searched",
    };
    metrics::counter!("api_search_answers_total", "answer" => kept).increment(1);
    Ok(Json(SearchResponse {
        query: params.q.unwrap_or_default(),
        total: results.total,
        total_exact: results.total_exact,
        limit: q.limit,
        offset: q.offset,
        took_ms: took.as_secs_f64() * 1000.0,
        hits: results.hits,
    }))
}

/// Versioned: other cells (front doors, `cell status`) read it.
#[utoipa::path(
    get,
    path = "/stats",
    tag = "crawl",
    responses(
        (status = 200, description = "pages indexed; the frontier by state and by host, with the wire version `v`", body = protocol::Versioned<protocol::Stats>),
        (status = 503, description = "the store is unavailable: try again", body = ErrorBody),
    )
)]
async fn stats(
    State(state): State<AppState>,
) -> Result<Json<protocol::Versioned<protocol::Stats>>, ApiError> {
    Ok(Json(protocol::Versioned::new(state.store.stats(50).await?)))
}

/// The header that makes `POST /crawl` exactly-once.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer replayed from an earlier request with the same key.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// The scope of `POST /crawl`'s keys in the store.
const CRAWL_SCOPE: &str = "POST /crawl";
/// How long a key and its answer are kept.
const KEY_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the request holding a key has to answer before a repeat may take it over (its cell
/// died). Admitting seeds takes milliseconds; this is for a cell frozen or killed meanwhile.
const KEY_LEASE: Duration = Duration::from_secs(10);
/// How long a repeat waits for the request holding its key to answer before it answers 409.
const KEY_WAIT: Duration = Duration::from_secs(2);
/// Expired keys are purged once every this many keyed requests.
const PURGE_EVERY: u64 = 256;
static KEYED_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// A crawl request checked against this organism's limits, ready for the store.
struct CheckedCrawl {
    spec: CrawlSpec,
    candidates: Vec<Candidate>,
    rejected: Vec<Rejection>,
}

fn check_crawl(req: &CrawlRequest, cfg: &crate::ApiConfig) -> Result<CheckedCrawl, ApiError> {
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
    let mut candidates: Vec<Candidate> = Vec::new();
    for seed in &req.seeds {
        match url_guard::candidate(seed, cfg) {
            Ok(c) => {
                if !candidates.iter().any(|k| k.url == c.url) {
                    candidates.push(c);
                }
            }
            Err(reason) => rejected.push(Rejection {
                url: seed.clone(),
                reason,
            }),
        }
    }
    Ok(CheckedCrawl {
        spec: CrawlSpec {
            max_depth,
            max_pages: req.max_pages,
        },
        candidates,
        rejected,
    })
}

/// The request's idempotency key, when it carries one: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().ok().map(str::trim).unwrap_or_default();
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key: 1 to {MAX_KEY_LEN} visible ASCII characters (got {} bytes)",
            value.len()
        )));
    }
    Ok(Some(key.to_string()))
}

/// Admit seed URLs into the frontier; with an `Idempotency-Key` every repeat gets the first
/// answer.
#[utoipa::path(
    post,
    path = "/crawl",
    tag = "crawl",
    request_body = CrawlRequest,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters, kept 24 h"),
    ),
    responses(
        (status = 202, description = "the accepted seeds, and each rejected one with its reason", body = CrawlAccepted),
        (status = 400, description = "the request is bad (the message names what)", body = ErrorBody),
        (status = 409, description = "a request with this key is being served: retry", body = ErrorBody),
        (status = 413, description = "the body is too large", body = ErrorBody),
        (status = 422, description = "the key was used with another body", body = ErrorBody),
        (status = 503, description = "the store is unavailable: try again", body = ErrorBody),
    )
)]
async fn crawl(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CrawlRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body.map_err(json_error)?;
    let key = idempotency_key(&headers)?;
    // Checking changes nothing and answers the same every time: it does not take the key.
    let checked = check_crawl(&req, &state.cfg)?;
    let Some(key) = key else {
        let accepted = admit(&state, checked).await?;
        return Ok((StatusCode::ACCEPTED, Json(accepted)).into_response());
    };
    // The request as the api read it (field order fixed by the type): the same JSON written
    // with other spacing or key order is the same request.
    let canonical = serde_json::to_vec(&req).expect("a crawl request always serializes");
    let fingerprint = hex::encode(sha2::Sha256::digest(&canonical));
    let holder = format!("{:032x}", rand::random::<u128>());
    if KEYED_REQUESTS.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == 0 {
        match state.keys.purge_expired(control::now_ms()).await {
            Ok(n) if n > 0 => tracing::debug!(n, "expired idempotency keys purged"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed"),
        }
    }
    let waited_from = Instant::now();
    loop {
        let claim = state
            .keys
            .claim(&KeyClaim {
                scope: CRAWL_SCOPE,
                key: &key,
                fingerprint: &fingerprint,
                holder: &holder,
                now_ms: control::now_ms(),
                lease: KEY_LEASE,
                ttl: KEY_TTL,
            })
            .await?;
        let first = match claim {
            Claim::Serve => None,
            Claim::Answered { fingerprint: f, .. } | Claim::InProgress { fingerprint: f }
                if f != fingerprint =>
            {
                metrics::counter!("api_idempotency_total", "outcome" => "conflict").increment(1);
                return Err(ApiError::KeyReused(format!(
                    "Idempotency-Key {key:?} was used with another request body; \
                     a key names one request (use a new key for a new request)"
                )));
            }
            Claim::Answered { status, body, .. } => Some((status, body)),
            Claim::InProgress { .. } => {
                if waited_from.elapsed() >= KEY_WAIT {
                    metrics::counter!("api_idempotency_total", "outcome" => "in_progress")
                        .increment(1);
                    return Err(ApiError::InProgress(format!(
                        "a request with Idempotency-Key {key:?} is still being served; \
                         repeat it shortly for its answer"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some((status, body)) = first {
            metrics::counter!("api_idempotency_total", "outcome" => "replayed").increment(1);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            let mut response = (status, body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            return Ok(response);
        }
        // This request holds the key: do the work, keep the answer.
        let accepted = match admit(&state, checked).await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Nothing was admitted (the store refused): a repeat may try again.
                if let Err(r) = state.keys.release(CRAWL_SCOPE, &key, &holder).await {
                    tracing::warn!(error = %r, "releasing an idempotency key failed; it frees when its lease ends");
                }
                return Err(e);
            }
        };
        let body = serde_json::to_string(&accepted).expect("an answer always serializes");
        match state
            .keys
            .complete(
                CRAWL_SCOPE,
                &key,
                &holder,
                StatusCode::ACCEPTED.as_u16(),
                &body,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%key, "idempotency key taken over before this answer was stored")
            }
            Err(e) => {
                tracing::warn!(error = %e, %key, "storing the answer of an idempotency key failed")
            }
        }
        metrics::counter!("api_idempotency_total", "outcome" => "first").increment(1);
        let mut response = (StatusCode::ACCEPTED, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(response);
    }
}

/// Record the crawl and admit its seeds.
async fn admit(state: &AppState, checked: CheckedCrawl) -> Result<CrawlAccepted, ApiError> {
    let CheckedCrawl {
        spec,
        candidates,
        mut rejected,
    } = checked;
    let crawl_id = state.store.create_crawl(spec).await?;
    let admissions = state
        .store
        .admit_seeds(crawl_id, &candidates, state.cfg.host_budget)
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
    Ok(CrawlAccepted {
        crawl_id,
        accepted,
        rejected,
    })
}

/// A crawler's results, in a control envelope signed with the cluster key and addressed to this
/// cell. Unsigned, forged, stale, replayed (also across a restart of this cell) or misdirected:
/// refused with the envelope's status, counted by reason, nothing stored.
async fn ingest(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IngestReply>, ApiError> {
    let body = body.map_err(|b| {
        if b.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("request body too large: {}", b.body_text()))
        } else {
            ApiError::BadRequest(format!("could not read the body: {}", b.body_text()))
        }
    })?;
    let batch = match control::receive::<IngestBatch>(
        &state.verifier,
        IngestBatch::KIND,
        &headers,
        &body,
    ) {
        Ok((_, batch)) => batch,
        Err(rejection) => {
            metrics::counter!("api_ingest_rejected_total", "reason" => rejection.label())
                .increment(1);
            tracing::warn!(reason = %rejection, "ingest refused");
            return Err(ApiError::Refused(rejection));
        }
    };
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
            Outcome::Page(page) => match url_guard::candidate(&page.final_url, cfg) {
                Err(reason) => IngestOutcome::Failed {
                    reason: format!("final URL refused: {reason}"),
                },
                Ok(final_c) => {
                    let mut links = Vec::with_capacity(page.links.len());
                    for link in &page.links {
                        match url_guard::candidate(link, cfg) {
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
    // Under client load (the controller said throttle) the links wait in the store, offered
    // once the load falls (the publisher); the pages are searchable at once either way.
    let links = if state.defer_links.load(std::sync::atomic::Ordering::Relaxed) {
        Links::Defer
    } else {
        Links::Admit
    };
    let report = state.store.ingest(&items, cfg.host_budget, links).await?;
    metrics::counter!("api_ingested_results_total").increment(report.stored as u64);
    metrics::counter!("api_pages_indexed_total").increment(report.pages_indexed as u64);
    metrics::counter!("api_links_admitted_total").increment(report.links_admitted as u64);
    metrics::counter!("api_links_deferred_total").increment(report.links_deferred as u64);
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
