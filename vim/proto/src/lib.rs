//! The wire protocol between the VIM (`vimd`) and the host agents (`vim-agent`): protobuf messages
//! and enums (`proto/vim.proto`, built by prost) and the NATS subjects and JetStream streams they
//! travel on. `docs/protocol.md` describes
//! the same in prose. Every message carries [`PROTOCOL_VERSION`]; a receiver refuses other majors.

/// Bumped on incompatible changes; receivers refuse messages of another version.
pub const PROTOCOL_VERSION: u32 = 2;

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
    /// Agents renew their leases here (stream `LEASE_STREAM`, the newest kept per host); the
    /// stream's description carries the lease vimd sets (`lease_ms=N`).
    pub const LEASE_STREAM: &str = "VIM_LEASES";
    pub fn lease(host_id: &str) -> String {
        format!("vim.lease.{host_id}")
    }
    pub const ALL_LEASES: &str = "vim.lease.*";
    pub const LEASES_PREFIX: &str = "vim.lease";
    /// The inbox prefix a host's connection must use: its replies arrive there, and only there
    /// may it subscribe.
    pub fn inbox_prefix(host_id: &str) -> String {
        format!("_INBOX_{host_id}")
    }
}

// The messages and enums, generated from `proto/vim.proto` by `build.rs`.
include!(concat!(env!("OUT_DIR"), "/vim.v2.rs"));

/// A state or kind name that is not one of the enum's.
#[derive(Debug, Clone, PartialEq)]
pub struct UnknownName(pub String);

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unknown name {:?}", self.0)
    }
}

impl std::error::Error for UnknownName {}

#[doc(hidden)]
pub use serde as __serde;

/// One table for an enum's names in the database, the REST API, the event log and JSON (the
/// protobuf wire carries the numbers): `as_str`, `FromStr` and serde all read it, so they never
/// disagree. Used here for the protocol's enums and in vimd for its own (job kinds and states,
/// host states).
#[macro_export]
macro_rules! names {
    ($t:ty { $($v:ident => $n:literal),* $(,)? }) => {
        impl $t {
            pub const ALL: &'static [$t] = &[$(<$t>::$v),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(<$t>::$v => $n,)*
                }
            }
        }

        impl std::str::FromStr for $t {
            type Err = $crate::UnknownName;
            fn from_str(s: &str) -> Result<Self, $crate::UnknownName> {
                match s {
                    $($n => Ok(<$t>::$v),)*
                    _ => Err($crate::UnknownName(s.chars().take(64).collect())),
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::__serde::Serialize for $t {
            fn serialize<S: $crate::__serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> $crate::__serde::Deserialize<'de> for $t {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as $crate::__serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as $crate::__serde::de::Error>::custom)
            }
        }
    };
}

names!(VmState {
    Unspecified => "unspecified",
    Creating => "creating",
    Running => "running",
    Stopped => "stopped",
    Failed => "failed",
    Deleted => "deleted",
    Pending => "pending",
    Unknown => "unknown",
    Migrating => "migrating",
    Incoming => "incoming",
    PendingRestart => "pending_restart",
    Suspended => "suspended",
    PendingResume => "pending_resume",
    Standby => "standby",
});

names!(EventKind {
    Unspecified => "Unspecified",
    VmCreated => "VM_Created",
    VmStarted => "VM_Started",
    VmStopped => "VM_Stopped",
    VmDeleted => "VM_Deleted",
    VmInfo => "VM_Info",
    VmFailure => "VM_Failure",
    CommandRefused => "Command_Refused",
    CommandFailed => "Command_Failed",
    VmIncomingReady => "VM_Incoming_Ready",
    VmMigrated => "VM_Migrated",
    VmIncomingAborted => "VM_Incoming_Aborted",
    VmMigrationProgress => "VM_Migration_Progress",
    VmEvicted => "VM_Evicted",
    HostSelfFenced => "Host_Self_Fenced",
    VmResized => "VM_Resized",
    ScaleUpRequested => "Scale_Up_Requested",
    ScaleDownRequested => "Scale_Down_Requested",
    VmScalingSet => "VM_Scaling_Set",
    JobSent => "Job_Sent",
    JobFailed => "Job_Failed",
    HostRegistered => "Host_Registered",
    PsReachable => "PS_Reachable",
    PsTimeout => "PS_Timeout",
    PsUnreachable => "PS_Unreachable",
    VmMigrating => "VM_Migrating",
    VmMigrationFailed => "VM_Migration_Failed",
    HostFenced => "Host_Fenced",
    VmFailoverStarted => "VM_Failover_Started",
    VmRestarted => "VM_Restarted",
    VmFailoverFailed => "VM_Failover_Failed",
    FailoverSuspended => "Failover_Suspended",
    ScalingRefused => "Scaling_Refused",
    VmSuspended => "VM_Suspended",
    VmResumed => "VM_Resumed",
    VmResumeWaiting => "VM_Resume_Waiting",
    VmIdle => "VM_Idle",
    RebalancePlanned => "Rebalance_Planned",
    UsageStarted => "Usage_Started",
    UsageChanged => "Usage_Changed",
    UsageFinished => "Usage_Finished",
    VmUnreachable => "VM_Unreachable",
    VmReachable => "VM_Reachable",
    SlaViolated => "SLA_Violated",
    VmCheckpointUnusable => "VM_Checkpoint_Unusable",
    VmCheckpointsSet => "VM_Checkpoints_Set",
    VmStandbyReady => "VM_Standby_Ready",
});

impl VmState {
    /// The states an agent may report a VM in.
    pub fn reportable(self) -> bool {
        matches!(
            self,
            VmState::Creating
                | VmState::Running
                | VmState::Stopped
                | VmState::Failed
                | VmState::Deleted
                | VmState::Incoming
                | VmState::Suspended
                | VmState::Standby
        )
    }
}

impl EventKind {
    /// Kinds an agent may send; the rest are vimd's own.
    pub fn from_agent(self) -> bool {
        matches!(
            self,
            EventKind::VmCreated
                | EventKind::VmStarted
                | EventKind::VmStopped
                | EventKind::VmDeleted
                | EventKind::VmInfo
                | EventKind::VmFailure
                | EventKind::CommandRefused
                | EventKind::CommandFailed
                | EventKind::VmIncomingReady
                | EventKind::VmMigrated
                | EventKind::VmIncomingAborted
                | EventKind::VmMigrationProgress
                | EventKind::VmEvicted
                | EventKind::HostSelfFenced
                | EventKind::VmResized
                | EventKind::ScaleUpRequested
                | EventKind::ScaleDownRequested
                | EventKind::VmScalingSet
                | EventKind::VmCheckpointsSet
                | EventKind::VmStandbyReady
                | EventKind::VmSuspended
                | EventKind::VmResumed
                | EventKind::VmUnreachable
                | EventKind::VmReachable
        )
    }
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
versioned!(HostCommand, Heartbeat, HostEvent, Job, LeaseRenewal);

/// The lease vimd sets, as the lease stream's description carries it to the agents: they read
/// it there, so it reaches them while vimd is down too. `0` means no failover: hosts hold no
/// lease and never fence themselves.
pub fn lease_description(lease_ms: u64) -> String {
    format!("lease_ms={lease_ms}")
}

/// The lease in a lease stream's description (`None`: not one vimd wrote).
pub fn parse_lease_description(d: &str) -> Option<u64> {
    d.strip_prefix("lease_ms=")?.parse().ok()
}

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
    fn names_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(*k));
        }
        for s in VmState::ALL {
            assert_eq!(s.as_str().parse::<VmState>(), Ok(*s));
        }
        assert!("VM_Exploded".parse::<EventKind>().is_err());
        assert!(!EventKind::PsTimeout.from_agent());
        assert!(VmState::Running.reportable() && !VmState::Pending.reportable());
    }

    #[test]
    fn a_version_1_message_is_refused_by_its_version() {
        // v1's HostEvent: version 1, kind "VM_Failure" as a string in field 6.
        let mut v1 = vec![0x08, 0x01, 0x32, 10];
        v1.extend_from_slice(b"VM_Failure");
        assert_eq!(HostEvent::decode_checked(&v1), Err(DecodeError::Version(1)));
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
