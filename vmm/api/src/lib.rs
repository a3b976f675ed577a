//! The VMM's control API, typed: the requests `vmm run --api-socket` accepts, the results it
//! answers with, and a client. The server (`vmm`), `vmm ctl` and the host agent all use these
//! types, so the wire format (newline-delimited JSON, `docs/api.md`) is written down once.

mod client;
pub mod lease;
mod mac;

pub use client::{Client, ClientError};
pub use mac::{BadMac, Mac};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default grace period between the power button and a forced stop.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Live migration: the longest pause the guest should see.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Live migration: pre-copy rounds before the final stop-and-copy, at most.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Live migration: how long the target has to claim and resume the VM once it is handed over.
pub const DEFAULT_HANDOVER_TIMEOUT_MS: u64 = 10_000;

/// What `vmm run --incoming DIR` prints on stderr (followed by DIR) once it waits for a
/// handover: a supervisor that started it waits for this line, not a fixed time.
pub const INCOMING_READY_LINE: &str = "vmm: waiting for a handover in ";

/// The file of a snapshot directory that holds everything but memory, written last: a directory
/// without it holds no usable snapshot.
pub const SNAPSHOT_STATE_FILE: &str = "state.bin";
/// Live migration: who runs the guest (made exclusively by the target or the source), the
/// target's word that the guest runs there, and the target's reason for giving it back.
pub const MIGRATION_CLAIM_FILE: &str = "claimed";
pub const MIGRATION_RESUMED_FILE: &str = "resumed";
pub const MIGRATION_FAILED_FILE: &str = "failed";
/// The file of a snapshot (or migration) directory that holds guest memory.
pub const SNAPSHOT_MEMORY_FILE: &str = "memory.bin";

/// The file a live-migration target writes in the migration directory once it sees the source
/// copying (it looks often from then on). Its supervisor removes it after stopping a target
/// that never took the VM.
pub const WATCHING_FILE: &str = "watching";

/// What the VMM says (after the disk's path) when another VMM holds the disk's lock. After a
/// host fails, its lock on shared storage can outlive it for a while (an NFS server keeps a
/// vanished client's locks until that client's lease there runs out): vimd recognises this
/// failure of a restart and tries again.
pub const DISK_IN_USE: &str = "is in use by another VMM (it holds the image's lock)";

/// Longest request line the server reads; a longer one is refused and the connection closed.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Exit status of a VMM one of whose threads made a system call its seccomp filter forbids
/// (128 + SIGSYS, as a shell reports a process killed by it); the last `vmm: seccomp:` line of
/// its stderr names the thread and the call.
pub const SECCOMP_EXIT: i32 = 159;

/// One request. On the wire: `{"command":"<kebab-case name>", ...fields}`; unknown and
/// duplicate fields are refused, so a typo never passes silently.
///
/// Variants without fields are written `Info {}` so that `deny_unknown_fields` applies to them
/// too (serde ignores extra fields of a unit variant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The VM's state and configuration: [`Info`].
    Info {},
    /// Every vCPU leaves `KVM_RUN` and waits: [`StateChanged`].
    Pause {},
    /// [`StateChanged`].
    Resume {},
    /// ACPI power button, then a forced stop after `timeout_ms`: [`Stopped`].
    Shutdown {
        #[serde(default = "default_shutdown_timeout")]
        timeout_ms: u64,
    },
    /// Balloon target size in MiB: [`BalloonTarget`].
    BalloonSet { mib: u64 },
    /// Fresh statistics from the guest: [`BalloonStats`].
    BalloonStats {},
    /// Save the paused VM to a directory: [`SnapshotDone`].
    Snapshot { dir: PathBuf },
    /// Live-migrate through a directory on shared storage: [`MigrationOutcome`].
    Migrate {
        dir: PathBuf,
        #[serde(default = "default_downtime")]
        downtime_ms: u64,
        #[serde(default = "default_max_rounds")]
        max_rounds: u32,
        #[serde(default = "default_handover_timeout")]
        timeout_ms: u64,
    },
    /// Stop a running migration; the guest keeps running here: [`Cancelling`].
    MigrateCancel {},
    /// Write a consistent checkpoint of the running VM (memory, device state and a
    /// point-in-time copy of its writable disks) into the directory, incrementally after the
    /// first, keeping the last two complete (docs/checkpoint.md): [`CheckpointDone`].
    Checkpoint { dir: PathBuf },
    /// Change a running VM's size: vCPUs by ACPI hotplug (docs/hotplug.md). Answered once the
    /// guest has taken the new vCPUs or ejected the removed ones, or with an error saying how far
    /// it got after `timeout_ms`: [`Resized`].
    Resize {
        #[serde(default)]
        vcpus: Option<u32>,
        #[serde(default)]
        memory_mib: Option<u64>,
        #[serde(default = "default_resize_timeout")]
        timeout_ms: u64,
    },
    /// A standby VMM (`vmm restore --checkpoint DIR --standby`, docs/standby.md) takes the
    /// newest usable checkpoint, rolls the disks back to it and runs the guest: [`Promoted`].
    Promote {},
}

/// How long a resize waits for the guest to take or give back vCPUs.
pub const DEFAULT_RESIZE_TIMEOUT_MS: u64 = 10_000;

fn default_resize_timeout() -> u64 {
    DEFAULT_RESIZE_TIMEOUT_MS
}

fn default_shutdown_timeout() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_MS
}
fn default_downtime() -> u64 {
    DEFAULT_DOWNTIME_MS
}
fn default_max_rounds() -> u32 {
    DEFAULT_MAX_ROUNDS
}
fn default_handover_timeout() -> u64 {
    DEFAULT_HANDOVER_TIMEOUT_MS
}

impl Request {
    /// Parses one request line; the error is the message the caller gets back.
    pub fn parse(line: &str) -> Result<Request, String> {
        // serde's messages for these two say little ("expected ident"), so they are named first.
        match serde_json::from_str::<serde::de::IgnoredAny>(line) {
            Err(e) => return Err(format!("invalid JSON: {e}")),
            Ok(_) if !line.trim_start().starts_with('{') => {
                return Err("a request must be a JSON object".into())
            }
            Ok(_) => {}
        }
        let req: Request = serde_json::from_str(line)
            .map_err(|e| format!("invalid request: {}{e}", Self::culprit(line)))?;
        match &req {
            Request::Snapshot { dir }
            | Request::Migrate { dir, .. }
            | Request::Checkpoint { dir }
                if dir.as_os_str().is_empty() =>
            {
                Err("\"dir\" must be a path, not empty".into())
            }
            _ => Ok(req),
        }
    }

    /// `field "x": ` for the field whose value has the wrong type, or nothing. serde names no field
    /// in a type error of an internally tagged enum (it buffers the object first), so each field
    /// is tried alone with the command.
    fn culprit(line: &str) -> String {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(line) else {
            return String::new();
        };
        let command = map.get("command").cloned().unwrap_or_default();
        for (k, v) in map.iter().filter(|(k, _)| *k != "command") {
            let alone = serde_json::json!({ "command": command, k.as_str(): v });
            if let Err(e) = serde_json::from_value::<Request>(alone) {
                if e.to_string().starts_with("invalid") {
                    return format!("field \"{k}\": ");
                }
            }
        }
        String::new()
    }

    /// How long a client waits for the answer: the VMM answers a shutdown when the guest has
    /// stopped, a snapshot when memory is written, and a migration when it has ended.
    pub fn answer_within(&self) -> Duration {
        match self {
            Request::Shutdown { timeout_ms } => {
                Duration::from_millis(*timeout_ms) + Duration::from_secs(10)
            }
            Request::Snapshot { .. } | Request::Checkpoint { .. } | Request::Promote { .. } => {
                Duration::from_secs(600)
            }
            Request::Migrate { .. } => Duration::from_secs(24 * 3600),
            Request::Resize { timeout_ms, .. } => {
                Duration::from_millis(*timeout_ms) + Duration::from_secs(10)
            }
            _ => Duration::from_secs(10),
        }
    }
}

/// The wire form of a response: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success carrying `result` (one of this crate's result types).
    pub fn ok<T: Serialize>(result: &T) -> Self {
        match serde_json::to_value(result) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response::err(format!("cannot encode the answer: {e}")),
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"unencodable answer"}"#.to_vec());
        out.push(b'\n');
        out
    }
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    /// A standby VMM: it holds the guest's memory as of its newest checkpoint and follows
    /// each new one; no vCPU or device exists until `promote` (docs/standby.md).
    Standby,
}

/// How the guest was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    Pvh,
    Linux64,
    /// From a snapshot or a migration.
    Restored,
}

/// The answer to `info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub state: RunState,
    pub pid: u32,
    pub uptime_ms: u64,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot_protocol: BootProtocol,
    /// The validated configuration, as the VMM holds it (`vmm inspect` shows the same).
    pub config: serde_json::Value,
    /// Memory the guest has handed back (the driver's count, no round trip to the guest).
    #[serde(default)]
    pub balloon: Option<BalloonTarget>,
    /// A migration under way.
    #[serde(default)]
    pub migration: Option<MigrationProgress>,
    /// A standby: the checkpoint whose memory it holds (None: none loaded yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_seq: Option<u64>,
}

/// The answer to `pause` and `resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChanged {
    pub state: RunState,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopKind {
    /// The guest powered off after the button.
    Graceful,
    /// The timeout passed first.
    Forced,
}

/// The answer to `shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    pub stopped: StopKind,
}

/// A VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A finished resize.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resized {
    pub old: Size,
    pub new: Size,
    /// From the request to the guest having taken (or ejected) every vCPU.
    pub took_ms: f64,
}

/// The balloon's size: what the VMM asked for and what the guest holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BalloonTarget {
    pub target_mib: u64,
    /// Absent in the answer to `balloon-set` (the guest has not answered yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_mib: Option<u64>,
    /// In `info`: the share of its memory the guest uses (total minus available), from its
    /// latest statistics report if that is recent (`vmm run --balloon-stats-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_pct: Option<f64>,
}

/// The guest's last statistics report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemoryStats {
    /// Reports received so far.
    pub reports: u64,
    /// `free_memory`, `available_memory`, `total_memory`, `major_faults`, … in bytes or counts.
    pub values: BTreeMap<String, u64>,
}

/// The answer to `balloon-stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub target_mib: u64,
    pub actual_mib: u64,
    pub stats: GuestMemoryStats,
}

/// The answer to `snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDone {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    pub ms: f64,
}

/// Where a running migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    #[default]
    Starting,
    CopyingMemory,
    PreCopy,
    Handover,
    WaitingForTarget,
}

/// Progress of a migration, readable over `info` while it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    pub round: u32,
    pub remaining_bytes: u64,
    pub dirty_rate_mib_s: f64,
    pub bytes_written: u64,
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    /// The guest runs on the target; this VMM exits.
    Completed,
    /// Stopped by `migrate-cancel`; the guest runs here.
    Cancelled,
    /// Something went wrong (`error` says what); the guest runs here, unless
    /// `waiting_for_target`.
    Failed,
}

/// The answer to `migrate`; `vmm ctl migrate` prints it as its last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationOutcome {
    pub status: MigrationStatus,
    pub downtime_ms: Option<f64>,
    pub total_ms: f64,
    pub rounds: u32,
    pub bytes_written: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The target claimed the VM and has not resumed it: the guest stays paused on the source,
    /// which keeps watching until the target resumes it or gives it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting_for_target: bool,
}

/// The answer to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointDone {
    /// The checkpoint's sequence number; it is published as `DIR/ckpt-<seq>`.
    pub seq: u64,
    pub path: PathBuf,
    /// How long the guest was paused.
    pub pause_ms: f64,
    pub total_ms: f64,
    /// Copy rounds while the guest ran, before the pause.
    pub rounds: u32,
    /// Guest memory and disk bytes written into the checkpoint.
    pub bytes_written: u64,
    /// Whether the slot was written whole (the first checkpoints of a VMM) rather than only
    /// what changed since it was last written.
    pub full: bool,
}

/// A checkpoint directory's published checkpoints are `ckpt-<seq>` (seq in 20 digits, so names
/// sort as numbers); anything else in it is work in progress or a used one.
pub const CHECKPOINT_PREFIX: &str = "ckpt-";

/// What `vmm restore --checkpoint` prints on stderr once it has chosen a checkpoint, followed by
/// JSON: `{"seq", "taken_unix_ms", "skipped": ["ckpt-…: why", …]}`.
pub const CHECKPOINT_RESUMED_LINE: &str = "vmm: resuming checkpoint ";

/// The answer to `promote`: the guest runs, from checkpoint `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promoted {
    pub seq: u64,
    pub taken_unix_ms: u64,
    /// Newer checkpoints that could not be used, each with why.
    pub skipped: Vec<String>,
    /// Whether the standby's memory was used (false: the checkpoint's memory file was mapped,
    /// as `restore --checkpoint` does, because the standby did not hold that checkpoint).
    pub warm: bool,
    /// Guest pages read from the checkpoint at promotion (the last changes).
    pub pages_applied: u64,
    /// From the request to the guest running.
    pub took_ms: f64,
}

/// The answer to `migrate-cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelling {
    pub cancelling: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_with_defaults() {
        assert_eq!(
            Request::parse(r#"{"command":"info"}"#),
            Ok(Request::Info {})
        );
        assert_eq!(
            Request::parse(r#"{"command":"shutdown","timeout_ms":5}"#),
            Ok(Request::Shutdown { timeout_ms: 5 })
        );
        assert_eq!(
            Request::parse(r#"{"command":"shutdown"}"#),
            Ok(Request::Shutdown {
                timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS
            })
        );
        assert_eq!(
            Request::parse(r#"{"command":"migrate","dir":"/m"}"#),
            Ok(Request::Migrate {
                dir: "/m".into(),
                downtime_ms: DEFAULT_DOWNTIME_MS,
                max_rounds: DEFAULT_MAX_ROUNDS,
                timeout_ms: DEFAULT_HANDOVER_TIMEOUT_MS,
            })
        );
        assert_eq!(
            Request::parse(r#"{"command":"balloon-set","mib":64}"#),
            Ok(Request::BalloonSet { mib: 64 })
        );
    }

    #[test]
    fn the_wire_form_round_trips() {
        let reqs = [
            Request::Info {},
            Request::Pause {},
            Request::Resume {},
            Request::Shutdown { timeout_ms: 1 },
            Request::BalloonSet { mib: 2 },
            Request::BalloonStats {},
            Request::Snapshot { dir: "/s".into() },
            Request::Migrate {
                dir: "/m".into(),
                downtime_ms: 3,
                max_rounds: 4,
                timeout_ms: 5,
            },
            Request::MigrateCancel {},
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(Request::parse(&line), Ok(r), "{line}");
        }
        assert_eq!(
            serde_json::to_string(&Request::MigrateCancel {}).unwrap(),
            r#"{"command":"migrate-cancel"}"#
        );
    }

    #[test]
    fn refuses_bad_requests_with_reasons() {
        let cases = [
            ("nope", "invalid JSON"),
            ("[1]", "JSON object"),
            ("{}", "command"),
            (r#"{"command":"fly"}"#, "unknown variant `fly`"),
            (r#"{"command":"pause","x":1}"#, "unknown field `x`"),
            (
                r#"{"command":"shutdown","timeout_ms":-1}"#,
                "field \"timeout_ms\": invalid value",
            ),
            (r#"{"command":"balloon-set"}"#, "mib"),
            (r#"{"command":"snapshot","dir":""}"#, "dir"),
            (
                r#"{"command":"snapshot","dir":"/a","dir":"/b"}"#,
                "duplicate field `dir`",
            ),
            (
                r#"{"command":"info","command":"pause"}"#,
                "duplicate field `command`",
            ),
            (
                r#"{"command":"migrate","dir":"/m","max_rounds":4294967296}"#,
                "u32",
            ),
        ];
        for (line, why) in cases {
            let e = Request::parse(line).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn results_keep_their_wire_names() {
        let o = MigrationOutcome {
            status: MigrationStatus::Completed,
            downtime_ms: Some(1.5),
            total_ms: 2.0,
            rounds: 3,
            bytes_written: 4,
            error: None,
            waiting_for_target: false,
        };
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"status":"completed","downtime_ms":1.5,"total_ms":2.0,"rounds":3,"bytes_written":4}"#
        );
        let r = Response::ok(&Stopped {
            stopped: StopKind::Forced,
        });
        assert_eq!(
            String::from_utf8(r.to_line()).unwrap(),
            "{\"ok\":true,\"result\":{\"stopped\":\"forced\"}}\n"
        );
        assert_eq!(
            serde_json::to_string(&MigrationPhase::WaitingForTarget).unwrap(),
            "\"waiting-for-target\""
        );
    }
}
