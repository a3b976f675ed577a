//! Host liveness, kept in memory: heartbeats only touch a map; the database hears about state
//! changes (`PS_*`) at once and about heartbeat details in batches — hosts whose facts changed
//! (a VM's state or pid, the host's size) every second, usage figures and `last_heartbeat` at most
//! every `REFRESH` — so 10,000 hosts beating at 1 Hz cost a few thousand row updates a second in a
//! handful of statements, and the monitor's clock never reads the hosts table.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use vim_proto::Heartbeat;

use crate::db::{Host, HostReport, HostState};

/// How stale a healthy host's `last_heartbeat` in the database may get.
pub const REFRESH: Duration = Duration::from_secs(5);

struct Live {
    last: i64,
    missed: i64,
    state: HostState,
    latest: Option<(Heartbeat, i64)>,
    flushed: Option<Heartbeat>,
    flushed_at: i64,
}

/// What a heartbeat meant.
#[derive(Debug, PartialEq)]
pub enum Beat {
    /// Not a host this map knows: the beat is kept until [`Liveness::adopt`] looks it up.
    Unknown,
    Steady,
    /// The host was `before` (registered or unreachable) and is reachable now; its report.
    Returned {
        before: HostState,
        hb: Heartbeat,
    },
}

/// The largest host a heartbeat may claim: what a host reports is what placement trusts, so an
/// absurd figure (or one that turns negative in the database's signed columns) is cut down to
/// this, and text fields are kept short and printable.
pub const MAX_CORES: u32 = 4096;
pub const MAX_MEMORY_MIB: u64 = 64 << 20; // 64 TiB
const MAX_TEXT: usize = 253;
/// VM reports in one heartbeat at most (more than any host runs).
const MAX_VMS: usize = 4096;

/// Bounds what a host claims about itself (see [`MAX_CORES`]).
pub fn bound_report(hb: &mut Heartbeat) {
    hb.cpu_cores = hb.cpu_cores.min(MAX_CORES);
    hb.memory_mib = hb.memory_mib.min(MAX_MEMORY_MIB);
    let text = |t: &mut String| {
        if t.len() > MAX_TEXT || t.chars().any(char::is_control) {
            *t = t
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_TEXT)
                .collect();
        }
    };
    text(&mut hb.hostname);
    text(&mut hb.address);
    text(&mut hb.agent_version);
    hb.vms.truncate(MAX_VMS);
    for v in &mut hb.vms {
        v.rss_kib = v.rss_kib.min(i64::MAX as u64);
        v.balloon_mib = v.balloon_mib.min(MAX_MEMORY_MIB);
        for pct in [&mut v.cpu_pct, &mut v.vmm_cpu_pct] {
            if !pct.is_finite() || *pct < 0.0 {
                *pct = 0.0;
            }
            *pct = pct.min(f64::from(MAX_CORES) * 100.0);
        }
    }
}

/// The same facts: what the host is and has, and which VMs it runs in which state. The moving
/// figures (CPU, memory use, the balloon, the sequence numbers) may differ: they change in nearly
/// every report, and writing them each second is what one database could not take at 100,000
/// VMs (docs/scale.md); they are written every `REFRESH`.
fn same_facts(a: &Heartbeat, b: &Heartbeat) -> bool {
    a.host_id == b.host_id
        && a.hostname == b.hostname
        && a.address == b.address
        && a.cpu_cores == b.cpu_cores
        && a.memory_mib == b.memory_mib
        && a.agent_version == b.agent_version
        && a.vms.len() == b.vms.len()
        && a.vms.iter().zip(&b.vms).all(|(a, b)| {
            (&a.vm_id, a.state, a.pid, a.vcpus, a.memory_mib)
                == (&b.vm_id, b.state, b.pid, b.vcpus, b.memory_mib)
        })
}

/// A fixed point within `REFRESH` for a host.
fn stagger(id: &str) -> i64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() % REFRESH.as_millis() as u64) as i64
}

/// A host that missed a heartbeat at a tick.
#[derive(Debug, PartialEq)]
pub struct Miss {
    pub host: String,
    pub silent_ms: i64,
    pub missed: i64,
    pub unreachable_now: bool,
}

#[derive(Default)]
pub struct Liveness {
    hosts: Mutex<HashMap<String, Live>>,
    /// The latest beat of each host not in `hosts` (registered since this vimd loaded them,
    /// perhaps through another vimd; or not registered at all), waiting to be looked up.
    pending: Mutex<HashMap<String, (Heartbeat, i64)>>,
}

/// How many unknown hosts' beats are kept for lookup at once.
const MAX_PENDING: usize = 100_000;

impl Liveness {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        crate::lock(&self.hosts)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Heartbeat, i64)>> {
        crate::lock(&self.pending)
    }

    /// Hosts that beat but are not known here yet.
    pub fn pending(&self) -> Vec<String> {
        self.lock_pending().keys().cloned().collect()
    }

    /// Takes in `found`, the hosts among `asked` (from [`Liveness::pending`]) that the database
    /// knows, and applies their latest beats; the others' beats are dropped (they are looked up
    /// again if they beat again). Returns the hosts that became reachable, as
    /// [`Beat::Returned`] would.
    pub fn adopt(&self, found: &[Host], asked: &[String]) -> Vec<(HostState, Heartbeat)> {
        self.load(found);
        let beats: Vec<(Heartbeat, i64)> = {
            let mut p = self.lock_pending();
            let beats = found.iter().filter_map(|h| p.remove(&h.id)).collect();
            for id in asked {
                p.remove(id);
            }
            beats
        };
        let mut out = Vec::new();
        for (hb, at) in beats {
            if let Beat::Returned { before, hb } = self.beat(hb, at) {
                out.push((before, hb));
            }
        }
        out
    }

    /// The hosts the database knows, at start.
    pub fn load(&self, hosts: &[Host]) {
        let mut m = self.lock();
        for h in hosts {
            m.insert(
                h.id.clone(),
                Live {
                    last: h.last_heartbeat,
                    missed: h.missed,
                    state: h.state,
                    latest: None,
                    flushed: None,
                    flushed_at: h.last_heartbeat,
                },
            );
        }
    }

    /// A host just registered.
    pub fn register(&self, id: &str) {
        self.lock().entry(id.into()).or_insert(Live {
            last: 0,
            missed: 0,
            state: HostState::Registered,
            latest: None,
            flushed: None,
            flushed_at: 0,
        });
    }

    /// A host removed: no longer watched.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn beat(&self, hb: Heartbeat, now: i64) -> Beat {
        let mut m = self.lock();
        let Some(l) = m.get_mut(&hb.host_id) else {
            let mut p = self.lock_pending();
            if p.len() < MAX_PENDING || p.contains_key(&hb.host_id) {
                p.insert(hb.host_id.clone(), (hb, now));
            }
            return Beat::Unknown;
        };
        l.last = now;
        l.missed = 0;
        let r = if l.state == HostState::Reachable {
            Beat::Steady
        } else {
            // Force the next flush to write everything (the database marked its VMs unknown).
            l.flushed = None;
            Beat::Returned {
                before: std::mem::replace(&mut l.state, HostState::Reachable),
                hb: hb.clone(),
            }
        };
        l.latest = Some((hb, now));
        r
    }

    /// Heartbeats to write now: hosts whose facts changed since the last write (at once: placement,
    /// failover and jobs act on them), and the others every `REFRESH` (their usage figures and
    /// `last_heartbeat`).
    pub fn to_flush(&self, now: i64) -> Vec<HostReport> {
        let mut out = Vec::new();
        for l in self.lock().values_mut() {
            let Some((hb, at)) = l.latest.take() else {
                continue;
            };
            let facts = l.flushed.as_ref().is_none_or(|f| !same_facts(f, &hb));
            if facts || now - l.flushed_at >= REFRESH.as_millis() as i64 {
                // A host's first write is back-dated by a share of REFRESH that depends on its id,
                // so hosts that appeared together are refreshed spread out, not all at once.
                l.flushed_at = if l.flushed.is_none() {
                    now - stagger(&hb.host_id)
                } else {
                    now
                };
                out.push(HostReport {
                    hb: hb.clone(),
                    at,
                    facts,
                });
                l.flushed = Some(hb);
            } else {
                l.latest = Some((hb, at));
            }
        }
        out
    }

    /// One tick of the clock: every host silent for longer than its next due time has missed one
    /// more heartbeat; at `misses` in a row it becomes unreachable. Unreachable hosts are not
    /// reported again.
    pub fn tick(&self, now: i64, every: Duration, misses: i64) -> Vec<Miss> {
        let every = every.as_millis() as i64;
        let mut out = Vec::new();
        for (id, l) in self.lock().iter_mut() {
            if l.state != HostState::Reachable || l.last == 0 {
                continue;
            }
            let silent = now - l.last;
            if silent < every * (l.missed + 1) + every / 2 {
                continue;
            }
            l.missed += 1;
            let unreachable_now = l.missed >= misses;
            if unreachable_now {
                l.state = HostState::Unreachable;
            }
            out.push(Miss {
                host: id.clone(),
                silent_ms: silent,
                missed: l.missed,
                unreachable_now,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str, seq: u64, cores: u32) -> Heartbeat {
        Heartbeat {
            version: vim_proto::PROTOCOL_VERSION,
            host_id: id.into(),
            seq,
            cpu_cores: cores,
            ..Default::default()
        }
    }

    #[test]
    fn timeouts_unreachable_and_return() {
        let l = Liveness::default();
        l.register("h");
        assert_eq!(l.beat(hb("x", 1, 1), 0), Beat::Unknown);
        assert!(matches!(
            l.beat(hb("h", 1, 2), 1000),
            Beat::Returned { before, .. } if before == HostState::Registered
        ));
        assert_eq!(l.beat(hb("h", 2, 2), 2000), Beat::Steady);
        let every = Duration::from_millis(1000);
        assert!(l.tick(2400, every, 3).is_empty());
        let m = l.tick(3600, every, 3);
        assert_eq!((m[0].missed, m[0].unreachable_now), (1, false));
        assert!(l.tick(4000, every, 3).is_empty(), "a miss counted twice");
        assert_eq!(l.tick(4600, every, 3)[0].missed, 2);
        let m = l.tick(5600, every, 3);
        assert_eq!((m[0].missed, m[0].unreachable_now), (3, true));
        assert!(
            l.tick(9000, every, 3).is_empty(),
            "an unreachable host reported again"
        );
        assert!(matches!(
            l.beat(hb("h", 3, 2), 9500),
            Beat::Returned { before, .. } if before == HostState::Unreachable
        ));
    }

    #[test]
    fn unknown_hosts_adopted_with_their_latest_beat() {
        let l = Liveness::default();
        assert_eq!(l.beat(hb("new", 1, 2), 1000), Beat::Unknown);
        assert_eq!(l.beat(hb("new", 2, 2), 2000), Beat::Unknown);
        assert_eq!(l.beat(hb("forged", 1, 2), 2000), Beat::Unknown);
        let asked = l.pending();
        assert_eq!(asked.len(), 2);
        let found = Host {
            id: "new".into(),
            state: HostState::Registered,
            ..Default::default()
        };
        let back = l.adopt(&[found], &asked);
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].0, back[0].1.seq), (HostState::Registered, 2));
        assert_eq!(
            l.pending(),
            Vec::<String>::new(),
            "an unknown host's beat kept after lookup"
        );
        // Adopted at its latest beat (2000): no miss before 3500.
        assert!(l.tick(3400, Duration::from_millis(1000), 3).is_empty());
        assert_eq!(l.beat(hb("new", 3, 2), 3000), Beat::Steady);
    }

    #[test]
    fn flushes_changes_at_once_and_the_rest_now_and_then() {
        let l = Liveness::default();
        l.register("h");
        l.beat(hb("h", 1, 2), 1000);
        assert_eq!(l.to_flush(1000).len(), 1, "first report not written");
        l.beat(hb("h", 2, 2), 2000);
        assert!(
            l.to_flush(2000).is_empty(),
            "an unchanged report written at once"
        );
        l.beat(hb("h", 3, 4), 3000);
        assert_eq!(l.to_flush(3000).len(), 1, "a changed report not written");
        l.beat(hb("h", 4, 4), 8100);
        assert_eq!(l.to_flush(8100).len(), 1, "last_heartbeat never refreshed");
    }

    #[test]
    fn moving_figures_wait_for_the_refresh_and_a_vm_state_does_not() {
        let with_vm = |seq: u64, state: vim_proto::VmState, cpu: f64| {
            let mut b = hb("h", seq, 2);
            b.vms.push(vim_proto::VmReport {
                vm_id: "vm".into(),
                state: state as i32,
                pid: 7,
                cpu_pct: cpu,
                rss_kib: 1000 + seq,
                seq,
                ..Default::default()
            });
            b
        };
        let l = Liveness::default();
        l.register("h");
        l.beat(with_vm(1, vim_proto::VmState::Running, 10.0), 1000);
        assert_eq!(l.to_flush(1000).len(), 1);
        l.beat(with_vm(2, vim_proto::VmState::Running, 95.0), 2000);
        assert!(
            l.to_flush(2000).is_empty(),
            "new CPU figures written before the refresh"
        );
        l.beat(with_vm(3, vim_proto::VmState::Stopped, 0.0), 3000);
        let out = l.to_flush(3000);
        assert_eq!(out.len(), 1, "a VM's new state not written at once");
        assert_eq!(out[0].hb.seq, 3, "not the latest report");
        assert!(out[0].facts);
        l.beat(with_vm(4, vim_proto::VmState::Stopped, 1.0), 4000);
        assert!(l.to_flush(4000).is_empty());
        l.beat(with_vm(9, vim_proto::VmState::Stopped, 2.0), 8000);
        let out = l.to_flush(8000);
        assert_eq!(out.len(), 1, "usage never refreshed");
        assert_eq!(out[0].hb.vms[0].cpu_pct, 2.0);
        assert!(!out[0].facts, "a refresh said to have new facts");
    }

    #[test]
    fn refreshes_spread_out() {
        let l = Liveness::default();
        for i in 0..1000 {
            let id = format!("h{i}");
            l.register(&id);
            l.beat(hb(&id, 1, 2), 0);
        }
        assert_eq!(l.to_flush(0).len(), 1000);
        // Each second about a fifth of the hosts is due, not all of them at 5 s.
        let mut due = Vec::new();
        for t in 1..=5i64 {
            for i in 0..1000 {
                l.beat(hb(&format!("h{i}"), 1 + t as u64, 2), t * 1000);
            }
            due.push(l.to_flush(t * 1000).len());
        }
        assert_eq!(due.iter().sum::<usize>(), 1000, "{due:?}");
        assert!(due.iter().all(|&n| n < 400), "{due:?}");
    }

    #[test]
    fn what_a_host_claims_is_bounded() {
        let mut hb = Heartbeat {
            cpu_cores: u32::MAX,
            memory_mib: u64::MAX,
            hostname: format!("evil\x1b]0;owned\x07{}", "x".repeat(1000)),
            vms: vec![vim_proto::VmReport {
                rss_kib: u64::MAX,
                cpu_pct: f64::NAN,
                vmm_cpu_pct: -5.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        bound_report(&mut hb);
        assert_eq!(hb.cpu_cores, MAX_CORES);
        assert_eq!(hb.memory_mib, MAX_MEMORY_MIB);
        assert!(hb.memory_mib as i64 > 0 && hb.vms[0].rss_kib as i64 > 0);
        assert!(hb.hostname.len() <= MAX_TEXT && !hb.hostname.contains('\x1b'));
        assert_eq!((hb.vms[0].cpu_pct, hb.vms[0].vmm_cpu_pct), (0.0, 0.0));
    }
}
