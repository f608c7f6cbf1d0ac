//! The factory role over real sockets: signed replacement requests start one cell per key, repeats
//! are no-ops (also when asked of a sibling factory sharing the ledger), a role at its maximum is
//! refused with an answer, a replaced local cell is fenced (killed) first, unsigned or forged
//! requests are refused and start nothing, stop works.
//! The "cell" is a tiny script that announces itself like a real cell and then waits.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use control::{ClusterKey, ControlClient, Signer, Verifier};
use engines::sqlite::SqliteFactoryLedger;
use factory::local::LocalProvider;
use factory::role::{app, FactoryReply, FactoryState, Organism};
use protocol::control::{ReplaceReply, ReplaceRequest, StopRequest};

fn fake_cell(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("fake-cell");
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"HOMEOSTAT_READY {\\\"v\\\":1,\\\"role\\\":\\\"$2\\\",\\\"addr\\\":\\\"127.0.0.1:9\\\",\\\"pid\\\":$$}\"\nexec sleep 60\n",
    )
    .expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

async fn factory(key: &ClusterKey) -> (tempfile::TempDir, String, std::sync::Arc<FactoryState>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, state) = factory_in(key, dir.path(), "factory-1", BTreeMap::new()).await;
    (dir, url, state)
}

/// A factory whose ledger is `dir/store.db` (two factories in one directory share it).
async fn factory_in(
    key: &ClusterKey,
    dir: &std::path::Path,
    id: &str,
    maxima: BTreeMap<String, u32>,
) -> (String, std::sync::Arc<FactoryState>) {
    let provider = LocalProvider {
        exe: fake_cell(dir),
        common_args: Vec::new(),
        ready_timeout: Duration::from_secs(10),
        tie_to_parent: false,
        env: Vec::new(),
        release_file: None,
    };
    let mut fixed = BTreeMap::new();
    fixed.insert("healthchecker".to_string(), vec!["127.0.0.1:1".to_string()]);
    let ledger = SqliteFactoryLedger::open(dir.join("store.db").to_str().expect("utf-8"))
        .await
        .expect("ledger");
    let state = FactoryState::new(
        provider,
        Verifier::new(key.clone(), Duration::from_secs(30)),
        fixed,
        Vec::new(),
        Organism {
            ledger: std::sync::Arc::new(ledger),
            factory_id: id.to_string(),
            maxima,
            healthcheckers: Vec::new(),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let router = app(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, state)
}

async fn kill_children(state: &FactoryState) {
    for c in state.children().await {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
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
    let forged: Result<ReplaceReply, control::SendError> = intruder
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("y"),
        )
        .await;
    assert!(forged.is_err());
    let friend = ControlClient::new(Signer::new(key.clone(), "hc"));
    let unknown_role: Result<ReplaceReply, control::SendError> = friend
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
    let wrong_kind: Result<serde_json::Value, control::SendError> = friend
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

#[tokio::test]
async fn an_unknown_route_is_a_404_naming_the_routes() {
    let key = ClusterKey::generate();
    let (_dir, url, _state) = factory(&key).await;
    let resp = reqwest::Client::new()
        .post(format!("{url}/control/nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 404);
    let body: protocol::ErrorBody = resp.json().await.expect("an error body");
    assert!(
        body.error.contains("no such endpoint /control/nope"),
        "{}",
        body.error
    );
}

/// The first factory starts a cell for a key and dies; the health checker asks the sibling with
/// the same key: no second cell, the first one's id.
#[tokio::test]
async fn a_sibling_answers_a_key_the_first_factory_served() {
    let key = ClusterKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let (url1, first) = factory_in(&key, dir.path(), "factory-1", BTreeMap::new()).await;
    let (url2, second) = factory_in(&key, dir.path(), "factory-2", BTreeMap::new()).await;
    let hc = ControlClient::new(Signer::new(key.clone(), "hc-1"));
    let a: ReplaceReply = hc
        .send(
            &url1,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("replace:crawler-x"),
        )
        .await
        .expect("first factory");
    assert!(a.started);
    let b: ReplaceReply = hc
        .send(
            &url2,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("replace:crawler-x"),
        )
        .await
        .expect("second factory");
    assert!(!b.started, "the sibling starts nothing for a served key");
    assert_eq!(a.cell_id, b.cell_id);
    assert!(second.children().await.is_empty());
    kill_children(&first).await;
}

/// A role at its maximum is refused with an answer that names the role and its maximum; the
/// refusal does not use the key up.
#[tokio::test]
async fn a_role_at_its_maximum_is_refused_with_an_answer() {
    let key = ClusterKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let maxima: BTreeMap<String, u32> = [("crawler".to_string(), 1)].into();
    let (url, state) = factory_in(&key, dir.path(), "factory-1", maxima).await;
    let hc = ControlClient::new(Signer::new(key.clone(), "hc-1"));
    let first: FactoryReply = hc
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("grow:crawler:1"),
        )
        .await
        .expect("first");
    assert!(first.reply.started && first.refused.is_none());
    let second: FactoryReply = hc
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("grow:crawler:2"),
        )
        .await
        .expect("a refusal is an answer, not an error");
    assert!(!second.reply.started);
    assert_eq!(second.reply.cell_id, None);
    let why = second.refused.expect("refused");
    assert!(
        why.contains("crawler") && why.contains("maximum of 1"),
        "{why}"
    );
    assert_eq!(state.children().await.len(), 1);
    // The protocol's reply type reads the refusal too (the health checker's view).
    let plain: ReplaceReply = hc
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("grow:crawler:2"),
        )
        .await
        .expect("still an answer");
    assert!(!plain.started);
    // Room again: the same key is served.
    kill_children(&state).await;
    for _ in 0..200 {
        if state.children().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let third: FactoryReply = hc
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &request("grow:crawler:2"),
        )
        .await
        .expect("third");
    assert!(third.reply.started, "{third:?}");
    kill_children(&state).await;
}

/// An upgrade's start of a new cell is claimed in the shared ledger like any other start: while
/// it is under way a sibling factory counts it against the role's maximum (the upgrade's one
/// extra cell does not make room for a grow elsewhere), and once it failed it no longer counts.
#[tokio::test]
async fn an_upgrade_start_under_way_counts_against_a_siblings_maximum() {
    let key = ClusterKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let maxima: BTreeMap<String, u32> = [("crawler".to_string(), 2)].into();
    let (_, upgrading) = factory_in(&key, dir.path(), "factory-1", maxima.clone()).await;
    let (url, sibling) = factory_in(&key, dir.path(), "factory-2", maxima).await;
    let hc = ControlClient::new(Signer::new(key.clone(), "hc-1"));
    let ask = async |k: &str| -> FactoryReply {
        hc.send(&url, "/control/replace", ReplaceRequest::KIND, &request(k))
            .await
            .expect("an answer")
    };
    assert!(ask("grow:crawler:1").await.reply.started);

    let upgrade = ReplaceRequest {
        request_key: "upgrade:abc:crawler-old".into(),
        role: "crawler".into(),
        reason: "upgrade to abc".into(),
        parent: Some("crawler-old".into()),
    };
    assert!(upgrading.claim_upgrade_start(&upgrade, "crawler-new").await);
    // Claims are ordered by the millisecond they were made in, then by key: the grow must come
    // a millisecond later than the upgrade's claim to be the later of the two (in the same
    // millisecond "grow:..." sorts first and was let through).
    tokio::time::sleep(Duration::from_millis(2)).await;
    let refused = ask("grow:crawler:2").await;
    assert!(!refused.reply.started, "{refused:?}");
    let why = refused.refused.expect("refused");
    assert!(why.contains("1 live, 1 starting"), "{why}");

    // The new build never served: its claim is released and the room is there again.
    upgrading.end_upgrade_start(&upgrade, true, false).await;
    let served = ask("grow:crawler:2").await;
    assert!(served.reply.started, "{served:?}");
    kill_children(&sibling).await;
}

/// A frozen (SIGSTOPped) local cell that is being replaced is killed before its replacement
/// starts; a process whose command line names another cell is left alone.
#[tokio::test]
async fn a_replaced_frozen_cell_is_fenced() {
    let key = ClusterKey::generate();
    let (_dir, url, state) = factory(&key).await;
    let spawn = |cell: &str| {
        std::process::Command::new("sh")
            .args([
                "-c",
                "while :; do sleep 1; done",
                "run",
                "crawler",
                "--cell-id",
                cell,
            ])
            .spawn()
            .expect("spawn a victim")
    };
    let mut victim = spawn("crawler-frozen");
    let mut bystander = spawn("crawler-frozen-not");
    let pid = nix::unistd::Pid::from_raw(victim.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let hc = ControlClient::new(Signer::new(key.clone(), "hc-1"));
    let reply: ReplaceReply = hc
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &ReplaceRequest {
                parent: Some("crawler-frozen".into()),
                ..request("replace:crawler-frozen")
            },
        )
        .await
        .expect("replace");
    assert!(reply.started);
    // The victim was killed by SIGKILL (it was stopped: nothing else could end it).
    let status = victim.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "the bystander still runs"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    // A growth request with a parent (a dividing cell) fences nothing.
    let mut parent = spawn("crawler-parent");
    let grow: ReplaceReply = hc
        .send(
            &url,
            "/control/replace",
            ReplaceRequest::KIND,
            &ReplaceRequest {
                parent: Some("crawler-parent".into()),
                ..request("divide:crawler-parent:1")
            },
        )
        .await
        .expect("divide");
    assert!(grow.started);
    assert!(
        parent.try_wait().expect("try_wait").is_none(),
        "a dividing parent lives"
    );
    let _ = parent.kill();
    let _ = parent.wait();
    kill_children(&state).await;
}

/// A cell that does not announce itself within the ready timeout is killed, not left running.
#[tokio::test]
async fn a_cell_that_misses_its_ready_timeout_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("silent-cell");
    let pid_file = dir.path().join("pid");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
            pid_file.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let provider = LocalProvider {
        exe: script,
        common_args: Vec::new(),
        ready_timeout: Duration::from_millis(300),
        tie_to_parent: false,
        env: Vec::new(),
        release_file: None,
    };
    let err = provider
        .start(
            "silent",
            &factory::local::CellSpec {
                role: "crawler".into(),
                args: Vec::new(),
            },
        )
        .await
        .err()
        .expect("not ready in time");
    assert!(format!("{err:#}").contains("not ready within"), "{err:#}");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the script ran")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(
        factory::lease::start_time(pid),
        None,
        "the silent cell still runs"
    );
}
