//! AWS Signature Version 4 for the EC2 Query API: `Authorization` and `X-Amz-Date` for one
//! request.
//!
//! Written here over `hmac` and `sha2` (already in the workspace) rather than taken from the
//! `aws-sigv4` crate: its current releases need Rust 1.94, and the last line for older
//! compilers (1.3) brings in about twenty crates (the smithy runtime types, a second `http` and
//! `http-body`, `time`) to sign a request of one fixed shape: a form-encoded POST with three
//! signed headers. The algorithm is AWS's published one (canonical request, string to sign,
//! derived key, HMAC); the tests below check it against AWS's own SigV4 test suite
//! (`get-vanilla`, `get-vanilla-query-order-key-case`, `post-vanilla`,
//! `post-x-www-form-urlencoded`), and the moto test checks it against a server that verifies
//! signatures.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// An access key: the id is sent with every request, the secret only keys the HMAC.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    secret_access_key: String,
}

impl Credentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
        }
    }
}

/// Never prints the secret.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// A request to sign. `headers` are the headers to sign besides `host` and `x-amz-date`, which
/// the signer adds itself (`host` from the URL, as the HTTP client will send it).
pub struct Request<'a> {
    pub method: &'a str,
    pub url: &'a url::Url,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The headers that carry a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// `X-Amz-Date`: `YYYYMMDD'T'HHMMSS'Z'`.
    pub amz_date: String,
    /// `Authorization`.
    pub authorization: String,
}

/// Characters SigV4 leaves unencoded: `A-Z a-z 0-9 - _ . ~`.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Sign `request` for `service` in `region` at `time`.
pub fn sign(
    request: &Request<'_>,
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Signature {
    let amz_date = amz_date(time);
    let date = &amz_date[..8];

    // Canonical headers: lowercase names, trimmed values with inner runs of spaces folded,
    // sorted by name.
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_ascii_lowercase(),
                value.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.push(("host".to_string(), host_header(request.url)));
    headers.push(("x-amz-date".to_string(), amz_date.clone()));
    headers.sort();
    let signed_headers = headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect();

    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        canonical_path(request.url),
        canonical_query(request.url),
        canonical_headers,
        signed_headers,
        hex::encode(Sha256::digest(request.body)),
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );

    let key = [date, region, service, "aws4_request"].iter().fold(
        format!("AWS4{}", credentials.secret_access_key).into_bytes(),
        |key, part| hmac(&key, part.as_bytes()),
    );
    let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));

    Signature {
        authorization: format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, \
             Signature={signature}",
            credentials.access_key_id
        ),
        amz_date,
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The `Host` header as the HTTP client sends it: the port only when it is not the scheme's.
pub fn host_header(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// The URL's path, each segment encoded once more as SigV4 asks of every service but S3 (the
/// URL already holds it percent-encoded). EC2 endpoints post to `/`.
fn canonical_path(url: &url::Url) -> String {
    let path = url.path();
    if path.is_empty() {
        return "/".to_string();
    }
    path.split('/')
        .map(|segment| utf8_percent_encode(segment, UNRESERVED).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// The query's pairs, decoded, encoded the SigV4 way and sorted by name, then value.
fn canonical_query(url: &url::Url) -> String {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            (
                utf8_percent_encode(&k, UNRESERVED).to_string(),
                utf8_percent_encode(&v, UNRESERVED).to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// `YYYYMMDD'T'HHMMSS'Z'` in UTC. A clock before 1970 is taken as 1970.
fn amz_date(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The AWS SigV4 test suite's key, region, service and clock (2015-08-30T12:36:00Z).
    fn vector(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Signature {
        let url = url::Url::parse(url).expect("test URL");
        let credentials =
            Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
        let request = Request {
            method,
            url: &url,
            headers,
            body,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        sign(&request, &credentials, "us-east-1", "service", at)
    }

    const SCOPE: &str =
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";

    #[test]
    fn get_vanilla() {
        let s = vector("GET", "https://example.amazonaws.com/", &[], b"");
        assert_eq!(s.amz_date, "20150830T123600Z");
        assert_eq!(
            s.authorization,
            format!(
                "{SCOPE}, SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            )
        );
    }

    #[test]
    fn get_vanilla_query_order_key_case() {
        let s = vector(
            "GET",
            "https://example.amazonaws.com/?Param2=value2&Param1=value1",
            &[],
            b"",
        );
        assert!(s.authorization.ends_with(
            "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        ));
    }

    #[test]
    fn post_vanilla() {
        let s = vector("POST", "https://example.amazonaws.com/", &[], b"");
        assert!(s.authorization.ends_with(
            "Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        ));
    }

    /// The shape of every EC2 Query API request: a form-encoded POST with its content type signed.
    #[test]
    fn post_x_www_form_urlencoded() {
        let s = vector(
            "POST",
            "https://example.amazonaws.com/",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"Param1=value1",
        );
        assert_eq!(
            s.authorization,
            format!(
                "{SCOPE}, SignedHeaders=content-type;host;x-amz-date, \
                 Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
            )
        );
    }

    #[test]
    fn dates_across_leap_days_and_centuries() {
        let at = |secs| amz_date(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "19700101T000000Z");
        assert_eq!(at(951_782_400), "20000229T000000Z");
        assert_eq!(at(4_102_444_799), "20991231T235959Z");
        assert_eq!(at(4_102_444_800), "21000101T000000Z");
        // 2100 is not a leap year: February 28 is followed by March 1.
        assert_eq!(at(4_107_542_400), "21000301T000000Z");
        assert_eq!(at(1_795_656_679), "20261126T013119Z");
    }

    #[test]
    fn host_keeps_a_non_default_port_only() {
        let host = |u: &str| host_header(&url::Url::parse(u).expect("test URL"));
        assert_eq!(host("http://127.0.0.1:5000/"), "127.0.0.1:5000");
        assert_eq!(
            host("https://ec2.eu-west-1.amazonaws.com"),
            "ec2.eu-west-1.amazonaws.com"
        );
        assert_eq!(host("https://ec2.example:443/"), "ec2.example");
    }

    #[test]
    fn the_secret_is_never_printed() {
        let c = Credentials::new("AKID", "very-secret");
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
