//! The crawler role: fetches pages politely and safely, parses them, and reports
//! `protocol::Outcome`s.
//!
//! Entry point: [`run`] (the cell: [`role`]), the same shape as every role's.
//!
//! Code map:
//! - [`role`]: the crawler cell: worker, vitals, politeness by the host ledger, pressure.
//! - [`worker`]: the loop: lease, schedule fetches round-robin over hosts, batch results, ack.
//! - [`live_apis`]: the registry follower: which api cells are live.
//! - [`fence`]: the queue guarded by the cell's standing (no ack once fenced or in doubt).
//! - [`config`]: [`FetchConfig`], the fetch stack's settings and their validation.
//! - [`fetch`]: [`Fetcher::crawl`], URL in, [`CrawlAttempt`] out; the redirect loop.
//! - `robots`: robots.txt verdicts and their per-origin cache (RFC 9309).
//! - [`politeness`]: the per-host gate (rate, in-flight cap, Crawl-delay, Retry-After) in this
//!   process; [`ledger`]: the same gate kept by the organism's host ledger, through the api.
//! - `ssrf`: the address policy and the guarded DNS resolver.
//! - `body`: capped body streaming and content decoding (gzip, br, deflate).
//! - `charset`: bytes to text (BOM, Content-Type, `<meta>`).
//! - `parse`: HTML to title, text, links and robots directives.

mod body;
mod charset;
pub mod config;
pub mod fence;
pub mod fetch;
pub mod ledger;
pub mod live_apis;
pub mod machine;
mod parse;
pub mod politeness;
mod robots;
pub mod role;
mod ssrf;
pub mod worker;

pub use config::FetchConfig;
pub use fetch::{CrawlAttempt, Fetcher, FetcherError};
pub use ledger::{LedgerGate, LedgerLimits};
pub use politeness::{HostGate, Politeness};
pub use role::{run, CrawlerState, RunError};
pub use worker::{Worker, WorkerConfig, WorkerGauges};
