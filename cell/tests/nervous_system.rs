//! The nervous system assembled from real processes: a factory started by hand is asked for two
//! health checkers; they grow the organism to its minimums through the factory (api, crawlers,
//! front doors); a search goes through a front door; a killed crawler is declared dead and
//! replaced.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use control::{ClusterKey, ControlClient, Signer};
use protocol::control::{CellsResponse, ReplaceReply, ReplaceRequest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn free_addr() -> String {
    // Outside the ephemeral range: the cell binds it later (see `factory::ports`).
    factory::ports::fixed_tcp([127, 0, 0, 1].into())
        .expect("a free port")
        .to_string()
}

async fn cells(hc: &str) -> Option<CellsResponse> {
    reqwest::get(format!("{hc}/cells"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

fn count(c: &CellsResponse) -> BTreeMap<String, usize> {
    c.roles.iter().map(|(r, v)| (r.clone(), v.len())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checkers_grow_the_organism_and_replace_the_dead() {
    let web = support::serve_web(synthweb::WebSpec {
        seed: 31,
        pages: 300,
        hosts: 5,
        latency: Duration::ZERO,
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let infra = support::infra_toml(dir.path(), &web, 200.0, "");
    let infra_path = dir.path().join("organism.toml");
    std::fs::write(&infra_path, infra).expect("write infra");
    let key = ClusterKey::generate();
    let (h1, h2, d1, d2) = (free_addr(), free_addr(), free_addr(), free_addr());
    let factory_addr = free_addr();
    let mut factory = Command::new(env!("CARGO_BIN_EXE_cell"))
        .args(["run", "factory", "--infra"])
        .arg(&infra_path)
        .args(["--listen", &factory_addr, "--cell-id", "factory-1"])
        .args(["--fixed", &format!("healthchecker={h1},{h2}")])
        .args(["--fixed", &format!("frontdoor={d1},{d2}")])
        .args(["--healthchecker", &format!("http://{h1}")])
        .args(["--healthchecker", &format!("http://{h2}")])
        .env("HOMEOSTAT_CLUSTER_KEY", key.to_hex())
        .env("HOMEOSTAT_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the factory");
    let mut lines = BufReader::new(factory.stdout.take().expect("stdout")).lines();
    while let Some(line) = lines.next_line().await.expect("read") {
        if line.starts_with("HOMEOSTAT_READY") {
            break;
        }
    }
    let up = ControlClient::new(Signer::new(key.clone(), "test"));
    let factory_url = format!("http://{factory_addr}");
    for i in 1..=2 {
        let reply: ReplaceReply = up
            .send(
                &factory_url,
                "/control/replace",
                ReplaceRequest::KIND,
                &ReplaceRequest {
                    request_key: format!("grow:healthchecker:{i}"),
                    role: "healthchecker".into(),
                    reason: "organism start".into(),
                    parent: None,
                },
            )
            .await
            .expect("factory starts a health checker");
        assert!(reply.started);
    }
    let hc = format!("http://{h1}");
    let want: BTreeMap<String, usize> = [
        ("api", 2),
        ("crawler", 2),
        ("frontdoor", 2),
        ("healthchecker", 2),
    ]
    .into_iter()
    .map(|(r, n)| (r.to_string(), n))
    .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last = None;
    let view = loop {
        if let Some(c) = cells(&hc).await {
            let have = count(&c);
            if want
                .iter()
                .all(|(r, n)| have.get(r).copied().unwrap_or(0) >= *n)
            {
                break c;
            }
            last = Some(have);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the organism did not grow to its minimums: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Exactly the minimums, not twice them: two health checkers asked with the same keys.
    let have = count(&view);
    for (role, n) in &want {
        assert_eq!(have.get(role), Some(n), "{role}: {have:?}");
    }

    // Crawl and search through a front door.
    let front = format!("http://{d1}");
    let client = reqwest::Client::new();
    let seeds = web.web.seeds();
    // The front door learns the api from the registry within a poll or two.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = client
            .post(format!("{front}/crawl"))
            .json(&serde_json::json!({ "seeds": seeds }))
            .send()
            .await
            .expect("crawl through the front door");
        if resp.status() == 202 {
            break;
        }
        assert_eq!(resp.status(), 503, "only 'no api live yet' may come first");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the front door never routed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Kill a crawler: it is declared dead and replaced by a new cell.
    let victim = view.roles["crawler"][0].clone();
    support::sigkill(victim.pid.expect("pid in the registry"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = cells(&hc).await {
            let crawlers = c.roles.get("crawler").cloned().unwrap_or_default();
            if crawlers.len() == 2 && crawlers.iter().all(|x| x.cell_id != victim.cell_id) {
                assert!(
                    crawlers.iter().any(|x| x.parent.as_deref().is_some()),
                    "the replacement names its parent: {crawlers:?}"
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead crawler was not replaced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The crawl still ends exact, and search answers through the other front door.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let stats: Option<protocol::Stats> = match client.get(format!("{front}/stats")).send().await
        {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        if stats.is_some_and(|s| s.frontier.drained() && s.frontier.crawled > 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the crawl did not drain"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let path = dir.path().join("data").join("store.db");
    let store = engines::sqlite::SqliteStore::open(path.to_str().expect("utf-8"))
        .await
        .expect("store");
    let indexed: std::collections::BTreeSet<String> = engines::Store::indexed_urls(&store)
        .await
        .expect("indexed")
        .into_iter()
        .collect();
    support::assert_exact(&web.web, &indexed, &web.web.expect(&seeds, None));
    let (word, _) = web
        .web
        .rare_words(1)
        .into_iter()
        .next()
        .expect("a rare word");
    let search = client
        .get(format!("http://{d2}/search"))
        .query(&[("q", word.as_str())])
        .send()
        .await
        .expect("search through the second front door");
    assert_eq!(search.status(), 200);

    // Stopping the factory stops every cell it started.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(factory.id().expect("pid") as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = tokio::time::timeout(Duration::from_secs(40), factory.wait())
        .await
        .expect("factory stops")
        .expect("wait");
    assert!(status.success(), "{status}");
}
