//! HTML -> title, visible text, links, and the page's robots directives.
//!
//! Everything here is iterative (no recursion over the tree), so a page nested a million deep
//! costs memory proportional to its size and never the stack.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use html5ever::tendril::TendrilSink;
use scraper::{Html, HtmlTreeSink, Node, Selector};
use url::Url;

/// CPU time one page's parse may take. html5ever's tree builder is quadratic on some hostile
/// inputs (2 MiB of nested `<div>` runs for many minutes), so input is fed in chunks and the
/// parse stops, keeping what it has, once this is spent.
pub(crate) const PARSE_BUDGET: Duration = Duration::from_secs(2);
/// Input fed to the parser between two looks at the clock.
const PARSE_CHUNK_BYTES: usize = 4 * 1024;

/// Caps on what one page may yield.
#[derive(Debug, Clone)]
pub(crate) struct PageLimits {
    pub max_text_chars: usize,
    pub max_links: usize,
    /// Our robots.txt product token, also honoured as `<meta name="...">` and in `X-Robots-Tag`.
    pub robots_token: String,
    /// See [`PARSE_BUDGET`].
    pub parse_budget: Duration,
}

/// Title length cap, in characters.
const MAX_TITLE_CHARS: usize = 1_024;

/// `noindex` / `nofollow` from `<meta name=robots>` or `X-Robots-Tag`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Directives {
    pub noindex: bool,
    pub nofollow: bool,
}

impl Directives {
    fn merge(&mut self, other: Directives) {
        self.noindex |= other.noindex;
        self.nofollow |= other.nofollow;
    }

    /// Parse a robots directive list (`noindex, nofollow`, `none`, and in `X-Robots-Tag` also
    /// `otherbot: noindex`), keeping what applies to every crawler or to `token`.
    pub(crate) fn parse(value: &str, token: &str) -> Directives {
        // Directives that carry a value after a colon, as opposed to a `botname:` prefix.
        const VALUED: [&str; 4] = [
            "unavailable_after",
            "max-snippet",
            "max-image-preview",
            "max-video-preview",
        ];
        let mut found = Directives::default();
        let mut applies = true;
        for part in value.split(',') {
            let mut part = part.trim();
            if let Some((prefix, rest)) = part.split_once(':') {
                let prefix = prefix.trim();
                if !VALUED.iter().any(|v| prefix.eq_ignore_ascii_case(v)) {
                    applies = prefix.eq_ignore_ascii_case(token) || prefix == "*";
                    part = rest.trim();
                }
            }
            if !applies {
                continue;
            }
            if part.eq_ignore_ascii_case("noindex") {
                found.noindex = true;
            } else if part.eq_ignore_ascii_case("nofollow") {
                found.nofollow = true;
            } else if part.eq_ignore_ascii_case("none") {
                found.noindex = true;
                found.nofollow = true;
            }
        }
        found
    }
}

/// What a page yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedPage {
    pub title: String,
    pub text: String,
    pub indexable: bool,
    pub canonical: Option<String>,
    pub links: Vec<String>,
}

fn selector(css: &'static str) -> Selector {
    Selector::parse(css).expect("a constant, valid CSS selector")
}

/// Parse a decoded HTML document fetched from `final_url`. `header` holds the `X-Robots-Tag`
/// directives.
pub(crate) fn parse_page(
    html: &str,
    final_url: &Url,
    header: Directives,
    limits: &PageLimits,
) -> ParsedPage {
    let (doc, complete) = parse_bounded(html, limits.parse_budget);
    if !complete {
        tracing::debug!(url = %final_url, bytes = html.len(), "parse budget spent; page truncated");
        metrics::counter!("crawler_parse_truncated_total").increment(1);
    }

    let mut directives = header;
    for meta in doc.select(&selector("meta[name][content]")) {
        let name = meta.value().attr("name").unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("robots") || name.eq_ignore_ascii_case(&limits.robots_token) {
            let content = meta.value().attr("content").unwrap_or_default();
            directives.merge(Directives::parse(content, &limits.robots_token));
        }
    }

    let base = doc
        .select(&selector("base[href]"))
        .next()
        .and_then(|b| b.value().attr("href"))
        .and_then(|href| protocol::urls::join(final_url, href).ok())
        .unwrap_or_else(|| final_url.clone());

    let canonical = doc
        .select(&selector("link[rel][href]"))
        .find(|l| has_token(l.value().attr("rel"), "canonical"))
        .and_then(|l| l.value().attr("href"))
        .and_then(|href| protocol::urls::join(&base, href).ok());
    let canonical_elsewhere = canonical.as_ref().is_some_and(|c| c != final_url);

    let mut links = Vec::new();
    if !directives.nofollow && limits.max_links > 0 {
        let mut seen = HashSet::new();
        if let Some(c) = canonical.as_ref().filter(|_| canonical_elsewhere) {
            seen.insert(c.as_str().to_string());
            links.push(c.as_str().to_string());
        }
        for a in doc.select(&selector("a[href], area[href]")) {
            if links.len() >= limits.max_links {
                break;
            }
            if has_token(a.value().attr("rel"), "nofollow") {
                continue;
            }
            let Some(href) = a.value().attr("href") else {
                continue;
            };
            let Ok(url) = protocol::urls::join(&base, href) else {
                continue;
            };
            let url = String::from(url);
            if seen.insert(url.clone()) {
                links.push(url);
            }
        }
    }

    let title = doc
        .select(&selector("title"))
        .next()
        .map(|t| {
            let mut sink = TextSink::new(MAX_TITLE_CHARS);
            for piece in t.text() {
                sink.push(piece);
            }
            sink.out
        })
        .unwrap_or_default();

    ParsedPage {
        title,
        text: visible_text(&doc, limits.max_text_chars),
        indexable: !directives.noindex && !canonical_elsewhere,
        canonical: canonical.map(String::from),
        links,
    }
}

/// Parse `html` in chunks until done or until `budget` is spent; `false` when cut short.
fn parse_bounded(html: &str, budget: Duration) -> (Html, bool) {
    let mut parser = html5ever::driver::parse_document(
        HtmlTreeSink::new(Html::new_document()),
        Default::default(),
    );
    let started = Instant::now();
    let mut rest = html;
    while !rest.is_empty() {
        if started.elapsed() > budget {
            return (parser.finish(), false);
        }
        let mut cut = rest.len().min(PARSE_CHUNK_BYTES);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let (chunk, tail) = rest.split_at(cut);
        parser.process(chunk.into());
        rest = tail;
    }
    (parser.finish(), true)
}

/// Whether a space-separated attribute (such as `rel`) contains `token`.
fn has_token(attr: Option<&str>, token: &str) -> bool {
    attr.is_some_and(|v| {
        v.split_ascii_whitespace()
            .any(|t| t.eq_ignore_ascii_case(token))
    })
}

/// Elements whose content is never shown.
fn is_hidden_element(name: &str) -> bool {
    matches!(
        name,
        "script" | "style" | "noscript" | "template" | "head" | "title" | "iframe" | "object"
    )
}

/// Elements that flow inside a line; every other element separates words.
fn is_inline_element(name: &str) -> bool {
    matches!(
        name,
        "a" | "abbr"
            | "b"
            | "bdi"
            | "bdo"
            | "big"
            | "cite"
            | "code"
            | "data"
            | "del"
            | "dfn"
            | "em"
            | "font"
            | "i"
            | "ins"
            | "kbd"
            | "label"
            | "mark"
            | "nobr"
            | "q"
            | "rp"
            | "rt"
            | "ruby"
            | "s"
            | "samp"
            | "small"
            | "span"
            | "strike"
            | "strong"
            | "sub"
            | "sup"
            | "time"
            | "tt"
            | "u"
            | "var"
            | "wbr"
    )
}

/// Visible text in document order, whitespace collapsed, capped at `cap` characters.
fn visible_text(doc: &Html, cap: usize) -> String {
    let mut sink = TextSink::new(cap);
    // `None` marks the end of a block element.
    let mut stack = vec![Some(doc.tree.root())];
    while let Some(item) = stack.pop() {
        if sink.full {
            break;
        }
        let Some(node) = item else {
            sink.boundary();
            continue;
        };
        match node.value() {
            Node::Text(text) => {
                sink.push(text);
                continue;
            }
            Node::Element(el) => {
                let name = el.name();
                if is_hidden_element(name) || el.attr("hidden").is_some() {
                    continue;
                }
                if !is_inline_element(name) {
                    sink.boundary();
                    stack.push(None);
                }
            }
            Node::Document | Node::Fragment => {}
            _ => continue,
        }
        stack.extend(node.children().rev().map(Some));
    }
    sink.out
}

/// Appends text with runs of whitespace collapsed to one space, up to a character cap.
struct TextSink {
    out: String,
    chars: usize,
    cap: usize,
    space: bool,
    full: bool,
}

impl TextSink {
    fn new(cap: usize) -> Self {
        Self {
            out: String::new(),
            chars: 0,
            cap,
            space: false,
            full: cap == 0,
        }
    }

    fn boundary(&mut self) {
        self.space = true;
    }

    fn push(&mut self, text: &str) {
        for c in text.chars() {
            if self.full {
                return;
            }
            if c.is_whitespace() {
                self.space = true;
                continue;
            }
            if self.space && !self.out.is_empty() {
                self.out.push(' ');
                self.chars += 1;
                if self.chars >= self.cap {
                    self.full = true;
                    self.out.pop();
                    return;
                }
            }
            self.space = false;
            self.out.push(c);
            self.chars += 1;
            if self.chars >= self.cap {
                self.full = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PageLimits {
        PageLimits {
            max_text_chars: 10_000,
            max_links: 100,
            robots_token: "HomeostatBot".into(),
            parse_budget: PARSE_BUDGET,
        }
    }

    fn page(html: &str) -> ParsedPage {
        let url = protocol::urls::normalize("http://a.test/dir/page.html").expect("url");
        parse_page(html, &url, Directives::default(), &limits())
    }

    #[test]
    fn title_text_and_links() {
        let p = page(
            r#"<!doctype html><html><head><title>  The
               Title </title><style>.x{color:red}</style><script>var hidden = 1;</script></head>
            <body><h1>Hello</h1><p>first   <b>bold</b>word</p><p>second</p>
            <noscript>no script</noscript><template><p>tmpl</p></template>
            <a href="other.html#frag">o</a> <a href="/abs">abs</a> <a href="other.html">dup</a>
            <a href="mailto:x@a.test">mail</a> <a href="javascript:void(0)">js</a>
            <a href="https://b.test/x" rel="NoFollow noopener">nf</a>
            <map><area href="//c.test/area"></map>
            </body></html>"#,
        );
        assert_eq!(p.title, "The Title");
        assert_eq!(p.text, "Hello first boldword second o abs dup mail js nf");
        assert_eq!(
            p.links,
            vec![
                "http://a.test/dir/other.html",
                "http://a.test/abs",
                "http://c.test/area"
            ]
        );
        assert!(p.indexable);
        assert_eq!(p.canonical, None);
    }

    #[test]
    fn meta_robots_noindex_nofollow_and_none() {
        let p = page(r#"<meta name="ROBOTS" content="NoIndex"><a href="/x">x</a>"#);
        assert!(!p.indexable);
        assert_eq!(p.links, vec!["http://a.test/x"]);

        let p = page(r#"<meta name="robots" content="index, nofollow"><a href="/x">x</a>"#);
        assert!(p.indexable);
        assert!(p.links.is_empty());

        let p = page(r#"<meta name="homeostatbot" content="none"><a href="/x">x</a>"#);
        assert!(!p.indexable);
        assert!(p.links.is_empty());

        let p = page(r#"<meta name="otherbot" content="none"><a href="/x">x</a>"#);
        assert!(p.indexable);
        assert_eq!(p.links.len(), 1);
    }

    #[test]
    fn canonical_and_base_href() {
        let p = page(
            r#"<head><base href="http://base.test/b/"><link rel="canonical" href="canon.html"></head>
            <a href="rel.html">r</a><a href="http://a.test/dir/page.html">self</a>"#,
        );
        assert_eq!(
            p.canonical.as_deref(),
            Some("http://base.test/b/canon.html")
        );
        assert!(!p.indexable, "canonical elsewhere is not indexable");
        assert_eq!(
            p.links,
            vec![
                "http://base.test/b/canon.html",
                "http://base.test/b/rel.html",
                "http://a.test/dir/page.html"
            ]
        );

        let p = page(r#"<link rel="canonical" href="http://A.TEST:80/dir/page.html#top">"#);
        assert_eq!(p.canonical.as_deref(), Some("http://a.test/dir/page.html"));
        assert!(
            p.indexable,
            "a canonical equal to the page keeps it indexable"
        );
        assert!(p.links.is_empty());
    }

    #[test]
    fn header_directives_and_scoping() {
        assert_eq!(
            Directives::parse("noindex, nofollow", "HomeostatBot"),
            Directives {
                noindex: true,
                nofollow: true
            }
        );
        assert_eq!(
            Directives::parse("otherbot: noindex", "HomeostatBot"),
            Directives::default()
        );
        assert_eq!(
            Directives::parse("homeostatbot: nofollow", "HomeostatBot"),
            Directives {
                noindex: false,
                nofollow: true
            }
        );
        assert_eq!(
            Directives::parse(
                "unavailable_after: 25 Jun 2010 15:00:00 PST, noindex",
                "HomeostatBot"
            ),
            Directives {
                noindex: true,
                nofollow: false
            }
        );
        let url = protocol::urls::normalize("http://a.test/").expect("url");
        let p = parse_page(
            r#"<a href="/x">x</a>"#,
            &url,
            Directives {
                noindex: true,
                nofollow: true,
            },
            &limits(),
        );
        assert!(!p.indexable);
        assert!(p.links.is_empty());
    }

    #[test]
    fn caps_text_and_links() {
        let mut html = String::from("<p>");
        for i in 0..500 {
            html.push_str(&format!("<a href=\"/p{i}\">word{i}</a> "));
        }
        let url = protocol::urls::normalize("http://a.test/").expect("url");
        let limits = PageLimits {
            max_text_chars: 50,
            max_links: 7,
            robots_token: "HomeostatBot".into(),
            parse_budget: PARSE_BUDGET,
        };
        let p = parse_page(&html, &url, Directives::default(), &limits);
        assert_eq!(p.links.len(), 7);
        assert!(p.text.chars().count() <= 50, "{}", p.text);
        assert!(p.text.starts_with("word0 word1"), "{}", p.text);
        assert!(!p.text.ends_with(' '));
    }

    #[test]
    fn hostile_documents_parse() {
        let url = protocol::urls::normalize("http://a.test/").expect("url");
        let deep = "<div>".repeat(3_000) + "deep" + &"</div>".repeat(3_000);
        let p = parse_page(&deep, &url, Directives::default(), &limits());
        assert_eq!(p.text, "deep");
        let huge_attr = format!(
            "<a href=\"/{}\" title=\"{}\">x</a>",
            "a".repeat(1 << 20),
            "\"'<>".repeat(1000)
        );
        let _ = parse_page(&huge_attr, &url, Directives::default(), &limits());
        // 2 MiB of nesting would take html5ever many minutes: the budget cuts it short.
        let deeper = "<div>".repeat(400_000);
        let started = Instant::now();
        let budget = Duration::from_millis(200);
        let (_, complete) = parse_bounded(&deeper, budget);
        assert!(!complete);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let garbage: String = (0..200_000u32)
            .map(|i| char::from_u32(i % 0x2FFF).unwrap_or('\u{fffd}'))
            .collect();
        let _ = parse_page(&garbage, &url, Directives::default(), &limits());
    }
}
