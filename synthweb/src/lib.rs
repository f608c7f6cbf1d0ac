//! synthweb, the synthetic web: a deterministic web generated from a seed, served over HTTP on
//! one loopback port, and the oracle that says exactly which URLs a correct crawler indexes.
//!
//! Two users: `cell up --demo` serves one beside the organism it starts, and the `loadtest`
//! harness serves one to each benchmark run (and as `loadtest web`). The cell's tests crawl it
//! too. It is a crate of its own so the production binary does not link the load-test harness.
//!
//! Every host ends in [`HOST_SUFFIX`]; the server dispatches by the `Host` header (any `:port`
//! stripped), so URLs carry no port and the oracle does not depend on where the web is served.
//!
//! URL layout of each host:
//!
//! | path | what |
//! |---|---|
//! | `/` | the home page; host 0's home is the hub linking every other home |
//! | `/p/N.html` | ordinary pages (some `noindex`, some meta `nofollow`, some Latin-1, some reachable only through `rel=nofollow` links, a redirect, or a canonical link) |
//! | `/p/N.html?print=K` | print variants whose `<link rel=canonical>` names `/p/N.html` |
//! | `/private/N.html`, `/drafts/N.html`, ... | pages under prefixes that robots.txt disallows |
//! | `/go/N` | `301` to a `/p/` page (absolute or relative `Location`) |
//! | `/files/N.pdf`, `/img/N.png` | non-HTML resources |
//! | `/robots.txt` | `User-agent: *` rules; a host or two answer 404 (allow all) |
//!
//! Beside them, on hosts of their own, the [`hostile`] web: slow and endless answers, redirect
//! loops, redirects to internal addresses, compression bombs, oversized pages, broken markup and
//! encodings, a calendar trap, 429s, odd robots.txt files; each with the outcome a correct crawler
//! ends with.
//!
//! Architecture Invariant: the server and the oracle read the same immutable model
//! ([`SyntheticWeb`]); the oracle never parses HTML, it resolves the very `href` strings the
//! pages carry with the same normalization the crawler uses. The tests check the two agree by
//! crawling the served HTML independently.

mod build;
pub mod hostile;
mod oracle;
mod render;
mod server;
mod vocabulary;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use axum::body::Bytes;

pub use oracle::normalize;
pub use server::{app, serve, Served, ServedLog, Serving};

/// Every host name of the synthetic web ends with this (a reserved TLD, RFC 2606).
pub const HOST_SUFFIX: &str = ".test";

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSpec {
    /// The same seed gives the same web on every machine.
    pub seed: u64,
    /// HTML pages (URLs answered `200 text/html`), home pages included. At least `hosts`.
    pub pages: usize,
    /// Host names (at least 1).
    pub hosts: usize,
    /// Slept before answering each request.
    pub latency: Duration,
}

impl Default for WebSpec {
    fn default() -> Self {
        Self {
            seed: 7,
            pages: 2000,
            hosts: 20,
            latency: Duration::ZERO,
        }
    }
}

/// Feature counts of a generated web (what the web contains, not what is reachable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebStats {
    pub hosts: usize,
    /// Hosts whose `/robots.txt` answers 404.
    pub hosts_without_robots: usize,
    /// Hosts whose robots.txt disallows a second, host-specific prefix.
    pub hosts_with_extra_disallow: usize,
    /// HTML pages (200 text/html), homes included.
    pub pages: usize,
    /// Pages with `<meta name=robots content=noindex>` (alone or with nofollow).
    pub noindex: usize,
    /// Pages with meta robots `nofollow`.
    pub meta_nofollow: usize,
    /// Pages linked to only through `rel="nofollow"` links (or from meta-nofollow pages).
    pub nofollow_only: usize,
    /// Pages under a prefix their host's robots.txt disallows.
    pub disallowed: usize,
    /// Pages under `/private/` on hosts without robots.txt (so allowed).
    pub private_allowed: usize,
    /// `/go/N` redirects.
    pub redirects: usize,
    /// Pages reachable only through a redirect.
    pub redirect_only: usize,
    /// `?print=K` variants whose canonical is another page.
    pub canonical_variants: usize,
    /// Pages reachable only as the canonical of a variant.
    pub canonical_only: usize,
    /// Pages with a `<link rel=canonical>` naming themselves.
    pub self_canonical: usize,
    /// Pages encoded in windows-1252 that say so in the `Content-Type` header.
    pub latin1_header: usize,
    /// Pages encoded in windows-1252 that say so only in a `<meta>` tag.
    pub latin1_meta: usize,
    /// UTF-8 pages that declare their charset only in `<meta charset>`.
    pub utf8_meta_only: usize,
    /// Non-HTML resources (`/files/N.pdf`, `/img/N.png`).
    pub files: usize,
    /// Distinct link targets that answer 404.
    pub broken_links: usize,
    /// `<a href>` elements over all pages.
    pub links: usize,
    /// Of which carry `rel` with `nofollow`.
    pub nofollow_links: usize,
}

/// The generated web: immutable, cheap to share in an `Arc`.
pub struct SyntheticWeb {
    spec: WebSpec,
    vocabulary: vocabulary::Vocabulary,
    hosts: Vec<Host>,
    host_index: HashMap<String, usize>,
    pages: Vec<Page>,
    stats: WebStats,
}

/// One host: its name, robots rules and every path it answers.
struct Host {
    name: String,
    /// `None`: robots.txt answers 404 (allow all).
    robots: Option<Bytes>,
    /// Disallowed path prefixes for `User-agent: *`.
    disallow: Vec<&'static str>,
    /// Path and query -> what it answers.
    resources: HashMap<String, Resource>,
}

enum Resource {
    Page(usize),
    Redirect {
        location: String,
        /// Normalized absolute URL of the target.
        target: String,
    },
    File {
        content_type: &'static str,
        body: Bytes,
    },
}

/// Why a page exists: how it is (or is not) meant to be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Home,
    /// In the host's link tree (followed links from home reach it).
    Linked,
    /// Meta robots nofollow: linked normally, its own links are not followed.
    MetaNofollow,
    /// Linked only with `rel=nofollow` or from meta-nofollow pages.
    NofollowOnly,
    /// Under `/private/` or the host-specific prefix.
    Private,
    /// Reached only through a `/go/N` redirect.
    RedirectOnly,
    /// A `?print=K` variant whose canonical is another page.
    Variant,
    /// Reached only as the canonical of a variant.
    CanonicalOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charset {
    /// `Content-Type: text/html; charset=utf-8`.
    Utf8Header,
    /// `Content-Type: text/html` and `<meta charset="utf-8">`.
    Utf8Meta,
    /// windows-1252 bytes, charset in the header (`windows-1252` or `ISO-8859-1`).
    Latin1Header,
    /// windows-1252 bytes, header `text/html`, charset in a `<meta>` tag.
    Latin1Meta,
}

impl Charset {
    fn is_latin1(self) -> bool {
        matches!(self, Charset::Latin1Header | Charset::Latin1Meta)
    }
}

struct Page {
    /// Normalized absolute URL.
    url: String,
    kind: PageKind,
    noindex: bool,
    meta_nofollow: bool,
    charset: Charset,
    /// Normalized canonical URL, if the page declares one.
    canonical: Option<String>,
    /// Normalized URLs a crawler follows from this page (links that are not nofollow, none
    /// if the page is meta-nofollow, plus the canonical if it is another page), deduplicated.
    followed: Vec<String>,
    /// Vocabulary ids of every word of the visible text (title, paragraphs, anchors), sorted
    /// and deduplicated.
    words: Vec<u32>,
    content_type: &'static str,
    body: Bytes,
}

impl Page {
    fn indexable(&self) -> bool {
        !self.noindex && self.canonical.as_ref().is_none_or(|c| *c == self.url)
    }
}

/// What the server answers for one request.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) location: Option<String>,
    pub(crate) body: Bytes,
}

impl SyntheticWeb {
    /// Generate the web `spec` describes. Deterministic: the same spec gives the same web.
    pub fn generate(spec: &WebSpec) -> Self {
        build::generate(spec)
    }

    pub fn spec(&self) -> &WebSpec {
        &self.spec
    }

    /// Host names, host 0 (the hub and the biggest host) first.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// Every host name ends with this.
    pub fn host_suffix(&self) -> &'static str {
        HOST_SUFFIX
    }

    /// The home pages of the first three hosts; the first is the hub, which links every home.
    pub fn seeds(&self) -> Vec<String> {
        self.hosts
            .iter()
            .take(3)
            .map(|h| format!("http://{}/", h.name))
            .collect()
    }

    /// HTML pages (URLs answered `200 text/html`).
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    pub fn stats(&self) -> &WebStats {
        &self.stats
    }

    /// The exact set of normalized URLs a correct crawler indexes starting from `seeds` (depth
    /// 0) when it explores links only up to `max_depth`:
    /// - URLs are normalized with [`normalize`]; breadth-first by shortest depth.
    /// - A URL is fetched unless its host's robots.txt disallows it.
    /// - A redirect adds no depth: its target gets the depth of the link to the redirect.
    /// - A fetched `200` HTML page at depth `d` gives its followed links (not `rel=nofollow`,
    ///   none if the page is meta `nofollow`, plus its canonical if that is another URL) depth
    ///   `d + 1`; they are explored only if `d + 1 <= max_depth`.
    /// - Indexed: fetched HTML pages that are not `noindex` and whose canonical is absent or
    ///   themselves, keyed by their final URL.
    pub fn expect(&self, seeds: &[String], max_depth: Option<u32>) -> BTreeSet<String> {
        self.crawl(seeds, max_depth).indexed
    }

    /// The URLs a correct crawler fetches (answers of any kind: pages, redirects, files, 404s),
    /// robots.txt excluded. Every URL it fetches that is not in here is a crawler bug only if
    /// it is [`disallowed`](Self::disallowed); the rest may be legitimate extra fetches.
    pub fn fetched(&self, seeds: &[String], max_depth: Option<u32>) -> BTreeSet<String> {
        self.crawl(seeds, max_depth).fetched
    }

    /// Is this URL disallowed by its host's robots.txt (for any user-agent token other than
    /// the decoy agents some robots.txt files name: the rules are those of `User-agent: *`)?
    pub fn disallowed(&self, url: &str) -> bool {
        let Some(url) = normalize(url) else {
            return false;
        };
        let Some((host, path)) = oracle::split(&url) else {
            return false;
        };
        self.host(host)
            .is_some_and(|h| h.disallow.iter().any(|prefix| path.starts_with(prefix)))
    }

    /// Up to `n` words that occur on 1 to 5 indexed pages (the pages `expect(seeds(), None)`
    /// returns), with those pages (sorted). The first is a Latin-1 word when one qualifies.
    pub fn rare_words(&self, n: usize) -> Vec<(String, Vec<String>)> {
        oracle::rare_words(self, n)
    }

    /// The body served at `url` with status 200 (pages and files), as bytes on the wire.
    pub fn body(&self, url: &str) -> Option<&[u8]> {
        let url = normalize(url)?;
        let (host, path) = oracle::split(&url)?;
        match self.host(host)?.resources.get(path)? {
            Resource::Page(i) => Some(&self.pages[*i].body),
            Resource::File { body, .. } => Some(body),
            Resource::Redirect { .. } => None,
        }
    }

    /// A one-line description of what `url` answers and why the oracle treats it as it does,
    /// for test failure messages and `loadtest web --describe`.
    pub fn describe(&self, url: &str) -> String {
        let Some(normal) = normalize(url) else {
            return format!("{url}: not an absolute http URL");
        };
        let Some((host_name, path)) = oracle::split(&normal) else {
            return format!("{normal}: not served (only http://)");
        };
        let Some(host) = self.host(host_name) else {
            return format!("{normal}: unknown host (404)");
        };
        let robots = if self.disallowed(&normal) {
            "disallowed by robots.txt"
        } else {
            "allowed by robots.txt"
        };
        let what = match host.resources.get(path) {
            None if path == "/robots.txt" && host.robots.is_some() => "robots.txt".to_owned(),
            None => "404".to_owned(),
            Some(Resource::Redirect { target, .. }) => format!("301 to {target}"),
            Some(Resource::File { content_type, .. }) => format!("200 {content_type}"),
            Some(Resource::Page(i)) => {
                let page = &self.pages[*i];
                let mut flags = vec![format!("{:?}", page.kind), format!("{:?}", page.charset)];
                if page.noindex {
                    flags.push("noindex".to_owned());
                }
                if page.meta_nofollow {
                    flags.push("meta nofollow".to_owned());
                }
                if let Some(canonical) = &page.canonical {
                    flags.push(format!("canonical {canonical}"));
                }
                flags.push(
                    if page.indexable() {
                        "indexable"
                    } else {
                        "not indexable"
                    }
                    .to_owned(),
                );
                format!(
                    "200 page [{}], {} followed links",
                    flags.join(", "),
                    page.followed.len()
                )
            }
        };
        format!("{normal}: {what}, {robots}")
    }

    fn host(&self, name: &str) -> Option<&Host> {
        self.host_index.get(name).map(|&i| &self.hosts[i])
    }

    /// The answer to a request for `path` (path and query as sent) on `host` (no port).
    pub(crate) fn answer(&self, host: &str, path: &str) -> Answer {
        let Some(host) = self.host(host) else {
            return Answer::text(404, "text/plain; charset=utf-8", "unknown host\n");
        };
        if path == "/robots.txt" {
            return match &host.robots {
                Some(body) => Answer {
                    status: 200,
                    content_type: "text/plain; charset=utf-8",
                    location: None,
                    body: body.clone(),
                },
                None => Answer::not_found(),
            };
        }
        match host.resources.get(path) {
            Some(Resource::Page(i)) => {
                let page = &self.pages[*i];
                Answer {
                    status: 200,
                    content_type: page.content_type,
                    location: None,
                    body: page.body.clone(),
                }
            }
            Some(Resource::Redirect { location, .. }) => Answer {
                status: 301,
                content_type: "text/html; charset=utf-8",
                location: Some(location.clone()),
                body: Bytes::from_static(
                    b"<!DOCTYPE html>\n<html><head><title>301</title></head><body></body></html>\n",
                ),
            },
            Some(Resource::File { content_type, body }) => Answer {
                status: 200,
                content_type,
                location: None,
                body: body.clone(),
            },
            None => Answer::not_found(),
        }
    }
}

impl Answer {
    fn text(status: u16, content_type: &'static str, body: &'static str) -> Self {
        Self {
            status,
            content_type,
            location: None,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn not_found() -> Self {
        Self::text(
            404,
            "text/html; charset=utf-8",
            "<!DOCTYPE html>\n<html><head><title>404</title></head><body></body></html>\n",
        )
    }
}
