//! The control plane's envelope: every message one cell sends another about the organism
//! (heartbeats, replacement and stop requests, routing weights) is versioned, signed with the
//! cluster key (HMAC-SHA256), and protected against replay (a timestamp window plus a nonce
//! remembered for that window, and a per-sender sequence number). Every envelope names its
//! recipient (`to`, the base URL it was sent to): a receiver refuses one addressed elsewhere, and
//! one sealed before the receiver's [`Verifier`] existed, so a message captured before a restart
//! cannot be replayed after it (a restarted receiver has forgotten its nonces).
//!
//! Receivers call [`receive`]: a message that is unsigned, forged, stale, replayed, misdirected,
//! malformed, of an unknown kind or of a future version comes back as a [`Rejection`], which is
//! counted and answers with a clear status; it never panics.
//!
//! The same key yields the organism's read token ([`ClusterKey::read_token`]): in cluster mode the
//! endpoints that show the organism's topology (`/cells`, `/events`, `/children`) answer only a
//! reader that presents it ([`Verifier::check_read`]).

pub mod build;
pub mod heartbeat;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The envelope's version this build writes and the newest it reads.
pub const ENVELOPE_VERSION: u32 = 1;
pub const SIGNATURE_HEADER: &str = "x-homeostat-signature";
/// Environment variables the cluster key is read from (hex), or a file holding it.
pub const KEY_ENV: &str = "HOMEOSTAT_CLUSTER_KEY";
pub const KEY_FILE_ENV: &str = "HOMEOSTAT_CLUSTER_KEY_FILE";
/// How long before its [`Verifier`] was created an envelope may have been sealed and still be
/// accepted. A sender seals right before it sends, and a receiver builds its verifier before it
/// binds its listener, so a legitimate message sealed earlier can only look so through clock
/// skew between the two machines: zero on one machine, a few milliseconds under NTP. 250 ms is
/// ample for that, and it is all a replay after a restart can reach back: the last quarter
/// second of the previous incarnation's life.
pub const START_ALLOWANCE: Duration = Duration::from_millis(250);
/// What [`ClusterKey::read_token`] is the HMAC of: a label, so the token is no signature of any
/// message.
const READ_TOKEN_LABEL: &[u8] = b"homeostat read token v1";

type HmacSha256 = Hmac<Sha256>;

/// The secret every cell of one organism shares.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(***)")
    }
}

impl ClusterKey {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// 32 random bytes.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(text.trim()).map_err(KeyError::NotHex)?;
        if bytes.len() < 16 {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// From `HOMEOSTAT_CLUSTER_KEY` (hex) or the file named by `HOMEOSTAT_CLUSTER_KEY_FILE`.
    pub fn from_env() -> Result<Self, KeyError> {
        let within = |origin: String| {
            move |e: KeyError| KeyError::In {
                origin,
                error: Box::new(e),
            }
        };
        if let Ok(hex) = std::env::var(KEY_ENV) {
            return Self::from_hex(&hex).map_err(within(KEY_ENV.to_string()));
        }
        if let Ok(path) = std::env::var(KEY_FILE_ENV) {
            let text = std::fs::read_to_string(&path).map_err(|error| KeyError::File {
                path: path.clone(),
                error,
            })?;
            return Self::from_hex(&text).map_err(within(path));
        }
        Err(KeyError::Missing)
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }

    /// The organism's read token: HMAC-SHA256 of a fixed label under the key, hex. Every cell
    /// holding the key computes the same token; it reveals nothing of the key and signs nothing.
    pub fn read_token(&self) -> String {
        let mut mac = self.mac();
        mac.update(READ_TOKEN_LABEL);
        hex::encode(mac.finalize().into_bytes())
    }

    /// The `Authorization` header value a reader of `/cells`, `/events` or `/children` sends.
    pub fn read_authorization(&self) -> String {
        format!("Bearer {}", self.read_token())
    }
}

/// Why the cluster key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no cluster key: set {KEY_ENV} (hex) or {KEY_FILE_ENV}")]
    Missing,
    #[error("the cluster key is not hex: {0}")]
    NotHex(#[source] hex::FromHexError),
    #[error("the cluster key is too short ({0} bytes; at least 16)")]
    TooShort(usize),
    #[error("reading the cluster key file {path}: {error}")]
    File {
        path: String,
        #[source]
        error: std::io::Error,
    },
    #[error("reading {origin}: {error}")]
    In {
        origin: String,
        #[source]
        error: Box<KeyError>,
    },
}

/// Why a control message got no answer to use.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("sending {kind} to {url}: {error}")]
    Transport {
        kind: String,
        url: String,
        #[source]
        error: reqwest::Error,
    },
    #[error("{url} refused {kind}: {status} {body}")]
    Refused {
        kind: String,
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("reading {url}'s answer to {kind}: {error}")]
    Answer {
        kind: String,
        url: String,
        #[source]
        error: serde_json::Error,
    },
}

/// Headers for a client that reads the organism's topology: `Authorization: Bearer <token>`
/// when the cluster key is in the environment, none otherwise (embedded organisms leave those
/// endpoints open). For `reqwest::ClientBuilder::default_headers`.
pub fn read_headers_from_env() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    if let Ok(key) = ClusterKey::from_env() {
        if let Ok(value) = http::HeaderValue::from_str(&key.read_authorization()) {
            headers.insert(http::header::AUTHORIZATION, value);
        }
    }
    headers
}

/// A base URL in one spelling, for comparing recipients: lower-case scheme and host, the port
/// always written, no path or trailing slash. Text that is no URL is compared as it is, trimmed.
pub fn normalize_address(addr: &str) -> String {
    let trimmed = addr.trim().trim_end_matches('/');
    match url::Url::parse(trimmed) {
        Ok(u) => match (u.host_str(), u.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{}://{}:{}", u.scheme(), host, port),
            _ => trimmed.to_ascii_lowercase(),
        },
        Err(_) => trimmed.to_ascii_lowercase(),
    }
}

/// What travels: a signed JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub kind: String,
    /// The sending cell's id.
    pub sender: String,
    /// The recipient: the base URL the message was sent to. `None` only in messages sealed
    /// with [`Signer::seal`], which a receiver that knows its addresses refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Increases with every message of this sender.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when it was sealed.
    pub ts_ms: i64,
    pub nonce: String,
    pub body: serde_json::Value,
}

/// A sealed message: the bytes to send and their signature (hex).
#[derive(Debug, Clone)]
pub struct Sealed {
    pub bytes: Vec<u8>,
    pub signature: String,
}

/// Seals messages for one sender.
pub struct Signer {
    key: ClusterKey,
    sender: String,
    seq: AtomicU64,
}

impl Signer {
    pub fn new(key: ClusterKey, sender: impl Into<String>) -> Self {
        Self {
            key,
            sender: sender.into(),
            seq: AtomicU64::new(0),
        }
    }

    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// Seal a message that names no recipient (only a receiver that does not know its own
    /// addresses accepts it: tests, tools). Cells use [`Signer::seal_to`].
    pub fn seal<T: Serialize>(&self, kind: &str, body: &T) -> Sealed {
        self.seal_envelope(kind, None, body)
    }

    /// Seal a message for the cell at base URL `to`.
    pub fn seal_to<T: Serialize>(&self, kind: &str, to: &str, body: &T) -> Sealed {
        self.seal_envelope(kind, Some(normalize_address(to)), body)
    }

    fn seal_envelope<T: Serialize>(&self, kind: &str, to: Option<String>, body: &T) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            kind: kind.to_string(),
            sender: self.sender.clone(),
            to,
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            ts_ms: now_ms(),
            nonce: hex::encode(nonce),
            body: serde_json::to_value(body).expect("control messages always serialize"),
        };
        let bytes = serde_json::to_vec(&envelope).expect("an envelope always serializes");
        let signature = sign(&self.key, &bytes);
        Sealed { bytes, signature }
    }
}

fn sign(key: &ClusterKey, bytes: &[u8]) -> String {
    let mut mac = key.mac();
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes())
}

/// Why a control message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("unsigned control message (no {SIGNATURE_HEADER} header)")]
    Unsigned,
    #[error("control message signature does not match")]
    BadSignature,
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control message timestamp is outside the accepted window")]
    Stale,
    #[error("control message was already received (replay)")]
    Replayed,
    #[error("control message was sealed before this cell started (a replay across a restart)")]
    BeforeStart,
    #[error("control message is addressed to {0:?}, not to this cell")]
    Misdirected(String),
    #[error("reading this endpoint takes the organism's read token (Authorization: Bearer)")]
    NoReadToken,
    #[error("control message of unknown kind {0:?}: ignored")]
    UnknownKind(String),
    #[error("control message version {0} is newer than this cell understands")]
    UnknownVersion(u32),
}

impl Rejection {
    /// The reason as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::BadSignature => "forged",
            Rejection::Malformed(_) => "malformed",
            Rejection::Stale => "stale",
            Rejection::Replayed => "replayed",
            Rejection::BeforeStart => "before_start",
            Rejection::Misdirected(_) => "misdirected",
            Rejection::NoReadToken => "no_read_token",
            Rejection::UnknownKind(_) => "unknown_kind",
            Rejection::UnknownVersion(_) => "unknown_version",
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = match self {
            Rejection::Unsigned
            | Rejection::BadSignature
            | Rejection::Stale
            | Rejection::BeforeStart
            | Rejection::NoReadToken => StatusCode::UNAUTHORIZED,
            Rejection::Replayed => StatusCode::CONFLICT,
            Rejection::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Rejection::Malformed(_) => StatusCode::BAD_REQUEST,
            // Ignored, not failed: a newer cell may speak of things this one does not know.
            Rejection::UnknownKind(_) | Rejection::UnknownVersion(_) => StatusCode::ACCEPTED,
        };
        (
            status,
            axum::Json(protocol::ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

/// Checks signatures and remembers what it has seen, for the replay window; knows the addresses
/// its cell answers to, and whether reading the topology takes the read token.
pub struct Verifier {
    key: ClusterKey,
    window: Duration,
    seen: Mutex<Seen>,
    /// When this verifier was created (ms since the epoch): nothing sealed earlier (less
    /// [`START_ALLOWANCE`]) is accepted, since the nonces seen before then are forgotten.
    created_ms: i64,
    /// The base URLs this cell answers to, normalized. Empty: the recipient is not checked
    /// (a receiver that does not know its address yet, tests).
    addresses: RwLock<Vec<String>>,
    /// Cluster mode: `/cells`, `/events`, `/children` take the read token.
    guard_reads: AtomicBool,
}

#[derive(Default)]
struct Seen {
    /// (sender, nonce) of messages inside the window, oldest first, for expiry.
    order: VecDeque<(i64, String, String)>,
    nonces: std::collections::HashSet<(String, String)>,
    /// Highest sequence number per sender (a restarted sender starts over with a new id).
    last_seq: HashMap<String, u64>,
}

impl Verifier {
    /// Build the verifier before binding the listener it serves: messages sealed before its
    /// creation are refused ([`Rejection::BeforeStart`]).
    pub fn new(key: ClusterKey, window: Duration) -> Self {
        // The refusals' series exist from the start, at zero, for every cell that verifies.
        for reason in ["unsigned", "forged", "stale", "replayed", "misdirected"] {
            metrics::counter!("control_rejected_total", "reason" => reason).increment(0);
        }
        Self {
            key,
            window,
            seen: Mutex::new(Seen::default()),
            created_ms: now_ms(),
            addresses: RwLock::new(Vec::new()),
            guard_reads: AtomicBool::new(false),
        }
    }

    /// The base URLs this cell answers to (its advertised address, any alias): from now on an
    /// envelope addressed elsewhere, or to no one, is refused ([`Rejection::Misdirected`]).
    pub fn answer_to(&self, addresses: impl IntoIterator<Item = impl AsRef<str>>) {
        let normalized: Vec<String> = addresses
            .into_iter()
            .map(|a| normalize_address(a.as_ref()))
            .collect();
        *self.addresses.write().unwrap_or_else(|p| p.into_inner()) = normalized;
    }

    /// Builder form of [`Verifier::answer_to`].
    pub fn answering_to(self, addresses: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.answer_to(addresses);
        self
    }

    /// Cluster mode (`true`): [`Verifier::check_read`] asks for the read token. Embedded mode
    /// (`false`, the default): reads are open.
    pub fn guard_reads(&self, on: bool) {
        self.guard_reads.store(on, Ordering::Relaxed);
    }

    /// The `Authorization` value this cell presents when it reads another cell's topology.
    pub fn read_authorization(&self) -> String {
        self.key.read_authorization()
    }

    /// Whether reads take the read token.
    pub fn reads_guarded(&self) -> bool {
        self.guard_reads.load(Ordering::Relaxed)
    }

    /// May this request read the topology? Always in embedded mode; in cluster mode only with
    /// `Authorization: Bearer <read token>` (compared in constant time). A refusal is counted.
    pub fn check_read(&self, headers: &http::HeaderMap) -> Result<(), Rejection> {
        if !self.reads_guarded() {
            return Ok(());
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .and_then(|t| hex::decode(t.trim()).ok());
        let ok = presented.is_some_and(|token| {
            let mut mac = self.key.mac();
            mac.update(READ_TOKEN_LABEL);
            mac.verify_slice(&token).is_ok()
        });
        if ok {
            Ok(())
        } else {
            let r = Rejection::NoReadToken;
            metrics::counter!("control_rejected_total", "reason" => r.label()).increment(1);
            Err(r)
        }
    }

    /// Verify and open an envelope. Every rejection is counted by reason.
    pub fn open(&self, body: &[u8], signature: Option<&str>) -> Result<Envelope, Rejection> {
        let result = self.open_inner(body, signature);
        if let Err(r) = &result {
            metrics::counter!("control_rejected_total", "reason" => r.label()).increment(1);
            tracing::debug!(reason = %r, "control message rejected");
        }
        result
    }

    fn open_inner(&self, body: &[u8], signature: Option<&str>) -> Result<Envelope, Rejection> {
        let signature = signature.ok_or(Rejection::Unsigned)?;
        let expected = hex::decode(signature.trim()).map_err(|_| Rejection::BadSignature)?;
        let mut mac = self.key.mac();
        mac.update(body);
        mac.verify_slice(&expected)
            .map_err(|_| Rejection::BadSignature)?;
        let envelope: Envelope =
            serde_json::from_slice(body).map_err(|e| Rejection::Malformed(e.to_string()))?;
        if envelope.v > ENVELOPE_VERSION {
            return Err(Rejection::UnknownVersion(envelope.v));
        }
        let now = now_ms();
        let window = self.window.as_millis() as i64;
        if (now - envelope.ts_ms).abs() > window {
            return Err(Rejection::Stale);
        }
        if envelope.ts_ms < self.created_ms - START_ALLOWANCE.as_millis() as i64 {
            return Err(Rejection::BeforeStart);
        }
        {
            let addresses = self.addresses.read().unwrap_or_else(|p| p.into_inner());
            if !addresses.is_empty() {
                let to = envelope.to.as_deref().unwrap_or_default();
                if !addresses.iter().any(|a| a == to) {
                    return Err(Rejection::Misdirected(to.to_string()));
                }
            }
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((ts, _, _)) = seen.order.front() {
            if now - *ts <= window {
                break;
            }
            if let Some((_, sender, nonce)) = seen.order.pop_front() {
                seen.nonces.remove(&(sender, nonce));
            }
        }
        let key = (envelope.sender.clone(), envelope.nonce.clone());
        if seen.nonces.contains(&key) {
            return Err(Rejection::Replayed);
        }
        if let Some(last) = seen.last_seq.get(&envelope.sender) {
            // Messages may arrive a little out of order over separate connections: only a
            // sequence number far behind is refused (the nonce catches exact repeats).
            if envelope.seq + 1024 < *last {
                return Err(Rejection::Replayed);
            }
        }
        let last = seen.last_seq.entry(envelope.sender.clone()).or_insert(0);
        *last = (*last).max(envelope.seq);
        seen.order
            .push_back((envelope.ts_ms, key.0.clone(), key.1.clone()));
        seen.nonces.insert(key);
        // Bound memory if a sender floods within the window.
        while seen.order.len() > 1_000_000 {
            if let Some((_, sender, nonce)) = seen.order.pop_front() {
                seen.nonces.remove(&(sender, nonce));
            }
        }
        Ok(envelope)
    }
}

/// Open an envelope of kind `kind` and decode its body. For axum handlers taking
/// `(HeaderMap, Bytes)`.
pub fn receive<T: DeserializeOwned>(
    verifier: &Verifier,
    kind: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<(Envelope, T), Rejection> {
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let envelope = verifier.open(body, signature)?;
    if envelope.kind != kind {
        let r = Rejection::UnknownKind(envelope.kind.clone());
        metrics::counter!("control_rejected_total", "reason" => r.label()).increment(1);
        return Err(r);
    }
    let message = serde_json::from_value(envelope.body.clone()).map_err(|e| {
        metrics::counter!("control_rejected_total", "reason" => "malformed").increment(1);
        Rejection::Malformed(format!("{kind} body: {e}"))
    })?;
    Ok((envelope, message))
}

/// Sends signed messages to other cells.
pub struct ControlClient {
    http: reqwest::Client,
    signer: Signer,
}

impl ControlClient {
    /// A client whose messages take at most a second (control messages are small).
    pub fn new(signer: Signer) -> Self {
        Self::with_timeout(signer, Duration::from_secs(1))
    }

    /// A client whose messages may take up to `timeout` (large ones: ingest batches).
    pub fn with_timeout(signer: Signer, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_millis(500).min(timeout))
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        Self { http, signer }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// POST a sealed message addressed to `base_url` to `base_url` + `path`; decode the answer
    /// (an empty answer decodes as JSON `null`, for `R = ()`).
    pub async fn send<T: Serialize, R: DeserializeOwned>(
        &self,
        base_url: &str,
        path: &str,
        kind: &str,
        body: &T,
    ) -> Result<R, SendError> {
        let sealed = self.signer.seal_to(kind, base_url, body);
        let url = format!("{}{}", base_url.trim_end_matches('/'), path);
        let resp = self
            .http
            .post(&url)
            .header(SIGNATURE_HEADER, &sealed.signature)
            .header("content-type", "application/json")
            .body(sealed.bytes)
            .send()
            .await
            .map_err(|error| SendError::Transport {
                kind: kind.to_string(),
                url: url.clone(),
                error,
            })?;
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        if !status.is_success() {
            return Err(SendError::Refused {
                kind: kind.to_string(),
                url,
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        let text: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(text).map_err(|error| SendError::Answer {
            kind: kind.to_string(),
            url,
            error,
        })
    }

    /// Send a typed request to the cell at `base_url` (at the request's own path, in its own
    /// kind) and decode its typed answer.
    pub async fn ask<Q: protocol::control::ControlRequest>(
        &self,
        base_url: &str,
        request: &Q,
    ) -> Result<Q::Reply, SendError> {
        self.send(base_url, Q::PATH, Q::KIND, request).await
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Signer, Verifier) {
        let key = ClusterKey::generate();
        (
            Signer::new(key.clone(), "cell-a"),
            Verifier::new(key, Duration::from_secs(30)),
        )
    }

    fn headers(sig: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(SIGNATURE_HEADER, sig.parse().expect("header value"));
        h
    }

    #[test]
    fn a_signed_message_opens_once() {
        let (signer, verifier) = pair();
        let sealed = signer.seal("ping", &serde_json::json!({"n": 1}));
        let (env, body): (Envelope, serde_json::Value) = receive(
            &verifier,
            "ping",
            &headers(&sealed.signature),
            &sealed.bytes,
        )
        .expect("opens");
        assert_eq!(env.sender, "cell-a");
        assert_eq!(body["n"], 1);
        let again = receive::<serde_json::Value>(
            &verifier,
            "ping",
            &headers(&sealed.signature),
            &sealed.bytes,
        );
        assert_eq!(again.expect_err("replay"), Rejection::Replayed);
    }

    #[test]
    fn unsigned_forged_foreign_unknown_and_malformed_are_rejected() {
        let (signer, verifier) = pair();
        let sealed = signer.seal("ping", &1);
        assert_eq!(
            receive::<u32>(&verifier, "ping", &http::HeaderMap::new(), &sealed.bytes)
                .expect_err("unsigned"),
            Rejection::Unsigned
        );
        let mut tampered = sealed.bytes.clone();
        let last = tampered.len() - 2;
        tampered[last] ^= 1;
        assert_eq!(
            receive::<u32>(&verifier, "ping", &headers(&sealed.signature), &tampered)
                .expect_err("tampered"),
            Rejection::BadSignature
        );
        assert_eq!(
            receive::<u32>(&verifier, "ping", &headers("zz-not-hex"), &sealed.bytes)
                .expect_err("garbage signature"),
            Rejection::BadSignature
        );
        let stranger = Signer::new(ClusterKey::generate(), "intruder").seal("ping", &1);
        assert_eq!(
            receive::<u32>(
                &verifier,
                "ping",
                &headers(&stranger.signature),
                &stranger.bytes
            )
            .expect_err("foreign key"),
            Rejection::BadSignature
        );
        let other = signer.seal("teleport", &1);
        assert!(matches!(
            receive::<u32>(&verifier, "ping", &headers(&other.signature), &other.bytes),
            Err(Rejection::UnknownKind(k)) if k == "teleport"
        ));
        let wrong_body = signer.seal("ping", &"not a number");
        assert!(matches!(
            receive::<u32>(
                &verifier,
                "ping",
                &headers(&wrong_body.signature),
                &wrong_body.bytes
            ),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn stale_and_future_versions_are_refused() {
        let key = ClusterKey::generate();
        let verifier = Verifier::new(key.clone(), Duration::from_secs(30));
        let old = Envelope {
            v: ENVELOPE_VERSION,
            kind: "ping".into(),
            sender: "a".into(),
            to: None,
            seq: 1,
            ts_ms: now_ms() - 120_000,
            nonce: "n1".into(),
            body: serde_json::json!(1),
        };
        let bytes = serde_json::to_vec(&old).expect("json");
        assert_eq!(
            verifier
                .open(&bytes, Some(&sign(&key, &bytes)))
                .expect_err("stale"),
            Rejection::Stale
        );
        let future = Envelope {
            v: 99,
            ts_ms: now_ms(),
            nonce: "n2".into(),
            ..old
        };
        let bytes = serde_json::to_vec(&future).expect("json");
        assert_eq!(
            verifier
                .open(&bytes, Some(&sign(&key, &bytes)))
                .expect_err("future"),
            Rejection::UnknownVersion(99)
        );
    }

    fn sealed_at(key: &ClusterKey, ts_ms: i64, to: Option<&str>, nonce: &str) -> Sealed {
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            kind: "ping".into(),
            sender: "a".into(),
            to: to.map(normalize_address),
            seq: 1,
            ts_ms,
            nonce: nonce.into(),
            body: serde_json::json!(1),
        };
        let bytes = serde_json::to_vec(&envelope).expect("json");
        let signature = sign(key, &bytes);
        Sealed { bytes, signature }
    }

    #[test]
    fn a_message_for_another_cell_is_refused() {
        let key = ClusterKey::generate();
        let verifier = Verifier::new(key.clone(), Duration::from_secs(30))
            .answering_to(["http://127.0.0.1:7070/", "http://LOCALHOST:7070"]);
        let signer = Signer::new(key, "cell-a");
        let mine = signer.seal_to("ping", "http://127.0.0.1:7070", &1);
        assert!(receive::<u32>(&verifier, "ping", &headers(&mine.signature), &mine.bytes).is_ok());
        let alias = signer.seal_to("ping", "http://localhost:7070/", &1);
        assert!(
            receive::<u32>(&verifier, "ping", &headers(&alias.signature), &alias.bytes).is_ok(),
            "any address the cell answers to, in any spelling"
        );
        let elsewhere = signer.seal_to("ping", "http://127.0.0.1:7071", &1);
        assert_eq!(
            receive::<u32>(
                &verifier,
                "ping",
                &headers(&elsewhere.signature),
                &elsewhere.bytes
            )
            .expect_err("addressed to another cell"),
            Rejection::Misdirected("http://127.0.0.1:7071".into())
        );
        let nobody = signer.seal("ping", &1);
        assert_eq!(
            receive::<u32>(
                &verifier,
                "ping",
                &headers(&nobody.signature),
                &nobody.bytes
            )
            .expect_err("addressed to no one"),
            Rejection::Misdirected(String::new())
        );
        assert_eq!(
            Rejection::Misdirected(String::new())
                .into_response()
                .status(),
            StatusCode::MISDIRECTED_REQUEST
        );
        // The same envelope, delivered where it was addressed, was not spent by the refusal.
        let fresh = Verifier::new(
            ClusterKey::from_hex(&signer.key.to_hex()).expect("key"),
            Duration::from_secs(30),
        )
        .answering_to(["http://127.0.0.1:7071"]);
        assert!(receive::<u32>(
            &fresh,
            "ping",
            &headers(&elsewhere.signature),
            &elsewhere.bytes
        )
        .is_ok());
    }

    #[test]
    fn a_message_sealed_before_the_receiver_started_is_refused() {
        let key = ClusterKey::generate();
        // A receiver that has been running for a while.
        let mut before_restart = Verifier::new(key.clone(), Duration::from_secs(30));
        before_restart.created_ms -= 10_000;
        let allowance = START_ALLOWANCE.as_millis() as i64;
        // Captured a second before the restart, inside the 30 s window.
        let captured = sealed_at(&key, now_ms() - 1_000, None, "n1");
        let restarted = Verifier::new(key.clone(), Duration::from_secs(30));
        assert_eq!(
            restarted
                .open(&captured.bytes, Some(&captured.signature))
                .expect_err("sealed before this verifier existed"),
            Rejection::BeforeStart
        );
        // The verifier that was running then still takes it (once).
        assert!(before_restart
            .open(&captured.bytes, Some(&captured.signature))
            .is_ok());
        // Inside the allowance: clock skew, not a replay.
        let skewed = sealed_at(&key, restarted.created_ms - allowance / 2, None, "n2");
        assert!(restarted
            .open(&skewed.bytes, Some(&skewed.signature))
            .is_ok());
        let just_past = sealed_at(&key, restarted.created_ms - allowance - 1, None, "n3");
        assert_eq!(
            restarted
                .open(&just_past.bytes, Some(&just_past.signature))
                .expect_err("just past the allowance"),
            Rejection::BeforeStart
        );
        assert_eq!(Rejection::BeforeStart.label(), "before_start");
    }

    #[test]
    fn reads_take_the_token_in_cluster_mode_only() {
        let key = ClusterKey::generate();
        let verifier = Verifier::new(key.clone(), Duration::from_secs(30));
        let none = http::HeaderMap::new();
        assert!(verifier.check_read(&none).is_ok(), "embedded: open");
        verifier.guard_reads(true);
        assert_eq!(
            verifier.check_read(&none).expect_err("no token"),
            Rejection::NoReadToken
        );
        let with = |value: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                value.parse().expect("header value"),
            );
            h
        };
        assert!(verifier
            .check_read(&with(&key.read_authorization()))
            .is_ok());
        let stranger = ClusterKey::generate();
        for wrong in [
            stranger.read_authorization(),
            format!("Bearer {}", key.to_hex()),
            key.read_token(),
            "Bearer ".to_string(),
            "Bearer zz".to_string(),
            "Basic abc".to_string(),
        ] {
            assert_eq!(
                verifier.check_read(&with(&wrong)).expect_err(&wrong),
                Rejection::NoReadToken,
                "{wrong}"
            );
        }
        assert_eq!(
            Rejection::NoReadToken.into_response().status(),
            StatusCode::UNAUTHORIZED
        );
        assert_ne!(key.read_token(), key.to_hex());
        assert_eq!(key.read_token(), key.clone().read_token());
    }

    #[tokio::test]
    async fn the_client_addresses_what_it_sends() {
        use axum::routing::post;
        let key = ClusterKey::generate();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let verifier = std::sync::Arc::new(
            Verifier::new(key.clone(), Duration::from_secs(30)).answering_to([base.clone()]),
        );
        let v = verifier.clone();
        let app = axum::Router::new().route(
            "/ping",
            post(move |headers: http::HeaderMap, body: axum::body::Bytes| {
                let v = v.clone();
                async move {
                    match receive::<u32>(&v, "ping", &headers, &body) {
                        Ok((env, n)) => {
                            axum::Json(serde_json::json!({"n": n, "to": env.to})).into_response()
                        }
                        Err(r) => r.into_response(),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let client = ControlClient::new(Signer::new(key, "cell-a"));
        let answer: serde_json::Value = client
            .send(&format!("{base}/"), "/ping", "ping", &7u32)
            .await
            .expect("delivered");
        assert_eq!(answer["n"], 7);
        assert_eq!(answer["to"], serde_json::json!(base));
    }

    #[test]
    fn keys_load_from_hex_and_refuse_nonsense() {
        let key = ClusterKey::generate();
        let again = ClusterKey::from_hex(&key.to_hex()).expect("round trip");
        assert_eq!(again.0, key.0);
        assert!(ClusterKey::from_hex("xyz").is_err());
        assert!(ClusterKey::from_hex("abcd").is_err(), "too short");
        assert_eq!(format!("{key:?}"), "ClusterKey(***)");
    }
}
