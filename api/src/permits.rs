//! `POST /internal/permits`: the crawlers' door to the organism's host ledger
//! ([`engines::politeness`]). Crawlers never open the store; they ask the api, which runs the
//! ledger's arithmetic in the store, atomically, for every crawler alike.
//!
//! The request is a control envelope of kind [`KIND`] signed with the cluster key (the
//! `control` crate): unsigned, forged, stale or replayed requests are refused before the store
//! is touched. An api without a cluster key refuses every request (500, a misconfiguration):
//! crawlers then fall back to nothing, they wait and ask again. Errors answer through the api's
//! one mapping ([`ApiError`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engines::politeness::{PermitReply, PermitRequest};

use crate::{ApiError, AppState};

/// The envelope kind of a permit request.
pub const KIND: &str = "permits";
/// The path crawlers post to.
pub const PATH: &str = "/internal/permits";
/// Most asks, releases and blocks one request may carry.
pub const MAX_ITEMS: usize = 4_096;

pub(crate) async fn permits(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(verifier) = state.permits_verifier.as_ref() else {
        metrics::counter!("api_permit_requests_total", "outcome" => "no_key").increment(1);
        return Err(ApiError::Misconfigured(
            "this api has no cluster key: it cannot check permit requests".into(),
        ));
    };
    let request: PermitRequest = match control::receive(verifier, KIND, &headers, &body) {
        Ok((_, request)) => request,
        Err(rejection) => {
            metrics::counter!("api_permit_requests_total", "outcome" => "refused").increment(1);
            return Err(ApiError::Refused(rejection));
        }
    };
    let items = request.asks.len() + request.releases.len() + request.blocks.len();
    if items > MAX_ITEMS {
        return Err(ApiError::TooLarge(format!(
            "{items} items in one permit request; at most {MAX_ITEMS}"
        )));
    }
    if let Some(ask) = request
        .asks
        .iter()
        .find(|a| a.host.is_empty() || a.host.len() > 253)
    {
        return Err(ApiError::BadRequest(format!(
            "ask for host {:?}: not a host name",
            ask.host
        )));
    }
    match state.store.permits(&request).await {
        Ok(reply) => {
            metrics::counter!("api_permit_requests_total", "outcome" => "answered").increment(1);
            Ok(Json::<PermitReply>(reply).into_response())
        }
        Err(e) => {
            metrics::counter!("api_permit_requests_total", "outcome" => "failed").increment(1);
            Err(ApiError::Unavailable(e))
        }
    }
}
