//! `O_DIRECT` helpers for the ext4 module: an aligned buffer and whole-buffer
//! positional reads and writes.
//!
//! `O_DIRECT` needs the buffer address, the file offset and the length all
//! aligned to the device's logical block size. Everything here uses
//! [`DIO_ALIGN`] = 4096, a multiple of every logical block size in use (512
//! and 4096), so no sector-size query is needed.
//!
//! The only unsafe code of the module's I/O lives here: allocating, viewing and
//! freeing the aligned buffer.
#![allow(unsafe_code)]

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::ptr::NonNull;

use super::Ext4Error;

/// Alignment of every buffer, offset and length of direct I/O here.
pub(crate) const DIO_ALIGN: usize = 4096;

/// A zeroed heap buffer whose address is aligned to [`DIO_ALIGN`] and whose
/// length is a non-zero multiple of it.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is uniquely owned heap memory with no thread-bound state,
// like a `Box<[u8]>`, so moving it to another thread is as sound as for a Box.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only gives out `&[u8]` (no interior mutability), as
// `&Box<[u8]>` does.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `DIO_ALIGN * units` bytes (`units` >= 1).
    pub(crate) fn zeroed(units: usize) -> AlignedBuf {
        let len = DIO_ALIGN
            .checked_mul(units.max(1))
            .expect("direct I/O buffers here are a few pages");
        let layout = Layout::from_size_align(len, DIO_ALIGN)
            .expect("DIO_ALIGN is a power of two and len a small multiple of it");
        // SAFETY: `layout` has a non-zero size (len >= DIO_ALIGN > 0), as
        // `alloc_zeroed` requires.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` bytes allocated by us and
        // initialised (zeroed at allocation, then only written through
        // `as_mut_slice`); they stay valid until `drop`, and the returned
        // borrow of `self` keeps any `&mut` view from coexisting.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the `&mut self` borrow makes this view
        // unique for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly this
        // `layout` and is freed only here, once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

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
            let mut b = AlignedBuf::zeroed(units);
            assert_eq!(b.len(), units * DIO_ALIGN);
            assert_eq!(b.as_slice().as_ptr() as usize % DIO_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[DIO_ALIGN - 1] = 7;
            assert_eq!(b.as_slice()[DIO_ALIGN - 1], 7);
        }
        assert_eq!(AlignedBuf::zeroed(0).len(), DIO_ALIGN);
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
        let mut w = AlignedBuf::zeroed(1);
        w.as_mut_slice().fill(0xab);
        write_all_at_sync(&f, &path, &w, DIO_ALIGN as u64).expect("write");
        let r = open_direct(&path, false).expect("open direct");
        let mut b = AlignedBuf::zeroed(1);
        read_exact_at(&r, &path, &mut b, DIO_ALIGN as u64).expect("read");
        assert!(b.as_slice().iter().all(|&x| x == 0xab));
        // Past the end: a short read, reported as such.
        let mut b = AlignedBuf::zeroed(1);
        assert!(matches!(
            read_exact_at(&r, &path, &mut b, 3 * DIO_ALIGN as u64),
            Err(Ext4Error::ShortIo { got: 0, .. })
        ));
    }
}
