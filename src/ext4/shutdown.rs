//! `EXT4_IOC_SHUTDOWN`: stop a mounted ext4 filesystem from doing any more
//! I/O, the way xfstests' `godown` does.
//!
//! After the ioctl every new write (and most reads) on the filesystem fails
//! with EIO, the journal is aborted, and the only thing left to do with it is
//! unmount. It is this node's "stop writing now" when it is fenced. What it
//! does not do: wait for writes the block layer already holds (queued or
//! requeued I/O, see REFERENCE §5), or stop processes; killing them and
//! unmounting is the caller's job.
//!
//! The ioctl is `_IOR('X', 125, __u32)`; the kernel reads the flags word from
//! the pointer (despite the `_IOR`) and needs CAP_SYS_ADMIN.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::superblock::EXT4_SUPER_MAGIC;
use super::Ext4Error;

nix::ioctl_read!(ext4_ioc_shutdown, b'X', 125, u32);

/// How to shut the filesystem down (the `EXT4_GOING_FLAGS_*` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// `EXT4_GOING_FLAGS_DEFAULT` (0): freeze the block device (flushing dirty
    /// data and the journal), then shut down. Can block on a device that no
    /// longer answers.
    Default,
    /// `EXT4_GOING_FLAGS_LOGFLUSH` (1): commit the journal, then shut down;
    /// dirty data not yet written is dropped.
    LogFlush,
    /// `EXT4_GOING_FLAGS_NOLOGFLUSH` (2): shut down at once, writing nothing
    /// more. The fencing choice: it does not wait on the device.
    NoLogFlush,
}

impl ShutdownMode {
    /// The flags word passed to the kernel.
    pub fn flags(self) -> u32 {
        match self {
            ShutdownMode::Default => 0,
            ShutdownMode::LogFlush => 1,
            ShutdownMode::NoLogFlush => 2,
        }
    }
}

/// What to tell a user about a failed ioctl, by errno.
pub(crate) fn hint(e: nix::errno::Errno) -> &'static str {
    match e {
        nix::errno::Errno::EPERM | nix::errno::Errno::EACCES => {
            " (needs CAP_SYS_ADMIN: run as root or grant the capability)"
        }
        nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP => {
            " (the filesystem driver does not support shutdown: not mounted as ext4?)"
        }
        nix::errno::Errno::EINVAL => " (unknown shutdown mode for this kernel)",
        _ => "",
    }
}

/// Shuts down the ext4 filesystem mounted at `mount_dir` (any file or
/// directory on it works; the whole filesystem is shut down). A filesystem
/// already shut down returns `Ok`.
pub fn shutdown(mount_dir: impl AsRef<Path>, mode: ShutdownMode) -> Result<(), Ext4Error> {
    let path: PathBuf = mount_dir.as_ref().to_path_buf();
    let dir = std::fs::File::open(&path).map_err(|source| Ext4Error::Io {
        path: path.clone(),
        op: "open mount point",
        offset: 0,
        source,
    })?;
    let st = nix::sys::statfs::fstatfs(&dir).map_err(|e| Ext4Error::Io {
        path: path.clone(),
        op: "fstatfs",
        offset: 0,
        source: e.into(),
    })?;
    // The type's width differs between targets; compare as i64.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let fs_type = st.filesystem_type().0 as i64;
    if fs_type != i64::from(EXT4_SUPER_MAGIC) {
        return Err(Ext4Error::NotExt4 { path, fs_type });
    }
    let mut flags = mode.flags();
    // SAFETY: `dir` is an open descriptor for the duration of the call, and
    // `&mut flags` is a valid, aligned pointer to the `u32` the ioctl's
    // definition (`_IOR('X', 125, __u32)`) says it reads; the kernel keeps no
    // reference to it after returning.
    let res = unsafe { ext4_ioc_shutdown(dir.as_raw_fd(), &mut flags) };
    res.map(|_| ())
        .map_err(|source| Ext4Error::Shutdown { path, mode, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_match_the_kernel() {
        assert_eq!(ShutdownMode::Default.flags(), 0);
        assert_eq!(ShutdownMode::LogFlush.flags(), 1);
        assert_eq!(ShutdownMode::NoLogFlush.flags(), 2);
    }

    #[test]
    fn ioctl_number_is_ext4_ioc_shutdown() {
        // _IOR('X', 125, __u32) = dir read (2) << 30 | size 4 << 16 | 'X' << 8 | 125.
        let want: u64 = (2 << 30) | (4 << 16) | (u64::from(b'X') << 8) | 125;
        assert_eq!(want, 0x8004_587D);
        assert_eq!(
            nix::request_code_read!(b'X', 125, std::mem::size_of::<u32>()) as u64,
            want
        );
    }

    #[test]
    fn refuses_a_non_ext4_path() {
        let err = shutdown("/proc", ShutdownMode::NoLogFlush).expect_err("procfs is not ext4");
        assert!(matches!(err, Ext4Error::NotExt4 { .. }), "{err}");
        assert!(err.to_string().contains("/proc"), "{err}");
    }

    #[test]
    fn missing_mount_point_is_an_io_error() {
        let err = shutdown("/nonexistent/mnt", ShutdownMode::Default).expect_err("missing");
        assert!(matches!(err, Ext4Error::Io { .. }), "{err}");
    }
}
