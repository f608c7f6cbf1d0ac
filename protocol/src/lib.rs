//! Wire types shared by cells: everything one cell sends another, or persists for another to read.
//!
//! Architecture Invariant: this crate holds only serializable types, their validation, and the
//! typed clients that fetch them ([`client`]). No policy. Every type here is part of an IPC
//! boundary, so every message carries a version (`v`; an answer served to another cell travels
//! as [`Versioned`]), and a receiver must tolerate unknown fields (serde's default) and report,
//! never panic on, anything it cannot read.

pub mod client;
pub mod control;
pub mod events;
pub mod urls;

use serde::{Deserialize, Serialize};

/// The version of the messages in this crate. A receiver accepts `v <= WIRE_VERSION`.
pub const WIRE_VERSION: u32 = 1;

/// A crawl job as it travels on the queue: API -> queue -> crawler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrawlJob {
    pub v: u32,
    /// Normalized absolute http(s) URL.
    pub url: String,
    /// Link distance from the seed (seeds are depth 0).
    pub depth: u32,
    /// Base URL of the API cell that published the job (e.g. `http://127.0.0.1:7070`).
    pub reply_to: String,
}

impl CrawlJob {
    pub fn new(url: impl Into<String>, depth: u32, reply_to: impl Into<String>) -> Self {
        Self {
            v: WIRE_VERSION,
            url: url.into(),
            depth,
            reply_to: reply_to.into(),
        }
    }

    /// Decode a job from queue bytes, naming what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let job: CrawlJob = serde_json::from_slice(bytes).map_err(WireError::Malformed)?;
        if job.v > WIRE_VERSION {
            return Err(WireError::UnknownVersion(job.v));
        }
        if job.url.is_empty() {
            return Err(WireError::Invalid("crawl job has an empty url".into()));
        }
        Ok(job)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a CrawlJob always serializes")
    }
}

/// What a crawler learned about one job's URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrawlResult {
    /// The job's URL, exactly as it was in the job.
    pub url: String,
    pub depth: u32,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The URL was fetched and parsed as HTML.
    Page(FetchedPage),
    /// The URL will never be crawled: refused (robots.txt, SSRF guard, content type) or failed
    /// for good. `reason` is for operators and is stored in the frontier.
    Failed { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchedPage {
    /// Where the fetch ended after redirects (normalized). Equal to the job URL when there were none.
    pub final_url: String,
    pub status: u16,
    pub title: String,
    /// Visible text, whitespace-collapsed, capped by the crawler.
    pub text: String,
    /// False for `noindex` pages and for pages whose canonical URL is another one.
    pub indexable: bool,
    /// `<link rel=canonical>` when present, resolved and normalized.
    pub canonical: Option<String>,
    /// Absolute http(s) links to follow (nofollow already removed; the canonical URL included).
    pub links: Vec<String>,
}

/// Crawler -> API: a batch of results (`POST /internal/ingest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestBatch {
    pub v: u32,
    pub results: Vec<CrawlResult>,
}

impl IngestBatch {
    /// The control envelope kind an ingest batch travels in (signed with the cluster key).
    pub const KIND: &'static str = "ingest";
}

/// API -> crawler: the batch was stored; the crawler may now acknowledge the jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IngestReply {
    pub v: u32,
    pub stored: usize,
    pub admitted_links: usize,
}

/// `POST /crawl` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CrawlRequest {
    pub seeds: Vec<String>,
    #[serde(default)]
    pub max_depth: Option<u32>,
    #[serde(default)]
    pub max_pages: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CrawlAccepted {
    pub crawl_id: i64,
    pub accepted: Vec<String>,
    pub rejected: Vec<Rejection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rejection {
    pub url: String,
    pub reason: String,
}

fn exact() -> bool {
    true
}

/// `GET /search` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SearchResponse {
    pub query: String,
    /// Pages matching: exact when `total_exact`; above the ranking's bound (1,000 matches) an
    /// estimate from how densely the newest matches lie among the newest pages.
    pub total: u64,
    /// Absent (an older api): exact.
    #[serde(default = "exact")]
    pub total_exact: bool,
    pub limit: u32,
    pub offset: u64,
    pub took_ms: f64,
    pub hits: Vec<SearchHit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SearchHit {
    pub url: String,
    pub title: String,
    /// An excerpt with the matched terms wrapped in `<mark>` and `</mark>`.
    pub snippet: String,
    /// Higher is better.
    pub score: f64,
}

/// `GET /stats` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
pub struct Stats {
    pub pages_indexed: u64,
    pub frontier: FrontierCounts,
    pub hosts: Vec<HostStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
pub struct FrontierCounts {
    /// Accepted, not yet handed to the queue.
    pub pending: u64,
    /// On the queue or being crawled.
    pub in_flight: u64,
    pub crawled: u64,
    pub failed: u64,
    /// Links of crawled pages kept aside while their api was busy with clients, not yet offered
    /// to the frontier (seed 003). Absent from an older api's answer: 0.
    #[serde(default)]
    pub deferred: u64,
}

impl FrontierCounts {
    /// True when every accepted URL has ended (crawled or failed) and no link waits to be
    /// offered.
    pub fn drained(&self) -> bool {
        self.pending == 0 && self.in_flight == 0 && self.deferred == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
pub struct HostStats {
    pub host: String,
    pub pending: u64,
    pub in_flight: u64,
    pub crawled: u64,
    pub failed: u64,
}

/// The JSON body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("message version {0} is newer than this cell understands ({WIRE_VERSION})")]
    UnknownVersion(u32),
    #[error("message has no version (`v`): it was not sent by a cell of this protocol")]
    MissingVersion,
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// An answer one cell serves another (`GET /cells`, `GET /stats`): the body's fields with the
/// wire version `v` beside them (`{"v":1, ...}`). A reader that ignores `v` reads the body as
/// before; [`Versioned::decode`] checks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Versioned<T> {
    /// Absent (`None`) only in what a sender outside this protocol wrote.
    #[serde(default)]
    pub v: Option<u32>,
    #[serde(flatten)]
    pub body: T,
}

impl<T> Versioned<T> {
    /// `body` at this build's [`WIRE_VERSION`].
    pub fn new(body: T) -> Self {
        Self {
            v: Some(WIRE_VERSION),
            body,
        }
    }

    /// The body, when `v` is one this cell understands.
    pub fn checked(self) -> Result<T, WireError> {
        match self.v {
            None | Some(0) => Err(WireError::MissingVersion),
            Some(v) if v > WIRE_VERSION => Err(WireError::UnknownVersion(v)),
            Some(_) => Ok(self.body),
        }
    }
}

impl<T: serde::de::DeserializeOwned> Versioned<T> {
    /// Decode a versioned answer, naming what was wrong: malformed JSON, no `v`, a `v` newer than
    /// this build.
    pub fn decode(bytes: &[u8]) -> Result<T, WireError> {
        serde_json::from_slice::<Versioned<T>>(bytes)
            .map_err(WireError::Malformed)?
            .checked()
    }
}

/// What `cell up` prints on stdout, after the words for people, once the organism serves:
/// `HOMEOSTAT_ORGANISM_READY {json}`, for tools and tests (nothing parses the banner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrganismReady {
    pub v: u32,
    /// Where clients go (base URLs).
    pub frontdoors: Vec<String>,
    /// Where the registry is read (`GET /cells`, `GET /events`).
    pub healthcheckers: Vec<String>,
    pub factories: Vec<String>,
    /// Live cells when the organism reached its minimums.
    pub cells: usize,
}

impl OrganismReady {
    pub const PREFIX: &'static str = "HOMEOSTAT_ORGANISM_READY ";

    pub fn render(&self) -> String {
        format!(
            "{}{}",
            Self::PREFIX,
            serde_json::to_string(self).expect("an OrganismReady always serializes")
        )
    }

    /// `Ok(None)` for a line that is not the organism's ready line; an error names what is wrong
    /// with one that is.
    pub fn parse(line: &str) -> Result<Option<Self>, WireError> {
        let Some(json) = line.trim_end().strip_prefix(Self::PREFIX) else {
            return Ok(None);
        };
        let ready: Self = serde_json::from_str(json).map_err(WireError::Malformed)?;
        match ready.v {
            0 => Err(WireError::MissingVersion),
            v if v > WIRE_VERSION => Err(WireError::UnknownVersion(v)),
            _ => Ok(Some(ready)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_round_trips() {
        let job = CrawlJob::new("http://a.test/", 2, "http://127.0.0.1:1");
        assert_eq!(CrawlJob::decode(&job.encode()).expect("decodes"), job);
    }

    #[test]
    fn malformed_and_future_jobs_are_named_errors() {
        let err = CrawlJob::decode(b"{not json").expect_err("malformed");
        assert!(err.to_string().contains("malformed"), "{err}");
        let err = CrawlJob::decode(br#"{"v":99,"url":"http://a/","depth":0,"reply_to":""}"#)
            .expect_err("future version");
        assert!(err.to_string().contains("99"), "{err}");
    }

    #[test]
    fn versioned_answers_round_trip_and_name_a_bad_version() {
        let stats = Stats {
            pages_indexed: 3,
            ..Stats::default()
        };
        let bytes = serde_json::to_vec(&Versioned::new(stats.clone())).expect("serializes");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains(r#""v":1"#) && text.contains(r#""pages_indexed":3"#),
            "{text}"
        );
        assert_eq!(Versioned::<Stats>::decode(&bytes).expect("decodes"), stats);
        // A reader that ignores `v` still reads the body.
        let plain: Stats = serde_json::from_slice(&bytes).expect("plain decode");
        assert_eq!(plain, stats);

        let unversioned = br#"{"roles":{}}"#;
        let err = Versioned::<control::CellsResponse>::decode(unversioned).expect_err("no v");
        assert!(matches!(err, WireError::MissingVersion), "{err}");
        assert!(err.to_string().contains("no version"), "{err}");
        let future = br#"{"v":7,"roles":{}}"#;
        let err = Versioned::<control::CellsResponse>::decode(future).expect_err("too new");
        assert!(matches!(err, WireError::UnknownVersion(7)), "{err}");
        let err = Versioned::<Stats>::decode(b"{\"v\":1,").expect_err("malformed");
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    #[test]
    fn organism_ready_line_round_trips_and_names_a_bad_version() {
        let ready = OrganismReady {
            v: WIRE_VERSION,
            frontdoors: vec!["http://127.0.0.1:1".into()],
            healthcheckers: vec!["http://127.0.0.1:2".into()],
            factories: vec!["http://127.0.0.1:3".into()],
            cells: 9,
        };
        assert_eq!(
            OrganismReady::parse(&ready.render()).expect("parses"),
            Some(ready.clone())
        );
        assert_eq!(
            OrganismReady::parse("homeostat is up").expect("not ours"),
            None
        );
        let future = ready.render().replace(r#""v":1"#, r#""v":9"#);
        assert!(matches!(
            OrganismReady::parse(&future),
            Err(WireError::UnknownVersion(9))
        ));
    }

    #[test]
    fn outcome_is_tagged() {
        let r = CrawlResult {
            url: "http://a.test/".into(),
            depth: 0,
            outcome: Outcome::Failed {
                reason: "robots.txt disallows".into(),
            },
        };
        let s = serde_json::to_string(&r).expect("serializes");
        assert!(s.contains(r#""kind":"failed""#), "{s}");
    }
}
