//! The fence on real devices: one sparse image, two loop devices over it
//! (`--direct-io=on`), ext4 mounted through loop A with live writers, the
//! fence run against the mount, and the device read back through loop B with
//! O_DIRECT (no page cache shared with A) to show that nothing lands after it.
//!
//! Also: a kill step that never finishes (the recording fake, no devices)
//! stops the watchdog stand-in from being fed; and on a tmpfs mount, where the
//! shutdown ioctl is refused, the watchdog is starved but the real kill and
//! unmount still run.
//!
//! Needs root and /dev/loop-control (skips otherwise, printing why;
//! `BLOCKFENCE_REQUIRE_DEVICES=1` fails instead).

mod common;

use common::daemon_kit::{
    assert_unchanged_after, debugfs_cat, device_digest, Loop, LATE_WRITE_WINDOW,
};

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use blockfence::core::fence::{Outcome, StarveReason, Step};
use blockfence::fence::fake::{Behavior, RecordingOps};
use blockfence::fence::{run_fence, FenceTarget, FileWatchdog, SystemOps, Watchdog};
use common::{is_mountpoint, require_root_loop, run_ok, AlignedBuf, SharedImage};

/// Size of the shared image.
const IMAGE_SIZE: u64 = 64 << 20;
/// Chunk of the whole-device reads.
const CHUNK: usize = 1 << 20;
/// The fence budget given to `run_fence` (the default `fence_timeout`).
const FENCE_BUDGET: Duration = Duration::from_secs(3);

/// A mount point; lazily unmounted on drop if the test left it mounted.
struct MountDir(tempfile::TempDir);

impl Drop for MountDir {
    fn drop(&mut self) {
        if is_mountpoint(self.0.path()) {
            let _ = run_ok("umount", &["-l", self.0.path().to_str().unwrap_or("")]);
        }
    }
}

/// Child processes, SIGKILLed and reaped on drop if still there.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child` to exit, for at most `timeout` (a child that does not die
/// is a test failure, not a hang).
fn wait_exit(child: Child, timeout: Duration) -> Option<ExitStatus> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = tx.send(child.wait());
    });
    rx.recv_timeout(timeout).ok().and_then(Result::ok)
}

/// Reads one line the child printed (its "started" event).
fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).expect("child stdout");
    line
}

/// The whole image, read through `device` with O_DIRECT.
fn read_device(device: &Path) -> Vec<u8> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .expect("open O_DIRECT");
    let mut buf = AlignedBuf::zeroed(CHUNK);
    let mut all = Vec::with_capacity(IMAGE_SIZE as usize);
    for i in 0..IMAGE_SIZE / CHUNK as u64 {
        file.read_exact_at(buf.as_mut_slice(), i * CHUNK as u64)
            .expect("O_DIRECT read");
        all.extend_from_slice(buf.as_slice());
    }
    all
}

#[test]
fn fence_stops_every_writer_on_a_loop_mount() {
    if !require_root_loop() {
        return;
    }
    let image = SharedImage::create(IMAGE_SIZE).unwrap();
    let a = Loop::attach(image.path());
    let b = Loop::attach(image.path());
    run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", a.arg()]).unwrap();
    let mnt = MountDir(
        tempfile::Builder::new()
            .prefix("bf-fence-")
            .tempdir()
            .unwrap(),
    );
    let dir = mnt.0.path().to_path_buf();
    run_ok(
        "mount",
        &["-t", "ext4", a.arg(), dir.to_str().expect("UTF-8")],
    )
    .unwrap();
    File::create(dir.join("held")).unwrap();
    File::create(dir.join("mapped"))
        .unwrap()
        .set_len(4096)
        .unwrap();

    let mut kids = Children::default();
    let sh = |script: &str, cwd: &Path| {
        Command::new("sh")
            .args(["-c", script])
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh")
    };
    // Appends lines to `log`; holds the mount by its cwd and the open file.
    kids.0.push(sh(
        "i=0; echo $i >> log; echo started; while :; do i=$((i+1)); echo $i >> log; done",
        &dir,
    ));
    // Rewrites `big` with random data, O_DIRECT; prints a line per round.
    kids.0.push(sh(
        "while :; do dd if=/dev/urandom of=big bs=4k count=64 oflag=direct conv=notrunc \
         2>/dev/null; echo round; done",
        &dir,
    ));
    // Only holds a file open (stdin), cwd elsewhere.
    kids.0.push(
        Command::new("sleep")
            .arg("1000")
            .current_dir("/")
            .stdin(File::open(dir.join("held")).unwrap())
            .spawn()
            .expect("spawn sleep"),
    );
    // Only holds a shared mapping (the file is closed), cwd elsewhere. Python's
    // own mmap module keeps a dup of the descriptor, so mmap(2) via ctypes.
    let map_script = format!(
        "import ctypes, os, sys\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.mmap.restype = ctypes.c_void_p\n\
         libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, \
         ctypes.c_int, ctypes.c_long]\n\
         fd = os.open('{}', os.O_RDWR)\n\
         p = libc.mmap(None, 4096, 3, 1, fd, 0)\n\
         assert p not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()\n\
         os.close(fd)\n\
         print('started', flush=True)\n\
         sys.stdin.read()\n",
        dir.join("mapped").display()
    );
    let mapper = Command::new("python3")
        .args(["-c", &map_script])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let have_mapper = match mapper {
        Ok(c) => {
            kids.0.push(c);
            true
        }
        Err(e) => {
            eprintln!("no python3 ({e}): the mmap-only holder is left out");
            false
        }
    };
    let mut outs: Vec<BufReader<ChildStdout>> = kids
        .0
        .iter_mut()
        .filter_map(|c| c.stdout.take().map(BufReader::new))
        .collect();
    assert_eq!(read_line(&mut outs[0]).trim(), "started");
    assert_eq!(read_line(&mut outs[1]).trim(), "round");
    if have_mapper {
        assert_eq!(read_line(&mut outs[2]).trim(), "started", "mmap holder");
        // It holds the mount by the mapping alone.
        let pid = kids.0[3].id();
        let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect();
        assert!(!fds.iter().any(|f| f.starts_with(&dir)), "{fds:?}");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(maps.contains(dir.join("mapped").to_str().expect("UTF-8")));
    }
    // The log exists on the device with some lines (else it would only be in
    // the journal that the shutdown discards).
    let synced_lines = std::fs::read(dir.join("log"))
        .unwrap()
        .iter()
        .filter(|&&c| c == b'\n')
        .count();
    run_ok("sync", &["-f", dir.join("log").to_str().expect("UTF-8")]).unwrap();

    // The check below can fail: while the writers run, the device read through
    // B changes between two reads (a full dd round completes between them).
    let before = device_digest(b.path(), IMAGE_SIZE);
    read_line(&mut outs[1]);
    read_line(&mut outs[1]);
    assert_ne!(
        before,
        device_digest(b.path(), IMAGE_SIZE),
        "writes through A must show through B, or the check after the fence proves nothing"
    );

    let wd_dir = tempfile::tempdir().unwrap();
    let wd_path = wd_dir.path().join("watchdog");
    File::create(&wd_path).unwrap();
    let mut wd = FileWatchdog::open(&wd_path).unwrap();
    let started = Instant::now();
    let report = run_fence(
        Arc::new(SystemOps),
        &mut wd,
        &FenceTarget::mount(&dir),
        started + FENCE_BUDGET,
    );
    let took = started.elapsed();
    eprintln!(
        "fence took {took:?}: {}",
        serde_json::to_string(&report).unwrap()
    );

    // Right after the fence: what B shows.
    let log_after = debugfs_cat(b.path(), "/log");
    let digest_after = device_digest(b.path(), IMAGE_SIZE);

    assert!(report.ok, "{report:?}");
    assert!(report.starved.is_none(), "{report:?}");
    for s in &report.steps {
        assert_eq!(s.outcome, Outcome::Ok, "{s:?}");
        assert!(s.finished_ms.expect("finished") <= s.deadline_ms, "{s:?}");
    }
    assert!(took < FENCE_BUDGET, "took {took:?}");
    assert!(!is_mountpoint(&dir), "still mounted");
    assert!(!wd.is_starved());
    let feeds = std::fs::read(&wd_path).unwrap();
    assert!(
        !feeds.is_empty() && feeds.iter().all(|&c| c == b'.'),
        "{feeds:?}"
    );

    // Every writer and holder is dead, by SIGKILL, and was reported.
    let pids: Vec<i32> = kids.0.iter().map(|c| c.id() as i32).collect();
    for pid in &pids {
        assert!(
            report.killed.contains(pid),
            "pid {pid} not killed: {report:?}"
        );
    }
    for child in std::mem::take(&mut kids.0) {
        let pid = child.id();
        let status = wait_exit(child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("pid {pid} still running after the fence"));
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "pid {pid}: {status:?}"
        );
    }

    // Nothing lands afterwards: the device and the file stay as they were.
    assert_unchanged_after(b.path(), IMAGE_SIZE, &digest_after);
    assert_eq!(debugfs_cat(b.path(), "/log"), log_after);

    // The filesystem as a peer would find it: a copy of B, its journal replayed
    // by e2fsck (not on B itself, which must stay untouched), is consistent and
    // its log reads 0, 1, 2, ..., at least the lines synced before the fence,
    // possibly followed by zeros: NOLOGFLUSH drops data not yet written while
    // the journal may already hold the larger size (ext4 orders only newly
    // allocated blocks), which is a crash's outcome, not a late write.
    let copy = wd_dir.path().join("copy.img");
    std::fs::write(&copy, read_device(b.path())).unwrap();
    let fsck = common::run_with_timeout(
        Command::new("e2fsck").args(["-f", "-y", copy.to_str().expect("UTF-8")]),
        common::COMMAND_TIMEOUT,
    )
    .unwrap();
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck on the fenced filesystem: {fsck:?}"
    );
    let log = debugfs_cat(&copy, "/log");
    let (text, tail) = log.split_at(log.find('\0').unwrap_or(log.len()));
    assert!(
        tail.bytes().all(|c| c == 0),
        "garbage after the log's zeros"
    );
    let text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= synced_lines,
        "{} lines after replay, {synced_lines} synced before the fence",
        lines.len()
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.parse::<usize>().ok(), Some(i), "line {i} of log: {l:?}");
    }
    eprintln!(
        "device unchanged through B for {LATE_WRITE_WINDOW:?} after the fence; \
         e2fsck exit {:?}; log has {} lines ({synced_lines} synced), {} zero bytes after",
        fsck.status.code(),
        lines.len(),
        tail.len()
    );
}

/// A watchdog stand-in that also records when it was fed.
struct Timed {
    inner: FileWatchdog,
    feeds: Vec<Instant>,
}

impl Watchdog for Timed {
    fn feed(&mut self) -> std::io::Result<()> {
        self.inner.feed()?;
        self.feeds.push(Instant::now());
        Ok(())
    }
    fn starve(&mut self) {
        self.inner.starve()
    }
    fn is_starved(&self) -> bool {
        self.inner.is_starved()
    }
}

#[test]
fn a_kill_step_that_never_finishes_stops_the_watchdog_feeds() {
    let ops = Arc::new(RecordingOps::new([
        Behavior::Succeed,
        Behavior::Hang,
        Behavior::Succeed,
    ]));
    let dir = tempfile::tempdir().unwrap();
    let wd_path = dir.path().join("watchdog");
    File::create(&wd_path).unwrap();
    let mut wd = Timed {
        inner: FileWatchdog::open(&wd_path).unwrap(),
        feeds: Vec::new(),
    };
    let budget = Duration::from_millis(1_000);
    let start = Instant::now();
    let report = run_fence(
        ops.clone(),
        &mut wd,
        &FenceTarget::mount("/mnt/v"),
        start + budget,
    );
    let took = start.elapsed();
    ops.release();

    assert!(!report.ok, "{report:?}");
    assert_eq!(
        report.starved,
        Some(StarveReason::StepLate {
            step: Step::KillHolders
        })
    );
    assert_eq!(
        report.steps.map(|s| s.outcome),
        [Outcome::Ok, Outcome::NoAnswer, Outcome::Ok],
        "the unmount is still tried after the kill hangs"
    );
    let starved_ms = report.starved_ms.expect("starved");
    // Starved at the kill deadline (60% of the budget, on the driver's clock,
    // which starts a little after `start`), done at the overall deadline.
    let kill_deadline = report.steps[1].deadline_ms;
    assert!((590..=600).contains(&kill_deadline), "{report:?}");
    assert!(
        (kill_deadline..kill_deadline + 100).contains(&starved_ms),
        "{report:?}"
    );
    assert!(
        // The driver's clock starts a little after `start` and rounds the
        // deadline down to a millisecond.
        took + Duration::from_millis(5) >= budget && took < budget + Duration::from_millis(300),
        "{took:?}"
    );
    // Fed while in time, never after the starve.
    let starve_at = start + Duration::from_millis(starved_ms);
    assert!(wd.feeds.len() >= 3, "fed {} times", wd.feeds.len());
    assert!(
        wd.feeds.iter().all(|t| *t <= starve_at),
        "fed after the starve"
    );
    let written = std::fs::read(&wd_path).unwrap();
    assert_eq!(written.len(), wd.feeds.len());
    assert!(wd.feed().is_err(), "a starved watchdog is not fed again");
    assert_eq!(std::fs::read(&wd_path).unwrap().len(), written.len());
    let calls: Vec<Step> = ops.calls().iter().map(|c| c.step).collect();
    assert_eq!(
        calls,
        vec![Step::Shutdown, Step::KillHolders, Step::Unmount]
    );
}

#[test]
fn a_failed_shutdown_starves_but_the_real_kill_and_unmount_still_run() {
    // tmpfs is not ext4: the shutdown ioctl is refused, and the rest of the
    // fence must still be carried out.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (mount): not running as root");
        return;
    }
    let mnt = MountDir(
        tempfile::Builder::new()
            .prefix("bf-fence-tmpfs-")
            .tempdir()
            .unwrap(),
    );
    let dir = mnt.0.path().to_path_buf();
    let dir_arg = dir.to_str().expect("UTF-8");
    run_ok("mount", &["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir_arg]).unwrap();
    let mut kids = Children::default();
    // Holds the mount by its cwd only.
    kids.0.push(
        Command::new("sleep")
            .arg("1000")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep"),
    );
    let pid = kids.0[0].id() as i32;
    let wd_dir = tempfile::tempdir().unwrap();
    let wd_path = wd_dir.path().join("watchdog");
    File::create(&wd_path).unwrap();
    let mut wd = Timed {
        inner: FileWatchdog::open(&wd_path).unwrap(),
        feeds: Vec::new(),
    };
    let report = run_fence(
        Arc::new(SystemOps),
        &mut wd,
        &FenceTarget::mount(&dir),
        Instant::now() + FENCE_BUDGET,
    );
    eprintln!("{}", serde_json::to_string(&report).unwrap());
    assert!(!report.ok);
    assert_eq!(
        report.starved,
        Some(StarveReason::StepFailed {
            step: Step::Shutdown
        })
    );
    assert!(
        report.errors[0]
            .as_deref()
            .is_some_and(|e| e.contains("not on an ext4")),
        "{report:?}"
    );
    assert_eq!(
        report.steps.map(|s| s.outcome),
        [Outcome::Failed, Outcome::Ok, Outcome::Ok]
    );
    assert_eq!(report.killed, vec![pid]);
    assert!(!is_mountpoint(&dir));
    assert!(wd.is_starved());
    let child = kids.0.pop().expect("the sleep");
    let status = wait_exit(child, Duration::from_secs(10)).expect("killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

/// The daemon's device fence goes by the device number it recorded when the
/// volume was opened. Once that loop device is detached and its number given
/// to another image (as `losetup -f` does at once), the fence must leave the
/// new disk's users alone: it compares the number's `diskseq` with the one it
/// recorded.
#[test]
fn a_device_number_given_to_another_disk_is_not_fenced() {
    use blockfence::fence::device::{diskseq, DeviceOps};
    use std::os::unix::fs::MetadataExt;
    if !require_root_loop() {
        return;
    }
    let ours = SharedImage::create(IMAGE_SIZE).expect("image");
    let theirs = SharedImage::create(IMAGE_SIZE).expect("image");
    let old = Loop::attach(ours.path());
    let rdev = std::fs::metadata(old.path()).unwrap().rdev();
    let Some(seq) = diskseq(rdev) else {
        eprintln!("skipped: this kernel has no diskseq in sysfs");
        return;
    };
    let path = old.path().to_path_buf();
    drop(old);
    // The same number, another disk, mounted and used by someone else.
    run_ok(
        "losetup",
        &[
            "--direct-io=on",
            path.to_str().unwrap(),
            theirs.path().to_str().unwrap(),
        ],
    )
    .expect("losetup on the same number");
    let new = Loop(path.clone());
    assert_ne!(diskseq(rdev), Some(seq), "a new attach gets a new diskseq");
    run_ok("mkfs.ext4", &["-q", "-F", new.arg()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    run_ok("mount", &[new.arg(), dir.path().to_str().unwrap()]).unwrap();
    let mut user = Command::new("sleep")
        .arg("1000")
        .current_dir(dir.path())
        .spawn()
        .unwrap();
    let stale = FenceTarget::device(&path, rdev, Some(seq));
    struct Nothing;
    impl Watchdog for Nothing {
        fn feed(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn starve(&mut self) {}
        fn is_starved(&self) -> bool {
            false
        }
    }
    let report = run_fence(
        Arc::new(DeviceOps),
        &mut Nothing,
        &stale,
        Instant::now() + FENCE_BUDGET,
    );
    let still_mounted = is_mountpoint(dir.path());
    let user_alive = user.try_wait().unwrap().is_none();
    let _ = user.kill();
    let _ = user.wait();
    let _ = run_ok("umount", &[dir.path().to_str().unwrap()]);
    drop(new);
    assert!(report.ok, "{report:?}");
    assert!(still_mounted, "the other disk's mount was fenced");
    assert!(user_alive, "the other disk's user was killed");
}
