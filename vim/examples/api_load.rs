//! API load for `scripts/bench-vim.sh`: C concurrent clients (one keep-alive connection each) send
//! R requests each, first `GET /vms` then `POST /vms` (job submission), and the run prints
//! throughput and p50/p99/max latency. Every request must answer 2xx, or the run fails.
//!
//! Usage: api_load API_URL ADMIN_TOKEN_FILE CLIENTS REQUESTS KERNEL
//! It adds an image `img` with that kernel (if missing) and a consumer owning 200 VMs: the
//! `GET /vms` calls are that consumer's, so each lists 200 VMs however many other VMs the
//! database holds (every run's `POST /vms` adds C×R of the admin's).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    ensure!(
        a.len() == 6,
        "usage: api_load API_URL ADMIN_TOKEN_FILE CLIENTS REQUESTS KERNEL"
    );
    let base = a[1].trim_end_matches('/').to_string();
    let token = std::fs::read_to_string(&a[2])
        .with_context(|| format!("cannot read {}", a[2]))?
        .trim()
        .to_string();
    let (clients, per): (usize, usize) = (a[3].parse()?, a[4].parse()?);
    let c = client()?;
    let image = json!({"name": "img", "kernel": a[5]});
    let r = c
        .post(format!("{base}/images"))
        .bearer_auth(&token)
        .json(&image)
        .send()
        .await?;
    ensure!(
        r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT,
        "adding the image: {}",
        r.status()
    );
    let lister = format!("lister{}", std::process::id());
    let r: serde_json::Value = c
        .post(format!("{base}/tokens"))
        .bearer_auth(&token)
        .json(&json!({"name": lister, "role": "consumer"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let lister_token = r["token"]
        .as_str()
        .context("no token in the answer")?
        .to_string();
    for i in 0..200 {
        let vm = json!({"name": format!("seed{i}"), "image": "img", "vcpus": 1, "memory_mib": 64});
        send(&c, &base, &lister_token, "/vms", Some(vm)).await?;
    }
    run("GET /vms", &base, &lister_token, clients, per, false).await?;
    run("POST /vms", &base, &token, clients, per, true).await?;
    Ok(())
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// One request; its latency. A POST when `body` is given, else a GET.
async fn send(
    c: &reqwest::Client,
    base: &str,
    token: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Duration> {
    let t = Instant::now();
    let req = match &body {
        Some(b) => c.post(format!("{base}{path}")).json(b),
        None => c.get(format!("{base}{path}")),
    };
    let r = req.bearer_auth(token).send().await?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("{path}: {status}: {text}");
    }
    Ok(t.elapsed())
}

async fn run(
    name: &str,
    base: &str,
    token: &str,
    clients: usize,
    per: usize,
    post: bool,
) -> Result<()> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (base, token) = (base.to_string(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let c = client()?;
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let body = post.then(|| {
                    json!({"name": format!("b{}x{k}x{i}", std::process::id()), "image": "img",
                           "vcpus": 1, "memory_mib": 64})
                });
                lat.push(send(&c, &base, &token, "/vms", body).await?);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let p = |q: f64| lat[((q * lat.len() as f64) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{name:10} {:6} requests, {clients} clients: {:7.0} req/s  p50 {:6.2} ms  p99 {:6.2} ms  max {:6.2} ms",
        lat.len(),
        lat.len() as f64 / elapsed,
        p(0.5),
        p(0.99),
        p(1.0)
    );
    Ok(())
}
