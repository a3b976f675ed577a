//! VMs: where each runs and in which state, as its host last reported.

use serde::Serialize;

use super::usage::Scope;
use super::{named, now_ms, read, Cols, Db, DbError, VmState};

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub image: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub host_id: String,
    pub state: VmState,
    pub disk_path: String,
    pub pid: i64,
    /// The guest's CPU (its vCPU threads), % of one core.
    pub cpu_pct: f64,
    /// The VMM process's resident memory.
    pub rss_kib: i64,
    /// The VMM's own CPU (its other threads), % of one core.
    pub vmm_cpu_pct: f64,
    /// Memory the guest has handed back through its balloon.
    pub balloon_mib: i64,
    /// When its host took the figures above (0: none reported yet). They are refreshed every few
    /// seconds (`monitor::REFRESH`), so what judges them over time goes by this, not by when
    /// it read them.
    #[serde(skip)]
    pub usage_at: i64,
    pub created_at: i64,
    /// How its last live migration went (source, target, downtime, total, bytes, rounds), or
    /// null.
    #[serde(serialize_with = "json_or_null")]
    pub last_migration: String,
    /// Its NIC's MAC, the same on every host; empty: no NIC.
    pub mac: String,
    /// What failover does with it when its host fails.
    pub ha: HaPolicy,
    /// Among a failed host's VMs, the higher restart first.
    pub ha_priority: i64,
    /// With HA policy `resume` or `standby`: how often its agent checkpoints it.
    pub checkpoint_ms: i64,
    /// The most vCPUs it can be resized to while it runs (0: `vcpus`, a VM made before).
    pub max_vcpus: i64,
    /// When the VIM last resized it on its own (ms since the epoch; 0: never).
    pub scaled_at: i64,
    /// The most memory it can be resized to while it runs (0: `memory_mib`, a VM made before).
    pub max_memory_mib: i64,
    /// Suspended once its CPU use per vCPU stays at or below this percentage...
    pub auto_suspend_pct: i64,
    /// ...for this many seconds (0: as its consumer's policy says, if it has one; -1: never).
    pub auto_suspend_s: i64,
    /// Its anti-affinity group: VMs of one group are kept on different hosts ('' for none).
    pub group: String,
    /// Its availability target, percent (docs/sla.md).
    pub sla_target: f64,
    /// With HA policy `standby`: the host keeping its standby VMM ('' for none yet).
    pub standby_host: String,
    /// When that host last reported the standby (ms since the epoch; when it was asked for,
    /// until then).
    pub standby_seen: i64,
}

impl Vm {
    /// How often its agent checkpoints it: only with HA policy `resume` (0: never).
    pub fn checkpoint_interval(&self) -> u32 {
        if matches!(self.ha, HaPolicy::Resume | HaPolicy::Standby) {
            self.checkpoint_ms.clamp(0, i64::from(u32::MAX)) as u32
        } else {
            0
        }
    }

    /// The most vCPUs it can have while it runs.
    pub fn vcpu_ceiling(&self) -> i64 {
        self.max_vcpus.max(self.vcpus)
    }

    /// The most memory it can have while it runs.
    pub fn memory_ceiling(&self) -> i64 {
        self.max_memory_mib.max(self.memory_mib)
    }
}

/// A VM's high-availability policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HaPolicy {
    /// Boot it again from its disk on another host when its host fails.
    #[default]
    Restart,
    /// Checkpoint it every `checkpoint_ms` and resume it from its newest checkpoint on another
    /// host when its host fails (booting it, as `Restart`, when no checkpoint is usable).
    Resume,
    /// As `Resume`, and a standby VMM on another host keeps its memory from each checkpoint;
    /// failover promotes it (docs/standby.md).
    Standby,
    /// Leave it where it was.
    Off,
}

vim_proto::names!(HaPolicy {
    Restart => "restart",
    Resume => "resume",
    Standby => "standby",
    Off => "off",
});

impl HaPolicy {
    /// Whether failover brings the VM back when its host fails.
    pub fn restarts(self) -> bool {
        matches!(
            self,
            HaPolicy::Restart | HaPolicy::Resume | HaPolicy::Standby
        )
    }
}

/// A JSON text column as the JSON it holds (null when empty or unreadable).
pub(super) fn json_or_null<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
    v.serialize(s)
}

/// VMs with their latest usage figures (`vm_usage`, from their host's reports), for a
/// `SELECT {VM_COLUMNS} FROM {VM_ROWS} …` that [`vm`] decodes. The VM's own columns are `vms.…`
/// (or unqualified: no column of `vm_usage` shares a name with one of `vms`).
pub(super) const VM_ROWS: &str =
    "vms LEFT JOIN vm_usage u ON u.host = vms.host_id AND u.vm = vms.id";
/// The columns of a [`VM_ROWS`] row that [`vm`] decodes; a VM not reported yet has zero usage.
pub(super) const VM_COLUMNS: &str = "vms.*, COALESCE(u.cpu_pct, 0.0) AS cpu_pct,
    COALESCE(u.rss_kib, 0) AS rss_kib, COALESCE(u.vmm_cpu_pct, 0.0) AS vmm_cpu_pct,
    COALESCE(u.balloon_mib, 0) AS balloon_mib, COALESCE(u.usage_at, 0) AS usage_at";

fn vm(r: &impl Cols) -> Result<Vm, sqlx::Error> {
    Ok(Vm {
        id: r.col("id")?,
        name: r.col("name")?,
        owner: r.col("owner")?,
        image: r.col("image")?,
        vcpus: r.col("vcpus")?,
        memory_mib: r.col("memory_mib")?,
        host_id: r.col("host_id")?,
        state: named(r, "state")?,
        disk_path: r.col("disk_path")?,
        pid: r.col("pid")?,
        cpu_pct: r.col("cpu_pct")?,
        rss_kib: r.col("rss_kib")?,
        vmm_cpu_pct: r.col("vmm_cpu_pct")?,
        balloon_mib: r.col("balloon_mib")?,
        usage_at: r.col("usage_at")?,
        created_at: r.col("created_at")?,
        last_migration: r.col("last_migration")?,
        mac: r.col("mac")?,
        ha: named(r, "ha")?,
        ha_priority: r.col("ha_priority")?,
        checkpoint_ms: r.col("checkpoint_ms")?,
        max_vcpus: r.col("max_vcpus")?,
        scaled_at: r.col("scaled_at")?,
        max_memory_mib: r.col("max_memory_mib")?,
        auto_suspend_pct: r.col("auto_suspend_pct")?,
        auto_suspend_s: r.col("auto_suspend_s")?,
        group: r.col("affinity_group")?,
        sla_target: r.col("sla_target")?,
        standby_host: r.col("standby_host")?,
        standby_seen: r.col("standby_seen")?,
    })
}

impl Db {
    pub async fn vm(&self, id: &str) -> Result<Option<Vm>, DbError> {
        read!(self, p => {
            let r = sqlx::query(&format!("SELECT {VM_COLUMNS} FROM {VM_ROWS} WHERE vms.id = $1"))
                .bind(id)
                .fetch_optional(p)
                .await?;
            Ok(r.as_ref().map(vm).transpose()?)
        })
    }

    /// VMs not deleted, oldest first (then by id), at most `limit` of them, starting after the VM
    /// `after` (the last one of the page before: a cursor that stays right while VMs come and go).
    pub async fn vms(
        &self,
        owner: Option<&str>,
        after: Option<&Vm>,
        limit: i64,
    ) -> Result<Vec<Vm>, DbError> {
        let mut sql = format!("SELECT {VM_COLUMNS} FROM {VM_ROWS} WHERE state <> $1");
        let mut n = 1;
        let mut mark = || {
            n += 1;
            format!("${n}")
        };
        if owner.is_some() {
            sql += &format!(" AND owner = {}", mark());
        }
        if after.is_some() {
            let (a, b, c) = (mark(), mark(), mark());
            sql += &format!(" AND (created_at > {a} OR (created_at = {b} AND vms.id > {c}))");
        }
        sql += &format!(" ORDER BY created_at, vms.id LIMIT {}", mark());
        read!(self, p => {
            let mut q = sqlx::query(&sql).bind(VmState::Deleted.as_str());
            if let Some(o) = owner {
                q = q.bind(o);
            }
            if let Some(a) = after {
                q = q.bind(a.created_at).bind(a.created_at).bind(&a.id);
            }
            let rows = q.bind(limit).fetch_all(p).await?;
            Ok(rows.iter().map(vm).collect::<Result<_, _>>()?)
        })
    }

    /// Places a VM on a host; false if it was deleted meanwhile (it is never placed then).
    pub async fn place_vm(&self, id: &str, host_id: &str, disk: &str) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE vms SET host_id = $1, disk_path = $2 WHERE id = $3 AND state <> $4",
        )
        .bind(host_id)
        .bind(disk)
        .bind(id)
        .bind(VmState::Deleted.as_str())
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A VM's state as its host reports it (`seq`: the report's sequence number; 0 for vimd's
    /// own decisions, which always apply). A report older than the newest one applied changes
    /// nothing. States only move forward out of `deleted`: nothing a host or a late answer says
    /// brings a deleted VM back.
    pub async fn set_vm_state(
        &self,
        id: &str,
        state: VmState,
        pid: i64,
        seq: u64,
    ) -> Result<bool, DbError> {
        let q = sqlx::query(
            "UPDATE vms SET state = $1, pid = $2, state_at = $5,
             report_seq = CASE WHEN $6 > report_seq THEN $6 ELSE report_seq END
             WHERE id = $3 AND state <> $4 AND ($6 = 0 OR report_seq < $6)",
        )
        .bind(state.as_str())
        .bind(pid)
        .bind(id)
        .bind(VmState::Deleted.as_str())
        .bind(now_ms())
        .bind(seq as i64);
        Ok(self.metered(q, Scope::Vm(id)).await? == 1)
    }

    /// The VMs placed on `host` (not deleted).
    pub async fn vms_on(&self, host: &str) -> Result<Vec<Vm>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {VM_COLUMNS} FROM {VM_ROWS} WHERE host_id = $1 AND state <> $2 ORDER BY vms.id"
        ))
        .bind(host)
        .bind(VmState::Deleted.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(vm).collect::<Result<_, _>>()?)
    }

    /// Moves a VM from state `from` to `to`; false if it was not in `from` (a migration starts
    /// only from running, and ends only once).
    pub async fn transition_vm(
        &self,
        id: &str,
        from: VmState,
        to: VmState,
    ) -> Result<bool, DbError> {
        let q =
            sqlx::query("UPDATE vms SET state = $1, state_at = $4 WHERE id = $2 AND state = $3")
                .bind(to.as_str())
                .bind(id)
                .bind(from.as_str())
                .bind(now_ms());
        Ok(self.metered(q, Scope::Vm(id)).await? == 1)
    }

    /// A migration completed: in one statement the VM runs on `target` (its disk path is the
    /// same on every host) and remembers how it went. False if it was not migrating.
    pub async fn finish_migration(
        &self,
        id: &str,
        target: &str,
        pid: i64,
        how: &str,
    ) -> Result<bool, DbError> {
        let q = sqlx::query(
            "UPDATE vms SET host_id = $1, state = $2, pid = $3, last_migration = $4, state_at = $7,
             report_seq = 0
             WHERE id = $5 AND state = $6",
        )
        .bind(target)
        .bind(VmState::Running.as_str())
        .bind(pid)
        .bind(how)
        .bind(id)
        .bind(VmState::Migrating.as_str())
        .bind(now_ms());
        Ok(self.metered(q, Scope::Vm(id)).await? == 1)
    }

    /// A restart's placement: the VM moves from `from` (its failed host) to `to`, to be created
    /// there; false if it is no longer on `from` or was deleted.
    pub async fn move_vm(&self, id: &str, from: &str, to: &str) -> Result<bool, DbError> {
        let q = sqlx::query(
            "UPDATE vms SET host_id = $1, state = $2, pid = 0, report_seq = 0, state_at = $3
             WHERE id = $4 AND host_id = $5 AND state <> $6",
        )
        .bind(to)
        .bind(VmState::Creating.as_str())
        .bind(now_ms())
        .bind(id)
        .bind(from)
        .bind(VmState::Deleted.as_str());
        Ok(self.metered(q, Scope::Vm(id)).await? == 1)
    }

    /// A VM whose state went to shared storage: on no host (its capacity is free), suspended.
    pub async fn suspend_vm(&self, id: &str) -> Result<(), DbError> {
        let q = sqlx::query(
            "UPDATE vms SET host_id = '', state = $1, pid = 0, report_seq = 0, state_at = $2
             WHERE id = $3 AND state <> $4",
        )
        .bind(VmState::Suspended.as_str())
        .bind(now_ms())
        .bind(id)
        .bind(VmState::Deleted.as_str());
        self.metered(q, Scope::Vm(id)).await?;
        Ok(())
    }

    /// Sets when a VM is suspended for being idle (`idle_s` 0: as its consumer's policy says;
    /// -1: never); false if there is no such VM.
    pub async fn set_auto_suspend(&self, id: &str, pct: i64, idle_s: i64) -> Result<bool, DbError> {
        let r =
            sqlx::query("UPDATE vms SET auto_suspend_pct = $1, auto_suspend_s = $2 WHERE id = $3")
                .bind(pct)
                .bind(idle_s)
                .bind(id)
                .execute(&self.writer)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Every VM not deleted (the metrics' inventory, the balancer's model).
    pub async fn live_vms(&self) -> Result<Vec<Vm>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {VM_COLUMNS} FROM {VM_ROWS} WHERE state <> $1"
        ))
        .bind(VmState::Deleted.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(vm).collect::<Result<_, _>>()?)
    }

    /// Running VMs that are suspended when idle, by their own setting or, without one, their
    /// consumer's (the setting that applies is in `auto_suspend_pct` and `auto_suspend_s`).
    pub async fn auto_suspend_vms(&self) -> Result<Vec<Vm>, DbError> {
        // Two parts, each found through an index: VMs with their own setting, and the VMs of
        // consumers with a policy, from the policies through the VMs' owner index (CROSS JOIN
        // fixes SQLite's join order, `+` keeps it off the auto-suspend index, which holds
        // nearly every VM under 0).
        read!(self, p => {
            let rows = sqlx::query(&format!(
                "SELECT {VM_COLUMNS}, 0 AS consumer_pct, 0 AS consumer_s FROM {VM_ROWS}
                 WHERE vms.auto_suspend_s > 0 AND vms.state = $1
                 UNION ALL
                 SELECT {VM_COLUMNS}, p.idle_pct AS consumer_pct, p.idle_s AS consumer_s
                 FROM auto_suspend_policies p CROSS JOIN {VM_ROWS}
                 WHERE vms.owner = p.consumer AND p.idle_s > 0 AND +vms.auto_suspend_s = 0
                   AND vms.state = $1",
            ))
            .bind(VmState::Running.as_str())
            .fetch_all(p)
            .await?;
            let mut out = Vec::new();
            for r in &rows {
                let mut v = vm(r)?;
                if v.auto_suspend_s == 0 {
                    v.auto_suspend_pct = r.col("consumer_pct")?;
                    v.auto_suspend_s = r.col("consumer_s")?;
                }
                out.push(v);
            }
            Ok(out)
        })
    }

    /// Sets consumer `consumer`'s auto-suspend policy, for its VMs without one of their own
    /// (`idle_s` 0: none).
    pub async fn set_consumer_auto_suspend(
        &self,
        consumer: &str,
        pct: i64,
        idle_s: i64,
    ) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO auto_suspend_policies (consumer, idle_pct, idle_s) VALUES ($1, $2, $3)
             ON CONFLICT (consumer) DO UPDATE SET idle_pct = excluded.idle_pct, idle_s = excluded.idle_s",
        )
        .bind(consumer)
        .bind(pct)
        .bind(idle_s)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Sets a VM's HA policy, restart priority and checkpoint interval; false if there is no
    /// such VM.
    pub async fn set_ha(
        &self,
        id: &str,
        ha: HaPolicy,
        priority: i64,
        checkpoint_ms: i64,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE vms SET ha = $1, ha_priority = $2, checkpoint_ms = $3 WHERE id = $4",
        )
        .bind(ha.as_str())
        .bind(priority)
        .bind(checkpoint_ms)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The VMs that have or should have a standby: HA policy `standby` (not deleted), or a
    /// standby host recorded (deleted or not: a deleted VM's standby is stopped).
    pub async fn standby_vms(&self) -> Result<Vec<Vm>, DbError> {
        // Through the `ha` and `standby_host` indexes (`> ''`, a range, where `<> ''` is a
        // scan), sorted here: an ORDER BY id makes SQLite walk the whole table in id order.
        let mut vms: Vec<Vm> = read!(self, p => {
            let rows = sqlx::query(&format!(
                "SELECT {VM_COLUMNS} FROM {VM_ROWS}
                 WHERE (ha = $1 AND state <> $2) OR standby_host > ''",
            ))
            .bind(HaPolicy::Standby.as_str())
            .bind(VmState::Deleted.as_str())
            .fetch_all(p)
            .await?;
            rows.iter().map(vm).collect::<Result<_, _>>()?
        });
        vms.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(vms)
    }

    /// Moves a VM's standby from host `from` to `to` ('' for none), counted as seen now; false
    /// if its standby host was not `from` (changed meanwhile).
    pub async fn set_standby_host(&self, id: &str, from: &str, to: &str) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE vms SET standby_host = $1, standby_seen = $2 WHERE id = $3 AND standby_host = $4",
        )
        .bind(to)
        .bind(now_ms())
        .bind(id)
        .bind(from)
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// The VMs an availability report covers: made before `to`, deleted or not; a consumer's
    /// (`owner`), or one (`id`), or all.
    pub async fn vms_for_report(
        &self,
        owner: Option<&str>,
        id: Option<&str>,
        to: i64,
    ) -> Result<Vec<Vm>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {VM_COLUMNS} FROM {VM_ROWS} WHERE created_at < $1 AND ($2 = '' OR owner = $2)
             AND ($3 = '' OR vms.id = $3) ORDER BY vms.id",
        ))
        .bind(to)
        .bind(owner.unwrap_or(""))
        .bind(id.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(vm).collect::<Result<_, _>>()?)
    }

    /// Records the vCPUs a VM has now (a resize's answer).
    pub async fn set_vm_size(&self, id: &str, vcpus: i64, memory_mib: i64) -> Result<(), DbError> {
        let q = sqlx::query("UPDATE vms SET vcpus = $1, memory_mib = $2 WHERE id = $3")
            .bind(vcpus)
            .bind(memory_mib)
            .bind(id);
        self.metered(q, Scope::Vm(id)).await?;
        Ok(())
    }

    /// Deletes a VM that was never placed, unless it has been placed meanwhile (false: send
    /// the delete to its host instead).
    pub async fn delete_unplaced_vm(&self, id: &str) -> Result<bool, DbError> {
        let q = sqlx::query("UPDATE vms SET state = $2, pid = 0 WHERE id = $1 AND host_id = ''")
            .bind(id)
            .bind(VmState::Deleted.as_str());
        Ok(self.metered(q, Scope::Vm(id)).await? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::databases;
    use crate::db::{new_id, Job, JobKind};

    /// Pages of a VM listing join up to the whole listing: oldest first, ties by id, nobody
    /// else's VMs and no deleted ones, each once.
    #[tokio::test]
    async fn vm_pages() {
        for (db, _dir) in databases().await {
            let mut ids = Vec::new();
            for i in 0..8 {
                let (owner, state) = match i {
                    3 => ("bob", VmState::Running),
                    5 => ("alice", VmState::Deleted),
                    _ => ("alice", VmState::Running),
                };
                let vm = Vm {
                    id: new_id(),
                    name: format!("v{i}"),
                    owner: owner.into(),
                    state,
                    // Pairs of VMs created in the same millisecond.
                    created_at: 1000 + i / 2,
                    ..Vm::default()
                };
                db.add_job(&Job::new(JobKind::Create, owner, &vm.id), Some(&vm))
                    .await
                    .unwrap();
                if owner == "alice" && state != VmState::Deleted {
                    ids.push((vm.created_at, vm.id));
                }
            }
            ids.sort();
            let want: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
            let whole: Vec<String> = db
                .vms(Some("alice"), None, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.id)
                .collect();
            assert_eq!(whole, want);
            let mut paged: Vec<String> = Vec::new();
            let mut after: Option<Vm> = None;
            loop {
                let page = db.vms(Some("alice"), after.as_ref(), 2).await.unwrap();
                assert!(page.len() <= 2);
                paged.extend(page.iter().map(|v| v.id.clone()));
                match page.last() {
                    Some(last) if page.len() == 2 => after = Some(last.clone()),
                    _ => break,
                }
            }
            assert_eq!(paged, want);
            assert_eq!(db.vms(None, None, 100).await.unwrap().len(), want.len() + 1);
        }
    }
}
