//! A blocking client: one request, one response, on a connection of its own.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::{
    BalloonStats, BalloonTarget, Cancelling, CheckpointDone, Info, Promoted, Request, Resized,
    Response, SnapshotDone, StateChanged, Stopped,
};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to API socket {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("cannot talk to the VMM: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM closed the connection without answering")]
    NoAnswer,
    #[error("malformed answer from the VMM: {0}")]
    Malformed(String),
    /// The VMM refused the request; the message is its reason.
    #[error("{0}")]
    Refused(String),
}

/// The API of one VMM, at its socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and waits up to `timeout` for the answer, decoded as `T`.
    pub fn call<T: DeserializeOwned>(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let mut stream = UnixStream::connect(&self.socket)
            .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut line =
            serde_json::to_vec(request).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push(b'\n');
        stream.write_all(&line)?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        if reply.is_empty() {
            return Err(ClientError::NoAnswer);
        }
        let resp: Response =
            serde_json::from_str(&reply).map_err(|e| ClientError::Malformed(e.to_string()))?;
        if !resp.ok {
            return Err(ClientError::Refused(
                resp.error.unwrap_or_else(|| "unknown error".into()),
            ));
        }
        serde_json::from_value(resp.result.unwrap_or(serde_json::Value::Null))
            .map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// `call` with the request's usual wait ([`Request::answer_within`]).
    pub fn send<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ClientError> {
        self.call(request, request.answer_within())
    }

    pub fn info(&self, timeout: Duration) -> Result<Info, ClientError> {
        self.call(&Request::Info {}, timeout)
    }

    pub fn pause(&self) -> Result<StateChanged, ClientError> {
        self.send(&Request::Pause {})
    }

    pub fn resume(&self) -> Result<StateChanged, ClientError> {
        self.send(&Request::Resume {})
    }

    pub fn shutdown(&self, timeout_ms: u64) -> Result<Stopped, ClientError> {
        self.send(&Request::Shutdown { timeout_ms })
    }

    pub fn balloon_set(&self, mib: u64) -> Result<BalloonTarget, ClientError> {
        self.send(&Request::BalloonSet { mib })
    }

    pub fn balloon_stats(&self) -> Result<BalloonStats, ClientError> {
        self.send(&Request::BalloonStats {})
    }

    pub fn snapshot(&self, dir: impl Into<PathBuf>) -> Result<SnapshotDone, ClientError> {
        self.send(&Request::Snapshot { dir: dir.into() })
    }

    /// Writes a checkpoint of the running VM into `dir` (docs/checkpoint.md).
    pub fn checkpoint(&self, dir: impl Into<PathBuf>) -> Result<CheckpointDone, ClientError> {
        self.send(&Request::Checkpoint { dir: dir.into() })
    }

    /// Promotes a standby VMM: the guest runs from the newest usable checkpoint.
    pub fn promote(&self) -> Result<Promoted, ClientError> {
        self.send(&Request::Promote {})
    }

    /// Changes the vCPUs and the memory (each `None`: unchanged); waits for the guest (at most
    /// `timeout_ms`, then an error saying how far it got).
    pub fn resize(
        &self,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
        timeout_ms: u64,
    ) -> Result<Resized, ClientError> {
        self.send(&Request::Resize {
            vcpus,
            memory_mib,
            timeout_ms,
        })
    }

    pub fn migrate_cancel(&self) -> Result<Cancelling, ClientError> {
        self.send(&Request::MigrateCancel {})
    }
}
