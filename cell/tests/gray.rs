//! Gray failures through the real `cell up`: one cell of each role in turn is frozen (SIGSTOP)
//! for ten seconds under search load, then thawed. A frozen process still completes TCP
//! handshakes in the kernel, so this is also the cell that "answers TCP but never HTTP".
//!
//! Must hold for every role: no false death of any other cell (no `dead` event in any health
//! checker's stream for a cell that was not frozen), the organism's size afterwards equals its
//! size before (the frozen cell, if it was buried and replaced, learns it was fenced and stops),
//! and no failed client request (a client with two front doors uses the other when one does not
//! answer).

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::control::{CellEvent, CellState, CellsResponse, EventKind};
use protocol::events::{interpret, SseParser, StreamItem};
use support::{serve_web, Organism};
use synthweb::WebSpec;
use tokio_util::sync::CancellationToken;

const EXTRA: &str = r#"
[roles.api]
min = 2
max = 4
"#;

const FREEZE: Duration = Duration::from_secs(10);

/// Every `dead` event any health checker streams, reconnecting (with Last-Event-ID) when a
/// checker is frozen or replaced.
fn watch_deaths(hc: String, sink: Arc<Mutex<Vec<CellEvent>>>, stop: CancellationToken) {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut last_id: Option<String> = None;
        while !stop.is_cancelled() {
            let mut req = client.get(format!("{hc}/events?since=0"));
            if let Some(id) = &last_id {
                req = client
                    .get(format!("{hc}/events"))
                    .header("last-event-id", id.clone());
            }
            let resp = tokio::select! {
                r = req.send() => r,
                () = stop.cancelled() => return,
            };
            if let Ok(mut resp) = resp {
                let mut parser = SseParser::new();
                loop {
                    let chunk = tokio::select! {
                        c = resp.chunk() => c,
                        () = stop.cancelled() => return,
                    };
                    let Ok(Some(chunk)) = chunk else { break };
                    for msg in parser.feed(&chunk) {
                        if msg.id.is_some() {
                            last_id.clone_from(&msg.id);
                        }
                        if let StreamItem::Cell(e) = interpret(&msg) {
                            if e.kind == EventKind::Dead {
                                sink.lock().expect("lock").push(e);
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Searches through the front doors until stopped; a request that one front door does not
/// answer within two seconds goes to the other (as a client with two entry points does).
fn search_load(
    fronts: Vec<String>,
    word: String,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let mut preferred = 0;
        while !stop.load(Ordering::SeqCst) {
            let mut done = false;
            let mut why = Vec::new();
            for i in 0..fronts.len() {
                let front = &fronts[(preferred + i) % fronts.len()];
                match client
                    .get(format!("{front}/search"))
                    .query(&[("q", word.as_str())])
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        preferred = (preferred + i) % fronts.len();
                        done = true;
                        break;
                    }
                    Ok(r) => why.push(format!("{front}: {}", r.status())),
                    Err(e) => why.push(format!("{front}: {e}")),
                }
            }
            if done {
                ok.fetch_add(1, Ordering::SeqCst);
            } else {
                failed.fetch_add(1, Ordering::SeqCst);
                errors.lock().expect("lock").push(why.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn registry(org: &Organism) -> Option<CellsResponse> {
    for hc in &org.healthcheckers {
        let Ok(resp) = org
            .client
            .get(format!("{hc}/cells"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
        else {
            continue;
        };
        if let Ok(cells) = resp.json::<CellsResponse>().await {
            return Some(cells);
        }
    }
    None
}

/// Cells per role that count (live, not draining).
fn size(cells: &CellsResponse) -> BTreeMap<String, usize> {
    cells
        .roles
        .iter()
        .map(|(role, v)| {
            (
                role.clone(),
                v.iter()
                    .filter(|c| !matches!(c.state, CellState::Draining | CellState::Retired))
                    .count(),
            )
        })
        .collect()
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    // The cell may be gone already (a factory fenced it by power-off): that is fine.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_cell_of_any_role_causes_no_false_death_and_the_organism_returns_to_size() {
    let spec = WebSpec {
        seed: 43,
        pages: 200,
        hosts: 4,
        latency: Duration::ZERO,
    };
    let (web, org) = support::crawled(spec, EXTRA).await;
    let (word, _) = web.web.rare_words(1).into_iter().next().expect("word");

    let deaths = Arc::new(Mutex::new(Vec::new()));
    let watching = CancellationToken::new();
    for hc in &org.healthcheckers {
        watch_deaths(hc.clone(), deaths.clone(), watching.clone());
    }
    let before = size(&registry(&org).await.expect("a registry"));
    let mut table = Vec::new();
    let mut problems = Vec::new();

    for role in ["crawler", "api", "frontdoor", "healthchecker", "factory"] {
        let cells = registry(&org).await.expect("a registry");
        let Some(victim) = cells
            .roles
            .get(role)
            .and_then(|v| v.iter().rev().find(|c| c.pid.is_some()))
            .cloned()
        else {
            problems.push(format!("no {role} cell to freeze in {cells:?}"));
            continue;
        };
        let pid = victim.pid.expect("pid");
        deaths.lock().expect("lock").clear();
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let loads: Vec<_> = (0..2)
            .map(|_| {
                search_load(
                    org.frontdoors.clone(),
                    word.clone(),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    errors.clone(),
                )
            })
            .collect();

        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(FREEZE).await;
        signal(pid, nix::sys::signal::Signal::SIGCONT);

        // Back to the size it had, with the frozen cell either back (never buried) or gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
        let after = loop {
            if let Some(cells) = registry(&org).await {
                let now = size(&cells);
                let draining = cells
                    .roles
                    .values()
                    .flatten()
                    .any(|c| matches!(c.state, CellState::Draining));
                if now == before && !draining {
                    break now;
                }
                if tokio::time::Instant::now() > deadline {
                    break now;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Keep the load through the settling, then stop it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        for l in loads {
            l.await.expect("load task");
        }
        let false_deaths: Vec<CellEvent> = deaths
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.cell_id != victim.cell_id)
            .cloned()
            .collect();
        let failed = failed.load(Ordering::SeqCst);
        table.push(format!(
            "{role:<14} false deaths {:>2}  size before {:?} after {:?}  requests ok {} failed {}",
            false_deaths.len(),
            before,
            after,
            ok.load(Ordering::SeqCst),
            failed
        ));
        if !false_deaths.is_empty() {
            problems.push(format!("{role} frozen: false deaths {false_deaths:#?}"));
        }
        if after != before {
            problems.push(format!(
                "{role} frozen: size {after:?} afterwards, {before:?} before"
            ));
        }
        if failed > 0 {
            problems.push(format!(
                "{role} frozen: {failed} failed requests: {:?}",
                errors.lock().expect("lock")
            ));
        }
    }
    watching.cancel();
    eprintln!("gray failures (SIGSTOP {} s):", FREEZE.as_secs());
    for line in &table {
        eprintln!("  {line}");
    }
    assert!(problems.is_empty(), "{problems:#?}");
    org.stop().await;
}

/// After a storm (here: one crawler too many, as a replacement for a cell that came back would
/// leave), the leader health checker retires the surplus, youngest first, without a death and
/// without a failed request, and the role stays at its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surplus_cell_is_retired_youngest_first() {
    let web = serve_web(WebSpec {
        seed: 44,
        pages: 50,
        hosts: 2,
        latency: Duration::ZERO,
    })
    .await;
    // The test organisms run with the support's cluster key: the test signs with it too.
    let key = support::test_key();
    let org = Organism::on(&web, 200.0, EXTRA).await;
    let deaths = Arc::new(Mutex::new(Vec::new()));
    let watching = CancellationToken::new();
    for hc in &org.healthcheckers {
        watch_deaths(hc.clone(), deaths.clone(), watching.clone());
    }
    let cells = registry(&org).await.expect("a registry");
    let crawlers = cells.roles.get("crawler").map_or(0, Vec::len);
    let factory = cells
        .roles
        .get("factory")
        .and_then(|v| v.first())
        .expect("a factory in the registry")
        .addr
        .clone();
    // One crawler more than the minimum and the (idle) load need.
    let me = control::ControlClient::new(control::Signer::new(key, "test"));
    let reply: protocol::control::ReplaceReply = me
        .send(
            &factory,
            "/control/replace",
            protocol::control::ReplaceRequest::KIND,
            &protocol::control::ReplaceRequest {
                request_key: "test:one-crawler-too-many".into(),
                role: "crawler".into(),
                reason: "the test wants a surplus".into(),
                parent: None,
            },
        )
        .await
        .expect("the factory starts a crawler");
    let extra = reply.cell_id.expect("the factory names its cell");
    // It joins, then is retired: the role returns to its size, the extra cell gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen_extra = false;
    loop {
        if let Some(cells) = registry(&org).await {
            let now: Vec<_> = cells.roles.get("crawler").cloned().unwrap_or_default();
            seen_extra |= now.iter().any(|c| c.cell_id == extra);
            if seen_extra && now.len() == crawlers && now.iter().all(|c| c.cell_id != extra) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the surplus crawler {extra} was not retired within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watching.cancel();
    assert!(
        deaths.lock().expect("lock").is_empty(),
        "a retirement is not a death: {:?}",
        deaths.lock().expect("lock")
    );
    org.stop().await;
}
