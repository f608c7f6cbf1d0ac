//! Reading a response body under a byte cap, and decoding its `Content-Encoding` under the same
//! cap: nothing is ever allocated past `cap + 1` bytes, whatever the server sends.

use std::io::Read;

use futures::StreamExt;

/// What to do with bytes past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// The body is refused (pages).
    Refuse,
    /// The prefix up to the cap is kept (robots.txt: RFC 9309 lets a crawler ignore the rest).
    Truncate,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("body exceeds max_body_bytes ({cap} bytes)")]
    TooLarge { cap: usize },
    #[error("decompressed body exceeds max_body_bytes ({cap} bytes)")]
    InflatesTooLarge { cap: usize },
    #[error("unsupported content-encoding {0:?}")]
    UnsupportedEncoding(String),
    #[error("corrupt {encoding} body: {detail}")]
    Corrupt { encoding: String, detail: String },
    #[error("timeout reading the body")]
    Timeout,
    #[error("error reading the body: {0}")]
    Network(String),
}

impl BodyError {
    /// Whether trying again later could succeed.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, BodyError::Timeout | BodyError::Network(_))
    }
}

/// Stream the body chunk by chunk, stopping as soon as it passes `cap`.
pub(crate) async fn read_wire(
    resp: reqwest::Response,
    cap: usize,
    overflow: Overflow,
) -> Result<Vec<u8>, BodyError> {
    if overflow == Overflow::Refuse && resp.content_length().is_some_and(|len| len > cap as u64) {
        return Err(BodyError::TooLarge { cap });
    }
    let initial = resp.content_length().map_or(16 * 1024, |len| {
        usize::try_from(len).unwrap_or(cap).min(cap)
    });
    let mut body = Vec::with_capacity(initial);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if e.is_timeout() {
                BodyError::Timeout
            } else {
                BodyError::Network(crate::fetch::error_chain(&e))
            }
        })?;
        let room = cap - body.len();
        if chunk.len() > room {
            match overflow {
                Overflow::Refuse => return Err(BodyError::TooLarge { cap }),
                Overflow::Truncate => {
                    body.extend_from_slice(&chunk[..room]);
                    return Ok(body);
                }
            }
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The content codings of a `Content-Encoding` header value, in the order they were applied.
pub(crate) fn parse_encodings(header: Option<&str>) -> Vec<String> {
    header
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect()
}

/// At most this many stacked codings are undone (`gzip, gzip, ...` is a bomb amplifier).
const MAX_CODINGS: usize = 2;

/// Undo the content codings (applied in order `codings`) through readers limited to
/// `cap + 1` bytes.
pub(crate) fn decode(
    wire: Vec<u8>,
    codings: &[String],
    cap: usize,
    overflow: Overflow,
) -> Result<Vec<u8>, BodyError> {
    if codings.is_empty() {
        return Ok(wire);
    }
    if codings.len() > MAX_CODINGS {
        return Err(BodyError::UnsupportedEncoding(codings.join(", ")));
    }
    let mut reader: Box<dyn Read + '_> = Box::new(std::io::Cursor::new(wire));
    // Decoders are stacked outermost-last: the last coding applied is undone first.
    for coding in codings.iter().rev() {
        reader = match coding.as_str() {
            "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            "deflate" => Box::new(DeflateAuto::new(reader)),
            "br" => Box::new(brotli::Decompressor::new(reader, 8 * 1024)),
            other => return Err(BodyError::UnsupportedEncoding(other.to_string())),
        };
    }
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let mut limited = reader.take(limit);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // A truncated or damaged stream: keep what decoded cleanly, as browsers do,
                // unless nothing did.
                if out.is_empty() {
                    return Err(BodyError::Corrupt {
                        encoding: codings.join(", "),
                        detail: e.to_string(),
                    });
                }
                tracing::debug!(error = %e, decoded = out.len(), "keeping the decodable prefix of a damaged body");
                break;
            }
        }
    }
    if out.len() > cap {
        match overflow {
            Overflow::Refuse => return Err(BodyError::InflatesTooLarge { cap }),
            Overflow::Truncate => out.truncate(cap),
        }
    }
    Ok(out)
}

/// `deflate` is meant to be zlib-wrapped (RFC 9110), but some servers send raw deflate: look at
/// the first two bytes to tell.
struct DeflateAuto<R: Read> {
    inner: DeflateInner<R>,
}

enum DeflateInner<R: Read> {
    Undecided(Option<R>),
    Zlib(flate2::read::ZlibDecoder<std::io::Chain<std::io::Cursor<Vec<u8>>, R>>),
    Raw(flate2::read::DeflateDecoder<std::io::Chain<std::io::Cursor<Vec<u8>>, R>>),
}

impl<R: Read> DeflateAuto<R> {
    fn new(r: R) -> Self {
        Self {
            inner: DeflateInner::Undecided(Some(r)),
        }
    }
}

impl<R: Read> Read for DeflateAuto<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let DeflateInner::Undecided(source) = &mut self.inner {
            let Some(mut source) = source.take() else {
                return Err(std::io::Error::other("deflate decoder failed earlier"));
            };
            let mut head = Vec::with_capacity(2);
            (&mut source).take(2).read_to_end(&mut head)?;
            let is_zlib = head.len() == 2
                && head[0] & 0x0f == 8
                && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
            let chained = std::io::Cursor::new(head).chain(source);
            self.inner = if is_zlib {
                DeflateInner::Zlib(flate2::read::ZlibDecoder::new(chained))
            } else {
                DeflateInner::Raw(flate2::read::DeflateDecoder::new(chained))
            };
        }
        match &mut self.inner {
            DeflateInner::Zlib(d) => d.read(buf),
            DeflateInner::Raw(d) => d.read(buf),
            DeflateInner::Undecided(_) => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).expect("write");
        enc.finish().expect("finish")
    }

    fn codings(s: &str) -> Vec<String> {
        parse_encodings(Some(s))
    }

    #[test]
    fn decodes_each_coding() {
        let text = b"<html><body>hello hello hello</body></html>".repeat(10);
        assert_eq!(
            decode(gzip(&text), &codings("gzip"), 1 << 20, Overflow::Refuse),
            Ok(text.clone())
        );

        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&text).expect("write");
        assert_eq!(
            decode(
                z.finish().expect("finish"),
                &codings("deflate"),
                1 << 20,
                Overflow::Refuse
            ),
            Ok(text.clone())
        );

        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&text).expect("write");
        assert_eq!(
            decode(
                raw.finish().expect("finish"),
                &codings("deflate"),
                1 << 20,
                Overflow::Refuse
            ),
            Ok(text.clone())
        );

        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(&text).expect("write");
        }
        assert_eq!(
            decode(br, &codings("br"), 1 << 20, Overflow::Refuse),
            Ok(text.clone())
        );

        assert_eq!(
            decode(
                gzip(&gzip(&text)),
                &codings("gzip, gzip"),
                1 << 20,
                Overflow::Refuse
            ),
            Ok(text.clone())
        );
        assert_eq!(
            decode(
                text.clone(),
                &codings("identity"),
                1 << 20,
                Overflow::Refuse
            ),
            Ok(text)
        );
    }

    #[test]
    fn refuses_what_inflates_past_the_cap() {
        let big = vec![b'a'; 10_000];
        assert_eq!(
            decode(gzip(&big), &codings("gzip"), 9_999, Overflow::Refuse),
            Err(BodyError::InflatesTooLarge { cap: 9_999 })
        );
        assert_eq!(
            decode(gzip(&big), &codings("gzip"), 10_000, Overflow::Refuse).map(|v| v.len()),
            Ok(10_000)
        );
        assert_eq!(
            decode(gzip(&big), &codings("gzip"), 100, Overflow::Truncate).map(|v| v.len()),
            Ok(100)
        );
    }

    #[test]
    fn names_unknown_and_corrupt_codings() {
        assert_eq!(
            decode(b"x".to_vec(), &codings("zstd"), 100, Overflow::Refuse),
            Err(BodyError::UnsupportedEncoding("zstd".into()))
        );
        assert!(matches!(
            decode(
                b"not gzip at all".to_vec(),
                &codings("gzip"),
                100,
                Overflow::Refuse
            ),
            Err(BodyError::Corrupt { .. })
        ));
        assert!(matches!(
            decode(
                b"x".to_vec(),
                &codings("gzip, gzip, gzip"),
                100,
                Overflow::Refuse
            ),
            Err(BodyError::UnsupportedEncoding(_))
        ));
        // A truncated stream keeps its decodable prefix.
        let full = gzip(&vec![b'z'; 100_000]);
        let cut = full[..full.len() / 2].to_vec();
        assert!(
            decode(cut, &codings("gzip"), 1 << 20, Overflow::Refuse).is_ok_and(|v| !v.is_empty())
        );
    }
}
