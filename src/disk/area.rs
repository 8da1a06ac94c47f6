//! The lease area on a device: where it is, how it is formatted, opened,
//! inspected and moved when the device grows.
//!
//! Layout (decided; see also `core::record`):
//!
//! ```text
//! device: [ filesystem: 0 .. area_offset ) [ lease area: 1 MiB ) [ < 1 MiB unused )
//! area_offset = align_down(device_size, 1 MiB) - 1 MiB
//!
//! area block  0        header copy A
//! area block  1        owner record, copy A
//! area block  2        owner record, copy B (written after A)
//! area blocks 3..3+n   slots 0..n   (n = max_slots, default 32, at most 252)
//! area blocks ..254    zero
//! area block  255      header copy B (identical to A)
//! ```
//!
//! Invariants:
//! - the area is found from the device size alone ([`area_offset_for`]); the
//!   header records the offset it was written at, and a header whose recorded
//!   offset is not where it was read is never trusted;
//! - an area counts as present when at least one header copy is intact; a
//!   damaged copy is reported ([`AreaInfo::degraded`]), never silently used;
//!   two intact copies that disagree are refused;
//! - format and grow write headers *last* (B, then A), after the blocks they
//!   describe, so a crash leaves either no new area or a complete one;
//! - grow never leaves two `Active` areas: it marks the old area `Moved`
//!   before it writes the new one, and a half-done grow is found and finished
//!   by running grow again. After a grow, the old area's owner and slot blocks
//!   hold a copy of its `Moved` header, so a node that still reads the old
//!   area sees no valid owner record (and can learn where the area went).
//!
//! These functions do plain, synchronous I/O for the CLI (format, inspect,
//! grow) and daemon start-up; lease I/O with deadlines goes through
//! [`IoWorker`](crate::disk::worker::IoWorker) over an
//! [`AreaStore`](crate::disk::store::AreaStore).

use std::path::{Path, PathBuf};

use crate::core::params::Params;
use crate::core::record::{
    AreaState, Block, CorruptReason, Decoded, Header, Owner, OwnerState, Slot, SlotState, BLOCK,
};
use crate::disk::blockdev::AlignedBuf;
use crate::disk::device::DeviceIo;
use crate::disk::error::{DiskError, HeaderCopy};

const MIB: u64 = 1 << 20;

/// Size of the lease area in bytes.
pub const AREA_SIZE: u64 = MIB;
/// Alignment of the lease area's offset on the device.
pub const AREA_ALIGN: u64 = MIB;
/// Number of 4096-byte blocks in the area.
pub const AREA_BLOCKS: u64 = AREA_SIZE / BLOCK as u64;
/// Area block of slot 0; slot `i` is at `SLOT_BLOCK0 + i`.
pub use crate::core::lease::FIRST_SLOT_BLOCK as SLOT_BLOCK0;
/// Area block of header copy A (the lease machine re-reads it with every scan).
pub use crate::core::lease::HEADER_BLOCK as HEADER_A_BLOCK;
/// Area block of the owner record.
pub use crate::core::lease::OWNER_BLOCK;
/// Area block of header copy B.
pub const HEADER_B_BLOCK: u64 = AREA_BLOCKS - 1;
/// Number of slots a format creates unless told otherwise.
pub const DEFAULT_MAX_SLOTS: u16 = 32;
/// Most slots that fit between the owner block and header B.
pub const MAX_SLOTS: u16 = (HEADER_B_BLOCK - SLOT_BLOCK0) as u16;
/// Smallest filesystem space left in front of the area.
pub const MIN_FS_BYTES: u64 = 16 * MIB;
/// Smallest device blockfence formats: the area plus [`MIN_FS_BYTES`].
pub const MIN_DEVICE_BYTES: u64 = MIN_FS_BYTES + AREA_SIZE;
/// How far below the expected offset `open_area` looks for an area left
/// behind by a device that grew (to report `DeviceGrown`).
pub const OPEN_SEARCH_BYTES: u64 = 4 << 30;
/// How far below the new offset `grow_area` looks for the old area by default
/// (one 8 KiB read per MiB: about 65 us each on a loop device, so 256 GiB
/// take some 17 s). Usually not needed: the end of the ext4 filesystem points
/// at the old area directly, and the caller may pass the old offset.
pub const GROW_SEARCH_BYTES: u64 = 256 << 30;

/// Where the lease area of a device of `device_size` bytes starts, or `None`
/// when the device is smaller than [`MIN_DEVICE_BYTES`].
pub const fn area_offset_for(device_size: u64) -> Option<u64> {
    if device_size < MIN_DEVICE_BYTES {
        return None;
    }
    Some(device_size / AREA_ALIGN * AREA_ALIGN - AREA_SIZE)
}

/// Area block of slot `index`.
pub const fn slot_block(index: u16) -> u64 {
    SLOT_BLOCK0 + index as u64
}

/// A fresh random volume identity.
pub fn new_volume_id() -> [u8; 16] {
    rand::random()
}

/// A header copy that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub which: HeaderCopy,
    pub reason: String,
}

/// A lease area found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaInfo {
    pub device: PathBuf,
    pub device_size: u64,
    pub area_offset: u64,
    /// The intact header (both copies, or the one left).
    pub header: Header,
    /// Set when one header copy is damaged or missing; the area is usable, and
    /// [`repair_header`] rewrites the copy.
    pub degraded: Option<Damage>,
}

/// Owner and slots of an area, decoded, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaSnapshot {
    pub info: AreaInfo,
    pub owner: Decoded<Owner>,
    /// Slot `i` at index `i`, `max_slots` of them.
    pub slots: Vec<Decoded<Slot>>,
}

impl AreaSnapshot {
    /// Decodes area blocks from `OWNER_BLOCK` on: the owner copies, then the slots.
    pub fn decode(info: AreaInfo, blocks: &[Block]) -> AreaSnapshot {
        let owners = (SLOT_BLOCK0 - OWNER_BLOCK) as usize;
        let owner = Owner::best_of(&blocks[..owners.min(blocks.len())]);
        let slots = blocks
            .iter()
            .skip(owners)
            .take(info.header.max_slots as usize)
            .map(Slot::decode)
            .collect();
        AreaSnapshot { info, owner, slots }
    }
}

// ---------------------------------------------------------------------------
// Judging the two header copies (pure).

/// One header copy, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Copy {
    Valid(Header),
    /// All zeros, or not a header (another magic): nothing of ours.
    Absent(&'static str),
    /// Our magic, but unusable: torn, damaged, newer version, impossible field.
    Damaged(String),
}

fn classify(at: u64, block: &Block) -> Copy {
    match Header::decode(block) {
        Decoded::Empty => Copy::Absent("all zeros"),
        Decoded::Corrupt(CorruptReason::BadMagic) => Copy::Absent("no blockfence header"),
        Decoded::Corrupt(reason) => Copy::Damaged(reason.to_string()),
        Decoded::Valid(h) => {
            if h.area_offset != at {
                Copy::Damaged(format!(
                    "records area offset {} but was read at {at}",
                    h.area_offset
                ))
            } else if h.area_size != AREA_SIZE {
                Copy::Damaged(format!("area size {} is not {AREA_SIZE}", h.area_size))
            } else if h.max_slots == 0 || h.max_slots > MAX_SLOTS {
                Copy::Damaged(format!("max_slots {} out of range", h.max_slots))
            } else if h.fs_bytes > h.area_offset {
                Copy::Damaged(format!(
                    "fs_bytes {} overlaps the area at {}",
                    h.fs_bytes, h.area_offset
                ))
            } else {
                Copy::Valid(h)
            }
        }
    }
}

/// What the two copies at one offset say together.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Active {
        header: Header,
        degraded: Option<Damage>,
    },
    Moved {
        header: Header,
    },
    NotFormatted,
    Corrupt {
        which: HeaderCopy,
        reason: String,
    },
    Mismatch {
        detail: String,
    },
}

fn judge(at: u64, a: &Block, b: &Block) -> Verdict {
    let damage = |which, c: &Copy| Damage {
        which,
        reason: match c {
            Copy::Valid(_) => String::new(),
            Copy::Absent(why) => (*why).to_string(),
            Copy::Damaged(why) => why.clone(),
        },
    };
    let (ca, cb) = (classify(at, a), classify(at, b));
    let one = |header: &Header, degraded: Option<Damage>| {
        if header.state == AreaState::Moved {
            Verdict::Moved {
                header: header.clone(),
            }
        } else {
            Verdict::Active {
                header: header.clone(),
                degraded,
            }
        }
    };
    match (&ca, &cb) {
        (Copy::Valid(ha), Copy::Valid(hb)) if ha == hb => one(ha, None),
        (Copy::Valid(ha), Copy::Valid(hb)) => {
            // A grow interrupted between marking copy A and copy B `Moved`.
            if ha.state == AreaState::Moved {
                one(ha, None)
            } else if hb.state == AreaState::Moved {
                one(hb, None)
            } else {
                Verdict::Mismatch {
                    detail: format!("copy A {ha:?}, copy B {hb:?}"),
                }
            }
        }
        (Copy::Valid(h), other) => one(h, Some(damage(HeaderCopy::B, other))),
        (other, Copy::Valid(h)) => one(h, Some(damage(HeaderCopy::A, other))),
        (Copy::Damaged(ra), Copy::Damaged(rb)) => Verdict::Corrupt {
            which: HeaderCopy::Both,
            reason: format!("A: {ra}; B: {rb}"),
        },
        (Copy::Damaged(r), Copy::Absent(why)) => Verdict::Corrupt {
            which: HeaderCopy::A,
            reason: format!("{r}; copy B: {why}"),
        },
        (Copy::Absent(why), Copy::Damaged(r)) => Verdict::Corrupt {
            which: HeaderCopy::B,
            reason: format!("{r}; copy A: {why}"),
        },
        (Copy::Absent(_), Copy::Absent(_)) => Verdict::NotFormatted,
    }
}

// ---------------------------------------------------------------------------
// Device I/O helpers.

fn path_of<D: DeviceIo + ?Sized>(dev: &D) -> PathBuf {
    dev.path().to_path_buf()
}

fn read_block<D: DeviceIo + ?Sized>(dev: &D, offset: u64) -> Result<Block, DiskError> {
    let buf = dev.read_at(offset, BLOCK)?;
    Ok(*buf.block(0).expect("a one-block read returns one block"))
}

fn write_blocks<D: DeviceIo + ?Sized>(
    dev: &D,
    offset: u64,
    blocks: &[Block],
) -> Result<(), DiskError> {
    dev.write_at(offset, &AlignedBuf::from_blocks(blocks))
}

fn block_offset(area_offset: u64, block: u64) -> u64 {
    area_offset + block * BLOCK as u64
}

fn read_verdict<D: DeviceIo + ?Sized>(dev: &D, at: u64) -> Result<Verdict, DiskError> {
    let a = read_block(dev, block_offset(at, HEADER_A_BLOCK))?;
    let b = read_block(dev, block_offset(at, HEADER_B_BLOCK))?;
    Ok(judge(at, &a, &b))
}

/// Writes header B then header A (after the blocks they describe).
fn write_headers<D: DeviceIo + ?Sized>(dev: &D, header: &Header) -> Result<(), DiskError> {
    let block = header.encode();
    write_blocks(
        dev,
        block_offset(header.area_offset, HEADER_B_BLOCK),
        &[block],
    )?;
    write_blocks(
        dev,
        block_offset(header.area_offset, HEADER_A_BLOCK),
        &[block],
    )
}

fn expected_offset<D: DeviceIo + ?Sized>(dev: &D) -> Result<u64, DiskError> {
    let size = dev.size_bytes();
    area_offset_for(size).ok_or_else(|| DiskError::TooSmall {
        path: path_of(dev),
        size,
        min: MIN_DEVICE_BYTES,
    })
}

// ---------------------------------------------------------------------------
// Format.

/// Writes a fresh lease area at the end of `dev`: an owner record
/// `Owner::free(params)`, `max_slots` empty slots, zeros up to header B, then
/// header B and header A. Overwrites whatever is there: the caller checks
/// first (with [`open_area`]) that no area in use is being destroyed.
pub fn format_area<D: DeviceIo + ?Sized>(
    dev: &D,
    max_slots: u16,
    params: Params,
    volume_id: [u8; 16],
    host_dead_ceiling_ms: u32,
) -> Result<AreaInfo, DiskError> {
    if max_slots == 0 || max_slots > MAX_SLOTS {
        return Err(DiskError::BadMaxSlots {
            max_slots,
            max: MAX_SLOTS,
        });
    }
    params.validate()?;
    if (host_dead_ceiling_ms as u64) < params.host_dead_ms() {
        return Err(DiskError::BadHostDeadCeiling {
            ceiling_ms: host_dead_ceiling_ms,
            needed_ms: params.host_dead_ms(),
        });
    }
    let area_offset = expected_offset(dev)?;
    let header = Header {
        area_offset,
        area_size: AREA_SIZE,
        max_slots,
        state: AreaState::Active,
        moved_to: 0,
        volume_id,
        logical_sector: dev.logical_sector(),
        physical_sector: dev.physical_sector(),
        fs_bytes: area_offset,
        params,
        host_dead_ceiling_ms,
    };
    // Blocks 1..=254: owner, empty slots, zeros.
    let mut body = vec![[0u8; BLOCK]; (HEADER_B_BLOCK - OWNER_BLOCK) as usize];
    for owner in body.iter_mut().take((SLOT_BLOCK0 - OWNER_BLOCK) as usize) {
        *owner = Owner::free(params).encode();
    }
    write_blocks(dev, block_offset(area_offset, OWNER_BLOCK), &body)?;
    write_headers(dev, &header)?;
    Ok(AreaInfo {
        device: path_of(dev),
        device_size: dev.size_bytes(),
        area_offset,
        header,
        degraded: None,
    })
}

// ---------------------------------------------------------------------------
// Open and inspect.

/// Finds the lease area of `dev` at the offset its size implies and checks
/// both header copies.
///
/// Errors: `TooSmall`; `NotFormatted` (both copies zero or foreign);
/// `Corrupt` (our magic in a copy, but no intact copy); `HeaderMismatch`;
/// `Moved` (this area was moved by grow: this node sees an old device size);
/// `DeviceGrown` (nothing here, but an area sits lower on the device).
pub fn open_area<D: DeviceIo + ?Sized>(dev: &D) -> Result<AreaInfo, DiskError> {
    let at = expected_offset(dev)?;
    match read_verdict(dev, at)? {
        Verdict::Active { header, degraded } => Ok(AreaInfo {
            device: path_of(dev),
            device_size: dev.size_bytes(),
            area_offset: at,
            header,
            degraded,
        }),
        Verdict::NotFormatted => match find_old_area(dev, at, OPEN_SEARCH_BYTES, None)? {
            Found::Area { at: old, .. } => Err(DiskError::DeviceGrown {
                path: path_of(dev),
                old_offset: old,
                new_offset: at,
            }),
            Found::Nothing { .. } => Err(DiskError::NotFormatted {
                path: path_of(dev),
                offset: at,
            }),
        },
        // Torn headers here, and an area below that was moved here: a grow
        // that stopped while writing the new headers. Grow again finishes it.
        corrupt @ Verdict::Corrupt { .. } => {
            match find_old_area(dev, at, OPEN_SEARCH_BYTES, None)? {
                Found::Area { at: old, header } if header.state == AreaState::Moved => {
                    Err(DiskError::DeviceGrown {
                        path: path_of(dev),
                        old_offset: old,
                        new_offset: at,
                    })
                }
                _ => Err(verdict_error(dev, at, corrupt)),
            }
        }
        other => Err(verdict_error(dev, at, other)),
    }
}

fn verdict_error<D: DeviceIo + ?Sized>(dev: &D, at: u64, v: Verdict) -> DiskError {
    let path = path_of(dev);
    match v {
        Verdict::Moved { header } => DiskError::Moved {
            path,
            offset: at,
            moved_to: header.moved_to,
            device_size: dev.size_bytes(),
        },
        Verdict::Corrupt { which, reason } => DiskError::Corrupt {
            path,
            offset: at,
            which,
            reason,
        },
        Verdict::Mismatch { detail } => DiskError::HeaderMismatch {
            path,
            offset: at,
            detail,
        },
        Verdict::NotFormatted | Verdict::Active { .. } => {
            DiskError::NotFormatted { path, offset: at }
        }
    }
}

/// Opens the area and decodes its owner record and slots.
pub fn read_area_snapshot<D: DeviceIo + ?Sized>(dev: &D) -> Result<AreaSnapshot, DiskError> {
    let info = open_area(dev)?;
    let blocks = read_body(dev, info.area_offset, info.header.max_slots)?;
    Ok(AreaSnapshot::decode(info, &blocks))
}

/// Owner blocks (both copies) and slot blocks of the area at `at`.
fn read_body<D: DeviceIo + ?Sized>(
    dev: &D,
    at: u64,
    max_slots: u16,
) -> Result<Vec<Block>, DiskError> {
    let buf = dev.read_at(
        block_offset(at, OWNER_BLOCK),
        ((SLOT_BLOCK0 - OWNER_BLOCK) as usize + max_slots as usize) * BLOCK,
    )?;
    Ok(buf.to_blocks())
}

/// Rewrites a damaged or missing header copy from the intact one. Returns the
/// copy repaired, or `None` when both were intact.
pub fn repair_header<D: DeviceIo + ?Sized>(dev: &D) -> Result<Option<HeaderCopy>, DiskError> {
    let info = open_area(dev)?;
    let Some(damage) = info.degraded else {
        return Ok(None);
    };
    // `judge` reports only A or B as degraded: with both damaged there is no area.
    let block = if damage.which == HeaderCopy::A {
        HEADER_A_BLOCK
    } else {
        HEADER_B_BLOCK
    };
    write_blocks(
        dev,
        block_offset(info.area_offset, block),
        &[info.header.encode()],
    )?;
    Ok(Some(damage.which))
}

// ---------------------------------------------------------------------------
// Finding an area left behind by a device that grew.

enum Found {
    /// An area at `at`: `Active`, or `Moved` to the offset we came from (a grow
    /// interrupted after marking it).
    Area { at: u64, header: Header },
    /// None found; `corrupt` is the highest damaged area seen, if any.
    Nothing {
        corrupt: Option<(u64, HeaderCopy, String)>,
    },
}

/// The size of the ext4 filesystem at the start of `dev`, from its primary
/// superblock, if there is one. Only the three fields needed for the size are
/// read here; full superblock parsing lives in `crate::ext4`. A filesystem made
/// at format time fills `fs_bytes` exactly, so its end is where the area was.
fn ext4_size_hint<D: DeviceIo + ?Sized>(dev: &D) -> Option<u64> {
    let b = read_block(dev, 0).ok()?;
    let sb = &b[1024..2048];
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None;
    }
    let mut blocks = u32_at(0x04) as u64;
    if u32_at(0x60) & 0x80 != 0 {
        blocks |= (u32_at(0x150) as u64) << 32;
    }
    blocks.checked_mul(1024u64 << log)
}

fn is_candidate(found: &Verdict, target: u64) -> Option<Header> {
    match found {
        Verdict::Active { header, .. } => Some(header.clone()),
        Verdict::Moved { header } if header.moved_to == target => Some(header.clone()),
        _ => None,
    }
}

/// Looks below `target` for an area: first at `hint` and at the end of the
/// ext4 filesystem, then every 1 MiB-aligned offset downwards, at most
/// `limit` bytes, one 8 KiB read per step (header B of the area below a
/// boundary and header A of the area above it).
fn find_old_area<D: DeviceIo + ?Sized>(
    dev: &D,
    target: u64,
    limit: u64,
    hint: Option<u64>,
) -> Result<Found, DiskError> {
    let mut hints: Vec<u64> = hint.into_iter().collect();
    if let Some(fs) = ext4_size_hint(dev) {
        hints.push(fs.div_ceil(AREA_ALIGN) * AREA_ALIGN);
    }
    for at in hints {
        if at % AREA_ALIGN == 0 && (MIN_FS_BYTES..target).contains(&at) {
            if let Some(header) = is_candidate(&read_verdict(dev, at)?, target) {
                return Ok(Found::Area { at, header });
            }
        }
    }

    let lowest = target.saturating_sub(limit).max(MIN_FS_BYTES);
    let mut corrupt = None;
    // `above` holds header B of the area just below boundary `b`, read with A
    // of the area at `b`; walk boundaries from `target` down.
    let mut b_of_below: Option<Block> = None;
    let mut boundary = target;
    while boundary >= lowest {
        let buf = dev.read_at(boundary - BLOCK as u64, 2 * BLOCK)?;
        let b_below = *buf.block(0).expect("two blocks");
        let a_here = *buf.block(1).expect("two blocks");
        if boundary < target {
            let b_here = b_of_below.unwrap_or([0u8; BLOCK]);
            let v = judge(boundary, &a_here, &b_here);
            if let Some(header) = is_candidate(&v, target) {
                return Ok(Found::Area {
                    at: boundary,
                    header,
                });
            }
            if let Verdict::Corrupt { which, reason } = v {
                corrupt.get_or_insert((boundary, which, reason));
            }
        }
        b_of_below = Some(b_below);
        boundary -= AREA_ALIGN;
    }
    Ok(Found::Nothing { corrupt })
}

// ---------------------------------------------------------------------------
// Grow.

/// Who may move the area, checked on the old area's owner and slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowAuthority {
    /// Nobody holds or claims the lease: the owner record is not `Held` and
    /// no slot is in `Claim` or `Hold` (or unreadable). The default.
    AreaFree,
    /// The caller holds the lease: the owner record is `Held` by `slot` with
    /// `generation`, that slot is in `Hold` with that generation, and no other
    /// slot is in `Claim` or `Hold` (or unreadable).
    Holder { slot: u16, generation: u64 },
    /// No check. Only when blockfence is stopped on every node that uses the
    /// volume (for example after a crash left a stale `Hold`).
    Force,
}

/// Options of [`grow_area`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowOptions {
    pub authority: GrowAuthority,
    /// The old area's offset, when known (skips the search; verified).
    pub old_offset: Option<u64>,
    /// How far below the new offset to search for the old area.
    pub search_bytes: u64,
}

impl Default for GrowOptions {
    fn default() -> Self {
        GrowOptions {
            authority: GrowAuthority::AreaFree,
            old_offset: None,
            search_bytes: GROW_SEARCH_BYTES,
        }
    }
}

/// What [`grow_area`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowReport {
    pub old_offset: u64,
    pub new_offset: u64,
    /// `fs_bytes` recorded in the header (unchanged by grow).
    pub fs_bytes: u64,
    /// The size the filesystem may now be grown to: the new area offset.
    pub fs_max_bytes: u64,
    /// True when this call finished a grow interrupted earlier.
    pub resumed: bool,
}

impl GrowReport {
    /// The command that grows an ext4 filesystem up to the new area.
    pub fn resize2fs_command(&self, device: &Path) -> String {
        format!(
            "resize2fs {} {}K",
            device.display(),
            self.fs_max_bytes / 1024
        )
    }
}

fn check_authority(
    auth: GrowAuthority,
    owner: &Decoded<Owner>,
    slots: &[Decoded<Slot>],
) -> Result<(), String> {
    let holder = match auth {
        GrowAuthority::Force => return Ok(()),
        GrowAuthority::AreaFree => None,
        GrowAuthority::Holder { slot, generation } => Some((slot, generation)),
    };
    match (owner, holder) {
        (Decoded::Valid(o), None) if o.state != OwnerState::Held => {}
        (Decoded::Valid(o), None) => {
            return Err(format!(
                "the lease is held by slot {} ({}) with generation {}",
                o.holder_slot, o.holder_name, o.generation
            ))
        }
        (Decoded::Valid(o), Some((slot, generation))) => {
            if o.state != OwnerState::Held || o.holder_slot != slot || o.generation != generation {
                return Err(format!(
                    "the owner record says {:?} by slot {} with generation {}, not held by \
                     slot {slot} with generation {generation}",
                    o.state, o.holder_slot, o.generation
                ));
            }
        }
        (Decoded::Empty, _) => return Err("the owner record is missing".into()),
        (Decoded::Corrupt(r), _) => return Err(format!("the owner record is unreadable ({r})")),
    }
    for (i, s) in slots.iter().enumerate() {
        let mine = holder.filter(|&(slot, _)| slot as usize == i);
        match (s, mine) {
            (Decoded::Empty, None) => {}
            (Decoded::Valid(s), None)
                if matches!(s.state, SlotState::Idle | SlotState::Released) => {}
            (Decoded::Valid(s), Some((_, generation)))
                if s.state == SlotState::Hold && s.generation == generation => {}
            (Decoded::Valid(s), _) => {
                return Err(format!(
                    "slot {i} ({}) is in state {:?} with generation {}",
                    s.name, s.state, s.generation
                ))
            }
            (Decoded::Empty, Some(_)) => return Err(format!("slot {i} is empty")),
            (Decoded::Corrupt(r), _) => return Err(format!("slot {i} is unreadable ({r})")),
        }
    }
    Ok(())
}

/// Moves the lease area of an enlarged device to the offset its new size
/// implies, and returns where the filesystem may now grow to.
///
/// Steps, each safe to crash after (running grow again finishes the job):
/// 1. find the old area (`opts.old_offset`, the end of the ext4 filesystem,
///    then a bounded search downwards) and check `opts.authority` on it;
/// 2. mark both old header copies `Moved` with `moved_to` = new offset (from
///    now on no node opens the old area), re-read the old owner and slots and
///    check the authority again (on failure the old headers are restored);
/// 3. write owner, slots and zeros at the new offset, then header B and A
///    (`fs_bytes` unchanged: the filesystem is resized separately);
/// 4. overwrite the old owner and slot blocks with the old `Moved` header.
///
/// A run after a crash recognises where the last one stopped: the old area
/// still `Active` (start over), `Moved` here with no or torn headers here
/// (steps 2 to 4 again), or the new area complete with the old one not yet
/// overwritten (step 4 only). Torn headers at the new offset with no old
/// area moved there are refused as `Corrupt`.
///
/// The filesystem is not touched. Nodes whose kernel still sees the old size
/// get `Moved` from [`open_area`] until they re-read the size; a daemon
/// already running on the old area must notice the `Moved` header (or the
/// unreadable owner record) and stop using it.
pub fn grow_area<D: DeviceIo + ?Sized>(
    dev: &D,
    opts: &GrowOptions,
) -> Result<GrowReport, DiskError> {
    let new = expected_offset(dev)?;
    let path = path_of(dev);
    let mut only_moved = false;
    match read_verdict(dev, new)? {
        Verdict::NotFormatted => {}
        // Torn new headers: only a grow that stopped half-way (an old area
        // moved here) may overwrite them.
        Verdict::Corrupt { .. } => only_moved = true,
        Verdict::Active { header, .. } => {
            // Already moved; finish step 4 if a grow stopped before it.
            // Look where a first grow left it (fs_bytes) and nearby only: a full
            // search on every no-op grow would be slow on a large device.
            let limit = opts.search_bytes.min(OPEN_SEARCH_BYTES);
            if let Found::Area { at, header: old } =
                find_old_area(dev, new, limit, Some(header.fs_bytes))?
            {
                if old.state == AreaState::Moved
                    && old.volume_id == header.volume_id
                    && !is_tombstoned(dev, at, &old)?
                {
                    tombstone(dev, at, &old)?;
                    return Ok(GrowReport {
                        old_offset: at,
                        new_offset: new,
                        fs_bytes: header.fs_bytes,
                        fs_max_bytes: new,
                        resumed: true,
                    });
                }
            }
            return Err(DiskError::NothingToGrow {
                path,
                offset: new,
                device_size: dev.size_bytes(),
            });
        }
        other => return Err(verdict_error(dev, new, other)),
    }

    let (old_at, old) = match find_old_area(dev, new, opts.search_bytes, opts.old_offset)? {
        Found::Area { header, .. } if only_moved && header.state != AreaState::Moved => {
            return Err(verdict_error(dev, new, read_verdict(dev, new)?));
        }
        Found::Area { at, header } => (at, header),
        Found::Nothing {
            corrupt: Some((at, which, reason)),
        } => {
            return Err(DiskError::Corrupt {
                path,
                offset: at,
                which,
                reason,
            })
        }
        Found::Nothing { corrupt: None } => {
            return Err(DiskError::OldAreaNotFound {
                path,
                below: new,
                searched_bytes: new - new.saturating_sub(opts.search_bytes).max(MIN_FS_BYTES),
            })
        }
    };
    let resumed = old.state == AreaState::Moved;
    let refuse = |reason: String| DiskError::GrowRefused {
        path: path.clone(),
        reason,
    };

    // 1. Authority on the old area as it is.
    let snap = |blocks: &[Block]| {
        let owners = (SLOT_BLOCK0 - OWNER_BLOCK) as usize;
        let owner = Owner::best_of(&blocks[..owners]);
        let slots: Vec<_> = blocks[owners..].iter().map(Slot::decode).collect();
        (owner, slots)
    };
    let body = read_body(dev, old_at, old.max_slots)?;
    let (owner, slots) = snap(&body);
    check_authority(opts.authority, &owner, &slots).map_err(refuse)?;

    // 2. Mark the old area moved, then take the copy.
    let moved = Header {
        state: AreaState::Moved,
        moved_to: new,
        ..old.clone()
    };
    // Also when resuming: an earlier run may have torn one copy.
    let block = moved.encode();
    write_blocks(dev, block_offset(old_at, HEADER_A_BLOCK), &[block])?;
    write_blocks(dev, block_offset(old_at, HEADER_B_BLOCK), &[block])?;
    let body = read_body(dev, old_at, old.max_slots)?;
    let (owner, slots) = snap(&body);
    if let Err(reason) = check_authority(opts.authority, &owner, &slots) {
        if !resumed {
            let active = Header {
                state: AreaState::Active,
                moved_to: 0,
                ..old.clone()
            };
            write_headers(dev, &active)?;
        }
        return Err(refuse(format!("{reason} (changed while moving)")));
    }

    // 3. The new area: body first, headers last.
    let mut new_body = vec![[0u8; BLOCK]; (HEADER_B_BLOCK - OWNER_BLOCK) as usize];
    new_body[..body.len()].copy_from_slice(&body);
    write_blocks(dev, block_offset(new, OWNER_BLOCK), &new_body)?;
    let header = Header {
        area_offset: new,
        state: AreaState::Active,
        moved_to: 0,
        ..old.clone()
    };
    write_headers(dev, &header)?;

    // 4. Nothing readable as an owner or a slot is left in the old area.
    tombstone(dev, old_at, &moved)?;

    Ok(GrowReport {
        old_offset: old_at,
        new_offset: new,
        fs_bytes: header.fs_bytes,
        fs_max_bytes: new,
        resumed,
    })
}

/// Whether blocks 1..=254 of the area at `at` all hold its `Moved` header.
fn is_tombstoned<D: DeviceIo + ?Sized>(
    dev: &D,
    at: u64,
    moved: &Header,
) -> Result<bool, DiskError> {
    let want = moved.encode();
    let body = dev.read_at(
        block_offset(at, OWNER_BLOCK),
        (HEADER_B_BLOCK - OWNER_BLOCK) as usize * BLOCK,
    )?;
    Ok(body.to_blocks().iter().all(|b| *b == want))
}

/// Fills blocks 1..=254 of the old area with its `Moved` header.
fn tombstone<D: DeviceIo + ?Sized>(dev: &D, at: u64, moved: &Header) -> Result<(), DiskError> {
    let body = vec![moved.encode(); (HEADER_B_BLOCK - OWNER_BLOCK) as usize];
    write_blocks(dev, block_offset(at, OWNER_BLOCK), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::device::MemDevice;
    use std::cell::Cell;

    const SLOTS: u16 = 8;

    fn params() -> Params {
        Params::default()
    }

    fn ceiling() -> u32 {
        params().host_dead_ms() as u32
    }

    fn format(dev: &MemDevice) -> AreaInfo {
        format_area(dev, SLOTS, params(), [7u8; 16], ceiling()).expect("format")
    }

    fn slot(index: u16, state: SlotState, generation: u64) -> Slot {
        Slot {
            index,
            state,
            name: format!("node-{index}"),
            nonce: 100 + index as u64,
            seq: 1,
            generation,
            max_generation_seen: generation,
            params: params(),
        }
    }

    fn put(dev: &MemDevice, at: u64, block: u64, data: &Block) {
        dev.write_at(block_offset(at, block), &AlignedBuf::from_block(data))
            .expect("write");
    }

    fn get(dev: &MemDevice, at: u64, block: u64) -> Block {
        read_block(dev, block_offset(at, block)).expect("read")
    }

    /// Header copy with its first `sectors` 512-byte sectors replaced by those
    /// of a different valid header: a torn rewrite.
    fn torn(header: &Header, sectors: usize) -> Block {
        let mut other = header.clone();
        other.state = AreaState::Moved;
        other.moved_to = header.area_offset + MIB;
        let mut b = header.encode();
        b[..sectors * 512].copy_from_slice(&other.encode()[..sectors * 512]);
        b
    }

    #[test]
    fn area_offset_follows_the_device_size() {
        assert_eq!(area_offset_for(MIN_DEVICE_BYTES - 1), None);
        assert_eq!(area_offset_for(MIN_DEVICE_BYTES), Some(16 * MIB));
        assert_eq!(area_offset_for(MIN_DEVICE_BYTES + 4095), Some(16 * MIB));
        assert_eq!(area_offset_for(100 * MIB + 123), Some(99 * MIB));
        assert_eq!(area_offset_for(1 << 40), Some((1 << 40) - MIB));
        assert_eq!(AREA_BLOCKS, 256);
        assert_eq!(MAX_SLOTS, 252);
        assert_eq!(slot_block(MAX_SLOTS - 1), HEADER_B_BLOCK - 1);
    }

    #[test]
    fn format_then_open_and_snapshot() {
        let dev = MemDevice::with_sectors(64 * MIB + 512, 512, 4096);
        let info = format(&dev);
        assert_eq!(info.area_offset, 63 * MIB);
        assert_eq!(info.header.fs_bytes, 63 * MIB);
        assert_eq!(info.header.logical_sector, 512);
        assert_eq!(info.header.physical_sector, 4096);
        assert_eq!(open_area(&dev).expect("open"), info);
        assert_eq!(
            get(&dev, info.area_offset, 0),
            get(&dev, info.area_offset, 255)
        );

        let snap = read_area_snapshot(&dev).expect("snapshot");
        assert_eq!(snap.owner, Decoded::Valid(Owner::free(params())));
        assert_eq!(snap.slots, vec![Decoded::Empty; SLOTS as usize]);
        assert_eq!(snap.info, info);
    }

    #[test]
    fn format_refuses_bad_arguments_and_small_devices() {
        let dev = MemDevice::new(64 * MIB);
        let f = |slots, p, c| format_area(&dev, slots, p, [0; 16], c);
        assert!(matches!(
            f(0, params(), ceiling()),
            Err(DiskError::BadMaxSlots { .. })
        ));
        assert!(matches!(
            f(253, params(), ceiling()),
            Err(DiskError::BadMaxSlots { .. })
        ));
        assert!(f(252, params(), ceiling()).is_ok());
        let bad = Params {
            lease_timeout_ms: 1,
            ..params()
        };
        assert!(matches!(f(8, bad, ceiling()), Err(DiskError::BadParams(_))));
        assert!(matches!(
            f(8, params(), ceiling() - 1),
            Err(DiskError::BadHostDeadCeiling { .. })
        ));
        let small = MemDevice::new(MIN_DEVICE_BYTES - 4096);
        let e = format_area(&small, 8, params(), [0; 16], ceiling()).unwrap_err();
        assert!(matches!(
            e,
            DiskError::TooSmall {
                min: MIN_DEVICE_BYTES,
                ..
            }
        ));
        assert!(
            e.to_string().contains("at least 17825792 bytes (17 MiB"),
            "{e}"
        );
        assert!(matches!(open_area(&small), Err(DiskError::TooSmall { .. })));
    }

    #[test]
    fn header_copy_a_torn_is_degraded_and_repairable() {
        let dev = MemDevice::new(64 * MIB);
        let info = format(&dev);
        for sectors in 1..8 {
            put(
                &dev,
                info.area_offset,
                HEADER_A_BLOCK,
                &torn(&info.header, sectors),
            );
            let got = open_area(&dev).expect("one copy left");
            assert_eq!(got.header, info.header);
            let d = got.degraded.expect("degraded");
            assert_eq!(d.which, HeaderCopy::A);
            assert!(d.reason.contains("checksum"), "{}", d.reason);
        }
        assert_eq!(repair_header(&dev).expect("repair"), Some(HeaderCopy::A));
        assert_eq!(open_area(&dev).expect("open"), info);
        assert_eq!(repair_header(&dev).expect("repair"), None);
    }

    #[test]
    fn header_copy_b_torn_or_missing_is_degraded() {
        let dev = MemDevice::new(64 * MIB);
        let info = format(&dev);
        put(
            &dev,
            info.area_offset,
            HEADER_B_BLOCK,
            &torn(&info.header, 4),
        );
        let d = open_area(&dev).expect("open").degraded.expect("degraded");
        assert_eq!(d.which, HeaderCopy::B);
        put(&dev, info.area_offset, HEADER_B_BLOCK, &[0u8; BLOCK]);
        let d = open_area(&dev).expect("open").degraded.expect("degraded");
        assert_eq!((d.which, d.reason.as_str()), (HeaderCopy::B, "all zeros"));
        assert_eq!(repair_header(&dev).expect("repair"), Some(HeaderCopy::B));
        assert_eq!(open_area(&dev).expect("open").degraded, None);
    }

    #[test]
    fn both_copies_torn_is_corrupt_not_unformatted() {
        let dev = MemDevice::new(64 * MIB);
        let info = format(&dev);
        put(
            &dev,
            info.area_offset,
            HEADER_A_BLOCK,
            &torn(&info.header, 1),
        );
        put(
            &dev,
            info.area_offset,
            HEADER_B_BLOCK,
            &torn(&info.header, 7),
        );
        let e = open_area(&dev).unwrap_err();
        match &e {
            DiskError::Corrupt { which, offset, .. } => {
                assert_eq!(*which, HeaderCopy::Both);
                assert_eq!(*offset, info.area_offset);
            }
            e => panic!("{e:?}"),
        }
        assert!(e.to_string().contains("damaged"), "{e}");
        // One torn copy and one zeroed: still corrupt, naming the torn copy.
        put(&dev, info.area_offset, HEADER_B_BLOCK, &[0u8; BLOCK]);
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::Corrupt {
                which: HeaderCopy::A,
                ..
            })
        ));
    }

    #[test]
    fn zeros_and_foreign_data_are_not_formatted() {
        let dev = MemDevice::new(64 * MIB);
        let e = open_area(&dev).unwrap_err();
        assert!(matches!(e, DiskError::NotFormatted { offset, .. } if offset == 63 * MIB));
        assert!(e.to_string().contains("blockfence format"), "{e}");
        dev.poke(63 * MIB, &[0xAB; BLOCK]);
        dev.poke(64 * MIB - 4096, b"some filesystem data");
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::NotFormatted { .. })
        ));
        // A slot record where a header should be is foreign too.
        put(&dev, 63 * MIB, 0, &slot(0, SlotState::Idle, 0).encode());
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::NotFormatted { .. })
        ));
    }

    #[test]
    fn intact_copies_that_disagree_are_refused() {
        let dev = MemDevice::new(64 * MIB);
        let info = format(&dev);
        let other = Header {
            max_slots: 9,
            ..info.header.clone()
        };
        put(&dev, info.area_offset, HEADER_B_BLOCK, &other.encode());
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::HeaderMismatch { .. })
        ));
    }

    #[test]
    fn a_header_read_at_the_wrong_offset_or_from_a_newer_version_is_damaged() {
        let dev = MemDevice::new(64 * MIB);
        let info = format(&dev);
        let elsewhere = Header {
            area_offset: info.area_offset - MIB,
            fs_bytes: info.area_offset - MIB,
            ..info.header.clone()
        };
        put(&dev, info.area_offset, HEADER_A_BLOCK, &elsewhere.encode());
        let d = open_area(&dev).expect("open").degraded.expect("degraded");
        assert!(d.reason.contains("records area offset"), "{}", d.reason);

        let mut newer = info.header.encode();
        newer[4] = 2;
        let crc = crc32c::crc32c(&newer[..BLOCK - 4]);
        newer[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
        put(&dev, info.area_offset, HEADER_B_BLOCK, &newer);
        match open_area(&dev) {
            Err(DiskError::Corrupt { reason, .. }) => {
                assert!(reason.contains("newer"), "{reason}")
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_moved_area_tells_where_it_went() {
        let dev = MemDevice::new(64 * MIB);
        let info = format(&dev);
        let moved = Header {
            state: AreaState::Moved,
            moved_to: 127 * MIB,
            ..info.header.clone()
        };
        // Copy A marked, copy B not yet: a grow stopped in between.
        put(&dev, info.area_offset, HEADER_A_BLOCK, &moved.encode());
        let e = open_area(&dev).unwrap_err();
        assert!(
            matches!(e, DiskError::Moved { moved_to, .. } if moved_to == 127 * MIB),
            "{e:?}"
        );
        assert!(e.to_string().contains("re-read the device size"), "{e}");
    }

    fn grown_device(from: u64, to: u64) -> (MemDevice, AreaInfo) {
        let dev = MemDevice::new(from);
        let info = format(&dev);
        put(
            &dev,
            info.area_offset,
            slot_block(2),
            &slot(2, SlotState::Idle, 0).encode(),
        );
        dev.set_size(to);
        (dev, info)
    }

    fn check_grown(dev: &MemDevice, old: &AreaInfo, report: &GrowReport) {
        let new = open_area(dev).expect("open after grow");
        assert_eq!(new.area_offset, area_offset_for(dev.size_bytes()).unwrap());
        assert_eq!(report.new_offset, new.area_offset);
        assert_eq!(report.old_offset, old.area_offset);
        assert_eq!(new.header.fs_bytes, old.header.fs_bytes);
        assert_eq!(new.header.volume_id, old.header.volume_id);
        assert_eq!(report.fs_max_bytes, new.area_offset);
        let snap = read_area_snapshot(dev).expect("snapshot");
        assert_eq!(snap.slots[2], Decoded::Valid(slot(2, SlotState::Idle, 0)));
        assert_eq!(snap.owner, Decoded::Valid(Owner::free(params())));
        // The old area: headers moved, owner and slots no longer readable.
        for b in [HEADER_A_BLOCK, HEADER_B_BLOCK] {
            let h = Header::decode(&get(dev, old.area_offset, b));
            let h = h.valid().expect("old header intact");
            assert_eq!((h.state, h.moved_to), (AreaState::Moved, new.area_offset));
        }
        assert_eq!(
            Owner::decode(&get(dev, old.area_offset, OWNER_BLOCK)),
            Decoded::Corrupt(CorruptReason::BadMagic)
        );
        assert!(matches!(
            Slot::decode(&get(dev, old.area_offset, slot_block(2))),
            Decoded::Corrupt(CorruptReason::BadMagic)
        ));
    }

    #[test]
    fn grow_moves_the_area_and_marks_the_old_one() {
        let (dev, old) = grown_device(64 * MIB, 200 * MIB + 4096);
        let e = open_area(&dev).unwrap_err();
        assert!(
            matches!(e, DiskError::DeviceGrown { old_offset, new_offset, .. }
                if old_offset == 63 * MIB && new_offset == 199 * MIB),
            "{e:?}"
        );
        assert!(e.to_string().contains("blockfence grow mem:device"), "{e}");

        let report = grow_area(&dev, &GrowOptions::default()).expect("grow");
        assert!(!report.resumed);
        check_grown(&dev, &old, &report);
        assert_eq!(
            report.resize2fs_command(Path::new("/dev/sdx")),
            format!("resize2fs /dev/sdx {}K", 199 * 1024)
        );
        // Grow again: nothing to do.
        assert!(matches!(
            grow_area(&dev, &GrowOptions::default()),
            Err(DiskError::NothingToGrow { .. })
        ));
        // And twice: the second grow finds the area of the first.
        dev.set_size(300 * MIB);
        let first = open_area_at_for_test(&dev, 199 * MIB);
        let report = grow_area(&dev, &GrowOptions::default()).expect("grow");
        assert_eq!(report.old_offset, 199 * MIB);
        assert_eq!(report.fs_bytes, 63 * MIB);
        check_grown(&dev, &first, &report);
    }

    fn open_area_at_for_test(dev: &MemDevice, at: u64) -> AreaInfo {
        match read_verdict(dev, at).expect("read") {
            Verdict::Active { header, degraded } => AreaInfo {
                device: path_of(dev),
                device_size: dev.size_bytes(),
                area_offset: at,
                header,
                degraded,
            },
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn grow_far_searches_within_its_bound_or_uses_a_hint() {
        let (dev, old) = grown_device(64 * MIB, 300 << 30);
        // Beyond open_area's search: reported as not formatted.
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::NotFormatted { .. })
        ));
        let tight = GrowOptions {
            search_bytes: 1 << 30,
            ..GrowOptions::default()
        };
        assert!(matches!(
            grow_area(&dev, &tight),
            Err(DiskError::OldAreaNotFound { .. })
        ));
        let hinted = GrowOptions {
            old_offset: Some(old.area_offset),
            ..tight.clone()
        };
        let report = grow_area(&dev, &hinted).expect("grow with hint");
        check_grown(&dev, &old, &report);

        // The default bound finds it by searching.
        let (dev, old) = grown_device(64 * MIB, 200 << 30);
        let report = grow_area(&dev, &GrowOptions::default()).expect("grow");
        check_grown(&dev, &old, &report);
    }

    #[test]
    fn grow_finds_the_old_area_at_the_end_of_an_ext4_filesystem() {
        let (dev, old) = grown_device(64 * MIB, 300 << 30);
        // A minimal ext4 superblock: 4 KiB blocks filling fs_bytes.
        let mut sb = [0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&((old.header.fs_bytes / 4096) as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        dev.poke(1024, &sb);
        let opts = GrowOptions {
            search_bytes: 0,
            ..GrowOptions::default()
        };
        let report = grow_area(&dev, &opts).expect("grow");
        check_grown(&dev, &old, &report);
    }

    #[test]
    fn grow_is_refused_while_someone_holds_or_claims() {
        let (dev, old) = grown_device(64 * MIB, 128 * MIB);
        let at = old.area_offset;
        put(
            &dev,
            at,
            slot_block(1),
            &slot(1, SlotState::Hold, 5).encode(),
        );
        let holder = Owner {
            state: OwnerState::Held,
            holder_slot: 1,
            holder_name: "node-1".into(),
            holder_nonce: 101,
            generation: 5,
            params: params(),
        };
        put(&dev, at, OWNER_BLOCK, &holder.encode());
        let e = grow_area(&dev, &GrowOptions::default()).unwrap_err();
        assert!(matches!(e, DiskError::GrowRefused { .. }), "{e:?}");
        assert!(e.to_string().contains("held by slot 1"), "{e}");
        // Nothing was changed.
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::DeviceGrown { .. })
        ));

        let wrong = GrowOptions {
            authority: GrowAuthority::Holder {
                slot: 1,
                generation: 4,
            },
            ..GrowOptions::default()
        };
        assert!(matches!(
            grow_area(&dev, &wrong),
            Err(DiskError::GrowRefused { .. })
        ));

        // Another node claiming: refused even for the holder.
        put(
            &dev,
            at,
            slot_block(3),
            &slot(3, SlotState::Claim, 6).encode(),
        );
        let as_holder = GrowOptions {
            authority: GrowAuthority::Holder {
                slot: 1,
                generation: 5,
            },
            ..GrowOptions::default()
        };
        let e = grow_area(&dev, &as_holder).unwrap_err();
        assert!(e.to_string().contains("slot 3"), "{e}");
        put(
            &dev,
            at,
            slot_block(3),
            &slot(3, SlotState::Idle, 0).encode(),
        );
        let report = grow_area(&dev, &as_holder).expect("holder may grow");
        let snap = read_area_snapshot(&dev).expect("snapshot");
        assert_eq!(snap.owner, Decoded::Valid(holder));
        assert_eq!(snap.slots[1], Decoded::Valid(slot(1, SlotState::Hold, 5)));
        assert_eq!(report.old_offset, at);
    }

    #[test]
    fn force_grows_over_a_stale_hold() {
        let (dev, old) = grown_device(64 * MIB, 128 * MIB);
        put(&dev, old.area_offset, slot_block(0), &torn(&old.header, 3));
        assert!(grow_area(&dev, &GrowOptions::default()).is_err());
        let force = GrowOptions {
            authority: GrowAuthority::Force,
            ..GrowOptions::default()
        };
        grow_area(&dev, &force).expect("forced grow");
        assert!(open_area(&dev).is_ok());
    }

    /// A device that fails every write after the first `budget` (the failing
    /// one lands half-way): a crash at any point of a multi-write operation.
    struct Crashing {
        dev: MemDevice,
        budget: Cell<Option<usize>>,
    }

    impl DeviceIo for Crashing {
        fn path(&self) -> &Path {
            self.dev.path()
        }
        fn size_bytes(&self) -> u64 {
            self.dev.size_bytes()
        }
        fn logical_sector(&self) -> u32 {
            self.dev.logical_sector()
        }
        fn physical_sector(&self) -> u32 {
            self.dev.physical_sector()
        }
        fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, DiskError> {
            self.dev.read_at(offset, len)
        }
        fn write_at(&self, offset: u64, buf: &AlignedBuf) -> Result<(), DiskError> {
            match self.budget.get() {
                Some(0) => {
                    // Half of it lands (at least one sector).
                    let half = (buf.len() / 2).max(512);
                    self.dev.poke(offset, &buf.as_slice()[..half]);
                    Err(DiskError::Injected {
                        path: self.dev.path().to_path_buf(),
                        what: "crash",
                    })
                }
                Some(n) => {
                    self.budget.set(Some(n - 1));
                    self.dev.write_at(offset, buf)
                }
                None => self.dev.write_at(offset, buf),
            }
        }
    }

    #[test]
    fn a_grow_interrupted_at_any_write_is_finished_by_running_grow_again() {
        let mut crash_points = 0;
        for budget in 0.. {
            let (dev, old) = grown_device(64 * MIB, 128 * MIB);
            let crashing = Crashing {
                dev: dev.clone(),
                budget: Cell::new(Some(budget)),
            };
            if grow_area(&crashing, &GrowOptions::default()).is_ok() {
                break;
            }
            crash_points += 1;
            // Never two active areas: the new one is either absent (grow
            // needed) or complete, and the old one opens as active only if it
            // was not touched yet.
            match open_area(&dev) {
                Ok(_) | Err(DiskError::DeviceGrown { .. }) => {}
                Err(e) => panic!("after {budget} writes: {e:?}"),
            }
            let new_active = open_area(&dev).is_ok();
            let old_active = matches!(
                read_verdict(&dev, old.area_offset).expect("read"),
                Verdict::Active { .. }
            );
            assert!(
                !(new_active && old_active),
                "two active areas after {budget}"
            );

            let report = grow_area(&dev, &GrowOptions::default())
                .unwrap_or_else(|e| panic!("resume after {budget} writes: {e:?}"));
            check_grown(&dev, &old, &report);
        }
        // Marks A, B; body; header B, A; tombstone: 6 writes.
        assert_eq!(crash_points, 6);
    }

    #[test]
    fn an_interrupted_format_is_never_taken_for_a_damaged_area() {
        for budget in 0..3 {
            let dev = MemDevice::new(64 * MIB);
            let crashing = Crashing {
                dev: dev.clone(),
                budget: Cell::new(Some(budget)),
            };
            assert!(format_area(&crashing, SLOTS, params(), [1; 16], ceiling()).is_err());
            match (budget, open_area(&dev)) {
                // Body written (half), no header: nothing there.
                (0, Err(DiskError::NotFormatted { .. })) => {}
                // Header B half-written: damaged, and nothing else claims to be
                // an area.
                (1, Err(DiskError::Corrupt { .. })) => {}
                // B written, A torn: usable, degraded.
                (2, Ok(info)) => assert!(info.degraded.is_some()),
                (b, r) => panic!("after {b} writes: {r:?}"),
            }
        }
    }
}
