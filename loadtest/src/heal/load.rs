//! The client load during the kills: a few clients, each looping `GET /search?q=WORD` on the
//! front doors in turn with a short timeout, recording every request. A request that fails
//! (transport error or 5xx) is tried once more on the other front door, as a real client of a
//! pair of front doors would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::unix_ms;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok {
        status: u16,
    },
    /// A non-2xx answer, with the api cell that gave it (if the front door said) and the start
    /// of its body.
    Status {
        status: u16,
        backend: Option<String>,
        body: String,
    },
    /// No answer: connection refused or reset, timeout, a body cut short.
    Transport {
        error: String,
    },
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }

    pub fn is_transport(&self) -> bool {
        matches!(self, Outcome::Transport { .. })
    }

    /// Worth trying on the other front door.
    fn retryable(&self) -> bool {
        match self {
            Outcome::Ok { .. } => false,
            Outcome::Status { status, .. } => *status >= 500,
            Outcome::Transport { .. } => true,
        }
    }

    /// A short label of the failure, for grouping.
    pub fn cause(&self) -> String {
        match self {
            Outcome::Ok { status } => format!("ok {status}"),
            Outcome::Status { status, .. } => format!("HTTP {status}"),
            Outcome::Transport { error } => {
                // The innermost cause names it best ("Connection refused", "connection reset").
                let last = error.rsplit(": ").next().unwrap_or(error);
                format!("transport: {last}")
            }
        }
    }
}

/// One client request: its first attempt and, if that failed, the retry on the other door.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientRecord {
    pub client: usize,
    /// When the first attempt started, ms since the Unix epoch.
    pub start_ms: i64,
    /// When the first attempt ended.
    pub end_ms: i64,
    /// The front door of the first attempt (index into the front door list).
    pub frontdoor: usize,
    pub first: Outcome,
    pub retry: Option<Outcome>,
}

impl ClientRecord {
    /// Whether the client finally got an answer (after its retry).
    pub fn succeeded(&self) -> bool {
        self.first.is_ok() || self.retry.as_ref().is_some_and(Outcome::is_ok)
    }
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub clients: usize,
    pub frontdoors: Vec<String>,
    pub words: Vec<String>,
    pub pause: Duration,
    pub timeout: Duration,
}

/// Start the clients; each returns its records when `stop` is cancelled.
pub fn start(
    spec: LoadSpec,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Vec<ClientRecord>>>> {
    anyhow::ensure!(!spec.frontdoors.is_empty(), "no front door to load");
    anyhow::ensure!(!spec.words.is_empty(), "no words to search for");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(spec.timeout)
        .connect_timeout(spec.timeout)
        .build()?;
    let spec = Arc::new(spec);
    Ok((0..spec.clients)
        .map(|n| {
            let (spec, client, stop) = (spec.clone(), client.clone(), stop.clone());
            tokio::spawn(async move { run_client(n, &spec, &client, &stop).await })
        })
        .collect())
}

async fn run_client(
    n: usize,
    spec: &LoadSpec,
    client: &reqwest::Client,
    stop: &CancellationToken,
) -> Vec<ClientRecord> {
    let mut records = Vec::new();
    let doors = spec.frontdoors.len();
    let mut i = n;
    while !stop.is_cancelled() {
        let door = i % doors;
        let word = &spec.words[(i / doors + n * 7) % spec.words.len()];
        i += 1;
        let start_ms = unix_ms();
        let first = search(client, &spec.frontdoors[door], word).await;
        let end_ms = unix_ms();
        let retry = if first.retryable() && doors > 1 {
            Some(search(client, &spec.frontdoors[(door + 1) % doors], word).await)
        } else {
            None
        };
        records.push(ClientRecord {
            client: n,
            start_ms,
            end_ms,
            frontdoor: door,
            first,
            retry,
        });
        if !spec.pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(spec.pause) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
    records
}

async fn search(client: &reqwest::Client, door: &str, word: &str) -> Outcome {
    let started = Instant::now();
    let sent = client
        .get(format!("{door}/search"))
        .query(&[("q", word), ("limit", "10")])
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => return transport(&e, started),
    };
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-homeostat-backend")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Read the whole body: an answer cut short is a failure too.
    match resp.bytes().await {
        Ok(_) if (200..300).contains(&status) => Outcome::Ok { status },
        Ok(body) => Outcome::Status {
            status,
            backend,
            body: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        },
        Err(e) => transport(&e, started),
    }
}

fn transport(e: &reqwest::Error, started: Instant) -> Outcome {
    let mut error = format!(
        "{}after {} ms: {e}",
        if e.is_timeout() {
            "timeout "
        } else if e.is_connect() {
            "connect "
        } else {
            ""
        },
        started.elapsed().as_millis()
    );
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        error.push_str(": ");
        error.push_str(&s.to_string());
        source = s.source();
    }
    Outcome::Transport { error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_group_by_the_innermost_error() {
        let t = Outcome::Transport {
            error: "connect after 1 ms: error sending request: client error (Connect): tcp connect error: Connection refused (os error 111)".into(),
        };
        assert_eq!(t.cause(), "transport: Connection refused (os error 111)");
        assert!(t.retryable() && t.is_transport());
        let s = Outcome::Status {
            status: 503,
            backend: None,
            body: String::new(),
        };
        assert_eq!(s.cause(), "HTTP 503");
        assert!(s.retryable());
        let not_found = Outcome::Status {
            status: 404,
            backend: None,
            body: String::new(),
        };
        assert!(!not_found.retryable());
        let r = ClientRecord {
            client: 0,
            start_ms: 0,
            end_ms: 1,
            frontdoor: 0,
            first: t,
            retry: Some(Outcome::Ok { status: 200 }),
        };
        assert!(r.succeeded());
    }
}
