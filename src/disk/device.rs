//! Whole-device I/O as the lease area code sees it: the [`DeviceIo`] trait,
//! implemented by the real [`BlockDevice`](crate::disk::blockdev::BlockDevice)
//! and by the in-memory [`MemDevice`] for unit tests.
//!
//! Invariants (both implementations):
//! - offsets and lengths are multiples of [`DeviceIo::io_align`] =
//!   `max(4096, logical sector)`, lengths are non-zero, and the range lies
//!   inside the device; anything else is refused with `Misaligned` or
//!   `OutOfRange` before any byte moves ([`check_io`]);
//! - a write that returned `Ok` is durable and visible to every later read,
//!   from any handle on the same device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::core::record::{Block, BLOCK};
use crate::disk::blockdev::AlignedBuf;
use crate::disk::error::DiskError;

/// Byte-addressed, aligned, durable I/O on a whole device.
pub trait DeviceIo {
    /// The path, for messages.
    fn path(&self) -> &Path;
    /// Size in bytes (as read when the device was opened).
    fn size_bytes(&self) -> u64;
    /// Logical sector size: the smallest direct I/O the device accepts.
    fn logical_sector(&self) -> u32;
    /// Physical sector size: the unit the device writes atomically at best.
    fn physical_sector(&self) -> u32;
    /// Reads `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, DiskError>;
    /// Writes `buf` at `offset`; durable when it returns `Ok`.
    fn write_at(&self, offset: u64, buf: &AlignedBuf) -> Result<(), DiskError>;

    /// The alignment every offset and length must have.
    fn io_align(&self) -> u32 {
        self.logical_sector().max(BLOCK as u32)
    }
}

/// Shared handles: one device opened once, used by the area code and by an
/// [`AreaStore`](crate::disk::store::AreaStore) on a worker thread.
impl<T: DeviceIo + ?Sized> DeviceIo for Arc<T> {
    fn path(&self) -> &Path {
        (**self).path()
    }
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn logical_sector(&self) -> u32 {
        (**self).logical_sector()
    }
    fn physical_sector(&self) -> u32 {
        (**self).physical_sector()
    }
    fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, DiskError> {
        (**self).read_at(offset, len)
    }
    fn write_at(&self, offset: u64, buf: &AlignedBuf) -> Result<(), DiskError> {
        (**self).write_at(offset, buf)
    }
    fn io_align(&self) -> u32 {
        (**self).io_align()
    }
}

/// Checks an I/O against the device's alignment and size.
pub fn check_io<D: DeviceIo + ?Sized>(dev: &D, offset: u64, len: usize) -> Result<(), DiskError> {
    let align = dev.io_align();
    if len == 0 || offset % align as u64 != 0 || len % align as usize != 0 {
        return Err(DiskError::Misaligned {
            path: dev.path().to_path_buf(),
            offset,
            len,
            align,
        });
    }
    let size = dev.size_bytes();
    let inside = matches!(offset.checked_add(len as u64), Some(end) if end <= size);
    if !inside {
        return Err(DiskError::OutOfRange {
            path: dev.path().to_path_buf(),
            offset,
            len,
            size,
        });
    }
    Ok(())
}

#[derive(Debug)]
struct MemDeviceInner {
    size: u64,
    blocks: HashMap<u64, Block>,
    writes: u64,
}

/// A sparse in-memory device (unset blocks read as zeros), for unit tests of
/// the area code. Clones share the same bytes, like two handles on one disk.
#[derive(Debug, Clone)]
pub struct MemDevice {
    path: PathBuf,
    logical_sector: u32,
    physical_sector: u32,
    inner: Arc<Mutex<MemDeviceInner>>,
}

impl MemDevice {
    /// A zeroed device of `size` bytes with 512-byte logical, 4096-byte
    /// physical sectors.
    pub fn new(size: u64) -> MemDevice {
        MemDevice::with_sectors(size, 512, 4096)
    }

    /// A zeroed device with the given sector sizes.
    pub fn with_sectors(size: u64, logical_sector: u32, physical_sector: u32) -> MemDevice {
        MemDevice {
            path: PathBuf::from("mem:device"),
            logical_sector,
            physical_sector,
            inner: Arc::new(Mutex::new(MemDeviceInner {
                size,
                blocks: HashMap::new(),
                writes: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemDeviceInner> {
        // A panic in another test thread holding the lock leaves plain bytes
        // behind; they are still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the size, as an enlarged (or shrunk) volume would; bytes beyond
    /// a shrunk end are dropped.
    pub fn set_size(&self, size: u64) {
        let mut inner = self.lock();
        inner.size = size;
        inner.blocks.retain(|&b, _| (b + 1) * BLOCK as u64 <= size);
    }

    /// Number of successful writes so far.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Overwrites raw bytes at any offset, without alignment checks: for tests
    /// that damage records (torn writes, bit flips).
    pub fn poke(&self, offset: u64, bytes: &[u8]) {
        let mut inner = self.lock();
        for (i, &byte) in bytes.iter().enumerate() {
            let pos = offset + i as u64;
            let block = inner
                .blocks
                .entry(pos / BLOCK as u64)
                .or_insert([0u8; BLOCK]);
            block[(pos % BLOCK as u64) as usize] = byte;
        }
    }
}

impl DeviceIo for MemDevice {
    fn path(&self) -> &Path {
        &self.path
    }

    fn size_bytes(&self) -> u64 {
        self.lock().size
    }

    fn logical_sector(&self) -> u32 {
        self.logical_sector
    }

    fn physical_sector(&self) -> u32 {
        self.physical_sector
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, DiskError> {
        check_io(self, offset, len)?;
        let inner = self.lock();
        let first = offset / BLOCK as u64;
        let blocks: Vec<Block> = (0..(len / BLOCK) as u64)
            .map(|i| {
                inner
                    .blocks
                    .get(&(first + i))
                    .copied()
                    .unwrap_or([0u8; BLOCK])
            })
            .collect();
        Ok(AlignedBuf::from_blocks(&blocks))
    }

    fn write_at(&self, offset: u64, buf: &AlignedBuf) -> Result<(), DiskError> {
        check_io(self, offset, buf.len())?;
        let mut inner = self.lock();
        let first = offset / BLOCK as u64;
        for (i, block) in buf.to_blocks().into_iter().enumerate() {
            if block.iter().all(|&b| b == 0) {
                inner.blocks.remove(&(first + i as u64));
            } else {
                inner.blocks.insert(first + i as u64, block);
            }
        }
        inner.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_device_checks_alignment_like_a_real_one() {
        let d = MemDevice::new(1 << 20);
        assert!(matches!(
            d.read_at(512, BLOCK),
            Err(DiskError::Misaligned { align: 4096, .. })
        ));
        assert!(matches!(
            d.read_at(0, 100),
            Err(DiskError::Misaligned { .. })
        ));
        assert!(matches!(
            d.read_at(1 << 20, BLOCK),
            Err(DiskError::OutOfRange { .. })
        ));
        let mut b = [0u8; BLOCK];
        b[7] = 7;
        d.write_at(4096, &AlignedBuf::from_block(&b)).unwrap();
        let clone = d.clone();
        assert_eq!(clone.read_at(4096, BLOCK).unwrap().block(0), Some(&b));
        d.poke(4096 + 7, &[0]);
        assert_eq!(
            clone.read_at(4096, BLOCK).unwrap().block(0),
            Some(&[0u8; BLOCK])
        );
    }

    #[test]
    fn alignment_follows_a_logical_sector_larger_than_4096() {
        let d = MemDevice::with_sectors(1 << 20, 8192, 8192);
        assert_eq!(d.io_align(), 8192);
        assert!(matches!(
            d.read_at(4096, BLOCK),
            Err(DiskError::Misaligned { align: 8192, .. })
        ));
        assert!(d.read_at(8192, 8192).is_ok());
    }
}
