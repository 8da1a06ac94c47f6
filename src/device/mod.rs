//! Block devices as sysfs and the kernel describe them: NVMe/TCP namespaces and
//! their controller paths, loop devices, device events, path health, and the
//! stale-I/O guard.
//!
//! - [`discovery`]: scan a sysfs tree (the real `/sys` or a fixture copy) for
//!   NVMe namespaces (ids, size, volume UUID, every controller path with its
//!   state, ANA state and timeouts) and other block devices; resolve a volume
//!   named by device, WWID, NGUID, UUID or Lightbits volume UUID.
//! - [`health`]: controller and ANA states, `usable(paths)`, and the pure
//!   [`PathTracker`](health::PathTracker) that turns successive path
//!   snapshots into PathDown / PathUp / LastPathLost events.
//! - [`guard`]: how long a partitioned node's queued writes can survive
//!   (pure arithmetic, docs/DEVICES.md), the verdict against the lease
//!   takeover time, the exact fixes, and the policy (refuse, warn, set
//!   `fast_io_fail_tmo`).
//! - [`uevent`]: the one parser of kernel uevents (`KEY=VALUE\0...`) and the
//!   classification into [`DeviceEvent`]s, used by live sockets and by
//!   recorded fixtures alike.
//! - [`monitor`]: a thread that reads device events from udev (libudev
//!   monitor) or, when no udev daemon runs, from the kernel's uevent netlink
//!   socket, and sends [`DeviceEvent`]s on a channel.
//!
//! This layer observes and reports; it decides nothing about the lease and
//! changes nothing on the system except the one documented write of
//! `fast_io_fail_tmo` by [`guard::apply_fast_io_fail`] when the daemon's policy
//! asks for it.

pub mod discovery;
pub mod guard;
pub mod health;
pub mod monitor;
pub mod uevent;

use serde::Serialize;
use std::path::PathBuf;

pub use discovery::{BlockInfo, Namespace, NvmePath, Volume};
pub use health::{AnaState, CtrlState};

/// Errors of device discovery, monitoring and the guard.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source} (needs root and a writable sysfs)")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}: {what}")]
    Parse {
        path: PathBuf,
        content: String,
        what: &'static str,
    },
    #[error("no block device or NVMe namespace matches {id:?} under {root}: give /dev/NAME, NAME, or a WWID/NGUID/UUID/volume UUID (see `blockfence doctor` without --volume)")]
    NotFound { id: String, root: PathBuf },
    #[error("device monitor: {what}: {source}")]
    Monitor {
        what: &'static str,
        source: std::io::Error,
    },
}

/// A change a device event reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The capacity changed (`RESIZE=1`).
    Resized,
    /// The medium changed (`DISK_MEDIA_CHANGE=1`: e.g. a loop device detached).
    Media,
    /// Any other change (loop attach, partition rescan).
    Other,
}

/// What happened to a device or a path. The daemon's reaction to each is
/// described in docs/DEVICES.md, "Events".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum DeviceEvent {
    /// A block device appeared.
    Added {
        name: String,
        major_minor: Option<(u32, u32)>,
    },
    /// A block device disappeared.
    Removed { name: String },
    /// A block device changed.
    Changed { name: String, change: Change },
    /// An NVMe controller reported something (state change, AEN, rescan):
    /// re-read the paths of its namespaces.
    Controller { name: String, detail: String },
    /// A path of a namespace stopped being usable.
    PathDown {
        namespace: String,
        controller: String,
        state: CtrlState,
        ana_state: Option<AnaState>,
    },
    /// A path of a namespace became usable again.
    PathUp {
        namespace: String,
        controller: String,
    },
    /// The namespace has no usable path left.
    LastPathLost { namespace: String },
}
