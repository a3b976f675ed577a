//! AF_VSOCK stream sockets (the standard library has none).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// The host's CID, as seen from a guest.
pub const HOST_CID: u32 = 2;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value before the fields are set.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A listening vsock socket on `port` for any CID.
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = socket()?;
    let a = sockaddr(libc::VMADDR_CID_ANY, port);
    // SAFETY: bind/listen with a valid sockaddr_vm of the right size on our socket.
    unsafe {
        if libc::bind(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            std::mem::size_of_val(&a) as u32,
        ) < 0
            || libc::listen(fd.as_raw_fd(), 16) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// Accepts one connection, as a stream (vsock streams behave like Unix streams for read/write).
pub fn accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept4 on a listening socket we own; the peer address is not needed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor we own; read/write on it are plain stream I/O.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

/// Connects to `cid:port`.
pub fn connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let fd = socket()?;
    let a = sockaddr(cid, port);
    // SAFETY: connect with a valid sockaddr_vm on our socket.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            std::mem::size_of_val(&a) as u32,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own fd and hand ownership to the stream.
    Ok(unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) })
}
