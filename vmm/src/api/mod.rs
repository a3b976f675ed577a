//! The control API: newline-delimited JSON over a Unix socket (protocol in `docs/api.md`).
//!
//! `server` accepts connections and turns each request line into a [`VmmEvent::Api`] for the VMM's
//! main loop; `client` is what `vmm ctl` uses.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A parsed API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Info,
    Pause,
    Resume,
    /// ACPI power button, then a forced stop after `timeout_ms`.
    Shutdown {
        timeout_ms: u64,
    },
    /// Balloon target size in MiB.
    BalloonSet {
        mib: u64,
    },
    BalloonStats,
    /// Save the paused VM to a directory.
    Snapshot {
        dir: std::path::PathBuf,
    },
    /// Live-migrate through a directory on shared storage.
    Migrate {
        dir: std::path::PathBuf,
        downtime_ms: u64,
        max_rounds: u32,
        timeout_ms: u64,
    },
    MigrateCancel,
}

/// Where the answer to one request goes: the connection thread waits on the other end, writes the
/// answer to the socket and acknowledges, so a VMM about to exit can make sure its last answer left.
pub struct Reply {
    tx: std::sync::mpsc::Sender<Response>,
    written: std::sync::mpsc::Receiver<()>,
}

impl Reply {
    /// A reply and the connection side's ends: the answer's receiver and the written-ack sender.
    pub fn new() -> (
        Reply,
        std::sync::mpsc::Receiver<Response>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        (
            Reply {
                tx,
                written: ack_rx,
            },
            rx,
            ack_tx,
        )
    }

    pub fn send(self, r: Response) {
        let _ = self.tx.send(r);
    }

    /// Sends the answer and waits (bounded) until it has been written to the socket.
    pub fn send_and_flush(self, r: Response) {
        if self.tx.send(r).is_ok() {
            let _ = self.written.recv_timeout(std::time::Duration::from_secs(2));
        }
    }
}

/// Default grace period between the power button and a forced stop.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// The wire form of a response: `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// Parses one request line. Errors are the message the caller gets back.
/// A request object whose keys each appear once: with `{"dir":"a","dir":"b"}` a reader that
/// checks the first and one that uses the last would disagree, so it is refused.
struct UniqueKeys(serde_json::Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a request must be a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate field \"{k}\"")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueKeys(out))
            }
        }
        d.deserialize_map(V)
    }
}

pub fn parse_request(line: &str) -> Result<Request, String> {
    let obj: UniqueKeys = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = &obj.0;
    let cmd = obj
        .get("command")
        .and_then(Value::as_str)
        .ok_or("missing \"command\" (a string)")?;
    let allowed: &[&str] = match cmd {
        "shutdown" => &["command", "timeout_ms"],
        "balloon-set" => &["command", "mib"],
        "snapshot" => &["command", "dir"],
        "migrate" => &["command", "dir", "downtime_ms", "max_rounds", "timeout_ms"],
        _ => &["command"],
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field \"{k}\" for command \"{cmd}\""));
    }
    match cmd {
        "info" => Ok(Request::Info),
        "pause" => Ok(Request::Pause),
        "resume" => Ok(Request::Resume),
        "shutdown" => {
            let timeout_ms = match obj.get("timeout_ms") {
                None => DEFAULT_SHUTDOWN_TIMEOUT_MS,
                Some(t) => t
                    .as_u64()
                    .ok_or("\"timeout_ms\" must be a non-negative integer")?,
            };
            Ok(Request::Shutdown { timeout_ms })
        }
        "balloon-set" => {
            let mib = obj
                .get("mib")
                .and_then(Value::as_u64)
                .ok_or("\"mib\" (a non-negative integer) is required")?;
            Ok(Request::BalloonSet { mib })
        }
        "balloon-stats" => Ok(Request::BalloonStats),
        "migrate" => {
            let dir = obj
                .get("dir")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .ok_or("\"dir\" (a path) is required")?;
            let num = |k: &str, d: u64| -> Result<u64, String> {
                match obj.get(k) {
                    None => Ok(d),
                    Some(v) => v.as_u64().ok_or(format!("\"{k}\" must be a non-negative integer")),
                }
            };
            Ok(Request::Migrate {
                dir: dir.into(),
                downtime_ms: num("downtime_ms", crate::migrate::DEFAULT_DOWNTIME_MS)?,
                max_rounds: num("max_rounds", u64::from(crate::migrate::DEFAULT_MAX_ROUNDS))?.min(u64::from(u32::MAX)) as u32,
                timeout_ms: num("timeout_ms", crate::migrate::DEFAULT_HANDOVER_TIMEOUT_MS)?,
            })
        }
        "migrate-cancel" => Ok(Request::MigrateCancel),
        "snapshot" => {
            let dir = obj
                .get("dir")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .ok_or("\"dir\" (a path) is required")?;
            Ok(Request::Snapshot { dir: dir.into() })
        }
        other => Err(format!(
            "unknown command \"{other}\" (known: info, pause, resume, shutdown, balloon-set, balloon-stats, snapshot, migrate, migrate-cancel)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse_request(r#"{"command":"snapshot","dir":"/a","dir":"/b"}"#).unwrap_err();
        assert!(e.contains("duplicate field \"dir\""), "{e}");
        let e = parse_request(r#"{"command":"info","command":"pause"}"#).unwrap_err();
        assert!(e.contains("duplicate"), "{e}");
        assert!(parse_request("[1]").unwrap_err().contains("JSON object"));
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse_request(r#"{"command":"info"}"#), Ok(Request::Info));
        assert_eq!(
            parse_request(r#"{"command":"shutdown","timeout_ms":5}"#),
            Ok(Request::Shutdown { timeout_ms: 5 })
        );
        assert_eq!(
            parse_request(r#"{"command":"shutdown"}"#),
            Ok(Request::Shutdown {
                timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS
            })
        );
    }

    #[test]
    fn rejects_bad_requests_with_reasons() {
        assert!(parse_request("nope").unwrap_err().contains("invalid JSON"));
        assert!(parse_request("[1]").unwrap_err().contains("object"));
        assert!(parse_request("{}").unwrap_err().contains("command"));
        assert!(parse_request(r#"{"command":"fly"}"#)
            .unwrap_err()
            .contains("unknown command \"fly\""));
        assert!(parse_request(r#"{"command":"pause","x":1}"#)
            .unwrap_err()
            .contains("unknown field"));
        assert!(parse_request(r#"{"command":"shutdown","timeout_ms":-1}"#).is_err());
        assert!(parse_request(r#"{"command":"balloon-set"}"#)
            .unwrap_err()
            .contains("mib"));
        assert_eq!(
            parse_request(r#"{"command":"balloon-set","mib":64}"#),
            Ok(Request::BalloonSet { mib: 64 })
        );
    }
}
