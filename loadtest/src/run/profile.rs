//! A load profile: the arrival rate of client searches over time, as phases (holds, ramps,
//! square waves, sine waves), with optional crawl seeding and chaos. Profiles are TOML files
//! (`infra/profiles/*.toml`), read in two layers: serde structs that refuse unknown keys, then
//! [`Profile::validate`], which names every bad phase and key before the run starts.
//!
//! The rate is a function of time ([`Profile::rate_at`]); [`Schedule`] turns it into the
//! intended send time of every request (the n-th request is due when the integral of the rate
//! reaches n), whatever the target answers: the open model.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The highest rate a profile may ask for, requests per second (a typo guard, not a limit of
/// the harness).
pub const MAX_RATE: f64 = 100_000.0;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// What the searches ask.
    #[serde(default)]
    pub search: SearchSpec,
    /// Seed a crawl during the run.
    #[serde(default)]
    pub crawl: Option<CrawlSpec>,
    /// Break cells during the run.
    #[serde(default)]
    pub chaos: Option<ChaosSpec>,
    /// The arrival rate, phase after phase.
    #[serde(rename = "phase")]
    pub phases: Vec<Phase>,
}

/// Searches: words drawn from the synthetic web's vocabulary (the web `cell up --demo`
/// serves unless told otherwise), as often as they occur on its pages.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSpec {
    /// `limit` of each search.
    pub limit: u32,
    /// Seed of the word choice: the same seed asks the same questions in the same order.
    pub seed: u64,
    /// Words in a query.
    pub words: usize,
    /// Which words: `common` (drawn as often as pages carry them) or `rare` (drawn evenly
    /// among the words on at most 1% of the indexed pages).
    pub terms: Terms,
    /// Result pages asked: each search asks one of pages 1 to `pages_deep` evenly (`offset`
    /// = (page - 1) x `limit`); 1 asks only the first.
    pub pages_deep: u32,
    /// The synthetic web whose words are asked (default: `[demo]` of the embedded organism).
    pub web_seed: u64,
    pub web_pages: usize,
    pub web_hosts: usize,
}

impl Default for SearchSpec {
    fn default() -> Self {
        let demo = infra::Demo::default();
        Self {
            limit: 10,
            seed: 1,
            words: 1,
            terms: Terms::Common,
            pages_deep: 1,
            web_seed: demo.seed,
            web_pages: demo.pages,
            web_hosts: demo.hosts,
        }
    }
}

/// Which words the searches ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Terms {
    /// As often as pages carry them: a few words on most pages are asked most.
    Common,
    /// Evenly among the words on at most 1% of the indexed pages.
    Rare,
}

impl std::fmt::Display for Terms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Terms::Common => "common",
            Terms::Rare => "rare",
        })
    }
}

/// A `POST /crawl` during the run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrawlSpec {
    /// When, seconds after the start.
    #[serde(default)]
    pub at_secs: f64,
    /// URLs to seed; empty: the search web's own seeds.
    #[serde(default)]
    pub seeds: Vec<String>,
    #[serde(default)]
    pub max_depth: Option<u32>,
    #[serde(default)]
    pub max_pages: Option<u64>,
}

/// What chaos does to a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChaosAction {
    /// SIGKILL.
    Kill,
    /// SIGSTOP, then SIGCONT after `for_secs`.
    Freeze,
    /// A SIGSTOP/SIGCONT duty cycle for `for_secs`: stopped `slow_stop_ms` of every
    /// `slow_period_ms`.
    Slow,
}

impl ChaosAction {
    pub fn name(self) -> &'static str {
        match self {
            ChaosAction::Kill => "kill",
            ChaosAction::Freeze => "freeze",
            ChaosAction::Slow => "slow",
        }
    }
}

/// Every `every_secs` (from `start_secs`), act on a random live cell of one of `roles` (taken
/// in turn). Only cells of this machine (a loopback address and a `cell` process) are touched.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosSpec {
    pub action: ChaosAction,
    pub roles: Vec<String>,
    pub every_secs: f64,
    /// The first action, seconds after the start [default: every_secs].
    #[serde(default)]
    pub start_secs: Option<f64>,
    /// No action after this, seconds after the start [default: the profile's end].
    #[serde(default)]
    pub stop_secs: Option<f64>,
    /// How long a freeze or a slowdown lasts.
    #[serde(default = "default_for_secs")]
    pub for_secs: f64,
    #[serde(default = "default_slow_stop_ms")]
    pub slow_stop_ms: u64,
    #[serde(default = "default_slow_period_ms")]
    pub slow_period_ms: u64,
    /// Seed of the victim choice.
    #[serde(default)]
    pub seed: u64,
}

fn default_for_secs() -> f64 {
    3.0
}
fn default_slow_stop_ms() -> u64 {
    50
}
fn default_slow_period_ms() -> u64 {
    100
}

/// One phase of the arrival rate, requests per second.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Phase {
    /// A constant rate (a step is a hold at a new rate; a spike a short hold between two).
    Hold { rate: f64, secs: f64 },
    /// From `from` (default: where the previous phase ended, or 0) to `to`, linearly.
    Ramp {
        #[serde(default)]
        from: Option<f64>,
        to: f64,
        secs: f64,
    },
    /// `high` for the first half of each period, `low` for the second.
    Square {
        low: f64,
        high: f64,
        period_secs: f64,
        secs: f64,
    },
    /// A day in `period_secs`: from `low` (night) up to `high` (midday) and back.
    Sine {
        low: f64,
        high: f64,
        period_secs: f64,
        secs: f64,
    },
}

impl Phase {
    pub fn secs(&self) -> f64 {
        match self {
            Phase::Hold { secs, .. }
            | Phase::Ramp { secs, .. }
            | Phase::Square { secs, .. }
            | Phase::Sine { secs, .. } => *secs,
        }
    }

    /// The rate `t` seconds into this phase; `before` is where the previous phase ended.
    fn rate(&self, t: f64, before: f64) -> f64 {
        match *self {
            Phase::Hold { rate, .. } => rate,
            Phase::Ramp { from, to, secs } => {
                let from = from.unwrap_or(before);
                from + (to - from) * (t / secs).clamp(0.0, 1.0)
            }
            Phase::Square {
                low,
                high,
                period_secs,
                ..
            } => {
                if (t % period_secs) < period_secs / 2.0 {
                    high
                } else {
                    low
                }
            }
            Phase::Sine {
                low,
                high,
                period_secs,
                ..
            } => {
                let x = (t / period_secs) * std::f64::consts::TAU;
                low + (high - low) * (1.0 - x.cos()) / 2.0
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Phase::Hold { .. } => "hold",
            Phase::Ramp { .. } => "ramp",
            Phase::Square { .. } => "square",
            Phase::Sine { .. } => "sine",
        }
    }
}

impl Profile {
    /// Read and validate a profile file.
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the profile {}", path.display()))?;
        Profile::parse(&text, &path.display().to_string())
    }

    /// Parse and validate; `source` names the file in messages.
    pub fn parse(text: &str, source: &str) -> anyhow::Result<Profile> {
        let profile: Profile = toml::from_str(text).with_context(|| format!("profile {source}"))?;
        let problems = profile.validate();
        if !problems.is_empty() {
            anyhow::bail!("profile {source}:\n  {}", problems.join("\n  "));
        }
        Ok(profile)
    }

    /// Every problem, each naming its phase or section and key.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let rate_ok = |r: f64| r.is_finite() && (0.0..=MAX_RATE).contains(&r);
        let secs_ok = |s: f64| s.is_finite() && s > 0.0;
        if self.phases.is_empty() {
            problems.push("no [[phase]]: a profile needs at least one".to_string());
        }
        for (i, p) in self.phases.iter().enumerate() {
            let at = format!("phase {} ({})", i + 1, p.name());
            if !secs_ok(p.secs()) {
                problems.push(format!("{at}: secs must be a positive number"));
            }
            let rates: Vec<(&str, f64)> = match *p {
                Phase::Hold { rate, .. } => vec![("rate", rate)],
                Phase::Ramp { from, to, .. } => {
                    let mut v = vec![("to", to)];
                    if let Some(f) = from {
                        v.push(("from", f));
                    }
                    v
                }
                Phase::Square {
                    low,
                    high,
                    period_secs,
                    ..
                }
                | Phase::Sine {
                    low,
                    high,
                    period_secs,
                    ..
                } => {
                    if !secs_ok(period_secs) {
                        problems.push(format!("{at}: period_secs must be a positive number"));
                    }
                    vec![("low", low), ("high", high)]
                }
            };
            for (key, r) in rates {
                if !rate_ok(r) {
                    problems.push(format!(
                        "{at}: {key} = {r} is not a rate from 0 to {MAX_RATE} requests/s"
                    ));
                }
            }
        }
        if self.search.limit == 0 || self.search.limit > 100 {
            problems.push("[search] limit must be from 1 to 100".into());
        }
        if self.search.words == 0 || self.search.words > 8 {
            problems.push("[search] words must be from 1 to 8".into());
        }
        if self.search.pages_deep == 0
            || u64::from(self.search.pages_deep - 1) * u64::from(self.search.limit) > 10_000
        {
            problems.push(
                "[search] pages_deep must be at least 1, and (pages_deep - 1) x limit at most 10000 (the api's largest offset)"
                    .into(),
            );
        }
        if self.search.web_hosts == 0 || self.search.web_pages < self.search.web_hosts {
            problems.push(
                "[search] web_pages must be at least web_hosts, and web_hosts at least 1".into(),
            );
        }
        if let Some(c) = &self.crawl {
            if !(c.at_secs.is_finite() && c.at_secs >= 0.0) {
                problems.push("[crawl] at_secs must be 0 or more".into());
            }
        }
        if let Some(c) = &self.chaos {
            if c.roles.is_empty() {
                problems.push("[chaos] roles: name at least one role".into());
            }
            for role in &c.roles {
                if !crate::run::ROLES.contains(&role.as_str()) {
                    problems.push(format!(
                        "[chaos] roles: {role:?} is not a role (roles: {})",
                        crate::run::ROLES.join(", ")
                    ));
                }
            }
            if !secs_ok(c.every_secs) {
                problems.push("[chaos] every_secs must be a positive number".into());
            }
            if !secs_ok(c.for_secs) {
                problems.push("[chaos] for_secs must be a positive number".into());
            }
            if c.slow_period_ms == 0 || c.slow_stop_ms >= c.slow_period_ms {
                problems.push("[chaos] slow_stop_ms must be less than slow_period_ms".into());
            }
        }
        problems
    }

    /// The whole profile's length.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.phases.iter().map(Phase::secs).sum::<f64>())
    }

    /// The arrival rate `t` seconds after the start (0 after the end).
    pub fn rate_at(&self, t: f64) -> f64 {
        let mut start = 0.0;
        let mut before = 0.0;
        for p in &self.phases {
            let end = start + p.secs();
            if t < end {
                return p.rate(t - start, before);
            }
            before = p.rate(p.secs(), before);
            start = end;
        }
        0.0
    }

    /// Every rate multiplied by `factor` (`loadtest run --rate-scale`).
    pub fn scale_rates(&mut self, factor: f64) {
        for p in &mut self.phases {
            match p {
                Phase::Hold { rate, .. } => *rate *= factor,
                Phase::Ramp { from, to, .. } => {
                    *to *= factor;
                    if let Some(f) = from {
                        *f *= factor;
                    }
                }
                Phase::Square { low, high, .. } | Phase::Sine { low, high, .. } => {
                    *low *= factor;
                    *high *= factor;
                }
            }
        }
    }
}

/// The intended send times of a profile's requests, in order, as offsets from the start: the
/// n-th (from 0) where the integral of the rate reaches n + ½.
pub struct Schedule<'a> {
    profile: &'a Profile,
    /// Seconds: the next request is due when `owed` reaches 1.
    t: f64,
    end: f64,
    owed: f64,
}

/// How far the schedule steps through time; the rate is integrated over these steps.
const STEP: f64 = 0.001;

impl<'a> Schedule<'a> {
    pub fn new(profile: &'a Profile) -> Self {
        Schedule {
            profile,
            t: 0.0,
            end: profile.duration().as_secs_f64(),
            // Each request at the middle of its share of the rate's integral: a hold of r/s
            // for T s sends exactly r·T requests inside it, none on its edges.
            owed: 0.5,
        }
    }
}

impl Iterator for Schedule<'_> {
    type Item = Duration;

    /// The next intended send time: where the integral of the rate since the previous one
    /// reaches 1 (found step by step, and within a step by its rate).
    fn next(&mut self) -> Option<Duration> {
        while self.t < self.end {
            if self.owed >= 1.0 {
                self.owed -= 1.0;
                return Some(Duration::from_secs_f64(self.t));
            }
            let rate = self.profile.rate_at(self.t);
            let step = STEP.min(self.end - self.t);
            let need = 1.0 - self.owed;
            if rate * step >= need && rate > 0.0 {
                // Due within this step.
                self.t += need / rate;
                self.owed = 1.0;
            } else {
                self.owed += rate * step;
                self.t += step;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(phases: &str) -> Profile {
        Profile::parse(&format!("name = \"t\"\n{phases}"), "test").expect("valid profile")
    }

    #[test]
    fn rates_follow_the_phases() {
        let p = profile(
            "[[phase]]\nkind = \"hold\"\nrate = 10\nsecs = 2\n\
             [[phase]]\nkind = \"ramp\"\nto = 30\nsecs = 2\n\
             [[phase]]\nkind = \"square\"\nlow = 1\nhigh = 5\nperiod_secs = 2\nsecs = 4\n\
             [[phase]]\nkind = \"sine\"\nlow = 0\nhigh = 8\nperiod_secs = 4\nsecs = 4\n",
        );
        assert_eq!(p.duration(), Duration::from_secs(12));
        assert_eq!(p.rate_at(0.5), 10.0);
        // The ramp starts where the hold ended.
        assert!((p.rate_at(3.0) - 20.0).abs() < 1e-9);
        assert_eq!(p.rate_at(4.5), 5.0);
        assert_eq!(p.rate_at(5.5), 1.0);
        assert!((p.rate_at(8.0) - 0.0).abs() < 1e-9);
        assert!((p.rate_at(10.0) - 8.0).abs() < 1e-9);
        assert_eq!(p.rate_at(12.5), 0.0);
    }

    #[test]
    fn the_schedule_sends_the_integral_of_the_rate() {
        let p = profile(
            "[[phase]]\nkind = \"hold\"\nrate = 100\nsecs = 2\n\
             [[phase]]\nkind = \"hold\"\nrate = 0\nsecs = 1\n\
             [[phase]]\nkind = \"ramp\"\nfrom = 0\nto = 200\nsecs = 2\n",
        );
        let times: Vec<Duration> = Schedule::new(&p).collect();
        let in_range = |a: f64, b: f64| {
            times
                .iter()
                .filter(|t| (a..b).contains(&t.as_secs_f64()))
                .count()
        };
        assert_eq!(in_range(0.0, 1.0), 100);
        assert_eq!(in_range(1.0, 2.0), 100);
        assert_eq!(in_range(2.0, 3.0), 0);
        // The ramp's integral: 200 requests over its two seconds, a quarter in the first.
        let ramp = in_range(3.0, 5.0);
        assert!((199..=201).contains(&ramp), "{ramp}");
        let first = in_range(3.0, 4.0);
        assert!((49..=51).contains(&first), "{first}");
        // Evenly spaced in a hold: 10 ms apart.
        let gap = times[51].as_secs_f64() - times[50].as_secs_f64();
        assert!((gap - 0.01).abs() < 1e-6, "{gap}");
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn every_problem_is_named() {
        let err = Profile::parse(
            "name = \"bad\"\n[search]\nlimit = 0\npages_deep = 0\nterms = \"rare\"\n\
             [chaos]\naction = \"kill\"\nroles = [\"api\", \"painter\"]\nevery_secs = 0\n\
             [[phase]]\nkind = \"hold\"\nrate = -1\nsecs = 0\n\
             [[phase]]\nkind = \"sine\"\nlow = 1\nhigh = 1e9\nperiod_secs = 0\nsecs = 1\n",
            "bad.toml",
        )
        .expect_err("invalid");
        let msg = format!("{err:#}");
        for needle in [
            "bad.toml",
            "phase 1 (hold): secs",
            "phase 1 (hold): rate = -1",
            "phase 2 (sine): period_secs",
            "phase 2 (sine): high = 1000000000",
            "[search] limit",
            "[search] pages_deep",
            "\"painter\" is not a role",
            "[chaos] every_secs",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from {msg}");
        }
        let unknown = Profile::parse(
            "name = \"x\"\n[[phase]]\nkind = \"hold\"\nrate = 1\nsecs = 1\nrat = 2\n",
            "typo.toml",
        )
        .expect_err("unknown key");
        assert!(format!("{unknown:#}").contains("rat"), "{unknown:#}");
    }

    #[test]
    fn the_shipped_profiles_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/profiles");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("infra/profiles") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let p = Profile::load(&path).expect("a valid profile");
                assert!(p.duration() > Duration::ZERO);
                names.push(p.name);
            }
        }
        names.sort();
        assert_eq!(names, ["chaos", "diurnal", "spike", "square", "step"]);
    }
}
