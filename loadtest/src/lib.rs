//! loadtest: the bundled harness of the organism. The synthetic web it crawls is the `synthweb`
//! crate.
//!
//! - [`bench`]: benchmarks of whole organisms (`loadtest bench crawl`).
//! - [`bench_search`]: search latency under open-model load (`loadtest bench search`).
//! - [`figures`]: how the benchmarks print their figures (and `--json`).
//! - [`heal`]: how fast the organism heals (`loadtest bench heal`).
//! - [`grow`]: how it finds its size: the simulation at 10,000 cells and a load step on a real
//!   organism (`loadtest bench grow`).
//! - [`organism`]: one `cell up` under either benchmark, started, followed and stopped.
//! - [`json_lines`]: the `--json` output of both.
//! - [`run`]: `loadtest run`: open-model client load following a profile, chaos, a live view,
//!   and a timeline recorded per second.
//! - [`report`]: `loadtest report`: a run's timeline drawn (PNG, SVG, HTML).

pub mod bench;
pub mod bench_search;
pub mod figures;
pub mod grow;
pub mod heal;
pub mod json_lines;
pub mod organism;
pub mod report;
pub mod run;
