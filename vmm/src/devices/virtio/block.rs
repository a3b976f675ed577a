//! virtio-blk over a raw image file, usually on shared storage.
//!
//! Opening the image takes an OFD byte-range lock over the whole file — exclusive for read-write,
//! shared for read-only (the convention QEMU and Cloud Hypervisor use; OFD locks hold across NFSv4)
//! — so two VMMs never write one disk. The lock goes with the file descriptor: it is released when
//! the VMM exits or hands the disk over during migration.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;

use super::worker::{QueueHandler, Worker};
use super::{
    read_config_bytes, write_status, ActivateContext, ActivateError, GuestIovecs, Interrupt,
    VirtioDevice, INT_USED_RING, TYPE_BLOCK,
};
use crate::memory::{GuestMemory, SharedMemory};
use vm_memory::GuestAddressSpace;

const SECTOR: u64 = 512;
/// The unit in which guest writes are logged for checkpoints (docs/checkpoint.md): a 1 TiB disk
/// needs a 2 MiB bitmap.
pub const DIRTY_BLOCK: u64 = 64 << 10;
const QUEUE_SIZE: u16 = 256;
/// Longest request accepted; Linux stays far below with the seg_max offered.
const MAX_REQUEST: usize = 32 << 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

#[derive(Debug, Error)]
pub enum BlockError {
    #[error("cannot open disk image {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("disk image {} {}", .0.display(), vmm_api::DISK_IN_USE)]
    Locked(PathBuf),
    #[error("cannot lock disk image {0}: {1}")]
    Lock(PathBuf, std::io::Error),
    #[error("disk image {0} is {1} bytes, not a whole number of 512-byte sectors")]
    Size(PathBuf, u64),
}

/// Takes (or with `exclusive == false`, shares) the OFD lock over the whole file.
pub fn lock_image(file: &File, path: &Path, exclusive: bool) -> Result<(), BlockError> {
    let fl = libc::flock {
        l_type: if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with a valid flock structure on an open descriptor.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::Locked(path.into())),
        _ => Err(BlockError::Lock(path.into(), e)),
    }
}

/// Releases the OFD lock taken by [`lock_image`].
pub fn unlock_image(file: &File) -> std::io::Result<()> {
    let fl = libc::flock {
        l_type: libc::F_UNLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with a valid flock structure on an open descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How long a source whose migration failed waits for its disk's lock to be free again.
const REACQUIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Block {
    path: PathBuf,
    file: Arc<File>,
    /// The image opened a second time, only to hold its lock. On NFS a read or write through the
    /// descriptor that holds a byte-range lock goes out with that lock's state, and a server may
    /// refuse it (nfs-ganesha 4.3 fails every such read with EIO); through a descriptor with no
    /// lock it goes out with the open's state, which every server takes.
    lock: File,
    read_only: bool,
    capacity: u64,
    /// What the guest wrote, in [`DIRTY_BLOCK`]s, since a checkpoint last read it.
    dirty: Arc<AtomicBitmap>,
    worker: Option<Worker<BlockQueue>>,
}

/// A writable disk as a checkpoint sees it: the image, and the log of guest writes to it.
#[derive(Clone)]
pub struct DiskView {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub dirty: Arc<AtomicBitmap>,
}

impl Block {
    pub fn view(&self) -> Option<DiskView> {
        (!self.read_only).then(|| DiskView {
            path: self.path.clone(),
            file: self.file.clone(),
            dirty: self.dirty.clone(),
        })
    }

    fn handler(&mut self, ctx: &mut ActivateContext) -> Result<BlockQueue, ActivateError> {
        Ok(BlockQueue {
            mem: ctx.mem.clone(),
            queue: ctx.queues.remove(0),
            interrupt: ctx.interrupt.clone(),
            file: self.file.clone(),
            read_only: self.read_only,
            capacity: self.capacity,
            id: id_bytes(&self.path),
            dirty: self.dirty.clone(),
        })
    }

    pub fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)
                .map_err(|e| BlockError::Open(path.into(), e))
        };
        let file = open()?;
        let lock = open()?;
        lock_image(&lock, path, !read_only)?;
        let len = file
            .metadata()
            .map_err(|e| BlockError::Open(path.into(), e))?
            .len();
        if len % SECTOR != 0 {
            return Err(BlockError::Size(path.into(), len));
        }
        Ok(Block {
            path: path.into(),
            file: Arc::new(file),
            lock,
            read_only,
            capacity: len / SECTOR,
            dirty: Arc::new(AtomicBitmap::new(
                len as usize,
                std::num::NonZeroUsize::new(DIRTY_BLOCK as usize)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            worker: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        // size_max (unused, 0) then seg_max.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = self.handler(&mut ctx)?;
        self.worker = Some(
            Worker::spawn("virtio-blk", ctx.queue_evts, handler).map_err(ActivateError::Worker)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
    fn name(&self) -> &'static str {
        "virtio-blk"
    }
    fn disk(&self) -> Option<DiskView> {
        self.view()
    }
    fn release_backend(&mut self) {
        // Everything written is on the shared storage before the target opens the image.
        if let Err(e) = self.file.sync_data() {
            tracing::warn!(path = %self.path.display(), error = %e, "virtio-blk: flush before handover failed");
        }
        if let Err(e) = unlock_image(&self.lock) {
            tracing::warn!(path = %self.path.display(), error = %e, "virtio-blk: cannot release the image lock");
        }
    }
    fn reacquire_backend(&mut self) -> Result<(), String> {
        // A target that failed may not have let go yet (its process is still exiting; on NFS a
        // release takes a moment to show): the lock is waited for, briefly. The guest is paused
        // meanwhile, and only on this failure path.
        let deadline = std::time::Instant::now() + REACQUIRE_WAIT;
        loop {
            match lock_image(&self.lock, &self.path, !self.read_only) {
                Err(BlockError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r.map_err(|e| e.to_string()),
            }
        }
    }
    worker_access!();
}

/// The 20-byte serial the guest reads with GET_ID: the image's file name.
fn id_bytes(path: &Path) -> [u8; 20] {
    let mut id = [0u8; 20];
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = name.len().min(20);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

pub struct BlockQueue {
    mem: SharedMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    file: Arc<File>,
    read_only: bool,
    capacity: u64,
    id: [u8; 20],
    dirty: Arc<AtomicBitmap>,
}

impl BlockQueue {
    /// Executes one request; returns the bytes written into the chain (the used length). Data moves
    /// straight between the image and guest memory (preadv/pwritev on the chain's buffers).
    fn execute(&self, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let guard = self.mem.memory();
        let mem: &GuestMemory = &guard;
        let mut hdr = [0u8; 16];
        let header_ok = chain
            .clone()
            .reader(mem)
            .is_ok_and(|mut r| r.read_exact(&mut hdr).is_ok());
        let (Some(mut out), Some(mut data)) = (
            GuestIovecs::from_chain(mem, chain.clone(), false),
            GuestIovecs::from_chain(mem, chain, true),
        ) else {
            tracing::debug!("virtio-blk: descriptor chain outside guest memory");
            return 0;
        };
        if data.len == 0 {
            tracing::debug!("virtio-blk: request without a status byte");
            return 0;
        }
        let status_iov = data.split_tail(1);
        let (status, written) = if header_ok {
            out.skip(16);
            self.request(&hdr, &mut out, &mut data)
        } else {
            tracing::debug!("virtio-blk: short request header");
            (S_IOERR, 0)
        };
        write_status(&status_iov, status);
        (written + 1) as u32
    }

    /// Returns the status and the data bytes written into the guest's buffers.
    fn request(
        &self,
        hdr: &[u8; 16],
        out: &mut GuestIovecs,
        data: &mut GuestIovecs,
    ) -> (u8, usize) {
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        let check_range = |len: usize| -> Option<u64> {
            if !len.is_multiple_of(SECTOR as usize) || len > MAX_REQUEST {
                return None;
            }
            let end = sector.checked_add(len as u64 / SECTOR)?;
            (end <= self.capacity).then_some(sector * SECTOR)
        };
        let fd = self.file.as_raw_fd();
        match kind {
            T_IN => {
                let len = data.len;
                let Some(offset) = check_range(len) else {
                    tracing::debug!(sector, len, "virtio-blk: read out of range or malformed");
                    return (S_IOERR, 0);
                };
                match data.read_from(fd, offset) {
                    Ok(()) => (S_OK, len),
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-blk: read failed");
                        (S_IOERR, 0)
                    }
                }
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                let len = out.len;
                let Some(offset) = check_range(len) else {
                    tracing::debug!(sector, len, "virtio-blk: write out of range or malformed");
                    return (S_IOERR, 0);
                };
                let written = out.write_to(fd, offset);
                // Logged after the write (even a failed one may have changed blocks): a
                // checkpoint that reads the log between the two copies the new data now or
                // the block again next time, never neither.
                self.dirty.set_addr_range(offset as usize, len);
                match written {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-blk: write failed");
                        (S_IOERR, 0)
                    }
                }
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-blk: fdatasync failed");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => (S_OK, data.copy_in(&self.id)),
            _ => (S_UNSUPP, 0),
        }
    }
}

impl QueueHandler for BlockQueue {
    fn queues(&self) -> Vec<(usize, &Queue)> {
        vec![(0, &self.queue)]
    }
    fn queue_event(&mut self, _index: usize) {
        let mem = self.mem.memory();
        let mut used = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let len = self.execute(chain);
            if let Err(e) = self.queue.add_used(&*mem, head, len) {
                tracing::warn!(error = ?e, "virtio-blk: cannot return a used buffer");
            }
            used = true;
        }
        if used {
            self.interrupt.signal(INT_USED_RING);
        }
    }
}
