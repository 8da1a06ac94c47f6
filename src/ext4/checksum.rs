//! ext4's crc32c convention.
//!
//! The kernel (`ext4_chksum`) and e2fsprogs (`ext2fs_crc32c_le`) return the raw
//! CRC-32C register: they start from a seed (`~0` for the superblock and for
//! the checksum seed, the filesystem's checksum seed for every other metadata
//! block) and apply **no final inversion**. The standard CRC-32C that the
//! `crc32c` crate computes starts from `~0` *and* inverts at the end, and its
//! `crc32c_append(c, data)` continues from a finished value, i.e. it inverts
//! `c` on entry and the result on exit:
//!
//! ```text
//! crc32c(d)            = !raw(!0, d)
//! crc32c_append(c, d)  = !raw(!c, d)
//! => raw(seed, d)      = !crc32c_append(!seed, d)
//! => raw(!0, d)        = !crc32c(d)
//! ```
//!
//! Proven against real filesystems in `tests/ext4_mmp.rs` (superblock checksum,
//! checksum seed and MMP checksum all match `mkfs.ext4`'s and the kernel's).
//!
//! Pure: no I/O.

/// ext4's crc32c of `data` started from `seed`, without final inversion (the
/// value of `ext2fs_crc32c_le(seed, data, len)` and of the kernel's
/// `ext4_chksum(sbi, seed, data, len)`).
pub fn ext4_crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-at-a-time reflected CRC-32C (polynomial 0x82F63B78) without final
    /// inversion: the definition, independent of the `crc32c` crate.
    fn raw_reference(seed: u32, data: &[u8]) -> u32 {
        let mut crc = seed;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn matches_the_raw_register_definition() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1500).collect();
        for seed in [0u32, !0, 0x1234_5678, 0xdead_beef] {
            assert_eq!(ext4_crc32c(seed, &data), raw_reference(seed, &data));
        }
    }

    #[test]
    fn differs_from_the_standard_crc_by_the_final_inversion() {
        // The standard check value of CRC-32C for "123456789" is 0xE3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(ext4_crc32c(!0, b"123456789"), !0xE306_9283);
    }

    #[test]
    fn chains_like_the_kernel() {
        // ext4 chains raw values: crc(crc(seed, a), b) == crc(seed, a ++ b).
        let (a, b) = (b"uuid-bytes-16...".as_slice(), b"metadata".as_slice());
        let whole: Vec<u8> = [a, b].concat();
        assert_eq!(ext4_crc32c(ext4_crc32c(!0, a), b), ext4_crc32c(!0, &whole));
    }
}
