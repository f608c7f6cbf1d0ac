//! Which requests the front door forwards: its public routes only, matched on the path after
//! normalization, so no spelling of a path reaches an api endpoint that is not public.
//!
//! The raw path is split on `/`; each segment is percent-decoded once; empty segments (doubled
//! slashes) and `.` are dropped and `..` removes the segment before it (RFC 3986 §5.2.4, with
//! `%2e` read as `.`, as the WHATWG URL parser reads it, which is how `reqwest` would have
//! resolved `/crawl/%2e%2e/internal/ingest` to `/internal/ingest`). A segment that decodes to a
//! separator (`%2f`, `%5c`), a backslash anywhere, or a NUL or other control byte makes the path
//! ambiguous (servers disagree on it): such a path is refused, never guessed at.
//!
//! What is forwarded is the route's own literal path (`/search`, `/stats`, `/crawl`) plus the
//! query string, never the client's spelling of it.

use axum::http::Method;
use percent_encoding::percent_decode_str;

/// The front door's public routes: path and the methods it forwards there. The api serves
/// nothing else a client may call (`/internal/*` and `/control/*` are for cells).
pub const PUBLIC_ROUTES: [(&str, &[Method]); 3] = [
    ("/search", &[Method::GET, Method::HEAD]),
    ("/stats", &[Method::GET, Method::HEAD]),
    ("/crawl", &[Method::POST]),
];

/// Why a request is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The path cannot be read one way only (encoded separator, backslash, control byte).
    Ambiguous(&'static str),
    /// The (normalized) path is not a public route.
    NotPublic(String),
    /// A public route, another method.
    Method {
        path: &'static str,
        allowed: &'static [Method],
    },
}

/// The path with dot segments, doubled slashes and percent-encoded dots resolved.
pub fn normalize(raw: &str) -> Result<String, Refusal> {
    if raw.contains('\\') {
        return Err(Refusal::Ambiguous("a backslash"));
    }
    let mut out: Vec<String> = Vec::new();
    for segment in raw.split('/') {
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| Refusal::Ambiguous("percent-encoded bytes that are not UTF-8"))?;
        if decoded.contains('/') || decoded.contains('\\') {
            return Err(Refusal::Ambiguous("an encoded separator (%2f or %5c)"));
        }
        if decoded.chars().any(char::is_control) {
            return Err(Refusal::Ambiguous("a control character"));
        }
        match decoded.as_ref() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(decoded.into_owned()),
        }
    }
    Ok(format!("/{}", out.join("/")))
}

/// The public route `raw` names for `method`, as its literal path.
pub fn public_route(method: &Method, raw: &str) -> Result<&'static str, Refusal> {
    let path = normalize(raw)?;
    let Some((route, allowed)) = PUBLIC_ROUTES.iter().find(|(p, _)| *p == path) else {
        return Err(Refusal::NotPublic(path));
    };
    if allowed.contains(method) {
        Ok(route)
    } else {
        Err(Refusal::Method {
            path: route,
            allowed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_resolves_or_is_refused() {
        use Refusal::{Ambiguous, NotPublic};
        let not = |p: &str| NotPublic(p.to_string());
        let post = Method::POST;
        let get = Method::GET;
        let cases: Vec<(&Method, &str, Result<&str, Refusal>)> = vec![
            (&get, "/search", Ok("/search")),
            (&get, "/stats", Ok("/stats")),
            (&post, "/crawl", Ok("/crawl")),
            (&get, "/search/", Ok("/search")),
            (&get, "//search", Ok("/search")),
            (&get, "/./search", Ok("/search")),
            (&get, "/x/../search", Ok("/search")),
            (&get, "/%73earch", Ok("/search")),
            (&post, "/crawl/.", Ok("/crawl")),
            (&post, "/crawl/../crawl", Ok("/crawl")),
            (&post, "/../../crawl", Ok("/crawl")),
            (
                &post,
                "/crawl/../internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (
                &post,
                "/crawl/%2e%2e/internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (
                &post,
                "/crawl/%2E%2E/internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (
                &post,
                "/crawl/.%2e/internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (
                &post,
                "/crawl/%2e./internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (
                &post,
                "/crawl//../internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (
                &post,
                "/crawl/x/../../internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (&post, "//internal//ingest", Err(not("/internal/ingest"))),
            (&post, "/internal/ingest", Err(not("/internal/ingest"))),
            (&post, "/internal/./ingest", Err(not("/internal/ingest"))),
            (&post, "/%69nternal/ingest", Err(not("/internal/ingest"))),
            (
                &post,
                "/crawl/%252e%252e/internal/ingest",
                Err(not("/crawl/%2e%2e/internal/ingest")),
            ),
            (
                &post,
                "/crawl/%2e%2e%2finternal%2fingest",
                Err(Ambiguous("an encoded separator (%2f or %5c)")),
            ),
            (
                &post,
                "/crawl/..%2Finternal/ingest",
                Err(Ambiguous("an encoded separator (%2f or %5c)")),
            ),
            (
                &post,
                "/crawl/..%5cinternal/ingest",
                Err(Ambiguous("an encoded separator (%2f or %5c)")),
            ),
            (
                &post,
                "/crawl/..%5Cinternal%5Cingest",
                Err(Ambiguous("an encoded separator (%2f or %5c)")),
            ),
            (
                &post,
                "/crawl\\..\\internal\\ingest",
                Err(Ambiguous("a backslash")),
            ),
            (
                &post,
                "/crawl/..\\internal/ingest",
                Err(Ambiguous("a backslash")),
            ),
            (
                &post,
                "/crawl/%00/../../internal/ingest",
                Err(Ambiguous("a control character")),
            ),
            (
                &post,
                "/crawl/%c0%ae%c0%ae/internal/ingest",
                Err(Ambiguous("percent-encoded bytes that are not UTF-8")),
            ),
            (&post, "/control/weight", Err(not("/control/weight"))),
            (&get, "/cells", Err(not("/cells"))),
            (&get, "/search/../metrics", Err(not("/metrics"))),
            (&get, "/", Err(not("/"))),
            (&get, "", Err(not("/"))),
            (
                &get,
                "/search;/../internal/ingest",
                Err(not("/internal/ingest")),
            ),
            (&get, "/search%3b/x", Err(not("/search;/x"))),
            (&get, "/SEARCH", Err(not("/SEARCH"))),
            (
                &post,
                "/search",
                Err(Refusal::Method {
                    path: "/search",
                    allowed: &[Method::GET, Method::HEAD],
                }),
            ),
            (
                &get,
                "/crawl",
                Err(Refusal::Method {
                    path: "/crawl",
                    allowed: &[Method::POST],
                }),
            ),
            (
                &Method::DELETE,
                "/crawl/../crawl",
                Err(Refusal::Method {
                    path: "/crawl",
                    allowed: &[Method::POST],
                }),
            ),
        ];
        for (method, raw, want) in cases {
            assert_eq!(public_route(method, raw), want, "{method} {raw:?}");
        }
    }
}
