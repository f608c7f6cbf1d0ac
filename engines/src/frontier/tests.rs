//! The planner on its own: a table of batches over small views, each with every write expected.

use super::*;
use State::{Crawled, Failed, Pending, Queued};

fn host_of(url: &str) -> &str {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
}

fn cand(url: &str) -> Candidate {
    Candidate {
        url: url.to_string(),
        host: host_of(url).to_string(),
    }
}

fn page(url: &str, links: &[&str]) -> IngestItem {
    redirect(url, url, links)
}

fn redirect(url: &str, to: &str, links: &[&str]) -> IngestItem {
    IngestItem {
        url: url.to_string(),
        outcome: IngestOutcome::Page {
            final_url: to.to_string(),
            final_host: host_of(to).to_string(),
            title: format!("title of {url}"),
            text: format!("text of {url}"),
            indexable: true,
            links: links.iter().map(|l| cand(l)).collect(),
        },
    }
}

fn failed(url: &str, reason: &str) -> IngestItem {
    IngestItem {
        url: url.to_string(),
        outcome: IngestOutcome::Failed {
            reason: reason.to_string(),
        },
    }
}

/// Crawl 1: no limits. Crawl 2: depth limit 3. Crawl 3: page limit 4, 2 admitted.
fn view(entries: &[(&str, i64, u32, State)], hosts: &[(&str, u64)]) -> View {
    View {
        entries: entries
            .iter()
            .map(|&(url, crawl_id, depth, state)| {
                let reason = (state == Failed).then(|| "earlier".to_string());
                let entry = Entry {
                    crawl_id,
                    depth,
                    state,
                    reason,
                };
                (url.to_string(), entry)
            })
            .collect(),
        crawls: [
            (1, None, None, 0),
            (2, Some(3), None, 0),
            (3, None, Some(4), 2),
        ]
        .into_iter()
        .map(|(id, max_depth, max_pages, admitted)| {
            let crawl = Crawl {
                max_depth,
                max_pages,
                admitted,
            };
            (id, crawl)
        })
        .collect(),
        hosts: hosts.iter().map(|&(h, n)| (h.to_string(), n)).collect(),
    }
}

struct Case {
    name: &'static str,
    entries: &'static [(&'static str, i64, u32, State)],
    hosts: &'static [(&'static str, u64)],
    budget: u64,
    items: Vec<IngestItem>,
    /// stored, links admitted, unknown.
    report: (usize, usize, usize),
    inserts: &'static [(&'static str, u32, State)],
    /// URL, state and depth after.
    changes: &'static [(&'static str, State, u32)],
    crawl_counts: &'static [(i64, u64)],
    host_counts: &'static [(&'static str, u64)],
}

const BIG: u64 = 1_000;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "a page is crawled and its new links admitted one deeper",
            entries: &[("http://a/", 1, 0, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://a/", &["http://a/1", "http://b/"])],
            report: (1, 2, 0),
            inserts: &[("http://a/1", 1, Pending), ("http://b/", 1, Pending)],
            changes: &[("http://a/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[("a", 1), ("b", 1)],
        },
        Case {
            name: "a failure is recorded with its reason (checked below) and admits nothing",
            entries: &[("http://a/", 1, 0, Pending)],
            hosts: &[],
            budget: BIG,
            items: vec![failed("http://a/", "http 404")],
            report: (1, 0, 0),
            inserts: &[],
            changes: &[("http://a/", Failed, 0)],
            crawl_counts: &[],
            host_counts: &[],
        },
        Case {
            name: "redelivery of a crawled or failed result changes nothing",
            entries: &[("http://a/", 1, 0, Crawled), ("http://b/", 1, 0, Failed)],
            hosts: &[],
            budget: BIG,
            items: vec![
                page("http://a/", &["http://new/"]),
                failed("http://b/", "again"),
                page("http://b/", &[]),
            ],
            report: (0, 0, 0),
            inserts: &[],
            changes: &[],
            crawl_counts: &[],
            host_counts: &[],
        },
        Case {
            name: "a result for an unknown URL is counted and ignored",
            entries: &[],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://nowhere/", &["http://x/"])],
            report: (0, 0, 1),
            inserts: &[],
            changes: &[],
            crawl_counts: &[],
            host_counts: &[],
        },
        Case {
            name: "duplicates inside one batch: the second result is a repeat, a link is admitted once",
            entries: &[("http://a/", 1, 0, Queued), ("http://b/", 1, 0, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![
                page("http://a/", &["http://c/", "http://c/"]),
                failed("http://a/", "late"),
                page("http://b/", &["http://c/"]),
            ],
            report: (2, 1, 0),
            inserts: &[("http://c/", 1, Pending)],
            changes: &[("http://a/", Crawled, 0), ("http://b/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[("c", 1)],
        },
        Case {
            name: "a link found twice in a batch under a depth limit is admitted at its shorter depth",
            entries: &[("http://deep/", 2, 2, Queued), ("http://top/", 2, 0, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://deep/", &["http://x/"]), page("http://top/", &["http://x/"])],
            report: (2, 1, 0),
            inserts: &[("http://x/", 1, Pending)],
            changes: &[("http://deep/", Crawled, 2), ("http://top/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[("x", 1)],
        },
        Case {
            name: "without a depth limit a shorter path changes nothing",
            entries: &[("http://deep/", 1, 2, Queued), ("http://top/", 1, 0, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://deep/", &["http://x/"]), page("http://top/", &["http://x/"])],
            report: (2, 1, 0),
            inserts: &[("http://x/", 3, Pending)],
            changes: &[("http://deep/", Crawled, 2), ("http://top/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[("x", 1)],
        },
        Case {
            name: "re-expansion: a crawled page reached by a shorter path is crawled again, \
                   a queued one only takes the depth, another crawl's or an equal depth is left",
            entries: &[
                ("http://top/", 2, 0, Queued),
                ("http://done/", 2, 3, Crawled),
                ("http://wait/", 2, 3, Queued),
                ("http://same/", 2, 1, Crawled),
                ("http://other/", 1, 3, Crawled),
                ("http://gone/", 2, 3, Failed),
            ],
            hosts: &[],
            budget: BIG,
            items: vec![page(
                "http://top/",
                &["http://done/", "http://wait/", "http://same/", "http://other/", "http://gone/"],
            )],
            report: (1, 0, 0),
            inserts: &[],
            changes: &[
                ("http://done/", Pending, 1),
                ("http://gone/", Failed, 1),
                ("http://top/", Crawled, 0),
                ("http://wait/", Queued, 1),
            ],
            crawl_counts: &[],
            host_counts: &[],
        },
        Case {
            name: "re-expansion by an earlier result of the batch: the later one links from its new depth",
            entries: &[("http://top/", 2, 0, Queued), ("http://mid/", 2, 3, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://top/", &["http://mid/"]), page("http://mid/", &["http://leaf/"])],
            report: (2, 1, 0),
            inserts: &[("http://leaf/", 2, Pending)],
            changes: &[("http://mid/", Crawled, 1), ("http://top/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[("leaf", 1)],
        },
        Case {
            name: "a crawled result reached later in the batch by a shorter path is crawled again",
            entries: &[("http://mid/", 2, 3, Queued), ("http://top/", 2, 0, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://mid/", &[]), page("http://top/", &["http://mid/"])],
            report: (2, 0, 0),
            inserts: &[],
            changes: &[("http://mid/", Pending, 1), ("http://top/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[],
        },
        Case {
            name: "depth limit at the boundary: links at the limit are admitted, beyond it not offered",
            entries: &[("http://two/", 2, 2, Queued), ("http://three/", 2, 3, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![page("http://two/", &["http://at/"]), page("http://three/", &["http://beyond/"])],
            report: (2, 1, 0),
            inserts: &[("http://at/", 3, Pending)],
            changes: &[("http://three/", Crawled, 3), ("http://two/", Crawled, 2)],
            crawl_counts: &[],
            host_counts: &[("at", 1)],
        },
        Case {
            name: "page limit at the boundary: 2 of 4 admitted, two more fit, the fifth is refused",
            entries: &[("http://a/", 3, 0, Queued), ("http://b/", 3, 0, Queued)],
            hosts: &[],
            budget: BIG,
            items: vec![
                page("http://a/", &["http://p1/", "http://a/"]),
                page("http://b/", &["http://p2/", "http://p3/"]),
            ],
            report: (2, 2, 0),
            inserts: &[("http://p1/", 1, Pending), ("http://p2/", 1, Pending)],
            changes: &[("http://a/", Crawled, 0), ("http://b/", Crawled, 0)],
            crawl_counts: &[(3, 2)],
            host_counts: &[("p1", 1), ("p2", 1)],
        },
        Case {
            name: "host budget at the boundary: one more fits, then the host is refused, others not",
            entries: &[("http://a/", 1, 0, Queued)],
            hosts: &[("h", 2)],
            budget: 3,
            items: vec![page("http://a/", &["http://h/1", "http://h/2", "http://k/1"])],
            report: (1, 2, 0),
            inserts: &[("http://h/1", 1, Pending), ("http://k/1", 1, Pending)],
            changes: &[("http://a/", Crawled, 0)],
            crawl_counts: &[],
            host_counts: &[("h", 1), ("k", 1)],
        },
        Case {
            name: "redirects: an unknown target is created crawled, a queued one crawled, a failed one left; \
                   the target's own result later in the batch is a repeat",
            entries: &[
                ("http://r1/", 1, 2, Queued),
                ("http://r2/", 1, 0, Queued),
                ("http://t2/", 1, 5, Queued),
                ("http://r3/", 1, 0, Queued),
                ("http://t3/", 1, 0, Failed),
            ],
            hosts: &[],
            budget: BIG,
            items: vec![
                redirect("http://r1/", "http://t1/", &[]),
                redirect("http://r2/", "http://t2/", &[]),
                redirect("http://r3/", "http://t3/", &[]),
                failed("http://t2/", "late"),
                page("http://t1/", &["http://never/"]),
            ],
            report: (3, 0, 0),
            inserts: &[("http://t1/", 2, Crawled)],
            changes: &[
                ("http://r1/", Crawled, 2),
                ("http://r2/", Crawled, 0),
                ("http://r3/", Crawled, 0),
                ("http://t2/", Crawled, 5),
            ],
            crawl_counts: &[],
            host_counts: &[],
        },
    ]
}

#[test]
fn plan_ingest_table() {
    for case in cases() {
        let view = view(case.entries, case.hosts);
        let plan = plan_ingest(&view, &case.items, case.budget, Links::Admit);
        let name = case.name;
        assert_eq!(
            (plan.stored, plan.links_admitted, plan.unknown),
            case.report,
            "{name}: stored, admitted, unknown"
        );
        let inserts: Vec<(&str, u32, State)> = plan
            .inserts
            .iter()
            .map(|i| (i.url, i.depth, i.state))
            .collect();
        assert_eq!(inserts, case.inserts, "{name}: inserts");
        for insert in &plan.inserts {
            assert_eq!(
                insert.host,
                host_of(insert.url),
                "{name}: host of {}",
                insert.url
            );
        }
        let changes: Vec<(&str, State, u32)> = plan
            .changes
            .iter()
            .map(|c| (c.url, c.after.state, c.after.depth))
            .collect();
        assert_eq!(changes, case.changes, "{name}: changes");
        for change in &plan.changes {
            assert_eq!(
                Some(&change.before),
                view.entries.get(change.url),
                "{name}: a change names the row it read"
            );
            assert_eq!(change.before.crawl_id, change.after.crawl_id, "{name}");
        }
        assert_eq!(
            plan.counts.crawls, case.crawl_counts,
            "{name}: crawl counts"
        );
        assert_eq!(plan.counts.hosts, case.host_counts, "{name}: host counts");
        let report = plan.report(7);
        assert_eq!(report.pages_indexed, 7);
        assert_eq!(report.stored, plan.stored);
    }
}

#[test]
fn reasons_follow_the_state() {
    let view = view(
        &[("http://a/", 1, 0, Queued), ("http://b/", 2, 3, Failed)],
        &[],
    );
    let items = [failed("http://a/", "http 404")];
    let plan = plan_ingest(&view, &items, BIG, Links::Admit);
    assert_eq!(plan.changes[0].after.reason.as_deref(), Some("http 404"));
    // A failed entry re-expanded keeps its state and reason.
    let view2 = View {
        entries: [
            ("http://top/".to_string(), view.entries["http://a/"].clone()),
            ("http://b/".to_string(), view.entries["http://b/"].clone()),
        ]
        .into_iter()
        .map(|(u, mut e)| {
            e.crawl_id = 2;
            (u, e)
        })
        .collect(),
        ..view.clone()
    };
    let items = [page("http://top/", &["http://b/"])];
    let plan = plan_ingest(&view2, &items, BIG, Links::Admit);
    let b = plan
        .changes
        .iter()
        .find(|c| c.url == "http://b/")
        .expect("b");
    assert_eq!((b.after.state, b.after.depth), (Failed, 1));
    assert_eq!(b.after.reason.as_deref(), Some("earlier"));
    let top = plan
        .changes
        .iter()
        .find(|c| c.url == "http://top/")
        .expect("top");
    assert_eq!(top.after.reason, None);
}

#[test]
fn pages_are_written_once_per_final_url_last_wins() {
    let view = view(
        &[
            ("http://a/", 1, 0, Queued),
            ("http://b/", 1, 0, Queued),
            ("http://c/", 1, 0, Queued),
        ],
        &[],
    );
    let mut hidden = page("http://c/", &[]);
    if let IngestOutcome::Page { indexable, .. } = &mut hidden.outcome {
        *indexable = false;
    }
    let items = [
        redirect("http://a/", "http://t/", &[]),
        redirect("http://b/", "http://t/", &[]),
        hidden,
    ];
    let plan = plan_ingest(&view, &items, BIG, Links::Admit);
    assert_eq!(plan.pages.len(), 1, "{:?}", plan.pages);
    assert_eq!(plan.pages[0].url, "http://t/");
    assert_eq!(plan.pages[0].title, "title of http://b/");
    assert_eq!(plan.stored, 3);
}

#[test]
fn read_sets_cover_what_the_plan_looks_at() {
    let items = [
        redirect("http://b/", "http://t/", &["http://l/", "http://a/"]),
        failed("http://a/", "x"),
        page("http://b/", &[]),
    ];
    assert_eq!(
        ingest_urls(&items, Links::Admit),
        vec!["http://a/", "http://b/", "http://l/", "http://t/"]
    );
    assert_eq!(item_urls(&items), vec!["http://a/", "http://b/"]);
    let view = view(
        &[("http://a/", 3, 0, Queued), ("http://b/", 1, 0, Queued)],
        &[],
    );
    assert_eq!(view.crawl_ids(item_urls(&items)), vec![1, 3]);
    assert_eq!(
        view.hosts_to_admit(ingest_links(&items, Links::Admit)),
        vec!["l"]
    );
}

#[test]
fn kept_links_are_offered_as_an_immediate_ingest_would() {
    // Crawl 2 has a depth limit of 3; "http://k/" is known deeper than this path reaches it.
    let view = view(
        &[("http://p/", 2, 1, Queued), ("http://k/", 2, 3, Crawled)],
        &[],
    );
    let items = [page("http://p/", &["http://n/", "http://k/"])];
    let now = plan_ingest(&view, &items, BIG, Links::Admit);
    let kept = plan_ingest(&view, &items, BIG, Links::Defer);
    assert_eq!((kept.links_admitted, kept.links_deferred), (0, 2));
    assert_eq!(
        kept.deferred,
        vec![DeferredLinks {
            crawl_id: 2,
            depth: 2,
            links: match &items[0].outcome {
                IngestOutcome::Page { links, .. } => links.as_slice(),
                IngestOutcome::Failed { .. } => &[],
            },
        }]
    );
    assert_eq!(ingest_urls(&items, Links::Defer), vec!["http://p/"]);
    assert_eq!(ingest_links(&items, Links::Defer).count(), 0);
    // The page's own transition is the same either way; its links wait.
    assert_eq!(kept.inserts, Vec::new());
    assert_eq!(kept.changes.len(), 1);
    // Offered later (the page now crawled), they make the same writes as at once.
    let mut later = view.clone();
    if let Some(p) = later.entries.get_mut("http://p/") {
        p.state = Crawled;
    }
    let batches = [DeferredBatch {
        id: 1,
        crawl_id: 2,
        depth: 2,
        links: vec![cand("http://n/"), cand("http://k/")],
    }];
    let offered = plan_deferred(&later, &batches, BIG);
    assert_eq!(offered.links_admitted, now.links_admitted);
    assert_eq!(offered.inserts, now.inserts);
    let link_changes: Vec<&Change<'_>> = now
        .changes
        .iter()
        .filter(|c| c.url != "http://p/")
        .collect();
    assert_eq!(offered.changes.iter().collect::<Vec<_>>(), link_changes);
    assert_eq!(offered.counts, now.counts);
    // Beyond the depth limit nothing is offered.
    let deep = [DeferredBatch {
        depth: 4,
        ..batches[0].clone()
    }];
    assert_eq!(plan_deferred(&later, &deep, BIG), IngestPlan::default());
}

#[test]
fn kept_links_survive_their_column_text() {
    let links = vec![cand("http://a/\"x\""), cand("http://b/é")];
    assert_eq!(decode_links(&encode_links(&links)).expect("decodes"), links);
    assert!(decode_links("{\"not\": \"pairs\"}").is_err());
}

#[test]
fn plan_seeds_table() {
    // Crawl 3 has a page limit of 4 with 2 admitted; host "full" is at the budget of 2.
    let view = view(&[("http://known/", 1, 0, Queued)], &[("full", 2)]);
    let seeds: Vec<Candidate> = [
        "http://known/",
        "http://s1/",
        "http://s1/",
        "http://full/",
        "http://full/",
        "http://s2/",
        "http://s3/",
    ]
    .iter()
    .map(|u| cand(u))
    .collect();
    let plan = plan_seeds(&view, 3, &seeds, 2);
    let host_refused = Admission::Refused("host full reached its page budget (2)".into());
    let page_refused = Admission::Refused("crawl 3 reached its page limit (4)".into());
    assert_eq!(
        plan.admissions,
        vec![
            Admission::Known("queued"),
            Admission::Admitted,
            Admission::Known("pending"),
            host_refused.clone(),
            host_refused,
            Admission::Admitted,
            page_refused,
        ]
    );
    let inserts: Vec<(&str, u32, State, i64)> = plan
        .inserts
        .iter()
        .map(|i| (i.url, i.depth, i.state, i.crawl_id))
        .collect();
    assert_eq!(
        inserts,
        vec![("http://s1/", 0, Pending, 3), ("http://s2/", 0, Pending, 3)]
    );
    assert_eq!(plan.counts.crawls, vec![(3, 2)]);
    assert_eq!(plan.counts.hosts, vec![("s1", 1), ("s2", 1)]);
    // A crawl whose row is gone is unlimited and keeps no count.
    let plan = plan_seeds(&view, 99, &seeds[1..2], 10);
    assert_eq!(plan.admissions, vec![Admission::Admitted]);
    assert!(plan.counts.crawls.is_empty());
}

#[test]
fn states_round_trip_their_column_names() {
    for state in [Pending, Queued, Crawled, Failed] {
        assert_eq!(State::parse(state.as_str()), Some(state));
    }
    assert_eq!(State::parse("lost"), None);
}
