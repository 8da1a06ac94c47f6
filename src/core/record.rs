//! On-disk records of the lease area: encoding, versions and checksums.
//!
//! Every record fills one 4096-byte block, so that a record never shares a block
//! with a record another node writes (a 4096-byte block is also one sector on
//! 4Kn devices and eight on 512e devices; all lease I/O is aligned to it).
//!
//! Common envelope, little-endian:
//!
//! | offset | size | field                                       |
//! |-------:|-----:|---------------------------------------------|
//! | 0      | 4    | magic (`BFHD` header, `BFOW` owner, `BFSL` slot) |
//! | 4      | 2    | record version (this code writes [`VERSION`]) |
//! | 6      | 2    | reserved, zero                              |
//! | 8      | ...  | payload (per kind, below)                   |
//! | 4092   | 4    | crc32c of bytes 0..4092                     |
//!
//! Invariants:
//! - a block of all zeros decodes as [`Decoded::Empty`] (never written);
//! - anything else that fails the magic, version or checksum check decodes as
//!   [`Decoded::Corrupt`], never as a valid record, so a torn write (some sectors
//!   new, some old) can never be taken for a lease;
//! - decoding never panics, whatever the bytes (fuzzed in `fuzz/` and by proptest).
//!
//! This module is pure: no I/O, no clocks.

use crate::core::params::Params;

/// Size of every record and of every lease I/O unit.
pub const BLOCK: usize = 4096;
/// Record format version written by this code.
pub const VERSION: u16 = 1;
/// Longest node name that fits in a record, in bytes.
pub const NAME_MAX: usize = 63;

const CRC_OFFSET: usize = BLOCK - 4;
const MAGIC_HEADER: [u8; 4] = *b"BFHD";
const MAGIC_OWNER: [u8; 4] = *b"BFOW";
const MAGIC_SLOT: [u8; 4] = *b"BFSL";

/// One block of bytes, as read from or written to the disk.
pub type Block = [u8; BLOCK];

/// Why a block is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorruptReason {
    /// The magic is not the one expected for this block.
    BadMagic,
    /// The record was written by a newer blockfence.
    UnsupportedVersion(u16),
    /// The crc32c does not match: a torn or damaged write.
    BadChecksum,
    /// A field holds a value this version does not know.
    BadField(&'static str),
}

impl std::fmt::Display for CorruptReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorruptReason::BadMagic => write!(f, "bad magic"),
            CorruptReason::UnsupportedVersion(v) => {
                write!(
                    f,
                    "record version {v} is newer than this blockfence ({VERSION})"
                )
            }
            CorruptReason::BadChecksum => write!(f, "checksum mismatch (torn or damaged write)"),
            CorruptReason::BadField(name) => write!(f, "invalid value in field {name}"),
        }
    }
}

/// The result of decoding one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// All zeros: nothing was ever written here.
    Empty,
    /// A valid record.
    Valid(T),
    /// Not a valid record; never to be trusted.
    Corrupt(CorruptReason),
}

impl<T> Decoded<T> {
    /// The record, if valid.
    pub fn valid(&self) -> Option<&T> {
        match self {
            Decoded::Valid(t) => Some(t),
            _ => None,
        }
    }
}

/// State of the lease area as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AreaState {
    /// The area is in use at this offset.
    Active,
    /// The area was moved (by `blockfence grow`) to the offset in `moved_to`.
    Moved,
}

/// The area header, kept twice (first and last block of the area).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the area on the device.
    pub area_offset: u64,
    /// Size of the area in bytes.
    pub area_size: u64,
    /// Number of node slots.
    pub max_slots: u16,
    /// Whether this copy of the area is live or was moved.
    pub state: AreaState,
    /// New area offset when `state` is `Moved`.
    pub moved_to: u64,
    /// Random identity of the volume, chosen at format time.
    pub volume_id: [u8; 16],
    /// Logical sector size at format time.
    pub logical_sector: u32,
    /// Physical sector size at format time.
    pub physical_sector: u32,
    /// Bytes at the start of the device given to the filesystem.
    pub fs_bytes: u64,
    /// Default timing parameters chosen at format time.
    pub params: Params,
    /// The longest `host_dead` any node may use on this volume, in ms; the wait
    /// of a node that joins (takes a slot for the first time).
    pub host_dead_ceiling_ms: u32,
}

/// Lease state as recorded in the owner block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerState {
    /// Nobody has taken the lease since format.
    Free,
    /// Held by the node named in the record.
    Held,
    /// Released cleanly by the node named in the record.
    Released,
}

/// The owner record: who holds the lease, with which generation and parameters.
/// Written only by a node that has just won the lease, and at release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub state: OwnerState,
    pub holder_slot: u16,
    pub holder_name: String,
    pub holder_nonce: u64,
    /// The fencing token: grows with every grant.
    pub generation: u64,
    /// Timing parameters of the holder.
    pub params: Params,
}

/// What a node's slot says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// The node owns the slot and does not want the lease.
    Idle,
    /// The node is trying to take the lease with generation `generation`.
    Claim,
    /// The node holds the lease with generation `generation`; every renewal
    /// rewrites the slot with a new `seq`.
    Hold,
    /// The node released the lease cleanly; it no longer writes the volume.
    Released,
}

/// A node's slot: its heartbeat, its intent and its timing parameters.
/// Only the node named in it writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub index: u16,
    pub state: SlotState,
    pub name: String,
    /// Random per process start; tells incarnations of one node apart.
    pub nonce: u64,
    /// Grows with every write of this slot by this incarnation.
    pub seq: u64,
    /// Generation claimed or held (or last held, when idle/released).
    pub generation: u64,
    /// Highest generation this node has seen anywhere.
    pub max_generation_seen: u64,
    pub params: Params,
}

fn put_u16(b: &mut Block, off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Block, off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Block, off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &Block, off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn get_u32(b: &Block, off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &Block, off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_name(b: &mut Block, len_off: usize, name_off: usize, name: &str) {
    let bytes = name.as_bytes();
    let n = bytes.len().min(NAME_MAX);
    b[len_off] = n as u8;
    b[name_off..name_off + n].copy_from_slice(&bytes[..n]);
}
fn get_name(b: &Block, len_off: usize, name_off: usize) -> Result<String, CorruptReason> {
    let n = b[len_off] as usize;
    if n > NAME_MAX {
        return Err(CorruptReason::BadField("name length"));
    }
    String::from_utf8(b[name_off..name_off + n].to_vec())
        .map_err(|_| CorruptReason::BadField("name"))
}

fn put_params(b: &mut Block, off: usize, p: &Params) {
    put_u32(b, off, p.io_timeout_ms);
    put_u32(b, off + 4, p.renew_interval_ms);
    put_u32(b, off + 8, p.lease_timeout_ms);
    put_u32(b, off + 12, p.fence_timeout_ms);
}
fn get_params(b: &Block, off: usize) -> Params {
    Params {
        io_timeout_ms: get_u32(b, off),
        renew_interval_ms: get_u32(b, off + 4),
        lease_timeout_ms: get_u32(b, off + 8),
        fence_timeout_ms: get_u32(b, off + 12),
    }
}

fn seal(mut b: Block, magic: [u8; 4]) -> Block {
    b[0..4].copy_from_slice(&magic);
    put_u16(&mut b, 4, VERSION);
    let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
    put_u32(&mut b, CRC_OFFSET, crc);
    b
}

/// Checks envelope: empty, magic, version, checksum. `Ok(None)` means empty.
fn open(b: &Block, magic: [u8; 4]) -> Result<Option<()>, CorruptReason> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if b[0..4] != magic {
        return Err(CorruptReason::BadMagic);
    }
    let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
    if crc != get_u32(b, CRC_OFFSET) {
        return Err(CorruptReason::BadChecksum);
    }
    let version = get_u16(b, 4);
    if version != VERSION {
        return Err(CorruptReason::UnsupportedVersion(version));
    }
    Ok(Some(()))
}

fn decode_with<T>(
    b: &Block,
    magic: [u8; 4],
    f: impl FnOnce(&Block) -> Result<T, CorruptReason>,
) -> Decoded<T> {
    match open(b, magic) {
        Ok(None) => Decoded::Empty,
        Ok(Some(())) => match f(b) {
            Ok(t) => Decoded::Valid(t),
            Err(e) => Decoded::Corrupt(e),
        },
        Err(e) => Decoded::Corrupt(e),
    }
}

impl Header {
    /// Encodes the header into one block.
    pub fn encode(&self) -> Block {
        let mut b = [0u8; BLOCK];
        put_u64(&mut b, 8, self.area_offset);
        put_u64(&mut b, 16, self.area_size);
        put_u32(&mut b, 24, BLOCK as u32);
        put_u16(&mut b, 28, self.max_slots);
        put_u16(
            &mut b,
            30,
            match self.state {
                AreaState::Active => 0,
                AreaState::Moved => 1,
            },
        );
        put_u64(&mut b, 32, self.moved_to);
        b[40..56].copy_from_slice(&self.volume_id);
        put_u32(&mut b, 56, self.logical_sector);
        put_u32(&mut b, 60, self.physical_sector);
        put_u64(&mut b, 64, self.fs_bytes);
        put_params(&mut b, 72, &self.params);
        put_u32(&mut b, 88, self.host_dead_ceiling_ms);
        seal(b, MAGIC_HEADER)
    }

    /// Decodes a header block.
    pub fn decode(b: &Block) -> Decoded<Header> {
        decode_with(b, MAGIC_HEADER, |b| {
            if get_u32(b, 24) as usize != BLOCK {
                return Err(CorruptReason::BadField("block size"));
            }
            let state = match get_u16(b, 30) {
                0 => AreaState::Active,
                1 => AreaState::Moved,
                _ => return Err(CorruptReason::BadField("area state")),
            };
            let mut volume_id = [0u8; 16];
            volume_id.copy_from_slice(&b[40..56]);
            Ok(Header {
                area_offset: get_u64(b, 8),
                area_size: get_u64(b, 16),
                max_slots: get_u16(b, 28),
                state,
                moved_to: get_u64(b, 32),
                volume_id,
                logical_sector: get_u32(b, 56),
                physical_sector: get_u32(b, 60),
                fs_bytes: get_u64(b, 64),
                params: get_params(b, 72),
                host_dead_ceiling_ms: get_u32(b, 88),
            })
        })
    }
}

impl Owner {
    /// The owner record of a freshly formatted area.
    pub fn free(params: Params) -> Owner {
        Owner {
            state: OwnerState::Free,
            holder_slot: 0,
            holder_name: String::new(),
            holder_nonce: 0,
            generation: 0,
            params,
        }
    }

    /// The owner record from its copies (blocks A and B): the valid copy with
    /// the highest generation; else corrupt if any copy is, else empty.
    pub fn best_of(copies: &[Block]) -> Decoded<Owner> {
        let mut best: Decoded<Owner> = Decoded::Empty;
        for b in copies {
            match (Owner::decode(b), &best) {
                (Decoded::Valid(o), Decoded::Valid(cur)) if o.generation <= cur.generation => {}
                (Decoded::Valid(o), _) => best = Decoded::Valid(o),
                (Decoded::Corrupt(r), Decoded::Empty) => best = Decoded::Corrupt(r),
                _ => {}
            }
        }
        best
    }

    /// Encodes the owner record into one block.
    pub fn encode(&self) -> Block {
        let mut b = [0u8; BLOCK];
        b[8] = match self.state {
            OwnerState::Free => 0,
            OwnerState::Held => 1,
            OwnerState::Released => 2,
        };
        put_u16(&mut b, 10, self.holder_slot);
        put_name(&mut b, 9, 12, &self.holder_name);
        put_u64(&mut b, 76, self.holder_nonce);
        put_u64(&mut b, 84, self.generation);
        put_params(&mut b, 92, &self.params);
        seal(b, MAGIC_OWNER)
    }

    /// Decodes an owner block.
    pub fn decode(b: &Block) -> Decoded<Owner> {
        decode_with(b, MAGIC_OWNER, |b| {
            let state = match b[8] {
                0 => OwnerState::Free,
                1 => OwnerState::Held,
                2 => OwnerState::Released,
                _ => return Err(CorruptReason::BadField("owner state")),
            };
            Ok(Owner {
                state,
                holder_slot: get_u16(b, 10),
                holder_name: get_name(b, 9, 12)?,
                holder_nonce: get_u64(b, 76),
                generation: get_u64(b, 84),
                params: get_params(b, 92),
            })
        })
    }
}

impl Slot {
    /// Encodes the slot into one block.
    pub fn encode(&self) -> Block {
        let mut b = [0u8; BLOCK];
        put_u16(&mut b, 8, self.index);
        b[10] = match self.state {
            SlotState::Idle => 1,
            SlotState::Claim => 2,
            SlotState::Hold => 3,
            SlotState::Released => 4,
        };
        put_name(&mut b, 11, 12, &self.name);
        put_u64(&mut b, 76, self.nonce);
        put_u64(&mut b, 84, self.seq);
        put_u64(&mut b, 92, self.generation);
        put_u64(&mut b, 100, self.max_generation_seen);
        put_params(&mut b, 108, &self.params);
        seal(b, MAGIC_SLOT)
    }

    /// Decodes a slot block.
    pub fn decode(b: &Block) -> Decoded<Slot> {
        decode_with(b, MAGIC_SLOT, |b| {
            let state = match b[10] {
                1 => SlotState::Idle,
                2 => SlotState::Claim,
                3 => SlotState::Hold,
                4 => SlotState::Released,
                _ => return Err(CorruptReason::BadField("slot state")),
            };
            Ok(Slot {
                index: get_u16(b, 8),
                state,
                name: get_name(b, 11, 12)?,
                nonce: get_u64(b, 76),
                seq: get_u64(b, 84),
                generation: get_u64(b, 92),
                max_generation_seen: get_u64(b, 100),
                params: get_params(b, 108),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot() -> Slot {
        Slot {
            index: 3,
            state: SlotState::Hold,
            name: "worker-1".into(),
            nonce: 0xdead_beef,
            seq: 42,
            generation: 7,
            max_generation_seen: 7,
            params: Params::default(),
        }
    }

    #[test]
    fn slot_round_trips() {
        let s = slot();
        assert_eq!(Slot::decode(&s.encode()), Decoded::Valid(s));
    }

    #[test]
    fn owner_round_trips() {
        let o = Owner {
            state: OwnerState::Held,
            holder_slot: 5,
            holder_name: "n".into(),
            holder_nonce: 9,
            generation: 11,
            params: Params::default(),
        };
        assert_eq!(Owner::decode(&o.encode()), Decoded::Valid(o));
    }

    #[test]
    fn zero_block_is_empty_and_kinds_do_not_mix() {
        assert_eq!(Slot::decode(&[0u8; BLOCK]), Decoded::Empty);
        let s = slot().encode();
        assert_eq!(Owner::decode(&s), Decoded::Corrupt(CorruptReason::BadMagic));
        assert_eq!(
            Header::decode(&s),
            Decoded::Corrupt(CorruptReason::BadMagic)
        );
    }

    #[test]
    fn newer_version_is_refused() {
        let mut b = slot().encode();
        put_u16(&mut b, 4, VERSION + 1);
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        put_u32(&mut b, CRC_OFFSET, crc);
        assert_eq!(
            Slot::decode(&b),
            Decoded::Corrupt(CorruptReason::UnsupportedVersion(VERSION + 1))
        );
    }

    proptest! {
        /// Any torn write (a prefix of 512-byte sectors new, the rest old) of two
        /// different valid records is either one of them or corrupt, never a third.
        #[test]
        fn torn_writes_are_never_valid_new_records(sectors in 1usize..8, seq in 0u64..1000) {
            let old = slot();
            let mut new = slot();
            new.seq = old.seq + 1 + seq;
            new.generation = old.generation + 1;
            let (a, b) = (old.encode(), new.encode());
            let mut torn = a;
            torn[..sectors * 512].copy_from_slice(&b[..sectors * 512]);
            match Slot::decode(&torn) {
                Decoded::Valid(s) => prop_assert!(s == old || s == new),
                Decoded::Corrupt(_) => {}
                Decoded::Empty => prop_assert!(false),
            }
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), BLOCK)) {
            let mut b = [0u8; BLOCK];
            b.copy_from_slice(&bytes);
            let _ = Slot::decode(&b);
            let _ = Owner::decode(&b);
            let _ = Header::decode(&b);
        }

        #[test]
        fn any_single_bit_flip_is_detected(bit in 0usize..(BLOCK * 8)) {
            let mut b = slot().encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(matches!(Slot::decode(&b), Decoded::Corrupt(_)));
        }
    }
}
