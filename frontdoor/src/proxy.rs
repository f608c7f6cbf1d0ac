//! Forwarding a client request to an api cell, retrying on another, and the answers the
//! frontdoor gives of its own (no api live, every attempt failed, body too large).

use std::fmt;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::ErrorBody;

use crate::backends::Backend;
use crate::paths::{self, Refusal};
use crate::{AppState, Counters, BACKEND_HEADER};

/// The header that makes `POST /crawl` exactly-once (the api keeps the first answer per key).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer that is the stored first answer to an earlier request with the same key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Request headers passed on to the api cell. Hop-by-hop and connection headers are not;
/// `accept-encoding` is not either, so answers come back as the client can read them.
const FORWARDED_REQUEST_HEADERS: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    HeaderName::from_static(IDEMPOTENCY_KEY),
];
/// Answer headers passed back to the client.
const FORWARDED_RESPONSE_HEADERS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::RETRY_AFTER,
    header::CACHE_CONTROL,
    HeaderName::from_static(IDEMPOTENT_REPLAYED),
];

/// An api cell's answer, read whole.
struct Answer {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

/// Why one attempt on one api cell failed.
#[derive(Debug)]
enum AttemptError {
    /// The connection was not made: the request never reached the cell (safe to retry always).
    Connect(String),
    /// No whole answer within the attempt timeout.
    Timeout(Duration),
    /// The connection broke or the answer could not be read.
    Transport(String),
    /// The answer was larger than `max_response_bytes`.
    TooLarge(usize),
    /// The cell answered with a 5xx.
    Upstream(StatusCode, String),
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "connection failed: {e}"),
            AttemptError::Timeout(t) => write!(f, "no answer within {} ms", t.as_millis()),
            AttemptError::Transport(e) => write!(f, "exchange failed: {e}"),
            AttemptError::TooLarge(max) => write!(f, "answer larger than {max} bytes"),
            AttemptError::Upstream(status, body) => write!(f, "answered {status}: {body}"),
        }
    }
}

impl AttemptError {
    /// Whether trying another api cell may help: not for an oversized answer (every cell would
    /// give the same one).
    fn retryable(&self, idempotent: bool) -> bool {
        match self {
            AttemptError::Connect(_) => true,
            AttemptError::Timeout(_) | AttemptError::Transport(_) | AttemptError::Upstream(..) => {
                idempotent
            }
            AttemptError::TooLarge(_) => false,
        }
    }

    /// Whether it counts against the cell for ejection.
    fn blames_backend(&self) -> bool {
        !matches!(self, AttemptError::TooLarge(_))
    }

    /// The frontdoor's own status when this was the last failure.
    fn status(&self) -> StatusCode {
        match self {
            AttemptError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AttemptError::Upstream(StatusCode::SERVICE_UNAVAILABLE, _) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// True when sending the request twice does the same as sending it once: reads, and a
/// `POST /crawl` that carries an `Idempotency-Key` (the api answers every repeat of a key with
/// the first answer and admits the seeds once, across api cells). The front door gives every
/// `POST /crawl` a key when the client sent none, so its own retry is exactly-once too.
fn idempotent(method: &Method, path: &str, headers: &HeaderMap) -> bool {
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => true,
        Method::POST => path == "/crawl" && headers.contains_key(IDEMPOTENCY_KEY),
        _ => false,
    }
}

/// The route, as the latency histogram's `route` label (bounded set).
fn route_label(route: &str) -> &'static str {
    match route {
        "/search" => "search",
        "/stats" => "stats",
        "/crawl" => "crawl",
        _ => "other",
    }
}

/// A JSON error answer of the frontdoor's own.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = Json(ErrorBody {
        error: message.into(),
    });
    if status == StatusCode::SERVICE_UNAVAILABLE {
        (status, [(header::RETRY_AFTER, "1")], body).into_response()
    } else {
        (status, body).into_response()
    }
}

/// The front door's answer to a request it does not forward: 404 for a path that is not a
/// public route (whatever its spelling), 405 for a public route with another method.
fn refused(method: &Method, raw: &str, refusal: Refusal) -> Response {
    let reason = match &refusal {
        Refusal::Ambiguous(_) => "ambiguous",
        Refusal::NotPublic(_) => "not_public",
        Refusal::Method { .. } => "method",
    };
    metrics::counter!("frontdoor_refused_total", "reason" => reason).increment(1);
    let served = "the front door serves GET /search, GET /stats and POST /crawl";
    match refusal {
        Refusal::Ambiguous(what) => error(
            StatusCode::NOT_FOUND,
            format!("no route for {raw}: the path holds {what}; {served}"),
        ),
        Refusal::NotPublic(path) if path == raw => error(
            StatusCode::NOT_FOUND,
            format!("no route for {raw}; {served}"),
        ),
        Refusal::NotPublic(path) => error(
            StatusCode::NOT_FOUND,
            format!("no route for {raw} (read as {path}); {served}"),
        ),
        Refusal::Method { path, allowed } => {
            let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            let allow = allow.join(", ");
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not served on {path}; use {allow}"),
            );
            if let Ok(value) = HeaderValue::from_str(&allow) {
                response.headers_mut().insert(header::ALLOW, value);
            }
            response
        }
    }
}

fn finish(started: Instant, route: &'static str, outcome: &'static str, counters: &Counters) {
    Counters::bump(&counters.requests);
    metrics::counter!("frontdoor_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("frontdoor_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
}

/// Every request the front door does not answer itself: a public route (after normalizing its
/// path) is forwarded to an api cell, retried elsewhere when that may help; anything else is
/// refused here.
pub(crate) async fn forward(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let path = match paths::public_route(&method, uri.path()) {
        Ok(path) => path,
        Err(refusal) => {
            finish(started, "other", "refused", &state.counters);
            tracing::debug!(%method, path = uri.path(), ?refusal, "request refused at the door");
            return refused(&method, uri.path(), refusal);
        }
    };
    let route = route_label(path);
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            finish(started, route, "bad_request", &state.counters);
            let status = rejection.status();
            return error(
                status,
                format!("could not read the request body: {}", rejection.body_text()),
            );
        }
    };
    // The route's own path, never the client's spelling of it.
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    if method == Method::POST && path == "/crawl" && !headers.contains_key(IDEMPOTENCY_KEY) {
        // The front door's own key: a retry on another api cell cannot admit the seeds twice.
        let key = format!("frontdoor-{:032x}", rand::random::<u128>());
        headers.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_str(&key).expect("hex is a valid header value"),
        );
    }
    let idempotent = idempotent(&method, path, &headers);
    // The registry already keeps only routable cells; a list fed some other way may not.
    let live: Vec<Backend> = state
        .backends()
        .into_iter()
        .filter(|b| Backend::routable(b.state))
        .collect();
    if live.is_empty() {
        finish(started, route, "no_api", &state.counters);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no api cell is live; try again shortly",
        );
    }

    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<(Backend, AttemptError)> = None;
    let max_attempts = state.cfg.max_attempts.max(1) as usize;
    while tried.len() < max_attempts {
        let Some(backend) = state.balancer.pick(&live, &tried) else {
            break;
        };
        if !tried.is_empty() {
            Counters::bump(&state.counters.retries);
            metrics::counter!("frontdoor_retries_total").increment(1);
        }
        tried.push(backend.cell_id.clone());
        match attempt(&state, &backend, &method, &target, &headers, body.clone()).await {
            Ok(answer) => {
                state.balancer.success(&backend.cell_id);
                let outcome = if answer.status.is_client_error() {
                    "client_error"
                } else {
                    "ok"
                };
                finish(started, route, outcome, &state.counters);
                return answer_response(answer, &backend);
            }
            Err((failure, answer)) => {
                if failure.blames_backend() && state.balancer.failure(&backend.cell_id) {
                    Counters::bump(&state.counters.ejections);
                    metrics::counter!("frontdoor_ejections_total").increment(1);
                    tracing::warn!(cell_id = %backend.cell_id, addr = %backend.addr,
                        error = %failure, eject_for_ms = state.cfg.eject_for_ms,
                        "api cell ejected after consecutive failures");
                }
                tracing::debug!(cell_id = %backend.cell_id, error = %failure, %method,
                    target = %target, "attempt failed");
                if !failure.retryable(idempotent) {
                    // Not safe (or of no use) to try elsewhere: the cell's answer, if there
                    // was one, is the answer.
                    if let Some(answer) = answer {
                        finish(started, route, "upstream_error", &state.counters);
                        return answer_response(answer, &backend);
                    }
                    last = Some((backend, failure));
                    break;
                }
                last = Some((backend, failure));
            }
        }
    }

    finish(started, route, "failed", &state.counters);
    match last {
        Some((backend, failure)) => {
            tracing::warn!(%method, target = %target, attempts = tried.len(),
                cell_id = %backend.cell_id, error = %failure, "request failed on every attempt");
            error(
                failure.status(),
                format!(
                    "no api cell answered {method} {path} ({} attempt{}); last: api cell {} {}",
                    tried.len(),
                    if tried.len() == 1 { "" } else { "s" },
                    backend.cell_id,
                    failure
                ),
            )
        }
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no api cell is live; try again shortly",
        ),
    }
}

fn answer_response(answer: Answer, backend: &Backend) -> Response {
    let mut response = (answer.status, answer.body).into_response();
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_TYPE);
    for (name, value) in answer.headers {
        headers.insert(name, value);
    }
    if let Ok(value) = HeaderValue::from_str(&backend.cell_id) {
        headers.insert(BACKEND_HEADER, value);
    }
    response
}

/// One attempt on one api cell. A 5xx is an error that carries the answer, for when it cannot
/// be retried.
async fn attempt(
    state: &AppState,
    backend: &Backend,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Answer, (AttemptError, Option<Answer>)> {
    let url = format!("{}{}", backend.addr.trim_end_matches('/'), target);
    let mut request = state.client.request(method.clone(), url);
    for name in FORWARDED_REQUEST_HEADERS {
        for value in headers.get_all(&name) {
            request = request.header(name.clone(), value.clone());
        }
    }
    if !body.is_empty() || *method == Method::POST || *method == Method::PUT {
        request = request.body(body);
    }
    let timeout = Duration::from_millis(state.cfg.attempt_timeout_ms);
    let max = state.cfg.max_response_bytes;
    let exchange = async {
        let mut response = request.send().await.map_err(classify)?;
        let status = response.status();
        let kept: Vec<(HeaderName, HeaderValue)> = FORWARDED_RESPONSE_HEADERS
            .iter()
            .filter_map(|name| {
                response
                    .headers()
                    .get(name)
                    .map(|v| (name.clone(), v.clone()))
            })
            .collect();
        if response
            .content_length()
            .is_some_and(|len| len > max as u64)
        {
            return Err(AttemptError::TooLarge(max));
        }
        let mut buf = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if buf.len() + chunk.len() > max {
                return Err(AttemptError::TooLarge(max));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            headers: kept,
            body: Bytes::from(buf),
        })
    };
    let answer = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err((AttemptError::Timeout(timeout), None)),
        Ok(Err(e)) => return Err((e, None)),
        Ok(Ok(answer)) => answer,
    };
    if answer.status.is_server_error() {
        let text = String::from_utf8_lossy(&answer.body);
        let mut text: String = text.chars().take(200).collect();
        if text.is_empty() {
            text.push_str("(no body)");
        }
        return Err((AttemptError::Upstream(answer.status, text), Some(answer)));
    }
    Ok(answer)
}

fn classify(e: reqwest::Error) -> AttemptError {
    // The full chain: reqwest's own message is often just "error sending request".
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_connect() {
        AttemptError::Connect(message)
    } else {
        AttemptError::Transport(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotence_by_method_path_and_key() {
        let none = HeaderMap::new();
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        assert!(idempotent(&Method::GET, "/search", &none));
        assert!(idempotent(&Method::POST, "/crawl", &keyed));
        assert!(!idempotent(&Method::POST, "/crawl", &none), "no key: once");
        assert!(!idempotent(&Method::POST, "/crawl/other", &keyed));
        assert!(!idempotent(&Method::POST, "/search", &keyed));
        assert!(!idempotent(&Method::DELETE, "/crawl", &keyed));
    }

    #[test]
    fn failures_map_to_gateway_statuses() {
        assert_eq!(
            AttemptError::Timeout(Duration::from_secs(1)).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            AttemptError::Upstream(StatusCode::SERVICE_UNAVAILABLE, String::new()).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            AttemptError::Connect("refused".into()).status(),
            StatusCode::BAD_GATEWAY
        );
        assert!(AttemptError::Connect("refused".into()).retryable(false));
        assert!(!AttemptError::Upstream(StatusCode::BAD_GATEWAY, String::new()).retryable(false));
        assert!(!AttemptError::TooLarge(1).retryable(true));
    }
}
