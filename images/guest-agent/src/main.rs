//! The guest agent: listens on vsock and answers one request per line with one JSON line
//! (docs/guest-agent.md). The same static binary carries two host-side helpers used by tests.
//!
//! ```text
//! guest-agent [--port 52]                      serve inside the guest
//! guest-agent call SOCKET PORT REQUEST         host: hybrid-vsock CONNECT, send REQUEST, print the answer
//! guest-agent echo-server SOCKET_PATH          host: a Unix echo server (for guest → host tests)
//! guest-agent bench-disk DEV MODE MIB          seq-read|seq-write|rand-read|rand-write, O_DIRECT
//! guest-agent bench-net send ADDR:PORT MIB     TCP throughput, sender
//! guest-agent bench-net recv PORT              TCP throughput, receiver
//! ```

mod bench;
mod proc;
mod vsock;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use serde_json::{json, Value};

const DEFAULT_PORT: u32 = 52;

fn ok(v: Value) -> Value {
    let mut v = v;
    v["ok"] = json!(true);
    v
}

fn err(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

/// Answers one request line.
pub fn answer(line: &str) -> Value {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["ping"] => ok(json!({"pong": true})),
        ["cpu"] => {
            let before = match read("/proc/stat") {
                Ok(s) => proc::cpu_times(&s),
                Err(e) => return err(e),
            };
            std::thread::sleep(Duration::from_millis(200));
            let after = match read("/proc/stat") {
                Ok(s) => proc::cpu_times(&s),
                Err(e) => return err(e),
            };
            let usage = proc::cpu_usage(&before, &after);
            let cpus: Vec<Value> = usage
                .iter()
                .map(|(c, p)| json!({"cpu": c, "busy_pct": p}))
                .collect();
            ok(json!({"cpus": cpus}))
        }
        ["mem"] => match read("/proc/meminfo") {
            Ok(s) => ok(json!(proc::memory(&s))),
            Err(e) => err(e),
        },
        ["cpu-online", cpu, state @ ("0" | "1")] => match cpu.parse::<u32>() {
            Ok(0) => err("CPU 0 cannot go offline"),
            Ok(n) => {
                let path = format!("/sys/devices/system/cpu/cpu{n}/online");
                match std::fs::write(&path, state) {
                    Ok(()) => ok(json!({"cpu": n, "online": *state == "1"})),
                    Err(e) => err(format!("{path}: {e}")),
                }
            }
            Err(_) => err(format!("bad CPU number '{cpu}'")),
        },
        ["checksum", path, bytes] => match bytes.parse::<u64>() {
            Ok(n) => {
                // Drop the page cache first, so the data really comes from the device.
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
                match checksum(path, n) {
                    Ok(sum) => ok(json!({"path": path, "bytes": n, "fnv64": sum})),
                    Err(e) => err(format!("{path}: {e}")),
                }
            }
            Err(_) => err(format!("bad byte count '{bytes}'")),
        },
        ["selftest", "echo"] => ok(json!({"selftest": "echo", "passed": true})),
        ["selftest", "host-echo", port] => match port.parse::<u32>() {
            Ok(p) => host_echo(p),
            Err(_) => err(format!("bad port '{port}'")),
        },
        ["selftest", name, ..] => err(format!(
            "unknown self-test '{name}' (known: echo, host-echo PORT)"
        )),
        [] => err("empty request"),
        _ => err(format!(
            "unknown request '{line}' (known: ping, cpu, mem, cpu-online N 0|1, checksum PATH BYTES, selftest NAME)"
        )),
    }
}

/// FNV-1a (64-bit, hex) of the first `bytes` bytes of `path`: the guest and the host compare disk
/// contents with it (`checksum` request / `guest-agent checksum FILE BYTES`).
pub fn checksum(path: &str, bytes: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?.take(bytes);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        total += n as u64;
    }
    if total != bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("only {total} of {bytes} bytes"),
        ));
    }
    Ok(format!("{h:016x}"))
}

/// Guest → host round trip: connect to the host on `port`, send a line, expect it back.
fn host_echo(port: u32) -> Value {
    let run = || -> std::io::Result<bool> {
        let mut s = vsock::connect(vsock::HOST_CID, port)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let probe = format!("hello from the guest {}\n", std::process::id());
        s.write_all(probe.as_bytes())?;
        let mut back = String::new();
        BufReader::new(s).read_line(&mut back)?;
        Ok(back == probe)
    };
    match run() {
        Ok(true) => ok(json!({"selftest": "host-echo", "passed": true})),
        Ok(false) => err("the host answered something else"),
        Err(e) => err(format!("host-echo: {e}")),
    }
}

fn serve_conn(stream: UnixStream) {
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let mut out = answer(line.trim()).to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn serve(port: u32) -> std::io::Result<()> {
    let listener = vsock::listen(port)?;
    eprintln!("guest-agent: listening on vsock port {port}");
    loop {
        match vsock::accept(&listener) {
            Ok(s) => {
                std::thread::spawn(move || serve_conn(s));
            }
            Err(e) => eprintln!("guest-agent: accept: {e}"),
        }
    }
}

/// Host side of hybrid vsock: CONNECT, then one request and its answer.
fn call(socket: &str, port: u32, request: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{socket}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("no answer to CONNECT: {e}"))?;
    if !line.starts_with("OK ") {
        return Err(format!("connection refused: {line:?}"));
    }
    s.write_all(format!("{request}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    line.clear();
    r.read_line(&mut line)
        .map_err(|e| format!("no answer: {e}"))?;
    Ok(line.trim_end().to_string())
}

fn echo_server(path: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(mut w) = s.try_clone() else { return };
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.as_slice() {
        [] => serve(DEFAULT_PORT).map_err(|e| e.to_string()),
        ["--port", p] => match p.parse() {
            Ok(p) => serve(p).map_err(|e| e.to_string()),
            Err(_) => Err(format!("bad port '{p}'")),
        },
        ["call", socket, port, request @ ..] => match port.parse() {
            Ok(p) => call(socket, p, &request.join(" ")).map(|l| println!("{l}")),
            Err(_) => Err(format!("bad port '{port}'")),
        },
        ["echo-server", path] => echo_server(path).map_err(|e| e.to_string()),
        ["checksum", path, bytes] => bytes
            .parse()
            .map_err(|_| format!("bad byte count '{bytes}'"))
            .and_then(|n| checksum(path, n).map_err(|e| format!("{path}: {e}")))
            .map(|s| println!("{s}")),
        ["bench-disk", dev, mode @ ("seq-read" | "seq-write" | "rand-read" | "rand-write"), mib] => {
            mib.parse()
                .map_err(|_| format!("bad size '{mib}'"))
                .and_then(|m| bench::disk(dev, mode, m))
                .map(|v| println!("{v}"))
        }
        ["bench-net", "send", addr, mib] => mib
            .parse()
            .map_err(|_| format!("bad size '{mib}'"))
            .and_then(|m| bench::net_send(addr, m))
            .map(|v| println!("{v}")),
        ["bench-net", "recv", port] => port
            .parse()
            .map_err(|_| format!("bad port '{port}'"))
            .and_then(bench::net_recv)
            .map(|v| println!("{v}")),
        _ => Err(
            "usage: guest-agent [--port N] | call SOCKET PORT REQUEST... | echo-server PATH".into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("guest-agent: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(answer("ping")["pong"], true);
        assert_eq!(answer("selftest echo")["passed"], true);
        assert_eq!(answer("mem")["ok"], true);
        assert!(answer("mem")["total_kb"].as_u64().unwrap() > 0);
        assert_eq!(answer("cpu")["ok"], true);
        assert_eq!(answer("fly")["ok"], false);
        assert_eq!(answer("cpu-online 0 0")["ok"], false);
        assert_eq!(answer("cpu-online x 1")["ok"], false);
        assert_eq!(answer("selftest nope")["ok"], false);
        assert_eq!(answer("")["ok"], false);
    }

    #[test]
    fn checksums() {
        let dir = std::env::temp_dir().join(format!("ga-sum-{}", std::process::id()));
        std::fs::write(&dir, b"abc").unwrap();
        let p = dir.to_str().unwrap();
        // FNV-1a 64 of "a" and of "abc" (published test vectors).
        assert_eq!(checksum(p, 1).unwrap(), "af63dc4c8601ec8c");
        assert_eq!(checksum(p, 3).unwrap(), "e71fa2190541574b");
        assert!(checksum(p, 4).is_err(), "short file accepted");
        assert_eq!(answer(&format!("checksum {p} x"))["ok"], false);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn call_speaks_the_hybrid_vsock_handshake() {
        let dir = std::env::temp_dir().join(format!("ga-call-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 52\n");
            w.write_all(b"OK 1073741824\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            w.write_all(answer(line.trim()).to_string().as_bytes())
                .unwrap();
            w.write_all(b"\n").unwrap();
        });
        let got = call(path.to_str().unwrap(), 52, "ping").unwrap();
        t.join().unwrap();
        assert!(got.contains("\"pong\":true"), "{got}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
