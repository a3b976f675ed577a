//! API load for `scripts/bench-vim.sh`: C concurrent clients (one keep-alive connection each) send
//! R requests each, of each kind in turn, and the run prints throughput and p50/p99/max latency
//! per kind, then the same as one JSON line. Every request must answer 2xx, or the run fails.
//! - `list`: `GET /vms` as a consumer owning 200 VMs (so each lists 200 however many VMs the
//!   database holds);
//! - `show`: `GET /vms/ID` as the admin, of the VMs `seed` wrote (`simvm0`… `simvm{SHOW_VMS-1}`),
//!   spread over the whole table; skipped when SHOW_VMS is 0;
//! - `submit`: `POST /vms` as the admin (job submission: commit and publish; every run adds C×R
//!   VMs; whether they are placed is not measured).
//!
//! Usage: api_load API_URL ADMIN_TOKEN_FILE CLIENTS REQUESTS KERNEL [SHOW_VMS]
//! It adds an image `img` with that kernel (if missing) and the consumer with its 200 VMs.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    ensure!(
        a.len() == 6 || a.len() == 7,
        "usage: api_load API_URL ADMIN_TOKEN_FILE CLIENTS REQUESTS KERNEL [SHOW_VMS]"
    );
    let show_vms: usize = a.get(6).map_or(Ok(0), |n| n.parse())?;
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
    let mut out = serde_json::Map::new();
    out.insert(
        "list".into(),
        run(Op::List, &base, &lister_token, clients, per).await?,
    );
    if show_vms > 0 {
        let show = run(Op::Show(show_vms), &base, &token, clients, per).await?;
        out.insert("show".into(), show);
    }
    out.insert(
        "submit".into(),
        run(Op::Submit, &base, &token, clients, per).await?,
    );
    println!("{}", serde_json::Value::Object(out));
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

#[derive(Clone, Copy)]
enum Op {
    List,
    /// Of this many seeded VMs.
    Show(usize),
    Submit,
}

/// One kind of request from every client; its figures as JSON.
async fn run(
    op: Op,
    base: &str,
    token: &str,
    clients: usize,
    per: usize,
) -> Result<serde_json::Value> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (base, token) = (base.to_string(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let c = client()?;
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let (path, body) = match op {
                    Op::List => ("/vms".to_string(), None),
                    // Strides of two primes: every client reads VMs far apart in the table.
                    Op::Show(n) => (format!("/vms/simvm{}", (k * 7919 + i * 104_729) % n), None),
                    Op::Submit => (
                        "/vms".to_string(),
                        Some(json!({"name": format!("b{}x{k}x{i}", std::process::id()),
                                    "image": "img", "vcpus": 1, "memory_mib": 64})),
                    ),
                };
                lat.push(send(&c, &base, &token, &path, body).await?);
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
    let name = match op {
        Op::List => "GET /vms",
        Op::Show(_) => "GET /vms/ID",
        Op::Submit => "POST /vms",
    };
    let rps = lat.len() as f64 / elapsed;
    println!(
        "{name:12} {:6} requests, {clients} clients: {rps:7.0} req/s  p50 {:6.2} ms  p99 {:6.2} ms  max {:6.2} ms",
        lat.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
    Ok(json!({"rps": rps, "p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": p(1.0)}))
}
