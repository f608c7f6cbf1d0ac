//! Search snippets: the engines mark matched terms with control characters, the text is then
//! HTML-escaped, and only then are the markers turned into `<mark>` tags, so a page's own markup
//! can never reach a client as markup. Shared by the SQLite (FTS5 `snippet()`) and PostgreSQL
//! (`ts_headline`) stores.

/// Put before a matched term by the engine.
pub(crate) const MARK_OPEN: &str = "\u{1}";
/// Put after a matched term by the engine.
pub(crate) const MARK_CLOSE: &str = "\u{2}";

/// HTML-escape a snippet, then turn the markers into `<mark>` tags.
pub(crate) fn render_snippet(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 16);
    for ch in raw.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out.replace(MARK_OPEN, "<mark>")
        .replace(MARK_CLOSE, "</mark>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_then_marks() {
        let raw = format!("a {MARK_OPEN}zebra{MARK_CLOSE} <script>&\"");
        assert_eq!(
            render_snippet(&raw),
            "a <mark>zebra</mark> &lt;script&gt;&amp;&quot;"
        );
    }
}
