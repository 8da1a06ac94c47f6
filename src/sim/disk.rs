//! The simulated lease area: `LEAD_BLOCKS + max_slots` blocks in memory.
//!
//! Block 0 is header copy A (the lease machine only reads it), blocks 1 and 2
//! are the two owner copies, initialised as on a freshly formatted area;
//! blocks 3.. are the slots, all zeros (never written). Reads copy whole
//! blocks; a write lands a prefix of its 512-byte sectors (all eight normally,
//! fewer when torn). Timing (when a read is served, when a write lands) is the
//! scheduler's business, not the disk's.

use crate::core::lease::{FIRST_SLOT_BLOCK, HEADER_BLOCK, LEAD_BLOCKS, OWNER_BLOCK, OWNER_B_BLOCK};
use crate::core::params::Params;
use crate::core::record::{AreaState, Block, Decoded, Header, Owner, Slot, BLOCK};

/// The volume id of every simulated area.
pub const SIM_VOLUME: [u8; 16] = *b"blockfence-sim!!";

/// Size of one sector; a torn write lands a prefix of whole sectors.
pub const SECTOR: usize = 512;
/// Sectors in one block.
pub const SECTORS_PER_BLOCK: usize = BLOCK / SECTOR;

/// The blocks of one lease area.
#[derive(Debug, Clone)]
pub struct Disk {
    blocks: Vec<Block>,
}

impl Disk {
    /// A freshly formatted area with `max_slots` slots.
    pub fn formatted(max_slots: u16, params: Params) -> Disk {
        let mut blocks = vec![[0u8; BLOCK]; LEAD_BLOCKS + max_slots as usize];
        let header = Header {
            area_offset: 1 << 30,
            area_size: 1 << 20,
            max_slots,
            state: AreaState::Active,
            moved_to: 0,
            volume_id: SIM_VOLUME,
            logical_sector: 512,
            physical_sector: 512,
            fs_bytes: 1 << 30,
            params,
            host_dead_ceiling_ms: params.host_dead_ms() as u32,
        };
        blocks[HEADER_BLOCK as usize] = header.encode();
        blocks[OWNER_BLOCK as usize] = Owner::free(params).encode();
        blocks[OWNER_B_BLOCK as usize] = Owner::free(params).encode();
        Disk { blocks }
    }

    /// Copies `count` blocks from `first`; `None` when out of range.
    pub fn read(&self, first: u64, count: usize) -> Option<Vec<Block>> {
        let first = usize::try_from(first).ok()?;
        let end = first.checked_add(count)?;
        self.blocks.get(first..end).map(|b| b.to_vec())
    }

    /// Lands the first `sectors` sectors of `data` on `block`; false when the
    /// block is out of range.
    pub fn write(&mut self, block: u64, data: &Block, sectors: usize) -> bool {
        let Some(b) = usize::try_from(block)
            .ok()
            .and_then(|i| self.blocks.get_mut(i))
        else {
            return false;
        };
        let n = sectors.min(SECTORS_PER_BLOCK) * SECTOR;
        b[..n].copy_from_slice(&data[..n]);
        true
    }

    /// One block, for traces.
    pub fn block(&self, block: u64) -> Option<&Block> {
        self.blocks.get(usize::try_from(block).ok()?)
    }
}

/// A short human description of what `data` holds as area block `block`.
pub fn describe(block: u64, data: &Block) -> String {
    if block == HEADER_BLOCK {
        return match Header::decode(data) {
            Decoded::Valid(h) => format!("header: {:?}", h.state),
            Decoded::Empty => "header: empty".into(),
            Decoded::Corrupt(r) => format!("header: CORRUPT ({r})"),
        };
    }
    if block == OWNER_BLOCK || block == OWNER_B_BLOCK {
        match Owner::decode(data) {
            Decoded::Empty => "owner: empty".into(),
            Decoded::Valid(o) => format!(
                "owner: {:?} {}/{:04x} g{}",
                o.state,
                o.holder_name,
                o.holder_nonce & 0xffff,
                o.generation
            ),
            Decoded::Corrupt(r) => format!("owner: CORRUPT ({r})"),
        }
    } else {
        match Slot::decode(data) {
            Decoded::Empty => format!("s{}: empty", block.saturating_sub(FIRST_SLOT_BLOCK)),
            Decoded::Valid(s) => format!(
                "s{}: {:?} {}/{:04x} g{} max{} seq{}{}",
                block.saturating_sub(FIRST_SLOT_BLOCK),
                s.state,
                s.name,
                s.nonce & 0xffff,
                s.generation,
                s.max_generation_seen,
                s.seq,
                if s.params == Params::default() {
                    String::new()
                } else {
                    format!(" hd{}", s.params.host_dead_ms())
                }
            ),
            Decoded::Corrupt(r) => {
                format!("s{}: CORRUPT ({r})", block.saturating_sub(FIRST_SLOT_BLOCK))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_write_lands_a_prefix() {
        let mut d = Disk::formatted(2, Params::default());
        let data = [7u8; BLOCK];
        assert!(d.write(4, &data, 3));
        let b = d.read(4, 1).unwrap()[0];
        assert!(b[..3 * SECTOR].iter().all(|&x| x == 7));
        assert!(b[3 * SECTOR..].iter().all(|&x| x == 0));
        assert!(d.read(4, 2).is_none());
        assert!(!d.write(5, &data, 8));
        assert!(describe(4, &b).contains("CORRUPT"));
    }
}
