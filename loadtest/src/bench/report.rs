//! The benchmark's results: one [`Row`] per (engine, latency), the arithmetic behind its
//! figures, and its renderings (a table for people, JSON lines for scripts).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The label of the embedded default organism, the baseline of every ratio.
pub const EMBEDDED: &str = "embedded";

/// How the indexed set compares with the oracle's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completeness {
    /// Pages the organism indexed.
    pub indexed: usize,
    /// Pages the oracle expects.
    pub expected: usize,
    /// Expected pages that were indexed (|indexed ∩ expected|).
    pub found: usize,
    /// Indexed pages the oracle does not expect (|indexed \ expected|).
    pub extra: usize,
}

impl Completeness {
    pub fn of(indexed: &BTreeSet<String>, expected: &BTreeSet<String>) -> Self {
        let found = indexed.intersection(expected).count();
        Self {
            indexed: indexed.len(),
            expected: expected.len(),
            found,
            extra: indexed.len() - found,
        }
    }

    /// `found / expected` in percent; an empty expectation is met completely.
    pub fn percent(&self) -> f64 {
        if self.expected == 0 {
            100.0
        } else {
            100.0 * self.found as f64 / self.expected as f64
        }
    }
}

/// `count` per second over `seconds` (0 when no time passed).
pub fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// One process of the organism during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellUsage {
    /// `role-N`: the slot, stable across replacements.
    pub name: String,
    pub role: String,
    pub pid: u32,
    /// 1 for the slot's first process; more when `cell up` replaced it (`HOMEOSTAT_CELL`
    /// lines; cells from the registry are each their own slot).
    pub generation: u32,
    /// Started after the seed POST, or gone before the frontier drained: replaced, divided or
    /// retired during the run.
    #[serde(default)]
    pub changed: bool,
    /// Peak resident memory (`VmHWM`), MiB; `None` if it could not be read.
    pub peak_rss_mb: Option<f64>,
    /// Peak of its own memory (`RssAnon`: heap and stacks, without the executable's code and
    /// the files it maps, which every cell of the machine shares), MiB, as sampled every time
    /// the bench reads `/stats` (a spike between two samples is missed; `VmHWM` is exact).
    #[serde(default)]
    pub peak_own_mb: Option<f64>,
    /// CPU used from the seed POST to the drained frontier, in percent of one core.
    pub cpu_percent: Option<f64>,
}

/// One run: one engine configuration at one latency of the web.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// [`EMBEDDED`], or the name of the `--infra` file.
    pub engine: String,
    /// Delay of the synthetic web before each answer.
    pub latency_ms: u64,
    /// Pages in the store's index.
    pub pages: usize,
    /// Pages the oracle expects.
    pub expected: usize,
    /// Expected pages indexed.
    pub found: usize,
    pub completeness_pct: f64,
    /// Indexed pages the oracle does not expect.
    pub extra: usize,
    /// From the seed POST to the drained frontier.
    pub seconds: f64,
    /// Indexed pages per second.
    pub pages_per_sec: f64,
    /// Requests the synthetic web answered (robots.txt, redirects and 404s included).
    pub served: usize,
    /// The frontier's counts at the end.
    pub crawled: u64,
    pub failed: u64,
    /// Every process of the organism, replaced ones included.
    pub cells: Vec<CellUsage>,
    /// CPU of the benchmark's own process (the synthetic web's server and the polling), in
    /// percent of one core.
    pub bench_cpu_percent: Option<f64>,
}

impl Row {
    pub fn completeness(&self) -> Completeness {
        Completeness {
            indexed: self.pages,
            expected: self.expected,
            found: self.found,
            extra: self.extra,
        }
    }
}

/// Throughput of the embedded default against another engine at the same latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub latency_ms: u64,
    pub engine: String,
    pub embedded_pages_per_sec: f64,
    pub pages_per_sec: f64,
    /// embedded pages/s ÷ this engine's pages/s (above 1: the embedded default is faster).
    pub ratio: f64,
}

/// Every (embedded, other) pair of rows at the same latency.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for base in rows.iter().filter(|r| r.engine == EMBEDDED) {
        for other in rows
            .iter()
            .filter(|r| r.engine != EMBEDDED && r.latency_ms == base.latency_ms)
        {
            out.push(Ratio {
                latency_ms: base.latency_ms,
                engine: other.engine.clone(),
                embedded_pages_per_sec: base.pages_per_sec,
                pages_per_sec: other.pages_per_sec,
                ratio: if other.pages_per_sec > 0.0 {
                    base.pages_per_sec / other.pages_per_sec
                } else {
                    f64::INFINITY
                },
            });
        }
    }
    out
}

pub fn render_ratios(ratios: &[Ratio]) -> String {
    let mut out = String::new();
    for r in ratios {
        let _ = writeln!(
            out,
            "latency {} ms: {EMBEDDED} {:.0} pages/s ÷ {} {:.0} pages/s = {:.2}x",
            r.latency_ms, r.embedded_pages_per_sec, r.engine, r.pages_per_sec, r.ratio
        );
    }
    out
}

const COLUMNS: usize = 18;

const HEADER: [&str; COLUMNS] = [
    "engine",
    "latency ms",
    "indexed",
    "expected",
    "complete %",
    "extra",
    "seconds",
    "pages/s",
    "served",
    "api MB",
    "crawler MB",
    "other MB",
    "api own MB",
    "crawler own MB",
    "cpu% api",
    "cpu% crawlers",
    "cpu% other",
    "cpu% bench",
];

/// The rows as an aligned text table (the engine left-aligned, figures right-aligned). The api
/// and crawler cells are listed one by one, `/`-separated; a cell that changed during the run
/// (replaced, divided, retired) is marked `*`, and a slot that had several processes shows its
/// biggest. The other cells (factory, health checkers, front doors) are summed.
pub fn render_table(rows: &[Row]) -> String {
    let mut lines: Vec<[String; COLUMNS]> = vec![HEADER.map(str::to_string)];
    let mut replaced = false;
    for row in rows {
        let api = by_slot(&row.cells, "api");
        let crawler = by_slot(&row.cells, "crawler");
        let others: Vec<&CellUsage> = row
            .cells
            .iter()
            .filter(|c| c.role != "api" && c.role != "crawler")
            .collect();
        let other_mb = sum(others.iter().map(|c| c.peak_rss_mb));
        let other_cpu = sum(others.iter().map(|c| c.cpu_percent));
        replaced |= api.replaced || crawler.replaced;
        lines.push([
            row.engine.clone(),
            row.latency_ms.to_string(),
            row.pages.to_string(),
            row.expected.to_string(),
            format!("{:.1}", row.completeness_pct),
            row.extra.to_string(),
            format!("{:.2}", row.seconds),
            format!("{:.0}", row.pages_per_sec),
            row.served.to_string(),
            api.rss,
            crawler.rss,
            optional(other_mb, 0),
            api.own,
            crawler.own,
            api.cpu,
            crawler.cpu,
            optional(other_cpu, 0),
            optional(row.bench_cpu_percent, 0),
        ]);
    }
    let mut widths = [0usize; COLUMNS];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "{cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    if replaced {
        out.push_str("* started or ended during the run (replaced, divided or retired)\n");
    }
    out
}

/// One role's column texts: each slot's figure, `/`-separated in slot order.
struct Slots {
    /// Peak RSS, MiB, marked `*` where the slot was replaced.
    rss: String,
    /// Peak own memory, MiB.
    own: String,
    /// CPU%, summed over the slot's processes.
    cpu: String,
    /// Whether any slot was replaced.
    replaced: bool,
}

/// Peak RSS and own memory (MiB) and CPU% of each slot of `role`, `/`-separated in slot order,
/// and whether a slot was replaced.
fn by_slot(cells: &[CellUsage], role: &str) -> Slots {
    let mut names: Vec<&str> = cells
        .iter()
        .filter(|c| c.role == role)
        .map(|c| c.name.as_str())
        .collect();
    names.sort_by_key(|n| slot_order(n));
    names.dedup();
    let (mut rss, mut own, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut any_replaced = false;
    for name in names {
        let slot: Vec<&CellUsage> = cells.iter().filter(|c| c.name == name).collect();
        let replaced = slot.iter().any(|c| c.generation > 1 || c.changed) || slot.len() > 1;
        any_replaced |= replaced;
        let mark = if replaced { "*" } else { "" };
        let peak = most(slot.iter().map(|c| c.peak_rss_mb));
        let own_peak = most(slot.iter().map(|c| c.peak_own_mb));
        let used = sum(slot.iter().map(|c| c.cpu_percent));
        rss.push(format!("{}{mark}", optional(peak, 0)));
        own.push(optional(own_peak, 0));
        cpu.push(optional(used, 0));
    }
    if rss.is_empty() {
        return Slots {
            rss: "-".into(),
            own: "-".into(),
            cpu: "-".into(),
            replaced: false,
        };
    }
    Slots {
        rss: rss.join("/"),
        own: own.join("/"),
        cpu: cpu.join("/"),
        replaced: any_replaced,
    }
}

/// The largest of the values present; `None` if there are none.
fn most(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values
        .flatten()
        .fold(None, |m, v| Some(m.map_or(v, |m: f64| m.max(v))))
}

/// The sum of the values present; `None` if there are none.
fn sum(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values
        .flatten()
        .fold(None, |s, v| Some(s.unwrap_or(0.0) + v))
}

/// `crawler-10` after `crawler-9`.
fn slot_order(name: &str) -> (String, u64) {
    match name.rsplit_once('-') {
        Some((role, n)) => (role.to_string(), n.parse().unwrap_or(u64::MAX)),
        None => (name.to_string(), 0),
    }
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}
