//! Placement: which host gets a new VM. Hosts that are reachable and have room, with CPU and
//! memory overcommit ratios (OpenStack's defaults since 2023: 4.0 CPU, 1.0 memory) and memory
//! reserved for the host itself; the host with the most free memory wins.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Policy {
    pub cpu_ratio: f64,
    pub memory_ratio: f64,
    pub reserved_memory_mib: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_ratio: 4.0,
            memory_ratio: 1.0,
            reserved_memory_mib: 512,
        }
    }
}

/// A candidate host and what its VMs already use.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub reachable: bool,
    pub cpu_cores: i64,
    pub memory_mib: i64,
    pub used_vcpus: i64,
    pub used_memory_mib: i64,
}

/// The chosen host, or why none fits.
pub fn choose(
    policy: &Policy,
    hosts: &[Candidate],
    vcpus: i64,
    memory_mib: i64,
) -> Result<String, String> {
    let mut best: Option<(&Candidate, f64)> = None;
    for h in hosts.iter().filter(|h| h.reachable) {
        let cpu_cap = h.cpu_cores as f64 * policy.cpu_ratio;
        let mem_cap =
            (h.memory_mib - policy.reserved_memory_mib).max(0) as f64 * policy.memory_ratio;
        let free_mem = mem_cap - h.used_memory_mib as f64;
        let fits = (h.used_vcpus + vcpus) as f64 <= cpu_cap && memory_mib as f64 <= free_mem;
        if fits && best.is_none_or(|(_, f)| free_mem > f) {
            best = Some((h, free_mem));
        }
    }
    best.map(|(h, _)| h.id.clone()).ok_or_else(|| {
        let reachable = hosts.iter().filter(|h| h.reachable).count();
        format!(
            "no host has room for {vcpus} vCPUs and {memory_mib} MiB ({reachable} reachable host(s); \
             overcommit cpu {} memory {}, {} MiB reserved per host)",
            policy.cpu_ratio, policy.memory_ratio, policy.reserved_memory_mib
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, reachable: bool, used_mem: i64) -> Candidate {
        Candidate {
            id: id.into(),
            reachable,
            cpu_cores: 2,
            memory_mib: 4096,
            used_vcpus: 0,
            used_memory_mib: used_mem,
        }
    }

    #[test]
    fn picks_the_roomiest_reachable_host_and_refuses_clearly() {
        let p = Policy::default();
        let hosts = [
            host("a", true, 1000),
            host("b", true, 0),
            host("c", false, 0),
        ];
        assert_eq!(choose(&p, &hosts, 1, 512).unwrap(), "b");
        // 8 vCPUs fit 2 cores at 4.0, 9 do not.
        assert!(choose(&p, &hosts, 8, 64).is_ok());
        let e = choose(&p, &hosts, 9, 64).unwrap_err();
        assert!(e.contains("no host has room"), "{e}");
        // Memory: 4096 - 512 reserved = 3584 at ratio 1.0.
        assert!(choose(&p, &hosts, 1, 3584).is_ok());
        assert!(choose(&p, &hosts, 1, 3585).is_err());
        assert!(choose(&p, &[host("c", false, 0)], 1, 1).is_err());
    }
}
