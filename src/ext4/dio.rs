//! `O_DIRECT` helpers for the ext4 module: whole-buffer positional reads and
//! writes into the crate's aligned buffer (`disk::blockdev::AlignedBuf`).
//!
//! `O_DIRECT` needs the buffer address, the file offset and the length all
//! aligned to the device's logical block size. Everything here uses
//! [`DIO_ALIGN`] = 4096, a multiple of every logical block size in use (512
//! and 4096), so no sector-size query is needed.
//!
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use super::Ext4Error;

/// Alignment of every buffer, offset and length of direct I/O here.
pub(crate) const DIO_ALIGN: usize = 4096;

/// The aligned buffer: the lease code's, so the crate has one.
pub(crate) use crate::disk::blockdev::AlignedBuf;

/// Opens `path` for direct I/O: read-only, or read-write with `O_EXCL`, which
/// on a block device fails with EBUSY while it is mounted on this node.
pub(crate) fn open_direct(path: &Path, write: bool) -> Result<File, Ext4Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if write {
        flags |= libc::O_EXCL;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| {
            if write && source.raw_os_error() == Some(libc::EBUSY) {
                Ext4Error::Busy {
                    path: path.to_path_buf(),
                }
            } else {
                Ext4Error::Io {
                    path: path.to_path_buf(),
                    op: if write {
                        "open read-write (O_DIRECT|O_EXCL)"
                    } else {
                        "open (O_DIRECT)"
                    },
                    offset: 0,
                    source,
                }
            }
        })
}

/// Turns `O_DIRECT` on for an already open file (Linux allows it with F_SETFL).
pub(crate) fn set_direct(file: &File, path: &Path) -> Result<(), Ext4Error> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let io = |e: nix::errno::Errno| Ext4Error::Io {
        path: path.to_path_buf(),
        op: "fcntl(O_DIRECT)",
        offset: 0,
        source: e.into(),
    };
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(io)?);
    if !flags.contains(OFlag::O_DIRECT) {
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)).map_err(io)?;
    }
    Ok(())
}

/// Fills `buf` from `offset` (aligned), retrying short reads and EINTR.
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    buf: &mut AlignedBuf,
    offset: u64,
) -> Result<(), Ext4Error> {
    let want = buf.len();
    let mut done = 0usize;
    while done < want {
        let at = offset + done as u64;
        match nix::sys::uio::pread(file.as_fd(), &mut buf.as_mut_slice()[done..], at as i64) {
            Ok(0) => {
                return Err(Ext4Error::ShortIo {
                    path: path.to_path_buf(),
                    op: "read",
                    offset,
                    got: done,
                    want,
                })
            }
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Ext4Error::Io {
                    path: path.to_path_buf(),
                    op: "read (O_DIRECT)",
                    offset: at,
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// Writes all of `buf` at `offset` (aligned), then `fdatasync`s, so the data
/// is on stable storage (the device cache flushed) when this returns.
pub(crate) fn write_all_at_sync(
    file: &File,
    path: &Path,
    buf: &AlignedBuf,
    offset: u64,
) -> Result<(), Ext4Error> {
    let want = buf.len();
    let mut done = 0usize;
    while done < want {
        let at = offset + done as u64;
        match nix::sys::uio::pwrite(file.as_fd(), &buf.as_slice()[done..], at as i64) {
            Ok(0) => {
                return Err(Ext4Error::ShortIo {
                    path: path.to_path_buf(),
                    op: "write",
                    offset,
                    got: done,
                    want,
                })
            }
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(Ext4Error::Io {
                    path: path.to_path_buf(),
                    op: "write (O_DIRECT)",
                    offset: at,
                    source: e.into(),
                })
            }
        }
    }
    file.sync_data().map_err(|source| Ext4Error::Io {
        path: path.to_path_buf(),
        op: "fdatasync",
        offset,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        for units in [1, 2, 3] {
            let mut b = AlignedBuf::zeroed_blocks(units);
            assert_eq!(b.len(), units * DIO_ALIGN);
            assert_eq!(b.as_slice().as_ptr() as usize % DIO_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[DIO_ALIGN - 1] = 7;
            assert_eq!(b.as_slice()[DIO_ALIGN - 1], 7);
        }
        assert_eq!(AlignedBuf::zeroed_blocks(0).len(), DIO_ALIGN);
    }

    #[test]
    fn direct_round_trip_on_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 3 * DIO_ALIGN]).expect("create");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        set_direct(&f, &path).expect("O_DIRECT on a file");
        let mut w = AlignedBuf::zeroed_blocks(1);
        w.as_mut_slice().fill(0xab);
        write_all_at_sync(&f, &path, &w, DIO_ALIGN as u64).expect("write");
        let r = open_direct(&path, false).expect("open direct");
        let mut b = AlignedBuf::zeroed_blocks(1);
        read_exact_at(&r, &path, &mut b, DIO_ALIGN as u64).expect("read");
        assert!(b.as_slice().iter().all(|&x| x == 0xab));
        // Past the end: a short read, reported as such.
        let mut b = AlignedBuf::zeroed_blocks(1);
        assert!(matches!(
            read_exact_at(&r, &path, &mut b, 3 * DIO_ALIGN as u64),
            Err(Ext4Error::ShortIo { got: 0, .. })
        ));
    }
}
