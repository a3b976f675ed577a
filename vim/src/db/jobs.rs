//! Jobs: what the API was asked to do, written before anything is published (outbox), moved
//! on by the workers and by the hosts' answers.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{marks, named, new_id, now_ms, Db, DbError, Vm, VmState, HEARTBEAT_CHUNK};

/// What a job does to its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    Create,
    Start,
    Stop,
    Delete,
    /// Live migration to another host; carried out by the child jobs below, one per host
    /// command.
    Migrate,
    /// The target host starts a VMM that waits for the handover.
    MigrateIn,
    /// The source host hands the VM over.
    MigrateOut,
    /// The target host stops its waiting VMM: the migration will not come.
    AbortIncoming,
    /// Failover: the VM boots again on another host (its own failed).
    Restart,
    /// A host that was cut off stops and forgets a VM that runs elsewhere now.
    Evict,
    /// The VM's host changes its vCPUs and memory while it runs (params: `ResizeParams`).
    Resize,
    /// The VM's host is told the scaling watch of the policy that applies to it now.
    SetScaling,
    /// The VM's host is told how often to checkpoint it now (its HA policy changed).
    SetCheckpoints,
    /// The VM's state goes to shared storage and its host's capacity is freed.
    Suspend,
    /// A suspended VM runs again, on a host placement picks (params: `{"to": HOST}`, optional).
    Resume,
    /// The host the job names starts a standby VMM for the VM (docs/standby.md).
    Standby,
}

vim_proto::names!(JobKind {
    Create => "create",
    Start => "start",
    Stop => "stop",
    Delete => "delete",
    Migrate => "migrate",
    MigrateIn => "migrate-in",
    MigrateOut => "migrate-out",
    AbortIncoming => "abort-incoming",
    Restart => "restart",
    Evict => "evict",
    Resize => "resize",
    SetScaling => "set-scaling",
    SetCheckpoints => "set-checkpoints",
    Suspend => "suspend",
    Resume => "resume",
    Standby => "standby",
});

/// Where a job is: written (`pending`), its command sent (`running`), answered (`done` or
/// `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
}

vim_proto::names!(JobState {
    Pending => "pending",
    Running => "running",
    Done => "done",
    Failed => "failed",
});

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub owner: String,
    pub vm_id: String,
    pub state: JobState,
    pub published: bool,
    /// The host its command went to (empty before it was sent, or for jobs needing none).
    pub host_id: String,
    pub attempts: i64,
    pub error: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// The job this one is a step of (a migration's host commands), or empty.
    pub parent_id: String,
    /// What the job was asked for beyond its kind (a migration's target and downtime), as JSON.
    pub params: String,
    /// A migration's latest progress as its source reported it (JSON), or null.
    #[serde(serialize_with = "super::vms::json_or_null")]
    pub progress: String,
}

impl Job {
    /// A new pending job, not yet published.
    pub fn new(kind: JobKind, owner: &str, vm_id: &str) -> Job {
        let now = now_ms();
        Job {
            id: new_id(),
            kind,
            owner: owner.into(),
            vm_id: vm_id.into(),
            state: JobState::Pending,
            published: false,
            host_id: String::new(),
            attempts: 0,
            error: String::new(),
            created_at: now,
            updated_at: now,
            parent_id: String::new(),
            params: String::new(),
            progress: String::new(),
        }
    }

    /// A step of `parent` that `host` carries out.
    pub fn child(parent: &Job, kind: JobKind, host: &str) -> Job {
        Job {
            parent_id: parent.id.clone(),
            host_id: host.into(),
            ..Job::new(kind, &parent.owner, &parent.vm_id)
        }
    }
}

fn job(r: &AnyRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: r.try_get("id")?,
        kind: named(r, "kind")?,
        owner: r.try_get("owner")?,
        vm_id: r.try_get("vm_id")?,
        state: named(r, "state")?,
        published: r.try_get::<i64, _>("published")? != 0,
        host_id: r.try_get("host_id")?,
        attempts: r.try_get("attempts")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        parent_id: r.try_get("parent_id")?,
        params: r.try_get("params")?,
        progress: r.try_get("progress")?,
    })
}

async fn insert_job(tx: &mut sqlx::Transaction<'_, sqlx::Any>, job: &Job) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO jobs (id, kind, owner, vm_id, state, created_at, updated_at, parent_id,
                           params, host_id)
         VALUES ($1, $2, $3, $4, $6, $5, $5, $7, $8, $9)",
    )
    .bind(&job.id)
    .bind(job.kind.as_str())
    .bind(&job.owner)
    .bind(&job.vm_id)
    .bind(job.created_at)
    .bind(JobState::Pending.as_str())
    .bind(&job.parent_id)
    .bind(&job.params)
    .bind(&job.host_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Db {
    /// Writes a VM (when `vm` is given) and the job that acts on it in one transaction: the job
    /// exists before anything is published (outbox).
    pub async fn add_job(&self, job: &Job, new_vm: Option<&Vm>) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        if let Some(v) = new_vm {
            sqlx::query(
                "INSERT INTO vms (id, name, owner, image, vcpus, memory_mib, state, created_at, mac, ha,
                                  ha_priority, max_vcpus, max_memory_mib, affinity_group, sla_target,
                                  checkpoint_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            )
            .bind(&v.id)
            .bind(&v.name)
            .bind(&v.owner)
            .bind(&v.image)
            .bind(v.vcpus)
            .bind(v.memory_mib)
            .bind(v.state.as_str())
            .bind(v.created_at)
            .bind(&v.mac)
            .bind(v.ha.as_str())
            .bind(v.ha_priority)
            .bind(v.max_vcpus)
            .bind(v.max_memory_mib)
            .bind(&v.group)
            .bind(v.sla_target)
            .bind(v.checkpoint_ms)
            .execute(&mut *tx)
            .await?;
        }
        insert_job(&mut tx, job).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes a job that needs no publishing: a step a worker carries out at once (it is
    /// marked published so the reconciler never sends it through the job queue).
    pub async fn add_step(&self, job: &Job) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        insert_job(&mut tx, job).await?;
        sqlx::query("UPDATE jobs SET published = 1 WHERE id = $1")
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A job's parameters, once decided (a migration's target).
    pub async fn set_job_params(&self, id: &str, params: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET params = $1 WHERE id = $2")
            .bind(params)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Marks jobs published (their messages are in `VIM_JOBS`), in as few statements as possible.
    pub async fn mark_published(&self, job_ids: &[String]) -> Result<(), DbError> {
        for chunk in job_ids.chunks(HEARTBEAT_CHUNK) {
            let sql = format!(
                "UPDATE jobs SET published = 1 WHERE id IN ({})",
                marks(1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            q.execute(&self.writer).await?;
        }
        Ok(())
    }

    /// Published jobs of `kind` still pending (waiting for a slot, or not yet taken).
    pub async fn pending_jobs(&self, kind: JobKind) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE published = 1 AND state = $1 AND kind = $2
             ORDER BY created_at LIMIT 1000",
        )
        .bind(JobState::Pending.as_str())
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// Migrations under way out of `source` (its VMs migrating) and into `target` (running
    /// migrate jobs, which record their target as their host).
    pub async fn migrations_at(&self, source: &str, target: &str) -> Result<(i64, i64), DbError> {
        let out = sqlx::query("SELECT COUNT(*) AS n FROM vms WHERE host_id = $1 AND state = $2")
            .bind(source)
            .bind(VmState::Migrating.as_str())
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        let inc = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE host_id = $1 AND kind = $2 AND state = $3",
        )
        .bind(target)
        .bind(JobKind::Migrate.as_str())
        .bind(JobState::Running.as_str())
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok((out, inc))
    }

    /// Running migrations into `target` (their job records the target as its host).
    pub async fn migrations_into(&self, target: &str) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE host_id = $1 AND kind = $2 AND state = $3 AND parent_id = ''",
        )
        .bind(target)
        .bind(JobKind::Migrate.as_str())
        .bind(JobState::Running.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// The steps of job `parent`, oldest first.
    pub async fn steps(&self, parent: &str) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE parent_id = $1 ORDER BY created_at")
            .bind(parent)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// Jobs written but not confirmed published, older than `age_ms`.
    pub async fn unpublished_jobs(&self, age_ms: i64) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE published = 0 AND state = $2 AND created_at < $1",
        )
        .bind(now_ms() - age_ms)
        .bind(JobState::Pending.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// Jobs published and still in `state` (`pending`: NATS lost the message or no worker took
    /// it; `running`: no answer from the host) after `age_ms`; each is touched so it comes back
    /// only once per `age_ms`.
    pub async fn stale_jobs(&self, state: JobState, age_ms: i64) -> Result<Vec<Job>, DbError> {
        let cutoff = now_ms() - age_ms;
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE published = 1 AND state = $1 AND updated_at < $2",
        )
        .bind(state.as_str())
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let jobs: Vec<Job> = rows.iter().map(job).collect::<Result<_, _>>()?;
        for chunk in jobs.chunks(HEARTBEAT_CHUNK) {
            // $1 and $2 are the time and state; the ids follow.
            let sql = format!(
                "UPDATE jobs SET updated_at = $1 WHERE state = $2 AND id IN ({})",
                marks(3, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now_ms()).bind(state.as_str());
            for j in chunk {
                q = q.bind(&j.id);
            }
            q.execute(&self.writer).await?;
        }
        Ok(jobs)
    }

    /// How many jobs of `kind` are running.
    pub async fn count_running(&self, kind: JobKind) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE kind = $1 AND state = $2")
            .bind(kind.as_str())
            .bind(JobState::Running.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(r.try_get("n")?)
    }

    /// The oldest of VM `of.vm_id`'s other jobs (not steps) that has not ended and was queued
    /// before `of`, if any.
    pub async fn earlier_unfinished_job(&self, of: &Job) -> Result<Option<Job>, DbError> {
        let r = sqlx::query(
            "SELECT * FROM jobs WHERE vm_id = $1 AND id <> $2 AND parent_id = ''
               AND (state = $3 OR state = $4)
               AND (created_at < $5 OR (created_at = $5 AND id < $2))
             ORDER BY created_at, id LIMIT 1",
        )
        .bind(&of.vm_id)
        .bind(&of.id)
        .bind(JobState::Pending.as_str())
        .bind(JobState::Running.as_str())
        .bind(of.created_at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(job).transpose()?)
    }

    /// Every job that has not ended (pending or running), steps included.
    pub async fn unfinished_jobs(&self) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE state = $1 OR state = $2")
            .bind(JobState::Pending.as_str())
            .bind(JobState::Running.as_str())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// How many of VM `vm_id`'s jobs have not ended (pending or running).
    pub async fn unfinished_jobs_for(&self, vm_id: &str) -> Result<i64, DbError> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE vm_id = $1 AND (state = $2 OR state = $3)",
        )
        .bind(vm_id)
        .bind(JobState::Pending.as_str())
        .bind(JobState::Running.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(r.try_get("n")?)
    }

    /// The kind of the VIM's own unfinished job moving VM `vm_id` (a failover restart or a
    /// live migration), if there is one: the owner's lifecycle requests wait until it ends.
    pub async fn moving_job(&self, vm_id: &str) -> Result<Option<JobKind>, DbError> {
        let r = sqlx::query(
            "SELECT kind FROM jobs WHERE vm_id = $1 AND (state = $2 OR state = $3) \
             AND (kind = $4 OR kind = $5) LIMIT 1",
        )
        .bind(vm_id)
        .bind(JobState::Pending.as_str())
        .bind(JobState::Running.as_str())
        .bind(JobKind::Restart.as_str())
        .bind(JobKind::Migrate.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.map(|row| super::named(&row, "kind")).transpose()?)
    }

    /// How many jobs of `kind` VM `vm_id` has had since `since_ms`.
    pub async fn count_jobs_since(
        &self,
        vm_id: &str,
        kind: JobKind,
        since_ms: i64,
    ) -> Result<i64, DbError> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE vm_id = $1 AND kind = $2 AND created_at >= $3",
        )
        .bind(vm_id)
        .bind(kind.as_str())
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(r.try_get("n")?)
    }

    /// Records how VM `vm_id`'s running migration advances; false if none runs.
    pub async fn set_migration_progress(
        &self,
        vm_id: &str,
        progress: &str,
    ) -> Result<bool, DbError> {
        let r = sqlx::query(
            "UPDATE jobs SET progress = $1 WHERE vm_id = $2 AND kind = $3 AND state = $4 AND parent_id = ''",
        )
        .bind(progress)
        .bind(vm_id)
        .bind(JobKind::Migrate.as_str())
        .bind(JobState::Running.as_str())
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, DbError> {
        let r = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(job).transpose()?)
    }

    pub async fn jobs(&self, owner: Option<&str>, limit: i64) -> Result<Vec<Job>, DbError> {
        let rows = match owner {
            Some(o) => {
                sqlx::query("SELECT * FROM jobs WHERE owner = $1 ORDER BY created_at DESC LIMIT $2")
                    .bind(o)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM jobs ORDER BY created_at DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.iter().map(job).collect::<Result<_, _>>()?)
    }

    /// Moves a job on; `from` guards against doing it twice (false: it was not in `from`).
    pub async fn transition_job(
        &self,
        id: &str,
        from: &[JobState],
        to: JobState,
        error: &str,
    ) -> Result<bool, DbError> {
        let placeholders: Vec<String> = (0..from.len()).map(|i| format!("${}", i + 4)).collect();
        let sql = format!(
            "UPDATE jobs SET state = $1, error = $2, updated_at = $3, attempts = attempts + 1
             WHERE id = ${} AND state IN ({})",
            from.len() + 4,
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(error)
            .bind(now_ms());
        for f in from {
            q = q.bind(f.as_str());
        }
        let r = q.bind(id).execute(&self.writer).await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records the host a job's command goes to, before it is sent (an answer may come back
    /// before the job is marked running).
    pub async fn assign_job_host(&self, id: &str, host_id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE jobs SET host_id = $1 WHERE id = $2")
            .bind(host_id)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::{databases, pending_vm};
    use crate::db::{HostReport, VmState};

    /// A change queued behind an unfinished one for the same VM sees it; the first sees none;
    /// steps, other VMs' jobs and ended jobs do not count.
    #[tokio::test]
    async fn a_later_change_sees_the_earlier_one_under_way() {
        for (db, _dir) in databases().await {
            let vm = pending_vm();
            let at = now_ms();
            let create = Job {
                created_at: at - 10,
                ..Job::new(JobKind::Create, "alice", &vm.id)
            };
            db.add_job(&create, Some(&vm)).await.unwrap();
            db.transition_job(&create.id, &[JobState::Pending], JobState::Done, "")
                .await
                .unwrap();
            let suspend = Job {
                created_at: at,
                ..Job::new(JobKind::Suspend, "alice", &vm.id)
            };
            let resize = Job {
                created_at: at,
                ..Job::new(JobKind::Resize, "alice", &vm.id)
            };
            let other = Job::new(JobKind::Stop, "alice", "another-vm");
            for j in [&suspend, &resize, &other] {
                db.add_job(j, None).await.unwrap();
            }
            db.add_step(&Job::child(&suspend, JobKind::MigrateIn, "h"))
                .await
                .unwrap();
            // Same millisecond: the id orders them.
            let (first, second) = if suspend.id < resize.id {
                (&suspend, &resize)
            } else {
                (&resize, &suspend)
            };
            assert_eq!(db.earlier_unfinished_job(first).await.unwrap(), None);
            let seen = db.earlier_unfinished_job(second).await.unwrap().unwrap();
            assert_eq!(seen.id, first.id);
            db.transition_job(&first.id, &[JobState::Pending], JobState::Failed, "x")
                .await
                .unwrap();
            assert_eq!(db.earlier_unfinished_job(second).await.unwrap(), None);
        }
    }

    /// A failover restart or a migration under way is the VIM moving the VM; the owner's own
    /// jobs, other VMs' and ended ones are not.
    #[tokio::test]
    async fn the_vims_own_moves_are_seen_until_they_end() {
        for (db, _dir) in databases().await {
            let vm = pending_vm();
            let create = Job::new(JobKind::Create, "alice", &vm.id);
            db.add_job(&create, Some(&vm)).await.unwrap();
            let stop = Job::new(JobKind::Stop, "alice", &vm.id);
            db.add_job(&stop, None).await.unwrap();
            assert_eq!(db.moving_job(&vm.id).await.unwrap(), None);
            for kind in [JobKind::Restart, JobKind::Migrate] {
                let j = Job::new(kind, "vimd", &vm.id);
                db.add_job(&j, None).await.unwrap();
                db.add_job(&Job::new(kind, "vimd", "another-vm"), None)
                    .await
                    .unwrap();
                assert_eq!(db.moving_job(&vm.id).await.unwrap(), Some(kind));
                db.transition_job(&j.id, &[JobState::Pending], JobState::Done, "")
                    .await
                    .unwrap();
                assert_eq!(db.moving_job(&vm.id).await.unwrap(), None);
            }
        }
    }

    #[tokio::test]
    async fn jobs_move_once() {
        for (db, _dir) in databases().await {
            let vm = pending_vm();
            let job = Job {
                created_at: now_ms() - 10_000,
                ..Job::new(JobKind::Create, "alice", &vm.id)
            };
            db.add_job(&job, Some(&vm)).await.unwrap();
            assert_eq!(db.unpublished_jobs(1000).await.unwrap().len(), 1);
            db.mark_published(std::slice::from_ref(&job.id))
                .await
                .unwrap();
            assert!(db.unpublished_jobs(1000).await.unwrap().is_empty());
            // Published 10 s ago and never taken: stale once, then not again until it ages.
            assert_eq!(
                db.stale_jobs(JobState::Pending, 1000).await.unwrap().len(),
                1
            );
            assert!(db
                .stale_jobs(JobState::Pending, 1000)
                .await
                .unwrap()
                .is_empty());
            assert!(db
                .stale_jobs(JobState::Running, 0)
                .await
                .unwrap()
                .is_empty());
            assert!(db
                .transition_job(&job.id, &[JobState::Pending], JobState::Running, "")
                .await
                .unwrap());
            assert!(
                !db.transition_job(&job.id, &[JobState::Pending], JobState::Running, "")
                    .await
                    .unwrap(),
                "a job moved twice"
            );
            // Deleted is final: no report, late answer or placement brings it back.
            assert!(db.delete_unplaced_vm(&vm.id).await.unwrap());
            assert!(!db
                .set_vm_state(&vm.id, VmState::Running, 7, 0)
                .await
                .unwrap());
            assert!(!db.place_vm(&vm.id, "h1", "").await.unwrap());
            assert_eq!(
                db.vm(&vm.id).await.unwrap().unwrap().state,
                VmState::Deleted
            );
            assert_eq!(db.vms(Some("alice"), None, 100).await.unwrap().len(), 0);
            assert_eq!(db.vms(Some("bob"), None, 100).await.unwrap().len(), 0);
            db.add_host("h1", "u", "p").await.unwrap();
            assert!(matches!(
                db.add_host("h1", "u", "p").await,
                Err(DbError::Conflict(_))
            ));
        }
    }

    /// A report taken before another (a heartbeat built before a create's answer) changes
    /// nothing once the newer one is applied, whichever path each comes by; vimd's own
    /// decisions (seq 0) always apply.
    #[tokio::test]
    async fn older_reports_do_not_undo_newer_ones() {
        for (db, _dir) in databases().await {
            let vm = pending_vm();
            let job = Job::new(JobKind::Create, "alice", &vm.id);
            db.add_job(&job, Some(&vm)).await.unwrap();
            db.add_host("h1", "u", "p").await.unwrap();
            assert!(db.place_vm(&vm.id, "h1", "").await.unwrap());
            let state = || async { db.vm(&vm.id).await.unwrap().unwrap().state };
            // The answer: running, report 200.
            assert!(db
                .set_vm_state(&vm.id, VmState::Running, 7, 200)
                .await
                .unwrap());
            // A heartbeat built earlier (creating, report 100), received later.
            let hb = |state: VmState, seq: u64| vim_proto::Heartbeat {
                host_id: "h1".into(),
                vms: vec![vim_proto::VmReport {
                    vm_id: vm.id.clone(),
                    state: state.into(),
                    pid: 7,
                    seq,
                    ..Default::default()
                }],
                ..Default::default()
            };
            let later = now_ms() + 1000;
            db.record_heartbeats(&[HostReport::new(hb(VmState::Creating, 100), later)])
                .await
                .unwrap();
            assert_eq!(state().await, VmState::Running);
            assert!(!db
                .set_vm_state(&vm.id, VmState::Creating, 7, 150)
                .await
                .unwrap());
            assert_eq!(state().await, VmState::Running);
            // Newer reports apply, by either path.
            db.record_heartbeats(&[HostReport::new(hb(VmState::Stopped, 300), later)])
                .await
                .unwrap();
            assert_eq!(state().await, VmState::Stopped);
            assert!(db
                .set_vm_state(&vm.id, VmState::Running, 7, 400)
                .await
                .unwrap());
            assert_eq!(state().await, VmState::Running);
            // vimd's own decision.
            assert!(db
                .set_vm_state(&vm.id, VmState::Failed, 0, 0)
                .await
                .unwrap());
            assert_eq!(state().await, VmState::Failed);
        }
    }
}
