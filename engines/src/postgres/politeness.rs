//! [`HostLedger`] on PostgreSQL: one transaction per request; each host's ledger row is locked
//! (`SELECT ... FOR UPDATE`, hosts in sorted order so that two apis never deadlock) while
//! [`politeness::walk`] runs over them. Time is the database's clock, so apis on machines whose
//! clocks disagree still space a host's requests correctly.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::{PgConnection, Row};

use super::store::{retry_conflicts, PgStore};
use crate::politeness::{
    self, HostLedger, HostSlot, InFlight, Lattice, PermitReply, PermitRequest,
};
use crate::Result;

async fn permits_once(conn: &mut PgConnection, request: &PermitRequest) -> Result<PermitReply> {
    let now: i64 =
        sqlx::query_scalar("SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint")
            .fetch_one(&mut *conn)
            .await?;
    if !request.releases.is_empty() {
        sqlx::query("DELETE FROM host_permits WHERE id = ANY($1)")
            .bind(&request.releases)
            .execute(&mut *conn)
            .await?;
    }
    // Every host this request touches, locked in one order.
    let hosts = politeness::hosts(request);
    sqlx::query(
        "INSERT INTO host_ledger (host) SELECT unnest($1::text[]) ORDER BY 1 \
         ON CONFLICT (host) DO NOTHING",
    )
    .bind(&hosts)
    .execute(&mut *conn)
    .await?;
    let rows = sqlx::query(
        "SELECT host, last_start_ms, blocked_until_ms, lattice_base_ms, lattice_gap_ms, \
                lattice_lanes, lattice_until_ms FROM host_ledger \
         WHERE host = ANY($1) ORDER BY host FOR UPDATE",
    )
    .bind(&hosts)
    .fetch_all(&mut *conn)
    .await?;
    let mut slots: HashMap<String, HostSlot> = HashMap::new();
    for r in rows {
        slots.insert(
            r.get(0),
            HostSlot {
                last_start_ms: r.get(1),
                blocked_until_ms: r.get(2),
                lattice: Lattice {
                    base_ms: r.get(3),
                    gap_ms: r.get(4),
                    lanes: u32::try_from(r.get::<i64, _>(5)).unwrap_or(0),
                    until_ms: r.get(6),
                },
                in_flight: Vec::new(),
            },
        );
    }
    sqlx::query("DELETE FROM host_permits WHERE host = ANY($1) AND expires_ms <= $2")
        .bind(&hosts)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    let permits =
        sqlx::query("SELECT host, expires_ms, lane FROM host_permits WHERE host = ANY($1)")
            .bind(&hosts)
            .fetch_all(&mut *conn)
            .await?;
    for r in permits {
        if let Some(slot) = slots.get_mut(r.get::<&str, _>(0)) {
            slot.in_flight.push(InFlight {
                expires_ms: r.get(1),
                lane: r
                    .get::<Option<i64>, _>(2)
                    .and_then(|l| u32::try_from(l).ok()),
            });
        }
    }
    let decisions = politeness::walk(&mut slots, request, now);
    let granted = politeness::grants(request, &decisions);
    let grant_hosts: Vec<&str> = granted.iter().map(|g| g.0).collect();
    let grant_expiries: Vec<i64> = granted.iter().map(|g| g.1).collect();
    let grant_lanes: Vec<Option<i64>> = granted.iter().map(|g| g.2.map(i64::from)).collect();
    // Ids are drawn first so that each grant knows its own (RETURNING promises no order).
    let ids: Vec<i64> = if granted.is_empty() {
        Vec::new()
    } else {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT nextval(pg_get_serial_sequence('host_permits', 'id')) \
             FROM generate_series(1, $1)",
        )
        .bind(granted.len() as i64)
        .fetch_all(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO host_permits (id, host, expires_ms, lane) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])",
        )
        .bind(&ids)
        .bind(&grant_hosts)
        .bind(&grant_expiries)
        .bind(&grant_lanes)
        .execute(&mut *conn)
        .await?;
        ids
    };
    if !granted.is_empty() || !request.blocks.is_empty() {
        let mut cols: (Vec<&str>, Vec<i64>, Vec<i64>) = Default::default();
        let mut lattice: [Vec<i64>; 4] = Default::default();
        for (host, slot) in &slots {
            cols.0.push(host.as_str());
            cols.1.push(slot.last_start_ms);
            cols.2.push(slot.blocked_until_ms);
            let l = slot.lattice;
            for (col, v) in
                lattice
                    .iter_mut()
                    .zip([l.base_ms, l.gap_ms, i64::from(l.lanes), l.until_ms])
            {
                col.push(v);
            }
        }
        sqlx::query(
            "UPDATE host_ledger l SET last_start_ms = u.s, blocked_until_ms = u.b, \
                    lattice_base_ms = u.lb, lattice_gap_ms = u.lg, lattice_lanes = u.ln, \
                    lattice_until_ms = u.lu \
             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
                         $6::bigint[], $7::bigint[]) AS u(h, s, b, lb, lg, ln, lu) \
             WHERE l.host = u.h",
        )
        .bind(&cols.0)
        .bind(&cols.1)
        .bind(&cols.2)
        .bind(&lattice[0])
        .bind(&lattice[1])
        .bind(&lattice[2])
        .bind(&lattice[3])
        .execute(&mut *conn)
        .await?;
    }
    let answers = politeness::answers(decisions, ids, now);
    Ok(PermitReply { answers })
}

#[async_trait]
impl HostLedger for PgStore {
    async fn permits(&self, request: &PermitRequest) -> Result<PermitReply> {
        retry_conflicts("permits", || async move {
            let mut tx = self.pool().begin().await?;
            let reply = permits_once(&mut tx, request).await?;
            tx.commit().await?;
            Ok(reply)
        })
        .await
    }
}
