//! vim-agent: runs beside the VMM on every host. It heartbeats its host to the VIM, consumes its
//! host's command stream (create, start, stop, delete, info), runs each VM as a `vmm` child and
//! reports what happens to them (docs/protocol.md).

mod cgroup;
mod jail;
mod lease;
mod metrics;
mod net;
mod probe;
mod scaling;
mod supervisor;
mod vms;
mod watchdog;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use std::time::Duration;
use tokio::sync::{mpsc, watch};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, AckKind};
use clap::Parser;
use futures::StreamExt;
use prost::Message;
use serde::Deserialize;
use vim_proto::{subjects as s, EventKind, HostEvent, Versioned, PROTOCOL_VERSION};

use supervisor::Host;

#[derive(Parser, Debug)]
#[command(name = "vim-agent", version, about = "The host agent of the VIM")]
struct Args {
    /// A TOML file with the settings below (flags win over it).
    #[arg(long, env = "VIM_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long = "host-id", env = "VIM_AGENT_HOST_ID")]
    host_id: Option<String>,
    #[arg(long = "nats-url", env = "VIM_AGENT_NATS_URL")]
    nats_url: Option<String>,
    /// The credentials file `vimctl host add` printed (JSON {"user", "password"}).
    #[arg(long, env = "VIM_AGENT_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// The CA (PEM) that verifies the NATS server: what `vimctl host add` gave as
    /// `nats_ca_pem`/`nats_ca_file`. With it the agent speaks only TLS.
    #[arg(long = "nats-ca", env = "VIM_AGENT_NATS_CA")]
    nats_ca: Option<PathBuf>,
    #[arg(long = "state-dir", env = "VIM_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[arg(long = "shared-dir", env = "VIM_AGENT_SHARED_DIR")]
    shared_dir: Option<PathBuf>,
    /// The vmm binary (default: `vmm` beside this binary, else on PATH).
    #[arg(long, env = "VIM_AGENT_VMM")]
    vmm: Option<PathBuf>,
    #[arg(long = "heartbeat-ms", env = "VIM_AGENT_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// The Linux bridge VMs' taps join (created if missing; default vimbr0).
    #[arg(long, env = "VIM_AGENT_BRIDGE")]
    bridge: Option<String>,
    /// The host's watchdog device (say /dev/watchdog): fed while the agent runs and the host is
    /// sound, it resets the host when the agent hangs or a VMM outlives the fence
    /// (docs/failover.md). Off by default.
    #[arg(long, env = "VIM_AGENT_WATCHDOG")]
    watchdog: Option<PathBuf>,
    /// The watchdog's timeout in seconds (default 30; the driver may round it).
    #[arg(long = "watchdog-timeout-s", env = "VIM_AGENT_WATCHDOG_TIMEOUT_S")]
    watchdog_timeout_s: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP; off by default).
    #[arg(long = "metrics-listen", env = "VIM_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Polls (one per heartbeat interval) without a new guest heartbeat on a VM's console
    /// before it is reported unreachable (default 5; docs/sla.md).
    #[arg(long = "probe-misses", env = "VIM_AGENT_PROBE_MISSES")]
    probe_misses: Option<u32>,
    /// The user VMMs run as, jailed (docs/sandbox.md): a name or UID:GID (default vim-vmm).
    #[arg(long = "vmm-user", env = "VIM_AGENT_VMM_USER")]
    vmm_user: Option<String>,
    /// Run VMMs as the agent's own user, without the jail (development only).
    #[arg(long = "no-jail")]
    no_jail: bool,
    /// Check the configuration, print it and exit.
    #[arg(long)]
    check: bool,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host_id: Option<String>,
    nats_url: Option<String>,
    credentials: Option<PathBuf>,
    nats_ca: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    shared_dir: Option<PathBuf>,
    vmm: Option<PathBuf>,
    heartbeat_ms: Option<u64>,
    bridge: Option<String>,
    watchdog: Option<PathBuf>,
    watchdog_timeout_s: Option<u32>,
    metrics_listen: Option<std::net::SocketAddr>,
    probe_misses: Option<u32>,
    vmm_user: Option<String>,
    /// false: `--no-jail`.
    jail: Option<bool>,
}

#[derive(Debug)]
struct Config {
    host_id: String,
    nats_url: String,
    credentials: PathBuf,
    nats_ca: Option<PathBuf>,
    state_dir: PathBuf,
    shared_dir: PathBuf,
    vmm: PathBuf,
    heartbeat: Duration,
    bridge: String,
    watchdog: Option<PathBuf>,
    watchdog_timeout_s: u32,
    metrics_listen: Option<std::net::SocketAddr>,
    probe_misses: u32,
    /// The VMM user's (uid, gid); None: VMMs are not jailed.
    vmm_user: Option<(u32, u32)>,
}

fn config(a: Args) -> Result<Config> {
    let f: FileConfig = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{}", p.display()))?,
        None => FileConfig::default(),
    };
    let need = |v: Option<String>, name: &str| {
        v.ok_or_else(|| anyhow::anyhow!("--{name} is required (flag or config file)"))
    };
    let needp = |v: Option<PathBuf>, name: &str| {
        v.ok_or_else(|| anyhow::anyhow!("--{name} is required (flag or config file)"))
    };
    let vmm = a.vmm.or(f.vmm).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("vmm")))
            .filter(|p| p.exists())
            .or_else(|| {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join("vmm"))
                        .find(|p| p.is_file())
                })
            })
            .unwrap_or_else(|| "vmm".into())
    });
    Ok(Config {
        host_id: need(a.host_id.or(f.host_id), "host-id")?,
        nats_url: need(a.nats_url.or(f.nats_url), "nats-url")?,
        credentials: needp(a.credentials.or(f.credentials), "credentials")?,
        nats_ca: a.nats_ca.or(f.nats_ca),
        state_dir: needp(a.state_dir.or(f.state_dir), "state-dir")?,
        shared_dir: needp(a.shared_dir.or(f.shared_dir), "shared-dir")?,
        vmm,
        heartbeat: Duration::from_millis(a.heartbeat_ms.or(f.heartbeat_ms).unwrap_or(1000).max(10)),
        bridge: {
            let b = a.bridge.or(f.bridge).unwrap_or_else(|| "vimbr0".into());
            anyhow::ensure!(
                (1..=15).contains(&b.len())
                    && b.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "--bridge {b:?}: 1-15 letters, digits, '-' or '_'"
            );
            b
        },
        watchdog: a.watchdog.or(f.watchdog),
        watchdog_timeout_s: {
            let t = a.watchdog_timeout_s.or(f.watchdog_timeout_s).unwrap_or(30);
            anyhow::ensure!(
                (1..=3600).contains(&t),
                "--watchdog-timeout-s {t}: 1 to 3600 seconds"
            );
            t
        },
        metrics_listen: a.metrics_listen.or(f.metrics_listen),
        probe_misses: {
            let m = a.probe_misses.or(f.probe_misses).unwrap_or(5);
            anyhow::ensure!((1..=1000).contains(&m), "--probe-misses {m}: 1 to 1000");
            m
        },
        vmm_user: if a.no_jail || f.jail == Some(false) {
            None
        } else {
            let u = a
                .vmm_user
                .or(f.vmm_user)
                .unwrap_or_else(|| "vim-vmm".into());
            Some(jail::resolve_user(&u)?)
        },
    })
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        // Colour only on a terminal: logs go to files and the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // State files, job results, VMM logs and API sockets are the agent's alone.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    let check = args.check;
    let r = match config(args) {
        Ok(c) if check => {
            println!("{c:#?}");
            Ok(())
        }
        Ok(c) => run(c).await,
        Err(e) => Err(e),
    };
    if let Err(e) = r {
        eprintln!("vim-agent: error: {e:#}");
        std::process::exit(1);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// This host's address as NATS sees it: the local address of a route to the first NATS server
/// (a UDP socket "connected" there; nothing is sent). Empty when it cannot be told.
fn address_towards(nats_url: &str) -> String {
    use std::net::{ToSocketAddrs, UdpSocket};
    let Some(first) = vim_proto::nats_servers(nats_url).into_iter().next() else {
        return String::new();
    };
    let hostport = first.rsplit("://").next().unwrap_or(&first);
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    let local = || -> std::io::Result<String> {
        let to = hostport
            .to_socket_addrs()?
            .next()
            .ok_or(std::io::ErrorKind::NotFound)?;
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        s.connect(to)?;
        Ok(s.local_addr()?.ip().to_string())
    };
    local().unwrap_or_default()
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

struct Agent {
    cfg: Config,
    js: jetstream::Context,
    host: Host,
    /// Jobs being carried out: a second copy of one (a redelivery, or vimd sending it again)
    /// that arrives meanwhile is never run twice.
    in_flight: Mutex<std::collections::HashSet<String>>,
    /// False while a VMM outlives the fence: the watchdog (if any) is then not fed.
    sound: Arc<std::sync::atomic::AtomicBool>,
}

impl Agent {
    async fn publish_event(&self, ev: &HostEvent) -> Result<()> {
        self.js
            .publish(s::host_events(&self.cfg.host_id), ev.encode_to_vec().into())
            .await?
            .await?;
        Ok(())
    }

    /// One command, from its message to its ack: answered from the stored result if it was done
    /// before (a redelivery), else queued behind the earlier commands for the same VM (queued
    /// here, in arrival order; the rest runs in a task of its own, so other VMs' commands and the
    /// heartbeat never wait for it).
    fn handle(self: &Arc<Self>, m: jetstream::Message, cmd: vim_proto::HostCommand) {
        let me = self.clone();
        let dirs = me.host.dirs().clone();
        let job = cmd.job_id.clone();
        if !lock(&self.in_flight).insert(job.clone()) {
            // Not acked: it comes back after the ack wait and is answered from the store then.
            tracing::info!(job, "a second copy of a job in progress; left for later");
            drop(m);
            return;
        }
        // Read and queued here, before anything awaits: commands for one VM reach its supervisor
        // in the order they arrived (a migration's abort after the command it aborts). The
        // stored result is a small file.
        let stored = dirs.job_result(&job);
        let queued = match (&stored, cmd.action) {
            (Some(_), _) => None,
            (None, Some(a)) => Some(Some(self.host.submit(a))),
            (None, None) => Some(None),
        };
        tokio::spawn(async move {
            let ev = match stored {
                Some(ev) => ev,
                None => {
                    let _ = m.ack_with(AckKind::Progress).await;
                    let failed = |kind: EventKind, error: &str| HostEvent {
                        version: PROTOCOL_VERSION,
                        host_id: me.cfg.host_id.clone(),
                        job_id: job.clone(),
                        ok: false,
                        error: error.into(),
                        kind: kind.into(),
                        vm: None,
                        migration: None,
                        progress: None,
                        scale: None,
                        checkpoint: None,
                    };
                    let ev = match queued.flatten() {
                        None => failed(EventKind::CommandRefused, "no action"),
                        Some(outcome) => match outcome.await {
                            Ok(o) => supervisor::event(&me.cfg.host_id, &job, o),
                            // The agent is shutting down: no answer is stored, so the command
                            // comes again to the next agent.
                            Err(_) => {
                                lock(&me.in_flight).remove(&job);
                                return;
                            }
                        },
                    };
                    let (dirs, e2) = (me.host.dirs().clone(), ev.clone());
                    let j = job.clone();
                    match tokio::task::spawn_blocking(move || dirs.save_job_result(&j, &e2)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "cannot store a job result"),
                        Err(e) => tracing::error!(error = %e, "cannot store a job result"),
                    }
                    ev
                }
            };
            // Done (its result is stored): a copy from now on is answered from the store.
            lock(&me.in_flight).remove(&job);
            match me.publish_event(&ev).await {
                Ok(()) => {
                    let _ = m.ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "answer not published; the command comes again")
                }
            }
        });
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Guest memory is a memfd its VMM asks huge pages for; the host decides whether it gets them.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// Says when the host gives guest memory no huge pages (docs/hotplug.md): guests then run, boot
/// and take hot-plugged memory more slowly, nested hosts most of all.
fn check_huge_pages() {
    if let Ok(setting) = std::fs::read_to_string(SHMEM_THP) {
        if setting.contains("[never]") || setting.contains("[deny]") {
            tracing::warn!(
                setting = setting.trim(),
                "guest memory gets no huge pages: echo advise > {SHMEM_THP}"
            );
        }
    }
}

async fn run(cfg: Config) -> Result<()> {
    check_huge_pages();
    let creds: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg.credentials)
            .with_context(|| format!("cannot read {}", cfg.credentials.display()))?,
    )
    .context("credentials file")?;
    let opts = async_nats::ConnectOptions::with_user_and_password(
        creds["user"].as_str().unwrap_or_default().into(),
        creds["password"].as_str().unwrap_or_default().into(),
    );
    if let Some(ca) = &cfg.nats_ca {
        std::fs::metadata(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    }
    // One shutdown signal for every task: SIGTERM or Ctrl-C. The VMMs keep running (the unit's
    // KillMode=process); the next agent re-adopts them.
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "no SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down (the VMs keep running)");
        let _ = stop_tx.send(true);
    });
    // Without it (no CAP_NET_ADMIN, no iproute2) the host still runs VMs without a NIC; one
    // with a NIC fails to start, saying why.
    if let Err(e) = net::ensure_bridge(&cfg.bridge) {
        tracing::error!(bridge = cfg.bridge, error = %e, "cannot set up the VM bridge: VMs with a NIC cannot start here");
    }
    let mut dirs = vms::Dirs::new(&cfg.state_dir, &cfg.shared_dir, &cfg.vmm)?;
    lease::init(&cfg.state_dir).context("cannot write the lease file")?;
    dirs.bridge = cfg.bridge.clone();
    if let Some((uid, gid)) = cfg.vmm_user {
        let cgroups = cgroup::Hierarchy::detect(&cfg.host_id)
            .context("the VMMs' cgroups (or run with --no-jail)")?;
        anyhow::ensure!(
            dirs.vmm.is_absolute(),
            "the vmm binary must be given by its absolute path to be jailed: {}",
            dirs.vmm.display()
        );
        tracing::info!(uid, gid, cgroups = ?cgroups, "VMMs run jailed");
        dirs.jail = Some(jail::Jail::new(uid, gid, cgroups, &cfg.state_dir)?);
    } else {
        tracing::warn!("VMMs run as this agent's user, without the jail (--no-jail)");
    }
    let dirs = Arc::new(dirs);
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let host = Host::start(
        dirs,
        cfg.heartbeat,
        cfg.probe_misses,
        exits_tx,
        stop.clone(),
    )
    .await?;
    // Armed before the queue is reached: a host whose agent hangs connecting is reset too. It is
    // disarmed whenever the agent ends by itself, an error included (that is not a hang; the
    // service manager starts it again); only a hung or killed agent leaves it armed.
    let sound = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let Some(path) = cfg.watchdog.clone() else {
        return serve(cfg, opts, host, exits, sound, stop).await;
    };
    let w = watchdog::Watchdog::open(&path, cfg.watchdog_timeout_s)?;
    tracing::info!(device = %path.display(), timeout_s = w.timeout_s(), "watchdog armed");
    let (wd_stop_tx, wd_stop) = watch::channel(false);
    let wd = tokio::spawn(watchdog::run(w, sound.clone(), wd_stop));
    let r = serve(cfg, opts, host, exits, sound, stop).await;
    let _ = wd_stop_tx.send(true);
    let _ = wd.await;
    r
}

/// The agent's work once its host is set up: the queue, the lease, heartbeats and commands.
async fn serve(
    cfg: Config,
    opts: async_nats::ConnectOptions,
    host: Host,
    mut exits: mpsc::UnboundedReceiver<supervisor::Notice>,
    sound: Arc<std::sync::atomic::AtomicBool>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let client = vim_proto::nats_tls(opts, cfg.nats_ca.as_deref())
        .custom_inbox_prefix(s::inbox_prefix(&cfg.host_id))
        .retry_on_initial_connect()
        .connect(vim_proto::nats_servers(&cfg.nats_url))
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cfg.nats_url))?;
    let js = jetstream::new(client.clone());
    let agent = Arc::new(Agent {
        cfg,
        js,
        host,
        in_flight: Default::default(),
        sound,
    });
    tracing::info!(host = agent.cfg.host_id, "agent started");

    tokio::spawn(lease::run(agent.clone(), stop.clone()));
    if let Some(addr) = agent.cfg.metrics_listen {
        let a = agent.clone();
        metrics::serve(addr, move || {
            let sound = a.sound.load(std::sync::atomic::Ordering::Relaxed);
            metrics::encode(&a.host.reports(), sound)
        })
        .await?;
    }

    // VMMs that exited on their own.
    let a = agent.clone();
    tokio::spawn(async move {
        while let Some(n) = exits.recv().await {
            let (vm, ev) = match n {
                supervisor::Notice::Exited(x) => (
                    x.vm_id,
                    HostEvent {
                        version: PROTOCOL_VERSION,
                        host_id: a.cfg.host_id.clone(),
                        job_id: String::new(),
                        ok: false,
                        error: x.why,
                        kind: EventKind::VmFailure.into(),
                        vm: Some(x.report),
                        migration: None,
                        progress: None,
                        scale: None,
                        checkpoint: None,
                    },
                ),
                supervisor::Notice::Scale {
                    vm_id,
                    request,
                    vcpus,
                } => (
                    vm_id.clone(),
                    HostEvent {
                        version: PROTOCOL_VERSION,
                        host_id: a.cfg.host_id.clone(),
                        ok: true,
                        kind: match request.ask {
                            scaling::Ask::Up => EventKind::ScaleUpRequested,
                            scaling::Ask::Down => EventKind::ScaleDownRequested,
                        }
                        .into(),
                        scale: Some(vim_proto::ScaleRequest {
                            vm_id,
                            cpu_pct: request.cpu_pct,
                            window_s: request.window.as_secs() as u32,
                            vcpus,
                            memory_pct: request.memory_pct,
                        }),
                        ..Default::default()
                    },
                ),
                supervisor::Notice::Reachability { report, change } => (
                    report.vm_id.clone(),
                    HostEvent {
                        version: PROTOCOL_VERSION,
                        host_id: a.cfg.host_id.clone(),
                        ok: true,
                        kind: match change {
                            probe::Change::Unreachable { .. } => EventKind::VmUnreachable,
                            probe::Change::Reachable => EventKind::VmReachable,
                        }
                        .into(),
                        error: match change {
                            probe::Change::Unreachable { silent_polls } => format!(
                                "no guest heartbeat for {silent_polls} polls ({} ms)",
                                a.cfg.heartbeat.as_millis() * u128::from(silent_polls)
                            ),
                            probe::Change::Reachable => "guest heartbeat again".into(),
                        },
                        vm: Some(report),
                        ..Default::default()
                    },
                ),
                supervisor::Notice::Migrating { vm_id, progress: p } => (
                    vm_id.clone(),
                    HostEvent {
                        version: PROTOCOL_VERSION,
                        host_id: a.cfg.host_id.clone(),
                        ok: true,
                        kind: EventKind::VmMigrationProgress.into(),
                        progress: Some(vim_proto::MigrationProgress {
                            vm_id,
                            phase: serde_json::to_value(p.phase)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            round: p.round,
                            bytes_written: p.bytes_written,
                            remaining_bytes: p.remaining_bytes,
                            dirty_rate_mib_s: p.dirty_rate_mib_s,
                        }),
                        ..Default::default()
                    },
                ),
            };
            if let Err(e) = a.publish_event(&ev).await {
                tracing::warn!(vm, kind = ev.kind().as_str(), error = %e, "cannot report to vimd");
            }
        }
    });

    // Heartbeats, with the VMs' latest reports: never waiting for a command.
    let a = agent.clone();
    let hb_client = client.clone();
    let mut hb_stop = stop.clone();
    tokio::spawn(async move {
        let mut seq = 0u64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let mut tick = tokio::time::interval(a.cfg.heartbeat);
        let mut address = String::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = hb_stop.changed() => return,
            }
            seq += 1;
            if address.is_empty() {
                let url = a.cfg.nats_url.clone();
                address = tokio::task::spawn_blocking(move || address_towards(&url))
                    .await
                    .unwrap_or_default();
            }
            let hb = vim_proto::Heartbeat {
                version: PROTOCOL_VERSION,
                host_id: a.cfg.host_id.clone(),
                seq,
                hostname: hostname(),
                address: address.clone(),
                cpu_cores: cores,
                memory_mib: memory_mib(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                vms: a.host.reports(),
            };
            if let Err(e) = hb_client
                .publish(s::heartbeat(&a.cfg.host_id), hb.encode_to_vec().into())
                .await
            {
                tracing::warn!(error = %e, "heartbeat not sent");
            }
        }
    });

    // The host's commands: each acked after its work and its answer are stored.
    let mut stop = stop;
    loop {
        let consumer: jetstream::consumer::PullConsumer = match async {
            agent
                .js
                .get_stream(s::COMMAND_STREAM)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .get_consumer(&s::host_consumer(&agent.cfg.host_id))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
        }
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "command consumer not available yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return Ok(()),
                }
            }
        };
        let mut msgs = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull commands");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return Ok(()),
                }
            }
        };
        loop {
            let m = tokio::select! {
                m = msgs.next() => m,
                _ = stop.changed() => return Ok(()),
            };
            let Some(Ok(m)) = m else { break };
            match vim_proto::HostCommand::decode_checked(&m.payload) {
                Ok(cmd) => agent.handle(m, cmd),
                Err(e) => {
                    vim_proto::dead_letter(
                        &agent.js,
                        &s::host_dead_letter(&agent.cfg.host_id),
                        &m.subject,
                        &m.payload,
                        &e.to_string(),
                    )
                    .await;
                    let _ = m.ack_with(AckKind::Term).await;
                }
            }
        }
        tracing::warn!("command stream ended; pulling again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
