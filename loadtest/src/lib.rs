//! loadtest: the bundled harness of the organism.
//!
//! - [`web`]: the deterministic synthetic web, its HTTP server and its oracle.

pub mod web;
