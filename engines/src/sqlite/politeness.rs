//! [`HostLedger`] on SQLite: one write transaction per request (`BEGIN IMMEDIATE` takes the
//! database's write lock, so every api cell of the machine sees one ledger): load the rows of the
//! hosts the request names, [`politeness::walk`] them, write back what changed. The ledger's
//! database is a file of its own beside the store's (`store::Ledger`).

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::{Row, Sqlite, Transaction};

use super::now_ms;
use super::store::SqliteStore;
use crate::politeness::{self, HostLedger, HostSlot, PermitReply, PermitRequest};
use crate::Result;

async fn load(tx: &mut Transaction<'static, Sqlite>, host: &str, now: i64) -> Result<HostSlot> {
    sqlx::query("DELETE FROM host_permits WHERE host = ? AND expires_ms <= ?")
        .bind(host)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    let row = sqlx::query("SELECT last_start_ms, blocked_until_ms FROM host_ledger WHERE host = ?")
        .bind(host)
        .fetch_optional(&mut **tx)
        .await?;
    let in_flight: Vec<i64> =
        sqlx::query_scalar("SELECT expires_ms FROM host_permits WHERE host = ?")
            .bind(host)
            .fetch_all(&mut **tx)
            .await?;
    Ok(HostSlot {
        last_start_ms: row.as_ref().map_or(0, |r| r.get(0)),
        blocked_until_ms: row.as_ref().map_or(0, |r| r.get(1)),
        in_flight,
    })
}

#[async_trait]
impl HostLedger for SqliteStore {
    async fn permits(&self, request: &PermitRequest) -> Result<PermitReply> {
        let mut tx = super::WriteTx::begin(&self.ledger.pool, &self.ledger.gate).await?;
        let now = now_ms();
        for id in &request.releases {
            sqlx::query("DELETE FROM host_permits WHERE id = ?")
                .bind(id)
                .execute(&mut **tx)
                .await?;
        }
        let mut slots: HashMap<String, HostSlot> = HashMap::new();
        for host in politeness::hosts(request) {
            slots.insert(host.to_string(), load(&mut tx, host, now).await?);
        }
        let read = slots.clone();
        let decisions = politeness::walk(&mut slots, request, now);
        let mut answers = Vec::with_capacity(decisions.len());
        for (ask, decision) in request.asks.iter().zip(decisions) {
            let mut permit = 0;
            if let politeness::Decision::Grant { expires_ms, .. } = decision {
                permit = sqlx::query_scalar(
                    "INSERT INTO host_permits (host, expires_ms) VALUES (?, ?) RETURNING id",
                )
                .bind(&ask.host)
                .bind(expires_ms)
                .fetch_one(&mut **tx)
                .await?;
            }
            answers.push(politeness::answer(decision, permit, now));
        }
        for (host, slot) in &slots {
            let unchanged = read.get(host).is_some_and(|r| {
                (r.last_start_ms, r.blocked_until_ms) == (slot.last_start_ms, slot.blocked_until_ms)
            });
            if unchanged {
                continue;
            }
            sqlx::query(
                "INSERT INTO host_ledger (host, last_start_ms, blocked_until_ms) VALUES (?, ?, ?) \
                 ON CONFLICT (host) DO UPDATE SET last_start_ms = excluded.last_start_ms, \
                 blocked_until_ms = excluded.blocked_until_ms",
            )
            .bind(host)
            .bind(slot.last_start_ms)
            .bind(slot.blocked_until_ms)
            .execute(&mut **tx)
            .await?;
        }
        tx.commit().await?;
        Ok(PermitReply { answers })
    }
}
