//! Block I/O and the lease area on a device.
//!
//! - [`blockdev`]: `O_DIRECT | O_DSYNC` I/O on a block device or regular file,
//!   sector sizes, [`AlignedBuf`](blockdev::AlignedBuf). The only module with
//!   `unsafe` (ioctls, the aligned buffer's byte view).
//! - [`device`]: the [`DeviceIo`](device::DeviceIo) trait (whole-device,
//!   aligned, durable I/O) and the in-memory [`MemDevice`](device::MemDevice).
//! - [`area`]: where the lease area is, format, open, inspect, grow.
//! - [`store`]: the [`BlockStore`](store::BlockStore) seam, area-relative
//!   block I/O: [`AreaStore`](store::AreaStore) on a device,
//!   [`MemStore`](store::MemStore) in memory with injectable faults.
//! - [`worker`]: [`IoWorker`](worker::IoWorker), one thread per device that
//!   performs lease I/O in order, with deadlines for the caller.
//! - [`error`] holds [`DiskError`](error::DiskError), the one error type.
//!
//! Invariants of the whole layer: every lease I/O is a direct, durable,
//! 4096-byte-aligned transfer of whole 4096-byte records; nothing here decides
//! anything about the lease (that is `core::lease`), and nothing here waits
//! for the device on a caller's thread except the CLI-facing functions of
//! [`area`].

pub mod area;
pub mod blockdev;
pub mod device;
pub mod error;
pub mod probe;
pub mod runner;
pub mod store;
pub mod worker;

pub use area::{AreaInfo, AreaSnapshot, GrowAuthority, GrowOptions, GrowReport};
pub use blockdev::{Access, AlignedBuf, BlockDevice, DeviceKind};
pub use device::{DeviceIo, MemDevice};
pub use error::{DiskError, HeaderCopy};
pub use store::{AreaStore, BlockStore, MemStore};
pub use worker::{IoWorker, Reply, Request, Ticket, Waited};
