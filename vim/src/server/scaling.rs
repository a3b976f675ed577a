//! Automatic vertical scaling (docs/scaling.md): what vimd does with an agent's request to grow
//! or shrink a VM. Up doubles its vCPUs and its memory, down halves them, along the ladder
//! between the policy's floor and ceiling (and the VM's max_vcpus and max_memory_mib); a VM whose
//! host has no room is live-migrated to a host that has, and resized there; a request over the
//! ceiling is refused with `Scaling_Refused`. After a change, the policy's cool-down.

use std::sync::Arc;

use anyhow::Result;

use super::migrations::MigrateParams;
use super::{ResizeParams, Vimd};
use crate::db::{self, EventKind, JobKind, VmState};
use crate::placement;

/// The size a request asks for: double or half the vCPUs, within the floor and the ceiling.
pub fn next_vcpus(vcpus: i64, up: bool, floor: i64, ceiling: i64) -> i64 {
    let want = if up { vcpus * 2 } else { vcpus / 2 };
    want.clamp(floor.max(1), ceiling.max(1))
}

/// The memory a request asks for: double or half, within the floor and the ceiling, never the
/// wrong way, and a whole number of 2 MiB blocks away from what the VM has (virtio-mem's unit).
pub fn next_memory(mib: i64, up: bool, floor: i64, ceiling: i64) -> i64 {
    let want = if up { mib * 2 } else { mib / 2 }.clamp(floor.min(ceiling), ceiling);
    let want = if up { want.max(mib) } else { want.min(mib) };
    if (want - mib) % 2 != 0 {
        want - (want - mib).signum()
    } else {
        want
    }
}

impl Vimd {
    pub(super) async fn on_scale_request(
        self: &Arc<Self>,
        vm_id: &str,
        up: bool,
        req: &vim_proto::ScaleRequest,
    ) -> Result<()> {
        let Some(vm) = self.db.vm(vm_id).await? else {
            return Ok(());
        };
        let ignore = |why: &str| {
            tracing::info!(vm = vm_id, up, why, "scaling request ignored");
            Ok(())
        };
        if vm.state != VmState::Running {
            return ignore("the VM is not running");
        }
        let Some(policy) = self.db.scaling_policy_for(&vm).await?.filter(|p| p.enabled) else {
            return ignore("no scaling policy applies (any more)");
        };
        let now = db::now_ms();
        if now - vm.scaled_at < policy.cooldown_s * 1000 {
            return ignore("cooling down after the last change");
        }
        if self.db.unfinished_jobs_for(&vm.id).await? > 0 {
            return ignore("the VM has a job under way");
        }
        let ceiling = policy.max_vcpus.min(vm.vcpu_ceiling());
        let target = next_vcpus(vm.vcpus, up, policy.min_vcpus, ceiling);
        let memory = next_memory(
            vm.memory_mib,
            up,
            policy.min_memory_mib,
            policy.max_memory_mib.min(vm.memory_ceiling()),
        );
        if up && target <= vm.vcpus && memory <= vm.memory_mib {
            let why = format!(
                "asked to grow (CPU {:.0} % for {} s) but it is at its ceiling: {} vCPUs and \
                 {} MiB (policy {}, at most {} and {} MiB; the VM's max_vcpus {} and \
                 max_memory_mib {})",
                req.cpu_pct,
                req.window_s,
                vm.vcpus,
                vm.memory_mib,
                policy.scope,
                policy.max_vcpus,
                policy.max_memory_mib,
                vm.vcpu_ceiling(),
                vm.memory_ceiling()
            );
            self.event(EventKind::ScalingRefused, &vm.host_id, &vm.id, "", &why)
                .await;
            return Ok(());
        }
        if target == vm.vcpus && memory == vm.memory_mib {
            return ignore("already at the policy's floor");
        }
        let memory_mib = (memory != vm.memory_mib).then_some(memory as u64);
        let on_host = placement::Among {
            only: Some(&vm.host_id),
            ..Default::default()
        };
        let (more_vcpus, more_mib) = ((target - vm.vcpus).max(0), (memory - vm.memory_mib).max(0));
        let room_here = !up
            || placement::choose(&self.db, &self.policy, more_vcpus, more_mib, on_host)
                .await?
                .is_ok();
        let owner = format!("scaler:{}", policy.scope);
        if room_here {
            let params = ResizeParams {
                vcpus: target as u32,
                memory_mib,
                clamp_memory: true,
            };
            self.queue_job(JobKind::Resize, &owner, &vm.id, &params)
                .await?;
            self.db.set_scaled_at(&vm.id, now).await?;
            tracing::info!(
                vm = vm.id,
                from = vm.vcpus,
                to = target,
                from_mib = vm.memory_mib,
                to_mib = memory,
                "scaling: resize"
            );
            return Ok(());
        }
        // No room here: to a host with room for the whole new size, then resized there.
        let elsewhere = placement::Among::for_vm(&vm, None, Some(&vm.host_id));
        match placement::choose(&self.db, &self.policy, target, memory, elsewhere).await? {
            Ok(to) => {
                let params = MigrateParams {
                    to: Some(to.clone()),
                    downtime_ms: super::migrations::DEFAULT_DOWNTIME_MS,
                    then_vcpus: Some(target as u32),
                    then_memory_mib: memory_mib,
                    reason: Some("scaling".into()),
                    ..Default::default()
                };
                self.queue_job(JobKind::Migrate, &owner, &vm.id, &params)
                    .await?;
                self.db.set_scaled_at(&vm.id, now).await?;
                tracing::info!(
                    vm = vm.id,
                    to,
                    vcpus = target,
                    "scaling: migrate, then resize"
                );
            }
            Err(why) => {
                let why = format!(
                    "asked to grow to {target} vCPUs and {memory} MiB, but host {} has no room \
                     and {why}",
                    vm.host_id
                );
                self.event(EventKind::ScalingRefused, &vm.host_id, &vm.id, "", &why)
                    .await;
            }
        }
        Ok(())
    }

    /// A migration the scaler asked for has completed: the VM is resized on its new host.
    pub(super) async fn resize_after_migration(
        &self,
        parent: &db::Job,
        vcpus: u32,
        memory_mib: Option<u64>,
    ) -> Result<()> {
        let params = ResizeParams {
            vcpus,
            memory_mib,
            clamp_memory: true,
        };
        self.queue_job(JobKind::Resize, &parent.owner, &parent.vm_id, &params)
            .await?;
        Ok(())
    }

    /// Writes a job for VM `vm_id` with its parameters and queues it: the one way a job that
    /// changes a running VM is made.
    pub async fn queue_job(
        &self,
        kind: JobKind,
        owner: &str,
        vm_id: &str,
        params: &impl serde::Serialize,
    ) -> Result<db::Job> {
        let job = db::Job {
            params: serde_json::to_string(params)?,
            ..db::Job::new(kind, owner, vm_id)
        };
        self.db.add_job(&job, None).await?;
        self.outbox.push(&job.id);
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::{next_memory, next_vcpus};

    #[test]
    fn memory_doubles_and_halves_on_whole_blocks_never_the_wrong_way() {
        assert_eq!(next_memory(4096, true, 4096, 524_288), 8192);
        assert_eq!(next_memory(8192, false, 4096, 524_288), 4096);
        assert_eq!(next_memory(4096, false, 4096, 524_288), 4096);
        // Below the floor: up goes to the floor, down stays.
        assert_eq!(next_memory(64, true, 4096, 524_288), 4096);
        assert_eq!(next_memory(64, false, 4096, 524_288), 64);
        // The VM's own ceiling under the floor: up to it, no further; no panic.
        assert_eq!(next_memory(64, true, 4096, 256), 256);
        assert_eq!(next_memory(256, true, 4096, 256), 256);
        // Odd sizes stay on the 2 MiB grid from where the VM is.
        assert_eq!(next_memory(97, false, 16, 1024), 49);
        assert_eq!(next_memory(97, true, 16, 1000), 193);
        assert_eq!(next_memory(97, true, 16, 100), 99);
    }

    #[test]
    fn the_ladder_doubles_and_halves_within_floor_and_ceiling() {
        assert_eq!(next_vcpus(1, true, 1, 128), 2);
        assert_eq!(next_vcpus(48, true, 1, 64), 64);
        assert_eq!(next_vcpus(64, true, 1, 64), 64);
        assert_eq!(next_vcpus(8, false, 1, 128), 4);
        assert_eq!(next_vcpus(3, false, 2, 128), 2);
        assert_eq!(next_vcpus(1, false, 1, 128), 1);
        // A VM above a lowered ceiling is brought down to it.
        assert_eq!(next_vcpus(8, false, 1, 2), 2);
    }
}
