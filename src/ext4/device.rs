//! Reading the superblock and the MMP block of a device, and writing the MMP
//! block clean.
//!
//! Every read and write uses `O_DIRECT`: the block device page cache of this
//! node knows nothing of what another node wrote, so a buffered read of the
//! MMP block can return a seq that is long gone (the kernel itself clears the
//! buffer's up-to-date bit before each MMP read for the same reason). I/O is
//! done in 4096-byte aligned units (see the `dio` helpers); with 1 KiB blocks
//! the unit around the MMP block holds neighbouring blocks too, which a clean
//! write rewrites with the bytes just read.
//!
//! A read that races a write (kmmpd here or on another node) can return a torn
//! block: with metadata_csum it fails its checksum and the caller should read
//! again; without metadata_csum nothing can tell.
//!
//! What this module must not do: decide that a takeover is safe, or run any
//! e2fsprogs tool.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::dio::{
    open_direct, read_exact_at, set_direct, write_all_at_sync, AlignedBuf, DIO_ALIGN,
};
use super::mmp::{Mmp, MmpState, MMP_SIZE, SEQ_CLEAN};
use super::superblock::{Superblock, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use super::Ext4Error;

/// A device (or image file) opened for direct I/O.
#[derive(Debug)]
pub struct Ext4Device {
    file: File,
    path: PathBuf,
}

/// The aligned unit holding the MMP structure, and where in it the structure
/// starts.
struct MmpUnit {
    buf: AlignedBuf,
    unit_offset: u64,
    within: usize,
}

impl Ext4Device {
    /// Opens `path` read-only with `O_DIRECT`.
    pub fn open(path: impl AsRef<Path>) -> Result<Ext4Device, Ext4Error> {
        let path = path.as_ref().to_path_buf();
        let file = open_direct(&path, false)?;
        Ok(Ext4Device { file, path })
    }

    /// Opens `path` read-write with `O_DIRECT | O_EXCL`; a block device mounted
    /// (or otherwise held exclusively) on this node gives [`Ext4Error::Busy`].
    pub fn open_for_write(path: impl AsRef<Path>) -> Result<Ext4Device, Ext4Error> {
        let path = path.as_ref().to_path_buf();
        let file = open_direct(&path, true)?;
        Ok(Ext4Device { file, path })
    }

    /// Wraps an already open device, turning `O_DIRECT` on if it is off.
    /// `path` is only used in error messages.
    pub fn from_file(file: File, path: impl AsRef<Path>) -> Result<Ext4Device, Ext4Error> {
        let path = path.as_ref().to_path_buf();
        set_direct(&file, &path)?;
        Ok(Ext4Device { file, path })
    }

    /// The path given at open.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, e: Ext4Error) -> Ext4Error {
        Ext4Error::Invalid {
            path: self.path.clone(),
            source: Box::new(e),
        }
    }

    /// Reads and parses the superblock, bypassing the page cache.
    pub fn read_superblock(&self) -> Result<Superblock, Ext4Error> {
        // The superblock is bytes 1024..2048 of the first aligned unit.
        let mut buf = AlignedBuf::zeroed_blocks(1);
        read_exact_at(&self.file, &self.path, &mut buf, 0)?;
        let start = SUPERBLOCK_OFFSET as usize;
        Superblock::parse(&buf.as_slice()[start..start + SUPERBLOCK_SIZE])
            .map_err(|e| self.invalid(e))
    }

    fn read_mmp_unit(&self) -> Result<(Superblock, Mmp, MmpUnit), Ext4Error> {
        let sb = self.read_superblock()?;
        let offset = sb.mmp_offset().map_err(|e| self.invalid(e))?;
        let align = DIO_ALIGN as u64;
        let unit_offset = offset - offset % align;
        // Blocks are >= 1024 bytes and 1024-aligned, so the 1024-byte structure
        // never crosses a 4096-byte unit boundary.
        let within = (offset - unit_offset) as usize;
        let mut buf = AlignedBuf::zeroed_blocks(1);
        read_exact_at(&self.file, &self.path, &mut buf, unit_offset)?;
        let mmp = Mmp::parse(&buf.as_slice()[within..within + MMP_SIZE], &sb)
            .map_err(|e| self.invalid(e))?;
        Ok((
            sb,
            mmp,
            MmpUnit {
                buf,
                unit_offset,
                within,
            },
        ))
    }

    /// Reads the superblock and the MMP block, bypassing the page cache; fails
    /// when the filesystem has no MMP or the block's magic or checksum is bad.
    pub fn read_mmp(&self) -> Result<(Superblock, Mmp), Ext4Error> {
        let (sb, mmp, _) = self.read_mmp_unit()?;
        Ok((sb, mmp))
    }

    /// See [`mark_mmp_clean`]. The device must be open for writing
    /// ([`Ext4Device::open_for_write`]). Returns the state found before.
    pub fn mark_mmp_clean(&self) -> Result<MmpState, Ext4Error> {
        let (sb, mmp, mut unit) = self.read_mmp_unit()?;
        let before = mmp.state();
        let clean = mmp.clean_block(&sb);
        unit.buf.as_mut_slice()[unit.within..unit.within + MMP_SIZE].copy_from_slice(&clean);
        write_all_at_sync(&self.file, &self.path, &unit.buf, unit.unit_offset)?;
        let (_, after) = self.read_mmp()?;
        if after.seq != SEQ_CLEAN {
            return Err(Ext4Error::NotPersisted {
                path: self.path.clone(),
                block: after.block,
                found: after.seq,
            });
        }
        Ok(before)
    }
}

/// Reads and parses the superblock of `path` with `O_DIRECT`.
pub fn read_superblock(path: impl AsRef<Path>) -> Result<Superblock, Ext4Error> {
    Ext4Device::open(path)?.read_superblock()
}

/// Reads the superblock and the MMP block of `path` with `O_DIRECT`.
pub fn read_mmp(path: impl AsRef<Path>) -> Result<(Superblock, Mmp), Ext4Error> {
    Ext4Device::open(path)?.read_mmp()
}

/// Writes the MMP block of `path` clean, so that the next mount (on any node)
/// proceeds at once instead of waiting out the kernel's MMP check.
///
/// **Only for a takeover the lease has proven safe**: the previous holder is
/// known to be stopped or fenced and no node has the filesystem mounted. On a
/// filesystem that *is* mounted elsewhere this defeats MMP: the kernel there
/// keeps writing its seq, but a mount here would no longer wait to see it.
///
/// What it does: reads the MMP block with `O_DIRECT`, sets `mmp_seq` to
/// `EXT4_MMP_SEQ_CLEAN` keeping node name, device name and every other byte,
/// recomputes the checksum when metadata_csum is on, writes it back with
/// `O_DIRECT`, `fdatasync`s, and reads it back to check. It never calls
/// `tune2fs` (whose `-E clear_mmp` rewrites the block from scratch). The device
/// is opened with `O_EXCL`, so it fails with [`Ext4Error::Busy`] while mounted
/// on *this* node. It refuses a block with a bad magic or checksum rather than
/// overwrite it. An FSCK seq (e2fsck running, or crashed while running) is
/// cleared like an in-use one: the lease must cover fsck too. Returns the
/// state it found, for the caller to log.
pub fn mark_mmp_clean(path: impl AsRef<Path>) -> Result<MmpState, Ext4Error> {
    Ext4Device::open_for_write(path)?.mark_mmp_clean()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_not_ext4() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("zeros");
        std::fs::write(&path, vec![0u8; 8192]).expect("create");
        let err = read_superblock(&path).expect_err("not ext4");
        assert!(matches!(err.root(), Ext4Error::BadMagic { found: 0 }));
        assert!(err.to_string().contains("zeros"), "{err}");
    }

    #[test]
    fn missing_device_names_the_path() {
        let err = read_mmp("/nonexistent/blockfence-dev").expect_err("missing");
        assert!(matches!(err, Ext4Error::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/blockfence-dev"));
    }

    #[test]
    fn tiny_file_is_a_short_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny");
        std::fs::write(&path, vec![0u8; 512]).expect("create");
        assert!(matches!(
            read_superblock(&path),
            Err(Ext4Error::ShortIo { got: 512, .. })
        ));
    }
}
