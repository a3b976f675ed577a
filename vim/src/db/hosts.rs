//! Hosts: what they report, their liveness state, and where a new VM fits.

use serde::Serialize;
use sqlx::Row;

use super::usage::{meter, Scope};
use super::{marks, named, now_ms, read, Cols, Db, DbError, VmState, BATCH_ROWS, HEARTBEAT_CHUNK};

/// A heartbeat's host row: id, hostname, cores, memory, agent version, time, address.
const HOST_ROW: [&str; 7] = ["TEXT", "TEXT", "BIGINT", "BIGINT", "TEXT", "BIGINT", "TEXT"];
/// A VM's usage row: host, VM, CPU, RSS, VMM CPU, balloon, time.
const USAGE_ROW: [&str; 7] = [
    "TEXT",
    "TEXT",
    "DOUBLE PRECISION",
    "BIGINT",
    "DOUBLE PRECISION",
    "BIGINT",
    "BIGINT",
];
/// A VM report's facts: VM, host, state, pid, time, sequence number.
const FACTS_ROW: [&str; 6] = ["TEXT", "TEXT", "TEXT", "BIGINT", "BIGINT", "BIGINT"];

/// Whether a host's heartbeats arrive: not yet since it was added, yes, or not for the number
/// of intervals that makes it unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HostState {
    #[default]
    Registered,
    Reachable,
    Unreachable,
}

vim_proto::names!(HostState {
    Registered => "registered",
    Reachable => "reachable",
    Unreachable => "unreachable",
});

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Host {
    pub id: String,
    pub hostname: String,
    pub address: String,
    pub cpu_cores: i64,
    pub memory_mib: i64,
    pub agent_version: String,
    pub state: HostState,
    /// Takes no new VMs (placement and migrations skip it); its VMs are being moved away.
    pub draining: bool,
    pub last_heartbeat: i64,
    pub missed: i64,
    #[serde(skip)]
    pub nats_user: String,
    /// A bcrypt hash (the plaintext is only in the credentials handed to the host).
    #[serde(skip)]
    pub nats_password_hash: String,
}

/// A heartbeat to write: the report, when it came, and whether its facts (the VMs the host runs,
/// their states and pids) may differ from what was written last. Without, only the figures and
/// the host's `last_heartbeat` are written: no VM row is read or rewritten.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub hb: vim_proto::Heartbeat,
    pub at: i64,
    pub facts: bool,
}

impl HostReport {
    /// A report written whole.
    pub fn new(hb: vim_proto::Heartbeat, at: i64) -> HostReport {
        HostReport {
            hb,
            at,
            facts: true,
        }
    }
}

/// A host's state and missed-heartbeat count, as the monitor sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct HostChange {
    pub host: String,
    pub state: HostState,
    pub missed: i64,
}

fn host(r: &impl Cols) -> Result<Host, sqlx::Error> {
    Ok(Host {
        id: r.col("id")?,
        hostname: r.col("hostname")?,
        address: r.col("address")?,
        cpu_cores: r.col("cpu_cores")?,
        memory_mib: r.col("memory_mib")?,
        agent_version: r.col("agent_version")?,
        state: named(r, "state")?,
        draining: r.col::<i64>("draining")? != 0,
        last_heartbeat: r.col("last_heartbeat")?,
        missed: r.col("missed")?,
        nats_user: r.col("nats_user")?,
        nats_password_hash: r.col("nats_password")?,
    })
}

/// How many hosts a placement weighs at most before it looks at all of them
/// ([`Db::roomiest_host`]).
pub const PLACEMENT_SAMPLE: i64 = 32;

/// A host as placement weighs it.
struct Capacity {
    id: String,
    cpu_cores: i64,
    memory_mib: i64,
}

fn capacity(r: &impl Cols) -> Result<Capacity, sqlx::Error> {
    Ok(Capacity {
        id: r.col("id")?,
        cpu_cores: r.col("cpu_cores")?,
        memory_mib: r.col("memory_mib")?,
    })
}

/// A host's random position in placement's sample order (a non-negative 63-bit number).
pub fn place_key() -> i64 {
    (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64
}

impl Db {
    /// A new host, with its NATS user and that user's password hash.
    pub async fn add_host(&self, id: &str, user: &str, password_hash: &str) -> Result<(), DbError> {
        let r = sqlx::query(
            "INSERT INTO hosts (id, state, nats_user, nats_password, created_at, place_key)
             VALUES ($1, $5, $2, $3, $4, $6)",
        )
        .bind(id)
        .bind(user)
        .bind(password_hash)
        .bind(now_ms())
        .bind(HostState::Registered.as_str())
        .bind(place_key())
        .execute(&self.writer)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::Conflict(format!("host {id} already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the hosts added before placement sampled (migration 0014) their random place key.
    pub(super) async fn key_unkeyed_hosts(&self) -> Result<(), DbError> {
        let rows = sqlx::query("SELECT id FROM hosts WHERE place_key = 0")
            .fetch_all(&self.writer)
            .await?;
        for r in rows {
            sqlx::query("UPDATE hosts SET place_key = $1 WHERE id = $2 AND place_key = 0")
                .bind(place_key())
                .bind(r.try_get::<String, _>("id")?)
                .execute(&self.writer)
                .await?;
        }
        Ok(())
    }

    /// Removes a host that runs no VM (any VM placed on it that is not deleted, stopped ones
    /// included, keeps it: Conflict); false if there is no such host. Its join tokens go too.
    pub async fn remove_host(&self, id: &str) -> Result<bool, DbError> {
        let mut tx = self.writer.begin().await?;
        let vms: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM vms WHERE host_id = $1 AND state <> $2")
                .bind(id)
                .bind(VmState::Deleted.as_str())
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
        if vms > 0 {
            return Err(DbError::Conflict(format!(
                "host {id} has {vms} VMs: move or delete them first (vimctl host remove {id} --drain)"
            )));
        }
        let gone = sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        sqlx::query("DELETE FROM join_tokens WHERE host_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(gone)
    }

    /// Replaces a host's NATS password hash (new credentials, or a plaintext password stored by
    /// an older vimd).
    pub async fn set_host_password_hash(&self, id: &str, hash: &str) -> Result<bool, DbError> {
        let r = sqlx::query("UPDATE hosts SET nats_password = $1 WHERE id = $2")
            .bind(hash)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn hosts(&self) -> Result<Vec<Host>, DbError> {
        let rows = sqlx::query("SELECT * FROM hosts ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(host).collect::<Result<_, _>>()?)
    }

    /// The hosts in `state`, and how many hosts there are in all.
    pub async fn hosts_in_state(&self, state: HostState) -> Result<(Vec<Host>, i64), DbError> {
        read!(self, p => {
            let rows = sqlx::query("SELECT * FROM hosts WHERE state = $1 ORDER BY id")
                .bind(state.as_str())
                .fetch_all(p)
                .await?;
            let all = sqlx::query("SELECT COUNT(*) AS n FROM hosts").fetch_one(p).await?;
            let hosts = rows.iter().map(host).collect::<Result<_, _>>()?;
            Ok((hosts, all.col("n")?))
        })
    }

    /// The hosts among `ids` that exist (one query per few hundred ids).
    pub async fn hosts_among(&self, ids: &[String]) -> Result<Vec<Host>, DbError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(HEARTBEAT_CHUNK) {
            let sql = format!(
                "SELECT * FROM hosts WHERE id IN ({})",
                marks(1, chunk.len())
            );
            read!(self, p => {
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id);
                }
                for r in q.fetch_all(p).await? {
                    out.push(host(&r)?);
                }
            });
        }
        Ok(out)
    }

    /// Writes heartbeat reports (host facts, time, VM usage) in one transaction. Host states are
    /// not touched here: they change only through [`Db::set_host_states`].
    pub async fn record_heartbeats(&self, beats: &[HostReport]) -> Result<(), DbError> {
        for chunk in beats.chunks(HEARTBEAT_CHUNK) {
            self.record_heartbeat_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Writes a chunk of heartbeats in one transaction, a statement per table for the whole
    /// chunk (per `BATCH_ROWS`): one statement per VM was what a database could not keep up with
    /// at 100,000 VMs (docs/scale.md).
    async fn record_heartbeat_chunk(&self, beats: &[HostReport]) -> Result<(), DbError> {
        let mut tx = self.writer.begin().await?;
        let hosts_sql = format!(
            "WITH r(id, hostname, cpu_cores, memory_mib, agent_version, at, address) AS (VALUES {})
             UPDATE hosts SET hostname = r.hostname, cpu_cores = r.cpu_cores,
             memory_mib = r.memory_mib, agent_version = r.agent_version, last_heartbeat = r.at,
             address = r.address FROM r WHERE hosts.id = r.id",
            self.marks().rows(&HOST_ROW, beats.len())
        );
        let mut q = sqlx::query(&hosts_sql);
        for HostReport { hb, at, .. } in beats {
            q = q
                .bind(&hb.host_id)
                .bind(&hb.hostname)
                .bind(i64::from(hb.cpu_cores))
                .bind(hb.memory_mib as i64)
                .bind(&hb.agent_version)
                .bind(*at)
                .bind(&hb.address);
        }
        q.execute(&mut *tx).await?;
        // A VMM waiting for a migration's handover is not the VM: the migration, not the
        // report, says where the VM runs.
        // A standby VMM is not the VM either: its report says the standby is alive.
        let standbys: Vec<_> = beats
            .iter()
            .flat_map(|b| b.hb.vms.iter().map(move |v| (&b.hb, v, b.at)))
            .filter(|(_, v, _)| v.state() == VmState::Standby)
            .collect();
        for batch in standbys.chunks(BATCH_ROWS) {
            let sql = format!(
                "WITH r(id, host, at) AS (VALUES {})
                 UPDATE vms SET standby_seen = r.at FROM r
                 WHERE vms.id = r.id AND vms.standby_host = r.host",
                self.marks().rows(&["TEXT", "TEXT", "BIGINT"], batch.len())
            );
            let mut q = sqlx::query(&sql);
            for (hb, v, at) in batch {
                q = q.bind(&v.vm_id).bind(&hb.host_id).bind(*at);
            }
            q.execute(&mut *tx).await?;
        }
        // A VM once per report: a report naming one twice (a broken or hostile agent) would
        // make PostgreSQL refuse the whole chunk's upsert, other hosts' beats with it.
        let mut seen = std::collections::HashSet::new();
        let reports: Vec<_> = beats
            .iter()
            .flat_map(|b| b.hb.vms.iter().map(move |v| (b, v)))
            .filter(|(_, v)| !matches!(v.state(), VmState::Incoming | VmState::Standby))
            .filter(|(b, v)| seen.insert((&b.hb.host_id, &v.vm_id)))
            .collect();
        let mut usage = Vec::new();
        for batch in reports.chunks(BATCH_ROWS) {
            // The figures, into the host's neighbouring `vm_usage` rows.
            let sql = format!(
                "INSERT INTO vm_usage (host, vm, cpu_pct, rss_kib, vmm_cpu_pct, balloon_mib, usage_at)
                 VALUES {} ON CONFLICT (host, vm) DO UPDATE SET cpu_pct = excluded.cpu_pct,
                 rss_kib = excluded.rss_kib, vmm_cpu_pct = excluded.vmm_cpu_pct,
                 balloon_mib = excluded.balloon_mib, usage_at = excluded.usage_at",
                self.marks().rows(&USAGE_ROW, batch.len())
            );
            let mut q = sqlx::query(&sql);
            for (b, v) in batch {
                q = q
                    .bind(&b.hb.host_id)
                    .bind(&v.vm_id)
                    .bind(v.cpu_pct)
                    .bind(v.rss_kib as i64)
                    .bind(v.vmm_cpu_pct)
                    .bind(v.balloon_mib as i64)
                    .bind(b.at);
            }
            q.execute(&mut *tx).await?;
        }
        // The facts, of the reports that may have new ones.
        let facts: Vec<_> = reports.iter().filter(|(b, _)| b.facts).collect();
        for batch in facts.chunks(BATCH_ROWS) {
            // The state and pid, only where the database has them otherwise (a VM's row is not
            // rewritten each refresh), and only if the report is newer than what set them last
            // (an answer processed after this heartbeat arrived) and no newer report (its agent's
            // sequence number) was applied.
            let mut m = self.marks();
            let sql = format!(
                "WITH r(id, host, state, pid, at, seq) AS (VALUES {})
                 UPDATE vms SET
                 state = CASE WHEN vms.state_at <= r.at AND (r.seq = 0 OR vms.report_seq < r.seq)
                         THEN r.state ELSE vms.state END,
                 pid = CASE WHEN vms.state_at <= r.at AND (r.seq = 0 OR vms.report_seq < r.seq)
                       THEN r.pid ELSE vms.pid END,
                 report_seq = CASE WHEN vms.state_at <= r.at AND r.seq > vms.report_seq
                              THEN r.seq ELSE vms.report_seq END
                 FROM r WHERE vms.id = r.id AND vms.host_id = r.host
                 AND (vms.state <> r.state OR vms.pid <> r.pid) AND vms.state NOT IN ({})",
                m.rows(&FACTS_ROW, batch.len()),
                m.list(4)
            );
            let mut q = sqlx::query(&sql);
            for (b, v) in batch {
                q = q
                    .bind(&v.vm_id)
                    .bind(&b.hb.host_id)
                    .bind(v.state().as_str())
                    .bind(i64::from(v.pid))
                    .bind(b.at)
                    .bind(v.seq as i64);
            }
            q.bind(VmState::Deleted.as_str())
                .bind(VmState::Pending.as_str())
                // A migration's state is the migration's: the source still reports it running.
                .bind(VmState::Migrating.as_str())
                // A restart waiting (for room, or for the disk's lock) is the restart's: the host
                // it waits on reports its copy stopped meanwhile.
                .bind(VmState::PendingRestart.as_str())
                .execute(&mut *tx)
                .await?;
            let ids: Vec<String> = batch.iter().map(|(_, v)| v.vm_id.clone()).collect();
            usage.extend(meter(&mut tx, Scope::Vms(&ids)).await?);
        }
        // Figures of VMs a host no longer reports (stopped there, moved, deleted): what these
        // reports did not just write. Only a report with new facts can leave out a VM.
        let changed: Vec<_> = beats.iter().filter(|b| b.facts).collect();
        if !changed.is_empty() {
            let sql = format!(
                "WITH r(host, at) AS (VALUES {})
                 DELETE FROM vm_usage WHERE host IN (SELECT host FROM r)
                 AND usage_at < (SELECT at FROM r WHERE r.host = vm_usage.host)",
                self.marks().rows(&["TEXT", "BIGINT"], changed.len())
            );
            let mut q = sqlx::query(&sql);
            for b in changed {
                q = q.bind(&b.hb.host_id).bind(b.at);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.announce(usage);
        Ok(())
    }

    /// Host state changes seen by the monitor, with the missed-heartbeat count each host has now;
    /// an unreachable host's VMs become `unknown`. Chunked like heartbeats.
    pub async fn set_host_states(&self, changes: &[HostChange]) -> Result<(), DbError> {
        let mut usage = Vec::new();
        for chunk in changes.chunks(HEARTBEAT_CHUNK) {
            let mut tx = self.writer.begin().await?;
            for c in chunk {
                sqlx::query("UPDATE hosts SET state = $1, missed = $2 WHERE id = $3")
                    .bind(c.state.as_str())
                    .bind(c.missed)
                    .bind(&c.host)
                    .execute(&mut *tx)
                    .await?;
                // A migrating VM's fate is its migration's: the source's VMM may hand it over
                // while the source's agent is silent.
                // Only VMs that ran: failover restarts the `unknown` ones, never one that was
                // stopped.
                if c.state == HostState::Unreachable {
                    sqlx::query(
                        "UPDATE vms SET state = $2, state_at = $5
                         WHERE host_id = $1 AND state IN ($3, $4)",
                    )
                    .bind(&c.host)
                    .bind(VmState::Unknown.as_str())
                    .bind(VmState::Running.as_str())
                    .bind(VmState::Creating.as_str())
                    .bind(super::now_ms())
                    .execute(&mut *tx)
                    .await?;
                    usage.extend(meter(&mut tx, Scope::Host(&c.host)).await?);
                }
            }
            tx.commit().await?;
            self.announce(std::mem::take(&mut usage));
        }
        Ok(())
    }

    /// Marks a host draining (or not); false if there is no such host.
    pub async fn set_draining(&self, id: &str, draining: bool) -> Result<bool, DbError> {
        let r = sqlx::query("UPDATE hosts SET draining = $1 WHERE id = $2")
            .bind(i64::from(draining))
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn count_hosts(&self, state: HostState) -> Result<i64, DbError> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM hosts WHERE state = $1")
            .bind(state.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(r.try_get("n")?)
    }

    /// The reachable host with the most free memory that has room for `vcpus` and `memory_mib`
    /// under `p` (overcommit ratios, memory reserved for the host), counting the VMs placed on it
    /// that are not deleted and the memory of the standbys it keeps, and (with `among.group`)
    /// that runs no VM of that owner's group. With more than [`PLACEMENT_SAMPLE`] reachable
    /// hosts, the roomiest of that many taken from a random point of the hosts' `place_key` index
    /// on ("power of k choices", as Nomad and Sparrow sample): its cost is that of the sample's
    /// VMs, not of every VM of every host. When no sampled host fits, every host is weighed
    /// (one query over all VMs), so a refusal is never for want of looking.
    pub async fn roomiest_host(
        &self,
        p: &crate::placement::Policy,
        vcpus: i64,
        memory_mib: i64,
        among: crate::placement::Among<'_>,
    ) -> Result<Option<String>, DbError> {
        let (sample, whole) = self.host_sample(among).await?;
        let pick = self
            .roomiest_of(&sample, p, vcpus, memory_mib, among)
            .await?;
        if pick.is_some() || whole {
            return Ok(pick);
        }
        self.roomiest_of_all(p, vcpus, memory_mib, among).await
    }

    /// The hosts a placement weighs: reachable, not draining, as `among` allows, up to
    /// [`PLACEMENT_SAMPLE`] of them from a random place key on (wrapping around); and whether
    /// that is every such host.
    async fn host_sample(
        &self,
        among: crate::placement::Among<'_>,
    ) -> Result<(Vec<Capacity>, bool), DbError> {
        let reachable = HostState::Reachable.as_str();
        let allowed = |c: &Capacity| among.except != Some(c.id.as_str());
        if let Some(only) = among.only {
            let hosts = read!(self, p => {
                let rows = sqlx::query(
                    "SELECT id, cpu_cores, memory_mib FROM hosts
                     WHERE id = $1 AND state = $2 AND draining = 0",
                )
                .bind(only)
                .bind(reachable)
                .fetch_all(p)
                .await?;
                rows.iter().map(capacity).collect::<Result<Vec<_>, _>>()?
            });
            return Ok((hosts.into_iter().filter(allowed).collect(), true));
        }
        let from = place_key();
        // One more than the sample (and one for `except`): fewer came back, so that is all.
        let want = PLACEMENT_SAMPLE + 2;
        let mut hosts = Vec::new();
        for (op, limit) in [(">=", want), ("<", want)] {
            let limit = limit - hosts.len() as i64;
            if limit <= 0 {
                break;
            }
            let sql = format!(
                "SELECT id, cpu_cores, memory_mib FROM hosts
                 WHERE state = $1 AND draining = 0 AND place_key {op} $2
                 ORDER BY place_key LIMIT $3"
            );
            read!(self, p => {
                let rows = sqlx::query(&sql)
                    .bind(reachable)
                    .bind(from)
                    .bind(limit)
                    .fetch_all(p)
                    .await?;
                for r in &rows {
                    hosts.push(capacity(r)?);
                }
            });
        }
        let whole = (hosts.len() as i64) < want;
        hosts.retain(allowed);
        hosts.truncate(PLACEMENT_SAMPLE as usize);
        Ok((hosts, whole))
    }

    /// The roomiest of `hosts` that has room (see [`Db::roomiest_host`]): their VMs' and
    /// standbys' use summed through the hosts' indexes.
    async fn roomiest_of(
        &self,
        hosts: &[Capacity],
        p: &crate::placement::Policy,
        vcpus: i64,
        memory_mib: i64,
        among: crate::placement::Among<'_>,
    ) -> Result<Option<String>, DbError> {
        if hosts.is_empty() {
            return Ok(None);
        }
        let ids = marks(2, hosts.len());
        let deleted = VmState::Deleted.as_str();
        let mut used: std::collections::HashMap<String, (i64, i64)> = Default::default();
        let mut grouped = std::collections::HashSet::new();
        let placed = format!(
            "SELECT host_id, CAST(SUM(vcpus) AS BIGINT) AS vcpus,
                    CAST(SUM(memory_mib) AS BIGINT) AS memory_mib
             FROM vms WHERE state <> $1 AND host_id IN ({ids}) GROUP BY host_id
             UNION ALL
             -- A standby holds the VM's memory, and uses no CPU while it waits.
             SELECT standby_host AS host_id, 0 AS vcpus, CAST(SUM(memory_mib) AS BIGINT) AS memory_mib
             FROM vms WHERE state <> $1 AND standby_host IN ({ids}) GROUP BY standby_host"
        );
        let members = format!(
            "SELECT DISTINCT host_id FROM vms
             WHERE state <> $1 AND host_id IN ({ids}) AND affinity_group = ${} AND owner = ${}",
            hosts.len() + 2,
            hosts.len() + 3
        );
        read!(self, pool => {
            let q = hosts.iter().fold(sqlx::query(&placed).bind(deleted), |q, h| q.bind(&h.id));
            for r in q.fetch_all(pool).await? {
                let u = used.entry(r.col::<String>("host_id")?).or_default();
                u.0 += r.col::<i64>("vcpus")?;
                u.1 += r.col::<i64>("memory_mib")?;
            }
            if let Some((owner, group)) = among.group {
                let q = hosts.iter().fold(sqlx::query(&members).bind(deleted), |q, h| q.bind(&h.id));
                for r in q.bind(group).bind(owner).fetch_all(pool).await? {
                    grouped.insert(r.col::<String>("host_id")?);
                }
            }
        });
        let mut best: Option<(f64, &str)> = None;
        for h in hosts.iter().filter(|h| !grouped.contains(&h.id)) {
            let (used_vcpus, used_mib) = used.get(&h.id).copied().unwrap_or_default();
            let free =
                (h.memory_mib - p.reserved_memory_mib) as f64 * p.memory_ratio - used_mib as f64;
            let fits = (used_vcpus + vcpus) as f64 <= h.cpu_cores as f64 * p.cpu_ratio
                && memory_mib as f64 <= free;
            // The most free memory; among equals, the first id.
            if fits && best.is_none_or(|(f, id)| free > f || (free == f && h.id.as_str() < id)) {
                best = Some((free, &h.id));
            }
        }
        Ok(best.map(|(_, id)| id.to_string()))
    }

    /// [`Db::roomiest_host`] over every reachable host, in one query over all VMs.
    async fn roomiest_of_all(
        &self,
        p: &crate::placement::Policy,
        vcpus: i64,
        memory_mib: i64,
        among: crate::placement::Among<'_>,
    ) -> Result<Option<String>, DbError> {
        read!(self, pool => {
            let r = sqlx::query(
                "SELECT h.id,
                        (h.memory_mib - $1) * $2 - COALESCE(u.memory_mib, 0) AS free_mib
                 FROM hosts h LEFT JOIN (
                     SELECT host_id, SUM(vcpus) AS vcpus, SUM(memory_mib) AS memory_mib FROM (
                         SELECT host_id, vcpus, memory_mib FROM vms
                         WHERE host_id <> '' AND state <> $6
                         UNION ALL
                         -- A standby holds the VM's memory, and uses no CPU while it waits.
                         SELECT standby_host AS host_id, 0 AS vcpus, memory_mib FROM vms
                         WHERE standby_host <> '' AND state <> $6
                     ) placed GROUP BY host_id
                 ) u ON u.host_id = h.id
                 WHERE h.state = $7 AND h.draining = 0 AND h.id <> $8 AND ($9 = '' OR h.id = $9)
                   AND ($10 = '' OR NOT EXISTS (
                       SELECT 1 FROM vms g WHERE g.host_id = h.id AND g.affinity_group = $10
                                             AND g.owner = $11 AND g.state <> $6))
                   AND COALESCE(u.vcpus, 0) + $3 <= h.cpu_cores * $4
                   AND $5 <= (h.memory_mib - $1) * $2 - COALESCE(u.memory_mib, 0)
                 ORDER BY free_mib DESC, h.id LIMIT 1",
            )
            .bind(p.reserved_memory_mib)
            .bind(p.memory_ratio)
            .bind(vcpus)
            .bind(p.cpu_ratio)
            .bind(memory_mib)
            .bind(VmState::Deleted.as_str())
            .bind(HostState::Reachable.as_str())
            .bind(among.except.unwrap_or(""))
            .bind(among.only.unwrap_or(""))
            .bind(among.group.map_or("", |(_, g)| g))
            .bind(among.group.map_or("", |(o, _)| o))
            .fetch_optional(pool)
            .await?;
            Ok(match r {
                Some(r) => Some(r.col("id")?),
                None => None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::databases;
    use crate::db::{Event, EventKind};

    /// A heartbeat chunk is written a statement per `BATCH_ROWS` VMs: every VM of a report
    /// longer than one batch gets its figures, a standby its sighting, and a VM on another host
    /// or deleted is not touched.
    #[tokio::test]
    async fn every_vm_of_a_long_report_is_written() {
        use crate::db::tests::pending_vm;
        use crate::db::{Job, JobKind};
        for (db, _dir) in databases().await {
            db.add_host("h1", "u", "p").await.unwrap();
            db.add_host("h2", "u", "p").await.unwrap();
            let mut ids = Vec::new();
            for _ in 0..BATCH_ROWS + 3 {
                let vm = pending_vm();
                db.add_job(&Job::new(JobKind::Create, "alice", &vm.id), Some(&vm))
                    .await
                    .unwrap();
                assert!(db.place_vm(&vm.id, "h1", "").await.unwrap());
                assert!(db
                    .set_vm_state(&vm.id, VmState::Creating, 0, 0)
                    .await
                    .unwrap());
                ids.push(vm.id);
            }
            // One of h1's VMs has a standby on h2; the last one is deleted.
            assert!(db.set_standby_host(&ids[0], "", "h2").await.unwrap());
            let deleted = ids.last().unwrap().clone();
            assert!(db
                .set_vm_state(&deleted, VmState::Deleted, 0, 0)
                .await
                .unwrap());
            let report = |i: usize, id: &str, state: VmState| vim_proto::VmReport {
                vm_id: id.into(),
                state: state.into(),
                pid: 100 + i as u32,
                cpu_pct: i as f64,
                rss_kib: 1000 + i as u64,
                seq: 5,
                ..Default::default()
            };
            let h1 = vim_proto::Heartbeat {
                host_id: "h1".into(),
                hostname: "one".into(),
                cpu_cores: 16,
                vms: ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| report(i, id, VmState::Running))
                    .collect(),
                ..Default::default()
            };
            // h2 claims one of h1's VMs as its own (not where it runs) and reports the standby.
            let h2 = vim_proto::Heartbeat {
                host_id: "h2".into(),
                hostname: "two".into(),
                vms: vec![
                    report(9999, &ids[1], VmState::Stopped),
                    report(0, &ids[0], VmState::Standby),
                ],
                ..Default::default()
            };
            let at = now_ms() + 1000;
            db.record_heartbeats(&[HostReport::new(h1, at), HostReport::new(h2, at + 1)])
                .await
                .unwrap();
            for (i, id) in ids.iter().enumerate() {
                let vm = db.vm(id).await.unwrap().unwrap();
                if *id == deleted {
                    assert_eq!((vm.state, vm.pid), (VmState::Deleted, 0));
                    continue;
                }
                assert_eq!(
                    (vm.state, vm.pid, vm.cpu_pct, vm.rss_kib),
                    (VmState::Running, 100 + i as i64, i as f64, 1000 + i as i64),
                    "VM {i} of {}",
                    ids.len()
                );
            }
            assert_eq!(db.vm(&ids[0]).await.unwrap().unwrap().standby_seen, at + 1);
            let hosts = db.hosts().await.unwrap();
            let h1 = hosts.iter().find(|h| h.id == "h1").unwrap();
            assert_eq!(
                (h1.hostname.as_str(), h1.cpu_cores, h1.last_heartbeat),
                ("one", 16, at)
            );
            // A report whose facts the monitor found unchanged writes only the figures.
            let mut quiet = HostReport::new(
                vim_proto::Heartbeat {
                    host_id: "h1".into(),
                    hostname: "one".into(),
                    vms: vec![report(4242, &ids[3], VmState::Stopped)],
                    ..Default::default()
                },
                at + 2000,
            );
            quiet.facts = false;
            db.record_heartbeats(&[quiet]).await.unwrap();
            let vm = db.vm(&ids[3]).await.unwrap().unwrap();
            assert_eq!((vm.state, vm.cpu_pct), (VmState::Running, 4242.0));
            // h1 no longer reports its first two VMs: their figures are gone, the rest are new.
            let h1 = vim_proto::Heartbeat {
                host_id: "h1".into(),
                vms: ids[2..]
                    .iter()
                    .enumerate()
                    .map(|(i, id)| report(i + 7, id, VmState::Running))
                    .collect(),
                ..Default::default()
            };
            db.record_heartbeats(&[HostReport::new(h1, at + 5000)])
                .await
                .unwrap();
            for (i, id) in ids.iter().enumerate().take(4) {
                let want = if i < 2 { 0.0 } else { (i + 5) as f64 };
                assert_eq!(db.vm(id).await.unwrap().unwrap().cpu_pct, want, "VM {i}");
            }
        }
    }

    /// The monitor's batched writes: more hosts than one chunk, looked up, marked and unmarked.
    #[tokio::test]
    async fn host_batches() {
        for (db, _dir) in databases().await {
            let n = HEARTBEAT_CHUNK * 2 + 7;
            let ids: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
            for id in &ids {
                db.add_host(id, "u", "p").await.unwrap();
            }
            let mut asked = ids.clone();
            asked.push("nobody".into());
            assert_eq!(db.hosts_among(&asked).await.unwrap().len(), n);
            let beats: Vec<HostReport> = ids
                .iter()
                .map(|id| {
                    let hb = vim_proto::Heartbeat {
                        host_id: id.clone(),
                        cpu_cores: 8,
                        ..Default::default()
                    };
                    HostReport::new(hb, 42)
                })
                .collect();
            db.record_heartbeats(&beats).await.unwrap();
            let states: Vec<HostChange> = ids
                .iter()
                .map(|id| HostChange {
                    host: id.clone(),
                    state: HostState::Unreachable,
                    missed: 3,
                })
                .collect();
            db.set_host_states(&states).await.unwrap();
            let events: Vec<Event> = ids
                .iter()
                .map(|id| Event::new(EventKind::PsUnreachable, id, "", "", ""))
                .collect();
            db.add_events(&events).await.unwrap();
            let hosts = db.hosts().await.unwrap();
            assert_eq!(hosts.len(), n);
            assert!(hosts.iter().all(|h| h.state == HostState::Unreachable
                && h.missed == 3
                && h.cpu_cores == 8
                && h.last_heartbeat == 42));
            assert_eq!(db.events(Some(0), 10_000).await.unwrap().len(), n);
        }
    }
}
