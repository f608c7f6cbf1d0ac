//! loadtest: the bundled harness of the organism. The synthetic web it crawls is the `synthweb`
//! crate.
//!
//! - [`bench`]: benchmarks of whole organisms (`loadtest bench crawl`).
//! - [`heal`]: how fast the organism heals (`loadtest bench heal`).
//! - [`organism`]: one `cell up` under either benchmark, started, followed and stopped.
//! - [`json_lines`]: the `--json` output of both.

pub mod bench;
pub mod heal;
pub mod json_lines;
pub mod organism;
