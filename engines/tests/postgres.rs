//! The conformance suite on the PostgreSQL store, over a real server, plus what only a shared
//! database server brings: concurrent cells, concurrent migrations, a server restart.
//!
//! Each test gets its own database ([`support::PgDb`]: `homeostat_test_<pid>_<n>` from
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`), dropped at the end. A
//! missing server fails the tests: run `scripts/engines.sh start`.

mod conformance;
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engines::frontier::Links;
use engines::postgres::{PgOptions, PgStore};
use engines::{CrawlSpec, IngestItem, IngestOutcome, SearchQuery, Store};
use support::PgDb;
use tokio::sync::RwLock;

/// Tests share the server; the restart test takes it for itself.
static SERVER: RwLock<()> = RwLock::const_new(());

async fn store(db: &PgDb) -> PgStore {
    PgStore::connect(&db.url).await.expect("connect store")
}

/// Close the store's connections and drop the database.
async fn finish(db: PgDb, store: PgStore) {
    store.pool().close().await;
    db.drop_db().await;
}

macro_rules! conformance_test {
    ($name:ident) => {
        #[tokio::test]
        async fn $name() {
            let _server = SERVER.read().await;
            let db = PgDb::create().await;
            let store = store(&db).await;
            conformance::$name(&store).await;
            finish(db, store).await;
        }
    };
    ($name:ident, $module:ident) => {
        #[tokio::test]
        async fn $name() {
            let _server = SERVER.read().await;
            let db = PgDb::create().await;
            let store = store(&db).await;
            conformance::$module::$name(&store).await;
            finish(db, store).await;
        }
    };
}

/// A conformance check that takes the store shared (`Arc`), run on a multi-threaded runtime.
macro_rules! shared_conformance_test {
    ($name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let _server = SERVER.read().await;
            let db = PgDb::create().await;
            let store = Arc::new(store(&db).await);
            conformance::$name(store.clone()).await;
            let store = Arc::try_unwrap(store).unwrap_or_else(|_| panic!("the check finished"));
            finish(db, store).await;
        }
    };
    ($name:ident, $module:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let _server = SERVER.read().await;
            let db = PgDb::create().await;
            let store = Arc::new(store(&db).await);
            conformance::$module::$name(store.clone()).await;
            let store = Arc::try_unwrap(store).unwrap_or_else(|_| panic!("the check finished"));
            finish(db, store).await;
        }
    };
}

conformance_test!(frontier_invariant);
conformance_test!(idempotent_ingest);
conformance_test!(limits);
conformance_test!(search_ranking_and_snippets);
conformance_test!(totals_above_the_bound_are_estimated);
conformance_test!(idempotency_keys);

shared_conformance_test!(idempotency_one_holder);
shared_conformance_test!(concurrent_writers);
conformance_test!(deferred_links_are_kept_and_offered_once, deferred);
shared_conformance_test!(deferred_crawl_is_exact, deferred);

/// Several cells migrating one empty database at once all succeed (sqlx's advisory lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let url = db.url.clone();
    let cells: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for cell in cells {
        stores.push(cell.await.expect("task").expect("connect and migrate"));
    }
    let crawl = stores[0]
        .create_crawl(conformance::UNLIMITED)
        .await
        .expect("schema is there");
    assert!(crawl > 0);
    for s in stores.drain(1..) {
        s.pool().close().await;
    }
    finish(db, stores.pop().expect("one store")).await;
}

/// A page for each seed, each with 10 links to new pages of the hosts `{prefix}0.test` to
/// `{prefix}3.test`.
fn pages_linking_to(seeds: &[engines::Candidate], prefix: &str) -> Vec<IngestItem> {
    seeds
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let links: Vec<String> = (0..10)
                .map(|j| format!("http://{prefix}{}.test/{i}/{j}", j % 4))
                .collect();
            let links: Vec<&str> = links.iter().map(String::as_str).collect();
            conformance::page(&s.url, "t", "shared words", &links)
        })
        .collect()
}

/// Two API cells (two pools) ingesting overlapping results at once: each result counts once,
/// and a crawl's page limit holds exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cells_keep_counts_exact() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let a = Arc::new(store(&db).await);
    let b = Arc::new(store(&db).await);
    let crawl = a
        .create_crawl(CrawlSpec {
            max_depth: None,
            max_pages: Some(60),
        })
        .await
        .expect("crawl");
    let seeds: Vec<_> = (0..20)
        .map(|i| conformance::cand(&format!("http://x{}.test/{i}", i % 3)))
        .collect();
    a.admit_seeds(crawl, &seeds, 1_000_000)
        .await
        .expect("admit");
    // Every result is delivered twice, once to each cell; each links to 10 new pages.
    let items = pages_linking_to(&seeds, "y");
    let mut tasks = Vec::new();
    for store in [a.clone(), b.clone()] {
        for part in 0..2 {
            let store = store.clone();
            let mine: Vec<IngestItem> = items.iter().skip(part).step_by(2).cloned().collect();
            tasks.push(tokio::spawn(async move {
                let mut stored = 0;
                let mut admitted = 0;
                for chunk in mine.chunks(3) {
                    let r = store
                        .ingest(chunk, 1_000_000, Links::Admit)
                        .await
                        .expect("ingest");
                    stored += r.stored;
                    admitted += r.links_admitted;
                }
                (stored, admitted)
            }));
        }
    }
    let mut stored = 0;
    let mut admitted = 0;
    for t in tasks {
        let (s, l) = t.await.expect("task");
        stored += s;
        admitted += l;
    }
    assert_eq!(stored, 20, "each result is stored once");
    assert_eq!(admitted, 40, "page limit 60 = 20 seeds + 40 links");
    let stats = a.stats(100).await.expect("stats");
    assert_eq!(stats.frontier.crawled, 20);
    assert_eq!(stats.frontier.pending, 40);
    drop(b);
    let a = Arc::try_unwrap(a).unwrap_or_else(|_| panic!("tasks finished"));
    finish(db, a).await;
}

/// Two API cells ingesting at once, links to the same few hosts: every host's budget holds
/// exactly (each api plans against budgets read unlocked and charges them last), and the budget
/// rows agree with the frontier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cells_keep_host_budgets_exact() {
    const BUDGET: u64 = 12;
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let a = Arc::new(store(&db).await);
    let b = Arc::new(store(&db).await);
    let crawl = a
        .create_crawl(CrawlSpec {
            max_depth: None,
            max_pages: None,
        })
        .await
        .expect("crawl");
    let seeds: Vec<_> = (0..24)
        .map(|i| conformance::cand(&format!("http://s{i}.test/")))
        .collect();
    a.admit_seeds(crawl, &seeds, BUDGET).await.expect("admit");
    // 24 results with 10 links each to four hosts: 60 new URLs a host, 12 of which fit.
    let items = pages_linking_to(&seeds, "b");
    let mut tasks = Vec::new();
    for (k, store) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        let mine: Vec<IngestItem> = items.iter().skip(k).step_by(4).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0;
            for chunk in mine.chunks(2) {
                let r = store
                    .ingest(chunk, BUDGET, Links::Admit)
                    .await
                    .expect("ingest");
                admitted += r.links_admitted;
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.expect("task");
    }
    assert_eq!(
        admitted,
        4 * BUDGET as usize,
        "each link host filled to its budget"
    );
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT f.host, count(*), max(b.admitted) FROM frontier f \
         JOIN host_budget b ON b.host = f.host WHERE f.host LIKE 'b%' GROUP BY f.host ORDER BY 1",
    )
    .fetch_all(a.pool())
    .await
    .expect("counts");
    let expected: Vec<(String, i64, i64)> = (0..4)
        .map(|h| (format!("b{h}.test"), BUDGET as i64, BUDGET as i64))
        .collect();
    assert_eq!(
        rows, expected,
        "(host, frontier rows, budget row) per link host"
    );
    drop(b);
    let a = Arc::try_unwrap(a).unwrap_or_else(|_| panic!("tasks finished"));
    finish(db, a).await;
}

/// Web text PostgreSQL cannot store as is (NUL characters) or index whole (over a megabyte)
/// neither fails the batch nor loses the page.
#[tokio::test]
async fn hostile_page_text() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let store = store(&db).await;
    let crawl = store
        .create_crawl(conformance::UNLIMITED)
        .await
        .expect("crawl");
    let urls = [
        "http://n.test/nul",
        "http://n.test/big",
        "http://n.test/title",
    ];
    store
        .admit_seeds(crawl, &urls.map(conformance::cand), 1_000_000)
        .await
        .expect("admit");
    let huge: String = (0..400_000).map(|i| format!("w{i} ")).collect();
    let r = store
        .ingest(
            &[
                conformance::page(urls[0], "nul\0title", "a nul\0byte ocelot", &[]),
                conformance::page(urls[1], "big", &format!("ocelot {huge}"), &[]),
                conformance::page(urls[2], "Ocelot", "nothing about the cat in the body", &[]),
            ],
            1_000_000,
            Links::Admit,
        )
        .await
        .expect("ingest");
    assert_eq!((r.stored, r.pages_indexed), (3, 3));
    let res = store
        .search(&SearchQuery {
            terms: vec!["ocelot".into()],
            limit: 10,
            offset: 0,
        })
        .await
        .expect("search");
    assert_eq!(res.total, 3, "{res:?}");
    let title_only = res
        .hits
        .iter()
        .find(|h| h.url == urls[2])
        .expect("title hit");
    assert!(
        title_only.snippet.contains("<mark>Ocelot</mark>"),
        "a title-only match is shown from the title: {}",
        title_only.snippet
    );
    assert!(res.hits.iter().all(|h| h.snippet.contains("<mark>")));
    finish(db, store).await;
}

/// Redirects and failures inside one batch behave as if the results were stored one by one.
#[tokio::test]
async fn batch_walks_results_in_order() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let store = store(&db).await;
    let crawl = store
        .create_crawl(conformance::UNLIMITED)
        .await
        .expect("crawl");
    let urls = ["http://r.test/a", "http://r.test/b"];
    store
        .admit_seeds(crawl, &urls.map(conformance::cand), 1_000_000)
        .await
        .expect("admit");
    // a redirects to b; then b's own (failed) result arrives in the same batch: b is done already.
    let mut redirect = conformance::page(urls[0], "b", "bee", &["http://r.test/c"]);
    if let IngestOutcome::Page { final_url, .. } = &mut redirect.outcome {
        *final_url = urls[1].to_string();
    }
    let failed = IngestItem {
        url: urls[1].to_string(),
        outcome: IngestOutcome::Failed {
            reason: "late".into(),
        },
    };
    let r = store
        .ingest(
            &[redirect.clone(), failed, redirect],
            1_000_000,
            Links::Admit,
        )
        .await
        .expect("ingest");
    assert_eq!(r.stored, 1);
    assert_eq!(r.links_admitted, 1);
    let (state, _) = store
        .frontier_state(urls[1])
        .await
        .expect("state")
        .expect("known");
    assert_eq!(state, "crawled");
    assert_eq!(
        store.indexed_urls().await.expect("urls"),
        vec![urls[1].to_string()]
    );
    finish(db, store).await;
}

/// The store keeps working across a PostgreSQL restart without being recreated: calls during the
/// restart fail with an error, the next ones work, and nothing stored is lost.
#[tokio::test]
async fn survives_a_server_restart() {
    let _server = SERVER.write().await;
    let db = PgDb::create().await;
    let store = PgStore::connect_with(
        &db.url,
        PgOptions {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(2),
        },
    )
    .await
    .expect("connect");
    let crawl = store
        .create_crawl(conformance::UNLIMITED)
        .await
        .expect("crawl");
    store
        .admit_seeds(crawl, &[conformance::cand("http://p.test/")], 1_000_000)
        .await
        .expect("admit");
    // Warm every pooled connection, so the restart leaves dead ones behind.
    let warm: Vec<_> = (0..4).map(|_| store.stats(1)).collect();
    for w in futures::future::join_all(warm).await {
        w.expect("stats");
    }

    let store = Arc::new(store);
    // A cell keeps calling while the server restarts: every call returns (an answer or an
    // error) within the acquire timeout, none hangs.
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = {
        let (store, probing) = (store.clone(), probing.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
            while probing.load(Ordering::SeqCst) {
                let t = Instant::now();
                match store.stats(1).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, slowest)
        })
    };
    let started = Instant::now();
    support::engines_script("restart-postgres").await;
    probing.store(false, Ordering::SeqCst);
    let (ok, failed, slowest) = probe.await.expect("probe");
    eprintln!("during the restart: {ok} calls answered, {failed} failed, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_secs(5),
        "a call hung for {slowest:?}"
    );
    let (recovered, failures) = support::until_ok(
        "store did not recover",
        started,
        Duration::from_secs(60),
        || store.stats(10),
    )
    .await;
    eprintln!(
        "recovered {:?} after the restart began, {failures} failed call(s)",
        started.elapsed()
    );
    assert_eq!(recovered.frontier.pending, 1, "nothing lost: {recovered:?}");
    // Writes work again too.
    let r = store
        .ingest(
            &[conformance::page(
                "http://p.test/",
                "after",
                "restart",
                &["http://p.test/2"],
            )],
            1_000_000,
            Links::Admit,
        )
        .await
        .expect("ingest after restart");
    assert_eq!((r.stored, r.links_admitted), (1, 1));
    let store = Arc::try_unwrap(store).unwrap_or_else(|_| panic!("probe finished"));
    finish(db, store).await;
}

/// Ingest throughput over a real server, checked and printed (`HOMEOSTAT_INGEST_PAGES=5000 cargo
/// test --workspace --test postgres -- --nocapture ingest_throughput` for the benchmark's size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_throughput() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let store = store(&db).await;
    conformance::ingest_throughput(&store, conformance::ingest_pages()).await;
    finish(db, store).await;
}

// The host ledger and the publisher's claims (engines/tests/conformance/politeness.rs).

conformance_test!(ledger_spacing_concurrency_and_blocks, politeness);
conformance_test!(ledger_permits_lapse, politeness);
conformance_test!(ledger_leases_take_lanes, politeness);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_concurrent_askers() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    // Three stores: three api cells on one database.
    let (a, b, c) = (store(&db).await, store(&db).await, store(&db).await);
    let (a, b, c) = (Arc::new(a), Arc::new(b), Arc::new(c));
    conformance::politeness::ledger_concurrent_askers(vec![a.clone(), b.clone(), c.clone()]).await;
    drop((b, c));
    let a = Arc::try_unwrap(a).unwrap_or_else(|_| panic!("askers finished"));
    finish(db, a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publisher_claims_do_not_overlap_and_expire() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let a = Arc::new(store(&db).await);
    let b = Arc::new(store(&db).await);
    conformance::politeness::publisher_claims_do_not_overlap(a.clone(), b.clone()).await;
    conformance::politeness::expired_claims_are_taken_over(a.clone(), b.clone(), || async {
        sqlx::query("UPDATE frontier SET claimed_until_ms = claimed_until_ms - $1")
            .bind(engines::PUBLISH_CLAIM.as_millis() as i64 + 1)
            .execute(a.pool())
            .await
            .expect("age the claim");
    })
    .await;
    drop(b);
    let a = Arc::try_unwrap(a).unwrap_or_else(|_| panic!("claims finished"));
    finish(db, a).await;
}

#[tokio::test]
async fn kept_counts_agree_with_the_rows() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let store = store(&db).await;
    conformance::counts::kept_counts_agree_with_the_rows(&store).await;
    finish(db, store).await;
}

/// Two connections to one database are two api cells: a commit by either moves the other's
/// search generation.
#[tokio::test]
async fn search_generation_moves_with_another_cells_commit() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    let (a, b) = (store(&db).await, store(&db).await);
    conformance::search_generation_moves_with_another_cells_commit(&a, &b).await;
    b.pool().close().await;
    finish(db, a).await;
}

/// A database a newer build has migrated further opens and works (see the SQLite test of the
/// same name).
#[tokio::test]
async fn a_store_a_newer_build_migrated_opens() {
    let _server = SERVER.read().await;
    let db = PgDb::create().await;
    store(&db).await.pool().close().await;
    let (_m, newer) = support::newer_migrator(
        "postgres_store",
        "ALTER TABLE pages ADD COLUMN language TEXT NOT NULL DEFAULT '';\n\
         CREATE TABLE newer_things (id BIGINT PRIMARY KEY);\n",
    )
    .await;
    let pool = sqlx::PgPool::connect(&db.url).await.expect("pool");
    newer.run(&pool).await.expect("the newer build migrates");
    pool.close().await;
    let s = PgStore::connect(&db.url)
        .await
        .expect("this build opens the newer build's database");
    conformance::frontier_invariant(&s).await;
    finish(db, s).await;
}
