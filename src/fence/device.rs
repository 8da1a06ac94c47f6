//! The fence of a whole device, in every namespace of the node: the daemon's
//! [`FenceOps`] ([`DeviceOps`]). Its target path is the volume's block device,
//! not a mount point a client named.
//!
//! A fence is done only when nothing on the node can still write the volume:
//! 1. **shutdown**: `EXT4_IOC_SHUTDOWN` on the device's filesystem, reached
//!    through any mount of it in any mount namespace (`/proc/PID/root/...`), or,
//!    when it is mounted nowhere any more (lazily detached) but still held
//!    open, through a holder's descriptor (`/proc/PID/fd/N`). The ioctl acts on
//!    the superblock, so one path is enough. Nothing mounted and nothing open:
//!    nothing to shut down.
//! 2. **kill holders**: SIGKILL every process, in any PID namespace, with a
//!    file, cwd, root or mapping on the filesystem (detached mounts included;
//!    [`holders`]). A process writing the raw block device is not killed (its
//!    device number may belong to another device by then): NVMe reservations
//!    refuse its writes once a peer has preempted this node.
//! 3. **unmount**: every mount of the device in every mount namespace that has
//!    a process, each namespace entered from a thread of its own
//!    (`unshare(CLONE_FS)`, `setns`), deepest mount first; then the **proof**:
//!    `open(device, O_RDONLY | O_EXCL)` succeeds only when no mount and no
//!    exclusive opener of the device is left anywhere: in a namespace that no
//!    process is in any more, lazily detached, or claimed by another driver. A
//!    device still busy fails the step: the fence failed, the lease is kept,
//!    the watchdog starved.
//!
//! A device number is checked against the `diskseq` the volume's device had
//! when it was opened: a number given to another disk since then (a loop
//! device detached and attached again, an NVMe namespace replaced) holds
//! nothing of ours, and its users are left alone.
//!
//! What it must not do: detach a mount it could not unmount (it would hide a
//! live filesystem from the next fence), or report success without the proof.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};

use super::holders::{self, NsMount, Target, View};
use super::{FenceError, FenceOps, FenceTarget};
use crate::ext4::ShutdownMode;

/// Unmount passes over all namespaces before the step gives up (a process may
/// mount again, or a namespace's only process may exit while we enter it).
const UNMOUNT_PASSES: usize = 3;

/// The daemon's fence operations: the target is a block device.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceOps;

/// The `diskseq` of block device number `dev` (from sysfs), if the kernel
/// has it and the device is present.
pub fn diskseq(dev: u64) -> Option<u64> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/diskseq"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether the target's device number now belongs to another disk (present,
/// with another `diskseq` than when the volume was opened). A number is given
/// out again only once nothing holds the old disk (no mount, no open file),
/// so there is then nothing of ours left to fence under it.
fn number_reused(target: &FenceTarget) -> bool {
    match (target.dev, target.diskseq) {
        (Some(dev), Some(then)) => diskseq(dev).is_some_and(|now| now != then),
        _ => false,
    }
}

/// The filesystem on the target device: by the device number recorded when
/// the volume was opened (the node may be gone), else the node's.
fn target_of(target: &FenceTarget) -> Result<Target, FenceError> {
    if let Some(dev) = target.dev {
        return Ok(Target { dev });
    }
    let meta = std::fs::metadata(&target.path).map_err(|source| FenceError::Proc {
        path: target.path.clone(),
        source,
    })?;
    Ok(Target { dev: meta.rdev() })
}

impl FenceOps for DeviceOps {
    fn shutdown(&self, device: &FenceTarget) -> Result<(), FenceError> {
        if number_reused(device) {
            return Ok(());
        }
        let target = target_of(device)?;
        let view = View::collect(target)?;
        let mut last = None;
        for m in &view.mounts {
            match crate::ext4::shutdown(m.reach(), ShutdownMode::NoLogFlush) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e.into());
        }
        match view.any_open_file(target) {
            Some(file) => {
                crate::ext4::shutdown(&file, ShutdownMode::NoLogFlush).map_err(Into::into)
            }
            None => Ok(()),
        }
    }

    fn kill_holders(&self, device: &FenceTarget) -> Result<Vec<i32>, FenceError> {
        if number_reused(device) {
            return Ok(Vec::new());
        }
        holders::kill_all_of(target_of(device)?)
    }

    fn unmount(&self, device: &FenceTarget) -> Result<(), FenceError> {
        if number_reused(device) {
            tracing::warn!(device = %device.path.display(),
                "the volume's device number belongs to another disk now: nothing of ours to fence");
            return Ok(());
        }
        let target = target_of(device)?;
        let mut failure = None;
        for _ in 0..UNMOUNT_PASSES {
            let view = View::collect(target)?;
            if view.mounts.is_empty() {
                break;
            }
            failure = unmount_all(&view.mounts).err();
            if failure.is_some() {
                // A holder appeared after the kill step: one more round.
                let _ = holders::kill_all_of(target);
            }
        }
        if let Some(e) = failure {
            if !View::collect(target)?.mounts.is_empty() {
                return Err(e);
            }
        }
        prove_unused(&device.path)
    }
}

/// Unmounts every mount in `mounts`, grouped by namespace, deepest first.
fn unmount_all(mounts: &[NsMount]) -> Result<(), FenceError> {
    let mut namespaces: Vec<&PathBuf> = mounts.iter().map(|m| &m.ns).collect();
    namespaces.sort();
    namespaces.dedup();
    let mut result = Ok(());
    for ns in namespaces {
        let mut here: Vec<&NsMount> = mounts.iter().filter(|m| &m.ns == ns).collect();
        here.sort_by_key(|m| std::cmp::Reverse(m.entry.mount_point.components().count()));
        let points: Vec<PathBuf> = here.iter().map(|m| m.entry.mount_point.clone()).collect();
        let r = if here[0].own {
            unmount_points(&points)
        } else {
            unmount_in_namespace(here[0].pid, points)
        };
        if r.is_err() {
            result = r;
        }
    }
    result
}

/// `umount2` of each point in this thread's mount namespace; a point no longer
/// mounted counts as done.
fn unmount_points(points: &[PathBuf]) -> Result<(), FenceError> {
    for p in points {
        match umount2(p.as_path(), MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(source) => {
                return Err(FenceError::Unmount {
                    mount: p.clone(),
                    source,
                    detached: false,
                })
            }
        }
    }
    Ok(())
}

/// Unmounts `points` inside the mount namespace of `pid`, from a thread of
/// its own: `unshare(CLONE_FS)` gives the thread its own fs context, which
/// `setns(CLONE_NEWNS)` needs in a multi-threaded process, and the thread's
/// namespace dies with it.
fn unmount_in_namespace(pid: i32, points: Vec<PathBuf>) -> Result<(), FenceError> {
    let ns_path = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
    let ns = File::open(&ns_path).map_err(|source| FenceError::Proc {
        path: ns_path.clone(),
        source,
    })?;
    let worker = std::thread::Builder::new()
        .name("fence-setns".into())
        .spawn(move || -> Result<(), FenceError> {
            let entered = nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                .and_then(|()| nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS));
            entered.map_err(|e| FenceError::Proc {
                path: ns_path,
                source: e.into(),
            })?;
            unmount_points(&points)
        })
        .map_err(|source| FenceError::Proc {
            path: PathBuf::from("/proc/self/task"),
            source,
        })?;
    worker.join().unwrap_or_else(|_| {
        Err(FenceError::Proc {
            path: PathBuf::from("/proc/self/task"),
            source: std::io::Error::other("the unmount thread panicked"),
        })
    })
}

/// How long [`prove_unused`] keeps trying: the last reference to a lazily
/// detached mount, dropped by a killed process at its exit, may be released
/// by a kernel work item a moment later (`delayed_mntput`), and there is no
/// event for it.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Succeeds only if the device can be opened exclusively: no filesystem on it
/// is mounted (or alive after a lazy detach) anywhere, and no other exclusive
/// opener holds it. Tries again every 10 ms for up to [`RELEASE_WAIT`] (the
/// step's own deadline still bounds it).
pub fn prove_unused(device: &Path) -> Result<(), FenceError> {
    let until = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match try_exclusive(device) {
            Err(FenceError::DeviceBusy { .. }) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

fn try_exclusive(device: &Path) -> Result<(), FenceError> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(FenceError::DeviceBusy {
            device: device.to_path_buf(),
        }),
        Err(source) => Err(FenceError::Proc {
            path: device.to_path_buf(),
            source,
        }),
    }
}
