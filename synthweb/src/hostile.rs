//! The hostile synthetic web: beside the generated pages, hosts whose answers attack or trip a
//! crawler, served on demand, and the oracle of what a correct crawler does with each.
//!
//! | URL | what it does | a correct crawler |
//! |---|---|---|
//! | `hostile.test/slow` | answers after a second | indexes it |
//! | `hostile.test/slowloris` | sends its headers, then a byte every half second, forever | gives up on a timeout |
//! | `hostile.test/loop/a` | `301` to `/loop/b`, which sends back to `/loop/a` | stops at its redirect limit |
//! | `hostile.test/to-metadata`, `/to-private` | `301` to a link-local or private address | refuses it (SSRF), sends nothing there |
//! | `hostile.test/gzip-bomb`, `/brotli-bomb` | 64 MiB of zeros in 64 KiB (gzip) or 12 KiB (brotli) | stops decoding at its body cap |
//! | `hostile.test/huge` | 32 MiB of HTML, streamed without a length | stops reading at its body cap |
//! | `hostile.test/links` | 100,000 links on one page | indexes it, follows at most its link cap |
//! | `hostile.test/shift-jis` | Shift_JIS, declared only in `<meta charset>` | decodes the title |
//! | `hostile.test/bad-utf8` | declared UTF-8, with invalid bytes | indexes it, bytes replaced |
//! | `hostile.test/broken` | unclosed and misnested tags, stray entities | indexes it |
//! | `hostile.test/nested` | 100,000 nested `<div>`s | indexes it (within its parse budget) |
//! | `hostile.test/octet`, `/png` | not HTML (`application/octet-stream`, `image/png`) | records "not HTML" |
//! | `hostile.test/busy` | `429` with `Retry-After: 1` the first time, then the page | waits, then indexes it |
//! | `robots5xx-hostile.test/page` | its robots.txt answers `503` | fetches nothing but robots.txt, fails the page |
//! | `robotsbom-hostile.test/secret/page` | robots.txt with a byte-order mark and odd casing disallows `/secret/` | obeys it |
//! | `robotsbom-hostile.test/open` | the same host, allowed | indexes it |
//! | `crawldelay-hostile.test/a`, `/b` | robots.txt says `Crawl-delay: 1` | spaces its requests a second apart |
//! | `calendar-hostile.test/cal/2026/11` | a calendar: every month links the next and previous ones, forever | stops at its per-host budget |
//!
//! Nothing here allocates what it attacks with: the big bodies are streamed or compressed once.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::sync::OnceCell;

/// The hosts of the hostile web (each ends in [`crate::HOST_SUFFIX`]).
pub const HOSTS: &[&str] = &[
    "hostile.test",
    "robots5xx-hostile.test",
    "robotsbom-hostile.test",
    "crawldelay-hostile.test",
    "calendar-hostile.test",
];

/// The calendar trap's first page.
pub const CALENDAR_SEED: &str = "http://calendar-hostile.test/cal/2026/11";
pub const CALENDAR_HOST: &str = "calendar-hostile.test";
/// The host whose robots.txt asks for this delay between requests, seconds, and its pages.
pub const CRAWL_DELAY_HOST: &str = "crawldelay-hostile.test";
pub const CRAWL_DELAY_SECS: u64 = 1;
/// `/busy`'s `Retry-After`, seconds.
pub const RETRY_AFTER_SECS: u64 = 1;
/// How many links `/links` carries.
pub const LINKS: usize = 100_000;

/// What a correct crawler ends with for one hostile URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Indexed, under this title.
    Indexed { title: &'static str },
    /// Recorded as failed, with a reason containing this.
    Failed { reason: &'static str },
}

/// One hostile URL and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub url: &'static str,
    pub expect: Expect,
}

/// Every hostile URL a crawl is seeded with, and what a correct crawler ends with. (The calendar
/// and the crawl delay are judged on the whole host: [`CALENDAR_SEED`], [`CRAWL_DELAY_HOST`].)
pub fn cases() -> Vec<Case> {
    use Expect::{Failed, Indexed};
    let c = |url, expect| Case { url, expect };
    vec![
        c(
            "http://hostile.test/slow",
            Indexed {
                title: "Slow but fine",
            },
        ),
        c(
            "http://hostile.test/slowloris",
            Failed { reason: "timeout" },
        ),
        c(
            "http://hostile.test/loop/a",
            Failed {
                reason: "redirect limit",
            },
        ),
        c(
            "http://hostile.test/to-metadata",
            Failed { reason: "refused" },
        ),
        c(
            "http://hostile.test/to-private",
            Failed { reason: "refused" },
        ),
        c(
            "http://hostile.test/gzip-bomb",
            Failed {
                reason: "exceeds max_body_bytes",
            },
        ),
        c(
            "http://hostile.test/brotli-bomb",
            Failed {
                reason: "exceeds max_body_bytes",
            },
        ),
        c(
            "http://hostile.test/huge",
            Failed {
                reason: "exceeds max_body_bytes",
            },
        ),
        c(
            "http://hostile.test/links",
            Indexed {
                title: "A hundred thousand links",
            },
        ),
        c(
            "http://hostile.test/shift-jis",
            Indexed {
                title: "日本語のページ",
            },
        ),
        c(
            "http://hostile.test/bad-utf8",
            Indexed {
                title: "Broken bytes",
            },
        ),
        c(
            "http://hostile.test/broken",
            Indexed {
                title: "Broken markup",
            },
        ),
        c(
            "http://hostile.test/nested",
            Indexed {
                title: "Deep nesting",
            },
        ),
        c("http://hostile.test/octet", Failed { reason: "not HTML" }),
        c("http://hostile.test/png", Failed { reason: "not HTML" }),
        c(
            "http://hostile.test/busy",
            Indexed {
                title: "Busy, then fine",
            },
        ),
        c(
            "http://robots5xx-hostile.test/page",
            Failed {
                reason: "robots.txt unavailable",
            },
        ),
        c(
            "http://robotsbom-hostile.test/secret/page",
            Failed {
                reason: "robots.txt disallows",
            },
        ),
        c(
            "http://robotsbom-hostile.test/open",
            Indexed { title: "Open page" },
        ),
        c(
            "http://crawldelay-hostile.test/a",
            Indexed { title: "Delayed a" },
        ),
        c(
            "http://crawldelay-hostile.test/b",
            Indexed { title: "Delayed b" },
        ),
    ]
}

/// Whether `host` (no port, lowercased) belongs to the hostile web.
pub fn is_hostile(host: &str) -> bool {
    HOSTS.contains(&host)
}

/// What the hostile hosts remember between requests, and their bombs, built once.
#[derive(Debug, Default)]
pub struct Hostile {
    /// URLs that already answered `429` once.
    busy: Mutex<HashSet<String>>,
    gzip_bomb: OnceCell<Bytes>,
    brotli_bomb: OnceCell<Bytes>,
}

/// Zeros a bomb decompresses to.
const BOMB_BYTES: usize = 64 << 20;
/// What `/huge` streams.
const HUGE_BYTES: usize = 32 << 20;

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{body}</p></body></html>\n"
    )
}

fn html(status: StatusCode, body: impl Into<Body>) -> Response {
    with_type(status, "text/html; charset=utf-8", body)
}

fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn redirect(location: &'static str) -> Response {
    let mut r = html(StatusCode::MOVED_PERMANENTLY, "");
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    r
}

fn not_found() -> Response {
    with_type(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n",
    )
}

/// A body that yields `chunk` `times` times (then ends), pausing `every` before each.
fn stream(chunk: Bytes, times: usize, every: Duration) -> Body {
    Body::from_stream(futures::stream::unfold(0usize, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= times {
                return None;
            }
            if !every.is_zero() {
                tokio::time::sleep(every).await;
            }
            Some((Ok::<Bytes, Infallible>(chunk), sent + 1))
        }
    }))
}

impl Hostile {
    /// The answer of hostile `host` to `path` (path and query).
    pub async fn answer(&self, host: &str, path: &str) -> Response {
        match (host, path) {
            (_, "/robots.txt") => self.robots(host),
            ("hostile.test", _) => self.main_host(path).await,
            ("robots5xx-hostile.test", "/page") => html(StatusCode::OK, page("Never", "x")),
            ("robotsbom-hostile.test", "/secret/page") => html(StatusCode::OK, page("Secret", "x")),
            ("robotsbom-hostile.test", "/open") => {
                html(StatusCode::OK, page("Open page", "allowed beside a secret"))
            }
            ("crawldelay-hostile.test", "/a" | "/b") => {
                let title = if path == "/a" {
                    "Delayed a"
                } else {
                    "Delayed b"
                };
                html(StatusCode::OK, page(title, "asked for a delay"))
            }
            ("calendar-hostile.test", _) => calendar(path),
            _ => not_found(),
        }
    }

    fn robots(&self, host: &str) -> Response {
        let text = |body: &'static [u8]| with_type(StatusCode::OK, "text/plain", body);
        match host {
            "robots5xx-hostile.test" => with_type(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "robots are resting\n",
            ),
            // A byte-order mark, then directives in odd casing (RFC 9309: case-insensitive).
            "robotsbom-hostile.test" => {
                text(b"\xEF\xBB\xBFuSeR-aGeNt: *\nDISALLOW: /secret/\nallow: /open\n")
            }
            "crawldelay-hostile.test" => text(b"User-agent: *\nCrawl-delay: 1\n"),
            _ => not_found(),
        }
    }

    async fn main_host(&self, path: &str) -> Response {
        match path {
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                html(StatusCode::OK, page("Slow but fine", "patience"))
            }
            // Headers now, then a byte every half second for a day.
            "/slowloris" => html(
                StatusCode::OK,
                stream(Bytes::from_static(b"<"), 172_800, Duration::from_millis(500)),
            ),
            "/loop/a" => redirect("/loop/b"),
            "/loop/b" => redirect("http://hostile.test/loop/a"),
            "/to-metadata" => redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private" => redirect("http://10.0.0.1/admin"),
            "/gzip-bomb" => {
                let body = built(&self.gzip_bomb, gzip_bomb).await;
                encoded(body, "gzip")
            }
            "/brotli-bomb" => {
                let body = built(&self.brotli_bomb, brotli_bomb).await;
                encoded(body, "br")
            }
            "/huge" => {
                let chunk = Bytes::from(format!("<p>{}</p>\n", "huge ".repeat(13_000)));
                let times = HUGE_BYTES / chunk.len() + 1;
                let head = Bytes::from_static(
                    b"<!DOCTYPE html><html><head><title>Huge</title></head><body>",
                );
                let body = futures::stream::once(async move { Ok::<Bytes, Infallible>(head) });
                let rest = futures::stream::unfold(0usize, move |sent| {
                    let chunk = chunk.clone();
                    async move { (sent < times).then(|| (Ok::<Bytes, Infallible>(chunk), sent + 1)) }
                });
                html(
                    StatusCode::OK,
                    Body::from_stream(futures::StreamExt::chain(body, rest)),
                )
            }
            "/links" => {
                let mut s = String::with_capacity(LINKS * 24 + 200);
                s.push_str(
                    "<!DOCTYPE html><html><head><title>A hundred thousand links</title></head><body>",
                );
                for i in 0..LINKS {
                    s.push_str(&format!("<a href=\"/l/{i}\">{i}</a>"));
                }
                s.push_str("</body></html>");
                html(StatusCode::OK, s)
            }
            "/shift-jis" => {
                let text = "<!DOCTYPE html><html><head><meta charset=\"shift_jis\">\
                            <title>日本語のページ</title></head><body><p>こんにちは、世界</p></body></html>";
                let (bytes, _, _) = encoding_rs::SHIFT_JIS.encode(text);
                with_type(StatusCode::OK, "text/html", bytes.into_owned())
            }
            "/bad-utf8" => {
                let mut b = b"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Broken bytes</title>\
                              </head><body><p>before "
                    .to_vec();
                b.extend_from_slice(&[0xFF, 0xFE, 0xC3, 0x28, 0xE2, 0x82]);
                b.extend_from_slice(b" after</p></body></html>");
                with_type(StatusCode::OK, "text/html; charset=utf-8", b)
            }
            "/broken" => html(
                StatusCode::OK,
                "<html><head><title>Broken markup</title><body><div><p>unclosed <b>bold <i>italic</div>\
                 </p></b> text &notanentity; &#xFFFFFFFF; <a href=\"/x\">link<a href=/y>another\
                 <table><td>cell</tr></html></html><script>var never = \"</scr\" + \"ipt>\"",
            ),
            "/nested" => {
                let mut s = String::from(
                    "<!DOCTYPE html><html><head><title>Deep nesting</title></head><body>",
                );
                s.push_str(&"<div>".repeat(100_000));
                s.push_str("deep down");
                html(StatusCode::OK, s)
            }
            "/octet" => with_type(
                StatusCode::OK,
                "application/octet-stream",
                Bytes::from_static(b"<html><title>not really</title></html>"),
            ),
            "/png" => with_type(
                StatusCode::OK,
                "image/png",
                Bytes::from_static(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            ),
            "/busy" => {
                let first = self
                    .busy
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(path.to_string());
                if first {
                    let mut r = html(StatusCode::TOO_MANY_REQUESTS, "slow down\n");
                    r.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from(RETRY_AFTER_SECS),
                    );
                    r
                } else {
                    html(StatusCode::OK, page("Busy, then fine", "thank you for waiting"))
                }
            }
            _ => not_found(),
        }
    }
}

fn encoded(body: Bytes, encoding: &'static str) -> Response {
    let mut r = html(StatusCode::OK, body);
    r.headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
    r
}

/// The bomb in `cell`, built by `build` on the first request, on a blocking thread: compressing
/// 64 MiB takes a loaded machine a second or more, which a runtime thread of the server (and every
/// request it serves meanwhile) would otherwise wait out.
async fn built(cell: &OnceCell<Bytes>, build: fn() -> Bytes) -> Bytes {
    cell.get_or_init(|| async move {
        tokio::task::spawn_blocking(build)
            .await
            .expect("building a bomb does not panic")
    })
    .await
    .clone()
}

fn gzip_bomb() -> Bytes {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BOMB_BYTES >> 20 {
        gz.write_all(&zeros).expect("writing to memory");
    }
    Bytes::from(gz.finish().expect("writing to memory"))
}

fn brotli_bomb() -> Bytes {
    let mut out = Vec::new();
    {
        // Quality 1: 12 KiB in a tenth of a second; quality 5 made 102 bytes in seven tenths.
        let mut br = brotli::CompressorWriter::new(&mut out, 1 << 16, 1, 22);
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..BOMB_BYTES >> 20 {
            br.write_all(&zeros).expect("writing to memory");
        }
    }
    Bytes::from(out)
}

/// `/cal/YEAR/MONTH`: a month page linking the previous and next months, forever.
fn calendar(path: &str) -> Response {
    let mut parts = path.strip_prefix("/cal/").unwrap_or_default().split('/');
    let (Some(year), Some(month), None) = (
        parts.next().and_then(|y| y.parse::<i32>().ok()),
        parts.next().and_then(|m| m.parse::<u32>().ok()),
        parts.next(),
    ) else {
        return not_found();
    };
    if !(1..=12).contains(&month) {
        return not_found();
    }
    let (py, pm) = if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    };
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    html(
        StatusCode::OK,
        format!(
            "<!DOCTYPE html><html><head><title>{year}-{month:02}</title></head><body>\
             <a href=\"/cal/{py}/{pm}\">previous</a> <a href=\"/cal/{ny}/{nm}\">next</a>\
             </body></html>"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bombs_are_small_on_the_wire() {
        assert!(gzip_bomb().len() < 256 << 10, "{}", gzip_bomb().len());
        assert!(brotli_bomb().len() < 64 << 10, "{}", brotli_bomb().len());
    }

    #[test]
    fn every_case_is_on_a_hostile_host() {
        for case in cases() {
            let url = url::Url::parse(case.url).expect("a URL");
            assert!(
                is_hostile(url.host_str().unwrap_or_default()),
                "{}",
                case.url
            );
        }
        assert!(is_hostile(CALENDAR_HOST) && is_hostile(CRAWL_DELAY_HOST));
    }

    #[tokio::test]
    async fn the_calendar_never_ends_and_rejects_what_is_not_a_month() {
        let h = Hostile::default();
        let r = h.answer(CALENDAR_HOST, "/cal/2026/12").await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("/cal/2027/1\"") && text.contains("/cal/2026/11\""),
            "{text}"
        );
        for bad in ["/cal/2026/13", "/cal/x/1", "/cal/2026/1/2", "/other"] {
            assert_eq!(
                h.answer(CALENDAR_HOST, bad).await.status(),
                StatusCode::NOT_FOUND
            );
        }
    }

    #[tokio::test]
    async fn busy_answers_429_once() {
        let h = Hostile::default();
        let first = h.answer("hostile.test", "/busy").await;
        assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(first.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            h.answer("hostile.test", "/busy").await.status(),
            StatusCode::OK
        );
    }
}
