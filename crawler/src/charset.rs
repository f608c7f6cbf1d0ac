//! Turning body bytes into text: BOM, then the `Content-Type` charset, then a `<meta>` in the
//! first 1024 bytes, else UTF-8; undecodable bytes become U+FFFD.

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8, WINDOWS_1252, X_USER_DEFINED};

/// How far into the body the `<meta>` prescan looks.
const PRESCAN_BYTES: usize = 1024;

/// The `charset` parameter of a `Content-Type` value.
pub(crate) fn charset_param(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches(|c| c == '"' || c == '\''))
    })
}

/// Pick the encoding of an HTML body.
pub(crate) fn detect(body: &[u8], content_type: Option<&str>) -> &'static Encoding {
    if let Some((enc, _)) = Encoding::for_bom(body) {
        return enc;
    }
    if let Some(enc) = content_type
        .and_then(charset_param)
        .and_then(|label| Encoding::for_label(label.as_bytes()))
    {
        return enc;
    }
    if let Some(enc) = prescan_meta(&body[..body.len().min(PRESCAN_BYTES)]) {
        // HTML: a <meta> cannot really declare UTF-16 (it was read as ASCII), and
        // x-user-defined there means windows-1252.
        return if enc == UTF_16LE || enc == UTF_16BE {
            UTF_8
        } else if enc == X_USER_DEFINED {
            WINDOWS_1252
        } else {
            enc
        };
    }
    UTF_8
}

/// Decode the body (lossy) with its detected encoding.
pub(crate) fn decode(body: &[u8], content_type: Option<&str>) -> String {
    let enc = detect(body, content_type);
    // `decode` removes a BOM of its own, and one of another encoding wins (as detected above).
    let (text, _, _) = enc.decode(body);
    text.into_owned()
}

/// A much simplified HTML prescan: the first `charset=` inside a `<meta ...>` tag, which covers
/// both `<meta charset="x">` and `<meta http-equiv="Content-Type" content="text/html; charset=x">`.
fn prescan_meta(head: &[u8]) -> Option<&'static Encoding> {
    let lower = head.to_ascii_lowercase();
    let mut rest = lower.as_slice();
    while let Some(start) = find(rest, b"<meta") {
        let tag = &rest[start + 5..];
        let end = tag.iter().position(|&b| b == b'>').unwrap_or(tag.len());
        let tag = &tag[..end];
        if let Some(at) = find(tag, b"charset") {
            let mut value = &tag[at + 7..];
            value = trim_start(value);
            if let Some(after_eq) = value.strip_prefix(b"=") {
                let value = trim_start(after_eq);
                let value = value
                    .strip_prefix(b"\"")
                    .or_else(|| value.strip_prefix(b"'"))
                    .unwrap_or(value);
                let len = value
                    .iter()
                    .position(|&b| {
                        matches!(b, b'"' | b'\'' | b';' | b'/' | b'>') || b.is_ascii_whitespace()
                    })
                    .unwrap_or(value.len());
                if let Some(enc) = Encoding::for_label(&value[..len]) {
                    return Some(enc);
                }
            }
        }
        rest = &rest[start + 5 + end..];
    }
    None
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [first, tail @ ..] = s {
        if first.is_ascii_whitespace() {
            s = tail;
        } else {
            break;
        }
    }
    s
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_charset_wins_over_meta() {
        let body = b"<meta charset=utf-8><p>caf\xe9</p>";
        assert_eq!(
            detect(body, Some("text/html; charset=windows-1252")),
            WINDOWS_1252
        );
        assert!(decode(body, Some("text/html; charset=\"ISO-8859-1\"")).contains("café"));
    }

    #[test]
    fn bom_wins_over_everything() {
        let body = b"\xef\xbb\xbf<p>caf\xc3\xa9</p>";
        assert_eq!(detect(body, Some("text/html; charset=windows-1252")), UTF_8);
        assert_eq!(
            decode(body, Some("text/html; charset=windows-1252")),
            "<p>café</p>"
        );
    }

    #[test]
    fn meta_charset_and_http_equiv_are_found() {
        let body = b"<html><head><META CHARSET='windows-1252'></head><body>\x93hi\x94</body>";
        assert_eq!(detect(body, Some("text/html")), WINDOWS_1252);
        assert!(decode(body, None).contains("\u{201c}hi\u{201d}"));
        let body = b"<meta http-equiv=\"Content-Type\" content=\"text/html; charset=iso-8859-1\"><p>na\xefve</p>";
        assert_eq!(detect(body, None), WINDOWS_1252);
        assert!(decode(body, None).contains("naïve"));
        let body = b"<meta name=viewport content=x><meta charset=\"utf-16\">";
        assert_eq!(detect(body, None), UTF_8);
    }

    #[test]
    fn meta_past_the_prescan_window_is_ignored_and_utf8_is_lossy() {
        let mut body = vec![b' '; 2000];
        body.extend_from_slice(b"<meta charset=windows-1252>\xff");
        assert_eq!(detect(&body, None), UTF_8);
        assert!(decode(&body, None).ends_with('\u{fffd}'));
    }

    #[test]
    fn charset_param_parsing() {
        assert_eq!(charset_param("text/html;charset=UTF-8"), Some("UTF-8"));
        assert_eq!(
            charset_param("text/html; foo=bar; Charset = 'koi8-r'"),
            Some("koi8-r")
        );
        assert_eq!(charset_param("text/html"), None);
    }
}
