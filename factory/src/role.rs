//! The factory role: serves replacement and stop requests over the signed control plane, and
//! starts cells through the local provider.
//!
//! Requests are deduplicated by their key: the two health checkers that notice the same death
//! both ask with `replace:<dead id>`, and one cell is started. A key is remembered for
//! [`KEY_MEMORY`], long enough for every repeat of one event, short enough that a later shortfall
//! asking with the same slot key is served again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use control::Verifier;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use protocol::control::{ReplaceReply, ReplaceRequest, StopRequest};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::local::{CellSpec, LocalProvider};

pub const KEY_MEMORY: Duration = Duration::from_secs(30);

/// A cell this factory started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Started {
    pub cell_id: String,
    pub role: String,
    pub pid: u32,
    pub addr: String,
    /// The listen address it was given (fixed for roles with fixed addresses).
    pub listen: String,
}

pub struct FactoryState {
    pub provider: LocalProvider,
    pub verifier: Verifier,
    /// Roles whose cells listen on known addresses (health checkers, front doors): a replacement
    /// takes the address its predecessor left.
    pub fixed: BTreeMap<String, Vec<String>>,
    /// Arguments every cell this factory starts gets (e.g. `--healthchecker URL ...`).
    pub cell_args: Vec<String>,
    pub ready: vitals::Readiness,
    requests: Mutex<HashMap<String, (String, Instant)>>,
    children: Mutex<HashMap<String, Started>>,
    alive: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    counter: AtomicU64,
}

impl FactoryState {
    pub fn new(
        provider: LocalProvider,
        verifier: Verifier,
        fixed: BTreeMap<String, Vec<String>>,
        cell_args: Vec<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            provider,
            verifier,
            fixed,
            cell_args,
            ready: vitals::Readiness::default(),
            requests: Mutex::new(HashMap::new()),
            children: Mutex::new(HashMap::new()),
            alive: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        })
    }

    /// Start a cell for `req` unless its key was already served.
    pub async fn replace(self: &Arc<Self>, req: &ReplaceRequest) -> anyhow::Result<ReplaceReply> {
        let cell_id = {
            let mut requests = self.requests.lock().await;
            requests.retain(|_, (_, at)| at.elapsed() < KEY_MEMORY);
            if let Some((id, _)) = requests.get(&req.request_key) {
                metrics::counter!("factory_duplicate_requests_total").increment(1);
                return Ok(ReplaceReply {
                    request_key: req.request_key.clone(),
                    started: false,
                    cell_id: Some(id.clone()),
                });
            }
            let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
            let id = format!("{}-{}-{n}", req.role, std::process::id());
            requests.insert(req.request_key.clone(), (id.clone(), Instant::now()));
            id
        };
        match self.start(&cell_id, req).await {
            Ok(()) => Ok(ReplaceReply {
                request_key: req.request_key.clone(),
                started: true,
                cell_id: Some(cell_id),
            }),
            Err(e) => {
                // Let the next request with this key try again.
                self.requests.lock().await.remove(&req.request_key);
                Err(e)
            }
        }
    }

    async fn start(self: &Arc<Self>, cell_id: &str, req: &ReplaceRequest) -> anyhow::Result<()> {
        let listen = self.free_address(&req.role).await;
        let mut args = vec![
            "--listen".to_string(),
            listen.clone(),
            "--cell-id".to_string(),
            cell_id.to_string(),
        ];
        if let Some(parent) = &req.parent {
            args.push("--parent".into());
            args.push(parent.clone());
        }
        args.extend(self.cell_args.iter().cloned());
        let spec = CellSpec {
            role: req.role.clone(),
            args,
        };
        tracing::info!(cell_id, role = %req.role, key = %req.request_key, reason = %req.reason, "starting a cell");
        let mut started = self.provider.start(cell_id, &spec).await?;
        let info = Started {
            cell_id: cell_id.to_string(),
            role: req.role.clone(),
            pid: started.ready.pid,
            addr: started.ready.addr.clone(),
            listen,
        };
        metrics::counter!("factory_cells_started_total", "role" => req.role.clone()).increment(1);
        self.children.lock().await.insert(cell_id.to_string(), info);
        // Reap the process when it exits, so its address is free again.
        let state = self.clone();
        let id = cell_id.to_string();
        let reaper = tokio::spawn(async move {
            let _ = started.child.wait().await;
            drop(started.stdin.take());
            state.children.lock().await.remove(&id);
            state.alive.lock().await.remove(&id);
        });
        self.alive.lock().await.insert(cell_id.to_string(), reaper);
        Ok(())
    }

    async fn free_address(&self, role: &str) -> String {
        let Some(fixed) = self.fixed.get(role) else {
            return "127.0.0.1:0".into();
        };
        let children = self.children.lock().await;
        for addr in fixed {
            if !children.values().any(|c| &c.listen == addr) {
                // Not held by a cell of ours; a cell of a previous factory may still hold it, in
                // which case the new cell fails to bind and the request fails (and is retried).
                return addr.clone();
            }
        }
        "127.0.0.1:0".into()
    }

    /// SIGTERM a cell this factory started.
    pub async fn stop(&self, cell_id: &str) -> bool {
        let children = self.children.lock().await;
        match children.get(cell_id) {
            Some(c) => kill(Pid::from_raw(c.pid as i32), Signal::SIGTERM).is_ok(),
            None => false,
        }
    }

    pub async fn children(&self) -> Vec<Started> {
        let mut v: Vec<Started> = self.children.lock().await.values().cloned().collect();
        v.sort_by(|a, b| a.cell_id.cmp(&b.cell_id));
        v
    }
}

pub fn app(state: Arc<FactoryState>) -> Router {
    let vitals = vitals::router("factory", state.ready.clone());
    Router::new()
        .route("/control/replace", post(replace))
        .route("/control/stop", post(stop))
        .route("/children", get(children))
        .with_state(state)
        .merge(vitals)
}

async fn replace(
    State(state): State<Arc<FactoryState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: ReplaceRequest =
        match control::receive(&state.verifier, ReplaceRequest::KIND, &headers, &body) {
            Ok((_, req)) => req,
            Err(rejection) => return rejection.into_response(),
        };
    if !infra_role(&req.role) {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Json(protocol::ErrorBody {
                error: format!("unknown role {:?}", req.role),
            }),
        )
            .into_response();
    }
    match state.replace(&req).await {
        Ok(reply) => Json(reply).into_response(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), key = %req.request_key, "starting a cell failed");
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                Json(protocol::ErrorBody {
                    error: format!("starting a {} cell failed: {e:#}", req.role),
                }),
            )
                .into_response()
        }
    }
}

fn infra_role(role: &str) -> bool {
    ["api", "crawler", "healthchecker", "frontdoor"].contains(&role)
}

async fn stop(State(state): State<Arc<FactoryState>>, headers: HeaderMap, body: Bytes) -> Response {
    match control::receive::<StopRequest>(&state.verifier, StopRequest::KIND, &headers, &body) {
        Ok((_, req)) => {
            Json(serde_json::json!({ "stopped": state.stop(&req.cell_id).await })).into_response()
        }
        Err(rejection) => rejection.into_response(),
    }
}

/// The cells this factory started, with their pids: in cluster mode only for a reader with
/// the organism's read token (`control::Verifier::check_read`).
async fn children(State(state): State<Arc<FactoryState>>, headers: HeaderMap) -> Response {
    if let Err(rejection) = state.verifier.check_read(&headers) {
        return rejection.into_response();
    }
    Json(state.children().await).into_response()
}

/// Serve until `shutdown`; then stop every cell this factory started.
pub async fn run(
    state: Arc<FactoryState>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    state.ready.set(true);
    let stop_serving = shutdown.clone();
    axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(async move { stop_serving.cancelled().await })
        .await?;
    state.ready.set(false);
    let pids: Vec<u32> = state.children().await.iter().map(|c| c.pid).collect();
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while !state.children.lock().await.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in state.children().await {
        let _ = kill(Pid::from_raw(c.pid as i32), Signal::SIGKILL);
    }
    Ok(())
}
