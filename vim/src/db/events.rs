//! The event log, and the expiry of old events and audit entries.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{marks, named, new_id, now_ms, Db, DbError, EventKind, HEARTBEAT_CHUNK};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub ts: i64,
    pub kind: EventKind,
    pub host_id: String,
    pub vm_id: String,
    pub job_id: String,
    pub detail: String,
}

impl Event {
    pub fn new(kind: EventKind, host_id: &str, vm_id: &str, job_id: &str, detail: &str) -> Event {
        Event {
            id: new_id(),
            ts: now_ms(),
            kind,
            host_id: host_id.into(),
            vm_id: vm_id.into(),
            job_id: job_id.into(),
            detail: detail.into(),
        }
    }
}

fn event(r: &AnyRow) -> Result<Event, sqlx::Error> {
    Ok(Event {
        id: r.try_get("id")?,
        ts: r.try_get("ts")?,
        kind: named(r, "kind")?,
        host_id: r.try_get("host_id")?,
        vm_id: r.try_get("vm_id")?,
        job_id: r.try_get("job_id")?,
        detail: r.try_get("detail")?,
    })
}

/// Writes one event inside a transaction of the change it tells of.
pub(super) async fn insert_event(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    e: &Event,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO events (id, ts, kind, host_id, vm_id, job_id, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&e.id)
    .bind(e.ts)
    .bind(e.kind.as_str())
    .bind(&e.host_id)
    .bind(&e.vm_id)
    .bind(&e.job_id)
    .bind(&e.detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Db {
    /// Stores events, a few hundred to a transaction.
    pub async fn add_events(&self, events: &[Event]) -> Result<(), DbError> {
        for chunk in events.chunks(HEARTBEAT_CHUNK) {
            let mut tx = self.writer.begin().await?;
            for e in chunk {
                insert_event(&mut tx, e).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Events oldest first: from `since` on, or without it the newest `limit` of them.
    pub async fn events(&self, since: Option<i64>, limit: i64) -> Result<Vec<Event>, DbError> {
        let rows = match since {
            Some(since) => {
                sqlx::query("SELECT * FROM events WHERE ts >= $1 ORDER BY ts, id LIMIT $2")
                    .bind(since)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM events ORDER BY ts DESC, id DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut out: Vec<Event> = rows.iter().map(event).collect::<Result<_, _>>()?;
        if since.is_none() {
            out.reverse();
        }
        Ok(out)
    }

    /// What the availability of `vm_ids` is computed from (`sla::availability`): their events
    /// and the reachability and fencing events of the hosts they were on, before `to`, oldest
    /// first.
    pub async fn availability_events(
        &self,
        vm_ids: &[String],
        to: i64,
    ) -> Result<Vec<Event>, DbError> {
        let mut rows = Vec::new();
        for chunk in vm_ids.chunks(500) {
            let sql = format!(
                "SELECT * FROM events WHERE ts < $1 AND vm_id IN ({}) ORDER BY ts",
                marks(2, chunk.len())
            );
            let q = chunk
                .iter()
                .fold(sqlx::query(&sql).bind(to), |q, id| q.bind(id));
            rows.extend(q.fetch_all(&self.pool).await?);
        }
        let mut out: Vec<Event> = rows.iter().map(event).collect::<Result<_, _>>()?;
        let mut hosts: Vec<String> = out
            .iter()
            .filter(|e| !e.host_id.is_empty())
            .map(|e| e.host_id.clone())
            .collect();
        hosts.sort();
        hosts.dedup();
        let kinds = [
            EventKind::PsUnreachable,
            EventKind::PsReachable,
            EventKind::HostFenced,
            EventKind::HostSelfFenced,
        ];
        for chunk in hosts.chunks(500) {
            let sql = format!(
                "SELECT * FROM events WHERE ts < $1 AND vm_id = '' AND kind IN ($2, $3, $4, $5)
                 AND host_id IN ({})",
                marks(6, chunk.len())
            );
            let q = kinds
                .iter()
                .fold(sqlx::query(&sql).bind(to), |q, k| q.bind(k.as_str()));
            let q = chunk.iter().fold(q, |q, h| q.bind(h));
            for r in q.fetch_all(&self.pool).await? {
                out.push(event(&r)?);
            }
        }
        // Stable: events of one instant keep the order they were written in.
        out.sort_by_key(|e| e.ts);
        Ok(out)
    }

    /// VMs with an event since `since` that may have cost them availability.
    pub async fn vms_with_outages_since(&self, since: i64) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query(
            "SELECT DISTINCT vm_id FROM events WHERE ts >= $1 AND vm_id <> ''
             AND kind IN ($2, $3, $4)",
        )
        .bind(since)
        .bind(EventKind::VmFailure.as_str())
        .bind(EventKind::VmUnreachable.as_str())
        .bind(EventKind::VmFailoverStarted.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("vm_id"))
            .collect::<Result<_, _>>()?)
    }

    /// Says `SLA_Violated` for a VM once for `month` (YYYY-MM): the event and the mark that it
    /// was said, together. False if it was said already.
    pub async fn record_sla_violation(&self, month: &str, e: &Event) -> Result<bool, DbError> {
        let mut tx = self.writer.begin().await?;
        let r = sqlx::query(
            "UPDATE vms SET sla_violated_month = $1 WHERE id = $2 AND sla_violated_month <> $1",
        )
        .bind(month)
        .bind(&e.vm_id)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() == 1 {
            insert_event(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(r.rows_affected() == 1)
    }

    /// Drops events and audit entries older than their retention (ms since the epoch), a
    /// bounded batch at a time so other writers wait little; returns how many went.
    pub async fn expire(&self, events_before: i64, audit_before: i64) -> Result<u64, DbError> {
        let mut n = 0;
        for (table, before) in [("events", events_before), ("audit", audit_before)] {
            loop {
                let sql = format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE ts < $1 LIMIT 5000)"
                );
                let r = sqlx::query(&sql).bind(before).execute(&self.writer).await?;
                n += r.rows_affected();
                if r.rows_affected() < 5000 {
                    break;
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::databases;
    use crate::db::AuditEntry;

    /// A VM's availability events are its own and those of the hosts it was on, nothing else.
    #[tokio::test]
    async fn availability_events_are_the_vms_and_its_hosts() {
        for (db, _dir) in databases().await {
            let at = |ts, kind, host: &str, vm: &str| Event {
                ts,
                ..Event::new(kind, host, vm, "", "")
            };
            db.add_events(&[
                at(1, EventKind::VmCreated, "h1", "v"),
                at(2, EventKind::PsUnreachable, "h1", ""),
                at(3, EventKind::PsUnreachable, "h2", ""),
                at(4, EventKind::VmCreated, "h2", "w"),
                at(5, EventKind::HostFenced, "h1", ""),
                at(6, EventKind::PsTimeout, "h1", ""),
                at(9, EventKind::PsReachable, "h1", ""),
            ])
            .await
            .unwrap();
            let got: Vec<(i64, &str)> = db
                .availability_events(&["v".to_string()], 9)
                .await
                .unwrap()
                .iter()
                .map(|e| (e.ts, e.kind.as_str()))
                .collect();
            assert_eq!(
                got,
                [(1, "VM_Created"), (2, "PS_Unreachable"), (5, "Host_Fenced")]
            );
        }
    }

    /// Events and audit rows past their retention go, newer ones stay; a listing without
    /// `since` is the newest rows, oldest first.
    #[tokio::test]
    async fn old_rows_expire_and_listings_show_the_newest() {
        for (db, _dir) in databases().await {
            let events: Vec<Event> = (0..20)
                .map(|i| Event {
                    ts: 1000 + i,
                    ..Event::new(EventKind::VmInfo, "h", "", "", &i.to_string())
                })
                .collect();
            db.add_events(&events).await.unwrap();
            let newest = db.events(None, 5).await.unwrap();
            let details: Vec<&str> = newest.iter().map(|e| e.detail.as_str()).collect();
            assert_eq!(details, ["15", "16", "17", "18", "19"]);
            assert_eq!(db.events(Some(1018), 100).await.unwrap().len(), 2);
            let audit: Vec<AuditEntry> = (0..10)
                .map(|i| AuditEntry {
                    ts: 1000 + i,
                    who: "w".into(),
                    action: "a".into(),
                    target: String::new(),
                    outcome: "200".into(),
                    detail: String::new(),
                })
                .collect();
            db.add_audit(&audit).await.unwrap();
            assert_eq!(db.expire(1010, 1005).await.unwrap(), 10 + 5);
            assert_eq!(db.events(Some(0), 100).await.unwrap().len(), 10);
            assert_eq!(db.audit_log(100).await.unwrap().len(), 5);
        }
    }
}
