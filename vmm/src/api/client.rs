//! The API client behind `vmm ctl`: one request, one response.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::Response;

/// Sends `request` (a JSON object) and returns the result, or the API's error as an error.
pub fn call(socket: &Path, request: &Value, timeout: Duration) -> Result<Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to API socket {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).context("cannot send the request")?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("no answer from the VMM")?;
    if reply.is_empty() {
        bail!("the VMM closed the connection without answering");
    }
    let resp: Response = serde_json::from_str(&reply).context("malformed answer from the VMM")?;
    match (resp.ok, resp.result, resp.error) {
        (true, result, _) => Ok(result.unwrap_or(Value::Null)),
        (false, _, err) => bail!("{}", err.unwrap_or_else(|| "unknown error".into())),
    }
}
