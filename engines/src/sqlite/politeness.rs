//! [`HostLedger`] on SQLite: one write transaction per request (`BEGIN IMMEDIATE` takes the
//! database's write lock, so every api cell of the machine sees one ledger), running
//! [`politeness::decide`] on each host's row.

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
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        for id in &request.releases {
            sqlx::query("DELETE FROM host_permits WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        for block in &request.blocks {
            sqlx::query(
                "INSERT INTO host_ledger (host, blocked_until_ms) VALUES (?, ?) \
                 ON CONFLICT (host) DO UPDATE SET \
                 blocked_until_ms = max(blocked_until_ms, excluded.blocked_until_ms)",
            )
            .bind(&block.host)
            .bind(now + politeness::block_ms(block.for_ms))
            .execute(&mut *tx)
            .await?;
        }
        let mut slots: HashMap<&str, HostSlot> = HashMap::new();
        let mut answers = Vec::with_capacity(request.asks.len());
        for ask in &request.asks {
            if !slots.contains_key(ask.host.as_str()) {
                let slot = load(&mut tx, &ask.host, now).await?;
                slots.insert(&ask.host, slot);
            }
            let slot = slots.get_mut(ask.host.as_str()).expect("loaded above");
            let decision = politeness::decide(slot, ask, now);
            let mut permit = 0;
            if let politeness::Decision::Grant { expires_ms, .. } = decision {
                permit = sqlx::query_scalar(
                    "INSERT INTO host_permits (host, expires_ms) VALUES (?, ?) RETURNING id",
                )
                .bind(&ask.host)
                .bind(expires_ms)
                .fetch_one(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO host_ledger (host, last_start_ms) VALUES (?, ?) \
                     ON CONFLICT (host) DO UPDATE SET last_start_ms = excluded.last_start_ms",
                )
                .bind(&ask.host)
                .bind(slot.last_start_ms)
                .execute(&mut *tx)
                .await?;
            }
            answers.push(politeness::answer(decision, permit, now));
        }
        tx.commit().await?;
        Ok(PermitReply { answers })
    }
}
