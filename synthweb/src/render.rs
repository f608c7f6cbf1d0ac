//! HTML rendering of a page, done once at generation time.

use std::fmt::Write as _;

use super::vocabulary::Vocabulary;
use super::Charset;

/// An `<a href>` of a page.
pub(crate) struct Link {
    /// Exactly as written in the attribute (absolute, root-relative, relative, with fragment...).
    pub(crate) href: String,
    pub(crate) rel: Option<&'static str>,
    pub(crate) anchor: Vec<u32>,
    /// `Some((paragraph, word))`: inside that paragraph before that word; `None`: in the list
    /// after the text.
    pub(crate) inline: Option<(usize, usize)>,
}

impl Link {
    pub(crate) fn is_nofollow(&self) -> bool {
        self.rel
            .is_some_and(|rel| rel.split_ascii_whitespace().any(|t| t == "nofollow"))
    }
}

/// The visible text of a page.
pub(crate) struct Text {
    pub(crate) title: Vec<u32>,
    pub(crate) paragraphs: Vec<Vec<u32>>,
}

pub(crate) struct Head<'a> {
    pub(crate) charset: Charset,
    /// The declared charset label (for the header or the meta tag).
    pub(crate) charset_label: &'static str,
    pub(crate) robots: Option<&'static str>,
    pub(crate) canonical: Option<&'a str>,
}

pub(crate) fn html(
    vocabulary: &Vocabulary,
    head: &Head<'_>,
    text: &Text,
    links: &[Link],
) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n");
    match head.charset {
        Charset::Utf8Header | Charset::Latin1Header => {}
        Charset::Utf8Meta => out.push_str("<meta charset=\"utf-8\">\n"),
        Charset::Latin1Meta => {
            if head.charset_label == "windows-1252" {
                out.push_str("<meta charset=\"windows-1252\">\n");
            } else {
                let _ = writeln!(
                    out,
                    "<meta http-equiv=\"Content-Type\" content=\"text/html; charset={}\">",
                    head.charset_label
                );
            }
        }
    }
    out.push_str("<title>");
    push_title(&mut out, vocabulary, &text.title);
    out.push_str("</title>\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width\">\n");
    if let Some(robots) = head.robots {
        let _ = writeln!(out, "<meta name=\"robots\" content=\"{robots}\">");
    }
    if let Some(canonical) = head.canonical {
        let _ = writeln!(out, "<link rel=\"canonical\" href=\"{canonical}\">");
    }
    out.push_str("</head>\n<body>\n<h1>");
    push_title(&mut out, vocabulary, &text.title);
    out.push_str("</h1>\n");

    let mut inline: Vec<(usize, usize, &Link)> = links
        .iter()
        .filter_map(|l| l.inline.map(|(p, w)| (p, w, l)))
        .collect();
    inline.sort_by_key(|&(p, w, _)| (p, w));
    let mut inline = inline.into_iter().peekable();
    for (p, words) in text.paragraphs.iter().enumerate() {
        out.push_str("<p>");
        let mut sentence_start = true;
        let mut sentence_len = 0usize;
        for (w, &word) in words.iter().enumerate() {
            if w > 0 {
                out.push(' ');
            }
            while let Some((_, _, link)) = inline.next_if(|&(lp, lw, _)| lp == p && lw <= w) {
                push_link(&mut out, vocabulary, link);
                out.push(' ');
            }
            push_word(&mut out, vocabulary.word(word), sentence_start);
            sentence_len += 1;
            // Sentences of 5 to 16 words, ended by a rule of the text itself (no randomness).
            sentence_start = w + 1 < words.len()
                && sentence_len >= 5
                && ((word as usize * 31 + w) % 7 == 0 || sentence_len >= 16);
            if sentence_start {
                sentence_len = 0;
            }
            if sentence_start {
                out.push('.');
            }
        }
        while let Some((_, _, link)) = inline.next_if(|&(lp, _, _)| lp == p) {
            out.push(' ');
            push_link(&mut out, vocabulary, link);
        }
        out.push_str(".</p>\n");
    }
    // Links whose paragraph does not exist fall through to the list.
    let listed: Vec<&Link> = links
        .iter()
        .filter(|l| l.inline.is_none_or(|(p, _)| p >= text.paragraphs.len()))
        .collect();
    if !listed.is_empty() {
        out.push_str("<ul>\n");
        for link in listed {
            out.push_str("<li>");
            push_link(&mut out, vocabulary, link);
            out.push_str("</li>\n");
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

fn push_title(out: &mut String, vocabulary: &Vocabulary, title: &[u32]) {
    for (i, &word) in title.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        push_word(out, vocabulary.word(word), i == 0);
    }
}

fn push_link(out: &mut String, vocabulary: &Vocabulary, link: &Link) {
    let _ = write!(out, "<a href=\"{}\"", link.href);
    if let Some(rel) = link.rel {
        let _ = write!(out, " rel=\"{rel}\"");
    }
    out.push('>');
    for (i, &word) in link.anchor.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(vocabulary.word(word));
    }
    out.push_str("</a>");
}

/// Words start with an ASCII consonant, so capitalizing touches one ASCII letter.
fn push_word(out: &mut String, word: &str, capital: bool) {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) if capital => {
            out.push(first.to_ascii_uppercase());
            out.push_str(chars.as_str());
        }
        _ => out.push_str(word),
    }
}
