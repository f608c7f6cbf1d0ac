//! `loadtest report DIR`: a run's timeline drawn as the picture of the organism growing and
//! shrinking: load, latency and cells per role on one time axis with the life events marked
//! (`timeline.png` and `timeline.svg`, drawn by plotters), and one self-contained HTML report
//! (`report.html`: the SVG inline, the summary, the events, every second).
//!
//! Text is drawn with an embedded TTF (DejaVu Sans Mono, `assets/`) through plotters'
//! `ab_glyph` feature, so the plots need no system fonts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Context as _};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::run::organism_view::LifeEvent;
use crate::run::timeline::{SecondRow, Timeline};

pub const PNG: &str = "timeline.png";
pub const SVG: &str = "timeline.svg";
pub const HTML: &str = "report.html";

/// The font every plot's text is drawn with.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the embedded font is not a valid TTF"));
    });
    result
}

/// The files a report is made of.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub png: PathBuf,
    pub svg: PathBuf,
    pub html: PathBuf,
}

/// `loadtest report DIR`.
pub fn report_command(dir: &Path) -> anyhow::Result<()> {
    let timeline = Timeline::read(dir)?;
    let files = render(&timeline, dir)?;
    println!("{}", crate::run::live::summary_text(&timeline));
    println!(
        "plots: {} {}\nreport: {}",
        files.png.display(),
        files.svg.display(),
        files.html.display()
    );
    Ok(())
}

/// Draw `timeline` into `dir`.
pub fn render(timeline: &Timeline, dir: &Path) -> anyhow::Result<Rendered> {
    register_font()?;
    let files = Rendered {
        png: dir.join(PNG),
        svg: dir.join(SVG),
        html: dir.join(HTML),
    };
    const SIZE: (u32, u32) = (1400, 1000);
    {
        let root = BitMapBackend::new(&files.png, SIZE).into_drawing_area();
        draw(&root, timeline).map_err(|e| anyhow!("drawing {}: {e}", files.png.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", files.png.display()))?;
    }
    {
        let root = SVGBackend::new(&files.svg, SIZE).into_drawing_area();
        draw(&root, timeline).map_err(|e| anyhow!("drawing {}: {e}", files.svg.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", files.svg.display()))?;
    }
    let svg = std::fs::read_to_string(&files.svg)
        .with_context(|| format!("reading {}", files.svg.display()))?;
    std::fs::write(&files.html, html(timeline, &svg))
        .with_context(|| format!("writing {}", files.html.display()))?;
    Ok(files)
}

/// A line of a panel: its name, colour, and value in a second.
type Series<T> = (&'static str, RGBColor, fn(&SecondRow) -> T);

const ROLE_COLORS: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The colour of an event's mark.
fn event_color(kind: &str) -> RGBColor {
    match kind {
        "born" | "serving" => RGBColor(44, 160, 44),
        "dead" => RGBColor(214, 39, 40),
        "divided" => RGBColor(31, 119, 180),
        "retiring" | "retired" | "draining" => RGBColor(127, 127, 127),
        "throttled" => RGBColor(255, 127, 14),
        "replaced" => RGBColor(188, 189, 34),
        k if k.starts_with("chaos") => RGBColor(0, 0, 0),
        _ => RGBColor(23, 190, 207),
    }
}

/// The events worth a mark on the plot (a cell's birth is marked once, not also `serving`).
fn marked(events: &[LifeEvent]) -> Vec<&LifeEvent> {
    events
        .iter()
        .filter(|e| !matches!(e.kind.as_str(), "serving" | "draining" | "replaced"))
        .collect()
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    t: &Timeline,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (title, rest) = root.split_vertically(40);
    title.draw(&Text::new(
        format!(
            "{}: {}  ({} requests, {} ok, {} failed)",
            t.profile.name,
            t.profile.description,
            t.summary.totals.offered,
            t.summary.totals.ok,
            t.summary.totals.errors.values().sum::<u64>()
        ),
        (10, 12),
        ("sans-serif", 18).into_font(),
    ))?;
    let panels = rest.split_evenly((3, 1));
    let x_max = (t.seconds.len() as f64).max(t.duration_secs).max(1.0);
    let marks = marked(&t.events);
    let secs = |r: &SecondRow| r.t as f64 + 0.5;

    // Load.
    let y_max = t
        .seconds
        .iter()
        .map(|r| {
            (r.load.offered.max(r.load.ok).max(r.load.error_count()) as f64).max(r.profile_rate)
        })
        .fold(1.0, f64::max)
        * 1.15;
    let mut load = ChartBuilder::on(&panels[0])
        .caption("load (requests/s)", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    load.configure_mesh()
        .x_desc("seconds")
        .light_line_style(WHITE)
        .draw()?;
    draw_marks(&mut load, &marks, 0.0, y_max)?;
    let series: [Series<f64>; 4] = [
        ("profile", RGBColor(180, 180, 180), |r| r.profile_rate),
        ("offered", RGBColor(31, 119, 180), |r| r.load.offered as f64),
        ("achieved", RGBColor(44, 160, 44), |r| r.load.ok as f64),
        ("errors", RGBColor(214, 39, 40), |r| {
            r.load.error_count() as f64
        }),
    ];
    for (name, color, value) in series {
        load.draw_series(LineSeries::new(
            t.seconds.iter().map(|r| (secs(r), value(r))),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    load.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    // Latency, on a log scale.
    let values: Vec<f64> = t
        .seconds
        .iter()
        .flat_map(|r| [r.load.p50_ms, r.load.p99_ms, r.load.max_ms])
        .flatten()
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if values.is_empty() {
        (0.1, 10.0)
    } else {
        ((lo / 2.0).max(0.01), (hi * 2.0).max(lo * 10.0))
    };
    let mut lat = ChartBuilder::on(&panels[1])
        .caption(
            "latency from the intended send (ms, log scale)",
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, (lo..hi).log_scale())?;
    lat.configure_mesh()
        .x_desc("seconds")
        .light_line_style(WHITE)
        .draw()?;
    draw_marks(&mut lat, &marks, lo, hi)?;
    let series: [Series<Option<f64>>; 3] = [
        ("p50", RGBColor(44, 160, 44), |r| r.load.p50_ms),
        ("p99", RGBColor(255, 127, 14), |r| r.load.p99_ms),
        ("max", RGBColor(214, 39, 40), |r| r.load.max_ms),
    ];
    for (name, color, value) in series {
        // A second without answers breaks the line.
        for run in runs(&t.seconds, value) {
            lat.draw_series(LineSeries::new(run, color.stroke_width(2)))?;
        }
        lat.draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    lat.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    // Cells per role.
    let roles: Vec<String> = t
        .roles()
        .into_iter()
        .filter(|role| {
            t.seconds
                .iter()
                .filter_map(|r| r.organism.as_ref())
                .any(|o| o.roles.contains_key(role))
        })
        .collect();
    let c_max = t
        .seconds
        .iter()
        .filter_map(|r| r.organism.as_ref())
        .flat_map(|o| o.roles.values().map(|s| s.cells))
        .max()
        .unwrap_or(1) as f64
        + 1.0;
    let mut cells = ChartBuilder::on(&panels[2])
        .caption(
            "cells per role (marks: born green, dead red, divided blue, retired grey, chaos black)",
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..c_max)?;
    cells
        .configure_mesh()
        .x_desc("seconds")
        .light_line_style(WHITE)
        .draw()?;
    draw_marks(&mut cells, &marks, 0.0, c_max)?;
    for (i, role) in roles.iter().enumerate() {
        let color = ROLE_COLORS[i % ROLE_COLORS.len()];
        let points: Vec<(f64, f64)> = t
            .seconds
            .iter()
            .filter_map(|r| {
                let o = r.organism.as_ref().filter(|o| o.registry)?;
                Some((
                    secs(r),
                    o.roles.get(role).map_or(0.0, |s| f64::from(s.cells)),
                ))
            })
            .collect();
        cells
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(role.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    cells
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// The stretches of consecutive seconds where `value` has a figure.
fn runs(rows: &[SecondRow], value: fn(&SecondRow) -> Option<f64>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for r in rows {
        match value(r).filter(|v| *v > 0.0) {
            Some(v) => current.push((r.t as f64 + 0.5, v)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn draw_marks<DB: DrawingBackend, Y: plotters::coord::ranged1d::Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    marks: &[&LifeEvent],
    lo: f64,
    hi: f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart.draw_series(marks.iter().map(|e| {
        let x = e.t_ms as f64 / 1000.0;
        PathElement::new(vec![(x, lo), (x, hi)], event_color(&e.kind).mix(0.45))
    }))?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The self-contained HTML report. Each summary figure carries `data-figure` so tools (and
/// the tests) read it back.
fn html(t: &Timeline, svg: &str) -> String {
    let s = &t.summary;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>loadtest: {name}</title>\n<style>\n\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\n\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}\n\
         th{{background:#f4f4f4}}td.l,th.l{{text-align:left}}svg{{max-width:100%;height:auto}}\n\
         </style></head><body>\n<h1>Profile {name}</h1>\n<p>{desc}</p>\n\
         <p>Targets {targets}; started {start}; {dur:.0} s.</p>\n",
        name = esc(&t.profile.name),
        desc = esc(&t.profile.description),
        targets = esc(&t.targets.join(" ")),
        start = httpdate::fmt_http_date(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_millis(t.started_at_ms.max(0) as u64)
        ),
        dur = t.duration_secs,
    );
    h.push_str("<h2>Summary</h2>\n<table>\n");
    let mut row = |name: &str, key: &str, value: String| {
        let _ = writeln!(
            h,
            "<tr><th class=\"l\">{}</th><td data-figure=\"{key}\">{}</td></tr>",
            esc(name),
            esc(&value)
        );
    };
    let tot = &s.totals;
    row("requests offered", "offered", tot.offered.to_string());
    row("requests sent", "sent", tot.sent.to_string());
    row("successful answers", "ok", tot.ok.to_string());
    row(
        "failed",
        "errors",
        tot.errors.values().sum::<u64>().to_string(),
    );
    for (k, v) in &tot.errors {
        row(
            &format!("failed: {k}"),
            &format!("error_{k}"),
            v.to_string(),
        );
    }
    row(
        "offered rate (/s)",
        "offered_rate",
        format!("{:.2}", s.offered_rate),
    );
    row(
        "achieved rate (/s)",
        "achieved_rate",
        format!("{:.2}", s.achieved_rate),
    );
    let l = &s.latency_ms;
    row(
        "latency p50 (ms, from intended send)",
        "latency_p50",
        ms(l.p50),
    );
    row("latency p90 (ms)", "latency_p90", ms(l.p90));
    row("latency p99 (ms)", "latency_p99", ms(l.p99));
    row("latency p99.9 (ms)", "latency_p999", ms(l.p999));
    row("latency max (ms)", "latency_max", ms(l.max));
    let v = &s.service_ms;
    row(
        "service time p50 (ms, from actual send)",
        "service_p50",
        ms(v.p50),
    );
    row("service time p99 (ms)", "service_p99", ms(v.p99));
    row("service time max (ms)", "service_max", ms(v.max));
    for (role, peak) in &s.peak_cells {
        row(
            &format!("{role} cells (least-most)"),
            &format!("cells_{role}"),
            format!("{}-{peak}", s.least_cells.get(role).copied().unwrap_or(0)),
        );
    }
    for (kind, n) in &s.events_by_kind {
        row(
            &format!("events: {kind}"),
            &format!("events_{kind}"),
            n.to_string(),
        );
    }
    match (s.peak_spend_per_hour_micros, s.cap_per_hour_micros) {
        (Some(p), Some(c)) => row(
            "spend per hour (peak / cap)",
            "spend",
            format!("{} / {}", engines::pool::show(p), engines::pool::show(c)),
        ),
        _ => row("spend", "spend", "no pool: nothing spent".into()),
    }
    h.push_str("</table>\n<h2>Timeline</h2>\n");
    // The SVG without its XML declaration, inline.
    let body = svg.find("<svg").map_or(svg, |i| &svg[i..]);
    h.push_str(body);
    h.push_str("\n<h2>Events</h2>\n<table>\n<tr><th>t (s)</th><th class=\"l\">kind</th><th class=\"l\">role</th><th class=\"l\">cell</th><th class=\"l\">parent</th><th class=\"l\">reason</th></tr>\n");
    for e in &t.events {
        let _ = writeln!(
            h,
            "<tr><td>{:.3}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
            e.t_ms as f64 / 1000.0,
            esc(&e.kind),
            esc(&e.role),
            esc(&e.cell_id),
            esc(e.parent.as_deref().unwrap_or("")),
            esc(&e.reason)
        );
    }
    h.push_str("</table>\n<details><summary>Every second</summary>\n<table>\n");
    let csv = t.csv();
    for (i, line) in csv.lines().enumerate() {
        let cell = if i == 0 { "th" } else { "td" };
        h.push_str("<tr>");
        for f in line.split(',') {
            let _ = write!(h, "<{cell}>{}</{cell}>", esc(f));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n</details>\n</body></html>\n");
    h
}

/// The figure `key` of a report (its `data-figure` cell), as text.
pub fn figure(html: &str, key: &str) -> Option<String> {
    let needle = format!("data-figure=\"{key}\">");
    let start = html.find(&needle)? + needle.len();
    let end = html[start..].find('<')? + start;
    Some(html[start..end].replace("&amp;", "&"))
}
