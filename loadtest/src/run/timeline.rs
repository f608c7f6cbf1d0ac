//! A run's timeline: one row a second (the load's figures and the organism's), the life events,
//! and the whole run's summary; written as `timeline.json` (everything, versioned) and
//! `timeline.csv` + `events.csv` (for spreadsheets), read back by `loadtest report`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::open_model::{LoadSecond, Totals};
use super::organism_view::{LifeEvent, OrganismSample};
use super::profile::Profile;

pub const TIMELINE_VERSION: u32 = 1;
pub const TIMELINE_JSON: &str = "timeline.json";
pub const TIMELINE_CSV: &str = "timeline.csv";
pub const EVENTS_CSV: &str = "events.csv";
pub const REQUESTS_CSV: &str = "requests.csv";

/// One second of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondRow {
    /// Seconds since the start: this row covers `[t, t + 1)`.
    pub t: u64,
    /// The profile's rate at the middle of the second, requests/s.
    pub profile_rate: f64,
    #[serde(flatten)]
    pub load: LoadSecond,
    /// The organism as read during this second (none once the run has ended).
    pub organism: Option<OrganismSample>,
}

/// Whole-run figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub totals: Totals,
    /// Latency of the successful answers from their intended send time, ms.
    pub latency_ms: Percentiles,
    /// The same answers from their actual send (what a closed-model tool would report).
    pub service_ms: Percentiles,
    /// Mean offered and achieved rates over the profile's length, requests/s.
    pub offered_rate: f64,
    pub achieved_rate: f64,
    /// Most live cells of each role at once.
    pub peak_cells: BTreeMap<String, u32>,
    /// Fewest live cells of each role at once (while the registry answered).
    pub least_cells: BTreeMap<String, u32>,
    pub events_by_kind: BTreeMap<String, u64>,
    /// Events the health checkers dropped before the harness read them.
    pub events_missed: u64,
    /// Most committed spend per hour seen, micros (none: no pool).
    pub peak_spend_per_hour_micros: Option<i64>,
    pub cap_per_hour_micros: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |q: f64| Some(h.value_at_quantile(q) as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: Some(h.max() as f64 / 1000.0),
            mean: Some(h.mean() / 1000.0),
        }
    }
}

/// Everything a run recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub v: u32,
    pub profile: Profile,
    /// The front doors loaded.
    pub targets: Vec<String>,
    /// The run's start, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// The profile's length, seconds.
    pub duration_secs: f64,
    pub seconds: Vec<SecondRow>,
    pub events: Vec<LifeEvent>,
    pub summary: Summary,
}

impl Timeline {
    /// The roles that appear in any row, in order.
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = Vec::new();
        for r in crate::run::ROLES {
            roles.push(r.to_string());
        }
        for row in &self.seconds {
            for role in row.organism.iter().flat_map(|o| o.roles.keys()) {
                if !roles.contains(role) {
                    roles.push(role.clone());
                }
            }
        }
        roles
    }

    /// Every error kind of the run, sorted.
    pub fn error_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .seconds
            .iter()
            .flat_map(|r| r.load.errors.keys().cloned())
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    pub fn read(dir: &Path) -> anyhow::Result<Timeline> {
        let path = dir.join(TIMELINE_JSON);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {}: is this the --out directory of a loadtest run?",
                path.display()
            )
        })?;
        let timeline: Timeline = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            timeline.v <= TIMELINE_VERSION,
            "{} is version {}; this loadtest reads up to {TIMELINE_VERSION}",
            path.display(),
            timeline.v
        );
        Ok(timeline)
    }

    /// Write `timeline.json`, `timeline.csv` and `events.csv` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = dir.join(TIMELINE_JSON);
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let csv = dir.join(TIMELINE_CSV);
        std::fs::write(&csv, self.csv()).with_context(|| format!("writing {}", csv.display()))?;
        let events = dir.join(EVENTS_CSV);
        std::fs::write(&events, self.events_csv())
            .with_context(|| format!("writing {}", events.display()))?;
        Ok(())
    }

    pub fn csv(&self) -> String {
        let roles = self.roles();
        let kinds = self.error_kinds();
        let mut out = Vec::new();
        let mut header = vec![
            "t_s",
            "profile_rate",
            "offered",
            "sent",
            "achieved",
            "errors",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "service_p99_ms",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        for role in &roles {
            header.push(format!("cells_{role}"));
        }
        for role in &roles {
            header.push(format!("pressure_{role}"));
        }
        header.push("spend_per_hour".into());
        header.push("cap_per_hour".into());
        for kind in &kinds {
            header.push(format!("error_{kind}"));
        }
        let _ = writeln!(out, "{}", header.join(","));
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        for row in &self.seconds {
            let l = &row.load;
            let mut f = vec![
                row.t.to_string(),
                format!("{:.3}", row.profile_rate),
                l.offered.to_string(),
                l.sent.to_string(),
                l.ok.to_string(),
                l.error_count().to_string(),
                opt(l.p50_ms),
                opt(l.p90_ms),
                opt(l.p99_ms),
                opt(l.max_ms),
                opt(l.service_p99_ms),
            ];
            let role = |r: &str| row.organism.as_ref().and_then(|o| o.roles.get(r));
            let registry = row.organism.as_ref().is_some_and(|o| o.registry);
            for r in &roles {
                f.push(if registry {
                    role(r).map_or(0, |s| s.cells).to_string()
                } else {
                    String::new()
                });
            }
            for r in &roles {
                f.push(
                    role(r)
                        .map(|s| format!("{:.3}", s.pressure_mean))
                        .unwrap_or_default(),
                );
            }
            let spend = row.organism.as_ref().and_then(|o| o.spend.as_ref());
            f.push(
                spend
                    .map(|s| engines::pool::show(s.committed_per_hour_micros))
                    .unwrap_or_default(),
            );
            f.push(
                spend
                    .map(|s| engines::pool::show(s.cap_per_hour_micros))
                    .unwrap_or_default(),
            );
            for kind in &kinds {
                f.push(l.errors.get(kind).copied().unwrap_or(0).to_string());
            }
            let _ = writeln!(out, "{}", f.join(","));
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn events_csv(&self) -> String {
        let mut out = String::from("t_s,kind,role,cell,parent,source,reason\n");
        for e in &self.events {
            out.push_str(&format!(
                "{:.3},{},{},{},{},{},{}\n",
                e.t_ms as f64 / 1000.0,
                e.kind,
                e.role,
                e.cell_id,
                e.parent.as_deref().unwrap_or(""),
                e.source,
                csv_field(&e.reason)
            ));
        }
        out
    }
}

/// A CSV field, quoted when it needs to be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The summary of `seconds` and `events`, with the whole run's histograms.
pub fn summarize(
    seconds: &[SecondRow],
    events: &[LifeEvent],
    totals: Totals,
    corrected: &Histogram<u64>,
    service: &Histogram<u64>,
    duration_secs: f64,
    events_missed: u64,
) -> Summary {
    let mut peak: BTreeMap<String, u32> = BTreeMap::new();
    let mut least: BTreeMap<String, u32> = BTreeMap::new();
    let mut peak_spend: Option<i64> = None;
    let mut cap: Option<i64> = None;
    for o in seconds.iter().filter_map(|r| r.organism.as_ref()) {
        if o.registry {
            for (role, s) in &o.roles {
                let p = peak.entry(role.clone()).or_default();
                *p = (*p).max(s.cells);
                let l = least.entry(role.clone()).or_insert(s.cells);
                *l = (*l).min(s.cells);
            }
        }
        if let Some(s) = &o.spend {
            peak_spend = Some(peak_spend.map_or(s.committed_per_hour_micros, |p| {
                p.max(s.committed_per_hour_micros)
            }));
            cap = Some(s.cap_per_hour_micros);
        }
    }
    let mut events_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        *events_by_kind.entry(e.kind.clone()).or_default() += 1;
    }
    let per_sec = |n: u64| {
        if duration_secs > 0.0 {
            n as f64 / duration_secs
        } else {
            0.0
        }
    };
    Summary {
        offered_rate: per_sec(totals.offered),
        achieved_rate: per_sec(totals.ok),
        totals,
        latency_ms: Percentiles::of(corrected),
        service_ms: Percentiles::of(service),
        peak_cells: peak,
        least_cells: least,
        events_by_kind,
        events_missed,
        peak_spend_per_hour_micros: peak_spend,
        cap_per_hour_micros: cap,
    }
}
