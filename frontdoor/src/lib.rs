//! The frontdoor role (not built yet).
//!
//! It will be the clients' entry point: route search and crawl requests to live api cells by
//! their health and pressure, retry idempotent requests on another api, eject outliers, and
//! answer 503 with Retry-After when no api is live. Until then clients talk to an api cell.
