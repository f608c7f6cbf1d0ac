//! robots.txt (RFC 9309) as Google's reference parser reads it: one fetch per origin (scheme,
//! host, port), cached; concurrent first requests for an origin wait for the same fetch.
//!
//! The fetch itself lives in `fetch.rs` (it goes through the SSRF guard and politeness like any
//! request); this module holds the verdicts, the cache, and the body -> rules step.
//!
//! # The parser, and why it is ours
//!
//! [`Robot`] ports the parsing and matching of github.com/google/robotstxt (`robots.cc`), the
//! parser RFC 9309 was written from, and is checked against every decision in its
//! `robots_test.cc` (`crawler/tests/fetch/robots_cases.rs`, run here and through the fetch
//! stack). Both Rust crates were measured on those 186 rows before choosing:
//!
//! - `texting_robots` 0.2.2 (the previous choice) passed 166. It matches `User-agent` values
//!   whole instead of by product token (`User-agent: Foo Bar` or `FooBot/2.1` never name
//!   `Foo`/`FooBot`; `* everyone` is not `*`), does not treat `index.html` as its directory,
//!   keeps the fragment in the matched path, does not uppercase `%aa` in rules, encodes a raw
//!   non-ASCII URL itself (Google leaves that to the caller, as `url::Url` does), reads lines
//!   longer than Google's 16 KiB cut, accepts `disallowed:` only as unknown, and keeps rules
//!   after a broken byte-order mark. Its Crawl-delay also leaks from lines outside any group.
//! - `robotstxt` 0.3.0 (a port of an older `robots.cc`, last released 2021) passed 180, but
//!   takes `&str` (a partial byte-order mark or any invalid UTF-8 becomes U+FFFD and spoils the
//!   line), skips a byte-order mark only as Latin-1 characters, lets `Sitemap:` and unknown
//!   lines end a group, and does not allow `/robots.txt` itself. Worse for a cell: it panics on
//!   a long line of multi-byte characters (its issue #5, open since 2021: it slices inside a
//!   character), its matcher grows a vector by insertion and did not finish a 2,000-`*` rule
//!   against a 4 KiB path in two minutes, and it re-parses the whole file for every URL.
//!
//! Neither could be wrapped into agreement without re-parsing the file ourselves, so the
//! module parses it: bytes in (no UTF-8 needed), rules for our product token compiled once per
//! origin, matching in linear time per rule (a pattern is literal pieces between `*`s, found
//! leftmost with `str::find`, which is exactly the prefix language Google's matcher accepts).
//! What it does beyond `robots.cc`: `/robots.txt` is always allowed (RFC 9309 2.2.2), and
//! `Crawl-delay` is read from the same group(s) the rules come from.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::politeness::NotNow;

/// RFC 9309 asks crawlers to parse at least 500 KiB; the rest is ignored.
pub(crate) const ROBOTS_MAX_BYTES: usize = 500 * 1024;
/// Redirects followed when fetching robots.txt (RFC 9309: at least five).
pub(crate) const ROBOTS_MAX_REDIRECTS: u32 = 5;
/// How long an unreachable robots.txt (5xx, timeout, refused) is remembered before retrying.
pub(crate) const ROBOTS_UNAVAILABLE_TTL: Duration = Duration::from_secs(60);
/// Beyond this many origins, the least recently used idle ones are forgotten early.
pub(crate) const MAX_ROBOTS_ORIGINS: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What an origin's robots.txt says.
#[derive(Debug)]
pub(crate) enum RobotsVerdict {
    /// 2xx: these rules.
    Rules(Robot),
    /// 4xx, or too many redirects: no restrictions (RFC 9309 2.3.1.3).
    AllowAll,
    /// Fetched, but the rules could not be built: nothing may be crawled.
    DisallowAll(String),
    /// 5xx, 429, timeout, unreachable: complete disallow for now (RFC 9309 2.3.1.4).
    Unavailable(String),
    /// The origin itself is refused by the SSRF guard.
    Refused(String),
}

impl RobotsVerdict {
    fn ttl(&self, cache: Duration) -> Duration {
        match self {
            RobotsVerdict::Rules(_) | RobotsVerdict::AllowAll | RobotsVerdict::DisallowAll(_) => {
                cache
            }
            RobotsVerdict::Unavailable(_) | RobotsVerdict::Refused(_) => {
                cache.min(ROBOTS_UNAVAILABLE_TTL)
            }
        }
    }

    /// Build the verdict for a 2xx body. Runs the parser on a blocking thread: it is CPU work on
    /// up to 500 KiB, and a parser panic must not take the task down.
    pub(crate) async fn from_body(token: &str, mut body: Vec<u8>) -> RobotsVerdict {
        if body.len() >= ROBOTS_MAX_BYTES {
            // Cut at the last full line: a cut Allow rule could allow more than it says.
            body.truncate(ROBOTS_MAX_BYTES);
            let keep = body
                .iter()
                .rposition(|&b| b == b'\n' || b == b'\r')
                .map_or(0, |i| i + 1);
            body.truncate(keep);
        }
        let token = token.to_string();
        match tokio::task::spawn_blocking(move || Robot::new(&token, &body)).await {
            Ok(robot) => RobotsVerdict::Rules(robot),
            Err(e) => RobotsVerdict::DisallowAll(format!("robots.txt parser failed: {e}")),
        }
    }
}

/// Google reads this many bytes of a line (`kBrowserMaxLineLen * 8`, less its terminator);
/// the rest of the line is dropped.
const MAX_LINE_LEN: usize = 2083 * 8 - 1;

/// The rules one robots.txt sets for one product token, compiled once per origin.
pub(crate) struct Robot {
    /// The rules of the group(s) naming our token, or else of the `*` group(s): highest
    /// priority first, Allow before Disallow on a tie, so the first match decides.
    rules: Vec<Rule>,
    /// Crawl-delay in seconds, from the same group(s) as `rules`; the first valid one.
    pub(crate) delay: Option<f32>,
}

impl fmt::Debug for Robot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Robot")
            .field("rules", &self.rules.len())
            .field("delay", &self.delay)
            .finish()
    }
}

struct Rule {
    allow: bool,
    /// The length of the (escaped) pattern: the longest match wins (RFC 9309 2.2.2).
    priority: usize,
    pattern: Pattern,
}

/// A rule's path pattern: literal pieces around `*`s, anchored at the start, and at the end
/// too when it ended in `$`. Pieces are ASCII (the parser percent-encodes everything else).
struct Pattern {
    /// `pieces[0]` is the required prefix; at least one piece.
    pieces: Vec<String>,
    anchored_end: bool,
}

impl Pattern {
    fn new(escaped: &str) -> Pattern {
        let (body, anchored_end) = match escaped.strip_suffix('$') {
            Some(body) => (body, true),
            None => (escaped, false),
        };
        let mut pieces: Vec<String> = body.split('*').map(str::to_string).collect();
        // `**` is `*`: drop empty pieces between stars (keeping the first and the last).
        if pieces.len() > 2 {
            let last = pieces.pop().unwrap_or_default();
            let first = pieces.remove(0);
            pieces.retain(|p| !p.is_empty());
            pieces.insert(0, first);
            pieces.push(last);
        }
        Pattern {
            pieces,
            anchored_end,
        }
    }

    /// Does the pattern match a prefix of `path` (all of it when anchored)? For patterns of
    /// literals and `*`, taking each piece at its leftmost place is as good as any other place,
    /// so this is linear in the path per piece, whatever the file holds.
    fn matches(&self, path: &str) -> bool {
        let Some((first, rest)) = self.pieces.split_first() else {
            return true;
        };
        if !path.starts_with(first.as_str()) {
            return false;
        }
        let Some((last, middle)) = rest.split_last() else {
            return !self.anchored_end || path.len() == first.len();
        };
        let mut at = first.len();
        for piece in middle {
            match path[at..].find(piece.as_str()) {
                Some(i) => at += i + piece.len(),
                None => return false,
            }
        }
        if self.anchored_end {
            path.len() >= at + last.len() && path.ends_with(last.as_str())
        } else {
            path[at..].contains(last.as_str())
        }
    }
}

impl Robot {
    /// Parse `body` (any bytes) for the product token `agent`. Never fails: what is not a
    /// directive is skipped, as Google does.
    pub(crate) fn new(agent: &str, body: &[u8]) -> Robot {
        let mut b = Builder {
            agent: agent.as_bytes(),
            seen_global: false,
            seen_specific: false,
            ever_specific: false,
            seen_separator: false,
            specific: Vec::new(),
            global: Vec::new(),
            specific_delay: None,
            global_delay: None,
            group_delay: None,
            in_group: false,
        };
        for line in lines(body) {
            b.line(line);
        }
        b.end_group();
        let (mut rules, delay) = if b.ever_specific {
            (b.specific, b.specific_delay)
        } else {
            (b.global, b.global_delay)
        };
        rules.sort_by(|x, y| {
            y.priority
                .cmp(&x.priority)
                .then_with(|| y.allow.cmp(&x.allow))
        });
        Robot { rules, delay }
    }

    /// May `url` (absolute and percent-encoded, as `url::Url` writes it) be fetched?
    pub(crate) fn allowed(&self, url: &str) -> bool {
        let path = path_params_query(url);
        // RFC 9309 2.2.2: "The /robots.txt URI is implicitly allowed."
        if path == "/robots.txt" {
            return true;
        }
        // The most specific (longest) match decides, Allow winning ties; an empty Disallow
        // (priority 0) disallows nothing.
        self.rules
            .iter()
            .find(|r| r.pattern.matches(&path))
            .is_none_or(|r| r.allow || r.priority == 0)
    }
}

/// The lines of `body` as Google splits them: a leading (possibly partial) UTF-8 byte-order
/// mark skipped; `\n`, `\r` and `\r\n` end lines; a line is cut at [`MAX_LINE_LEN`] bytes.
fn lines(body: &[u8]) -> impl Iterator<Item = &[u8]> {
    const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
    let bom = body.iter().zip(BOM).take_while(|(a, b)| **a == *b).count();
    let body = &body[bom..];
    let mut rest = Some(body);
    let mut after_cr = false;
    std::iter::from_fn(move || loop {
        let text = rest?;
        let end = text.iter().position(|&c| c == b'\n' || c == b'\r');
        let (line, next) = match end {
            Some(i) => (&text[..i], Some((&text[i + 1..], text[i] == b'\r'))),
            None => (text, None),
        };
        // The `\n` of a `\r\n` ends no second, empty line.
        let crlf = after_cr && line.is_empty() && end.is_some_and(|i| text[i] == b'\n');
        match next {
            Some((next, cr)) => {
                rest = Some(next);
                after_cr = cr;
            }
            None => rest = None,
        }
        if !crlf {
            return Some(&line[..line.len().min(MAX_LINE_LEN)]);
        }
    })
}

/// `absl::ascii_isspace`: what Google strips around keys and values.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_space(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_space(*last) {
            break;
        }
        s = rest;
    }
    s
}

fn starts_with_ignore_case(s: &[u8], prefix: &str) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

/// A line's `key: value`, as Google reads it: comment and surrounding whitespace dropped; a
/// missing colon is forgiven when the line is exactly two words.
fn key_value(line: &[u8]) -> Option<(&[u8], &[u8])> {
    // Google works on C strings: a NUL ends the line.
    let line = line.split(|&c| c == 0).next().unwrap_or_default();
    let line = line.split(|&c| c == b'#').next().unwrap_or_default();
    let line = trim(line);
    if line.is_empty() {
        return None;
    }
    let sep = match line.iter().position(|&c| c == b':') {
        Some(sep) => sep,
        None => {
            let sep = line.iter().position(|&c| c == b' ' || c == b'\t')?;
            let value = &line[sep..];
            let value_start = value.iter().position(|&c| c != b' ' && c != b'\t')?;
            if value[value_start..]
                .iter()
                .any(|&c| c == b' ' || c == b'\t')
            {
                return None;
            }
            sep
        }
    };
    let key = trim(&line[..sep]);
    if key.is_empty() {
        return None;
    }
    Some((key, trim(&line[sep + 1..])))
}

enum Key {
    UserAgent,
    Allow,
    Disallow,
    CrawlDelay,
    Other,
}

/// Keys are recognised by prefix, ignoring case, with the typos Google accepts.
fn key_kind(key: &[u8]) -> Key {
    let is = |names: &[&str]| names.iter().any(|n| starts_with_ignore_case(key, n));
    if is(&["user-agent", "useragent", "user agent"]) {
        Key::UserAgent
    } else if is(&["allow"]) {
        Key::Allow
    } else if is(&[
        "disallow",
        "dissallow",
        "dissalow",
        "disalow",
        "diasllow",
        "disallaw",
    ]) {
        Key::Disallow
    } else if is(&["crawl-delay", "crawl delay", "crawldelay", "crawl_delay"]) {
        Key::CrawlDelay
    } else {
        Key::Other
    }
}

/// Google's `MaybeEscapePattern`: octets outside US-ASCII are percent-encoded and existing
/// escapes uppercased, so rules compare with percent-encoded URLs (RFC 9309 2.2.2).
fn escape_pattern(value: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let c = value[i];
        if c == b'%'
            && i + 2 < value.len()
            && value[i + 1].is_ascii_hexdigit()
            && value[i + 2].is_ascii_hexdigit()
        {
            out.push('%');
            out.push(char::from(value[i + 1].to_ascii_uppercase()));
            out.push(char::from(value[i + 2].to_ascii_uppercase()));
            i += 3;
        } else if c >= 0x80 {
            out.push('%');
            out.push(char::from(HEX[usize::from(c >> 4)]));
            out.push(char::from(HEX[usize::from(c & 0xF)]));
            i += 1;
        } else {
            out.push(char::from(c));
            i += 1;
        }
    }
    out
}

/// The product token of a `User-agent` value: up to the first byte outside `[a-zA-Z_-]`
/// (`FooBot/2.1` and `FooBot Images` both name `FooBot`).
fn product_token(value: &[u8]) -> &[u8] {
    let end = value
        .iter()
        .position(|&c| !(c.is_ascii_alphabetic() || c == b'-' || c == b'_'))
        .unwrap_or(value.len());
    &value[..end]
}

/// Google's `GetPathParamsQuery`: the path, params and query of `url`, without scheme,
/// authority and fragment; always starts with `/`.
fn path_params_query(url: &str) -> Cow<'_, str> {
    let bytes = url.as_bytes();
    let first_of = |from: usize| {
        bytes[from..]
            .iter()
            .position(|c| matches!(c, b'/' | b'?' | b';'))
            .map(|i| i + from)
    };
    let search_start = if url.starts_with("//") { 2 } else { 0 };
    let early_path = first_of(search_start);
    let mut protocol_end = url[search_start..].find("://").map(|i| i + search_start);
    if let (Some(early), Some(end)) = (early_path, protocol_end) {
        if early < end {
            protocol_end = None;
        }
    }
    let protocol_end = protocol_end.map_or(search_start, |end| end + 3);
    let Some(path_start) = first_of(protocol_end) else {
        return Cow::Borrowed("/");
    };
    let hash = url[search_start..].find('#').map(|i| i + search_start);
    if hash.is_some_and(|h| h < path_start) {
        return Cow::Borrowed("/");
    }
    let path = &url[path_start..hash.unwrap_or(url.len())];
    if path.starts_with('/') {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(format!("/{path}"))
    }
}

/// Google's `RobotsMatcher` state while reading a file, kept as rules instead of one URL's
/// match: a group is its `User-agent` lines up to the next `User-agent` after a rule; the
/// groups naming our token are merged, as are the `*` groups.
struct Builder<'a> {
    agent: &'a [u8],
    seen_global: bool,
    seen_specific: bool,
    ever_specific: bool,
    /// A rule was seen since the last `User-agent` line: the next one starts a new group.
    seen_separator: bool,
    specific: Vec<Rule>,
    global: Vec<Rule>,
    specific_delay: Option<f32>,
    global_delay: Option<f32>,
    /// The current group's first Crawl-delay: it is the group's, whichever of its
    /// `User-agent` lines come after it, so it is filed when the group ends.
    group_delay: Option<f32>,
    /// A `User-agent` line was seen: lines before the first one belong to no group.
    in_group: bool,
}

impl Builder<'_> {
    fn line(&mut self, line: &[u8]) {
        let Some((key, value)) = key_value(line) else {
            return;
        };
        match key_kind(key) {
            Key::UserAgent => self.user_agent(value),
            Key::Allow => self.rule(true, value),
            Key::Disallow => self.rule(false, value),
            Key::CrawlDelay => self.crawl_delay(value),
            Key::Other => {}
        }
    }

    fn user_agent(&mut self, value: &[u8]) {
        self.in_group = true;
        if self.seen_separator {
            self.end_group();
            self.seen_specific = false;
            self.seen_global = false;
            self.seen_separator = false;
        }
        // Google: `*` followed by whitespace and more is still the global group.
        if value.first() == Some(&b'*') && value.get(1).is_none_or(|&c| is_space(c)) {
            self.seen_global = true;
        } else if product_token(value).eq_ignore_ascii_case(self.agent) {
            self.seen_specific = true;
            self.ever_specific = true;
        }
    }

    fn rule(&mut self, allow: bool, value: &[u8]) {
        // Google sets this only in groups it obeys; setting it always ends other groups too,
        // which changes no rule (their flags are down) and lets Crawl-delay find its group.
        self.seen_separator = true;
        if !(self.seen_global || self.seen_specific) {
            return;
        }
        let escaped = escape_pattern(value);
        // Google: an Allow ending in `index.htm...` also allows its directory, exactly.
        let index_dir = allow
            .then(|| {
                let slash = escaped.rfind('/')?;
                escaped[slash..]
                    .starts_with("/index.htm")
                    .then(|| format!("{}$", &escaped[..=slash]))
            })
            .flatten();
        let list = if self.seen_specific {
            &mut self.specific
        } else {
            &mut self.global
        };
        for pattern in std::iter::once(escaped).chain(index_dir) {
            list.push(Rule {
                allow,
                priority: pattern.len(),
                pattern: Pattern::new(&pattern),
            });
        }
    }

    /// Not in Google's parser (it ignores Crawl-delay); belongs to the current group but, like
    /// any line Google does not know, does not end it.
    fn crawl_delay(&mut self, value: &[u8]) {
        if !self.in_group {
            return;
        }
        if let Some(secs) = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<f32>().ok())
            .filter(|d| d.is_finite() && *d >= 0.0)
        {
            self.group_delay.get_or_insert(secs);
        }
    }

    /// File the ending group's Crawl-delay where its rules went.
    fn end_group(&mut self) {
        let Some(secs) = self.group_delay.take() else {
            return;
        };
        if self.seen_specific {
            self.specific_delay.get_or_insert(secs);
        } else if self.seen_global {
            self.global_delay.get_or_insert(secs);
        }
    }
}

struct Cached {
    verdict: Arc<RobotsVerdict>,
    expires: Instant,
}

struct Slot {
    state: tokio::sync::Mutex<Option<Cached>>,
    last_used: Mutex<Instant>,
}

struct SlotMap {
    slots: HashMap<String, Arc<Slot>>,
    last_sweep: Instant,
}

pub(crate) struct RobotsCache {
    map: Mutex<SlotMap>,
    ttl: Duration,
    max_origins: usize,
}

impl RobotsCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self::with_limit(ttl, MAX_ROBOTS_ORIGINS)
    }

    pub(crate) fn with_limit(ttl: Duration, max_origins: usize) -> Self {
        Self {
            map: Mutex::new(SlotMap {
                slots: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            ttl,
            max_origins,
        }
    }

    #[cfg(test)]
    pub(crate) fn origins(&self) -> usize {
        lock(&self.map).slots.len()
    }

    fn slot(&self, origin: &str) -> Arc<Slot> {
        let now = Instant::now();
        let mut map = lock(&self.map);
        if now.duration_since(map.last_sweep) >= self.ttl.min(ROBOTS_UNAVAILABLE_TTL)
            || map.slots.len() >= self.max_origins
        {
            map.last_sweep = now;
            self.sweep(&mut map.slots, now);
        }
        let slot = map
            .slots
            .entry(origin.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(None),
                    last_used: Mutex::new(now),
                })
            })
            .clone();
        *lock(&slot.last_used) = now;
        metrics::gauge!("crawler_robots_origins").set(map.slots.len() as f64);
        slot
    }

    /// Drop unused slots whose entry expired (or never came); if still too many, the least
    /// recently used unused ones.
    fn sweep(&self, slots: &mut HashMap<String, Arc<Slot>>, now: Instant) {
        let expired = |s: &Arc<Slot>| {
            Arc::strong_count(s) == 1
                && s.state
                    .try_lock()
                    .is_ok_and(|c| c.as_ref().is_none_or(|c| c.expires <= now))
        };
        slots.retain(|_, s| !expired(s));
        if slots.len() >= self.max_origins {
            let mut unused: Vec<(Instant, String)> = slots
                .iter()
                .filter(|(_, s)| Arc::strong_count(s) == 1)
                .map(|(k, s)| (*lock(&s.last_used), k.clone()))
                .collect();
            unused.sort();
            let target = (self.max_origins * 9 / 10).max(1);
            let excess = (slots.len() + 1).saturating_sub(target);
            for (_, key) in unused.into_iter().take(excess) {
                slots.remove(&key);
            }
        }
    }

    /// The cached verdict for `origin`, or the result of `fetch` (run once for all concurrent
    /// callers). A `NotNow` from `fetch` is passed on and not cached.
    pub(crate) async fn verdict<F, Fut>(
        &self,
        origin: &str,
        fetch: F,
    ) -> Result<Arc<RobotsVerdict>, NotNow>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<RobotsVerdict, NotNow>>,
    {
        let slot = self.slot(origin);
        // Holding the slot's lock during the fetch is what makes concurrent callers share it.
        let mut cached = slot.state.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.expires > Instant::now()) {
            return Ok(c.verdict.clone());
        }
        metrics::counter!("crawler_robots_fetches_total").increment(1);
        let verdict = Arc::new(fetch().await?);
        tracing::debug!(origin, verdict = ?verdict, "robots.txt fetched");
        *cached = Some(Cached {
            verdict: verdict.clone(),
            expires: Instant::now() + verdict.ttl(self.ttl),
        });
        Ok(verdict)
    }
}

/// The reference table (Google's `robots_test.cc`, ported), shared with the fetch tests.
#[cfg(test)]
#[path = "../tests/fetch/robots_cases.rs"]
mod reference_cases;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::reference_cases::{cases, delay_cases};
    use super::*;

    #[test]
    fn every_reference_case_is_decided_as_google_decides() {
        let all = cases();
        let wrong: Vec<String> = all
            .iter()
            .filter(|c| {
                let robot = Robot::new(c.agent, &c.robots);
                robot.allowed(&c.url) != c.allowed
            })
            .map(|c| {
                format!(
                    "[{}] agent {:?} url {:.80?} should be {}",
                    c.source,
                    c.agent,
                    c.url,
                    if c.allowed { "allowed" } else { "disallowed" }
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {} reference cases wrong:\n{}",
            wrong.len(),
            all.len(),
            wrong.join("\n")
        );
        assert!(all.len() >= 180, "the table lost rows: {}", all.len());
    }

    #[test]
    fn crawl_delay_comes_from_the_group_the_rules_come_from() {
        for c in delay_cases() {
            let robot = Robot::new(c.agent, c.robots.as_bytes());
            assert_eq!(robot.delay, c.delay, "[{}] {:?}", c.source, c.robots);
        }
    }

    /// `robots_test.cc`: `ID_VerifyValidUserAgentsToObey`, on the product-token extraction
    /// (`IsValidUserAgentToObey(ua)` is `!ua.is_empty() && ExtractUserAgent(ua) == ua`).
    #[test]
    fn product_tokens_are_letters_dashes_and_underscores() {
        let valid = |ua: &str| !ua.is_empty() && product_token(ua.as_bytes()) == ua.as_bytes();
        for ua in ["Foobot", "Foobot-Bar", "Foo_Bar"] {
            assert!(valid(ua), "{ua}");
        }
        for ua in ["", "ツ", "Foobot*", " Foobot ", "Foobot/2.1", "Foobot Bar"] {
            assert!(!valid(ua), "{ua}");
        }
        assert_eq!(product_token(b"Googlebot/2.1"), b"Googlebot");
    }

    /// `robots_test.cc`: `TestGetPathParamsQuery`.
    #[test]
    fn path_params_query_as_google_extracts_it() {
        for (url, path) in [
            ("", "/"),
            ("http://www.example.com", "/"),
            ("http://www.example.com/", "/"),
            ("http://www.example.com/a", "/a"),
            ("http://www.example.com/a/", "/a/"),
            (
                "http://www.example.com/a/b?c=http://d.e/",
                "/a/b?c=http://d.e/",
            ),
            (
                "http://www.example.com/a/b?c=d&e=f#fragment",
                "/a/b?c=d&e=f",
            ),
            ("example.com", "/"),
            ("example.com/", "/"),
            ("example.com/a", "/a"),
            ("example.com/a/", "/a/"),
            ("example.com/a/b?c=d&e=f#fragment", "/a/b?c=d&e=f"),
            ("a", "/"),
            ("a/", "/"),
            ("/a", "/a"),
            ("a/b", "/b"),
            ("example.com?a", "/?a"),
            ("example.com/a;b#c", "/a;b"),
            ("//a/b/c", "/b/c"),
        ] {
            assert_eq!(path_params_query(url), path, "{url:?}");
        }
    }

    /// `robots_test.cc`: `TestMaybeEscapePattern`, and what it does with broken escapes.
    #[test]
    fn patterns_are_escaped_as_google_escapes_them() {
        for (raw, escaped) in [
            ("http://www.example.com", "http://www.example.com"),
            ("/a/b/c", "/a/b/c"),
            ("á", "%C3%A1"),
            ("%aa", "%AA"),
            ("%zz%a", "%zz%a"),
            ("/ツ%e3", "/%E3%83%84%E3"),
        ] {
            assert_eq!(escape_pattern(raw.as_bytes()), escaped, "{raw:?}");
        }
        assert_eq!(escape_pattern(b"/\xff\x00"), "/%FF\u{0}");
    }

    /// Nothing a cell receives may crash it: any bytes give rules, and any URL a decision,
    /// without a panic and in time linear per rule (no backtracking on `*`).
    #[tokio::test]
    async fn hostile_files_yield_a_decision() {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut garbage = Vec::with_capacity(2 * ROBOTS_MAX_BYTES);
        while garbage.len() < 2 * ROBOTS_MAX_BYTES {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            garbage.extend_from_slice(&state.to_le_bytes());
        }
        let long_path = format!("http://a.test/{}", "a".repeat(8_000));
        let shorter_path = format!("http://a.test/{}", "a".repeat(7_999));
        let star_rule = format!("User-agent: *\nDisallow: /{}\n", "*a".repeat(8_000));
        let star_rules = format!(
            "User-agent: *\n{}",
            "Disallow: /*a*b*c*d*e$\n".repeat(ROBOTS_MAX_BYTES / 22)
        );
        let long_multibyte = format!("User-agent: *\nDisallow: /{}x\n", "é".repeat(40_000));
        let hundred_k_lines = "User-agent: *\nDisallow: /private\n".repeat(50_000);
        // (body, URL, decision if one is certain)
        let cases: Vec<(&str, Vec<u8>, &str, Option<bool>)> = vec![
            (
                "binary garbage, twice the cap",
                garbage,
                "http://a.test/x",
                None,
            ),
            (
                "invalid UTF-8 in rules",
                b"User-agent: *\nDisallow: /\xff\xfe\xc3(\nAllow: /\x80\n".to_vec(),
                "http://a.test/%FF%FE%C3(x",
                Some(false),
            ),
            (
                "8,000 stars, matched",
                star_rule.clone().into_bytes(),
                &long_path,
                Some(false),
            ),
            (
                "8,000 stars, one short",
                star_rule.into_bytes(),
                &shorter_path,
                Some(true),
            ),
            (
                "500 KiB of star rules",
                star_rules.into_bytes(),
                &long_path,
                Some(true),
            ),
            (
                "a 80 KB line of multi-byte characters",
                long_multibyte.into_bytes(),
                "http://a.test/x",
                Some(true),
            ),
            (
                "100k lines",
                hundred_k_lines.into_bytes(),
                "http://a.test/private",
                Some(false),
            ),
            (
                "only carriage returns",
                vec![b'\r'; ROBOTS_MAX_BYTES],
                "http://a.test/",
                Some(true),
            ),
            (
                "1 MiB without a newline",
                vec![b'a'; 1 << 20],
                "http://a.test/",
                Some(true),
            ),
            (
                "NUL bytes",
                b"User-agent: *\nDisallow: /a\0b\n\0\0".to_vec(),
                "http://a.test/ab",
                Some(false),
            ),
        ];
        for (what, body, url, expected) in cases {
            let v = RobotsVerdict::from_body("HomeostatBot", body).await;
            let RobotsVerdict::Rules(robot) = v else {
                panic!("{what}: rules expected, got {v:?}")
            };
            let allowed = robot.allowed(url);
            if let Some(expected) = expected {
                assert_eq!(allowed, expected, "{what}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_requests_share_one_fetch_and_entries_expire() {
        let cache = Arc::new(RobotsCache::new(Duration::from_secs(3_600)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cache, fetches, gate) = (cache.clone(), fetches.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .verdict("http://a.test", || async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(RobotsVerdict::AllowAll)
                    })
                    .await
                    .map(|v| matches!(*v, RobotsVerdict::AllowAll))
            }));
        }
        while fetches.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.expect("task"), Ok(true));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // An hour later the entry has expired and is fetched again.
        tokio::time::advance(Duration::from_secs(3_601)).await;
        let again = cache
            .verdict("http://a.test", || async {
                Ok(RobotsVerdict::Unavailable("http 500".into()))
            })
            .await
            .expect("verdict");
        assert!(matches!(*again, RobotsVerdict::Unavailable(_)));
        // Unavailable is remembered only briefly.
        tokio::time::advance(ROBOTS_UNAVAILABLE_TTL).await;
        let third = cache
            .verdict("http://a.test", || async { Ok(RobotsVerdict::AllowAll) })
            .await
            .expect("verdict");
        assert!(matches!(*third, RobotsVerdict::AllowAll));
    }

    #[tokio::test(start_paused = true)]
    async fn not_now_is_not_cached_and_the_map_is_bounded() {
        let cache = RobotsCache::with_limit(Duration::from_secs(3_600), 50);
        let r = cache
            .verdict("http://a.test", || async {
                Err(NotNow::BackingOff(Duration::from_secs(1)))
            })
            .await;
        assert!(r.is_err());
        let r = cache
            .verdict("http://a.test", || async { Ok(RobotsVerdict::AllowAll) })
            .await;
        assert!(r.is_ok());
        for i in 0..500 {
            let _ = cache
                .verdict(&format!("http://h{i}.test"), || async {
                    Ok(RobotsVerdict::AllowAll)
                })
                .await;
        }
        assert!(cache.origins() <= 50, "{}", cache.origins());
    }

    #[tokio::test]
    async fn bodies_become_rules_and_oversized_ones_are_cut_at_a_line() {
        let v = RobotsVerdict::from_body(
            "HomeostatBot",
            b"User-agent: *\nDisallow: /private\nCrawl-delay: 2".to_vec(),
        )
        .await;
        let RobotsVerdict::Rules(robot) = v else {
            panic!("rules expected, got {v:?}")
        };
        assert!(!robot.allowed("http://a.test/private/x"));
        assert!(robot.allowed("http://a.test/public"));
        assert_eq!(robot.delay, Some(2.0));

        // A huge file cut at the cap inside a line: that half line is dropped, so
        // `Allow: /private-page` does not become `Allow: /pri`.
        let mut body = b"User-agent: *\nDisallow: /\n".to_vec();
        let filler = ROBOTS_MAX_BYTES - 11 - body.len() - 1;
        body.push(b'#');
        body.extend(std::iter::repeat_n(b'x', filler - 1));
        body.push(b'\n');
        body.extend_from_slice(b"Allow: /private-page\n");
        assert_eq!(
            &body[ROBOTS_MAX_BYTES - 11..ROBOTS_MAX_BYTES],
            b"Allow: /pri"
        );
        let v = RobotsVerdict::from_body("HomeostatBot", body).await;
        let RobotsVerdict::Rules(robot) = v else {
            panic!("rules expected, got {v:?}")
        };
        assert!(
            !robot.allowed("http://a.test/print"),
            "a cut rule must not widen what is allowed"
        );
        assert!(
            !robot.allowed("http://a.test/private-page"),
            "the rule past the cap is ignored"
        );
    }
}
