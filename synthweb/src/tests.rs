//! Tests of the synthetic web. The strongest: an independent reference crawler that knows
//! nothing of the model (it parses the served bytes with `scraper`, reads robots.txt with
//! `texting_robots`, decodes charsets with `encoding_rs`) must find exactly what the oracle
//! says, in memory and over HTTP.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scraper::{Html, Selector};
use url::Url;

use super::*;

fn default_web() -> &'static SyntheticWeb {
    static WEB: std::sync::OnceLock<SyntheticWeb> = std::sync::OnceLock::new();
    WEB.get_or_init(|| SyntheticWeb::generate(&WebSpec::default()))
}

fn page<'a>(web: &'a SyntheticWeb, url: &str) -> Option<&'a Page> {
    let (host, path) = oracle::split(url)?;
    match web.host(host)?.resources.get(path)? {
        Resource::Page(i) => Some(&web.pages[*i]),
        _ => None,
    }
}

// ---------------------------------------------------------------- the reference crawler

/// What a fetch answered.
struct Fetched {
    status: u16,
    content_type: String,
    location: Option<String>,
    body: Vec<u8>,
}

/// What the reference crawler found.
#[derive(Default)]
struct Found {
    indexed: BTreeSet<String>,
    /// Indexed URL -> lowercase words of its title and text.
    text: HashMap<String, HashSet<String>>,
    fetched: BTreeSet<String>,
}

/// A crawler written from the rules, not from the model: breadth-first by shortest depth,
/// robots.txt via texting_robots (agent "homeostat"), redirects followed at the same depth.
async fn reference_crawl<F, Fut>(seeds: &[String], max_depth: Option<u32>, fetch: F) -> Found
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Fetched>,
{
    let anchors = Selector::parse("a[href]").expect("valid selector");
    let metas = Selector::parse("meta[name]").expect("valid selector");
    let canonicals = Selector::parse("link[rel=canonical][href]").expect("valid selector");
    let title = Selector::parse("title").expect("valid selector");
    let body = Selector::parse("body").expect("valid selector");

    let mut robots: HashMap<String, Option<texting_robots::Robot>> = HashMap::new();
    let mut depth: HashMap<String, u32> = HashMap::new();
    let mut queue = VecDeque::new();
    for seed in seeds {
        let seed = normalize(seed).expect("seeds are URLs");
        depth.insert(seed.clone(), 0);
        queue.push_back((seed, 0));
    }
    let mut found = Found::default();
    let mut done = HashSet::new();
    while let Some((url, d)) = queue.pop_front() {
        if depth[&url] < d || !done.insert(url.clone()) {
            continue;
        }
        let parsed = Url::parse(&url).expect("normalized");
        let host = parsed.host_str().expect("http URLs have hosts").to_owned();
        if !robots.contains_key(&host) {
            let answer = fetch(format!("http://{host}/robots.txt")).await;
            let robot = (answer.status == 200).then(|| {
                texting_robots::Robot::new("homeostat", &answer.body).expect("robots.txt parses")
            });
            robots.insert(host.clone(), robot);
        }
        if robots[&host].as_ref().is_some_and(|r| !r.allowed(&url)) {
            continue;
        }
        found.fetched.insert(url.clone());
        let answer = fetch(url.clone()).await;
        let mut push = |to: String, to_depth: u32, front: bool| {
            if depth.get(&to).is_none_or(|&known| known > to_depth) {
                depth.insert(to.clone(), to_depth);
                if front {
                    queue.push_front((to, to_depth));
                } else {
                    queue.push_back((to, to_depth));
                }
            }
        };
        if answer.status == 301 {
            let location = answer.location.expect("redirects have a Location");
            let mut target = parsed.join(&location).expect("valid Location");
            target.set_fragment(None);
            push(target.into(), d, true);
            continue;
        }
        if answer.status != 200 || !answer.content_type.starts_with("text/html") {
            continue;
        }
        let html = decode(&answer.content_type, &answer.body);
        let document = Html::parse_document(&html);
        let mut noindex = false;
        let mut nofollow = false;
        for meta in document.select(&metas) {
            if meta
                .value()
                .attr("name")
                .is_some_and(|n| n.eq_ignore_ascii_case("robots"))
            {
                let content = meta
                    .value()
                    .attr("content")
                    .unwrap_or_default()
                    .to_lowercase();
                for token in content.split(',').map(str::trim) {
                    noindex |= token == "noindex";
                    nofollow |= token == "nofollow";
                }
            }
        }
        let canonical = document
            .select(&canonicals)
            .next()
            .and_then(|c| parsed.join(c.value().attr("href")?).ok())
            .map(|mut c| {
                c.set_fragment(None);
                String::from(c)
            });
        if !noindex && canonical.as_ref().is_none_or(|c| *c == url) {
            found.indexed.insert(url.clone());
            let text: String = document
                .select(&title)
                .chain(document.select(&body))
                .flat_map(|e| e.text())
                .collect::<Vec<_>>()
                .join(" ");
            let words = text
                .split(|c: char| !c.is_alphabetic())
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect();
            found.text.insert(url.clone(), words);
        }
        if max_depth.is_some_and(|max| d >= max) {
            continue;
        }
        if let Some(c) = canonical.filter(|c| *c != url) {
            push(c, d + 1, false);
        }
        if nofollow {
            continue;
        }
        for a in document.select(&anchors) {
            let rel = a.value().attr("rel").unwrap_or_default();
            if rel
                .split_ascii_whitespace()
                .any(|t| t.eq_ignore_ascii_case("nofollow"))
            {
                continue;
            }
            let Ok(mut to) = parsed.join(a.value().attr("href").unwrap_or_default()) else {
                continue;
            };
            if to.scheme() != "http" {
                continue;
            }
            to.set_fragment(None);
            push(to.into(), d + 1, false);
        }
    }
    found
}

/// Decode a page by its header charset, else its `<meta>` charset, else UTF-8.
fn decode(content_type: &str, body: &[u8]) -> String {
    let label = charset_label(content_type).or_else(|| {
        let head = String::from_utf8_lossy(&body[..body.len().min(1024)]).to_lowercase();
        charset_label(&head)
    });
    let encoding = label
        .and_then(|l| encoding_rs::Encoding::for_label(l.as_bytes()))
        .unwrap_or(encoding_rs::UTF_8);
    encoding.decode(body).0.into_owned()
}

fn charset_label(text: &str) -> Option<String> {
    let at = text.to_lowercase().find("charset=")? + "charset=".len();
    let label: String = text[at..]
        .trim_start_matches(['"', '\''])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    (!label.is_empty()).then_some(label)
}

fn in_memory(web: &SyntheticWeb) -> impl Fn(String) -> std::future::Ready<Fetched> + '_ {
    move |url: String| {
        let (host, path) = oracle::split(&url).expect("http URL");
        let answer = web.answer(host, path);
        std::future::ready(Fetched {
            status: answer.status,
            content_type: answer.content_type.to_owned(),
            location: answer.location,
            body: answer.body.to_vec(),
        })
    }
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}

// ---------------------------------------------------------------- determinism

#[test]
fn same_seed_same_web_other_seed_other_web() {
    let spec = WebSpec {
        pages: 800,
        hosts: 9,
        ..WebSpec::default()
    };
    let a = SyntheticWeb::generate(&spec);
    let b = SyntheticWeb::generate(&spec);
    assert_eq!(a.hosts(), b.hosts());
    assert_eq!(a.expect(&a.seeds(), None), b.expect(&b.seeds(), None));
    assert_eq!(a.stats(), b.stats());
    assert_eq!(a.rare_words(20), b.rare_words(20));
    for (pa, pb) in a.pages.iter().zip(&b.pages) {
        assert_eq!(pa.url, pb.url);
        assert_eq!(pa.body, pb.body);
    }
    let c = SyntheticWeb::generate(&WebSpec { seed: 8, ..spec });
    assert_ne!(a.hosts(), c.hosts());
    assert_ne!(a.expect(&a.seeds(), None), c.expect(&c.seeds(), None));
    let home = format!("http://{}/", a.hosts()[1]);
    let home_c = format!("http://{}/", c.hosts()[1]);
    assert_ne!(a.body(&home), c.body(&home_c));
}

/// Pinned: the default web is the same on every machine and after every refactor that does not
/// mean to change it. Update deliberately (and say so) when the generator changes.
#[test]
fn default_web_is_pinned() {
    let web = default_web();
    assert_eq!(web.page_count(), 2000);
    assert_eq!(web.hosts().len(), 20);
    let expected = web.expect(&web.seeds(), None);
    // FNV-1a, stable everywhere.
    let fnv = |h: u64, bytes: &[u8]| {
        bytes
            .iter()
            .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    };
    let offset = 0xcbf2_9ce4_8422_2325_u64;
    let urls = expected
        .iter()
        .fold(offset, |h, url| fnv(h, url.as_bytes()));
    let bodies = web.pages.iter().fold(offset, |h, page| fnv(h, &page.body));
    println!("hosts {:?}", web.hosts());
    println!("pinned ({}, {urls:#x}, {bodies:#x})", expected.len());
    assert_eq!(web.seeds()[0], PINNED_FIRST_SEED);
    assert_eq!((expected.len(), urls, bodies), PINNED_EXPECTED);
}

const PINNED_FIRST_SEED: &str = "http://shop.h0-hazel.test/";
const PINNED_EXPECTED: (usize, u64, u64) = (1801, 0x0462_2da9_f268_d075, 0x4e86_1340_17b3_0dd6);

// ---------------------------------------------------------------- the oracle

#[test]
fn expect_covers_most_pages_and_nothing_unindexable() {
    let web = default_web();
    let expected = web.expect(&web.seeds(), None);
    assert!(
        expected.len() * 10 > web.page_count() * 8,
        "{} of {} pages expected",
        expected.len(),
        web.page_count()
    );
    for url in &expected {
        assert!(!web.disallowed(url), "{}", web.describe(url));
        assert!(!url.contains("/go/"), "{}", web.describe(url));
        let page = page(web, url).unwrap_or_else(|| panic!("{}", web.describe(url)));
        assert!(page.indexable(), "{}", web.describe(url));
        assert!(!page.noindex, "{}", web.describe(url));
        assert_ne!(page.kind, PageKind::NofollowOnly, "{}", web.describe(url));
        assert_ne!(page.kind, PageKind::Variant, "{}", web.describe(url));
        assert_eq!(normalize(url).as_deref(), Some(url.as_str()));
    }
    // Every page meant to be reachable is found, and none of those meant not to be.
    for page in &web.pages {
        let meant = match page.kind {
            PageKind::Home
            | PageKind::Linked
            | PageKind::MetaNofollow
            | PageKind::RedirectOnly
            | PageKind::CanonicalOnly => page.indexable(),
            PageKind::Private => !web.disallowed(&page.url) && page.indexable(),
            PageKind::NofollowOnly | PageKind::Variant => false,
        };
        assert_eq!(
            expected.contains(&page.url),
            meant,
            "{}",
            web.describe(&page.url)
        );
    }
    // Every feature is present in the default web.
    let stats = web.stats();
    println!("{stats:#?}");
    for (name, count) in [
        ("hosts_without_robots", stats.hosts_without_robots),
        ("hosts_with_extra_disallow", stats.hosts_with_extra_disallow),
        ("noindex", stats.noindex),
        ("meta_nofollow", stats.meta_nofollow),
        ("nofollow_only", stats.nofollow_only),
        ("disallowed", stats.disallowed),
        ("private_allowed", stats.private_allowed),
        ("redirects", stats.redirects),
        ("redirect_only", stats.redirect_only),
        ("canonical_variants", stats.canonical_variants),
        ("canonical_only", stats.canonical_only),
        ("self_canonical", stats.self_canonical),
        ("latin1_header", stats.latin1_header),
        ("latin1_meta", stats.latin1_meta),
        ("utf8_meta_only", stats.utf8_meta_only),
        ("files", stats.files),
        ("broken_links", stats.broken_links),
        ("nofollow_links", stats.nofollow_links),
    ] {
        assert!(count > 0, "no {name} in the default web");
    }
    assert!((1..=2).contains(&stats.hosts_without_robots));
}

#[test]
fn depth_limits() {
    let web = default_web();
    let seeds = web.seeds();
    let zero = web.expect(&seeds, Some(0));
    let indexable_seeds: BTreeSet<String> = seeds
        .iter()
        .filter(|s| page(web, s).is_some_and(Page::indexable))
        .cloned()
        .collect();
    assert_eq!(zero, indexable_seeds);
    assert_eq!(zero.len(), 3);
    let mut previous = zero;
    for depth in 1..=10 {
        let next = web.expect(&seeds, Some(depth));
        assert!(previous.is_subset(&next), "depth {depth}");
        assert!(depth > 4 || previous.len() < next.len(), "depth {depth}");
        previous = next;
    }
    assert_eq!(previous, web.expect(&seeds, None));
    // A single page seed, and a redirect seed, which indexes its target at depth 0.
    let (go, target) = web.hosts[0]
        .resources
        .iter()
        .find_map(|(path, r)| match r {
            Resource::Redirect { target, .. } => Some((path.clone(), target.clone())),
            _ => None,
        })
        .expect("host 0 has redirects");
    let go = format!("http://{}{go}", web.hosts[0].name);
    let from_go = web.expect(&[go], Some(0));
    let target_indexable = page(web, &target).is_some_and(Page::indexable);
    assert_eq!(from_go.contains(&target), target_indexable);
    assert_eq!(from_go.len(), usize::from(target_indexable));
}

#[test]
fn reference_crawler_agrees_with_the_oracle() {
    let web = default_web();
    let seeds = web.seeds();
    for max_depth in [None, Some(0), Some(1), Some(2), Some(4)] {
        let found = block_on(reference_crawl(&seeds, max_depth, in_memory(web)));
        let expected = web.expect(&seeds, max_depth);
        let missing: Vec<_> = expected
            .difference(&found.indexed)
            .map(|u| web.describe(u))
            .collect();
        let extra: Vec<_> = found
            .indexed
            .difference(&expected)
            .map(|u| web.describe(u))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "depth {max_depth:?}: missing {missing:#?} extra {extra:#?}"
        );
        assert_eq!(
            found.fetched,
            web.fetched(&seeds, max_depth),
            "depth {max_depth:?}"
        );
    }
    // Other seed sets: one small host's home alone.
    let lone = vec![format!("http://{}/", web.hosts().last().expect("hosts"))];
    let found = block_on(reference_crawl(&lone, Some(2), in_memory(web)));
    assert_eq!(found.indexed, web.expect(&lone, Some(2)));
}

#[test]
fn reference_crawler_agrees_on_many_seeds_and_sizes() {
    for seed in 0..12 {
        for (pages, hosts) in [(1, 1), (7, 3), (60, 4), (400, 12)] {
            let web = SyntheticWeb::generate(&WebSpec {
                seed,
                pages,
                hosts,
                ..WebSpec::default()
            });
            assert_eq!(web.page_count(), pages.max(hosts.min(pages)));
            let seeds = web.seeds();
            let found = block_on(reference_crawl(&seeds, None, in_memory(&web)));
            assert_eq!(
                found.indexed,
                web.expect(&seeds, None),
                "seed {seed} pages {pages}"
            );
            assert!(!found.indexed.is_empty());
        }
    }
}

#[test]
fn rare_words_are_exact() {
    let web = default_web();
    let rare = web.rare_words(40);
    assert_eq!(rare.len(), 40);
    assert!(
        !rare[0].0.is_ascii(),
        "the first rare word is a Latin-1 one: {rare:?}"
    );
    let found = block_on(reference_crawl(&web.seeds(), None, in_memory(web)));
    for (word, urls) in &rare {
        assert!((1..=5).contains(&urls.len()));
        let mut having: Vec<&String> = found
            .text
            .iter()
            .filter(|(_, words)| words.contains(word))
            .map(|(url, _)| url)
            .collect();
        having.sort();
        let urls: Vec<&String> = urls.iter().collect();
        assert_eq!(having, urls, "pages with {word:?}");
    }
}

#[test]
fn big_webs_still_have_rare_words() {
    let started = Instant::now();
    let web = SyntheticWeb::generate(&WebSpec {
        pages: 5000,
        hosts: 50,
        ..WebSpec::default()
    });
    // Speed is the benchmarks' business (`loadtest bench`), not a test's: printed, not asserted.
    println!("5000 pages in {:?}", started.elapsed());
    assert_eq!(web.page_count(), 5000);
    assert!(web.rare_words(50).len() == 50);
    let expected = web.expect(&web.seeds(), None);
    assert!(expected.len() * 10 > web.page_count() * 8);
}

#[test]
fn normalization() {
    for (raw, normal) in [
        ("HTTP://WWW.H1-Amber.TEST", "http://www.h1-amber.test/"),
        (
            "http://www.h1-amber.test:80/p/./a/../1.html#x",
            "http://www.h1-amber.test/p/1.html",
        ),
        (
            "http://h.test/p/1.html?print=1",
            "http://h.test/p/1.html?print=1",
        ),
    ] {
        assert_eq!(normalize(raw).as_deref(), Some(normal));
    }
    assert_eq!(normalize("mailto:a@h.test"), None);
    assert_eq!(normalize("/p/1.html"), None);
    let web = default_web();
    assert!(!web.disallowed(&web.seeds()[0]));
    assert!(web.disallowed(&format!("http://{}/private/1.html", web.hosts[0].name)));
}

// ---------------------------------------------------------------- the server

struct Running {
    addr: SocketAddr,
    log: ServedLog,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(web: Arc<SyntheticWeb>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound");
    let log = ServedLog::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(web, listener, log.clone(), async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        log,
        stop: Some(stop),
        task,
    }
}

impl Running {
    /// A client that reaches every host of `web` on this server, following no redirects.
    fn client(&self, web: &SyntheticWeb) -> reqwest::Client {
        web.hosts()
            .iter()
            .fold(reqwest::Client::builder(), |b, host| {
                b.resolve(host, self.addr)
            })
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("client")
    }

    /// The port-free URL itself: `resolve` sends it to this server's port (reqwest uses the
    /// overridden address's port when the URL has none, see `reqwest::ClientBuilder::resolve`).
    fn url(&self, url: &str) -> String {
        url.to_owned()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("server task").expect("server");
    }
}

#[tokio::test]
async fn serves_pages_robots_redirects_latin1_and_404s() {
    let web = Arc::new(SyntheticWeb::generate(&WebSpec::default()));
    let server = start(web.clone()).await;
    let client = server.client(&web);
    let home = &web.seeds()[0];

    let response = client.get(server.url(home)).send().await.expect("home");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    let body = response.text().await.expect("body");
    assert!(body.contains("<a href="));

    let host0 = &web.hosts[0].name;
    let robots = client
        .get(server.url(&format!("http://{host0}/robots.txt")))
        .send()
        .await
        .expect("robots");
    assert_eq!(robots.status(), 200);
    assert!(robots
        .text()
        .await
        .expect("robots body")
        .contains("Disallow: /private/\n"));
    let bare = web
        .hosts
        .iter()
        .find(|h| h.robots.is_none())
        .expect("a host without robots.txt");
    let robots = client
        .get(server.url(&format!("http://{}/robots.txt", bare.name)))
        .send()
        .await
        .expect("robots");
    assert_eq!(robots.status(), 404);

    let (go, location, target) = web.hosts[0]
        .resources
        .iter()
        .find_map(|(path, r)| match r {
            Resource::Redirect { location, target } => {
                Some((path.clone(), location.clone(), target.clone()))
            }
            _ => None,
        })
        .expect("host 0 has redirects");
    let response = client
        .get(server.url(&format!("http://{host0}{go}")))
        .send()
        .await
        .expect("redirect");
    assert_eq!(response.status(), 301);
    assert_eq!(response.headers()["location"], location.as_str());
    let resolved = Url::parse(&format!("http://{host0}{go}")).and_then(|u| u.join(&location));
    assert_eq!(resolved.map(String::from).ok(), Some(target));

    // The rare Latin-1 word, on a page whose bytes are windows-1252.
    let (word, urls) = web.rare_words(1).remove(0);
    assert!(!word.is_ascii());
    let response = client
        .get(server.url(&urls[0]))
        .send()
        .await
        .expect("latin-1 page");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let bytes = response.bytes().await.expect("bytes");
    assert!(
        std::str::from_utf8(&bytes).is_err(),
        "Latin-1 bytes are not UTF-8"
    );
    assert!(decode(&content_type, &bytes).contains(&word));

    let response = client
        .get(format!("http://127.0.0.1:{}/", server.addr.port()))
        .header("host", "nowhere.test")
        .send()
        .await
        .expect("unknown host");
    assert_eq!(response.status(), 404);
    // A port in the Host header is ignored.
    let response = client
        .get(format!("http://127.0.0.1:{}/", server.addr.port()))
        .header(
            "host",
            format!("{}:{}", host0.to_uppercase(), server.addr.port()),
        )
        .send()
        .await
        .expect("host with port");
    assert_eq!(response.status(), 200);
    let response = client
        .get(server.url(&format!("http://{host0}/no/such/page.html")))
        .send()
        .await
        .expect("unknown path");
    assert_eq!(response.status(), 404);

    let log = server.log.snapshot();
    let seen: Vec<(&str, &str, u16)> = log
        .iter()
        .map(|s| (s.host.as_str(), s.path.as_str(), s.status))
        .collect();
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert_eq!(seen[0], (oracle::split(home).expect("url").0, "/", 200));
    assert_eq!(seen[1], (host0.as_str(), "/robots.txt", 200));
    assert_eq!(seen[2], (bare.name.as_str(), "/robots.txt", 404));
    assert_eq!(seen[3], (host0.as_str(), go.as_str(), 301));
    assert_eq!(seen[5], ("nowhere.test", "/", 404));
    assert_eq!(seen[6], (host0.as_str(), "/", 200));
    assert_eq!(seen[7].2, 404);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(server.log.len(), 8);
    server.stop().await;
}

/// The server also answers as an HTTP proxy would be asked (absolute-form request target), so a
/// crawler can reach every `.test` host through one `reqwest::Proxy`.
#[tokio::test]
async fn answers_proxy_style_requests() {
    let web = Arc::new(SyntheticWeb::generate(&WebSpec {
        pages: 50,
        hosts: 3,
        ..WebSpec::default()
    }));
    let server = start(web.clone()).await;
    let proxy = reqwest::Proxy::http(format!("http://{}", server.addr)).expect("proxy");
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .build()
        .expect("client");
    for seed in web.seeds() {
        let response = client.get(&seed).send().await.expect("through the proxy");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.bytes().await.expect("body"),
            web.body(&seed).expect("a page")
        );
    }
    let log = server.log.snapshot();
    assert_eq!(log.len(), web.seeds().len());
    assert!(log.iter().all(|s| s.path == "/" && s.status == 200));
    server.stop().await;
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let web = Arc::new(SyntheticWeb::generate(&WebSpec {
        pages: 20,
        hosts: 2,
        latency: Duration::from_millis(60),
        ..WebSpec::default()
    }));
    let server = start(web.clone()).await;
    let client = server.client(&web);
    let started = Instant::now();
    let response = client
        .get(server.url(&web.seeds()[0]))
        .send()
        .await
        .expect("home");
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(60));
    server.stop().await;
}

/// The reference crawler over real HTTP finds what the oracle says, and the server log shows
/// it fetched no disallowed URL.
#[tokio::test]
async fn reference_crawl_over_http_agrees() {
    let web = Arc::new(SyntheticWeb::generate(&WebSpec {
        seed: 3,
        pages: 400,
        hosts: 8,
        ..WebSpec::default()
    }));
    let server = start(web.clone()).await;
    let client = server.client(&web);
    let fetch = |url: String| {
        let client = client.clone();
        let url = server.url(&url);
        async move {
            let response = client.get(url).send().await.expect("fetch");
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            Fetched {
                status: response.status().as_u16(),
                content_type: header("content-type").unwrap_or_default(),
                location: header("location"),
                body: response.bytes().await.expect("body").to_vec(),
            }
        }
    };
    let seeds = web.seeds();
    let found = reference_crawl(&seeds, None, fetch).await;
    assert_eq!(found.indexed, web.expect(&seeds, None));
    let log = server.log.snapshot();
    assert_eq!(log.len(), found.fetched.len() + web.hosts().len());
    for served in &log {
        let url = format!("http://{}{}", served.host, served.path);
        assert!(!web.disallowed(&url), "{url} fetched");
    }
    server.stop().await;
}

/// Requests per second of the server with a client in the same process (so a lower bound),
/// every answer checked: `cargo test --workspace --release --lib -- --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput() {
    let web = Arc::new(SyntheticWeb::generate(&WebSpec::default()));
    let server = start(web.clone()).await;
    let client = server.client(&web);
    let urls: Arc<Vec<String>> = Arc::new(web.expect(&web.seeds(), None).into_iter().collect());
    let started = Instant::now();
    let run_for = Duration::from_secs(1);
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let client = client.clone();
            let urls = urls.clone();
            tokio::spawn(async move {
                let mut done = 0usize;
                while started.elapsed() < run_for {
                    let url = &urls[(t * 7919 + done * 31) % urls.len()];
                    let response = client.get(url).send().await.expect("fetch");
                    assert_eq!(response.status(), 200);
                    response.bytes().await.expect("body");
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!("{total} requests, {rate:.0} per second");
    assert_eq!(server.log.len(), total);
    server.stop().await;
}
