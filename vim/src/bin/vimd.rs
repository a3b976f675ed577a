//! vimd: the VIM daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use vim::server::{Monitoring, Retention, Vimd};
use vim::{api, auth, db, placement, queue, server};

// Every API call and heartbeat allocates across threads (rows, JSON, messages); glibc's malloc
// spent a fifth of vimd's CPU under 10,000 heartbeating hosts (consolidation, arena locks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "vimd", version, about = "The Virtual Infrastructure Manager")]
struct Args {
    /// Database, embedded NATS data, host credentials and the admin token live here.
    #[arg(long = "state-dir", env = "VIMD_STATE_DIR")]
    state_dir: PathBuf,
    #[arg(long, env = "VIMD_LISTEN", default_value = "127.0.0.1:8640")]
    listen: String,
    /// An external NATS server or cluster; without it vimd runs its own nats-server.
    #[arg(long = "nats-url", env = "VIMD_NATS_URL")]
    nats_url: Option<String>,
    /// Where the embedded nats-server listens (agents connect here).
    #[arg(
        long = "nats-listen",
        env = "VIMD_NATS_LISTEN",
        default_value = "127.0.0.1:4222"
    )]
    nats_listen: String,
    /// The NATS URL agents are told to use (`vimctl host add`), if not the one vimd connects to
    /// (e.g. the embedded server listens on 0.0.0.0 and hosts dial the manager's address).
    #[arg(long = "nats-advertise", env = "VIMD_NATS_ADVERTISE")]
    nats_advertise: Option<String>,
    /// Credentials for an external NATS (JSON {"user","password"}).
    #[arg(long = "nats-credentials", env = "VIMD_NATS_CREDENTIALS")]
    nats_credentials: Option<PathBuf>,
    /// With --nats-url: keep the NATS users (vimd's and each host's) in this file, which every
    /// node's configuration includes; reload the nodes when it changes (docs/protocol.md).
    #[arg(long = "nats-accounts-file", env = "VIMD_NATS_ACCOUNTS_FILE", requires_all = ["nats_url", "nats_credentials"])]
    nats_accounts_file: Option<PathBuf>,
    /// With --nats-url: the CA (PEM) that verifies the NATS servers' certificates; vimd insists
    /// on TLS with it and hands it to agents in `host add`.
    #[arg(long = "nats-ca", env = "VIMD_NATS_CA", requires = "nats_url")]
    nats_ca: Option<PathBuf>,
    /// The API's certificate chain (PEM); default: one issued by vimd's private CA
    /// (STATE_DIR/tls/ca.pem, which vimctl is given with --ca).
    #[arg(long = "tls-cert", env = "VIMD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long = "tls-key", env = "VIMD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A name (DNS name or IP address) hosts and callers reach vimd by, put in the certificate
    /// vimd's CA issues for the API and the embedded NATS server (repeatable; localhost, the
    /// loopback addresses and the --listen, --nats-listen and --nats-advertise hosts are in it).
    #[arg(long = "tls-name", env = "VIMD_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    /// Serve the API as plain HTTP (only on a loopback address, as for the demo).
    #[arg(long = "plain-http")]
    plain_http: bool,
    /// JetStream replicas: 1 for one server, 3 for a cluster.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// `sqlite:PATH` or `postgres://…`; default: SQLite in the state dir.
    #[arg(long = "database-url", env = "VIMD_DATABASE_URL")]
    database_url: Option<String>,
    /// Shared storage (images, VM disks and consoles); default: STATE_DIR/shared.
    #[arg(long = "shared-dir", env = "VIMD_SHARED_DIR")]
    shared_dir: Option<PathBuf>,
    #[arg(long = "cpu-overcommit", default_value_t = 4.0)]
    cpu_overcommit: f64,
    #[arg(long = "memory-overcommit", default_value_t = 1.0)]
    memory_overcommit: f64,
    #[arg(long = "reserved-memory-mib", default_value_t = 512)]
    reserved_memory_mib: i64,
    /// Expected heartbeat interval (the brief's polls are 20 s; tests use less).
    #[arg(long = "heartbeat-ms", default_value_t = 20_000)]
    heartbeat_ms: u64,
    /// Missed heartbeats in a row before a host is unreachable.
    #[arg(long = "misses", default_value_t = 3)]
    misses: i64,
    /// The hosts' lease: an agent that cannot renew it for this long stops its VMs, and only
    /// then are they restarted elsewhere (docs/failover.md). 0: no failover.
    #[arg(long = "lease-ms", default_value_t = 30_000)]
    lease_ms: u64,
    /// Time added to the lease before vimd counts it lapsed: clock-rate differences, and the
    /// VMMs' 20 ms between looks at the lease.
    #[arg(long = "lease-margin-ms", default_value_t = 500)]
    lease_margin_ms: u64,
    /// When more than this share of the hosts (percent) is silent at once, vimd suspects its own
    /// network: it fences nothing and restarts nothing, and raises `Failover_Suspended`.
    #[arg(long = "failover-max-silent-percent", default_value_t = 50)]
    failover_max_silent_percent: u32,
    /// VMs restarted at once by failover, at most; the rest wait their turn, highest priority
    /// first.
    #[arg(long = "restarts-at-once", default_value_t = 32)]
    restarts_at_once: u32,
    /// A restart whose disk is still locked is tried again on the same host, every 2 s, until
    /// this long after the host went silent: a failed host's lock on shared storage outlives it
    /// until its lease there runs out (90 s on a Linux NFS server by default).
    #[arg(long = "failover-disk-wait-ms", default_value_t = 120_000)]
    failover_disk_wait_ms: u64,
    /// Where the fleet-agent package joining hosts download is (`GET /packages/fleet-agent.deb`;
    /// the fleet-vim package installs it there).
    #[arg(
        long = "packages-dir",
        env = "VIMD_PACKAGES_DIR",
        default_value = "/usr/share/fleet-vim/packages"
    )]
    packages_dir: PathBuf,
    /// A job not taken by a worker, or not answered by its host, for this long has its message
    /// sent again (handlers are idempotent by job id).
    #[arg(long = "job-resend-ms", default_value_t = 30_000)]
    job_resend_ms: u64,
    /// Job worker tasks in this process (more vimd processes can share the same queue).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// `image add` reads files only from inside this directory (default: anywhere vimd can).
    #[arg(long = "image-import-dir", env = "VIMD_IMAGE_IMPORT_DIR")]
    image_import_dir: Option<PathBuf>,
    /// API connections open at once, at most (one more is closed at once).
    #[arg(long = "max-connections", default_value_t = 2048)]
    max_connections: usize,
    /// A connection that has not sent a whole request head this long after connecting (or
    /// after its last answer) is closed.
    #[arg(long = "header-timeout-ms", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Failed logins from one address in a minute before it gets 429 (and its further failures
    /// are summarised instead of audited one by one).
    #[arg(long = "failed-logins-per-minute", default_value_t = vim::auth::LoginLimiter::PER_SOURCE)]
    failed_logins_per_minute: u32,
    /// Let consumers live-migrate their own VMs (admins always may).
    #[arg(long = "consumers-may-migrate")]
    consumers_may_migrate: bool,
    /// Live migrations a host sends at once; more wait.
    #[arg(long = "migrations-out-per-host", default_value_t = 2)]
    migrations_out_per_host: u32,
    /// Live migrations a host takes at once; more wait.
    #[arg(long = "migrations-in-per-host", default_value_t = 2)]
    migrations_in_per_host: u32,
    /// Days the event log keeps its rows.
    #[arg(long = "event-retention-days", default_value_t = 90)]
    event_retention_days: u64,
    /// Days the audit log keeps its rows.
    #[arg(long = "audit-retention-days", default_value_t = 400)]
    audit_retention_days: u64,
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
    // Fault injection for crash tests: FAILPOINTS=name=return (docs/billing.md); nothing
    // without the variable.
    let _faults = fail::FailScenario::setup();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("vimd: error: {e:#}");
        std::process::exit(1);
    }
}

/// What every process serving many sockets needs: as many descriptors as the hard limit allows
/// (the soft default of 1024 ran out under a few hundred idle connections).
fn raise_nofile_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to our own struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                tracing::warn!("cannot raise the open-file limit");
            }
        }
    }
}

async fn run(a: Args) -> Result<()> {
    if a.plain_http {
        let ip: std::net::SocketAddr = a
            .listen
            .parse()
            .with_context(|| format!("--listen {}: not an address:port", a.listen))?;
        anyhow::ensure!(
            ip.ip().is_loopback(),
            "--plain-http serves only a loopback address, not {} (tokens would cross the network in clear)",
            a.listen
        );
    }
    // Everything vimd creates (database, NATS store and configuration, credentials, tokens,
    // copies on shared storage) is its owner's alone from the moment it exists.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    raise_nofile_limit();
    vim::files::private_dir(&a.state_dir)
        .with_context(|| format!("cannot create {}", a.state_dir.display()))?;
    let shared_dir = a.shared_dir.unwrap_or(a.state_dir.join("shared"));
    std::fs::create_dir_all(&shared_dir)?;
    let url = a
        .database_url
        .unwrap_or(format!("sqlite:{}", a.state_dir.join("vim.db").display()));
    let db = db::Db::open(&url)
        .await
        .with_context(|| format!("cannot open the database {url}"))?;
    // With PostgreSQL several vimd can share the database and the queue: one leads (docs/ha.md).
    let leadership = if url.starts_with("postgres") {
        let l = Arc::new(vim::leader::Leadership::contended());
        vim::leader::run(l.clone(), url.clone());
        l
    } else {
        Arc::new(vim::leader::Leadership::alone())
    };
    if db.count_tokens().await? == 0 {
        let t = auth::random_secret();
        db.add_token(&auth::hash_token(&t), "admin", "admin")
            .await?;
        let p = a.state_dir.join("admin.token");
        vim::files::replace_private(&p, format!("{t}\n").as_bytes())?;
        tracing::info!(path = %p.display(), "wrote the admin API token");
    }
    // Host passwords stored in plaintext by an older vimd become hashes.
    for h in db.hosts().await? {
        if !auth::is_password_hash(&h.nats_password_hash) {
            let hash = auth::hash_password(&h.nats_password_hash)?;
            db.set_host_password_hash(&h.id, &hash).await?;
            tracing::info!(host = h.id, "stored the host's NATS password as a hash");
        }
    }
    // vimd's CA and the certificate it issues for the names vimd is reached by.
    let mut names = a.tls_names.clone();
    for addr in [
        Some(&a.listen),
        Some(&a.nats_listen),
        a.nats_advertise.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        names.extend(vim::tls::host_of(addr));
    }
    let pki = vim::tls::Pki::init(&a.state_dir, &names)?;
    let (api_tls, api_pin) = if a.plain_http {
        (None, None)
    } else {
        let (cert, key) = match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (pki.server_cert(), pki.server_key()),
        };
        // Join commands pin vimd's own key; an operator's certificate is checked by the
        // joining host's system roots instead.
        let pin = match &a.tls_cert {
            Some(_) => None,
            None => Some(vim::tls::spki_pin(&cert)?),
        };
        (Some(vim::tls::server_config(&cert, &key)?), pin)
    };
    let mut accounts_file = None;
    let nats_ca = match &a.nats_url {
        Some(_) => a.nats_ca.clone(),
        None => Some(pki.ca_cert()),
    };
    let nats_ca = match nats_ca {
        Some(p) => {
            let pem = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read the NATS CA {}", p.display()))?;
            Some((p, pem))
        }
        None => None,
    };
    let (embedded, nats, nats_url) = match a.nats_url {
        Some(u) => {
            let (user, password) = match &a.nats_credentials {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))?;
                    let c: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                        format!("{}: not JSON {{\"user\", \"password\"}}", p.display())
                    })?;
                    let field = |k: &str| {
                        c[k].as_str()
                            .map(String::from)
                            .with_context(|| format!("{}: no \"{k}\" string", p.display()))
                    };
                    (Some(field("user")?), Some(field("password")?))
                }
                None => (None, None),
            };
            if let (Some(path), Some(user), Some(password)) =
                (a.nats_accounts_file, user.clone(), password.clone())
            {
                let f = queue::AccountsFile::new(path, user, &password)?;
                // Before connecting: the nodes may be waiting for it to start.
                f.write(&db.hosts().await?)?;
                accounts_file = Some(f);
            }
            let mut opts = match (user, password) {
                (Some(u), Some(p)) => async_nats::ConnectOptions::with_user_and_password(u, p),
                _ => async_nats::ConnectOptions::new(),
            };
            opts = vim_proto::nats_tls(opts, a.nats_ca.as_deref()).retry_on_initial_connect();
            let c = tokio::time::timeout(
                Duration::from_secs(60),
                opts.connect(vim_proto::nats_servers(&u)),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no NATS server at {u} answered within 60 s"))?
            .with_context(|| format!("cannot connect to NATS at {u}"))?;
            (None, c, u)
        }
        None => {
            let n =
                queue::EmbeddedNats::start(&a.state_dir, &a.nats_listen, &db.hosts().await?, &pki)
                    .await?;
            let c = n.connect().await?;
            let u = n.url();
            (Some(n), c, u)
        }
    };
    let nats_url = a.nats_advertise.unwrap_or(nats_url);
    let js = async_nats::jetstream::new(nats.clone());
    // A cluster that has just started elects its JetStream leader first: retry for a while.
    let mut tries = 0;
    while let Err(e) = queue::declare_streams(&js, a.replicas, a.lease_ms).await {
        tries += 1;
        anyhow::ensure!(tries < 60, "cannot declare the JetStream streams: {e:#}");
        tracing::info!(error = %e, "JetStream not ready; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let host_ids: Vec<String> = db.hosts().await?.into_iter().map(|h| h.id).collect();
    queue::declare_host_consumers(&js, &host_ids).await?;
    let (events, _) = tokio::sync::broadcast::channel(1024);
    db.tell_events(events.clone());
    // VMs that ran before usage was metered (an upgraded VIM) start being billed now.
    let metered = db.meter_all().await?;
    if metered > 0 {
        tracing::info!(
            records = metered,
            "usage records written for VMs billed differently"
        );
    }
    let v = Arc::new(Vimd {
        tokens: Default::default(),
        audit: vim::audit::Audit::start(db.clone()),
        outbox: vim::outbox::Outbox::start(js.clone(), db.clone()),
        db,
        js,
        nats,
        nats_url,
        nats_ca,
        embedded,
        accounts_file,
        state_dir: a.state_dir,
        shared_dir,
        policy: placement::Policy {
            cpu_ratio: a.cpu_overcommit,
            memory_ratio: a.memory_overcommit,
            reserved_memory_mib: a.reserved_memory_mib,
        },
        monitoring: Monitoring {
            interval: Duration::from_millis(a.heartbeat_ms.max(10)),
            misses_for_unreachable: a.misses.max(1),
        },
        job_resend: Duration::from_millis(a.job_resend_ms.max(100)),
        failover: vim::server::failover::Failover::new(
            Duration::from_millis(a.lease_ms),
            Duration::from_millis(a.lease_margin_ms),
            a.failover_max_silent_percent.min(100),
            a.restarts_at_once,
            Duration::from_millis(a.failover_disk_wait_ms),
        ),
        liveness: Default::default(),
        events,
        logins: vim::auth::LoginLimiter::new(a.failed_logins_per_minute),
        users_lock: Default::default(),
        image_import_dir: a.image_import_dir,
        packages_dir: a.packages_dir,
        api_https: api_tls.is_some(),
        api_pin,
        copying: Default::default(),
        consumers_may_migrate: a.consumers_may_migrate,
        migration_limits: vim::server::migrations::MigrationLimits {
            outgoing: i64::from(a.migrations_out_per_host.max(1)),
            incoming: i64::from(a.migrations_in_per_host.max(1)),
        },
        migration_slots: Default::default(),
        metrics: Default::default(),
        leadership,
        retention: Retention {
            events: Duration::from_secs(a.event_retention_days.max(1) * 86_400),
            audit: Duration::from_secs(a.audit_retention_days.max(1) * 86_400),
        },
    });
    server::run_job_workers(v.clone(), a.workers.max(1)).await?;
    server::run_event_consumer(v.clone()).await?;
    server::run_monitor(v.clone()).await?;
    server::failover::run(v.clone()).await?;
    server::run_reconciler(v.clone()).await;
    server::run_housekeeping(v.clone());
    server::run_auto_suspend(v.clone());
    server::run_balancer(v.clone());
    server::standby::run(v.clone());
    vim::webhooks::run(v.clone());
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(
        listen = a.listen,
        https = api_tls.is_some(),
        nats = v.nats_url,
        "vimd ready"
    );
    let app = api::router(v.clone());
    let limits = vim::http::Limits {
        max_connections: a.max_connections,
        header_timeout: Duration::from_millis(a.header_timeout_ms.max(100)),
        ..Default::default()
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    vim::http::serve(listener, app, limits, api_tls, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await?;
    // The embedded nats-server runs on (the hosts' leases depend on it); the next vimd adopts it.
    drop(v);
    Ok(())
}
