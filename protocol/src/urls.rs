//! The one URL normalization every cell uses, so dedup agrees across the organism.
//!
//! Rules: http and https only; lowercase scheme and host (the `url` crate does both, and
//! punycodes IDNs); default port dropped; fragment dropped; dot segments resolved; empty path
//! becomes `/`; query kept as-is (an empty `?` is dropped). No credentials in URLs.

use url::Url;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Parse(String),
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("URL carries credentials")]
    Credentials,
}

/// Parse and normalize an absolute URL.
pub fn normalize(raw: &str) -> Result<Url, UrlError> {
    let url = Url::parse(raw.trim()).map_err(|e| UrlError::Parse(format!("{raw:?}: {e}")))?;
    normalize_url(url)
}

/// Resolve `href` against `base` and normalize it.
pub fn join(base: &Url, href: &str) -> Result<Url, UrlError> {
    let url = base
        .join(href.trim())
        .map_err(|e| UrlError::Parse(format!("{href:?}: {e}")))?;
    normalize_url(url)
}

/// Normalize an already-parsed URL.
pub fn normalize_url(mut url: Url) -> Result<Url, UrlError> {
    match url.scheme() {
        "http" | "https" => {}
        other => return Err(UrlError::Scheme(other.to_string())),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    url.set_fragment(None);
    if url.query() == Some("") {
        url.set_query(None);
    }
    // `Url` already lowercases scheme and host, drops default ports and resolves dot segments.
    Ok(url)
}

/// The host (without port) of a normalized URL, for per-host accounting.
pub fn host_of(url: &Url) -> String {
    url.host_str().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        let cases = [
            (
                "HTTP://Example.TEST:80/a/./b/../c#frag",
                "http://example.test/a/c",
            ),
            ("https://example.test:443", "https://example.test/"),
            ("http://example.test/x?", "http://example.test/x"),
            (
                "http://example.test/x?b=2&a=1",
                "http://example.test/x?b=2&a=1",
            ),
            ("http://example.test:8080/", "http://example.test:8080/"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).expect(raw).as_str(), want, "{raw}");
        }
    }

    #[test]
    fn rejects_with_reason() {
        assert!(matches!(
            normalize("ftp://a.test/"),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(normalize("not a url"), Err(UrlError::Parse(_))));
        assert!(matches!(
            normalize("http://u:p@a.test/"),
            Err(UrlError::Credentials)
        ));
        assert!(matches!(
            normalize("mailto:x@a.test"),
            Err(UrlError::Scheme(_))
        ));
    }

    #[test]
    fn joins_relative() {
        let base = normalize("http://a.test/dir/page.html").expect("base");
        assert_eq!(
            join(&base, "../x.html#f").expect("join").as_str(),
            "http://a.test/x.html"
        );
        assert_eq!(
            join(&base, "//b.test").expect("join").as_str(),
            "http://b.test/"
        );
    }
}
