//! A client of the AWS Query protocol (form-encoded `Action=...&Version=...` POSTs signed with
//! SigV4, XML answers), as EC2 speaks it, and the XML shapes the provider reads.
//!
//! Errors arrive as `<Response><Errors><Error><Code/><Message/></Error></Errors>` (EC2) or
//! `<ErrorResponse><Error>...` / `<ErrorResponse><Errors><Error>...` (IAM, STS, and moto's
//! authentication errors); [`QueryError::class`] sorts them into what a caller may retry.

use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::sigv4::{self, Credentials};

/// One endpoint, region, service and API version, signed with one access key.
#[derive(Debug, Clone)]
pub struct QueryClient {
    http: reqwest::Client,
    endpoint: url::Url,
    region: String,
    service: String,
    version: String,
    credentials: Credentials,
}

/// What a caller can do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The credentials were refused: retrying cannot help.
    Auth,
    /// Throttling, a server error, a timeout or a lost connection: may pass.
    Transient,
    /// The request itself is wrong (a bad parameter, an unknown instance): not retried.
    Config,
}

/// Why a call failed. Never holds a request's parameters (user data carries join tokens).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The service answered with an error code.
    #[error("{action}: {code}: {message} (HTTP {status})")]
    Api {
        action: String,
        status: u16,
        code: String,
        message: String,
    },
    /// An error status without a readable error document.
    #[error("{action}: HTTP {status}: {body}")]
    Http {
        action: String,
        status: u16,
        body: String,
    },
    /// The request did not complete (connection refused, timeout, reset).
    #[error("{action}: {source}")]
    Transport {
        action: String,
        #[source]
        source: reqwest::Error,
    },
    /// A success status whose document is not what the API describes.
    #[error("{action}: unreadable answer: {detail}")]
    Response { action: String, detail: String },
}

/// Error codes that mean the credentials were refused (EC2, IAM/STS, S3-style endpoints).
const AUTH_CODES: &[&str] = &[
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnauthorizedOperation",
    "AccessDenied",
    "InvalidAccessKeyId",
    "MissingAuthenticationToken",
];

/// Error codes that may pass on their own.
const TRANSIENT_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "InsufficientInstanceCapacity",
    // Starting an instance that is still stopping, stopping one still pending: wait and retry.
    "IncorrectInstanceState",
];

impl QueryError {
    pub fn class(&self) -> ErrorClass {
        match self {
            QueryError::Api { status, code, .. } => {
                if AUTH_CODES.contains(&code.as_str()) {
                    ErrorClass::Auth
                } else if *status >= 500 || TRANSIENT_CODES.contains(&code.as_str()) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Config
                }
            }
            QueryError::Http { status, .. } => {
                if *status >= 500 || *status == 408 || *status == 429 {
                    ErrorClass::Transient
                } else if *status == 401 || *status == 403 {
                    ErrorClass::Auth
                } else {
                    ErrorClass::Config
                }
            }
            QueryError::Transport { source, .. } => {
                if source.is_builder() {
                    ErrorClass::Config
                } else {
                    ErrorClass::Transient
                }
            }
            QueryError::Response { .. } => ErrorClass::Config,
        }
    }

    /// The service's error code, when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            QueryError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl QueryClient {
    /// `timeout` bounds each whole call; connecting is bounded by the smaller of it and 10 s.
    pub fn new(
        endpoint: url::Url,
        region: impl Into<String>,
        service: impl Into<String>,
        version: impl Into<String>,
        credentials: Credentials,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()?;
        Ok(Self::with_http(
            http,
            endpoint,
            region,
            service,
            version,
            credentials,
        ))
    }

    /// Shares an HTTP client (its connection pool) across endpoints.
    pub fn with_http(
        http: reqwest::Client,
        endpoint: url::Url,
        region: impl Into<String>,
        service: impl Into<String>,
        version: impl Into<String>,
        credentials: Credentials,
    ) -> Self {
        QueryClient {
            http,
            endpoint,
            region: region.into(),
            service: service.into(),
            version: version.into(),
            credentials,
        }
    }

    /// Call `action` with `params` and return the answer's XML.
    pub async fn call(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<String, QueryError> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("Action", action);
            form.append_pair("Version", &self.version);
            for (name, value) in params {
                form.append_pair(name, value);
            }
            form.finish()
        };
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let signature = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                url: &self.endpoint,
                headers: &[("content-type", content_type)],
                body: body.as_bytes(),
            },
            &self.credentials,
            &self.region,
            &self.service,
            SystemTime::now(),
        );
        let started = Instant::now();
        let transport = |source| QueryError::Transport {
            action: action.to_string(),
            source,
        };
        let response = self
            .http
            .post(self.endpoint.clone())
            .header("content-type", content_type)
            .header("x-amz-date", &signature.amz_date)
            .header("authorization", &signature.authorization)
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        tracing::debug!(
            service = %self.service,
            action,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "query call"
        );
        if status.is_success() {
            return Ok(text);
        }
        Err(match parse_error(&text) {
            Some(error) => QueryError::Api {
                action: action.to_string(),
                status: status.as_u16(),
                code: error.code,
                message: error.message.unwrap_or_default(),
            },
            None => QueryError::Http {
                action: action.to_string(),
                status: status.as_u16(),
                body: snippet(&text),
            },
        })
    }

    /// Call `action` and read its answer as `T`.
    pub async fn call_as<T: serde::de::DeserializeOwned>(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<T, QueryError> {
        let text = self.call(action, params).await?;
        quick_xml::de::from_str(&text).map_err(|e| QueryError::Response {
            action: action.to_string(),
            detail: e.to_string(),
        })
    }
}

/// At most 200 characters of a body, on one line, for an error message.
fn snippet(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &one_line[..at]),
        None => one_line,
    }
}

/// One `<Error>` of an error document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    #[serde(rename = "Code")]
    pub code: String,
    #[serde(rename = "Message", default)]
    pub message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorDocument {
    #[serde(rename = "Errors", default)]
    errors: Option<ErrorList>,
    #[serde(rename = "Error", default)]
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ErrorList {
    #[serde(rename = "Error", default)]
    error: Vec<ApiError>,
}

/// The first error of an error document, whatever its root element is called.
pub fn parse_error(text: &str) -> Option<ApiError> {
    let document: ErrorDocument = quick_xml::de::from_str(text).ok()?;
    document
        .errors
        .and_then(|list| list.error.into_iter().next())
        .or(document.error)
}

/// A list the Query protocol wraps in `<item>` elements.
#[derive(Debug, Clone, Deserialize)]
pub struct Items<T> {
    #[serde(rename = "item", default = "Vec::new")]
    pub item: Vec<T>,
}

impl<T> Default for Items<T> {
    fn default() -> Self {
        Items { item: Vec::new() }
    }
}

/// `DescribeInstancesResponse`.
#[derive(Debug, Clone, Deserialize)]
pub struct DescribeInstances {
    #[serde(rename = "reservationSet", default)]
    pub reservations: Items<Reservation>,
    #[serde(rename = "nextToken", default)]
    pub next_token: Option<String>,
}

/// A reservation of `DescribeInstances`; also the whole `RunInstancesResponse`.
#[derive(Debug, Clone, Deserialize)]
pub struct Reservation {
    #[serde(rename = "instancesSet", default)]
    pub instances: Items<Instance>,
}

/// What the provider reads of an instance.
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    #[serde(rename = "instanceId")]
    pub instance_id: String,
    #[serde(rename = "instanceState")]
    pub state: InstanceState,
    #[serde(rename = "instanceType", default)]
    pub instance_type: Option<String>,
    #[serde(rename = "clientToken", default)]
    pub client_token: Option<String>,
    #[serde(rename = "tagSet", default)]
    pub tags: Items<Tag>,
}

impl Instance {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .item
            .iter()
            .find(|t| t.key == key)
            .and_then(|t| t.value.as_deref())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct InstanceState {
    /// pending, running, shutting-down, terminated, stopping, stopped.
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Tag {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Error documents as moto 5.2 sends them.
    const EC2_NOT_FOUND: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-0123456789abcdef0' does not exist</Message></Error></Errors><RequestID>request-id</RequestID></Response>"#;
    const AUTH_FAILURE: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<ErrorResponse><Errors><Error><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message><Type>Sender</Type></Error></Errors></ErrorResponse>"#;
    /// IAM/STS's shape.
    const STS_INVALID: &str = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>InvalidClientTokenId</Code><Message>The security token included in the request is invalid.</Message></Error><RequestId>x</RequestId></ErrorResponse>"#;

    fn api(status: u16, body: &str) -> QueryError {
        let e = parse_error(body).expect("an error document");
        QueryError::Api {
            action: "A".into(),
            status,
            code: e.code,
            message: e.message.unwrap_or_default(),
        }
    }

    #[test]
    fn error_documents_of_every_shape_are_read() {
        let e = api(400, EC2_NOT_FOUND);
        assert_eq!(e.code(), Some("InvalidInstanceID.NotFound"));
        assert_eq!(e.class(), ErrorClass::Config);
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert_eq!(api(401, AUTH_FAILURE).class(), ErrorClass::Auth);
        assert_eq!(api(403, STS_INVALID).class(), ErrorClass::Auth);
        assert_eq!(parse_error("<html>500 Internal Server Error</html>"), None);
        assert_eq!(parse_error("not xml at all"), None);
    }

    #[test]
    fn codes_and_statuses_sort_into_classes() {
        let with = |status, code: &str| QueryError::Api {
            action: "A".into(),
            status,
            code: code.into(),
            message: String::new(),
        };
        assert_eq!(with(403, "UnauthorizedOperation").class(), ErrorClass::Auth);
        assert_eq!(with(403, "SignatureDoesNotMatch").class(), ErrorClass::Auth);
        assert_eq!(
            with(503, "RequestLimitExceeded").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            with(400, "RequestLimitExceeded").class(),
            ErrorClass::Transient
        );
        assert_eq!(with(500, "Whatever").class(), ErrorClass::Transient);
        assert_eq!(
            with(400, "IncorrectInstanceState").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            with(400, "InvalidAMIID.Malformed").class(),
            ErrorClass::Config
        );
        let http = |status| QueryError::Http {
            action: "A".into(),
            status,
            body: String::new(),
        };
        assert_eq!(http(502).class(), ErrorClass::Transient);
        assert_eq!(http(429).class(), ErrorClass::Transient);
        assert_eq!(http(403).class(), ErrorClass::Auth);
        assert_eq!(http(404).class(), ErrorClass::Config);
    }

    #[test]
    fn describe_instances_reads_states_tags_and_tokens() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><reservationSet><item><reservationId>r-1</reservationId><groupSet/><instancesSet><item><blockDeviceMapping><item><deviceName>/dev/sda1</deviceName></item></blockDeviceMapping><clientToken>tok</clientToken><tagSet><item><key>homeostat-server</key><value>s1</value></item></tagSet><instanceId>i-1</instanceId><instanceState><code>16</code><name>running</name></instanceState></item></instancesSet></item></reservationSet><nextToken/></DescribeInstancesResponse>"#;
        let d: DescribeInstances = quick_xml::de::from_str(xml).expect("parses");
        let i = &d.reservations.item[0].instances.item[0];
        assert_eq!(i.instance_id, "i-1");
        assert_eq!(i.state.name, "running");
        assert_eq!(i.client_token.as_deref(), Some("tok"));
        assert_eq!(i.tag("homeostat-server"), Some("s1"));
        let empty: DescribeInstances = quick_xml::de::from_str(
            r#"<DescribeInstancesResponse><reservationSet/></DescribeInstancesResponse>"#,
        )
        .expect("parses");
        assert!(empty.reservations.item.is_empty());
    }

    #[test]
    fn snippets_are_short_and_on_one_line() {
        let long = "x\n".repeat(500);
        let s = snippet(&long);
        assert!(s.len() <= 203 && !s.contains('\n'), "{s}");
    }
}
