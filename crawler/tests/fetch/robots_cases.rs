//! The reference cases for robots.txt matching: every decision in Google's `robots_test.cc`
//! (github.com/google/robotstxt, the reference parser; RFC 9309 was written from it), ported
//! one `EXPECT_TRUE`/`EXPECT_FALSE` to one row, plus a few rows for what `robots.cc` does
//! without a test (accepted typos, `*` followed by text, product tokens with a version), for
//! RFC 9309 rules Google's library leaves to its caller (`/robots.txt` is always allowed), and
//! for Crawl-delay, which Google ignores and Homeostat honours.
//!
//! Google's parse-only tests (line endings, byte-order marks, sitemaps) count parser callbacks;
//! here they become decisions that only come out right if the lines were parsed as Google
//! parses them. Its tests of internal helpers (`GetPathParamsQuery`, `MaybeEscapePattern`,
//! `IsValidUserAgentToObey`) are ported as unit tests of the robots module, and a few rows here
//! check the same through decisions.
//!
//! This file is plain data with no dependencies: the robots module's unit tests run every row
//! against the parser, and the `fetch` test target runs the rows a real crawl can express
//! (absolute URLs as the `url` crate writes them, a valid product token) through `Fetcher`.

/// One decision: is `url` allowed for `agent` by `robots`?
#[derive(Debug, Clone)]
pub struct Case {
    /// Where the row comes from: the `robots_test.cc` TEST name, or `robots.cc`, `RFC 9309`.
    pub source: &'static str,
    pub robots: Vec<u8>,
    pub agent: &'static str,
    pub url: String,
    pub allowed: bool,
}

/// The Crawl-delay `agent` must honour under `robots` (seconds), for rows with `source`.
#[derive(Debug, Clone)]
pub struct DelayCase {
    pub source: &'static str,
    pub robots: &'static str,
    pub agent: &'static str,
    pub delay: Option<f32>,
}

struct Table(Vec<Case>);

impl Table {
    fn add(
        &mut self,
        source: &'static str,
        robots: impl AsRef<[u8]>,
        agent: &'static str,
        url: impl Into<String>,
        allowed: bool,
    ) {
        self.0.push(Case {
            source,
            robots: robots.as_ref().to_vec(),
            agent,
            url: url.into(),
            allowed,
        });
    }
}

/// `robots_test.cc`'s `kMaxLineLen`: Google reads 2083 * 8 bytes of a line, the rest is cut.
pub const GOOGLE_MAX_LINE_LEN: usize = 2083 * 8;

pub fn cases() -> Vec<Case> {
    let mut t = Table(Vec::new());

    // GoogleOnly_SystemTest
    let s = "GoogleOnly_SystemTest";
    let r = "user-agent: FooBot\ndisallow: /\n";
    t.add(s, "", "FooBot", "", true);
    t.add(s, r, "", "", true);
    t.add(s, r, "FooBot", "", false);
    t.add(s, "", "", "", true);

    // ID_LineSyntax_Line
    let s = "ID_LineSyntax_Line";
    let url = "http://foo.bar/x/y";
    t.add(s, "user-agent: FooBot\ndisallow: /\n", "FooBot", url, false);
    t.add(s, "foo: FooBot\nbar: /\n", "FooBot", url, true);
    t.add(s, "user-agent FooBot\ndisallow /\n", "FooBot", url, false);

    // ID_LineSyntax_Groups
    let s = "ID_LineSyntax_Groups";
    let r = "allow: /foo/bar/\n\nuser-agent: FooBot\ndisallow: /\nallow: /x/\nuser-agent: BarBot\ndisallow: /\nallow: /y/\n\n\nallow: /w/\nuser-agent: BazBot\n\nuser-agent: FooBot\nallow: /z/\ndisallow: /\n";
    let (w, x, y, z, foo_bar) = (
        "http://foo.bar/w/a",
        "http://foo.bar/x/b",
        "http://foo.bar/y/c",
        "http://foo.bar/z/d",
        "http://foo.bar/foo/bar/",
    );
    t.add(s, r, "FooBot", x, true);
    t.add(s, r, "FooBot", z, true);
    t.add(s, r, "FooBot", y, false);
    t.add(s, r, "BarBot", y, true);
    t.add(s, r, "BarBot", w, true);
    t.add(s, r, "BarBot", z, false);
    t.add(s, r, "BazBot", z, true);
    t.add(s, r, "FooBot", foo_bar, false);
    t.add(s, r, "BarBot", foo_bar, false);
    t.add(s, r, "BazBot", foo_bar, false);

    // ID_LineSyntax_Groups_OtherRules
    let s = "ID_LineSyntax_Groups_OtherRules";
    let r = "User-agent: BarBot\nSitemap: https://foo.bar/sitemap\nUser-agent: *\nDisallow: /\n";
    t.add(s, r, "FooBot", "http://foo.bar/", false);
    t.add(s, r, "BarBot", "http://foo.bar/", false);
    let r = "User-agent: FooBot\nInvalid-Unknown-Line: unknown\nUser-agent: *\nDisallow: /\n";
    t.add(s, r, "FooBot", "http://foo.bar/", false);
    t.add(s, r, "BarBot", "http://foo.bar/", false);

    // ID_REPLineNamesCaseInsensitive
    let s = "ID_REPLineNamesCaseInsensitive";
    for r in [
        "USER-AGENT: FooBot\nALLOW: /x/\nDISALLOW: /\n",
        "user-agent: FooBot\nallow: /x/\ndisallow: /\n",
        "uSeR-aGeNt: FooBot\nAlLoW: /x/\ndIsAlLoW: /\n",
    ] {
        t.add(s, r, "FooBot", "http://foo.bar/x/y", true);
        t.add(s, r, "FooBot", "http://foo.bar/a/b", false);
    }

    // ID_UserAgentValueCaseInsensitive
    let s = "ID_UserAgentValueCaseInsensitive";
    for r in [
        "User-Agent: FOO BAR\nAllow: /x/\nDisallow: /\n",
        "User-Agent: foo bar\nAllow: /x/\nDisallow: /\n",
        "User-Agent: FoO bAr\nAllow: /x/\nDisallow: /\n",
    ] {
        for agent in ["Foo", "foo"] {
            t.add(s, r, agent, "http://foo.bar/x/y", true);
            t.add(s, r, agent, "http://foo.bar/a/b", false);
        }
    }

    // GoogleOnly_AcceptUserAgentUpToFirstSpace
    let s = "GoogleOnly_AcceptUserAgentUpToFirstSpace";
    let r = "User-Agent: *\nDisallow: /\nUser-Agent: Foo Bar\nAllow: /x/\nDisallow: /\n";
    t.add(s, r, "Foo", "http://foo.bar/x/y", true);
    t.add(s, r, "Foo Bar", "http://foo.bar/x/y", false);

    // ID_GlobalGroups_Secondary
    let s = "ID_GlobalGroups_Secondary";
    let url = "http://foo.bar/x/y";
    let global = "user-agent: *\nallow: /\nuser-agent: FooBot\ndisallow: /\n";
    let only_specific = "user-agent: FooBot\nallow: /\nuser-agent: BarBot\ndisallow: /\nuser-agent: BazBot\ndisallow: /\n";
    t.add(s, "", "FooBot", url, true);
    t.add(s, global, "FooBot", url, false);
    t.add(s, global, "BarBot", url, true);
    t.add(s, only_specific, "QuxBot", url, true);

    // ID_AllowDisallow_Value_CaseSensitive
    let s = "ID_AllowDisallow_Value_CaseSensitive";
    t.add(
        s,
        "user-agent: FooBot\ndisallow: /x/\n",
        "FooBot",
        url,
        false,
    );
    t.add(
        s,
        "user-agent: FooBot\ndisallow: /X/\n",
        "FooBot",
        url,
        true,
    );

    // ID_LongestMatch
    let s = "ID_LongestMatch";
    let url = "http://foo.bar/x/page.html";
    let fb = |rules: &str| format!("user-agent: FooBot\n{rules}");
    t.add(
        s,
        fb("disallow: /x/page.html\nallow: /x/\n"),
        "FooBot",
        url,
        false,
    );
    let r = fb("allow: /x/page.html\ndisallow: /x/\n");
    t.add(s, &r, "FooBot", url, true);
    t.add(s, &r, "FooBot", "http://foo.bar/x/", false);
    t.add(s, fb("disallow: \nallow: \n"), "FooBot", url, true);
    t.add(s, fb("disallow: /\nallow: /\n"), "FooBot", url, true);
    let r = fb("disallow: /x\nallow: /x/\n");
    t.add(s, &r, "FooBot", "http://foo.bar/x", false);
    t.add(s, &r, "FooBot", "http://foo.bar/x/", true);
    t.add(
        s,
        fb("disallow: /x/page.html\nallow: /x/page.html\n"),
        "FooBot",
        url,
        true,
    );
    let r = fb("allow: /page\ndisallow: /*.html\n");
    t.add(s, &r, "FooBot", "http://foo.bar/page.html", false);
    t.add(s, &r, "FooBot", "http://foo.bar/page", true);
    let r = fb("allow: /x/page.\ndisallow: /*.html\n");
    t.add(s, &r, "FooBot", url, true);
    t.add(s, &r, "FooBot", "http://foo.bar/x/y.html", false);
    let r = "User-agent: *\nDisallow: /x/\nUser-agent: FooBot\nDisallow: /y/\n";
    t.add(s, r, "FooBot", "http://foo.bar/x/page", true);
    t.add(s, r, "FooBot", "http://foo.bar/y/page", false);

    // ID_Encoding
    let s = "ID_Encoding";
    let q = "/foo/bar?qux=taz&baz=http://foo.bar?tar&par";
    t.add(
        s,
        format!("User-agent: FooBot\nDisallow: /\nAllow: {q}\n"),
        "FooBot",
        format!("http://foo.bar{q}"),
        true,
    );
    let r = "User-agent: FooBot\nDisallow: /\nAllow: /foo/bar/ツ\n";
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/%E3%83%84", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/ツ", false);
    let r = "User-agent: FooBot\nDisallow: /\nAllow: /foo/bar/%E3%83%84\n";
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/%E3%83%84", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/ツ", false);
    let r = "User-agent: FooBot\nDisallow: /\nAllow: /foo/bar/%62%61%7A\n";
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/baz", false);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/%62%61%7A", true);

    // ID_SpecialCharacters
    let s = "ID_SpecialCharacters";
    let r = "User-agent: FooBot\nDisallow: /foo/bar/quz\nAllow: /foo/*/qux\n";
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/quz", false);
    t.add(s, r, "FooBot", "http://foo.bar/foo/quz", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo//quz", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bax/quz", true);
    let r = "User-agent: FooBot\nDisallow: /foo/bar$\nAllow: /foo/bar/qux\n";
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar", false);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/qux", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar/baz", true);
    let r = "User-agent: FooBot\n# Disallow: /\nDisallow: /foo/quz#qux\nAllow: /\n";
    t.add(s, r, "FooBot", "http://foo.bar/foo/bar", true);
    t.add(s, r, "FooBot", "http://foo.bar/foo/quz", false);

    // GoogleOnly_IndexHTMLisDirectory
    let s = "GoogleOnly_IndexHTMLisDirectory";
    let r = "User-Agent: *\nAllow: /allowed-slash/index.html\nDisallow: /\n";
    t.add(s, r, "foobot", "http://foo.com/allowed-slash/", true);
    t.add(
        s,
        r,
        "foobot",
        "http://foo.com/allowed-slash/index.htm",
        false,
    );
    t.add(
        s,
        r,
        "foobot",
        "http://foo.com/allowed-slash/index.html",
        true,
    );
    t.add(s, r, "foobot", "http://foo.com/anyother-url", false);

    // GoogleOnly_LineTooLong
    let s = "GoogleOnly_LineTooLong";
    let (allow, disallow) = ("allow: ", "disallow: ");
    let mut longline = String::from("/x/");
    let max_length = GOOGLE_MAX_LINE_LEN - longline.len() - disallow.len() + 1;
    while longline.len() < max_length {
        longline.push('a');
    }
    let r = format!("user-agent: FooBot\n{disallow}{longline}/qux\n");
    t.add(s, &r, "FooBot", "http://foo.bar/fux", true);
    t.add(
        s,
        &r,
        "FooBot",
        format!("http://foo.bar{longline}/fux"),
        false,
    );
    let (mut a, mut b) = (String::from("/x/"), String::from("/x/"));
    let max_length = GOOGLE_MAX_LINE_LEN - a.len() - allow.len() + 1;
    while a.len() < max_length {
        a.push('a');
        b.push('b');
    }
    let r = format!("user-agent: FooBot\ndisallow: /\n{allow}{a}/qux\n{allow}{b}/qux\n");
    t.add(s, &r, "FooBot", "http://foo.bar/", false);
    t.add(s, &r, "FooBot", format!("http://foo.bar{a}/qux"), true);
    t.add(s, &r, "FooBot", format!("http://foo.bar{b}/fux"), true);

    // GoogleOnly_DocumentationChecks
    let s = "GoogleOnly_DocumentationChecks";
    let doc = |allow: &str| format!("user-agent: FooBot\ndisallow: /\nallow: {allow}\n");
    for pattern in ["/fish", "/fish*"] {
        let r = doc(pattern);
        for (path, ok) in [
            ("/bar", false),
            ("/fish", true),
            ("/fish.html", true),
            ("/fish/salmon.html", true),
            ("/fishheads", true),
            ("/fishheads/yummy.html", true),
            ("/fish.html?id=anything", true),
            (
                if pattern == "/fish" {
                    "/Fish.asp"
                } else {
                    "/Fish.bar"
                },
                false,
            ),
            ("/catfish", false),
            ("/?id=fish", false),
        ] {
            t.add(s, &r, "FooBot", format!("http://foo.bar{path}"), ok);
        }
    }
    let r = doc("/fish/");
    for (path, ok) in [
        ("/bar", false),
        ("/fish/", true),
        ("/fish/salmon", true),
        ("/fish/?salmon", true),
        ("/fish/salmon.html", true),
        ("/fish/?id=anything", true),
        ("/fish", false),
        ("/fish.html", false),
        ("/Fish/Salmon.html", false),
    ] {
        t.add(s, &r, "FooBot", format!("http://foo.bar{path}"), ok);
    }
    let r = doc("/*.php");
    for (path, ok) in [
        ("/bar", false),
        ("/filename.php", true),
        ("/folder/filename.php", true),
        ("/folder/filename.php?parameters", true),
        ("//folder/any.php.file.html", true),
        ("/filename.php/", true),
        ("/index?f=filename.php/", true),
        ("/php/", false),
        ("/index?php", false),
        ("/windows.PHP", false),
    ] {
        t.add(s, &r, "FooBot", format!("http://foo.bar{path}"), ok);
    }
    let r = doc("/*.php$");
    for (path, ok) in [
        ("/bar", false),
        ("/filename.php", true),
        ("/folder/filename.php", true),
        ("/filename.php?parameters", false),
        ("/filename.php/", false),
        ("/filename.php5", false),
        ("/php/", false),
        ("/filename?php", false),
        ("/aaaphpaaa", false),
        ("//windows.PHP", false),
    ] {
        t.add(s, &r, "FooBot", format!("http://foo.bar{path}"), ok);
    }
    let r = doc("/fish*.php");
    for (path, ok) in [
        ("/bar", false),
        ("/fish.php", true),
        ("/fishheads/catfish.php?parameters", true),
        ("/Fish.PHP", false),
    ] {
        t.add(s, &r, "FooBot", format!("http://foo.bar{path}"), ok);
    }
    t.add(
        s,
        fb("allow: /p\ndisallow: /\n"),
        "FooBot",
        "http://example.com/page",
        true,
    );
    t.add(
        s,
        fb("allow: /folder\ndisallow: /folder\n"),
        "FooBot",
        "http://example.com/folder/page",
        true,
    );
    t.add(
        s,
        fb("allow: /page\ndisallow: /*.htm\n"),
        "FooBot",
        "http://example.com/page.htm",
        false,
    );
    let r = fb("allow: /$\ndisallow: /\n");
    t.add(s, &r, "FooBot", "http://example.com/", true);
    t.add(s, &r, "FooBot", "http://example.com/page.html", false);

    // ID_LinesNumbersAreCountedCorrectly: every kind of line ending splits lines, and a last
    // line without one is still read. `bar`'s `Disallow: /` is the sixth line.
    let s = "ID_LinesNumbersAreCountedCorrectly";
    for r in [
        "User-Agent: foo\nAllow: /some/path\nUser-Agent: bar\n\n\nDisallow: /\n",
        "User-Agent: foo\r\nAllow: /some/path\r\nUser-Agent: bar\r\n\r\n\r\nDisallow: /\r\n",
        "User-Agent: foo\rAllow: /some/path\rUser-Agent: bar\r\r\rDisallow: /\r",
        "User-Agent: foo\nAllow: /some/path\nUser-Agent: bar\n\n\nDisallow: /",
        "User-Agent: foo\nAllow: /some/path\r\nUser-Agent: bar\n\r\n\nDisallow: /",
    ] {
        t.add(s, r, "bar", "http://foo.bar/x", false);
        t.add(s, r, "foo", "http://foo.bar/x", true);
    }

    // ID_UTF8ByteOrderMarkIsSkipped: a whole or partial BOM at the start is skipped; a broken
    // one spoils the first line only; a BOM elsewhere spoils its line.
    let s = "ID_UTF8ByteOrderMarkIsSkipped";
    let rest = b"User-Agent: foo\nDisallow: /AnyValue\n";
    for (prefix, ok) in [
        (&b"\xEF\xBB\xBF"[..], false),
        (b"\xEF\xBB", false),
        (b"\xEF", false),
        (b"\xEF\x11\xBF", true),
    ] {
        let mut r = prefix.to_vec();
        r.extend_from_slice(rest);
        t.add(s, r, "foo", "http://foo.bar/AnyValue", ok);
    }
    t.add(
        s,
        b"User-Agent: foo\n\xEF\xBB\xBFDisallow: /AnyValue\n",
        "foo",
        "http://foo.bar/AnyValue",
        true,
    );

    // ID_NonStandardLineExample_Sitemap: a Sitemap line may appear anywhere and does not end a
    // group.
    let s = "ID_NonStandardLineExample_Sitemap";
    let r = "Sitemap: http://foo.bar/sitemap.xml\nUser-Agent: foo\nDisallow: /some/path\n";
    t.add(s, r, "foo", "http://foo.bar/some/path", false);
    let r = "User-Agent: foo\nSitemap: http://foo.bar/sitemap.xml\nDisallow: /some/path\n";
    t.add(s, r, "foo", "http://foo.bar/some/path", false);

    // TestGetPathParamsQuery, through decisions: the fragment is not part of the path.
    let s = "TestGetPathParamsQuery";
    t.add(
        s,
        "User-agent: *\nDisallow: /a/b?c=d&e=f$\n",
        "FooBot",
        "http://www.example.com/a/b?c=d&e=f#fragment",
        false,
    );
    t.add(
        s,
        "User-agent: *\nDisallow: /$\n",
        "FooBot",
        "http://www.example.com",
        false,
    );
    t.add(
        s,
        "User-agent: *\nDisallow: /a;b$\n",
        "FooBot",
        "http://www.example.com/a;b#c",
        false,
    );

    // TestMaybeEscapePattern, through decisions: non-ASCII in a rule is percent-encoded and
    // escapes are uppercased, then compared with the (already encoded) URL.
    let s = "TestMaybeEscapePattern";
    t.add(
        s,
        "User-agent: *\nDisallow: /á\n",
        "FooBot",
        "http://foo.bar/%C3%A1",
        false,
    );
    t.add(
        s,
        "User-agent: *\nDisallow: /%aa\n",
        "FooBot",
        "http://foo.bar/%AA",
        false,
    );

    // robots.cc, untested there: the typos Google accepts (kAllowFrequentTypos).
    let s = "robots.cc typos";
    for r in [
        "useragent: FooBot\ndisallow: /\n",
        "user agent: FooBot\ndisallow: /\n",
        "user-agent: FooBot\ndissallow: /\n",
        "user-agent: FooBot\ndissalow: /\n",
        "user-agent: FooBot\ndisalow: /\n",
        "user-agent: FooBot\ndiasllow: /\n",
        "user-agent: FooBot\ndisallaw: /\n",
    ] {
        t.add(s, r, "FooBot", "http://foo.bar/x", false);
    }
    // ... but not for allow.
    t.add(
        s,
        "user-agent: FooBot\ndisallow: /\nalow: /x\n",
        "FooBot",
        "http://foo.bar/x",
        false,
    );
    // Keys are matched by prefix, so a longer word still counts; another spelling does not.
    t.add(
        s,
        "user-agent: FooBot\ndisallowed: /\n",
        "FooBot",
        "http://foo.bar/x",
        false,
    );
    t.add(
        s,
        "user-agent: FooBot\ndis-allow: /\n",
        "FooBot",
        "http://foo.bar/x",
        true,
    );

    // robots.cc: the user-agent value is its product token, up to the first character outside
    // [a-zA-Z_-]; `*` followed by whitespace and more is still the global group.
    let s = "robots.cc user-agent";
    t.add(
        s,
        "User-agent: FooBot/2.1\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/x",
        false,
    );
    t.add(
        s,
        "User-agent: * everyone\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/x",
        false,
    );
    t.add(
        s,
        "User-agent: *bot\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/x",
        true,
    );
    t.add(
        s,
        "User-agent: FooBotExtra\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/x",
        true,
    );
    t.add(
        s,
        "User-agent: BarBot\nUser-agent: FooBot\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/x",
        false,
    );
    // Missing colon: only when the line is exactly two words.
    t.add(
        s,
        "user-agent FooBot\ndisallow / x\n",
        "FooBot",
        "http://foo.bar/x",
        true,
    );
    t.add(s, "  \t\n# nothing\n\n", "FooBot", "http://foo.bar/x", true);

    // RFC 9309 2.2.2: "The /robots.txt URI is implicitly allowed." Google's library leaves
    // this to its caller.
    let s = "RFC 9309 /robots.txt";
    t.add(
        s,
        "User-agent: *\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/robots.txt",
        true,
    );
    t.add(
        s,
        "User-agent: *\nDisallow: /\n",
        "FooBot",
        "http://foo.bar/robots.txt?x=1",
        false,
    );

    t.0
}

pub fn delay_cases() -> Vec<DelayCase> {
    let d = |source, robots, agent, delay| DelayCase {
        source,
        robots,
        agent,
        delay,
    };
    vec![
        d(
            "Crawl-delay: in our group",
            "User-agent: FooBot\nCrawl-delay: 2.5\nDisallow: /x\n",
            "FooBot",
            Some(2.5),
        ),
        d(
            "Crawl-delay: from the group the rules come from, not `*`'s",
            "User-agent: *\nCrawl-delay: 9\nDisallow: /y\n\nUser-agent: FooBot\nDisallow: /x\n",
            "FooBot",
            None,
        ),
        d(
            "Crawl-delay: `*`'s when `*` is our group",
            "User-agent: BarBot\nCrawl-delay: 9\nDisallow: /b\n\nUser-agent: *\nCrawl-delay: 3\nDisallow: /x\n",
            "FooBot",
            Some(3.0),
        ),
        d(
            "Crawl-delay: another bot's is not ours",
            "User-agent: BarBot\nCrawl-delay: 9\nDisallow: /x\n",
            "FooBot",
            None,
        ),
        d(
            "Crawl-delay: case-insensitive key, comment after the value",
            "user-agent: foobot\ncrawl-DELAY: 4 # seconds\n",
            "FooBot",
            Some(4.0),
        ),
        d(
            "Crawl-delay: the first one of our groups wins",
            "User-agent: FooBot\nCrawl-delay: 1\n\nUser-agent: FooBot\nCrawl-delay: 7\n",
            "FooBot",
            Some(1.0),
        ),
        d(
            "Crawl-delay: garbage is ignored",
            "User-agent: FooBot\nCrawl-delay: soon\nCrawl-delay: 5\n",
            "FooBot",
            Some(5.0),
        ),
        d(
            "Crawl-delay: negative, NaN, infinite are ignored",
            "User-agent: FooBot\nCrawl-delay: -3\nCrawl-delay: NaN\nCrawl-delay: inf\n",
            "FooBot",
            None,
        ),
        d(
            "Crawl-delay: outside any group is ignored",
            "Crawl-delay: 6\nUser-agent: FooBot\nDisallow: /x\n",
            "FooBot",
            None,
        ),
        // As in Google's grouping, only a rule ends a group: the Crawl-delay line is the
        // group's, whichever of its User-agent lines come after it.
        d(
            "Crawl-delay: does not end a group",
            "User-agent: FooBot\nCrawl-delay: 2\nUser-agent: BarBot\nDisallow: /x\n",
            "BarBot",
            Some(2.0),
        ),
    ]
}
