//! Load-aware rebalancing (docs/balance.md), the planning half: a model of the hosts and the VMs
//! on them, how uneven their load is, and which live migrations would even it out. The VIM's
//! balancer (`server::balancer`) feeds it from the database and carries out what it plans; the
//! dry run prints the plan.
//!
//! A host's load is its dominant resource: the larger of its CPU in use (its VMs' vCPU threads,
//! from heartbeats, against its cores) and its memory committed (its VMs' memory against what
//! placement may hand out). The imbalance is the coefficient of variation of the hosts' loads
//! (standard deviation over mean), as Proxmox's and DRS's rules use it: 0 when all carry the
//! same share, 1 when one of two hosts carries everything.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::db::{Host, HostState, Vm, VmState};
use crate::placement::Policy;

/// The balancer's settings (`PUT /cluster/balance`), kept in the database.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Whether it moves VMs on its own (off by default).
    pub on: bool,
    /// It acts on an imbalance above this...
    pub threshold: f64,
    /// ...measured every this many seconds...
    pub interval_s: u64,
    /// ...that lasted this many rounds in a row...
    pub rounds: u32,
    /// ...with a move that lowers it by at least this fraction.
    pub min_gain: f64,
    /// A VM that moved (for any reason) less than this many seconds ago stays put: no ping-pong.
    pub settle_s: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            on: false,
            threshold: 0.3,
            interval_s: 60,
            rounds: 3,
            min_gain: 0.10,
            settle_s: 300,
        }
    }
}

impl Settings {
    /// What is wrong with these settings, if anything.
    pub fn check(&self) -> Result<(), String> {
        let bad = |what: &str, range: &str| Err(format!("{what} must be {range}"));
        if !(0.0..=10.0).contains(&self.threshold) {
            return bad("threshold", "0 to 10");
        }
        if !(1..=86_400).contains(&self.interval_s) {
            return bad("interval_s", "1 to 86400");
        }
        if !(1..=100).contains(&self.rounds) {
            return bad("rounds", "1 to 100");
        }
        if !(0.0..=1.0).contains(&self.min_gain) {
            return bad("min_gain", "0 to 1");
        }
        if self.settle_s > 86_400 {
            return bad("settle_s", "0 to 86400");
        }
        Ok(())
    }
}

/// A host as the balancer sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostLoad {
    pub id: String,
    /// Cores in use by its VMs, as a fraction of its cores.
    pub cpu: f64,
    /// Memory committed to its VMs, as a fraction of what placement may hand out.
    pub memory: f64,
    /// The larger of the two.
    pub load: f64,
    #[serde(skip)]
    cores: f64,
    #[serde(skip)]
    vcpu_room: f64,
    #[serde(skip)]
    memory_room: f64,
    #[serde(skip)]
    used_cores: f64,
    #[serde(skip)]
    vcpus: i64,
    #[serde(skip)]
    memory_mib: i64,
    /// Takes part in a migration already: no second one this round.
    #[serde(skip)]
    busy: bool,
}

impl HostLoad {
    fn update(&mut self) {
        self.cpu = self.used_cores / self.cores;
        self.memory = self.memory_mib as f64 / self.memory_room;
        self.load = self.cpu.max(self.memory);
    }

    fn fits(&self, vm: &Guest) -> bool {
        (self.vcpus + vm.vcpus) as f64 <= self.vcpu_room
            && (self.memory_mib + vm.memory_mib) as f64 <= self.memory_room
    }
}

/// A VM on one of the model's hosts.
#[derive(Debug, Clone)]
struct Guest {
    id: String,
    host: usize,
    used_cores: f64,
    vcpus: i64,
    memory_mib: i64,
    group: String,
    /// Running, with no job under way, and not moved lately.
    movable: bool,
}

/// One planned live migration, with the figures before and after it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Move {
    pub vm_id: String,
    pub from: String,
    pub to: String,
    /// `load`, or `anti-affinity` (it shared a host with a VM of its group).
    pub reason: &'static str,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// The source's and the target's load, before and after.
    pub from_load: [f64; 2],
    pub to_load: [f64; 2],
}

impl Move {
    /// One line for events and logs.
    pub fn describe(&self) -> String {
        format!(
            "{} -> {} ({}): imbalance {:.2} -> {:.2}; {} load {:.2} -> {:.2}, {} {:.2} -> {:.2}",
            self.from,
            self.to,
            self.reason,
            self.imbalance_before,
            self.imbalance_after,
            self.from,
            self.from_load[0],
            self.from_load[1],
            self.to,
            self.to_load[0],
            self.to_load[1]
        )
    }
}

/// The hosts that may take part (reachable, not draining, with cores and memory reported) and
/// the VMs on them.
#[derive(Debug, Clone)]
pub struct Cluster {
    hosts: Vec<HostLoad>,
    guests: Vec<Guest>,
}

/// What the model needs besides hosts and VMs: the time, which VMs and hosts a job is busy
/// with, how long a moved VM stays put, and how long the hosts of a move take no part in
/// another (their figures have not settled: the moved VM's first report from its new host
/// reads no CPU).
pub struct Context<'a> {
    pub now_ms: i64,
    pub settle_s: u64,
    pub fresh_ms: i64,
    pub busy_vms: &'a HashSet<String>,
    pub busy_hosts: &'a HashSet<String>,
}

/// A VM's last finished live migration, from its record: when (ms since the epoch), and
/// between which hosts.
struct LastMove {
    at: i64,
    source: String,
    target: String,
}

fn last_move(vm: &Vm) -> Option<LastMove> {
    let v: serde_json::Value = serde_json::from_str(&vm.last_migration).ok()?;
    let host = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    Some(LastMove {
        at: v["at"].as_i64()?,
        source: host("source"),
        target: host("target"),
    })
}

impl Cluster {
    pub fn new(hosts: &[Host], vms: &[Vm], policy: &Policy, cx: &Context<'_>) -> Cluster {
        let moves: Vec<Option<LastMove>> = vms.iter().map(last_move).collect();
        let unsettled: HashSet<&str> = moves
            .iter()
            .flatten()
            .filter(|m| cx.now_ms - m.at < cx.fresh_ms)
            .flat_map(|m| [m.source.as_str(), m.target.as_str()])
            .collect();
        let mut index = HashMap::new();
        let mut out = Vec::new();
        for h in hosts {
            let memory_room =
                (h.memory_mib - policy.reserved_memory_mib) as f64 * policy.memory_ratio;
            if h.state != HostState::Reachable || h.draining || h.cpu_cores < 1 || memory_room < 1.0
            {
                continue;
            }
            index.insert(h.id.as_str(), out.len());
            out.push(HostLoad {
                id: h.id.clone(),
                cpu: 0.0,
                memory: 0.0,
                load: 0.0,
                cores: h.cpu_cores as f64,
                vcpu_room: h.cpu_cores as f64 * policy.cpu_ratio,
                memory_room,
                used_cores: 0.0,
                vcpus: 0,
                memory_mib: 0,
                busy: cx.busy_hosts.contains(&h.id) || unsettled.contains(h.id.as_str()),
            });
        }
        let mut guests = Vec::new();
        for (vm, last) in vms.iter().zip(&moves) {
            if vm.state == VmState::Deleted {
                continue;
            }
            let Some(&host) = index.get(vm.host_id.as_str()) else {
                continue;
            };
            let used_cores = if vm.state == VmState::Running {
                vm.cpu_pct.max(0.0) / 100.0
            } else {
                0.0
            };
            let h = &mut out[host];
            h.used_cores += used_cores;
            h.vcpus += vm.vcpus;
            h.memory_mib += vm.memory_mib;
            let settled = last
                .as_ref()
                .is_none_or(|m| cx.now_ms - m.at >= cx.settle_s as i64 * 1000);
            guests.push(Guest {
                id: vm.id.clone(),
                host,
                used_cores,
                vcpus: vm.vcpus,
                memory_mib: vm.memory_mib,
                // Groups are the owner's: two consumers' "web" are not one group.
                group: if vm.group.is_empty() {
                    String::new()
                } else {
                    format!("{}/{}", vm.owner, vm.group)
                },
                movable: vm.state == VmState::Running && settled && !cx.busy_vms.contains(&vm.id),
            });
        }
        for h in &mut out {
            h.update();
        }
        Cluster { hosts: out, guests }
    }

    pub fn hosts(&self) -> &[HostLoad] {
        &self.hosts
    }

    pub fn imbalance(&self) -> f64 {
        imbalance(self.hosts.iter().map(|h| h.load))
    }

    /// Whether two VMs of one group share a host.
    pub fn group_shares_a_host(&self) -> bool {
        let mut seen = HashSet::new();
        self.guests
            .iter()
            .filter(|g| !g.group.is_empty())
            .any(|g| !seen.insert((g.group.as_str(), g.host)))
    }

    /// The moves that even the load out, best first, applied to the model one after another,
    /// at most `max`. Each lowers the imbalance by at least `min_gain` of itself while it is
    /// above `threshold`; a VM sharing a host with one of its group moves first whatever the
    /// load. With `one_per_host` each host takes part in one move at most (one round of the
    /// balancer); without, the moves are what successive rounds would do (the dry run).
    pub fn plan(&mut self, s: &Settings, max: usize, one_per_host: bool) -> Vec<Move> {
        let mut moves = Vec::new();
        let mut used = vec![false; self.hosts.len()];
        while moves.len() < max {
            let apart = self
                .apart_move(&used)
                .map(|(g, to)| (g, to, "anti-affinity"));
            let Some((g, to, reason)) =
                apart.or_else(|| self.load_move(s, &used).map(|(g, to)| (g, to, "load")))
            else {
                break;
            };
            let from = self.guests[g].host;
            let before = self.imbalance();
            let from_before = self.hosts[from].load;
            let to_before = self.hosts[to].load;
            self.shift(g, to);
            moves.push(Move {
                vm_id: self.guests[g].id.clone(),
                from: self.hosts[from].id.clone(),
                to: self.hosts[to].id.clone(),
                reason,
                imbalance_before: before,
                imbalance_after: self.imbalance(),
                from_load: [from_before, self.hosts[from].load],
                to_load: [to_before, self.hosts[to].load],
            });
            // Moved once per plan: the next round measures it where it went.
            self.guests[g].movable = false;
            if one_per_host {
                used[from] = true;
                used[to] = true;
            }
        }
        moves
    }

    /// Members of `g`'s group on host `h`, `g` itself included if it is there.
    fn group_count(&self, g: usize, h: usize) -> usize {
        let group = &self.guests[g].group;
        if group.is_empty() {
            return 0;
        }
        self.guests
            .iter()
            .filter(|o| o.host == h && &o.group == group)
            .count()
    }

    fn free(&self, h: usize, used: &[bool]) -> bool {
        !used[h] && !self.hosts[h].busy
    }

    /// Whether `g` may go to host `to`: another host, free this round, with room, and no VM of
    /// its group there.
    fn may_go(&self, g: usize, to: usize, used: &[bool]) -> bool {
        let guest = &self.guests[g];
        to != guest.host
            && self.free(to, used)
            && self.hosts[to].fits(guest)
            && self.group_count(g, to) == 0
    }

    /// A VM that shares its host with one of its group, and the least loaded host it may go to.
    fn apart_move(&self, used: &[bool]) -> Option<(usize, usize)> {
        for (g, guest) in self.guests.iter().enumerate() {
            if !guest.movable || !self.free(guest.host, used) || self.group_count(g, guest.host) < 2
            {
                continue;
            }
            let to = (0..self.hosts.len())
                .filter(|&to| self.may_go(g, to, used))
                .min_by(|&a, &b| self.hosts[a].load.total_cmp(&self.hosts[b].load));
            if let Some(to) = to {
                return Some((g, to));
            }
        }
        None
    }

    /// The move that lowers the imbalance most, if the imbalance is over the threshold and the
    /// move lowers it by at least `min_gain` of itself.
    fn load_move(&self, s: &Settings, used: &[bool]) -> Option<(usize, usize)> {
        let before = self.imbalance();
        if before <= s.threshold {
            return None;
        }
        let mut best: Option<(f64, usize, usize)> = None;
        for (g, guest) in self.guests.iter().enumerate() {
            if !guest.movable || !self.free(guest.host, used) {
                continue;
            }
            for to in 0..self.hosts.len() {
                if !self.may_go(g, to, used) {
                    continue;
                }
                let after = self.imbalance_if(g, to);
                if best.is_none_or(|(b, _, _)| after < b) {
                    best = Some((after, g, to));
                }
            }
        }
        let (after, g, to) = best?;
        ((before - after) / before >= s.min_gain).then_some((g, to))
    }

    /// The imbalance if `g` moved to `to`.
    fn imbalance_if(&self, g: usize, to: usize) -> f64 {
        let mut c = self.clone();
        c.shift(g, to);
        c.imbalance()
    }

    fn shift(&mut self, g: usize, to: usize) {
        let guest = self.guests[g].clone();
        let from = &mut self.hosts[guest.host];
        from.used_cores -= guest.used_cores;
        from.vcpus -= guest.vcpus;
        from.memory_mib -= guest.memory_mib;
        from.update();
        let t = &mut self.hosts[to];
        t.used_cores += guest.used_cores;
        t.vcpus += guest.vcpus;
        t.memory_mib += guest.memory_mib;
        t.update();
        self.guests[g].host = to;
    }
}

/// The coefficient of variation of `loads`; 0 for fewer than two hosts or a nearly idle cluster
/// (under 5 % on average: moving VMs between hosts that have room to spare gains nothing, and
/// small loads would make noise look like imbalance).
pub fn imbalance(loads: impl Iterator<Item = f64>) -> f64 {
    let loads: Vec<f64> = loads.collect();
    if loads.len() < 2 {
        return 0.0;
    }
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    if mean < 0.05 {
        return 0.0;
    }
    let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str) -> Host {
        Host {
            id: id.into(),
            cpu_cores: 2,
            memory_mib: 8192,
            state: HostState::Reachable,
            ..Host::default()
        }
    }

    fn vm(id: &str, host: &str, cpu_pct: f64) -> Vm {
        Vm {
            id: id.into(),
            owner: "o".into(),
            host_id: host.into(),
            vcpus: 1,
            memory_mib: 256,
            cpu_pct,
            state: VmState::Running,
            ..Vm::default()
        }
    }

    fn model(hosts: &[Host], vms: &[Vm], busy_hosts: &[&str]) -> Cluster {
        let busy_vms = HashSet::new();
        let busy_hosts: HashSet<String> = busy_hosts.iter().map(|h| h.to_string()).collect();
        let cx = Context {
            now_ms: 1_000_000_000,
            settle_s: 300,
            fresh_ms: 5000,
            busy_vms: &busy_vms,
            busy_hosts: &busy_hosts,
        };
        Cluster::new(hosts, vms, &Policy::default(), &cx)
    }

    #[test]
    fn imbalance_is_the_coefficient_of_variation() {
        assert_eq!(imbalance([0.5, 0.5].into_iter()), 0.0);
        assert!((imbalance([1.0, 0.0].into_iter()) - 1.0).abs() < 1e-9);
        assert_eq!(
            imbalance([0.09, 0.0].into_iter()),
            0.0,
            "a nearly idle cluster"
        );
        assert_eq!(imbalance([0.9].into_iter()), 0.0, "one host");
    }

    /// Three VMs burning a core's two thirds each on a, nothing on b: one move, then the
    /// split 2/1 is as even as whole VMs allow, and the plan stops.
    #[test]
    fn three_busy_vms_on_one_host_are_spread_until_no_move_helps() {
        let hosts = [host("a"), host("b")];
        let vms = [vm("1", "a", 66.0), vm("2", "a", 66.0), vm("3", "a", 66.0)];
        let s = Settings::default();
        let mut m = model(&hosts, &vms, &[]);
        assert!(m.imbalance() > 0.9, "{}", m.imbalance());
        let moves = m.plan(&s, 10, false);
        assert_eq!(moves.len(), 1, "{moves:?}");
        let mv = &moves[0];
        assert_eq!(
            (mv.from.as_str(), mv.to.as_str(), mv.reason),
            ("a", "b", "load")
        );
        assert!(mv.imbalance_after < mv.imbalance_before * 0.9, "{mv:?}");
        assert!((mv.from_load[0] - 0.99).abs() < 1e-9 && (mv.to_load[1] - 0.33).abs() < 1e-9);
        assert!(
            mv.describe()
                .contains("a -> b (load): imbalance 1.00 -> 0.33"),
            "{}",
            mv.describe()
        );
        // A round of the balancer moves one VM per host pair as well.
        let mut m = model(&hosts, &vms, &[]);
        assert_eq!(m.plan(&s, 10, true).len(), 1);
    }

    #[test]
    fn nothing_moves_below_the_threshold_or_without_enough_gain() {
        let hosts = [host("a"), host("b")];
        let vms = [vm("1", "a", 60.0), vm("2", "b", 40.0)];
        let s = Settings::default();
        // Loads 0.30 and 0.20: imbalance 0.2, under 0.3.
        assert!(model(&hosts, &vms, &[]).plan(&s, 10, false).is_empty());
        let low = Settings {
            threshold: 0.1,
            ..s
        };
        // Over a threshold of 0.1, but moving either VM only swaps the loads (no gain).
        assert!(model(&hosts, &vms, &[]).plan(&low, 10, false).is_empty());
    }

    #[test]
    fn busy_draining_full_and_lately_moved_hosts_and_vms_are_left_alone() {
        let s = Settings::default();
        let vms = [vm("1", "a", 90.0), vm("2", "a", 90.0)];
        // b is busy with a migration.
        assert!(model(&[host("a"), host("b")], &vms, &["b"])
            .plan(&s, 10, false)
            .is_empty());
        // b is draining: not even counted.
        let draining = Host {
            draining: true,
            ..host("b")
        };
        let m = model(&[host("a"), draining], &vms, &[]);
        assert_eq!(m.hosts().len(), 1);
        // b has no memory to spare for a 256 MiB VM (8192 - 512 reserved).
        let mut full = vms.to_vec();
        full.push(Vm {
            memory_mib: 7680,
            cpu_pct: 0.0,
            ..vm("big", "b", 0.0)
        });
        assert!(model(&[host("a"), host("b")], &full, &[])
            .plan(&s, 10, false)
            .is_empty());
        // Both moved a minute ago: they settle first.
        let now = 1_000_000_000i64;
        let moved: Vec<Vm> = vms
            .iter()
            .map(|v| Vm {
                last_migration: format!("{{\"at\": {}}}", now - 60_000),
                ..v.clone()
            })
            .collect();
        assert!(model(&[host("a"), host("b")], &moved, &[])
            .plan(&s, 10, false)
            .is_empty());
        // Stopped VMs count their memory (here too little to matter) but never move and use
        // no CPU.
        let stopped: Vec<Vm> = vms
            .iter()
            .map(|v| Vm {
                state: VmState::Stopped,
                ..v.clone()
            })
            .collect();
        let mut m = model(&[host("a"), host("b")], &stopped, &[]);
        assert_eq!(m.imbalance(), 0.0);
        assert!(m.plan(&s, 10, false).is_empty());
    }

    /// Two VMs of one group share a host: one moves away whatever the load, to a host with no
    /// member of the group; another owner's group of the same name is not the same group.
    #[test]
    fn vms_of_one_group_are_parted_and_never_joined() {
        let s = Settings::default();
        let hosts = [host("a"), host("b"), host("c")];
        let web = |id, h, cpu| Vm {
            group: "web".into(),
            ..vm(id, h, cpu)
        };
        let other_owner = Vm {
            owner: "p".into(),
            ..web("x", "c", 0.0)
        };
        let vms = [
            web("1", "a", 1.0),
            web("2", "a", 1.0),
            web("3", "b", 1.0),
            other_owner.clone(),
        ];
        let mut m = model(&hosts, &vms, &[]);
        assert!(m.group_shares_a_host());
        let moves = m.plan(&s, 10, false);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(
            (moves[0].to.as_str(), moves[0].reason),
            ("c", "anti-affinity")
        );
        assert!(!m.group_shares_a_host());
        // A busy member on a never goes to b, where its group already runs, however idle b is.
        let vms = [web("1", "a", 95.0), web("2", "b", 0.0), vm("3", "a", 95.0)];
        let moves = model(&hosts[..2], &vms, &[]).plan(&s, 10, false);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].vm_id, "3");
    }

    #[test]
    fn settings_are_checked() {
        assert!(Settings::default().check().is_ok());
        for bad in [
            Settings {
                threshold: -0.1,
                ..Settings::default()
            },
            Settings {
                interval_s: 0,
                ..Settings::default()
            },
            Settings {
                rounds: 0,
                ..Settings::default()
            },
            Settings {
                min_gain: 1.5,
                ..Settings::default()
            },
            Settings {
                settle_s: 100_000,
                ..Settings::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
