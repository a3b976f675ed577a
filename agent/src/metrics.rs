//! The agent's Prometheus metrics (`--metrics-listen ADDR`, `GET /metrics`, plain HTTP): each
//! VM's figures from its latest report, read at each scrape. Bind it to an address only the
//! monitoring network reaches: it carries no secrets, but VM ids and their load.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use vim_proto::VmReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The text for one scrape of `reports`; `sound` is false while a VMM outlives the fence.
pub fn encode(reports: &[VmReport], sound: bool) -> String {
    let mut r = Registry::with_prefix("vim_agent");
    let vms = Family::<StateLabel, Gauge>::default();
    let cpu = Family::<VmLabel, FloatGauge>::default();
    let vmm_cpu = Family::<VmLabel, FloatGauge>::default();
    let rss = Family::<VmLabel, Gauge>::default();
    let vcpus = Family::<VmLabel, Gauge>::default();
    let memory = Family::<VmLabel, Gauge>::default();
    let used = Family::<VmLabel, FloatGauge>::default();
    let healthy = Gauge::<i64>::default();
    healthy.set(i64::from(sound));
    for rep in reports {
        vms.get_or_create(&StateLabel {
            state: rep.state().as_str().into(),
        })
        .inc();
        let l = VmLabel {
            vm: rep.vm_id.clone(),
        };
        cpu.get_or_create(&l).set(rep.cpu_pct);
        vmm_cpu.get_or_create(&l).set(rep.vmm_cpu_pct);
        rss.get_or_create(&l).set(rep.rss_kib as i64 * 1024);
        vcpus.get_or_create(&l).set(i64::from(rep.vcpus));
        memory
            .get_or_create(&l)
            .set((rep.memory_mib as i64).saturating_mul(1 << 20));
        if let Some(p) = rep.memory_used_pct {
            used.get_or_create(&l).set(p);
        }
    }
    r.register("vms", "VMs this host keeps, by state", vms);
    r.register(
        "vm_cpu_percent",
        "Guest CPU (vCPU threads), % of one core",
        cpu,
    );
    r.register(
        "vmm_cpu_percent",
        "The VMM's own CPU (its other threads), % of one core",
        vmm_cpu,
    );
    r.register("vm_rss_bytes", "The VMM process's resident memory", rss);
    r.register("vm_vcpus", "vCPUs the VM has", vcpus);
    r.register(
        "vm_memory_bytes",
        "Memory the VM has (boot and plugged)",
        memory,
    );
    r.register(
        "vm_memory_used_percent",
        "Memory the guest uses, from its balloon statistics",
        used,
    );
    r.register(
        "sound",
        "1 while no VMM outlives the fence (the watchdog is fed), else 0",
        healthy,
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &r);
    out
}

/// Serves `GET /metrics` on `addr` with what `scrape` returns, until the process ends. Bound
/// before returning, so a bad address is an error at start.
pub async fn serve<F>(addr: SocketAddr, scrape: F) -> anyhow::Result<()>
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let scrape = scrape.clone();
            async move {
                let kind = "text/plain; version=0.0.4; charset=utf-8";
                ([(axum::http::header::CONTENT_TYPE, kind)], scrape())
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vim_proto::VmState;

    #[test]
    fn each_vm_has_its_figures() {
        let rep = VmReport {
            vm_id: "v1".into(),
            state: VmState::Running.into(),
            cpu_pct: 50.0,
            vmm_cpu_pct: 1.5,
            rss_kib: 4,
            vcpus: 2,
            memory_mib: 64,
            memory_used_pct: Some(12.5),
            ..Default::default()
        };
        let text = encode(&[rep], true);
        for want in [
            "vim_agent_vms{state=\"running\"} 1",
            "vim_agent_vm_cpu_percent{vm=\"v1\"} 50.0",
            "vim_agent_vmm_cpu_percent{vm=\"v1\"} 1.5",
            "vim_agent_vm_rss_bytes{vm=\"v1\"} 4096",
            "vim_agent_vm_vcpus{vm=\"v1\"} 2",
            "vim_agent_vm_memory_bytes{vm=\"v1\"} 67108864",
            "vim_agent_vm_memory_used_percent{vm=\"v1\"} 12.5",
            "vim_agent_sound 1",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
