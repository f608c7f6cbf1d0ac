//! How every benchmark reports: a block of named figures with their units and the conditions
//! they were measured under, printed for people as an aligned block, or (`--json`) as one JSON
//! line `{"kind": "figures", ...}` that tools and BENCHMARKS.md updates read.

use serde::{Deserialize, Serialize};

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    /// None: not measured (printed as `-`).
    pub value: Option<f64>,
    pub unit: String,
}

/// A benchmark's figures for one condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// `crawl`, `search`, `heal`, `grow`.
    pub bench: String,
    /// What this block measured, e.g. `rate 100/s`.
    pub case: String,
    /// Conditions, as `key = value` pairs.
    pub conditions: Vec<(String, String)>,
    pub figures: Vec<Figure>,
}

impl Figures {
    pub fn new(bench: &str, case: impl Into<String>) -> Figures {
        Figures {
            bench: bench.into(),
            case: case.into(),
            conditions: Vec::new(),
            figures: Vec::new(),
        }
    }

    pub fn condition(mut self, key: &str, value: impl ToString) -> Figures {
        self.conditions.push((key.into(), value.to_string()));
        self
    }

    pub fn add(&mut self, name: &str, value: Option<f64>, unit: &str) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit: unit.into(),
        });
    }

    /// The block for people.
    pub fn render(&self) -> String {
        let mut out = format!("bench {}: {}", self.bench, self.case);
        if !self.conditions.is_empty() {
            let c: Vec<String> = self
                .conditions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            out.push_str(&format!(" ({})", c.join(", ")));
        }
        out.push('\n');
        let width = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
        for f in &self.figures {
            let value = match f.value {
                None => "-".to_string(),
                Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
                Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
                Some(v) => format!("{v:.3}"),
            };
            let line = format!("  {:<width$}  {value:>12} {}", f.name, f.unit);
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Print as `--json` asks: one JSON line, or the block for people.
    pub fn print(&self, json: bool) {
        if json {
            #[derive(Serialize)]
            struct Line<'a> {
                kind: &'static str,
                #[serde(flatten)]
                figures: &'a Figures,
            }
            crate::json_lines::print(
                &self.bench,
                &Line {
                    kind: "figures",
                    figures: self,
                },
            );
        } else {
            print!("{}", self.render());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_aligned_and_round_trip_as_json() {
        let mut f = Figures::new("search", "rate 100/s").condition("secs", 10);
        f.add("achieved", Some(99.5), "req/s");
        f.add("p99", Some(12.25), "ms");
        f.add("requests", Some(1000.0), "");
        f.add("not measured", None, "ms");
        let text = f.render();
        assert!(
            text.starts_with("bench search: rate 100/s (secs 10)\n"),
            "{text}"
        );
        assert!(
            text.contains("  achieved            99.500 req/s"),
            "{text}"
        );
        assert!(text.contains("  requests              1000"), "{text}");
        assert!(text.contains("  not measured             - ms"), "{text}");
        let json = serde_json::to_string(&f).expect("json");
        assert_eq!(serde_json::from_str::<Figures>(&json).expect("back"), f);
    }
}
