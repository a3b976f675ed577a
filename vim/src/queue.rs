//! The message queue: NATS JetStream. `vimd` either starts its own `nats-server` child (the embedded
//! default, configured here) or uses a server or cluster by URL. Streams and consumers are declared
//! here; subjects are in `vim_proto::subjects` (docs/protocol.md).
//!
//! Durability: every stream is file-backed. nats-server 2.9 (Debian 12) has no per-message fsync
//! setting, so the database stays the source of truth: a job is committed there before it is
//! published, and the reconciler republishes jobs not confirmed published or not progressing; every
//! handler is idempotent by job id, so a second copy does nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use vim_proto::subjects as s;

use crate::db::Host;

/// How long JetStream remembers message ids to drop duplicates (a re-sent job within this window
/// is stored once).
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// vimd's own `nats-server`. It outlives vimd — a vimd that crashes or restarts must not take
/// the queue with it, or every host's lease would lapse and its VMs stop (docs/failover.md) —
/// and the next vimd adopts it by the pid file in its directory. To stop it, kill that pid.
pub struct EmbeddedNats {
    server: Server,
    process: std::sync::Mutex<Process>,
}

/// The server process: started by this vimd, or adopted from an earlier one.
enum Process {
    Child(Child),
    Adopted(u32),
}

impl Process {
    fn pid(&self) -> u32 {
        match self {
            Process::Child(c) => c.id(),
            Process::Adopted(p) => *p,
        }
    }

    /// Whether it has exited (a child is reaped).
    fn exited(&mut self, conf: &Path) -> Option<String> {
        match self {
            Process::Child(c) => c.try_wait().ok().flatten().map(|st| st.to_string()),
            Process::Adopted(p) => (!serves(*p, conf)).then(|| "gone".to_string()),
        }
    }
}

/// Whether `pid` is a live nats-server run with configuration `conf`.
fn serves(pid: u32, conf: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        == Some("Z");
    let cmd = String::from_utf8_lossy(&cmd);
    let mut args = cmd.split('\0');
    !zombie
        && args.next().is_some_and(|a| a.ends_with("nats-server"))
        && args.any(|a| Path::new(a) == conf)
}

/// Where the embedded server lives and how vimd reaches it.
struct Server {
    conf: PathBuf,
    dir: PathBuf,
    listen: String,
    /// vimd's CA and the certificate it issued: clients must speak TLS.
    pki: crate::tls::Pki,
    vimd_password: String,
    /// What the configuration holds instead of the password.
    vimd_password_hash: String,
}

impl EmbeddedNats {
    /// Starts nats-server with JetStream on file storage under `state_dir/nats`, listening on
    /// `listen` (host:port), TLS only, with the certificate `pki` issued. Hosts get users
    /// restricted to their own subjects.
    pub async fn start(
        state_dir: &Path,
        listen: &str,
        hosts: &[Host],
        pki: &crate::tls::Pki,
    ) -> Result<EmbeddedNats> {
        let dir = state_dir.join("nats");
        crate::files::private_dir(&dir.join("jetstream"))?;
        let pw_file = dir.join("vimd.password");
        let vimd_password = match std::fs::read_to_string(&pw_file) {
            Ok(p) => p.trim().to_string(),
            Err(_) => {
                let p = crate::auth::random_secret();
                crate::files::replace_private(&pw_file, p.as_bytes())?;
                p
            }
        };
        let server = Server {
            conf: dir.join("nats.conf"),
            dir: dir.clone(),
            listen: listen.to_string(),
            pki: pki.clone(),
            vimd_password_hash: crate::auth::hash_password(&vimd_password)?,
            vimd_password,
        };
        server.write_config(hosts)?;
        // The server an earlier vimd started runs on: adopted, with today's configuration.
        let running = std::fs::read_to_string(dir.join("nats.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|p| serves(*p, &server.conf));
        let process = match running {
            Some(pid) => {
                tracing::info!(pid, "adopting the running nats-server");
                signal(pid, libc::SIGHUP)?;
                Process::Adopted(pid)
            }
            None => {
                // Whatever held the port before (a server being stopped) must let go first, or
                // the new server fails to bind and we would talk to the old.
                let free_by = std::time::Instant::now() + Duration::from_secs(15);
                while std::net::TcpListener::bind(listen).is_err() {
                    if std::time::Instant::now() > free_by {
                        anyhow::bail!("{listen} stays in use (another nats-server?)");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Process::Child(server.spawn()?)
            }
        };
        let n = EmbeddedNats {
            process: std::sync::Mutex::new(process),
            server,
        };
        // Ready when it accepts connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = n.connect().await {
                drop(c);
                break;
            }
            if let Some(st) = n.lock().exited(&n.server.conf) {
                anyhow::bail!(
                    "nats-server exited ({st}); see {}",
                    dir.join("nats.log").display()
                );
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("nats-server did not start within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Process> {
        crate::lock(&self.process)
    }

    /// Restarts the server if it died (it keeps its data: JetStream recovers from its store).
    pub fn supervise(&self) {
        let mut c = self.lock();
        if let Some(st) = c.exited(&self.server.conf) {
            tracing::error!(status = %st, "nats-server exited; restarting it");
            match self.server.spawn() {
                Ok(n) => *c = Process::Child(n),
                Err(e) => tracing::error!(error = %e, "cannot restart nats-server"),
            }
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// vimd's own connection.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        self.server.connect().await
    }

    /// Rewrites the users and tells the server to reload them.
    pub fn reload(&self, hosts: &[Host]) -> Result<()> {
        self.server.write_config(hosts)?;
        signal(self.lock().pid(), libc::SIGHUP)
    }
}

/// Signals our nats-server (SIGHUP: reload the configuration).
fn signal(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) on the nats-server vimd started or adopted (checked to be one).
    let r = unsafe { libc::kill(pid as i32, sig) };
    anyhow::ensure!(r == 0, "cannot signal nats-server {pid}");
    Ok(())
}

impl Server {
    fn spawn(&self) -> Result<Child> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))?;
        let mut cmd = Command::new("nats-server");
        cmd.arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid in the forked child before exec, async-signal-safe: a session of its
        // own, so the signals of vimd's terminal or process group do not reach the queue the
        // hosts' leases depend on.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
            .context("cannot start nats-server (is it installed? scripts/setup.sh installs it)")
    }

    /// vimd's own URL: a wildcard listen address is dialled on loopback (the certificate names
    /// addresses, never 0.0.0.0).
    fn url(&self) -> String {
        let dial = match self.listen.rsplit_once(':') {
            Some(("0.0.0.0" | "[::]" | "", port)) => format!("127.0.0.1:{port}"),
            _ => self.listen.clone(),
        };
        format!("nats://{dial}")
    }

    async fn connect(&self) -> Result<async_nats::Client> {
        let opts = async_nats::ConnectOptions::with_user_and_password(
            "vimd".into(),
            self.vimd_password.clone(),
        );
        Ok(vim_proto::nats_tls(opts, Some(&self.pki.ca_cert()))
            .connect(self.url())
            .await?)
    }

    fn write_config(&self, hosts: &[Host]) -> Result<()> {
        let conf = format!(
            "# Written by vimd; rewritten when hosts are added.\n\
             listen: \"{listen}\"\n\
             max_payload: 1MB\n\
             tls {{ cert_file: \"{cert}\", key_file: \"{key}\", timeout: 5 }}\n\
             pid_file: \"{pid}\"\n\
             jetstream {{ store_dir: \"{store}\" }}\n{accounts}",
            pid = self.dir.join("nats.pid").display(),
            listen = self.listen,
            cert = self.pki.server_cert().display(),
            key = self.pki.server_key().display(),
            store = self.dir.join("jetstream").display(),
            accounts = accounts("vimd", &self.vimd_password_hash, hosts),
        );
        Ok(crate::files::replace_private(&self.conf, conf.as_bytes())?)
    }
}

/// The NATS users, in one account with JetStream: vimd (as `vimd_user`) with every right, and
/// each host restricted to its own subjects (see [`host_user`]). Passwords appear only as bcrypt
/// hashes (nats-server checks a password against a `$2…` hash), so the file reveals none.
fn accounts(vimd_user: &str, vimd_password_hash: &str, hosts: &[Host]) -> String {
    let mut users = vec![format!(
        "      {{ user: \"{vimd_user}\", password: \"{vimd_password_hash}\" }}"
    )];
    for h in hosts {
        users.push(host_user(h));
    }
    format!(
        "accounts {{\n  VIM {{\n    jetstream: enabled\n    users: [\n{}\n    ]\n  }}\n}}\n",
        users.join("\n")
    )
}

/// For an external NATS server or cluster: the `accounts` block its configuration includes
/// (`include "accounts.conf"` on every node), rewritten when hosts are added. The operator's
/// tooling reloads the nodes when it changes (`nats-server --signal reload`, or SIGHUP), as
/// vimd does with its embedded server.
pub struct AccountsFile {
    pub path: PathBuf,
    /// vimd's own user (from `--nats-credentials`) and its password's hash.
    pub user: String,
    password_hash: String,
}

impl AccountsFile {
    pub fn new(path: PathBuf, user: String, password: &str) -> Result<AccountsFile> {
        Ok(AccountsFile {
            path,
            user,
            password_hash: crate::auth::hash_password(password)?,
        })
    }

    pub fn write(&self, hosts: &[Host]) -> Result<()> {
        let text = format!(
            "# Written by vimd; rewritten when hosts are added. Include it in every NATS node's\n\
             # configuration and reload the nodes when it changes.\n{}",
            accounts(&self.user, &self.password_hash, hosts)
        );
        crate::files::replace_private(&self.path, text.as_bytes()).with_context(|| {
            format!(
                "cannot write the NATS accounts file {}",
                self.path.display()
            )
        })
    }
}

/// A host's NATS user: it may publish its heartbeats and events, pull from its own command
/// consumer and ack those messages, and receive replies only on its own inbox prefix.
fn host_user(h: &Host) -> String {
    let id = &h.id;
    let consumer = s::host_consumer(id);
    let publish = [
        s::heartbeat(id),
        s::host_events(id),
        s::host_dead_letter(id),
        format!("$JS.API.CONSUMER.MSG.NEXT.{}.{consumer}", s::COMMAND_STREAM),
        format!("$JS.API.CONSUMER.INFO.{}.{consumer}", s::COMMAND_STREAM),
        format!("$JS.API.STREAM.INFO.{}", s::COMMAND_STREAM),
        // Its lease: renewals on its own subject, and the stream's description (the length).
        s::lease(id),
        format!("$JS.API.STREAM.INFO.{}", s::LEASE_STREAM),
        format!("$JS.ACK.{}.{consumer}.>", s::COMMAND_STREAM),
        "$JS.API.INFO".to_string(),
    ];
    let quoted = |v: &[String]| {
        v.iter()
            .map(|x| format!("\"{x}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "      {{ user: \"{}\", password: \"{}\", permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"{}.>\"] }} }} }}",
        h.nats_user,
        h.nats_password_hash,
        quoted(&publish),
        s::inbox_prefix(id),
    )
}

/// How much each stream may hold: every stream is bounded, so nobody who may publish can fill
/// vimd's disk. Streams that hosts write (events, dead letters) are bounded per subject too, and
/// each host writes only its own subject, so a host that floods fills only its own share (the
/// oldest of its own messages go first).
pub const STREAM_MAX_BYTES: i64 = 1 << 30;
pub const DEAD_LETTER_MAX_BYTES: i64 = 256 << 20;
pub const LEASE_MAX_BYTES: i64 = 64 << 20;
/// Per host subject: events waiting for vimd, and dead letters kept.
pub const EVENTS_PER_HOST: i64 = 100_000;
pub const DEAD_LETTERS_PER_SUBJECT: i64 = 1_000;
/// A message older than this is dropped: a job or command that old has long been sent again
/// by the reconciler, which works from the database.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The streams' configurations.
/// `lease_ms` is the hosts' lease (docs/failover.md), which the lease stream's description hands
/// to the agents.
pub fn stream_configs(replicas: usize, lease_ms: u64) -> Vec<stream::Config> {
    let work = |name: &str, subjects: Vec<String>| stream::Config {
        name: name.into(),
        subjects,
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: DEDUP_WINDOW,
        max_bytes: STREAM_MAX_BYTES,
        max_age: STREAM_MAX_AGE,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    vec![
        work(s::JOB_STREAM, vec![s::JOBS.into()]),
        work(s::COMMAND_STREAM, vec![s::ALL_HOST_COMMANDS.into()]),
        stream::Config {
            max_messages_per_subject: EVENTS_PER_HOST,
            ..work(s::EVENT_STREAM, vec![s::ALL_HOST_EVENTS.into()])
        },
        stream::Config {
            name: s::DEAD_LETTER_STREAM.into(),
            subjects: vec![s::DEAD_LETTER.into(), s::ALL_HOST_DEAD_LETTERS.into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_age: STREAM_MAX_AGE,
            max_bytes: DEAD_LETTER_MAX_BYTES,
            max_messages_per_subject: DEAD_LETTERS_PER_SUBJECT,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        },
        // The newest renewal of each host's lease, nothing older.
        stream::Config {
            name: s::LEASE_STREAM.into(),
            description: Some(vim_proto::lease_description(lease_ms)),
            subjects: vec![s::ALL_LEASES.into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_bytes: LEASE_MAX_BYTES,
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        },
    ]
}

/// Declares the streams (idempotent); a stream made by an older vimd gets today's limits.
pub async fn declare_streams(
    js: &jetstream::Context,
    replicas: usize,
    lease_ms: u64,
) -> Result<()> {
    let configs = stream_configs(replicas, lease_ms);
    let reserved: i64 = configs.iter().map(|c| c.max_bytes).sum();
    for want in configs {
        let name = want.name.clone();
        let mut st = js.get_or_create_stream(want.clone()).await.map_err(|e| {
            // JetStream reserves each stream's limit up front, against the store's free space.
            anyhow::anyhow!(
                "stream {name}: {e} (vimd's streams reserve {} MiB of JetStream file storage)",
                reserved >> 20
            )
        })?;
        let have = st
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("stream {name}: {e}"))?
            .config
            .clone();
        let same = have.subjects == want.subjects
            && have.max_bytes == want.max_bytes
            && have.max_age == want.max_age
            && have.max_messages_per_subject == want.max_messages_per_subject
            && have.discard == want.discard
            && have.description == want.description;
        if !same {
            tracing::info!(stream = name, "updating the stream's subjects and limits");
            js.update_stream(want)
                .await
                .map_err(|e| anyhow::anyhow!("stream {name}: cannot update: {e}"))?;
        }
    }
    Ok(())
}

/// A durable pull consumer with explicit acks: a message is redelivered if its handler dies
/// before acking, after `ack_wait`.
pub fn pull_config(name: &str, filter: &str, ack_wait: Duration) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.into()),
        filter_subject: filter.into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        ..Default::default()
    }
}

/// Creates the command consumer of a host (vimd does it, so the host's user needs no right to).
/// Deletes a removed host's command consumer (its undelivered commands go with it).
pub async fn delete_host_consumer(js: &jetstream::Context, host_id: &str) -> Result<()> {
    let stream = js
        .get_stream(s::COMMAND_STREAM)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    stream
        .delete_consumer(&s::host_consumer(host_id))
        .await
        .map_err(|e| anyhow::anyhow!("consumer for host {host_id}: {e}"))?;
    Ok(())
}

pub async fn declare_host_consumer(js: &jetstream::Context, host_id: &str) -> Result<()> {
    declare_host_consumers(js, &[host_id.to_string()]).await
}

/// [`declare_host_consumer`] for many hosts (vimd's start), 32 requests in flight: one at a
/// time, 10,000 hosts kept vimd from serving for 80 s. Tried again for up to 5 s: these follow a
/// rewrite of the NATS users, and while nats-server reloads them (SIGHUP; 0.2 s with 10,000
/// users) the account's JetStream answers "resource does not exist".
pub async fn declare_host_consumers(js: &jetstream::Context, hosts: &[String]) -> Result<()> {
    let mut tries = 0;
    loop {
        match try_declare_host_consumers(js, hosts).await {
            Ok(()) => return Ok(()),
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!(error = %e, "JetStream not ready after a reload; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_declare_host_consumers(js: &jetstream::Context, hosts: &[String]) -> Result<()> {
    let stream = js
        .get_stream(s::COMMAND_STREAM)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for chunk in hosts.chunks(32) {
        futures::future::try_join_all(chunk.iter().map(|h| host_consumer(&stream, h))).await?;
    }
    Ok(())
}

async fn host_consumer(stream: &jetstream::stream::Stream, host_id: &str) -> Result<()> {
    stream
        .get_or_create_consumer(
            &s::host_consumer(host_id),
            pull_config(
                &s::host_consumer(host_id),
                &s::host_commands(host_id),
                Duration::from_secs(30),
            ),
        )
        .await
        .map_err(|e| anyhow::anyhow!("consumer for host {host_id}: {e}"))?;
    Ok(())
}
