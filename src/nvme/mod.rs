//! NVMe passthrough commands: reservations and the Identify fields that say
//! whether a namespace supports them.
//!
//! - [`passthru`]: the kernel's `struct nvme_passthru_cmd` and the
//!   `NVME_IOCTL_ADMIN_CMD` / `NVME_IOCTL_IO_CMD` ioctls on a namespace block
//!   device, behind the [`Passthru`](passthru::Passthru) trait. The only module
//!   here with `unsafe`.
//! - [`reservation`]: pure encodings and decodings of Reservation Register,
//!   Acquire, Release and Report and of the Identify capability fields, each
//!   checked against the NVMe Base Specification byte offsets; node keys.
//! - [`ops`]: [`ReservationOps`](ops::ReservationOps), typed reservation
//!   commands over any [`Passthru`](passthru::Passthru), and the driver that
//!   runs [`crate::core::reservation`] against it.
//! - [`fake`]: an in-memory namespace that answers the same passthrough
//!   commands (registrants, holder, type, write checks) for tests.
//!
//! What this layer must not do: decide anything (that is the pure machine in
//! `core::reservation`), or send a reservation command the machine did not ask for.

pub mod fake;
pub mod ops;
pub mod passthru;
pub mod reservation;

use std::path::PathBuf;

/// Errors of NVMe passthrough and reservation commands.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error(
        "cannot open {path} for NVMe passthrough: {source} (needs root; is it an NVMe namespace?)"
    )]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{command} on {path}: ioctl failed: {source}")]
    Ioctl {
        path: PathBuf,
        command: &'static str,
        source: std::io::Error,
    },
    #[error("{command} on {path}: NVMe status {status:#06x} ({meaning})")]
    Status {
        path: PathBuf,
        command: &'static str,
        status: u16,
        meaning: &'static str,
    },
    #[error("{command}: malformed data from the device: {detail}")]
    Malformed {
        command: &'static str,
        detail: String,
    },
}

impl NvmeError {
    /// True for the NVMe status Reservation Conflict (SCT 0, SC 0x83).
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self, NvmeError::Status { status, .. } if passthru::status_code(*status) == passthru::SC_RESERVATION_CONFLICT)
    }
}
