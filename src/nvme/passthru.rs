//! NVMe passthrough: `struct nvme_passthru_cmd` and the ioctls that submit it.
//!
//! Layout and numbers from the kernel UAPI header include/uapi/linux/nvme_ioctl.h:
//! `NVME_IOCTL_ID = _IO('N', 0x40)`, `NVME_IOCTL_ADMIN_CMD = _IOWR('N', 0x41,
//! struct nvme_passthru_cmd)`, `NVME_IOCTL_IO_CMD = _IOWR('N', 0x43, ...)`; the
//! structure is 72 bytes (checked by a test). The ioctl returns 0, a negative
//! errno, or a positive NVMe status: bits 7:0 Status Code, 10:8 Status Code
//! Type, 13 More, 14 Do Not Retry (the completion's status field shifted right
//! by one, as the kernel hands it back).
//!
//! Invariant: the data buffer handed to the kernel lives for the whole ioctl and
//! `data_len` is its exact length. The `unsafe` here is the ioctl calls only.
#![allow(unsafe_code)]

use super::NvmeError;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `struct nvme_passthru_cmd` of the kernel UAPI.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassthruCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub result: u32,
}

nix::ioctl_none!(nvme_ioctl_id, b'N', 0x40);
nix::ioctl_readwrite!(nvme_ioctl_admin_cmd, b'N', 0x41, PassthruCmd);
nix::ioctl_readwrite!(nvme_ioctl_io_cmd, b'N', 0x43, PassthruCmd);

/// Status Code (generic, SCT 0): Reservation Conflict.
pub const SC_RESERVATION_CONFLICT: u16 = 0x083;
/// Status Code (generic): Invalid Command Opcode.
pub const SC_INVALID_OPCODE: u16 = 0x001;
/// Status Code (generic): Invalid Field in Command.
pub const SC_INVALID_FIELD: u16 = 0x002;
/// The Do Not Retry bit of the status as the kernel returns it.
pub const STATUS_DNR: u16 = 0x4000;

/// SCT and SC of a status (bits 10:0), without More/DNR/CRD.
pub fn status_code(status: u16) -> u16 {
    status & 0x7ff
}

/// A short meaning of the statuses this crate acts on.
pub fn status_meaning(status: u16) -> &'static str {
    match status_code(status) {
        SC_RESERVATION_CONFLICT => "reservation conflict",
        SC_INVALID_OPCODE => "invalid command opcode: not supported",
        SC_INVALID_FIELD => "invalid field in command",
        _ => "see the NVMe status code tables",
    }
}

/// Something that submits NVMe commands for one namespace: the real device,
/// or [`super::fake::FakeHost`]. The implementation sets `addr`/`data_len`
/// from `data`; the caller sets everything else. Returns the NVMe status (0 =
/// success).
pub trait Passthru {
    /// An admin command (Identify).
    fn admin(&mut self, cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<u16>;
    /// An I/O command on the namespace (reservations).
    fn io(&mut self, cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<u16>;
    /// The namespace ID the commands address.
    fn nsid(&self) -> u32;
    /// The device, for messages.
    fn path(&self) -> &Path;
}

/// A namespace block device (/dev/nvmeXnY) opened for passthrough.
#[derive(Debug)]
pub struct NamespaceDevice {
    file: File,
    path: PathBuf,
    nsid: u32,
}

impl NamespaceDevice {
    /// Opens `path` read-only (enough for the ioctls, which need CAP_SYS_ADMIN)
    /// and asks its namespace ID.
    pub fn open(path: &Path) -> Result<NamespaceDevice, NvmeError> {
        let file = File::open(path).map_err(|source| NvmeError::Open {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: NVME_IOCTL_ID takes no argument and only returns the nsid;
        // the fd is valid for the call (owned by `file`).
        let nsid = unsafe { nvme_ioctl_id(file.as_raw_fd()) }.map_err(|e| NvmeError::Ioctl {
            path: path.to_owned(),
            command: "NVME_IOCTL_ID",
            source: io::Error::from(e),
        })?;
        Ok(NamespaceDevice {
            file,
            path: path.to_owned(),
            nsid: nsid as u32,
        })
    }
}

fn prepare(cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<()> {
    cmd.addr = if data.is_empty() {
        0
    } else {
        data.as_mut_ptr() as u64
    };
    cmd.data_len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "data buffer over 4 GiB"))?;
    Ok(())
}

impl Passthru for NamespaceDevice {
    fn admin(&mut self, cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<u16> {
        prepare(cmd, data)?;
        // SAFETY: `cmd` is a valid, exclusive `nvme_passthru_cmd`; `addr` and
        // `data_len` describe `data`, which is borrowed mutably for the whole
        // call, so the kernel may read or write exactly that buffer.
        let r =
            unsafe { nvme_ioctl_admin_cmd(self.file.as_raw_fd(), cmd) }.map_err(io::Error::from)?;
        Ok(r as u16)
    }

    fn io(&mut self, cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<u16> {
        prepare(cmd, data)?;
        // SAFETY: as in `admin`: `cmd` is valid and exclusive, and its
        // addr/data_len describe `data`, mutably borrowed for the call.
        let r =
            unsafe { nvme_ioctl_io_cmd(self.file.as_raw_fd(), cmd) }.map_err(io::Error::from)?;
        Ok(r as u16)
    }

    fn nsid(&self) -> u32 {
        self.nsid
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel_uapi() {
        assert_eq!(std::mem::size_of::<PassthruCmd>(), 72);
        let c = PassthruCmd::default();
        let base = &c as *const _ as usize;
        assert_eq!(&c.nsid as *const _ as usize - base, 4);
        assert_eq!(&c.metadata as *const _ as usize - base, 16);
        assert_eq!(&c.addr as *const _ as usize - base, 24);
        assert_eq!(&c.data_len as *const _ as usize - base, 36);
        assert_eq!(&c.cdw10 as *const _ as usize - base, 40);
        assert_eq!(&c.timeout_ms as *const _ as usize - base, 64);
        assert_eq!(&c.result as *const _ as usize - base, 68);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_uapi() {
        // _IOWR('N', 0x41/0x43, 72 bytes) = dir 3 << 30 | size << 16 | 'N' << 8 | nr
        let iowr = |nr: u64| (3u64 << 30) | (72 << 16) | ((b'N' as u64) << 8) | nr;
        assert_eq!(nix::request_code_readwrite!(b'N', 0x41, 72), iowr(0x41));
        assert_eq!(iowr(0x41), 0xC048_4E41);
        assert_eq!(iowr(0x43), 0xC048_4E43);
        assert_eq!(nix::request_code_none!(b'N', 0x40), 0x4E40);
    }

    #[test]
    fn conflict_is_recognised_with_and_without_dnr() {
        assert_eq!(status_code(0x4083), SC_RESERVATION_CONFLICT);
        assert_eq!(status_code(0x0083), SC_RESERVATION_CONFLICT);
        assert_eq!(status_meaning(0x4083), "reservation conflict");
    }
}
