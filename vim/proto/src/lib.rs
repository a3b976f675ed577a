//! The wire protocol between the VIM (`vimd`) and the host agents (`vim-agent`): protobuf messages
//! (prost) and the NATS subjects and JetStream streams they travel on. `docs/protocol.md` describes
//! the same in prose. Every message carries [`PROTOCOL_VERSION`]; a receiver refuses other majors.

/// Bumped on incompatible changes; receivers refuse messages of another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// The servers of a NATS URL as command lines take it: one (`nats://host:4222`) or a cluster's,
/// separated by commas (`nats://a:4222,nats://b:4222`); the client fails over between them.
pub fn nats_servers(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Client options that trust `ca` (a PEM file: vimd's private CA, `STATE_DIR/tls/ca.pem`, which
/// `host add` hands out) and insist on TLS; without a CA, the options unchanged (a plaintext
/// server, or one whose certificate the system's roots verify).
#[cfg(feature = "nats")]
pub fn nats_tls(
    opts: async_nats::ConnectOptions,
    ca: Option<&std::path::Path>,
) -> async_nats::ConnectOptions {
    match ca {
        Some(ca) => opts
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true),
        None => opts,
    }
}

/// Ids and names that become paths, NATS subjects or NATS user names: host ids, VM ids, image
/// and token names. One format for all of them, checked by this one function in vimd and in the
/// agent before an id touches a path: 1-63 ASCII letters, digits, '-' or '_' (so never empty,
/// never `.`/`..`, never a `/`, and never a NATS wildcard or separator).
pub fn check_id(what: &str, s: &str) -> Result<(), BadId> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(BadId(format!(
            "{what} {:?}: 1-63 letters, digits, '-' or '_'",
            s.chars().take(80).collect::<String>()
        )))
    }
}

/// An id or name not of [`check_id`]'s format (the message says which and why).
#[derive(Debug, Clone, PartialEq)]
pub struct BadId(pub String);

impl std::fmt::Display for BadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadId {}

/// Moves an undecodable message to the dead-letter stream, on `subject_to` (vimd:
/// [`subjects::DEAD_LETTER`]; a host: [`subjects::host_dead_letter`], the only one it may
/// publish to), with where it came from and why (headers `Vim-Original-Subject`, `Vim-Reason`),
/// so it is kept and logged but never retried.
#[cfg(feature = "nats")]
pub async fn dead_letter(
    js: &async_nats::jetstream::Context,
    subject_to: &str,
    subject: &str,
    payload: &[u8],
    why: &str,
) {
    tracing::warn!(subject, why, "dead-lettering a message");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Vim-Original-Subject", subject);
    headers.insert("Vim-Reason", why.replace(['\r', '\n'], " ").as_str());
    match js
        .publish_with_headers(subject_to.to_string(), headers, payload.to_vec().into())
        .await
    {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::error!(error = %e, "dead letter not stored");
            }
        }
        Err(e) => tracing::error!(error = %e, "dead letter not published"),
    }
}

/// NATS subjects and JetStream names.
pub mod subjects {
    /// Stream of commands for all hosts (work queue; one durable consumer per host, filtered to
    /// that host's subject).
    pub const COMMAND_STREAM: &str = "VIM_COMMANDS";
    /// Commands for one host.
    pub fn host_commands(host_id: &str) -> String {
        format!("vim.host.{host_id}.cmd")
    }
    /// Every host's command subject (the stream's filter).
    pub const ALL_HOST_COMMANDS: &str = "vim.host.*.cmd";
    /// Stream of API jobs for vimd workers (work queue, one shared durable consumer).
    pub const JOB_STREAM: &str = "VIM_JOBS";
    pub const JOBS: &str = "vim.jobs";
    /// Agents publish heartbeats (with their VM reports) here; core NATS, not stored: the next one
    /// replaces a lost one.
    pub fn heartbeat(host_id: &str) -> String {
        format!("vim.hb.{host_id}")
    }
    pub const ALL_HEARTBEATS: &str = "vim.hb.*";
    /// Agents report command results and VM events here (stream, so vimd never misses one).
    pub const EVENT_STREAM: &str = "VIM_EVENTS";
    pub fn host_events(host_id: &str) -> String {
        format!("vim.ev.{host_id}")
    }
    pub const ALL_HOST_EVENTS: &str = "vim.ev.*";
    /// Where vimd moves messages that cannot be decoded, with the reason in a header.
    pub const DEAD_LETTER: &str = "vim.dead";
    /// Where a host moves the commands it cannot decode: its own subject of the dead-letter
    /// stream, which keeps a bounded number per subject, so a host can fill only its own share.
    pub fn host_dead_letter(host_id: &str) -> String {
        format!("vim.dead.{host_id}")
    }
    pub const ALL_HOST_DEAD_LETTERS: &str = "vim.dead.*";
    /// Sender of a message on a per-host subject (`vim.ev.H`, `vim.hb.H`): the host id, which
    /// NATS permissions guarantee is the publisher's own.
    pub fn sender<'a>(subject: &'a str, prefix: &str) -> Option<&'a str> {
        subject
            .strip_prefix(prefix)?
            .strip_prefix('.')
            .filter(|h| !h.is_empty() && !h.contains('.'))
    }
    pub const EVENTS_PREFIX: &str = "vim.ev";
    pub const HEARTBEATS_PREFIX: &str = "vim.hb";
    pub const DEAD_LETTER_STREAM: &str = "VIM_DEAD";
    /// The durable consumer names.
    pub const JOB_CONSUMER: &str = "vimd-workers";
    pub fn host_consumer(host_id: &str) -> String {
        format!("agent-{host_id}")
    }
    pub const EVENT_CONSUMER: &str = "vimd-events";
    /// The inbox prefix a host's connection must use: its replies arrive there, and only there
    /// may it subscribe.
    pub fn inbox_prefix(host_id: &str) -> String {
        format!("_INBOX_{host_id}")
    }
}

/// What a VM is built from, as the agent needs it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmSpec {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(uint32, tag = "2")]
    pub vcpus: u32,
    #[prost(uint64, tag = "3")]
    pub memory_mib: u64,
    /// Paths on shared storage.
    #[prost(string, tag = "4")]
    pub kernel: String,
    #[prost(string, tag = "5")]
    pub initrd: String,
    #[prost(string, tag = "6")]
    pub cmdline: String,
    #[prost(string, tag = "7")]
    pub disk: String,
}

/// A command for one host's agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostCommand {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The job this command belongs to: the agent's idempotency key.
    #[prost(string, tag = "2")]
    pub job_id: String,
    #[prost(oneof = "host_command::Action", tags = "10, 11, 12, 13, 14")]
    pub action: Option<host_command::Action>,
}

pub mod host_command {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Action {
        /// Create and start.
        #[prost(message, tag = "10")]
        Create(super::VmSpec),
        #[prost(string, tag = "11")]
        Start(String),
        /// Graceful power-off (ACPI button), forced after the timeout.
        #[prost(message, tag = "12")]
        Stop(super::StopVm),
        #[prost(string, tag = "13")]
        Delete(String),
        #[prost(string, tag = "14")]
        Info(String),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopVm {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(uint64, tag = "2")]
    pub timeout_ms: u64,
}

/// One VM as the agent sees it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmReport {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    /// "running", "stopped", "failed".
    #[prost(string, tag = "2")]
    pub state: String,
    #[prost(uint32, tag = "3")]
    pub pid: u32,
    /// CPU time of the VM's vCPU threads since the last report, in percent of one core (the
    /// guest's use: 200 is two vCPUs busy).
    #[prost(double, tag = "4")]
    pub cpu_pct: f64,
    /// Resident memory of the VMM process (guest memory it touched, plus its own).
    #[prost(uint64, tag = "5")]
    pub rss_kib: u64,
    /// CPU time of the VMM's other threads (devices, API): its overhead, same unit.
    #[prost(double, tag = "6")]
    pub vmm_cpu_pct: f64,
    /// Memory the guest has handed back through its balloon (0 without one).
    #[prost(uint64, tag = "7")]
    pub balloon_mib: u64,
}

/// What an agent says about its host, every heartbeat interval.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub host_id: String,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(string, tag = "4")]
    pub hostname: String,
    #[prost(uint32, tag = "5")]
    pub cpu_cores: u32,
    #[prost(uint64, tag = "6")]
    pub memory_mib: u64,
    #[prost(string, tag = "7")]
    pub agent_version: String,
    #[prost(message, repeated, tag = "8")]
    pub vms: Vec<VmReport>,
    /// The host's address: the one it reaches NATS from (migration and consoles use it).
    #[prost(string, tag = "9")]
    pub address: String,
}

/// An agent's answer to a command, or an event it noticed (a VMM that exited).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostEvent {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub host_id: String,
    /// Set when this answers a command.
    #[prost(string, tag = "3")]
    pub job_id: String,
    #[prost(bool, tag = "4")]
    pub ok: bool,
    #[prost(string, tag = "5")]
    pub error: String,
    /// "VM_Created", "VM_Started", "VM_Stopped", "VM_Deleted", "VM_Failure", "VM_Info".
    #[prost(string, tag = "6")]
    pub kind: String,
    #[prost(message, optional, tag = "7")]
    pub vm: Option<VmReport>,
}

/// A job for the vimd workers: the API wrote it to the database, then published its id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Job {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub job_id: String,
}

/// Decoding with the version check every receiver needs.
pub trait Versioned: prost::Message + Default + Sized {
    fn version(&self) -> u32;

    fn decode_checked(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m = Self::decode(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if m.version() != PROTOCOL_VERSION {
            return Err(DecodeError::Version(m.version()));
        }
        Ok(m)
    }
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn version(&self) -> u32 {
                self.version
            }
        }
    )*};
}
versioned!(HostCommand, Heartbeat, HostEvent, Job);

#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    Malformed(String),
    Version(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed protobuf: {e}"),
            DecodeError::Version(v) => write!(
                f,
                "protocol version {v}, this build speaks {PROTOCOL_VERSION}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn ids_are_one_format() {
        for good in ["h1", "a-b_C", &"x".repeat(63)] {
            assert!(check_id("id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "/abs",
            "a/b",
            "a.b",
            "a*",
            "a>",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(check_id("id", bad).is_err(), "{bad}");
        }
        assert_eq!(
            subjects::sender("vim.ev.h1", subjects::EVENTS_PREFIX),
            Some("h1")
        );
        assert_eq!(subjects::sender("vim.ev.", subjects::EVENTS_PREFIX), None);
        assert_eq!(
            subjects::sender("vim.ev.a.b", subjects::EVENTS_PREFIX),
            None
        );
        assert_eq!(subjects::sender("vim.hb.h1", subjects::EVENTS_PREFIX), None);
    }

    #[test]
    fn round_trip_and_refusals() {
        let c = HostCommand {
            version: PROTOCOL_VERSION,
            job_id: "j1".into(),
            action: Some(host_command::Action::Stop(StopVm {
                vm_id: "vm1".into(),
                timeout_ms: 5,
            })),
        };
        let bytes = c.encode_to_vec();
        assert_eq!(HostCommand::decode_checked(&bytes).unwrap(), c);
        assert!(matches!(
            HostCommand::decode_checked(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        let old = HostCommand {
            version: 9,
            ..c.clone()
        };
        assert_eq!(
            HostCommand::decode_checked(&old.encode_to_vec()),
            Err(DecodeError::Version(9))
        );
    }
}
