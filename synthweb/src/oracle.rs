//! The oracle: which URLs a correct crawler fetches and indexes.
//!
//! Rules, applied to the model (never to parsed HTML):
//! - URLs are normalized with [`normalize`]: lowercase scheme and host, default port dropped,
//!   `#fragment` dropped, `.`/`..` resolved, empty path -> `/`, query kept as is.
//! - Breadth-first from the normalized seeds at depth 0, by shortest depth.
//! - A URL is fetched unless its host's robots.txt disallows it.
//! - A redirect adds no depth: its target gets the depth of the link to the redirect.
//! - A fetched `200` HTML page at depth `d` gives its followed links (not `rel=nofollow`, none
//!   if the page is meta `nofollow`, plus its canonical if that is another URL) depth `d + 1`;
//!   they are explored only if `d + 1 <= max_depth`.
//! - Indexed: fetched HTML pages that are not `noindex` and whose canonical is absent or
//!   themselves, keyed by their final URL.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use url::Url;

use super::{Resource, SyntheticWeb};

/// Normalize an absolute http(s) URL the way the crawler does; `None` if it is not one.
pub fn normalize(url: &str) -> Option<String> {
    let url = Url::parse(url).ok()?;
    finish(url)
}

/// Resolve `href` against `base` and normalize it; `None` for non-http(s) links
/// (`mailto:`, `javascript:`) and unparsable ones.
pub(crate) fn resolve(base: &Url, href: &str) -> Option<String> {
    finish(base.join(href).ok()?)
}

fn finish(mut url: Url) -> Option<String> {
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return None;
    }
    url.set_fragment(None);
    Some(url.into())
}

/// Split a normalized `http://` URL into host and path-with-query.
pub(crate) fn split(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let slash = rest.find('/')?;
    Some((&rest[..slash], &rest[slash..]))
}

pub(crate) struct Crawl {
    pub(crate) indexed: BTreeSet<String>,
    pub(crate) fetched: BTreeSet<String>,
}

impl SyntheticWeb {
    pub(crate) fn crawl(&self, seeds: &[String], max_depth: Option<u32>) -> Crawl {
        let mut depth: HashMap<String, u32> = HashMap::new();
        // A 0-1 breadth-first search: redirects (weight 0) go to the front, links to the back,
        // so URLs leave the queue in order of their shortest depth.
        let mut queue: VecDeque<(String, u32)> = VecDeque::new();
        for seed in seeds.iter().filter_map(|s| normalize(s)) {
            if depth.insert(seed.clone(), 0).is_none() {
                queue.push_back((seed, 0));
            }
        }
        let mut crawl = Crawl {
            indexed: BTreeSet::new(),
            fetched: BTreeSet::new(),
        };
        let mut done: std::collections::HashSet<String> = std::collections::HashSet::new();
        while let Some((url, d)) = queue.pop_front() {
            if depth.get(&url).is_some_and(|&best| best < d) || !done.insert(url.clone()) {
                continue;
            }
            if self.disallowed(&url) {
                continue;
            }
            let Some((host, path)) = split(&url) else {
                continue;
            };
            let Some(host) = self.host(host) else {
                continue;
            };
            crawl.fetched.insert(url.clone());
            match host.resources.get(path) {
                Some(Resource::Page(i)) => {
                    let page = &self.pages[*i];
                    if page.indexable() {
                        crawl.indexed.insert(url.clone());
                    }
                    if max_depth.is_some_and(|max| d >= max) {
                        continue;
                    }
                    for link in &page.followed {
                        relax(&mut depth, &mut queue, link, d + 1, false);
                    }
                }
                Some(Resource::Redirect { target, .. }) => {
                    relax(&mut depth, &mut queue, target, d, true);
                }
                Some(Resource::File { .. }) | None => {}
            }
        }
        crawl
    }
}

fn relax(
    depth: &mut HashMap<String, u32>,
    queue: &mut VecDeque<(String, u32)>,
    url: &str,
    d: u32,
    front: bool,
) {
    if depth.get(url).is_some_and(|&known| known <= d) {
        return;
    }
    depth.insert(url.to_owned(), d);
    if front {
        queue.push_front((url.to_owned(), d));
    } else {
        queue.push_back((url.to_owned(), d));
    }
}

pub(crate) fn rare_words(web: &SyntheticWeb, n: usize) -> Vec<(String, Vec<String>)> {
    let indexed = web.expect(&web.seeds(), None);
    let mut pages_of: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for page in web.pages.iter().filter(|p| indexed.contains(&p.url)) {
        for &word in &page.words {
            pages_of.entry(word).or_default().push(&page.url);
        }
    }
    let rare = |(_, urls): &(&u32, &Vec<&str>)| (1..=5).contains(&urls.len());
    let latin = pages_of
        .iter()
        .filter(|(&word, _)| web.vocabulary.is_latin(word))
        .find(|entry| rare(entry));
    // The rarest ASCII words by Zipf rank first.
    let ascii = pages_of
        .iter()
        .rev()
        .filter(|(&word, _)| !web.vocabulary.is_latin(word))
        .filter(|entry| rare(entry));
    latin
        .into_iter()
        .chain(ascii)
        .take(n)
        .map(|(&word, urls)| {
            let mut urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
            urls.sort();
            (web.vocabulary.word(word).to_owned(), urls)
        })
        .collect()
}
