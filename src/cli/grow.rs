//! `blockfence grow`: move the lease area to the new end of an enlarged device.

use crate::disk::area::{grow_area, GrowAuthority, GrowOptions};
use crate::disk::blockdev::{Access, BlockDevice};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The enlarged block device (or image file). After growing the device
    /// itself (and `losetup -c` / a rescan so the kernel sees the new size), run
    /// this, then the `e2fsck -f` and `resize2fs` commands it prints.
    ///
    /// The lease must be free: no node may hold or claim it while the area
    /// moves (stop the database, release the lease). Nodes that still see the
    /// old size are refused by the old area, which is marked as moved.
    pub device: PathBuf,
    /// Move the area even if a slot says a node holds or claims the lease.
    /// Only when blockfence is stopped on every node (e.g. a crashed holder
    /// left a stale record).
    #[arg(long)]
    pub force: bool,
    /// Byte offset of the old area, if known (skips the search).
    #[arg(long)]
    pub old_offset: Option<u64>,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let dev = BlockDevice::open(&args.device, Access::ReadWrite)?;
    let opts = GrowOptions {
        authority: if args.force {
            GrowAuthority::Force
        } else {
            GrowAuthority::AreaFree
        },
        old_offset: args.old_offset,
        ..GrowOptions::default()
    };
    let report = grow_area(&dev, &opts)?;
    println!(
        "{} the lease area of {} from byte {} to byte {}.",
        if report.resumed {
            "finished moving"
        } else {
            "moved"
        },
        args.device.display(),
        report.old_offset,
        report.new_offset
    );
    // resize2fs refuses an unmounted filesystem mounted since its last check
    // ("Please run 'e2fsck -f' first"), and one is unmounted while the lease
    // is free, so the check is part of the procedure.
    println!(
        "the filesystem may now grow to {} bytes; while it is unmounted, run:\n  \
         e2fsck -f -p {}\n  {}\n(a filesystem mounted on this node grows online with the \
         resize2fs command alone)",
        report.fs_max_bytes,
        args.device.display(),
        report.resize2fs_command(&args.device)
    );
    Ok(crate::cli::exit::OK)
}
