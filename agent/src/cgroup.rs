//! A control group per VM whose CPU and memory limits follow the VM's size (docs/sandbox.md).
//!
//! cgroup v2 where its `cpu` and `memory` controllers are available, else the v1 `cpu` and
//! `memory` hierarchies (hosts still on v1, this CI's among them). Each VM's group is
//! `vim-vms/HOST/VM` in each hierarchy: one per agent, so that two agents on one machine (the
//! fleet tests) never share a VM's group during a migration between them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The scheduler period the CPU quota is a multiple of.
const PERIOD_US: u64 = 100_000;

/// What the VMM itself may use beyond the guest's memory: its own heap, device buffers, KVM's
/// page tables and the page cache of snapshot and migration files (reclaimable, but charged).
fn memory_limit_bytes(memory_mib: u64) -> u64 {
    (memory_mib + (memory_mib / 16).max(128)) << 20
}

#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// The unified hierarchy's `vim-vms/HOST` group.
    V2 { base: PathBuf },
    /// The v1 hierarchies' `vim-vms/HOST` groups.
    V1 { cpu: PathBuf, memory: PathBuf },
}

impl Hierarchy {
    /// Finds the mounted hierarchies (from `/proc/mounts`) and creates this agent's parent
    /// groups. An error says what is missing: without CPU and memory controllers the VMMs
    /// cannot be limited.
    pub fn detect(host_id: &str) -> Result<Hierarchy> {
        let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
        Hierarchy::from_mounts(&mounts, host_id)
    }

    fn from_mounts(mounts: &str, host_id: &str) -> Result<Hierarchy> {
        let sub = Path::new("vim-vms").join(host_id);
        let mut v1_cpu = None;
        let mut v1_memory = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, dir, fstype, opts, ..] = f[..] else {
                continue;
            };
            let dir = PathBuf::from(dir);
            if fstype == "cgroup2" {
                let ctl =
                    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                let have: Vec<&str> = ctl.split_whitespace().collect();
                if have.contains(&"cpu") && have.contains(&"memory") {
                    let base = dir.join(&sub);
                    // Controllers are handed down level by level; only leaves hold processes.
                    let mut at = dir.clone();
                    enable_controllers(&at)?;
                    for c in sub.components() {
                        at = at.join(c);
                        mkdir(&at)?;
                        enable_controllers(&at)?;
                    }
                    return Ok(Hierarchy::V2 { base });
                }
            } else if fstype == "cgroup" {
                let o: Vec<&str> = opts.split(',').collect();
                if o.contains(&"cpu") && v1_cpu.is_none() {
                    v1_cpu = Some(dir.join(&sub));
                }
                if o.contains(&"memory") && v1_memory.is_none() {
                    v1_memory = Some(dir.join(&sub));
                }
            }
        }
        match (v1_cpu, v1_memory) {
            (Some(cpu), Some(memory)) => {
                mkdir(&cpu)?;
                mkdir(&memory)?;
                Ok(Hierarchy::V1 { cpu, memory })
            }
            _ => anyhow::bail!(
                "no cgroup hierarchy with the cpu and memory controllers is mounted \
                 (cgroup2 with both enabled, or the v1 cpu and memory hierarchies)"
            ),
        }
    }

    /// VM `id`'s group(s), created if missing, with limits for `vcpus` and `memory_mib`; the
    /// `cgroup.procs` files a new VMM writes itself into before it runs.
    pub fn create(&self, id: &str, vcpus: u32, memory_mib: u64) -> Result<Vec<PathBuf>> {
        let dirs = self.dirs(id);
        for d in &dirs {
            mkdir(d)?;
        }
        self.set_limits(id, vcpus, memory_mib)?;
        Ok(dirs.iter().map(|d| d.join("cgroup.procs")).collect())
    }

    /// Sets VM `id`'s limits for its (new) size; nothing if it has no group (a VMM started by
    /// an agent that did not jail it).
    pub fn set_limits(&self, id: &str, vcpus: u32, memory_mib: u64) -> Result<()> {
        let quota = u64::from(vcpus.max(1)) * PERIOD_US;
        let mem = memory_limit_bytes(memory_mib);
        match self {
            Hierarchy::V2 { .. } => {
                let d = &self.dirs(id)[0];
                if !d.is_dir() {
                    return Ok(());
                }
                write(&d.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
                write(&d.join("memory.max"), &mem.to_string())?;
            }
            Hierarchy::V1 { .. } => {
                let d = self.dirs(id);
                if !d[0].is_dir() || !d[1].is_dir() {
                    return Ok(());
                }
                write(&d[0].join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&d[0].join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&d[1].join("memory.limit_in_bytes"), &mem.to_string())?;
            }
        }
        Ok(())
    }

    /// The limits VM `id`'s group has now: (CPU quota in CPUs × 1000, memory bytes).
    #[cfg(test)]
    fn limits(&self, id: &str) -> Option<(u64, u64)> {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        match self {
            Hierarchy::V2 { .. } => {
                let d = &self.dirs(id)[0];
                let cpu = read(d.join("cpu.max"))?;
                let q: u64 = cpu.split_whitespace().next()?.parse().ok()?;
                let mem: u64 = read(d.join("memory.max"))?.trim().parse().ok()?;
                Some((q * 1000 / PERIOD_US, mem))
            }
            Hierarchy::V1 { .. } => {
                let d = self.dirs(id);
                let q: u64 = read(d[0].join("cpu.cfs_quota_us"))?.trim().parse().ok()?;
                let p: u64 = read(d[0].join("cpu.cfs_period_us"))?.trim().parse().ok()?;
                let mem: u64 = read(d[1].join("memory.limit_in_bytes"))?
                    .trim()
                    .parse()
                    .ok()?;
                Some((q * 1000 / p.max(1), mem))
            }
        }
    }

    /// Removes VM `id`'s groups (its VMM has exited; a group with a process left stays).
    pub fn remove(&self, id: &str) {
        for d in self.dirs(id) {
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(cgroup = %d.display(), error = %e, "cannot remove the VM's cgroup");
                }
            }
        }
    }

    /// Removes every VM group of this agent that holds no process (left by a VMM that exited
    /// while no agent ran, or by a removal that raced its VMM's last thread); a VM started
    /// again gets a new one. Only the groups of VMs `ours` says this agent ran: another agent
    /// with the same host id on this machine (two test fleets) may be about to use its own.
    pub fn prune(&self, ours: impl Fn(&str) -> bool) {
        let bases = match self {
            Hierarchy::V2 { base } => vec![base.clone()],
            Hierarchy::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
        };
        for b in bases {
            for e in std::fs::read_dir(&b).into_iter().flatten().flatten() {
                if !ours(&e.file_name().to_string_lossy()) {
                    continue;
                }
                // A group with a live process is busy: it stays.
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Hierarchy::V2 { base } => vec![base.join(id)],
            Hierarchy::V1 { cpu, memory } => vec![cpu.join(id), memory.join(id)],
        }
    }
}

fn mkdir(d: &Path) -> Result<()> {
    std::fs::create_dir_all(d).with_context(|| format!("cannot create cgroup {}", d.display()))
}

fn write(f: &Path, v: &str) -> Result<()> {
    std::fs::write(f, v).with_context(|| format!("cannot write {v} to {}", f.display()))
}

fn enable_controllers(dir: &Path) -> Result<()> {
    write(&dir.join("cgroup.subtree_control"), "+cpu +memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_leave_room_for_the_vmm() {
        assert_eq!(memory_limit_bytes(512), 640 << 20);
        assert_eq!(memory_limit_bytes(4096), (4096 + 256) << 20);
    }

    #[test]
    fn v1_hierarchies_are_found_by_their_controllers() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().display();
        let mounts = format!(
            "cgroup {p}/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n\
             cgroup {p}/memory cgroup rw,memory 0 0\n\
             cgroup {p}/cpuset cgroup rw,cpuset 0 0\n"
        );
        let h = Hierarchy::from_mounts(&mounts, "h1").unwrap();
        let procs = h.create("vm1", 2, 512).unwrap();
        assert_eq!(
            procs,
            vec![
                t.path().join("cpu,cpuacct/vim-vms/h1/vm1/cgroup.procs"),
                t.path().join("memory/vim-vms/h1/vm1/cgroup.procs")
            ]
        );
        assert_eq!(h.limits("vm1"), Some((2000, 640 << 20)));
        h.set_limits("vm1", 4, 1024).unwrap();
        assert_eq!(h.limits("vm1"), Some((4000, (1024 + 128) << 20)));
        // A VM without a group (started unjailed) is left alone.
        h.set_limits("other", 1, 64).unwrap();
        assert!(!t.path().join("memory/vim-vms/h1/other").exists());
        // Pruned: empty groups of this agent's VMs only (another agent with the same host id
        // may be about to start a VMM in its own).
        for vm in ["mine", "theirs"] {
            for c in ["cpu,cpuacct", "memory"] {
                std::fs::create_dir(t.path().join(c).join("vim-vms/h1").join(vm)).unwrap();
            }
        }
        h.prune(|id| id == "mine");
        for c in ["cpu,cpuacct", "memory"] {
            let base = t.path().join(c).join("vim-vms/h1");
            assert!(!base.join("mine").exists() && base.join("theirs").exists());
        }
        assert!(Hierarchy::from_mounts("cgroup /x cgroup rw,cpu 0 0\n", "h1").is_err());
    }

    #[test]
    fn v2_needs_cpu_and_memory_and_hands_them_down() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("unified");
        std::fs::create_dir_all(&root).unwrap();
        let mounts = format!("cgroup2 {} cgroup2 rw 0 0\n", root.display());
        std::fs::write(root.join("cgroup.controllers"), "hugetlb").unwrap();
        assert!(Hierarchy::from_mounts(&mounts, "h1").is_err());
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        let h = Hierarchy::from_mounts(&mounts, "h1").unwrap();
        for d in ["", "vim-vms", "vim-vms/h1"] {
            let sc = std::fs::read_to_string(root.join(d).join("cgroup.subtree_control"));
            assert_eq!(sc.unwrap(), "+cpu +memory", "{d}");
        }
        h.create("vm1", 3, 2048).unwrap();
        let vm = root.join("vim-vms/h1/vm1");
        assert_eq!(
            std::fs::read_to_string(vm.join("cpu.max")).unwrap(),
            "300000 100000"
        );
        assert_eq!(h.limits("vm1"), Some((3000, (2048 + 128) << 20)));
    }
}
