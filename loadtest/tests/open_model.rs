//! The open model against a deliberately slow target: an axum server on loopback that answers
//! one search at a time, 50 ms each (a queue forms as soon as more than 20 searches a second
//! arrive). The load must keep sending at the profile's rate whatever the answers take, and the
//! recorded latency must include the time each request waited in the target's queue.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use loadtest::run::live::Mode;
use loadtest::run::open_model::{RequestRecord, OVER_BOUND};
use loadtest::run::profile::{Profile, Schedule};
use loadtest::run::{execute, Endpoints, RunPlan};
use tokio_util::sync::CancellationToken;

const SERVICE: Duration = Duration::from_millis(50);

/// A target that serves one request at a time, each taking [`SERVICE`].
async fn slow_target() -> (String, tokio::task::JoinHandle<()>) {
    let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
    let app = Router::new().route(
        "/search",
        get(move || {
            let lock = one_at_a_time.clone();
            async move {
                let _serving = lock.lock().await;
                tokio::time::sleep(SERVICE).await;
                axum::Json(serde_json::json!({"v": 1, "hits": [], "total": 0, "took_ms": 50}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (format!("http://{addr}"), server)
}

fn profile(rate: f64, secs: f64) -> Profile {
    Profile::parse(
        &format!(
            "name = \"slow\"\n[search]\nweb_pages = 60\nweb_hosts = 3\n\
             [[phase]]\nkind = \"hold\"\nrate = {rate}\nsecs = {secs}\n"
        ),
        "the test's profile",
    )
    .expect("valid profile")
}

fn read_requests(dir: &std::path::Path) -> Vec<RequestRecord> {
    let text = std::fs::read_to_string(dir.join("requests.csv")).expect("requests.csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(RequestRecord::csv_header()));
    lines
        .map(|l| RequestRecord::parse_csv(l).unwrap_or_else(|| panic!("bad line {l:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offered_rate_holds_and_latency_includes_the_queue() {
    let (url, server) = slow_target().await;
    let out = tempfile::tempdir().expect("tempdir");
    // 40 a second for 2 s against a target that serves 20 a second: 80 requests, 4 s of
    // service at the least.
    let profile = profile(40.0, 2.0);
    let due = Schedule::new(&profile).count();
    assert_eq!(due, 80);
    let timeline = execute(
        RunPlan {
            profile,
            endpoints: Endpoints {
                frontdoors: vec![url],
                ..Endpoints::default()
            },
            out: out.path().to_path_buf(),
            max_outstanding: 10_000,
            timeout: Duration::from_secs(20),
            chaos: false,
            requests_log: true,
            live: Mode::Quiet,
        },
        CancellationToken::new(),
    )
    .await
    .expect("the run");
    server.abort();

    let records = read_requests(out.path());
    assert_eq!(records.len(), 80, "every request due is recorded once");
    assert!(records.iter().all(RequestRecord::is_ok), "{records:?}");
    // Offered and sent per second: the profile's 40, not the target's 20.
    let t = &timeline;
    assert_eq!(t.summary.totals.offered, 80);
    assert_eq!(t.summary.totals.sent, 80);
    assert_eq!(
        (t.seconds[0].load.offered, t.seconds[1].load.offered),
        (40, 40)
    );
    assert_eq!((t.seconds[0].load.sent, t.seconds[1].load.sent), (40, 40));
    // Each request left at its intended time, not after the previous answer: a closed-loop
    // client would have sent the last one about 4 s late.
    let lags: Vec<u64> = records
        .iter()
        .map(|r| r.sent_us.expect("sent") - r.intended_us)
        .collect();
    let worst_lag = *lags.iter().max().expect("lags");
    assert!(worst_lag < 1_000_000, "a send was {worst_lag} µs late");
    // Serving one at a time, the 80 answers end no earlier than 4 s after the first began;
    // the last request was due at 1.975 s: its latency from the intended send is at least
    // 2.025 s, whatever the machine's speed. The service time alone (from the actual send)
    // is the same here, since nothing was sent late; both include the queue.
    let last_done = records.iter().map(|r| r.done_us).max().expect("done");
    assert!(last_done >= 4_000_000, "answers ended at {last_done} µs");
    let max_ms = t.summary.latency_ms.max.expect("a latency");
    assert!(
        max_ms >= 2_000.0,
        "max latency {max_ms} ms leaves out the queue"
    );
    let raw_max = records
        .iter()
        .map(|r| r.done_us - r.intended_us)
        .max()
        .expect("latencies") as f64
        / 1000.0;
    // HDR histograms keep 3 significant figures.
    assert!(
        (max_ms - raw_max).abs() <= raw_max * 0.001 + 0.01,
        "{max_ms} vs {raw_max}"
    );
    // The rows add up to the totals; answers completing after the profile's end are kept.
    let ok: u64 = t.seconds.iter().map(|r| r.load.ok).sum();
    assert_eq!(ok, 80);
    assert!(t.seconds.len() >= 4, "{} rows", t.seconds.len());

    // And the report draws without an organism.
    let files = loadtest::report::render(t, out.path()).expect("the report");
    for f in [&files.png, &files.svg, &files.html] {
        assert!(
            std::fs::metadata(f).expect("file").len() > 1000,
            "{}",
            f.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_outstanding_bound_are_counted_not_sent() {
    let (url, server) = slow_target().await;
    let out = tempfile::tempdir().expect("tempdir");
    let timeline = execute(
        RunPlan {
            profile: profile(40.0, 1.0),
            endpoints: Endpoints {
                frontdoors: vec![url],
                ..Endpoints::default()
            },
            out: out.path().to_path_buf(),
            max_outstanding: 5,
            timeout: Duration::from_secs(20),
            chaos: false,
            requests_log: true,
            live: Mode::Quiet,
        },
        CancellationToken::new(),
    )
    .await
    .expect("the run");
    server.abort();
    let totals = &timeline.summary.totals;
    assert_eq!(totals.offered, 40, "the schedule is kept");
    let skipped = totals.errors.get(OVER_BOUND).copied().unwrap_or(0);
    // 40 due within a second, at most 5 outstanding, about 20 answered in that second: about
    // 15 skipped (how many depends on when the sender ran; that some were is certain).
    assert!(skipped >= 1, "{totals:?}");
    assert_eq!(totals.sent + skipped, 40);
    assert_eq!(totals.ok, totals.sent);
    let records = read_requests(out.path());
    assert_eq!(
        records.iter().filter(|r| r.outcome == OVER_BOUND).count() as u64,
        skipped
    );
    assert!(records
        .iter()
        .filter(|r| r.outcome == OVER_BOUND)
        .all(|r| r.sent_us.is_none()));
}
