//! The pieces of `loadtest bench crawl`. The whole benchmark needs the `cell` binary, which
//! belongs to another package (no `CARGO_BIN_EXE_cell` here), so it is run by hand:
//! `cargo build --release -p cell -p loadtest && ./target/release/loadtest bench crawl --quick`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Parser;
use loadtest::bench::engines_per_run::{effective, Engine, StoreAt};
use loadtest::bench::overlay::{apply_to_text, get_str, merge, BenchOverlay, WEB_NETWORK};
use loadtest::bench::procfs::{parse_cpu_ticks, parse_rss_anon, parse_vm_hwm, peak_rss, rss_anon};
use loadtest::bench::report::{
    per_second, ratios, render_ratios, render_table, CellUsage, Completeness, Row, EMBEDDED,
};
use loadtest::bench::{locate_cell, BenchCommand, CrawlArgs};
use loadtest::organism::registry_cells;

fn overlay() -> BenchOverlay {
    BenchOverlay {
        data_dir: PathBuf::from("/tmp/bench-run/data"),
        web_suffix: ".test".into(),
        web_addr: "127.0.0.1:40123".parse().expect("addr"),
        per_host_rate: 1000.0,
        per_host_concurrency: 16,
        worker_concurrency: 128,
        crawlers: None,
        queue_name: None,
        sqlite_database: false,
        sqlite_queue: false,
    }
}

#[test]
fn merge_is_deep_for_tables_and_replaces_everything_else() {
    let mut base: toml::Table = r#"
top = 1
list = [1, 2]
[a]
keep = "yes"
change = "old"
[a.b]
deep = true
"#
    .parse()
    .expect("toml");
    let over: toml::Table = r#"
list = [3]
[a]
change = "new"
[a.b]
added = 5
[c]
x = 1
"#
    .parse()
    .expect("toml");
    merge(&mut base, over);
    let expected: toml::Table = r#"
top = 1
list = [3]
[a]
keep = "yes"
change = "new"
[a.b]
deep = true
added = 5
[c]
x = 1
"#
    .parse()
    .expect("toml");
    assert_eq!(base, expected);
}

#[test]
fn the_overlay_keeps_the_base_and_sets_the_bench_keys() {
    let base = r#"
[organism]
name = "cluster"
data_dir = "/var/lib/homeostat"

[roles.crawler]
min = 3
max = 4

[engines]
database = "postgres://postgres@127.0.0.1:5432/homeostat"
queue = "amqp://guest:guest@127.0.0.1:5672/%2f"

[queue]
lease_secs = 9

[api]
listen = "0.0.0.0:7070"
host_budget = 777

[crawler.fetch]
allow_addresses = ["10.0.0.0/8"]
per_host_rate = 2.0

[crawler.fetch.resolve]
"intranet.example" = "10.0.0.1:80"
"#;
    let mut o = overlay();
    o.crawlers = Some(6);
    o.queue_name = Some("homeostat.bench.1_2_3".into());
    let text = apply_to_text(base, "cluster.toml", &o).expect("overlay");
    let table: toml::Table = text.parse().expect("valid toml");

    // Its own keys.
    assert_eq!(
        get_str(&table, &["organism", "data_dir"]),
        Some("/tmp/bench-run/data")
    );
    assert_eq!(get_str(&table, &["api", "listen"]), Some("127.0.0.1:0"));
    assert_eq!(
        get_str(&table, &["frontdoor", "listen"]),
        Some("127.0.0.1:0")
    );
    assert_eq!(
        get_str(&table, &["queue", "name"]),
        Some("homeostat.bench.1_2_3")
    );
    let fetch = &table["crawler"]["fetch"];
    assert_eq!(fetch["per_host_rate"].as_float(), Some(1000.0));
    assert_eq!(fetch["per_host_concurrency"].as_integer(), Some(16));
    assert_eq!(
        table["crawler"]["worker"]["concurrency"].as_integer(),
        Some(128)
    );
    assert_eq!(table["roles"]["crawler"]["min"].as_integer(), Some(6));
    assert_eq!(table["roles"]["crawler"]["max"].as_integer(), Some(6));
    // The base's keys stay, allow-lists and resolve tables are extended, not replaced.
    assert_eq!(get_str(&table, &["organism", "name"]), Some("cluster"));
    assert_eq!(table["api"]["host_budget"].as_integer(), Some(777));
    assert_eq!(table["queue"]["lease_secs"].as_integer(), Some(9));
    assert_eq!(
        get_str(&table, &["engines", "database"]),
        Some("postgres://postgres@127.0.0.1:5432/homeostat")
    );
    let allow: Vec<&str> = fetch["allow_addresses"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(allow, ["10.0.0.0/8", WEB_NETWORK]);
    assert_eq!(
        fetch["resolve"]["intranet.example"].as_str(),
        Some("10.0.0.1:80")
    );
    assert_eq!(fetch["resolve"][".test"].as_str(), Some("127.0.0.1:40123"));

    // And the organism accepts it.
    let cfg = infra::Config::parse(&text, "merged").expect("a valid configuration");
    assert_eq!(cfg.raw.crawler.fetch.per_host_concurrency, 16);
    assert_eq!(cfg.raw.crawler.worker.concurrency, 128);
    assert_eq!(cfg.bounds("crawler").min, 6);
}

#[test]
fn the_overlay_on_the_embedded_default_is_valid_and_keeps_sqlite_in_the_data_dir() {
    let mut o = overlay();
    o.sqlite_database = true;
    o.sqlite_queue = true;
    let text = apply_to_text(infra::DEFAULT_ORGANISM, "embedded", &o).expect("overlay");
    let cfg = infra::Config::parse(&text, "embedded + bench").expect("valid");
    assert_eq!(
        cfg.raw.organism.data_dir,
        PathBuf::from("/tmp/bench-run/data")
    );
    assert_eq!(cfg.raw.crawler.fetch.allow_addresses.len(), 1);
    assert_eq!(cfg.raw.engines.database, "sqlite");
    assert_eq!(cfg.raw.engines.queue, "sqlite");
    // Allowing the web twice would be harmless, but the overlay does not repeat it.
    let again = apply_to_text(&text, "again", &o).expect("overlay");
    let cfg = infra::Config::parse(&again, "again").expect("valid");
    assert_eq!(cfg.raw.crawler.fetch.allow_addresses.len(), 1);
    // The default crawler bounds stay unless --crawlers is given.
    assert_eq!(cfg.bounds("crawler").min, 2);
}

#[test]
fn a_base_that_is_not_toml_is_named_in_the_error() {
    let err = apply_to_text("[api\n", "broken.toml", &overlay()).expect_err("not toml");
    assert!(format!("{err:#}").contains("broken.toml"), "{err:#}");
}

const STATUS: &str = "Name:\tcell\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
VmPeak:\t  812345 kB\nVmSize:\t  800000 kB\nVmLck:\t       0 kB\nVmHWM:\t   51234 kB\n\
VmRSS:\t   49000 kB\nRssAnon:\t   17000 kB\nRssFile:\t   32000 kB\nThreads:\t4\n";

#[test]
fn vm_hwm_is_read_from_proc_status() {
    assert_eq!(parse_vm_hwm(STATUS), Some(51234 * 1024));
    assert_eq!(parse_vm_hwm("Name:\tkthreadd\nState:\tS\n"), None);
    assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
    // This very process has a peak.
    assert!(peak_rss(std::process::id()).is_some_and(|b| b > 0));
}

#[test]
fn own_memory_is_the_anonymous_part_of_the_resident_set() {
    assert_eq!(parse_rss_anon(STATUS), Some(17000 * 1024));
    assert_eq!(parse_rss_anon("VmRSS:\t49000 kB\n"), None);
    assert_eq!(parse_rss_anon("RssAnon:\t17000 MB\n"), None);
    // This very process has a heap, and it is part of its resident set.
    let own = rss_anon(std::process::id()).expect("own memory");
    assert!(own > 0 && own <= peak_rss(std::process::id()).expect("peak"));
}

#[test]
fn cpu_ticks_are_read_from_proc_stat_whatever_the_command_name() {
    // Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    // cmajflt utime stime ...
    let stat = "4242 (cell (run) x) S 1 4242 4242 0 -1 4194560 1500 0 0 0 250 75 0 0 20 0 4 0";
    assert_eq!(parse_cpu_ticks(stat), Some(325));
    assert_eq!(parse_cpu_ticks("4242 (cell) S 1 2"), None);
    assert_eq!(parse_cpu_ticks("garbage"), None);
}

fn set(urls: &[&str]) -> BTreeSet<String> {
    urls.iter().map(|u| u.to_string()).collect()
}

#[test]
fn completeness_counts_found_and_extra_pages() {
    let expected = set(&["a", "b", "c", "d"]);
    let indexed = set(&["a", "b", "c", "x", "y"]);
    let c = Completeness::of(&indexed, &expected);
    assert_eq!(
        c,
        Completeness {
            indexed: 5,
            expected: 4,
            found: 3,
            extra: 2
        }
    );
    assert!((c.percent() - 75.0).abs() < 1e-9);
    let all = Completeness::of(&expected, &expected);
    assert!((all.percent() - 100.0).abs() < 1e-9);
    assert_eq!(all.extra, 0);
    let nothing_expected = Completeness::of(&indexed, &BTreeSet::new());
    assert!((nothing_expected.percent() - 100.0).abs() < 1e-9);
    assert_eq!(nothing_expected.extra, 5);
    assert!((per_second(5000, 2.5) - 2000.0).abs() < 1e-9);
    assert_eq!(per_second(10, 0.0), 0.0);
}

fn cell(name: &str, pid: u32, generation: u32, mb: f64, cpu: f64) -> CellUsage {
    CellUsage {
        name: name.into(),
        role: name.split('-').next().expect("role").into(),
        pid,
        generation,
        changed: false,
        peak_rss_mb: Some(mb),
        peak_own_mb: Some(mb / 2.0),
        cpu_percent: Some(cpu),
    }
}

fn row(engine: &str, latency_ms: u64, pages_per_sec: f64, cells: Vec<CellUsage>) -> Row {
    Row {
        engine: engine.into(),
        latency_ms,
        pages: 3990,
        expected: 4000,
        found: 3990,
        completeness_pct: 99.75,
        extra: 0,
        seconds: 3990.0 / pages_per_sec,
        pages_per_sec,
        served: 5123,
        crawled: 4800,
        failed: 12,
        cells,
        bench_cpu_percent: Some(31.0),
    }
}

#[test]
fn the_table_has_one_aligned_line_per_row_and_marks_replaced_cells() {
    let rows = vec![
        row(
            EMBEDDED,
            0,
            2000.0,
            vec![
                cell("api-1", 10, 1, 61.2, 90.0),
                cell("crawler-1", 11, 1, 40.4, 45.0),
                cell("crawler-2", 12, 1, 39.6, 44.0),
            ],
        ),
        row(
            "cluster",
            0,
            500.0,
            vec![
                cell("api-1", 20, 1, 80.0, 50.0),
                cell("crawler-2", 22, 1, 38.0, 20.0),
                cell("crawler-1", 21, 1, 30.0, 5.0),
                cell("crawler-1", 23, 2, 42.0, 10.0),
                cell("frontdoor-7-1", 30, 1, 10.0, 3.0),
                cell("healthchecker-7-2", 31, 1, 12.5, 1.0),
                CellUsage {
                    changed: true,
                    ..cell("crawler-7-9", 32, 1, 20.0, 2.0)
                },
            ],
        ),
    ];
    let table = render_table(&rows);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for word in [
        "engine",
        "latency ms",
        "complete %",
        "pages/s",
        "api MB",
        "crawler MB",
        "other MB",
        "api own MB",
        "crawler own MB",
        "cpu% other",
    ] {
        assert!(lines[0].contains(word), "{word} missing from {}", lines[0]);
    }
    // Right-aligned figures: every line ends at the same column.
    let width = lines[0].chars().count();
    assert!(
        lines[1..3].iter().all(|l| l.chars().count() == width),
        "{table}"
    );
    assert!(lines[1].starts_with("embedded "), "{table}");
    assert!(lines[1].contains("  99.8  "), "{table}");
    assert!(lines[1].contains("  2.00  "), "{table}");
    assert!(lines[1].contains("  2000  "), "{table}");
    assert!(lines[1].contains(" 61 "), "{table}");
    assert!(lines[1].contains(" 40/40 "), "{table}");
    assert!(lines[1].contains(" 45/44 "), "{table}");
    // Slots in order; the replaced one shows its biggest process and a mark, CPU summed; a
    // crawler that joined during the run is marked too; the other roles are summed.
    assert!(lines[2].contains(" 42*/38/20* "), "{table}");
    // Own memory: each slot's biggest, unmarked.
    assert!(lines[1].contains(" 20/20 "), "{table}");
    assert!(lines[2].contains(" 21/19/10 "), "{table}");
    assert!(lines[2].contains(" 15/20/2 "), "{table}");
    assert!(lines[2].contains(" 22 "), "{table}");
    assert!(lines[1].contains(" - "), "no other cells: {table}");
    assert!(lines[3].starts_with('*'), "{table}");

    let r = ratios(&rows);
    assert_eq!(r.len(), 1);
    assert!((r[0].ratio - 4.0).abs() < 1e-9);
    let text = render_ratios(&r);
    assert!(
        text.contains("embedded 2000 pages/s ÷ cluster 500 pages/s = 4.00x"),
        "{text}"
    );

    // Rows are JSON lines too.
    let json = serde_json::to_string(&rows[0]).expect("json");
    let back: Row = serde_json::from_str(&json).expect("round trip");
    assert_eq!(back, rows[0]);
}

#[test]
fn the_organism_ready_line_names_the_front_doors_and_the_health_checkers() {
    let ready = protocol::OrganismReady {
        v: 1,
        frontdoors: vec![
            "http://127.0.0.1:7070".into(),
            "http://127.0.0.1:7071".into(),
        ],
        healthcheckers: vec!["http://127.0.0.1:1".into()],
        factories: vec!["http://127.0.0.1:2".into()],
        cells: 9,
    };
    let line = ready.render();
    assert_eq!(
        protocol::OrganismReady::parse(&line).expect("valid"),
        Some(ready)
    );
    // The words for people are not the machine's line.
    assert_eq!(
        protocol::OrganismReady::parse("homeostat is up: 9 cells; frontdoor http://a")
            .expect("not ours"),
        None
    );
    assert!(protocol::OrganismReady::parse("HOMEOSTAT_ORGANISM_READY {\"v\":1}").is_err());
}

#[test]
fn registry_cells_with_a_pid_are_followed() {
    let view: protocol::control::CellsResponse = serde_json::from_value(serde_json::json!({
        "roles": {
            "api": [{"cell_id": "api-1-3", "role": "api", "addr": "127.0.0.1:1",
                     "state": "serving", "pressure": 0.1, "age_ms": 5, "last_seen_ms": 1,
                     "phi": 0.2, "pid": 42}],
            "crawler": [{"cell_id": "crawler-1-4", "role": "crawler", "addr": "127.0.0.1:2",
                         "state": "serving", "pressure": 0.1, "age_ms": 5, "last_seen_ms": 1,
                         "phi": 0.2}]
        }
    }))
    .expect("a registry answer");
    let cells = registry_cells(&view);
    assert_eq!(cells.len(), 1, "{cells:?}");
    let api = &cells[0];
    assert_eq!(
        (api.name.as_str(), api.role.as_str(), api.pid),
        ("api-1-3", "api", 42)
    );
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    bench: BenchCommand,
}

fn crawl_args(argv: &[&str]) -> CrawlArgs {
    let cli = Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
        .expect("valid arguments");
    match cli.bench {
        BenchCommand::Crawl(args) => args,
    }
}

#[test]
fn the_drain_timeout_grows_with_the_web() {
    use std::time::Duration;
    assert_eq!(
        crawl_args(&["crawl"]).effective_timeout(),
        Duration::from_secs(600)
    );
    // A million pages get 4 ms each, not the 600 s a slow machine ran out of.
    assert_eq!(
        crawl_args(&["crawl", "--pages", "1000000"]).effective_timeout(),
        Duration::from_secs(4000)
    );
    // Said, it is kept.
    assert_eq!(
        crawl_args(&["crawl", "--pages", "1000000", "--timeout-secs", "30"]).effective_timeout(),
        Duration::from_secs(30)
    );
}

#[test]
fn quick_changes_only_the_defaults() {
    let full = crawl_args(&["crawl"]);
    assert_eq!(full.effective_pages(), 5000);
    assert_eq!(full.effective_latencies(), [0, 10, 20]);
    assert_eq!((full.hosts, full.seed), (40, 7));
    assert_eq!(full.per_host_rate, 1000.0);
    assert_eq!(full.per_host_concurrency, 16);
    assert_eq!(full.worker_concurrency, 128);
    let quick = crawl_args(&["crawl", "--quick"]);
    assert_eq!(quick.effective_pages(), 500);
    assert_eq!(quick.effective_latencies(), [0]);
    let explicit = crawl_args(&[
        "crawl",
        "--quick",
        "--pages",
        "800",
        "--latency-ms",
        "5,0,5",
    ]);
    assert_eq!(explicit.effective_pages(), 800);
    assert_eq!(explicit.effective_latencies(), [5, 0]);
    let files = crawl_args(&["crawl", "--infra", "a.toml", "--infra", "b.toml", "--json"]);
    assert_eq!(
        files.infra,
        [PathBuf::from("a.toml"), PathBuf::from("b.toml")]
    );
    assert!(files.json);
}

#[test]
fn a_missing_cell_binary_says_how_to_build_it() {
    let err = locate_cell(Some(std::path::Path::new("/nonexistent/cell"))).expect_err("missing");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("/nonexistent/cell") && msg.contains("cargo build --release -p cell"),
        "{msg}"
    );
}

#[test]
fn engines_resolve_like_the_organism_does() {
    assert_eq!(Engine::of("sqlite"), Engine::Sqlite);
    assert_eq!(Engine::of("sqlite:///var/x.db"), Engine::Sqlite);
    assert_eq!(
        Engine::of("postgres://u@h/db"),
        Engine::Postgres("postgres://u@h/db".into())
    );
    assert_eq!(
        Engine::of("amqp://h/%2f"),
        Engine::Amqp("amqp://h/%2f".into())
    );
    // The environment wins over the file, unless it is empty; nothing means sqlite.
    assert_eq!(
        effective(Some("sqlite"), Some("postgres://h/db".into())),
        Engine::Postgres("postgres://h/db".into())
    );
    assert_eq!(
        effective(Some("sqlite"), Some(String::new())),
        Engine::Sqlite
    );
    assert_eq!(effective(None, None), Engine::Sqlite);
    assert_eq!(
        StoreAt::of(&Engine::Sqlite, std::path::Path::new("/d")),
        StoreAt::Sqlite(PathBuf::from("/d/store.db"))
    );
}
