//! `POST /control/weight`: an api cell asks for a lower or restored share of traffic, in a
//! signed envelope. Anything unsigned, forged, stale, replayed, misdirected or malformed is
//! refused and counted, and changes nothing; so is a request about another cell than its
//! sender (an api speaks only for itself: one cell cannot starve or flood a sibling).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::control::WeightRequest;
use protocol::ErrorBody;

use crate::{AppState, Counters};

pub(crate) async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (envelope, request) = match control::receive::<WeightRequest>(
        &state.verifier,
        WeightRequest::KIND,
        &headers,
        &body,
    ) {
        Ok(opened) => opened,
        Err(rejection) => {
            Counters::bump(&state.counters.control_rejected);
            metrics::counter!("frontdoor_weight_requests_total", "outcome" => "rejected")
                .increment(1);
            tracing::warn!(reason = %rejection, "weight request refused");
            return rejection.into_response();
        }
    };
    if !(0.0..=1.0).contains(&request.weight) || request.cell_id.is_empty() {
        Counters::bump(&state.counters.control_rejected);
        metrics::counter!("frontdoor_weight_requests_total", "outcome" => "invalid").increment(1);
        tracing::warn!(sender = %envelope.sender, cell_id = %request.cell_id,
            weight = request.weight, "invalid weight request refused");
        return (
            StatusCode::BAD_REQUEST,
            Json(ErrorBody {
                error: format!(
                    "a weight request names a cell and a weight within 0.0..=1.0; got cell {:?}, weight {}",
                    request.cell_id, request.weight
                ),
            }),
        )
            .into_response();
    }
    if request.cell_id != envelope.sender {
        Counters::bump(&state.counters.control_rejected);
        metrics::counter!("frontdoor_weight_requests_total", "outcome" => "not_own").increment(1);
        tracing::warn!(sender = %envelope.sender, cell_id = %request.cell_id,
            "weight request about another cell refused");
        return (
            StatusCode::FORBIDDEN,
            Json(ErrorBody {
                error: format!(
                    "a weight request is accepted only from the api it concerns: {:?} asked for {:?}",
                    envelope.sender, request.cell_id
                ),
            }),
        )
            .into_response();
    }
    let applied = state.balancer.set_weight(
        &request.cell_id,
        request.weight,
        (envelope.ts_ms, envelope.seq),
    );
    if applied {
        Counters::bump(&state.counters.weights_applied);
        metrics::counter!("frontdoor_weight_requests_total", "outcome" => "applied").increment(1);
        tracing::info!(cell_id = %request.cell_id, weight = request.weight,
            reason = %request.reason, sender = %envelope.sender, "routing weight changed");
    } else {
        // Out of order: a newer request for this cell was applied already. Ignored, not failed.
        metrics::counter!("frontdoor_weight_requests_total", "outcome" => "out_of_order")
            .increment(1);
        tracing::debug!(cell_id = %request.cell_id, "older weight request ignored");
    }
    StatusCode::NO_CONTENT.into_response()
}
