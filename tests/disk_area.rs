//! The lease area on real loop devices: sector sizes, O_DIRECT visibility
//! between two devices over one image, format/open, grow, and deadlines on an
//! I/O that really hangs (a loop device over a file on a frozen filesystem).
//!
//! Needs root and /dev/loop-control; otherwise every test prints why it is
//! skipped and passes. Loop devices, mounts and freezes are undone by Drop
//! guards, also when a test panics. `BLOCKFENCE_KEEP_DEVICES=1` keeps loop
//! devices and images for inspection; `BLOCKFENCE_TEST_DIR` chooses where the
//! images go (default: cargo's per-target tmp dir; it must support O_DIRECT,
//! so not tmpfs).

mod common;

use common::Scratch;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockfence::core::params::Params;
use blockfence::core::record::{AreaState, Decoded, Header, Owner, Slot, SlotState, BLOCK};
use blockfence::disk::area::{
    self, format_area, grow_area, open_area, read_area_snapshot, slot_block, DEFAULT_MAX_SLOTS,
};
use blockfence::disk::{
    Access, AreaStore, BlockDevice, BlockStore, DeviceIo, DeviceKind, DiskError, GrowOptions,
    IoWorker, Reply, Waited,
};

const MIB: u64 = 1 << 20;

fn skip() -> Option<String> {
    if run("id", &["-u"]).as_deref() != Ok("0") {
        return Some("not root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control".into());
    }
    None
}

macro_rules! skip_unless_root {
    () => {
        if let Some(reason) = skip() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

fn keep() -> bool {
    std::env::var_os("BLOCKFENCE_KEEP_DEVICES").is_some_and(|v| v != "0" && !v.is_empty())
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(cmd: &str, args: &[&str]) -> String {
    run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Serialises `losetup -f` within this test binary (other processes may race;
/// attaching is retried).
static LOSETUP: Mutex<()> = Mutex::new(());

/// An attached loop device, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(image: &Path, extra: &[&str]) -> Loop {
        let _g = LOSETUP.lock().unwrap_or_else(|e| e.into_inner());
        let image = image.to_str().expect("utf-8 path");
        let mut args = vec!["--direct-io=on"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-f", "--show", image]);
        let mut last = String::new();
        for _ in 0..5 {
            match run("losetup", &args) {
                Ok(dev) => {
                    let l = Loop {
                        dev: PathBuf::from(dev),
                    };
                    eprintln!(
                        "attached {} ({}) dio={}",
                        l.dev.display(),
                        extra.join(" "),
                        l.sys("loop/dio").unwrap_or_default()
                    );
                    return l;
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("cannot attach a loop device: {last}");
    }

    fn path(&self) -> &Path {
        &self.dev
    }

    fn name(&self) -> &str {
        self.dev
            .file_name()
            .and_then(|n| n.to_str())
            .expect("loop name")
    }

    fn sys(&self, attr: &str) -> Option<String> {
        std::fs::read_to_string(format!("/sys/block/{}/{attr}", self.name()))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// `losetup -c`: re-read the backing file's size.
    fn refresh(&self) {
        must("losetup", &["-c", self.dev.to_str().expect("utf-8")]);
    }

    fn open(&self) -> BlockDevice {
        BlockDevice::open(&self.dev, Access::ReadWrite).expect("open loop device")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if keep() {
            eprintln!("kept {}", self.dev.display());
            return;
        }
        let dev = self.dev.to_str().unwrap_or_default().to_string();
        for _ in 0..20 {
            if run("losetup", &["-d", &dev]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {dev}");
    }
}

fn params() -> Params {
    Params::default()
}

fn format(dev: &BlockDevice) -> area::AreaInfo {
    format_area(
        dev,
        DEFAULT_MAX_SLOTS,
        params(),
        area::new_volume_id(),
        params().host_dead_ms() as u32,
    )
    .expect("format")
}

fn slot(index: u16, seq: u64) -> Slot {
    Slot {
        index,
        state: SlotState::Idle,
        name: format!("node-{index}"),
        nonce: 42,
        seq,
        generation: 0,
        max_generation_seen: 0,
        params: params(),
    }
}

#[test]
fn sector_sizes_are_read_from_loop_devices() {
    skip_unless_root!();
    let scratch = Scratch::new("disk_area.");
    let image = scratch.image("sectors.img", 64 * MIB);
    for (extra, logical) in [(&[][..], 512u32), (&["--sector-size", "4096"][..], 4096)] {
        let lo = Loop::attach(&image, extra);
        let dev = lo.open();
        let p = lo.path().to_str().expect("utf-8");
        let ss: u32 = must("blockdev", &["--getss", p]).parse().expect("ss");
        let pbsz: u32 = must("blockdev", &["--getpbsz", p]).parse().expect("pbsz");
        let size: u64 = must("blockdev", &["--getsize64", p]).parse().expect("size");
        eprintln!(
            "{p}: BLKSSZGET {} BLKPBSZGET {} size {}",
            dev.logical_sector(),
            dev.physical_sector(),
            dev.size_bytes()
        );
        assert_eq!(dev.kind(), DeviceKind::BlockDevice);
        assert_eq!(dev.logical_sector(), logical);
        assert_eq!(dev.logical_sector(), ss);
        assert_eq!(dev.physical_sector(), pbsz);
        assert_eq!(dev.size_bytes(), size);
        assert_eq!(size, 64 * MIB);
        assert!(
            !dev.fdatasync_after_write(),
            "block devices rely on O_DSYNC"
        );
        // Our unit is 4096 on both: a 512-aligned offset is refused before the
        // kernel sees it.
        assert!(matches!(
            dev.read_at(512, BLOCK),
            Err(DiskError::Misaligned { align: 4096, .. })
        ));
        assert!(matches!(
            dev.read_at(64 * MIB, BLOCK),
            Err(DiskError::OutOfRange { .. })
        ));
    }
}

#[test]
fn format_and_open_on_512_and_4096_byte_sector_loops() {
    skip_unless_root!();
    let scratch = Scratch::new("disk_area.");
    for (name, extra, logical) in [
        ("f512.img", &[][..], 512u32),
        ("f4096.img", &["--sector-size", "4096"][..], 4096),
    ] {
        let image = scratch.image(name, 100 * MIB + 12_288);
        let lo = Loop::attach(&image, extra);
        let dev = lo.open();
        assert!(matches!(
            open_area(&dev),
            Err(DiskError::NotFormatted { .. })
        ));
        let info = format(&dev);
        assert_eq!(info.area_offset, 99 * MIB);
        assert_eq!(info.header.logical_sector, logical);
        let again = BlockDevice::open(lo.path(), Access::ReadOnly).expect("open ro");
        assert_eq!(open_area(&again).expect("open"), info);
        let snap = read_area_snapshot(&again).expect("snapshot");
        assert_eq!(snap.owner, Decoded::Valid(Owner::free(params())));
        assert_eq!(snap.slots.len(), DEFAULT_MAX_SLOTS as usize);
        // The header is where the layout says, in the image file itself.
        let mut raw = [0u8; BLOCK];
        let mut f = std::fs::File::open(&image).expect("image");
        f.seek(SeekFrom::Start(99 * MIB + 255 * BLOCK as u64))
            .expect("seek");
        f.read_exact(&mut raw).expect("read image");
        assert_eq!(Header::decode(&raw), Decoded::Valid(info.header.clone()));
        // A read-only handle cannot write.
        assert!(matches!(
            again.write_at(0, &blockfence::disk::AlignedBuf::zeroed_blocks(1)),
            Err(DiskError::Io { .. })
        ));
    }
}

#[test]
fn a_regular_file_image_works_too() {
    skip_unless_root!();
    let scratch = Scratch::new("disk_area.");
    let image = scratch.image("plain.img", 32 * MIB);
    let dev = BlockDevice::open(&image, Access::ReadWrite).expect("open file");
    assert_eq!(dev.kind(), DeviceKind::RegularFile);
    assert!(dev.fdatasync_after_write());
    let info = format(&dev);
    assert_eq!(open_area(&dev).expect("open"), info);
    // The same file seen through a loop device.
    let lo = Loop::attach(&image, &[]);
    assert_eq!(
        open_area(&lo.open()).expect("open via loop").header,
        info.header
    );
}

#[test]
fn two_loop_devices_over_one_image_see_each_others_writes_at_once() {
    skip_unless_root!();
    let scratch = Scratch::new("disk_area.");
    let image = scratch.image("shared.img", 64 * MIB);
    // Node A with 512-byte sectors, node B with 4096: one disk, two views.
    let lo_a = Loop::attach(&image, &[]);
    let lo_b = Loop::attach(&image, &["--sector-size", "4096"]);
    // One handle shared by the area code and node A's worker.
    let dev_a = std::sync::Arc::new(lo_a.open());
    let info = format(&dev_a);
    let info_b = open_area(&lo_b.open()).expect("B opens A's area");
    assert_eq!(info_b.header, info.header);

    let a = IoWorker::spawn("a", AreaStore::for_area(dev_a.clone(), &info)).expect("worker a");
    let b = IoWorker::spawn("b", AreaStore::for_area(lo_b.open(), &info_b)).expect("worker b");
    let deadline = || Instant::now() + Duration::from_secs(10);
    for seq in 1..=50u64 {
        let (writer, reader, index) = if seq % 2 == 0 {
            (&a, &b, 0)
        } else {
            (&b, &a, 1)
        };
        let rec = slot(index, seq);
        assert_eq!(
            writer
                .write(slot_block(index), &rec.encode())
                .wait_until(deadline())
                .expect("write"),
            Reply::Written
        );
        match reader.read(slot_block(index), 1).wait_until(deadline()) {
            Ok(Reply::Read(blocks)) => assert_eq!(Slot::decode(&blocks[0]), Decoded::Valid(rec)),
            r => panic!("read: {r:?}"),
        }
    }

    // Why O_DIRECT: a buffered reader on B keeps a stale page. Observed, not
    // asserted (the page cache may be dropped at any time).
    let at = info.area_offset + slot_block(5) * BLOCK as u64;
    let buffered_read = || {
        let mut f = std::fs::File::open(lo_b.path()).expect("buffered open");
        f.seek(SeekFrom::Start(at)).expect("seek");
        let mut b = [0u8; BLOCK];
        f.read_exact(&mut b).expect("buffered read");
        Slot::decode(&b)
    };
    let before = buffered_read();
    let store_a = AreaStore::for_area(lo_a.open(), &info);
    store_a
        .write_block(slot_block(5), &slot(5, 1).encode())
        .expect("write");
    let buffered = buffered_read();
    let direct = AreaStore::for_area(lo_b.open(), &info_b)
        .read_blocks(slot_block(5), 1)
        .expect("direct read");
    eprintln!(
        "after A's write: buffered read on B {} (before: {}), O_DIRECT read on B {}",
        if buffered == before { "STALE" } else { "fresh" },
        if before == Decoded::Empty {
            "empty"
        } else {
            "set"
        },
        if Slot::decode(&direct[0]) == Decoded::Valid(slot(5, 1)) {
            "fresh"
        } else {
            "STALE"
        },
    );
    assert_eq!(Slot::decode(&direct[0]), Decoded::Valid(slot(5, 1)));
}

#[test]
fn grow_on_a_loop_device() {
    skip_unless_root!();
    let scratch = Scratch::new("disk_area.");
    let image = scratch.image("grow.img", 64 * MIB);
    let lo = Loop::attach(&image, &[]);
    let info = format(&lo.open());
    AreaStore::for_area(lo.open(), &info)
        .write_block(slot_block(3), &slot(3, 9).encode())
        .expect("slot");

    // Enlarge the backing file and tell the loop device.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("image")
        .set_len(2048 * MIB + 4096)
        .expect("grow image");
    lo.refresh();
    let dev = lo.open();
    assert_eq!(dev.size_bytes(), 2048 * MIB + 4096);
    let e = open_area(&dev).unwrap_err();
    assert!(
        matches!(e, DiskError::DeviceGrown { old_offset, new_offset, .. }
            if old_offset == 63 * MIB && new_offset == 2047 * MIB),
        "{e:?}"
    );
    eprintln!("{e}");

    let start = Instant::now();
    let report = grow_area(&dev, &GrowOptions::default()).expect("grow");
    eprintln!(
        "grew in {:?}: {}",
        start.elapsed(),
        report.resize2fs_command(lo.path())
    );
    assert_eq!(report.old_offset, 63 * MIB);
    assert_eq!(report.new_offset, 2047 * MIB);
    assert_eq!(report.fs_bytes, 63 * MIB);
    assert_eq!(
        report.resize2fs_command(lo.path()),
        format!("resize2fs {} {}K", lo.path().display(), 2047 * 1024)
    );

    let new = open_area(&dev).expect("open at the new offset");
    assert_eq!(new.area_offset, 2047 * MIB);
    assert_eq!(new.header.volume_id, info.header.volume_id);
    assert_eq!(new.header.fs_bytes, info.header.fs_bytes);
    let snap = read_area_snapshot(&dev).expect("snapshot");
    assert_eq!(snap.slots[3], Decoded::Valid(slot(3, 9)));
    for block in [0u64, 255] {
        let raw = dev
            .read_at(63 * MIB + block * BLOCK as u64, BLOCK)
            .expect("read old header");
        let h = Header::decode(raw.block(0).expect("block"));
        let h = h.valid().expect("old header intact");
        assert_eq!((h.state, h.moved_to), (AreaState::Moved, 2047 * MIB));
    }

    // A node whose kernel still sees the old size is told to re-read it.
    let stale = Loop::attach(&image, &["--sizelimit", &(64 * MIB).to_string()]);
    let e = open_area(&stale.open()).unwrap_err();
    assert!(
        matches!(e, DiskError::Moved { moved_to, .. } if moved_to == 2047 * MIB),
        "{e:?}"
    );
    eprintln!("{e}");

    // Far growth: beyond open_area's search, found by grow's.
    drop(stale);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("image")
        .set_len(64 * 1024 * MIB)
        .expect("grow image");
    lo.refresh();
    let dev = lo.open();
    let start = Instant::now();
    let r = open_area(&dev);
    eprintln!("open_area searched in {:?}: {r:?}", start.elapsed());
    assert!(matches!(r, Err(DiskError::NotFormatted { .. })));
    let start = Instant::now();
    let report = grow_area(&dev, &GrowOptions::default()).expect("far grow");
    eprintln!(
        "far grow (62 GiB searched) in {:?}; {}",
        start.elapsed(),
        report.resize2fs_command(lo.path())
    );
    assert_eq!(report.old_offset, 2047 * MIB);
    assert_eq!(
        read_area_snapshot(&dev).expect("snapshot").slots[3],
        Decoded::Valid(slot(3, 9))
    );
}

/// A mounted filesystem, unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap_or_default().to_string();
        for _ in 0..20 {
            if run("umount", &[&dir]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = run("umount", &["-l", &dir]);
    }
}

/// A frozen filesystem (every write to it blocks), thawed on drop.
struct Frozen {
    dir: PathBuf,
    thawed: bool,
}

impl Frozen {
    fn freeze(mount: &Mount) -> Frozen {
        // Never freeze anything but our own mount.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let dir = mount.dir.to_str().expect("utf-8");
        assert!(
            mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(dir)),
            "{dir} is not a mount point"
        );
        must("fsfreeze", &["--freeze", dir]);
        Frozen {
            dir: mount.dir.clone(),
            thawed: false,
        }
    }

    fn thaw(&mut self) {
        if !self.thawed {
            let _ = run(
                "fsfreeze",
                &["--unfreeze", self.dir.to_str().unwrap_or_default()],
            );
            self.thawed = true;
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

#[test]
fn deadline_holds_while_a_real_write_hangs() {
    skip_unless_root!();
    for tool in ["mkfs.ext4", "fsfreeze", "mount"] {
        if run("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            eprintln!("skipped: {tool} not installed (the worker's deadline logic is unit-tested with a paused MemStore)");
            return;
        }
    }
    let scratch = Scratch::new("disk_area.");
    // An ext4 filesystem of our own, holding the image of the lease device.
    let outer = scratch.image("outer.img", 128 * MIB);
    must("mkfs.ext4", &["-q", "-F", outer.to_str().expect("utf-8")]);
    let outer_lo = Loop::attach(&outer, &[]);
    let mnt = scratch.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    must(
        "mount",
        &[
            outer_lo.path().to_str().expect("utf-8"),
            mnt.to_str().expect("utf-8"),
        ],
    );
    let mount = Mount { dir: mnt.clone() };
    let inner = mnt.join("lease.img");
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&inner)
        .expect("inner image")
        .set_len(32 * MIB)
        .expect("size inner image");
    let lo = Loop::attach(&inner, &[]);
    let info = format(&lo.open());
    let worker = IoWorker::spawn("frozen", AreaStore::for_area(lo.open(), &info)).expect("worker");

    // Freeze: the loop device's writes to its backing file now block in the
    // kernel until the thaw.
    let mut frozen = Frozen::freeze(&mount);
    let rec = slot(0, 1);
    let write = worker.write(slot_block(0), &rec.encode());
    let start = Instant::now();
    let write = match write.wait_until(start + Duration::from_millis(300)) {
        Err(Waited::TimedOut(t)) => t,
        r => panic!("expected the write to hang, got {r:?}"),
    };
    let waited = start.elapsed();
    eprintln!("write on frozen fs: timed out after {waited:?}");
    assert!(waited >= Duration::from_millis(300));
    assert!(
        waited < Duration::from_millis(800),
        "caller blocked {waited:?}"
    );

    // A read submitted behind it queues behind it.
    let read = worker.read(slot_block(0), 1);
    let read = match read.wait_until(Instant::now() + Duration::from_millis(100)) {
        Err(Waited::TimedOut(t)) => t,
        r => panic!("expected the read to queue, got {r:?}"),
    };
    assert_eq!(worker.pending(), 2);
    // Still in flight a while later: really hung, not just slow.
    std::thread::sleep(Duration::from_millis(300));
    let write = match write.wait_until(Instant::now()) {
        Err(Waited::TimedOut(t)) => t,
        r => panic!("write completed while frozen: {r:?}"),
    };

    frozen.thaw();
    let deadline = Instant::now() + Duration::from_secs(20);
    assert_eq!(
        write.wait_until(deadline).expect("late write"),
        Reply::Written
    );
    match read.wait_until(deadline) {
        Ok(Reply::Read(blocks)) => assert_eq!(Slot::decode(&blocks[0]), Decoded::Valid(rec)),
        r => panic!("read: {r:?}"),
    }
    eprintln!(
        "late completion observed {:?} after submit",
        start.elapsed()
    );
    drop(worker);
    drop(frozen);
    drop(lo);
    drop(mount);
    drop(outer_lo);
}
