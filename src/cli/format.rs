//! `blockfence format`: the lease area at the end, ext4 with MMP in the rest.

use crate::core::params::Params;
use crate::core::record::{Slot, SlotState};
use crate::disk::area::{self, AREA_SIZE, MIN_DEVICE_BYTES};
use crate::disk::blockdev::{Access, AlignedBuf, BlockDevice};
use crate::disk::device::DeviceIo;
use crate::disk::probe::{probe, PROBE_BYTES};
use crate::disk::runner::check_node_name;
use anyhow::{bail, Context};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Default number of node slots in a new lease area.
pub const DEFAULT_SLOTS: u16 = 32;
/// Longest ext4 volume label, in bytes (mkfs.ext4 would silently truncate).
const EXT4_LABEL_MAX: usize = 16;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Block device (or image file) to format. Everything on it is lost.
    pub device: PathBuf,
    /// Format even if the device holds a filesystem, a partition table, a lease
    /// area or any other data.
    #[arg(long)]
    pub force: bool,
    /// Reserve a slot for this node name now, so that its first acquire does
    /// not wait `host_dead` to join (repeat for every node).
    #[arg(long = "node", value_name = "NAME")]
    pub nodes: Vec<String>,
    /// Number of node slots (at most 252).
    #[arg(long, default_value_t = DEFAULT_SLOTS)]
    pub slots: u16,
    /// Default lease I/O deadline, ms; with the other three it sets the volume's
    /// host_dead ceiling (no node may use slower parameters).
    #[arg(long, default_value_t = crate::core::params::DEFAULT_IO_TIMEOUT_MS)]
    pub io_timeout_ms: u32,
    /// Default renewal interval, ms.
    #[arg(long, default_value_t = crate::core::params::DEFAULT_RENEW_INTERVAL_MS)]
    pub renew_interval_ms: u32,
    /// Default lease validity after a renewal starts, ms.
    #[arg(long, default_value_t = crate::core::params::DEFAULT_LEASE_TIMEOUT_MS)]
    pub lease_timeout_ms: u32,
    /// Default time the fence may take, ms.
    #[arg(long, default_value_t = crate::core::params::DEFAULT_FENCE_TIMEOUT_MS)]
    pub fence_timeout_ms: u32,
    /// Filesystem label (at most 16 bytes).
    #[arg(long)]
    pub label: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let params = Params {
        io_timeout_ms: args.io_timeout_ms,
        renew_interval_ms: args.renew_interval_ms,
        lease_timeout_ms: args.lease_timeout_ms,
        fence_timeout_ms: args.fence_timeout_ms,
    };
    params.validate().context("invalid lease parameters")?;
    if args.slots == 0 || args.slots > area::MAX_SLOTS {
        bail!(
            "--slots must be between 1 and {} (got {})",
            area::MAX_SLOTS,
            args.slots
        );
    }
    if args.nodes.len() > args.slots as usize {
        bail!(
            "{} --node names but only {} slots: raise --slots",
            args.nodes.len(),
            args.slots
        );
    }
    for (i, n) in args.nodes.iter().enumerate() {
        check_node_name(n).with_context(|| format!("--node {n:?}"))?;
        if args.nodes[..i].contains(n) {
            bail!("--node {n:?} is given twice: node names must be unique");
        }
    }
    if let Some(label) = &args.label {
        if label.len() > EXT4_LABEL_MAX {
            bail!(
                "--label {label:?} is {} bytes; an ext4 label holds at most {EXT4_LABEL_MAX}",
                label.len()
            );
        }
    }
    check_not_in_use(&args.device)?;
    let dev = BlockDevice::open(&args.device, Access::ReadWrite)?;
    let size = dev.size_bytes();
    let too_small = || {
        anyhow::anyhow!(
            "{} is too small: {size} bytes; blockfence needs at least {MIN_DEVICE_BYTES} bytes \
             ({} MiB: a {} MiB lease area and a small filesystem)",
            args.device.display(),
            MIN_DEVICE_BYTES >> 20,
            AREA_SIZE >> 20,
        )
    };
    if size < MIN_DEVICE_BYTES {
        return Err(too_small());
    }
    let area_offset = area::area_offset_for(size).ok_or_else(too_small)?;
    if !args.force {
        let start = dev.read_at(0, PROBE_BYTES.min(area_offset as usize))?;
        let header = dev.read_at(area_offset, 4096)?;
        if let Some(found) = probe(start.as_slice(), header.as_slice(), area_offset) {
            bail!(
                "{} holds {found}; refusing to format it. Use --force to destroy it \
                 (check with `blkid -p {}` first)",
                args.device.display(),
                args.device.display()
            );
        }
    }
    let update_interval = params.mmp_update_interval_s();
    mkfs(&args, area_offset, update_interval)?;
    let ceiling = u32::try_from(params.host_dead_ms()).context("host_dead does not fit")?;
    let info = area::format_area(&dev, args.slots, params, area::new_volume_id(), ceiling)?;
    for (i, name) in args.nodes.iter().enumerate() {
        let slot = Slot {
            index: i as u16,
            state: SlotState::Idle,
            name: name.clone(),
            nonce: 0,
            seq: 0,
            generation: 0,
            max_generation_seen: 0,
            params,
        };
        let offset = info.area_offset + area::slot_block(i as u16) * 4096;
        dev.write_at(offset, &AlignedBuf::from_block(&slot.encode()))?;
    }
    // Check what we made, with our own readers.
    let sb = crate::ext4::read_superblock(&args.device)?;
    let fs_end = sb.blocks_count * sb.block_size as u64;
    if fs_end > area_offset || !sb.mmp_enabled() {
        bail!(
            "mkfs.ext4 did not produce the expected filesystem (end {fs_end}, area at {area_offset}, mmp {}): not using this device",
            sb.mmp_enabled()
        );
    }
    println!(
        "formatted {}: ext4 of {} MiB (MMP every {update_interval} s, errors=remount-ro), \
         lease area of {} KiB at byte {area_offset} with {} slots{}; host_dead {} ms",
        args.device.display(),
        fs_end >> 20,
        AREA_SIZE >> 10,
        args.slots,
        if args.nodes.is_empty() {
            String::new()
        } else {
            format!(
                " ({} reserved: {})",
                args.nodes.len(),
                args.nodes.join(", ")
            )
        },
        params.host_dead_ms(),
    );
    Ok(crate::cli::exit::OK)
}

/// Refuses a block device that something else holds open exclusively (a
/// mounted filesystem, device-mapper, md, another `format`).
fn check_not_in_use(device: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(device) else {
        return Ok(());
    };
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(
            "{} is in use (mounted, or held open exclusively by another program); unmount it first",
            device.display()
        ),
        Err(_) => Ok(()), // BlockDevice::open reports other problems clearly
    }
}

fn mkfs(args: &Args, fs_bytes: u64, update_interval: u16) -> anyhow::Result<()> {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-F", "-q", "-O", "mmp", "-e", "remount-ro"])
        .arg("-E")
        .arg(format!("mmp_update_interval={update_interval},nodiscard"));
    if let Some(label) = &args.label {
        cmd.args(["-L", label]);
    }
    cmd.arg(&args.device).arg(format!("{}k", fs_bytes / 1024));
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run mkfs.ext4 (install e2fsprogs)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("mkfs.ext4 failed: {}", err.trim().replace('\n', "; "));
    }
    Ok(())
}
