//! The fence of a volume's device on this node.
//!
//! The daemon fences by device, not by a path a client told it: the fence
//! target is the block device, and [`crate::fence::device::DeviceOps`] (the
//! production [`FenceOps`]) shuts down, kills and unmounts across every mount
//! and PID namespace of the node, and proves the device unused before the
//! fence counts as done. A regular file (an image used in tests) has no mounts
//! to fence.

use crate::fence::{run_fence, FenceOps, FenceReport, FenceTarget, Watchdog};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The device number (`st_rdev`) of a block device, or `None` for a regular
/// file (an image used in tests), which has no mounts to find.
pub fn device_number(device: &Path) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(device)?;
    Ok(meta.file_type().is_block_device().then(|| meta.rdev()))
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

/// Fences `device` (device number `rdev`) everywhere on this node by
/// `deadline`. Blocking: run it on a blocking thread.
pub fn fence_device<O: FenceOps + 'static>(
    ops: Arc<O>,
    device: &Path,
    rdev: u64,
    diskseq: Option<u64>,
    deadline: Instant,
) -> FenceReport {
    let mut w = PolicyWatchdog::default();
    let target = FenceTarget::device(device, rdev, diskseq);
    run_fence(ops, &mut w, &target, deadline)
}
