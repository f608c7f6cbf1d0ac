//! Several PostgreSQL servers behind one URL, and following the primary when it moves.
//!
//! sqlx's [`PgConnectOptions`] names one host. A replicated database (a primary and its standbys,
//! with a failover manager such as pg_auto_failover promoting a standby when the primary is lost)
//! is named the libpq way instead:
//!
//! ```text
//! postgres://user@host1:5001,host2:5002/db?target_session_attrs=read-write
//! ```
//!
//! [`Targets::parse`] splits such a URL into one sqlx URL per host. The pool is built on the host
//! found to be the primary (`SHOW transaction_read_only` is `off`, as libpq's `read-write` asks).
//! A [`Follower`] task keeps one connection of its own to that primary and asks the same question
//! every [`CHECK_EVERY`]; when the answer is wrong or the connection is gone it looks through the
//! hosts in turn until one is a writable primary again, points the pool's future connections at
//! it (`Pool::set_connect_options`), and makes the pool discard every connection opened before the
//! switch. New connections are checked as well, so a demoted server that comes back is never
//! written to. Calls made while no primary exists fail after the pool's acquire timeout, as during
//! a restart of a single server.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::PgOptions;
use crate::{EngineError, Result};

/// How often the follower checks that the pool's server is still the writable primary.
pub const CHECK_EVERY: Duration = Duration::from_millis(300);
/// How long one connection attempt to one host may take while looking for the primary.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`connect_pool`] looks for a primary before it gives up.
const FIRST_PRIMARY_WAIT: Duration = Duration::from_secs(30);

/// The servers one URL names.
#[derive(Debug, Clone)]
pub struct Targets {
    /// One sqlx URL per host, in the URL's order.
    pub hosts: Vec<String>,
    /// Only a writable primary will do (libpq `target_session_attrs=read-write` or `primary`).
    pub read_write: bool,
}

impl Targets {
    /// Split a libpq-style URL (`postgres://u@h1:p1,h2:p2/db?…`) into one URL per host. A URL
    /// with one host comes back as it is.
    pub fn parse(url: &str) -> Result<Targets> {
        let bad = |why: &str| EngineError::Config(format!("bad PostgreSQL URL: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("no scheme (postgres://…)"))?;
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(bad(&format!("scheme {scheme:?} is not postgres")));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hostlist) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (tail, None),
        };
        let mut read_write = false;
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("target_session_attrs", value)) => match value {
                    "read-write" | "primary" => read_write = true,
                    "any" => {}
                    other => {
                        return Err(bad(&format!(
                            "target_session_attrs={other} is not supported (read-write, primary \
                             or any)"
                        )))
                    }
                },
                _ if pair.is_empty() => {}
                _ => kept.push(pair),
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let mut hosts = Vec::new();
        for host in hostlist.split(',') {
            if host.is_empty() {
                return Err(bad("an empty host in the host list"));
            }
            let one = format!("{scheme}://{userinfo}{host}{path}{query}");
            // Checked here, so a bad entry is named before anything connects.
            PgConnectOptions::from_str(&one).map_err(|e| bad(&format!("host {host:?}: {e}")))?;
            hosts.push(one);
        }
        if hosts.len() > 1 {
            read_write = true;
        }
        Ok(Targets { hosts, read_write })
    }

    fn options(&self, index: usize) -> Result<PgConnectOptions> {
        Ok(PgConnectOptions::from_str(&self.hosts[index])
            .map_err(|e| EngineError::Config(format!("bad PostgreSQL URL: {e}")))?
            .application_name("homeostat"))
    }

    /// The first host, from `start` on and wrapping around, that is a writable primary (or any
    /// server, when `read_write` is off), with an open connection to it.
    async fn find_primary(&self, start: usize) -> Result<(usize, PgConnection)> {
        let mut last = String::from("no host");
        for step in 0..self.hosts.len() {
            let index = (start + step) % self.hosts.len();
            match probe(&self.options(index)?, self.read_write).await {
                Ok(conn) => return Ok((index, conn)),
                Err(e) => last = format!("{}: {e}", host_of(&self.hosts[index])),
            }
        }
        Err(EngineError::Unavailable(format!(
            "no writable PostgreSQL primary among {} host(s) (last: {last})",
            self.hosts.len()
        )))
    }
}

/// `host:port` of a one-host URL, for messages (no credentials).
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, h)| h)
        .to_string()
}

/// Connect to one server and check it takes writes.
async fn probe(options: &PgConnectOptions, read_write: bool) -> Result<PgConnection> {
    let mut conn = tokio::time::timeout(PROBE_TIMEOUT, options.connect())
        .await
        .map_err(|_| EngineError::Unavailable("connection attempt timed out".into()))??;
    if read_write && is_read_only(&mut conn).await? {
        let _ = conn.close().await;
        return Err(EngineError::Unavailable(
            "server is read-only (a standby)".into(),
        ));
    }
    Ok(conn)
}

async fn is_read_only(conn: &mut PgConnection) -> Result<bool> {
    let value: String = sqlx::query_scalar("SHOW transaction_read_only")
        .fetch_one(&mut *conn)
        .await?;
    Ok(value == "on")
}

/// What the pool's hooks and the follower share.
struct Shared {
    born: Instant,
    /// When the pool last moved to another server, in ms since `born` (0: never).
    switched_ms: AtomicU64,
    /// Asks the follower to check now.
    wake: Notify,
}

/// Stops the follower task when the last store or ledger on the pool is dropped.
pub struct Follower {
    stop: CancellationToken,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A pool on the primary of `url`'s hosts, and (for a replicated database) the task that follows
/// the primary when it moves.
pub async fn connect_pool(
    url: &str,
    options: PgOptions,
) -> Result<(PgPool, Option<Arc<Follower>>)> {
    let targets = Targets::parse(url)?;
    let pool_options = PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.acquire_timeout)
        // A pooled connection is checked before use, so after a server restart the dead ones
        // are replaced instead of failing the calls that draw them.
        .test_before_acquire(true);
    if !targets.read_write {
        // One server, whatever it is: sqlx's own pool, as always.
        let pool = pool_options.connect_with(targets.options(0)?).await?;
        return Ok((pool, None));
    }

    let deadline = Instant::now() + FIRST_PRIMARY_WAIT;
    let (index, conn) = loop {
        match targets.find_primary(0).await {
            Ok(found) => break found,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, "waiting for a PostgreSQL primary");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let shared = Arc::new(Shared {
        born: Instant::now(),
        switched_ms: AtomicU64::new(0),
        wake: Notify::new(),
    });
    let read_write = targets.read_write;
    let on_connect = shared.clone();
    let on_acquire = shared.clone();
    let pool = pool_options
        .after_connect(move |conn, _meta| {
            let shared = on_connect.clone();
            Box::pin(async move {
                // A demoted primary that came back answers, read-only: never write there.
                if read_write && is_read_only(conn).await.map_err(to_sqlx)? {
                    shared.wake.notify_one();
                    return Err(sqlx::Error::Protocol(
                        "PostgreSQL server is read-only (not the primary)".into(),
                    ));
                }
                Ok(())
            })
        })
        .before_acquire(move |_conn, meta| {
            // Opened before the pool last moved: a connection to the old primary.
            let switched = on_acquire.switched_ms.load(Ordering::SeqCst);
            let now_ms = on_acquire.born.elapsed().as_millis() as u64;
            let keep =
                switched == 0 || (meta.age.as_millis() as u64) < now_ms.saturating_sub(switched);
            Box::pin(async move { Ok(keep) })
        })
        .connect_with(targets.options(index)?)
        .await?;
    let stop = CancellationToken::new();
    tokio::spawn(follow(
        targets,
        index,
        conn,
        pool.clone(),
        shared,
        stop.clone(),
    ));
    Ok((pool, Some(Arc::new(Follower { stop }))))
}

fn to_sqlx(e: EngineError) -> sqlx::Error {
    match e {
        EngineError::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// The follower: checks the primary, and moves the pool when it has changed.
async fn follow(
    targets: Targets,
    mut index: usize,
    conn: PgConnection,
    pool: PgPool,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut conn = Some(conn);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let healthy = match conn.as_mut() {
            Some(c) => matches!(is_read_only(c).await, Ok(false)),
            None => false,
        };
        if healthy {
            continue;
        }
        if let Some(c) = conn.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.close()).await;
        }
        let lost_at = Instant::now();
        tracing::warn!(
            host = %host_of(&targets.hosts[index]),
            "PostgreSQL primary lost; looking for the new one"
        );
        // The current host first: it may have only restarted.
        let found = tokio::select! {
            _ = stop.cancelled() => return,
            found = targets.find_primary(index) => found,
        };
        match found {
            Ok((new_index, c)) => {
                let options = match targets.options(new_index) {
                    Ok(o) => o,
                    Err(_) => continue,
                };
                pool.set_connect_options(options);
                let now_ms = (shared.born.elapsed().as_millis() as u64).max(1);
                shared.switched_ms.store(now_ms, Ordering::SeqCst);
                tracing::warn!(
                    from = %host_of(&targets.hosts[index]),
                    to = %host_of(&targets.hosts[new_index]),
                    searched_ms = lost_at.elapsed().as_millis() as u64,
                    "PostgreSQL pool moved to the primary"
                );
                index = new_index;
                conn = Some(c);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no PostgreSQL primary yet");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_stays_as_it_is() {
        let t = Targets::parse("postgres://postgres@127.0.0.1:5432/test").expect("parse");
        assert_eq!(t.hosts, vec!["postgres://postgres@127.0.0.1:5432/test"]);
        assert!(!t.read_write);
    }

    #[test]
    fn a_host_list_becomes_one_url_per_host() {
        let t = Targets::parse(
            "postgresql://u:p%40w@10.0.0.1:5001,10.0.0.2,[::1]:5003/db?sslmode=disable&\
             target_session_attrs=read-write",
        )
        .expect("parse");
        assert_eq!(
            t.hosts,
            vec![
                "postgresql://u:p%40w@10.0.0.1:5001/db?sslmode=disable",
                "postgresql://u:p%40w@10.0.0.2/db?sslmode=disable",
                "postgresql://u:p%40w@[::1]:5003/db?sslmode=disable",
            ]
        );
        assert!(t.read_write);
        assert_eq!(host_of(&t.hosts[0]), "10.0.0.1:5001");
    }

    #[test]
    fn one_host_can_ask_for_the_primary() {
        let t = Targets::parse("postgres://h:1/d?target_session_attrs=primary").expect("parse");
        assert_eq!(t.hosts, vec!["postgres://h:1/d"]);
        assert!(t.read_write);
    }

    #[test]
    fn bad_lists_are_named() {
        for (url, why) in [
            ("postgres://a:1,,b:2/d", "empty host"),
            ("mysql://a/d", "scheme"),
            ("127.0.0.1:5432", "no scheme"),
            ("postgres://a/d?target_session_attrs=standby", "standby"),
            ("postgres://a:1,b:notaport/d", "\"b:notaport\""),
        ] {
            let err = Targets::parse(url).expect_err(url).to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }
}
