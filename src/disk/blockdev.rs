//! O_DIRECT block I/O on a real device (or a regular file, for tests), and the
//! aligned buffers it needs.
//!
//! This is the only file of the crate with `unsafe`: the three block-device
//! ioctls and the byte view of [`AlignedBuf`]. Every `unsafe` block says why it
//! is sound.
//!
//! Invariants:
//! - every I/O bypasses the page cache (`O_DIRECT`), so a read returns what is
//!   on the device *now*, including another node's last write, never a cached
//!   copy; and a write is on the device, not in this node's memory, when it
//!   returns;
//! - every write reaches stable storage before it returns: the device is opened
//!   with `O_DSYNC`, which the kernel honours on block devices by sending each
//!   direct write with FUA (or following it with a cache flush when the device
//!   has a volatile cache without FUA). For *regular files* (tests, images) the
//!   honouring of `O_DSYNC` depends on the filesystem, so by default an
//!   `fdatasync` follows every write there too; [`BlockDevice::set_fdatasync_after_write`]
//!   turns it on for block devices as well (for drivers suspected of ignoring
//!   FUA) at the cost of one extra flush per write;
//! - every I/O is checked before it is issued: offset and length multiples of
//!   `max(4096, logical sector)`, length non-zero, range inside the device;
//!   buffers are always 4096-aligned in memory ([`AlignedBuf`]);
//! - the device is never opened with `O_EXCL`: the filesystem on the same device
//!   is mounted while the lease runs.
//!
//! Sector sizes: a block device reports them with `BLKSSZGET` (logical) and
//! `BLKPBSZGET` (physical); its size comes from `BLKGETSIZE64`. A regular file
//! reports logical 512 (the smallest direct-I/O unit any Linux filesystem
//! needs, and what the file's blocks look like to a loop device over it) and
//! physical `st_blksize` (4096 on ext4 and xfs). Our I/O unit is 4096 either way.
//!
//! What this module must not do: interpret the bytes, retry writes, or block
//! the lease logic (deadlines are the [`crate::disk::worker`]'s job).

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::core::record::{Block, BLOCK};
use crate::disk::device::{check_io, DeviceIo};
use crate::disk::error::{DiskError, IoOp};

/// One 4096-byte, 4096-aligned page; `AlignedBuf` is a vector of these, which
/// gives the alignment O_DIRECT needs without a custom allocator.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page(Block);

const _: () = assert!(std::mem::size_of::<Page>() == BLOCK);
const _: () = assert!(std::mem::align_of::<Page>() == BLOCK);

/// A buffer for direct I/O: its address is 4096-aligned and its length a
/// non-zero multiple of 4096. Zero-initialised on creation.
#[derive(Clone)]
pub struct AlignedBuf {
    pages: Vec<Page>,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("blocks", &self.pages.len())
            .finish()
    }
}

impl AlignedBuf {
    /// A zeroed buffer of `count` blocks (at least one).
    pub fn zeroed_blocks(count: usize) -> AlignedBuf {
        AlignedBuf {
            pages: vec![Page([0u8; BLOCK]); count.max(1)],
        }
    }

    /// A buffer holding one block.
    pub fn from_block(block: &Block) -> AlignedBuf {
        AlignedBuf {
            pages: vec![Page(*block)],
        }
    }

    /// A buffer holding the given blocks in order (a zero block if empty).
    pub fn from_blocks(blocks: &[Block]) -> AlignedBuf {
        if blocks.is_empty() {
            return AlignedBuf::zeroed_blocks(1);
        }
        AlignedBuf {
            pages: blocks.iter().map(|b| Page(*b)).collect(),
        }
    }

    /// Length in bytes (a multiple of 4096).
    pub fn len(&self) -> usize {
        self.pages.len() * BLOCK
    }

    /// Always false: a buffer holds at least one block.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Number of 4096-byte blocks.
    pub fn block_count(&self) -> usize {
        self.pages.len()
    }

    /// Block `i`, if in range.
    pub fn block(&self, i: usize) -> Option<&Block> {
        self.pages.get(i).map(|p| &p.0)
    }

    /// Block `i` for writing, if in range.
    pub fn block_mut(&mut self, i: usize) -> Option<&mut Block> {
        self.pages.get_mut(i).map(|p| &mut p.0)
    }

    /// The blocks, copied out.
    pub fn to_blocks(&self) -> Vec<Block> {
        self.pages.iter().map(|p| p.0).collect()
    }

    /// The whole buffer as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `Page` is `repr(C)` around a `[u8; 4096]` with size exactly
        // 4096 (checked at compile time above), so a `Vec<Page>` is `len * 4096`
        // contiguous, initialised bytes with no padding. The slice borrows
        // `self`, so the vector cannot be reallocated or freed while it lives.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len()) }
    }

    /// The whole buffer as mutable bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `as_slice`; the unique borrow of `self` guarantees no
        // other view of the pages exists while the mutable slice lives, and any
        // byte pattern is a valid `Page`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), len) }
    }

    fn addr(&self) -> usize {
        self.pages.as_ptr() as usize
    }
}

/// What kind of thing was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    BlockDevice,
    RegularFile,
}

/// Whether the device is opened for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A block device or regular file opened with `O_DIRECT | O_DSYNC`.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    file: File,
    kind: DeviceKind,
    logical_sector: u32,
    physical_sector: u32,
    size: u64,
    fdatasync_after_write: bool,
}

nix::ioctl_read_bad!(ioctl_blksszget, libc::BLKSSZGET, libc::c_int);
nix::ioctl_read_bad!(ioctl_blkpbszget, libc::BLKPBSZGET, libc::c_uint);
// BLKGETSIZE64 is _IOR(0x12, 114, size_t) but the kernel stores a u64.
nix::ioctl_read_bad!(
    ioctl_blkgetsize64,
    nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()),
    u64
);

fn query_err(path: &Path, what: &'static str, e: nix::errno::Errno) -> DiskError {
    DiskError::Query {
        path: path.to_path_buf(),
        what,
        source: io::Error::from_raw_os_error(e as i32),
    }
}

impl BlockDevice {
    /// Opens `path` for lease I/O. Accepts a block device or a regular file
    /// (tests); refuses anything else before opening it (so a FIFO is never
    /// opened). Reads sector sizes and size once, at open.
    pub fn open(path: impl AsRef<Path>, access: Access) -> Result<BlockDevice, DiskError> {
        let path = path.as_ref();
        let owned = || path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, access, e))?;
        check_file_type(path, &meta.file_type())?;

        let mut opts = OpenOptions::new();
        opts.read(true)
            .write(access == Access::ReadWrite)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC);
        let file = opts.open(path).map_err(|e| open_error(path, access, e))?;
        // Check again on the open file: the path may have changed in between.
        let meta = file.metadata().map_err(|e| DiskError::Query {
            path: owned(),
            what: "file type",
            source: e,
        })?;
        check_file_type(path, &meta.file_type())?;

        let fd = file.as_raw_fd();
        let (kind, logical_sector, physical_sector, size) = if meta.file_type().is_block_device() {
            let mut logical: libc::c_int = 0;
            // SAFETY: `fd` is an open block device owned by `file`, alive for
            // this call; BLKSSZGET writes one `int` through the pointer, which
            // points to a live, properly aligned `c_int`.
            unsafe { ioctl_blksszget(fd, &mut logical) }
                .map_err(|e| query_err(path, "logical sector size (BLKSSZGET)", e))?;
            let mut physical: libc::c_uint = 0;
            // SAFETY: as above; BLKPBSZGET writes one `unsigned int`.
            unsafe { ioctl_blkpbszget(fd, &mut physical) }
                .map_err(|e| query_err(path, "physical sector size (BLKPBSZGET)", e))?;
            let mut size: u64 = 0;
            // SAFETY: as above; BLKGETSIZE64 writes one `u64` (the kernel's
            // `put_u64`), and `size` is a live, aligned `u64`.
            unsafe { ioctl_blkgetsize64(fd, &mut size) }
                .map_err(|e| query_err(path, "size (BLKGETSIZE64)", e))?;
            (
                DeviceKind::BlockDevice,
                u32::try_from(logical).unwrap_or(0),
                physical,
                size,
            )
        } else {
            let physical = u32::try_from(meta.blksize()).unwrap_or(4096).max(512);
            (DeviceKind::RegularFile, 512, physical, meta.size())
        };
        if logical_sector == 0 || logical_sector as usize > BLOCK {
            return Err(DiskError::SectorTooLarge {
                path: owned(),
                logical: logical_sector,
            });
        }
        Ok(BlockDevice {
            path: owned(),
            file,
            kind,
            logical_sector,
            physical_sector,
            size,
            fdatasync_after_write: kind == DeviceKind::RegularFile,
        })
    }

    /// Block device or regular file.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Whether every write is followed by `fdatasync` (default: regular files
    /// only; block devices rely on `O_DSYNC`).
    pub fn fdatasync_after_write(&self) -> bool {
        self.fdatasync_after_write
    }

    /// Turns the extra `fdatasync` after every write on or off.
    pub fn set_fdatasync_after_write(&mut self, on: bool) {
        self.fdatasync_after_write = on;
    }

    /// Reads the device size again (after the device was enlarged).
    pub fn refresh_size(&mut self) -> Result<u64, DiskError> {
        let size = match self.kind {
            DeviceKind::BlockDevice => {
                let mut size: u64 = 0;
                // SAFETY: `self.file` is an open block device for the duration of
                // the call; BLKGETSIZE64 writes one `u64` into the live `size`.
                unsafe { ioctl_blkgetsize64(self.file.as_raw_fd(), &mut size) }
                    .map_err(|e| query_err(&self.path, "size (BLKGETSIZE64)", e))?;
                size
            }
            DeviceKind::RegularFile => self
                .file
                .metadata()
                .map_err(|e| DiskError::Query {
                    path: self.path.clone(),
                    what: "size",
                    source: e,
                })?
                .size(),
        };
        self.size = size;
        Ok(size)
    }

    fn io_err(&self, op: IoOp, offset: u64, len: usize, source: io::Error) -> DiskError {
        DiskError::Io {
            path: self.path.clone(),
            op,
            offset,
            len,
            source,
        }
    }
}

fn check_file_type(path: &Path, ft: &std::fs::FileType) -> Result<(), DiskError> {
    let kind = if ft.is_block_device() || ft.is_file() {
        return Ok(());
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(DiskError::NotBlockDevice {
        path: path.to_path_buf(),
        kind,
    })
}

fn open_error(path: &Path, access: Access, e: io::Error) -> DiskError {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
            DiskError::NoSuchDevice { path }
        }
        Some(libc::EACCES) | Some(libc::EPERM) => DiskError::PermissionDenied {
            path,
            access: match access {
                Access::ReadOnly => "reading",
                Access::ReadWrite => "reading and writing",
            },
        },
        Some(libc::EINVAL) => DiskError::DirectIoUnsupported { path },
        _ => DiskError::Open { path, source: e },
    }
}

impl DeviceIo for BlockDevice {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn logical_sector(&self) -> u32 {
        self.logical_sector
    }

    fn physical_sector(&self) -> u32 {
        self.physical_sector
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, DiskError> {
        check_io(self, offset, len)?;
        let mut buf = AlignedBuf::zeroed_blocks(len / BLOCK);
        debug_assert_eq!(buf.addr() % BLOCK, 0);
        let mut done = 0;
        while done < len {
            match self
                .file
                .read_at(&mut buf.as_mut_slice()[done..], offset + done as u64)
            {
                Ok(0) => {
                    return Err(DiskError::ShortIo {
                        path: self.path.clone(),
                        op: IoOp::Read,
                        offset,
                        len,
                        got: done,
                    })
                }
                // A partial direct read ends on a sector boundary, so the rest is
                // still aligned; continue from there.
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(IoOp::Read, offset, len, e)),
            }
        }
        Ok(buf)
    }

    fn write_at(&self, offset: u64, buf: &AlignedBuf) -> Result<(), DiskError> {
        let len = buf.len();
        check_io(self, offset, len)?;
        debug_assert_eq!(buf.addr() % BLOCK, 0);
        let mut done = 0;
        while done < len {
            match self
                .file
                .write_at(&buf.as_slice()[done..], offset + done as u64)
            {
                Ok(0) => {
                    return Err(DiskError::ShortIo {
                        path: self.path.clone(),
                        op: IoOp::Write,
                        offset,
                        len,
                        got: done,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(IoOp::Write, offset, len, e)),
            }
        }
        if self.fdatasync_after_write {
            self.file
                .sync_data()
                .map_err(|e| self.io_err(IoOp::Write, offset, len, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_round_trips_blocks() {
        let mut b = [0u8; BLOCK];
        b[0] = 1;
        b[BLOCK - 1] = 2;
        for n in 1..5 {
            let buf = AlignedBuf::from_blocks(&vec![b; n]);
            assert_eq!(buf.addr() % BLOCK, 0);
            assert_eq!(buf.len(), n * BLOCK);
            assert_eq!(buf.as_slice()[BLOCK - 1], 2);
            assert_eq!(buf.to_blocks(), vec![b; n]);
        }
        let mut z = AlignedBuf::zeroed_blocks(0);
        assert_eq!(z.len(), BLOCK);
        z.as_mut_slice()[5] = 9;
        assert_eq!(z.block(0).map(|b| b[5]), Some(9));
        assert!(z.block(1).is_none());
    }

    fn temp_file(len: u64) -> tempfile::NamedTempFile {
        // Not /dev/shm: tmpfs may refuse O_DIRECT. The target directory is on the
        // build filesystem.
        let dir = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let f = tempfile::NamedTempFile::new_in(dir).expect("temp file");
        f.as_file().set_len(len).expect("set_len");
        f
    }

    #[test]
    fn regular_file_sizes_and_direct_io() {
        let f = temp_file(1 << 20);
        let dev = match BlockDevice::open(f.path(), Access::ReadWrite) {
            Err(DiskError::DirectIoUnsupported { .. }) => {
                eprintln!("skipped: temp dir does not support O_DIRECT");
                return;
            }
            r => r.expect("open"),
        };
        assert_eq!(dev.kind(), DeviceKind::RegularFile);
        assert_eq!(dev.logical_sector(), 512);
        assert!(dev.physical_sector() >= 512);
        assert_eq!(dev.size_bytes(), 1 << 20);
        assert!(dev.fdatasync_after_write());

        let mut block = [0u8; BLOCK];
        block[..5].copy_from_slice(b"hello");
        dev.write_at(8192, &AlignedBuf::from_block(&block))
            .expect("write");
        let back = dev.read_at(8192, BLOCK).expect("read");
        assert_eq!(back.block(0), Some(&block));
        // The bytes are in the file itself, not only in our buffer.
        let raw = std::fs::read(f.path()).expect("read file");
        assert_eq!(&raw[8192..8197], b"hello");
    }

    #[test]
    fn misaligned_and_out_of_range_io_is_refused_before_issue() {
        let f = temp_file(1 << 20);
        let dev = match BlockDevice::open(f.path(), Access::ReadWrite) {
            Err(DiskError::DirectIoUnsupported { .. }) => return,
            r => r.expect("open"),
        };
        for (off, len) in [(512u64, BLOCK), (0, 512), (0, 0), (4096 + 1, BLOCK)] {
            match dev.read_at(off, len) {
                Err(DiskError::Misaligned { align, .. }) => assert_eq!(align, 4096),
                r => panic!("{off}/{len}: {r:?}"),
            }
        }
        assert!(matches!(
            dev.read_at(1 << 20, BLOCK),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.write_at((1 << 20) - 4096, &AlignedBuf::zeroed_blocks(2)),
            Err(DiskError::OutOfRange { .. })
        ));
    }

    #[test]
    fn open_errors_say_what_is_wrong() {
        assert!(matches!(
            BlockDevice::open("/nonexistent/blockfence", Access::ReadOnly),
            Err(DiskError::NoSuchDevice { .. })
        ));
        assert!(matches!(
            BlockDevice::open("/", Access::ReadOnly),
            Err(DiskError::NotBlockDevice {
                kind: "directory",
                ..
            })
        ));
        assert!(matches!(
            BlockDevice::open("/dev/null", Access::ReadOnly),
            Err(DiskError::NotBlockDevice {
                kind: "character device",
                ..
            })
        ));
        let e = BlockDevice::open("/dev/null", Access::ReadOnly).unwrap_err();
        assert!(e.to_string().contains("not a block device"), "{e}");
    }
}
