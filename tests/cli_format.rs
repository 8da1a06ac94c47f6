//! The operator commands end to end: the real `blockfence` binary on real loop
//! devices (`--direct-io=on`, no FUSE), with the e2fsprogs tools and `mount` as
//! an operator would use them.
//!
//! - `format` makes an ext4 that mounts unchanged, with MMP at the interval the
//!   lease parameters imply, `errors=remount-ro`, ending before the lease area,
//!   which the filesystem never touches;
//! - every refusal (data on the device, too small, mounted, bad path, bad
//!   option, unformatted, no permission) is exit code 1 and one line on stderr
//!   that says what is wrong and what to do, and leaves the device as it was;
//! - `grow` follows the documented procedure (enlarge, `losetup -c`, grow, the
//!   printed `resize2fs`) and a node that still sees the old size is told so;
//! - the exit codes of `lease acquire`, and `--help` of every subcommand.
//!
//! Needs root and /dev/loop-control (tests that need neither run anyway);
//! otherwise prints why and passes (`BLOCKFENCE_REQUIRE_DEVICES=1` makes that a
//! failure). `BLOCKFENCE_KEEP_DEVICES=1` keeps images and loop devices;
//! `BLOCKFENCE_TEST_DIR` chooses where images go (default: cargo's per-target
//! tmp dir; it must support O_DIRECT, so not tmpfs).

mod common;

use blockfence::core::params::Params;
use blockfence::disk::area::MIN_DEVICE_BYTES;
use common::{
    is_mountpoint, pattern, read_direct, require_root_loop, run_with_timeout, write_direct,
    CmdOutput, Scratch,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_blockfence");
const MIB: u64 = 1 << 20;
/// Limit for one command (mkfs, e2fsck, a blockfence call).
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for an event of a running `lease acquire` (it polls every 0.5 s).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

fn keep() -> bool {
    std::env::var(common::KEEP_ENV).is_ok_and(|v| v == "1")
}

/// Where the lease area of a device of `size` bytes is (docs/PROTOCOL.md §1),
/// computed here independently of the code under test.
fn area_offset(size: u64) -> u64 {
    size / MIB * MIB - MIB
}

// ---------------------------------------------------------------------------
// Images, loop devices, mounts (undone on drop, also when a test panics)

/// Runs a short tool, panicking with its stderr if it fails.
fn must(program: &str, args: &[&OsStr]) -> String {
    let out = run_with_timeout(Command::new(program).args(args), CMD_TIMEOUT)
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        out.stderr
    );
    out.stdout
}

/// An attached loop device, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    /// `losetup --direct-io=on EXTRA -f --show IMAGE`; retried, because other
    /// test processes attach at the same time and `-f` may lose the race.
    fn attach(image: &Path, extra: &[&str]) -> Loop {
        let mut last = String::new();
        for _ in 0..10 {
            let out = run_with_timeout(
                Command::new("losetup")
                    .arg("--direct-io=on")
                    .args(extra)
                    .args(["-f", "--show"])
                    .arg(image),
                CMD_TIMEOUT,
            )
            .expect("run losetup");
            if out.status.success() {
                return Loop {
                    dev: PathBuf::from(out.stdout.trim()),
                };
            }
            last = out.stderr;
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("cannot attach a loop device to {}: {last}", image.display());
    }

    fn path(&self) -> &Path {
        &self.dev
    }

    fn os(&self) -> &OsStr {
        self.dev.as_os_str()
    }

    /// `losetup -c`: the kernel re-reads the backing file's size.
    fn refresh(&self) {
        must("losetup", &["-c".as_ref(), self.os()]);
    }

    fn size(&self) -> u64 {
        must("blockdev", &["--getsize64".as_ref(), self.os()])
            .trim()
            .parse()
            .expect("blockdev prints a number")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if keep() {
            eprintln!("kept {}", self.dev.display());
            return;
        }
        for _ in 0..20 {
            let out = Command::new("losetup").arg("-d").arg(&self.dev).output();
            if out.is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not detach {}", self.dev.display());
    }
}

/// A filesystem mounted by `mount DEV DIR`, unmounted on drop.
struct Mount {
    dir: PathBuf,
}

impl Mount {
    fn new(dev: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).expect("mount point");
        must("mount", &[dev.as_os_str(), dir.as_os_str()]);
        Mount {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn unmount(self) {
        must("umount", &[self.dir.as_os_str()]);
        std::mem::forget(self);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mountpoint(&self.dir)
            && !Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

// ---------------------------------------------------------------------------
// Running blockfence and the e2fsprogs tools

fn bf<S: AsRef<OsStr>>(args: &[S]) -> CmdOutput {
    run_with_timeout(Command::new(BIN).args(args), CMD_TIMEOUT).expect("run blockfence")
}

/// A copy of the binary that user nobody can run, in a directory of its own
/// under /tmp: the build's own directory may be unreachable for nobody (a
/// checkout under a mode-0700 directory).
fn binary_for_nobody() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("blockfence-nobody-")
        .tempdir_in("/tmp")
        .expect("temp dir under /tmp");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::copy(BIN, dir.path().join("blockfence")).expect("copy the binary");
    dir
}

/// `blockfence ARGS` as user nobody (root keeps no capability across
/// runuser), running the copy in `bin_dir` ([`binary_for_nobody`]).
fn bf_as_nobody<S: AsRef<OsStr>>(bin_dir: &Path, args: &[S]) -> CmdOutput {
    run_with_timeout(
        Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(bin_dir.join("blockfence"))
            .args(args),
        CMD_TIMEOUT,
    )
    .expect("run runuser")
}

fn format_ok(dev: &Path, extra: &[&str]) -> CmdOutput {
    let mut args: Vec<&OsStr> = vec!["format".as_ref(), dev.as_os_str()];
    args.extend(extra.iter().map(OsStr::new));
    let out = bf(&args);
    assert!(
        out.status.success(),
        "format {extra:?} failed ({}): {}",
        out.status,
        out.stderr
    );
    out
}

/// Asserts a refusal: exit code 1, nothing on stdout, exactly one line on
/// stderr, no panic, and every word of `words` (ignoring case) in that line.
/// Returns the line.
fn refused(what: &str, out: &CmdOutput, words: &[&str]) -> String {
    assert!(
        !out.stderr.contains("panicked"),
        "{what}: panicked: {}",
        out.stderr
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit code; stdout {:?}, stderr {:?}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.stdout, "", "{what}: printed on stdout");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: one line expected: {:?}",
        out.stderr
    );
    let line = lines[0].to_lowercase();
    for w in words {
        assert!(
            line.contains(&w.to_lowercase()),
            "{what}: {w:?} missing in: {}",
            lines[0]
        );
    }
    lines[0].to_string()
}

fn inspect_json(dev: &Path) -> Value {
    let out = bf(&["inspect".as_ref(), dev.as_os_str(), "--json".as_ref()]);
    assert!(out.status.success(), "inspect failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("inspect --json prints JSON")
}

/// `dumpe2fs -h` as `key -> value`.
fn dumpe2fs(dev: &Path) -> BTreeMap<String, String> {
    must("dumpe2fs", &["-h".as_ref(), dev.as_os_str()])
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn field<'a>(d: &'a BTreeMap<String, String>, key: &str) -> &'a str {
    d.get(key)
        .unwrap_or_else(|| panic!("dumpe2fs shows no {key:?}: {d:#?}"))
}

/// Bytes covered by the filesystem on `dev`, per dumpe2fs.
fn fs_bytes(dev: &Path) -> u64 {
    let d = dumpe2fs(dev);
    let n = |k| field(&d, k).parse::<u64>().expect("a number");
    n("Block count") * n("Block size")
}

/// Byte offsets in the ext4 superblock of `s_mtime` (last mount) and
/// `s_lastcheck` (last fsck, or mkfs), both seconds since the epoch.
const SB_MTIME: usize = 0x2C;
const SB_LASTCHECK: usize = 0x40;

fn sb_u32(dev: &Path, field: usize) -> u32 {
    let b = read_direct(dev, 0, 4096).expect("read superblock");
    let at = 1024 + field;
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Returns once the wall clock is in a later second than `t` (a clock
/// condition, not an event: at most one second of sleep).
fn wait_for_wall_clock_past(t: u32) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        if now.as_secs() > u64::from(t) {
            return;
        }
        std::thread::sleep(Duration::from_nanos(
            1_000_000_000 - u64::from(now.subsec_nanos()),
        ));
    }
}

fn assert_fsck_clean(dev: &Path) {
    let out = run_with_timeout(Command::new("e2fsck").arg("-fn").arg(dev), CMD_TIMEOUT)
        .expect("run e2fsck");
    assert_eq!(
        out.status.code(),
        Some(0),
        "e2fsck -fn {}: {}{}",
        dev.display(),
        out.stdout,
        out.stderr
    );
}

/// Writes `count` files of `len` pattern bytes (or until the filesystem is
/// full), fsyncs them, and returns `(name, seed, len)` of every complete file.
fn fill(dir: &Path, count: usize, len: usize) -> Vec<(PathBuf, u64, usize)> {
    let mut files = Vec::new();
    for i in 0..count {
        let path = dir.join(format!("file-{i}"));
        let data = pattern(i as u64, len);
        let mut f = File::create(&path).expect("create file");
        match f.write_all(&data).and_then(|_| f.sync_all()) {
            Ok(()) => files.push((path, i as u64, len)),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("writing {}: {e}", path.display()),
        }
    }
    files
}

fn assert_files(files: &[(PathBuf, u64, usize)]) {
    for (path, seed, len) in files {
        let mut got = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut got))
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            got == pattern(*seed, *len),
            "{} does not hold what was written",
            path.display()
        );
    }
}

/// What `format` looks at and overwrites: the first MiB and the area block.
fn snapshot(dev: &Path, area: u64) -> (Vec<u8>, Vec<u8>) {
    (
        read_direct(dev, 0, MIB as usize).expect("read start"),
        read_direct(dev, area, 4096).expect("read area block"),
    )
}

/// Zeros the start and the end of `dev` (every place format or mkfs look).
fn wipe(dev: &Path, size: u64) {
    let zeros = vec![0u8; 2 * MIB as usize];
    write_direct(dev, 0, &zeros).expect("wipe start");
    write_direct(dev, size / MIB * MIB - 2 * MIB, &zeros).expect("wipe end");
}

// ---------------------------------------------------------------------------
// A running `lease acquire`

/// `blockfence lease acquire` in the background: its JSON events arrive on a
/// channel, its exit status on another (no polling).
struct Acquirer {
    pid: u32,
    events: Receiver<Value>,
    exit: Receiver<std::io::Result<ExitStatus>>,
    exited: bool,
}

impl Acquirer {
    fn start(dev: &Path, node: &str, extra: &[&str]) -> Acquirer {
        let mut child: Child = Command::new(BIN)
            .args(["lease", "acquire"])
            .arg(dev)
            .args(["--node", node])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lease acquire");
        let stdout = child.stdout.take().expect("piped stdout");
        let (etx, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                if etx.send(v).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        let (xtx, exit) = channel();
        std::thread::spawn(move || {
            let _ = xtx.send(child.wait());
        });
        Acquirer {
            pid,
            events,
            exit,
            exited: false,
        }
    }

    /// Waits for the next event named `kind`; returns it.
    fn wait_event(&self, kind: &str) -> Value {
        loop {
            let v = self
                .events
                .recv_timeout(EVENT_TIMEOUT)
                .unwrap_or_else(|e| panic!("no {kind} event within {EVENT_TIMEOUT:?}: {e}"));
            if v["event"] == kind {
                return v;
            }
        }
    }

    fn terminate(&self) {
        // The child is reaped only by the waiter thread, so until `exit`
        // delivers, the pid is still this child's.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
    }

    /// The exit code (panics if it is killed by a signal or does not exit).
    fn wait_exit(&mut self) -> i32 {
        let status = self
            .exit
            .recv_timeout(EVENT_TIMEOUT)
            .expect("lease acquire did not exit")
            .expect("wait");
        self.exited = true;
        status
            .code()
            .unwrap_or_else(|| panic!("lease acquire ended by a signal: {status}"))
    }
}

impl Drop for Acquirer {
    fn drop(&mut self) {
        if !self.exited && self.exit.try_recv().is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.exit.recv_timeout(EVENT_TIMEOUT);
        }
    }
}

// ---------------------------------------------------------------------------
// 1. format

/// A fresh sparse image formatted with two reserved nodes: ext4 that mounts as
/// is, MMP at the interval the default parameters give, remount-ro on errors,
/// ending before the area; fsck clean; inspect shows both slots, lease free;
/// filling the filesystem and reading it back never changes the area's bytes.
#[test]
fn format_makes_a_plain_mountable_ext4_that_never_touches_the_lease_area() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    // Not a multiple of 1 MiB: the area is at align_down(size) - 1 MiB.
    let size = 64 * MIB + 512 * 1024;
    let lp = Loop::attach(&scratch.image("vol.img", size), &[]);
    let dev = lp.path();
    assert_eq!(lp.size(), size);
    let area = area_offset(size);
    assert_eq!(area, 63 * MIB);

    let out = format_ok(dev, &["--node", "a", "--node", "b"]);
    assert!(out.stdout.contains("formatted"), "{}", out.stdout);

    let d = dumpe2fs(dev);
    let features: Vec<&str> = field(&d, "Filesystem features").split(' ').collect();
    assert!(features.contains(&"mmp"), "features: {features:?}");
    assert_eq!(
        field(&d, "MMP update interval"),
        Params::default().mmp_update_interval_s().to_string()
    );
    assert_eq!(field(&d, "Errors behavior"), "Remount read-only");
    let fs_end = fs_bytes(dev);
    assert!(
        fs_end <= area,
        "the filesystem ends at {fs_end}, past the lease area at {area}"
    );
    assert_fsck_clean(dev);

    let v = inspect_json(dev);
    assert_eq!(v["lease"]["state"], "free", "{v}");
    assert_eq!(v["owner"]["state"], "free", "{v}");
    assert_eq!(v["header"]["area_offset"], area, "{v}");
    let slots = v["slots"].as_array().expect("slots");
    let reserved: Vec<(u64, &str, &str)> = slots
        .iter()
        .map(|s| {
            (
                s["index"].as_u64().expect("index"),
                s["name"].as_str().expect("name"),
                s["state"].as_str().expect("state"),
            )
        })
        .collect();
    assert_eq!(reserved, [(0, "a", "idle"), (1, "b", "idle")], "{v}");

    // The whole area, and the sub-MiB tail after it.
    let area_len = (size - area) as usize / 4096 * 4096;
    let before = read_direct(dev, area, area_len).expect("read area");
    let unchanged = |when: &str| {
        let now = read_direct(dev, area, area_len).expect("read area");
        assert!(now == before, "the lease area changed {when}");
    };

    let m = Mount::new(dev, &scratch.path().join("mnt"));
    let files = fill(m.path(), 64, 2 * MIB as usize);
    let written: usize = files.iter().map(|f| f.2).sum();
    assert!(
        written as u64 >= 40 * MIB,
        "only {written} bytes fitted: the filesystem should be about 63 MiB"
    );
    assert_files(&files);
    // This filesystem only: a global sync would wait for other tests' mounts,
    // some of them on storage paths stalled on purpose.
    must("sync", &[std::ffi::OsStr::new("-f"), m.path().as_os_str()]);
    unchanged("while the filesystem is full and mounted");
    m.unmount();
    unchanged("after unmount");
    // Read everything back from the device, not the page cache.
    let m = Mount::new(dev, &scratch.path().join("mnt"));
    assert_files(&files);
    m.unmount();
    unchanged("after reading the files back");
    assert_fsck_clean(dev);
}

/// The MMP update interval follows the lease parameters given to format.
#[test]
fn format_sets_the_mmp_interval_from_the_lease_parameters() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let lp = Loop::attach(&scratch.image("vol.img", 64 * MIB), &[]);
    let slow = Params {
        lease_timeout_ms: 60_000,
        ..Params::default()
    };
    assert_ne!(
        slow.mmp_update_interval_s(),
        Params::default().mmp_update_interval_s()
    );
    format_ok(lp.path(), &["--lease-timeout-ms", "60000"]);
    let d = dumpe2fs(lp.path());
    assert_eq!(
        field(&d, "MMP update interval"),
        slow.mmp_update_interval_s().to_string()
    );
    let v = inspect_json(lp.path());
    assert_eq!(v["header"]["params"]["lease_timeout_ms"], 60_000, "{v}");
}

// ---------------------------------------------------------------------------
// 2. refusals

/// Whatever is on the device, format refuses it without --force (naming it,
/// pointing at --force, writing nothing) and formats it with --force.
#[test]
fn format_refuses_existing_content_without_force_and_formats_with_it() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let size = 64 * MIB;
    let area = area_offset(size);
    let lp = Loop::attach(&scratch.image("vol.img", size), &[]);
    let dev = lp.path();

    type Put = Box<dyn Fn(&Path)>;
    let sig = |offset: u64, bytes: &'static [u8]| -> Put {
        Box::new(move |dev: &Path| {
            let block = offset / 4096 * 4096;
            let mut b = read_direct(dev, block, 4096).expect("read");
            let at = (offset - block) as usize;
            b[at..at + bytes.len()].copy_from_slice(bytes);
            write_direct(dev, block, &b).expect("write");
        })
    };
    let mbr = |dev: &Path| {
        // One partition entry (type 0x83 from sector 2048) and the boot signature.
        let mut b = read_direct(dev, 0, 4096).expect("read");
        b[446 + 4] = 0x83;
        b[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        b[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
        b[510..512].copy_from_slice(&[0x55, 0xAA]);
        write_direct(dev, 0, &b).expect("write");
    };
    let cases: Vec<(&str, Put, String)> = vec![
        (
            "ext4 made by mkfs.ext4",
            Box::new(|dev: &Path| {
                must(
                    "mkfs.ext4",
                    &["-q".as_ref(), "-F".as_ref(), dev.as_os_str()],
                );
            }),
            "ext2/ext3/ext4 filesystem".into(),
        ),
        (
            "MBR partition table",
            Box::new(mbr),
            "MBR partition table".into(),
        ),
        (
            "GPT partition table",
            Box::new(move |dev: &Path| {
                mbr(dev);
                sig(512, b"EFI PART")(dev);
            }),
            "GPT partition table".into(),
        ),
        (
            "data near the start",
            sig(12_345, b"\x01"),
            "non-zero data at byte 12345".into(),
        ),
        (
            "data where the area header goes",
            sig(area + 100, b"\x01"),
            format!("non-zero data at byte {}", area + 100),
        ),
        (
            "an earlier format",
            Box::new(|dev: &Path| {
                format_ok(dev, &[]);
            }),
            "already formatted".into(),
        ),
    ];
    for (what, put, named) in cases {
        wipe(dev, size);
        put(dev);
        let before = snapshot(dev, area);
        let out = bf(&["format".as_ref(), dev.as_os_str()]);
        refused(what, &out, &[&named, "refusing", "--force"]);
        assert!(snapshot(dev, area) == before, "{what}: format wrote anyway");

        format_ok(dev, &["--force", "--node", "a"]);
        let v = inspect_json(dev);
        assert_eq!(v["slots"][0]["name"], "a", "{what}: {v}");
        assert_fsck_clean(dev);
    }
}

#[test]
fn format_refuses_a_device_below_the_minimum_size_and_says_the_minimum() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let lp = Loop::attach(&scratch.image("small.img", 8 * MIB), &[]);
    let min_mib = format!("{} MiB", MIN_DEVICE_BYTES / MIB);
    for force in [false, true] {
        let mut args = vec!["format".as_ref(), lp.os()];
        if force {
            args.push("--force".as_ref());
        }
        refused("8 MiB", &bf(&args), &["too small", &min_mib, "8388608"]);
    }
    assert!(
        read_direct(lp.path(), 0, MIB as usize)
            .expect("read")
            .iter()
            .all(|&b| b == 0),
        "format wrote to a device it refused"
    );
}

/// A device mounted on this node is refused even with --force, and the
/// mounted filesystem is left intact.
#[test]
fn format_refuses_a_device_mounted_here_even_with_force() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let lp = Loop::attach(&scratch.image("vol.img", 64 * MIB), &[]);
    format_ok(lp.path(), &[]);
    let m = Mount::new(lp.path(), &scratch.path().join("mnt"));
    let files = fill(m.path(), 1, 4096);
    for force in [false, true] {
        let mut args = vec!["format".as_ref(), lp.os()];
        if force {
            args.push("--force".as_ref());
        }
        refused("mounted", &bf(&args), &["in use", "unmount"]);
    }
    m.unmount();
    assert_fsck_clean(lp.path());
    let m = Mount::new(lp.path(), &scratch.path().join("mnt"));
    assert_files(&files);
    m.unmount();
}

/// A missing path, a directory and a character device: every command names
/// the problem in one line (no root needed).
#[test]
fn paths_that_are_not_devices_are_refused_by_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-device");
    let paths: [(&Path, &[&str]); 3] = [
        (&missing, &["no such device", "check the path"]),
        (dir.path(), &["is a directory", "block device"]),
        (
            Path::new("/dev/null"),
            &["is a character device", "block device"],
        ),
    ];
    for (path, words) in paths {
        for cmd in [
            &["format"][..],
            &["format", "--force"],
            &["inspect"],
            &["lease", "acquire", "--node", "a"],
            &["grow"],
        ] {
            let mut args: Vec<&OsStr> = cmd.iter().map(OsStr::new).collect();
            args.push(path.as_os_str());
            let line = refused(&format!("{cmd:?} {}", path.display()), &bf(&args), words);
            assert!(line.contains(&*path.to_string_lossy()), "{line}");
        }
    }
    // No device at all: a usage error.
    let out = bf(&["format"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("<DEVICE>"), "{}", out.stderr);
}

/// Bad options are refused with what is wrong, before the device is touched.
#[test]
fn bad_format_options_are_refused_before_the_device_is_touched() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let size = 64 * MIB;
    let lp = Loop::attach(&scratch.image("vol.img", size), &[]);
    let long = "n".repeat(64);
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["--slots", "0"],
            &["--slots", "between 1 and 252", "got 0"],
        ),
        (
            &["--slots", "999"],
            &["--slots", "between 1 and 252", "got 999"],
        ),
        (
            &["--node", "a", "--node", "b", "--node", "a"],
            &["--node \"a\"", "twice", "unique"],
        ),
        (&["--node", &long], &[&long, "1 to 63 bytes", "got 64"]),
        (&["--node", ""], &["1 to 63 bytes", "got 0"]),
        (
            &["--lease-timeout-ms", "100"],
            &[
                "invalid lease parameters",
                "lease_timeout (100 ms)",
                "at least",
            ],
        ),
        (
            &["--label", "a-label-of-17-chr"],
            &["--label", "17 bytes", "at most 16"],
        ),
    ];
    for (extra, words) in cases {
        for force in [&[][..], &["--force"]] {
            let mut args = vec!["format".as_ref(), lp.os()];
            args.extend(extra.iter().chain(force).map(OsStr::new));
            refused(&format!("{extra:?} {force:?}"), &bf(&args), words);
        }
    }
    let (start, header) = snapshot(lp.path(), area_offset(size));
    assert!(
        start.iter().chain(&header).all(|&b| b == 0),
        "a refused format wrote to the device"
    );
}

/// inspect, lease acquire and grow on a device without a lease area (blank,
/// or a plain ext4) tell the user to run `blockfence format`.
#[test]
fn unformatted_devices_point_to_blockfence_format() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let lp = Loop::attach(&scratch.image("vol.img", 64 * MIB), &[]);
    let dev = lp.dev.to_string_lossy().into_owned();
    let hint = format!("blockfence format {dev}");
    for content in ["blank", "ext4"] {
        if content == "ext4" {
            must("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), lp.os()]);
        }
        for cmd in [
            vec!["inspect", &dev],
            vec!["inspect", &dev, "--json"],
            vec!["lease", "acquire", &dev, "--node", "a"],
            vec!["lease", "acquire", &dev, "--node", "a", "--timeout", "1"],
            vec!["grow", &dev],
        ] {
            refused(&format!("{content}: {cmd:?}"), &bf(&cmd), &["no", &hint]);
        }
    }
}

/// Run as nobody against a root-only device, every command says permission.
#[test]
fn without_permission_every_command_says_so() {
    if !require_root_loop() {
        return;
    }
    if !Command::new("id")
        .arg("nobody")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIPPED: no user nobody");
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let lp = Loop::attach(&scratch.image("vol.img", 64 * MIB), &[]);
    format_ok(lp.path(), &[]);
    let meta = std::fs::metadata(lp.path()).expect("stat");
    assert!(
        meta.uid() == 0 && meta.mode() & 0o007 == 0,
        "{} is not root-only (mode {:o})",
        lp.dev.display(),
        meta.mode()
    );
    let dev = lp.dev.to_string_lossy().into_owned();
    let bin = binary_for_nobody();
    for cmd in [
        vec!["inspect", &dev],
        vec!["format", &dev, "--force"],
        vec!["lease", "acquire", &dev, "--node", "a"],
        vec!["grow", &dev],
    ] {
        refused(
            &format!("nobody: {cmd:?}"),
            &bf_as_nobody(bin.path(), &cmd),
            &["permission denied", &dev, "root"],
        );
    }
    // Nothing changed: the area is as format left it.
    let v = inspect_json(lp.path());
    assert_eq!(v["lease"]["state"], "free", "{v}");
}

// ---------------------------------------------------------------------------
// 3. grow

/// The documented procedure: enlarge the device, `losetup -c`, `blockfence
/// grow`, then the `resize2fs` it prints. The lease history (generation, slots)
/// and the files survive; a node still seeing the old size is told the area
/// moved; a second grow has nothing to do.
#[test]
fn grow_follows_the_documented_procedure() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let (old_size, new_size) = (64 * MIB, 128 * MIB);
    let (old_area, new_area) = (area_offset(old_size), area_offset(new_size));
    let image = scratch.image("vol.img", old_size);
    let lp = Loop::attach(&image, &[]);
    let dev = lp.path();
    format_ok(dev, &["--node", "a", "--node", "b"]);
    // As in production, the filesystem is mounted after it was last checked
    // (by mkfs): resize2fs then insists on an e2fsck first. The times are in
    // whole seconds, so mount in a later second than mkfs.
    let checked = sb_u32(dev, SB_LASTCHECK);
    wait_for_wall_clock_past(checked);
    let m = Mount::new(dev, &scratch.path().join("mnt"));
    let files = fill(m.path(), 1, 3 * MIB as usize);
    m.unmount();
    assert!(
        sb_u32(dev, SB_MTIME) > checked,
        "mounted in the second of mkfs"
    );

    let mut a = Acquirer::start(dev, "a", &[]);
    assert_eq!(a.wait_event("acquired")["generation"], 1);
    a.terminate();
    a.wait_event("released");
    assert_eq!(a.wait_exit(), 0);

    refused(
        "grow before the device grew",
        &bf(&["grow".as_ref(), lp.os()]),
        &["nothing to grow", "losetup -c"],
    );

    // A node that keeps seeing the old size.
    let old_view = Loop::attach(&image, &["--sizelimit", &old_size.to_string()]);
    File::options()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(new_size))
        .expect("enlarge image");
    lp.refresh();
    assert_eq!(lp.size(), new_size);
    assert_eq!(old_view.size(), old_size);
    assert_eq!(
        inspect_json(old_view.path())["header"]["area_offset"],
        old_area
    );

    let inspect = |l: &Loop| bf(&["inspect".as_ref(), l.os()]);
    refused(
        "inspect after the device grew",
        &inspect(&lp),
        &["enlarged", &format!("blockfence grow {}", dev.display())],
    );

    let out = bf(&["grow".as_ref(), lp.os()]);
    assert!(out.status.success(), "grow: {out:?}");
    // The commands: the indented lines after the one ending in "run:".
    let commands: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .skip_while(|l| !l.ends_with("run:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let resize = commands
        .iter()
        .find(|c| c[0] == "resize2fs")
        .unwrap_or_else(|| panic!("grow printed no resize2fs command: {}", out.stdout));
    assert_eq!(resize.len(), 3, "{resize:?}");
    assert_eq!(Path::new(resize[1]), dev, "{resize:?}");
    let kib: u64 = resize[2]
        .strip_suffix('K')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a size in K: {resize:?}"));
    assert!(kib * 1024 <= new_area, "{resize:?} would cover the area");
    // Exactly what was printed, in order.
    for c in &commands {
        must(c[0], &c[1..].iter().map(OsStr::new).collect::<Vec<_>>());
    }

    assert_fsck_clean(dev);
    let fs_end = fs_bytes(dev);
    assert!(
        fs_end > old_area && fs_end <= new_area,
        "the filesystem ends at {fs_end}: it should have grown past {old_area} and stop at {new_area}"
    );
    let m = Mount::new(dev, &scratch.path().join("mnt"));
    assert_files(&files);
    m.unmount();

    let v = inspect_json(dev);
    assert_eq!(v["header"]["area_offset"], new_area, "{v}");
    assert_eq!(v["owner"]["generation"], 1, "{v}");
    assert_eq!(v["slots"][0]["name"], "a", "{v}");
    assert_eq!(v["slots"][0]["generation"], 1, "{v}");
    assert_eq!(v["slots"][1]["name"], "b", "{v}");
    assert_eq!(v["slots"][1]["state"], "idle", "{v}");

    for out in [
        inspect(&old_view),
        bf(&[
            "lease".as_ref(),
            "acquire".as_ref(),
            old_view.os(),
            "--node".as_ref(),
            "b".as_ref(),
        ]),
    ] {
        refused(
            "old size",
            &out,
            &[
                "was moved",
                &format!("offset {new_area}"),
                "re-read the device size",
            ],
        );
    }
    refused(
        "second grow",
        &bf(&["grow".as_ref(), lp.os()]),
        &["nothing to grow"],
    );
    // And the lease still works where it moved, with the next generation.
    let mut b = Acquirer::start(dev, "b", &[]);
    assert_eq!(b.wait_event("acquired")["generation"], 2);
    b.terminate();
    assert_eq!(b.wait_exit(), 0);
}

/// grow refuses while a node holds the lease and changes nothing: the holder
/// releases normally, and then grow works.
#[test]
fn grow_is_refused_while_the_lease_is_held() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let image = scratch.image("vol.img", 64 * MIB);
    let lp = Loop::attach(&image, &[]);
    format_ok(lp.path(), &["--node", "a"]);
    let mut a = Acquirer::start(lp.path(), "a", &[]);
    a.wait_event("acquired");
    File::options()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(128 * MIB))
        .expect("enlarge image");
    lp.refresh();
    refused(
        "grow while held",
        &bf(&["grow".as_ref(), lp.os()]),
        &[
            "refusing to move",
            "held by slot 0 (a)",
            "release the lease",
        ],
    );
    a.terminate();
    let released = a.wait_event("released");
    assert_eq!(released["clean"], true, "{released}");
    assert_eq!(a.wait_exit(), 0);
    let out = bf(&["grow".as_ref(), lp.os()]);
    assert!(out.status.success(), "grow after release: {out:?}");
}

// ---------------------------------------------------------------------------
// 4. lease acquire exit codes

/// 3 on --timeout, 5 on SIGTERM while waiting, 0 after acquire + SIGTERM,
/// 1 on an error.
#[test]
fn lease_acquire_exit_codes_are_as_documented() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("cli_format.");
    let lp = Loop::attach(&scratch.image("vol.img", 64 * MIB), &[]);
    format_ok(lp.path(), &["--node", "a", "--node", "b"]);
    let mut a = Acquirer::start(lp.path(), "a", &[]);
    a.wait_event("acquired");

    let mut b = Acquirer::start(lp.path(), "b", &["--timeout", "1"]);
    assert_eq!(b.wait_event("waiting")["holder"], "a");
    assert_eq!(b.wait_exit(), 3, "timed out");

    let mut b = Acquirer::start(lp.path(), "b", &[]);
    b.wait_event("waiting");
    b.terminate();
    assert_eq!(b.wait_exit(), 5, "interrupted before acquiring");

    a.terminate();
    a.wait_event("released");
    assert_eq!(a.wait_exit(), 0, "released");

    // An error: parameters the volume cannot take.
    // Errors: parameters the volume cannot take, a name that fits no slot.
    let long = "n".repeat(64);
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--node", "b", "--lease-timeout-ms", "100"],
            &["invalid lease parameters", "at least"],
        ),
        (
            &["--node", "b", "--lease-timeout-ms", "600000"],
            &["above the ceiling", "shorter timeouts"],
        ),
        (&["--node", &long], &["--node", "1 to 63 bytes", "got 64"]),
    ];
    for (extra, words) in cases {
        let mut args = vec!["lease".as_ref(), "acquire".as_ref(), lp.os()];
        args.extend(extra.iter().map(OsStr::new));
        refused(&format!("{extra:?}"), &bf(&args), words);
    }
    assert_eq!(inspect_json(lp.path())["owner"]["generation"], 1);
}

/// A bad --timeout is a usage error (2) that says what is wrong, never a panic.
#[test]
fn lease_acquire_rejects_a_bad_timeout() {
    for (t, why) in [
        ("-1", ">= 0"),
        ("-0.5", ">= 0"),
        ("abc", "not a number"),
        ("nan", ">= 0"),
        ("inf", ">= 0"),
        ("1e300", "too large"),
    ] {
        let out = bf(&[
            "lease",
            "acquire",
            "/dev/null",
            "--node",
            "a",
            "--timeout",
            t,
        ]);
        assert_eq!(out.status.code(), Some(2), "--timeout {t}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        let first = out.stderr.lines().next().unwrap_or("");
        assert!(
            first.contains(&format!("'{t}'")) && first.contains("--timeout") && first.contains(why),
            "--timeout {t}: {}",
            out.stderr
        );
    }
}

// ---------------------------------------------------------------------------
// 5. --help

#[test]
fn every_subcommand_has_help_with_its_key_options() {
    let cases: [(&[&str], &[&str]); 6] = [
        (&[], &["format", "inspect", "lease", "grow"]),
        (
            &["format"],
            &[
                "<DEVICE>",
                "--force",
                "--node",
                "--slots",
                "--lease-timeout-ms",
                "--label",
            ],
        ),
        (&["inspect"], &["<DEVICE>", "--json", "--watch"]),
        (&["lease"], &["acquire"]),
        (
            &["lease", "acquire"],
            &["<DEVICE>", "--node", "--timeout", "SIGTERM", "Exit codes"],
        ),
        (
            &["grow"],
            &["<DEVICE>", "resize2fs", "--force", "--old-offset"],
        ),
    ];
    for (cmd, words) in cases {
        let mut args = cmd.to_vec();
        args.push("--help");
        let out = bf(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        for w in words {
            assert!(
                out.stdout.contains(w),
                "{args:?}: no {w:?} in:\n{}",
                out.stdout
            );
        }
    }
}
