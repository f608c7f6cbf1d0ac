//! [`HostLedger`] on SQLite: one write transaction per request (`BEGIN IMMEDIATE` takes the
//! database's write lock, so every api cell of the machine sees one ledger): load the rows of the
//! hosts the request names, [`politeness::walk`] them, write back what changed. The ledger's
//! database is a file of its own beside the store's (`store::Ledger`). A request costs a fixed
//! number of statements whatever its size (each list travels as one JSON array): a statement is
//! a trip to the connection's thread and back, and a permit waits for the whole request.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::Row;

use super::store::SqliteStore;
use super::{json_keys, now_ms};
use crate::politeness::{
    self, HostLedger, HostSlot, InFlight, Lattice, PermitReply, PermitRequest,
};
use crate::Result;

#[async_trait]
impl HostLedger for SqliteStore {
    async fn permits(&self, request: &PermitRequest) -> Result<PermitReply> {
        let mut tx = super::WriteTx::begin(&self.ledger.pool, &self.ledger.gate).await?;
        let now = now_ms();
        if !request.releases.is_empty() {
            sqlx::query("DELETE FROM host_permits WHERE id IN (SELECT value FROM json_each(?))")
                .bind(json_keys(&request.releases))
                .execute(&mut **tx)
                .await?;
        }
        let hosts = json_keys(&politeness::hosts(request));
        sqlx::query(
            "DELETE FROM host_permits \
             WHERE host IN (SELECT value FROM json_each(?)) AND expires_ms <= ?",
        )
        .bind(&hosts)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        let mut slots: HashMap<String, HostSlot> = politeness::hosts(request)
            .into_iter()
            .map(|h| (h.to_string(), HostSlot::default()))
            .collect();
        for row in sqlx::query(
            "SELECT host, last_start_ms, blocked_until_ms, lattice_base_ms, lattice_gap_ms, \
                    lattice_lanes, lattice_until_ms FROM host_ledger \
             WHERE host IN (SELECT value FROM json_each(?))",
        )
        .bind(&hosts)
        .fetch_all(&mut **tx)
        .await?
        {
            if let Some(slot) = slots.get_mut(row.get::<&str, _>(0)) {
                slot.last_start_ms = row.get(1);
                slot.blocked_until_ms = row.get(2);
                slot.lattice = Lattice {
                    base_ms: row.get(3),
                    gap_ms: row.get(4),
                    lanes: u32::try_from(row.get::<i64, _>(5)).unwrap_or(0),
                    until_ms: row.get(6),
                };
            }
        }
        for row in sqlx::query(
            "SELECT host, expires_ms, lane FROM host_permits \
             WHERE host IN (SELECT value FROM json_each(?))",
        )
        .bind(&hosts)
        .fetch_all(&mut **tx)
        .await?
        {
            if let Some(slot) = slots.get_mut(row.get::<&str, _>(0)) {
                slot.in_flight.push(InFlight {
                    expires_ms: row.get(1),
                    lane: row
                        .get::<Option<i64>, _>(2)
                        .and_then(|l| u32::try_from(l).ok()),
                });
            }
        }
        let read = slots.clone();
        let decisions = politeness::walk(&mut slots, request, now);
        // Permit ids continue from the largest ever given (AUTOINCREMENT's own counter), so a
        // late release of a lapsed permit never frees a newer one.
        let granted = politeness::grants(request, &decisions);
        let mut next_id = 0;
        if !granted.is_empty() {
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence \
                                      WHERE name = 'host_permits'), 0), \
                            coalesce((SELECT max(id) FROM host_permits), 0))",
            )
            .fetch_one(&mut **tx)
            .await?;
            next_id = last.unwrap_or(0) + 1;
            let rows: Vec<(i64, &str, i64, Option<u32>)> = granted
                .iter()
                .enumerate()
                .map(|(i, (host, expires, lane))| (next_id + i as i64, *host, *expires, *lane))
                .collect();
            sqlx::query(
                "INSERT INTO host_permits (id, host, expires_ms, lane) \
                 SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?)",
            )
            .bind(json_keys(&rows))
            .execute(&mut **tx)
            .await?;
        }
        let answers = politeness::answers(decisions, next_id.., now);
        let changed: Vec<(&str, i64, i64, i64, i64, u32, i64)> = slots
            .iter()
            .filter(|(host, slot)| {
                !read.get(*host).is_some_and(|r| {
                    (r.last_start_ms, r.blocked_until_ms, r.lattice)
                        == (slot.last_start_ms, slot.blocked_until_ms, slot.lattice)
                })
            })
            .map(|(host, slot)| {
                let l = slot.lattice;
                let (start, blocked) = (slot.last_start_ms, slot.blocked_until_ms);
                (
                    host.as_str(),
                    start,
                    blocked,
                    l.base_ms,
                    l.gap_ms,
                    l.lanes,
                    l.until_ms,
                )
            })
            .collect();
        if !changed.is_empty() {
            sqlx::query(
                "INSERT INTO host_ledger (host, last_start_ms, blocked_until_ms, lattice_base_ms, \
                                          lattice_gap_ms, lattice_lanes, lattice_until_ms) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, \
                        value->>6 FROM json_each(?) WHERE true \
                 ON CONFLICT (host) DO UPDATE SET last_start_ms = excluded.last_start_ms, \
                 blocked_until_ms = excluded.blocked_until_ms, \
                 lattice_base_ms = excluded.lattice_base_ms, \
                 lattice_gap_ms = excluded.lattice_gap_ms, \
                 lattice_lanes = excluded.lattice_lanes, \
                 lattice_until_ms = excluded.lattice_until_ms",
            )
            .bind(json_keys(&changed))
            .execute(&mut **tx)
            .await?;
        }
        tx.commit().await?;
        Ok(PermitReply { answers })
    }
}
