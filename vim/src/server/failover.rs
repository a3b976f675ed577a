//! Failover with fencing (docs/failover.md): the VMs of a host that went silent run again on
//! other hosts — but only once the host has certainly stopped them itself.
//!
//! Every agent renews a lease on the queue (`VIM_LEASES`, see `agent/src/lease.rs`); its VMMs stop
//! their guests the moment it lapses. vimd counts a silent host's lease lapsed only when no
//! renewal newer than the last one it saw is in the stream *and* the lease, plus a margin, has
//! passed since that renewal *reached vimd* (which is after the agent sent it): no clock of two
//! machines is compared, only durations. After its own start vimd counts every lease as renewed
//! at that moment, so its downtime is never mistaken for the hosts' silence.
//!
//! When more than a set share of the hosts is silent at once, vimd suspects its own network and
//! fences nothing and restarts nothing (`Failover_Suspended`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::StreamExt;
use vim_proto::{subjects as s, Versioned};

use super::Vimd;
use crate::db::{self, EventKind, HostState, JobKind, VmState};

/// Failover's settings and what it remembers (in memory: a restarted vimd starts afresh, with
/// every lease counted as renewed at its start).
pub struct Failover {
    pub lease: Duration,
    pub margin: Duration,
    pub max_silent_percent: u32,
    /// Restarts under way at once, at most.
    pub restarts_at_once: i64,
    /// How long after its host went silent a restart waits for the VM's disk to be unlocked.
    pub disk_wait: Duration,
    started: Instant,
    /// The newest renewal seen of each host's lease, and when it arrived.
    renewals: Mutex<HashMap<String, (RenewalId, Instant)>>,
    /// Hosts fenced (their VMs sent elsewhere) and silent since.
    fenced: Mutex<HashSet<String>>,
    /// Silent hosts that hold no lease, already reported.
    leaseless: Mutex<HashSet<String>>,
    suspended: AtomicBool,
}

/// A renewal: the agent's start (`boot`) and its count since (`seq`).
type RenewalId = (u64, u64);

/// Whether a silent host's lease has lapsed.
enum Lapse {
    /// Not yet: it may still run its VMs.
    Holds,
    /// Lapsed this long ago.
    Lapsed(Duration),
    /// The host never renewed a lease: it does not fence itself, so its VMs are not restarted.
    NoLease,
}

impl Failover {
    pub fn new(
        lease: Duration,
        margin: Duration,
        max_silent_percent: u32,
        restarts_at_once: u32,
        disk_wait: Duration,
    ) -> Failover {
        Failover {
            lease,
            margin,
            max_silent_percent,
            restarts_at_once: i64::from(restarts_at_once.max(1)),
            disk_wait,
            started: Instant::now(),
            renewals: Default::default(),
            fenced: Default::default(),
            leaseless: Default::default(),
            suspended: AtomicBool::new(false),
        }
    }

    /// When renewal `id` of `host`'s lease reached vimd: when it was first seen, or now.
    fn arrival(&self, host: &str, id: RenewalId) -> Instant {
        let mut r = crate::lock(&self.renewals);
        match r.get(host) {
            Some((seen, at)) if *seen == id => *at,
            _ => {
                let now = Instant::now();
                r.insert(host.to_string(), (id, now));
                now
            }
        }
    }

    /// A host that heartbeats again is no longer fenced: if it goes silent again, it is judged
    /// anew.
    pub fn returned(&self, host: &str) {
        crate::lock(&self.fenced).remove(host);
        crate::lock(&self.leaseless).remove(host);
    }
}

/// Watches lease renewals and silent hosts (nothing with `--lease-ms 0`).
pub async fn run(v: Arc<Vimd>) -> Result<()> {
    if v.failover.lease.is_zero() {
        tracing::warn!("--lease-ms 0: hosts hold no lease and no VM is restarted elsewhere");
        return Ok(());
    }
    let mut sub = v.nats.subscribe(s::ALL_LEASES).await?;
    let v2 = v.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(host) = s::sender(&m.subject, s::LEASES_PREFIX) else {
                continue;
            };
            if let Ok(r) = vim_proto::LeaseRenewal::decode_checked(&m.payload) {
                v2.failover.arrival(host, (r.boot, r.seq));
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if !v.is_leader() {
                continue;
            }
            if let Err(e) = v.failover_tick().await {
                tracing::warn!(error = %e, "failover");
            }
        }
    });
    Ok(())
}

impl Vimd {
    async fn failover_tick(self: &Arc<Self>) -> Result<()> {
        // Five times a second: only the silent hosts are read, and the others counted.
        let (silent, all) = self.db.hosts_in_state(HostState::Unreachable).await?;
        let f = &self.failover;
        let too_many = silent.len() * 100 > all as usize * f.max_silent_percent as usize;
        if too_many {
            if !f.suspended.swap(true, Ordering::SeqCst) {
                let detail = format!(
                    "{} of {} hosts are silent at once (more than {}%): vimd suspects its own \
                     network and fences nothing, restarts nothing",
                    silent.len(),
                    all,
                    f.max_silent_percent
                );
                self.event(EventKind::FailoverSuspended, "", "", "", &detail)
                    .await;
            }
            return Ok(());
        }
        f.suspended.store(false, Ordering::SeqCst);
        for h in &silent {
            if crate::lock(&f.fenced).contains(&h.id) {
                continue;
            }
            match self.lease_lapse(&h.id).await? {
                Lapse::Holds => {}
                Lapse::NoLease => {
                    if crate::lock(&f.leaseless).insert(h.id.clone()) {
                        for vm in self.restartable_vms(&h.id).await? {
                            self.event(
                                EventKind::VmFailoverFailed,
                                &h.id,
                                &vm.id,
                                "",
                                "its host never held a lease (an agent without failover): it \
                                 may still run the VM, which is not restarted elsewhere",
                            )
                            .await;
                        }
                    }
                }
                Lapse::Lapsed(ago) => self.fence(h, ago).await?,
            }
        }
        Ok(())
    }

    /// Whether host `id`'s lease has lapsed, from the newest renewal in the stream.
    async fn lease_lapse(&self, id: &str) -> Result<Lapse> {
        let stream = self
            .js
            .get_stream(s::LEASE_STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let m = match stream.get_last_raw_message_by_subject(&s::lease(id)).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Lapse::NoLease)
            }
            Err(e) => return Err(anyhow::anyhow!("lease of {id}: {e}")),
        };
        let r = vim_proto::LeaseRenewal::decode_checked(&m.payload)
            .map_err(|e| anyhow::anyhow!("lease of {id}: {e}"))?;
        if r.lease_ms == 0 {
            return Ok(Lapse::NoLease);
        }
        let f = &self.failover;
        let arrived = f.arrival(id, (r.boot, r.seq)).max(f.started);
        let lapses = arrived + Duration::from_millis(r.lease_ms) + f.margin;
        let now = Instant::now();
        Ok(if now >= lapses {
            Lapse::Lapsed(now - lapses)
        } else {
            Lapse::Holds
        })
    }

    /// The VMs on `host` that failover restarts — running when it went silent (now `unknown`),
    /// with HA policy `restart` — highest priority first, then oldest.
    async fn restartable_vms(&self, host: &str) -> Result<Vec<db::Vm>> {
        let mut vms: Vec<db::Vm> = self
            .db
            .vms_on(host)
            .await?
            .into_iter()
            .filter(|vm| vm.state == VmState::Unknown && vm.ha.restarts())
            .collect();
        vms.sort_by_key(|vm| (std::cmp::Reverse(vm.ha_priority), vm.created_at));
        Ok(vms)
    }

    /// Host `h` has stopped its VMs (its lease lapsed `ago`): each HA VM gets a restart job.
    async fn fence(self: &Arc<Self>, h: &db::Host, ago: Duration) -> Result<()> {
        crate::lock(&self.failover.fenced).insert(h.id.clone());
        let detail = format!(
            "its lease lapsed {} ms ago (no renewal for {} ms + {} ms margin)",
            ago.as_millis(),
            self.failover.lease.as_millis(),
            self.failover.margin.as_millis()
        );
        self.event(EventKind::HostFenced, &h.id, "", "", &detail)
            .await;
        for vm in self.restartable_vms(&h.id).await? {
            let mut job = db::Job::new(JobKind::Restart, "vimd", &vm.id);
            job.params = serde_json::json!({
                "from": h.id,
                "silent_since_ms": h.last_heartbeat,
            })
            .to_string();
            self.db.add_job(&job, None).await?;
            self.event(
                EventKind::VmFailoverStarted,
                &h.id,
                &vm.id,
                &job.id,
                "restarting it on another host",
            )
            .await;
            self.outbox.push(&job.id);
        }
        Ok(())
    }

    /// A restart job: the VM boots again from its disk on a host placement chooses (never the
    /// one it left), with the same id and MAC. No room anywhere: it waits `pending_restart`
    /// and is tried again every few seconds.
    pub(super) async fn restart(self: &Arc<Self>, job: &db::Job, vm: &db::Vm) -> Result<()> {
        let RestartParams { from, in_place, .. } = restart_params(job);
        if vm.host_id != from {
            self.fail_job(job, "the VM is no longer on the host it is restarted from")
                .await;
            return Ok(());
        }
        // Claimed first: a second copy of the job (the reconciler's, or the retry below) finds
        // it running and does nothing.
        if !self
            .db
            .transition_job(&job.id, &[db::JobState::Pending], db::JobState::Running, "")
            .await?
        {
            return Ok(());
        }
        // Bounded: past the limit, the job waits its turn (in the order the jobs were queued,
        // which is the VMs' priority order).
        if self.db.count_running(JobKind::Restart).await? > self.failover.restarts_at_once {
            self.db
                .transition_job(&job.id, &[db::JobState::Running], db::JobState::Pending, "")
                .await?;
            self.publish_later(&job.id, RETRY_BUSY);
            return Ok(());
        }
        let apart = crate::placement::Among::for_vm(vm, None, Some(&from));
        let chosen = if in_place {
            Ok(from.clone())
        } else if let Some(standby) = self.standby_to_promote(vm, &from).await? {
            // Its standby's host promotes the standby (its room is counted already).
            Ok(standby)
        } else {
            let (db, p) = (&self.db, &self.policy);
            match crate::placement::choose(db, p, vm.vcpus, vm.memory_mib, apart).await? {
                // Running again matters more than anti-affinity: with no host free of the VM's
                // group, it shares one (the balancer parts them later, when it can).
                Err(_) if apart.group.is_some() => {
                    let anywhere = crate::placement::Among {
                        group: None,
                        ..apart
                    };
                    crate::placement::choose(db, p, vm.vcpus, vm.memory_mib, anywhere).await?
                }
                chosen => chosen,
            }
        };
        let host = match chosen {
            Ok(h) => h,
            Err(why) => {
                self.db
                    .transition_job(&job.id, &[db::JobState::Running], db::JobState::Pending, "")
                    .await?;
                if vm.state != VmState::PendingRestart {
                    self.db
                        .transition_vm(&vm.id, vm.state, VmState::PendingRestart)
                        .await?;
                    self.event(EventKind::VmFailoverFailed, &from, &vm.id, &job.id, &why)
                        .await;
                }
                self.publish_later(&job.id, RETRY_PLACEMENT);
                return Ok(());
            }
        };
        if let Some(why) = self.send_placed(job, vm, &from, &host).await?.failure() {
            self.fail_job(job, why).await;
        }
        Ok(())
    }

    /// The host keeping `vm`'s standby, if there is one that can take over from `from`: the
    /// restart goes there and promotes it.
    async fn standby_to_promote(&self, vm: &db::Vm, from: &str) -> Result<Option<String>> {
        if vm.ha != db::HaPolicy::Standby || vm.standby_host.is_empty() || vm.standby_host == from {
            return Ok(None);
        }
        let hosts = self
            .db
            .hosts_among(std::slice::from_ref(&vm.standby_host))
            .await?;
        let up = hosts
            .iter()
            .any(|h| h.state == HostState::Reachable && !h.draining);
        Ok(up.then(|| vm.standby_host.clone()))
    }

    /// Publishes pending job `id` again after `delay` (under a fresh message id: the first is in
    /// the duplicate window). Lost with vimd, it is published by the reconciler.
    pub(super) fn publish_later(self: &Arc<Self>, id: &str, delay: Duration) {
        let (v, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let ids = [(id.clone(), format!("{id}-{}", db::now_ms()))];
            if let Err(e) = crate::outbox::publish(&v.js, &v.db, &ids).await {
                tracing::warn!(job = id, error = %e, "job not published again");
            }
        });
    }

    /// A VM whose VMM died on a healthy host (`VM_Failure`): with HA policy `restart` it boots
    /// again there, after 1, 2 then 4 s; a fourth failure within ten minutes sends it to another
    /// host.
    pub(super) async fn on_vm_failure(self: &Arc<Self>, host: &str, vm_id: &str) -> Result<()> {
        let Some(vm) = self.db.vm(vm_id).await? else {
            return Ok(());
        };
        self.restart_failed(host, &vm, &[VmState::Failed]).await
    }

    /// A host that fenced itself (its lease lapsed) reached the queue again: the VMs it stopped
    /// that no other host took over (vimd had not fenced it yet, or suspended failover) boot
    /// again there, as after a VMM failure. Its VMs read `failed`, or still `unknown` when its
    /// heartbeat has not been written yet; none of them runs (its VMMs were all stopped).
    pub(super) async fn on_self_fenced(self: &Arc<Self>, host: &str) -> Result<()> {
        for vm in self.db.vms_on(host).await? {
            self.restart_failed(host, &vm, &[VmState::Failed, VmState::Unknown])
                .await?;
        }
        Ok(())
    }

    async fn restart_failed(
        self: &Arc<Self>,
        host: &str,
        vm: &db::Vm,
        states: &[VmState],
    ) -> Result<()> {
        let vm_id = vm.id.as_str();
        if !vm.ha.restarts() || vm.host_id != host || !states.contains(&vm.state) {
            return Ok(());
        }
        let recent = self
            .db
            .count_jobs_since(vm_id, JobKind::Restart, db::now_ms() - FAILURE_WINDOW_MS)
            .await?;
        let in_place = recent < IN_PLACE_RESTARTS;
        let mut job = db::Job::new(JobKind::Restart, "vimd", vm_id);
        job.params = serde_json::json!({
            "from": host,
            "in_place": in_place,
            "silent_since_ms": db::now_ms(),
        })
        .to_string();
        self.db.add_job(&job, None).await?;
        let detail = if in_place {
            format!("restarting it on {host} (attempt {})", recent + 1)
        } else {
            format!("it failed {recent} times in a row on {host}: restarting it on another host")
        };
        self.event(EventKind::VmFailoverStarted, host, vm_id, &job.id, &detail)
            .await;
        let delay = Duration::from_secs(1 << recent.min(IN_PLACE_RESTARTS - 1));
        self.publish_later(&job.id, delay);
        Ok(())
    }

    /// A host that heartbeats again after being silent still keeps VMs that run elsewhere now
    /// (restarted while it was cut off): each gets an eviction, so the host stops and forgets
    /// it. VMs waiting for a migration into it are left to their migration.
    pub(super) async fn evict_moved(self: &Arc<Self>, hb: &vim_proto::Heartbeat) {
        self.failover.returned(&hb.host_id);
        for r in &hb.vms {
            if matches!(r.state(), VmState::Incoming | VmState::Deleted) {
                continue;
            }
            let vm = match self.db.vm(&r.vm_id).await {
                Ok(Some(vm)) => vm,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(vm = r.vm_id, error = %e, "cannot check a returning host's VM");
                    continue;
                }
            };
            if vm.host_id == hb.host_id || vm.state == VmState::Deleted {
                continue;
            }
            // Its standby, where the standby keeper wants it.
            if r.state() == VmState::Standby && vm.standby_host == hb.host_id {
                continue;
            }
            let mut job = db::Job::new(JobKind::Evict, "vimd", &vm.id);
            job.host_id = hb.host_id.clone();
            if let Err(e) = self.db.add_job(&job, None).await {
                tracing::warn!(vm = vm.id, error = %e, "cannot queue an eviction");
                continue;
            }
            tracing::info!(
                vm = vm.id,
                host = hb.host_id,
                runs_on = vm.host_id,
                "a returning host keeps a VM that runs elsewhere: evicting it"
            );
            self.outbox.push(&job.id);
        }
    }

    /// A restart's answer: the VM runs on its new host, or the restart failed — or its disk is
    /// still locked, and it is tried again on the same host (see [`Self::wait_for_disk`]).
    pub(super) async fn restart_answer(
        self: &Arc<Self>,
        job: &db::Job,
        ev: &vim_proto::HostEvent,
    ) -> Result<()> {
        let RestartParams {
            from,
            silent_since_ms: since,
            disk_wait,
            ..
        } = restart_params(job);
        if !ev.ok && ev.error.contains(vmm_api::DISK_IN_USE) {
            let waited = Duration::from_millis((db::now_ms() - since).max(0) as u64);
            if waited < self.failover.disk_wait {
                return self
                    .wait_for_disk(job, &ev.host_id, since, !disk_wait)
                    .await;
            }
        }
        if ev.ok {
            let outage_s = (db::now_ms() - since) as f64 / 1000.0;
            self.metrics.restarted(outage_s);
            let checkpoint = match &ev.checkpoint {
                Some(c) if c.resumed => serde_json::json!({
                    "seq": c.seq,
                    "taken_unix_ms": c.taken_unix_ms,
                    // From the checkpoint's instant to the host's last heartbeat (negative: the
                    // checkpoint is newer). The guest lost what it did after the checkpoint.
                    "age_s": (since - c.taken_unix_ms as i64) as f64 / 1000.0,
                    "skipped": c.skipped,
                    // Its standby was promoted (no memory read back from shared storage).
                    "promoted": c.promoted,
                }),
                Some(c) => {
                    self.event(
                        EventKind::VmCheckpointUnusable,
                        &ev.host_id,
                        &job.vm_id,
                        &job.id,
                        &format!("booted from its disk instead: {}", c.why_not),
                    )
                    .await;
                    serde_json::Value::Null
                }
                None => serde_json::Value::Null,
            };
            let detail = serde_json::json!({
                "from": from,
                "to": ev.host_id,
                "outage_s": outage_s,
                "checkpoint": checkpoint,
            })
            .to_string();
            self.event(
                EventKind::VmRestarted,
                &ev.host_id,
                &job.vm_id,
                &job.id,
                &detail,
            )
            .await;
        } else {
            self.event(
                EventKind::VmFailoverFailed,
                &ev.host_id,
                &job.vm_id,
                &job.id,
                &ev.error,
            )
            .await;
        }
        Ok(())
    }

    /// The restart found the VM's disk locked. The lock belongs to the failed host's VMM, which
    /// is gone (its lease lapsed before the restart began), but shared storage may hold its lock
    /// a while longer: an NFS server keeps a vanished client's locks until that client's lease
    /// on it runs out. The VM waits `pending_restart` on the host chosen, which tries again
    /// every 2 s until `--failover-disk-wait-ms` after the silence began.
    async fn wait_for_disk(
        self: &Arc<Self>,
        failed: &db::Job,
        host: &str,
        since: i64,
        first: bool,
    ) -> Result<()> {
        let vm_id = failed.vm_id.as_str();
        self.db
            .set_vm_state(vm_id, VmState::PendingRestart, 0, 0)
            .await?;
        let mut job = db::Job::new(JobKind::Restart, "vimd", vm_id);
        job.params = serde_json::json!({
            "from": host,
            "in_place": true,
            "silent_since_ms": since,
            "disk_wait": true,
        })
        .to_string();
        self.db.add_job(&job, None).await?;
        if first {
            let detail = format!(
                "the VM's disk is still locked (by the failed host's VMM, until its lease on the \
                 shared storage runs out): trying again on {host} every {} s",
                DISK_RETRY.as_secs()
            );
            self.event(EventKind::VmFailoverStarted, host, vm_id, &job.id, &detail)
                .await;
        }
        self.publish_later(&job.id, DISK_RETRY);
        Ok(())
    }
}

/// The host a restart job moves its VM off, and whether it restarts it there instead.
fn restart_params(job: &db::Job) -> RestartParams {
    let p = serde_json::from_str::<serde_json::Value>(&job.params).unwrap_or_default();
    RestartParams {
        from: p["from"].as_str().unwrap_or_default().to_string(),
        in_place: p["in_place"].as_bool().unwrap_or(false),
        silent_since_ms: p["silent_since_ms"].as_i64().unwrap_or(job.created_at),
        disk_wait: p["disk_wait"].as_bool().unwrap_or(false),
    }
}

/// A restart job's parameters (its `params` JSON).
struct RestartParams {
    /// The host it moves the VM off (or restarts it on, `in_place`).
    from: String,
    in_place: bool,
    /// When the outage began: the host's silence, or the VMM's failure.
    silent_since_ms: i64,
    /// A retry of a restart that found the disk locked.
    disk_wait: bool,
}

/// In-place restarts of a failing VM within `FAILURE_WINDOW_MS` before it goes elsewhere.
const IN_PLACE_RESTARTS: i64 = 3;
const FAILURE_WINDOW_MS: i64 = 10 * 60 * 1000;

/// How often a restart whose disk is still locked is tried again.
const DISK_RETRY: Duration = Duration::from_secs(2);
/// How often a VM waiting for room is tried again.
const RETRY_PLACEMENT: Duration = Duration::from_secs(2);
/// How soon a restart waiting for its turn (`--restarts-at-once`) is tried again.
const RETRY_BUSY: Duration = Duration::from_millis(200);
