//! The standby keeper (docs/standby.md): every VM with HA policy `standby` that runs has a
//! standby VMM on another host, which failover promotes when the VM's host fails. Held by the
//! leader: once a second it places a standby where one is missing (a host with room for the
//! VM's memory, away from the VM's host and its anti-affinity group), and lets go of one whose
//! host went silent or stopped reporting it, or that the VM no longer needs.
//!
//! The database says where each standby is (`vms.standby_host`); the standby's host says it
//! is alive in every heartbeat (`vms.standby_seen`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::Vimd;
use crate::db::{self, HaPolicy, HostState, JobKind, VmState};

const TICK: Duration = Duration::from_secs(1);

/// Keeps the standbys (leader only).
pub fn run(v: Arc<Vimd>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !v.is_leader() {
                continue;
            }
            if let Err(e) = v.standby_tick().await {
                tracing::warn!(error = %e, "standby keeper");
            }
        }
    });
}

/// What the keeper does about one VM's standby.
#[derive(Debug, PartialEq)]
enum Decision {
    Keep,
    /// Start one on a host placement picks.
    Place,
    /// Forget the one on the recorded host; stop it there if that host can hear it.
    Drop {
        stop: bool,
        why: &'static str,
    },
}

/// Decides for `vm`, given whether its standby host is reachable and how long ago that host
/// last reported the standby.
fn decide(
    vm: &db::Vm,
    standby_host_reachable: bool,
    unseen: Duration,
    grace: Duration,
) -> Decision {
    // A VM being restarted (its host failed), moved or resized keeps what it has: its restart
    // may be promoting the standby right now.
    let settled = matches!(
        vm.state,
        VmState::Running
            | VmState::Stopped
            | VmState::Suspended
            | VmState::Failed
            | VmState::Deleted
    );
    let wants = vm.ha == HaPolicy::Standby && vm.state == VmState::Running;
    if vm.standby_host.is_empty() {
        return if wants {
            Decision::Place
        } else {
            Decision::Keep
        };
    }
    if vm.standby_host == vm.host_id {
        // Promoted: the standby is the VM now.
        return Decision::Drop {
            stop: false,
            why: "promoted: it runs the VM",
        };
    }
    if !settled {
        return Decision::Keep;
    }
    if !wants {
        return Decision::Drop {
            stop: standby_host_reachable,
            why: "the VM needs no standby now",
        };
    }
    if !standby_host_reachable {
        return Decision::Drop {
            stop: false,
            why: "its host is not reachable",
        };
    }
    if unseen > grace {
        return Decision::Drop {
            stop: true,
            why: "its host has not reported it",
        };
    }
    Decision::Keep
}

impl Vimd {
    async fn standby_tick(self: &Arc<Self>) -> Result<()> {
        let vms = self.db.standby_vms().await?;
        if vms.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = vms
            .iter()
            .filter(|v| !v.standby_host.is_empty())
            .map(|v| v.standby_host.clone())
            .collect();
        let reachable: HashMap<String, bool> = self
            .db
            .hosts_among(&ids)
            .await?
            .into_iter()
            .map(|h| (h.id, h.state == HostState::Reachable))
            .collect();
        // A standby not in a heartbeat for this long is gone (its VMM ended, or never started).
        let grace = (self.monitoring.interval * 5).max(Duration::from_secs(10));
        let now = db::now_ms();
        for vm in vms {
            let up = reachable.get(&vm.standby_host).copied().unwrap_or(false);
            let unseen = Duration::from_millis((now - vm.standby_seen).max(0) as u64);
            match decide(&vm, up, unseen, grace) {
                Decision::Keep => {}
                Decision::Place => self.place_standby(&vm).await?,
                Decision::Drop { stop, why } => {
                    if !self
                        .db
                        .set_standby_host(&vm.id, &vm.standby_host, "")
                        .await?
                    {
                        continue;
                    }
                    tracing::info!(vm = vm.id, host = vm.standby_host, why, "standby dropped");
                    if stop {
                        self.standby_job(JobKind::Evict, &vm, &vm.standby_host)
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Picks a host for `vm`'s standby and asks it to start one.
    async fn place_standby(self: &Arc<Self>, vm: &db::Vm) -> Result<()> {
        let among = crate::placement::Among::for_vm(vm, None, Some(&vm.host_id));
        // Its memory, no CPU: a standby waits.
        let host = match crate::placement::choose(&self.db, &self.policy, 0, vm.memory_mib, among)
            .await?
        {
            Ok(h) => h,
            Err(why) => {
                tracing::debug!(vm = vm.id, why, "no host for a standby yet");
                return Ok(());
            }
        };
        if self.db.set_standby_host(&vm.id, "", &host).await? {
            tracing::info!(vm = vm.id, host, "standby placed");
            self.standby_job(JobKind::Standby, vm, &host).await?;
        }
        Ok(())
    }

    /// Queues a job for `vm` to `host` (not the VM's host).
    async fn standby_job(self: &Arc<Self>, kind: JobKind, vm: &db::Vm, host: &str) -> Result<()> {
        let mut job = db::Job::new(kind, "vimd", &vm.id);
        job.host_id = host.to_string();
        self.db.add_job(&job, None).await?;
        self.outbox.push(&job.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(ha: HaPolicy, state: VmState, host: &str, standby: &str) -> db::Vm {
        db::Vm {
            ha,
            state,
            host_id: host.into(),
            standby_host: standby.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_standby_is_placed_kept_and_dropped_when_it_should_be() {
        let g = Duration::from_secs(10);
        let ok = Duration::from_secs(1);
        let running = |s: &str| vm(HaPolicy::Standby, VmState::Running, "a", s);
        assert_eq!(decide(&running(""), false, ok, g), Decision::Place);
        assert_eq!(decide(&running("b"), true, ok, g), Decision::Keep);
        // Its host went silent, or stopped reporting it.
        assert!(matches!(
            decide(&running("b"), false, ok, g),
            Decision::Drop { stop: false, .. }
        ));
        assert!(matches!(
            decide(&running("b"), true, Duration::from_secs(11), g),
            Decision::Drop { stop: true, .. }
        ));
        // Promoted: the VM runs where its standby was; that VMM is not stopped.
        assert!(matches!(
            decide(&running("a"), true, ok, g),
            Decision::Drop { stop: false, .. }
        ));
        // Its host failed and it is being restarted: nothing touches the standby, which the
        // restart may be promoting.
        for s in [
            VmState::Unknown,
            VmState::PendingRestart,
            VmState::Migrating,
        ] {
            let v = vm(HaPolicy::Standby, s, "a", "b");
            assert_eq!(decide(&v, true, Duration::from_secs(60), g), Decision::Keep);
        }
        // No longer wanted: stopped where it can be.
        let v = vm(HaPolicy::Restart, VmState::Running, "a", "b");
        assert!(matches!(
            decide(&v, true, ok, g),
            Decision::Drop { stop: true, .. }
        ));
        let v = vm(HaPolicy::Standby, VmState::Stopped, "a", "b");
        assert!(matches!(
            decide(&v, true, ok, g),
            Decision::Drop { stop: true, .. }
        ));
        // A VM that needs none and has none: nothing.
        let v = vm(HaPolicy::Resume, VmState::Running, "a", "");
        assert_eq!(decide(&v, true, ok, g), Decision::Keep);
    }
}
