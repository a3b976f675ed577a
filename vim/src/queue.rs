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

/// A `nats-server` child of vimd.
pub struct EmbeddedNats {
    server: Server,
    child: std::sync::Mutex<Child>,
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
        // A previous vimd's server may still be shutting down (it gets SIGTERM when its vimd
        // dies): wait for the port, or the new server fails to bind and we would talk to the old.
        let free_by = std::time::Instant::now() + Duration::from_secs(15);
        while std::net::TcpListener::bind(listen).is_err() {
            if std::time::Instant::now() > free_by {
                anyhow::bail!("{listen} stays in use (another nats-server?)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let n = EmbeddedNats {
            child: std::sync::Mutex::new(server.spawn()?),
            server,
        };
        // Ready when it accepts connections.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = n.connect().await {
                drop(c);
                break;
            }
            if let Ok(Some(st)) = n.lock().try_wait() {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        crate::lock(&self.child)
    }

    /// Restarts the server if it died (it keeps its data: JetStream recovers from its store).
    pub fn supervise(&self) {
        let mut c = self.lock();
        if let Ok(Some(st)) = c.try_wait() {
            tracing::error!(status = %st, "nats-server exited; restarting it");
            match self.server.spawn() {
                Ok(n) => *c = n,
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
        // SAFETY: kill(2) with our own child's pid and SIGHUP (nats-server reloads its config).
        let r = unsafe { libc::kill(self.lock().id() as i32, libc::SIGHUP) };
        anyhow::ensure!(r == 0, "cannot signal nats-server to reload");
        Ok(())
    }
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
        // SAFETY: prctl in the forked child before exec, async-signal-safe: the server goes when
        // vimd goes, even on SIGKILL, so a restarted vimd finds its port free.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
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
             jetstream {{ store_dir: \"{store}\" }}\n{accounts}",
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

impl Drop for EmbeddedNats {
    fn drop(&mut self) {
        let mut c = self.lock();
        let _ = c.kill();
        let _ = c.wait();
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
/// Per host subject: events waiting for vimd, and dead letters kept.
pub const EVENTS_PER_HOST: i64 = 100_000;
pub const DEAD_LETTERS_PER_SUBJECT: i64 = 1_000;
/// A message older than this is dropped: a job or command that old has long been sent again
/// by the reconciler, which works from the database.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The streams' configurations.
pub fn stream_configs(replicas: usize) -> Vec<stream::Config> {
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
    ]
}

/// Declares the streams (idempotent); a stream made by an older vimd gets today's limits.
pub async fn declare_streams(js: &jetstream::Context, replicas: usize) -> Result<()> {
    let configs = stream_configs(replicas);
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
            && have.discard == want.discard;
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
pub async fn declare_host_consumer(js: &jetstream::Context, host_id: &str) -> Result<()> {
    let stream = js
        .get_stream(s::COMMAND_STREAM)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
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
