//! virtio-vsock with the host side on Unix sockets ("hybrid vsock", the Firecracker convention):
//!
//! - host → guest: connect to the socket at `socket=PATH`, write `CONNECT <port>\n`; the VMM asks the
//!   guest for a connection to `<port>` and answers `OK <host port>\n` once the guest accepts (or
//!   closes the stream if it refuses). Then the stream carries the connection's bytes.
//! - guest → host: a guest connection to CID 2 (the host), port `P`, is forwarded to a Unix socket
//!   at `PATH_P`; if nothing listens there, the guest gets a reset.
//!
//! Flow control follows the virtio-vsock credit scheme: we never send the guest more than it has
//! room for, and advertise `BUF_ALLOC` bytes of our own buffer per connection.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::worker::{QueueHandler, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    INT_USED_RING, TYPE_VSOCK,
};
use crate::memory::SharedMemory;
use vm_memory::GuestAddressSpace;

pub const HOST_CID: u64 = 2;
const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
/// Our receive buffer per connection, advertised to the guest.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload in one packet to the guest.
const MAX_PAYLOAD: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// The event telling the driver every connection is gone (after a restore or migration).
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Host ports we allocate for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = 0;

#[derive(Debug, Error)]
pub enum VsockError {
    #[error("vsock guest CID {0} is reserved (use 3 or more)")]
    Cid(u64),
    #[error("cannot listen on vsock socket {0}: {1}")]
    Bind(PathBuf, std::io::Error),
}

/// The 44-byte virtio-vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

pub struct Vsock {
    cid: u64,
    path: PathBuf,
    /// `None` while handed over to a migration target.
    listener: Option<UnixListener>,
    worker: Option<Worker<VsockQueues>>,
    /// Restored from a snapshot: the host ends of the guest's connections are gone, which the
    /// driver is told once the device runs.
    reset_pending: bool,
}

/// Binds the host side's socket. Only a stale socket (of a dead VMM: nobody answers on it) is
/// replaced; a file that is not a socket, or a socket somebody serves, is refused, never
/// unlinked (`--vsock socket=/etc/passwd` used to delete it).
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let refuse = |why: &str| {
            VsockError::Bind(
                path.into(),
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, why.to_string()),
            )
        };
        if !meta.file_type().is_socket() {
            return Err(refuse("the path exists and is not a socket"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(refuse("the socket is in use by another process"));
        }
        let _ = std::fs::remove_file(path); // stale socket of a dead VMM
    }
    let listener = UnixListener::bind(path).map_err(|e| VsockError::Bind(path.into(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| VsockError::Bind(path.into(), e))?;
    Ok(listener)
}

impl Vsock {
    fn handler(&mut self, ctx: &mut ActivateContext) -> Result<VsockQueues, ActivateError> {
        let event = ctx.queues.remove(EVENT);
        let tx = ctx.queues.remove(TX);
        let rx = ctx.queues.remove(RX);
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| ActivateError::Device("the vsock socket is released".into()))?
            .try_clone()
            .map_err(ActivateError::Worker)?;
        let inner = Epoll::new().map_err(ActivateError::Worker)?;
        inner
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(ActivateError::Worker)?;
        Ok(VsockQueues {
            mem: ctx.mem.clone(),
            rx,
            tx,
            event,
            reset_pending: std::mem::take(&mut self.reset_pending),
            interrupt: ctx.interrupt.clone(),
            cid: self.cid,
            path: self.path.clone(),
            listener,
            inner,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            next_token: 1,
            next_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
        })
    }

    /// Binds the host-side socket now, so a bad path is an error at start.
    pub fn new(cid: u64, path: &Path) -> Result<Vsock, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        Ok(Vsock {
            cid,
            path: path.into(),
            listener: Some(bind(path)?),
            worker: None,
            reset_pending: false,
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = self.handler(&mut ctx)?;
        self.worker = Some(
            Worker::spawn("virtio-vsock", ctx.queue_evts, handler)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
    fn name(&self) -> &'static str {
        "virtio-vsock"
    }
    /// Connections do not survive a snapshot: the guest is told to drop them when it resumes.
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        if state != DeviceState::None {
            return Err(format!("virtio-vsock cannot take {state:?}"));
        }
        self.reset_pending = true;
        Ok(())
    }
    fn release_backend(&mut self) {
        // The target binds the same path (on the same host in tests).
        self.listener = None;
        let _ = std::fs::remove_file(&self.path);
    }
    fn reacquire_backend(&mut self) -> Result<(), String> {
        if self.listener.is_none() {
            self.listener = Some(bind(&self.path).map_err(|e| e.to_string())?);
        }
        Ok(())
    }
    worker_access!();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host client connected; waiting for its `CONNECT <port>` line.
    AwaitConnectLine,
    /// REQUEST sent to the guest; waiting for RESPONSE or RST.
    AwaitResponse,
    Established,
}

/// Keyed by (host port, guest port).
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    line: Vec<u8>,
    /// The stream has data we have not read yet (edge seen, not drained).
    readable: bool,
    /// Guest → host bytes not yet written to the stream.
    out: VecDeque<u8>,
    /// Bytes the guest sent us, and bytes of those we wrote to the stream.
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes we sent the guest, and its buffer and forwarded count.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            line: Vec::new(),
            readable: false,
            out: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes buffered guest data to the stream; true if the stream failed.
    fn flush(&mut self) -> bool {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => return true,
                Ok(n) => {
                    self.out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        false
    }
}

pub struct VsockQueues {
    mem: SharedMemory,
    rx: Queue,
    tx: Queue,
    event: Queue,
    reset_pending: bool,
    interrupt: Arc<Interrupt>,
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    inner: Epoll,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    next_token: u64,
    next_port: u32,
    /// Control packets waiting for a guest rx buffer.
    control: VecDeque<Header>,
}

impl VsockQueues {
    /// Tells the driver to drop its connections (their host ends did not survive a restore).
    /// Waits for an event buffer if the driver has not posted one yet.
    fn send_transport_reset(&mut self) {
        let mem = self.mem.memory();
        let Some(chain) = self.event.pop_descriptor_chain(&*mem) else {
            return;
        };
        let head = chain.head_index();
        let len = match chain.writer(&*mem) {
            Ok(mut w) => match w.write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => 4,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if self.event.add_used(&*mem, head, len).is_ok() {
            self.reset_pending = false;
            self.interrupt.signal(INT_USED_RING);
        }
    }
    fn header(&self, key: Key, op: u16) -> Header {
        let (fwd_cnt, flags) = self.conns.get(&key).map_or((0, 0), |c| (c.fwd_cnt, 0));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        let mut h = self.header(key, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_fwd_cnt_sent = c.fwd_cnt;
        }
        self.control.push_back(h);
    }

    fn add(&mut self, key: Key, conn: Conn) {
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = self.inner.ctl(
            ControlOperation::Add,
            conn.stream.as_raw_fd(),
            EpollEvent::new(ev, conn.token),
        ) {
            tracing::warn!(error = %e, "virtio-vsock: cannot watch a connection");
            return;
        }
        self.by_token.insert(conn.token, key);
        self.conns.insert(key, conn);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.inner.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.by_token.remove(&c.token);
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    // Until the CONNECT line names the guest port, key it by a placeholder.
                    let token = self.token();
                    let key = (0, token as u32);
                    let mut c = Conn::new(stream, token, State::AwaitConnectLine);
                    c.readable = true;
                    self.add(key, c);
                    self.connect_line(key);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-vsock: accept failed");
                    return;
                }
            }
        }
    }

    /// Reads the host client's `CONNECT <port>\n` and asks the guest for the connection.
    fn connect_line(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut b = [0u8; 64];
        loop {
            match c.stream.read(&mut b) {
                Ok(0) => {
                    self.remove(key);
                    return;
                }
                Ok(n) => c.line.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.remove(key);
                    return;
                }
            }
            if c.line.contains(&b'\n') || c.line.len() > 64 {
                break;
            }
        }
        let Some(nl) = c.line.iter().position(|&x| x == b'\n') else {
            if c.line.len() > 64 {
                self.remove(key);
            }
            return;
        };
        let line = String::from_utf8_lossy(&c.line[..nl]).trim().to_string();
        let rest = c.line.split_off(nl + 1);
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            let _ = c.stream.write_all(b"ERROR expected CONNECT <port>\n");
            self.remove(key);
            return;
        };
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        self.by_token.remove(&conn.token);
        let _ = self.inner.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        conn.state = State::AwaitResponse;
        conn.line.clear();
        // Bytes the client sent after the CONNECT line wait for the connection.
        conn.readable = !rest.is_empty();
        let new_key = (local, port);
        self.add(new_key, conn);
        if let (Some(c), false) = (self.conns.get_mut(&new_key), rest.is_empty()) {
            c.line = rest;
        }
        self.send_control(new_key, OP_REQUEST, 0);
    }

    /// A packet from the guest.
    fn handle_guest_packet(&mut self, h: Header, data: &[u8]) {
        if h.type_ != TYPE_STREAM || h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                ?h,
                "virtio-vsock: packet for an unsupported type or address; reset"
            );
            if h.op != OP_RST {
                self.control.push_back(Header {
                    src_cid: HOST_CID,
                    dst_cid: h.src_cid,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    type_: TYPE_STREAM,
                    op: OP_RST,
                    ..Default::default()
                });
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_connect(key),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.send_control(key, OP_RST, 0);
                    return;
                };
                if c.state != State::AwaitResponse {
                    return;
                }
                c.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(key);
                }
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.send_control(key, OP_RST, 0);
                    return;
                };
                if c.state != State::Established || c.out.len() + data.len() > BUF_ALLOC as usize {
                    tracing::debug!("virtio-vsock: data beyond credit or before connection; reset");
                    self.reset(key);
                    return;
                }
                c.rx_cnt = c.rx_cnt.wrapping_add(data.len() as u32);
                c.out.extend(data);
                if c.flush() {
                    self.reset(key);
                    return;
                }
                if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
                    self.send_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.send_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                if let Some(c) = self.conns.get_mut(&key) {
                    let _ = c.flush();
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                if h.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    self.reset(key);
                }
            }
            OP_RST => self.remove(key),
            _ => self.reset(key),
        }
    }

    /// The guest connects to the host: forward to the Unix socket `PATH_<port>`.
    fn guest_connect(&mut self, key: Key) {
        if self.conns.contains_key(&key) {
            self.reset(key);
            return;
        }
        let path = format!("{}_{}", self.path.display(), key.0);
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let token = self.token();
                self.add(key, Conn::new(stream, token, State::Established));
                self.send_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!(path, error = %e, "virtio-vsock: guest connection refused");
                self.send_control(key, OP_RST, 0);
            }
        }
    }

    fn reset(&mut self, key: Key) {
        self.send_control(key, OP_RST, 0);
        self.remove(key);
    }

    /// Delivers control packets, then connection data, while the guest has rx buffers.
    fn deliver(&mut self) {
        let mem = self.mem.memory();
        let mut used = false;
        loop {
            // What to send next: a control packet, or data from a readable connection with credit.
            let next = if let Some(h) = self.control.front().copied() {
                Some((h, None))
            } else {
                self.conns
                    .iter()
                    .find(|(_, c)| {
                        c.state == State::Established && c.readable && c.peer_credit() > 0
                    })
                    .map(|(k, _)| (self.header(*k, OP_RW), Some(*k)))
            };
            let Some((mut h, data_key)) = next else { break };
            let Some(chain) = self.rx.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            match chain.writer(&*mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let mut payload = Vec::new();
                    if let Some(key) = data_key {
                        let room = (w.available_bytes() - HDR_LEN).min(MAX_PAYLOAD);
                        payload = self.read_stream(key, room);
                        if payload.is_empty() {
                            // Nothing after all (drained or closed): give the buffer back unused.
                            self.rx.go_to_previous_position();
                            continue;
                        }
                    } else {
                        self.control.pop_front();
                    }
                    h.len = payload.len() as u32;
                    if w.write_all(&h.to_bytes()).is_ok() && w.write_all(&payload).is_ok() {
                        written = (HDR_LEN + payload.len()) as u32;
                    }
                }
                _ => {
                    tracing::debug!("virtio-vsock: unusable rx buffer");
                    self.control.pop_front();
                }
            }
            if let Err(e) = self.rx.add_used(&*mem, head, written) {
                tracing::warn!(error = ?e, "virtio-vsock: cannot return an rx buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }

    /// Reads up to `room` bytes (and the peer's credit) from a connection's stream.
    fn read_stream(&mut self, key: Key, room: usize) -> Vec<u8> {
        let Some(c) = self.conns.get_mut(&key) else {
            return Vec::new();
        };
        let n = room.min(c.peer_credit() as usize);
        let mut buf = vec![0u8; n];
        // Bytes the host client sent right after its CONNECT line go first.
        if !c.line.is_empty() {
            let take = c.line.len().min(n);
            let rest = c.line.split_off(take);
            buf[..take].copy_from_slice(&c.line);
            c.line = rest;
            buf.truncate(take);
            c.tx_cnt = c.tx_cnt.wrapping_add(take as u32);
            return buf;
        }
        match c.stream.read(&mut buf) {
            Ok(0) => {
                c.readable = false;
                self.send_control(key, OP_SHUTDOWN, SHUTDOWN_BOTH);
                Vec::new()
            }
            Ok(got) => {
                buf.truncate(got);
                c.tx_cnt = c.tx_cnt.wrapping_add(got as u32);
                buf
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.readable = false;
                Vec::new()
            }
            Err(_) => {
                c.readable = false;
                self.reset(key);
                Vec::new()
            }
        }
    }

    fn transmit(&mut self) {
        let mem = self.mem.memory();
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            match chain.reader(&*mem) {
                Ok(mut r) => {
                    let mut hb = [0u8; HDR_LEN];
                    if r.read_exact(&mut hb).is_ok() {
                        let h = Header::from_bytes(&hb);
                        let len = h.len as usize;
                        if len > MAX_PAYLOAD || len > r.available_bytes() {
                            tracing::debug!(len, "virtio-vsock: bad packet length");
                        } else {
                            let mut data = vec![0u8; len];
                            if r.read_exact(&mut data).is_ok() {
                                self.handle_guest_packet(h, &data);
                            }
                        }
                    } else {
                        tracing::debug!("virtio-vsock: short packet header");
                    }
                }
                Err(_) => tracing::debug!("virtio-vsock: tx chain outside guest memory"),
            }
            if let Err(e) = self.tx.add_used(&*mem, head, 0) {
                tracing::warn!(error = ?e, "virtio-vsock: cannot return a tx buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }

    fn backend(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.inner.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER_TOKEN {
                self.accept_host_clients();
                continue;
            }
            let Some(&key) = self.by_token.get(&token) else {
                continue;
            };
            let set = ev.event_set();
            let state = self.conns.get(&key).map(|c| c.state);
            if state == Some(State::AwaitConnectLine) {
                self.connect_line(key);
                continue;
            }
            if let Some(c) = self.conns.get_mut(&key) {
                if set.contains(EventSet::OUT) && c.flush() {
                    self.reset(key);
                    continue;
                }
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                    c.readable = true;
                }
            }
        }
    }
}

impl QueueHandler for VsockQueues {
    fn queues(&self) -> Vec<(usize, &Queue)> {
        vec![(RX, &self.rx), (TX, &self.tx), (EVENT, &self.event)]
    }
    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.inner.as_raw_fd(), EventSet::IN)]
    }
    fn queue_event(&mut self, index: usize) {
        if index == EVENT && self.reset_pending {
            self.send_transport_reset();
        }
        if index == TX {
            self.transmit();
        }
        // Any kick may free rx buffers or credit: try to deliver.
        self.deliver();
    }
    fn backend_event(&mut self, _index: usize, _events: EventSet) {
        self.backend();
        self.deliver();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("precious");
        std::fs::write(&file, b"keep").unwrap();
        let e = bind(&file).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let sock = d.path().join("v.sock");
        let live = bind(&sock).unwrap();
        let e = bind(&sock).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(live); // the socket file stays behind, stale
        assert!(bind(&sock).is_ok());
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 99,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn credit_is_bounded() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, 1, State::Established);
        c.peer_buf_alloc = 1000;
        c.tx_cnt = 900;
        c.peer_fwd_cnt = 100;
        assert_eq!(c.peer_credit(), 200);
        c.tx_cnt = 2000;
        assert_eq!(c.peer_credit(), 0);
    }
}
