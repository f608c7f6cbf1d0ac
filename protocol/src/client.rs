//! Typed clients for what cells ask each other over plain HTTP: the registry's `GET /cells`
//! (every reader of the organism's topology goes through [`CellsClient`]) and the versioned
//! answers decoded by [`crate::Versioned::decode`]. Signed control messages (ingest, factory
//! requests, weights) travel through `control::ControlClient::ask`, typed by
//! [`crate::control::ControlRequest`].

use std::time::Duration;

use crate::control::CellsResponse;
use crate::{Versioned, WireError};

/// Why a typed request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not reach the cell, or its answer did not arrive.
    #[error("GET {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The cell answered with an error status.
    #[error("GET {url}: {status} {body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    /// The cell answered something this cell cannot read (malformed, unversioned, too new).
    #[error("GET {url}: {source}")]
    Wire {
        url: String,
        #[source]
        source: WireError,
    },
    /// No health checker is configured.
    #[error("no health checker to ask")]
    NoHealthchecker,
    /// Every health checker was asked; none gave a usable answer.
    #[error("no health checker answered: {}", .0.join("; "))]
    NoneAnswered(Vec<String>),
}

/// GET `url` and decode its versioned JSON answer as `T`.
pub async fn get_versioned<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
    timeout: Option<Duration>,
) -> Result<T, ClientError> {
    let mut request = http.get(url);
    if let Some(authorization) = authorization {
        request = request.header(reqwest::header::AUTHORIZATION, authorization);
    }
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let transport = |source| ClientError::Transport {
        url: url.to_string(),
        source,
    };
    let resp = request.send().await.map_err(transport)?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(transport)?;
    if !status.is_success() {
        return Err(ClientError::Status {
            url: url.to_string(),
            status,
            body: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        });
    }
    Versioned::<T>::decode(&bytes).map_err(|source| ClientError::Wire {
        url: url.to_string(),
        source,
    })
}

/// Reads the organism's registry (`GET /cells` of the health checkers). In cluster mode the
/// registry answers only a reader presenting the organism's read token: give it as
/// `authorization` (`Bearer <token>`, see `control::ClusterKey::read_authorization`).
#[derive(Debug, Clone)]
pub struct CellsClient {
    http: reqwest::Client,
    healthcheckers: Vec<String>,
    authorization: Option<String>,
    timeout: Duration,
}

impl CellsClient {
    /// How long one health checker may take to answer, unless told otherwise.
    pub const TIMEOUT: Duration = Duration::from_secs(1);

    /// A reader of `healthcheckers` with its own HTTP client.
    pub fn new(healthcheckers: Vec<String>, authorization: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        Self::with_http(http, healthcheckers, authorization)
    }

    /// A reader sharing `http` (its connection pool) with other requests.
    pub fn with_http(
        http: reqwest::Client,
        healthcheckers: Vec<String>,
        authorization: Option<String>,
    ) -> Self {
        Self {
            http,
            healthcheckers,
            authorization,
            timeout: Self::TIMEOUT,
        }
    }

    /// Give each health checker up to `timeout` to answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn healthcheckers(&self) -> &[String] {
        &self.healthcheckers
    }

    /// One health checker's view of the live cells.
    pub async fn fetch(&self, healthchecker: &str) -> Result<CellsResponse, ClientError> {
        let url = format!("{}/cells", healthchecker.trim_end_matches('/'));
        get_versioned(
            &self.http,
            &url,
            self.authorization.as_deref(),
            Some(self.timeout),
        )
        .await
    }

    /// The live cells, from the first health checker that answers (in the configured order).
    pub async fn read(&self) -> Result<CellsResponse, ClientError> {
        if self.healthcheckers.is_empty() {
            return Err(ClientError::NoHealthchecker);
        }
        let mut failures = Vec::new();
        for hc in &self.healthcheckers {
            match self.fetch(hc).await {
                Ok(cells) => return Ok(cells),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(ClientError::NoneAnswered(failures))
    }

    /// Base URLs of the live cells of `role`, sorted, from the first health checker that
    /// answers.
    pub async fn addrs(&self, role: &str) -> Result<Vec<String>, ClientError> {
        Ok(self.read().await?.addrs(role))
    }
}
