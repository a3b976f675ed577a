//! vimd's Prometheus metrics (`GET /metrics`, the text exposition format, written by the
//! prometheus-client crate). Counters and histograms are kept as things happen (jobs ending,
//! migrations, restarts); the rest (hosts and VMs by state, heartbeat age, each VM's CPU and
//! memory, queue lag) is read from the database and the queue at each scrape.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabel {
    consumer: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 5 ms to about 80 s, doubling.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    job_seconds: Histograms<KindLabel>,
    migration_downtime: Histogram,
    failover_rto: Histogram,
    hosts: Family<StateLabel, Gauge>,
    vms: Family<StateLabel, Gauge>,
    heartbeat_age: Family<HostLabel, FloatGauge>,
    vm_cpu: Family<VmLabels, FloatGauge>,
    vm_rss: Family<VmLabels, Gauge>,
    queue_pending: Family<ConsumerLabel, Gauge>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vim");
        let m = Metrics {
            jobs: Family::default(),
            job_seconds: Family::new_with_constructor(seconds),
            migration_downtime: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            failover_rto: seconds(),
            hosts: Family::default(),
            vms: Family::default(),
            heartbeat_age: Family::default(),
            vm_cpu: Family::default(),
            vm_rss: Family::default(),
            queue_pending: Family::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs ended, by kind and outcome", m.jobs.clone());
        registry.register(
            "job_duration_seconds",
            "From a job's queueing to its end, by kind",
            m.job_seconds.clone(),
        );
        registry.register(
            "migration_downtime_seconds",
            "Live migrations' downtime, as the source VMM measured it",
            m.migration_downtime.clone(),
        );
        registry.register(
            "failover_rto_seconds",
            "From a host falling silent to its VM running again elsewhere",
            m.failover_rto.clone(),
        );
        registry.register("hosts", "Hosts by state", m.hosts.clone());
        registry.register(
            "vms",
            "VMs by state (deleted ones not counted)",
            m.vms.clone(),
        );
        registry.register(
            "host_heartbeat_age_seconds",
            "Since each host's last heartbeat",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "vm_cpu_percent",
            "Each VM's guest CPU (its vCPU threads), % of one core",
            m.vm_cpu.clone(),
        );
        registry.register(
            "vm_rss_bytes",
            "Each VM's VMM resident memory",
            m.vm_rss.clone(),
        );
        registry.register(
            "queue_pending_messages",
            "Messages waiting for vimd's consumers (queue lag)",
            m.queue_pending.clone(),
        );
        registry.register(
            "leader",
            "1 while this vimd leads (monitors hosts, fails them over), else 0",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// A job ended (`done` or `failed`) `seconds` after it was queued.
    pub fn job_ended(&self, kind: &str, outcome: &str, seconds: f64) {
        self.jobs
            .get_or_create(&JobLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.job_seconds
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(seconds.max(0.0));
    }

    pub fn migrated(&self, downtime_ms: f64) {
        self.migration_downtime.observe(downtime_ms / 1000.0);
    }

    pub fn restarted(&self, outage_s: f64) {
        self.failover_rto.observe(outage_s);
    }

    /// The scrape-time figures, each family replaced whole (a host or VM gone is gone).
    pub fn set_inventory(&self, hosts: &[crate::db::Host], vms: &[crate::db::Vm], now_ms: i64) {
        self.hosts.clear();
        self.heartbeat_age.clear();
        for h in hosts {
            self.hosts
                .get_or_create(&StateLabel {
                    state: h.state.to_string(),
                })
                .inc();
            if h.last_heartbeat > 0 {
                self.heartbeat_age
                    .get_or_create(&HostLabel { host: h.id.clone() })
                    .set((now_ms - h.last_heartbeat).max(0) as f64 / 1000.0);
            }
        }
        self.vms.clear();
        self.vm_cpu.clear();
        self.vm_rss.clear();
        for vm in vms {
            self.vms
                .get_or_create(&StateLabel {
                    state: vm.state.to_string(),
                })
                .inc();
            if vm.host_id.is_empty() {
                continue;
            }
            let l = VmLabels {
                vm: vm.id.clone(),
                host: vm.host_id.clone(),
            };
            self.vm_cpu.get_or_create(&l).set(vm.cpu_pct);
            self.vm_rss.get_or_create(&l).set(vm.rss_kib * 1024);
        }
    }

    pub fn set_pending(&self, consumer: &str, n: u64) {
        self.queue_pending
            .get_or_create(&ConsumerLabel {
                consumer: consumer.into(),
            })
            .set(n.min(i64::MAX as u64) as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{Host, HostState, Vm, VmState};

    #[test]
    fn the_text_has_what_happened_and_what_is() {
        let m = Metrics::default();
        m.job_ended("create", "done", 0.2);
        m.job_ended("create", "done", 0.3);
        m.job_ended("migrate", "failed", 1.0);
        m.migrated(12.5);
        m.restarted(3.5);
        let hosts = [
            Host {
                id: "h1".into(),
                state: HostState::Reachable,
                last_heartbeat: 9_000,
                ..Host::default()
            },
            Host {
                id: "h2".into(),
                state: HostState::Unreachable,
                ..Host::default()
            },
        ];
        let vm = Vm {
            id: "v1".into(),
            host_id: "h1".into(),
            state: VmState::Running,
            cpu_pct: 42.5,
            rss_kib: 2,
            ..Vm::default()
        };
        m.set_inventory(&hosts, &[vm], 10_000);
        m.set_pending("vimd-workers", 3);
        m.set_leader(true);
        let text = m.encode();
        for want in [
            "vim_jobs_total{kind=\"create\",outcome=\"done\"} 2",
            "vim_jobs_total{kind=\"migrate\",outcome=\"failed\"} 1",
            "vim_job_duration_seconds_count{kind=\"create\"} 2",
            "vim_migration_downtime_seconds_count 1",
            "vim_failover_rto_seconds_sum 3.5",
            "vim_hosts{state=\"reachable\"} 1",
            "vim_hosts{state=\"unreachable\"} 1",
            "vim_vms{state=\"running\"} 1",
            "vim_host_heartbeat_age_seconds{host=\"h1\"} 1.0",
            "vim_vm_cpu_percent{vm=\"v1\",host=\"h1\"} 42.5",
            "vim_vm_rss_bytes{vm=\"v1\",host=\"h1\"} 2048",
            "vim_queue_pending_messages{consumer=\"vimd-workers\"} 3",
            "vim_leader 1",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // A VM gone is gone from the next scrape.
        m.set_inventory(&hosts, &[], 10_000);
        assert!(!m.encode().contains("v1"));
    }
}
