//! Accepts API connections; each connection gets a thread that reads request lines, hands them to
//! the VMM's main loop and writes back the answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::{Reply, Request, Response, MAX_REQUEST_LINE};

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot bind API socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
}

/// Binds the API socket. A stale socket left by a dead VMM is replaced; a live one is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.into()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| ApiError::Bind(path.into(), e))
}

/// API connections served at once, at most: each costs a thread, and nobody needs more.
pub const MAX_CONNECTIONS: usize = 16;

/// Hands one parsed request to the VMM's control loop; false once the loop is gone.
pub type Submit = Arc<dyn Fn(Request, Reply) -> bool + Send + Sync>;

/// Serves connections until the process ends.
pub fn spawn(listener: UnixListener, submit: Submit) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let open = Arc::new(AtomicUsize::new(0));
    // Connection threads inherit the API thread's filter.
    crate::seccomp::spawn(crate::seccomp::Kind::Api, "api".into(), move || {
        for conn in listener.incoming() {
            match conn {
                Ok(mut stream) => {
                    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, Ordering::SeqCst);
                        let out = Response::err(format!(
                            "more than {MAX_CONNECTIONS} API connections at once"
                        ))
                        .to_line();
                        let _ = stream.write_all(&out);
                        continue;
                    }
                    let submit = submit.clone();
                    let count = open.clone();
                    let spawned =
                        std::thread::Builder::new()
                            .name("api-conn".into())
                            .spawn(move || {
                                serve(stream, &submit);
                                count.fetch_sub(1, Ordering::SeqCst);
                            });
                    if let Err(e) = spawned {
                        open.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(error = %e, "cannot serve API connection");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "API accept failed"),
            }
        }
    })?;
    Ok(())
}

fn serve(stream: UnixStream, submit: &Submit) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut written = None;
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_REQUEST_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() > MAX_REQUEST_LINE;
        let response = if too_long {
            Response::err(format!("request longer than {MAX_REQUEST_LINE} bytes"))
        } else {
            match std::str::from_utf8(&line).map_err(|_| "request is not UTF-8".to_string()) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match Request::parse(text.trim()) {
                    Ok(req) => {
                        tracing::debug!(?req, "API request");
                        let (reply, rx, ack) = Reply::new();
                        if !submit(req, reply) {
                            return;
                        }
                        let r = rx
                            .recv()
                            .unwrap_or_else(|_| Response::err("the VMM is exiting"));
                        written = Some(ack);
                        r
                    }
                    Err(msg) => Response::err(msg),
                },
                Err(msg) => Response::err(msg),
            }
        };
        let out = response.to_line();
        let ok = writer.write_all(&out).and_then(|_| writer.flush()).is_ok();
        if let Some(ack) = written.take() {
            let _ = ack.send(());
        }
        if !ok || too_long {
            return;
        }
    }
}
