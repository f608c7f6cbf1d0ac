//! A short profile against `cell up --demo`: the run produces a timeline and a report whose
//! plots exist and whose figures agree with the raw records (`requests.csv`).
//!
//! The test lives in the cell package, so cargo builds the `cell` executable it starts. The
//! organism is `cell up` killed on drop, started with `--die-with-parent`, and
//! every cell holds its lease: nothing outlives the test, even when it fails.

use std::path::PathBuf;
use std::time::Duration;

use loadtest::run::live::Mode;
use loadtest::run::open_model::RequestRecord;
use loadtest::run::profile::{Profile, Schedule};
use loadtest::run::{execute, up_demo, Endpoints, RunPlan};
use tokio_util::sync::CancellationToken;

/// `cell`, built by cargo with this test (it lives in the cell package for that).
fn cell_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cell"))
}

const INFRA: &str = r#"
[organism]
data_dir = "unused: the run sets its own"

[demo]
seed = 5
pages = 300
hosts = 6
"#;

const PROFILE: &str = r#"
name = "demo-short"
description = "a ramp to 20 searches/s and a hold, one crawler killed"

[search]
web_seed = 5
web_pages = 300
web_hosts = 6

[chaos]
action = "kill"
roles = ["crawler"]
every_secs = 10
start_secs = 2

[[phase]]
kind = "ramp"
from = 0
to = 20
secs = 2

[[phase]]
kind = "hold"
rate = 20
secs = 3
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_profile_against_the_demo_gives_a_timeline_and_a_report_that_agree() {
    let cell = cell_binary();
    let out = tempfile::tempdir().expect("tempdir");
    let infra = out.path().join("demo.toml");
    std::fs::write(&infra, INFRA).expect("write the configuration");
    let interrupt = CancellationToken::new();
    let up = up_demo(&cell, Some(&infra), out.path(), &interrupt)
        .await
        .expect("cell up --demo");
    let profile = Profile::parse(PROFILE, "the test's profile").expect("valid");
    let due = Schedule::new(&profile).count() as u64;
    let run = execute(
        RunPlan {
            profile,
            endpoints: Endpoints {
                frontdoors: up.frontdoors.clone(),
                healthcheckers: up.healthcheckers.clone(),
                factories: up.factories.clone(),
            },
            out: out.path().to_path_buf(),
            max_outstanding: 10_000,
            timeout: Duration::from_secs(10),
            chaos: true,
            requests_log: true,
            live: Mode::Lines,
        },
        interrupt,
    )
    .await;
    let stopped = up.stop().await;
    let timeline = run.expect("the run");
    stopped.expect("the organism stops");

    // The timeline as written is the timeline returned.
    let read = loadtest::run::timeline::Timeline::read(out.path()).expect("timeline.json");
    assert_eq!(read.seconds.len(), timeline.seconds.len());
    assert_eq!(read.summary.totals, timeline.summary.totals);
    assert_eq!(read.events, timeline.events);
    let t = &timeline;
    let csv = std::fs::read_to_string(out.path().join("timeline.csv")).expect("timeline.csv");
    assert_eq!(csv.lines().count(), t.seconds.len() + 1);
    assert!(csv.lines().next().expect("header").contains("cells_api"));

    // The raw records against the timeline and its summary.
    let text = std::fs::read_to_string(out.path().join("requests.csv")).expect("requests.csv");
    let records: Vec<RequestRecord> = text
        .lines()
        .skip(1)
        .map(|l| RequestRecord::parse_csv(l).expect("a record"))
        .collect();
    assert_eq!(records.len() as u64, due, "one record per request due");
    assert_eq!(t.summary.totals.offered, due);
    let ok = records.iter().filter(|r| r.is_ok()).count() as u64;
    assert_eq!(t.summary.totals.ok, ok);
    assert!(ok > 0, "no search succeeded: {:?}", t.summary.totals);
    let failed = records.len() as u64 - ok;
    assert_eq!(t.summary.totals.errors.values().sum::<u64>(), failed);
    for row in &t.seconds {
        let in_second = |r: &&RequestRecord| r.done_us / 1_000_000 == row.t;
        assert_eq!(
            records
                .iter()
                .filter(|r| r.is_ok())
                .filter(in_second)
                .count() as u64,
            row.load.ok,
            "answers in second {}",
            row.t
        );
        assert_eq!(
            records
                .iter()
                .filter(|r| r.intended_us / 1_000_000 == row.t)
                .count() as u64,
            row.load.offered,
            "requests due in second {}",
            row.t
        );
        let raw_max = records
            .iter()
            .filter(|r| r.is_ok())
            .filter(in_second)
            .map(|r| (r.done_us - r.intended_us) as f64 / 1000.0)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        match (raw_max, row.load.max_ms) {
            (None, None) => {}
            (Some(raw), Some(kept)) => {
                assert!((raw - kept).abs() <= raw * 0.001 + 0.01, "{raw} vs {kept}")
            }
            other => panic!("second {}: {other:?}", row.t),
        }
    }
    // The organism, as the registry showed it: the demo's minimums.
    let seen = t
        .seconds
        .iter()
        .filter_map(|r| r.organism.as_ref())
        .filter(|o| o.registry)
        .count();
    assert!(seen >= 3, "the registry answered in {seen} seconds");
    for role in ["api", "crawler", "frontdoor", "healthchecker"] {
        let peak = t.summary.peak_cells.get(role).copied().unwrap_or(0);
        assert!(peak >= 2, "{role}: peak {peak} cells");
    }
    assert_eq!(t.summary.cap_per_hour_micros, None, "the demo has no pool");
    // Chaos killed a crawler, and said so.
    let chaos: Vec<_> = t.events.iter().filter(|e| e.kind == "chaos_kill").collect();
    assert_eq!(chaos.len(), 1, "{:?}", t.events);
    assert!(chaos[0].cell_id.starts_with("crawler"), "{:?}", chaos[0]);

    // The report: plots that exist, and figures that are the summary's.
    let files = loadtest::report::render(t, out.path()).expect("the report");
    let png = std::fs::read(&files.png).expect("png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    let svg = std::fs::read_to_string(&files.svg).expect("svg");
    assert!(svg.contains("<svg") && svg.contains("cells per role"));
    let html = std::fs::read_to_string(&files.html).expect("html");
    assert!(html.contains("<svg"), "the report carries its plot inline");
    let figure = |key: &str| loadtest::report::figure(&html, key).unwrap_or_default();
    assert_eq!(figure("offered"), due.to_string());
    assert_eq!(figure("ok"), ok.to_string());
    assert_eq!(figure("errors"), failed.to_string());
    let max = t.summary.latency_ms.max.expect("a latency");
    assert_eq!(figure("latency_max"), format!("{max:.3}"));
    let raw_max = records
        .iter()
        .filter(|r| r.is_ok())
        .map(|r| (r.done_us - r.intended_us) as f64 / 1000.0)
        .fold(0.0, f64::max);
    assert!(
        (raw_max - max).abs() <= raw_max * 0.001 + 0.01,
        "{raw_max} vs {max}"
    );
}
