//! The heal benchmark's results: one [`KillRecord`] per kill, the client requests attributed to
//! the role being killed at the time, percentiles per role, and the renderings.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::load::ClientRecord;

/// Targets printed beside the figures (not asserted).
pub const DETECTION_TARGET_MS: u64 = 1000;
pub const SERVING_TARGET_MS: u64 = 2000;

/// One kill and what followed. Durations are ms after the kill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KillRecord {
    pub role: String,
    /// 1-based, within its role.
    pub index: usize,
    pub victim: String,
    pub pid: u32,
    pub victim_addr: String,
    /// Wall clock just before the SIGKILL, ms since the Unix epoch.
    pub kill_ms: i64,
    /// Until the first health checker declared the victim dead (its `dead` event's `at_ms`).
    pub detection_ms: Option<i64>,
    /// The health checker (URL) that declared it first.
    pub detected_by: Option<String>,
    /// Until the factory accepted a replacement request (`replaced` event).
    pub requested_ms: Option<i64>,
    pub replacement: Option<String>,
    /// Until the replacement's first heartbeat (`born`).
    pub replacement_born_ms: Option<i64>,
    /// Until the replacement heartbeated `serving` (`serving` event).
    pub replacement_serving_ms: Option<i64>,
    /// Until this benchmark first saw the replacement in `GET /cells` (polled).
    pub replacement_in_cells_ms: Option<i64>,
    /// Until the role was back at its minimum without the victim (polled `GET /cells`).
    pub back_at_minimum_ms: Option<i64>,
    /// End of this kill's window (after the settle), ms since the Unix epoch.
    pub window_end_ms: i64,
    /// What went wrong, if anything (nothing seen within the timeout, ...).
    pub note: Option<String>,
}

impl KillRecord {
    /// The replacement-serving figure: the `serving` event, or failing that `born`, or
    /// failing that its appearance in `GET /cells`.
    pub fn serving_ms(&self) -> Option<i64> {
        self.replacement_serving_ms
            .or(self.replacement_born_ms)
            .or(self.replacement_in_cells_ms)
    }
}

/// The span of one role's kills, ms since the Unix epoch: requests that started in it count
/// for that role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub role: String,
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// p50 / p99 / max of durations in ms (negative ones count as 0); `None` without values.
pub fn percentiles(values: &[i64]) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    // One day is far beyond any wait of this benchmark; longer values saturate.
    let mut h = Histogram::<u64>::new_with_bounds(1, 86_400_000, 3).ok()?;
    for v in values {
        h.saturating_record(u64::try_from(*v).unwrap_or(0));
    }
    // The histogram rounds up within its precision (3 digits); never above the true maximum.
    let max = values
        .iter()
        .copied()
        .max()
        .map_or(0, |m| u64::try_from(m).unwrap_or(0));
    Some(Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5).min(max),
        p99: h.value_at_quantile(0.99).min(max),
        max,
    })
}

/// The client requests that started during one role's kills.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadCounts {
    pub requests: u64,
    /// Failed even after the retry on the other front door.
    pub failed: u64,
    /// Failed on the first attempt: what a client without a retry would have seen.
    pub failed_first: u64,
    /// ... of which a non-2xx answer (from a front door).
    pub failed_first_status: u64,
    /// ... of which a transport error.
    pub failed_first_transport: u64,
    /// Transport errors on the first attempt at a front door that had just been killed, the
    /// request already in flight on it when it died.
    pub killed_frontdoor_in_flight: u64,
    /// ... the request started after it died and before its replacement was serving
    /// (connection refused on its address).
    pub killed_frontdoor_while_down: u64,
    /// First-attempt failures by cause.
    pub causes: BTreeMap<String, u64>,
}

impl LoadCounts {
    fn add(&mut self, r: &ClientRecord, killed_door: Option<KilledDoor>) {
        self.requests += 1;
        if !r.succeeded() {
            self.failed += 1;
        }
        if r.first.is_ok() {
            return;
        }
        self.failed_first += 1;
        *self.causes.entry(r.first.cause()).or_default() += 1;
        if r.first.is_transport() {
            self.failed_first_transport += 1;
            match killed_door {
                Some(KilledDoor::InFlight) => self.killed_frontdoor_in_flight += 1,
                Some(KilledDoor::WhileDown) => self.killed_frontdoor_while_down += 1,
                None => {}
            }
        } else {
            self.failed_first_status += 1;
        }
    }

    fn merge(&mut self, o: &LoadCounts) {
        self.requests += o.requests;
        self.failed += o.failed;
        self.failed_first += o.failed_first;
        self.failed_first_status += o.failed_first_status;
        self.failed_first_transport += o.failed_first_transport;
        self.killed_frontdoor_in_flight += o.killed_frontdoor_in_flight;
        self.killed_frontdoor_while_down += o.killed_frontdoor_while_down;
        for (k, v) in &o.causes {
            *self.causes.entry(k.clone()).or_default() += v;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilledDoor {
    InFlight,
    WhileDown,
}

/// `http://127.0.0.1:7070/` and `127.0.0.1:7070` are the same address.
pub fn same_addr(a: &str, b: &str) -> bool {
    fn bare(s: &str) -> &str {
        let s = s.trim();
        let s = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .unwrap_or(s);
        s.trim_end_matches('/')
    }
    bare(a) == bare(b)
}

/// Whether a failed first attempt was on a front door that had just been killed: the latest
/// front door kill before the attempt ended whose window the attempt started in, at the
/// attempt's address.
pub fn killed_door(
    r: &ClientRecord,
    frontdoors: &[String],
    kills: &[KillRecord],
) -> Option<KilledDoor> {
    if !r.first.is_transport() {
        return None;
    }
    let door = frontdoors.get(r.frontdoor)?;
    let k = kills
        .iter()
        .filter(|k| k.role == "frontdoor" && k.kill_ms <= r.end_ms)
        .max_by_key(|k| k.kill_ms)?;
    if r.start_ms > k.window_end_ms || !same_addr(door, &k.victim_addr) {
        return None;
    }
    Some(if r.start_ms < k.kill_ms {
        KilledDoor::InFlight
    } else {
        KilledDoor::WhileDown
    })
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoleRow {
    pub role: String,
    pub kills: usize,
    pub detected: usize,
    pub replaced: usize,
    pub detection_ms: Option<Percentiles>,
    pub replacement_serving_ms: Option<Percentiles>,
    pub load: LoadCounts,
    pub detection_target_met: Option<bool>,
    pub serving_target_met: Option<bool>,
    pub no_failed_requests: bool,
}

/// The rows, one per role in `phases` order, then `all` (every kill, every request of the run).
pub fn rows(
    phases: &[Phase],
    kills: &[KillRecord],
    records: &[ClientRecord],
    frontdoors: &[String],
) -> Vec<RoleRow> {
    let mut loads: Vec<LoadCounts> = vec![LoadCounts::default(); phases.len()];
    let mut all_load = LoadCounts::default();
    for r in records {
        let door = killed_door(r, frontdoors, kills);
        all_load.add(r, door);
        if let Some(i) = phases
            .iter()
            .position(|p| r.start_ms >= p.start_ms && r.start_ms < p.end_ms)
        {
            loads[i].add(r, door);
        }
    }
    let mut out: Vec<RoleRow> = phases
        .iter()
        .zip(loads)
        .map(|(p, load)| {
            let of: Vec<&KillRecord> = kills.iter().filter(|k| k.role == p.role).collect();
            row(&p.role, &of, load)
        })
        .collect();
    if phases.len() > 1 {
        let every: Vec<&KillRecord> = kills.iter().collect();
        let mut all = row("all", &every, LoadCounts::default());
        all.load.merge(&all_load);
        all.no_failed_requests = all.load.failed == 0;
        out.push(all);
    }
    out
}

fn row(role: &str, kills: &[&KillRecord], load: LoadCounts) -> RoleRow {
    let detections: Vec<i64> = kills.iter().filter_map(|k| k.detection_ms).collect();
    let servings: Vec<i64> = kills.iter().filter_map(|k| k.serving_ms()).collect();
    let detection = percentiles(&detections);
    let serving = percentiles(&servings);
    RoleRow {
        role: role.to_string(),
        kills: kills.len(),
        detected: detections.len(),
        replaced: servings.len(),
        detection_target_met: detection.map(|p| p.p99 <= DETECTION_TARGET_MS),
        serving_target_met: serving.map(|p| p.p99 <= SERVING_TARGET_MS),
        no_failed_requests: load.failed == 0,
        detection_ms: detection,
        replacement_serving_ms: serving,
        load,
    }
}

/// The table for people.
pub fn render_table(rows: &[RoleRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>5}  {:^22}  {:^22}  {:^40}",
        "", "", "detection, ms", "replacement serving, ms", "client requests"
    );
    let _ = writeln!(
        out,
        "{:<14} {:>5}  {:>6} {:>6} {:>8}  {:>6} {:>6} {:>8}  {:>15} {:>10} {:>13}",
        "role",
        "kills",
        "p50",
        "p99",
        "max",
        "p50",
        "p99",
        "max",
        "failed/total",
        "no retry",
        "on killed fd"
    );
    let fig = |p: Option<Percentiles>| match p {
        Some(p) => (p.p50.to_string(), p.p99.to_string(), p.max.to_string()),
        None => ("-".into(), "-".into(), "-".into()),
    };
    for r in rows {
        let (d50, d99, dmax) = fig(r.detection_ms);
        let (s50, s99, smax) = fig(r.replacement_serving_ms);
        let l = &r.load;
        let _ = writeln!(
            out,
            "{:<14} {:>5}  {:>6} {:>6} {:>8}  {:>6} {:>6} {:>8}  {:>15} {:>10} {:>13}",
            r.role,
            r.kills,
            d50,
            d99,
            dmax,
            s50,
            s99,
            smax,
            format!("{}/{}", l.failed, l.requests),
            l.failed_first,
            format!(
                "{}+{}",
                l.killed_frontdoor_in_flight, l.killed_frontdoor_while_down
            ),
        );
    }
    let _ = writeln!(
        out,
        "\ntargets: detection p99 <= {DETECTION_TARGET_MS} ms, replacement serving p99 <= \
         {SERVING_TARGET_MS} ms, 0 failed client requests"
    );
    let verdict = |met: Option<bool>| match met {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "no data",
    };
    for r in rows {
        let p99 = |p: Option<Percentiles>| p.map_or("-".to_string(), |p| format!("{} ms", p.p99));
        let _ = writeln!(
            out,
            "  {:<14} detection p99 {:>8} {:<7}  serving p99 {:>8} {:<7}  failed {:>5} {}",
            r.role,
            p99(r.detection_ms),
            verdict(r.detection_target_met),
            p99(r.replacement_serving_ms),
            verdict(r.serving_target_met),
            r.load.failed,
            verdict(Some(r.no_failed_requests)),
        );
    }
    for r in rows {
        if r.detected < r.kills || r.replaced < r.kills {
            let _ = writeln!(
                out,
                "  {}: {} kills, {} deaths declared, {} replacements seen",
                r.role, r.kills, r.detected, r.replaced
            );
        }
    }
    let _ = writeln!(
        out,
        "\n\"no retry\": requests whose first attempt failed (what a client without a retry \
         sees); \"failed\": still failed after one retry on the other front door; \"on killed \
         fd\": first-attempt transport errors at a front door just killed, in flight + started \
         while it was down. The `all` row counts every request of the run, warm-up included."
    );
    out
}

/// Why first attempts failed, by role, with up to `samples` examples each.
pub fn render_failures(
    rows: &[RoleRow],
    records: &[ClientRecord],
    phases: &[Phase],
    kills: &[KillRecord],
    frontdoors: &[String],
    samples: usize,
) -> String {
    let mut out = String::new();
    let any = rows
        .iter()
        .any(|r| r.role != "all" && r.load.failed_first > 0);
    let all_failed = rows
        .iter()
        .find(|r| r.role == "all")
        .map_or(0, |r| r.load.failed_first);
    if !any && all_failed == 0 {
        return out;
    }
    let _ = writeln!(out, "\nfirst-attempt failures:");
    for r in rows {
        if r.load.failed_first == 0 {
            continue;
        }
        let causes: Vec<String> = r
            .load
            .causes
            .iter()
            .map(|(c, n)| format!("{n} x {c}"))
            .collect();
        let _ = writeln!(out, "  {}: {}", r.role, causes.join("; "));
    }
    // Examples of each cause in each role's kills.
    for p in phases {
        let mut by_cause: BTreeMap<String, Vec<&ClientRecord>> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.start_ms >= p.start_ms && r.start_ms < p.end_ms && !r.first.is_ok())
        {
            by_cause.entry(r.first.cause()).or_default().push(r);
        }
        for (cause, rs) in &by_cause {
            for r in rs.iter().take(samples) {
                let _ = writeln!(
                    out,
                    "  {} / {cause}: {}",
                    p.role,
                    describe_failure(r, kills, frontdoors)
                );
            }
        }
    }
    out
}

/// One failed request, relative to the last kill before it ended.
pub fn describe_failure(r: &ClientRecord, kills: &[KillRecord], frontdoors: &[String]) -> String {
    let door = frontdoors.get(r.frontdoor).map_or("?", String::as_str);
    let when = kills
        .iter()
        .filter(|k| k.kill_ms <= r.end_ms)
        .max_by_key(|k| k.kill_ms)
        .map_or("before any kill".to_string(), |k| {
            format!(
                "started {:+} ms, ended {:+} ms from the kill of {} {} #{} ({}; replacement \
                 serving at {})",
                r.start_ms - k.kill_ms,
                r.end_ms - k.kill_ms,
                k.role,
                k.victim,
                k.index,
                k.victim_addr,
                k.serving_ms()
                    .map_or("-".to_string(), |t| format!("+{t} ms"))
            )
        });
    let first = match &r.first {
        super::load::Outcome::Status {
            status,
            backend,
            body,
        } => format!(
            "HTTP {status} from {door} (api {}): {}",
            backend.as_deref().unwrap_or("?"),
            body.trim()
        ),
        super::load::Outcome::Transport { error } => format!("{door}: {error}"),
        super::load::Outcome::Ok { status } => format!("{door}: {status}"),
    };
    let retry = match &r.retry {
        Some(o) if o.is_ok() => "retry on the other front door: ok".to_string(),
        Some(o) => format!("retry on the other front door: {}", o.cause()),
        None => "no retry".to_string(),
    };
    format!("{when}: {first}; {retry}")
}

/// One line about a kill, for the progress on stderr.
pub fn describe_kill(k: &KillRecord, of: usize) -> String {
    let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    let mut s = format!(
        "{} kill {}/{of}: {} (pid {}, {}): declared dead after {}",
        k.role,
        k.index,
        k.victim,
        k.pid,
        k.victim_addr,
        ms(k.detection_ms)
    );
    match &k.replacement {
        Some(r) => s.push_str(&format!(
            ", replacement {r} requested {}, born {}, serving {}",
            ms(k.requested_ms),
            ms(k.replacement_born_ms),
            ms(k.replacement_serving_ms)
        )),
        None => s.push_str(&format!(
            ", replacement seen in /cells {}",
            ms(k.replacement_in_cells_ms)
        )),
    }
    s.push_str(&format!(", back at minimum {}", ms(k.back_at_minimum_ms)));
    if let Some(note) = &k.note {
        s.push_str(&format!(" [{note}]"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::load::Outcome;
    use super::*;

    fn req(
        start: i64,
        end: i64,
        door: usize,
        first: Outcome,
        retry: Option<Outcome>,
    ) -> ClientRecord {
        ClientRecord {
            client: 0,
            start_ms: start,
            end_ms: end,
            frontdoor: door,
            first,
            retry,
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok { status: 200 }
    }

    fn refused() -> Outcome {
        Outcome::Transport {
            error: "connect after 0 ms: tcp connect error: Connection refused".into(),
        }
    }

    fn kill(role: &str, at: i64, end: i64, addr: &str, det: i64, serv: i64) -> KillRecord {
        KillRecord {
            role: role.into(),
            index: 1,
            victim: format!("{role}-x"),
            victim_addr: addr.into(),
            kill_ms: at,
            detection_ms: Some(det),
            replacement_serving_ms: Some(serv),
            window_end_ms: end,
            ..KillRecord::default()
        }
    }

    #[test]
    fn percentiles_of_durations() {
        assert_eq!(percentiles(&[]), None);
        let v: Vec<i64> = (1..=100).collect();
        let p = percentiles(&v).expect("values");
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 50, 99, 100));
        let one = percentiles(&[-3]).expect("clamped");
        assert_eq!((one.p50, one.max), (0, 0));
    }

    #[test]
    fn requests_are_attributed_to_the_role_being_killed_and_killed_doors_are_named() {
        let doors = vec![
            "http://127.0.0.1:7070".to_string(),
            "http://127.0.0.1:7071".to_string(),
        ];
        let phases = vec![
            Phase {
                role: "api".into(),
                start_ms: 1000,
                end_ms: 2000,
            },
            Phase {
                role: "frontdoor".into(),
                start_ms: 2000,
                end_ms: 3000,
            },
        ];
        let kills = vec![
            kill("api", 1000, 2000, "http://127.0.0.1:9000", 600, 1500),
            kill("frontdoor", 2000, 3000, "http://127.0.0.1:7071", 700, 2500),
        ];
        let records = vec![
            req(500, 510, 0, ok(), None), // before any phase: only in "all"
            req(1100, 1110, 0, ok(), None),
            req(
                1200,
                1210,
                1,
                Outcome::Status {
                    status: 502,
                    backend: Some("api-x".into()),
                    body: "no api cell answered".into(),
                },
                Some(ok()),
            ),
            // In flight on the door killed at 2000.
            req(1990, 2001, 1, refused(), Some(ok())),
            // Started while it was down; the retry failed too.
            req(2100, 2101, 1, refused(), Some(refused())),
            // A transport error on the other door is not the killed door's.
            req(2200, 2201, 0, refused(), Some(ok())),
        ];
        let rows = rows(&phases, &kills, &records, &doors);
        assert_eq!(
            rows.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
            ["api", "frontdoor", "all"]
        );
        let api = &rows[0].load;
        // The request in flight at 1990 started in the api phase.
        assert_eq!((api.requests, api.failed, api.failed_first), (3, 0, 2));
        assert_eq!(
            (api.failed_first_status, api.killed_frontdoor_in_flight),
            (1, 1)
        );
        let fd = &rows[1].load;
        assert_eq!((fd.requests, fd.failed, fd.failed_first), (2, 1, 2));
        assert_eq!(
            (
                fd.killed_frontdoor_in_flight,
                fd.killed_frontdoor_while_down
            ),
            (0, 1)
        );
        let all = &rows[2];
        assert_eq!((all.load.requests, all.load.failed), (6, 1));
        assert_eq!(all.kills, 2);
        assert!(!all.no_failed_requests);
        assert_eq!(rows[0].detection_target_met, Some(true));
        assert_eq!(rows[1].serving_target_met, Some(false));
    }

    #[test]
    fn the_table_shows_figures_targets_and_counts() {
        let kills: Vec<KillRecord> = (1..=4)
            .map(|i| kill("crawler", i * 100, i * 100 + 50, "", 400 + i, 1200 + i))
            .chain([KillRecord {
                role: "crawler".into(),
                note: Some("not replaced".into()),
                detection_ms: Some(2500),
                ..KillRecord::default()
            }])
            .collect();
        let phases = vec![Phase {
            role: "crawler".into(),
            start_ms: 0,
            end_ms: 1000,
        }];
        let records = vec![req(10, 20, 0, ok(), None)];
        let rows = rows(&phases, &kills, &records, &["http://a".into()]);
        assert_eq!(rows.len(), 1, "no `all` row for one role");
        let table = render_table(&rows);
        let line = table
            .lines()
            .find(|l| l.starts_with("crawler "))
            .expect("a crawler row");
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols,
            ["crawler", "5", "403", "2500", "2500", "1202", "1204", "1204", "0/1", "0", "0+0"]
        );
        assert!(table.contains("detection p99 <= 1000 ms"));
        assert!(
            table.contains("MISSED"),
            "p99 2500 ms is over 1 s:\n{table}"
        );
        assert!(table.contains("5 kills, 5 deaths declared, 4 replacements seen"));
        assert!(render_failures(&rows, &records, &phases, &kills, &[], 3).is_empty());
    }

    #[test]
    fn a_failure_is_described_against_the_last_kill() {
        let kills = vec![kill("api", 1000, 2000, "http://127.0.0.1:9000", 1, 1)];
        let r = req(990, 1003, 0, refused(), Some(ok()));
        let text = describe_failure(&r, &kills, &["http://127.0.0.1:7070".into()]);
        assert!(
            text.starts_with("started -10 ms, ended +3 ms from the kill of api api-x #1"),
            "{text}"
        );
        assert!(
            text.ends_with("retry on the other front door: ok"),
            "{text}"
        );
        assert!(same_addr("http://127.0.0.1:1/", "127.0.0.1:1"));
    }
}
