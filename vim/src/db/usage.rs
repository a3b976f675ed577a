//! What VMs are billed for: each change of a VM's state or size is metered in the transaction
//! that makes it (`meter`), which compares what the VM is billed at (`billed_vcpus`,
//! `billed_memory_mib`) with what it should be and, where they differ, writes a usage record and
//! its event and updates the billed columns. Done inside the change's own transaction, a usage
//! record can be neither lost (the change commits with it) nor doubled (a repeated change finds
//! the VM already billed so). Prices and plans live here too.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{marks, named, new_id, now_ms, Db, DbError, Event, EventKind, VmState};

/// The states a VM is billed in: it holds a host's vCPUs and memory.
pub const BILLED_STATES: [VmState; 2] = [VmState::Running, VmState::Migrating];

/// One usage record: from `ts` on the VM is billed at this size (`Usage_Started`,
/// `Usage_Changed`), or no longer (`Usage_Finished`, with the size it had).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageRecord {
    pub ts: i64,
    pub kind: EventKind,
    pub vm_id: String,
    pub owner: String,
    pub vcpus: i64,
    pub memory_mib: i64,
}

/// A plan's prices from `since` (ms since the epoch) on, as decimal text.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PriceRow {
    pub plan: String,
    pub since: i64,
    pub vcpu_hour: String,
    pub gib_hour: String,
    pub currency: String,
}

/// Which VMs a change touched.
pub(super) enum Scope<'a> {
    Vm(&'a str),
    Host(&'a str),
    Vms(&'a [String]),
}

/// Meters the VMs of `scope` inside `tx`: returns the usage events written.
pub(super) async fn meter(
    tx: &mut Transaction<'static, Any>,
    scope: Scope<'_>,
) -> Result<Vec<Event>, DbError> {
    let (running, migrating) = (BILLED_STATES[0].as_str(), BILLED_STATES[1].as_str());
    let mismatch =
        "((state IN ($1, $2) AND (billed_vcpus <> vcpus OR billed_memory_mib <> memory_mib))
                     OR (state NOT IN ($1, $2) AND billed_vcpus <> 0))";
    let sql = match &scope {
        Scope::Vm(_) => format!("SELECT * FROM vms WHERE id = $3 AND {mismatch}"),
        Scope::Host(_) => format!("SELECT * FROM vms WHERE host_id = $3 AND {mismatch}"),
        Scope::Vms([]) => return Ok(Vec::new()),
        Scope::Vms(ids) => format!(
            "SELECT * FROM vms WHERE id IN ({}) AND {mismatch}",
            marks(3, ids.len())
        ),
    };
    let mut q = sqlx::query(&sql).bind(running).bind(migrating);
    q = match scope {
        Scope::Vm(id) | Scope::Host(id) => q.bind(id),
        Scope::Vms(ids) => ids.iter().fold(q, |q, id| q.bind(id)),
    };
    let rows = q.fetch_all(&mut **tx).await?;
    let now = now_ms();
    let mut events = Vec::new();
    for r in &rows {
        let id: String = r.try_get("id")?;
        let owner: String = r.try_get("owner")?;
        let host: String = r.try_get("host_id")?;
        let state: VmState = named(r, "state")?;
        let size = (r.try_get::<i64, _>("vcpus")?, r.try_get("memory_mib")?);
        let billed = (
            r.try_get::<i64, _>("billed_vcpus")?,
            r.try_get::<i64, _>("billed_memory_mib")?,
        );
        let (kind, (vcpus, memory_mib), now_billed) = if !BILLED_STATES.contains(&state) {
            (EventKind::UsageFinished, billed, (0, 0))
        } else if billed.0 == 0 {
            (EventKind::UsageStarted, size, size)
        } else {
            (EventKind::UsageChanged, size, size)
        };
        sqlx::query("UPDATE vms SET billed_vcpus = $1, billed_memory_mib = $2 WHERE id = $3")
            .bind(now_billed.0)
            .bind(now_billed.1)
            .bind(&id)
            .execute(&mut **tx)
            .await?;
        let record_id = new_id();
        sqlx::query(
            "INSERT INTO usage_records (id, ts, kind, vm_id, owner, vcpus, memory_mib)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record_id)
        .bind(now)
        .bind(kind.as_str())
        .bind(&id)
        .bind(&owner)
        .bind(vcpus)
        .bind(memory_mib)
        .execute(&mut **tx)
        .await?;
        let detail = format!("consumer {owner}, {vcpus} vCPUs, {memory_mib} MiB");
        let e = Event {
            id: record_id,
            ts: now,
            ..Event::new(kind, &host, &id, "", &detail)
        };
        super::events::insert_event(tx, &e).await?;
        events.push(e);
    }
    Ok(events)
}

fn usage(r: &AnyRow) -> Result<UsageRecord, sqlx::Error> {
    Ok(UsageRecord {
        ts: r.try_get("ts")?,
        kind: named(r, "kind")?,
        vm_id: r.try_get("vm_id")?,
        owner: r.try_get("owner")?,
        vcpus: r.try_get("vcpus")?,
        memory_mib: r.try_get("memory_mib")?,
    })
}

fn price(r: &AnyRow) -> Result<PriceRow, sqlx::Error> {
    Ok(PriceRow {
        plan: r.try_get("plan")?,
        since: r.try_get("since")?,
        vcpu_hour: r.try_get("vcpu_hour")?,
        gib_hour: r.try_get("gib_hour")?,
        currency: r.try_get("currency")?,
    })
}

impl Db {
    /// Runs a change to VMs and meters the VMs of `scope`, in one transaction; the number of
    /// rows the change touched.
    pub(super) async fn metered<'q>(
        &self,
        query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
        scope: Scope<'_>,
    ) -> Result<u64, DbError> {
        let mut tx = self.writer.begin().await?;
        let n = query.execute(&mut *tx).await?.rows_affected();
        let events = if n > 0 {
            meter(&mut tx, scope).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        self.announce(events);
        Ok(n)
    }

    /// Bills every VM as its state says: for VMs that ran before billing existed (vimd calls
    /// this once at start; it changes nothing when all agree).
    pub async fn meter_all(&self) -> Result<usize, DbError> {
        let ids: Vec<String> = sqlx::query("SELECT id FROM vms WHERE state <> $1")
            .bind(VmState::Deleted.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut n = 0;
        for chunk in ids.chunks(500) {
            let mut tx = self.writer.begin().await?;
            let events = meter(&mut tx, Scope::Vms(chunk)).await?;
            tx.commit().await?;
            n += events.len();
            self.announce(events);
        }
        Ok(n)
    }

    /// Usage records of `from` to `to` (ms), with each VM's last record before `from` (what it
    /// was billed at when the period began); a consumer's only with `owner`. By VM, then time.
    pub async fn usage(
        &self,
        owner: Option<&str>,
        from: i64,
        to: i64,
    ) -> Result<Vec<UsageRecord>, DbError> {
        let who = if owner.is_some() {
            "AND u.owner = $3"
        } else {
            ""
        };
        let sql = format!(
            "SELECT u.* FROM usage_records u WHERE u.ts < $2 {who} AND (u.ts >= $1 OR u.ts =
               (SELECT MAX(p.ts) FROM usage_records p WHERE p.vm_id = u.vm_id AND p.ts < $1))
             ORDER BY u.vm_id, u.ts, u.id"
        );
        let mut q = sqlx::query(&sql).bind(from).bind(to);
        if let Some(o) = owner {
            q = q.bind(o);
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows.iter().map(usage).collect::<Result<_, _>>()?)
    }

    /// Sets a plan's prices from `since` on. A plan keeps the currency it was first priced in.
    pub async fn set_price(&self, p: &PriceRow) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        let first: Option<String> =
            sqlx::query("SELECT currency FROM prices WHERE plan = $1 ORDER BY since LIMIT 1")
                .bind(&p.plan)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get("currency"))
                .transpose()?;
        if let Some(c) = first.filter(|c| *c != p.currency) {
            return Err(DbError::Conflict(format!(
                "plan {} is priced in {c}, not {}",
                p.plan, p.currency
            )));
        }
        sqlx::query(
            "INSERT INTO prices (plan, since, vcpu_hour, gib_hour, currency)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (plan, since) DO UPDATE SET vcpu_hour = excluded.vcpu_hour,
               gib_hour = excluded.gib_hour",
        )
        .bind(&p.plan)
        .bind(p.since)
        .bind(&p.vcpu_hour)
        .bind(&p.gib_hour)
        .bind(&p.currency)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every plan's price history, by plan then time.
    pub async fn prices(&self) -> Result<Vec<PriceRow>, DbError> {
        let rows = sqlx::query("SELECT * FROM prices ORDER BY plan, since")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(price).collect::<Result<_, _>>()?)
    }

    /// Makes `consumer` pay by `plan`; false if no such plan has prices.
    pub async fn assign_plan(&self, consumer: &str, plan: &str) -> Result<bool, DbError> {
        let known = sqlx::query("SELECT plan FROM prices WHERE plan = $1 LIMIT 1")
            .bind(plan)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        if known {
            sqlx::query(
                "INSERT INTO consumer_plans (consumer, plan) VALUES ($1, $2)
                 ON CONFLICT (consumer) DO UPDATE SET plan = excluded.plan",
            )
            .bind(consumer)
            .bind(plan)
            .execute(&self.writer)
            .await?;
        }
        Ok(known)
    }

    /// Consumers and the plans they pay by (the rest pay by `default`).
    pub async fn consumer_plans(&self) -> Result<Vec<(String, String)>, DbError> {
        let rows = sqlx::query("SELECT consumer, plan FROM consumer_plans ORDER BY consumer")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("consumer")?, r.try_get("plan")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::{databases, pending_vm};
    use crate::db::{HostChange, HostState, Job, JobKind};

    fn kinds(u: &[UsageRecord]) -> Vec<(&str, i64, i64)> {
        u.iter()
            .map(|r| (r.kind.as_str(), r.vcpus, r.memory_mib))
            .collect()
    }

    /// Every change that starts, resizes or ends what a VM holds writes one usage record and
    /// its event, and a change repeated (a redelivered answer) writes none.
    #[tokio::test]
    async fn usage_follows_state_and_size_once_each() {
        for (db, _dir) in databases().await {
            let (tx, mut rx) = tokio::sync::broadcast::channel(16);
            db.tell_events(tx);
            let vm = pending_vm();
            db.add_job(&Job::new(JobKind::Create, "alice", &vm.id), Some(&vm))
                .await
                .unwrap();
            db.place_vm(&vm.id, "h1", "").await.unwrap();
            db.set_vm_state(&vm.id, VmState::Creating, 1, 0)
                .await
                .unwrap();
            db.set_vm_state(&vm.id, VmState::Running, 1, 0)
                .await
                .unwrap();
            db.set_vm_state(&vm.id, VmState::Running, 1, 0)
                .await
                .unwrap();
            db.set_vm_size(&vm.id, 2, 128).await.unwrap();
            db.set_vm_size(&vm.id, 2, 128).await.unwrap();
            assert!(db
                .transition_vm(&vm.id, VmState::Running, VmState::Migrating)
                .await
                .unwrap());
            assert!(db.finish_migration(&vm.id, "h2", 2, "{}").await.unwrap());
            db.set_host_states(&[HostChange {
                host: "h2".into(),
                state: HostState::Unreachable,
                missed: 3,
            }])
            .await
            .unwrap();
            db.set_vm_state(&vm.id, VmState::Running, 3, 0)
                .await
                .unwrap();
            db.suspend_vm(&vm.id).await.unwrap();
            db.suspend_vm(&vm.id).await.unwrap();
            let u = db.usage(None, 0, i64::MAX).await.unwrap();
            assert_eq!(
                kinds(&u),
                [
                    ("Usage_Started", 1, 64),
                    ("Usage_Changed", 2, 128),
                    ("Usage_Finished", 2, 128),
                    ("Usage_Started", 2, 128),
                    ("Usage_Finished", 2, 128),
                ]
            );
            let mut told = Vec::new();
            while let Ok(e) = rx.try_recv() {
                told.push(e.kind.as_str());
            }
            assert_eq!(told.len(), 5);
            let logged = db.events(Some(0), 100).await.unwrap();
            assert_eq!(logged.len(), 5);
            assert!(logged[0].detail.contains("consumer alice, 1 vCPUs, 64 MiB"));
            // Nothing left to bill differently.
            assert_eq!(db.meter_all().await.unwrap(), 0);
            assert!(db.usage(Some("bob"), 0, i64::MAX).await.unwrap().is_empty());
            // A period that begins later starts from the last record before it.
            let last = u.last().unwrap().ts;
            let later = db.usage(Some("alice"), last + 1, last + 2).await.unwrap();
            assert_eq!(kinds(&later), [("Usage_Finished", 2, 128)]);
        }
    }

    /// A plan keeps its currency; a price for the same instant replaces the first; a consumer
    /// can only be put on a plan that has prices.
    #[tokio::test]
    async fn prices_and_plans() {
        for (db, _dir) in databases().await {
            let p = PriceRow {
                plan: "gold".into(),
                since: 10,
                vcpu_hour: "0.04".into(),
                gib_hour: "0.005".into(),
                currency: "EUR".into(),
            };
            db.set_price(&p).await.unwrap();
            db.set_price(&PriceRow {
                vcpu_hour: "0.05".into(),
                ..p.clone()
            })
            .await
            .unwrap();
            let usd = PriceRow {
                since: 20,
                currency: "USD".into(),
                ..p.clone()
            };
            assert!(matches!(
                db.set_price(&usd).await,
                Err(DbError::Conflict(_))
            ));
            let prices = db.prices().await.unwrap();
            assert_eq!(prices.len(), 1);
            assert_eq!(prices[0].vcpu_hour, "0.05");
            assert!(db.assign_plan("alice", "gold").await.unwrap());
            assert!(!db.assign_plan("bob", "silver").await.unwrap());
            assert_eq!(
                db.consumer_plans().await.unwrap(),
                [("alice".to_string(), "gold".to_string())]
            );
        }
    }
}
