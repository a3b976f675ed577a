//! Availability from the event log (docs/sla.md). A VM is expected up from when it is created,
//! started, resumed or restarted until its owner stops, suspends or deletes it; planned time
//! off is not counted at all. Within the expected time it is down from `VM_Failure`,
//! `VM_Unreachable` (the agent's probe saw its heartbeat stop) or its host's `PS_Unreachable`,
//! until it runs again: `VM_Reachable`, `VM_Restarted`, `VM_Migrated`, `VM_Started`,
//! `VM_Resumed`, or its host's `PS_Reachable` when the host was not fenced meanwhile (the VM
//! kept running there). A `PS_Timeout` that recovers before `PS_Unreachable` is a false
//! positive and never downtime: it starts nothing.

use serde::Serialize;

use crate::db::{Event, EventKind};

/// One stretch of downtime within the period.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outage {
    pub vm_id: String,
    pub from: i64,
    pub to: i64,
    /// Still down at the end of the period (its length counts up to there).
    pub ongoing: bool,
    /// The event that began it.
    pub cause: String,
}

impl Outage {
    pub fn ms(&self) -> i64 {
        self.to - self.from
    }
}

/// How one VM, or several together, did over a period.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Availability {
    /// Time it was expected up, ms.
    pub expected_ms: i64,
    pub down_ms: i64,
    pub outages: Vec<Outage>,
    /// The stretches it was expected up (from, to), outages included: what a chart draws.
    pub expected: Vec<(i64, i64)>,
}

impl Availability {
    /// Percent up of the expected time (100 when nothing was expected).
    pub fn uptime_pct(&self) -> f64 {
        if self.expected_ms == 0 {
            100.0
        } else {
            100.0 * (self.expected_ms - self.down_ms) as f64 / self.expected_ms as f64
        }
    }

    /// Mean time to repair over the outages, ms (0 without any).
    pub fn mttr_ms(&self) -> i64 {
        if self.outages.is_empty() {
            0
        } else {
            self.down_ms / self.outages.len() as i64
        }
    }

    pub fn add(&mut self, other: Availability) {
        self.expected_ms += other.expected_ms;
        self.down_ms += other.down_ms;
        self.outages.extend(other.outages);
        self.expected.extend(other.expected);
    }
}

/// What made a VM down, so the right event ends it.
#[derive(Debug, Clone, PartialEq)]
enum Down {
    Up,
    /// Its host was declared unreachable; `fenced` once the host was fenced (its VMs were
    /// stopped there, so the host coming back does not bring the VM back).
    Host {
        host: String,
        fenced: bool,
    },
    Vm,
}

/// The availability of `vm_id` over `from`..`to` (ms), from `events`: its own events and the
/// hosts' (`PS_Unreachable`, `PS_Reachable`, `Host_Fenced`, `Host_Self_Fenced`), oldest first,
/// from before the period began (its state then comes from them).
pub fn availability(vm_id: &str, events: &[Event], from: i64, to: i64) -> Availability {
    let mut out = Availability::default();
    let mut expected = false;
    let mut host = String::new();
    let mut down = Down::Up;
    let mut since = from; // start of the current stretch
    let mut cause = String::new();
    // Closes the stretch [since, t) in its state, and starts a new one at t.
    let close = |out: &mut Availability,
                 since: &mut i64,
                 t: i64,
                 expected: bool,
                 down: &Down,
                 cause: &str,
                 ends_outage: bool| {
        let (a, b) = ((*since).max(from), t.min(to));
        if expected && a < b {
            out.expected_ms += b - a;
            match out.expected.last_mut() {
                Some(span) if span.1 == a => span.1 = b,
                _ => out.expected.push((a, b)),
            }
            if *down != Down::Up {
                out.down_ms += b - a;
                // An outage split by a planned change continues in the same record.
                match out.outages.last_mut() {
                    Some(o) if o.to == a && o.ongoing => {
                        o.to = b;
                    }
                    _ => out.outages.push(Outage {
                        vm_id: vm_id.into(),
                        from: a,
                        to: b,
                        ongoing: true,
                        cause: cause.into(),
                    }),
                }
            }
        }
        if ends_outage {
            if let Some(o) = out.outages.last_mut() {
                if o.ongoing && o.to == t.min(to) {
                    o.ongoing = t >= to;
                }
            }
        }
        *since = t;
    };
    for e in events.iter().take_while(|e| e.ts < to) {
        let mine = e.vm_id == vm_id;
        let my_host = !host.is_empty() && e.host_id == host && e.vm_id.is_empty();
        if !mine && !my_host {
            continue;
        }
        use EventKind as K;
        let (now_expected, now_down) = match e.kind {
            K::VmCreated | K::VmStarted | K::VmResumed | K::VmRestarted | K::VmMigrated if mine => {
                (true, Down::Up)
            }
            K::VmReachable if mine => (expected, Down::Up),
            K::VmStopped | K::VmSuspended | K::VmDeleted if mine => (false, Down::Up),
            K::VmFailure | K::VmUnreachable if mine && down == Down::Up => (expected, Down::Vm),
            K::PsUnreachable if down == Down::Up => (
                expected,
                Down::Host {
                    host: host.clone(),
                    fenced: false,
                },
            ),
            K::HostFenced | K::HostSelfFenced => match &down {
                Down::Host { host, .. } => (
                    expected,
                    Down::Host {
                        host: host.clone(),
                        fenced: true,
                    },
                ),
                _ => (expected, down.clone()),
            },
            K::PsReachable if matches!(down, Down::Host { fenced: false, .. }) => {
                (expected, Down::Up)
            }
            _ => (expected, down.clone()),
        };
        if mine && !e.host_id.is_empty() && e.kind != K::VmDeleted {
            host = e.host_id.clone();
        }
        if (now_expected, &now_down) != (expected, &down) {
            let ends = now_down == Down::Up && down != Down::Up;
            close(&mut out, &mut since, e.ts, expected, &down, &cause, ends);
            if down == Down::Up && now_down != Down::Up {
                cause = e.kind.as_str().to_string();
            }
            expected = now_expected;
            down = now_down;
        }
    }
    close(&mut out, &mut since, to, expected, &down, &cause, false);
    out
}

/// Whether `pct` meets `target` (both percent).
pub fn met(pct: f64, target: f64) -> bool {
    pct + 1e-9 >= target
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1000;

    fn ev(ts: i64, kind: EventKind, host: &str, vm: &str) -> Event {
        Event {
            ts,
            ..Event::new(kind, host, vm, "", "")
        }
    }

    /// A scripted history, worked out by hand over 0..1000 s:
    /// - created on h1 at 0;
    /// - h1 times out at 100 and is back at 103 (false positive: no downtime);
    /// - the VM fails at 200 and is restarted on h2 at 230 (30 s down);
    /// - migrated to h3 at 300 (no downtime);
    /// - h3 unreachable at 400, fenced at 405, the VM restarted on h1 at 440 (40 s down); h3's
    ///   own PS_Reachable at 420 does not end it (fenced);
    /// - the owner stops it at 600 and starts it at 700 (100 s not expected);
    /// - the guest's heartbeat stops at 900 and is still stopped at the end (100 s, ongoing).
    ///
    /// Expected 900 s, down 170 s: 81.111 %, three outages, MTTR 56.667 s.
    #[test]
    fn a_scripted_history_gives_the_figures_worked_out_by_hand() {
        use EventKind as K;
        let h = [
            ev(0, K::VmCreated, "h1", "v"),
            ev(100 * S, K::PsTimeout, "h1", ""),
            ev(103 * S, K::PsReachable, "h1", ""),
            ev(150 * S, K::VmInfo, "h1", "other"),
            ev(200 * S, K::VmFailure, "h1", "v"),
            ev(230 * S, K::VmRestarted, "h2", "v"),
            ev(300 * S, K::VmMigrated, "h3", "v"),
            ev(400 * S, K::PsUnreachable, "h3", ""),
            ev(405 * S, K::HostFenced, "h3", ""),
            ev(420 * S, K::PsReachable, "h3", ""),
            ev(440 * S, K::VmRestarted, "h1", "v"),
            ev(500 * S, K::PsUnreachable, "h2", ""),
            ev(600 * S, K::VmStopped, "h1", "v"),
            ev(700 * S, K::VmStarted, "h1", "v"),
            ev(900 * S, K::VmUnreachable, "h1", "v"),
        ];
        let a = availability("v", &h, 0, 1000 * S);
        assert_eq!(a.expected_ms, 900 * S);
        assert_eq!(a.expected, [(0, 600 * S), (700 * S, 1000 * S)]);
        assert_eq!(a.down_ms, 170 * S);
        let spans: Vec<(i64, i64, bool, &str)> = a
            .outages
            .iter()
            .map(|o| (o.from / S, o.to / S, o.ongoing, o.cause.as_str()))
            .collect();
        assert_eq!(
            spans,
            [
                (200, 230, false, "VM_Failure"),
                (400, 440, false, "PS_Unreachable"),
                (900, 1000, true, "VM_Unreachable"),
            ]
        );
        assert!((a.uptime_pct() - 81.111).abs() < 0.001);
        assert_eq!(a.mttr_ms(), 170 * S / 3);
        assert!(!met(a.uptime_pct(), 99.95));

        // The same history seen over 210..450 s: in an outage when it starts.
        let b = availability("v", &h, 210 * S, 450 * S);
        assert_eq!(b.expected_ms, 240 * S);
        assert_eq!(b.down_ms, 20 * S + 40 * S);
        assert_eq!(b.outages[0].from, 210 * S);
    }

    /// A host that comes back unfenced brings its VM back with it; the VM's own reachability
    /// ends its own outage; a VM never created is not expected up.
    #[test]
    fn an_unfenced_host_coming_back_ends_the_outage() {
        use EventKind as K;
        let h = [
            ev(0, K::VmStarted, "h1", "v"),
            ev(10 * S, K::PsUnreachable, "h1", ""),
            ev(15 * S, K::PsReachable, "h1", ""),
            ev(20 * S, K::VmUnreachable, "h1", "v"),
            ev(22 * S, K::VmReachable, "h1", "v"),
        ];
        let a = availability("v", &h, 0, 100 * S);
        assert_eq!(
            (a.expected_ms, a.down_ms, a.outages.len()),
            (100 * S, 7 * S, 2)
        );
        assert!(met(a.uptime_pct(), 93.0));
        assert_eq!(
            month_of(1_796_515_200_000 + 3_600_000), // 2026-12-06T01:00Z
            (1_796_083_200_000, "2026-12".to_string())  // 2026-12-01T00:00Z
        );
        let none = availability("w", &h, 0, 100 * S);
        assert_eq!((none.expected_ms, none.uptime_pct()), (0, 100.0));
    }
}

/// One VM's line of a report.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub vm_id: String,
    pub name: String,
    pub owner: String,
    pub target: f64,
    pub uptime_pct: f64,
    pub met: bool,
    pub expected_s: f64,
    pub down_s: f64,
    pub mttr_s: f64,
    pub outages: Vec<Outage>,
    /// The stretches it was expected up (ms), outages included.
    pub expected: Vec<(i64, i64)>,
}

/// An availability report: each VM's, and all of them together.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub from: i64,
    pub to: i64,
    /// The target asked for (None: each VM's own).
    pub target: Option<f64>,
    pub vms: Vec<VmReport>,
    pub uptime_pct: f64,
    pub met: bool,
    pub outages: usize,
    pub down_s: f64,
    pub mttr_s: f64,
}

/// The report over `from`..`to` for one VM (`vm`), a consumer's VMs (`owner`) or every VM.
pub async fn report(
    db: &crate::db::Db,
    owner: Option<&str>,
    vm: Option<&str>,
    from: i64,
    to: i64,
    target: Option<f64>,
) -> Result<Report, crate::db::DbError> {
    let vms = db.vms_for_report(owner, vm, to).await?;
    let ids: Vec<String> = vms.iter().map(|v| v.id.clone()).collect();
    let events = db.availability_events(&ids, to).await?;
    let mut total = Availability::default();
    let mut lines = Vec::new();
    let mut all_met = true;
    for v in vms {
        let a = availability(&v.id, &events, from, to);
        if a.expected_ms == 0 {
            continue; // not meant to run in the period: nothing to say
        }
        let t = target.unwrap_or(v.sla_target);
        let pct = a.uptime_pct();
        all_met &= met(pct, t);
        lines.push(VmReport {
            vm_id: v.id,
            name: v.name,
            owner: v.owner,
            target: t,
            uptime_pct: pct,
            met: met(pct, t),
            expected_s: a.expected_ms as f64 / 1000.0,
            down_s: a.down_ms as f64 / 1000.0,
            mttr_s: a.mttr_ms() as f64 / 1000.0,
            outages: a.outages.clone(),
            expected: a.expected.clone(),
        });
        total.add(a);
    }
    Ok(Report {
        from,
        to,
        target,
        uptime_pct: total.uptime_pct(),
        met: match target {
            Some(t) => met(total.uptime_pct(), t),
            None => all_met,
        },
        outages: total.outages.len(),
        down_s: total.down_ms as f64 / 1000.0,
        mttr_s: total.mttr_ms() as f64 / 1000.0,
        vms: lines,
    })
}

/// The start of the UTC month `at` (ms) falls in, and its name (YYYY-MM).
pub fn month_of(at: i64) -> (i64, String) {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let first = t
        .replace_day(1)
        .unwrap_or(t)
        .replace_time(time::Time::MIDNIGHT);
    let ms = (first.unix_timestamp_nanos() / 1_000_000) as i64;
    (ms, format!("{:04}-{:02}", t.year(), u8::from(t.month())))
}
