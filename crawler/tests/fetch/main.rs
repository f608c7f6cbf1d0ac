//! The fetch stack against real HTTP servers on 127.0.0.1:0. Test host names (`a.test`,
//! `b.test`, ...) reach the servers through `FetchConfig::resolve`, and the servers' own request
//! logs are the witnesses of what was (not) fetched.

mod body;
mod harness;
mod pages;
mod politeness;
mod redirects;
mod robots;
// The Crawl-delay rows run in the robots module's unit tests only.
#[allow(dead_code)]
mod robots_cases;
mod robots_reference;
mod ssrf;
