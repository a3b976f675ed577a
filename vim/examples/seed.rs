//! Fills a VIM database for `scripts/bench-vim.sh`: HOSTS simulated hosts (`sim0`…, registered,
//! silent until `hb_load` beats for them) and VMS running VMs of consumer `bench` (`simvm0`…, VM
//! `simvmJ` on host `simJ mod HOSTS`, 1 vCPU and 64 MiB, already billed as the metering would
//! have it), in transactions of a few hundred rows, as a fleet that has run for a while would
//! have them. The schema is made (or brought up to date) by `Db::open` first, as vimd does.
//!
//! Usage: seed DATABASE_URL HOSTS VMS

use anyhow::{ensure, Result};
use sqlx::any::AnyPoolOptions;

/// Rows per INSERT: PostgreSQL takes at most 65,535 bind values in one statement.
const ROWS: usize = 500;

#[tokio::main]
async fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    ensure!(a.len() == 4, "usage: seed DATABASE_URL HOSTS VMS");
    let url = &a[1];
    let (hosts, vms): (usize, usize) = (a[2].parse()?, a[3].parse()?);
    ensure!(hosts > 0 || vms == 0, "VMs need hosts to run on");
    vim::db::Db::open(url).await?;
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    let now = vim::db::now_ms();
    let state = |s: vim::db::VmState| s.as_str().to_string();
    // Simulated hosts connect as vimd (hb_load), never as themselves: one hash for all (a
    // plaintext here would make vimd hash each at start, as for an older vimd's rows).
    let hash = vim::auth::hash_password(&vim::auth::random_secret())?;
    for first in (0..hosts).step_by(ROWS) {
        let n = ROWS.min(hosts - first);
        let sql = format!(
            "INSERT INTO hosts (id, state, nats_user, nats_password, created_at, place_key) VALUES {}",
            values(n, 6)
        );
        let mut q = sqlx::query(&sql);
        for i in first..first + n {
            q = q
                .bind(format!("sim{i}"))
                .bind(vim::db::HostState::Registered.as_str())
                .bind(format!("sim{i}"))
                .bind(&hash)
                .bind(now)
                .bind(vim::db::place_key());
        }
        q.execute(&pool).await?;
    }
    for first in (0..vms).step_by(ROWS) {
        let n = ROWS.min(vms - first);
        let sql = format!(
            "INSERT INTO vms (id, name, owner, image, vcpus, memory_mib, host_id, state, \
             created_at, billed_vcpus, billed_memory_mib) VALUES {}",
            values(n, 11)
        );
        let mut q = sqlx::query(&sql);
        for j in first..first + n {
            q = q
                .bind(format!("simvm{j}"))
                .bind(format!("simvm{j}"))
                .bind("bench")
                .bind("img")
                .bind(1i64)
                .bind(64i64)
                .bind(format!("sim{}", j % hosts))
                .bind(state(vim::db::VmState::Running))
                .bind(now - (vms - j) as i64)
                .bind(1i64)
                .bind(64i64);
        }
        q.execute(&pool).await?;
    }
    println!("seeded {hosts} hosts and {vms} VMs");
    Ok(())
}

/// `n` rows of `cols` bind markers each: `($1, $2), ($3, $4)`.
fn values(n: usize, cols: usize) -> String {
    (0..n)
        .map(|r| {
            let marks: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", marks.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
