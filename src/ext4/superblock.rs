//! The ext4 superblock: the fields blockfence needs, parsed from the 1024 bytes
//! at device offset 1024.
//!
//! Little-endian offsets within the superblock (from the kernel's
//! `struct ext4_super_block`):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0x04 | 4 | `s_blocks_count_lo` |
//! | 0x14 | 4 | `s_first_data_block` |
//! | 0x18 | 4 | `s_log_block_size` (block size = 1024 << it) |
//! | 0x38 | 2 | `s_magic` (0xEF53) |
//! | 0x3A | 2 | `s_state` |
//! | 0x3C | 2 | `s_errors` (1 continue, 2 remount-ro, 3 panic) |
//! | 0x4C | 4 | `s_rev_level` |
//! | 0x5C / 0x60 / 0x64 | 4 each | compat / incompat / ro_compat features |
//! | 0x68 | 16 | `s_uuid` |
//! | 0x78 | 16 | `s_volume_name` |
//! | 0x88 | 64 | `s_last_mounted` |
//! | 0x150 | 4 | `s_blocks_count_hi` (only with INCOMPAT_64BIT) |
//! | 0x166 | 2 | `s_mmp_update_interval` |
//! | 0x168 | 8 | `s_mmp_block` |
//! | 0x175 | 1 | `s_checksum_type` (1 = crc32c) |
//! | 0x270 | 4 | `s_checksum_seed` (only with INCOMPAT_CSUM_SEED) |
//! | 0x3FC | 4 | `s_checksum` = ext4 crc32c(~0, bytes 0..0x3FC) |
//!
//! Invariants: [`Superblock::parse`] refuses a bad magic, an impossible block
//! size and, with `metadata_csum`, a bad checksum; it never panics.
//!
//! Pure: no I/O.

use super::checksum::ext4_crc32c;
use super::Ext4Error;

/// Size of the superblock.
pub const SUPERBLOCK_SIZE: usize = 1024;
/// Byte offset of the superblock on the device.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// `s_magic`.
pub const EXT4_SUPER_MAGIC: u16 = 0xEF53;

/// INCOMPAT_64BIT: `s_blocks_count_hi` is valid.
pub const INCOMPAT_64BIT: u32 = 0x80;
/// INCOMPAT_MMP: multi-mount protection.
pub const INCOMPAT_MMP: u32 = 0x100;
/// INCOMPAT_CSUM_SEED: the checksum seed is stored in `s_checksum_seed`.
pub const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// RO_COMPAT_METADATA_CSUM: metadata blocks carry crc32c checksums.
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// `s_checksum_type` value for crc32c, the only one defined.
pub const CHECKSUM_TYPE_CRC32C: u8 = 1;

const OFF_BLOCKS_LO: usize = 0x04;
const OFF_FIRST_DATA_BLOCK: usize = 0x14;
const OFF_LOG_BLOCK_SIZE: usize = 0x18;
const OFF_MAGIC: usize = 0x38;
const OFF_STATE: usize = 0x3A;
const OFF_ERRORS: usize = 0x3C;
const OFF_REV_LEVEL: usize = 0x4C;
const OFF_FEATURE_COMPAT: usize = 0x5C;
const OFF_FEATURE_INCOMPAT: usize = 0x60;
const OFF_FEATURE_RO_COMPAT: usize = 0x64;
const OFF_UUID: usize = 0x68;
const OFF_VOLUME_NAME: usize = 0x78;
const OFF_LAST_MOUNTED: usize = 0x88;
const OFF_BLOCKS_HI: usize = 0x150;
const OFF_MMP_UPDATE_INTERVAL: usize = 0x166;
const OFF_MMP_BLOCK: usize = 0x168;
const OFF_CHECKSUM_TYPE: usize = 0x175;
const OFF_CHECKSUM_SEED: usize = 0x270;
/// Offset of `s_checksum`; the checksum covers the bytes before it.
pub const OFF_CHECKSUM: usize = 0x3FC;

/// Largest `s_log_block_size`: 64 KiB blocks.
const MAX_LOG_BLOCK_SIZE: u32 = 6;

/// What the kernel does on a filesystem error, by default (`s_errors`; the
/// `errors=` mount option overrides it). MMP's in-kernel detection of a second
/// writer is an ext4 error, so only `RemountRo` and `Panic` make it act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorBehavior {
    /// 1: log and carry on (the MMP error then does nothing).
    Continue,
    /// 2: remount read-only.
    RemountRo,
    /// 3: panic the node.
    Panic,
    /// Any other value (the kernel treats it as its build default).
    Unknown(u16),
}

impl ErrorBehavior {
    fn from_raw(v: u16) -> ErrorBehavior {
        match v {
            1 => ErrorBehavior::Continue,
            2 => ErrorBehavior::RemountRo,
            3 => ErrorBehavior::Panic,
            other => ErrorBehavior::Unknown(other),
        }
    }
}

impl std::fmt::Display for ErrorBehavior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorBehavior::Continue => write!(f, "continue"),
            ErrorBehavior::RemountRo => write!(f, "remount-ro"),
            ErrorBehavior::Panic => write!(f, "panic"),
            ErrorBehavior::Unknown(v) => write!(f, "unknown ({v})"),
        }
    }
}

/// The superblock fields blockfence uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    /// Blocks in the filesystem (`hi` half only with the 64bit feature).
    pub blocks_count: u64,
    /// First data block: 1 with 1 KiB blocks, else 0.
    pub first_data_block: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// `s_state` bits: 1 cleanly unmounted, 2 errors detected, 4 orphans.
    pub state: u16,
    /// Default behaviour on errors.
    pub errors: ErrorBehavior,
    /// `s_rev_level` (0 is the original format without feature flags).
    pub rev_level: u32,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
    #[serde(serialize_with = "serialize_uuid")]
    pub uuid: [u8; 16],
    /// Label (`mkfs.ext4 -L`), empty when none.
    pub volume_name: String,
    /// Directory where it was last mounted, empty when never recorded.
    pub last_mounted: String,
    /// Seconds between kmmpd updates of the MMP block.
    pub mmp_update_interval: u16,
    /// Block number of the MMP block.
    pub mmp_block: u64,
    /// `s_checksum_type` (1 = crc32c).
    pub checksum_type: u8,
    /// The checksum seed every metadata checksum (MMP included) starts from:
    /// `s_checksum_seed` with the metadata_csum_seed feature, else
    /// ext4 crc32c(~0, uuid), as e2fsprogs and the kernel compute it.
    pub checksum_seed: u32,
    /// `s_checksum` as stored (verified when `metadata_csum` is on).
    pub checksum: u32,
}

fn serialize_uuid<S: serde::Serializer>(uuid: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_uuid(uuid))
}

/// The usual 8-4-4-4-12 lowercase form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from(le32(b, off)) | (u64::from(le32(b, off + 4)) << 32)
}
/// A fixed-size, NUL-padded string field, up to its first NUL, lossily UTF-8.
pub(crate) fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// ext4 crc32c of a superblock's bytes before `s_checksum` (what `s_checksum`
/// must hold with `metadata_csum`).
pub fn superblock_checksum(raw: &[u8; SUPERBLOCK_SIZE]) -> u32 {
    ext4_crc32c(!0, &raw[..OFF_CHECKSUM])
}

impl Superblock {
    /// Parses a superblock from `bytes` (the 1024 bytes at device offset 1024;
    /// longer buffers are allowed, only the first 1024 bytes are looked at).
    pub fn parse(bytes: &[u8]) -> Result<Superblock, Ext4Error> {
        let b: &[u8; SUPERBLOCK_SIZE] = bytes
            .get(..SUPERBLOCK_SIZE)
            .and_then(|s| s.try_into().ok())
            .ok_or(Ext4Error::TooShort {
                what: "superblock",
                got: bytes.len(),
                need: SUPERBLOCK_SIZE,
            })?;

        let magic = le16(b, OFF_MAGIC);
        if magic != EXT4_SUPER_MAGIC {
            return Err(Ext4Error::BadMagic { found: magic });
        }
        let log = le32(b, OFF_LOG_BLOCK_SIZE);
        if log > MAX_LOG_BLOCK_SIZE {
            return Err(Ext4Error::BadBlockSize { log });
        }
        let rev_level = le32(b, OFF_REV_LEVEL);
        // Revision 0 has no feature fields: whatever is there means nothing.
        let (compat, incompat, ro_compat) = if rev_level == 0 {
            (0, 0, 0)
        } else {
            (
                le32(b, OFF_FEATURE_COMPAT),
                le32(b, OFF_FEATURE_INCOMPAT),
                le32(b, OFF_FEATURE_RO_COMPAT),
            )
        };

        let checksum_type = b[OFF_CHECKSUM_TYPE];
        let checksum = le32(b, OFF_CHECKSUM);
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            if checksum_type != CHECKSUM_TYPE_CRC32C {
                return Err(Ext4Error::UnsupportedChecksumType(checksum_type));
            }
            let computed = superblock_checksum(b);
            if computed != checksum {
                return Err(Ext4Error::BadSuperblockChecksum {
                    stored: checksum,
                    computed,
                });
            }
        }

        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[OFF_UUID..OFF_UUID + 16]);
        let checksum_seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(b, OFF_CHECKSUM_SEED)
        } else {
            ext4_crc32c(!0, &uuid)
        };

        let lo = u64::from(le32(b, OFF_BLOCKS_LO));
        let blocks_count = if incompat & INCOMPAT_64BIT != 0 {
            lo | (u64::from(le32(b, OFF_BLOCKS_HI)) << 32)
        } else {
            lo
        };

        Ok(Superblock {
            blocks_count,
            first_data_block: le32(b, OFF_FIRST_DATA_BLOCK),
            block_size: 1024u32 << log,
            state: le16(b, OFF_STATE),
            errors: ErrorBehavior::from_raw(le16(b, OFF_ERRORS)),
            rev_level,
            feature_compat: compat,
            feature_incompat: incompat,
            feature_ro_compat: ro_compat,
            uuid,
            volume_name: c_string(&b[OFF_VOLUME_NAME..OFF_VOLUME_NAME + 16]),
            last_mounted: c_string(&b[OFF_LAST_MOUNTED..OFF_LAST_MOUNTED + 64]),
            mmp_update_interval: le16(b, OFF_MMP_UPDATE_INTERVAL),
            mmp_block: le64(b, OFF_MMP_BLOCK),
            checksum_type,
            checksum_seed,
            checksum,
        })
    }

    /// Whether the `mmp` feature is on.
    pub fn mmp_enabled(&self) -> bool {
        self.feature_incompat & INCOMPAT_MMP != 0
    }

    /// Whether the `64bit` feature is on.
    pub fn is_64bit(&self) -> bool {
        self.feature_incompat & INCOMPAT_64BIT != 0
    }

    /// Whether metadata blocks (the MMP block included) carry checksums.
    pub fn metadata_csum(&self) -> bool {
        self.feature_ro_compat & RO_COMPAT_METADATA_CSUM != 0
    }

    /// Whether the checksum seed is stored (`metadata_csum_seed`) rather than
    /// derived from the UUID.
    pub fn has_csum_seed(&self) -> bool {
        self.feature_incompat & INCOMPAT_CSUM_SEED != 0
    }

    /// The UUID in its usual text form.
    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }

    /// Byte offset of the MMP block on the device, after the kernel's mount-time
    /// checks: the feature is on and the block lies inside the filesystem.
    pub fn mmp_offset(&self) -> Result<u64, Ext4Error> {
        if !self.mmp_enabled() {
            return Err(Ext4Error::MmpNotEnabled);
        }
        if self.mmp_block < u64::from(self.first_data_block) || self.mmp_block >= self.blocks_count
        {
            return Err(Ext4Error::BadMmpBlock {
                block: self.mmp_block,
                first: self.first_data_block,
                count: self.blocks_count,
            });
        }
        // blocks_count * block_size fits: < 2^64 blocks of <= 2^16 bytes could
        // overflow in theory, so check.
        self.mmp_block
            .checked_mul(u64::from(self.block_size))
            .ok_or(Ext4Error::BadMmpBlock {
                block: self.mmp_block,
                first: self.first_data_block,
                count: self.blocks_count,
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn put16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) const UUID: [u8; 16] = [
        0xd5, 0x2e, 0x61, 0x61, 0x46, 0x11, 0x49, 0xd0, 0x82, 0xf5, 0x05, 0xd8, 0xe5, 0x32, 0xb0,
        0xd6,
    ];

    /// A hand-built superblock: 4 KiB blocks, mmp at block 1000, and the
    /// given extra incompat/ro_compat features; sealed when metadata_csum.
    pub(crate) fn raw_sb(incompat: u32, ro_compat: u32) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        put32(&mut b, OFF_BLOCKS_LO, 262_144);
        put32(&mut b, OFF_LOG_BLOCK_SIZE, 2);
        put16(&mut b, OFF_MAGIC, EXT4_SUPER_MAGIC);
        put16(&mut b, OFF_STATE, 1);
        put16(&mut b, OFF_ERRORS, 2);
        put32(&mut b, OFF_REV_LEVEL, 1);
        put32(&mut b, OFF_FEATURE_INCOMPAT, INCOMPAT_MMP | incompat);
        put32(&mut b, OFF_FEATURE_RO_COMPAT, ro_compat);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&UUID);
        b[OFF_VOLUME_NAME..OFF_VOLUME_NAME + 4].copy_from_slice(b"pgvo");
        put16(&mut b, OFF_MMP_UPDATE_INTERVAL, 5);
        put64(&mut b, OFF_MMP_BLOCK, 1000);
        b[OFF_CHECKSUM_TYPE] = CHECKSUM_TYPE_CRC32C;
        reseal(&mut b);
        b
    }

    pub(crate) fn reseal(b: &mut [u8; SUPERBLOCK_SIZE]) {
        let c = superblock_checksum(b);
        put32(b, OFF_CHECKSUM, c);
    }

    #[test]
    fn parses_the_fields() {
        let sb = Superblock::parse(&raw_sb(0, RO_COMPAT_METADATA_CSUM)).expect("valid");
        assert_eq!(sb.block_size, 4096);
        assert_eq!(sb.blocks_count, 262_144);
        assert!(sb.mmp_enabled() && sb.metadata_csum() && !sb.is_64bit());
        assert_eq!(sb.mmp_update_interval, 5);
        assert_eq!(sb.mmp_block, 1000);
        assert_eq!(sb.mmp_offset().expect("in range"), 4_096_000);
        assert_eq!(sb.errors, ErrorBehavior::RemountRo);
        assert_eq!(sb.volume_name, "pgvo");
        assert_eq!(sb.uuid_string(), "d52e6161-4611-49d0-82f5-05d8e532b0d6");
        assert_eq!(sb.checksum_seed, ext4_crc32c(!0, &UUID));
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut b = raw_sb(0, 0);
        put16(&mut b, OFF_MAGIC, 0x1234);
        assert!(matches!(
            Superblock::parse(&b),
            Err(Ext4Error::BadMagic { found: 0x1234 })
        ));
        assert!(matches!(
            Superblock::parse(&[0u8; 1024]),
            Err(Ext4Error::BadMagic { found: 0 })
        ));
    }

    #[test]
    fn short_buffer_is_refused() {
        assert!(matches!(
            Superblock::parse(&raw_sb(0, 0)[..1023]),
            Err(Ext4Error::TooShort { got: 1023, .. })
        ));
    }

    #[test]
    fn bad_checksum_is_refused_only_with_metadata_csum() {
        let mut b = raw_sb(0, RO_COMPAT_METADATA_CSUM);
        b[OFF_VOLUME_NAME] ^= 1;
        assert!(matches!(
            Superblock::parse(&b),
            Err(Ext4Error::BadSuperblockChecksum { .. })
        ));
        // Without metadata_csum the checksum field means nothing.
        let mut b = raw_sb(0, 0);
        put32(&mut b, OFF_CHECKSUM, 0xdead_beef);
        assert!(Superblock::parse(&b).is_ok());
    }

    #[test]
    fn checksum_is_the_non_inverted_crc() {
        // The standard crc32c (with final inversion) must *not* validate.
        let mut b = raw_sb(0, RO_COMPAT_METADATA_CSUM);
        let standard = crc32c::crc32c(&b[..OFF_CHECKSUM]);
        put32(&mut b, OFF_CHECKSUM, standard);
        assert!(matches!(
            Superblock::parse(&b),
            Err(Ext4Error::BadSuperblockChecksum { computed, .. }) if computed == !standard
        ));
    }

    #[test]
    fn unknown_checksum_type_is_refused() {
        let mut b = raw_sb(0, RO_COMPAT_METADATA_CSUM);
        b[OFF_CHECKSUM_TYPE] = 2;
        reseal(&mut b);
        assert!(matches!(
            Superblock::parse(&b),
            Err(Ext4Error::UnsupportedChecksumType(2))
        ));
    }

    #[test]
    fn blocks_count_hi_counts_only_with_64bit() {
        let mut b = raw_sb(0, 0);
        put32(&mut b, OFF_BLOCKS_HI, 3);
        assert_eq!(Superblock::parse(&b).expect("valid").blocks_count, 262_144);
        let mut b = raw_sb(INCOMPAT_64BIT, RO_COMPAT_METADATA_CSUM);
        put32(&mut b, OFF_BLOCKS_HI, 3);
        reseal(&mut b);
        let sb = Superblock::parse(&b).expect("valid");
        assert!(sb.is_64bit());
        assert_eq!(sb.blocks_count, (3u64 << 32) | 262_144);
    }

    #[test]
    fn csum_seed_feature_uses_the_stored_seed() {
        let mut b = raw_sb(INCOMPAT_CSUM_SEED, RO_COMPAT_METADATA_CSUM);
        put32(&mut b, OFF_CHECKSUM_SEED, 0x0bad_5eed);
        reseal(&mut b);
        let sb = Superblock::parse(&b).expect("valid");
        assert!(sb.has_csum_seed());
        assert_eq!(sb.checksum_seed, 0x0bad_5eed);
    }

    #[test]
    fn impossible_block_size_is_refused() {
        let mut b = raw_sb(0, 0);
        put32(&mut b, OFF_LOG_BLOCK_SIZE, 7);
        assert!(matches!(
            Superblock::parse(&b),
            Err(Ext4Error::BadBlockSize { log: 7 })
        ));
    }

    #[test]
    fn error_behaviours() {
        for (raw, want) in [
            (1, ErrorBehavior::Continue),
            (2, ErrorBehavior::RemountRo),
            (3, ErrorBehavior::Panic),
            (9, ErrorBehavior::Unknown(9)),
        ] {
            let mut b = raw_sb(0, 0);
            put16(&mut b, OFF_ERRORS, raw);
            assert_eq!(Superblock::parse(&b).expect("valid").errors, want);
        }
    }

    #[test]
    fn mmp_offset_checks_feature_and_range() {
        let mut b = raw_sb(0, 0);
        put32(&mut b, OFF_FEATURE_INCOMPAT, 0);
        assert!(matches!(
            Superblock::parse(&b).expect("valid").mmp_offset(),
            Err(Ext4Error::MmpNotEnabled)
        ));
        let mut b = raw_sb(0, 0);
        put64(&mut b, OFF_MMP_BLOCK, 262_144);
        assert!(matches!(
            Superblock::parse(&b).expect("valid").mmp_offset(),
            Err(Ext4Error::BadMmpBlock { block: 262_144, .. })
        ));
    }

    #[test]
    fn revision_zero_has_no_features() {
        let mut b = raw_sb(0, 0);
        put32(&mut b, OFF_REV_LEVEL, 0);
        assert!(!Superblock::parse(&b).expect("valid").mmp_enabled());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1100)) {
            let _ = Superblock::parse(&bytes);
        }

        /// A flipped bit is caught, unless it is one that turns checksumming off
        /// (the metadata_csum flag, or the revision level): ext4's own limit.
        #[test]
        fn any_bit_flip_is_caught_with_metadata_csum(bit in 0usize..(SUPERBLOCK_SIZE * 8)) {
            let mut b = raw_sb(0, RO_COMPAT_METADATA_CSUM);
            b[bit / 8] ^= 1 << (bit % 8);
            if let Ok(sb) = Superblock::parse(&b) {
                proptest::prop_assert!(!sb.metadata_csum());
            }
        }
    }
}
