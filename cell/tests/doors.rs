//! No open internal door, end to end on the real `cell` binary: results forged into the index
//! through a front door (every path trick), sent unsigned or with a foreign key straight to an
//! api, misdirected to another api, or replayed after the api restarted, are all refused, and
//! nothing of them is stored: the index ends exactly the oracle's set.

mod support;

use std::time::Duration;

use control::{Signer, SIGNATURE_HEADER};
use protocol::{CrawlResult, FetchedPage, IngestBatch, Outcome, WIRE_VERSION};
use support::{assert_exact, serve_web, test_key, Organism};
use synthweb::WebSpec;
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Child;

/// A word no page of the synthetic web holds: found in the index only if a forgery got in.
const FORGED_WORD: &str = "zyxforgedquokka";

fn forged_batch(url: &str, word: &str) -> IngestBatch {
    IngestBatch {
        v: WIRE_VERSION,
        results: vec![CrawlResult {
            url: url.into(),
            depth: 0,
            outcome: Outcome::Page(FetchedPage {
                final_url: url.into(),
                status: 200,
                title: format!("{word} title"),
                text: format!("buy {word} now"),
                indexable: true,
                canonical: None,
                links: vec!["http://attacker.invalid/".into()],
            }),
        }],
    }
}

/// `method target` over a raw socket, the target byte for byte (an HTTP client would resolve
/// dot segments first). Returns the status and the body.
async fn raw(base: &str, method: &str, target: &str, headers: &str, body: &[u8]) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

const TRICKS: &[&str] = &[
    "/internal/ingest",
    "/crawl/../internal/ingest",
    "/crawl/%2e%2e/internal/ingest",
    "/crawl/%2E%2E/internal/ingest",
    "/crawl/.%2e/internal/ingest",
    "/crawl/%2e./internal/ingest",
    "/crawl/..%2finternal/ingest",
    "/crawl/..%2Finternal%2Fingest",
    "/crawl/%2e%2e%2finternal%2fingest",
    "/crawl/..%5cinternal%5cingest",
    "/crawl/..\\internal\\ingest",
    "/crawl\\..\\internal\\ingest",
    "/crawl//../internal/ingest",
    "//internal/ingest",
    "///internal//ingest",
    "/crawl/./../internal/./ingest",
    "/crawl/x/../../internal/ingest",
    "/search/../../../internal/ingest",
    "/crawl/%252e%252e/internal/ingest",
    "/crawl/%00/../../internal/ingest",
    "/crawl/%c0%ae%c0%ae/internal/ingest",
    "/crawl;/../internal/ingest",
    "/%69nternal/ingest",
    "/%69nternal%2fingest",
    "/internal/ingest/",
    "/internal/ingest?x=/crawl",
    "/crawl/../control/weight",
    "http://127.0.0.1/internal/ingest",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_results_never_reach_the_index() {
    let web = serve_web(WebSpec {
        seed: 7,
        pages: 300,
        hosts: 6,
        latency: Duration::from_millis(5),
    })
    .await;
    let org = Organism::on(&web, 50.0, "").await;
    let seeds = web.web.seeds();
    org.crawl(&seeds).await;
    // Forgeries for URLs in flight: the seeds are in the frontier now.
    let victim = &seeds[0];
    let forged = serde_json::to_vec(&forged_batch(victim, FORGED_WORD)).expect("json");
    let mut report = Vec::new();

    // 1. Through every front door, every path trick: refused at the door.
    for door in &org.frontdoors {
        for target in TRICKS {
            let (status, body) = raw(door, "POST", target, "", &forged).await;
            assert!(
                status == 404 || status == 400,
                "front door {door} forwarded POST {target}: {status} {body}"
            );
            if door == &org.frontdoors[0] {
                report.push(format!("front door  POST {target:<40} -> {status}"));
            }
        }
    }

    // 2. Straight to an api cell: unsigned, a foreign key, tampered, misdirected.
    let apis = org.cells_of("api").await;
    let api = apis.first().expect("an api cell").addr.clone();
    let signer = Signer::new(test_key(), "crawler-forger");
    let intruder = Signer::new(control::ClusterKey::generate(), "crawler-1");
    let batch = forged_batch(victim, FORGED_WORD);
    let mut tampered = signer.seal_to(IngestBatch::KIND, &api, &forged_batch(victim, "innocent"));
    tampered.bytes = String::from_utf8(tampered.bytes)
        .expect("utf-8")
        .replace("innocent", FORGED_WORD)
        .into_bytes();
    let foreign = intruder.seal_to(IngestBatch::KIND, &api, &batch);
    let elsewhere = signer.seal_to(IngestBatch::KIND, "http://127.0.0.1:1", &batch);
    let sig = |s: &str| format!("{SIGNATURE_HEADER}: {s}\r\n");
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("unsigned", String::new(), forged.clone(), 401),
        ("garbage signature", sig("00ff"), forged.clone(), 401),
        (
            "another key",
            sig(&foreign.signature),
            foreign.bytes.clone(),
            401,
        ),
        (
            "tampered after signing",
            sig(&tampered.signature),
            tampered.bytes.clone(),
            401,
        ),
        (
            "addressed to another cell",
            sig(&elsewhere.signature),
            elsewhere.bytes.clone(),
            421,
        ),
    ];
    for (what, headers, body, want) in cases {
        let (status, answer) = raw(&api, "POST", "/internal/ingest", &headers, &body).await;
        assert_eq!(status, want, "{what}: {answer}");
        report.push(format!("api direct  {what:<40} -> {status}"));
    }

    // The crawl finishes; the index is exactly the oracle's, with no forged word in it.
    org.wait_drained(Duration::from_secs(180), |_| {}).await;
    let found = org.search(FORGED_WORD, 10).await;
    assert_eq!(found.total, 0, "a forgery was indexed: {:?}", found.hits);
    let expected = web.web.expect(&seeds, None);
    assert_exact(&web.web, &org.indexed().await, &expected);
    let metrics = org
        .client
        .get(format!("{api}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for reason in ["unsigned", "forged", "misdirected"] {
        assert!(
            metrics.contains(&format!("api_ingest_rejected_total{{reason=\"{reason}\"}}")),
            "refusals counted by reason ({reason}):\n{metrics}"
        );
    }
    eprintln!("attacks and answers:\n{}", report.join("\n"));
    org.stop().await;
}

/// One api cell run by hand on a fixed address, so that it can restart there.
async fn start_api(infra: &std::path::Path, listen: &str) -> Child {
    let mut child = support::cell_command()
        .args(["run", "api", "--infra"])
        .arg(infra)
        .args(["--listen", listen])
        .spawn()
        .expect("start cell run api");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with(vitals::ReadyLine::PREFIX) {
                return;
            }
        }
        panic!("the api exited before it was ready");
    })
    .await
    .expect("the api is ready within 60 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_ingest_replayed_after_the_api_restarts_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let infra = dir.path().join("organism.toml");
    std::fs::write(
        &infra,
        format!(
            "[organism]\ndata_dir = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write infra");
    let port = factory::ports::fixed_tcp([127, 0, 0, 1].into())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let api = format!("http://{listen}");
    let client = reqwest::Client::new();
    let mut first = start_api(&infra, &listen).await;

    let resp = client
        .post(format!("{api}/crawl"))
        .json(&serde_json::json!({ "seeds": ["http://replay.test/a", "http://replay.test/b"] }))
        .send()
        .await
        .expect("crawl");
    assert_eq!(resp.status(), 202);

    // A crawler's signed results: one delivered to this incarnation, one captured on the way.
    let crawler = Signer::new(test_key(), "crawler-1");
    let delivered = crawler.seal_to(
        IngestBatch::KIND,
        &api,
        &forged_batch("http://replay.test/a", "zyxdelivered"),
    );
    let captured = crawler.seal_to(
        IngestBatch::KIND,
        &api,
        &forged_batch("http://replay.test/b", FORGED_WORD),
    );
    let sig = |s: &str| format!("{SIGNATURE_HEADER}: {s}\r\n");
    let (status, body) = raw(
        &api,
        "POST",
        "/internal/ingest",
        &sig(&delivered.signature),
        &delivered.bytes,
    )
    .await;
    assert_eq!(status, 200, "a signed batch from a cell is stored: {body}");
    let (status, _) = raw(
        &api,
        "POST",
        "/internal/ingest",
        &sig(&delivered.signature),
        &delivered.bytes,
    )
    .await;
    assert_eq!(status, 409, "replayed to the same incarnation");

    // The api restarts on the same address; it has forgotten every nonce it saw.
    support::sigkill(first.id().expect("pid"));
    let _ = first.wait().await;
    tokio::time::sleep(control::START_ALLOWANCE + Duration::from_millis(100)).await;
    let mut second = start_api(&infra, &listen).await;
    for (what, sealed) in [
        ("delivered before", &delivered),
        ("captured before", &captured),
    ] {
        let (status, body) = raw(
            &api,
            "POST",
            "/internal/ingest",
            &sig(&sealed.signature),
            &sealed.bytes,
        )
        .await;
        assert_eq!(status, 401, "{what} the restart, replayed after: {body}");
        assert!(body.contains("before this cell started"), "{body}");
        eprintln!("api restarted  replay of a batch {what} the restart -> {status}");
    }
    // Nothing of the captured batch was stored; a fresh one from a cell still is.
    let search = |q: &'static str| {
        let client = client.clone();
        let api = api.clone();
        async move {
            client
                .get(format!("{api}/search"))
                .query(&[("q", q)])
                .send()
                .await
                .expect("search")
                .json::<protocol::SearchResponse>()
                .await
                .expect("json")
        }
    };
    assert_eq!(search(FORGED_WORD).await.total, 0);
    let stats: protocol::Stats = client
        .get(format!("{api}/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(
        stats.pages_indexed, 1,
        "only the batch delivered before the restart"
    );
    let fresh = crawler.seal_to(
        IngestBatch::KIND,
        &api,
        &forged_batch("http://replay.test/b", "zyxfresh"),
    );
    let (status, body) = raw(
        &api,
        "POST",
        "/internal/ingest",
        &sig(&fresh.signature),
        &fresh.bytes,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(search("zyxfresh").await.total, 1);
    let metrics = client
        .get(format!("{api}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("api_ingest_rejected_total{reason=\"before_start\"} 2"),
        "{metrics}"
    );
    support::sigkill(second.id().expect("pid"));
    let _ = second.wait().await;
}
