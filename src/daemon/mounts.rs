//! Where a volume's device is mounted on this node, and the fence of all of
//! those mounts.
//!
//! The daemon fences by device, not by a path a client told it: every mount
//! of the device's filesystem in the daemon's mount namespace (bind mounts
//! included) is fenced. A mount in another namespace is not seen here: the
//! DaemonSet shares the host's mount namespace and pods' volume mounts
//! propagate to it (docs/CONFIG.md), and `blockfence run` fences its own mount
//! as well.

use crate::fence::holders::{parse_mountinfo, MountEntry};
use crate::fence::{run_fence, FenceOps, FenceReport, Watchdog};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The device number (`st_rdev`) of a block device, or `None` for a regular
/// file (an image used in tests), which has no mounts to find.
pub fn device_number(device: &Path) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(device)?;
    Ok(meta.file_type().is_block_device().then(|| meta.rdev()))
}

/// The mounts of the filesystem on device `rdev`, in this process's mount
/// namespace, deepest mount point first (so nested mounts go first).
pub fn mounts_of(mountinfo: &str, rdev: u64) -> Vec<MountEntry> {
    let mut found: Vec<MountEntry> = parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| m.dev == rdev)
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    found
}

/// What fencing a device did.
#[derive(Debug)]
pub struct DeviceFence {
    /// Every mount fenced in time (true when there was none).
    pub ok: bool,
    /// The mount points found.
    pub mounts: Vec<PathBuf>,
    /// One report per mount.
    pub reports: Vec<FenceReport>,
    /// Why the mounts could not be listed, if so (then `ok` is false).
    pub error: Option<String>,
}

/// A watchdog that the fence runner may "feed" and "starve" without effect:
/// in the daemon the watchdog is fed by one task under one policy
/// (`core::watchdog`); a failed fence reaches it through the session machine.
#[derive(Debug, Default)]
pub struct PolicyWatchdog {
    starved: bool,
}

impl Watchdog for PolicyWatchdog {
    fn feed(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn starve(&mut self) {
        self.starved = true;
    }
    fn is_starved(&self) -> bool {
        self.starved
    }
}

/// Fences every mount of `rdev` in this namespace, each by `deadline`.
/// Blocking: run it on a blocking thread.
pub fn fence_device<O: FenceOps + 'static>(
    ops: Arc<O>,
    rdev: u64,
    deadline: Instant,
) -> DeviceFence {
    let text = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(t) => t,
        Err(e) => {
            return DeviceFence {
                ok: false,
                mounts: Vec::new(),
                reports: Vec::new(),
                error: Some(format!("reading /proc/self/mountinfo: {e}")),
            }
        }
    };
    let mounts = mounts_of(&text, rdev);
    let mut reports = Vec::new();
    let mut ok = true;
    for m in &mounts {
        let mut w = PolicyWatchdog::default();
        let report = run_fence(Arc::clone(&ops), &mut w, &m.mount_point, deadline);
        ok &= report.ok;
        reports.push(report);
    }
    DeviceFence {
        ok,
        mounts: mounts.into_iter().map(|m| m.mount_point).collect(),
        reports,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_mount_of_the_device_deepest_first() {
        let text = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
40 22 7:3 / /mnt/pg rw - ext4 /dev/loop3 rw
41 40 7:3 /data /mnt/pg/inner rw - ext4 /dev/loop3 rw
42 22 7:4 / /mnt/other rw - ext4 /dev/loop4 rw
";
        let rdev = nix::sys::stat::makedev(7, 3);
        let m: Vec<_> = mounts_of(text, rdev)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        assert_eq!(
            m,
            vec![PathBuf::from("/mnt/pg/inner"), PathBuf::from("/mnt/pg")]
        );
        assert!(mounts_of(text, nix::sys::stat::makedev(7, 9)).is_empty());
    }
}
