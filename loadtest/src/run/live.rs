//! The live view of a run: on a terminal, an indicatif bar (elapsed and remaining) with the
//! figures of the last second under it; otherwise one plain line a second.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::open_model::{LoadSecond, Totals};
use super::organism_view::OrganismSample;
use super::profile::Profile;
use super::timeline::Timeline;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A live view redrawn in place.
    Terminal,
    /// A plain line a second.
    Lines,
    /// Nothing (tests).
    Quiet,
}

impl Mode {
    /// The live view when stdout is a terminal, plain lines when it is not.
    pub fn detect() -> Mode {
        if std::io::stdout().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Lines
        }
    }
}

#[derive(Clone)]
pub struct View {
    mode: Mode,
    bar: Option<Arc<ProgressBar>>,
    total_secs: u64,
}

impl View {
    pub fn start(mode: Mode, profile: &Profile, duration: Duration) -> View {
        let total_secs = duration.as_secs_f64().ceil() as u64;
        let bar = (mode == Mode::Terminal).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total_secs), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template(
                "{prefix:.bold} {elapsed_precise} [{bar:40.cyan/blue}] {pos}/{len} s, {eta} left\n{msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(profile.name.clone());
            bar.set_message("starting");
            Arc::new(bar)
        });
        if mode == Mode::Lines {
            println!(
                "loadtest run: profile {} ({} s): {}",
                profile.name, total_secs, profile.description
            );
        }
        View {
            mode,
            bar,
            total_secs,
        }
    }

    /// Second `second` has ended; `closed` are the load's seconds closed now.
    pub fn tick(
        &self,
        second: u64,
        closed: &[LoadSecond],
        totals: &Totals,
        organism: &OrganismSample,
        events: usize,
    ) {
        if self.mode == Mode::Quiet {
            return;
        }
        let last = closed.last();
        let text = figures(last, totals, organism, events);
        match (&self.bar, self.mode) {
            (Some(bar), _) => {
                bar.set_position(second.min(self.total_secs));
                bar.set_message(text);
            }
            (None, Mode::Lines) => {
                println!("t={second:>4}s {}", text.replace('\n', " | "));
            }
            _ => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
            // The summary starts under the view, not on its last line.
            println!();
        }
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2}s", v / 1000.0),
        Some(v) => format!("{v:.1}ms"),
        None => "-".into(),
    }
}

/// The figures of the last closed second, in three lines.
fn figures(
    last: Option<&LoadSecond>,
    totals: &Totals,
    organism: &OrganismSample,
    events: usize,
) -> String {
    let load = match last {
        Some(s) => format!(
            "offered {}/s  achieved {}/s  latency p50 {} p99 {} max {}",
            s.offered,
            s.ok,
            ms(s.p50_ms),
            ms(s.p99_ms),
            ms(s.max_ms)
        ),
        None => "offered -  achieved -".into(),
    };
    let errors = if totals.errors.is_empty() {
        "errors 0".to_string()
    } else {
        format!(
            "errors {}",
            totals
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cells = if organism.registry {
        organism
            .roles
            .iter()
            .map(|(role, s)| format!("{role} {} ({:.2})", s.cells, s.pressure_mean))
            .collect::<Vec<_>>()
            .join("  ")
    } else {
        "registry: no answer".into()
    };
    let spend = match &organism.spend {
        Some(s) => format!(
            "spend {}/h of cap {}/h",
            engines::pool::show(s.committed_per_hour_micros),
            engines::pool::show(s.cap_per_hour_micros)
        ),
        None => "spend: no pool".into(),
    };
    format!(
        "{load}\n{errors}  (requests {}, ok {})\ncells (pressure): {cells}\n{spend}  events {events}",
        totals.offered, totals.ok
    )
}

/// The run's summary for people.
pub fn summary_text(t: &Timeline) -> String {
    let s = &t.summary;
    let tot = &s.totals;
    let errors: u64 = tot.errors.values().sum();
    let mut out = format!(
        "profile {}: {:.0} s, {} requests offered ({:.1}/s), {} sent, {} ok ({:.1}/s), {} failed",
        t.profile.name,
        t.duration_secs,
        tot.offered,
        s.offered_rate,
        tot.sent,
        tot.ok,
        s.achieved_rate,
        errors
    );
    for (k, v) in &tot.errors {
        out.push_str(&format!("\n  error {k}: {v}"));
    }
    let l = &s.latency_ms;
    let v = &s.service_ms;
    out.push_str(&format!(
        "\nlatency from the intended send: p50 {} p90 {} p99 {} p99.9 {} max {}",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max)
    ));
    out.push_str(&format!(
        "\nservice time (from the actual send): p50 {} p99 {} max {}",
        ms(v.p50),
        ms(v.p99),
        ms(v.max)
    ));
    if !s.peak_cells.is_empty() {
        out.push_str("\ncells per role (least-most): ");
        out.push_str(
            &s.peak_cells
                .iter()
                .map(|(r, p)| format!("{r} {}-{p}", s.least_cells.get(r).copied().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    if !s.events_by_kind.is_empty() {
        out.push_str("\nevents: ");
        out.push_str(
            &s.events_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    match (s.peak_spend_per_hour_micros, s.cap_per_hour_micros) {
        (Some(p), Some(c)) => out.push_str(&format!(
            "\nspend: peak {}/h of the cap {}/h",
            engines::pool::show(p),
            engines::pool::show(c)
        )),
        _ => out.push_str("\nspend: no pool (nothing spent)"),
    }
    out
}
