//! ext4 superblock and MMP.
