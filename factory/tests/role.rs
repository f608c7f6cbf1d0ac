//! The factory role over real sockets: signed replacement requests start one cell per key, repeats
//! are no-ops, unsigned or forged requests are refused and start nothing, stop works.
//! The "cell" is a tiny script that announces itself like a real cell and then waits.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use control::{ClusterKey, ControlClient, Signer, Verifier};
use factory::local::LocalProvider;
use factory::role::{app, FactoryState};
use protocol::control::{ReplaceReply, ReplaceRequest, StopRequest};

fn fake_cell(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("fake-cell");
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"HOMEOSTAT_READY {\\\"role\\\":\\\"$2\\\",\\\"addr\\\":\\\"127.0.0.1:9\\\",\\\"pid\\\":$$}\"\nexec sleep 60\n",
    )
    .expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

async fn factory(key: &ClusterKey) -> (tempfile::TempDir, String, std::sync::Arc<FactoryState>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = LocalProvider {
        exe: fake_cell(dir.path()),
        common_args: Vec::new(),
        ready_timeout: Duration::from_secs(10),
        tie_to_parent: false,
        env: Vec::new(),
    };
    let mut fixed = BTreeMap::new();
    fixed.insert("healthchecker".to_string(), vec!["127.0.0.1:1".to_string()]);
    let state = FactoryState::new(
        provider,
        Verifier::new(key.clone(), Duration::from_secs(30)),
        fixed,
        Vec::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = app(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (dir, url, state)
}

fn request(key: &str) -> ReplaceRequest {
    ReplaceRequest {
        request_key: key.into(),
        role: "crawler".into(),
        reason: "test".into(),
        parent: Some("crawler-dead".into()),
    }
}

#[tokio::test]
async fn one_cell_per_request_key() {
    let key = ClusterKey::generate();
    let (_dir, url, state) = factory(&key).await;
    let hc1 = ControlClient::new(Signer::new(key.clone(), "hc-1"));
    let hc2 = ControlClient::new(Signer::new(key.clone(), "hc-2"));
    let first: ReplaceReply = hc1
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("replace:crawler-dead"),
        )
        .await
        .expect("first request");
    let second: ReplaceReply = hc2
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("replace:crawler-dead"),
        )
        .await
        .expect("second request");
    assert!(first.started);
    assert!(!second.started, "the same death is replaced once");
    assert_eq!(first.cell_id, second.cell_id);
    assert_eq!(state.children().await.len(), 1);
    let other: ReplaceReply = hc1
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("grow:crawler:2"),
        )
        .await
        .expect("another key");
    assert!(other.started);
    assert_eq!(state.children().await.len(), 2);

    // Stop one: the process ends and the factory forgets it.
    let id = other.cell_id.expect("id");
    let stopped: serde_json::Value = hc1
        .send(
            &url,
            "/control/stop",
            StopRequest::KIND,
            &StopRequest {
                cell_id: id.clone(),
                reason: "test".into(),
            },
        )
        .await
        .expect("stop");
    assert_eq!(stopped["stopped"], true);
    for _ in 0..200 {
        if state.children().await.iter().all(|c| c.cell_id != id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(state.children().await.len(), 1);
    for c in state.children().await {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test]
async fn unsigned_forged_and_unknown_requests_start_nothing() {
    let key = ClusterKey::generate();
    let (_dir, url, state) = factory(&key).await;
    let http = reqwest::Client::new();
    let unsigned = http
        .post(format!("{url}/control/replace"))
        .json(&request("x"))
        .send()
        .await
        .expect("send");
    assert_eq!(unsigned.status(), 401);
    let intruder = ControlClient::new(Signer::new(ClusterKey::generate(), "intruder"));
    let forged: anyhow::Result<ReplaceReply> = intruder
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("y"),
        )
        .await;
    assert!(forged.is_err());
    let friend = ControlClient::new(Signer::new(key.clone(), "hc"));
    let unknown_role: anyhow::Result<ReplaceReply> = friend
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &ReplaceRequest {
                role: "wizard".into(),
                ..request("z")
            },
        )
        .await;
    assert!(unknown_role.is_err());
    let wrong_kind: anyhow::Result<serde_json::Value> = friend
        .send(&url, "/control/replace", "teleport", &request("w"))
        .await;
    assert!(
        wrong_kind.is_ok(),
        "an unknown kind is ignored (202), not an error"
    );
    assert!(state.children().await.is_empty());
    // Still serving.
    let health = http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}
