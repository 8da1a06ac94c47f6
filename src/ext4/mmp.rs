//! The ext4 MMP block: parsing, state, the kernel's mount-time wait, and the
//! report a CLI prints.
//!
//! The MMP structure fills the first 1024 bytes of block `s_mmp_block`
//! (little-endian, the kernel's `struct mmp_struct`):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 4 | `mmp_magic` 0x004D4D50 |
//! | 4 | 4 | `mmp_seq`: [`SEQ_CLEAN`], [`SEQ_FSCK`], or 1..=[`SEQ_MAX`] while in use |
//! | 8 | 8 | `mmp_time`: wall clock seconds of the last update |
//! | 16 | 64 | `mmp_nodename`: uname nodename of the last writer |
//! | 80 | 32 | `mmp_bdevname`: its device name (`loop0`, `nvme0n1`) |
//! | 112 | 2 | `mmp_check_interval`: seconds, as last adjusted by kmmpd |
//! | 1020 | 4 | `mmp_checksum` = ext4 crc32c(fs checksum seed, bytes 0..1020), only with metadata_csum |
//!
//! How the kernel uses it (fs/ext4/mmp.c): at mount, a CLEAN seq mounts at
//! once; FSCK refuses the mount; any other seq makes the mount wait
//! [`mmp_wait_seconds`]-like time, fail if seq changed, write a random seq,
//! wait again and re-check. While mounted, kmmpd writes seq+1 every update
//! interval and CLEAN at unmount.
//!
//! Invariants: [`Mmp::parse`] refuses a bad magic and, with `metadata_csum`, a
//! bad checksum, and never panics; [`Mmp::encode_with_seq`] keeps every byte
//! except seq and checksum.
//!
//! Pure: no I/O, no clock reads.

use super::checksum::ext4_crc32c;
use super::superblock::{c_string, le16, le32, le64, Superblock};
use super::Ext4Error;

/// Size of the MMP structure at the start of the MMP block.
pub const MMP_SIZE: usize = 1024;
/// `mmp_magic`.
pub const MMP_MAGIC: u32 = 0x004D_4D50;
/// `mmp_seq` of a cleanly unmounted filesystem.
pub const SEQ_CLEAN: u32 = 0xFF4D_4D50;
/// `mmp_seq` while e2fsck runs.
pub const SEQ_FSCK: u32 = 0xE24D_4D50;
/// Largest `mmp_seq` of a mounted filesystem.
pub const SEQ_MAX: u32 = 0xE24D_4D4F;
/// The kernel's smallest check interval, seconds (`EXT4_MMP_MIN_CHECK_INTERVAL`).
pub const MIN_CHECK_INTERVAL: u32 = 5;
/// Offset of `mmp_checksum`; the checksum covers the bytes before it.
pub const OFF_CHECKSUM: usize = 1020;

const OFF_MAGIC: usize = 0;
const OFF_SEQ: usize = 4;
const OFF_TIME: usize = 8;
const OFF_NODENAME: usize = 16;
const OFF_BDEVNAME: usize = 80;
const OFF_CHECK_INTERVAL: usize = 112;

/// The 1024 raw bytes, kept so a rewrite changes only what it means to.
#[derive(Clone, PartialEq, Eq)]
struct Raw([u8; MMP_SIZE]);

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{MMP_SIZE} bytes>")
    }
}

/// A parsed, verified MMP block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mmp {
    /// Block number it was read from (`s_mmp_block`).
    pub block: u64,
    pub seq: u32,
    /// Wall-clock seconds of the last update, as the writer's clock had it.
    pub time: u64,
    pub nodename: String,
    pub bdevname: String,
    /// Seconds; the kernel's mount check uses it when larger than its own.
    pub check_interval: u16,
    /// `mmp_checksum` as stored (verified with metadata_csum).
    pub checksum: u32,
    raw: Raw,
}

/// What the MMP block says about the filesystem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MmpState {
    /// Cleanly unmounted (or marked clean): the kernel mounts without waiting.
    Clean,
    /// e2fsck runs (or crashed while running): the kernel refuses to mount.
    Fsck,
    /// Mounted somewhere, or left so by a node that died while mounted: the
    /// kernel waits and mounts only if `seq` does not change meanwhile.
    InUse {
        seq: u32,
        time: u64,
        nodename: String,
        bdevname: String,
        check_interval: u16,
    },
}

impl MmpState {
    /// Short name: `clean`, `fsck`, `in_use` (as in the JSON).
    pub fn name(&self) -> &'static str {
        match self {
            MmpState::Clean => "clean",
            MmpState::Fsck => "fsck",
            MmpState::InUse { .. } => "in_use",
        }
    }
}

impl std::fmt::Display for MmpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MmpState::Clean => write!(f, "clean (cleanly unmounted; mounts without waiting)"),
            MmpState::Fsck => write!(f, "fsck (e2fsck running or crashed; mount refused)"),
            MmpState::InUse {
                seq,
                time,
                nodename,
                bdevname,
                check_interval,
            } => write!(
                f,
                "in use: seq {seq:#010x} by node {nodename:?} on device {bdevname:?}, \
                 last update {} ({time}), check interval {check_interval} s",
                format_unix_utc(*time)
            ),
        }
    }
}

/// ext4 crc32c of an MMP structure's bytes before `mmp_checksum`, seeded with
/// the filesystem's checksum seed: what `mmp_checksum` holds with metadata_csum.
pub fn mmp_checksum(raw: &[u8; MMP_SIZE], sb: &Superblock) -> u32 {
    ext4_crc32c(sb.checksum_seed, &raw[..OFF_CHECKSUM])
}

/// The kernel's mount-time wait for a not-clean MMP block, in seconds, from
/// the superblock alone: check interval `ci = max(s_mmp_update_interval, 5)`,
/// wait `min(2·ci + 1, ci + 60)` (11 s with the default interval of 5).
///
/// The kernel also raises `ci` to the block's `mmp_check_interval` when that is
/// larger; [`Mmp::mount_wait_seconds`] includes it.
pub fn mmp_wait_seconds(sb: &Superblock) -> u32 {
    wait_for_interval(u32::from(sb.mmp_update_interval).max(MIN_CHECK_INTERVAL))
}

fn wait_for_interval(ci: u32) -> u32 {
    (2 * ci + 1).min(ci + 60)
}

impl Mmp {
    /// Parses the MMP structure at the start of `bytes` (1024 bytes or the whole
    /// MMP block), checking the magic and, with metadata_csum, the checksum
    /// against the filesystem's checksum seed.
    pub fn parse(bytes: &[u8], sb: &Superblock) -> Result<Mmp, Ext4Error> {
        let raw: [u8; MMP_SIZE] = bytes
            .get(..MMP_SIZE)
            .and_then(|s| s.try_into().ok())
            .ok_or(Ext4Error::TooShort {
                what: "MMP block",
                got: bytes.len(),
                need: MMP_SIZE,
            })?;
        let block = sb.mmp_block;
        let magic = le32(&raw, OFF_MAGIC);
        if magic != MMP_MAGIC {
            return Err(Ext4Error::BadMmpMagic {
                block,
                found: magic,
            });
        }
        let checksum = le32(&raw, OFF_CHECKSUM);
        if sb.metadata_csum() {
            let computed = mmp_checksum(&raw, sb);
            if computed != checksum {
                return Err(Ext4Error::BadMmpChecksum {
                    block,
                    stored: checksum,
                    computed,
                });
            }
        }
        Ok(Mmp {
            block,
            seq: le32(&raw, OFF_SEQ),
            time: le64(&raw, OFF_TIME),
            nodename: c_string(&raw[OFF_NODENAME..OFF_NODENAME + 64]),
            bdevname: c_string(&raw[OFF_BDEVNAME..OFF_BDEVNAME + 32]),
            check_interval: le16(&raw, OFF_CHECK_INTERVAL),
            checksum,
            raw: Raw(raw),
        })
    }

    /// The state the kernel would see.
    pub fn state(&self) -> MmpState {
        match self.seq {
            SEQ_CLEAN => MmpState::Clean,
            SEQ_FSCK => MmpState::Fsck,
            seq => MmpState::InUse {
                seq,
                time: self.time,
                nodename: self.nodename.clone(),
                bdevname: self.bdevname.clone(),
                check_interval: self.check_interval,
            },
        }
    }

    /// The bytes as read.
    pub fn raw(&self) -> &[u8; MMP_SIZE] {
        &self.raw.0
    }

    /// The block as read with `mmp_seq` replaced by `seq` and, with
    /// metadata_csum, the checksum recomputed; every other byte (node name,
    /// device name, time, check interval, padding) is kept.
    pub fn encode_with_seq(&self, seq: u32, sb: &Superblock) -> [u8; MMP_SIZE] {
        let mut b = self.raw.0;
        b[OFF_SEQ..OFF_SEQ + 4].copy_from_slice(&seq.to_le_bytes());
        if sb.metadata_csum() {
            let c = mmp_checksum(&b, sb);
            b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&c.to_le_bytes());
        }
        b
    }

    /// The block as read, marked clean ([`SEQ_CLEAN`]).
    pub fn clean_block(&self, sb: &Superblock) -> [u8; MMP_SIZE] {
        self.encode_with_seq(SEQ_CLEAN, sb)
    }

    /// How long a mount of this filesystem would take in the kernel's MMP check,
    /// in seconds: `Some(0)` when clean; `None` when fsck (the mount is refused);
    /// otherwise twice the wait (before and after writing its own seq), with
    /// the check interval raised to the block's `mmp_check_interval` as the
    /// kernel does.
    pub fn mount_wait_seconds(&self, sb: &Superblock) -> Option<u32> {
        match self.seq {
            SEQ_CLEAN => Some(0),
            SEQ_FSCK => None,
            _ => Some(2 * self.wait_seconds(sb)),
        }
    }

    /// The kernel's single wait for a not-clean block, block check interval
    /// included: `ci = max(update interval, 5, mmp_check_interval)`.
    pub fn wait_seconds(&self, sb: &Superblock) -> u32 {
        let ci = u32::from(sb.mmp_update_interval)
            .max(MIN_CHECK_INTERVAL)
            .max(u32::from(self.check_interval));
        wait_for_interval(ci)
    }
}

/// What `blockfence inspect` shows about a filesystem and its MMP block:
/// printable with `{}`, serialisable for `--json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MmpReport {
    pub uuid: String,
    pub volume_name: String,
    pub block_size: u32,
    pub blocks_count: u64,
    pub metadata_csum: bool,
    /// Default error behaviour; MMP's in-kernel detection of a second writer
    /// acts only with `remount_ro` or `panic`.
    pub errors: super::ErrorBehavior,
    pub mmp_block: u64,
    pub mmp_update_interval: u16,
    pub mmp_check_interval: u16,
    /// The kernel's single MMP wait for this block (see [`Mmp::wait_seconds`]).
    pub mmp_wait_seconds: u32,
    /// Last writer, whatever the state.
    pub last_nodename: String,
    pub last_bdevname: String,
    pub last_update_time: u64,
    pub seq: u32,
    pub mmp: MmpState,
}

impl MmpReport {
    pub fn new(sb: &Superblock, mmp: &Mmp) -> MmpReport {
        MmpReport {
            uuid: sb.uuid_string(),
            volume_name: sb.volume_name.clone(),
            block_size: sb.block_size,
            blocks_count: sb.blocks_count,
            metadata_csum: sb.metadata_csum(),
            errors: sb.errors,
            mmp_block: mmp.block,
            mmp_update_interval: sb.mmp_update_interval,
            mmp_check_interval: mmp.check_interval,
            mmp_wait_seconds: mmp.wait_seconds(sb),
            last_nodename: mmp.nodename.clone(),
            last_bdevname: mmp.bdevname.clone(),
            last_update_time: mmp.time,
            seq: mmp.seq,
            mmp: mmp.state(),
        }
    }
}

impl std::fmt::Display for MmpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "filesystem  ext4 {} label {:?}, {} blocks of {} bytes, metadata_csum {}",
            self.uuid,
            self.volume_name,
            self.blocks_count,
            self.block_size,
            if self.metadata_csum { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "errors      {}{}",
            self.errors,
            match self.errors {
                super::ErrorBehavior::RemountRo | super::ErrorBehavior::Panic => "",
                _ => " (MMP's detection of a second writer will not act; tune2fs -e remount-ro)",
            }
        )?;
        writeln!(
            f,
            "mmp         block {}, update interval {} s, check interval {} s, mount wait {} s",
            self.mmp_block,
            self.mmp_update_interval,
            self.mmp_check_interval,
            self.mmp_wait_seconds
        )?;
        writeln!(
            f,
            "last write  seq {:#010x} by node {:?} on device {:?} at {} ({})",
            self.seq,
            self.last_nodename,
            self.last_bdevname,
            format_unix_utc(self.last_update_time),
            self.last_update_time
        )?;
        write!(f, "state       {}", self.mmp.name())
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a count of Unix seconds.
pub fn format_unix_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::superblock::tests::raw_sb;
    use crate::ext4::superblock::{INCOMPAT_CSUM_SEED, RO_COMPAT_METADATA_CSUM};

    fn sb(metadata_csum: bool) -> Superblock {
        let ro = if metadata_csum {
            RO_COMPAT_METADATA_CSUM
        } else {
            0
        };
        Superblock::parse(&raw_sb(0, ro)).expect("valid superblock")
    }

    /// A hand-built MMP structure, sealed for `sb`.
    fn raw_mmp(seq: u32, sb: &Superblock) -> [u8; MMP_SIZE] {
        let mut b = [0u8; MMP_SIZE];
        b[0..4].copy_from_slice(&MMP_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&seq.to_le_bytes());
        b[8..16].copy_from_slice(&1_796_150_668u64.to_le_bytes());
        b[16..20].copy_from_slice(b"vm-a");
        b[80..85].copy_from_slice(b"loop0");
        b[112..114].copy_from_slice(&7u16.to_le_bytes());
        b[500] = 0x5a; // padding a rewrite must keep
        if sb.metadata_csum() {
            let c = mmp_checksum(&b, sb);
            b[OFF_CHECKSUM..].copy_from_slice(&c.to_le_bytes());
        }
        b
    }

    #[test]
    fn states() {
        let sb = sb(true);
        let m = Mmp::parse(&raw_mmp(SEQ_CLEAN, &sb), &sb).expect("valid");
        assert_eq!(m.state(), MmpState::Clean);
        assert_eq!(m.mount_wait_seconds(&sb), Some(0));
        let m = Mmp::parse(&raw_mmp(SEQ_FSCK, &sb), &sb).expect("valid");
        assert_eq!(m.state(), MmpState::Fsck);
        assert_eq!(m.mount_wait_seconds(&sb), None);
        let m = Mmp::parse(&raw_mmp(42, &sb), &sb).expect("valid");
        assert_eq!(
            m.state(),
            MmpState::InUse {
                seq: 42,
                time: 1_796_150_668,
                nodename: "vm-a".into(),
                bdevname: "loop0".into(),
                check_interval: 7,
            }
        );
        // ci = max(5 (update), 5 (min), 7 (block)) = 7: wait 15, twice.
        assert_eq!(m.wait_seconds(&sb), 15);
        assert_eq!(m.mount_wait_seconds(&sb), Some(30));
    }

    #[test]
    fn bad_magic_is_refused() {
        let sb = sb(false);
        let mut b = raw_mmp(1, &sb);
        b[0] = 0;
        assert!(matches!(
            Mmp::parse(&b, &sb),
            Err(Ext4Error::BadMmpMagic { block: 1000, .. })
        ));
        assert!(matches!(
            Mmp::parse(&[0u8; MMP_SIZE], &sb),
            Err(Ext4Error::BadMmpMagic { found: 0, .. })
        ));
    }

    #[test]
    fn bad_checksum_is_refused_only_with_metadata_csum() {
        let sb_csum = sb(true);
        let mut b = raw_mmp(1, &sb_csum);
        b[4] ^= 0x10;
        assert!(matches!(
            Mmp::parse(&b, &sb_csum),
            Err(Ext4Error::BadMmpChecksum { block: 1000, .. })
        ));
        // The same bytes on a filesystem without metadata_csum are fine.
        assert!(Mmp::parse(&b, &sb(false)).is_ok());
    }

    #[test]
    fn checksum_uses_the_stored_seed_with_csum_seed() {
        let mut raw = raw_sb(INCOMPAT_CSUM_SEED, RO_COMPAT_METADATA_CSUM);
        raw[0x270..0x274].copy_from_slice(&0x0bad_5eedu32.to_le_bytes());
        crate::ext4::superblock::tests::reseal(&mut raw);
        let seeded = Superblock::parse(&raw).expect("valid");
        let b = raw_mmp(3, &seeded);
        assert!(Mmp::parse(&b, &seeded).is_ok());
        // The uuid-derived seed does not validate it.
        assert!(matches!(
            Mmp::parse(&b, &sb(true)),
            Err(Ext4Error::BadMmpChecksum { .. })
        ));
    }

    #[test]
    fn short_buffer_is_refused() {
        let sb = sb(false);
        assert!(matches!(
            Mmp::parse(&raw_mmp(1, &sb)[..1000], &sb),
            Err(Ext4Error::TooShort { got: 1000, .. })
        ));
    }

    #[test]
    fn clean_block_keeps_everything_but_seq_and_checksum() {
        for csum in [false, true] {
            let sb = sb(csum);
            let old = raw_mmp(0x1234, &sb);
            let m = Mmp::parse(&old, &sb).expect("valid");
            let new = m.clean_block(&sb);
            let clean = Mmp::parse(&new, &sb).expect("the rewrite verifies");
            assert_eq!(clean.state(), MmpState::Clean);
            assert_eq!(
                (clean.nodename.as_str(), clean.bdevname.as_str()),
                ("vm-a", "loop0")
            );
            for i in (0..MMP_SIZE).filter(|i| !(4..8).contains(i) && *i < OFF_CHECKSUM) {
                assert_eq!(old[i], new[i], "byte {i} changed");
            }
            if !csum {
                assert_eq!(old[OFF_CHECKSUM..], new[OFF_CHECKSUM..]);
            }
        }
    }

    #[test]
    fn wait_follows_the_kernel() {
        let mut s = sb(false);
        for (update, wait) in [
            (0u16, 11u32),
            (1, 11),
            (5, 11),
            (10, 21),
            (60, 120),
            (300, 360),
        ] {
            s.mmp_update_interval = update;
            assert_eq!(mmp_wait_seconds(&s), wait, "update interval {update}");
        }
    }

    #[test]
    fn report_prints_and_serialises() {
        let sb = sb(true);
        let m = Mmp::parse(&raw_mmp(42, &sb), &sb).expect("valid");
        let r = MmpReport::new(&sb, &m);
        let text = r.to_string();
        assert!(text.contains("state       in_use"), "{text}");
        assert!(text.contains("\"vm-a\""), "{text}");
        assert!(text.contains("2026-12-01 18:44:28 UTC"), "{text}");
        let json = serde_json::to_value(&r).expect("serialises");
        assert_eq!(json["mmp"]["state"], "in_use");
        assert_eq!(json["mmp"]["nodename"], "vm-a");
        assert_eq!(json["mmp"]["seq"], 42);
        assert_eq!(json["errors"], "remount_ro");
        assert_eq!(json["uuid"], "d52e6161-4611-49d0-82f5-05d8e532b0d6");
        let clean = serde_json::to_value(MmpState::Clean).expect("serialises");
        assert_eq!(clean, serde_json::json!({"state": "clean"}));
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_unix_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_utc(1_796_150_668), "2026-12-01 18:44:28 UTC");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1100)) {
            let _ = Mmp::parse(&bytes, &sb(true));
            let _ = Mmp::parse(&bytes, &sb(false));
        }

        #[test]
        fn any_bit_flip_is_caught_with_metadata_csum(bit in 0usize..(MMP_SIZE * 8)) {
            let sb = sb(true);
            let mut b = raw_mmp(9, &sb);
            b[bit / 8] ^= 1 << (bit % 8);
            proptest::prop_assert!(Mmp::parse(&b, &sb).is_err());
        }
    }
}
