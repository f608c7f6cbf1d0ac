//! Body caps on the wire and after decompression, content types, charsets.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use crawler::FetchConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{config, failure, fetcher, page, serve};

const MIB: usize = 1024 * 1024;
const CAP: usize = 2 * MIB;

fn cap_reason(reason: &str) {
    assert!(
        reason.contains(&CAP.to_string()),
        "the reason names the cap: {reason}"
    );
}

/// An endless body of `a`s.
fn endless() -> Body {
    Body::from_stream(futures::stream::repeat_with(|| {
        Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; 64 * 1024]))
    }))
}

/// 100 MB of zeros, gzip-compressed, streamed into the encoder a MiB at a time.
fn gzip_bomb() -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; MIB];
    for _ in 0..100 {
        enc.write_all(&zeros).expect("compress");
    }
    enc.finish().expect("finish")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("compress");
    enc.finish().expect("finish")
}

fn brotli_bomb() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 64 * 1024, 9, 24);
        let zeros = vec![0u8; MIB];
        for _ in 0..100 {
            w.write_all(&zeros).expect("compress");
        }
    }
    out
}

fn encoded(coding: &'static str, body: Vec<u8>) -> Response {
    (
        [(CONTENT_TYPE, "text/html"), (CONTENT_ENCODING, coding)],
        body,
    )
        .into_response()
}

#[tokio::test]
async fn oversized_bodies_are_refused_while_streaming() {
    let server = serve(
        Router::new()
            .route("/declared", get(|| async { Html("a".repeat(CAP + 1)) }))
            .route(
                "/chunked",
                get(|| async { ([(CONTENT_TYPE, "text/html")], endless()) }),
            )
            // Declares 10 MiB, sends one chunk, then stalls: only an early refusal ends this
            // before the timeout.
            .route(
                "/lying",
                get(|| async {
                    let first = futures::stream::once(async {
                        Ok::<_, std::io::Error>(Bytes::from_static(b"<html>"))
                    });
                    let stall = futures::stream::pending();
                    (
                        [(CONTENT_TYPE, "text/html"), (CONTENT_LENGTH, "10485760")],
                        Body::from_stream(futures::StreamExt::chain(first, stall)),
                    )
                }),
            )
            .route(
                "/fits",
                get(|| async { Html(format!("<title>fits</title>{}", "a".repeat(CAP - 100))) }),
            ),
    )
    .await;
    let f = fetcher(FetchConfig {
        total_timeout_ms: 5_000,
        ..config(&server)
    });
    cap_reason(&failure(f.crawl("http://a.test/declared").await));
    cap_reason(&failure(f.crawl("http://a.test/chunked").await));
    let started = Instant::now();
    cap_reason(&failure(f.crawl("http://a.test/lying").await));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(page(f.crawl("http://a.test/fits").await).title, "fits");
}

/// An HTTP/1.0-style server: no Content-Length, the body ends when the connection closes,
/// and it never does.
async fn close_delimited_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                if request.starts_with(b"GET /robots.txt ") {
                    let _ = sock
                        .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                if sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n",
                    )
                    .await
                    .is_err()
                {
                    return;
                }
                let chunk = vec![b'a'; 64 * 1024];
                while sock.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_body_without_length_is_cut_at_the_cap() {
    let addr = close_delimited_server().await;
    let f = fetcher(FetchConfig {
        resolve: [("raw.test".to_string(), addr)].into(),
        allow_addresses: vec!["127.0.0.1/32".parse().expect("cidr")],
        ..FetchConfig::default()
    });
    cap_reason(&failure(f.crawl("http://raw.test/page").await));
}

#[tokio::test]
async fn compression_bombs_are_refused() {
    let gz = gzip_bomb();
    let double = gzip(&gz);
    let br = brotli_bomb();
    assert!(gz.len() < CAP && br.len() < CAP);
    assert!(
        double.len() < 8 * 1024 && br.len() < 8 * 1024,
        "{} {}",
        double.len(),
        br.len()
    );
    let server = serve(
        Router::new()
            .route("/gzip", get(move || async move { encoded("gzip", gz) }))
            .route(
                "/gzip-gzip",
                get(move || async move { encoded("gzip, gzip", double) }),
            )
            .route("/br", get(move || async move { encoded("br", br) }))
            .route(
                "/ok",
                get(|| async { encoded("gzip", gzip(b"<title>zipped</title>")) }),
            ),
    )
    .await;
    let f = fetcher(config(&server));
    for path in ["/gzip", "/gzip-gzip", "/br"] {
        let reason = failure(f.crawl(&format!("http://a.test{path}")).await);
        assert!(
            reason.starts_with("decompressed body exceeds"),
            "{path}: {reason}"
        );
        cap_reason(&reason);
    }
    assert_eq!(page(f.crawl("http://a.test/ok").await).title, "zipped");
}

#[tokio::test]
async fn only_html_is_parsed() {
    let server = serve(
        Router::new()
            .route(
                "/pdf",
                get(|| async { ([(CONTENT_TYPE, "application/pdf")], "%PDF-1.7") }),
            )
            .route(
                "/xhtml",
                get(|| async {
                    (
                        [(CONTENT_TYPE, "application/xhtml+xml; charset=utf-8")],
                        "<html><title>x</title></html>",
                    )
                }),
            )
            .route(
                "/untyped-html",
                get(|| async {
                    Response::new(Body::from("\n  <!DOCTYPE html><title>sniffed</title>"))
                }),
            )
            .route(
                "/untyped-binary",
                get(|| async { Response::new(Body::from(vec![0u8, 159, 146, 150, 1, 2, 3])) }),
            ),
    )
    .await;
    let f = fetcher(config(&server));
    assert_eq!(
        failure(f.crawl("http://a.test/pdf").await),
        "not HTML: application/pdf"
    );
    assert_eq!(page(f.crawl("http://a.test/xhtml").await).title, "x");
    assert_eq!(
        page(f.crawl("http://a.test/untyped-html").await).title,
        "sniffed"
    );
    assert!(failure(f.crawl("http://a.test/untyped-binary").await).starts_with("not HTML"));
}

#[tokio::test]
async fn legacy_charsets_decode_to_the_right_text() {
    const WIN1252: &[u8] = b"<title>Caf\xe9</title><p>\x93smart quotes\x94 na\xefve \x80 5</p>";
    let server = serve(
        Router::new()
            .route("/header", get(|| async { ([(CONTENT_TYPE, "text/html; charset=windows-1252")], WIN1252) }))
            .route(
                "/meta",
                get(|| async {
                    let mut body = b"<meta http-equiv=\"Content-Type\" content=\"text/html; charset=ISO-8859-1\">".to_vec();
                    body.extend_from_slice(WIN1252);
                    ([(CONTENT_TYPE, "text/html")], body)
                }),
            ),
    )
    .await;
    let f = fetcher(config(&server));
    for path in ["/header", "/meta"] {
        let p = page(f.crawl(&format!("http://a.test{path}")).await);
        assert_eq!(p.title, "Café", "{path}");
        assert_eq!(p.text, "\u{201c}smart quotes\u{201d} naïve € 5", "{path}");
    }
}
