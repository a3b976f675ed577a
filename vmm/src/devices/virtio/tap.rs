//! A Linux tap device: opened by name (created if it does not exist, which needs CAP_NET_ADMIN),
//! non-blocking, with a 12-byte virtio-net header on every frame so frames — including checksum
//! and segmentation offload requests — pass between the tap and the guest's queues unchanged.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

/// The virtio-net header of VIRTIO_F_VERSION_1 devices (with num_buffers).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(std::io::Error),
    #[error("cannot attach to tap '{0}': {1} (does it exist, or may this process create it?)")]
    Attach(String, std::io::Error),
    #[error("cannot set the virtio-net header size on tap '{0}': {1}")]
    VnetHdr(String, std::io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq-sized structure we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(TapError::VnetHdr(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// A "tap" over a descriptor that is already open and behaves like one (a datagram
    /// socketpair in the fuzz targets, which have no tap to attach to).
    #[doc(hidden)]
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Which offloads the tap may hand the guest (frames with partial checksums or GSO).
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (with its virtio-net header) into `iovs`; `WouldBlock` when none waits.
    pub fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        self.vectored(iovs, false)
    }

    /// Writes one frame (with its virtio-net header) gathered from `iovs`.
    pub fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        self.vectored(iovs, true)
    }

    fn vectored(&self, iovs: &[libc::iovec], write: bool) -> std::io::Result<usize> {
        let (fd, cnt) = (self.file.as_raw_fd(), iovs.len() as libc::c_int);
        // SAFETY: the iovecs describe guest buffers that outlive the call; the kernel copies one
        // frame to or from them.
        let n = unsafe {
            if write {
                libc::writev(fd, iovs.as_ptr(), cnt)
            } else {
                libc::readv(fd, iovs.as_ptr(), cnt)
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
