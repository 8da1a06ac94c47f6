//! blockfence: at most one writer per shared block volume.
//!
//! Map of the crate (pure core first, thin shell around it):
//!
//! - [`core`]: pure state machines and encodings. No I/O, no clock reads: time
//!   and observations are inputs, actions are outputs.
//!   - [`core::params`]: the recorded timing parameters and every timeout
//!     derived from them.
//!   - [`core::record`]: the on-disk records (header, owner, slots), versions,
//!     checksums.
//!   - [`core::lease`]: the lease protocol, `step(now, input) -> actions`.
//!   - [`core::fence`]: the fence (shutdown, kill holders, unmount, else starve
//!     the watchdog), `step(now, input) -> actions`.
//!   - [`core::session`]: which local holder gets a volume, grant validity,
//!     when this node must fence (the daemon's per-volume decisions).
//!   - [`core::holder`]: the holder's side (`blockfence run`): its deadline,
//!     when to keep alive, stop, or fence itself.
//!   - [`core::watchdog`]: when the watchdog may be fed.
//!   - [`core::reservation`]: NVMe reservation takeover decisions.
//! - [`disk`]: O_DIRECT block I/O with deadlines, sector sizes, the lease area
//!   on a device (locate, format, grow), and the driver that runs the lease
//!   machine against a device.
//! - [`ext4`]: superblock and MMP parsing, MMP checks, marking MMP clean, the
//!   shutdown ioctl.
//! - [`fence`]: carrying out the fence on this node (ioctl, /proc scan, kill,
//!   umount, watchdog) and the driver that runs the fence machine.
//! - [`api`]: the node-local HTTP API (Unix socket, optional loopback TCP):
//!   handlers turn requests into commands sent over a channel to the backend
//!   that owns the lease state; [`api::fake`] is an in-memory backend.
//! - [`daemon`]: `blockfence daemon`: one task per volume around its lease
//!   and session machines, the API's real backend, fences, the watchdog
//!   feeder, configuration, and the device layer's events and reservations
//!   fed to the volumes ([`daemon::devices`]).
//! - [`nsmount`]: mounting a granted volume into a caller's mount namespace
//!   (the daemon mounts for an unprivileged pod; `MountSpec`, the mount
//!   options both mount paths share).
//! - [`client`]: a typed client of the API (used by `blockfence run`).
//! - [`metrics`]: the Prometheus metrics.
//! - [`device`]: NVMe/block device discovery (sysfs, udev/uevents), path
//!   health, the stale-I/O guard.
//! - [`nvme`]: NVMe reservation commands (passthrough ioctl) and their driver.
//! - [`sim`]: the deterministic simulation of the lease protocol.
//! - [`cli`]: the `blockfence` subcommands.
//!
//! See ARCHITECTURE.md for how the parts fit and docs/PROTOCOL.md for the lease
//! protocol and its safety argument.

pub mod api;
pub mod cli;
pub mod client;
pub mod core;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod ext4;
pub mod fence;
pub mod metrics;
pub mod nsmount;
pub mod nvme;
pub mod sim;
