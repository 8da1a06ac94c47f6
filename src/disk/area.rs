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
//! area block  1        owner record
//! area blocks 2..2+n   slots 0..n   (n = max_slots, default 32, at most 253)
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
/// Area block of header copy A.
pub const HEADER_A_BLOCK: u64 = 0;
/// Area block of the owner record.
pub const OWNER_BLOCK: u64 = 1;
/// Area block of slot 0; slot `i` is at `SLOT_BLOCK0 + i`.
pub const SLOT_BLOCK0: u64 = 2;
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
/// How far below the new offset `grow_area` looks for the old area by default.
pub const GROW_SEARCH_BYTES: u64 = 1 << 40;

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
    /// Decodes area blocks `1 ..= max_slots + 1` (owner, then slots).
    pub fn decode(info: AreaInfo, blocks: &[Block]) -> AreaSnapshot {
        let owner = blocks.first().map(Owner::decode).unwrap_or(Decoded::Empty);
        let slots = blocks
            .iter()
            .skip(1)
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
    body[0] = Owner::free(params).encode();
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

/// Owner block and slot blocks of the area at `at`.
fn read_body<D: DeviceIo + ?Sized>(
    dev: &D,
    at: u64,
    max_slots: u16,
) -> Result<Vec<Block>, DiskError> {
    let buf = dev.read_at(
        block_offset(at, OWNER_BLOCK),
        (1 + max_slots as usize) * BLOCK,
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
/// The filesystem is not touched. Nodes whose kernel still sees the old size
/// get `Moved` from [`open_area`] until they re-read the size.
pub fn grow_area<D: DeviceIo + ?Sized>(
    dev: &D,
    opts: &GrowOptions,
) -> Result<GrowReport, DiskError> {
    let new = expected_offset(dev)?;
    let path = path_of(dev);
    match read_verdict(dev, new)? {
        Verdict::NotFormatted => {}
        Verdict::Active { header, .. } => {
            // Already moved; finish step 4 if a grow stopped before it.
            // Look where a first grow left it (fs_bytes) and nearby only: a full
            // search on every no-op grow would be slow on a large device.
            let limit = opts.search_bytes.min(OPEN_SEARCH_BYTES);
            if let Found::Area { at, header: old } =
                find_old_area(dev, new, limit, Some(header.fs_bytes))?
            {
                if old.state == AreaState::Moved && old.volume_id == header.volume_id {
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
            return Err(DiskError::NothingToGrow { path, offset: new });
        }
        other => return Err(verdict_error(dev, new, other)),
    }

    let (old_at, old) = match find_old_area(dev, new, opts.search_bytes, opts.old_offset)? {
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
                searched_bytes: opts.search_bytes,
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
        let owner = Owner::decode(&blocks[0]);
        let slots: Vec<_> = blocks[1..].iter().map(Slot::decode).collect();
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
    if !resumed {
        let block = moved.encode();
        write_blocks(dev, block_offset(old_at, HEADER_A_BLOCK), &[block])?;
        write_blocks(dev, block_offset(old_at, HEADER_B_BLOCK), &[block])?;
    }
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

/// Fills blocks 1..=254 of the old area with its `Moved` header.
fn tombstone<D: DeviceIo + ?Sized>(dev: &D, at: u64, moved: &Header) -> Result<(), DiskError> {
    let body = vec![moved.encode(); (HEADER_B_BLOCK - OWNER_BLOCK) as usize];
    write_blocks(dev, block_offset(at, OWNER_BLOCK), &body)
}
