//! Heartbeat-ingestion load for `scripts/bench-vim.sh`: N simulated hosts (a test-only fake: the
//! rows `seed` wrote, heartbeats on their subjects, no agents and no VMMs) all start beating at
//! once at 1 Hz, as after a data-centre power-on, each reporting its share of the VMS running VMs
//! `seed` wrote (`simvmJ` on host `simJ mod HOSTS`), numbered and with CPU use that moves, as
//! an agent's reports are. Every beat vimd failed to take in time shows
//! as a `PS_Timeout` event: the report counts those from the first beat (the arrival included),
//! and how stale the database's `last_heartbeat` got (vimd refreshes it every 5 s for hosts whose
//! report did not change). Its last line is the same as JSON.
//!
//! Usage: hb_load DATABASE_URL STATE_DIR NATS_URL HOSTS VMS SECONDS

use std::time::{Duration, Instant};

use prost::Message;
use vim::db::Db;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 7,
        "usage: hb_load DATABASE_URL STATE_DIR NATS_URL HOSTS VMS SECONDS"
    );
    let (state, url) = (&a[2], &a[3]);
    let (hosts, vms, secs): (usize, usize, u64) = (a[4].parse()?, a[5].parse()?, a[6].parse()?);
    let db = Db::open(&a[1]).await?;
    // Each host's reports, built once: VM `simvmJ` runs on host `simJ mod HOSTS`.
    let mut reports: Vec<Vec<vim_proto::VmReport>> = vec![Vec::new(); hosts];
    for j in 0..vms {
        reports[j % hosts].push(vim_proto::VmReport {
            vm_id: format!("simvm{j}"),
            state: vim_proto::VmState::Running as i32,
            pid: 1000 + j as u32,
            cpu_pct: 1.0,
            rss_kib: 65536,
            vcpus: 1,
            memory_mib: 64,
            ..Default::default()
        });
    }
    let pw = std::fs::read_to_string(format!("{state}/nats/vimd.password"))?;
    let opts = async_nats::ConnectOptions::with_user_and_password("vimd".into(), pw.trim().into());
    // The embedded server speaks TLS only, with vimd's CA.
    let ca = std::path::PathBuf::from(format!("{state}/tls/ca.pem"));
    let c = vim_proto::nats_tls(opts, Some(&ca)).connect(url).await?;
    let start = Instant::now();
    let began = vim::db::now_ms();
    let mut sent = 0u64;
    let mut seq = 0;
    // When each host's last beat was handed to NATS, and how often this generator itself left
    // a host silent long enough for a miss (vimd counts one at 1.5 intervals): such a
    // `PS_Timeout` is the load's, not vimd's.
    let mut last_sent: Vec<Option<Instant>> = vec![None; hosts];
    let mut late = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        let round = Instant::now();
        seq += 1;
        for (i, vms) in reports.iter_mut().enumerate() {
            let id = format!("sim{i}");
            // As an agent reports: every VM's report numbered anew each time, its CPU use
            // moving; so every heartbeat differs from the one before.
            for (k, r) in vms.iter_mut().enumerate() {
                r.seq = seq;
                r.cpu_pct = ((seq as usize + k) % 50) as f64;
            }
            let hb = vim_proto::Heartbeat {
                version: vim_proto::PROTOCOL_VERSION,
                host_id: id.clone(),
                seq,
                hostname: id.clone(),
                cpu_cores: 64,
                memory_mib: 512 * 1024,
                agent_version: "sim".into(),
                vms: vms.clone(),
                address: "192.0.2.1".into(),
            };
            c.publish(
                vim_proto::subjects::heartbeat(&id),
                hb.encode_to_vec().into(),
            )
            .await?;
            sent += 1;
            let now = Instant::now();
            if last_sent[i].is_some_and(|t| now - t >= Duration::from_millis(1500)) {
                late += 1;
            }
            last_sent[i] = Some(now);
        }
        c.flush().await?;
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(round.elapsed())).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let now = vim::db::now_ms();
    let timeouts = db
        .events(Some(began), 1_000_000)
        .await?
        .iter()
        .filter(|e| {
            e.kind == vim::db::EventKind::PsTimeout && e.host_id.starts_with("sim") && e.ts <= now
        })
        .count();
    let all = db.hosts().await?;
    let in_run = |id: &str| {
        id.strip_prefix("sim")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n < hosts)
    };
    let max_lag = all
        .iter()
        .filter(|h| in_run(&h.id))
        .map(|h| now - h.last_heartbeat)
        .max()
        .unwrap_or(0);
    println!(
        "heartbeats: {hosts} simulated hosts with {vms} VMs at 1 Hz for {elapsed:.0} s: sent {:.0}/s; \
         {timeouts} PS_Timeout from the first beat on ({late} beats sent 1.5 s or more after the \
         one before); database last_heartbeat at most {max_lag} ms old",
        sent as f64 / elapsed
    );
    println!(
        "{}",
        serde_json::json!({"hosts": hosts, "vms": vms, "ps_timeout": timeouts, "late_sends": late,
            "max_lag_ms": max_lag})
    );
    Ok(())
}
