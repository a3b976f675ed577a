//! vimctl: the VIM's command line. Human tables by default, one JSON document with `--json`.

#[path = "vimctl/accounting.rs"]
mod accounting;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "vimctl",
    version,
    about = "Command line of the Virtual Infrastructure Manager"
)]
struct Cli {
    /// vimd's API.
    #[arg(long, env = "VIM_API", default_value = "https://127.0.0.1:8640")]
    api: String,
    /// The CA (PEM) that verifies vimd's certificate: vimd's own is STATE_DIR/tls/ca.pem.
    /// Without it, the system's trusted roots.
    #[arg(long, env = "VIM_CA")]
    ca: Option<PathBuf>,
    /// A file holding the API token (else the VIM_TOKEN variable).
    #[arg(long = "token-file", env = "VIM_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print one JSON document.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Images (kernel, initrd, command line, disk) on shared storage.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// List hosts.
    Hosts,
    /// Hosts: register one, reissue its credentials.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Virtual machines: create, list, show, start, stop, delete, console.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Recent jobs.
    Jobs,
    /// One job.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// Events; `--follow` streams them.
    Events {
        #[arg(long)]
        follow: bool,
    },
    /// The audit log.
    Audit,
    /// API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Webhooks: events POSTed to a URL, signed (docs/webhooks.md).
    Webhook {
        #[command(subcommand)]
        cmd: WebhookCmd,
    },
    /// Automatic vertical scaling policies (docs/scaling.md).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// The cluster as a whole: its balancer (docs/balance.md).
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Availability against SLA targets, from the event log (docs/sla.md).
    Sla {
        #[command(subcommand)]
        cmd: SlaCmd,
    },
    /// Pricing plans (docs/billing.md).
    Price {
        #[command(subcommand)]
        cmd: PriceCmd,
    },
    /// The fee for what VMs used over a period, per VM and per consumer (docs/billing.md).
    Bill {
        /// Only this consumer's (a consumer's token sees only its own anyway).
        #[arg(long)]
        consumer: Option<String>,
        /// RFC 3339, e.g. 2026-12-01T00:00:00Z.
        #[arg(long)]
        from: String,
        /// RFC 3339 (default now).
        #[arg(long)]
        to: Option<String>,
        /// One row per period, for spreadsheets.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
}

#[derive(Subcommand)]
enum SlaCmd {
    /// Uptime, outages, MTTR and whether the target was met, per VM and for them all.
    Report {
        #[arg(long, conflicts_with = "consumer")]
        vm: Option<String>,
        #[arg(long)]
        consumer: Option<String>,
        /// RFC 3339, e.g. 2026-12-01T00:00:00Z.
        #[arg(long)]
        from: String,
        /// RFC 3339 (default now).
        #[arg(long)]
        to: Option<String>,
        /// Percent; without it, each VM's own target.
        #[arg(long)]
        target: Option<f64>,
    },
}

#[derive(Subcommand)]
enum PriceCmd {
    /// Set a plan's prices (per vCPU-hour and per GiB-hour), from now or --since on.
    Set {
        plan: String,
        #[arg(long = "vcpu-hour")]
        vcpu_hour: String,
        #[arg(long = "gib-hour")]
        gib_hour: String,
        #[arg(long)]
        currency: Option<String>,
        /// RFC 3339 (default now).
        #[arg(long)]
        since: Option<String>,
    },
    /// Every plan's price history and who pays by which (a consumer: its own plan).
    List,
    /// Make a consumer pay by a plan (the rest pay by `default`).
    Assign { consumer: String, plan: String },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// The vimd answering: whether it leads (docs/ha.md) and its pid.
    Status,
    /// The load balancer (admins): without options, its settings and each host's load; with
    /// --on/--off or a setting, changes them; --dry-run prints the moves it would make now.
    Balance {
        /// Let it live-migrate VMs on its own.
        #[arg(long, conflicts_with = "off")]
        on: bool,
        #[arg(long)]
        off: bool,
        /// Act on an imbalance (coefficient of variation of the hosts' loads) above this
        /// (default 0.3).
        #[arg(long)]
        threshold: Option<f64>,
        /// Seconds between its rounds (default 60).
        #[arg(long)]
        interval: Option<u64>,
        /// Rounds in a row the imbalance must last before it acts (default 3).
        #[arg(long)]
        rounds: Option<u32>,
        /// The least a move must lower the imbalance by, a fraction of it (default 0.1).
        #[arg(long = "min-gain")]
        min_gain: Option<f64>,
        /// Seconds a moved VM stays put (default 300).
        #[arg(long)]
        settle: Option<u64>,
        /// Print the moves it would make now, with the figures before and after; change nothing.
        #[arg(long = "dry-run", conflicts_with_all = ["on", "off"])]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Set a consumer's policy (admins; for all its VMs), or with --vm one VM's (it wins).
    Set {
        /// The consumer (omit with --vm).
        #[arg(required_unless_present = "vm")]
        consumer: Option<String>,
        #[arg(long, conflicts_with = "consumer")]
        vm: Option<String>,
        /// Grow when CPU use stays at or above PCT % for S seconds (default 80:60).
        #[arg(long, value_name = "PCT:S")]
        up: Option<String>,
        /// Shrink when CPU use stays at or below PCT % for S seconds (default 15:60).
        #[arg(long, value_name = "PCT:S")]
        down: Option<String>,
        /// The floor: vCPUs and MiB (default 1:4096).
        #[arg(long, value_name = "VCPUS:MIB")]
        min: Option<String>,
        /// The ceiling: vCPUs and MiB (default 128:524288).
        #[arg(long, value_name = "VCPUS:MIB")]
        max: Option<String>,
        /// Seconds after a change before the next (default 120).
        #[arg(long)]
        cooldown: Option<i64>,
        /// Keep the policy but do nothing automatically.
        #[arg(long)]
        off: bool,
    },
    /// List the policies.
    List,
}

/// "A:B" as two numbers.
fn pair(what: &str, s: &str) -> Result<(i64, i64)> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--{what} {s}: expected two numbers, A:B"))?;
    let n = |x: &str| {
        x.trim()
            .parse::<i64>()
            .map_err(|e| anyhow::anyhow!("--{what} {s}: {x:?}: {e}"))
    };
    Ok((n(a)?, n(b)?))
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Copy a kernel (and initrd, disk) to shared storage as an image.
    Add {
        name: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long)]
        disk: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Register a host; prints what its agent needs (NATS URL, credentials file), or with
    /// --join the one command to run on the new host (docs/packages.md).
    Add {
        id: String,
        /// Print a join command: it installs the agent package from vimd, writes the host's
        /// configuration and credentials, and starts the agent. Its token works once.
        #[arg(long)]
        join: bool,
        /// How long the join command works (default 3600).
        #[arg(long = "join-ttl-s", requires = "join")]
        join_ttl_s: Option<u64>,
        /// The shared storage's path on the new host (default vimd's).
        #[arg(long = "shared-dir", requires = "join")]
        shared_dir: Option<String>,
        /// The address the new host reaches vimd at (default --api).
        #[arg(long = "join-url", requires = "join")]
        join_url: Option<String>,
    },
    /// Remove a host and revoke its queue credentials; refused while VMs are placed on it,
    /// unless --drain moves the running ones away first.
    Remove {
        id: String,
        #[arg(long)]
        drain: bool,
    },
    /// Issue a host new queue credentials (the old ones stop working).
    Credentials { id: String },
    /// Take no new VMs on the host and migrate every VM running there away.
    Drain {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// The host takes new VMs again.
    Undrain { id: String },
}

#[derive(Subcommand)]
enum WebhookCmd {
    /// POST events of these kinds to URL (yours, or every VM's for an admin); prints the
    /// signing secret, once.
    Add {
        url: String,
        /// Event kinds, comma-separated (VM_Restarted,Scaling_Refused,...).
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
    },
    List,
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Mint an API token (printed once) with a role: admin or consumer.
    Add {
        name: String,
        #[arg(long, default_value = "consumer")]
        role: String,
    },
}

#[derive(Subcommand)]
enum JobCmd {
    /// Show one job: kind, state, error, times.
    Show { id: String },
}

#[derive(clap::Args)]
struct Wait {
    /// Return at once with the job id instead of waiting for the job.
    #[arg(long = "no-wait")]
    no_wait: bool,
    /// How long to wait for the job.
    #[arg(long = "timeout-s", default_value_t = 300)]
    timeout_s: u64,
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM from an image and start it; prints its id.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long = "memory-mib", default_value_t = 256)]
        memory_mib: u64,
        /// No NIC (by default a VM gets one on its host's bridge, with a MAC fixed for life).
        #[arg(long = "no-net")]
        no_net: bool,
        /// When its host fails: `restart` it on another host (default), `resume` it there from
        /// its newest checkpoint, promote its `standby` on another host (docs/standby.md), or
        /// leave it (`off`).
        #[arg(long, default_value = "restart", value_parser = ["restart", "resume", "standby", "off"])]
        ha: String,
        /// With `--ha resume` or `standby`: seconds between checkpoints (default 5).
        #[arg(long = "checkpoint-s")]
        checkpoint_s: Option<u32>,
        /// Among a failed host's VMs, the higher restart first (-1000 to 1000).
        #[arg(
            long = "ha-priority",
            default_value_t = 0,
            allow_negative_numbers = true
        )]
        ha_priority: i64,
        /// The most vCPUs it can be resized to while it runs (default 4 x --vcpus, at most 254).
        #[arg(long = "max-vcpus")]
        max_vcpus: Option<u32>,
        /// The most memory it can be resized to while it runs (default: the consumer's scaling
        /// ceiling, else 4 x --memory-mib).
        #[arg(long = "max-memory-mib")]
        max_memory_mib: Option<u64>,
        /// Its anti-affinity group: your VMs of one group are kept on different hosts.
        #[arg(long)]
        group: Option<String>,
        /// Its availability target, percent (default 99.95); a month below it is an
        /// SLA_Violated event.
        #[arg(long = "sla-target")]
        sla_target: Option<f64>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Change a running VM's vCPUs (up to its max_vcpus) and memory (up to its max_memory_mib)
    /// by hotplug; waits for the guest.
    Resize {
        id: String,
        #[arg(long, required_unless_present = "memory_mib")]
        vcpus: Option<u32>,
        #[arg(long = "memory-mib")]
        memory_mib: Option<u64>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Suspend a running VM to shared storage: its host's capacity is freed; `resume` (or
    /// `start`) brings it back on any host, the guest going on where it was.
    Suspend {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Suspend the VM once it has been idle (CPU per vCPU at or below PCT %) for S seconds;
    /// `vm start` resumes it (scale to zero).
    AutoSuspend {
        /// The VM (or --consumer).
        #[arg(required_unless_present = "consumer")]
        id: Option<String>,
        /// Set a consumer's policy instead (admins): for its VMs without one of their own.
        #[arg(long, conflicts_with_all = ["id", "inherit"])]
        consumer: Option<String>,
        /// Suspend once CPU use per vCPU stays at or below PCT % for S seconds.
        #[arg(long, value_name = "PCT:S", required_unless_present_any = ["off", "inherit"])]
        idle: Option<String>,
        /// Never (for a VM: whatever its consumer's policy says).
        #[arg(long, conflicts_with_all = ["idle", "inherit"])]
        off: bool,
        /// A VM: follow its consumer's policy.
        #[arg(long, conflicts_with = "idle")]
        inherit: bool,
    },
    /// Resume a suspended VM on a host with room (or HOST).
    Resume {
        id: String,
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Set a VM's HA policy: `restart` (on another host when its host fails), `resume` (there,
    /// from its newest checkpoint), `standby` (a standby VMM on another host follows its
    /// checkpoints and is promoted) or `off`.
    SetHa {
        id: String,
        #[arg(value_parser = ["restart", "resume", "standby", "off"])]
        mode: String,
        /// Its restart priority (unchanged without it).
        #[arg(long, allow_negative_numbers = true)]
        priority: Option<i64>,
        /// Seconds between checkpoints with `resume` or `standby` (unchanged without it).
        #[arg(long = "checkpoint-s")]
        checkpoint_s: Option<u32>,
    },
    /// List the VMs (a consumer sees its own).
    List,
    /// Show one VM: host, state, size, usage.
    Show { id: String },
    /// Start a stopped VM.
    Start {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Stop a VM (ACPI power button; forced after a timeout).
    Stop {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Stop a VM and delete it for good (its disk copy too).
    Delete {
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Live-migrate a running VM to another host; prints where it runs and how the move went.
    Migrate {
        id: String,
        /// The host to move to (placement chooses without it).
        #[arg(long)]
        to: Option<String>,
        /// The longest pause the guest should see.
        #[arg(long = "downtime-ms")]
        downtime_ms: Option<u64>,
        #[command(flatten)]
        wait: Wait,
    },
    /// The guest's serial log.
    Console { id: String },
}

struct Api {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn req(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r
            .send()
            .with_context(|| format!("cannot reach vimd at {}", self.base))?;
        let status = resp.status();
        let text = resp.text()?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let msg = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(v.to_string());
            anyhow::bail!("{status}: {msg}");
        }
        Ok(v)
    }
    fn get(&self, path: &str) -> Result<Value> {
        self.req(reqwest::Method::GET, path, None)
    }
    /// Every VM the token may see, fetched a page at a time.
    fn all_vms(&self) -> Result<Value> {
        const PAGE: usize = 1000;
        let mut all = Vec::new();
        loop {
            let path = match all.last().and_then(|v: &Value| v["id"].as_str()) {
                Some(id) => format!("/vms?limit={PAGE}&after={id}"),
                None => format!("/vms?limit={PAGE}"),
            };
            let page = match self.get(&path)? {
                Value::Array(page) => page,
                other => anyhow::bail!("vimd answered GET /vms with {other}"),
            };
            let full = page.len() == PAGE;
            all.extend(page);
            if !full {
                return Ok(Value::Array(all));
            }
        }
    }
    fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.req(reqwest::Method::POST, path, Some(body))
    }

    /// Drains a host: each running VM's migration is a job; waits for all of
    /// them (unless --no-wait) and returns the drain answer with the VMs that
    /// did not move, as "vm: error".
    fn drain(&self, id: &str, wait: &Wait) -> Result<(Value, Vec<String>)> {
        let r = self.post(&format!("/hosts/{id}/drain"), json!({}))?;
        let mut failed = Vec::new();
        if !wait.no_wait {
            for j in r["jobs"].as_array().into_iter().flatten() {
                let done = self.wait(j["job_id"].as_str().unwrap_or_default(), wait, true)?;
                if done["state"] != "done" {
                    failed.push(format!("{}: {}", j["vm_id"], done["error"]));
                }
            }
        }
        Ok((r, failed))
    }

    /// Waits for a job to end, with a progress line on stderr.
    fn wait(&self, job_id: &str, w: &Wait, quiet: bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(w.timeout_s);
        let start = Instant::now();
        loop {
            let j = self.get(&format!("/jobs/{job_id}"))?;
            let state = j["state"].as_str().unwrap_or("");
            if !quiet {
                // A migration says where it is: round, MiB written, dirty rate.
                let p = &j["progress"];
                let progress = if p.is_object() {
                    format!(
                        " {} round {}, {:.0} MiB sent, {:.0} MiB left, dirty {:.1} MiB/s",
                        p["phase"].as_str().map(printable).unwrap_or_default(),
                        p["round"].as_u64().unwrap_or(0),
                        p["bytes_written"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
                        p["remaining_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
                        p["dirty_rate_mib_s"].as_f64().unwrap_or(0.0),
                    )
                } else {
                    String::new()
                };
                eprint!(
                    "\rjob {job_id}: {state} ({:.0} s){progress}   ",
                    start.elapsed().as_secs_f64()
                );
            }
            if state == "done" || state == "failed" {
                if !quiet {
                    eprintln!();
                }
                return Ok(j);
            }
            if Instant::now() > deadline {
                anyhow::bail!("job {job_id} still {state} after {} s", w.timeout_s);
            }
            // Most jobs end within a second or two: look often then (the answer is what the
            // user waits for), less often after.
            let pause = if start.elapsed() < Duration::from_secs(5) {
                20
            } else {
                200
            };
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
}

/// Columns that hold milliseconds since the Unix epoch (the API's time unit).
const TIME_COLUMNS: [&str; 3] = ["ts", "last_heartbeat", "created_at"];

/// A time in milliseconds since the epoch as UTC for people: `2026-12-01 19:36:21.357`.
fn utc_ms(ms: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Text from hosts, guests and other callers, made safe for a terminal: control characters
/// (escape sequences that could retitle, recolour or rewrite the screen) shown as `\u{..}`.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A dry run's moves, a line each, then the imbalance it would leave.
fn print_plan(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or_default();
    let moves = r["moves"].as_array().map_or(&[][..], |v| v);
    println!(
        "imbalance now {:.2} (threshold {:.2}); {} move(s)",
        f(&r["imbalance_before"]),
        f(&r["threshold"]),
        moves.len()
    );
    for m in moves {
        println!(
            "  {}  {} -> {}  ({})  imbalance {:.2} -> {:.2}  {} {:.2} -> {:.2}  {} {:.2} -> {:.2}",
            m["vm_id"].as_str().unwrap_or_default(),
            m["from"].as_str().unwrap_or_default(),
            m["to"].as_str().unwrap_or_default(),
            m["reason"].as_str().unwrap_or_default(),
            f(&m["imbalance_before"]),
            f(&m["imbalance_after"]),
            m["from"].as_str().unwrap_or_default(),
            f(&m["from_load"][0]),
            f(&m["from_load"][1]),
            m["to"].as_str().unwrap_or_default(),
            f(&m["to_load"][0]),
            f(&m["to_load"][1]),
        );
    }
    println!("imbalance after: {:.2}", f(&r["imbalance_after"]));
}

fn table(rows: &[Value], cols: &[&str]) {
    let cell = |col: &str, v: &Value| match v {
        Value::String(s) => printable(s).replace('\n', " "),
        Value::Null => String::new(),
        Value::Number(n) if TIME_COLUMNS.contains(&col) && n.is_i64() => {
            utc_ms(n.as_i64().unwrap_or_default())
        }
        Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or_default()),
        v => v.to_string(),
    };
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for r in rows {
        for (i, c) in cols.iter().enumerate() {
            widths[i] = widths[i].max(cell(c, &r[*c]).len());
        }
    }
    let line = |vals: Vec<String>| {
        vals.iter()
            .enumerate()
            .map(|(i, v)| format!("{v:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in rows {
        println!("{}", line(cols.iter().map(|c| cell(c, &r[*c])).collect()));
    }
}

fn main() {
    // Output piped into `head` ends quietly, as for any Unix tool.
    // SAFETY: restoring the default SIGPIPE disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("vimctl: error: {e:#}");
        std::process::exit(1);
    }
}

/// HTTPS verified against `ca` (vimd's private CA) or, without it, the system's roots.
fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::blocking::Client> {
    let mut b = reqwest::blocking::Client::builder().timeout(None);
    match ca {
        Some(p) => {
            let pem =
                std::fs::read(p).with_context(|| format!("cannot read the CA {}", p.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{}: not a PEM certificate", p.display()))?;
            b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
        }
        None => {
            for c in vim::tls::system_roots() {
                b = b.add_root_certificate(c);
            }
        }
    }
    Ok(b.build()?)
}

fn run(cli: Cli) -> Result<()> {
    let token = match &cli.token_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read the token file {}", p.display()))?
            .trim()
            .to_string(),
        None => std::env::var("VIM_TOKEN").unwrap_or_default(),
    };
    let api = Api {
        base: cli.api.trim_end_matches('/').to_string(),
        token,
        http: http_client(cli.ca.as_deref())?,
    };
    let json_out = cli.json;
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    let job_cmd = |path: String, body: Value, w: &Wait| -> Result<()> {
        let r = api.post(&path, body)?;
        let job_id = r["job_id"].as_str().unwrap_or_default().to_string();
        if w.no_wait {
            if json_out {
                print(&r);
            } else {
                println!("{}", r["vm_id"].as_str().unwrap_or(&job_id));
            }
            return Ok(());
        }
        let j = api.wait(&job_id, w, json_out)?;
        let failed = j["state"] == "failed";
        if json_out {
            print(&json!({"job": j, "vm_id": r["vm_id"]}));
        } else if failed {
            eprintln!("job failed: {}", j["error"].as_str().unwrap_or(""));
        } else {
            println!("{}", r["vm_id"].as_str().unwrap_or(&job_id));
        }
        anyhow::ensure!(!failed, "job {job_id} failed");
        Ok(())
    };
    // A list: a table of `cols`, or the JSON document.
    let listing = |path: &str, cols: &[&str]| -> Result<()> {
        let r = if path == "/vms" {
            api.all_vms()?
        } else {
            api.get(path)?
        };
        if json_out {
            print(&r);
        } else {
            table(r.as_array().map_or(&[][..], |v| v), cols);
        }
        Ok(())
    };
    let abs = |p: &PathBuf| -> Result<String> { Ok(std::path::absolute(p)?.display().to_string()) };
    // What an agent needs, after `host add` or `host credentials`.
    let host_credentials = |r: &Value| {
        if json_out {
            print(r);
        } else {
            println!(
                "host {} registered; agent: --nats-url {} --credentials {}",
                r["host_id"].as_str().unwrap_or_default(),
                r["nats_url"].as_str().unwrap_or_default(),
                r["credentials_file"].as_str().unwrap_or_default()
            );
        }
    };
    match cli.cmd {
        Cmd::Image {
            cmd:
                ImageCmd::Add {
                    name,
                    kernel,
                    initrd,
                    cmdline,
                    disk,
                },
        } => {
            let r = api.post(
                "/images",
                json!({"name": name, "kernel": abs(&kernel)?,
                       "initrd": initrd.as_ref().map(abs).transpose()?.unwrap_or_default(),
                       "cmdline": cmdline,
                       "disk": disk.as_ref().map(abs).transpose()?.unwrap_or_default()}),
            )?;
            if json_out {
                print(&r);
            } else {
                println!("{}", r["name"].as_str().unwrap_or_default());
            }
        }
        Cmd::Hosts => {
            listing(
                "/hosts",
                &[
                    "id",
                    "hostname",
                    "state",
                    "draining",
                    "cpu_cores",
                    "memory_mib",
                    "last_heartbeat",
                ],
            )?;
        }
        Cmd::Host { cmd } => match cmd {
            HostCmd::Drain { id, wait } => {
                let (r, failed) = api.drain(&id, &wait)?;
                if json_out {
                    print(&r);
                } else {
                    let moving = r["jobs"].as_array().map_or(0, Vec::len);
                    println!("host {id} draining: {moving} VM(s) migrating away");
                    for s in r["staying"].as_array().into_iter().flatten() {
                        println!("stays (not running): {} ({})", s["vm_id"], s["state"]);
                    }
                    for f in &failed {
                        eprintln!("not moved: {f}");
                    }
                }
                anyhow::ensure!(failed.is_empty(), "{} VM(s) did not move", failed.len());
            }
            HostCmd::Undrain { id } => {
                let r = api.post(&format!("/hosts/{id}/undrain"), json!({}))?;
                if json_out {
                    print(&r);
                } else {
                    println!("host {id} takes new VMs again");
                }
            }
            HostCmd::Add {
                id,
                join,
                join_ttl_s,
                shared_dir,
                join_url,
            } => {
                let mut body = json!({"id": id, "join": join});
                if let Some(t) = join_ttl_s {
                    body["join_ttl_s"] = json!(t);
                }
                if let Some(d) = shared_dir {
                    body["shared_dir"] = json!(d);
                }
                let r = api.post("/hosts", body)?;
                if !join {
                    host_credentials(&r);
                } else if json_out {
                    print(&r);
                } else {
                    let j = &r["join"];
                    let base = join_url.unwrap_or_else(|| api.base.clone());
                    println!(
                        "host {id} registered. Run this on the new host, as root (it works once, until {} UTC):\n\n  {}\n",
                        utc_ms(j["expires_at"].as_i64().unwrap_or_default()),
                        vim::join::command(
                            base.trim_end_matches('/'),
                            j["token"].as_str().unwrap_or_default(),
                            j["pin"].as_str()
                        )
                    );
                }
            }
            HostCmd::Remove { id, drain } => {
                if drain {
                    let wait = Wait {
                        no_wait: false,
                        timeout_s: 600,
                    };
                    let (_, failed) = api.drain(&id, &wait)?;
                    anyhow::ensure!(
                        failed.is_empty(),
                        "not moved: {}; host {id} stays",
                        failed.join(", ")
                    );
                }
                print(&api.req(reqwest::Method::DELETE, &format!("/hosts/{id}"), None)?)
            }
            HostCmd::Credentials { id } => {
                host_credentials(&api.post(&format!("/hosts/{id}/credentials"), json!({}))?)
            }
        },
        Cmd::Token {
            cmd: TokenCmd::Add { name, role },
        } => {
            let r = api.post("/tokens", json!({"name": name, "role": role}))?;
            if json_out {
                print(&r);
            } else {
                println!("{}", r["token"].as_str().unwrap_or_default());
            }
        }
        Cmd::Policy { cmd } => match cmd {
            PolicyCmd::Set {
                consumer,
                vm,
                up,
                down,
                min,
                max,
                cooldown,
                off,
            } => {
                let mut body = json!({"enabled": !off});
                for (what, v, a, b) in [
                    ("up", &up, "up_pct", "up_window_s"),
                    ("down", &down, "down_pct", "down_window_s"),
                    ("min", &min, "min_vcpus", "min_memory_mib"),
                    ("max", &max, "max_vcpus", "max_memory_mib"),
                ] {
                    if let Some(v) = v {
                        let (x, y) = pair(what, v)?;
                        body[a] = json!(x);
                        body[b] = json!(y);
                    }
                }
                if let Some(c) = cooldown {
                    body["cooldown_s"] = json!(c);
                }
                let path = match (&vm, &consumer) {
                    (Some(id), _) => format!("/vms/{id}/scaling"),
                    (None, Some(c)) => format!("/consumers/{c}/scaling"),
                    (None, None) => anyhow::bail!("name a consumer or --vm ID"),
                };
                print(&api.req(reqwest::Method::PUT, &path, Some(body))?)
            }
            PolicyCmd::List => listing(
                "/scaling-policies",
                &[
                    "scope",
                    "enabled",
                    "up_pct",
                    "up_window_s",
                    "down_pct",
                    "down_window_s",
                    "min_vcpus",
                    "max_vcpus",
                    "cooldown_s",
                ],
            )?,
        },
        Cmd::Cluster {
            cmd: ClusterCmd::Status,
        } => print(&api.get("/cluster/status")?),
        Cmd::Cluster {
            cmd:
                ClusterCmd::Balance {
                    on,
                    off,
                    threshold,
                    interval,
                    rounds,
                    min_gain,
                    settle,
                    dry_run,
                },
        } => {
            let mut change = json!({});
            if on || off {
                change["on"] = json!(on);
            }
            for (k, v) in [
                ("threshold", threshold.map(|x| json!(x))),
                ("interval_s", interval.map(|x| json!(x))),
                ("rounds", rounds.map(|x| json!(x))),
                ("min_gain", min_gain.map(|x| json!(x))),
                ("settle_s", settle.map(|x| json!(x))),
            ] {
                if let Some(v) = v {
                    change[k] = v;
                }
            }
            let changing = change.as_object().is_some_and(|o| !o.is_empty());
            if changing {
                let r = api.req(reqwest::Method::PUT, "/cluster/balance", Some(change))?;
                if json_out || !dry_run {
                    print(&r);
                }
            }
            if dry_run {
                let r = api.get("/cluster/balance/plan")?;
                if json_out {
                    print(&r);
                } else {
                    print_plan(&r);
                }
            } else if !changing {
                let r = api.get("/cluster/balance")?;
                if json_out {
                    print(&r);
                } else {
                    println!("settings: {}", r["settings"]);
                    println!(
                        "imbalance: {:.2}",
                        r["imbalance"].as_f64().unwrap_or_default()
                    );
                    table(
                        r["hosts"].as_array().map_or(&[][..], |v| v),
                        &["id", "cpu", "memory", "load"],
                    );
                }
            }
        }
        Cmd::Vm { cmd } => match cmd {
            VmCmd::Create {
                name,
                image,
                vcpus,
                memory_mib,
                no_net,
                ha,
                ha_priority,
                checkpoint_s,
                max_vcpus,
                max_memory_mib,
                group,
                sla_target,
                wait,
            } => {
                let mut body = json!({"name": name, "image": image, "vcpus": vcpus,
                       "memory_mib": memory_mib, "net": !no_net, "ha": ha,
                       "ha_priority": ha_priority});
                if let Some(s) = checkpoint_s {
                    body["checkpoint_s"] = json!(s);
                }
                if let Some(m) = max_vcpus {
                    body["max_vcpus"] = json!(m);
                }
                if let Some(m) = max_memory_mib {
                    body["max_memory_mib"] = json!(m);
                }
                if let Some(g) = group {
                    body["group"] = json!(g);
                }
                if let Some(t) = sla_target {
                    body["sla_target"] = json!(t);
                }
                job_cmd("/vms".into(), body, &wait)?
            }
            VmCmd::Resize {
                id,
                vcpus,
                memory_mib,
                wait,
            } => {
                let mut body = json!({});
                if let Some(v) = vcpus {
                    body["vcpus"] = json!(v);
                }
                if let Some(m) = memory_mib {
                    body["memory_mib"] = json!(m);
                }
                job_cmd(format!("/vms/{id}/resize"), body, &wait)?
            }
            VmCmd::Suspend { id, wait } => job_cmd(format!("/vms/{id}/suspend"), json!({}), &wait)?,
            VmCmd::AutoSuspend {
                id,
                consumer,
                idle,
                off: _,
                inherit,
            } => {
                let (pct, secs) = match idle {
                    Some(v) => pair("idle", &v)?,
                    None => (0, 0),
                };
                let (path, body) = match (consumer, id) {
                    (Some(c), _) => (format!("/consumers/{c}/auto-suspend"), json!({})),
                    (None, Some(id)) => (
                        format!("/vms/{id}/auto-suspend"),
                        json!({"inherit": inherit}),
                    ),
                    (None, None) => anyhow::bail!("name a VM or --consumer C"),
                };
                let mut body = body;
                if !inherit {
                    body["idle_pct"] = json!(pct);
                    body["idle_s"] = json!(secs);
                }
                print(&api.req(reqwest::Method::PUT, &path, Some(body))?)
            }
            VmCmd::Resume { id, to, wait } => {
                let body = match to {
                    Some(h) => json!({"to": h}),
                    None => json!({}),
                };
                job_cmd(format!("/vms/{id}/resume"), body, &wait)?
            }
            VmCmd::SetHa {
                id,
                mode,
                priority,
                checkpoint_s,
            } => {
                let mut body = json!({"ha": mode});
                if let Some(p) = priority {
                    body["priority"] = json!(p);
                }
                if let Some(s) = checkpoint_s {
                    body["checkpoint_s"] = json!(s);
                }
                print(&api.req(reqwest::Method::PUT, &format!("/vms/{id}/ha"), Some(body))?)
            }
            VmCmd::List => {
                listing(
                    "/vms",
                    &[
                        "id",
                        "name",
                        "owner",
                        "state",
                        "host_id",
                        "vcpus",
                        "memory_mib",
                        "cpu_pct",
                        "rss_kib",
                    ],
                )?;
            }
            VmCmd::Show { id } => print(&api.get(&format!("/vms/{id}"))?),
            VmCmd::Start { id, wait } => job_cmd(format!("/vms/{id}/start"), json!({}), &wait)?,
            VmCmd::Stop { id, wait } => job_cmd(format!("/vms/{id}/stop"), json!({}), &wait)?,
            VmCmd::Migrate {
                id,
                to,
                downtime_ms,
                wait,
            } => {
                let mut body = json!({});
                if let Some(to) = to {
                    body["to"] = json!(to);
                }
                if let Some(d) = downtime_ms {
                    body["downtime_ms"] = json!(d);
                }
                let path = format!("/vms/{id}/migrate");
                if wait.no_wait || json_out {
                    job_cmd(path, body, &wait)?;
                } else {
                    let r = api.post(&path, body)?;
                    let job = api.wait(r["job_id"].as_str().unwrap_or_default(), &wait, false)?;
                    anyhow::ensure!(
                        job["state"] == "done",
                        "migration failed: {}",
                        job["error"].as_str().unwrap_or("")
                    );
                    let vm = api.get(&format!("/vms/{id}"))?;
                    let m = &vm["last_migration"];
                    println!(
                        "{id} runs on {}: downtime {:.1} ms, total {:.1} ms, {} rounds, {} MiB",
                        vm["host_id"].as_str().unwrap_or("?"),
                        m["downtime_ms"].as_f64().unwrap_or(0.0),
                        m["total_ms"].as_f64().unwrap_or(0.0),
                        m["rounds"],
                        m["bytes_written"].as_u64().unwrap_or(0) >> 20
                    );
                }
            }
            VmCmd::Delete { id, wait } => {
                let r = api.req(reqwest::Method::DELETE, &format!("/vms/{id}"), None)?;
                let job_id = r["job_id"].as_str().unwrap_or_default().to_string();
                if wait.no_wait {
                    print(&r);
                } else {
                    let j = api.wait(&job_id, &wait, json_out)?;
                    if json_out {
                        print(&j);
                    }
                    anyhow::ensure!(j["state"] == "done", "job {job_id} failed: {}", j["error"]);
                }
            }
            VmCmd::Console { id } => {
                let r = api.get(&format!("/vms/{id}/console"))?;
                match r {
                    Value::String(s) if !json_out => print!("{}", printable(&s)),
                    v => print(&json!({"console": v})),
                }
            }
        },
        Cmd::Jobs => {
            listing("/jobs", &["id", "kind", "state", "vm_id", "owner", "error"])?;
        }
        Cmd::Job {
            cmd: JobCmd::Show { id },
        } => print(&api.get(&format!("/jobs/{id}"))?),
        Cmd::Events { follow: false } => {
            listing(
                "/events",
                &["ts", "kind", "host_id", "vm_id", "job_id", "detail"],
            )?;
        }
        Cmd::Events { follow: true } => {
            let resp = api
                .http
                .get(format!("{}/events/stream", api.base))
                .bearer_auth(&api.token)
                .send()?;
            anyhow::ensure!(resp.status().is_success(), "{}", resp.status());
            for line in BufReader::new(resp).lines() {
                if let Some(d) = line?.strip_prefix("data:") {
                    println!("{}", printable(d.trim()));
                }
            }
        }
        Cmd::Webhook { cmd } => match cmd {
            WebhookCmd::Add { url, events } => {
                let r = api.post("/webhooks", json!({"url": url, "events": events}))?;
                if json_out {
                    print(&r);
                } else {
                    println!(
                        "id {}\nsecret {}",
                        r["id"].as_str().unwrap_or_default(),
                        r["secret"].as_str().unwrap_or_default()
                    );
                }
            }
            WebhookCmd::List => {
                listing("/webhooks", &["id", "owner", "url", "events", "created_at"])?
            }
            WebhookCmd::Delete { id } => {
                print(&api.req(reqwest::Method::DELETE, &format!("/webhooks/{id}"), None)?)
            }
        },
        Cmd::Sla {
            cmd:
                SlaCmd::Report {
                    vm,
                    consumer,
                    from,
                    to,
                    target,
                },
        } => {
            let path = accounting::query(
                "/sla/report",
                &[
                    ("vm", vm),
                    ("consumer", consumer),
                    ("from", Some(from)),
                    ("to", to),
                    ("target", target.map(|t| t.to_string())),
                ],
            );
            let r = api.get(&path)?;
            if json_out {
                print(&r);
            } else {
                accounting::print_sla(&r);
            }
        }
        Cmd::Price { cmd } => match cmd {
            PriceCmd::Set {
                plan,
                vcpu_hour,
                gib_hour,
                currency,
                since,
            } => {
                let mut body = json!({"vcpu_hour": vcpu_hour, "gib_hour": gib_hour});
                if let Some(c) = currency {
                    body["currency"] = json!(c);
                }
                if let Some(t) = since {
                    body["since"] = json!(t);
                }
                print(&api.req(reqwest::Method::PUT, &format!("/prices/{plan}"), Some(body))?)
            }
            PriceCmd::List => {
                let r = api.get("/prices")?;
                if json_out {
                    print(&r);
                } else {
                    let rows: Vec<Value> = r["prices"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let mut p = p.clone();
                            p["since"] = json!(utc_ms(p["since"].as_i64().unwrap_or_default()));
                            p
                        })
                        .collect();
                    table(
                        &rows,
                        &["plan", "since", "vcpu_hour", "gib_hour", "currency"],
                    );
                    if let Some(c) = r["consumers"].as_object().filter(|c| !c.is_empty()) {
                        println!();
                        for (consumer, plan) in c {
                            println!("{consumer} pays by {}", plan.as_str().unwrap_or_default());
                        }
                    }
                }
            }
            PriceCmd::Assign { consumer, plan } => print(&api.req(
                reqwest::Method::PUT,
                &format!("/consumers/{consumer}/plan"),
                Some(json!({ "plan": plan })),
            )?),
        },
        Cmd::Bill {
            consumer,
            from,
            to,
            csv,
        } => {
            let path = accounting::query(
                "/bill",
                &[("consumer", consumer), ("from", Some(from)), ("to", to)],
            );
            let r = api.get(&path)?;
            if json_out {
                print(&r);
            } else if csv {
                accounting::print_bill_csv(&r);
            } else {
                accounting::print_bill(&r);
            }
        }
        Cmd::Audit => {
            listing(
                "/audit",
                &["ts", "who", "action", "target", "outcome", "detail"],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_not_printed_raw() {
        assert_eq!(printable("ok\tline\n"), "ok\tline\n");
        let p = printable("\x1b]0;owned\x07\x1b[2J");
        assert!(!p.contains('\x1b') && !p.contains('\x07'), "{p}");
        assert!(p.contains("\\u{1b}"), "{p}");
    }

    #[test]
    fn times_in_tables_are_utc_for_people() {
        assert_eq!(utc_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc_ms(1_796_153_141_357), "2026-12-01 19:25:41.357");
        // Out of the representable range: the number as it came.
        assert_eq!(utc_ms(i64::MAX), i64::MAX.to_string());
    }
}
