//! loadtest: the bundled harness of the organism. The synthetic web it crawls is the `synthweb`
//! crate.
//!
//! - [`bench`]: benchmarks of whole organisms (`loadtest bench crawl`).
//! - [`heal`]: how fast the organism heals (`loadtest bench heal`).
//! - [`grow`]: how it finds its size: the simulation at 10,000 cells and a load step on a real
//!   organism (`loadtest bench grow`).
//! - [`organism`]: one `cell up` under either benchmark, started, followed and stopped.
//! - [`json_lines`]: the `--json` output of both.

pub mod bench;
pub mod grow;
pub mod heal;
pub mod json_lines;
pub mod organism;
