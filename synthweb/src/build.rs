//! Generation of the synthetic web from a seed: hosts, pages, text, links, then rendering.
//!
//! Every random choice comes from one `ChaCha8Rng` seeded with the spec's seed, consumed in a
//! fixed order (no hash-map iteration), so a seed gives the same web on every machine.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use url::Url;

use super::oracle::resolve;
use super::render::{self, Head, Link, Text};
use super::vocabulary::{Vocabulary, Zipf};
use super::{
    Charset, Host, Page, PageKind, Resource, SyntheticWeb, WebSpec, WebStats, HOST_SUFFIX,
};

const HOST_TAGS: &[&str] = &[
    "amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heath", "iris", "juniper",
    "kelp", "lotus", "maple", "nectar", "onyx", "pine", "quartz", "reef", "sage", "tundra",
    "umber", "violet", "willow", "xenon", "yarrow", "zinc", "aspen", "basalt", "coral", "dune",
    "elm", "fern", "garnet", "hazel", "indigo", "jade", "kestrel", "lichen", "moss", "nova",
];
/// Repeated entries make `www.` the most common.
const HOST_PREFIXES: &[&str] = &[
    "www.", "www.", "www.", "www.", "", "blog.", "docs.", "shop.",
];
/// Host-specific prefixes robots.txt disallows besides `/private/`.
const EXTRA_DISALLOW: &[&str] = &["/drafts/", "/tmp/", "/cgi-bin/", "/staff/", "/archive/old/"];
/// User agents some robots.txt files shut out entirely: a crawler must use the `*` group.
const DECOY_AGENTS: &[&str] = &["SlurpyBot", "ArchiveCrab", "mega-indexer"];
const NOFOLLOW_RELS: &[&str] = &[
    "nofollow",
    "nofollow",
    "external nofollow",
    "nofollow noopener",
    "ugc nofollow",
];
const FOLLOW_RELS: &[&str] = &["noopener", "external", "noopener noreferrer"];

/// A page before rendering.
struct Draft {
    host: usize,
    path: String,
    kind: PageKind,
    noindex: bool,
    meta_nofollow: bool,
    charset: Charset,
    charset_label: &'static str,
    /// The canonical href as written in the page.
    canonical: Option<String>,
    /// The page whose text and links this page shows: itself, or a variant's base.
    content: usize,
    text: Text,
    links: Vec<Link>,
}

struct HostPlan {
    name: String,
    robots_missing: bool,
    extra_disallow: Option<&'static str>,
    decoy_agent: Option<&'static str>,
    /// Home first, then the `Linked` pages in tree order: node `j` links nodes `4j+1..=4j+4`.
    spine: Vec<usize>,
    meta_nofollow: Vec<usize>,
    nofollow_only: Vec<usize>,
    private: Vec<usize>,
    variants: Vec<usize>,
    /// `/go/K` -> (Location header, target page).
    redirects: Vec<(String, String, usize)>,
    files: Vec<(String, &'static str)>,
    broken: Vec<String>,
    /// Pages other pages link to at random, most popular first.
    popular: Vec<usize>,
    popularity: Zipf,
}

struct Builder {
    rng: ChaCha8Rng,
    vocabulary: Vocabulary,
    words: Zipf,
    drafts: Vec<Draft>,
    plans: Vec<HostPlan>,
    host_popularity: Zipf,
}

pub(crate) fn generate(spec: &WebSpec) -> SyntheticWeb {
    let host_count = spec.hosts.clamp(1, spec.pages.max(1));
    let page_total = spec.pages.max(host_count);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let vocabulary = Vocabulary::generate(&mut rng, vocabulary_size(page_total));
    // The most common word is ~6% of the text, like "the" in English.
    let words = Zipf::mandelbrot(vocabulary.ascii, 1.3, 5.0);
    let mut builder = Builder {
        rng,
        vocabulary,
        words,
        drafts: Vec::with_capacity(page_total),
        plans: Vec::with_capacity(host_count),
        host_popularity: Zipf::new(host_count, 1.0),
    };
    let sizes = host_sizes(page_total, host_count);
    builder.plan_hosts(&sizes);
    builder.link();
    builder.finish(spec)
}

/// Chosen so that, with the word distribution above and ~190 words a page, the last words of
/// the vocabulary occur about twice and hundreds of words occur on 1 to 5 pages, whatever the
/// size of the web (2,000 pages: ~6,000 words).
fn vocabulary_size(pages: usize) -> usize {
    ((pages as f64 * 43.0).powf(0.77) as usize).clamp(2000, 60_000)
}

/// Pages per host: a power law (host 0 biggest), every host at least its home page, summing to
/// `pages` exactly (largest remainders).
fn host_sizes(pages: usize, hosts: usize) -> Vec<usize> {
    let weights: Vec<f64> = (1..=hosts).map(|r| (r as f64).powf(-1.2)).collect();
    let total: f64 = weights.iter().sum();
    let spare = pages - hosts;
    let shares: Vec<f64> = weights.iter().map(|w| w / total * spare as f64).collect();
    let mut sizes: Vec<usize> = shares.iter().map(|s| 1 + *s as usize).collect();
    let mut order: Vec<usize> = (0..hosts).collect();
    order.sort_by(|&a, &b| {
        let fa = shares[a].fract();
        let fb = shares[b].fract();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let assigned: usize = sizes.iter().sum();
    for &i in order.iter().take(pages - assigned) {
        sizes[i] += 1;
    }
    sizes
}

impl Builder {
    fn plan_hosts(&mut self, sizes: &[usize]) {
        let hosts = sizes.len();
        let missing = match hosts {
            0 | 1 => 0,
            2..=9 => 1,
            _ => 2,
        };
        // Among the bigger half, so that their allowed `/private/` pages get crawled.
        let mut candidates: Vec<usize> = (1..hosts.div_ceil(2).max(2).min(hosts)).collect();
        candidates.shuffle(&mut self.rng);
        let without_robots: HashSet<usize> = candidates.into_iter().take(missing).collect();
        for (h, &size) in sizes.iter().enumerate() {
            let prefix = HOST_PREFIXES[self.rng.random_range(0..HOST_PREFIXES.len())];
            let tag = HOST_TAGS[self.rng.random_range(0..HOST_TAGS.len())];
            let name = format!("{prefix}h{h}-{tag}{HOST_SUFFIX}");
            let robots_missing = without_robots.contains(&h);
            let extra_disallow = (!robots_missing && self.rng.random_bool(0.4))
                .then(|| EXTRA_DISALLOW[self.rng.random_range(0..EXTRA_DISALLOW.len())]);
            let decoy_agent = (!robots_missing && self.rng.random_bool(0.3))
                .then(|| DECOY_AGENTS[self.rng.random_range(0..DECOY_AGENTS.len())]);
            let plan = HostPlan {
                name,
                robots_missing,
                extra_disallow,
                decoy_agent,
                spine: Vec::new(),
                meta_nofollow: Vec::new(),
                nofollow_only: Vec::new(),
                private: Vec::new(),
                variants: Vec::new(),
                redirects: Vec::new(),
                files: Vec::new(),
                broken: Vec::new(),
                popular: Vec::new(),
                popularity: Zipf::new(1, 1.0),
            };
            self.plans.push(plan);
            self.plan_pages(h, size);
        }
    }

    /// Decide the pages of host `h`, their paths and flags, and its other resources.
    fn plan_pages(&mut self, h: usize, size: usize) {
        let home = self.draft(h, "/".to_owned(), PageKind::Home);
        let mut numbered = Vec::new(); // pages under /p/
        let mut linked = Vec::new();
        let mut private = Vec::new();
        let mut redirect_only = Vec::new();
        let mut meta_nofollow = Vec::new();
        let mut nofollow_only = Vec::new();
        // Variants to make: `Some(page)` for a canonical-only base, `None` for a linked one.
        let mut variants: Vec<Option<usize>> = Vec::new();
        let slots = size - 1;
        // Hosts without robots.txt get allowed `/private/` pages, hosts with an extra
        // disallowed prefix a page under it.
        let guaranteed = if self.plans[h].robots_missing {
            2
        } else {
            usize::from(self.plans[h].extra_disallow.is_some())
        };
        let mut used = guaranteed.min(slots);
        for _ in 0..used {
            private.push(self.draft(h, String::new(), PageKind::Private));
        }
        while used < slots {
            let r: f64 = self.rng.random();
            used += 1;
            if r < 0.045 {
                private.push(self.draft(h, String::new(), PageKind::Private));
            } else if r < 0.065 {
                let d = self.draft(h, String::new(), PageKind::NofollowOnly);
                nofollow_only.push(d);
                numbered.push(d);
            } else if r < 0.075 {
                let d = self.draft(h, String::new(), PageKind::RedirectOnly);
                redirect_only.push(d);
                numbered.push(d);
            } else if r < 0.085 {
                variants.push(None);
            } else if r < 0.095 && used < slots {
                used += 1;
                let d = self.draft(h, String::new(), PageKind::CanonicalOnly);
                numbered.push(d);
                variants.push(Some(d));
            } else if r < 0.115 {
                let d = self.draft(h, String::new(), PageKind::MetaNofollow);
                meta_nofollow.push(d);
                numbered.push(d);
            } else {
                let d = self.draft(h, String::new(), PageKind::Linked);
                linked.push(d);
                numbered.push(d);
            }
        }
        if linked.is_empty() {
            // Variants of linked pages need one: they become the linked pages instead.
            for _ in variants.iter().filter(|v| v.is_none()) {
                let d = self.draft(h, String::new(), PageKind::Linked);
                linked.push(d);
                numbered.push(d);
            }
            variants.retain(Option::is_some);
        }

        // Paths.
        let mut numbers: Vec<usize> = (1..=numbered.len()).collect();
        numbers.shuffle(&mut self.rng);
        for (&d, n) in numbered.iter().zip(&numbers) {
            self.drafts[d].path = format!("/p/{n}.html");
        }
        let extra = self.plans[h].extra_disallow;
        let mut per_dir: HashMap<&'static str, usize> = HashMap::new();
        for (i, &d) in private.iter().enumerate() {
            let dir = match extra {
                Some(extra) if i == 0 || self.rng.random_bool(0.5) => extra,
                _ => "/private/",
            };
            let n = per_dir.entry(dir).or_insert(0);
            *n += 1;
            self.drafts[d].path = format!("{dir}{n}.html");
        }
        let mut prints: HashMap<usize, usize> = HashMap::new();
        let mut variant_pages = Vec::new();
        for base in variants {
            let base = base.unwrap_or_else(|| linked[self.rng.random_range(0..linked.len())]);
            let k = prints.entry(base).or_insert(0);
            *k += 1;
            let base_path = self.drafts[base].path.clone();
            let path = format!("{base_path}?print={k}");
            let d = self.draft(h, path, PageKind::Variant);
            let canonical = self.canonical_href(h, &base_path);
            let variant = &mut self.drafts[d];
            variant.content = base;
            variant.canonical = Some(canonical);
            variant_pages.push(d);
        }

        // Flags.
        for &d in &linked {
            self.drafts[d].noindex = self.rng.random_bool(0.035);
            let r: f64 = self.rng.random();
            let (charset, label) = if r < 0.01 {
                let label = if self.rng.random_bool(0.5) {
                    "windows-1252"
                } else {
                    "ISO-8859-1"
                };
                (Charset::Latin1Header, label)
            } else if r < 0.02 {
                let label = if self.rng.random_bool(0.5) {
                    "windows-1252"
                } else {
                    "iso-8859-1"
                };
                (Charset::Latin1Meta, label)
            } else if r < 0.05 {
                (Charset::Utf8Meta, "utf-8")
            } else {
                (Charset::Utf8Header, "utf-8")
            };
            self.drafts[d].charset = charset;
            self.drafts[d].charset_label = label;
        }
        for &d in &meta_nofollow {
            self.drafts[d].meta_nofollow = true;
            self.drafts[d].noindex = self.rng.random_bool(0.25);
        }
        let own_canonical: Vec<usize> = std::iter::once(home)
            .chain(linked.iter().copied())
            .chain(nofollow_only.iter().copied())
            .chain(private.iter().copied())
            .chain(redirect_only.iter().copied())
            .chain(meta_nofollow.iter().copied())
            .collect();
        for d in own_canonical {
            if self.rng.random_bool(0.2) {
                let path = self.drafts[d].path.clone();
                self.drafts[d].canonical = Some(self.canonical_href(h, &path));
            }
        }

        // Text (variants show their base's).
        let own_text: Vec<usize> = (home..self.drafts.len())
            .filter(|&d| self.drafts[d].kind != PageKind::Variant)
            .collect();
        for d in own_text {
            self.drafts[d].text = self.text(self.drafts[d].charset.is_latin1());
        }

        // Other resources.
        let mut goes: Vec<usize> = redirect_only.clone();
        let extra_redirects = (linked.len() as f64 * 0.012).round() as usize;
        for _ in 0..extra_redirects {
            goes.push(linked[self.rng.random_range(0..linked.len())]);
        }
        let mut go_numbers: Vec<usize> = (1..=goes.len()).collect();
        go_numbers.shuffle(&mut self.rng);
        for (&target, n) in goes.iter().zip(&go_numbers) {
            let target_path = &self.drafts[target].path;
            let location = match self.rng.random_range(0..3) {
                0 => target_path.clone(),
                1 => format!("http://{}{target_path}", self.plans[h].name),
                _ => format!("..{target_path}"),
            };
            self.plans[h]
                .redirects
                .push((format!("/go/{n}"), location, target));
        }
        let first = usize::from(h == 0);
        let files = (size as f64 * 0.008).round() as usize + first;
        for k in 1..=files {
            let file = if self.rng.random_bool(0.75) {
                (format!("/files/{k}.pdf"), "application/pdf")
            } else {
                (format!("/img/{k}.png"), "image/png")
            };
            self.plans[h].files.push(file);
        }
        let broken = (size as f64 * 0.008).round() as usize + first;
        for k in 1..=broken {
            let path = if self.rng.random_bool(0.5) {
                format!("/p/{}.html", numbered.len() + k)
            } else {
                format!("/old/{k}.html")
            };
            self.plans[h].broken.push(path);
        }

        linked.shuffle(&mut self.rng);
        let mut spine = vec![home];
        spine.extend(linked);
        let mut popular: Vec<usize> = spine.iter().chain(&meta_nofollow).copied().collect();
        popular.shuffle(&mut self.rng);
        let plan = &mut self.plans[h];
        plan.popularity = Zipf::new(popular.len(), 1.0);
        plan.popular = popular;
        plan.spine = spine;
        plan.meta_nofollow = meta_nofollow;
        plan.nofollow_only = nofollow_only;
        plan.private = private;
        plan.variants = variant_pages;
        // Redirect-only pages are reached through their `/go/` link only: nothing else to do.
    }

    fn draft(&mut self, host: usize, path: String, kind: PageKind) -> usize {
        let d = self.drafts.len();
        self.drafts.push(Draft {
            host,
            path,
            kind,
            noindex: false,
            meta_nofollow: false,
            charset: Charset::Utf8Header,
            charset_label: "utf-8",
            canonical: None,
            content: d,
            text: Text {
                title: Vec::new(),
                paragraphs: Vec::new(),
            },
            links: Vec::new(),
        });
        d
    }

    /// A canonical href naming `path` on host `h`, in one of the forms sites use.
    fn canonical_href(&mut self, h: usize, path: &str) -> String {
        let name = &self.plans[h].name;
        match self.rng.random_range(0..10) {
            0..=4 => format!("http://{name}{path}"),
            5 => format!("http://{}{path}", name.to_ascii_uppercase()),
            6..=8 => path.to_owned(),
            _ => relative(&mut self.rng, path, path),
        }
    }

    fn text(&mut self, latin1: bool) -> Text {
        let title_len = self.rng.random_range(2..=6);
        let mut title: Vec<u32> = (0..title_len).map(|_| self.word()).collect();
        let total = self.rng.random_range(80..=300);
        let count = self.rng.random_range(2..=5);
        let mut paragraphs: Vec<Vec<u32>> = (0..count)
            .map(|i| {
                let len = total / count + usize::from(i < total % count);
                (0..len).map(|_| self.word()).collect()
            })
            .collect();
        if latin1 {
            let latin = self.vocabulary.latin_ids();
            for _ in 0..self.rng.random_range(1..=3) {
                let word = self.rng.random_range(latin.clone());
                let p = self.rng.random_range(0..paragraphs.len());
                let at = self.rng.random_range(1..=paragraphs[p].len());
                paragraphs[p].insert(at, word);
                if self.rng.random_bool(0.3) {
                    title.push(word);
                }
            }
        }
        Text { title, paragraphs }
    }

    fn word(&mut self) -> u32 {
        self.words.sample(&mut self.rng) as u32
    }

    fn anchor(&mut self) -> Vec<u32> {
        let len = self.rng.random_range(1..=3);
        (0..len).map(|_| self.word()).collect()
    }

    /// Give every page that shows its own content its links.
    fn link(&mut self) {
        let hosts = self.plans.len();
        for h in 0..hosts {
            let spine = self.plans[h].spine.clone();
            let home = spine[0];
            // The tree: node j links nodes 4j+1..=4j+4, so followed links reach every linked page.
            for (j, &parent) in spine.iter().enumerate() {
                for &child in spine.iter().skip(4 * j + 1).take(4) {
                    self.add_link(parent, h, child, None);
                }
            }
            // Home pages form a ring, and host 0's home is the hub linking every home.
            if hosts > 1 {
                let next = (h + 1) % hosts;
                let next_home = self.plans[next].spine[0];
                self.add_link(home, next, next_home, None);
                if h == 0 {
                    for other in 2..hosts {
                        let other_home = self.plans[other].spine[0];
                        self.add_link(home, other, other_home, None);
                    }
                }
            }
            // Pages reached through links placed on followed pages.
            let placements: Vec<(usize, usize, Option<&'static str>)> = {
                let plan = &self.plans[h];
                let mut p = Vec::new();
                for &d in &plan.meta_nofollow {
                    p.push((d, 2, None));
                }
                for &d in &plan.private {
                    p.push((d, 3, None));
                }
                for &d in &plan.variants {
                    p.push((d, 2, None));
                }
                for &d in &plan.nofollow_only {
                    p.push((d, 2, Some("nofollow")));
                }
                p
            };
            for (target, most, rel) in placements {
                for _ in 0..self.rng.random_range(1..=most) {
                    let source = spine[self.rng.random_range(0..spine.len())];
                    let rel =
                        rel.map(|_| NOFOLLOW_RELS[self.rng.random_range(0..NOFOLLOW_RELS.len())]);
                    self.add_link(source, h, target, rel);
                }
            }
            // Pages behind nofollow links are also linked normally from meta-nofollow pages,
            // whose links a crawler must not follow either.
            let (meta_nofollow, nofollow_only) = {
                let plan = &self.plans[h];
                (plan.meta_nofollow.clone(), plan.nofollow_only.clone())
            };
            if !meta_nofollow.is_empty() {
                for target in nofollow_only {
                    if self.rng.random_bool(0.5) {
                        let source = meta_nofollow[self.rng.random_range(0..meta_nofollow.len())];
                        self.add_link(source, h, target, None);
                    }
                }
            }
            // Redirects, files and broken links.
            let extra_paths: Vec<String> = {
                let plan = &self.plans[h];
                plan.redirects
                    .iter()
                    .map(|(path, _, _)| path.clone())
                    .chain(plan.files.iter().map(|(path, _)| path.clone()))
                    .chain(plan.broken.iter().cloned())
                    .collect()
            };
            for path in extra_paths {
                for _ in 0..self.rng.random_range(1..=2) {
                    let source = spine[self.rng.random_range(0..spine.len())];
                    self.add_path_link(source, h, &path, None);
                }
            }
        }
        // Random links by popularity, duplicates, fragments and non-http links.
        for d in 0..self.drafts.len() {
            if self.drafts[d].kind != PageKind::Variant {
                self.fill_links(d);
            }
        }
    }

    fn fill_links(&mut self, d: usize) {
        let h = self.drafts[d].host;
        let hosts = self.plans.len();
        if self.drafts[d].kind != PageKind::Home && self.rng.random_bool(0.5) {
            let home = self.plans[h].spine[0];
            self.add_link(d, h, home, None);
        }
        let u: f64 = self.rng.random();
        let wanted = 5 + (20.0 * u * u) as usize;
        let random = wanted.saturating_sub(self.drafts[d].links.len()).max(3);
        for _ in 0..random {
            let (to_host, target) = if hosts > 1 && self.rng.random_bool(0.15) {
                let mut other = self.host_popularity.sample(&mut self.rng);
                if other == h {
                    other = (h + 1) % hosts;
                }
                let target = if self.rng.random_bool(0.3) {
                    self.plans[other].spine[0]
                } else {
                    self.popular(other)
                };
                (other, target)
            } else {
                (h, self.popular(h))
            };
            let r: f64 = self.rng.random();
            let rel = if r < 0.04 {
                Some(NOFOLLOW_RELS[self.rng.random_range(0..NOFOLLOW_RELS.len())])
            } else if r < 0.07 {
                Some(FOLLOW_RELS[self.rng.random_range(0..FOLLOW_RELS.len())])
            } else {
                None
            };
            self.add_link(d, to_host, target, rel);
        }
        if self.rng.random_bool(0.25) {
            let i = self.rng.random_range(0..self.drafts[d].links.len());
            let original = &self.drafts[d].links[i];
            let base = original
                .href
                .split('#')
                .next()
                .unwrap_or_default()
                .to_owned();
            let rel = original.rel;
            let href = if self.rng.random_bool(0.5) {
                format!("{base}#more")
            } else {
                base
            };
            let anchor = self.anchor();
            self.push_link(d, href, rel, anchor);
        }
        if self.rng.random_bool(0.05) {
            let anchor = self.anchor();
            self.push_link(d, "#top".to_owned(), None, anchor);
        }
        if self.rng.random_bool(0.03) {
            let href = if self.rng.random_bool(0.5) {
                format!("mailto:info@{}", self.plans[h].name)
            } else {
                "javascript:void(0)".to_owned()
            };
            let anchor = self.anchor();
            self.push_link(d, href, None, anchor);
        }
        // Mix the links, then put about a third of them inside paragraphs.
        let mut links = std::mem::take(&mut self.drafts[d].links);
        links.shuffle(&mut self.rng);
        let paragraphs: Vec<usize> = self.drafts[d]
            .text
            .paragraphs
            .iter()
            .map(Vec::len)
            .collect();
        for link in &mut links {
            if !paragraphs.is_empty() && self.rng.random_bool(0.35) {
                let p = self.rng.random_range(0..paragraphs.len());
                let w = self.rng.random_range(0..=paragraphs[p]);
                link.inline = Some((p, w));
            }
        }
        self.drafts[d].links = links;
    }

    fn popular(&mut self, h: usize) -> usize {
        let plan = &self.plans[h];
        plan.popular[plan.popularity.sample(&mut self.rng)]
    }

    fn add_link(
        &mut self,
        source: usize,
        to_host: usize,
        target: usize,
        rel: Option<&'static str>,
    ) {
        let path = self.drafts[target].path.clone();
        self.add_path_link(source, to_host, &path, rel);
    }

    fn add_path_link(
        &mut self,
        source: usize,
        to_host: usize,
        path: &str,
        rel: Option<&'static str>,
    ) {
        let from = &self.drafts[source];
        let from_host = &self.plans[from.host].name;
        let to_host = &self.plans[to_host].name;
        let mut href = href(&mut self.rng, from_host, &from.path, to_host, path);
        if self.rng.random_bool(0.1) {
            href.push_str(&format!("#s{}", self.rng.random_range(1..10)));
        }
        let anchor = self.anchor();
        self.push_link(source, href, rel, anchor);
    }

    fn push_link(
        &mut self,
        source: usize,
        href: String,
        rel: Option<&'static str>,
        anchor: Vec<u32>,
    ) {
        self.drafts[source].links.push(Link {
            href,
            rel,
            anchor,
            inline: None,
        });
    }

    /// Render every page and assemble the hosts.
    fn finish(self, spec: &WebSpec) -> SyntheticWeb {
        let Builder {
            vocabulary,
            drafts,
            plans,
            ..
        } = self;
        let mut stats = WebStats {
            hosts: plans.len(),
            pages: drafts.len(),
            ..WebStats::default()
        };
        let mut pages = Vec::with_capacity(drafts.len());
        for draft in &drafts {
            let host = &plans[draft.host].name;
            let url = format!("http://{host}{}", draft.path);
            let base = Url::parse(&url).expect("generated URLs are valid");
            let content = &drafts[draft.content];
            let canonical = draft.canonical.as_ref().and_then(|c| resolve(&base, c));
            let mut followed = Vec::new();
            let mut seen = HashSet::new();
            if !draft.meta_nofollow {
                for link in content.links.iter().filter(|l| !l.is_nofollow()) {
                    if let Some(to) = resolve(&base, &link.href) {
                        if seen.insert(to.clone()) {
                            followed.push(to);
                        }
                    }
                }
            }
            if let Some(c) = canonical.as_ref().filter(|c| **c != url) {
                if seen.insert(c.clone()) {
                    followed.push(c.clone());
                }
            }
            let mut words: Vec<u32> = content
                .text
                .title
                .iter()
                .chain(content.text.paragraphs.iter().flatten())
                .chain(content.links.iter().flat_map(|l| l.anchor.iter()))
                .copied()
                .collect();
            words.sort_unstable();
            words.dedup();

            let robots = match (draft.noindex, draft.meta_nofollow) {
                (true, true) => Some("noindex, nofollow"),
                (true, false) if draft.path.len() % 2 == 0 => Some("noindex"),
                (true, false) => Some("noindex, follow"),
                (false, true) => Some("nofollow"),
                (false, false) => None,
            };
            let head = Head {
                charset: draft.charset,
                charset_label: draft.charset_label,
                robots,
                canonical: draft.canonical.as_deref(),
            };
            let html = render::html(&vocabulary, &head, &content.text, &content.links);
            let (body, content_type) = match draft.charset {
                Charset::Utf8Header => (Bytes::from(html), "text/html; charset=utf-8"),
                Charset::Utf8Meta => (Bytes::from(html), "text/html"),
                Charset::Latin1Header => (
                    encode_latin1(&html),
                    if draft.charset_label == "windows-1252" {
                        "text/html; charset=windows-1252"
                    } else {
                        "text/html; charset=ISO-8859-1"
                    },
                ),
                Charset::Latin1Meta => (encode_latin1(&html), "text/html"),
            };

            stats.noindex += usize::from(draft.noindex);
            stats.meta_nofollow += usize::from(draft.meta_nofollow);
            stats.self_canonical += usize::from(canonical.as_ref() == Some(&url));
            match draft.charset {
                Charset::Latin1Header => stats.latin1_header += 1,
                Charset::Latin1Meta => stats.latin1_meta += 1,
                Charset::Utf8Meta => stats.utf8_meta_only += 1,
                Charset::Utf8Header => {}
            }
            match draft.kind {
                PageKind::NofollowOnly => stats.nofollow_only += 1,
                PageKind::RedirectOnly => stats.redirect_only += 1,
                PageKind::Variant => stats.canonical_variants += 1,
                PageKind::CanonicalOnly => stats.canonical_only += 1,
                PageKind::Private if plans[draft.host].robots_missing => stats.private_allowed += 1,
                PageKind::Private => stats.disallowed += 1,
                PageKind::Home | PageKind::Linked | PageKind::MetaNofollow => {}
            }
            stats.links += content.links.len();
            stats.nofollow_links += content.links.iter().filter(|l| l.is_nofollow()).count();

            pages.push(Page {
                url,
                kind: draft.kind,
                noindex: draft.noindex,
                meta_nofollow: draft.meta_nofollow,
                charset: draft.charset,
                canonical,
                followed,
                words,
                content_type,
                body,
            });
        }

        let mut hosts = Vec::with_capacity(plans.len());
        let mut host_index = HashMap::with_capacity(plans.len());
        let mut resources: Vec<HashMap<String, Resource>> =
            plans.iter().map(|_| HashMap::new()).collect();
        for (i, draft) in drafts.iter().enumerate() {
            resources[draft.host].insert(draft.path.clone(), Resource::Page(i));
        }
        for (h, (plan, mut resources)) in plans.into_iter().zip(resources).enumerate() {
            for (path, location, target) in plan.redirects {
                let target = pages[target].url.clone();
                resources.insert(path, Resource::Redirect { location, target });
                stats.redirects += 1;
            }
            for (path, content_type) in plan.files {
                let body = if content_type == "application/pdf" {
                    Bytes::from(format!(
                        "%PDF-1.4\n% synthetic file {path} of {}\n%%EOF\n",
                        plan.name
                    ))
                } else {
                    Bytes::from_static(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\0IEND\xaeB`\x82")
                };
                resources.insert(path, Resource::File { content_type, body });
                stats.files += 1;
            }
            stats.broken_links += plan.broken.len();
            let mut disallow = Vec::new();
            let robots = if plan.robots_missing {
                stats.hosts_without_robots += 1;
                None
            } else {
                disallow.push("/private/");
                disallow.extend(plan.extra_disallow);
                stats.hosts_with_extra_disallow += usize::from(plan.extra_disallow.is_some());
                Some(Bytes::from(robots_txt(
                    &plan.name,
                    plan.decoy_agent,
                    &disallow,
                )))
            };
            host_index.insert(plan.name.clone(), h);
            hosts.push(Host {
                name: plan.name,
                robots,
                disallow,
                resources,
            });
        }

        SyntheticWeb {
            spec: spec.clone(),
            vocabulary,
            hosts,
            host_index,
            pages,
            stats,
        }
    }
}

fn robots_txt(host: &str, decoy: Option<&str>, disallow: &[&str]) -> String {
    let mut out = format!("# robots.txt for {host}\n");
    if let Some(agent) = decoy {
        out.push_str(&format!("User-agent: {agent}\nDisallow: /\n\n"));
    }
    out.push_str("User-agent: *\n");
    for prefix in disallow {
        out.push_str(&format!("Disallow: {prefix}\n"));
    }
    out
}

fn encode_latin1(html: &str) -> Bytes {
    let (bytes, _, unmappable) = encoding_rs::WINDOWS_1252.encode(html);
    debug_assert!(!unmappable, "Latin-1 pages only hold Latin-1 letters");
    Bytes::from(bytes.into_owned())
}

/// An href from `from_path` on `from_host` to `to_path` on `to_host`, in one of the many
/// forms real pages use; all resolve to the same normalized URL.
fn href(
    rng: &mut impl Rng,
    from_host: &str,
    from_path: &str,
    to_host: &str,
    to_path: &str,
) -> String {
    let r: f64 = rng.random();
    if from_host != to_host {
        return if r < 0.7 {
            format!("http://{to_host}{to_path}")
        } else if r < 0.85 {
            format!("//{to_host}{to_path}")
        } else if r < 0.93 {
            format!("http://{}{to_path}", to_host.to_ascii_uppercase())
        } else if to_path == "/" {
            format!("http://{to_host}")
        } else {
            format!("http://{to_host}:80{to_path}")
        };
    }
    if r < 0.4 {
        to_path.to_owned()
    } else if r < 0.6 {
        format!("http://{to_host}{to_path}")
    } else if r < 0.9 {
        relative(rng, from_path, to_path)
    } else {
        match rng.random_range(0..4) {
            0 => format!("http://{}{to_path}", to_host.to_ascii_uppercase()),
            1 => format!("http://{to_host}:80{to_path}"),
            2 => {
                let (dir, file) = to_path.split_at(to_path.rfind('/').map_or(0, |i| i + 1));
                if rng.random_bool(0.5) {
                    format!("{dir}./{file}")
                } else {
                    format!("{dir}x/../{file}")
                }
            }
            // More `../` than there are directories: resolution stops at the root.
            _ => format!("{}{}", "../".repeat(depth(from_path) + 1), &to_path[1..]),
        }
    }
}

/// A relative href from `from` to `to` (both absolute paths on one host).
fn relative(rng: &mut impl Rng, from: &str, to: &str) -> String {
    let from = from.split_once('?').map_or(from, |(path, _)| path);
    let dir = &from[..from.rfind('/').map_or(0, |i| i + 1)];
    match to.strip_prefix(dir) {
        Some("") => "./".to_owned(),
        Some(rest) if rng.random_bool(0.3) => format!("./{rest}"),
        Some(rest) => rest.to_owned(),
        None => format!("{}{}", "../".repeat(depth(from)), &to[1..]),
    }
}

/// Directories above the file of `path`: `/a.html` 0, `/p/a.html` 1.
fn depth(path: &str) -> usize {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    path.matches('/').count().saturating_sub(1)
}
