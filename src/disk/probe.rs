//! What is already on a device, so that `format` never destroys data by accident.
//!
//! Pure: looks at bytes the caller read (the first MiB of the device, and the
//! block where a lease area header would be), and names the first thing it
//! recognises. Anything non-zero that it does not recognise still counts as
//! data: only a device that is all zeros where it looks is called empty.

/// How many bytes at the start of the device `format` looks at.
pub const PROBE_BYTES: usize = 1 << 20;

/// Something found on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A blockfence lease area (already formatted).
    LeaseArea,
    /// An ext2/3/4 filesystem.
    Ext4,
    /// An XFS filesystem.
    Xfs,
    /// A btrfs filesystem.
    Btrfs,
    /// An LVM physical volume.
    Lvm,
    /// Linux swap.
    Swap,
    /// A GPT partition table.
    Gpt,
    /// An MBR (DOS) partition table or boot sector.
    Mbr,
    /// Non-zero bytes of unknown meaning at this offset.
    Data { offset: u64 },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::LeaseArea => write!(f, "a blockfence lease area (already formatted)"),
            Found::Ext4 => write!(f, "an ext2/ext3/ext4 filesystem"),
            Found::Xfs => write!(f, "an XFS filesystem"),
            Found::Btrfs => write!(f, "a btrfs filesystem"),
            Found::Lvm => write!(f, "an LVM physical volume"),
            Found::Swap => write!(f, "a swap area"),
            Found::Gpt => write!(f, "a GPT partition table"),
            Found::Mbr => write!(f, "an MBR partition table or boot sector"),
            Found::Data { offset } => write!(f, "non-zero data at byte {offset}"),
        }
    }
}

fn at(bytes: &[u8], offset: usize, magic: &[u8]) -> bool {
    bytes.get(offset..offset + magic.len()) == Some(magic)
}

/// Names what `start` (the first bytes of the device) and `area_header` (the
/// block where the lease area header would be, read at byte `area_offset`)
/// hold, or `None` if all zeros.
pub fn probe(start: &[u8], area_header: &[u8], area_offset: u64) -> Option<Found> {
    if at(area_header, 0, b"BFHD") {
        return Some(Found::LeaseArea);
    }
    if at(start, 1024 + 0x38, &[0x53, 0xEF]) {
        return Some(Found::Ext4);
    }
    if at(start, 0, b"XFSB") {
        return Some(Found::Xfs);
    }
    if at(start, 0x10040, b"_BHRfS_M") {
        return Some(Found::Btrfs);
    }
    if at(start, 512, b"LABELONE") || at(start, 512 + 24, b"LVM2 001") {
        return Some(Found::Lvm);
    }
    if at(start, 4096 - 10, b"SWAPSPACE2") {
        return Some(Found::Swap);
    }
    if at(start, 512, b"EFI PART") || at(start, 4096, b"EFI PART") {
        return Some(Found::Gpt);
    }
    if at(start, 510, &[0x55, 0xAA]) {
        return Some(Found::Mbr);
    }
    if let Some(i) = start.iter().position(|&b| b != 0) {
        return Some(Found::Data { offset: i as u64 });
    }
    area_header
        .iter()
        .position(|&b| b != 0)
        .map(|i| Found::Data {
            offset: area_offset + i as u64,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros() -> Vec<u8> {
        vec![0u8; 8192 + 0x10100]
    }

    #[test]
    fn zeros_are_empty() {
        assert_eq!(probe(&zeros(), &[0u8; 4096], 1 << 30), None);
    }

    #[test]
    fn known_signatures_are_named() {
        let cases: &[(usize, &[u8], Found)] = &[
            (1024 + 0x38, &[0x53, 0xEF], Found::Ext4),
            (0, b"XFSB", Found::Xfs),
            (0x10040, b"_BHRfS_M", Found::Btrfs),
            (512, b"LABELONE", Found::Lvm),
            (4086, b"SWAPSPACE2", Found::Swap),
            (512, b"EFI PART", Found::Gpt),
            (510, &[0x55, 0xAA], Found::Mbr),
            (77, &[1], Found::Data { offset: 77 }),
        ];
        for (off, magic, want) in cases {
            let mut b = zeros();
            b[*off..*off + magic.len()].copy_from_slice(magic);
            assert_eq!(
                probe(&b, &[0u8; 4096], 1 << 30).as_ref(),
                Some(want),
                "{want}"
            );
        }
        let mut h = [0u8; 4096];
        h[..4].copy_from_slice(b"BFHD");
        assert_eq!(probe(&zeros(), &h, 1 << 30), Some(Found::LeaseArea));
    }

    #[test]
    fn data_in_the_area_block_is_reported_at_its_device_offset() {
        let mut h = [0u8; 4096];
        h[100] = 1;
        assert_eq!(
            probe(&zeros(), &h, 1 << 30),
            Some(Found::Data {
                offset: (1 << 30) + 100
            })
        );
    }
}
