//! Benchmarks run inside the guest (and their host-side peer), so our VMM and QEMU can be compared
//! on the same guest work: disk throughput with O_DIRECT, and TCP throughput.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use serde_json::{json, Value};

/// A buffer aligned for O_DIRECT.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0x5au8; len + 4096];
    let off = (4096 - (v.as_ptr() as usize % 4096)) % 4096;
    (v, off)
}

/// `mode`: seq-read, seq-write (1 MiB requests) or rand-read, rand-write (4 KiB requests), over
/// `mib` MiB of `dev`.
pub fn disk(dev: &str, mode: &str, mib: u64) -> Result<Value, String> {
    let write = mode.ends_with("write");
    let random = mode.starts_with("rand");
    let bs: usize = if random { 4096 } else { 1 << 20 };
    let mut f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("{dev}: {e}"))?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let blocks = size / bs as u64;
    if blocks == 0 {
        return Err(format!("{dev} is smaller than one request"));
    }
    let ops = (mib << 20) / bs as u64;
    let (mut buf, off) = aligned(bs);
    let buf = &mut buf[off..off + bs];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    for i in 0..ops {
        let block = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        } else {
            i % blocks
        };
        let at = block * bs as u64;
        let r = if write {
            f.write_all_at(buf, at)
        } else {
            f.read_exact_at(buf, at)
        };
        r.map_err(|e| format!("{mode} at {at}: {e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = ops * bs as u64;
    Ok(json!({
        "mode": mode, "ops": ops, "bytes": bytes, "secs": secs,
        "mbps": bytes as f64 / secs / 1e6, "iops": ops as f64 / secs,
    }))
}

/// Sends `mib` MiB to `addr` over TCP.
pub fn net_send(addr: &str, mib: u64) -> Result<Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    let chunk = vec![0xa5u8; 64 * 1024];
    let start = Instant::now();
    for _ in 0..mib * 16 {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    drop(s);
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({"sent": mib << 20, "secs": secs, "mbps": (mib << 20) as f64 / secs / 1e6}))
}

/// Receives one TCP stream on `port` until it closes.
pub fn net_recv(port: u16) -> Result<Value, String> {
    let l = TcpListener::bind(("0.0.0.0", port)).map_err(|e| e.to_string())?;
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => return Err(e.to_string()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({"received": total, "secs": secs, "mbps": total as f64 / secs / 1e6}))
}
