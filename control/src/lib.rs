//! The control plane's envelope: every message one cell sends another about the organism
//! (heartbeats, replacement and stop requests, routing weights) is versioned, signed with the
//! cluster key (HMAC-SHA256), and protected against replay (a timestamp window plus a nonce
//! remembered for that window, and a per-sender sequence number).
//!
//! Receivers call [`receive`]: a message that is unsigned, forged, stale, replayed, malformed, of
//! an unknown kind or of a future version comes back as a [`Rejection`], which is counted and
//! answers with a clear status; it never panics.

pub mod heartbeat;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
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

    pub fn from_hex(text: &str) -> anyhow::Result<Self> {
        let bytes = hex::decode(text.trim()).context("the cluster key is not hex")?;
        anyhow::ensure!(
            bytes.len() >= 16,
            "the cluster key is too short ({} bytes; at least 16)",
            bytes.len()
        );
        Ok(Self(bytes))
    }

    /// From `HOMEOSTAT_CLUSTER_KEY` (hex) or the file named by `HOMEOSTAT_CLUSTER_KEY_FILE`.
    pub fn from_env() -> anyhow::Result<Self> {
        if let Ok(hex) = std::env::var(KEY_ENV) {
            return Self::from_hex(&hex).with_context(|| format!("reading {KEY_ENV}"));
        }
        if let Ok(path) = std::env::var(KEY_FILE_ENV) {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the cluster key file {path}"))?;
            return Self::from_hex(&text).with_context(|| format!("reading {path}"));
        }
        anyhow::bail!("no cluster key: set {KEY_ENV} (hex) or {KEY_FILE_ENV}")
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }
}

/// What travels: a signed JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub kind: String,
    /// The sending cell's id.
    pub sender: String,
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

    pub fn seal<T: Serialize>(&self, kind: &str, body: &T) -> Sealed {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            kind: kind.to_string(),
            sender: self.sender.clone(),
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
    #[error("control message of unknown kind {0:?}: ignored")]
    UnknownKind(String),
    #[error("control message version {0} is newer than this cell understands")]
    UnknownVersion(u32),
}

impl Rejection {
    fn label(&self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::BadSignature => "forged",
            Rejection::Malformed(_) => "malformed",
            Rejection::Stale => "stale",
            Rejection::Replayed => "replayed",
            Rejection::UnknownKind(_) => "unknown_kind",
            Rejection::UnknownVersion(_) => "unknown_version",
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = match self {
            Rejection::Unsigned | Rejection::BadSignature | Rejection::Stale => {
                StatusCode::UNAUTHORIZED
            }
            Rejection::Replayed => StatusCode::CONFLICT,
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

/// Checks signatures and remembers what it has seen, for the replay window.
pub struct Verifier {
    key: ClusterKey,
    window: Duration,
    seen: Mutex<Seen>,
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
    pub fn new(key: ClusterKey, window: Duration) -> Self {
        Self {
            key,
            window,
            seen: Mutex::new(Seen::default()),
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
    pub fn new(signer: Signer) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .connect_timeout(Duration::from_millis(500))
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        Self { http, signer }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// POST a sealed message to `base_url` + `path`; decode the answer (an empty answer decodes
    /// as JSON `null`, for `R = ()`).
    pub async fn send<T: Serialize, R: DeserializeOwned>(
        &self,
        base_url: &str,
        path: &str,
        kind: &str,
        body: &T,
    ) -> anyhow::Result<R> {
        let sealed = self.signer.seal(kind, body);
        let url = format!("{}{}", base_url.trim_end_matches('/'), path);
        let resp = self
            .http
            .post(&url)
            .header(SIGNATURE_HEADER, &sealed.signature)
            .header("content-type", "application/json")
            .body(sealed.bytes)
            .send()
            .await
            .with_context(|| format!("sending {kind} to {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "{url} refused {kind}: {status} {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let text: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(text).with_context(|| format!("reading {url}'s answer to {kind}"))
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
