//! The open model: requests are sent at their intended times whatever the target answers, so a
//! slow target cannot slow the load down and hide its slowness (no coordinated omission, as
//! wrk2 and vegeta do it). Each request's latency is measured from its *intended* send time
//! to the end of its answer, so the time a request waited behind a late sender or a queue at
//! the target counts; the service time (from the actual send) is kept beside it.
//!
//! The only bound is on requests outstanding at once (`max_outstanding`, large): a request
//! due while the bound is reached is not sent, and is counted as the error kind
//! `over_outstanding_bound` at its intended time.
//!
//! Figures are kept per second of the run, by the second an answer completed (latency, answers,
//! errors) or a request was due (offered, sent); each closed second is reduced to its
//! percentiles, while whole-run HDR histograms keep every latency.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::profile::{Profile, Schedule};
use super::queries::{Queries, Query};

/// The error kind of a request skipped for the outstanding bound.
pub const OVER_BOUND: &str = "over_outstanding_bound";

/// Latencies are recorded in microseconds, from 1 µs to an hour, to 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// One second of the run, as the load saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSecond {
    /// Requests due in this second by the profile (sent or not).
    pub offered: u64,
    /// Of those, the requests sent (not held back by the outstanding bound); each left at its
    /// intended time or as soon after it as the sender ran.
    pub sent: u64,
    /// Successful answers completed in this second (the achieved rate).
    pub ok: u64,
    /// Failed requests by kind, counted in the second they completed (or were skipped).
    pub errors: BTreeMap<String, u64>,
    /// Latency of this second's successful answers from their intended send time, ms.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// The same answers' service time (from the actual send), p99, ms.
    pub service_p99_ms: Option<f64>,
}

impl LoadSecond {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One request, as written to `requests.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Intended send time, µs after the start.
    pub intended_us: u64,
    /// Actual send time, µs after the start (none when skipped).
    pub sent_us: Option<u64>,
    /// End of the answer (or of the failure), µs after the start.
    pub done_us: u64,
    /// `ok`, or the error kind.
    pub outcome: String,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
}

impl RequestRecord {
    pub fn csv_header() -> &'static str {
        "intended_us,sent_us,done_us,latency_us,outcome,status"
    }

    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{},{},{},{}",
            self.intended_us,
            self.sent_us.map(|s| s.to_string()).unwrap_or_default(),
            self.done_us,
            self.done_us.saturating_sub(self.intended_us),
            self.outcome,
            self.status.map(|s| s.to_string()).unwrap_or_default()
        )
    }

    /// Parse a line of `requests.csv`.
    pub fn parse_csv(line: &str) -> Option<RequestRecord> {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 6 {
            return None;
        }
        Some(RequestRecord {
            intended_us: f[0].parse().ok()?,
            sent_us: if f[1].is_empty() {
                None
            } else {
                Some(f[1].parse().ok()?)
            },
            done_us: f[2].parse().ok()?,
            outcome: f[4].to_string(),
            status: if f[5].is_empty() {
                None
            } else {
                Some(f[5].parse().ok()?)
            },
        })
    }

    pub fn is_ok(&self) -> bool {
        self.outcome == "ok"
    }
}

struct OpenSecond {
    load: LoadSecond,
    corrected: Histogram<u64>,
    service: Histogram<u64>,
}

impl OpenSecond {
    fn new() -> Self {
        OpenSecond {
            load: LoadSecond::default(),
            corrected: histogram(),
            service: histogram(),
        }
    }

    fn close(mut self) -> LoadSecond {
        let ms = |h: &Histogram<u64>, q: f64| {
            (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
        };
        self.load.p50_ms = ms(&self.corrected, 0.5);
        self.load.p90_ms = ms(&self.corrected, 0.9);
        self.load.p99_ms = ms(&self.corrected, 0.99);
        self.load.max_ms =
            (!self.corrected.is_empty()).then(|| self.corrected.max() as f64 / 1000.0);
        self.load.service_p99_ms = ms(&self.service, 0.99);
        self.load
    }
}

struct RecorderInner {
    /// Seconds `closed..` still open, in order.
    open: VecDeque<OpenSecond>,
    closed: Vec<LoadSecond>,
    corrected: Histogram<u64>,
    service: Histogram<u64>,
    totals: Totals,
}

/// Whole-run counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub offered: u64,
    pub sent: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Answers recorded in a second already closed (recorded in the oldest open one instead).
    pub late_records: u64,
}

/// The load's figures, shared by the request tasks, the live view and the timeline.
pub struct Recorder {
    inner: Mutex<RecorderInner>,
    requests: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
}

impl Recorder {
    /// A recorder; with `requests_csv`, every request is written there too.
    pub fn new(requests_csv: Option<std::fs::File>) -> anyhow::Result<Recorder> {
        let requests = match requests_csv {
            Some(file) => {
                let mut w = std::io::BufWriter::new(file);
                writeln!(w, "{}", RequestRecord::csv_header())?;
                Some(Mutex::new(w))
            }
            None => None,
        };
        Ok(Recorder {
            inner: Mutex::new(RecorderInner {
                open: VecDeque::new(),
                closed: Vec::new(),
                corrected: histogram(),
                service: histogram(),
                totals: Totals::default(),
            }),
            requests,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open second `second`, creating those before it; a closed one gives the oldest open.
    fn with_second<R>(&self, second: u64, f: impl FnOnce(&mut RecorderInner, usize) -> R) -> R {
        let mut inner = self.lock();
        let first = inner.closed.len() as u64;
        let index = if second < first {
            inner.totals.late_records += 1;
            0
        } else {
            (second - first) as usize
        };
        while inner.open.len() <= index {
            inner.open.push_back(OpenSecond::new());
        }
        f(&mut inner, index)
    }

    fn offered(&self, second: u64, sent: bool) {
        self.with_second(second, |inner, i| {
            inner.open[i].load.offered += 1;
            inner.totals.offered += 1;
            if sent {
                inner.open[i].load.sent += 1;
                inner.totals.sent += 1;
            }
        });
    }

    fn record(&self, record: RequestRecord) {
        let second = record.done_us / 1_000_000;
        let latency = record.done_us.saturating_sub(record.intended_us).max(1);
        let service = record
            .sent_us
            .map(|s| record.done_us.saturating_sub(s).max(1));
        self.with_second(second, |inner, i| {
            if record.is_ok() {
                let s = &mut inner.open[i];
                s.load.ok += 1;
                s.corrected.saturating_record(latency);
                inner.corrected.saturating_record(latency);
                if let Some(service) = service {
                    inner.open[i].service.saturating_record(service);
                    inner.service.saturating_record(service);
                }
                inner.totals.ok += 1;
            } else {
                *inner.open[i]
                    .load
                    .errors
                    .entry(record.outcome.clone())
                    .or_default() += 1;
                *inner
                    .totals
                    .errors
                    .entry(record.outcome.clone())
                    .or_default() += 1;
            }
        });
        if let Some(w) = &self.requests {
            let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(w, "{}", record.csv_line());
        }
    }

    /// Close every second before `second`; returns the seconds closed now.
    pub fn close_before(&self, second: u64) -> Vec<LoadSecond> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        while (inner.closed.len() as u64) < second {
            let s = inner
                .open
                .pop_front()
                .unwrap_or_else(OpenSecond::new)
                .close();
            inner.closed.push(s.clone());
            out.push(s);
        }
        out
    }

    /// Every closed second so far.
    pub fn closed(&self) -> Vec<LoadSecond> {
        self.lock().closed.clone()
    }

    pub fn totals(&self) -> Totals {
        self.lock().totals.clone()
    }

    /// The whole run's latency histograms: (from the intended send, from the actual send).
    pub fn histograms(&self) -> (Histogram<u64>, Histogram<u64>) {
        let inner = self.lock();
        (inner.corrected.clone(), inner.service.clone())
    }

    pub fn flush(&self) -> std::io::Result<()> {
        if let Some(w) = &self.requests {
            w.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
        }
        Ok(())
    }
}

/// What the load sends.
pub struct Target {
    /// Front doors (base URLs), used in turn.
    pub urls: Vec<String>,
    pub client: reqwest::Client,
    pub limit: u32,
    pub max_outstanding: usize,
}

/// Send the profile's requests at their intended times until the profile ends or `stop`, then
/// wait (up to `drain`) for the answers still outstanding. `start` is the run's time zero.
pub async fn drive(
    profile: &Profile,
    target: Arc<Target>,
    mut queries: Queries,
    recorder: Arc<Recorder>,
    start: Instant,
    stop: CancellationToken,
    drain: Duration,
) {
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut n = 0usize;
    for at in Schedule::new(profile) {
        let intended = start + at;
        tokio::select! {
            () = tokio::time::sleep_until(intended) => {}
            () = stop.cancelled() => break,
        }
        let intended_us = at.as_micros() as u64;
        let second = intended_us / 1_000_000;
        let query = queries.next_query();
        if outstanding.load(Ordering::Relaxed) >= target.max_outstanding {
            recorder.offered(second, false);
            recorder.record(RequestRecord {
                intended_us,
                sent_us: None,
                done_us: start.elapsed().as_micros() as u64,
                outcome: OVER_BOUND.into(),
                status: None,
            });
            continue;
        }
        recorder.offered(second, true);
        outstanding.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/search", target.urls[n % target.urls.len()]);
        n += 1;
        let (target, recorder, outstanding) =
            (target.clone(), recorder.clone(), outstanding.clone());
        tokio::spawn(async move {
            let sent_us = start.elapsed().as_micros() as u64;
            let (outcome, status) = search(&target, &url, &query).await;
            let done_us = start.elapsed().as_micros() as u64;
            recorder.record(RequestRecord {
                intended_us,
                sent_us: Some(sent_us),
                done_us,
                outcome,
                status,
            });
            outstanding.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let deadline = Instant::now() + drain;
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One search: `ok`, or the error kind; and the status when there was an answer.
async fn search(target: &Target, url: &str, query: &Query) -> (String, Option<u16>) {
    let limit = target.limit.to_string();
    let offset = query.offset.to_string();
    let sent = target
        .client
        .get(url)
        .query(&[
            ("q", query.q.as_str()),
            ("limit", limit.as_str()),
            ("offset", offset.as_str()),
        ])
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return (error_kind(&e), None),
    };
    let status = resp.status().as_u16();
    match resp.bytes().await {
        Ok(_) if (200..300).contains(&status) => ("ok".into(), Some(status)),
        Ok(_) => (format!("http_{status}"), Some(status)),
        Err(e) if e.is_timeout() => ("timeout".into(), Some(status)),
        Err(_) => ("body_cut_short".into(), Some(status)),
    }
}

/// A failed request's kind: a few names, so the errors group (the innermost cause decides
/// between a connection reset, closed and other transport errors).
fn error_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timeout".into();
    }
    if e.is_connect() {
        return "connect".into();
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let text = text.to_ascii_lowercase();
    if text.contains("reset") {
        "connection_reset"
    } else if text.contains("closed") || text.contains("incomplete") {
        "connection_closed"
    } else {
        "transport"
    }
    .into()
}

/// The HdrHistogram percentile distribution (`.hgrm`, as wrk2 and HdrHistogram's plotter
/// read it), values in milliseconds.
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        return out;
    }
    let mut total = 0u64;
    for v in h.iter_quantiles(1) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            format!("{:>14}", "inf")
        };
        out.push_str(&format!(
            "{:>12.3} {:>14.12} {:>10} {inv}\n",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            total,
        ));
    }
    out.push_str(&format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_records_round_trip_through_csv() {
        let r = RequestRecord {
            intended_us: 1_500_000,
            sent_us: Some(1_500_100),
            done_us: 1_560_000,
            outcome: "ok".into(),
            status: Some(200),
        };
        assert_eq!(RequestRecord::parse_csv(&r.csv_line()), Some(r.clone()));
        let skipped = RequestRecord {
            sent_us: None,
            outcome: OVER_BOUND.into(),
            status: None,
            ..r
        };
        assert_eq!(RequestRecord::parse_csv(&skipped.csv_line()), Some(skipped));
        assert_eq!(RequestRecord::parse_csv("a,b"), None);
    }

    #[test]
    fn seconds_close_in_order_with_their_percentiles() {
        let rec = Recorder::new(None).expect("recorder");
        rec.offered(0, true);
        rec.offered(0, true);
        rec.offered(1, false);
        for (intended, done, outcome) in [
            (0, 10_000, "ok"),
            (500_000, 1_100_000, "ok"),
            (900_000, 1_200_000, "http_503"),
        ] {
            rec.record(RequestRecord {
                intended_us: intended,
                sent_us: Some(intended),
                done_us: done,
                outcome: outcome.into(),
                status: Some(200),
            });
        }
        let closed = rec.close_before(2);
        assert_eq!(closed.len(), 2);
        assert_eq!((closed[0].offered, closed[0].sent, closed[0].ok), (2, 2, 1));
        // HDR histograms give the highest value equivalent to 3 significant figures.
        let p99 = closed[0].p99_ms.expect("a latency");
        assert!((p99 - 10.0).abs() <= 10.0 * 0.001, "{p99}");
        assert_eq!((closed[1].offered, closed[1].sent, closed[1].ok), (1, 0, 1));
        assert_eq!(closed[1].errors.get("http_503"), Some(&1));
        // 600 ms from the intended send, to 3 significant figures.
        let max = closed[1].max_ms.expect("a latency");
        assert!((max - 600.0).abs() < 1.0, "{max}");
        // A late answer goes to the oldest open second, and is counted.
        rec.record(RequestRecord {
            intended_us: 0,
            sent_us: Some(0),
            done_us: 500_000,
            outcome: "ok".into(),
            status: Some(200),
        });
        assert_eq!(rec.totals().late_records, 1);
        assert_eq!(rec.totals().ok, 3);
        let text = percentile_distribution(&rec.histograms().0);
        assert!(text.contains("Total count"), "{text}");
    }
}
