//! Heartbeat-ingestion load for `scripts/bench-vim.sh`: N simulated hosts (a test-only fake: rows
//! in vimd's database and heartbeats on their subjects, no agents, no VMs) beat at 1 Hz for a while.
//! Every beat vimd failed to take in time shows as a `PS_Timeout` event: the report counts those
//! (after a 3 s warm-up), and how stale the database's `last_heartbeat` got (vimd refreshes it
//! every 5 s for hosts whose report did not change).
//!
//! Usage: hb_load STATE_DIR NATS_URL HOSTS SECONDS

use std::time::{Duration, Instant};

use prost::Message;
use vim::db::Db;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 5,
        "usage: hb_load STATE_DIR NATS_URL HOSTS SECONDS"
    );
    let (state, url) = (&a[1], &a[2]);
    let (hosts, secs): (usize, u64) = (a[3].parse()?, a[4].parse()?);
    let db = Db::open(&format!("sqlite:{state}/vim.db")).await?;
    for i in 0..hosts {
        // Simulated hosts need no NATS users: the load publishes as vimd.
        let _ = db.add_host(&format!("sim{i}"), "-", "-").await;
    }
    let pw = std::fs::read_to_string(format!("{state}/nats/vimd.password"))?;
    let opts = async_nats::ConnectOptions::with_user_and_password("vimd".into(), pw.trim().into());
    // The embedded server speaks TLS only, with vimd's CA.
    let ca = std::path::PathBuf::from(format!("{state}/tls/ca.pem"));
    let c = vim_proto::nats_tls(opts, Some(&ca)).connect(url).await?;
    let start = Instant::now();
    let warm = vim::db::now_ms() + 3000;
    let mut sent = 0u64;
    let mut seq = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        let round = Instant::now();
        seq += 1;
        for i in 0..hosts {
            let id = format!("sim{i}");
            let hb = vim_proto::Heartbeat {
                version: vim_proto::PROTOCOL_VERSION,
                host_id: id.clone(),
                seq,
                hostname: id.clone(),
                cpu_cores: 64,
                memory_mib: 512 * 1024,
                agent_version: "sim".into(),
                vms: Vec::new(),
                address: "192.0.2.1".into(),
            };
            c.publish(
                vim_proto::subjects::heartbeat(&id),
                hb.encode_to_vec().into(),
            )
            .await?;
            sent += 1;
        }
        c.flush().await?;
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(round.elapsed())).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let now = vim::db::now_ms();
    let timeouts = db
        .events(Some(warm), 1_000_000)
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
        "heartbeats: {hosts} simulated hosts at 1 Hz for {elapsed:.0} s: sent {:.0}/s; \
         {timeouts} PS_Timeout after warm-up; database last_heartbeat at most {max_lag} ms old",
        sent as f64 / elapsed
    );
    Ok(())
}
