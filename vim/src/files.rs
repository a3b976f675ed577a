//! vimd's file handling in one place: private files written whole, images and disks copied
//! without expanding their holes, files opened only when they are what they claim to be, and a
//! bounded tail of a (guest-written, so untrusted) log. Everything here blocks: async callers
//! run it on `spawn_blocking`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates a directory (and its parents) that only its owner can enter, and tightens one that
/// exists with a looser mode (a state directory made by an older vimd).
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `bytes` as `path`, readable by its owner only from the moment it exists: a temporary
/// file of a name no other writer uses, created 0600, synced, then renamed over `path`, so a
/// reader (nats-server reloading) sees the old file or the new one, never half of one.
pub fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", crate::db::new_id()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Opens `path` for reading only if it is a regular file, without following a symlink and
/// without blocking on a FIFO or a device (either would hang or leak what the caller must not
/// read).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(e.kind(), "is a symbolic link")
            } else {
                e
            }
        })?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {what}, not a regular file"),
        ));
    }
    Ok(f)
}

/// Copies `src` to a new file `dst` (0600, synced) keeping its holes: a reflink where the
/// filesystem shares blocks (FICLONE), else only the data ranges (SEEK_DATA/SEEK_HOLE) through
/// `copy_file_range`, with the length set so the holes stay holes. A 10 GiB sparse image with
/// 100 MiB of data costs 100 MiB, not 10 GiB.
pub fn copy_sparse(src: &File, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)?;
    // FICLONE = _IOW(0x94, 9, int).
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its argument; both fds are open and ours.
    let cloned = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0;
    if !cloned {
        let len = src.metadata()?.len();
        out.set_len(len)?;
        let (sfd, dfd) = (src.as_raw_fd(), out.as_raw_fd());
        let mut pos: i64 = 0;
        while (pos as u64) < len {
            // SAFETY: lseek on our open descriptor.
            let data = unsafe { libc::lseek(sfd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // only a hole remains
                }
                return Err(e);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(sfd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let (mut from, mut to) = (data, data);
            while from < hole {
                // SAFETY: both offsets point to our own locals; the fds are open.
                let n = unsafe {
                    libc::copy_file_range(sfd, &mut from, dfd, &mut to, (hole - from) as usize, 0)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    // Between filesystems (a local file to NFS shared storage) the kernel
                    // refuses (EXDEV since 5.19): copy through a buffer.
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                    ) {
                        copy_range(src, &out, from as u64, hole as u64)?;
                        break;
                    }
                    return Err(e);
                }
                if n == 0 {
                    break; // the source shrank under us
                }
            }
            pos = hole;
        }
    }
    out.sync_all()
}

/// Copies bytes `from..to` of `src` to the same place in `dst`, through a buffer.
fn copy_range(src: &File, dst: &File, mut from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while from < to {
        let want = buf.len().min((to - from) as usize);
        let n = src.read_at(&mut buf[..want], from)?;
        if n == 0 {
            break; // the source shrank under us
        }
        dst.write_all_at(&buf[..n], from)?;
        from += n as u64;
    }
    Ok(())
}

/// At most the last `max` bytes of `path` (empty when it does not exist), starting at a line
/// boundary where one is near: a log a guest can make as large as it likes is never read whole.
pub fn tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(max).read_to_end(&mut buf)?;
    if start > 0 {
        if let Some(nl) = buf.iter().take(4096).position(|b| *b == b'\n') {
            buf.drain(..=nl);
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_files_are_0600_from_the_start_and_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        replace_private(&p, b"one").unwrap();
        replace_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // No temporary left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        let sub = d.path().join("a/b");
        private_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&sub).unwrap();
        assert_eq!(std::fs::metadata(&sub).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn only_regular_files_open() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(open_regular(&f).is_ok());
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let e = open_regular(&l).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let fifo = d.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let e = open_regular(d.path()).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
    }

    #[test]
    fn sparse_copies_keep_holes_and_data() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut f = std::fs::File::create(&src).unwrap();
        let len = 64 << 20;
        f.set_len(len).unwrap();
        for at in [0u64, 20 << 20, len - 4096] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[0xab; 4096]).unwrap();
        }
        f.sync_all().unwrap();
        let dst = d.path().join("dst");
        copy_sparse(&open_regular(&src).unwrap(), &dst).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(a, b);
        let m = std::fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), len);
        // 12 KiB of data (the filesystem may round each extent up); far from 64 MiB.
        assert!(
            m.blocks() * 512 < 4 << 20,
            "holes filled: {} bytes",
            m.blocks() * 512
        );
        assert_eq!(m.mode() & 0o777, 0o600);
    }

    /// /dev/shm (tmpfs) to the temporary directory: another filesystem where the machine has one.
    #[test]
    fn sparse_copies_cross_filesystems() {
        let Ok(a) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let b = tempfile::tempdir().unwrap();
        let src = a.path().join("src");
        let mut f = std::fs::File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(&[0x5a; 3 << 20]).unwrap();
        let dst = b.path().join("dst");
        copy_sparse(&open_regular(&src).unwrap(), &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }

    #[test]
    fn tails_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let text: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        let t = tail(&p, 1000).unwrap();
        assert!(t.len() <= 1000);
        let t = String::from_utf8(t).unwrap();
        assert!(t.starts_with("line ") && t.ends_with("line 9999\n"), "{t}");
        assert_eq!(tail(&p, 1 << 20).unwrap(), text.as_bytes());
        assert!(tail(&d.path().join("none"), 10).unwrap().is_empty());
    }
}
