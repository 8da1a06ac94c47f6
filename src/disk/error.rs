//! The one error type of the disk layer.
//!
//! Every variant carries the device path and, where there is one, the byte
//! offset, so a message can be acted on without a debugger. Variants a user can
//! meet (wrong device, too small, not formatted, damaged, grown) say what to do.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::core::params::ParamsError;

/// Which copy of the area header an error or a warning is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderCopy {
    /// Copy A, the first block of the area.
    A,
    /// Copy B, the last block of the area.
    B,
    /// Both copies.
    Both,
}

impl fmt::Display for HeaderCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderCopy::A => write!(f, "A (first block of the area)"),
            HeaderCopy::B => write!(f, "B (last block of the area)"),
            HeaderCopy::Both => write!(f, "A and B"),
        }
    }
}

/// Direction of a failed I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoOp::Read => write!(f, "read"),
            IoOp::Write => write!(f, "write"),
        }
    }
}

/// Everything that can go wrong in `disk`.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(
        "no such device or file: {path}; check the path (`lsblk` lists this node's block devices)"
    )]
    NoSuchDevice { path: PathBuf },

    #[error(
        "{path} is a {kind}, not a block device or a regular file: give the path of the \
         volume's block device (`lsblk` lists this node's block devices)"
    )]
    NotBlockDevice { path: PathBuf, kind: &'static str },

    #[error(
        "permission denied opening {path} for {access}: blockfence must run as root \
         (or with CAP_SYS_ADMIN and write access to the device)"
    )]
    PermissionDenied { path: PathBuf, access: &'static str },

    #[error(
        "{path} does not support direct I/O (O_DIRECT); lease I/O must bypass the page \
         cache. Use a block device, or a file on a filesystem that supports O_DIRECT \
         (ext4, xfs; not tmpfs)"
    )]
    DirectIoUnsupported { path: PathBuf },

    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot query {what} of {path}: {source}")]
    Query {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} has a logical sector size of {logical} bytes; blockfence records are \
         4096-byte blocks and need a logical sector size of at most 4096"
    )]
    SectorTooLarge { path: PathBuf, logical: u32 },

    #[error(
        "{path} is too small: {size} bytes, blockfence needs at least {min} bytes \
         ({min_mib} MiB: a 1 MiB lease area at the end plus room for a filesystem)",
        min_mib = min / (1024 * 1024)
    )]
    TooSmall { path: PathBuf, size: u64, min: u64 },

    #[error(
        "misaligned I/O on {path}: offset {offset} and length {len} must be multiples of \
         {align} bytes (and non-zero length)"
    )]
    Misaligned {
        path: PathBuf,
        offset: u64,
        len: usize,
        align: u32,
    },

    #[error("I/O beyond the end of {path}: offset {offset} length {len}, device size {size}")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: usize,
        size: u64,
    },

    #[error("{op} of {len} bytes at offset {offset} on {path} failed: {source}")]
    Io {
        path: PathBuf,
        op: IoOp,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },

    #[error("short {op} at offset {offset} on {path}: {got} of {len} bytes")]
    ShortIo {
        path: PathBuf,
        op: IoOp,
        offset: u64,
        len: usize,
        got: usize,
    },

    #[error("block {block} (count {count}) is outside the lease area ({blocks} blocks) on {path}")]
    OutsideArea {
        path: PathBuf,
        block: u64,
        count: usize,
        blocks: u64,
    },

    #[error(
        "refusing to write block {block} of the lease area on {path}: only the owner \
         record and the slots are written through a BlockStore (headers are written by \
         format and grow)"
    )]
    ReadOnlyBlock { path: PathBuf, block: u64 },

    #[error(
        "no blockfence lease area on {path} (looked for a header at offset {offset}): \
         format the volume with `blockfence format {path}`"
    )]
    NotFormatted { path: PathBuf, offset: u64 },

    #[error(
        "the lease area header on {path} at offset {offset} is damaged (copy {which}: \
         {reason}); no intact copy is left. Nothing was changed. Check the device; if no \
         node uses the volume, re-create the lease area with `blockfence format`"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        which: HeaderCopy,
        reason: String,
    },

    #[error(
        "the two header copies of the lease area on {path} at offset {offset} are both \
         intact but disagree ({detail}); refusing to guess which one is right"
    )]
    HeaderMismatch {
        path: PathBuf,
        offset: u64,
        detail: String,
    },

    #[error(
        "the lease area on {path} at offset {offset} was moved to offset {moved_to} by \
         `blockfence grow`, but this node sees the device as {device_size} bytes. Make \
         the kernel re-read the device size (for example `echo 1 > \
         /sys/class/block/DEV/device/rescan` for SCSI, `nvme ns-rescan` for NVMe, \
         `losetup -c DEV` for a loop device) and retry"
    )]
    Moved {
        path: PathBuf,
        offset: u64,
        moved_to: u64,
        device_size: u64,
    },

    #[error(
        "the device {path} was enlarged: its lease area is still at offset {old_offset}, \
         but a device of this size keeps it at {new_offset}. Run `blockfence grow {path}`"
    )]
    DeviceGrown {
        path: PathBuf,
        old_offset: u64,
        new_offset: u64,
    },

    #[error(
        "the lease area on {path} is already at the end of the device ({device_size} bytes, \
         area at offset {offset}): nothing to grow. If the device was enlarged, make the \
         kernel re-read its size first (`losetup -c DEV` for a loop device, `echo 1 > \
         /sys/class/block/DEV/device/rescan` for SCSI, `nvme ns-rescan` for NVMe)"
    )]
    NothingToGrow {
        path: PathBuf,
        offset: u64,
        device_size: u64,
    },

    #[error(
        "no lease area found on {path}: searched {searched_bytes} bytes below offset \
         {below} for an intact header. If the volume was never formatted, run `blockfence \
         format {path}`; if the device grew by more than that, pass the old area's offset \
         (`blockfence grow --old-offset BYTES`)"
    )]
    OldAreaNotFound {
        path: PathBuf,
        below: u64,
        searched_bytes: u64,
    },

    #[error(
        "refusing to move the lease area on {path}: {reason}. Release the lease first \
         (stop what holds it: SIGTERM its `blockfence lease acquire`) and run grow again; \
         only if blockfence is stopped on every node (a crashed holder left a stale \
         record), `blockfence grow --force`"
    )]
    GrowRefused { path: PathBuf, reason: String },

    #[error("invalid number of slots {max_slots}: it must be between 1 and {max}")]
    BadMaxSlots { max_slots: u16, max: u16 },

    #[error("invalid timing parameters: {0}")]
    BadParams(#[from] ParamsError),

    #[error(
        "host_dead ceiling {ceiling_ms} ms is shorter than host_dead of the format \
         parameters ({needed_ms} ms)"
    )]
    BadHostDeadCeiling { ceiling_ms: u32, needed_ms: u64 },

    #[error("cannot start the I/O worker thread for {name}: {source}")]
    WorkerSpawn {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("injected fault on {path}: {what}")]
    Injected { path: PathBuf, what: &'static str },
}

impl DiskError {
    /// The device path the error is about, when it is about one.
    pub fn path(&self) -> Option<&std::path::Path> {
        use DiskError::*;
        match self {
            NoSuchDevice { path }
            | NotBlockDevice { path, .. }
            | PermissionDenied { path, .. }
            | DirectIoUnsupported { path }
            | Open { path, .. }
            | Query { path, .. }
            | SectorTooLarge { path, .. }
            | TooSmall { path, .. }
            | Misaligned { path, .. }
            | OutOfRange { path, .. }
            | Io { path, .. }
            | ShortIo { path, .. }
            | OutsideArea { path, .. }
            | ReadOnlyBlock { path, .. }
            | NotFormatted { path, .. }
            | Corrupt { path, .. }
            | HeaderMismatch { path, .. }
            | Moved { path, .. }
            | DeviceGrown { path, .. }
            | NothingToGrow { path, .. }
            | OldAreaNotFound { path, .. }
            | GrowRefused { path, .. }
            | Injected { path, .. } => Some(path),
            BadMaxSlots { .. } | BadParams(_) | BadHostDeadCeiling { .. } | WorkerSpawn { .. } => {
                None
            }
        }
    }
}
