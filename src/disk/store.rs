//! [`BlockStore`]: block I/O relative to the lease area, the seam between the
//! lease driver and the disk. [`AreaStore`] is the real one (a device plus the
//! area's offset); [`MemStore`] is an in-memory area with injectable faults for
//! unit tests and simulation.
//!
//! Invariants:
//! - block numbers are area blocks (0 = header A, 1 = owner, 2.. = slots,
//!   255 = header B); nothing outside the area can be reached;
//! - [`AreaStore`] writes only the owner block and the slot blocks: headers are
//!   written by `format` and `grow` alone, never by the lease path;
//! - a `write_block` that returned `Ok` is durable and visible to every later
//!   `read_blocks`, from any node's store over the same device.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::core::record::{Block, BLOCK};
use crate::disk::area::{AreaInfo, AREA_BLOCKS, OWNER_BLOCK, SLOT_BLOCK0};
use crate::disk::blockdev::AlignedBuf;
use crate::disk::device::DeviceIo;
use crate::disk::error::DiskError;

/// Block I/O inside the lease area. `Send` so a store can be handed to its
/// [`IoWorker`](crate::disk::worker::IoWorker) thread.
pub trait BlockStore: Send {
    /// Reads `count` consecutive area blocks starting at `first_block`.
    fn read_blocks(&self, first_block: u64, count: usize) -> Result<Vec<Block>, DiskError>;
    /// Writes one area block; durable when it returns `Ok`.
    fn write_block(&self, block: u64, data: &Block) -> Result<(), DiskError>;
}

impl<T: BlockStore + ?Sized> BlockStore for Box<T> {
    fn read_blocks(&self, first_block: u64, count: usize) -> Result<Vec<Block>, DiskError> {
        (**self).read_blocks(first_block, count)
    }
    fn write_block(&self, block: u64, data: &Block) -> Result<(), DiskError> {
        (**self).write_block(block, data)
    }
}

impl<T: BlockStore + Sync + ?Sized> BlockStore for Arc<T> {
    fn read_blocks(&self, first_block: u64, count: usize) -> Result<Vec<Block>, DiskError> {
        (**self).read_blocks(first_block, count)
    }
    fn write_block(&self, block: u64, data: &Block) -> Result<(), DiskError> {
        (**self).write_block(block, data)
    }
}

fn check_range(path: &Path, first_block: u64, count: usize) -> Result<(), DiskError> {
    let inside = count > 0
        && matches!(first_block.checked_add(count as u64), Some(end) if end <= AREA_BLOCKS);
    if inside {
        Ok(())
    } else {
        Err(DiskError::OutsideArea {
            path: path.to_path_buf(),
            block: first_block,
            count,
            blocks: AREA_BLOCKS,
        })
    }
}

/// The lease area of a real device.
#[derive(Debug)]
pub struct AreaStore<D> {
    dev: D,
    area_offset: u64,
    writable: Range<u64>,
}

impl<D: DeviceIo + Send> AreaStore<D> {
    /// The area at `area_offset` with `max_slots` slots; writes are allowed to
    /// the owner block and the slot blocks only.
    pub fn new(dev: D, area_offset: u64, max_slots: u16) -> AreaStore<D> {
        AreaStore {
            dev,
            area_offset,
            writable: OWNER_BLOCK..SLOT_BLOCK0 + max_slots as u64,
        }
    }

    /// The area described by `info` (from `open_area`).
    pub fn for_area(dev: D, info: &AreaInfo) -> AreaStore<D> {
        AreaStore::new(dev, info.area_offset, info.header.max_slots)
    }

    /// Byte offset of the area on the device.
    pub fn area_offset(&self) -> u64 {
        self.area_offset
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }
}

impl<D: DeviceIo + Send> BlockStore for AreaStore<D> {
    fn read_blocks(&self, first_block: u64, count: usize) -> Result<Vec<Block>, DiskError> {
        check_range(self.dev.path(), first_block, count)?;
        let buf = self
            .dev
            .read_at(self.area_offset + first_block * BLOCK as u64, count * BLOCK)?;
        Ok(buf.to_blocks())
    }

    fn write_block(&self, block: u64, data: &Block) -> Result<(), DiskError> {
        check_range(self.dev.path(), block, 1)?;
        if !self.writable.contains(&block) {
            return Err(DiskError::ReadOnlyBlock {
                path: self.dev.path().to_path_buf(),
                block,
            });
        }
        self.dev.write_at(
            self.area_offset + block * BLOCK as u64,
            &AlignedBuf::from_block(data),
        )
    }
}

#[derive(Debug, Default)]
struct Faults {
    latency: Duration,
    fail_reads: u32,
    fail_writes: u32,
    tear_next_write: Option<usize>,
    paused: bool,
}

#[derive(Debug)]
struct MemInner {
    blocks: Vec<Block>,
    faults: Faults,
    reads: u64,
    writes: u64,
}

#[derive(Debug)]
struct MemShared {
    inner: Mutex<MemInner>,
    resumed: Condvar,
}

/// An in-memory lease area (256 zeroed blocks) with injectable faults:
/// latency, a pause gate (I/O hangs until resumed), failed reads and writes,
/// torn writes. Clones share the same area, like nodes sharing one disk.
/// Faults apply to I/O through [`BlockStore`]; [`peek`](MemStore::peek) and
/// [`poke`](MemStore::poke) bypass them.
#[derive(Debug, Clone)]
pub struct MemStore {
    path: PathBuf,
    shared: Arc<MemShared>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl MemStore {
    /// A zeroed area.
    pub fn new() -> MemStore {
        MemStore {
            path: PathBuf::from("mem:area"),
            shared: Arc::new(MemShared {
                inner: Mutex::new(MemInner {
                    blocks: vec![[0u8; BLOCK]; AREA_BLOCKS as usize],
                    faults: Faults::default(),
                    reads: 0,
                    writes: 0,
                }),
                resumed: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Block `block` as stored now, bypassing faults. Panics outside the area.
    pub fn peek(&self, block: u64) -> Block {
        self.lock().blocks[block as usize]
    }

    /// Sets block `block`, bypassing faults. Panics outside the area.
    pub fn poke(&self, block: u64, data: &Block) {
        self.lock().blocks[block as usize] = *data;
    }

    /// Every I/O sleeps this long before it takes effect.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().faults.latency = latency;
    }

    /// From now on every I/O blocks until [`resume`](MemStore::resume): a hung
    /// device.
    pub fn pause(&self) {
        self.lock().faults.paused = true;
    }

    /// Lets blocked and later I/O proceed.
    pub fn resume(&self) {
        self.lock().faults.paused = false;
        self.shared.resumed.notify_all();
    }

    /// The next `n` reads fail with an I/O error.
    pub fn fail_next_reads(&self, n: u32) {
        self.lock().faults.fail_reads = n;
    }

    /// The next `n` writes fail with an I/O error and change nothing.
    pub fn fail_next_writes(&self, n: u32) {
        self.lock().faults.fail_writes = n;
    }

    /// The next write stores only its first `sectors` 512-byte sectors (the
    /// rest of the block keeps its old bytes) and then fails: a write torn by a
    /// crash or a power cut.
    pub fn tear_next_write(&self, sectors: usize) {
        self.lock().faults.tear_next_write = Some(sectors.min(BLOCK / 512));
    }

    /// Reads performed (including failed ones).
    pub fn reads(&self) -> u64 {
        self.lock().reads
    }

    /// Writes performed (including failed and torn ones).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Applies latency and the pause gate; returns the lock to do the I/O with.
    fn enter(&self) -> MutexGuard<'_, MemInner> {
        let latency = self.lock().faults.latency;
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        let mut inner = self.lock();
        while inner.faults.paused {
            inner = self
                .shared
                .resumed
                .wait(inner)
                .unwrap_or_else(|e| e.into_inner());
        }
        inner
    }
}

impl BlockStore for MemStore {
    fn read_blocks(&self, first_block: u64, count: usize) -> Result<Vec<Block>, DiskError> {
        check_range(&self.path, first_block, count)?;
        let mut inner = self.enter();
        inner.reads += 1;
        if inner.faults.fail_reads > 0 {
            inner.faults.fail_reads -= 1;
            return Err(DiskError::Injected {
                path: self.path.clone(),
                what: "read error",
            });
        }
        let start = first_block as usize;
        Ok(inner.blocks[start..start + count].to_vec())
    }

    fn write_block(&self, block: u64, data: &Block) -> Result<(), DiskError> {
        check_range(&self.path, block, 1)?;
        let mut inner = self.enter();
        inner.writes += 1;
        if inner.faults.fail_writes > 0 {
            inner.faults.fail_writes -= 1;
            return Err(DiskError::Injected {
                path: self.path.clone(),
                what: "write error",
            });
        }
        if let Some(sectors) = inner.faults.tear_next_write.take() {
            let n = sectors * 512;
            inner.blocks[block as usize][..n].copy_from_slice(&data[..n]);
            return Err(DiskError::Injected {
                path: self.path.clone(),
                what: "torn write",
            });
        }
        inner.blocks[block as usize] = *data;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::params::Params;
    use crate::core::record::{Decoded, Slot, SlotState};
    use crate::disk::device::MemDevice;

    fn slot(seq: u64) -> Slot {
        Slot {
            index: 0,
            state: SlotState::Hold,
            name: "a".into(),
            nonce: 1,
            seq,
            generation: 3,
            max_generation_seen: 3,
            params: Params::default(),
        }
    }

    #[test]
    fn area_store_is_relative_to_the_area_and_protects_headers() {
        let dev = MemDevice::new(4 << 20);
        let store = AreaStore::new(dev.clone(), 2 << 20, 4);
        let b = slot(1).encode();
        store.write_block(SLOT_BLOCK0, &b).unwrap();
        let raw = dev
            .read_at((2 << 20) + SLOT_BLOCK0 * BLOCK as u64, BLOCK)
            .unwrap();
        assert_eq!(raw.block(0), Some(&b));
        assert_eq!(store.read_blocks(SLOT_BLOCK0, 1).unwrap(), vec![b]);
        assert!(matches!(
            store.write_block(0, &b),
            Err(DiskError::ReadOnlyBlock { block: 0, .. })
        ));
        assert!(matches!(
            store.write_block(255, &b),
            Err(DiskError::ReadOnlyBlock { .. })
        ));
        assert!(matches!(
            store.write_block(SLOT_BLOCK0 + 4, &b),
            Err(DiskError::ReadOnlyBlock { .. })
        ));
        assert!(matches!(
            store.read_blocks(255, 2),
            Err(DiskError::OutsideArea { .. })
        ));
        assert!(matches!(
            store.read_blocks(0, 0),
            Err(DiskError::OutsideArea { .. })
        ));
        assert_eq!(store.read_blocks(0, 256).unwrap().len(), 256);
    }

    #[test]
    fn mem_store_faults() {
        let s = MemStore::new();
        let other_node = s.clone();
        s.write_block(2, &slot(1).encode()).unwrap();
        assert_eq!(
            Slot::decode(&other_node.read_blocks(2, 1).unwrap()[0]),
            Decoded::Valid(slot(1))
        );

        s.fail_next_writes(1);
        assert!(s.write_block(2, &slot(2).encode()).is_err());
        assert_eq!(Slot::decode(&s.peek(2)), Decoded::Valid(slot(1)));
        s.write_block(2, &slot(2).encode()).unwrap();

        s.fail_next_reads(2);
        assert!(s.read_blocks(2, 1).is_err());
        assert!(s.read_blocks(2, 1).is_err());
        assert!(s.read_blocks(2, 1).is_ok());

        // A torn write is neither the old nor a new valid record.
        s.tear_next_write(3);
        assert!(s.write_block(2, &slot(3).encode()).is_err());
        assert!(matches!(Slot::decode(&s.peek(2)), Decoded::Corrupt(_)));
        assert_eq!(s.writes(), 4);
    }

    #[test]
    fn mem_store_pause_blocks_until_resumed() {
        let s = MemStore::new();
        s.pause();
        let t = {
            let s = s.clone();
            std::thread::spawn(move || s.write_block(3, &[7u8; BLOCK]))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(s.peek(3), [0u8; BLOCK]);
        assert!(!t.is_finished());
        s.resume();
        t.join().unwrap().unwrap();
        assert_eq!(s.peek(3), [7u8; BLOCK]);
    }
}
