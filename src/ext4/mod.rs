//! ext4 superblock and multi-mount protection (MMP): parsing, direct reads,
//! marking MMP clean after a proven takeover, and the shutdown ioctl.
//!
//! blockfence decides who may write a volume with its own lease; ext4 MMP stays
//! enabled underneath as a last line of defence (a second mount of an *active*
//! filesystem waits and then fails). This module lets the daemon look at MMP,
//! report it, clear it after a takeover the lease has proven safe (so the new
//! holder mounts at once instead of waiting out the kernel's MMP check), and
//! stop a filesystem dead with `EXT4_IOC_SHUTDOWN` when this node is fenced.
//!
//! Layout:
//! - `checksum`: ext4's crc32c convention, [`ext4_crc32c`] (pure);
//! - [`superblock`]: [`Superblock::parse`] of the 1024 bytes at device offset
//!   1024 (pure);
//! - [`mmp`]: [`Mmp::parse`], [`MmpState`], [`mmp_wait_seconds`], the report a
//!   CLI prints (pure);
//! - [`device`]: reads and the clean write of a device, always with `O_DIRECT`
//!   (the block device page cache is stale when another node writes), over
//!   the aligned-buffer helpers of `dio` (the module's only unsafe code besides
//!   the ioctl);
//! - [`shutdown()`]: `EXT4_IOC_SHUTDOWN` on a mount point.
//!
//! Invariants:
//! - parsing never panics, whatever the bytes, and never returns an MMP block
//!   or a superblock whose magic or (with `metadata_csum`) checksum is wrong;
//! - every read of on-disk state bypasses the page cache;
//! - nothing here runs `tune2fs`, `e2fsck` or any other tool, and nothing here
//!   decides *whether* a takeover is safe: that is the lease's job.

mod checksum;
pub mod device;
mod dio;
pub mod mmp;
mod shutdown;
pub mod superblock;

use std::path::PathBuf;

pub use checksum::ext4_crc32c;
pub use device::{mark_mmp_clean, read_mmp, read_superblock, Ext4Device};
pub use mmp::{mmp_wait_seconds, Mmp, MmpReport, MmpState};
pub use shutdown::{shutdown, ShutdownMode};
pub use superblock::{ErrorBehavior, Superblock};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// A buffer handed to a parser is shorter than the structure.
    #[error("{what} is {got} bytes long, need at least {need}")]
    TooShort {
        what: &'static str,
        got: usize,
        need: usize,
    },
    /// The superblock magic is not 0xEF53: not an ext2/3/4 filesystem.
    #[error(
        "not an ext4 filesystem: superblock magic is {found:#06x}, expected 0xef53 \
         (wrong device or partition?)"
    )]
    BadMagic { found: u16 },
    /// `s_log_block_size` gives a block size outside 1 KiB..=64 KiB.
    #[error("invalid superblock: s_log_block_size is {log}, block size must be 1 KiB to 64 KiB")]
    BadBlockSize { log: u32 },
    /// `metadata_csum` is on but the checksum type is not crc32c (1).
    #[error("unsupported metadata checksum type {0} (only 1, crc32c, is defined)")]
    UnsupportedChecksumType(u8),
    /// The superblock's own checksum does not match its bytes.
    #[error(
        "superblock checksum mismatch: stored {stored:#010x}, computed {computed:#010x} \
         (damaged, or caught mid-write on a mounted filesystem: read again; if it \
         persists, run e2fsck while no node has it mounted)"
    )]
    BadSuperblockChecksum { stored: u32, computed: u32 },
    /// The filesystem has no `mmp` feature.
    #[error(
        "the filesystem does not have the mmp feature; enable it with \
         `tune2fs -O mmp` while no node has it mounted"
    )]
    MmpNotEnabled,
    /// `s_mmp_block` points outside the filesystem (the kernel refuses to mount).
    #[error(
        "superblock names MMP block {block}, outside the filesystem's blocks {first}..{count}"
    )]
    BadMmpBlock { block: u64, first: u32, count: u64 },
    /// The MMP block does not start with the MMP magic.
    #[error("MMP block {block}: bad magic {found:#010x}, expected 0x004d4d50 (never written or damaged)")]
    BadMmpMagic { block: u64, found: u32 },
    /// With `metadata_csum`, the MMP checksum does not match (the kernel refuses
    /// to mount with EFSBADCRC).
    #[error(
        "MMP block {block}: checksum mismatch: stored {stored:#010x}, computed {computed:#010x} \
         (torn or damaged write)"
    )]
    BadMmpChecksum {
        block: u64,
        stored: u32,
        computed: u32,
    },
    /// A system call on a device failed.
    #[error("{}: {op} at byte {offset}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The device ended before the structure did.
    #[error(
        "{}: short {op} at byte {offset}: {got} of {want} bytes (device smaller than \
         the filesystem says?)",
        path.display()
    )]
    ShortIo {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        got: usize,
        want: usize,
    },
    /// What was read from a device is not valid; `source` says why.
    #[error("{}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: Box<Ext4Error>,
    },
    /// The device is held exclusively on this node (mounted, most likely).
    #[error(
        "{}: in use on this node (mounted, or held open exclusively); unmount it before \
         marking MMP clean",
        path.display()
    )]
    Busy { path: PathBuf },
    /// The clean MMP block did not read back as written.
    #[error(
        "{}: MMP block {block} reads back seq {found:#010x} after being written clean \
         (someone else is writing it?)",
        path.display()
    )]
    NotPersisted {
        path: PathBuf,
        block: u64,
        found: u32,
    },
    /// The path given to [`shutdown()`] is not on an ext4 filesystem.
    #[error(
        "{}: not on an ext4 filesystem (statfs type {fs_type:#x}); give the mount point of \
         the ext4 filesystem to shut down",
        path.display()
    )]
    NotExt4 { path: PathBuf, fs_type: i64 },
    /// The `EXT4_IOC_SHUTDOWN` ioctl failed.
    #[error("{}: EXT4_IOC_SHUTDOWN ({mode:?}) failed: {source}{}", path.display(), shutdown::hint(*source))]
    Shutdown {
        path: PathBuf,
        mode: ShutdownMode,
        #[source]
        source: nix::errno::Errno,
    },
}

impl Ext4Error {
    /// The innermost error, past any [`Ext4Error::Invalid`] wrapper: what to
    /// match on when the device path does not matter.
    pub fn root(&self) -> &Ext4Error {
        match self {
            Ext4Error::Invalid { source, .. } => source.root(),
            other => other,
        }
    }
}
