//! loadtest: the bundled harness of the organism.
//!
//! - [`web`]: the deterministic synthetic web, its HTTP server and its oracle.
//! - [`bench`]: benchmarks of whole organisms (`loadtest bench crawl`).
//! - [`heal`]: how fast the organism heals (`loadtest bench heal`).

pub mod bench;
pub mod heal;
pub mod web;
