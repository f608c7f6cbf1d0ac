//! From "here is a URL" to "here is a `protocol::Outcome`": robots.txt, politeness, the SSRF
//! guard, manual redirects, capped and decoded bodies, and the HTML parse.
//!
//! Architecture Invariant: no request leaves this module without passing the literal-address
//! check, the guarded resolver (inside reqwest) and the host's politeness gate (robots.txt
//! requests included); no page is requested before its origin's robots.txt allowed it. The gap a
//! request asks its gate for is `max(1 / per_host_rate, Crawl-delay)` of the robots group that
//! applies. reqwest never follows redirects or decompresses
//! on its own: both happen here, under the same checks and caps.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use protocol::{FetchedPage, Outcome};
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, LOCATION,
    RETRY_AFTER,
};
use reqwest::StatusCode;
use tokio::time::Instant;
use url::Url;

use crate::body::{self, BodyError, Overflow};
use crate::config::FetchConfig;
use crate::parse::{self, Directives, PageLimits};
use crate::politeness::{
    parse_retry_after, HostGate, HostPermit, NotNow, Politeness, MAX_CRAWL_DELAY,
};
use crate::robots::{
    RobotsCache, RobotsVerdict, ROBOTS_MAX_BYTES, ROBOTS_MAX_REDIRECTS, ROBOTS_UNAVAILABLE_TTL,
};
use crate::ssrf::{check_literal_host, AddressPolicy, GuardedResolver, ResolveError, StaticNames};

/// Suggested wait after a transient failure (timeout, connection error, 5xx).
pub const TRANSIENT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Back-off of a host that answered 429/503 without a usable `Retry-After`.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(60);
/// How long an idle connection to a host is kept, and how many per host at most. Every
/// connection kept holds its buffers: on a thousand hosts a crawler kept 530 connections and
/// 68 MB of heap with 5 s, 240 and 40 MB with 1 s, at the same speed (BENCHMARKS.md). At the
/// default politeness a host's requests are 500 ms apart, so a host being crawled keeps its
/// connections.
const POOL_IDLE: Duration = Duration::from_secs(1);
const POOL_IDLE_PER_HOST: usize = 4;

/// The first bytes looked at when a page has no content type.
const SNIFF_BYTES: usize = 1024;

/// The result of one crawl attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum CrawlAttempt {
    /// Final: a page, or a failure/refusal with its reason (stored in the frontier).
    Done(Outcome),
    /// Transient (timeout, connection error, 5xx, 429/503, robots.txt unreachable): try again
    /// later, not before `after`. The attempt counts.
    Retry { reason: String, after: Duration },
    /// Not attempted: the host is not due within the gate's horizon (politeness, a back-off it
    /// asked for), or the gate cannot be asked. Hand the job back, not before `after`, without
    /// counting the attempt.
    Defer { reason: String, after: Duration },
}

/// The fetch stack. Cheap to clone; clones share connections, robots.txt cache and per-host
/// politeness, so one `Fetcher` should serve all of a cell's crawl tasks.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

/// Time spent turning fetched bodies into pages (decoding, charset, parsing) and how much was
/// turned: the crawler's own processing time per unit of work, apart from the network and the
/// sites' latency (fatigue: a cell that slows down on the same work is tiring).
#[derive(Debug, Default)]
pub struct ParseMeter {
    micros: std::sync::atomic::AtomicU64,
    /// Bytes parsed, each page counted as at least 1 KiB (a tiny page still costs a parse).
    bytes: std::sync::atomic::AtomicU64,
}

impl ParseMeter {
    fn record(&self, took: Duration, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(micros, Relaxed);
        self.bytes
            .fetch_add(bytes.max(1024).try_into().unwrap_or(u64::MAX), Relaxed);
    }

    /// Microseconds per KiB parsed since the last call; `None` when nothing was parsed.
    pub fn take(&self) -> Option<f64> {
        use std::sync::atomic::Ordering::Relaxed;
        let bytes = self.bytes.swap(0, Relaxed);
        let micros = self.micros.swap(0, Relaxed);
        (bytes > 0).then(|| micros as f64 / (bytes as f64 / 1024.0))
    }
}

struct Inner {
    cfg: FetchConfig,
    meter: Arc<ParseMeter>,
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    politeness: Arc<dyn HostGate>,
    /// `1 / per_host_rate`: the shortest gap between two requests to a host.
    base_gap: Duration,
    robots: RobotsCache,
    limits: PageLimits,
}

/// Why one request could not produce a response.
#[derive(Debug)]
enum HopError {
    /// The SSRF guard refused the address.
    Refused(String),
    NotNow(NotNow),
    /// Timeout, connection error, DNS failure.
    Transient(String),
}

/// Why a fetched body yields no page.
enum PageError {
    NotHtml,
    Body(BodyError),
}

fn body_label(e: &BodyError) -> &'static str {
    match e {
        BodyError::TooLarge { .. } | BodyError::InflatesTooLarge { .. } => "too_large",
        _ => "bad_body",
    }
}

/// How a crawl ended, for the metrics label and the attempt itself.
struct Ending {
    attempt: CrawlAttempt,
    label: &'static str,
}

fn failed(reason: impl Into<String>, label: &'static str) -> Ending {
    Ending {
        attempt: CrawlAttempt::Done(Outcome::Failed {
            reason: reason.into(),
        }),
        label,
    }
}

fn retry(reason: impl Into<String>, after: Duration) -> Ending {
    Ending {
        attempt: CrawlAttempt::Retry {
            reason: reason.into(),
            after,
        },
        label: "retry",
    }
}

fn not_now(host: &str, n: NotNow) -> Ending {
    let (reason, after) = match n {
        NotNow::BackingOff(after) => (format!("host {host} is backing off (Retry-After)"), after),
        NotNow::Busy(after) => (format!("host {host} is not due yet (politeness)"), after),
        NotNow::Unavailable(after) => (
            format!("the politeness gate for {host} cannot be asked (no api answers)"),
            after,
        ),
    };
    Ending {
        attempt: CrawlAttempt::Defer { reason, after },
        label: "deferred",
    }
}

fn hop_error(host: &str, e: HopError) -> Ending {
    match e {
        HopError::Refused(r) => failed(format!("refused: {r}"), "refused"),
        HopError::NotNow(n) => not_now(host, n),
        HopError::Transient(r) => retry(r, TRANSIENT_RETRY_AFTER),
    }
}

/// An error and its sources, joined with `: ` and without repeats.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

fn classify_send_error(e: &reqwest::Error) -> HopError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(resolve) = err.downcast_ref::<ResolveError>() {
            return match resolve {
                ResolveError::Refused(r) => HopError::Refused(r.to_string()),
                ResolveError::Lookup(msg) => HopError::Transient(msg.clone()),
            };
        }
        cur = err.source();
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection error"
    } else {
        "request error"
    };
    HopError::Transient(format!("{kind}: {}", error_chain(e)))
}

fn header_str(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<&str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_html_type(essence: &str) -> bool {
    matches!(essence, "text/html" | "application/xhtml+xml")
}

/// For a body without a content type: does it start like HTML?
fn sniff_html(body: &[u8]) -> bool {
    let head = body[..body.len().min(SNIFF_BYTES)].to_ascii_lowercase();
    head.windows(5).any(|w| w == b"<html") || head.windows(14).any(|w| w == b"<!doctype html")
}

/// Why a fetch stack could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    #[error("invalid fetch configuration: {0}")]
    Config(String),
    #[error("building the HTTP client: {0}")]
    Client(String),
}

impl Fetcher {
    /// A fetch stack with its own, in-process politeness (a crawler alone, tests).
    pub fn new(cfg: FetchConfig) -> Result<Self, FetcherError> {
        let gate = Politeness::new(
            cfg.per_host_rate,
            cfg.per_host_burst,
            cfg.per_host_concurrency,
        );
        Self::with_gate(cfg, Arc::new(gate))
    }

    /// A fetch stack whose per-host politeness is `gate` (the organism's host ledger, in a
    /// crawler cell).
    pub fn with_gate(cfg: FetchConfig, gate: Arc<dyn HostGate>) -> Result<Self, FetcherError> {
        if let Err(errors) = cfg.validate() {
            let list: Vec<String> = errors.iter().map(|(k, r)| format!("{k}: {r}")).collect();
            return Err(FetcherError::Config(list.join("; ")));
        }
        let policy = Arc::new(AddressPolicy::new(cfg.allow_addresses.clone()));
        let resolver =
            GuardedResolver::new(Arc::new(StaticNames::new(&cfg.resolve)), policy.clone());
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml;q=0.9,*/*;q=0.1"),
        );
        headers.insert(
            ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br, deflate"),
        );
        let client = reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .default_headers(headers)
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .timeout(Duration::from_millis(cfg.total_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names itself, around the SSRF guard.
            .no_proxy()
            // Bodies are decompressed here, under the size cap, never by reqwest.
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .dns_resolver(Arc::new(resolver))
            // Idle connections are kept briefly and few per host: a crawl of a thousand hosts
            // kept every host's sixteen for 30 s, 6,000 sockets and 200 MB in one crawler
            // (BENCHMARKS.md); a host asked again within the idle time still finds some.
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(
                usize::try_from(cfg.per_host_concurrency)
                    .unwrap_or(2)
                    .min(POOL_IDLE_PER_HOST),
            )
            .build()
            .map_err(|e| FetcherError::Client(error_chain(&e)))?;
        let limits = PageLimits {
            max_text_chars: cfg.max_text_chars,
            max_links: cfg.max_links,
            robots_token: cfg.effective_robots_token(),
            parse_budget: parse::PARSE_BUDGET,
        };
        let base_gap =
            Duration::try_from_secs_f64(1.0 / cfg.per_host_rate).unwrap_or(Duration::from_secs(1));
        Ok(Self {
            inner: Arc::new(Inner {
                politeness: gate,
                base_gap,
                robots: RobotsCache::new(Duration::from_secs(cfg.robots_cache_secs)),
                client,
                policy,
                limits,
                cfg,
                meter: Arc::new(ParseMeter::default()),
            }),
        })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.cfg
    }

    /// The time this fetcher spends parsing, per KiB ([`ParseMeter`]).
    pub fn parse_meter(&self) -> Arc<ParseMeter> {
        self.inner.meter.clone()
    }

    /// Robots check, politeness wait, fetch with manual redirects, decode, parse. Never panics
    /// on any input.
    pub async fn crawl(&self, url: &str) -> CrawlAttempt {
        let started = Instant::now();
        let ending = match AssertUnwindSafe(self.inner.crawl(url)).catch_unwind().await {
            Ok(ending) => ending,
            Err(_) => {
                tracing::error!(url, "the fetch stack panicked; reporting the URL as failed");
                failed("internal error: the crawler panicked on this URL", "panic")
            }
        };
        metrics::counter!("crawler_fetches_total", "outcome" => ending.label).increment(1);
        if ending.label == "robots_disallowed" {
            metrics::counter!("crawler_robots_refusals_total").increment(1);
        }
        metrics::histogram!("crawler_fetch_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match &ending.attempt {
            CrawlAttempt::Done(Outcome::Page(p)) => {
                tracing::debug!(url, final_url = %p.final_url, links = p.links.len(), "crawled")
            }
            CrawlAttempt::Done(Outcome::Failed { reason }) => {
                tracing::debug!(url, reason, "crawl failed")
            }
            CrawlAttempt::Retry { reason, after } => {
                tracing::debug!(
                    url,
                    reason,
                    after_ms = after.as_millis() as u64,
                    "crawl to retry"
                )
            }
            CrawlAttempt::Defer { reason, after } => {
                tracing::debug!(
                    url,
                    reason,
                    after_ms = after.as_millis() as u64,
                    "crawl deferred"
                )
            }
        }
        ending.attempt
    }
}

impl Inner {
    async fn crawl(&self, raw: &str) -> Ending {
        let mut url = match protocol::urls::normalize(raw) {
            Ok(url) => url,
            Err(e) => return failed(format!("invalid url: {e}"), "invalid_url"),
        };
        let mut redirects = 0u32;
        loop {
            let host = protocol::urls::host_of(&url);
            if let Err(r) = check_literal_host(&self.policy, &url) {
                return failed(format!("refused: {r}"), "refused");
            }
            if let Some(left) = self.politeness.backoff_left(&host) {
                return not_now(&host, NotNow::BackingOff(left));
            }
            let gap = match self.robots_gate(&url, &host).await {
                Ok(gap) => gap,
                Err(ending) => return ending,
            };
            let (resp, permit) = match self.request(&url, gap).await {
                Ok(r) => r,
                Err(e) => return hop_error(&host, e),
            };
            let status = resp.status();
            if status.is_redirection() {
                let Some(location) = header_str(resp.headers(), LOCATION).map(str::to_string)
                else {
                    return failed(
                        format!("http {} without Location", status.as_u16()),
                        "http_error",
                    );
                };
                drop(resp);
                drop(permit);
                if redirects >= self.cfg.max_redirects {
                    return failed(
                        format!("redirect limit ({}) exceeded", self.cfg.max_redirects),
                        "redirect_limit",
                    );
                }
                redirects += 1;
                url = match protocol::urls::join(&url, &location) {
                    Ok(next) => next,
                    Err(e) => {
                        return failed(format!("bad redirect to {location:?}: {e}"), "bad_redirect")
                    }
                };
                tracing::debug!(to = %url, redirects, "following redirect");
                continue;
            }
            return self.finish(url, &host, resp, permit).await;
        }
    }

    /// Consult robots.txt for `url`: the gap the fetch must keep from the host's previous
    /// request when it may go ahead.
    async fn robots_gate(&self, url: &Url, host: &str) -> Result<Duration, Ending> {
        let origin = url.origin().ascii_serialization();
        let verdict = match self
            .robots
            .verdict(&origin, || self.fetch_robots(url))
            .await
        {
            Ok(v) => v,
            Err(n) => return Err(not_now(host, n)),
        };
        match &*verdict {
            RobotsVerdict::Rules(robot) => {
                let delay = robot
                    .delay
                    .filter(|d| d.is_finite() && *d > 0.0)
                    .and_then(|d| Duration::try_from_secs_f32(d).ok())
                    .map(|d| d.min(MAX_CRAWL_DELAY))
                    .unwrap_or(Duration::ZERO);
                if robot.allowed(url.as_str()) {
                    Ok(self.base_gap.max(delay))
                } else {
                    Err(failed("robots.txt disallows", "robots_disallowed"))
                }
            }
            RobotsVerdict::AllowAll => Ok(self.base_gap),
            RobotsVerdict::DisallowAll(why) => {
                tracing::debug!(origin, why, "robots.txt disallows everything");
                Err(failed("robots.txt disallows", "robots_disallowed"))
            }
            RobotsVerdict::Unavailable(why) => Err(retry(
                format!("robots.txt unavailable ({why}): disallowed for now"),
                ROBOTS_UNAVAILABLE_TTL,
            )),
            RobotsVerdict::Refused(r) => Err(failed(format!("refused: {r}"), "refused")),
        }
    }

    /// One request, after the literal-address check and the host's politeness (its start at
    /// least `gap` after the host's previous request).
    async fn request(
        &self,
        url: &Url,
        gap: Duration,
    ) -> Result<(reqwest::Response, HostPermit), HopError> {
        check_literal_host(&self.policy, url).map_err(|r| HopError::Refused(r.to_string()))?;
        let host = protocol::urls::host_of(url);
        let permit = self
            .politeness
            .acquire(&host, gap)
            .await
            .map_err(HopError::NotNow)?;
        metrics::counter!("crawler_requests_total").increment(1);
        tracing::debug!(%url, "request");
        let resp = self
            .client
            .get(url.as_str())
            .send()
            .await
            .map_err(|e| classify_send_error(&e))?;
        Ok((resp, permit))
    }

    /// Fetch and judge `url`'s robots.txt, following up to five redirects.
    async fn fetch_robots(&self, page: &Url) -> Result<RobotsVerdict, NotNow> {
        let mut url = match protocol::urls::join(page, "/robots.txt") {
            Ok(u) => u,
            Err(e) => {
                return Ok(RobotsVerdict::Unavailable(format!(
                    "no robots.txt URL: {e}"
                )))
            }
        };
        for hop in 0..=ROBOTS_MAX_REDIRECTS {
            // Before the host's Crawl-delay is known: the configured rate.
            let (resp, permit) = match self.request(&url, self.base_gap).await {
                Ok(r) => r,
                Err(HopError::Refused(r)) if hop == 0 => return Ok(RobotsVerdict::Refused(r)),
                Err(HopError::Refused(r)) => {
                    return Ok(RobotsVerdict::Unavailable(format!(
                        "redirected to a refused address: {r}"
                    )))
                }
                Err(HopError::NotNow(n)) => return Err(n),
                Err(HopError::Transient(r)) => return Ok(RobotsVerdict::Unavailable(r)),
            };
            let status = resp.status();
            if status.is_redirection() {
                let next = header_str(resp.headers(), LOCATION)
                    .and_then(|l| protocol::urls::join(&url, l).ok());
                drop(resp);
                drop(permit);
                match next {
                    Some(next) => {
                        url = next;
                        continue;
                    }
                    // A redirect nowhere: as if there were no robots.txt.
                    None => return Ok(RobotsVerdict::AllowAll),
                }
            }
            if status.is_success() {
                let codings = body::parse_encodings(header_str(resp.headers(), CONTENT_ENCODING));
                let wire_cap = self.cfg.max_body_bytes.max(ROBOTS_MAX_BYTES);
                let wire = match body::read_wire(resp, wire_cap, Overflow::Truncate).await {
                    Ok(w) => w,
                    Err(e) => return Ok(RobotsVerdict::Unavailable(e.to_string())),
                };
                drop(permit);
                let decoded = match tokio::task::spawn_blocking(move || {
                    body::decode(wire, &codings, ROBOTS_MAX_BYTES, Overflow::Truncate)
                })
                .await
                {
                    Ok(Ok(d)) => d,
                    // Undecodable: treat like an unreadable file, retried soon.
                    Ok(Err(e)) => return Ok(RobotsVerdict::Unavailable(e.to_string())),
                    Err(e) => {
                        return Ok(RobotsVerdict::Unavailable(format!("decoder failed: {e}")))
                    }
                };
                return Ok(RobotsVerdict::from_body(&self.limits.robots_token, decoded).await);
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                if matches!(
                    status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) {
                    self.back_off_from(&url, resp.headers());
                }
                return Ok(RobotsVerdict::Unavailable(format!(
                    "http {}",
                    status.as_u16()
                )));
            }
            if status.is_client_error() {
                return Ok(RobotsVerdict::AllowAll);
            }
            return Ok(RobotsVerdict::Unavailable(format!(
                "http {}",
                status.as_u16()
            )));
        }
        // More than five redirects: RFC 9309 lets us treat robots.txt as unavailable (4xx).
        Ok(RobotsVerdict::AllowAll)
    }

    /// Back the host of `url` off per `Retry-After` (or the default), returning the wait.
    fn back_off_from(&self, url: &Url, headers: &HeaderMap) -> Duration {
        let cap = Duration::from_secs(self.cfg.max_retry_after_secs);
        let wait = header_str(headers, RETRY_AFTER)
            .and_then(|v| parse_retry_after(v, SystemTime::now(), cap))
            .unwrap_or(DEFAULT_BACKOFF.min(cap));
        self.politeness
            .back_off(&protocol::urls::host_of(url), wait);
        wait
    }

    /// The final (non-redirect) response: status, content type, body, parse.
    async fn finish(
        &self,
        url: Url,
        host: &str,
        resp: reqwest::Response,
        permit: HostPermit,
    ) -> Ending {
        let status = resp.status();
        if matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            let after = self.back_off_from(&url, resp.headers());
            return retry(
                format!("http {} (host {host} backing off)", status.as_u16()),
                after,
            );
        }
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
            return retry(format!("http {}", status.as_u16()), TRANSIENT_RETRY_AFTER);
        }
        if !status.is_success() {
            return failed(format!("http {}", status.as_u16()), "http_error");
        }
        let headers = resp.headers();
        let content_type = header_str(headers, CONTENT_TYPE).map(str::to_string);
        if let Some(ct) = &content_type {
            let essence = essence(ct);
            if !is_html_type(&essence) {
                return failed(format!("not HTML: {essence}"), "not_html");
            }
        }
        let codings = body::parse_encodings(header_str(headers, CONTENT_ENCODING));
        let mut directives = Directives::default();
        for value in headers.get_all("x-robots-tag") {
            if let Ok(v) = value.to_str() {
                let d = Directives::parse(v, &self.limits.robots_token);
                directives.noindex |= d.noindex;
                directives.nofollow |= d.nofollow;
            }
        }
        let cap = self.cfg.max_body_bytes;
        let wire = body::read_wire(resp, cap, Overflow::Refuse).await;
        drop(permit);
        let wire = match wire {
            Ok(w) => w,
            Err(e) if e.is_transient() => return retry(e.to_string(), TRANSIENT_RETRY_AFTER),
            Err(e) => return failed(e.to_string(), body_label(&e)),
        };
        let limits = self.limits.clone();
        let status = status.as_u16();
        let meter = self.meter.clone();
        let parsed = tokio::task::spawn_blocking(move || -> Result<FetchedPage, PageError> {
            let started = std::time::Instant::now();
            let decoded =
                body::decode(wire, &codings, cap, Overflow::Refuse).map_err(PageError::Body)?;
            let bytes = decoded.len();
            if content_type.is_none() && !sniff_html(&decoded) {
                return Err(PageError::NotHtml);
            }
            let text = crate::charset::decode(&decoded, content_type.as_deref());
            drop(decoded);
            let page = parse::parse_page(&text, &url, directives, &limits);
            meter.record(started.elapsed(), bytes);
            Ok(FetchedPage {
                final_url: url.into(),
                status,
                title: page.title,
                text: page.text,
                indexable: page.indexable,
                canonical: page.canonical,
                links: page.links,
            })
        })
        .await;
        match parsed {
            Ok(Ok(page)) => Ending {
                attempt: CrawlAttempt::Done(Outcome::Page(page)),
                label: "page",
            },
            Ok(Err(PageError::NotHtml)) => {
                failed("not HTML: no content type and no HTML markup", "not_html")
            }
            Ok(Err(PageError::Body(e))) => failed(e.to_string(), body_label(&e)),
            Err(e) => {
                tracing::error!(error = %e, "the page parser panicked");
                failed(
                    "internal error: the page parser failed on this page",
                    "panic",
                )
            }
        }
    }
}
